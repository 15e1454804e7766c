"""ETD (Koishekenov et al., arXiv 2510.07358; METHOD.md §4) as a converter: a pretrained plain GPT becomes prelude ->
loop x r -> coda (ETD's encoder / thinking block / decoder), cut at the knees of its angular-distance curve, every
weight kept and none added. It writes an ordinary checkpoint, exactly the base at r = 1, for train.py to mid-train.
  python etd.py --init_from=out-etd-base --out_dir=out-etd        # curve, knees, out-etd/ckpt.pt for train.py
  python etd.py --init_from=gpt2 --dataset=openwebtext --split=1,10,1 --out_dir=out-gpt2  # pip install transformers
  python etd.py --init_from=out-etd-base --after=out-etd-mid --eval_depths=1,2,4,8        # val loss before / after
"""
import dataclasses
import json
import math
import os
import sys

import torch

import prepare
import train
from configurator import checked, configure
from model import GPT, check, plain_config
from sample import depth_sweep, load_checkpoint

GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
STAGES = ('prelude', 'loop', 'coda')
# GPT-2's Conv1D stores its weight as (in, out), nn.Linear as (out, in); the square attention projection too (§4)
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
PLAIN = dict(inject='none', init_state='embed', norm_state=False, max_depth=1, router=False)  # an ordinary GPT (§1)
SETTABLE = train.MIDTRAIN  # the depth settings a conversion may set; every other field is the base's


# -- 1. where the prelude ends and the coda starts: angular distance between layers and its knees (§4, steps 1-3) ------
@torch.no_grad()
def hidden_states_per_layer(model, idx):
    """The residual stream of a base (its blocks all in the loop) before and after every block: (L + 1, B, T, C)."""
    states = [model.prelude(idx)]
    for block in model.transformer.loop:
        states.append(block(states[-1]))
    return torch.stack(states)


def angular_distances(hidden_states, last_token=True):
    """d(l, l+1) = arccos(cos(h_l, h_{l+1})) / pi per block, over last tokens (ETD) or all: (L+1, B, T, C) -> (L,)"""
    h = hidden_states[:, :, -1:] if last_token else hidden_states
    cos = torch.cosine_similarity(h[:-1].double(), h[1:].double(), dim=-1)  # (L, B, T'); float64: arccos is steep at 1
    return (torch.arccos(cos.clamp(-1, 1)) / math.pi).flatten(1).mean(1)


def layer_curve(model, batches, last_token=True):
    """The angular-distance curve of a plain GPT, averaged over a list of token batches (B, T): a list of L floats."""
    model.eval().to(batches[0].device)
    curves = [angular_distances(hidden_states_per_layer(model, idx), last_token) * len(idx) for idx in batches]
    return (torch.stack(curves).sum(0) / sum(len(idx) for idx in batches)).tolist()


def find_knee(curve):
    """Kneedle (Satopaa et al. 2011), axes scaled to [0, 1]: where the drop flattens, farthest below the chord."""
    y = torch.tensor(curve, dtype=torch.float64)
    x = torch.linspace(0, 1, len(y), dtype=torch.float64)
    y = (y - y.min()) / (y.max() - y.min()) if y.max() > y.min() else torch.zeros_like(y)
    return int((1 - x - y).argmax())  # 1 - x - y is proportional to the distance below the chord x + y = 1


def choose_split(curve, n_layer):
    """ETD's split (§4): the knee starts the loop, the reversed curve's knee ends it -> (n_prelude, n_loop, n_coda)."""
    first, last = find_knee(curve), n_layer - 1 - find_knee(curve[::-1])
    # first <= last (n_loop >= 1): the knees maximise -i/n - y_i and i/n - y_i (n = L - 1); were first > last, adding
    # the two "at least as good as the other index" inequalities would give 0 >= 2 (first - last) / n.
    return first, last - first + 1, n_layer - 1 - last


def parse_split(split, n_layer):
    """'a,b,c' (or a tuple) -> (n_prelude, n_loop, n_coda) adding up to the base's n_layer, n_loop >= 1."""
    try:
        parts = tuple(int(n) for n in (split.split(',') if isinstance(split, str) else split))
    except (TypeError, ValueError):  # not numbers, or not a sequence
        parts = ()
    if not (len(parts) == 3 and min(parts) >= 0 and parts[1] >= 1 and sum(parts) == n_layer):
        raise ValueError(f"split={split!r} is not allowed: expected 'auto' or 'n_prelude,n_loop,n_coda' adding up to "
                         f"the base model's {n_layer} layers, with n_loop >= 1")
    return parts


