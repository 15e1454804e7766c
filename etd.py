"""
ETD (Koishekenov et al., arXiv 2510.07358; METHOD.md §4) as a converter: a pretrained plain GPT becomes prelude ->
loop x r -> coda (ETD's encoder / thinking block / decoder), cut at the knees of its angular-distance curve, every
weight kept and none added. It writes an ordinary checkpoint, exactly the base at r = 1, for train.py to mid-train.

  python etd.py --init_from=out-etd-base --out_dir=out-etd        # curve, split at its knees, out-etd/ckpt.pt
  python train.py config/etd_midtrain_shakespeare_char.py          # mid-train it: init_from='out-etd/ckpt.pt'
  python etd.py --init_from=gpt2 --dataset=openwebtext --split=1,10,1 --out_dir=out-gpt2  # pip install transformers
  python etd.py --init_from=out-etd-base --after=out-etd-mid --eval_depths=1,2,4,8        # val loss before / after
"""

import dataclasses
import json
import math
import os
import sys

import torch
from torch.nn import functional as F

import prepare
from configurator import checked, configure
from model import GPT, plain_config
from sample import load_checkpoint

GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
STAGES = ('prelude', 'loop', 'coda')
# GPT-2's Conv1D stores its weight as (in, out), nn.Linear as (out, in); the square attention projection too (§4)
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# a plain nanoloop checkpoint was trained at r = 1 without injection or state norm: an ordinary GPT (§1)
PLAIN = dict(inject='none', init_state='embed', norm_state=False, max_depth=1, router=False)
# the GPTConfig fields a conversion may set; everything else (sizes, blocks, positions) comes from the base model
SETTABLE = ('mean_depth', 'max_depth', 'backprop_depth', 'dropout', 'router', 'router_cost')


# 1. Where the prelude ends and the coda starts: angular distance between layers, and its knees (§4, steps 1-3)
@torch.no_grad()
def hidden_states_per_layer(model, idx):
    """The residual stream of a base (its blocks all in the loop) before and after every block: (L + 1, B, T, C)."""
    states = [model.prelude(idx)]
    for block in model.transformer.loop:
        states.append(block(states[-1]))
    return torch.stack(states)


def angular_distances(hidden_states, last_token=True):
    """d(l, l+1) = arccos(cos(h_l, h_{l+1})) / pi per block (0: direction kept, 1: reversed), averaged over the last
    token of each sequence as ETD does (after Gromov et al. 2024), or over every token. (L + 1, B, T, C) -> (L,)"""
    h = hidden_states[:, :, -1:] if last_token else hidden_states
    cos = F.cosine_similarity(h[:-1].double(), h[1:].double(), dim=-1)  # (L, B, T'); float64: arccos is steep near 1
    return (torch.arccos(cos.clamp(-1, 1)) / math.pi).flatten(1).mean(1)


def layer_curve(model, batches, last_token=True):
    """The angular-distance curve of a plain GPT, averaged over a list of token batches (B, T): a list of L floats."""
    model.eval().to(batches[0].device)
    curves = [angular_distances(hidden_states_per_layer(model, idx), last_token) * len(idx) for idx in batches]
    return (torch.stack(curves).sum(0) / sum(len(idx) for idx in batches)).tolist()


def find_knee(curve):
    """Kneedle (Satopaa et al. 2011) for a falling curve, axes scaled to [0, 1]: the index farthest below the chord from
    (0, 1) to (1, 0), where the steep drop turns flat (0 for a flat curve). A late rise lies above the chord."""
    y = torch.tensor(curve, dtype=torch.float64)
    x = torch.linspace(0, 1, len(y), dtype=torch.float64)
    y = (y - y.min()) / (y.max() - y.min()) if y.max() > y.min() else torch.zeros_like(y)
    return int((1 - x - y).argmax())  # 1 - x - y is proportional to the distance below the chord x + y = 1


