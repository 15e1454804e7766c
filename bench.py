"""
Speed and memory of the looped model against its limits and against a plain GPT of equal FLOPs (METHOD.md §6).

    python bench.py                                 # CUDA if available, else CPU
    python bench.py --device=cpu --quick            # about 1-2 minutes on 2 CPU cores
    python bench.py --device=cuda --json_out=bench.json --ckpt=out/ckpt.pt

Four measurements, each a small function that tests/test_bench.py runs on a tiny model:
  1. train_throughput  tokens/s and MFU at r = mean_depth (forward r, backward k) vs a plain GPT with the same FLOPs
  2. memory_vs_depth   peak memory of one training step for r = 4 .. 64 at k = 8: truncated backprop keeps it O(k)
  3. compile_check     eager vs compile_loop() step time, recompiles while r changes every step, flash attention
  4. decode_speed      batch-1 tokens/s: no cache, KV cache at fixed depth, KV cache + adaptive exit
Prints a table for people, then one JSON line (device, versions, date and command included). Timing: warm-up,
synchronize, median of repeats; the models compared take turns within each repeat, so a machine whose load drifts
(shared CPU cores) slows both alike and their ratio stays fair.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import asdict, replace
from datetime import datetime, timezone

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from configurator import configure
from model import GPT, GPTConfig, load_checkpoint, plain_config, sample_depth
from sample import check_device, sync

# -- settings, overridden by --key=value (configurator.py) -------------------------------------------------------------
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu' | 'cuda'
quick = False              # fewer repeats and decoded tokens (about 1-2 min on 2 CPU cores)
json_out = ''              # also write the JSON result to this file (its folder must exist)
threads = 1                # CPU threads. 1: on 2 shared cores, 2 OpenMP threads waiting on each other ran 5-50x slower
ckpt = ''                  # a checkpoint (train.py) to decode with: adaptive exit only exits once the loop converges
decode_compile = ''        # '' | 'default' | 'reduce-overhead' (CUDA graphs, CUDA only): also time compiled decoding
seed = 1337
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

# Model sizes per device. CPU: small enough for 2 cores; CUDA: GPT-2 small's width, context and vocabulary.
SIZES = {'cpu': dict(n_embd=128, n_head=4, block_size=256, vocab_size=512),
         'cuda': dict(n_embd=768, n_head=12, block_size=1024, vocab_size=50304)}
BATCH = {'cpu': 4, 'cuda': 8}  # training sequences per step
# The looped model: prelude 1 layer, loop 2 layers x r, coda 1 layer; r = 8 at the mean, backprop through the last 4
LOOP = dict(n_prelude=1, n_loop=2, n_coda=1, mean_depth=8, max_depth=64, backprop_depth=4)
MEMORY_DEPTHS, MEMORY_K = (4, 8, 16, 32, 64), 8  # peak memory of a step for each r at k = 8
EXIT_THRESHOLD = 5e-4      # Huginn's KL exit threshold (§5)
PROMPT_LEN = 16
# full run / --quick: warm-up calls and timed repeats, decoded tokens and their repeats, depth changes for the
# recompile count, and the memory sweep's batch as a fraction of BATCH (r = 64 is the slowest step of the run)
RUN = {False: dict(warmup=2, repeats=5, decode_tokens=512, decode_repeats=3, depth_changes=8, memory_batch=1.0),
       True: dict(warmup=1, repeats=3, decode_tokens=64, decode_repeats=1, depth_changes=4, memory_batch=0.25)}
# dense bf16 peak FLOP/s from the spec sheets (first match of the device name wins); MFU is reported against these
PEAK_FLOPS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12))


# -- timing ------------------------------------------------------------------------------------------------------------
def median_times(fns, dev, warmup, repeats):
    """Median seconds per call of each function in the dict `fns`, after `warmup` untimed calls of each.
    Within a repeat every function runs once, in turn, so slow spells of a shared machine hit all of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(dev):
    """bf16 on CUDA, fp32 on CPU. cache_enabled=False: a bf16 copy of a loop weight cached in the no-grad iterations
    would be reused by the with-grad ones and the loop weights would get no gradient (§3 trap, pytorch#65766)."""
    return torch.autocast('cuda', dtype=torch.bfloat16, cache_enabled=False) if dev == 'cuda' else nullcontext()


