"""
Does thinking longer help? Exact-match accuracy on the multi-hop reasoning task (prepare.py reasoning) for every
number of hops, at several test-time loop depths r and under adaptive exit (METHOD.md §5).

    python reasoning.py --ckpt=out-reasoning-looped/ckpt.pt              # table for hops 1..2H, r = 1..32 + adaptive
    python reasoning.py --ckpt=... --depths=1,4,16 --n_test=100         # fewer depths / prompts: faster
    python reasoning.py --ckpt=... --json=results.json                  # where the JSON goes (default: beside ckpt)

A prompt is '\\n' + problem + '?v=' and its answer is one digit: the model is right when the argmax of its logits at
the last prompt position is that digit. r may exceed the training max_depth (extrapolation, §5). A plain GPT
(max_depth 1) gets the single column r = 1. Importable: accuracy_by_hops(model, test, meta, ...).
"""

import datetime
import json
import os
import pickle
import platform
import sys
import time
from collections import defaultdict

import torch

from model import EXIT_RULES, GPT, GPTConfig

# -----------------------------------------------------------------------------
# defaults, each overridable as --key=value
ckpt = ''                   # path to a ckpt.pt written by train.py on the reasoning dataset (required)
depths = '1,2,4,8,16,32'    # test-time loop depths r, comma separated, each >= 1 (may exceed max_depth)
exit_threshold = 5e-4       # adaptive exit: stop once the rule's distance is below this (Huginn's KL 5e-4)
exit_rule = 'kl'            # 'kl' | 'entropy' | 'argmax-stable' | 'router' (model.EXIT_RULES)
batch_size = 250            # prompts per forward pass
n_test = 0                  # prompts per hop count (0 = all in test.pkl)
data_dir = ''               # folder holding reasoning/ ('' = the data_dir the checkpoint was trained with)
json_out = ''               # results file ('' = reasoning.json beside the checkpoint)
device = 'cpu'              # 'cpu' | 'cuda' | ...
seed = 1337                 # seeds the noise initial state (init_state='noise'), so results are reproducible
# -----------------------------------------------------------------------------
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def is_plain(config):
    """A plain GPT runs its layers once: looping it means nothing, so it is evaluated at r = 1 only."""
    return config.max_depth == 1 and config.inject == 'none'


def length_groups(pairs):
    """{prompt length: [(prompt, answer), ...]}. Equal-length prompts batch without padding, so the last column
    is every row's last prompt token and every row sees the same learned positions it was trained with."""
    groups = defaultdict(list)
    for prompt, answer in pairs:
        groups[len(prompt)].append((prompt, answer))
    return groups


def encode_pairs(pairs, meta, device):
    """(idx (N, T) of the prompts, answer token ids (N,)); an unknown character is an error."""
    stoi = meta['stoi']
    try:
        idx = torch.tensor([[stoi[c] for c in p] for p, _ in pairs], dtype=torch.long, device=device)
        answers = torch.tensor([stoi[a] for _, a in pairs], dtype=torch.long, device=device)
    except KeyError as e:
        raise ValueError(f'test character {e.args[0]!r} is not in the checkpoint vocabulary') from None
    return idx, answers


def batches(pairs, meta, device, batch_size):
    """Yield (idx, answers) of equal-length prompts, at most batch_size rows each."""
    for _, group in sorted(length_groups(pairs).items()):
        for i in range(0, len(group), batch_size):
            yield encode_pairs(group[i:i + batch_size], meta, device)


def correct_at_depth(model, idx, answers, r, generator):
    """How many rows answer right after r loop iterations (argmax at the last position == answer)."""
    logits, _ = model(idx, num_steps=r, generator=generator)
    return (logits[:, -1].argmax(-1) == answers).sum().item()


def correct_adaptive(model, idx, answers, max_steps, exit_threshold, exit_rule):
    """(rows right, summed iterations at the last position) when every prompt position stops by the exit rule."""
    logits, _, d = model.adaptive_forward(idx, exit_threshold=exit_threshold, num_steps=max_steps, exit_rule=exit_rule)
    return (logits[:, -1].argmax(-1) == answers).sum().item(), d[:, -1].sum().item()


@torch.no_grad()
def accuracy_by_hops(model, test, meta, depths=(1, 2, 4, 8, 16, 32), exit_threshold=5e-4, exit_rule='kl',
                     device='cpu', batch_size=250, seed=1337, adaptive=True):
    """{hops: {'r=1': acc, ..., 'adaptive': acc, 'adaptive_iters': mean iterations}} with accuracies in [0, 1].
    One batched forward per (hops, r, prompt length). Plain models get r = 1 only and no adaptive exit."""
    model.eval()
    plain = is_plain(model.config)
    depths = (1,) if plain else tuple(depths)
    results = {}
    for hops, pairs in sorted(test.items()):
        row, n = defaultdict(float), len(pairs)
        for idx, answers in batches(pairs, meta, device, batch_size):
            for r in depths:
                gen = torch.Generator(device).manual_seed(seed)  # the same noise state s_0 at every r
                row[f'r={r}'] += correct_at_depth(model, idx, answers, r, gen) / n
            if adaptive and not plain:
                with torch.random.fork_rng(devices=[]):  # adaptive_forward draws s_0 from the global generator
                    torch.manual_seed(seed)
                    right, iters = correct_adaptive(model, idx, answers, max(depths), exit_threshold, exit_rule)
                row['adaptive'] += right / n
                row['adaptive_iters'] += iters / n
        results[hops] = dict(row)
    return results

# -----------------------------------------------------------------------------
# the command line: load, evaluate, print a table, write JSON


