"""
ETD: Encode, Think, Decode (Koishekenov et al., arXiv 2510.07358; METHOD.md §4), as a converter. It turns a pretrained
plain GPT into nanoloop's prelude -> loop x r -> coda, every weight kept and none added, and writes a checkpoint:

    run the base on text, keep h_0..h_L  ->  d(l, l+1) = arccos(cos(h_l, h_{l+1})) / pi  ->  two knees
    ->  (n_prelude, n_loop, n_coda)  ->  block i of the base goes to the prelude, the loop or the coda

  python etd.py --init_from=out-etd-base --out_dir=out-etd        # curve, split at its knees, out-etd/ckpt.pt
  python train.py config/etd_midtrain_shakespeare_char.py          # mid-train it: init_from='out-etd/ckpt.pt'
  python etd.py --init_from=gpt2 --dataset=openwebtext --split=1,10,1 --out_dir=out-gpt2  # pip install transformers
  python etd.py --init_from=out-etd-base --after=out-etd-mid --eval_depths=1,2,4,8        # val loss before / after

out_dir gets ckpt.pt in train.py's format (model, model_args, config, iter_num=0; no optimizer) at r = 1, exactly the
base model, and etd_split.json (the split and its curve); train.py --init_from=<it> sets the depth and teaches the
middle to iterate. Without --out_dir nothing is written. Importable: convert_pretrained, convert_to_checkpoint.
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
from model import GPT, load_checkpoint, plain_config

GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
STAGES = ('prelude', 'loop', 'coda')
# GPT-2's Conv1D stores its weight as (in, out), nn.Linear as (out, in); the square attention projection too (§4)
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# a plain nanoloop checkpoint was trained at r = 1 without injection or state norm: an ordinary GPT (§1)
PLAIN = dict(inject='none', init_state='embed', norm_state=False, max_depth=1, router=False)
# the GPTConfig fields a conversion may set; everything else (sizes, blocks, positions) comes from the base model
SETTABLE = ('mean_depth', 'max_depth', 'backprop_depth', 'dropout', 'router', 'router_cost')

# ----------------------------------------------------------------------------------------------------------------------
# 1. Where the encoder ends and the decoder starts: angular distance between layers, and its knees (§4, steps 1-3)
@torch.no_grad()
def hidden_states_per_layer(model, idx):
    """The residual stream of a plain GPT (r = 1, every block in its loop stage as load_base gives it) before and
    after every block: (L + 1, B, T, C); h_0 = the embeddings (encode() with no prelude)."""
    states = [model.prelude(idx)]
    for block in model.transformer.loop:
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
    """'auto' is not a split; 'a,b,c' (or a tuple) -> (n_prelude, n_loop, n_coda) adding up to the base's n_layer."""
    allowed = f"'auto' or 'n_prelude,n_loop,n_coda' adding up to the base model's {n_layer} layers, with n_loop >= 1"
    try:
        parts = tuple(int(p) for p in (split.split(',') if isinstance(split, str) else split))
    except (TypeError, ValueError):
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or parts[1] < 1 or sum(parts) != n_layer:
        raise ValueError(f"split={split!r} is not allowed: expected {allowed}")
    return parts

# ----------------------------------------------------------------------------------------------------------------------
# 2. The base: a pretrained plain GPT with its L blocks in order in one loop stage (n_prelude = n_coda = 0, r = 1)
def stage_names(split):
    """The module of each layer of a split model: transformer.prelude.0, .., transformer.loop.0, .., .coda.0, .."""
    return [f'transformer.{stage}.{j}' for stage, n in zip(STAGES, split) for j in range(n)]


