"""
Train a recurrent-depth GPT (prelude -> loop x r -> coda) at a random depth r every step (METHOD.md §3).

    python train.py                                    # CPU demo: prepares shakespeare_char, trains, prints a sample
    python train.py config/train_shakespeare_char.py --max_iters=500  # one GPU, ~10M parameters; any key: --key=value
    python train.py config/etd_midtrain_shakespeare_char.py  # ETD: mid-train the looped model etd.py converted
    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char.py --gradient_accumulation_steps=8

Every eval_interval steps it appends the train and val loss at depths 1, mean/2, mean, 2*mean and under adaptive exit
(METHOD.md §5) to out_dir/log.jsonl and writes out_dir/ckpt.pt atomically (init_from='resume' continues exactly).
A fresh run refuses an out_dir holding an earlier run's files (--overwrite=True replaces them).
"""

import dataclasses
import json
import math
import os
import sys
import time
import types
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare
from configurator import DTYPES, check_device, configure
from model import EXIT_RULES, GPT, GPTConfig, check, sample_depth
from sample import depth_sweep, generate, load_checkpoint

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
init_from = 'scratch'          # 'scratch' | 'resume' (out_dir/ckpt.pt, exactly where it stopped) | a checkpoint (or
                               # its out_dir) to mid-train: its weights, this run's depths, new optimizer (METHOD.md §4)
# data
dataset = 'shakespeare_char'   # folder name under data_dir; shakespeare_char is prepared automatically if missing
data_dir = ''                  # folder holding <dataset>/ ('' = data/ beside train.py, as prepare.py writes it)
gradient_accumulation_steps = 1  # micro-batches per optimizer step, over all DDP processes together
batch_size = 32                # sequences per micro-batch (per process)
block_size = 64                # context length
# model (GPTConfig in model.py checks these; vocab_size comes from the dataset's meta.json)
n_embd = 128                   # width of the residual stream and of the latent state
n_head = 4                     # attention heads; must divide n_embd
n_prelude = 1                  # prelude layers, run once before the loop
n_loop = 1                     # layers of the loop block, run r times with shared weights
n_coda = 1                     # coda layers, run once after the loop
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
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
MIDTRAIN = ('mean_depth', 'max_depth', 'backprop_depth', 'dropout', 'router', 'router_cost')  # a mid-train (and etd.py) sets


# -- checks, all before any work: one line naming the key, the bad value and what is allowed --------------------------
CHECKS = {  # key: (what is allowed, test); GPTConfig checks the model's own keys (n_embd, depths, inject, ...)
    **dict.fromkeys(('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps', 'batch_size',
                     'block_size', 'max_iters'), ('a number >= 1', lambda v: v >= 1)),
    **dict.fromkeys(('warmup_iters', 'lr_decay_iters', 'weight_decay', 'grad_clip', 'min_lr', 'sample_tokens',
                     'exit_threshold'), ('a number >= 0', lambda v: v >= 0)),
    **dict.fromkeys(('learning_rate', 'temperature', 'peak_flops'), ('a number > 0', lambda v: v > 0)),
    **dict.fromkeys(('beta1', 'beta2'), ('a number in [0, 1)', lambda v: 0 <= v < 1)),
    'seed': ('an integer in [0, 2**32)', lambda v: 0 <= v < 2 ** 32),  # depth_for_step shifts it by 32 bits
    **{key: (f'one of {tuple(allowed)}', lambda v, allowed=allowed: v in allowed) for key, allowed in
       (('exit_rule', EXIT_RULES), ('backend', ('nccl', 'gloo')))},
    'init_from': ("'scratch', 'resume' or an existing checkpoint path (ckpt.pt or its out_dir)",
                  lambda v: v in ('scratch', 'resume') or os.path.exists(v)),
    'out_dir': ('a folder path', bool), 'dataset': ('a dataset name', bool),
}


def check_config(cfg, world):
    """Every value train.py interprets, and the model's shape (with a stand-in vocab_size: the data comes later)."""
    check(vars(cfg), CHECKS)
    GPTConfig(**model_args(cfg, vocab_size=1))
    if cfg.gradient_accumulation_steps % world:
        raise ValueError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
                         f"{world} processes: it counts micro-batches per step over all of them (nanoGPT)")


def check_out_dir(cfg):
    """A resume needs its checkpoint; a fresh run keeps off an earlier run's files unless overwrite=True."""
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


