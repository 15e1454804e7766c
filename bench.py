"""
Speed and memory of the looped model against its limits and against a plain GPT of equal FLOPs (METHOD.md §6).

    python bench.py --device=cpu --quick            # about 1-2 minutes on 2 CPU cores
    python bench.py --device=cuda --json_out=bench.json --ckpt=out/ckpt.pt

A table per measurement, each with its target, then one JSON line. Timing: warm-up, synchronize, median of repeats,
the models compared taking turns (load drifting on shared cores slows them alike).
"""

import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from configurator import check_device, configure, sync
from model import GPT, GPTConfig, check, plain_config, sample_depth
from sample import generate, load_checkpoint

# -- settings, overridden by --key=value (configurator.py) -------------------------------------------------------------
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu' | 'cuda'
quick = False              # fewer repeats and decoded tokens (about 1-2 min on 2 CPU cores)
json_out = ''              # also write the JSON result to this file (its folder must exist)
threads = 1                # CPU threads. 1: on 2 shared cores, 2 OpenMP threads waiting on each other ran 5-50x slower
ckpt = ''                  # a checkpoint (train.py) to decode with: adaptive exit only exits once the loop converges
seed = 1337
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
CHECKS = {'device': ("'cpu' or 'cuda'", lambda v: v in SIZES), 'threads': ('an integer >= 1', lambda v: v >= 1),
          'json_out': ('a file name in an existing folder', lambda v: not v or (
              not os.path.isdir(v) and os.path.isdir(os.path.dirname(os.path.abspath(v)))))}

# Model sizes per device. CPU: small enough for 2 cores; CUDA: GPT-2 small's width, context and vocabulary.
SIZES = {'cpu': dict(n_embd=128, n_head=4, block_size=256, vocab_size=512),
         'cuda': dict(n_embd=768, n_head=12, block_size=1024, vocab_size=50304)}
BATCH = {'cpu': 4, 'cuda': 8}  # training sequences per step
# The looped model: prelude 1 layer, loop 2 layers x r, coda 1 layer; r = 8 at the mean, backprop through the last 4
LOOP = dict(n_prelude=1, n_loop=2, n_coda=1, mean_depth=8, max_depth=64, backprop_depth=4)
MEMORY_DEPTHS, MEMORY_K = (4, 8, 16, 32, 64), 8  # peak memory of a step for each r at k = 8
EXIT_THRESHOLD, PROMPT_LEN = 5e-4, 16  # Huginn's KL exit threshold (§5); decoding continues a random prompt
# full run / --quick: warm-ups and timed repeats, decoded tokens and repeats, depth changes, memory batch / BATCH
RUN = {False: dict(warmup=2, repeats=5, decode_tokens=512, decode_repeats=3, depth_changes=8, memory_batch=1.0),
       True: dict(warmup=1, repeats=3, decode_tokens=64, decode_repeats=1, depth_changes=4, memory_batch=0.25)}
# dense bf16 peak FLOP/s from the spec sheets (first match of the device name wins); MFU is reported against these
PEAK_FLOPS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12))


# -- timing and models -------------------------------------------------------------------------------------------------
def median_times(fns, dev, warmup, repeats):
    """(median seconds, last result) of each function in the dict `fns` after `warmup` calls; they take turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times, last = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            last[name] = fn()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, last


def matmul_ceiling(dev, calls=10):
    """(fn, flops): `calls` large square matmuls in the bench's dtype, the most FLOP/s this machine's matmuls reach."""
    n, dtype = (8192, torch.bfloat16) if dev == 'cuda' else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))

    def fn():
        for _ in range(calls):
            a @ b  # each product is dropped at once: no 10 x 128 MiB of results held on the GPU
    return fn, calls * 2 * n ** 3


def width(cfg):
    """Everything but the depth: a plain twin shares these (and its blocks and positions) with the looped model."""
    keys = ('block_size', 'vocab_size', 'n_embd', 'n_head', 'bias', 'dropout', 'norm', 'pos', 'window')
    return {k: getattr(cfg, k) for k in keys}


def training_flops(cfg, r):
    """Training FLOPs per token at depth r (forward r, backward k, §6), from a weightless model on the meta device."""
    with torch.device('meta'):
        return GPT(cfg).flops_per_token(r)


def equal_flop_layers(cfg):
    """Layers of the plain GPT closest to the loop's training FLOPs per token: they are a + b * n_layer, solve for n."""
    target = training_flops(cfg, cfg.mean_depth)
    f1, f2 = (training_flops(plain_config(n, **width(cfg)), 1) for n in (1, 2))
    return max(1, 1 + round((target - f1) / (f2 - f1)))


