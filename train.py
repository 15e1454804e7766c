"""
Train a recurrent-depth GPT (prelude -> loop x r -> coda) with a random depth r every step (METHOD.md §3).

    python train.py                                    # CPU demo: prepares shakespeare_char, trains, prints a sample
    python train.py config/train_shakespeare_char.py   # one GPU, ~10M parameters
    python train.py --max_iters=500 --mean_depth=2     # any default below, overridden on the command line
    python train.py config/etd_midtrain_shakespeare_char.py  # ETD: mid-train the looped model etd.py converted
    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char.py --gradient_accumulation_steps=8
        # DDP on one node: gradient_accumulation_steps counts micro-batches over all processes, a multiple of them
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=IP --master_port=1234 train.py ...  # two nodes

Every eval_interval steps it prints, and appends to out_dir/log.jsonl, the train and val loss at several depths
(1, mean/2, mean, 2*mean) and the val loss under adaptive exit (METHOD.md §5) with its mean iterations per token,
and writes out_dir/ckpt.pt (atomically). init_from='resume' continues exactly where that checkpoint stopped.
Nothing is lost: every setting is checked before any work, and a fresh run refuses an out_dir holding an earlier
run's ckpt.pt or log.jsonl (--overwrite=True replaces them).
"""

import dataclasses
import json
import math
import os
import random
import sys
import time
import types
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare
from configurator import configure
from model import EXIT_RULES, GPT, GPTConfig, load_checkpoint, sample_depth

# -----------------------------------------------------------------------------
# default config values: these ARE the CPU demo (`python train.py`, a few minutes on 2 cores)
# I/O
out_dir = 'out'                # checkpoint ckpt.pt and log.jsonl go here
eval_interval = 250            # steps between evaluations (and checkpoints)
log_interval = 10              # steps between progress-bar updates (each one syncs the device)
eval_iters = 10                # batches per evaluation, the same batches every time
eval_only = False              # True: evaluate once (e.g. init_from='resume'), print, exit; writes nothing
always_save_checkpoint = False  # True: save at every evaluation; False: only when val loss (at mean depth) improves
overwrite = False              # True: a fresh run may replace the ckpt.pt / log.jsonl of an earlier run in out_dir
init_from = 'scratch'          # 'scratch' | 'resume' (out_dir/ckpt.pt, exactly where it stopped) | a checkpoint
                               # (ckpt.pt or its out_dir) to mid-train: its weights and architecture, this run's
                               # depth settings, a fresh optimizer (ETD: the model etd.py converted, METHOD.md §4)