# -- data: nanoGPT's uint16 token files and meta.json, read through prepare.py ----------------------------------------
def data_path(cfg):
    return prepare.dataset_dir(cfg.dataset, cfg.data_dir)


def ensure_data(cfg):
    """Prepare the default corpus or the showcase task when missing or cut short (meta.json comes last)."""
    path, builtin = data_path(cfg), cfg.dataset in ('shakespeare_char', 'prefix_sums')
    needed = prepare.OUTPUTS[cfg.dataset] if builtin else ('train.bin', 'val.bin')
    if all(os.path.exists(os.path.join(path, f)) for f in needed):
        return
    if builtin:
        return prepare.prepare(cfg.dataset, data_dir=os.path.dirname(path))
    how = cfg.dataset if cfg.dataset in prepare.DEFAULTS else f'text --input=<your files> --name={cfg.dataset}'
    raise ValueError(f"dataset {cfg.dataset!r} is not prepared ({path}/train.bin or val.bin is missing); "
                     f"run: python prepare.py {how}" + (f" --data_dir={cfg.data_dir}" if cfg.data_dir else ''))


def check_data(cfg, block_size):
    """A batch of block_size fits in both splits: prepare.get_batch names the file and its size if not."""
    for split in ('train', 'val'):
        prepare.get_batch(data_path(cfg), split, 1, block_size, torch.Generator())


def vocabulary(meta):
    """What token ids mean: their number and the chars or tokenizer (no meta.json: GPT-2's, padded to 50304)."""
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


def eval_batches(cfg, split, device):
    """The same eval_iters batches at every evaluation (fixed seed), so successive evaluations compare alike."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return [prepare.get_batch(data_path(cfg), split, cfg.batch_size, cfg.block_size, generator, device)
            for _ in range(cfg.eval_iters)]


# -- model, depth, learning rate --------------------------------------------------------------------------------------
def model_args(cfg, vocab_size):
    """GPTConfig's fields, taken from the train config of the same names."""
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig) if hasattr(cfg, f.name)}
    return dict(args, vocab_size=vocab_size)


def init_model(cfg, meta):
    """(model, checkpoint to resume or None): cfg's new model, or init_from's checkpoint (sample.load_checkpoint)."""
    if cfg.init_from == 'scratch':
        check_data(cfg, cfg.block_size)
        return GPT(GPTConfig(**model_args(cfg, vocabulary(meta)['vocab_size']))), None
    path = cfg.out_dir if cfg.init_from == 'resume' else cfg.init_from
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    model, ckpt = load_checkpoint(path)
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
    check_data(cfg, model.config.block_size)
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
    """Step `step`'s depth r (METHOD.md §3), seeded by (seed, step): the same on every rank and after a resume."""
    generator = torch.Generator().manual_seed((seed << 32) + step)  # distinct for every (seed, step < 2**32)
    return sample_depth(mean_depth, max_depth, generator=generator)


def warn_no_prelude_grad(config):
    """METHOD.md §3 trap: without injection, r > k cuts the last k iterations' state off from the prelude."""
    k = config.backprop_depth
    if config.inject == 'none' and config.max_depth > k:
        print(f"warning: inject='none' with max_depth={config.max_depth} > backprop_depth={k}: steps that draw r > {k} "
              f"give the prelude no gradient: set backprop_depth >= max_depth (ETD) or inject='add'", file=sys.stderr)