def build(cfg, dev):
    """GPT(cfg) initialised on dev (no CPU copy of GPT-2-sized weights to move), the same weights every time."""
    torch.manual_seed(seed)
    with torch.device(dev):
        return GPT(cfg)


def make_train_step(model, dev, batch_size):
    """step(r): one AdamW step at depth r on random tokens (speed and memory do not depend on the data), bf16 on
    CUDA. cache_enabled=False: a weight cast under no_grad would be reused with grad (§3 trap)."""
    x = torch.randint(model.config.vocab_size, (batch_size, model.config.block_size), device=dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=dev == 'cuda')

    def step(r):
        with torch.autocast(dev, torch.bfloat16, enabled=dev == 'cuda', cache_enabled=False):
            _, loss = model(x, x, num_steps=r)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# -- the four measurements ---------------------------------------------------------------------------------------------
def train_throughput(cfg, dev, batch_size, warmup, repeats, peak=None, compile=False):
    """1. Tokens/s of the loop at r = mean_depth, a plain GPT of equal training FLOPs, and a plain GPT as deep as the
    unrolled loop (what truncated backprop saves, §3); MFU against the spec peak and against large matmuls."""
    n_unrolled = cfg.n_prelude + cfg.mean_depth * cfg.n_loop + cfg.n_coda
    models = {'loop': (cfg, cfg.mean_depth), 'plain': (plain_config(equal_flop_layers(cfg), **width(cfg)), 1),
              'unrolled': (plain_config(n_unrolled, **width(cfg)), 1)}
    steps = {}
    for name, (c, r) in models.items():
        model = build(c, dev).compile_loop() if compile else build(c, dev)
        steps[name] = partial(make_train_step(model, dev, batch_size), r)
    steps['matmul'], matmul_flops = matmul_ceiling(dev)
    times, _ = median_times(steps, dev, warmup, repeats)
    ceiling, tokens, rows = matmul_flops / times['matmul'], batch_size * cfg.block_size, {}
    for name, (c, r) in models.items():
        flops, dt = training_flops(c, r), times[name]
        rows[name] = dict(layers=f"{c.n_prelude}+{c.n_loop}x{r}+{c.n_coda}" if r > 1 else str(c.n_layer),
                          k=min(r, c.backprop_depth), flops_per_token=flops, ms_per_step=1e3 * dt,
                          tokens_per_s=tokens / dt, mfu=flops * tokens / dt / peak if peak else None,
                          of_ceiling=flops * tokens / dt / ceiling)
    return dict(rows=rows, tokens_ratio=rows['loop']['tokens_per_s'] / rows['plain']['tokens_per_s'],
                compiled=compile, ceiling=ceiling)


def memory_vs_depth(cfg, dev, batch_size, depths=MEMORY_DEPTHS):
    """2. MiB of the first training step at each r, `total` the peak and `step` its rise above the model's. Truncated
    backprop keeps the last k iterations only: `step` stays flat in r. A fresh process per r: a peak cannot be reset."""
    rows = {}
    for r in depths:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as child:
            total, step = child.submit(step_memory, cfg, r, batch_size, dev, torch.get_num_threads()).result()
        rows[r] = dict(total=total / 2 ** 20, step=step / 2 ** 20)
    ratio = rows[64]['step'] / rows[8]['step'] if 64 in rows and 8 in rows else None
    return dict(backprop_depth=cfg.backprop_depth, batch_size=batch_size, rows=rows, step_ratio_64_8=ratio)