# data
dataset = 'shakespeare_char'   # folder name under data_dir; shakespeare_char is prepared automatically if missing
data_dir = ''                  # folder holding <dataset>/ ('' = data/ beside train.py, as prepare.py writes it)
gradient_accumulation_steps = 1  # micro-batches per optimizer step, over all DDP processes together
batch_size = 32                # sequences per micro-batch (per process)
block_size = 64                # context length
# model (GPTConfig in model.py checks these; vocab_size comes from the dataset's meta.json)
n_embd = 128                   # width of the residual stream and of the latent state
n_head = 4                     # attention heads; must divide n_embd
n_prelude = 1                  # encoder layers, run once
n_loop = 1                     # layers of the loop block, run r times with shared weights
n_coda = 1                     # decoder layers, run once
mean_depth = 4                 # mean loop iterations: eval runs it, training draws r around it (E[r] = mean + 1)
max_depth = 8                  # cap on the drawn r and on adaptive exit
backprop_depth = 4             # k: backprop through the last k iterations only (METHOD.md §3)
fixed_depth = False            # True: every step runs exactly mean_depth iterations (ETD's fixed k); False: random r
inject = 'add'                 # 'add' (s + e) | 'concat' (Huginn's adapter) | 'none' (ETD; backprop_depth >= max_depth)
init_state = 'noise'           # s_0: 'noise' (Huginn) | 'embed' (ETD) | 'zeros'
state_std = 1.0                # std of the noise state: 1 matches the scale of e after a sandwich block (Huginn)
norm_state = False             # LayerNorm the state after every iteration (for pre-norm loops; sandwich blocks end in one)
norm = 'sandwich'              # blocks: 'sandwich' (Huginn: a LayerNorm after each residual add too) | 'pre' (GPT-2)
pos = 'rope'                   # positions: 'rope' (rotary, Huginn) | 'learned' (GPT-2)
window = 0                     # attention sees only the last `window` tokens (0 = all, flash attention)
dropout = 0.0                  # 0 for pretraining, 0.1+ for finetuning
bias = False                   # biases in Linears and LayerNorms
router = False                 # train ETD's halting router too (for exit_rule='router'; model.py's GPT.router_loss)
router_cost = 0.01             # the router's price of one more iteration, in nats per token
# AdamW and learning-rate schedule (linear warmup, cosine decay to min_lr)
learning_rate = 2e-3           # peak learning rate
max_iters = 1500               # total optimizer steps
weight_decay = 0.1             # on matrices only
beta1 = 0.9                    # in [0, 1), as beta2
beta2 = 0.99                   # 0.99 because the batches are small (nanoGPT's shakespeare_char setting)
grad_clip = 1.0                # clip the global gradient norm at this value; 0 disables
decay_lr = True                # False: constant learning_rate after warmup
warmup_iters = 100             # linear warmup steps
lr_decay_iters = 0             # cosine reaches min_lr here (0 = max_iters)
min_lr = 2e-4                  # ~learning_rate / 10 (Chinchilla)
# evaluation and the final sample
exit_threshold = 5e-4          # adaptive exit: stop a token once the rule's distance is below this (Huginn's KL 5e-4)
exit_rule = 'kl'               # 'kl' | 'entropy' | 'argmax-stable' (METHOD.md §5)
sample_tokens = 300            # characters/tokens sampled after training (0 = no sample)
temperature = 0.8              # of that sample (> 0)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else (
    'float16' if torch.cuda.is_available() else 'float32')  # 'float32' | 'bfloat16' | 'float16' (autocast; GPU only)
compile = torch.cuda.is_available()  # compile prelude / loop step / coda (model.compile_loop), never the loop itself
backend = 'nccl'               # DDP backend: 'nccl' on GPUs, 'gloo' on CPUs
seed = 1337                    # seeds init, data order and the depth of every step (0 <= seed < 2**32)
peak_flops = 312e12            # for MFU: A100 bf16 312e12, H100 SXM bf16 989e12
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
DEFAULTS = {k: globals()[k] for k in config_keys}  # the values above, before any override
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
MIDTRAIN = ('mean_depth', 'max_depth', 'backprop_depth', 'dropout', 'router', 'router_cost')  # init_from=<ckpt> sets


class NonFiniteLoss(Exception):
    """Training diverged: stop before a checkpoint of broken weights is written."""

# -----------------------------------------------------------------------------
# checks, all before any work: one line naming the key, the bad value and what is allowed


FRACTION = 'a number in [0, 1)', lambda v: 0 <= v < 1
CHECKS = {  # key: (what is allowed, test); GPTConfig checks the model's own keys (n_embd, depths, inject, ...)
    **dict.fromkeys(('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps', 'batch_size',
                     'block_size', 'max_iters'), ('a number >= 1', lambda v: v >= 1)),
    **dict.fromkeys(('warmup_iters', 'lr_decay_iters', 'weight_decay', 'grad_clip', 'min_lr', 'sample_tokens',
                     'exit_threshold'), ('a number >= 0', lambda v: v >= 0)),
    **dict.fromkeys(('learning_rate', 'temperature', 'peak_flops'), ('a number > 0', lambda v: v > 0)),
    'beta1': FRACTION, 'beta2': FRACTION,
    'seed': ('an integer in [0, 2**32)', lambda v: 0 <= v < 2 ** 32),  # depth_for_step shifts it by 32 bits
    **{key: (f'one of {tuple(allowed)}', lambda v, allowed=allowed: v in allowed) for key, allowed in
       (('dtype', DTYPES), ('exit_rule', EXIT_RULES), ('backend', ('nccl', 'gloo')))},
    'init_from': ("'scratch', 'resume' or an existing checkpoint path (ckpt.pt or its out_dir)",
                  lambda v: v in ('scratch', 'resume') or os.path.exists(v)),
    'out_dir': ('a folder path', bool), 'dataset': ('a dataset name', bool),
}