def matmul_ceiling(dev, calls=10):
    """(fn, flops): fn runs `calls` large square matmuls in the bench's dtype; their FLOP/s are the most this machine's
    matmuls reach. Timed in turn with the models, so it sees the same load (on shared CPU cores) as they do."""
    n, dtype = (8192, torch.bfloat16) if dev == 'cuda' else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))

    def fn():
        for _ in range(calls):
            a @ b  # each product is dropped at once: no 10 x 128 MiB of results held on the GPU
    return fn, calls * 2 * n ** 3


# -- models ------------------------------------------------------------------------------------------------------------
def loop_config(dev, **overrides):
    """The benchmarked looped model at this device's size."""
    return GPTConfig(**{**SIZES[dev], **LOOP, **overrides})


def width(cfg):
    """Everything but the depth: a plain twin shares these (and its blocks and positions) with the looped model."""
    keys = ('block_size', 'vocab_size', 'n_embd', 'n_head', 'bias', 'dropout', 'norm', 'pos', 'window')
    return {k: getattr(cfg, k) for k in keys}


def training_flops(cfg, num_steps):
    """Training FLOPs per token (forward r, backward k, §6), from a weightless model on the meta device."""
    with torch.device('meta'):
        return GPT(cfg).flops_per_token(num_steps)


def equal_flop_layers(cfg):
    """Layers of the plain GPT whose training FLOPs per token come closest to the looped model's at r = mean_depth.
    A plain GPT's FLOPs are a + b * n_layer, so solve for n_layer from n = 1 and n = 2 and round."""
    target = training_flops(cfg, cfg.mean_depth)
    f1, f2 = (training_flops(plain_config(n, **width(cfg)), 1) for n in (1, 2))
    return max(1, 1 + round((target - f1) / (f2 - f1)))


def build(cfg, dev):
    torch.manual_seed(seed)
    with torch.device(dev):  # initialise on the device: no CPU copy of GPT-2-sized weights to move
        return GPT(cfg)


