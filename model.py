"""
nanoloop: a recurrent-depth GPT in one file.

    tokens -> prelude -> e -> s_0 = init_state(e) -> [ s = loop_step(s, e) = Loop(inject(s, e)) ] x r -> coda -> logits

The loop block reuses its weights every iteration, so parameters do not grow with the depth r, chosen at run time.
Huginn (arXiv 2502.05171) trains this from scratch with a random r every step, with sandwich-norm blocks and rotary
positions (our defaults); ETD (arXiv 2510.07358) loops the middle layers of a pretrained GPT (etd.py), so GPT-2's
pre-norm blocks and learned positions stay available. § refers to METHOD.md. Decoding lives in sample.py.
"""

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------------------------------------------------
# The method, one function per idea, looked up at call time: a reader finds each by name, exercises/ swaps one in.


def sample_depth(mean_depth, max_depth, generator=None, sigma=0.5):
    """Huginn's log-normal Poisson depth (§3): tau ~ N(log(mean) - sigma^2/2, sigma), r = Poisson(e^tau) + 1.
    E[r] = mean_depth + 1 and the tail is heavy, so r is capped at max_depth. Returns a Python int."""
    tau = torch.normal(math.log(mean_depth) - sigma ** 2 / 2, sigma, (1,), generator=generator)
    r = torch.poisson(tau.exp(), generator=generator) + 1
    return int(min(r.item(), max_depth))


def init_state(e, kind, std, generator=None):
    """The loop's first state s_0 (§2). Huginn starts from noise (a normal cut at +-3 std, fresh per token and per call)
    so the loop learns to converge from anywhere; ETD continues the residual stream (s_0 = e); zeros is exact."""
    if kind == 'embed':
        return e
    if kind == 'zeros':
        return torch.zeros_like(e)
    device = generator.device if generator is not None else e.device  # a Generator only draws on its own device
    s = torch.empty(e.shape, dtype=e.dtype, device=device)
    return nn.init.trunc_normal_(s, 0.0, std, -3 * std, 3 * std, generator=generator).to(e.device)


def inject(s, e, kind, adapter=None):
    """Re-inject the prelude output e at the start of every iteration (§2) so the loop never forgets its input.
    'add' is s + e; 'concat' is Huginn's adapter s <- W [s; e]; 'none' is ETD's plain residual iteration."""
    if kind == 'concat':
        return adapter(torch.cat([s, e], dim=-1))
    return s + e if kind == 'add' else s


def truncated_loop(step, s, r, k):
    """Apply `step` r times; autograd records only the last min(r, k) iterations (§3, truncated backprop).
    Activation memory is O(k) whatever r is, forward cost O(r), backward O(k). `step(s, i)` gets the 0-based index."""
    n_free = max(r - k, 0)
    with torch.no_grad():
        for i in range(n_free):
            s = step(s, i)
    for i in range(n_free, r):
        s = step(s, i)
    return s


def freeze_exited(new, old, active):
    """Per-token depth (§5): positions that are no longer `active` (B, T) keep their old value."""
    return torch.where(active.unsqueeze(-1), new, old)


def fill_latest(loop_kv, depths, pos):
    """The early-exit KV cache (§5), Huginn's "latest" lookup done once at write time: a token that stopped after
    depths[b] iterations has no keys/values for later iterations, yet longer-iterating tokens attend to it there, so
    copy its last entry forward. loop_kv: (r, n_loop, 2, B, H, T, hd); depths: (B,) in 1..r; pos: its position."""
    r = loop_kv.shape[0]
    src = torch.minimum(torch.arange(r, device=depths.device)[:, None], depths[None, :] - 1)  # (r, B)
    at_pos = loop_kv[:, :, :, :, :, pos]                                                    # (r, L, 2, B, H, hd)
    loop_kv[:, :, :, :, :, pos] = at_pos.gather(0, src[:, None, None, :, None, None].expand_as(at_pos))