def check_config(cfg, world):
    """Every value train.py interprets, and the model's shape (with a stand-in vocab_size: the data comes later)."""
    for key, (allowed, ok) in CHECKS.items():
        if not ok(getattr(cfg, key)):
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not allowed: expected {allowed}")
    GPTConfig(**model_args(cfg, vocab_size=1))
    if cfg.gradient_accumulation_steps % world:
        raise ValueError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
                         f"{world} processes: it counts micro-batches per step over all of them (nanoGPT)")


def check_device(device, dtype):
    """device exists on this machine and dtype runs there. CPU autocast runs bfloat16: float16 is GPU only."""
    n_cuda, mps = torch.cuda.device_count(), torch.backends.mps.is_available()
    try:
        dev = torch.device(device)
    except RuntimeError:  # not a device string at all: 'foo', 'cuda:x'
        dev = torch.device('meta')
    if not (dev.type == 'cpu' or (dev.type == 'cuda' and (dev.index or 0) < n_cuda) or (dev.type == 'mps' and mps)):
        available = ['cpu', *(f'cuda:{i}' for i in range(n_cuda)), *(['mps'] if mps else [])]
        raise ValueError(f"device={device!r} is not available here: this machine has {', '.join(available)}")
    if dtype == 'float16' and dev.type == 'cpu':
        raise ValueError("dtype='float16' is not allowed on the CPU: expected 'bfloat16' or 'float32' there")
    if dtype == 'bfloat16' and dev.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype='bfloat16' is not supported by {device}: expected 'float16' or 'float32'")


def check_out_dir(cfg):
    """A resume needs its checkpoint; a fresh run never replaces an earlier run's files unless overwrite=True;
    out_dir must be (or become) a writable folder."""
    used = [f for f in ('ckpt.pt', 'log.jsonl') if os.path.exists(os.path.join(cfg.out_dir, f))]
    if cfg.init_from == 'resume' and 'ckpt.pt' not in used:
        raise ValueError(f"init_from='resume' but there is no checkpoint {cfg.out_dir}/ckpt.pt; train with "
                         f"init_from='scratch' first")
    if cfg.init_from != 'resume' and used and not (cfg.overwrite or cfg.eval_only):
        raise ValueError(f"out_dir={cfg.out_dir!r} holds an earlier run ({' and '.join(used)}); a fresh run would "
                         f"replace it: pick another out_dir, continue it with --init_from=resume, or --overwrite=True")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"out_dir={cfg.out_dir!r} is a file: expected a folder")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir={cfg.out_dir!r} cannot be created ({e.strerror or e}): expected a folder") from None
    if not os.access(cfg.out_dir, os.W_OK):
        raise ValueError(f"out_dir={cfg.out_dir!r} is not writable: expected a folder this user may write into")

# -----------------------------------------------------------------------------
# data: nanoGPT's uint16 token files and meta.json, read through prepare.py


def data_path(cfg):
    return prepare.dataset_dir(cfg.dataset, cfg.data_dir)


def ensure_data(cfg):
    """Prepare the embedded default corpus or the showcase task on first use, or after an interrupted prepare (its
    meta.json comes last); any other dataset must have been prepared by the user."""
    path, builtin = data_path(cfg), cfg.dataset in ('shakespeare_char', 'prefix_sums')
    if all(os.path.exists(os.path.join(path, f)) for f in (prepare.OUTPUTS[cfg.dataset] if builtin else
                                                           ('train.bin', 'val.bin'))):
        return
    if builtin:
        prepare.prepare(cfg.dataset, data_dir=os.path.dirname(path))
        return
    how = cfg.dataset if cfg.dataset in prepare.DEFAULTS else f'text --input=<your files> --name={cfg.dataset}'
    raise ValueError(f"dataset {cfg.dataset!r} is not prepared ({path}/train.bin or val.bin is missing); "
                     f"run: python prepare.py {how}" + (f" --data_dir={cfg.data_dir}" if cfg.data_dir else ''))