def load_checkpoint(path, device):
    """(model, train config dict + the checkpoint's iter_num) from a train.py checkpoint."""
    if not os.path.isfile(path):
        raise ValueError(f'--ckpt={path!r} is not a file; train first, e.g. python train.py config/reasoning_looped.py')
    ck = torch.load(path, map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**ck['model_args']))
    model.load_state_dict(ck['model'])
    return model.to(device), dict(ck.get('config', {}), iter_num=ck.get('iter_num'))


def load_test(train_cfg, data_dir):
    """(test {hops: [(prompt, answer)]}, meta) of the dataset the checkpoint was trained on."""
    if train_cfg.get('dataset') != 'reasoning':
        raise ValueError(f"the checkpoint was trained on dataset {train_cfg.get('dataset')!r}, not 'reasoning'")
    folder = os.path.join(data_dir or train_cfg.get('data_dir') or os.path.join(REPO_DIR, 'data'), 'reasoning')
    if not os.path.isfile(os.path.join(folder, 'test.pkl')):
        raise ValueError(f'{folder}/test.pkl is missing; run: python prepare.py reasoning (with the same settings)')
    with open(os.path.join(folder, 'test.pkl'), 'rb') as f:
        test = pickle.load(f)
    with open(os.path.join(folder, 'meta.pkl'), 'rb') as f:
        return test, pickle.load(f)


def parse_depths(text):
    try:
        ds = [int(x) for x in text.split(',')]
    except ValueError:
        ds = []
    if not ds or min(ds) < 1:
        raise ValueError(f'--depths={text!r} must be comma-separated integers >= 1, e.g. 1,2,4,8,16,32')
    return ds


def format_table(results, train_hops):
    """Rows: hops (* = harder than any training problem); columns: r = ..., then adaptive (acc @ iterations)."""
    cols = [k for k in next(iter(results.values())) if k.startswith('r=')]
    adaptive = 'adaptive' in next(iter(results.values()))
    head = '| hops | ' + ' | '.join(cols) + (' | adaptive (mean iters) |' if adaptive else ' |')
    lines = [head, '|' + '---|' * (len(cols) + 1 + adaptive)]
    for hops, row in results.items():
        cells = [f'{row[c]:.3f}' for c in cols]
        if adaptive:
            cells.append(f"{row['adaptive']:.3f} ({row['adaptive_iters']:.1f})")
        lines.append(f"| {hops}{'' if hops in train_hops else '*'} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(cfg):
    model, train_cfg = load_checkpoint(cfg['ckpt'], cfg['device'])
    test, meta = load_test(train_cfg, cfg['data_dir'])
    if cfg['n_test'] > 0:
        test = {h: pairs[:cfg['n_test']] for h, pairs in test.items()}
    t0 = time.time()
    results = accuracy_by_hops(model, test, meta, parse_depths(cfg['depths']), cfg['exit_threshold'], cfg['exit_rule'],
                               cfg['device'], cfg['batch_size'], cfg['seed'])
    wall = time.time() - t0
    mc = model.config
    print(f"{cfg['ckpt']}: {mc.n_prelude}+{mc.n_loop}x r+{mc.n_coda} layers, mean depth {mc.mean_depth}, "
          f"{model.get_num_params() / 1e6:.3f}M params, trained {train_cfg.get('iter_num')} steps; "
          f"{len(next(iter(test.values())))} prompts per hop count; * = harder than training; eval {wall:.1f} s")
    print(format_table(results, set(meta.get('train_hops', []))))
    path = cfg['json_out'] or os.path.join(os.path.dirname(os.path.abspath(cfg['ckpt'])), 'reasoning.json')
    record = dict(ckpt=cfg['ckpt'], model_args=dict(vars(mc)), eval=cfg, results={str(h): v for h, v in results.items()},
                  train_hops=meta.get('train_hops'), eval_wall_s=round(wall, 1), torch=torch.__version__,
                  machine=f'{platform.machine()} {os.cpu_count()} cpus', date=datetime.date.today().isoformat())
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(path + '.tmp', path)
    print(f'wrote {path}')


def configure(argv):
    """Defaults above, overridden by --key=value (converted to the default's type)."""
    cfg = {k: v for k, v in globals().items() if k in DEFAULT_KEYS}
    for arg in argv:
        key, eq, raw = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq or key not in cfg:
            raise ValueError(f'unknown argument {arg!r}; allowed: ' + ', '.join(f'--{k}=' for k in DEFAULT_KEYS))
        try:
            cfg[key] = type(cfg[key])(raw)
        except ValueError:
            raise ValueError(f'--{key}={raw!r} must be {type(cfg[key]).__name__}') from None
    if not cfg['ckpt']:
        raise ValueError('--ckpt=PATH is required (a ckpt.pt trained on the reasoning dataset)')
    if cfg['exit_rule'] not in EXIT_RULES:
        raise ValueError(f"--exit_rule={cfg['exit_rule']!r} is not allowed: expected one of {', '.join(EXIT_RULES)}")
    if cfg['batch_size'] < 1 or cfg['n_test'] < 0:
        raise ValueError('--batch_size must be >= 1 and --n_test >= 0')
    return cfg


DEFAULT_KEYS = ('ckpt', 'depths', 'exit_threshold', 'exit_rule', 'batch_size', 'n_test', 'data_dir', 'json_out',
                'device', 'seed')

if __name__ == '__main__':
    try:
        main(configure(sys.argv[1:]))
    except ValueError as e:  # our own checks and the model's (bad exit_rule, too long prompt): one line
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