def configure_optimizers(model, cfg, device_type):
    """AdamW with weight decay on matrices only (nanoGPT); the fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device_type == 'cuda')


def get_lr(it, cfg):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters (nanoGPT)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# -- one optimizer step, evaluation, log and checkpoint ---------------------------------------------------------------
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


def check_finite(finite, ddp, where):
    """Stop if any rank saw a nan/inf loss, before broken weights are saved; `finite` is a device flag (one sync)."""
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise FloatingPointError(f"loss became nan/inf {where}; training stopped, the last good checkpoint (if any) "
                                 f"is kept; try a lower learning_rate, warmup_iters or grad_clip")


def evaluate(model, cfg, device, ctx):
    """sample.py's depth sweep on the fixed batches: train and val loss at r = 1, mean/2, mean, 2*mean (at most
    max_depth), and val loss under adaptive exit with its mean iterations per token. Training's RNG is untouched."""
    m = model.config.mean_depth
    depths = sorted({max(1, min(d, model.config.max_depth)) for d in (1, m // 2, m, 2 * m)})
    with torch.random.fork_rng(devices=[torch.device(device)] if 'cuda' in device else []), ctx:
        train_rows = depth_sweep(model.eval(), eval_batches(cfg, 'train', device), depths, seed=cfg.seed)
        *val_rows, adaptive = depth_sweep(model, eval_batches(cfg, 'val', device), depths, [cfg.exit_threshold],
                                          cfg.exit_rule, seed=cfg.seed)
    model.train()
    return dict(train_loss={str(row['r']): row['value'] for row in train_rows},
                val_loss={str(row['r']): row['value'] for row in val_rows},
                adaptive=dict(val_loss=adaptive['value'], mean_iterations=adaptive['mean_iterations'],
                              exit_rule=cfg.exit_rule, exit_threshold=cfg.exit_threshold))


def append_log(cfg, row):
    """Append row to out_dir/log.jsonl after the rows before its iter: later ones (a killed run's after its checkpoint,
    which its resume writes again, or an overwritten run's) go. No iter appears twice."""
    log, rows = os.path.join(cfg.out_dir, 'log.jsonl'), []
    if os.path.exists(log):
        with open(log) as f:  # a row cut short by a kill is not JSON: dropped too
            rows = [json.loads(line) for line in f if line.startswith('{') and line.rstrip().endswith('}')]
    kept = [old for old in rows if old.get('iter', math.inf) < row['iter']] + [row]
    prepare.save_atomic(log, lambda f: f.write(''.join(json.dumps(r) + '\n' for r in kept).encode()))


def rng_states(ddp, world, data_gen):
    """Every rank's random streams (rank i's at index i): torch's (noise state, dropout), CUDA's, the data order."""
    state = {'torch': torch.get_rng_state(), 'data': data_gen.get_state(),
             'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    states = [state] * world
    if ddp:
        dist.all_gather_object(states, state)
    return states


@torch.no_grad()
def print_sample(model, cfg, meta, device, ctx):
    """sample_tokens after a newline, each stopped by adaptive exit, and their mean iterations per token."""
    if cfg.sample_tokens == 0 or 'example_len' in meta or not ('chars' in meta or 'tokenizer' in meta):
        return  # a task dataset, or no vocabulary to show text in
    start = prepare.encode('\n', meta)[0] if '\n' in meta.get('chars', '\n') else 0
    with ctx:
        idx, depths = generate(
            model.eval(), torch.tensor([[start]], device=device), cfg.sample_tokens, num_steps=model.config.max_depth,
            temperature=cfg.temperature, exit_threshold=cfg.exit_threshold, exit_rule=cfg.exit_rule,
            generator=torch.Generator(device).manual_seed(cfg.seed))
    print(f"--- sample: {cfg.sample_tokens} tokens, temperature {cfg.temperature}, adaptive exit ({cfg.exit_rule} < "
          f"{cfg.exit_threshold:g}): {depths.float().mean():.2f} iterations/token (max {model.config.max_depth}) ---")
    print(prepare.decode(idx[0, 1:].tolist(), meta))


# -- the run; t holds this process's rank and device, and what training changes (model, optimizer, counters) ----------
def train(cfg):
    """Train as cfg (a config dict) says; returns [(iter, loss, r)] at every log_interval on this rank."""
    cfg = types.SimpleNamespace(**cfg)
    ddp = int(os.environ.get('RANK', -1)) != -1  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (nanoGPT)
    rank, local_rank, world = [int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')] if ddp else [0, 0, 1]
    t = types.SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world=world,
                              device=f'cuda:{local_rank}' if ddp and cfg.device.startswith('cuda') else cfg.device)
    check_config(cfg, world)  # all checks before the process group starts: every rank fails alike
    check_device(t.device, cfg.dtype)
    check_out_dir(cfg)
    if ddp:
        dist.init_process_group(backend=cfg.backend)
        if t.device.startswith('cuda'):
            torch.cuda.set_device(t.device)
    try:
        setup(cfg, t)
        return run(cfg, t)
    finally:
        if ddp:
            dist.destroy_process_group()


def setup(cfg, t):
    """On t: meta, ctx, raw_model and model (DDP), optimizer, scaler, data_gen, the loop counters `state`."""
    if t.local_rank == 0:
        ensure_data(cfg)
    if t.ddp:
        dist.barrier()  # the other ranks wait until the data is there
    t.meta = prepare.read_meta(data_path(cfg))  # meta.json only: a pickled meta.pkl is refused, never loaded
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device_type = torch.device(t.device).type
    # cache_enabled=False: autocast's weight cache would hand the with-grad iterations the bf16 weights it cast
    # under no_grad, and the loop weights would get no gradient (METHOD.md §3 trap, pytorch#65766)
    t.ctx = (nullcontext() if cfg.dtype == 'float32' else
             torch.autocast(device_type, DTYPES[cfg.dtype], cache_enabled=False))
    torch.manual_seed(cfg.seed + t.rank)
    model, ckpt = init_model(cfg, t.meta)
    adopt_architecture(cfg, model.config)
    t.raw_model, mc = model.to(t.device), model.config
    t.scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == 'float16')  # fp16 needs loss scaling, bf16 not
    t.optimizer = configure_optimizers(model, cfg, device_type)
    t.data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + t.rank)  # each rank reads its own batches
    t.state = dict(iter_num=0, best_val_loss=math.inf, tokens_seen=0)  # the loop counters a checkpoint keeps
    if ckpt is not None:
        resume(ckpt, t)
    if cfg.compile:
        model.compile_loop()  # prelude / loop step / coda; the loop over r stays in Python (METHOD.md §3)
    t.model = model if not t.ddp else DDP(  # inject='none' with r > k: the prelude gets no gradient on those steps
        model, device_ids=[t.local_rank] if device_type == 'cuda' else None,
        find_unused_parameters=mc.inject == 'none' and mc.max_depth > mc.backprop_depth)


def resume(ckpt, t):
    """Restore optimizer, loop counters and this rank's random streams: the run continues bit for bit."""
    try:
        t.optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler']:  # empty unless the checkpoint was trained in float16
            t.scaler.load_state_dict(ckpt['scaler'])
        t.state.update({k: ckpt[k] for k in t.state})
        if len(ckpt['rng']) == t.world:
            rng = ckpt['rng'][t.rank]
            torch.set_rng_state(rng['torch'])
            t.data_gen.set_state(rng['data'])
            if rng['cuda'] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng['cuda'])
        elif t.rank == 0:
            print(f"warning: the checkpoint comes from {len(ckpt['rng'])} processes, this run has {t.world}: "
                  f"batches will differ from an uninterrupted run", file=sys.stderr)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"the checkpoint's optimizer or random state is damaged ({type(err).__name__}: "
                         f"{str(err)[:100]}): resume from another checkpoint") from None