def check_data(cfg, meta, block_size):
    """Windows of block_size + 1 tokens fit in both splits (a task dataset gives whole examples instead)."""
    for split in ('train', 'val'):
        n = os.path.getsize(os.path.join(data_path(cfg), f'{split}.bin')) // 2  # uint16
        if n <= block_size and not meta.get('example_len'):
            raise ValueError(f"block_size={block_size} is not allowed: dataset {cfg.dataset!r} has {n} {split} "
                             f"tokens, expected block_size < {n}")


def vocabulary(meta):
    """What token ids mean: their number and the chars or tokenizer (no meta.json: nanoGPT's 50304 = GPT-2's 50257
    padded to a multiple of 64)."""
    return {k: meta[k] for k in ('vocab_size', 'chars', 'tokenizer') if k in meta} or {'vocab_size': 50304}


def check_vocab(cfg, meta, ckpt, path):
    """Training a checkpoint on data whose token ids mean other text would learn garbage (and overwrite ckpt.pt)."""
    saved, now, n = ckpt.get('vocab'), vocabulary(meta), ckpt['model_args']['vocab_size']
    if isinstance(saved, dict):  # train.py records the vocabulary it trained on
        bad = [k for k in saved if now.get(k) != saved[k]]
    else:  # e.g. etd.py's conversion: the ids must fit, and a char vocabulary must be the model's own
        bad = ['vocab_size'] if meta.get('vocab_size', 0) > n or ('chars' in meta and meta['vocab_size'] != n) else []
    if bad:
        raise ValueError(f"dataset {cfg.dataset!r} ({now['vocab_size']} tokens) has another vocabulary than "
                         f"checkpoint {path} (trained on {ckpt.get('config', {}).get('dataset', '?')!r}, {n} tokens; "
                         f"{' and '.join(bad)} differ{'s' if len(bad) == 1 else ''}): train it on its own dataset")


def get_batch(cfg, split, generator, device):
    return prepare.get_batch(data_path(cfg), split, cfg.batch_size, cfg.block_size, generator, device)

# -----------------------------------------------------------------------------
# model, depth, learning rate


def model_args(cfg, vocab_size):
    """GPTConfig's fields, taken from the train config of the same names."""
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig) if hasattr(cfg, f.name)}
    return dict(args, vocab_size=vocab_size)


def init_model(cfg, meta):
    """(model, checkpoint to resume or None). 'scratch' builds cfg's model; 'resume' and a checkpoint path
    (mid-training) load it through model.load_checkpoint, which turns any bad file into one line."""
    if cfg.init_from == 'scratch':
        check_data(cfg, meta, cfg.block_size)
        return GPT(GPTConfig(**model_args(cfg, vocabulary(meta)['vocab_size']))), None
    path = cfg.out_dir if cfg.init_from == 'resume' else cfg.init_from
    model, ckpt = load_checkpoint(path)
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    check_vocab(cfg, meta, ckpt, path)
    if cfg.init_from != 'resume':  # mid-training: its weights, this run's depth settings; a new router starts fresh
        base, model = model, GPT(GPTConfig(**dict(ckpt['model_args'], **{k: getattr(cfg, k) for k in MIDTRAIN})))
        model.load_state_dict(base.state_dict(), strict=False)
        ckpt = None
    elif any(k not in ckpt for k in ('optimizer', 'scaler', 'rng', 'iter_num', 'best_val_loss', 'tokens_seen')):
        raise ValueError(f"checkpoint {path} cannot be resumed: it holds no optimizer and loop state (not written by "
                         f"train.py); mid-train it instead with --init_from={path}")
    elif ckpt['iter_num'] >= cfg.max_iters and not cfg.eval_only:
        raise ValueError(f"max_iters={cfg.max_iters} is not allowed: checkpoint {path} is at iter {ckpt['iter_num']} "
                         f"already; expected more to train")
    check_data(cfg, meta, model.config.block_size)
    return model.train(), ckpt


def adopt_architecture(cfg, config):
    """The model may be a checkpoint's: cfg takes its GPTConfig values, with a note where they differ."""
    for key, value in dataclasses.asdict(config).items():
        if hasattr(cfg, key) and getattr(cfg, key) != value:
            print(f"note: using the checkpoint's {key}={value!r}, not {getattr(cfg, key)!r}", file=sys.stderr)
            setattr(cfg, key, value)
    if cfg.exit_rule == 'router' and not config.router:
        raise ValueError("exit_rule='router' is not allowed: this model has no halting router (train one with "
                         "router=True); expected 'kl', 'entropy' or 'argmax-stable'")


