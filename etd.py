"""
ETD: Encode, Think, Decode (Koishekenov et al., arXiv 2510.07358; METHOD.md §4). Turn a pretrained plain GPT into
nanoloop's prelude -> loop x r -> coda without adding a parameter:

    run the base on text, keep h_0..h_L  ->  d(l, l+1) = arccos(cos(h_l, h_{l+1})) / pi  ->  two knees
    ->  (n_prelude, n_loop, n_coda)  ->  block i of the base goes to the prelude, the loop or the coda

At r = 1 the converted model is the base model (same logits); mid-training (train.py --init_from=...) then teaches it
to iterate its middle.

  python etd.py --init_from=out-etd-base                     # the curve and the split 'auto' picks (shakespeare_char)
  python etd.py --init_from=gpt2 --dataset=openwebtext --etd_split=1,10,1   # GPT-2 needs `pip install transformers`
  python etd.py --init_from=out-etd-base --after=out-etd-mid --eval_depths=1,2,4,8   # val loss before / after

Importable: convert_pretrained (what GPT.from_pretrained calls), and every step on its own by name.
"""

import json
import math
import os
import pickle
import sys
from ast import literal_eval

import numpy as np
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig, plain_config

GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
STAGES = ('prelude', 'loop', 'coda')
SIZES = ('block_size', 'vocab_size', 'n_embd', 'n_head', 'bias')  # what the converted model takes from the base
# GPT-2's Conv1D stores its weight as (in, out), nn.Linear as (out, in); the square attention projection too (§4)
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# a plain nanoloop checkpoint was trained at r = 1 without injection or state norm: an ordinary GPT (§1)
PLAIN = dict(inject='none', init_state='embed', norm_state=False, max_depth=1, router=False)
# the GPTConfig fields a conversion may set (train.py passes them); everything else comes from the base model
SETTABLE = ('mean_depth', 'max_depth', 'backprop_depth', 'dropout', 'router', 'router_cost')

# ----------------------------------------------------------------------------------------------------------------------
# 1. Where the encoder ends and the decoder starts: angular distance between layers, and its knees (§4, steps 1-3)


def blocks_in_order(model):
    """The blocks in the order a token meets them at r = 1: prelude, loop (once), coda."""
    return [*model.transformer.prelude, *model.transformer.loop, *model.transformer.coda]


@torch.no_grad()
def hidden_states_per_layer(model, idx):
    """The residual stream of a plain GPT (r = 1) before and after every block: (L + 1, B, T, C); h_0 = embeddings."""
    positions = torch.arange(idx.size(1), device=idx.device)
    states = [model.transformer.wte(idx) + model.transformer.wpe(positions)]
    for block in blocks_in_order(model):
        states.append(block(states[-1]))
    return torch.stack(states)


def angular_distances(hidden_states, last_token=True):
    """d(l, l+1) = arccos(cos(h_l, h_{l+1})) / pi for each of the L blocks, averaged over tokens: 0 = the block kept the
    direction of the residual stream, 1 = it reversed it. ETD averages over the last token of each sequence (following
    Gromov et al. 2024); last_token=False averages over every position. (L + 1, B, T, C) -> (L,)"""
    h = hidden_states[:, :, -1:] if last_token else hidden_states
    cos = F.cosine_similarity(h[:-1].double(), h[1:].double(), dim=-1)  # (L, B, T'); float64: arccos is steep near 1
    return (torch.arccos(cos.clamp(-1, 1)) / math.pi).flatten(1).mean(1)


def layer_curve(model, batches, last_token=True):
    """The angular-distance curve of a plain GPT, averaged over a list of token batches (B, T): a list of L floats."""
    model.eval().to(batches[0].device)
    curves = [angular_distances(hidden_states_per_layer(model, idx), last_token) * len(idx) for idx in batches]
    return (torch.stack(curves).sum(0) / sum(len(idx) for idx in batches)).tolist()


def find_knee(curve):
    """Kneedle (Satopaa et al. 2011) for a falling curve: scale both axes to [0, 1] and take the point farthest below
    the chord from (0, 1) to (1, 0), where the steep drop turns flat. On ETD's U-shaped curve the late rise lies above
    that chord and cannot win. Returns an index into curve (0 for a flat curve)."""
    y = torch.tensor(curve, dtype=torch.float64)
    x = torch.linspace(0, 1, len(y), dtype=torch.float64)
    span = y.max() - y.min()
    y = (y - y.min()) / span if span > 0 else torch.zeros_like(y)
    return int((1 - x - y).argmax())  # 1 - x - y is proportional to the distance below the chord x + y = 1