# -- 2. the base, a pretrained plain GPT with its L blocks in one loop stage (r = 1), regrouped (§4, step 4) -----------
def regroup(config, state_dict, old_split):
    """A GPT of config's split with state_dict's blocks, filed under old_split, in layer order (a router is new)."""
    names = lambda split: [f'transformer.{stage}.{j}' for stage, n in zip(STAGES, split) for j in range(n)]
    mapping = dict(zip(names(old_split), names((config.n_prelude, config.n_loop, config.n_coda))))
    head = lambda key: '.'.join(key.split('.')[:3])  # 'transformer.loop.3'
    state_dict = {mapping[head(k)] + k[len(head(k)):] if head(k) in mapping else k: v for k, v in state_dict.items()}
    model = GPT(config)
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith('router.')}  # ETD's halting router, if asked
    try:
        model.load_state_dict({**fresh, **state_dict})
    except RuntimeError as e:  # missing or unexpected keys, or a shape mismatch
        raise ValueError(f"weights do not fit a {config.n_layer}-layer GPT: {' '.join(str(e).split())[:200]}") from None
    return model.eval()


def load_base(source):
    """init_from -> the base: a GPT-2 name or transformers directory, else a plain nanoloop checkpoint (file or dir)."""
    if source in GPT2_NAMES or os.path.isfile(os.path.join(source, 'config.json')):
        return load_gpt2(source)
    model, _ = load_checkpoint(source)  # the one loader: a bad file is one line naming it
    c = model.config
    check(vars(c), {key: (repr(want), lambda v, want=want: v == want) for key, want in PLAIN.items()},
          f"{source!r} is not a plain GPT (trained at r = 1, e.g. by config/etd_base_shakespeare_char.py): ")
    plain = dataclasses.replace(c, n_prelude=0, n_loop=c.n_layer, n_coda=0)
    return regroup(plain, model.state_dict(), (c.n_prelude, c.n_loop, c.n_coda))


