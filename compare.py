"""
Does thinking longer pay? Train the looped model and its plain twins with train.py on the same data, steps and seed,
evaluate them on the same batches, and print one table by test-time depth r. Every claim about the loop rests on it.

    python compare.py                                 # CPU demo: looped vs plain twins on shakespeare_char
    python compare.py config/showcase.py --seeds=1337,1338  # depth showcase: two seeds, accuracy per position vs r
    python compare.py --diagnose=out                  # what the loop of a trained checkpoint does with its state
"""

import importlib.util
import json
import os
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import prepare
import train
from configurator import configure
from model import check, init_state
from sample import depth_sweep, load_checkpoint, val_loss

OWN = dict(  # compare.py's own keys; every train.py key (and config file) is accepted too and passed on to the runs
    models='looped,params,flops',  # which to train: looped, params (plain, same parameters), flops (plain, same FLOPs)
    seeds='1337',            # comma-separated training seeds; the table shows each and their mean
    jobs=2,                  # training runs at once (one thread each on CPU; 2 suits a 2-core laptop)
    depths='',               # test-time r for the looped model, e.g. '1,2,4' ('' = 1, 2, 4, ... up to 4 x max_depth)
    eval_batches=40,         # fixed val batches every model is evaluated on
    diagnose='',             # a checkpoint (file or out_dir): print its loop diagnostics and exit
    plot=False,              # also write out_dir/compare.png (needs matplotlib)
)
OWN_OUT = 'out-compare'      # the default out_dir of compare runs (train.py's default 'out' stays the user's)
KINDS = {'looped': 'looped {n_prelude}+{n_loop}xr+{n_coda}', 'params': 'plain {n_loop} layers (same params)',
         'flops': 'plain {n_loop} layers (same FLOPs)'}  # each model's name in the tables, from its train.py settings
CHECKS = {  # key: (what is allowed, test) for compare.py's own keys; train.check_config checks train.py's
    'models': (f"a comma-separated subset of {', '.join(KINDS)}", lambda v: set(v.split(',')) <= set(KINDS)),
    'seeds': ('comma-separated integers >= 0, e.g. 1337,1338', lambda v: all(s.isdecimal() for s in v.split(','))),
    'depths': ("'' or comma-separated integers >= 1, e.g. 1,2,4",
               lambda v: not v or all(d.isdecimal() and int(d) >= 1 for d in v.split(','))),
    **dict.fromkeys(('jobs', 'eval_batches'), ('an integer >= 1', lambda v: v >= 1)),
    'plot': ('False, or True with matplotlib installed', lambda v: not v or importlib.util.find_spec('matplotlib')),
}
PLAIN = dict(n_prelude=0, n_coda=0, mean_depth=1, max_depth=1, backprop_depth=1, fixed_depth=True, inject='none',
             init_state='embed', norm_state=False)  # model.plain_config's choices, as train.py keys


# -- the twins, each trained by train.py in a subprocess ---------------------------------------------------------------
def run_settings(cfg, kind, seed):
    """The complete train.py config of one run: the looped model as configured, or one of its plain twins."""
    settings = {k: cfg[k] for k in train.DEFAULTS}
    if kind != 'looped':  # the looped model's layers run once, or as many layers as it runs at mean_depth
        layers = cfg['n_loop'] if kind == 'params' else cfg['mean_depth'] * cfg['n_loop']
        settings.update(PLAIN, n_loop=cfg['n_prelude'] + layers + cfg['n_coda'])
    settings.update(seed=seed, always_save_checkpoint=True, sample_tokens=0,
                    out_dir=os.path.join(cfg['out_dir'], f'{kind}-{seed}'))
    return settings


def is_finished(settings):
    """True if out_dir holds a finished run of exactly these settings (then it is reused, not retrained)."""
    path = os.path.join(settings['out_dir'], 'ckpt.pt')
    if not os.path.exists(path):
        return False
    _, ckpt = load_checkpoint(path)
    same = all(ckpt['config'].get(k) == v for k, v in settings.items() if k != 'overwrite')
    return same and ckpt['iter_num'] == settings['max_iters']