def step_memory(cfg, r, batch_size, dev, threads):
    """In the child process: (peak, peak - the peak after the model build) bytes of one training step."""
    torch.set_num_threads(threads)
    step = make_train_step(build(cfg, dev), dev, batch_size)
    baseline = peak_memory(dev)
    step(r)
    sync(dev)
    return peak_memory(dev), peak_memory(dev) - baseline


def peak_memory(dev):
    """Peak bytes of this process: CUDA's allocator, or Linux's VmHWM (ru_maxrss gives a child its big parent's)."""
    if dev == 'cuda':
        return torch.cuda.max_memory_allocated()
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


def compile_check(cfg, dev, batch_size, depth_changes, **compile_kwargs):
    """3. Graphs compile_loop() builds in its first step (r = k + 2: prelude, coda, loop_step without and with grad),
    and how many more while r changes every step, as in training: none (§3)."""
    from torch._dynamo.utils import counters  # imported here: the memory children start 1.3 s faster without dynamo
    step = make_train_step(build(cfg, dev).compile_loop(**compile_kwargs), dev, batch_size)
    graphs0 = counters['stats']['unique_graphs']
    step(cfg.backprop_depth + 2)
    warmup_graphs = counters['stats']['unique_graphs'] - graphs0
    generator = torch.Generator().manual_seed(seed)
    depths = [sample_depth(cfg.mean_depth, cfg.max_depth, generator) for _ in range(depth_changes)]
    for r in depths:
        step(r)
    recompiles = counters['stats']['unique_graphs'] - graphs0 - warmup_graphs
    return dict(warmup_graphs=warmup_graphs, depths=depths, recompiles=recompiles)


def flash_check(cfg, dev):
    """3. Does SDPA run the flash kernel? Allowed only that, PyTorch raises instead of falling back to the math kernel
    (§3 trap: explicit mask, fp32 inputs on CUDA, head dim > 256, cached steps with is_causal)."""
    model, x = build(cfg, dev), torch.randint(cfg.vocab_size, (1, 8), device=dev)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # as decode_speed runs it: prefill, then one position at a time
        train = runs(lambda: make_train_step(model, dev, 1)(2))  # first: inference_model casts to bf16
        decode = runs(lambda: generate(inference_model(model, dev), x, 4, num_steps=2, temperature=0))
    return dict(train=train, decode=decode)


def runs(fn):
    """'yes' if fn() runs, else 'no: ' and the first line of the error."""
    try:
        fn()
        return 'yes'
    except RuntimeError as e:
        return 'no: ' + (str(e).strip().splitlines() or [''])[0]


def decode_speed(model, dev, new_tokens, repeats, r=None, exit_threshold=EXIT_THRESHOLD):
    """4. Batch-1 greedy decoding after a PROMPT_LEN prompt: tokens/s, loop iterations per token, and GB/s of weights
    read (at batch 1 the limit is reading every weight for every token)."""
    r, model = r or model.config.mean_depth, inference_model(model, dev)
    fns = {'no cache': partial(generate_uncached, model, num_steps=r),
           'cache': partial(generate, model, num_steps=r, temperature=0),
           'cache + exit': partial(generate, model, num_steps=r, temperature=0, exit_threshold=exit_threshold)}
    prompt = torch.randint(model.config.vocab_size, (1, PROMPT_LEN), device=dev)
    for fn in fns.values():
        fn(prompt, 8)  # warm-up: kernels and allocator, on a short run
    times, last = median_times({name: partial(fn, prompt, new_tokens) for name, fn in fns.items()}, dev, 0, repeats)
    rows = {}
    for name, (_, depths) in last.items():  # the exit test reads the coda's logits after every iteration
        iterations = depths.float().mean().item()
        gb = weight_bytes_per_token(model, iterations, coda_every_iteration='exit' in name) / 1e9
        rows[name] = dict(tokens_per_s=new_tokens / times[name], mean_iterations=iterations,
                          weight_gb_per_s=None if name == 'no cache' else gb * new_tokens / times[name])
    return dict(new_tokens=new_tokens, depth=r, exit_threshold=exit_threshold, rows=rows,
                cache_speedup=rows['cache']['tokens_per_s'] / rows['no cache']['tokens_per_s'])