def load_gpt2(source):
    """GPT-2 as the base, through the optional transformers (HF_HUB_OFFLINE=1: from its cache only)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ValueError(f"init_from={source!r} needs transformers (optional): pip install transformers") from None
    try:
        hf = GPT2LMHeadModel.from_pretrained(source).float()
    except (OSError, ValueError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load GPT-2 weights {source!r}: {why} (offline? use a save_pretrained dir)") from None
    c = hf.config  # our blocks compute GPT-2 exactly only with tanh GELU, LayerNorm eps 1e-5, a 4x MLP, the tied head
    required = dict(activation_function=('gelu_new', 'gelu_pytorch_tanh'), layer_norm_epsilon=(1e-5,),
                    n_inner=(None, 4 * c.n_embd), scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,),
                    add_cross_attention=(False,), tie_word_embeddings=(True,))
    rules = {key: (f'one of {allowed}', lambda v, allowed=allowed: v in allowed) for key, allowed in required.items()}
    check({key: getattr(c, key, allowed[0]) for key, allowed in required.items()}, rules, 'GPT-2 config ')
    state_dict = {key.replace('.h.', '.loop.'): value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
                  for key, value in hf.state_dict().items()
                  if not key.endswith(('.attn.bias', '.attn.masked_bias'))}  # old transformers' causal-mask buffers
    config = plain_config(c.n_layer, block_size=c.n_positions, vocab_size=c.vocab_size, n_embd=c.n_embd,
                          n_head=c.n_head, bias=True, norm='pre', pos='learned')  # GPT-2's blocks and positions
    return regroup(config, state_dict, (0, c.n_layer, 0))


def convert(base, split='auto', batches=None, last_token=True, source='', **settings):
    """ETD on base = load_base(source): curve on `batches` (LongTensors (B, T)), split, regroup -> (model, info)."""
    n_layer = base.config.n_layer
    if unknown := sorted(set(settings) - set(SETTABLE)):
        raise ValueError(f"{unknown[0]}={settings[unknown[0]]!r} cannot be set: the base fixes it; allowed: {SETTABLE}")
    chosen = None if split == 'auto' else parse_split(split, n_layer)  # a bad split fails before the curve
    if chosen is None and not batches:
        raise ValueError("split='auto' needs sample text (batches=[LongTensor (B, T), ...]), else give 'a,b,c'")
    curve = layer_curve(base, batches, last_token) if batches else None
    chosen = chosen or choose_split(curve, n_layer)
    settings.setdefault('mean_depth', 1)
    settings.setdefault('max_depth', settings['mean_depth'])
    settings.setdefault('backprop_depth', settings['max_depth'])  # a truncated loop leaves the prelude no gradient (§3)
    config = dataclasses.replace(base.config, n_prelude=chosen[0], n_loop=chosen[1], n_coda=chosen[2], **settings)
    info = dict(source=str(source), requested=str(split), split=list(chosen), curve=curve, last_token=last_token,
                n_sequences=sum(len(b) for b in batches) if batches else 0)
    return regroup(config, base.state_dict(), (0, n_layer, 0)), info


# -- 3. the command line: sample text, the chart, the checkpoint, and val loss per depth -------------------------------
DEFAULTS = dict(init_from='',          # a GPT-2 name, a transformers directory, or a plain nanoloop ckpt.pt / out_dir
                split='auto',          # 'auto' (knees of the curve) or 'n_prelude,n_loop,n_coda'
                out_dir='',            # write ckpt.pt + etd_split.json here ('' = only print the curve and split)
                overwrite=False,       # True: replace what a non-empty out_dir holds
                dataset='shakespeare_char',  # <data_dir>/<dataset>/ supplies the sample text (train.bin) and val.bin
                data_dir='',           # folder holding <dataset>/ ('' = data/ beside this file, as prepare.py does)
                etd_sequences=128,     # sequences the curve is averaged over (ETD: 10k)
                last_token=True,       # True: the last token of each sequence (ETD, Gromov et al.); False: every token
                eval_depths='',        # e.g. '1,2,4,8': val loss of the base and of the converted model at each r
                after='',              # mid-trained checkpoints (out_dirs or files, comma separated) for that table
                eval_sequences=512,    # val windows per evaluation
                seed=1337)             # of the sampled windows
CHECKS = {'init_from': (f"one of {GPT2_NAMES}, a transformers directory or a nanoloop ckpt.pt (or its out_dir)",
                        lambda v: v in GPT2_NAMES or os.path.exists(v)),
          'out_dir': ("'' or a folder, not a file", lambda v: not os.path.isfile(v)),
          **dict.fromkeys(('etd_sequences', 'eval_sequences'), ('an integer >= 1', lambda v: v >= 1)),
          'eval_depths': ("depths >= 1, comma separated, e.g. 1,2,4,8",
                          lambda v: not v or all(d.strip().isdecimal() and int(d) >= 1 for d in v.split(',')))}


def text_batches(path, split, n, block_size, seed, batch_size=16):
    """n random windows (x, y) of path/<split>.bin, batch_size at a time (prepare.get_batch, seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [prepare.get_batch(path, split, min(batch_size, n - i), block_size, g) for i in range(0, n, batch_size)]


def curve_chart(info, width=40):
    """The curve as one bar per block, each marked with the stage it went to: the picture of ETD's §4."""
    lines = [f"ETD split of {info['source']} (split={info['requested']}): "
             + ' / '.join(f"{n} {stage}" for n, stage in zip(info['split'], STAGES))]
    if info['curve'] is not None:
        top, stages = max(info['curve']) or 1.0, [s for n, s in zip(info['split'], STAGES) for _ in range(n)]
        lines.append(f"angular distance d(l, l+1) per block, {'last' if info['last_token'] else 'all'} tokens of "
                     f"{info['n_sequences']} sequences:")
        lines += [f"  block {i:>2}  {d:.4f}  {'#' * round(width * d / top):<{width}}  {stage}"
                  for i, (d, stage) in enumerate(zip(info['curve'], stages))]
    return '\n'.join(lines)


def depth_table(models, windows, depths):
    """models: [(name, model, depths to run)] -> a text table of val loss (sample.depth_sweep), one column per r."""
    rows = [(name, {row['r']: row['value'] for row in depth_sweep(m.eval(), windows, rs)}) for name, m, rs in models]
    width = max(len(name) for name, _ in rows)
    return '\n'.join([f"{'model':<{width}}  " + '  '.join(f"{'r=' + str(r):>7}" for r in depths)] + [
        f"{name:<{width}}  " + '  '.join(f"{losses[r]:7.4f}" if r in losses else f"{'-':>7}" for r in depths)
        for name, losses in rows])


def check_settings(cfg):
    """Every bad setting fails before the (slow) curve; out_dir is made -> [(path, model) of every --after]."""
    check(cfg, CHECKS)
    if cfg['after'] and not cfg['eval_depths']:
        raise ValueError(f"after={cfg['after']!r} needs --eval_depths, e.g. 1,2,4,8: the depths its loss is taken at")
    try:  # the loader's message names the file
        afters = [(path, load_checkpoint(path)[0]) for path in filter(None, cfg['after'].split(','))]
    except ValueError as err:
        raise ValueError(f"after={cfg['after']!r}: {err}") from None
    out = cfg['out_dir']
    if out and os.path.isdir(out) and os.listdir(out) and not cfg['overwrite']:  # never replace a run's files silently
        raise ValueError(f"out_dir={out!r} is not empty: choose another --out_dir, or --overwrite=True to replace it")
    os.makedirs(out or '.', exist_ok=True)  # '.': no out_dir, nothing to make
    return afters


def save(out_dir, model, cfg, info):
    """out_dir/ckpt.pt in train.py's format (iter_num 0, no optimizer) and etd_split.json, each written atomically."""
    ckpt = dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config), config=cfg, iter_num=0)
    path = os.path.join(out_dir, 'ckpt.pt')
    prepare.save_atomic(path, lambda f: torch.save(ckpt, f))
    prepare.save_atomic(os.path.join(out_dir, 'etd_split.json'), lambda f: f.write(json.dumps(info, indent=1).encode()))
    print(f"wrote {path} (r = 1: the base model) and etd_split.json; mid-train it: train.py --init_from={path}")