def depth_for_step(step, seed, mean_depth, max_depth):
    """The loop depth r of optimizer step `step` (Huginn's log-normal Poisson, METHOD.md §3). A fresh generator
    seeded by (seed, step) makes every DDP rank draw the same r and a resumed run draw what the uninterrupted did."""
    generator = torch.Generator().manual_seed((seed << 32) + step)  # distinct for every (seed, step < 2**32)
    return sample_depth(mean_depth, max_depth, generator=generator)


def warn_no_prelude_grad(config):
    """METHOD.md §3 trap: without injection the state entering the last k iterations is detached when r > k,
    so the prelude (and embeddings through it) get no gradient on those steps."""
    if config.inject == 'none' and config.max_depth > config.backprop_depth:
        print(f"warning: inject='none' with max_depth={config.max_depth} > backprop_depth={config.backprop_depth}: "
              f"steps that draw r > {config.backprop_depth} give the prelude no gradient; "
              f"set backprop_depth >= max_depth (ETD) or use inject='concat'", file=sys.stderr)


def get_lr(it, cfg):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters (nanoGPT)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)

# -----------------------------------------------------------------------------
# random state and checkpoints: everything exact resume needs, in types torch.load(weights_only=True) accepts


def rng_state(data_gen):
    """All random streams of this process. numpy's key array becomes a tensor (weights_only loads no arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'torch': torch.get_rng_state(), 'data': data_gen.get_state(),
            'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state, data_gen):
    random.setstate(state['python'])
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
    data_gen.set_state(state['data'])


def all_rng_states(ddp, world_size, data_gen):
    """Every rank's random state (rank i at index i), so a DDP resume restores each rank's own data order."""
    states = [rng_state(data_gen)] * world_size
    if ddp:
        dist.all_gather_object(states, states[0])  # rank i's own at index i
    return states


def save_checkpoint(path, ckpt):
    """tmp file + os.replace: a crash while writing leaves the previous checkpoint intact."""
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)


def check_finite(finite, ddp, where):
    """Raise NonFiniteLoss if any rank saw a nan/inf loss. `finite` is a device flag: one sync per check."""
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise NonFiniteLoss(f"loss became nan/inf {where}; training stopped, the last good checkpoint (if any) is "
                            f"kept; try a lower learning_rate, warmup_iters or grad_clip")

# -----------------------------------------------------------------------------
# one optimizer step, evaluation, sample


def train_step(model, optimizer, scaler, r, next_batch, cfg, ctx, ddp, accum):
    """One optimizer step at loop depth r over `accum` micro-batches; returns the mean loss (a device tensor)."""
    total = 0.0
    for micro_step in range(accum):
        x, y = next_batch()
        if ddp:  # all-reduce the gradients only after the last micro-batch (nanoGPT)
            model.require_backward_grad_sync = micro_step == accum - 1
        with ctx:
            _, loss = model(x, y, num_steps=r)  # truncated backprop through the last k iterations happens inside
        scaler.scale(loss / accum).backward()
        total = total + loss.detach() / accum
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


def eval_depths(config):
    """1, mean/2, mean, 2*mean, capped at max_depth, without repeats: the depth curve while training."""
    m = config.mean_depth
    return sorted({max(1, min(d, config.max_depth)) for d in (1, m // 2, m, 2 * m)})


def eval_batches(cfg, split, device):
    """The same eval_iters batches at every evaluation (fixed seed), so successive evaluations compare alike."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return [get_batch(cfg, split, generator, device) for _ in range(cfg.eval_iters)]