def make_train_step(model, dev, batch_size):
    """step(r): one AdamW step at depth r on random tokens (speed and memory do not depend on the data)."""
    x = torch.randint(model.config.vocab_size, (batch_size, model.config.block_size), device=dev)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), dev)

    def step(num_steps):
        with autocast(dev):
            _, loss = model(x, x, num_steps=num_steps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# -- 1. training throughput --------------------------------------------------------------------------------------------
def train_throughput(cfg, dev, batch_size, warmup, repeats, peak=None, compile=False):
    """Tokens/s of the looped model at r = mean_depth, of a plain GPT with the same training FLOPs per token, and of
    the plain GPT that unrolls the same forward (1 + 8 x 2 + 1 = 18 layers): what truncated backprop saves (§3).
    Each row: FLOPs counted as §6 says, MFU against the spec peak, and against the measured matmul ceiling."""
    n_unrolled = cfg.n_prelude + cfg.mean_depth * cfg.n_loop + cfg.n_coda
    models = {'loop': (cfg, cfg.mean_depth), 'plain': (plain_config(equal_flop_layers(cfg), **width(cfg)), 1),
              'unrolled': (plain_config(n_unrolled, **width(cfg)), 1)}
    steps = {}
    for name, (c, r) in models.items():
        model = build(c, dev).compile_loop() if compile else build(c, dev)
        steps[name] = (lambda step, r: lambda: step(r))(make_train_step(model, dev, batch_size), r)
    steps['matmul'], matmul_flops = matmul_ceiling(dev)
    times = median_times(steps, dev, warmup, repeats)
    ceiling, tokens, rows = matmul_flops / times['matmul'], batch_size * cfg.block_size, {}
    for name, (c, r) in models.items():
        flops, dt = training_flops(c, r), times[name]
        rows[name] = dict(layers=f"{c.n_prelude}+{c.n_loop}x{r}+{c.n_coda}" if r > 1 else str(c.n_layer),
                          backprop_depth=min(r, c.backprop_depth), flops_per_token=flops, ms_per_step=1e3 * dt,
                          tokens_per_s=tokens / dt, flops_per_s=flops * tokens / dt,
                          mfu=flops * tokens / dt / peak if peak else None, of_ceiling=flops * tokens / dt / ceiling)
    loop, plain = rows['loop'], rows['plain']
    return dict(rows=rows, tokens_ratio=loop['tokens_per_s'] / plain['tokens_per_s'],
                flops_ratio=loop['flops_per_s'] / plain['flops_per_s'], compiled=compile, ceiling=ceiling)


# -- 2. memory vs depth ------------------------------------------------------------------------------------------------
def memory_vs_depth(cfg, dev, batch_size, depths=MEMORY_DEPTHS):
    """Peak memory of the first training step at each depth r (k = cfg.backprop_depth), in MiB: `total` is the peak,
    `step` the peak above the memory held after building the model and optimizer (activations, gradients, AdamW
    state). With truncated backprop only the last k iterations keep activations, so `step` should not grow with r."""
    measure = cuda_step_memory if dev == 'cuda' else cpu_step_memory
    rows = {r: dict(zip(('total', 'step'), (b / 2 ** 20 for b in measure(cfg, r, batch_size)))) for r in depths}
    ratio = rows[64]['step'] / rows[8]['step'] if 64 in rows and 8 in rows else None
    return dict(backprop_depth=cfg.backprop_depth, batch_size=batch_size, rows=rows, step_ratio_64_8=ratio)


def cuda_step_memory(cfg, r, batch_size):
    """(peak, peak - baseline) bytes from CUDA's allocator statistics, which can be reset between depths."""
    step = make_train_step(build(cfg, 'cuda'), 'cuda', batch_size)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step(r)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del step
    torch.cuda.empty_cache()
    return peak, peak - baseline


def cpu_step_memory(cfg, r, batch_size):
    """(peak, peak - baseline) bytes of resident memory, measured in a fresh Python process: the peak RSS is a
    high-water mark that cannot be reset, so every depth needs its own process."""
    code = 'import json, sys, bench; print(json.dumps(bench.rss_of_one_step(**json.loads(sys.argv[1]))))'
    args = json.dumps(dict(cfg=asdict(cfg), r=r, batch_size=batch_size, threads=torch.get_num_threads()))
    proc = subprocess.run([sys.executable, '-c', code, args], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement for r={r} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def rss_of_one_step(cfg, r, batch_size, threads):
    """In the child process: peak RSS after one training step, and its rise over the peak after the model build."""
    torch.set_num_threads(threads)
    step = make_train_step(build(GPTConfig(**cfg), 'cpu'), 'cpu', batch_size)
    baseline = peak_rss()
    step(r)
    return peak_rss(), peak_rss() - baseline


def peak_rss():
    """This process's peak resident memory in bytes. On Linux read VmHWM: getrusage's ru_maxrss survives fork + exec,
    so a child started by a big parent reports the parent's size as its own peak. Elsewhere ru_maxrss (macOS: bytes)."""
    if os.path.exists('/proc/self/status'):
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)


# -- 3. compilation ----------------------------------------------------------------------------------------------------
def compiled_graphs():
    """Graphs torch.compile has built in this process so far; a recompile adds one."""
    from torch._dynamo.utils import counters  # imported here: the memory children start 1.3 s faster without dynamo
    return counters['stats']['unique_graphs']


def reset_compiler():
    """Fresh dynamo caches: graphs built before must not count, nor against the recompile limit (8 per function),
    and the models they captured are freed before the next section measures memory."""
    import gc
    import torch._dynamo
    torch._dynamo.reset()
    gc.collect()


def compile_check(cfg, dev, batch_size, warmup, repeats, depth_changes, **compile_kwargs):
    """Eager vs compile_loop() step time at r = mean_depth, compile time, and recompiles while r changes every step.
    The warm-up (r = k + 2) builds every graph once: prelude, coda, and loop_step under no_grad, with grad from a
    no-grad state, and with grad from a with-grad state. After that new depths must add no graph (§3 trap)."""
    eager_step = make_train_step(build(cfg, dev), dev, batch_size)
    step = make_train_step(build(cfg, dev).compile_loop(**compile_kwargs), dev, batch_size)
    graphs0, t0 = compiled_graphs(), time.perf_counter()
    step(cfg.backprop_depth + 2)
    sync(dev)
    compile_s, warm_graphs = time.perf_counter() - t0, compiled_graphs() - graphs0
    generator = torch.Generator().manual_seed(seed)
    depths = [sample_depth(cfg.mean_depth, cfg.max_depth, generator) for _ in range(depth_changes)]
    for r in depths:  # a new r every step, as in training
        step(r)
    r = cfg.mean_depth
    times = median_times({'eager': lambda: eager_step(r), 'compiled': lambda: step(r)}, dev, warmup, repeats)
    return dict(eager_ms=1e3 * times['eager'], compiled_ms=1e3 * times['compiled'], compile_s=compile_s,
                warmup_graphs=warm_graphs, depths=depths, recompiles=compiled_graphs() - graphs0 - warm_graphs)


def flash_check(cfg, dev):
    """Does SDPA run the flash kernel? Allowed only FLASH_ATTENTION, PyTorch raises instead of silently falling back
    to the math kernel (§3 trap: explicit mask, fp32 inputs on CUDA, head dim > 256, cached steps with is_causal)."""
    model = build(cfg, dev)
    x = torch.randint(cfg.vocab_size, (1, cfg.block_size), device=dev)

    def train():
        with autocast(dev):
            _, loss = model(x, x, num_steps=2)
        loss.backward()

    def decode():  # as decode_speed runs it: prompt prefill, then one position at a time against the cache
        inference_model(model, dev).generate(x[:, :8], 4, num_steps=2, temperature=0)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return dict(train=runs(train), decode=runs(decode))  # in this order: inference_model casts to bf16


def runs(fn):
    """'yes' if fn() runs, else 'no: ' and the first line of the error."""
    try:
        fn()
        return 'yes'
    except RuntimeError as e:
        return 'no: ' + (str(e).strip().splitlines() or [''])[0]


# -- 4. decoding -------------------------------------------------------------------------------------------------------
def inference_model(model, dev):
    """Decoding reads every weight once per token per use: on CUDA keep the weights in bf16 (half the bytes of fp32
    under autocast, which would re-cast them on every call) as gpt-fast does. On CPU fp32."""
    return model.to(torch.bfloat16).eval() if dev == 'cuda' else model.eval()


@torch.no_grad()
def generate_uncached(model, idx, max_new_tokens, num_steps):
    """nanoGPT's generate (greedy): the whole cropped sequence through the model again for every new token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:], num_steps=num_steps)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx, torch.full((idx.size(0), max_new_tokens), num_steps)


def decoders(model, r, exit_threshold):
    """name -> fn(prompt, n) -> (tokens, depths): the three ways to decode greedily at fixed or adaptive depth <= r."""
    return {'no cache': lambda p, n: generate_uncached(model, p, n, r),
            'cache': lambda p, n: model.generate(p, n, num_steps=r, temperature=0),
            'cache + exit': lambda p, n: model.generate(p, n, num_steps=r, temperature=0,
                                                        exit_threshold=exit_threshold)}


def compiled_decoders(model, r, exit_threshold, mode):
    """The cached decoders again on a compiled copy. CUDA graphs replay into fixed output buffers while the loop feeds
    loop_step its own output (§3 trap), so outputs are cloned before the next call. Unmeasured on a GPU so far."""
    import copy
    compiled = copy.deepcopy(model).compile_loop(mode=mode)
    for name in ('prelude', 'loop_step', 'coda'):
        setattr(compiled, name, (lambda fn: lambda *a, **kw: fn(*a, **kw).clone())(getattr(compiled, name)))
    fns = decoders(compiled, r, exit_threshold)
    return {f'{name} (compiled, {mode})': fns[name] for name in ('cache', 'cache + exit')}


def decode_speed(model, dev, new_tokens, repeats, r=None, exit_threshold=EXIT_THRESHOLD, compile_mode=''):
    """Batch-1 greedy decoding of `new_tokens` tokens after a PROMPT_LEN prompt: tokens/s, mean loop iterations per
    token, and GB/s of weights read (the limit at batch 1 is reading every weight for every token)."""
    r = r or model.config.mean_depth
    model = inference_model(model, dev)
    fns = decoders(model, r, exit_threshold)
    if compile_mode:
        fns.update(compiled_decoders(model, r, exit_threshold, compile_mode))
    prompt = torch.randint(model.config.vocab_size, (1, PROMPT_LEN), device=dev)
    for fn in fns.values():
        fn(prompt, 8)  # warm-up: kernels, allocator and (compiled rows) compilation, on a short run
    last = {}
    timed = {name: (lambda fn, name: lambda: last.__setitem__(name, fn(prompt, new_tokens)))(fn, name)
             for name, fn in fns.items()}
    graphs0 = compiled_graphs()
    times = median_times(timed, dev, 0, repeats)
    rows = {}
    for name in fns:  # the exit test reads the coda's logits after every iteration: it reads the coda each time
        iters = last[name][1].float().mean().item()
        gb = weight_bytes_per_token(model, iters, 'exit' in name) / 1e9
        rows[name] = dict(tokens_per_s=new_tokens / times[name], mean_iterations=iters,
                          weight_gb_per_s=None if name == 'no cache' else gb * new_tokens / times[name])
    return dict(new_tokens=new_tokens, depth=r, exit_threshold=exit_threshold, rows=rows,
                cache_speedup=rows['cache']['tokens_per_s'] / rows['no cache']['tokens_per_s'],
                recompiles_while_timed=compiled_graphs() - graphs0)  # compiled rows: dynamic positions settle early


def weight_bytes_per_token(model, iters, coda_every_iteration=False):
    """Bytes of weights one cached decoding step reads: prelude once, loop block (+ adapter, state norm) once per
    iteration, coda + final norm + head once, plus once per iteration when the exit rule reads the logits."""
    size = lambda *mods: sum(p.numel() * p.element_size() for m in mods if m is not None for p in m.parameters())
    t = model.transformer
    prelude, loop, coda = size(t.prelude), size(t.loop, model.adapter, model.ln_state), size(t.coda, t.ln_f,
                                                                                            model.lm_head)
    return prelude + iters * loop + (1 + (iters if coda_every_iteration else 0)) * coda


# -- report ------------------------------------------------------------------------------------------------------------
def environment(dev, argv):
    """Device, versions, date and command: what every stored result carries (modded-nanogpt records)."""
    cpus = []
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            cpus = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    cpu = f"{cpus[0]} ({len(cpus)} cores)" if cpus else f"{platform.machine()} CPU"
    return dict(device=dev, device_name=torch.cuda.get_device_name() if dev == 'cuda' else cpu,
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                date=datetime.now(timezone.utc).isoformat(timespec='seconds'),
                command=' '.join(['python', 'bench.py', *argv]))


def header(cfg, dev, batch_size, quick, argv):
    """What every result carries: environment, settings, the model, and the FLOP/s it is measured against."""
    model = {k: getattr(cfg, k) for k in ('n_embd', 'n_head', 'block_size', 'vocab_size', *LOOP)}
    name = torch.cuda.get_device_name() if dev == 'cuda' else ''
    return dict(env=environment(dev, argv), quick=quick, dtype='bf16' if dev == 'cuda' else 'fp32',
                model=', '.join(f'{k}={v}' for k, v in model.items()), batch_size=batch_size,
                block_size=cfg.block_size, depth=cfg.mean_depth,
                peak=next((peak for key, peak in PEAK_FLOPS if key in name), None))  # spec sheet; None on CPU


def table(title, header, rows):
    """Print one aligned table: a title line, the header, then the rows (lists of str)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print('  '.join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def pct(x):
    return '-' if x is None else f"{100 * x:.1f}%"


def verdict(value, ok):
    return 'n/a' if value is None else ('met' if ok else 'MISSED')


def print_report(res):
    env, tr, mem, c, d = res['env'], res['train'], res['memory'], res['compile'], res['decode']
    print(f"nanoloop bench | {env['device_name']}, {env['threads']} threads | torch {env['torch']} | {env['date']}")
    print(f"{env['command']} | {res['dtype']} | {res['model']}")
    table(f"1. training: batch {res['batch_size']} x {res['block_size']} tokens, one AdamW step, "
          f"{'compile_loop()' if tr['compiled'] else 'eager'}",
          ['model', 'layers', 'k', 'MFLOP/tok', 'ms/step', 'tok/s', 'TFLOP/s', 'MFU', 'of ceiling'],
          [[name, r['layers'], r['backprop_depth'], f"{r['flops_per_token'] / 1e6:,.1f}", f"{r['ms_per_step']:.1f}",
            f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_s'] / 1e12:.3f}", pct(r['mfu']), pct(r['of_ceiling'])]
           for name, r in tr['rows'].items()])
    unrolled = tr['rows']['loop']['tokens_per_s'] / tr['rows']['unrolled']['tokens_per_s']
    peak, mfu = '-' if res['peak'] is None else f"{res['peak'] / 1e12:.0f}", tr['rows']['loop']['mfu']
    print(f"loop/plain at equal FLOPs: tokens/s {tr['tokens_ratio']:.2f}, FLOP/s {tr['flops_ratio']:.2f} "
          f"(target >= 0.95: {verdict(tr['tokens_ratio'], tr['tokens_ratio'] >= 0.95)}); loop/unrolled tokens/s "
          f"{unrolled:.2f}\nmatmul ceiling (measured) {tr['ceiling'] / 1e12:.3f} TFLOP/s; MFU against the spec peak "
          f"{peak} TFLOP/s: loop {pct(mfu)} "
          f"(target >= 50% at n_embd 768 on an H100: {verdict(mfu, mfu is not None and mfu >= 0.5)})")
    kind = 'torch.cuda.max_memory_allocated' if env['device'] == 'cuda' else 'peak RSS, one process per r'
    table(f"2. memory of the first training step vs depth: k = {mem['backprop_depth']}, batch {mem['batch_size']} "
          f"({kind})", ['r', 'peak MiB', 'step MiB'],
          [[r, f"{m['total']:,.1f}", f"{m['step']:,.1f}"] for r, m in mem['rows'].items()])
    ratio = mem['step_ratio_64_8']
    print(f"step memory r=64 / r=8: {'-' if ratio is None else f'{ratio:.2f}'} "
          f"(target <= 1.1: {verdict(ratio, ratio is not None and ratio <= 1.1)})")
    table(f"3. compilation: training step at r = {res['depth']}", ['mode', 'ms/step', 'compile s'],
          [['eager', f"{c['eager_ms']:.1f}", '-'],
           [f"compile_loop(backend={c['backend']})", f"{c['compiled_ms']:.1f}", f"{c['compile_s']:.1f}"]])
    print(f"graphs built in warm-up {c['warmup_graphs']}; recompiles over depths {c['depths']}: {c['recompiles']} "
          f"(target 0: {verdict(c['recompiles'], c['recompiles'] == 0)})\n"
          f"flash attention kernel: train {c['flash']['train']}; cached decode {c['flash']['decode']}")
    table(f"4. decoding ({d['model']}): batch 1, {d['new_tokens']} new tokens, greedy, depth {d['depth']} "
          f"(exit: KL < {d['exit_threshold']:g})", ['decoder', 'tok/s', 'iters/token', 'weight GB/s'],
          [[name, f"{r['tokens_per_s']:,.1f}", f"{r['mean_iterations']:.2f}",
            '-' if r['weight_gb_per_s'] is None else f"{r['weight_gb_per_s']:.2f}"] for name, r in d['rows'].items()])
    if d['recompiles_while_timed']:
        print(f"compiled decoding rebuilt {d['recompiles_while_timed']} graphs while timed: its rows include compiling")
    speedup = d['cache_speedup'] if d['new_tokens'] >= 512 else None  # the target is set at 512 tokens
    print(f"cache / no cache: {d['cache_speedup']:.1f}x (target >= 10x at 512 tokens: "
          f"{verdict(speedup, speedup is not None and speedup >= 10)})")


# -- main --------------------------------------------------------------------------------------------------------------
def log(msg):
    """Progress on stderr, so that stdout holds only the table and the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def settings(argv):
    """--key=value settings checked before any work: a bad value, device, checkpoint or JSON folder is one line
    now, not an error after minutes of benchmarking. -> (settings, the checkpoint's model or None)."""
    opts = types.SimpleNamespace(**configure(DEFAULTS, argv))
    if opts.device not in SIZES:
        raise ValueError(f"device={opts.device!r} is not allowed: expected 'cpu' or 'cuda'")
    check_device(opts.device)
    if opts.threads < 1:
        raise ValueError(f"threads={opts.threads} is not allowed: expected an integer >= 1")
    if opts.decode_compile not in ('', 'default', 'reduce-overhead'):
        raise ValueError(f"decode_compile={opts.decode_compile!r} is not allowed: expected '', 'default' or "
                         f"'reduce-overhead'")
    if opts.decode_compile == 'reduce-overhead' and opts.device != 'cuda':
        raise ValueError("decode_compile='reduce-overhead' is not allowed on cpu: CUDA graphs need --device=cuda")
    if opts.json_out and (os.path.isdir(opts.json_out) or not os.path.isdir(os.path.dirname(
            os.path.abspath(opts.json_out)))):
        raise ValueError(f"json_out={opts.json_out!r} is not allowed: expected a file name in an existing folder")
    return opts, load_checkpoint(opts.ckpt)[0] if opts.ckpt else None


def run(opts, argv, model=None):
    """All four measurements in one run -> one result dict (what the JSON line holds). model: decode this one (a
    checkpoint's, already loaded) instead of a random model of the bench's size."""
    dev, t, cfg = opts.device, RUN[opts.quick], loop_config(opts.device)
    log(f"bench on {dev}{' (quick)' if opts.quick else ''}")
    res = header(cfg, dev, BATCH[dev], opts.quick, argv)
    reset_compiler()
    log("1. training throughput: loop, equal-FLOP plain, unrolled, matmul ceiling")
    res['train'] = train_throughput(cfg, dev, BATCH[dev], t['warmup'], t['repeats'], res['peak'], compile=dev == 'cuda')
    log(f"2. memory of one training step for r in {MEMORY_DEPTHS}")
    reset_compiler()
    res['memory'] = memory_vs_depth(replace(cfg, backprop_depth=MEMORY_K), dev,
                                    max(1, round(t['memory_batch'] * BATCH[dev])))
    # 3. fresh dynamo caches. --quick on CPU traces with dynamo only (backend='eager'): recompiles are dynamo's, and
    # inductor's CPU compile takes 25 s (quiet) to over 2 min (shared) on 2 cores, so only the full run times it.
    log("3. compilation and flash attention")
    reset_compiler()
    backend = 'eager' if opts.quick and dev == 'cpu' else 'inductor'
    res['compile'] = dict(compile_check(cfg, dev, BATCH[dev], t['warmup'], t['repeats'], t['depth_changes'],
                                        backend=backend), backend=backend, flash=flash_check(cfg, dev))
    log(f"4. decoding {t['decode_tokens']} tokens")
    reset_compiler()
    model = model.to(dev) if model is not None else build(
        replace(cfg, block_size=max(cfg.block_size, PROMPT_LEN + t['decode_tokens'])), dev)  # room for the tokens
    res['decode'] = dict(decode_speed(model, dev, t['decode_tokens'], t['decode_repeats'],
                                      compile_mode=opts.decode_compile), model=opts.ckpt or 'random init')
    return res


def main(argv):
    opts, model = settings(argv)
    if opts.device == 'cpu':
        torch.set_num_threads(opts.threads)
    else:
        torch.set_float32_matmul_precision('high')  # TF32 for any fp32 matmul left outside autocast
    res = run(opts, argv, model)
    print_report(res)
    line = json.dumps(res)
    print(line)
    if opts.json_out:
        with open(opts.json_out, 'w') as f:
            f.write(line + '\n')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