def kl_converged(logp_prev, logp, eps):
    """Huginn's zero-shot exit test (§5): KL(p_i || p_{i-1}) < eps. In fp32 the KL of two nearly equal distributions
    comes out around -1e-7, so clamp at 0: otherwise eps = 0 would let converged tokens exit."""
    return (logp.exp() * (logp - logp_prev)).sum(-1).clamp_min(0) < eps


def entropy_converged(logp_prev, logp, eps):
    """Cheaper alternative (§5): the entropy of the next-token distribution changed by less than eps."""
    entropy = lambda lp: -(lp.exp() * lp).sum(-1)
    return (entropy(logp) - entropy(logp_prev)).abs() < eps


def argmax_converged(logp_prev, logp, eps):
    """Cheapest alternative (§5): the most likely next token did not change (eps is unused)."""
    return logp.argmax(-1) == logp_prev.argmax(-1)


def act_halted(remaining, eps):
    """ETD's learned exit (§5, ACT): halt once the chance of still running is at most eps (ETD: eps = 0.01)."""
    return remaining <= eps


def halting_distribution(lam):
    """ACT (Graves 2016): the probability of halting exactly at iteration i, lambda_i * prod_{j<i} (1 - lambda_j),
    with what is left at the last iteration added to it so the distribution sums to 1. lam: (r, ...) -> (r, ...)."""
    running = torch.cumprod(1 - lam, dim=0)
    before = torch.cat([torch.ones_like(running[:1]), running[:-1]])
    return torch.cat([lam[:-1] * before[:-1], before[-1:]])


# rule name -> (test, iterations in a row the test must hold). Huginn's argmax rule waits for 5 stable iterations;
# 'router' needs a model with a trained halting router (config.router) and reads no logits.
EXIT_RULES = {'kl': (kl_converged, 1), 'entropy': (entropy_converged, 1), 'argmax-stable': (argmax_converged, 5),
              'router': (act_halted, 1)}


def rotate(x, cos, sin):
    """Rotary position embedding (RoPE, Su et al. 2021; Huginn's choice): turn each pair of channels of q or k by an
    angle proportional to the position, so q . k depends only on the distance between two tokens. x: (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def rotary_table(n_positions, head_dim, base=10000.0):
    """cos and sin (n_positions, head_dim / 2) of RoPE's angles: position p, frequency base^(-2j / head_dim)."""
    angles = torch.arange(n_positions).float()[:, None] * base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    return angles.cos(), angles.sin()


def attention_mask(T, pos, window, device):
    """(T, pos + T) bool: query pos + i sees key j <= pos + i, and with a window w > 0 only j > pos + i - w. With w = 2
    each layer carries information one position further: one more iteration is one more step (the showcase)."""
    q = torch.arange(pos, pos + T, device=device)[:, None]
    k = torch.arange(pos + T, device=device)[None, :]
    return (k <= q) & ((k > q - window) if window else True)