@torch.no_grad()
def evaluate(model, cfg, device, ctx):
    """Mean train/val loss at each eval depth, and val loss under adaptive exit (every token stops by the exit rule,
    teacher-forced: model.adaptive_forward, METHOD.md §5) with its mean iterations per token."""
    model.eval()
    out = {'train_loss': {}, 'val_loss': {}}
    with torch.random.fork_rng(devices=[torch.device(device)] if 'cuda' in device else []), ctx:  # keep training's RNG
        for split in ('train', 'val'):
            batches = eval_batches(cfg, split, device)
            for r in eval_depths(model.config):
                torch.manual_seed(cfg.seed)  # the same noise initial state at every evaluation
                out[f'{split}_loss'][str(r)] = float(np.mean([model(x, y, num_steps=r)[1].item() for x, y in batches]))
        runs = [model.adaptive_forward(x, y, exit_threshold=cfg.exit_threshold, exit_rule=cfg.exit_rule)[1:]
                for x, y in batches]  # val's; (loss, depths) without the logits
    model.train()
    out['adaptive'] = dict(val_loss=float(np.mean([loss.item() for loss, _ in runs])), exit_rule=cfg.exit_rule,
                           mean_depth=float(np.mean([d.float().mean().item() for _, d in runs])),
                           exit_threshold=cfg.exit_threshold)
    return out


@torch.no_grad()
def print_sample(model, cfg, meta, device, ctx):
    """Generate sample_tokens after a newline with adaptive exit, and show the text with its iterations per token."""
    if cfg.sample_tokens <= 0 or 'example_len' in meta or not ('chars' in meta or 'tokenizer' in meta):
        return  # a task dataset, or no vocabulary to show text in
    start = prepare.encode('\n', meta)[0] if '\n' in meta.get('chars', '\n') else 0
    model.eval()
    with ctx:
        idx, depths = model.generate(torch.tensor([[start]], device=device), cfg.sample_tokens,
                                     num_steps=model.config.max_depth, temperature=cfg.temperature,
                                     exit_threshold=cfg.exit_threshold, exit_rule=cfg.exit_rule,
                                     generator=torch.Generator(device).manual_seed(cfg.seed))
    print(f"--- sample: {cfg.sample_tokens} tokens, temperature {cfg.temperature}, adaptive exit "
          f"({cfg.exit_rule} < {cfg.exit_threshold:g}): {depths.float().mean().item():.2f} iterations/token "
          f"(max {model.config.max_depth}) ---")
    print(prepare.decode(idx[0, 1:].tolist(), meta))

# -----------------------------------------------------------------------------
# the run


def train(cfg):
    """Train as cfg (a config dict) says; returns [(iter, loss, r)] at every log_interval on this rank."""
    cfg = types.SimpleNamespace(**cfg)
    ddp = int(os.environ.get('RANK', -1)) != -1  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (nanoGPT)
    rank, local_rank, world = [int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')] if ddp else [0, 0, 1]
    device = f'cuda:{local_rank}' if ddp and cfg.device.startswith('cuda') else cfg.device
    check_config(cfg, world)  # all checks before the process group starts: every rank fails alike
    check_device(device, cfg.dtype)
    check_out_dir(cfg)
    if ddp:
        dist.init_process_group(backend=cfg.backend)
        if device.startswith('cuda'):
            torch.cuda.set_device(device)
    try:
        return run(cfg, ddp, rank, local_rank, world, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def build(cfg, meta, device, rank, world):
    """Model (on device), optimizer, grad scaler, the data generator, and the loop state, from scratch or resumed."""
    torch.manual_seed(cfg.seed + rank)
    model, ckpt = init_model(cfg, meta)
    adopt_architecture(cfg, model.config)
    model.to(device)
    device_type = torch.device(device).type
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == 'float16')  # fp16 needs loss scaling, bf16 not
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # each rank reads its own batches
    state = dict(iter_num=0, best_val_loss=float('inf'), tokens_seen=0)  # the loop counters a checkpoint keeps
    if ckpt is not None:
        resume(ckpt, optimizer, scaler, data_gen, state, rank, world)
    return model, optimizer, scaler, data_gen, state


def resume(ckpt, optimizer, scaler, data_gen, state, rank, world):
    """Restore optimizer, loop counters and this rank's random streams: the run continues bit for bit."""
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler']:  # empty unless the checkpoint was trained in float16
            scaler.load_state_dict(ckpt['scaler'])
        state.update({k: ckpt[k] for k in state})
        if len(ckpt['rng']) == world:
            set_rng_state(ckpt['rng'][rank], data_gen)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"the checkpoint's optimizer or random state is damaged ({type(err).__name__}: "
                         f"{str(err)[:100]}): resume from another checkpoint") from None
    if len(ckpt['rng']) != world and rank == 0:
        print(f"warning: the checkpoint comes from {len(ckpt['rng'])} processes, this run has {world}: "
              f"batches will differ from an uninterrupted run", file=sys.stderr)