def run(**options):
    """etd.py's command line as a function: options are DEFAULTS keys -> (model, info); with out_dir, save()d."""
    cfg = dict(DEFAULTS, **{key: checked(DEFAULTS, key, value, 'etd.run') for key, value in options.items()})
    afters = check_settings(cfg)
    data = prepare.dataset_dir(cfg['dataset'], cfg['data_dir'])
    meta, base = prepare.read_meta(data), load_base(cfg['init_from'])
    V, T = base.config.vocab_size, base.config.block_size
    if meta.get('vocab_size', 0) > V or ('chars' in meta and meta['vocab_size'] != V):
        raise ValueError(f"dataset={cfg['dataset']!r} has {meta['vocab_size']} tokens, the model {V}: use a dataset "
                         f"tokenized like init_from={cfg['init_from']!r}")
    batches = text_batches(data, 'train', cfg['etd_sequences'], T, cfg['seed'])
    model, info = convert(base, cfg['split'], [x for x, _ in batches], cfg['last_token'], cfg['init_from'])
    print(curve_chart(info))
    if cfg['out_dir']:
        save(cfg['out_dir'], model, cfg, info)
    if cfg['eval_depths']:  # val loss of the base (r = 1), of the converted model and of every --after at each r
        depths = [int(d) for d in cfg['eval_depths'].split(',')]
        split = lambda m: '/'.join(str(n) for n in (m.config.n_prelude, m.config.n_loop, m.config.n_coda))
        models = [(f"base {cfg['init_from']} ({base.config.n_layer} layers)", base, [1])] + [
            (f"{name} ({split(m)})", m, depths) for name, m in [('ETD before mid-training', model)] + afters]
        print(depth_table(models, text_batches(data, 'val', cfg['eval_sequences'], T, cfg['seed']), depths))
    return model, info


if __name__ == '__main__':
    try:
        run(**configure(DEFAULTS, sys.argv[1:]))
    except (ValueError, OSError) as err:  # ours and the loader's are one line already; OSError: e.g. a full disk
        sys.exit(f"error: {err}")  # to stderr, exit status 1