# ----------------------------------------------------------------------------------------------------------------------
# Blocks: GPT-2's pre-norm block, or Huginn's sandwich block


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.window = config.n_head, config.dropout, config.window
        self.rope = config.pos == 'rope'
        if self.rope:  # derived from the config, so not saved in checkpoints
            cos, sin = rotary_table(config.block_size, config.n_embd // config.n_head)
            self.register_buffer('cos', cos, persistent=False)
            self.register_buffer('sin', sin, persistent=False)

    def forward(self, x, kv=None, pos=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hs)
        if self.rope:
            q, k = (rotate(t, self.cos[pos:pos + T], self.sin[pos:pos + T]) for t in (q, k))
        if kv is not None:  # decoding: store this chunk at pos, attend to everything cached up to it
            kv[0, :, :, pos:pos + T], kv[1, :, :, pos:pos + T] = k, v
            k, v = kv[0, :, :, :pos + T], kv[1, :, :, :pos + T]
        # is_causal aligns top-left: a chunk after a cached prefix, or a local window, needs an explicit mask
        explicit = self.window or (kv is not None and pos and T > 1)
        mask = attention_mask(T, pos, self.window, x.device) if explicit else None
        # flash attention on CUDA when there is no explicit mask (§3 trap: a mask or fp32 falls back to slower kernels)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=mask is None and T > 1)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's GELU: exact GELU breaks the 1e-5 weight-loading identity (§4)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """norm='pre': GPT-2's x + f(LN(x)), whose residual stream grows freely. norm='sandwich': Huginn's LN(x + f(LN(x)))
    (arXiv 2502.05171 §3.1): every block returns a normalised state, so a loop fed its own output keeps its scale at
    any depth. Without it Huginn's loop "learned early to ignore the incoming state" (§4.3, their failed run)."""

    def __init__(self, config):
        super().__init__()
        norm = lambda: nn.LayerNorm(config.n_embd, bias=config.bias)
        self.ln_1, self.attn, self.ln_2, self.mlp = norm(), CausalSelfAttention(config), norm(), MLP(config)
        # the sandwich's norms after each sublayer; identities in GPT-2's pre-norm block
        self.ln_attn, self.ln_mlp = (norm(), norm()) if config.norm == 'sandwich' else (nn.Identity(), nn.Identity())

    def forward(self, x, kv=None, pos=0):
        x = self.ln_attn(x + self.attn(self.ln_1(x), kv, pos))
        return self.ln_mlp(x + self.mlp(self.ln_2(x)))

# ----------------------------------------------------------------------------------------------------------------------
# Configuration


CHOICES = dict(inject=('add', 'concat', 'none'), init_state=('noise', 'embed', 'zeros'), norm=('sandwich', 'pre'),
               pos=('rope', 'learned', 'none'))


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python, not to a config


def check(values, rules, prefix=''):
    """The one value checker (GPTConfig, forward, generate and every script's settings). values: a dict;
    rules: {name: (what is allowed, test)}. The first value its test refuses is a ValueError of one line."""
    for name, (allowed, ok) in rules.items():
        if not ok(values[name]):
            raise ValueError(f"{prefix}{name}={values[name]!r} is not allowed: expected {allowed}")


@dataclass
class GPTConfig:
    block_size: int = 256        # context length
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64
    n_embd: int = 384            # width of the residual stream and of the latent state
    n_head: int = 6              # attention heads; must divide n_embd
    n_prelude: int = 1           # prelude layers, run once (>= 0)
    n_loop: int = 2              # layers of the loop block, run r times with shared weights (>= 1)
    n_coda: int = 1              # coda layers, run once on the final state (>= 0)
    mean_depth: int = 4          # the r eval runs; training draws r with E[r] = mean_depth + 1 (Huginn's convention)
    max_depth: int = 16          # cap on the drawn r and on adaptive decoding
    backprop_depth: int = 4      # k: backprop through the last k iterations only (§3)
    inject: str = 'add'          # how e re-enters each iteration: 'add' (s + e) | 'concat' (Huginn's adapter) | 'none'
    init_state: str = 'noise'    # s_0: 'noise' (Huginn) | 'embed' (ETD: s_0 = e) | 'zeros' (exact, for tests)
    state_std: float = 1.0       # std of the noise state: ~ the scale of e after a sandwich block (Huginn)
    norm_state: bool = False     # LayerNorm the state after every iteration (bounds a pre-norm loop; §3 trap)
    norm: str = 'sandwich'       # block: 'sandwich' (Huginn: LN(x + f(LN x))) | 'pre' (GPT-2: x + f(LN x))
    pos: str = 'rope'            # positions: 'rope' (rotary, Huginn) | 'learned' (GPT-2) | 'none' (only the mask)
    window: int = 0              # attention sees the last `window` tokens (0 = all; a window uses no flash kernel)
    dropout: float = 0.0
    bias: bool = False           # biases in Linears and LayerNorms (GPT-2 has them)
    router: bool = False         # add ETD's halting router (Linear(d->1) + sigmoid on the state) for exit_rule='router'
    router_cost: float = 0.01    # its training objective's price of one more iteration, in nats per token

    def __post_init__(self):
        """Every field checked up front: a bad value is one line naming it, not a shape error deep in forward."""
        count = lambda low: (f'an integer >= {low}', lambda v: is_int(v) and v >= low)
        number = lambda allowed, ok: (allowed, lambda v: (is_int(v) or isinstance(v, float)) and ok(v))
        one_of = lambda allowed: (f'one of {allowed}', lambda v: v in allowed)
        check(vars(self), {
            **dict.fromkeys(('block_size', 'vocab_size', 'n_embd', 'n_head', 'n_loop', 'mean_depth', 'backprop_depth'),
                            count(1)),
            **dict.fromkeys(('n_prelude', 'n_coda', 'window'), count(0)),
            **{name: one_of(allowed) for name, allowed in CHOICES.items()},
            'state_std': number('a number > 0', lambda v: v > 0),
            'dropout': number('a number in [0, 1)', lambda v: 0 <= v < 1),
            'router_cost': number('a number >= 0', lambda v: v >= 0),
            'max_depth': (f'an integer >= mean_depth ({self.mean_depth})',  # mean_depth is checked by now
                          lambda v: is_int(v) and v >= self.mean_depth)}, 'GPTConfig.')
        heads = (f'a multiple of n_head ({self.n_head})', lambda v: v % self.n_head == 0)  # n_head checked above
        check(vars(self), {'n_embd': heads}, 'GPTConfig.')

    @property
    def n_layer(self):
        return self.n_prelude + self.n_loop + self.n_coda


def plain_config(n_layer, **kwargs):
    """An ordinary n_layer GPT in nanoloop's terms (§1): one pass of the loop, no injection, s_0 = e."""
    return GPTConfig(**{**dict(n_prelude=0, n_loop=n_layer, n_coda=0, mean_depth=1, max_depth=1, backprop_depth=1,
                               inject='none', init_state='embed', norm_state=False), **kwargs})

# ----------------------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        blocks = lambda n: nn.ModuleList([Block(config) for _ in range(n)])
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos == 'learned' else None,
            drop=nn.Dropout(config.dropout),
            prelude=blocks(config.n_prelude), loop=blocks(config.n_loop), coda=blocks(config.n_coda),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        # Huginn's adapter W: [s; e] (2d) -> d, no bias (§2); the other injections add no parameter
        self.adapter = nn.Linear(2 * config.n_embd, config.n_embd, bias=False) if config.inject == 'concat' else None
        self.ln_state = nn.LayerNorm(config.n_embd, bias=config.bias) if config.norm_state else nn.Identity()
        self.router = nn.Linear(config.n_embd, 1) if config.router else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings (GPT-2)
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections, counting the layers a token passes through at the mean depth
        depth = config.n_prelude + config.mean_depth * config.n_loop + config.n_coda
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameter count; it does not depend on r. Learned positions are left out by default, as in nanoGPT."""
        n_params, wpe = sum(p.numel() for p in self.parameters()), self.transformer.wpe
        return n_params - wpe.weight.numel() if non_embedding and wpe is not None else n_params

    # -- the three stages, each a unit that compile_loop() can compile on its own ------------------------------------

    def prelude(self, idx, cache=None, pos=0):
        """Tokens (B, T) at positions pos.. -> e (B, T, C)."""
        x = self.transformer.wte(idx)
        if self.transformer.wpe is not None:  # learned positions; RoPE turns q and k inside attention instead
            x = x + self.transformer.wpe(torch.arange(pos, pos + idx.size(1), device=idx.device))
        x = self.transformer.drop(x)
        for j, block in enumerate(self.transformer.prelude):
            x = block(x, None if cache is None else cache.prelude[j], pos)
        return x

    def loop_step(self, s, e, active=None, held=None, kv=None, pos=0):
        """One iteration of the loop block (§1): s_i = Loop(inject(s_{i-1}, e)).
        Per-token depth (§5): where `active` (B, T) is False the state stays, and so does every loop layer's input
        (kept in `held`), so later positions attend to exactly the latest keys/values of a token that stopped."""
        x = inject(s, e, self.config.inject, self.adapter)
        for j, block in enumerate(self.transformer.loop):
            if held is not None:
                x = held[j] = x if held[j] is None else freeze_exited(x, held[j], active)
            x = block(x, None if kv is None else kv[j], pos)
        x = self.ln_state(x)
        return x if active is None else freeze_exited(x, s, active)

    def coda(self, s, cache=None, pos=0):
        """Coda, final norm and tied head: state (B, T, C) -> logits (B, T, V)."""
        for j, block in enumerate(self.transformer.coda):
            s = block(s, None if cache is None else cache.coda[j], pos)
        return self.lm_head(self.transformer.ln_f(s))

    # -- training / evaluation ------------------------------------------------------------------------------------

    def forward(self, idx, targets=None, num_steps=None, depths=None, generator=None):
        """(logits (B, T, V), loss or None). Depth: `num_steps` fixes r; else training draws r (§3) and eval uses
        mean_depth. `depths` (B, T) gives each position its own number of iterations instead (§5)."""
        r = self.depth(idx, num_steps, depths)
        e = self.prelude(idx)
        s = init_state(e, self.config.init_state, self.config.state_std, generator)
        held, states = [None] * self.config.n_loop, []
        train_router = self.router is not None and targets is not None and self.training

        def step(s, i):
            s = self.loop_step(s, e) if depths is None else self.loop_step(s, e, depths > i, held)
            if train_router:
                states.append(s.detach())
            return s
        logits = self.coda(truncated_loop(step, s, r, self.config.backprop_depth))
        loss = None if targets is None else cross_entropy(logits, targets)
        if train_router:
            loss = loss + self.router_loss(states, targets)
        return logits, loss

    def halt_prob(self, s):
        """ETD's halting router: lambda = sigmoid(w . s + b) per token, from the state after an iteration."""
        return torch.sigmoid(self.router(s).squeeze(-1).float())

    def router_loss(self, states, targets):
        """Our router objective (ETD publishes none; §5): ACT's expected loss plus a price per iteration,
        E_halt[CE_i + router_cost * i], on detached states and CE_i: only the router learns from it."""
        with torch.no_grad():
            ce = torch.stack([cross_entropy(self.coda(s), targets, reduction='none').view_as(targets)
                              for s in states])                                                     # (r, B, T)
        halt = halting_distribution(torch.stack([self.halt_prob(s) for s in states]))          # (r, B, T)
        cost = torch.arange(1, len(states) + 1, device=ce.device).view(-1, 1, 1) * self.config.router_cost
        return (halt * (ce + cost)).sum(0).mean()

    def depth(self, idx, num_steps=None, depths=None):
        """r, the number of loop iterations to run, after checking the caller's arguments (forward's contract)."""
        cfg = self.config
        if idx.dim() != 2 or idx.size(1) > cfg.block_size:
            raise ValueError(f"idx must be (B, T) with T <= block_size ({cfg.block_size}), got {tuple(idx.shape)}")
        if depths is None:
            if num_steps is None:
                return sample_depth(cfg.mean_depth, cfg.max_depth) if self.training else cfg.mean_depth
            check({'num_steps': num_steps}, {'num_steps': ('an integer >= 1', lambda v: is_int(v) and v >= 1)})
            return num_steps
        if num_steps is not None:
            raise ValueError("give num_steps or depths, not both")
        if depths.shape != idx.shape or depths.dtype != torch.long:
            raise ValueError(f"depths must be a LongTensor of idx's shape {tuple(idx.shape)}, "
                             f"got {depths.dtype} {tuple(depths.shape)}")
        if depths.numel() and (depths.min() < 1 or depths.max() > cfg.max_depth):
            raise ValueError(f"depths must lie in 1..max_depth ({cfg.max_depth}), "
                             f"got {depths.min().item()}..{depths.max().item()}")
        return int(depths.max()) if depths.numel() else 1

    def flops_per_token(self, num_steps, backprop_depth=None):
        """FLOPs per token counted honestly (§6): the forward runs prelude + r loops + coda, the backward (twice the
        forward's matmul FLOPs) only prelude + the last k loops + coda. backprop_depth=0 counts inference only.
        A matmul costs 2 FLOPs per weight; attention 4 * T * C per layer (QK^T and AV), as nanoGPT counts it."""
        cfg = self.config
        k = min(num_steps, cfg.backprop_depth if backprop_depth is None else backprop_depth)
        layer = 2 * 12 * cfg.n_embd ** 2 + 4 * cfg.block_size * cfg.n_embd
        loop = cfg.n_loop * layer + (2 * 2 * cfg.n_embd ** 2 if cfg.inject == 'concat' else 0)
        ends = (cfg.n_prelude + cfg.n_coda) * layer + 2 * cfg.n_embd * cfg.vocab_size
        prelude_grad = k > 0 and (cfg.inject != 'none' or num_steps <= k)  # §3 trap: no path back otherwise
        backward = 2 * (ends - (0 if prelude_grad else cfg.n_prelude * layer) + k * loop) if k else 0
        return ends + num_steps * loop + backward

    def compile_loop(self, **kwargs):
        """torch.compile the three stages, not the loop (§3 trap: a compiled Python loop recompiles for every new r).
        The compiled functions shadow the methods on this instance only, so state_dict() keeps plain names."""
        for name in ('prelude', 'loop_step', 'coda'):
            setattr(self, name, torch.compile(getattr(self, name), **kwargs))
        return self

    # -- decoding -------------------------------------------------------------------------------------------------

    def new_cache(self, idx, r):
        """Preallocated keys/values (gpt-fast style) for idx's batch, in the autocast dtype when autocast is on: one
        entry per prelude and coda layer and per (iteration, loop layer), since every iteration has its own (§5)."""
        cfg, device = self.config, idx.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.lm_head.weight.dtype
        shape = (2, idx.size(0), cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)  # keys and values
        zeros = lambda *n: torch.zeros(*n, *shape, device=device, dtype=dtype)
        return SimpleNamespace(prelude=zeros(cfg.n_prelude), loop=zeros(r, cfg.n_loop), coda=zeros(cfg.n_coda))

    @torch.no_grad()
    def forward_cached(self, idx, cache, pos, num_steps, exit_test=None, s0=None):
        """Positions pos.. through the model, reading and writing `cache` -> (logits, final state). With an exit test
        (sample.ExitTest) each row stops on its own, then its latest keys/values are copied forward (fill_latest)."""
        e = self.prelude(idx, cache, pos)
        s = init_state(e, self.config.init_state, self.config.state_std) if s0 is None else s0
        for i in range(num_steps):
            s = self.loop_step(s, e, None if exit_test is None else exit_test.active, None, cache.loop[i], pos)
            if exit_test is not None and (exit_test.update(s, i, cache, pos) or i == num_steps - 1):
                fill_latest(cache.loop, exit_test.depths[:, -1], pos)  # rows that stopped wrote stale entries
                if exit_test.logits is not None:  # the exit test already read the final state through the coda
                    return exit_test.logits, s
                break
        return self.coda(s, cache, pos), s  # the last coda write at pos is from the final state


def cross_entropy(logits, targets, reduction='mean'):
    """Next-token loss over (B, T) positions; -1 targets (a task's unscored positions) are ignored."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
