"""
Train a recurrent-depth GPT (prelude -> loop x r -> coda) with a random depth r every step (METHOD.md §3).

    python train.py                                    # CPU demo: prepares shakespeare_char, trains, prints a sample
    python train.py config/train_shakespeare_char.py   # one GPU, ~10M parameters
    python train.py --max_iters=500 --mean_depth=2     # any default below, overridden on the command line
    python train.py config/etd_midtrain_shakespeare_char.py  # ETD: split a pretrained plain GPT (etd.py), mid-train it
    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char.py --gradient_accumulation_steps=8
        # DDP on one node: gradient_accumulation_steps counts micro-batches over all processes, a multiple of them
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=IP --master_port=1234 train.py ...  # two nodes

Every eval_interval steps it prints, and appends to out_dir/log.jsonl, the train and val loss at several depths
(1, mean/2, mean, 2*mean) and the val loss under adaptive exit (METHOD.md §5) with its mean iterations per token,
and writes out_dir/ckpt.pt (atomically). init_from='resume' continues exactly where that checkpoint stopped;
init_from=<pretrained model> starts from it as ETD does (METHOD.md §4): same weights, middle layers looped.
"""

import ast
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

import etd
import prepare
from model import EXIT_RULES, GPT, GPTConfig, sample_depth

# -----------------------------------------------------------------------------
# default config values: these ARE the CPU demo (`python train.py`, a few minutes on 2 cores)
# I/O
out_dir = 'out'                # checkpoint ckpt.pt and log.jsonl go here
eval_interval = 250            # steps between evaluations (and checkpoints)
log_interval = 10              # steps between progress-bar updates (each one syncs the device)
eval_iters = 10                # batches per evaluation, the same batches every time
eval_only = False              # True: evaluate once (e.g. a resumed checkpoint) and exit
always_save_checkpoint = False  # True: save at every evaluation; False: only when val loss (at mean depth) improves
init_from = 'scratch'          # 'scratch' | 'resume' (from out_dir/ckpt.pt) | a pretrained plain GPT to split by ETD:
                               # 'gpt2'..'gpt2-xl', a transformers GPT-2 directory, or a nanoloop ckpt.pt / out_dir
etd_split = 'auto'             # ETD (METHOD.md §4): 'auto' (the knees of the layers' angular-distance curve) | 'a,b,c'
                               # = n_prelude,n_loop,n_coda adding up to the pretrained model's layers
etd_sequences = 128            # ETD: training sequences the angular-distance curve is averaged over (the paper: 10k)
# data
dataset = 'shakespeare_char'   # folder name under data_dir; shakespeare_char is prepared automatically if missing
data_dir = ''                  # folder holding <dataset>/ ('' = data/ beside train.py, as prepare.py writes it)
gradient_accumulation_steps = 1  # micro-batches per optimizer step, over all DDP processes together
batch_size = 32                # sequences per micro-batch (per process)
block_size = 64                # context length
# model (GPTConfig in model.py; vocab_size comes from the dataset's meta.pkl)
n_embd = 128                   # width of the residual stream and of the latent state
n_head = 4                     # attention heads; must divide n_embd
n_prelude = 1                  # encoder layers, run once
n_loop = 1                     # layers of the loop block, run r times with shared weights
n_coda = 1                     # decoder layers, run once
mean_depth = 4                 # mean loop iterations: eval runs it, training draws r around it (E[r] = mean + 1)
max_depth = 8                  # cap on the drawn r and on adaptive exit
backprop_depth = 4             # k: backprop through the last k iterations only (METHOD.md §3)
fixed_depth = False            # True: every step runs exactly mean_depth iterations (ETD's fixed k); False: random r
inject = 'concat'              # 'concat' (Huginn adapter) | 'add' | 'none' (ETD; needs backprop_depth >= max_depth)
init_state = 'noise'           # s_0: 'noise' (Huginn) | 'embed' (ETD) | 'zeros'
state_std = 0.02               # std of the noise state
norm_state = True              # LayerNorm the state after every iteration (keeps its scale bounded for any r)
norm = 'pre'                   # blocks: 'pre' (GPT-2) | 'sandwich' (Huginn: a LayerNorm after each residual add too)
pos = 'learned'                # positions: 'learned' (GPT-2) | 'rope' (rotary)
scale_embed = False            # token embeddings times sqrt(n_embd) (Huginn)
dropout = 0.0                  # 0 for pretraining, 0.1+ for finetuning
bias = False                   # biases in Linears and LayerNorms
router = False                 # train ETD's halting router too (for exit_rule='router'; model.py's GPT.router_loss)
router_cost = 0.01             # the router's price of one more iteration, in nats per token
# AdamW and learning-rate schedule (linear warmup, cosine decay to min_lr)
learning_rate = 2e-3           # peak learning rate
max_iters = 1500               # total optimizer steps
weight_decay = 0.1             # on matrices only
beta1 = 0.9
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
temperature = 0.8              # of that sample
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else (
    'float16' if torch.cuda.is_available() else 'float32')  # 'float32' | 'bfloat16' | 'float16' (autocast)
