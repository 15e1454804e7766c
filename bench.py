"""
Speed and memory of the looped model against its limits and against a plain GPT of equal FLOPs (METHOD.md §6).

    python bench.py                                 # CUDA if available, else CPU
    python bench.py --device=cpu --quick            # about 1-2 minutes on 2 CPU cores
    python bench.py --device=cuda --json_out=bench.json --ckpt=out/ckpt.pt

Four measurements (tests/test_bench.py runs each on a tiny model): 1. training tokens/s and MFU vs a plain GPT of
equal FLOPs, 2. a step's peak memory for r = 4..64 at k = 8, 3. eager vs compile_loop() and recompiles while r changes,
4. batch-1 decoding without and with the KV cache and adaptive exit. A table for people, then one JSON line (device,
versions, date, command). Timing: warm-up, synchronize, median of repeats, the models compared taking turns within a
repeat: load drifting on shared cores slows them alike, and their ratio stays fair.
"""

import copy
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

from configurator import check, check_device, configure, sync
from model import GPT, GPTConfig, plain_config, sample_depth
from sample import load_checkpoint

# -- settings, overridden by --key=value (configurator.py) -------------------------------------------------------------
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu' | 'cuda'
quick = False              # fewer repeats and decoded tokens (about 1-2 min on 2 CPU cores)
json_out = ''              # also write the JSON result to this file (its folder must exist)
threads = 1                # CPU threads. 1: on 2 shared cores, 2 OpenMP threads waiting on each other ran 5-50x slower
ckpt = ''                  # a checkpoint (train.py) to decode with: adaptive exit only exits once the loop converges
decode_compile = ''        # '' | 'default' | 'reduce-overhead' (CUDA graphs, CUDA only): also time compiled decoding
seed = 1337
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
CHECKS = {'device': ("'cpu' or 'cuda'", lambda v: v in SIZES), 'threads': ('an integer >= 1', lambda v: v >= 1),
          'decode_compile': ("'', 'default' or 'reduce-overhead'", lambda v: v in ('', 'default', 'reduce-overhead')),
          'json_out': ('a file name in an existing folder', lambda v: not v or (not os.path.isdir(v) and os.path.isdir(
              os.path.dirname(os.path.abspath(v)))))}

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


# -- timing and models -------------------------------------------------------------------------------------------------
def median_times(fns, dev, warmup, repeats):
    """Median seconds per call of each function in `fns` (a dict), after `warmup` calls; they take turns."""
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
    return {k: getattr(cfg, k) for k in ('block_size', 'vocab_size', 'n_embd', 'n_head', 'bias', 'dropout', 'norm',
                                         'pos', 'window')}


def training_flops(cfg, r):
    """Training FLOPs per token at depth r (forward r, backward k, §6), from a weightless model on the meta device."""
    with torch.device('meta'):
        return GPT(cfg).flops_per_token(r)


def equal_flop_layers(cfg):
    """Layers of the plain GPT whose training FLOPs per token come closest to the looped model's at r = mean_depth.
    A plain GPT's FLOPs are a + b * n_layer, so solve for n_layer from n = 1 and n = 2 and round."""
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
    CUDA, fp32 on CPU. cache_enabled=False: a weight cast under no_grad would be reused with grad (§3 trap)."""
    x = torch.randint(model.config.vocab_size, (batch_size, model.config.block_size), device=dev)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), dev)
    ctx = torch.autocast('cuda', torch.bfloat16, cache_enabled=False) if dev == 'cuda' else nullcontext()

    def step(r):
        with ctx:
            _, loss = model(x, x, num_steps=r)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# -- 1. training throughput --------------------------------------------------------------------------------------------
def train_throughput(cfg, dev, batch_size, warmup, repeats, peak=None, compile=False):
    """Tokens/s of the looped model at r = mean_depth, a plain GPT of equal training FLOPs per token, and the plain GPT
    unrolling the same forward (18 layers: what truncated backprop saves, §3); MFU vs spec peak and matmul ceiling."""
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
    """MiB of the first training step at each depth r: `total` the peak, `step` the peak above the model's and
    optimizer's memory. Truncated backprop keeps activations of the last k iterations only: `step` stays flat in r."""
    rows = {r: dict(zip(('total', 'step'), (b / 2 ** 20 for b in step_memory(cfg, r, batch_size, dev))))
            for r in depths}
    ratio = rows[64]['step'] / rows[8]['step'] if 64 in rows and 8 in rows else None
    return dict(backprop_depth=cfg.backprop_depth, batch_size=batch_size, rows=rows, step_ratio_64_8=ratio)