def start_files(cfg, iter_num):
    """A fresh run (overwrite was checked up front) starts ckpt.pt and log.jsonl anew. A resume keeps the log rows up
    to its checkpoint's iter (that evaluation is not redone) and drops later ones, left by a kill, which it writes
    again: no iter appears twice, the checkpoint is the truth."""
    log = os.path.join(cfg.out_dir, 'log.jsonl')
    if cfg.init_from != 'resume':
        for path in (log, os.path.join(cfg.out_dir, 'ckpt.pt')):
            if os.path.exists(path):
                os.remove(path)
    elif os.path.exists(log):
        with open(log) as f:  # a row cut short by a kill is not JSON: dropped too
            rows = [json.loads(line) for line in f if line.startswith('{') and line.rstrip().endswith('}')]
        with open(log + '.tmp', 'w') as f:
            f.writelines(json.dumps(row) + '\n' for row in rows if row.get('iter', math.inf) <= iter_num)
        os.replace(log + '.tmp', log)  # a kill right now leaves the old log whole


def evaluate_and_save(model, optimizer, scaler, state, rngs, cfg, device, ctx, t_run, write):
    """Evaluate and print; unless eval_only, append the row to out_dir/log.jsonl and checkpoint when val loss (at
    mean depth) improved. Returns True when it wrote ckpt.pt."""
    res = evaluate(model, cfg, device, ctx)
    it = state['iter_num']
    a, mean = res['adaptive'], model.config.mean_depth
    write(f"iter {it}: val loss {' | '.join(f'r={r} {v:.4f}' for r, v in res['val_loss'].items())} | adaptive "
          f"{a['val_loss']:.4f} @ {a['mean_depth']:.2f} it/token; train loss r={mean} "
          f"{res['train_loss'][str(mean)]:.4f}")
    if cfg.eval_only:
        return False
    row = dict(iter=it, tokens=state['tokens_seen'], lr=get_lr(max(it - 1, 0), cfg),
               time_s=round(time.time() - t_run, 2), **res)
    with open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')
    if not all(math.isfinite(v) for v in [*res['val_loss'].values(), res['adaptive']['val_loss']]):
        raise NonFiniteLoss(f"val loss is nan/inf at iter {it}; stopped, the last good checkpoint is kept")
    val = res['val_loss'][str(model.config.mean_depth)]
    if not ((val < state['best_val_loss'] or cfg.always_save_checkpoint) and it > 0):
        return False
    state['best_val_loss'] = min(state['best_val_loss'], val)
    save_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'), dict(
        model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        model_args=dataclasses.asdict(model.config), config=vars(cfg), rng=rngs,
        vocab=vocabulary(prepare.read_meta(data_path(cfg))), **state))  # vocab: a resume checks its dataset's
    return True