compile = torch.cuda.is_available()  # compile prelude / loop step / coda (model.compile_loop), never the loop itself
backend = 'nccl'               # DDP backend: 'nccl' on GPUs, 'gloo' on CPUs
seed = 1337                    # seeds init, data order and the depth of every step
peak_flops = 312e12            # for MFU: A100 bf16 312e12, H100 SXM bf16 989e12
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
DEFAULTS = {k: globals()[k] for k in config_keys}  # the values above, before any override
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


class NonFiniteLoss(Exception):
    """Training diverged: stop before a checkpoint of broken weights is written."""

# -----------------------------------------------------------------------------
# configuration: defaults, then config/<file>.py, then --key=value (nanoGPT's order, without its exec'd globals)


def configure(defaults, argv):
    """defaults overridden, in argv order, by config files (positional args) and --key=value; returns a new dict.
    An unknown key or a value of the wrong type raises ValueError with one line saying what is allowed."""
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                raise ValueError(f"{arg!r}: expected --key=value")
            cfg[key] = checked(defaults, key, parse_value(raw, defaults.get(key)), arg)
        else:
            for key, value in read_config_file(arg).items():
                cfg[key] = checked(defaults, key, value, arg)
    return cfg


def parse_value(raw, default):
    """'--key=raw' -> a value: strings stay as typed, anything else is a Python literal (3, 1e-3, True)."""
    if isinstance(default, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # then checked() reports it as the wrong type


def checked(defaults, key, value, source):
    """value, if key is a config key and value has its default's type (an int is accepted for a float)."""
    if key not in defaults:
        raise ValueError(f"unknown config key {key!r} (from {source}); allowed: {', '.join(sorted(defaults))}")
    expected = type(defaults[key])
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:
        raise ValueError(f"{key}={value!r} (from {source}) is {type(value).__name__}, expected {expected.__name__} "
                         f"like the default {defaults[key]!r}")
    return value


def read_config_file(path):
    """The plain values a config file assigns; its imports and helper functions are skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found (positional arguments are config files; "
                         f"single values go as --key=value)")
    namespace = {}
    try:
        exec(open(path).read(), namespace)
    except Exception as e:
        raise ValueError(f"config file {path!r} failed to run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType) and not callable(v)}


def check_choices(cfg):
    """The string settings train.py itself interprets (GPTConfig checks the model's own)."""
    for key, allowed in (('dtype', tuple(DTYPES)), ('exit_rule', tuple(EXIT_RULES))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not allowed: expected one of {allowed}")
    for key in ('eval_interval', 'log_interval', 'eval_iters', 'batch_size', 'gradient_accumulation_steps'):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)} is not allowed: expected an integer >= 1")

# -----------------------------------------------------------------------------
# data: nanoGPT's uint16 token files, random windows drawn from a generator the checkpoint keeps


def data_path(cfg):
    return prepare.dataset_dir(cfg.dataset, cfg.data_dir)


def ensure_data(cfg):
    """Prepare the embedded default corpus or the showcase task on first use; any other dataset must have been
    prepared by the user."""
    path = data_path(cfg)
    if all(os.path.exists(os.path.join(path, f)) for f in ('train.bin', 'val.bin')):
        return
    if cfg.dataset in ('shakespeare_char', 'prefix_sums'):
        prepare.prepare(cfg.dataset, data_dir=os.path.dirname(path))
        return
    how = cfg.dataset if cfg.dataset in prepare.DEFAULTS else f'text --input=<your files> --name={cfg.dataset}'
    raise ValueError(f"dataset {cfg.dataset!r} is not prepared ({path}/train.bin is missing); "
                     f"run: python prepare.py {how}" + (f" --data_dir={cfg.data_dir}" if cfg.data_dir else ''))


def get_batch(cfg, split, generator, device):
    return prepare.get_batch(data_path(cfg), split, cfg.batch_size, cfg.block_size, generator, device)

# -----------------------------------------------------------------------------
# model, depth, learning rate


def model_args(cfg, vocab_size):
    """GPTConfig's fields, taken from the train config of the same names."""
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig) if hasattr(cfg, f.name)}
    return dict(args, vocab_size=vocab_size)