def evaluate_and_save(cfg, t, rngs, t_run, write):
    """Evaluate and print; unless eval_only, log the row and checkpoint if val loss (at mean depth) improved."""
    res, it, mean = evaluate(t.raw_model, cfg, t.device, t.ctx), t.state['iter_num'], t.raw_model.config.mean_depth
    val, a = res['val_loss'][str(mean)], res['adaptive']
    write(f"iter {it}: val loss {' | '.join(f'r={r} {v:.4f}' for r, v in res['val_loss'].items())} | adaptive "
          f"{a['val_loss']:.4f} @ {a['mean_iterations']:.2f} iterations/token; train loss r={mean} "
          f"{res['train_loss'][str(mean)]:.4f}")
    if cfg.eval_only:
        return
    append_log(cfg, dict(iter=it, tokens=t.state['tokens_seen'], lr=get_lr(max(it - 1, 0), cfg),
                         time_s=round(time.time() - t_run, 2), **res))
    if not all(math.isfinite(v) for v in [*res['val_loss'].values(), a['val_loss']]):
        raise FloatingPointError(f"val loss is nan/inf at iter {it}; stopped, the last good checkpoint is kept")
    if it == 0 or not (val < t.state['best_val_loss'] or cfg.always_save_checkpoint):
        return
    t.state['best_val_loss'], t.saved_iter = min(t.state['best_val_loss'], val), it
    ckpt = dict(model=t.raw_model.state_dict(), optimizer=t.optimizer.state_dict(), scaler=t.scaler.state_dict(),
                model_args=dataclasses.asdict(t.raw_model.config), config=vars(cfg), rng=rngs,
                vocab=vocabulary(t.meta), **t.state)  # vocab: a resume checks that its dataset's is the same
    prepare.save_atomic(os.path.join(cfg.out_dir, 'ckpt.pt'), lambda f: torch.save(ckpt, f))