def choose_split(curve, n_layer):
    """ETD's split (§4): the knee of the curve is the loop's first block, the knee of the reversed curve its last.
    -> (n_prelude, n_loop, n_coda), always with n_loop >= 1."""
    if len(curve) != n_layer:
        raise ValueError(f"the curve has {len(curve)} points, expected one per layer ({n_layer})")
    first, last = find_knee(curve), n_layer - 1 - find_knee(curve[::-1])
    # first <= last always (n_loop >= 1): with n = L - 1, the two knees maximise -i/n - y_i and i/n - y_i; if first >
    # last, adding the two "at least as good as the other index" inequalities would give 0 >= 2 (first - last) / n.
    return first, last - first + 1, n_layer - 1 - last


def int_list(key, text, ok, allowed):
    """'1,2,4' (or a sequence) -> [1, 2, 4] if ok(it), else a ValueError of one line naming key, text and allowed."""
    try:
        values = [int(v) for v in (text.split(',') if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        values = []
    if not values or not ok(values):
        raise ValueError(f"{key}={text!r} is not allowed: expected {allowed}")
    return values


def parse_split(split, n_layer):
    """'a,b,c' (or a tuple) -> (n_prelude, n_loop, n_coda) adding up to the base's n_layer, n_loop >= 1."""
    ok = lambda p: len(p) == 3 and min(p) >= 0 and p[1] >= 1 and sum(p) == n_layer
    return tuple(int_list('split', split, ok, f"'auto' or 'n_prelude,n_loop,n_coda' adding up to the base model's "
                                              f"{n_layer} layers, with n_loop >= 1"))


# 2. The base: a pretrained plain GPT with its L blocks in order in one loop stage (n_prelude = n_coda = 0, r = 1)
def regroup(config, state_dict, old_split):
    """A GPT with config's split holding the blocks of state_dict, filed under old_split, in layer order. Only a
    halting router (config.router, ETD's learned exit) is new."""
    names = lambda split: [f'transformer.{stage}.{j}' for stage, n in zip(STAGES, split) for j in range(n)]
    mapping = dict(zip(names(old_split), names((config.n_prelude, config.n_loop, config.n_coda))))
    head = lambda key: '.'.join(key.split('.')[:3])  # 'transformer.loop.3'
    state_dict = {mapping[head(k)] + k[len(head(k)):] if head(k) in mapping else k: v for k, v in state_dict.items()}
    model = GPT(config)
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith('router.')}  # the only new weights
    try:
        model.load_state_dict({**fresh, **state_dict})
    except RuntimeError as err:  # missing or unexpected keys, or a shape mismatch
        raise ValueError(f"the pretrained weights do not fit a {config.n_layer}-layer GPT: "
                         f"{' '.join(str(err).split())[:300]}") from None
    return model.eval()


def load_base(source):
    """init_from -> the base: a GPT-2 name or transformers directory, else a plain nanoloop checkpoint (file or dir)."""
    if source in GPT2_NAMES or os.path.isfile(os.path.join(source, 'config.json')):
        return load_gpt2(source)
    if not os.path.exists(source):
        raise ValueError(f"init_from={source!r} is not allowed: expected one of {GPT2_NAMES}, a directory saved by "
                         f"transformers' save_pretrained, or a nanoloop checkpoint (ckpt.pt or the out_dir holding it)")
    model, _ = load_checkpoint(source)  # the one loader: a bad file is one line naming it
    c = model.config
    wrong = {key: getattr(c, key) for key, value in PLAIN.items() if getattr(c, key) != value}
    if wrong:
        raise ValueError(f"{source!r} is not a plain GPT ({wrong}): ETD converts a model trained at r = 1 with "
                         f"{PLAIN}, e.g. by config/etd_base_shakespeare_char.py")
    plain = dataclasses.replace(c, n_prelude=0, n_loop=c.n_layer, n_coda=0)
    return regroup(plain, model.state_dict(), (c.n_prelude, c.n_loop, c.n_coda))


def load_gpt2(source):
    """GPT-2 as the base, through the optional transformers (HF_HUB_OFFLINE or a directory: local files only). Our
    blocks compute it exactly only with tanh GELU, LayerNorm eps 1e-5, a 4x MLP and the tied head (§4)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ValueError(f"init_from={source!r} needs transformers (optional): pip install transformers") from None
    offline = os.path.isdir(source) or os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')
    try:
        hf = GPT2LMHeadModel.from_pretrained(source, local_files_only=offline).float()
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load GPT-2 weights {source!r}: {reason} (no network? use a directory saved with "
                         f"save_pretrained, or a machine that can download it once)") from None
    c = hf.config
    required = dict(activation_function=('gelu_new', 'gelu_pytorch_tanh'), layer_norm_epsilon=(1e-5,),
                    n_inner=(None, 4 * c.n_embd), scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,),
                    add_cross_attention=(False,), tie_word_embeddings=(True,))
    wrong = [key for key, allowed in required.items() if getattr(c, key, allowed[0]) not in allowed]
    if wrong:
        raise ValueError(f"GPT-2 config {wrong[0]}={getattr(c, wrong[0])!r} is not supported: nanoloop's blocks need "
                         f"one of {required[wrong[0]]}")
    state_dict = {key.replace('.h.', '.loop.'): value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
                  for key, value in hf.state_dict().items()
                  if not key.endswith(('.attn.bias', '.attn.masked_bias'))}  # old transformers' causal-mask buffers
    state_dict['lm_head.weight'] = state_dict['transformer.wte.weight']  # tied embeddings
    config = plain_config(c.n_layer, block_size=c.n_positions, vocab_size=c.vocab_size, n_embd=c.n_embd,
                          n_head=c.n_head, bias=True, norm='pre', pos='learned')  # GPT-2's blocks and positions
    return regroup(config, state_dict, (0, c.n_layer, 0))


# 3. The conversion: the same weights, regrouped (§4, step 4)
def convert(base, split='auto', batches=None, last_token=True, source='', **settings):
    """ETD (§4) on base = load_base(source): its curve on `batches` (LongTensors (B, T); needed for 'auto'), the split,
    the blocks regrouped into ETD's loop (inject none, s_0 = e: r = 1 is the base) -> (model, info as etd_split.json).
    settings: SETTABLE; backprop_depth = max_depth unless set: a truncated loop leaves the prelude no gradient (§3)."""
    n_layer, context = base.config.n_layer, base.config.block_size
    unknown = sorted(set(settings) - set(SETTABLE))
    if unknown:
        raise ValueError(f"{unknown[0]}={settings[unknown[0]]!r} cannot be set for an ETD conversion (the base model "
                         f"fixes it); allowed: {SETTABLE}")
    if batches and max(b.size(1) for b in batches) > context:
        raise ValueError(f"the sample text has sequences of {max(b.size(1) for b in batches)} tokens, more than the "
                         f"base model's block_size {context}")
    chosen = None if split == 'auto' else parse_split(split, n_layer)  # a bad split fails before the curve
    if chosen is None and not batches:
        raise ValueError("split='auto' needs sample text to measure the curve on (batches=[LongTensor (B, T), ...]); "
                         "else give a manual split 'n_prelude,n_loop,n_coda'")
    curve = layer_curve(base, batches, last_token) if batches else None
    chosen = chosen or choose_split(curve, n_layer)
    settings.setdefault('mean_depth', 1)
    settings.setdefault('max_depth', settings['mean_depth'])
    settings.setdefault('backprop_depth', settings['max_depth'])
    config = dataclasses.replace(base.config, n_prelude=chosen[0], n_loop=chosen[1], n_coda=chosen[2], **settings)
    info = dict(source=str(source), requested=str(split), split=list(chosen), curve=curve, last_token=last_token,
                n_sequences=sum(len(b) for b in batches) if batches else 0)
    return regroup(config, base.state_dict(), (0, n_layer, 0)), info


# 4. The command line: sample text, the chart, the checkpoint, and val loss per depth
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
        lines.append(f"angular distance d(l, l+1) per block, {'last token' if info['last_token'] else 'all tokens'} "
                     f"of {info['n_sequences']} sequences:")
        lines += [f"  block {i:>2}  {d:.4f}  {'#' * round(width * d / top):<{width}}  {stage}"
                  for i, (d, stage) in enumerate(zip(info['curve'], stages))]
    return '\n'.join(lines)


@torch.no_grad()
def depth_table(models, windows, depths):
    """models: [(name, model, depths to run)] -> a text table of val loss with one column per depth r."""
    rows = [(name, {r: sum(m.eval()(x, y, num_steps=r)[1].item() for x, y in windows) / len(windows) for r in rs})
            for name, m, rs in models]
    width = max(len(name) for name, _ in rows)
    return '\n'.join([f"{'model':<{width}}  " + '  '.join(f"{'r=' + str(r):>7}" for r in depths)] + [
        f"{name:<{width}}  " + '  '.join(f"{losses[r]:7.4f}" if r in losses else f"{'-':>7}" for r in depths)
        for name, losses in rows])


def check_settings(cfg):
    """Every bad setting fails before the (slow) curve; out_dir is made -> (depths, [(path, model) of --after])."""
    if not cfg['init_from']:
        raise ValueError("--init_from is required: a GPT-2 name, a transformers directory or a nanoloop checkpoint")
    for key in ('etd_sequences', 'eval_sequences'):
        if cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]} is not allowed: expected an integer >= 1")
    depths = int_list('eval_depths', cfg['eval_depths'], lambda d: min(d) >= 1, "depths >= 1, comma separated, e.g. "
                      "1,2,4,8") if cfg['eval_depths'] or cfg['after'] else []
    afters = []
    for path in filter(None, cfg['after'].split(',')):
        try:
            afters.append((path, load_checkpoint(path)[0]))
        except ValueError as err:
            raise ValueError(f"after={path!r}: {err}") from None
    out = cfg['out_dir']
    if out and os.path.isdir(out) and os.listdir(out) and not cfg['overwrite']:  # never replace a run's files silently
        raise ValueError(f"out_dir={out!r} is not empty: choose another --out_dir, or --overwrite=True to replace what "
                         f"it holds")
    try:
        if out:
            os.makedirs(out, exist_ok=True)
    except OSError as err:  # a file of that name, no permission, ...
        raise ValueError(f"out_dir={out!r} cannot be created: {err.strerror or err}") from None
    return depths, afters


def run(**options):
    """etd.py's command line as a function: options are DEFAULTS keys -> (model, info). With out_dir it writes
    out_dir/ckpt.pt in train.py's format (iter_num 0, no optimizer) and etd_split.json, each atomically."""
    cfg = dict(DEFAULTS, **{key: checked(DEFAULTS, key, value, 'etd.run') for key, value in options.items()})
    depths, afters = check_settings(cfg)
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
        ckpt = os.path.join(cfg['out_dir'], 'ckpt.pt')
        torch.save(dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config), config=cfg, iter_num=0),
                   ckpt + '.tmp')
        os.replace(ckpt + '.tmp', ckpt)
        with open(os.path.join(cfg['out_dir'], 'etd_split.json.tmp'), 'w') as f:
            json.dump(info, f, indent=1)
        os.replace(f.name, f.name[:-4])
        print(f"wrote {ckpt} (r = 1: the base model) and etd_split.json; mid-train it: train.py --init_from={ckpt}")
    if depths:  # val loss of the base (r = 1), of the converted model and of every --after checkpoint at each r
        split = lambda m: '/'.join(str(n) for n in (m.config.n_prelude, m.config.n_loop, m.config.n_coda))
        models = [(f"base {cfg['init_from']} ({base.config.n_layer} layers)", base, [1])] + [
            (f"{name} ({split(m)})", m, depths) for name, m in [('ETD before mid-training', model)] + afters]
        print(depth_table(models, text_batches(data, 'val', cfg['eval_sequences'], T, cfg['seed']), depths))
    return model, info


if __name__ == '__main__':
    try:
        run(**configure(DEFAULTS, sys.argv[1:]))
    except (ValueError, OSError) as err:  # ours and the loader's are one line already; OSError: e.g. a full disk
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