def regroup(config, state_dict, old_names):
    """A GPT with config's split holding the blocks of state_dict in layer order (old_names[i] = layer i's module).
    Only a halting router (config.router, ETD's learned exit) is new and keeps its fresh initialisation."""
    new_names = stage_names((config.n_prelude, config.n_loop, config.n_coda))
    mapping = dict(zip(old_names, new_names))
    head = lambda key: '.'.join(key.split('.')[:3])  # 'transformer.loop.3'
    state_dict = {mapping[head(k)] + k[len(head(k)):] if head(k) in mapping else k: v for k, v in state_dict.items()}
    model = GPT(config)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise ValueError(f"the pretrained weights do not fit: {str(err).splitlines()[-1].strip()}") from None
    missing = [key for key in missing if not key.startswith('router.')]
    if missing or unexpected:
        raise ValueError(f"the pretrained weights do not fit a {config.n_layer}-layer GPT: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model.eval()


def load_base(source):
    """init_from -> the base: a GPT-2 name or transformers directory, else a plain nanoloop checkpoint (file or dir)."""
    if source in GPT2_NAMES or os.path.isfile(os.path.join(source, 'config.json')):
        return load_gpt2(source)
    if not os.path.exists(source):
        raise ValueError(f"init_from={source!r} is not allowed: expected one of {GPT2_NAMES}, a directory saved by "
                         f"transformers' save_pretrained, or a nanoloop checkpoint (ckpt.pt or the out_dir holding it)")
    model, _ = load_checkpoint(source)  # the one loader: a bad file is one line naming it
    config = model.config
    wrong = {key: getattr(config, key) for key, value in PLAIN.items() if getattr(config, key) != value}
    if wrong:
        raise ValueError(f"{source!r} is not a plain GPT ({wrong}): ETD converts a model trained at r = 1 with "
                         f"{PLAIN}, e.g. by config/etd_base_shakespeare_char.py")
    split = (config.n_prelude, config.n_loop, config.n_coda)
    plain = dataclasses.replace(config, n_prelude=0, n_loop=config.n_layer, n_coda=0)
    return regroup(plain, model.state_dict(), stage_names(split))


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


def load_gpt2(source):
    """GPT-2 as the base. nanoloop's blocks compute it exactly only with tanh GELU, LayerNorm eps 1e-5, a 4x MLP and
    the tied head (§4); its Conv1D weights are transposed into nn.Linear's layout."""
    hf = gpt2_from_transformers(source)
    c = hf.config
    required = dict(activation_function=('gelu_new', 'gelu_pytorch_tanh'), layer_norm_epsilon=(1e-5,),
                    n_inner=(None, 4 * c.n_embd), scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,),
                    add_cross_attention=(False,), tie_word_embeddings=(True,))
    for key, allowed in required.items():
        if getattr(c, key, allowed[0]) not in allowed:
            raise ValueError(f"GPT-2 config {key}={getattr(c, key)!r} is not supported: nanoloop's blocks need "
                             f"one of {allowed}")
    state_dict = {key: value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
                  for key, value in hf.state_dict().items()
                  if not key.endswith(('.attn.bias', '.attn.masked_bias'))}  # old transformers' causal-mask buffers
    state_dict['lm_head.weight'] = state_dict['transformer.wte.weight']  # tied embeddings
    config = plain_config(c.n_layer, block_size=c.n_positions, vocab_size=c.vocab_size, n_embd=c.n_embd,
                          n_head=c.n_head, bias=True, norm='pre', pos='learned')  # GPT-2's blocks and positions
    return regroup(config, state_dict, [f'transformer.h.{i}' for i in range(c.n_layer)])

# ----------------------------------------------------------------------------------------------------------------------
# 3. The conversion: the same weights, regrouped (§4, step 4)
def split_model(base, split, **settings):
    """The base regrouped into (n_prelude, n_loop, n_coda) with ETD's loop (inject none, s_0 = e, no state norm, §2),
    so r = 1 is the base model. settings: SETTABLE. Backprop goes through every iteration by default: with
    inject='none' a truncated loop leaves the encoder without gradient (§3 trap)."""
    unknown = sorted(set(settings) - set(SETTABLE))
    if unknown:
        raise ValueError(f"{unknown[0]}={settings[unknown[0]]!r} cannot be set for an ETD conversion (the base model "
                         f"fixes it); allowed: {SETTABLE}")
    depth = dict(mean_depth=settings.pop('mean_depth', 1))
    depth['max_depth'] = settings.pop('max_depth', depth['mean_depth'])
    depth['backprop_depth'] = settings.pop('backprop_depth', depth['max_depth'])
    config = dataclasses.replace(base.config, n_prelude=split[0], n_loop=split[1], n_coda=split[2], **depth, **settings)
    return regroup(config, base.state_dict(), stage_names((0, base.config.n_layer, 0)))