def init_model(cfg, device='cpu', master=True):
    """(model, checkpoint or None) for cfg.init_from. 'resume' takes the architecture from the checkpoint, ETD
    (a pretrained model) from the pretrained model."""
    if cfg.init_from == 'scratch':
        vocab_size = prepare.read_meta(data_path(cfg)).get('vocab_size', 50304)  # GPT-2's 50257 padded to a multiple of 64
        return GPT(GPTConfig(**model_args(cfg, vocab_size))), None
    if cfg.init_from != 'resume':
        return init_etd(cfg, device, master), None
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise ValueError(f"init_from='resume' but there is no checkpoint {path}; train with init_from='scratch' first")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model, ckpt


def init_etd(cfg, device, master):
    """ETD mid-training (METHOD.md §4, etd.py): split a pretrained plain GPT into prelude / loop / coda at the knees
    of its angular-distance curve on training text, keeping every weight; print the curve, save out_dir/etd_split.json.
    The loop then trains with this run's depth settings and full backprop by default (§3 trap)."""
    if cfg.init_from not in etd.GPT2_NAMES and not os.path.exists(cfg.init_from):
        raise ValueError(f"init_from={cfg.init_from!r} is not allowed: expected 'scratch', 'resume', one of "
                         f"{etd.GPT2_NAMES}, or the path of a plain nanoloop checkpoint / out_dir or GPT-2 directory")
    batches = etd.sample_batches(data_path(cfg), cfg.etd_sequences, cfg.block_size, seed=cfg.seed)
    settings = {key: getattr(cfg, key) for key in etd.SETTABLE if hasattr(cfg, key)}  # depth, dropout (, router)
    model = etd.convert_pretrained(cfg.init_from, cfg.etd_split, [b.to(device) for b in batches], **settings)
    meta, vocab_size = prepare.read_meta(data_path(cfg)), model.config.vocab_size
    if meta.get('vocab_size', 0) > vocab_size or ('itos' in meta and meta['vocab_size'] != vocab_size):
        raise ValueError(f"dataset {cfg.dataset!r} ({meta['vocab_size']} tokens) is not tokenized like "
                         f"init_from={cfg.init_from!r} ({vocab_size} tokens): mid-train on the pretraining tokenizer")
    if master:
        print(etd.curve_chart(model.etd_info))
        os.makedirs(cfg.out_dir, exist_ok=True)
        etd.save_split(model.etd_info, os.path.join(cfg.out_dir, 'etd_split.json'))
    return model