def choose_split(curve, n_layer):
    """ETD's split (§4): the knee of the curve is the first block of the thinking part (the encoder is everything
    before it), the knee of the reversed curve is its last block (the decoder is everything after).
    -> (n_prelude, n_loop, n_coda), always with n_loop >= 1."""
    if len(curve) != n_layer:
        raise ValueError(f"the curve has {len(curve)} points, expected one per layer ({n_layer})")
    first, last = find_knee(curve), n_layer - 1 - find_knee(curve[::-1])
    # first <= last always (n_loop >= 1): with n = L - 1, the two knees maximise -i/n - y_i and i/n - y_i; if first >
    # last, adding the two "at least as good as the other index" inequalities would give 0 >= 2 (first - last) / n.
    return first, last - first + 1, n_layer - 1 - last


def parse_split(split, n_layer):
    """A manual split 'a,b,c' (or a tuple) -> (n_prelude, n_loop, n_coda); it must add up to the base's n_layer."""
    allowed = f"'auto' or 'n_prelude,n_loop,n_coda' adding up to the base model's {n_layer} layers, with n_loop >= 1"
    try:
        parts = tuple(int(p) for p in (split.split(',') if isinstance(split, str) else split))
    except (TypeError, ValueError):
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or parts[1] < 1:
        raise ValueError(f"etd_split={split!r} is not allowed: expected {allowed}")
    if sum(parts) != n_layer:
        raise ValueError(f"etd_split={split!r} adds up to {sum(parts)} layers, but the base model has {n_layer}: "
                         f"expected {allowed}")
    return parts


def resolve_split(split, curve, n_layer):
    """'auto' -> the knees of the curve; anything else is a manual split."""
    if split != 'auto':
        return parse_split(split, n_layer)
    if curve is None:
        raise ValueError("etd_split='auto' needs sample text to measure the curve on (batches=[LongTensor (B, T), "
                         "...]); else give a manual split 'n_prelude,n_loop,n_coda'")
    return choose_split(curve, n_layer)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Loading a pretrained plain GPT -> (model_args, state_dict), its blocks named transformer.h.<i> in layer order


def layer_names(n_layer):
    return [f'transformer.h.{i}' for i in range(n_layer)]


def stage_names(split):
    """The module of each layer of a split model: transformer.prelude.0, .., transformer.loop.0, .., .coda.0, .."""
    return [f'transformer.{stage}.{j}' for stage, n in zip(STAGES, split) for j in range(n)]


def rename_layers(state_dict, old, new):
    """Move block old[i] to new[i] (key prefixes 'transformer.<stage>.<j>'); embeddings, ln_f and head stay."""
    mapping = dict(zip(old, new))

    def rename(key):
        head = '.'.join(key.split('.')[:3])
        return mapping[head] + key[len(head):] if head in mapping else key
    return {rename(key): value for key, value in state_dict.items()}


def load_base(source):
    """Dispatch on init_from: a GPT-2 name or transformers directory, else a nanoloop checkpoint (file or out_dir)."""
    if source in GPT2_NAMES or os.path.isfile(os.path.join(source, 'config.json')):
        return load_gpt2(source)
    return load_plain_checkpoint(source)


def gpt2_from_transformers(source):
    """GPT2LMHeadModel through the optional transformers package, with one-line errors when it is missing or offline.
    With HF_HUB_OFFLINE set (or a local directory) it reads local files only, so a missing download fails at once."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ValueError(f"init_from={source!r} needs the optional package transformers: "
                         f"pip install transformers") from None
    offline = os.path.isdir(source) or os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')
    try:
        return GPT2LMHeadModel.from_pretrained(source, local_files_only=offline).float()
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load GPT-2 weights {source!r}: {reason} (no network? use a directory saved with "
                         f"save_pretrained, or a machine that can download it once)") from None


def check_gpt2_config(c):
    """The GPT-2 variants nanoloop's blocks compute exactly (§4: tanh GELU, LayerNorm eps 1e-5, MLP 4x, tied head)."""
    required = dict(activation_function=('gelu_new', 'gelu_pytorch_tanh'), layer_norm_epsilon=(1e-5,),
                    n_inner=(None, 4 * c.n_embd), scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,),
                    add_cross_attention=(False,), tie_word_embeddings=(True,))
    for key, allowed in required.items():
        if getattr(c, key, allowed[0]) not in allowed:
            raise ValueError(f"GPT-2 config {key}={getattr(c, key)!r} is not supported: nanoloop's blocks need "
                             f"one of {allowed}")