def train_one(name, settings):
    """`python train.py` with each key that differs from its default, the output in out_dir/train.log."""
    args = [f'--{k}={v}' for k, v in settings.items() if v != train.DEFAULTS[k]]
    # one thread a run on CPU: a tiny model gains nothing from a second, and waiting for a busy core slows it a lot
    env = dict(os.environ, OMP_NUM_THREADS='1') if settings['device'] == 'cpu' else None
    print(f"training {name}: train.py {' '.join(args)}", flush=True)
    os.makedirs(settings['out_dir'], exist_ok=True)
    with open(os.path.join(settings['out_dir'], 'train.log'), 'w') as log:
        run = subprocess.run([sys.executable, train.__file__, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    if run.returncode:
        raise ValueError(f"training {name} failed; see {settings['out_dir']}/train.log")


def train_runs(cfg):
    """{name: settings} of every run, all checked first, then trained `jobs` at a time unless finished already."""
    runs = {f'{kind}-{seed}': run_settings(cfg, kind, int(seed))
            for seed in cfg['seeds'].split(',') for kind in cfg['models'].split(',')}
    train.check_config(types.SimpleNamespace(**cfg), 1)  # a bad train.py value is one line now, not a failed run later
    train.ensure_data(types.SimpleNamespace(**cfg))  # once, before the runs that share it
    todo = {name: settings for name, settings in runs.items() if not is_finished(settings)}
    with ThreadPoolExecutor(cfg['jobs']) as pool:  # a failure raises after the running runs; queued runs are cancelled
        list(pool.map(train_one, todo, todo.values()))
    return runs


# -- evaluation: the same batches and the same initial-state noise for every model (sample.depth_sweep) ---------------
def buckets(length):
    """Difficulty groups of a task by position (the number of sequential steps): 1-4, 5-8, 9-16, 17-32, ..."""
    ends = sorted({min(2 ** k, length) for k in range(2, length.bit_length() + 2)})  # 4, 8, 16, ..., length
    return list(zip([1] + [end + 1 for end in ends[:-1]], ends))


def test_data(cfg, batch_size=256):
    """(batches, metric, difficulty groups or None). A text: eval_batches fixed val batches, scored by val loss. A
    task: its whole test set in order (val.bin, disjoint from train), scored by accuracy (%) per difficulty group."""
    path = prepare.dataset_dir(cfg['dataset'], cfg['data_dir'])
    meta = prepare.read_meta(path)
    length, first = meta.get('example_len'), int(meta.get('bos', False))  # a BOS column is no difficulty: not scored
    if not length:
        c = types.SimpleNamespace(**dict(cfg, eval_iters=cfg['eval_batches']))
        return train.eval_batches(c, 'val', 'cpu'), val_loss, None
    x, y = (torch.from_numpy(np.fromfile(os.path.join(path, f), dtype=np.uint16).astype(np.int64)).view(-1, length)
            for f in ('val.bin', 'val_targets.bin'))
    groups = buckets(length - first)

    def accuracy(logits, targets):  # (len(groups),): position t is column first + t - 1
        correct = 100 * (logits.argmax(-1) == targets)[:, first:].float()
        return torch.stack([correct[:, a - 1:b].mean() for a, b in groups])
    return list(zip(x.split(batch_size), y.split(batch_size))), accuracy, groups


def evaluate(model, batches, depths, metric, exit_threshold=5e-4, exit_rule='kl'):
    """{r or 'adaptive': (metric, mean iterations per token)}; a plain model is evaluated at r = 1 only. depths=None:
    1, 2, 4, 8, ... up to 4 x max_depth, plus mean_depth and 1, 2 and 4 x the training cap max_depth."""
    mean, cap, plain = model.config.mean_depth, model.config.max_depth, model.config.max_depth == 1
    depths = depths or sorted({2 ** i for i in range((4 * cap).bit_length())} | {mean, cap, 2 * cap, 4 * cap})
    rows = depth_sweep(model, batches, [1] if plain else depths, [] if plain else [exit_threshold], exit_rule, metric)
    return {row['r'] if row['eps'] is None else 'adaptive': (row['value'], row['mean_iterations']) for row in rows}


# -- diagnostics: does the loop read its state? (Huginn §4.3: a failed loop learned "to ignore the incoming state")
@torch.no_grad()
def diagnose(model, x):
    """How a trained loop uses its state, on tokens x (B, T), from two random initial states s_0, s_0': the total
    variation of their outputs after r = 1 .. 2 x mean_depth iterations (near 0 at r = 1: s_0 is ignored), each
    iteration's relative move, the injection's weight on the state, and RMS(s) / RMS(e) (a small s drowns in e)."""
    e = model.prelude(x)
    runs = [[init_state(e, 'noise', model.config.state_std, torch.Generator().manual_seed(seed))] for seed in (0, 1)]
    for states in runs:  # [s_0, s_1, ..., s_r] from each starting point
        for _ in range(2 * model.config.mean_depth):
            states.append(model.loop_step(states[-1], e))
    probs = [[model.coda(s).float().softmax(-1) for s in states] for states in runs]
    states = runs[0]
    return dict(
        s0_effect={r: 0.5 * (probs[0][r] - probs[1][r]).abs().sum(-1).mean().item() for r in range(1, len(states))},
        step={i: ((states[i] - states[i - 1]).norm() / states[i].norm()).item() for i in range(1, len(states))},
        state_share=adapter_share(model),
        state_scale=tuple((s.norm() / e.norm()).item() for s in (states[0], states[-1])))  # = RMS ratio (same shape)


def adapter_share(model):
    """The injection's weight on the state: 0.5 for add (by design), None for none, the concat adapter's share."""
    if model.adapter is None:
        return 0.5 if model.config.inject == 'add' else None
    state, e = model.adapter.weight.float().chunk(2, dim=1)  # (C, 2C): the columns that read s, then those of e
    return (state.norm() / (state.norm() + e.norm())).item()


def ignores_state(d, tol=1e-3):
    """The failure signature: the state after one iteration does not depend on s_0 and then stops moving."""
    return d['s0_effect'][min(d['s0_effect'])] < tol and max(list(d['step'].values())[1:] or [0]) < tol


def format_diagnosis(d):
    share = 'n/a (no injection)' if d['state_share'] is None else f"{d['state_share']:.2f}"
    first = d['s0_effect'][min(d['s0_effect'])]
    verdict = ('the loop IGNORES its state: the output does not depend on s_0 and the state stops after one '
               'iteration (Huginn §4.3)' if ignores_state(d) else
               f'the loop barely reads its state: s_0 moves the output by TV {first:.3f} < 0.01 after one iteration'
               if first < 0.01 else 'the loop uses its state: the output depends on s_0 at small r')
    return '\n'.join(['loop diagnostics (two random initial states, the same tokens):',
                      '  r                      ' + ' '.join(f'{r:>6}' for r in d['s0_effect']),
                      '  effect of s_0 (TV)     ' + ' '.join(f'{v:6.3f}' for v in d['s0_effect'].values()),
                      '  state move |ds|/|s|    ' + ' '.join(f'{v:6.3f}' for v in d['step'].values()),
                      f"  adapter weight on the state: {share}; RMS(s)/RMS(e): s_0 {d['state_scale'][0]:.2f}, "
                      f"final {d['state_scale'][1]:.2f}", f'  verdict: {verdict}'])


# -- tables and plot ---------------------------------------------------------------------------------------------------
def with_means(results):
    """results plus, for each model run with several seeds, a 'mean' row averaging metric, iterations and wall time."""
    out = dict(results)
    for model in dict.fromkeys(res['model'] for res in results.values()):
        seeds = [res for res in results.values() if res['model'] == model]
        if len(seeds) > 1:  # zip pairs up the seeds' metrics, then their iterations, at depth r
            rows = {r: [sum(v) / len(seeds) for v in zip(*(s['rows'][r] for s in seeds))] for r in seeds[0]['rows']}
            out[f'{model} mean'] = dict(seeds[0], wall=sum(s['wall'] for s in seeds) / len(seeds), rows=rows)
    return out


def loss_table(results):
    """Val loss by depth: one row per model and seed, and the mean over seeds."""
    depths = sorted({r for res in results.values() for r in res['rows'] if r != 'adaptive'})
    lines = [f"{'model':<36}{'params':>7}{'train s':>8}" + ''.join(f'{"r=" + str(r):>8}' for r in depths)
             + f"{'adaptive (it/token)':>22}"]
    for name, res in with_means(results).items():
        cells = [f"{res['rows'][r][0]:8.4f}" if r in res['rows'] else ' ' * 8 for r in depths]
        loss, iters = res['rows'].get('adaptive', (None, None))
        cells.append(f'{loss:14.4f} ({iters:.2f})' if loss is not None else '')
        lines.append(f"{name:<36}{res['params'] / 1e6:>6.2f}M{res['wall']:>8.0f}" + ''.join(cells))
    return '\n'.join(lines)


def accuracy_table(results, groups):
    """Accuracy (%) per difficulty group, one row per model, seed and depth."""
    lines = [f"{'model':<36}{'r':>10}" + ''.join(f'{f"{a}-{b}":>8}' for a, b in groups)]
    for name, res in with_means(results).items():
        for r, (accuracy, iters) in res['rows'].items():
            r_text = f'exit {iters:.1f}' if r == 'adaptive' else str(r)
            lines.append(f'{name:<36}{r_text:>10}' + ''.join(f'{v:8.1f}' for v in accuracy.tolist()))
    return '\n'.join(lines)


def save_plot(results, path, groups):
    """Val loss, or a task's accuracy on its hardest group, against r; a plain twin is a dashed line."""
    import matplotlib.pyplot as plt
    plt.switch_backend('Agg')  # files only, no display needed
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        rs = [r for r in res['rows'] if r != 'adaptive']
        ys = [float(res['rows'][r][0][-1] if groups else res['rows'][r][0]) for r in rs]
        ax.plot(rs, ys, marker='o', label=name) if len(rs) > 1 else ax.axhline(ys[0], ls='--', label=name)
    ax.set_xscale('log', base=2)
    ax.set(xlabel='test-time depth r', ylabel='accuracy %% at positions %d-%d' % groups[-1] if groups else 'val loss')
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches='tight')


def compare(cfg):
    """Train what is not trained yet, evaluate every run on the same data, print the table and the loop diagnostics."""
    runs = train_runs(cfg)
    batches, metric, groups = test_data(cfg)
    results, diagnoses = {}, []
    for name, settings in runs.items():
        model, _ = load_checkpoint(settings['out_dir'])
        depths = [int(d) for d in cfg['depths'].split(',')] if cfg['depths'] else None
        with open(os.path.join(settings['out_dir'], 'log.jsonl')) as f:  # the run's own clock, fresh or reused
            wall = json.loads(f.readlines()[-1])['time_s']
        kind = KINDS[name.split('-')[0]].format(**settings)
        rows = evaluate(model, batches, depths, metric, cfg['exit_threshold'], cfg['exit_rule'])
        results[f"{kind} s{settings['seed']}"] = dict(model=kind, params=model.get_num_params(), wall=wall, rows=rows)
        if name.startswith('looped'):
            diagnoses.append(f'{name}: ' + format_diagnosis(diagnose(model, batches[0][0])))
    print('\n'.join([accuracy_table(results, groups) if groups else loss_table(results), *diagnoses]))
    if cfg['plot']:
        save_plot(results, os.path.join(cfg['out_dir'], 'compare.png'), groups)
    return results


def main(argv=None):
    try:
        cfg = configure({**train.DEFAULTS, **OWN, 'out_dir': OWN_OUT}, sys.argv[1:] if argv is None else argv)
        check(cfg, CHECKS)
        if cfg['device'] == 'cpu':  # tiny models: a second thread only waits (and training runs use the cores)
            torch.set_num_threads(1)
        if cfg['diagnose']:  # any checkpoint, on the first batch of its data that compare evaluates on
            model, ckpt = load_checkpoint(cfg['diagnose'])
            batches, _, _ = test_data({**cfg, **ckpt.get('config', {}), 'eval_batches': 1})
            print(format_diagnosis(diagnose(model, batches[0][0])))
        else:
            compare(cfg)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