def step_memory(cfg, r, batch_size, dev):
    """(peak, peak - baseline) bytes: CUDA's allocator statistics, reset between depths; on CPU the resident memory of
    a fresh process per depth (peak RSS cannot be reset)."""
    if dev == 'cuda':
        step = make_train_step(build(cfg, 'cuda'), 'cuda', batch_size)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step(r)
        torch.cuda.synchronize()
        del step
        torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - baseline
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
    """Peak resident bytes of this process: Linux's VmHWM (ru_maxrss would give a child its big parent's peak),
    elsewhere ru_maxrss (macOS: bytes)."""
    if os.path.exists('/proc/self/status'):
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)


# -- 3. compilation ----------------------------------------------------------------------------------------------------
def compiled_graphs():
    """Graphs torch.compile has built in this process so far; a recompile adds one."""
    from torch._dynamo.utils import counters  # imported here: the memory children start 1.3 s faster without dynamo
    return counters['stats']['unique_graphs']


def compile_check(cfg, dev, batch_size, warmup, repeats, depth_changes, **compile_kwargs):
    """Eager vs compile_loop() step time at r = mean_depth, compile time, and recompiles while r changes every step.
    The warm-up (r = k + 2) builds every graph (prelude, coda, loop_step without and with grad); new r add none (§3)."""
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
    """Does SDPA run the flash kernel? Allowed only that, PyTorch raises instead of falling back to the math kernel
    (§3 trap: explicit mask, fp32 inputs on CUDA, head dim > 256, cached steps with is_causal)."""
    model, x = build(cfg, dev), torch.randint(cfg.vocab_size, (1, cfg.block_size), device=dev)
    train = lambda: make_train_step(model, dev, 1)(2)  # noqa: E731
    decode = lambda: inference_model(model, dev).generate(x[:, :8], 4, num_steps=2, temperature=0)  # noqa: E731
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # as decode_speed runs it: prefill, then one position at a time
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
    """bf16 weights on CUDA (gpt-fast): decoding reads each weight per token, autocast would re-cast fp32 each call."""
    return model.to(torch.bfloat16).eval() if dev == 'cuda' else model.eval()