def run(cfg, ddp, rank, local_rank, world, device):
    """nanoGPT's loop: every eval_interval evaluate and checkpoint; every step one optimizer step at a random depth."""
    master = rank == 0
    accum = cfg.gradient_accumulation_steps // world
    if local_rank == 0:
        ensure_data(cfg)
    if ddp:
        dist.barrier()  # the other ranks wait until the data is there
    meta = prepare.read_meta(data_path(cfg))  # meta.json only: a pickled meta.pkl is refused, never loaded
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device_type = torch.device(device).type
    # cache_enabled=False: autocast's weight cache would hand the with-grad iterations the bf16 weights it cast
    # under no_grad, and the loop weights would get no gradient (METHOD.md §3 trap, pytorch#65766)
    ctx = (nullcontext() if cfg.dtype == 'float32' else
           torch.autocast(device_type, DTYPES[cfg.dtype], cache_enabled=False))
    raw_model, optimizer, scaler, data_gen, state = build(cfg, meta, device, rank, world)
    mc = raw_model.config
    if master and not cfg.eval_only:
        start_files(cfg, state['iter_num'])
    if cfg.compile:
        raw_model.compile_loop()  # prelude / loop step / coda; the loop over r stays in Python (METHOD.md §3)
    model = raw_model
    if ddp:  # inject='none' with r > k leaves the prelude without gradient: DDP must then allow unused parameters
        model = DDP(raw_model, device_ids=[local_rank] if device_type == 'cuda' else None,
                    find_unused_parameters=mc.inject == 'none' and mc.max_depth > mc.backprop_depth)
    tokens_per_iter = accum * world * cfg.batch_size * cfg.block_size
    if master:
        print(f"{mc.n_prelude} prelude + {mc.n_loop} loop x r + {mc.n_coda} coda layers, "
              f"{raw_model.get_num_params() / 1e6:.2f}M parameters; mean depth {mc.mean_depth}, max {mc.max_depth}, "
              f"backprop {mc.backprop_depth}; {tokens_per_iter:,} tokens per step; {device} {cfg.dtype}"
              f"{' compiled' if cfg.compile else ''}; {world} process(es)")
        warn_no_prelude_grad(mc)

    next_batch = lambda: get_batch(cfg, 'train', data_gen, device)
    finite = torch.ones((), dtype=torch.int32, device=device)  # min over steps: stays 1 while every loss is finite
    start_iter, history, window_rs, t_run = state['iter_num'], [], [], time.time()
    saved_iter = start_iter if cfg.init_from == 'resume' else None  # the iter ckpt.pt holds
    pbar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not master, dynamic_ncols=True, desc='train')
    t_window = time.time()
    while True:
        it = state['iter_num']
        due = it % cfg.eval_interval == 0 or it == cfg.max_iters or cfg.eval_only
        if due and (it > start_iter or start_iter == 0 or cfg.eval_only):  # a resume does not redo its evaluation
            check_finite(finite, ddp, f"before iter {it}")
            rngs = all_rng_states(ddp, world, data_gen)  # a collective: every rank takes part
            if master and evaluate_and_save(raw_model, optimizer, scaler, state, rngs, cfg, device, ctx, t_run,
                                            pbar.write):
                saved_iter = it
            t_window = time.time()  # evaluation time is not training throughput
        if it >= cfg.max_iters or cfg.eval_only:
            break

        # the same r on every rank: fixed (ETD's k) or drawn from a generator seeded by the step (METHOD.md §3)
        r = mc.mean_depth if cfg.fixed_depth else depth_for_step(it, cfg.seed, mc.mean_depth, mc.max_depth)
        for group in optimizer.param_groups:
            group['lr'] = get_lr(it, cfg)
        loss = train_step(model, optimizer, scaler, r, next_batch, cfg, ctx, ddp, accum)
        finite = torch.minimum(finite, torch.isfinite(loss).int())
        state['iter_num'], state['tokens_seen'] = it + 1, state['tokens_seen'] + tokens_per_iter
        window_rs.append(r)
        pbar.update(1)
        if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
            check_finite(finite, ddp, f"at or before iter {it + 1}")
            dt = time.time() - t_window  # the .item() in check_finite synced the device: dt is honest
            # MFU with each step's own r: forward counts r iterations, backward only min(r, k) (METHOD.md §6)
            mfu = sum(raw_model.estimate_mfu(accum * cfg.batch_size, dt, n, cfg.peak_flops) for n in window_rs)
            history.append((it + 1, loss.item(), r))
            pbar.set_postfix_str(f"loss {loss.item():.4f}, r {r}, "
                                 f"{tokens_per_iter * len(window_rs) / dt:,.0f} tok/s, MFU {100 * mfu:.2f}%")
            window_rs, t_window = [], time.time()
    pbar.close()
    if master and not cfg.eval_only:
        print(f"trained {state['iter_num'] - start_iter} steps in {time.time() - t_run:.1f} s; best val loss "
              f"{state['best_val_loss']:.4f} (depth {mc.mean_depth}); ckpt.pt (iter {saved_iter}) and log.jsonl "
              f"in {cfg.out_dir}/")
        print_sample(raw_model, cfg, meta, device, ctx)
    return history


def main(argv=None):
    try:
        train(configure(DEFAULTS, sys.argv[1:] if argv is None else argv))
    except (ValueError, NonFiniteLoss, OSError) as e:  # our checks, unwritable files: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