def adopt_architecture(cfg, config):
    """On resume the model is the checkpoint's: cfg takes its GPTConfig values, with a note where they differ."""
    for key, value in dataclasses.asdict(config).items():
        if hasattr(cfg, key) and getattr(cfg, key) != value:
            print(f"note: using the checkpoint's {key}={value!r}, not {getattr(cfg, key)!r}", file=sys.stderr)
            setattr(cfg, key, value)


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
    return {'python': random.getstate(),
            'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            'data': data_gen.get_state()}


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
    if not ddp:
        return [rng_state(data_gen)]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state(data_gen))
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
    """Mean train/val loss at each eval depth, and val loss under adaptive exit with its mean iterations per token."""
    model.eval()
    out = {'train_loss': {}, 'val_loss': {}}
    cuda_devices = [torch.device(device)] if 'cuda' in device else []
    with torch.random.fork_rng(devices=cuda_devices), ctx:  # eval's noise states must not move the training RNG
        for split in ('train', 'val'):
            batches = eval_batches(cfg, split, device)
            for r in eval_depths(model.config):
                torch.manual_seed(cfg.seed)  # the same noise initial state at every evaluation
                losses = [model(x, y, num_steps=r)[1].item() for x, y in batches]
                out[f'{split}_loss'][str(r)] = sum(losses) / len(losses)
        out['adaptive'] = adaptive_loss(model, cfg, batches)  # batches: val's
    model.train()
    return out


def adaptive_loss(model, cfg, batches):
    """Val loss when every token stops by the exit rule (teacher-forced, model.adaptive_forward; METHOD.md §5)."""
    losses, depths = [], []
    for x, y in batches:
        _, loss, d = model.adaptive_forward(x, y, exit_threshold=cfg.exit_threshold, exit_rule=cfg.exit_rule)
        losses.append(loss.item())
        depths.append(d.float().mean().item())
    return {'val_loss': sum(losses) / len(losses), 'mean_depth': sum(depths) / len(depths),
            'exit_threshold': cfg.exit_threshold, 'exit_rule': cfg.exit_rule}


def format_eval(it, res, mean):
    val = ' | '.join(f"r={r} {v:.4f}" for r, v in res['val_loss'].items())
    a = res['adaptive']
    return (f"iter {it}: val loss {val} | adaptive {a['val_loss']:.4f} @ {a['mean_depth']:.2f} it/token; "
            f"train loss r={mean} {res['train_loss'][str(mean)]:.4f}")


@torch.no_grad()
def print_sample(model, cfg, device, ctx):
    """Generate sample_tokens after a newline with adaptive exit, and show the text with its iterations per token."""
    meta = prepare.read_meta(data_path(cfg))
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


def setup_distributed(cfg):
    """(ddp, rank, local_rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (nanoGPT)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, cfg.device
    dist.init_process_group(backend=cfg.backend)
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    device = f'cuda:{local_rank}' if cfg.device.startswith('cuda') else cfg.device
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
    return True, rank, local_rank, world, device


def train(cfg):
    """Train as cfg (a config dict) says; returns [(iter, loss, r)] at every log_interval on this rank."""
    cfg = types.SimpleNamespace(**cfg)
    check_choices(cfg)
    world = int(os.environ.get('WORLD_SIZE', 1))  # checked before the process group starts: every rank fails alike
    if cfg.gradient_accumulation_steps % world:
        raise ValueError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
                         f"{world} processes: it counts micro-batches per step over all of them (nanoGPT)")
    ddp, rank, local_rank, world, device = setup_distributed(cfg)
    try:
        return run(cfg, ddp, rank, local_rank, world, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def build(cfg, device, rank, world):
    """Model (on device), optimizer, grad scaler, the data generator, and the loop state, from scratch or resumed."""
    torch.manual_seed(cfg.seed + rank)
    model, ckpt = init_model(cfg, device, rank == 0)
    adopt_architecture(cfg, model.config)
    model.to(device)
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == 'float16')  # fp16 needs loss scaling, bf16 not
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # each rank reads its own batches
    state = dict(iter_num=0, best_val_loss=float('inf'), tokens_seen=0)  # the loop counters a checkpoint keeps
    if ckpt is not None:
        resume(ckpt, optimizer, scaler, data_gen, state, rank, world)
    return model, optimizer, scaler, data_gen, state


def resume(ckpt, optimizer, scaler, data_gen, state, rank, world):
    """Restore optimizer, loop counters and this rank's random streams: the run continues bit for bit."""
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt['scaler']:  # empty unless the checkpoint was trained in float16
        scaler.load_state_dict(ckpt['scaler'])
    state.update({k: ckpt[k] for k in state})
    if len(ckpt['rng']) == world:
        set_rng_state(ckpt['rng'][rank], data_gen)
    elif rank == 0:
        print(f"warning: the checkpoint comes from {len(ckpt['rng'])} processes, this run has {world}: "
              f"batches will differ from an uninterrupted run", file=sys.stderr)