def convert(base, split='auto', batches=None, last_token=True, source='', **settings):
    """Measure the base's angular-distance curve on `batches` (a list of LongTensor (B, T); needed for split='auto'),
    pick or check the split, and regroup the blocks -> (model, info: source, split, curve, ... as etd_split.json)."""
    n_layer, context = base.config.n_layer, base.config.block_size
    if batches and max(b.size(1) for b in batches) > context:
        raise ValueError(f"the sample text has sequences of {max(b.size(1) for b in batches)} tokens, more than the "
                         f"base model's block_size {context}")
    chosen = None if split == 'auto' else parse_split(split, n_layer)  # a bad split fails before the curve
    if chosen is None and not batches:
        raise ValueError("split='auto' needs sample text to measure the curve on (batches=[LongTensor (B, T), ...]); "
                         "else give a manual split 'n_prelude,n_loop,n_coda'")
    curve = layer_curve(base, batches, last_token) if batches else None
    chosen = chosen or choose_split(curve, n_layer)
    info = dict(source=str(source), requested=str(split), split=list(chosen), curve=curve, last_token=last_token,
                n_sequences=sum(len(b) for b in batches) if batches else 0)
    return split_model(base, chosen, **settings), info


def convert_pretrained(source, split='auto', batches=None, last_token=True, **settings):
    """ETD end to end in memory (§4): load a plain pretrained GPT and convert it -> (model, info)."""
    return convert(load_base(source), split, batches, last_token, source, **settings)

# ----------------------------------------------------------------------------------------------------------------------
# 4. The command line: sample text, the chart, the checkpoint, and val loss per depth
defaults = dict(init_from='',          # a GPT-2 name, a transformers directory, or a plain nanoloop ckpt.pt / out_dir
                split='auto',          # 'auto' (knees of the curve) or 'n_prelude,n_loop,n_coda'
                out_dir='',            # write ckpt.pt + etd_split.json here ('' = only print the curve and split)
                overwrite=False,       # True: replace what a non-empty out_dir holds
                dataset='shakespeare_char',  # <data_dir>/<dataset>/ supplies the sample text (train.bin) and val.bin
                data_dir='',           # folder holding <dataset>/ ('' = data/ beside this file, as prepare.py does)
                etd_sequences=128,     # sequences the curve is averaged over (ETD: 10k)
                last_token=True,       # True: the last token of each sequence (ETD, Gromov et al.); False: every token
                eval_depths='',        # e.g. '1,2,4,8': val loss of the base and of the converted model at each k
                after='',              # mid-trained checkpoints (out_dirs or files, comma separated) for that table
                eval_sequences=512,    # val windows per evaluation
                seed=1337)             # of the sampled windows


def text_batches(path, split, n, block_size, seed, batch_size=16):
    """n random windows (x, y) of path/<split>.bin, batch_size at a time (prepare.get_batch, seeded)."""
    if not os.path.exists(os.path.join(path, f'{split}.bin')):
        raise ValueError(f"no {path}/{split}.bin: prepare the dataset first (python prepare.py ...) or pass --data_dir")
    g = torch.Generator().manual_seed(seed)
    return [prepare.get_batch(path, split, min(batch_size, n - i), block_size, g) for i in range(0, n, batch_size)]


def curve_chart(info, width=40):
    """The curve as one bar per block, each marked with the stage it went to: the picture of ETD's §4."""
    a, b, c = info['split']
    lines = [f"ETD split of {info['source']} (split={info['requested']}): {a} prelude / {b} loop / {c} coda"]
    if info['curve'] is not None:
        where = 'last token' if info['last_token'] else 'all tokens'
        lines.append(f"angular distance d(l, l+1) per block, {where} of {info['n_sequences']} sequences:")
        top = max(info['curve']) or 1.0
        for i, (d, stage) in enumerate(zip(info['curve'], ['prelude'] * a + ['loop'] * b + ['coda'] * c)):
            lines.append(f"  block {i:>2}  {d:.4f}  {'#' * round(width * d / top):<{width}}  {stage}")
    return '\n'.join(lines)


def check_out_dir(out_dir, overwrite):
    """Before any work: out_dir is a folder we may fill (never silently replacing an earlier run's files)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir={out_dir!r} is a file: expected a folder to write ckpt.pt into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"out_dir={out_dir!r} is not empty: choose another --out_dir, or --overwrite=True to "
                         f"replace what it holds")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:  # no permission, a file on the way, ...
        raise ValueError(f"out_dir={out_dir!r} cannot be created: {err.strerror or err}") from None


def write_checkpoint(model, info, cfg):
    """out_dir/ckpt.pt in train.py's format (iter_num 0, no optimizer) and etd_split.json, each written atomically."""
    ckpt = dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config), config=cfg, iter_num=0)
    path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)
    with open(os.path.join(cfg['out_dir'], 'etd_split.json.tmp'), 'w') as f:
        json.dump(info, f, indent=1)
    os.replace(f.name, f.name[:-4])
    return path


