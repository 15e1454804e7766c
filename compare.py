"""
Does thinking longer pay? Train the looped model and its plain twins on the same data, steps and seed, evaluate them
on the same batches, and print one table by test-time depth r. Every claim about the loop rests on this comparison.

    python compare.py                                 # CPU demo: looped vs plain twin on shakespeare_char
    python compare.py config/showcase.py              # depth showcase: prefix sums, accuracy per position vs r
    python compare.py --seeds=1337,1338 --jobs=1      # two seeds; one training run at a time
    python compare.py --diagnose=out                  # what the loop of a trained checkpoint does with its state

The twins share every choice but the loop (blocks, norms, positions, data, steps, seed): 'params' is a plain GPT with
the looped model's layers run once (the same parameters), 'flops' a plain GPT as deep as the looped model runs at
mean_depth (the same inference FLOPs). Each run is `python train.py` in its own out_dir (see out_dir/<model>-<seed>/
train.log); a finished run with the same settings is reused. Any train.py key can be given here too.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

import prepare
import train
from configurator import configure
from model import init_state
from sample import load_checkpoint

# -----------------------------------------------------------------------------
# compare.py's own keys; every train.py key (and config file) is accepted too and passed on to the training runs
OWN = dict(
    models='looped,params,flops',  # which to train: looped, params (plain, same parameters), flops (plain, same FLOPs)
    seeds='1337',            # comma-separated training seeds; the table shows each and their mean
    jobs=2,                  # training runs at once (one thread each on CPU; 2 suits a 2-core laptop)
    depths='',               # test-time r for the looped model, e.g. '1,2,4' ('' = 1, 2, 4, ... up to 4 x max_depth)
    eval_batches=40,         # fixed val batches every model is evaluated on
    diagnose='',             # a checkpoint (file or out_dir): print its loop diagnostics and exit
    plot=False,              # also write out_dir/compare.png (needs matplotlib)
)
OWN_OUT = 'out-compare'      # the default out_dir of compare runs (train.py's default 'out' stays the user's)
PLAIN = dict(n_prelude=0, n_coda=0, mean_depth=1, max_depth=1, backprop_depth=1, fixed_depth=True, inject='none',
             init_state='embed', norm_state=False)  # model.plain_config's choices, as train.py keys

# -----------------------------------------------------------------------------
# the twins


def twin_overrides(cfg, kind):
    """train.py settings of model `kind` for config cfg: the looped model as configured, or a plain GPT."""
    if kind == 'looped':
        return {}
    layers = {'params': cfg['n_loop'], 'flops': cfg['mean_depth'] * cfg['n_loop']}[kind]
    return dict(PLAIN, n_loop=cfg['n_prelude'] + layers + cfg['n_coda'])


def run_settings(cfg, kind, seed):
    """The complete train.py config of one run (only train.py's keys)."""
    settings = {k: cfg[k] for k in train.DEFAULTS}
    settings.update(twin_overrides(cfg, kind), seed=seed, always_save_checkpoint=True, sample_tokens=0,
                    out_dir=os.path.join(cfg['out_dir'], f'{kind}-{seed}'))
    return settings


def is_finished(settings):
    """True if out_dir holds a finished run of exactly these settings (then it is reused, not retrained)."""
    path = os.path.join(settings['out_dir'], 'ckpt.pt')
    if not os.path.exists(path):
        return False
    _, ckpt = load_checkpoint(path)
    keys = [k for k in settings if k != 'overwrite']
    same = all(ckpt['config'].get(k) == settings[k] for k in keys)
    return same and ckpt['iter_num'] == settings['max_iters']


def command(settings):
    """The train.py command line of a run: every key that differs from train.py's default."""
    args = [f'--{k}={v}' for k, v in settings.items() if v != train.DEFAULTS[k]]
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py'), *args]


def train_all(runs, jobs, device):
    """Run the training commands, `jobs` at a time. One thread per run on CPU: tiny models gain nothing from a second
    thread, and one that waits for a busy core slows a run many times over."""
    env = dict(os.environ, OMP_NUM_THREADS='1') if device == 'cpu' else dict(os.environ)
    pending, running = list(runs.items()), {}
    while pending or running:
        while pending and len(running) < jobs:
            name, settings = pending.pop(0)
            os.makedirs(settings['out_dir'], exist_ok=True)
            log = open(os.path.join(settings['out_dir'], 'train.log'), 'w')
            print(f"training {name}: {' '.join(command(settings)[1:])}", flush=True)
            running[name] = (subprocess.Popen(command(settings), stdout=log, stderr=subprocess.STDOUT, env=env),
                             time.time(), log)
        time.sleep(0.5)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode:
                    raise ValueError(f"training {name} failed; see {runs[name]['out_dir']}/train.log")
                print(f"  {name} done in {time.time() - t0:.0f} s", flush=True)

# -----------------------------------------------------------------------------
# evaluation: the same batches and the same initial-state noise for every model


def test_depths(config):
    """1, 2, 4, 8, ... up to 4 x max_depth, plus mean_depth and 1, 2 and 4 x the training cap max_depth."""
    cap = config.max_depth
    return sorted({2 ** i for i in range(int(math.log2(4 * cap)) + 1)} | {config.mean_depth, cap, 2 * cap, 4 * cap})


def buckets(length):
    """Difficulty groups of a task by position (the number of sequential steps): 1-4, 5-8, 9-16, 17-32, ..."""
    edges, lo = [], 1
    while lo <= length:
        edges.append((lo, min(4 if lo == 1 else 2 * (lo - 1), length)))
        lo = edges[-1][1] + 1
    return edges


def test_set(path, length, batch_size=256):
    """A task's whole test set (val.bin, disjoint from train) in order, as (x, y) batches: every example counts."""
    x, y = (torch.from_numpy(np.fromfile(os.path.join(path, f), dtype=np.uint16).astype(np.int64)).view(-1, length)
            for f in ('val.bin', 'val_targets.bin'))
    return list(zip(x.split(batch_size), y.split(batch_size)))


@torch.no_grad()
def score(model, batches, num_steps=None, exit_threshold=None, max_steps=None):
    """(val loss, correct (N, T) bool, mean iterations) over the batches, at r = num_steps or by adaptive exit."""
    losses, correct, iters = [], [], []
    for x, y in batches:
        torch.manual_seed(0)  # the same noise s_0 for every model and depth
        if exit_threshold is None:
            logits, loss = model(x, y, num_steps=num_steps)
            depth = torch.full(x.shape, num_steps)
        else:
            logits, loss, depth = model.adaptive_forward(x, y, exit_threshold, num_steps=max_steps)
        losses.append(loss.item())
        correct.append(logits.argmax(-1) == y)
        iters.append(depth.float().mean().item())
    n = len(batches)
    return sum(losses) / n, torch.cat(correct), sum(iters) / n


def evaluate(model, batches, depths, cfg, first=0):
    """{r or 'adaptive': (loss, correct (N, T - first), mean iterations)}; a plain model is evaluated at r = 1 only.
    first: leading columns left out of `correct` (a task's BOS token)."""
    plain = model.config.max_depth == 1
    rows = {r: score(model, batches, r) for r in ([1] if plain else depths)}
    if not plain:
        rows['adaptive'] = score(model, batches, exit_threshold=cfg['exit_threshold'], max_steps=max(depths))
    return {r: (loss, correct[:, first:], iters) for r, (loss, correct, iters) in rows.items()}

# -----------------------------------------------------------------------------
# diagnostics: does the loop use its state? (Huginn §4.3: a failed loop "learned early to ignore the incoming state")


@torch.no_grad()
def diagnose(model, x, depths=None):
    """How a trained loop uses its state, on token batch x (B, T), from two random initial states s_0 and s_0':
    - s0_effect[r]: total-variation distance of the next-token distributions after r iterations from s_0 vs s_0'.
      Near 0 already at r = 1: the output does not depend on the state, the loop ignores it. Large at r = 1 and
      shrinking with r: the loop reads its state and converges to the same answer from anywhere (Huginn's aim).
    - step[i]: relative move ||s_i - s_{i-1}|| / ||s_i|| of iteration i; 0 from i = 2 on means the loop computed
      everything from e in its first iteration and then stood still.
    - state_share: the concat adapter's weight norm on the state half of [s; e] over the whole (add: 0.5 by design).
    - state_scale: RMS of s over RMS of e where they meet (s_0, then after the last iteration): a state much smaller
      than e is drowned by the injection."""
    cfg = model.config
    depths = depths or list(range(1, 2 * cfg.mean_depth + 1))
    e = model.prelude(x)
    noise = lambda seed: init_state(e, 'noise', cfg.state_std, torch.Generator().manual_seed(seed))
    runs = [[noise(seed)] for seed in (0, 1)]  # [s_0, s_1, ..., s_r] from two starting points
    for states in runs:
        for _ in range(max(depths)):
            states.append(model.loop_step(states[-1], e))
    probs = [[F.softmax(model.coda(s).float(), -1) for s in states] for states in runs]
    states = runs[0]
    rms = lambda t: t.float().pow(2).mean().sqrt().item()
    return dict(
        s0_effect={r: 0.5 * (probs[0][r] - probs[1][r]).abs().sum(-1).mean().item() for r in depths},
        step={i: ((states[i] - states[i - 1]).norm() / states[i].norm()).item() for i in range(1, len(states))},
        state_share=adapter_share(model),
        state_scale=(rms(states[0]) / rms(e), rms(states[-1]) / rms(e)))


def adapter_share(model):
    if model.adapter is None:
        return 0.5 if model.config.inject == 'add' else None
    w = model.adapter.weight.float()  # (C, 2C): columns [:C] read the state, [C:] the prelude output
    C = w.size(0)
    return (w[:, :C].norm() / (w[:, :C].norm() + w[:, C:].norm())).item()


def ignores_state(d, tol=1e-3):
    """The failure signature: the state after one iteration does not depend on s_0 and then stops moving."""
    return d['s0_effect'][min(d['s0_effect'])] < tol and max(list(d['step'].values())[1:] or [0]) < tol


def format_diagnosis(d):
    share = 'n/a (no injection)' if d['state_share'] is None else f"{d['state_share']:.2f}"
    lines = ['loop diagnostics (two random initial states, the same tokens):',
             '  r                      ' + ' '.join(f'{r:>6}' for r in d['s0_effect']),
             '  effect of s_0 (TV)     ' + ' '.join(f'{v:6.3f}' for v in d['s0_effect'].values()),
             '  state move |ds|/|s|    ' + ' '.join(f'{v:6.3f}' for v in d['step'].values()),
             f"  adapter weight on the state: {share}; RMS(s)/RMS(e): s_0 {d['state_scale'][0]:.2f}, "
             f"final {d['state_scale'][1]:.2f}"]
    first = d['s0_effect'][min(d['s0_effect'])]
    verdict = ('the loop IGNORES its state: the output does not depend on s_0 and the state stops after one '
               'iteration (Huginn §4.3)' if ignores_state(d) else
               f'the loop barely reads its state: s_0 moves the output by TV {first:.3f} < 0.01 after one iteration'
               if first < 0.01 else 'the loop uses its state: the output depends on s_0 at small r')
    return '\n'.join(lines + ['  verdict: ' + verdict])

# -----------------------------------------------------------------------------
# tables


def label(kind, config):
    if kind == 'looped':
        return f'looped {config.n_prelude}+{config.n_loop}xr+{config.n_coda}'
    return f"plain {config.n_loop} layers ({'same params' if kind == 'params' else 'same FLOPs'})"


def with_means(results):
    """results plus, for each model run with several seeds, a 'mean' row averaging loss, accuracy and iterations."""
    out, groups = dict(results), {}
    for name, res in results.items():
        groups.setdefault(name.rsplit(' s', 1)[0], []).append(res)
    for model, runs in groups.items():
        if len(runs) > 1:
            rows = {r: tuple(mean_of([run['rows'][r][i] for run in runs]) for i in range(3)) for r in runs[0]['rows']}
            out[f'{model} mean'] = dict(runs[0], wall=sum(run['wall'] for run in runs) / len(runs), rows=rows)
    return out


def mean_of(values):
    return torch.stack([v.float() for v in values]).mean(0) if torch.is_tensor(values[0]) else sum(values) / len(values)


def loss_table(results, depths):
    """Val loss by depth: one row per model and seed, and the mean over seeds."""
    cols = [*depths, 'adaptive']
    lines = [f"{'model':<36}{'params':>7}{'train s':>8}" + ''.join(f'{"r=" + str(r):>8}' for r in cols[:-1])
             + f"{'adaptive (it/token)':>22}"]
    for name, res in with_means(results).items():
        cells = [f"{res['rows'][r][0]:8.4f}" if r in res['rows'] else ' ' * 8 for r in depths]
        loss, _, iters = res['rows'].get('adaptive', (None, None, None))
        cells.append(f'{loss:14.4f} ({iters:.2f})' if loss is not None else '')
        lines.append(f"{name:<36}{res['params'] / 1e6:>6.2f}M{res['wall']:>8.0f}" + ''.join(cells))
    return '\n'.join(lines)


def accuracy_table(results, length):
    """Accuracy (%) per difficulty bucket (position), one row per model, seed and depth."""
    groups = buckets(length)
    lines = [f"{'model':<36}{'r':>10}" + ''.join(f'{f"{a}-{b}":>8}' for a, b in groups)]
    for name, res in with_means(results).items():
        for r, (_, correct, iters) in res['rows'].items():
            acc = [100 * correct[:, a - 1:b].float().mean().item() for a, b in groups]
            r_text = f'exit {iters:.1f}' if r == 'adaptive' else str(r)
            lines.append(f'{name:<36}{r_text:>10}' + ''.join(f'{v:8.1f}' for v in acc))
    return '\n'.join(lines)


def save_plot(results, path, length):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        rs = [r for r in res['rows'] if r != 'adaptive']
        if length:  # accuracy on the hardest bucket
            a, b = buckets(length)[-1]
            ys = [100 * res['rows'][r][1][:, a - 1:b].float().mean().item() for r in rs]
        else:
            ys = [res['rows'][r][0] for r in rs]
        ax.plot(rs, ys, marker='o', label=name) if len(rs) > 1 else ax.axhline(ys[0], ls='--', label=name)
    ax.set_xscale('log', base=2)
    ax.set_xlabel('test-time iterations r')
    ax.set_ylabel(f'accuracy % at positions {a}-{b}' if length else 'val loss')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

# -----------------------------------------------------------------------------


def int_list(cfg, key):
    """'1337,1338' -> [1337, 1338], or one line naming the key."""
    try:
        return [int(v) for v in str(cfg[key]).split(',')]
    except ValueError:
        raise ValueError(f"{key}={cfg[key]!r}: expected comma-separated integers, e.g. 1,2,4") from None


def compare(cfg):
    kinds, seeds = cfg['models'].split(','), int_list(cfg, 'seeds')
    bad = [k for k in kinds if k not in ('looped', 'params', 'flops')]
    if bad or not kinds:
        raise ValueError(f"models={cfg['models']!r}: expected a comma-separated subset of looped, params, flops")
    runs = {f'{k}-{s}': run_settings(cfg, k, s) for s in seeds for k in kinds}
    todo = {name: st for name, st in runs.items() if not is_finished(st)}
    train_all(todo, cfg['jobs'], cfg['device'])
    path = prepare.dataset_dir(cfg['dataset'], cfg['data_dir'])
    meta = prepare.read_meta(path)
    length, first = meta.get('example_len'), int(meta.get('bos', False))  # a BOS column is no difficulty
    batches = test_set(path, length) if length else train.eval_batches(
        types_ns(cfg, eval_iters=cfg['eval_batches']), 'val', 'cpu')
    results = {}
    for name, settings in runs.items():
        model, ckpt = load_checkpoint(settings['out_dir'])
        depths = int_list(cfg, 'depths') if cfg['depths'] else test_depths(model.config)
        with open(os.path.join(settings['out_dir'], 'log.jsonl')) as f:  # the run's own clock, fresh or reused
            wall = json.loads(f.readlines()[-1])['time_s']
        results[f"{label(name.split('-')[0], model.config)} s{settings['seed']}"] = dict(
            params=model.get_num_params(), wall=wall, rows=evaluate(model, batches, depths, cfg, first), depths=depths)
    length = length and length - first
    looped = [r for r in results.values() if len(r['rows']) > 1]
    depths = looped[0]['depths'] if looped else [1]
    print(accuracy_table(results, length) if length else loss_table(results, depths))
    for name, settings in runs.items():
        if name.startswith('looped'):
            model, _ = load_checkpoint(settings['out_dir'])
            print(f'{name}: ' + format_diagnosis(diagnose(model, batches[0][0])))
    if cfg['plot']:
        save_plot(results, os.path.join(cfg['out_dir'], 'compare.png'), length)
    return results


def types_ns(cfg, **overrides):
    return types.SimpleNamespace(**{**cfg, **overrides})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = configure({**train.DEFAULTS, **OWN, 'out_dir': OWN_OUT}, argv)
        if cfg['device'] == 'cpu':  # tiny models: a second thread only waits (and training runs use the cores)
            torch.set_num_threads(1)
        if cfg['diagnose']:
            model, ckpt = load_checkpoint(cfg['diagnose'])
            c = types_ns({**train.DEFAULTS, **ckpt['config']}, batch_size=8, eval_iters=1)
            print(format_diagnosis(diagnose(model, train.eval_batches(c, 'val', 'cpu')[0][0])))
            return
        if cfg['plot'] and importlib.util.find_spec('matplotlib') is None:
            raise ValueError("plot=True needs the optional package matplotlib: pip install matplotlib")
        train.ensure_data(types_ns(cfg))
        compare(cfg)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