def load_gpt2(source):
    """GPT-2 weights in nanoloop's names: transformers already uses transformer.h.<i>; Conv1D weights get transposed."""
    hf = gpt2_from_transformers(source)
    c = hf.config
    check_gpt2_config(c)
    model_args = dict(n_layer=c.n_layer, block_size=c.n_positions, vocab_size=c.vocab_size, n_embd=c.n_embd,
                      n_head=c.n_head, bias=True)
    state_dict = {}
    for key, value in hf.state_dict().items():
        if key.endswith(('.attn.bias', '.attn.masked_bias')):  # causal-mask buffers of older transformers, not weights
            continue
        state_dict[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
    return model_args, state_dict


def read_checkpoint(source):
    """train.py's checkpoint dict from a ckpt.pt file or the out_dir holding one, with model_args as a GPTConfig."""
    path = os.path.join(source, 'ckpt.pt') if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise ValueError(f"init_from={source!r} is not allowed: expected one of {GPT2_NAMES}, a directory saved by "
                         f"transformers' save_pretrained, or a nanoloop checkpoint (a .pt file, or an out_dir with "
                         f"ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file; all mean "not a checkpoint"
        raise ValueError(f"cannot read checkpoint {path!r}: {(str(err).strip().splitlines() or ['?'])[0]}") from None
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= ckpt.keys():
        raise ValueError(f"{path!r} is not a nanoloop checkpoint: expected a dict with 'model' and 'model_args'")
    try:
        ckpt['model_args'] = GPTConfig(**ckpt['model_args'])  # checks itself; unknown fields are a TypeError
    except TypeError as err:
        raise ValueError(f"{path!r} was written by another version of model.py: {err}") from None
    return ckpt


def load_plain_checkpoint(source):
    """A plain nanoloop checkpoint (trained at r = 1: an ordinary GPT), its blocks renamed to layer order."""
    ckpt = read_checkpoint(source)
    config = ckpt['model_args']
    wrong = {key: getattr(config, key) for key, value in PLAIN.items() if getattr(config, key, value) != value}
    if wrong:
        raise ValueError(f"{source!r} is not a plain GPT ({wrong}): ETD converts a model trained at r = 1 with "
                         f"{PLAIN}, e.g. by config/etd_base_shakespeare_char.py")
    split = (config.n_prelude, config.n_loop, config.n_coda)
    model_args = dict(n_layer=config.n_layer, **{key: getattr(config, key) for key in SIZES})
    return model_args, rename_layers(ckpt['model'], stage_names(split), layer_names(config.n_layer))


def load_checkpoint(source):
    """Any nanoloop checkpoint (e.g. a mid-trained ETD model) -> GPT."""
    ckpt = read_checkpoint(source)
    model = GPT(ckpt['model_args'])
    model.load_state_dict(ckpt['model'])
    return model


# ----------------------------------------------------------------------------------------------------------------------
# 3. The conversion: the same weights, regrouped (§4, step 4)


def etd_config(model_args, split, **overrides):
    """The converted model's GPTConfig: the base's sizes and ETD's loop (inject none, s_0 = e, no state norm, §2), so
    that r = 1 is the base model. Backprop goes through every iteration by default: with inject='none' a truncated
    loop leaves the encoder without gradient (§3 trap)."""
    unknown = sorted(set(overrides) - set(SETTABLE))
    if unknown:
        raise ValueError(f"{unknown[0]}={overrides[unknown[0]]!r} cannot be set for an ETD conversion (the base model "
                         f"fixes it); allowed: {SETTABLE}")
    depth = dict(mean_depth=overrides.pop('mean_depth', 1))
    depth['max_depth'] = overrides.pop('max_depth', depth['mean_depth'])
    depth['backprop_depth'] = overrides.pop('backprop_depth', depth['max_depth'])
    return GPTConfig(**{key: model_args[key] for key in SIZES}, n_prelude=split[0], n_loop=split[1], n_coda=split[2],
                     inject='none', init_state='embed', norm_state=False, **depth, **overrides)


def build_gpt(config, state_dict):
    """A GPT with config's split, holding the layer-ordered weights: layer i lands in the i-th block of the split.
    Only a halting router (config.router, ETD's learned exit) is new and keeps its fresh initialisation."""
    model = GPT(config)
    split = (config.n_prelude, config.n_loop, config.n_coda)
    state_dict = rename_layers(state_dict, layer_names(config.n_layer), stage_names(split))
    state_dict['lm_head.weight'] = state_dict['transformer.wte.weight']  # tied embeddings
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise ValueError(f"the pretrained weights do not fit: {str(err).splitlines()[-1].strip()}") from None
    missing = [key for key in missing if not key.startswith('router.')]
    if missing or unexpected:
        raise ValueError(f"the pretrained weights do not fit a {config.n_layer}-layer GPT: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model


def convert_pretrained(source, split='auto', batches=None, last_token=True, **overrides):
    """ETD end to end (§4), what GPT.from_pretrained calls: load a plain pretrained GPT and convert it."""
    return convert(*load_base(source), split, batches, last_token, source=source, **overrides)


def convert(model_args, state_dict, split='auto', batches=None, last_token=True, source='', **overrides):
    """Measure the base's angular-distance curve on `batches` (a list of LongTensor (B, T); needed for split='auto'),
    pick or check the split, and regroup the blocks. overrides: SETTABLE. Returns the model; model.etd_info
    (source, split, curve, ...) is there for train.py to print (curve_chart) and save (save_split)."""
    n_layer, context = model_args['n_layer'], model_args['block_size']
    if batches is not None and max(b.size(1) for b in batches) > context:
        raise ValueError(f"the sample text has sequences of {max(b.size(1) for b in batches)} tokens, more than the "
                         f"base model's block_size {context}: use block_size <= {context}")
    curve = None
    if batches is not None:
        base = build_gpt(plain_config(n_layer, **{key: model_args[key] for key in SIZES}), state_dict)
        curve = layer_curve(base, batches, last_token)
    chosen = resolve_split(split, curve, n_layer)
    model = build_gpt(etd_config(model_args, chosen, **overrides), state_dict)
    model.etd_info = dict(source=str(source), etd_split=str(split), split=list(chosen), curve=curve,
                          last_token=last_token, n_sequences=sum(len(b) for b in batches) if batches else 0)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# 4. Sample text, the terminal chart, the saved record, and val loss per depth


def sample_batches(data_dir, n_sequences, length, split='train', batch_size=16, seed=1337):
    """n_sequences random windows of `length` tokens from data_dir/<split>.bin (nanoGPT format), in batches."""
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.isfile(path):
        raise ValueError(f"no {path}: prepare the dataset first (python prepare.py <name>)")
    data = np.memmap(path, dtype=np.uint16, mode='r')
    if len(data) <= length:
        raise ValueError(f"{path} has {len(data)} tokens: need more than {length}")
    starts = torch.randint(len(data) - length, (n_sequences,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([torch.from_numpy(data[i:i + length].astype(np.int64)) for i in starts.tolist()])
    return list(windows.split(batch_size))


def curve_chart(info, width=40):
    """The curve as one bar per block, each marked with the stage it went to: the picture of ETD's §4."""
    a, b, c = info['split']
    lines = [f"ETD split of {info['source']} (etd_split={info['etd_split']}): {a} encode / {b} think / {c} decode"]
    if info['curve'] is None:
        return lines[0]
    where = 'last token' if info['last_token'] else 'all tokens'
    lines.append(f"angular distance d(l, l+1) per block, {where} of {info['n_sequences']} sequences:")
    top = max(info['curve']) or 1.0
    for i, (d, stage) in enumerate(zip(info['curve'], ['encode'] * a + ['think'] * b + ['decode'] * c)):
        lines.append(f"  block {i:>2}  {d:.4f}  {'#' * round(width * d / top):<{width}}  {stage}")
    return '\n'.join(lines)


def save_split(info, path):
    """Write the split and its curve as JSON, atomically (tmp file + rename)."""
    with open(path + '.tmp', 'w') as f:
        json.dump(info, f, indent=1)
    os.replace(path + '.tmp', path)


@torch.no_grad()
def val_loss(model, windows, num_steps):
    """Mean cross-entropy over batches of (block_size + 1)-token windows, running the loop num_steps times."""
    model.eval()
    return sum(model(w[:, :-1], w[:, 1:], num_steps=num_steps)[1].item() for w in windows) / len(windows)


def depth_table(rows, depths):
    """rows: [(name, {k: loss})] -> a text table with one column per k ('-' where a model was not run at k)."""
    width = max(len(name) for name, _ in rows)
    lines = [f"{'model':<{width}}  " + '  '.join(f"{'k=' + str(k):>7}" for k in depths)]
    for name, losses in rows:
        cells = [f"{losses[k]:7.4f}" if k in losses else f"{'-':>7}" for k in depths]
        lines.append(f"{name:<{width}}  " + '  '.join(cells))
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Command line: the curve and the split; with --eval_depths the val loss of base, converted and mid-trained models

defaults = dict(init_from='',          # a GPT-2 name, a transformers directory, or a plain nanoloop ckpt.pt / out_dir
                etd_split='auto',      # 'auto' (knees of the curve) or 'n_prelude,n_loop,n_coda'
                dataset='shakespeare_char',  # <data_dir>/<dataset>/ supplies the sample text (train.bin) and val.bin
                data_dir='',           # folder holding <dataset>/ ('' = data/ beside this file, as prepare.py does)
                etd_sequences=128,     # sequences the curve is averaged over (ETD: 10k)
                etd_last_token=True,   # True: the last token of each sequence (ETD, Gromov et al.); False: every token
                out='',                # if set, write the split and its curve there as JSON
                eval_depths='',        # e.g. '1,2,4,8': val loss of the base and of the converted model at each k
                after='',              # mid-trained checkpoints (out_dirs or files, comma separated) for that table
                eval_sequences=512,    # val windows per evaluation (block_size + 1 tokens each)
                seed=1337)             # of the sampled windows


def parse_args(argv, config):
    """--key=value overrides of the defaults; non-string values are read as Python literals."""
    for arg in argv:
        key, eq, value = arg[2:].partition('=')
        if not arg.startswith('--') or not eq or key not in config:
            raise ValueError(f"argument {arg!r} is not allowed: expected --key=value with key in {tuple(config)}")
        if not isinstance(config[key], str):  # strings stay as typed: --etd_split=1,2,1 is not a tuple
            try:
                value = literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        if type(value) is not type(config[key]):
            raise ValueError(f"--{key}={value!r} is not allowed: expected a {type(config[key]).__name__}")
        config[key] = value
    return config


def parse_depths(text):
    """'1,2,4,8' -> [1, 2, 4, 8]"""
    try:
        depths = [int(k) for k in text.split(',')]
    except ValueError:
        depths = []
    if not depths or min(depths) < 1:
        raise ValueError(f"eval_depths={text!r} is not allowed: expected loop depths >= 1, comma separated, "
                         f"e.g. 1,2,4,8")
    return depths


def evaluate_depths(cfg, depths, model_args, state_dict, converted, data_dir):
    """Val loss of the base (r = 1), of the converted model and of every --after checkpoint at each depth k."""
    windows = sample_batches(data_dir, cfg['eval_sequences'], model_args['block_size'] + 1, 'val', seed=cfg['seed'])
    base = build_gpt(plain_config(model_args['n_layer'], **{key: model_args[key] for key in SIZES}), state_dict)
    split = lambda m: '/'.join(str(n) for n in (m.config.n_prelude, m.config.n_loop, m.config.n_coda))
    rows = [(f"base {cfg['init_from']} ({base.config.n_layer} layers)", {1: val_loss(base, windows, 1)})]
    afters = [(path, load_checkpoint(path)) for path in cfg['after'].split(',') if path]
    for name, model in [('ETD before mid-training', converted)] + afters:
        rows.append((f"{name} ({split(model)})", {k: val_loss(model, windows, k) for k in depths}))
    return depth_table(rows, depths)


def main(argv):
    cfg = parse_args(argv, dict(defaults))
    if not cfg['init_from']:
        raise ValueError("--init_from is required: a GPT-2 name, a transformers directory or a nanoloop checkpoint")
    depths = parse_depths(cfg['eval_depths']) if cfg['eval_depths'] else []
    data_dir = os.path.join(cfg['data_dir'] or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data'),
                            cfg['dataset'])
    model_args, state_dict = load_base(cfg['init_from'])
    with open(os.path.join(data_dir, 'meta.pkl'), 'rb') as f:
        vocab_size = pickle.load(f)['vocab_size']
    if vocab_size > model_args['vocab_size']:
        raise ValueError(f"dataset={cfg['dataset']!r} has {vocab_size} tokens, more than the model's "
                         f"{model_args['vocab_size']}")
    batches = sample_batches(data_dir, cfg['etd_sequences'], model_args['block_size'], seed=cfg['seed'])
    model = convert(model_args, state_dict, cfg['etd_split'], batches, cfg['etd_last_token'], cfg['init_from'])
    print(curve_chart(model.etd_info))
    if cfg['out']:
        save_split(model.etd_info, cfg['out'])
    if depths:
        print(evaluate_depths(cfg, depths, model_args, state_dict, model, data_dir))


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