@torch.no_grad()
def val_loss(model, batches, num_steps):
    """Mean cross-entropy over (x, y) batches, running the loop num_steps times."""
    return sum(model.eval()(x, y, num_steps=num_steps)[1].item() for x, y in batches) / len(batches)


def parse_depths(text):
    """'1,2,4,8' -> [1, 2, 4, 8]"""
    try:
        depths = [int(k) for k in text.split(',')]
    except ValueError:
        depths = []
    if not depths or min(depths) < 1:
        raise ValueError(f"eval_depths={text!r} is not allowed: expected depths >= 1, comma separated, e.g. 1,2,4,8")
    return depths


def depth_table(rows, depths):
    """rows: [(name, {k: loss})] -> a text table with one column per k ('-' where a model was not run at k)."""
    width = max(len(name) for name, _ in rows)
    return '\n'.join([f"{'model':<{width}}  " + '  '.join(f"{'k=' + str(k):>7}" for k in depths)] + [
        f"{name:<{width}}  " + '  '.join(f"{losses[k]:7.4f}" if k in losses else f"{'-':>7}" for k in depths)
        for name, losses in rows])


def run(cfg):
    """etd.py's work for a full config dict -> (model, info); every bad setting fails before the curve is measured."""
    if not cfg['init_from']:
        raise ValueError("--init_from is required: a GPT-2 name, a transformers directory or a nanoloop checkpoint")
    for key in ('etd_sequences', 'eval_sequences'):
        if cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]} is not allowed: expected an integer >= 1")
    depths = parse_depths(cfg['eval_depths']) if cfg['eval_depths'] or cfg['after'] else []
    afters = []
    for path in filter(None, cfg['after'].split(',')):
        try:
            afters.append((path, load_checkpoint(path)[0]))
        except ValueError as err:
            raise ValueError(f"after={path!r}: {err}") from None
    if cfg['out_dir']:
        check_out_dir(cfg['out_dir'], cfg['overwrite'])
    path = prepare.dataset_dir(cfg['dataset'], cfg['data_dir'])
    meta = prepare.read_meta(path)
    base = load_base(cfg['init_from'])
    V = base.config.vocab_size
    if meta.get('vocab_size', 0) > V or ('chars' in meta and meta['vocab_size'] != V):
        raise ValueError(f"dataset={cfg['dataset']!r} has {meta['vocab_size']} tokens, the model {V}: use a dataset "
                         f"tokenized like init_from={cfg['init_from']!r}")
    batches = text_batches(path, 'train', cfg['etd_sequences'], base.config.block_size, cfg['seed'])
    model, info = convert(base, cfg['split'], [x for x, _ in batches], cfg['last_token'], cfg['init_from'])
    print(curve_chart(info))
    if cfg['out_dir']:
        print(f"wrote {write_checkpoint(model, info, cfg)} (r = 1: the base model) and etd_split.json; mid-train it "
              f"with python train.py --init_from={os.path.join(cfg['out_dir'], 'ckpt.pt')} ...")
    if depths:  # val loss of the base (r = 1), of the converted model and of every --after checkpoint at each k
        windows = text_batches(path, 'val', cfg['eval_sequences'], base.config.block_size, cfg['seed'])
        split = lambda m: '/'.join(str(n) for n in (m.config.n_prelude, m.config.n_loop, m.config.n_coda))
        rows = [(f"base {cfg['init_from']} ({base.config.n_layer} layers)", {1: val_loss(base, windows, 1)})]
        for name, m in [('ETD before mid-training', model)] + afters:
            rows.append((f"{name} ({split(m)})", {k: val_loss(m, windows, k) for k in depths}))
        print(depth_table(rows, depths))
    return model, info


def convert_to_checkpoint(init_from, out_dir, **options):
    """ETD as a converter, for Python callers: etd.py's command line as a function. Writes out_dir/ckpt.pt and
    out_dir/etd_split.json; options: etd.py's other keys (split, dataset, data_dir, overwrite, ...) -> (model, info)."""
    if not out_dir:
        raise ValueError("out_dir='' is not allowed: convert_to_checkpoint writes out_dir/ckpt.pt")
    options = {key: checked(defaults, key, value, 'convert_to_checkpoint') for key, value in options.items()}
    return run(dict(defaults, init_from=init_from, out_dir=out_dir, **options))


if __name__ == '__main__':
    try:
        run(configure(defaults, sys.argv[1:]))
    except (ValueError, OSError) as err:  # ours and the loader's are one line already; OSError: e.g. a full disk
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