def run(cfg, t):
    """nanoGPT's loop: every eval_interval evaluate and checkpoint; every step one optimizer step at a random depth."""
    mc, start_iter, t_run, accum = t.raw_model.config, t.state['iter_num'], time.time(), cfg.gradient_accumulation_steps
    tokens_per_iter, ckpt_path = accum * cfg.batch_size * cfg.block_size, os.path.join(cfg.out_dir, 'ckpt.pt')
    if t.rank == 0:
        print(f"{mc.n_prelude} prelude + {mc.n_loop} loop x r + {mc.n_coda} coda layers, "
              f"{t.raw_model.get_num_params() / 1e6:.2f}M parameters; mean depth {mc.mean_depth}, max {mc.max_depth}, "
              f"backprop {mc.backprop_depth}; {tokens_per_iter:,} tokens per step; {t.device} {cfg.dtype}"
              f"{' compiled' if cfg.compile else ''}; {t.world} process(es)")
        warn_no_prelude_grad(mc)
    if t.rank == 0 and cfg.init_from != 'resume' and not cfg.eval_only and os.path.exists(ckpt_path):
        os.remove(ckpt_path)  # overwrite=True: the earlier run's checkpoint goes (its log rows at the first write)
    next_batch = lambda: prepare.get_batch(data_path(cfg), 'train', cfg.batch_size, cfg.block_size,  # noqa: E731
                                           t.data_gen, t.device)
    finite = torch.ones((), dtype=torch.int32, device=t.device)  # min over steps: stays 1 while every loss is finite
    history, window, t_window = [], [], time.time()  # window: the depths of the steps since the last log line
    t.saved_iter = start_iter if cfg.init_from == 'resume' else None  # the iter ckpt.pt holds
    pbar = tqdm(total=cfg.max_iters, initial=start_iter, disable=t.rank != 0, dynamic_ncols=True, desc='train')
    for it in range(start_iter, cfg.max_iters + 1):
        # evaluate every eval_interval and at the end; a resume does not redo the evaluation of its checkpoint
        if cfg.eval_only or (it % cfg.eval_interval == 0 or it == cfg.max_iters) and (it > start_iter or it == 0):
            check_finite(finite, t.ddp, f"before iter {it}")
            rngs = rng_states(t.ddp, t.world, t.data_gen)  # a collective: every rank takes part
            if t.rank == 0:
                evaluate_and_save(cfg, t, rngs, t_run, pbar.write)
            t_window = time.time()  # evaluation time is not training throughput
        if it == cfg.max_iters or cfg.eval_only:
            break
        # the same r on every rank: fixed (ETD's k) or drawn from a generator seeded by the step (METHOD.md §3)
        r = mc.mean_depth if cfg.fixed_depth else depth_for_step(it, cfg.seed, mc.mean_depth, mc.max_depth)
        for group in t.optimizer.param_groups:
            group['lr'] = get_lr(it, cfg)
        loss = train_step(t.model, t.optimizer, t.scaler, r, next_batch, cfg, t.ctx, t.ddp, accum // t.world)
        finite = torch.minimum(finite, torch.isfinite(loss).int())
        t.state['iter_num'], t.state['tokens_seen'] = it + 1, t.state['tokens_seen'] + tokens_per_iter
        window.append(r)
        pbar.update(1)
        if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
            check_finite(finite, t.ddp, f"at or before iter {it + 1}")
            dt = time.time() - t_window  # the .item() in check_finite synced the device: dt is honest
            # MFU with each step's own r: forward counts r iterations, backward only min(r, k) (METHOD.md §6)
            flops = sum(t.raw_model.flops_per_token(n) for n in window) * tokens_per_iter / t.world
            mfu = flops / dt / cfg.peak_flops
            history.append((it + 1, loss.item(), r))
            pbar.set_postfix_str(f"loss {loss.item():.4f}, r {r}, {tokens_per_iter * len(window) / dt:,.0f} tok/s, "
                                 f"MFU {100 * mfu:.2f}%")
            window, t_window = [], time.time()
    pbar.close()
    if t.rank == 0 and not cfg.eval_only:
        print(f"trained {t.state['iter_num'] - start_iter} steps in {time.time() - t_run:.1f} s; best val loss "
              f"{t.state['best_val_loss']:.4f} (depth {mc.mean_depth}); ckpt.pt (iter {t.saved_iter}) and log.jsonl "
              f"in {cfg.out_dir}/")
        print_sample(t.raw_model, cfg, t.meta, t.device, t.ctx)
    return history


def main(argv=None):
    try:
        train(configure(DEFAULTS, sys.argv[1:] if argv is None else argv))
    except (ValueError, FloatingPointError, OSError) as e:  # our checks, unwritable files: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