def evaluate_and_save(model, optimizer, scaler, state, rngs, cfg, device, ctx, t_run, write):
    """Evaluate, append the row to out_dir/log.jsonl, and checkpoint when val loss (at mean depth) improved."""
    res = evaluate(model, cfg, device, ctx)
    it = state['iter_num']
    row = dict(iter=it, tokens=state['tokens_seen'], lr=get_lr(max(it - 1, 0), cfg),
               time_s=round(time.time() - t_run, 2), **res)
    with open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')
    write(format_eval(it, res, model.config.mean_depth))
    if not all(math.isfinite(v) for v in [*res['val_loss'].values(), res['adaptive']['val_loss']]):
        raise NonFiniteLoss(f"val loss is nan/inf at iter {it}; stopped, the last good checkpoint is kept")
    val = res['val_loss'][str(model.config.mean_depth)]
    if (val < state['best_val_loss'] or cfg.always_save_checkpoint) and it > 0 and not cfg.eval_only:
        state['best_val_loss'] = min(state['best_val_loss'], val)
        save_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'), dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
            model_args=dataclasses.asdict(model.config), config=vars(cfg), rng=rngs, **state))


def run(cfg, ddp, rank, local_rank, world, device):
    """nanoGPT's loop: every eval_interval evaluate and checkpoint; every step one optimizer step at a random depth."""
    master = rank == 0
    accum = cfg.gradient_accumulation_steps // world
    if local_rank == 0:
        ensure_data(cfg)
    if ddp:
        dist.barrier()  # the other ranks wait until the data is there
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    # cache_enabled=False: autocast's weight cache would hand the with-grad iterations the bf16 weights it cast
    # under no_grad, and the loop weights would get no gradient (METHOD.md §3 trap, pytorch#65766)
    ctx = (nullcontext() if cfg.dtype == 'float32' else
           torch.autocast(device_type, DTYPES[cfg.dtype], cache_enabled=False))
    raw_model, optimizer, scaler, data_gen, state = build(cfg, device, rank, world)
    mc = raw_model.config
    os.makedirs(cfg.out_dir, exist_ok=True)
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
    pbar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not master, dynamic_ncols=True, desc='train')
    t_window = time.time()
    while True:
        it = state['iter_num']
        due = it % cfg.eval_interval == 0 or it == cfg.max_iters or cfg.eval_only
        if due and (it > start_iter or start_iter == 0 or cfg.eval_only):  # a resume does not redo its evaluation
            check_finite(finite, ddp, f"before iter {it}")
            rngs = all_rng_states(ddp, world, data_gen)  # a collective: every rank takes part
            if master:
                evaluate_and_save(raw_model, optimizer, scaler, state, rngs, cfg, device, ctx, t_run, pbar.write)
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
              f"{state['best_val_loss']:.4f} (depth {mc.mean_depth}); checkpoint and log.jsonl in {cfg.out_dir}/")
        print_sample(raw_model, cfg, device, ctx)
    return history


def main(argv=None):
    try:
        train(configure(DEFAULTS, sys.argv[1:] if argv is None else argv))
    except (ValueError, NonFiniteLoss) as e:  # our own checks: one line, no traceback (STYLE.md)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