def inference_model(model, dev):
    """bf16 weights on CUDA (gpt-fast): decoding reads each weight per token, autocast would re-cast fp32 each call."""
    return model.to(torch.bfloat16).eval() if dev == 'cuda' else model.eval()


@torch.no_grad()
def generate_uncached(model, idx, max_new_tokens, num_steps):
    """nanoGPT's generate (greedy): the whole cropped sequence through the model again for every new token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:], num_steps=num_steps)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx, torch.full((idx.size(0), max_new_tokens), num_steps)


def weight_bytes_per_token(model, iterations, coda_every_iteration=False):
    """Weight bytes one cached decoding step reads: prelude once, the loop block per iteration, coda and head once
    (and per iteration when the exit rule reads the logits)."""
    def size(*modules):
        return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())
    t = model.transformer
    loop, coda = size(t.loop, model.adapter, model.ln_state), size(t.coda, t.ln_f, model.lm_head)
    return size(t.prelude) + iterations * loop + (1 + (iterations if coda_every_iteration else 0)) * coda


# -- report and main ---------------------------------------------------------------------------------------------------
def header(cfg, dev, batch_size, quick, argv):
    """What every result carries (modded-nanogpt records): device, versions, date and command, settings and model."""
    name = torch.cuda.get_device_name() if dev == 'cuda' else f"{os.cpu_count()}-core CPU"
    env = dict(device=dev, device_name=name, threads=torch.get_num_threads(), torch=torch.__version__,
               python=sys.version.split()[0], date=datetime.now(timezone.utc).isoformat(timespec='seconds'),
               command=' '.join(['python', 'bench.py', *argv]))
    return dict(env=env, quick=quick, dtype='bf16' if dev == 'cuda' else 'fp32', batch_size=batch_size,
                model={k: getattr(cfg, k) for k in (*SIZES[dev], *LOOP)}, block_size=cfg.block_size,
                peak=next((peak for key, peak in PEAK_FLOPS if dev == 'cuda' and key in name), None))


def cell(v):
    """A value as people read it: numbers from 100 up whole, with thousands separators, smaller ones 3 digits."""
    if isinstance(v, (int, float)) and abs(v) >= 100:
        return f'{v:,.0f}'
    return '-' if v is None else f'{v:.3g}' if isinstance(v, float) else str(v)


def table(title, rows, first):
    """Print rows ({name: {column: value}}) under a title, one aligned line each, the names in column `first`."""
    columns = [first, *next(iter(rows.values()))]
    cells = [columns] + [[str(name), *map(cell, row.values())] for name, row in rows.items()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    print(f"\n{title}")
    for row in cells:
        print('  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def print_report(res):
    """A table per measurement, its title naming the ratio it exists for and that ratio's target."""
    env, tr, mem, c, d = res['env'], res['train'], res['memory'], res['compile'], res['decode']
    print(f"nanoloop bench | {env['device_name']}, {env['threads']} threads | torch {env['torch']} | {env['date']}\n"
          f"{env['command']} | {res['dtype']} | {', '.join(f'{k}={v}' for k, v in res['model'].items())}")
    table(f"1. training, batch {res['batch_size']} x {res['block_size']}, {'compiled' if tr['compiled'] else 'eager'}: "
          f"tok/s loop / plain {tr['tokens_ratio']:.2f} (target >= 0.95); mfu: of the spec peak {cell(res['peak'])} "
          f"FLOP/s (target >= 0.5 on an H100); of_ceiling: of large matmuls, {cell(tr['ceiling'])} FLOP/s",
          tr['rows'], 'model')
    table(f"2. MiB of the first training step, k = {mem['backprop_depth']}, batch {mem['batch_size']}, one process "
          f"per r: step r=64 / r=8 {cell(mem['step_ratio_64_8'])} (target <= 1.1)", mem['rows'], 'r')
    print(f"\n3. compile_loop(backend={c['backend']}) built {c['warmup_graphs']} graphs in its first step, then "
          f"{c['recompiles']} over depths {c['depths']} (target 0)\n"
          f"flash attention kernel: train {c['flash']['train']}; cached decode {c['flash']['decode']}")
    table(f"4. decoding ({d['model']}), batch 1, {d['new_tokens']} new tokens, greedy, depth {d['depth']}, exit at "
          f"KL < {d['exit_threshold']:g}: tok/s cache / no cache {d['cache_speedup']:.1f} (target >= 10 at 512 tokens)",
          d['rows'], 'decoder')