@torch.no_grad()
def generate_uncached(model, idx, max_new_tokens, num_steps):
    """nanoGPT's generate (greedy): the whole cropped sequence through the model again for every new token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:], num_steps=num_steps)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx, torch.full((idx.size(0), max_new_tokens), num_steps)


def decoders(model, r, exit_threshold, compile_mode=''):
    """name -> fn(prompt, n) -> (tokens, depths): greedy decoding at fixed or adaptive depth <= r, without and with the
    KV cache, and with compile_mode the cached ones on a compiled copy, whose outputs are cloned: CUDA graphs replay
    into fixed buffers while the loop feeds loop_step its own output (§3 trap). Unmeasured on a GPU so far."""
    fns = {'no cache': lambda p, n: generate_uncached(model, p, n, r),
           'cache': lambda p, n: model.generate(p, n, num_steps=r, temperature=0),
           'cache + exit': lambda p, n: model.generate(p, n, num_steps=r, temperature=0, exit_threshold=exit_threshold)}
    if compile_mode:
        compiled = copy.deepcopy(model).compile_loop(mode=compile_mode)
        for name in ('prelude', 'loop_step', 'coda'):
            setattr(compiled, name, (lambda fn: lambda *a, **kw: fn(*a, **kw).clone())(getattr(compiled, name)))
        fns.update({f'{name} (compiled, {compile_mode})': fn
                    for name, fn in decoders(compiled, r, exit_threshold).items() if name != 'no cache'})
    return fns


def decode_speed(model, dev, new_tokens, repeats, r=None, exit_threshold=EXIT_THRESHOLD, compile_mode=''):
    """Batch-1 greedy decoding of new_tokens after a PROMPT_LEN prompt: tokens/s, loop iterations per token, and GB/s
    of weights read (at batch 1 the limit is reading every weight for every token)."""
    r, model = r or model.config.mean_depth, inference_model(model, dev)
    fns = decoders(model, r, exit_threshold, compile_mode)
    prompt = torch.randint(model.config.vocab_size, (1, PROMPT_LEN), device=dev)
    for fn in fns.values():
        fn(prompt, 8)  # warm-up: kernels, allocator and (compiled rows) compilation, on a short run
    last, graphs0 = {}, compiled_graphs()
    times = median_times({name: (lambda fn, name: lambda: last.__setitem__(name, fn(prompt, new_tokens)))(fn, name)
                          for name, fn in fns.items()}, dev, 0, repeats)
    rows = {}
    for name in fns:  # the exit test reads the coda's logits after every iteration: it reads the coda each time
        iterations = last[name][1].float().mean().item()
        gb = weight_bytes_per_token(model, iterations, 'exit' in name) / 1e9
        rows[name] = dict(tokens_per_s=new_tokens / times[name], mean_iterations=iterations,
                          weight_gb_per_s=None if name == 'no cache' else gb * new_tokens / times[name])
    return dict(new_tokens=new_tokens, depth=r, exit_threshold=exit_threshold, rows=rows,
                cache_speedup=rows['cache']['tokens_per_s'] / rows['no cache']['tokens_per_s'],
                recompiles_while_timed=compiled_graphs() - graphs0)  # compiled rows: dynamic positions settle early


def weight_bytes_per_token(model, iterations, coda_every_iteration=False):
    """Weight bytes of one cached decoding step: prelude once, loop block per iteration, coda and head once (and per
    iteration when the exit rule reads the logits)."""
    size = lambda *mods: sum(p.numel() * p.element_size()  # noqa: E731
                             for m in mods if m is not None for p in m.parameters())
    t = model.transformer
    loop, coda = size(t.loop, model.adapter, model.ln_state), size(t.coda, t.ln_f, model.lm_head)
    return size(t.prelude) + iterations * loop + (1 + (iterations if coda_every_iteration else 0)) * coda


# -- report ------------------------------------------------------------------------------------------------------------
def header(cfg, dev, batch_size, quick, argv):
    """What every result carries (modded-nanogpt records): device, versions, date and command, the settings, the
    model, and the spec-sheet FLOP/s it is measured against (None on CPU)."""
    with open('/proc/cpuinfo') if os.path.exists('/proc/cpuinfo') else nullcontext([]) as f:  # Linux names its CPU
        cpus = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    name = torch.cuda.get_device_name() if dev == 'cuda' else (
        f"{cpus[0]} ({len(cpus)} cores)" if cpus else f"{platform.machine()} CPU")
    env = dict(device=dev, device_name=name, threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(), date=datetime.now(timezone.utc).isoformat(timespec='seconds'),
               command=' '.join(['python', 'bench.py', *argv]))
    model = ', '.join(f'{k}={getattr(cfg, k)}' for k in ('n_embd', 'n_head', 'block_size', 'vocab_size', *LOOP))
    return dict(env=env, quick=quick, dtype='bf16' if dev == 'cuda' else 'fp32', model=model, batch_size=batch_size,
                block_size=cfg.block_size, depth=cfg.mean_depth,
                peak=next((peak for key, peak in PEAK_FLOPS if dev == 'cuda' and key in name), None))


def table(title, header, rows):
    """Print one aligned table: a title line, the header, then the rows (lists of str)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print('  '.join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def print_report(res):
    env, tr, mem, c, d = res['env'], res['train'], res['memory'], res['compile'], res['decode']
    pct = lambda x: '-' if x is None else f"{100 * x:.1f}%"  # noqa: E731
    verdict = lambda value, ok: 'n/a' if value is None else ('met' if ok else 'MISSED')  # noqa: E731
    print(f"nanoloop bench | {env['device_name']}, {env['threads']} threads | torch {env['torch']} | {env['date']}\n"
          f"{env['command']} | {res['dtype']} | {res['model']}")
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
    table(f"2. memory of the first training step vs depth: k = {mem['backprop_depth']}, batch {mem['batch_size']} "
          f"({'torch.cuda.max_memory_allocated' if env['device'] == 'cuda' else 'peak RSS, one process per r'})",
          ['r', 'peak MiB', 'step MiB'],
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
          f"(exit: KL < {d['exit_threshold']:g})", ['decoder', 'tok/s', 'iterations/token', 'weight GB/s'],
          [[name, f"{r['tokens_per_s']:,.1f}", f"{r['mean_iterations']:.2f}",
            '-' if r['weight_gb_per_s'] is None else f"{r['weight_gb_per_s']:.2f}"] for name, r in d['rows'].items()])
    if d['recompiles_while_timed']:
        print(f"compiled decoding rebuilt {d['recompiles_while_timed']} graphs while timed: its rows include compiling")
    speedup = d['cache_speedup'] if d['new_tokens'] >= 512 else None  # the target is set at 512 tokens
    print(f"cache / no cache: {d['cache_speedup']:.1f}x (target >= 10x at 512 tokens: "
          f"{verdict(speedup, speedup is not None and speedup >= 10)})")


# -- main --------------------------------------------------------------------------------------------------------------
def section(msg):
    """Progress on stderr (stdout holds only the report and the JSON line), and fresh dynamo caches: earlier graphs
    count neither in this section nor against the recompile limit, and the models they hold are freed."""
    import gc
    import torch._dynamo
    torch._dynamo.reset()
    gc.collect()
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def settings(argv):
    """(settings, the checkpoint's model or None), every bad value, device or checkpoint a line before any work."""
    opts = configure(DEFAULTS, argv)
    check(opts, CHECKS)
    check_device(opts['device'])
    if opts['decode_compile'] == 'reduce-overhead' and opts['device'] != 'cuda':
        raise ValueError("decode_compile='reduce-overhead' is not allowed on cpu: CUDA graphs need --device=cuda")
    return types.SimpleNamespace(**opts), load_checkpoint(opts['ckpt'])[0] if opts['ckpt'] else None


def run(opts, argv, model=None):
    """The four measurements -> the result dict of the JSON line; decoding uses `model` (a checkpoint's) if given."""
    dev, t, cfg = opts.device, RUN[opts.quick], GPTConfig(**SIZES[opts.device], **LOOP)
    res = header(cfg, dev, BATCH[dev], opts.quick, argv)
    section(f"bench on {dev}{' (quick)' if opts.quick else ''}: 1. training throughput: loop, equal-FLOP plain, "
            f"unrolled, matmul ceiling")
    res['train'] = train_throughput(cfg, dev, BATCH[dev], t['warmup'], t['repeats'], res['peak'], compile=dev == 'cuda')
    section(f"2. memory of one training step for r in {MEMORY_DEPTHS}")
    res['memory'] = memory_vs_depth(replace(cfg, backprop_depth=MEMORY_K), dev,
                                    max(1, round(t['memory_batch'] * BATCH[dev])))
    # 3. --quick on CPU traces with dynamo only (backend='eager'): recompiles are dynamo's, and inductor's CPU compile
    # takes 25 s (quiet) to over 2 min (shared) on 2 cores, so only the full run times it
    section("3. compilation and flash attention")
    backend = 'eager' if opts.quick and dev == 'cpu' else 'inductor'
    res['compile'] = dict(compile_check(cfg, dev, BATCH[dev], t['warmup'], t['repeats'], t['depth_changes'],
                                        backend=backend), backend=backend, flash=flash_check(cfg, dev))
    section(f"4. decoding {t['decode_tokens']} tokens")
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
    print(json.dumps(res))
    if opts.json_out:
        with open(opts.json_out, 'w') as f:
            f.write(json.dumps(res) + '\n')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