def section(msg):
    """Progress on stderr (stdout is the report), and fresh dynamo caches: no graph counts against the next section."""
    import gc
    import torch._dynamo
    torch._dynamo.reset()
    gc.collect()
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def settings(argv):
    """(settings, the checkpoint's model or None): every bad value, device or checkpoint is a line before any work."""
    opts = configure(DEFAULTS, argv)
    check(opts, CHECKS)
    check_device(opts['device'])
    return opts, load_checkpoint(opts['ckpt'])[0] if opts['ckpt'] else None


def main(argv):
    """The four measurements in turn, then the report and its JSON line; decoding uses --ckpt's model if given."""
    opts, model = settings(argv)
    dev, t = opts['device'], RUN[opts['quick']]
    cfg, batch = GPTConfig(**SIZES[dev], **LOOP), BATCH[dev]
    if dev == 'cpu':
        torch.set_num_threads(opts['threads'])
    else:
        torch.set_float32_matmul_precision('high')  # TF32 for any fp32 matmul left outside autocast
    res = header(cfg, dev, batch, opts['quick'], argv)
    section(f"bench on {dev}: 1. training throughput: loop, equal-FLOP plain, unrolled, matmul ceiling")
    res['train'] = train_throughput(cfg, dev, batch, t['warmup'], t['repeats'], res['peak'], compile=dev == 'cuda')
    section(f"2. memory of one training step for r in {MEMORY_DEPTHS}")
    memory_batch = max(1, round(t['memory_batch'] * batch))
    res['memory'] = memory_vs_depth(replace(cfg, backprop_depth=MEMORY_K), dev, memory_batch)
    section("3. compilation and flash attention")
    # --quick on CPU traces with dynamo only: inductor's CPU compile takes 25 s to 2 min on 2 cores
    backend = 'eager' if opts['quick'] and dev == 'cpu' else 'inductor'
    res['compile'] = dict(compile_check(cfg, dev, batch, t['depth_changes'], backend=backend), backend=backend,
                          flash=flash_check(cfg, dev))
    section(f"4. decoding {t['decode_tokens']} tokens")
    room = replace(cfg, block_size=max(cfg.block_size, PROMPT_LEN + t['decode_tokens']))  # room for the new tokens
    model = build(room, dev) if model is None else model.to(dev)
    res['decode'] = dict(decode_speed(model, dev, t['decode_tokens'], t['decode_repeats']),
                         model=opts['ckpt'] or 'random init')
    print_report(res)
    print(json.dumps(res))
    if opts['json_out']:
        with open(opts['json_out'], 'w') as f:
            f.write(json.dumps(res) + '\n')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
