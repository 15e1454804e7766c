"""
Sample from a trained nanoloop model and show how many loop iterations every token got (METHOD.md §5). This file
also holds what every script uses to run a model: load_checkpoint, generate (KV-cached, per-token adaptive exit),
adaptive_forward (the same exit, teacher-forced) and depth_sweep, as gpt-fast keeps generate.py beside model.py.

    python sample.py --out_dir=out                              # fixed depth: every token runs r = mean_depth
    python sample.py --exit_threshold=5e-4                      # adaptive exit (--exit_rule=kl|entropy|argmax-stable)
    python sample.py --exit_threshold=5e-4 --warm_start         # continuous thought: start from the last state
    python sample.py --speculative --temperature=0              # self-speculative decoding (draft shallow, verify deep)
    python sample.py --sweep --plot=sweep.png                   # val loss vs fixed depth r and vs eps, with compute
    python sample.py --start=FILE:prompt.txt --color=never      # prompt from a file; text[depth] markup

On a terminal each new token is coloured by its iterations; otherwise (or --color=never) a sample is ONE line of
markup, 'prompt[prompt]' then 'text[iterations]' per token (parse_markup() reads it back). Then a summary line.
"""

import codecs
import importlib.util
import math
import os
import re
import sys
import time
import types
import zipfile
from contextlib import nullcontext

import torch
from torch.nn import functional as F

import model as nanoloop  # its method functions looked up at call time: the exercises swap them in
import prepare
from configurator import DTYPES, check_device, configure, sync
from model import EXIT_RULES, GPT, GPTConfig, check, cross_entropy, is_int

# -----------------------------------------------------------------------------
# default config values, overridden by config/<file>.py and --key=value (configurator.py; a bare --flag = True)
out_dir = 'out'                # folder with ckpt.pt (train.py's or etd.py's out_dir), or the ckpt.pt file itself
start = '\n'                   # the prompt, or 'FILE:prompt.txt' to read it from a file
num_samples = 3                # samples, one after the other at batch 1
max_new_tokens = 300           # tokens generated per sample
temperature = 0.8              # 0 = greedy; < 1 sharper, > 1 more random
top_k = 200                    # keep the k most likely tokens (>= 1; the vocabulary size or more keeps all)
seed = 1337
num_steps = None               # r, loop iterations per token; None: mean_depth, or max_depth with adaptive exit
exit_threshold = None          # adaptive exit once the rule's distance < this (Huginn: kl 5e-4); None = off
exit_rule = 'kl'               # 'kl' | 'entropy' | 'argmax-stable' | 'router' (a model trained with a halting router)
warm_start = False             # continuous thought: a token's first state is the previous token's last state (§5)
speculative = False            # self-speculative decoding: draft with draft_depth iterations, verify at depth r
draft_depth = 1                # loop iterations of a drafted token (1..r)
n_draft = 4                    # tokens drafted before each verify pass
sweep = False                  # instead of sampling: val loss at fixed depths and under adaptive exit, as a table
sweep_thresholds = '1e-1,1e-2,1e-3,5e-4,1e-4,0'  # the exit thresholds of the sweep, comma separated
sweep_batches = 8              # fixed val batches of the sweep
sweep_batch_size = 8           # sequences per sweep batch (each block_size tokens long)
plot = ''                      # with --sweep: save a quality-vs-compute plot here (needs matplotlib)
color = 'auto'                 # 'auto' (colour on a terminal) | 'always' | 'never' (text[depth] markup)
data_dir = ''                  # folder holding <dataset>/ ('' = the checkpoint's data_dir, else data/ beside this file)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # | 'float16'
compile = False                # torch.compile prelude / loop step / coda (model.compile_loop)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k[0] != '_' and (v is None or isinstance(v, (int, float, bool, str)))}
CHECKS = {  # key: (what is allowed, test): model.check names the first bad one
    **dict.fromkeys(('num_samples', 'max_new_tokens', 'top_k', 'draft_depth', 'n_draft', 'sweep_batches',
                     'sweep_batch_size'), ('an integer >= 1', lambda v: v >= 1)),
    'num_steps': ("None (the model's depth) or an integer >= 1", lambda v: v is None or is_int(v) and v >= 1),
    'exit_threshold': ('None (off) or a number >= 0', lambda v: v is None or type(v) in (int, float) and v >= 0),
    'temperature': ('a number >= 0 (0 = greedy)', lambda v: v >= 0),
    **{key: (f'one of {allowed}', lambda v, allowed=allowed: v in allowed) for key, allowed in
       (('exit_rule', tuple(EXIT_RULES)), ('color', ('auto', 'always', 'never')))},
}
CONFLICTS = (('speculative', 'exit_threshold', 'every token is verified at the full depth r'),
             ('speculative', 'warm_start', 'the verify pass runs a chunk at once'),
             ('sweep', 'speculative', 'the sweep is teacher-forced, it decodes nothing'),
             ('sweep', 'warm_start', 'the sweep is teacher-forced, it decodes nothing'))


# -- the one checkpoint loader every script uses ------------------------------------------------------------------------
def load_checkpoint(path, device='cpu'):
    """(GPT in eval mode, checkpoint dict) from a ckpt.pt or the out_dir holding one. weights_only=True: a checkpoint
    cannot run code. Every bad file is one ValueError naming it, what is wrong and what to do."""
    file = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no checkpoint at {file}: train one with python train.py --out_dir=DIR")
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; a truncated one loses its directory at the end
        raise ValueError(f"checkpoint {file} cannot be read: it is truncated, damaged or not a checkpoint (not the "
                         f"zip archive torch.save writes); use another checkpoint or train again")
    try:
        ckpt = torch.load(file, map_location='cpu', weights_only=True)
    except Exception as err:  # truncated, random or foreign files raise many types; all mean "not a checkpoint"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        if 'weights only' in reason.lower():  # never pass on torch's advice to retry with weights_only=False
            reason = 'it holds objects other than tensors and plain values, refused because loading them runs code'
        raise ValueError(f"checkpoint {file} cannot be read ({reason}); it is damaged or not written by "
                         f"train.py: use another checkpoint or train again") from None
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ('model', 'model_args'))):
        raise ValueError(f"checkpoint {file} is not a nanoloop checkpoint: expected 'model' and 'model_args' dicts")
    try:
        model = GPT(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"checkpoint {file} does not fit this model.py ({str(err).splitlines()[0][:160]}); it "
                         f"was written by another version of nanoloop") from None
    return model.to(device).eval(), ckpt


# -- checks: every impossible value or combination is one line, before any work ---------------------------------------
def check_flags(cfg):
    check(vars(cfg), CHECKS)
    for a, b, why in CONFLICTS:
        if getattr(cfg, a) and getattr(cfg, b) is not None and getattr(cfg, b) is not False:
            raise ValueError(f"--{a} with --{b}={getattr(cfg, b)} is not possible: {why}")
    check_device(cfg.device, cfg.dtype)  # before the checkpoint: a bad device is never blamed on the file
    if cfg.plot and not (cfg.sweep and os.path.isdir(os.path.dirname(os.path.abspath(cfg.plot)))):
        raise ValueError(f"plot={cfg.plot!r} is not allowed: expected a file in an existing folder, with --sweep")
    if cfg.plot and importlib.util.find_spec('matplotlib') is None:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install matplotlib (or drop --plot)")
    parse_thresholds(cfg.sweep_thresholds)


def parse_thresholds(text):
    """'1e-2,1e-3' -> [0.01, 0.001]; anything but numbers >= 0 is named."""
    try:
        values = [float(v) for v in text.split(',') if v.strip()]
    except ValueError:
        values = [-1]
    if not values or min(values) < 0:
        raise ValueError(f"sweep_thresholds={text!r} is not allowed: expected comma separated numbers >= 0")
    return values


def depth(cfg, config):
    """r, the depth every token runs (at most, with adaptive exit), after the checks that need the model."""
    if cfg.exit_rule == 'router' and (cfg.exit_threshold is not None or cfg.sweep) and not config.router:
        raise ValueError("exit_rule='router' needs a model trained with the halting router (router=True); this "
                         "checkpoint has none: use kl, entropy or argmax-stable")
    r = cfg.num_steps or (config.mean_depth if cfg.exit_threshold is None else config.max_depth)
    if cfg.speculative and cfg.draft_depth > r:
        raise ValueError(f"draft_depth={cfg.draft_depth} is not allowed: expected 1..r={r} (drafts are the cheap ones)")
    return r


# -- vocabulary and prompt (prepare.py's meta.json, encode and decode) ------------------------------------------------
def vocabulary(path, vocab_size):
    """The meta.json (prepare.py) of the checkpoint's dataset folder `path`, checked against its vocab_size."""
    meta = prepare.read_meta(path) or ({'tokenizer': 'gpt2'} if vocab_size >= 50257 else {})  # GPT-2 from etd.py
    if 'chars' in meta and meta['vocab_size'] != vocab_size:
        raise ValueError(f"{path} has {meta['vocab_size']} tokens but the checkpoint {vocab_size}: pass --data_dir=DIR "
                         f"holding the dataset it was trained on")
    if 'chars' not in meta and meta.get('tokenizer') != 'gpt2':
        raise ValueError(f"no vocabulary for this checkpoint: {path}/meta.json is missing (pass --data_dir=DIR "
                         f"holding the dataset it was trained on, or prepare it with prepare.py)")
    return meta


def token_pieces(ids, meta):
    """One string per token; GPT-2's byte-level BPE shows a split character with the token that completes it."""
    if 'chars' in meta:
        return [meta['chars'][i] for i in ids]
    enc, decoder = prepare.gpt2_encoding(), codecs.getincrementaldecoder('utf-8')(errors='replace')
    pieces = [decoder.decode(enc.decode_single_token_bytes(i) if i < enc.n_vocab else b'\xef\xbf\xbd') for i in ids]
    return pieces[:-1] + [pieces[-1] + decoder.decode(b'', final=True)] if pieces else pieces


def read_start(start):
    """The prompt: the text itself, or the contents of FILE for 'FILE:path' (nanoGPT)."""
    if start.startswith('FILE:'):
        if not os.path.isfile(start[5:]):
            raise ValueError(f"start={start!r}: no such file {start[5:]!r}")
        start = prepare.read_utf8(start[5:])  # names the file and the first byte that is not UTF-8
    if not start:
        raise ValueError("start='' is not allowed: the prompt needs at least one token (the default is a newline)")
    return start


# -- showing the depth of every token: 256-colour shading, or text[depth] markup --------------------------------------
RAMP = (27, 33, 39, 45, 51, 50, 49, 48, 47, 46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)  # blue -> red
ESCAPES = {'\\': '\\\\', '[': '\\[', ']': '\\]', '\n': '\\n', '\r': '\\r'}
UNESCAPES = {'\\': '\\', '[': '[', ']': ']', 'n': '\n', 'r': '\r'}
MARKUP = re.compile(r'((?:[^\\\[\]]|\\[\\\[\]nr])*)\[(\d+|prompt)\]')  # escaped text, then [iterations] or [prompt]


def colored(text, d, r):
    """text in the 256-colour code for d iterations out of r: few = blue, many = red."""
    return f"\033[38;5;{RAMP[round((min(d, r) - 1) * (len(RAMP) - 1) / max(r - 1, 1))]}m{text}\033[0m"


def markup(prompt, pieces, depths):
    """One line: 'prompt[prompt]' then 'text[iterations]' per generated token, text escaped (see parse_markup)."""
    escape = lambda text: ''.join(ESCAPES.get(c, c) for c in text)  # noqa: E731
    return escape(prompt) + '[prompt]' + ''.join(f"{escape(t)}[{d}]" for t, d in zip(pieces, depths))


def parse_markup(s):
    """markup() back to [(text, iterations)], the prompt with iterations None. Raises ValueError on other input."""
    out, at = [], 0
    while at < len(s):
        m = MARKUP.match(s, at)
        if m is None or m.end() == at:
            raise ValueError(f"not nanoloop markup at character {at}: {s[at:at + 20]!r}")
        text = re.sub(r'\\(.)', lambda e: UNESCAPES[e.group(1)], m.group(1))
        out.append((text, None if m.group(2) == 'prompt' else int(m.group(2))))
        at = m.end()
    return out


def summary(i, n, depths, r, seconds, stats=None):
    """Iterations per token and the loop compute saved against every token at r (negative if more was spent)."""
    d = depths.float()
    spent = stats['iterations'] if stats else d.sum().item()  # speculative: drafts and rejected positions count too
    line = (f"--- sample {i + 1}/{n}: {d.numel()} tokens, iterations/token mean {d.mean().item():.2f} min "
            f"{int(d.min())} max {int(d.max())}, compute saved vs fixed r={r}: "
            f"{100 * (1 - spent / (r * d.numel())):.1f}%, {d.numel() / seconds:.1f} tok/s")
    if stats:
        line += (f" | speculative: {stats['accepted']}/{stats['drafted']} drafts accepted "
                 f"({100 * stats['accepted'] / max(stats['drafted'], 1):.0f}%), {d.numel() / stats['passes']:.2f} "
                 f"tokens/verify pass, {stats['iterations'] / d.numel():.2f} loop iterations/token (plain: {r})")
    return line


# -- decoding (gpt-fast's split: model.py is the model, this file decodes it; METHOD.md §5) -------------------------
class ExitTest:
    """Adaptive exit for a batch of positions (§5): after iteration i, positions whose rule held `patience` times in
    a row stop; depths counts each one's iterations. Distribution rules compare the next-token distribution with the
    previous iteration's (the first time with the uniform one, as Huginn); the router rule reads only the state."""

    def __init__(self, model, rule, eps, shape, r):
        if rule not in EXIT_RULES:
            raise ValueError(f"exit_rule={rule!r} is not allowed: expected one of {tuple(EXIT_RULES)}")
        if rule == 'router' and model.router is None:
            raise ValueError("exit_rule='router' needs a model trained with router=True; this one has no halting "
                             "router (use kl, entropy or argmax-stable)")
        device, V = model.lm_head.weight.device, model.config.vocab_size
        self.model, self.rule, self.eps = model, rule, eps
        self.converged, self.patience = EXIT_RULES[rule]  # looked up per test: the exercises swap rules in
        self.active = torch.ones(shape, dtype=torch.bool, device=device)
        self.streak = torch.zeros(shape, dtype=torch.long, device=device)
        self.depths = torch.full(shape, r, dtype=torch.long, device=device)
        self.logp = torch.full((*shape, V), -math.log(V), device=device) if rule != 'router' else None
        self.remaining = torch.ones(shape, device=device)  # router: probability of not having halted yet
        self.logits = None  # the distribution rules' last coda output, reused as the final logits

    def update(self, s, i, cache=None, pos=0):
        """Test the state after iteration i (0-based); returns True once every position has stopped."""
        if self.rule == 'router':
            self.remaining = self.remaining * (1 - self.model.halt_prob(s))
            holds = self.converged(self.remaining, self.eps)
        else:
            self.logits = self.model.coda(s, cache, pos)
            logp = F.log_softmax(self.logits.float(), dim=-1)
            holds, self.logp = self.converged(self.logp, logp, self.eps), logp
        self.streak = torch.where(holds, self.streak + 1, 0)
        stop = self.active & (self.streak >= self.patience)
        self.depths = torch.where(stop, i + 1, self.depths)
        self.active = self.active & ~stop
        return not self.active.any()


@torch.no_grad()
def adaptive_forward(model, idx, targets=None, exit_threshold=5e-4, num_steps=None, exit_rule='kl'):
    """Per-token early exit in teacher forcing, in one batched pass: every iteration the coda reads every position,
    a position whose exit rule holds is frozen (§5), and the final logits are exactly model(idx, depths=depths).
    -> (logits, loss, depths (B, T)). It approximates decoding: a position's exit test reads earlier positions'
    *current* states, a decoder their final ones, so the chosen depths may differ from generate's."""
    r = model.depth(idx, num_steps or model.config.max_depth)
    e = model.prelude(idx)
    s = nanoloop.init_state(e, model.config.init_state, model.config.state_std)
    exit_test, held = ExitTest(model, exit_rule, exit_threshold, idx.shape, r), [None] * model.config.n_loop
    for i in range(r):
        s = model.loop_step(s, e, exit_test.active, held)
        if exit_test.update(s, i):
            break
    logits = exit_test.logits if exit_test.logits is not None else model.coda(s)
    return logits, None if targets is None else cross_entropy(logits, targets), exit_test.depths


def token_probs(logits, temperature, top_k=None):
    """The next-token distribution: logits / temperature, top_k None keeping every token; one-hot argmax at 0."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[..., -1:], -float('inf'))
    return F.softmax(logits, dim=-1)


def sample_token(logits, temperature=1.0, top_k=None, generator=None):
    """Next token (B, 1) drawn from the last position's logits (B, V): the one token sampler everything uses."""
    if temperature == 0:  # greedy, once per decoded token: no one-hot over the vocabulary, no draw
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(token_probs(logits, temperature, top_k), num_samples=1, generator=generator)


def prefill(model, tokens, cache, r):
    """Run all but the last prompt token at full depth into the cache; the last one is decoded like a new token.
    -> (position of the last token, final state of the one before it or None)."""
    if tokens.size(1) == 1:
        return 0, None
    _, s = model.forward_cached(tokens[:, :-1], cache, 0, r)
    return tokens.size(1) - 1, s[:, -1:]


@torch.no_grad()
def generate(model, idx, max_new_tokens, num_steps=None, temperature=1.0, top_k=None, exit_threshold=None,
             exit_rule='kl', generator=None, warm_start=False, return_logits=False):
    """KV-cached sampling -> (tokens (B, P + max_new_tokens), depths (B, max_new_tokens)[, logits]).
    depths[:, j] is the number of iterations run at the position that predicted new token j. The prompt runs at
    the full depth r = num_steps (default mean_depth) and does not exit early (as Huginn); with exit_threshold
    every new position stops once its exit rule holds, else at r. warm_start (continuous thought, §5): a
    position's first state is the previous position's final state. A prompt longer than block_size is cropped
    from the left; when the window fills up, decoding restarts from the last block_size // 2 tokens."""
    check_generate(model, idx, max_new_tokens, temperature, top_k, exit_threshold)
    block = model.config.block_size
    r = model.depth(idx[:, -block:], model.config.mean_depth if num_steps is None else num_steps)
    tokens, cache = idx[:, -block:], model.new_cache(idx, r)
    pos, s_prev = prefill(model, tokens, cache, r)
    all_depths, all_logits = [], []
    for _ in range(max_new_tokens):
        if pos == block:  # window full: re-encode the last half block
            pos, s_prev = prefill(model, tokens[:, -(block // 2):], cache, r)
        exit_test = None if exit_threshold is None else ExitTest(model, exit_rule, exit_threshold, (idx.size(0), 1), r)
        logits, s = model.forward_cached(tokens[:, -1:], cache, pos, r, exit_test, s_prev if warm_start else None)
        all_depths.append(torch.full_like(tokens[:, -1], r) if exit_test is None else exit_test.depths[:, -1])
        all_logits.append(logits[:, -1])
        idx = torch.cat([idx, sample_token(logits[:, -1], temperature, top_k, generator)], dim=1)
        tokens, pos, s_prev = idx[:, -block:], pos + 1, s
    depths = torch.stack(all_depths, 1) if all_depths else idx.new_zeros(idx.size(0), 0)
    return (idx, depths, torch.stack(all_logits, 1)) if return_logits else (idx, depths)


def check_generate(model, idx, max_new_tokens, temperature, top_k, exit_threshold):
    """generate's contract, checked up front like forward's: one ValueError naming the bad value."""
    if not (torch.is_tensor(idx) and idx.dim() == 2 and idx.numel() > 0 and not idx.is_floating_point()):
        raise ValueError(f"idx must be a non-empty (B, T) tensor of token ids, got {getattr(idx, 'shape', idx)!r}")
    if idx.min() < 0 or idx.max() >= model.config.vocab_size:
        raise ValueError(f"token ids must lie in 0..{model.config.vocab_size - 1}, "
                         f"got {idx.min().item()}..{idx.max().item()}")
    check(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, exit_threshold=exit_threshold), {
        'max_new_tokens': ('an integer >= 0', lambda v: is_int(v) and v >= 0),
        'temperature': ('a number >= 0', lambda v: isinstance(v, (int, float)) and v >= 0),
        'top_k': ('None (all) or an integer >= 1', lambda v: v is None or (is_int(v) and v >= 1)),
        'exit_threshold': ('None (off) or a number >= 0', lambda v: v is None or v >= 0)})


# -- self-speculative decoding: the shallow model drafts, the deep model verifies (METHOD.md §5) -----------------------
def accept(p, q, drafts, generator=None):
    """Speculative sampling (Leviathan et al. 2023, Alg. 1): keep draft j with probability min(1, p_j(d)/q_j(d)),
    replace the first rejected one by a draw from max(0, p - q), or add a draw from p if none was rejected: every kept
    token is distributed as the verifier's p (greedy: kept while equal to its argmax). Rows advance together by the
    shortest kept prefix k. p: (B, n+1, V) verifier, q: (B, n, V) drafter, drafts: (B, n) -> new tokens (B, k+1)."""
    B, n = drafts.shape
    p_d, q_d = (t.gather(-1, drafts[..., None])[..., 0] for t in (p[:, :n], q))
    u = torch.rand(B, n, generator=generator, device=p.device)
    kept = (u * q_d < p_d).long().cumprod(1)  # (B, n): 1 while every draft so far was kept
    k = int(kept.sum(1).min())
    if k == n:
        return torch.cat([drafts, torch.multinomial(p[:, n], 1, generator=generator)], 1)
    residual = (p[:, k] - q[:, k]).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, k])  # p == q: nothing was rejected
    fix = torch.where(kept[:, k:k + 1].bool(), drafts[:, k:k + 1], torch.multinomial(residual, 1, generator=generator))
    return torch.cat([drafts[:, :k], fix], 1)


@torch.no_grad()
def generate_speculative(model, idx, max_new_tokens, num_steps, draft_depth=1, n_draft=4, temperature=0.0,
                         top_k=None, generator=None):
    """Self-speculative decoding -> (tokens (B, P + max_new_tokens), stats): n_draft tokens of draft_depth iterations,
    then ONE pass of [last token, drafts] at depth r = num_steps keeps the agreeing prefix and one verifier token
    (accept). Every kept token ran r iterations: greedy text equals generate(model, ..., num_steps=r, temperature=0)."""
    block, r = model.config.block_size, num_steps
    if not (1 <= draft_depth <= r and n_draft >= 1):
        raise ValueError(f"need 1 <= draft_depth ({draft_depth}) <= num_steps ({r}) and n_draft ({n_draft}) >= 1")
    cache, start = model.new_cache(idx, r), idx.size(1)
    pos, _ = prefill(model, idx[:, -block:], cache, r)
    stats = dict(drafted=0, accepted=0, passes=0, iterations=0)
    while idx.size(1) - start < max_new_tokens:
        if pos == block:  # window full: re-encode the last half block
            pos, _ = prefill(model, idx[:, -(block // 2):], cache, r)
        n = min(n_draft, max_new_tokens - (idx.size(1) - start) - 1, block - 1 - pos)  # the chunk fits the window
        drafts, q = idx[:, -1:], []  # n drafts, one cached position at a time; the verify pass rewrites their cache
        for j in range(n):
            logits, _ = model.forward_cached(drafts[:, -1:], cache, pos + j, draft_depth)
            q.append(token_probs(logits[:, -1], temperature, top_k))  # (B, V): what the draft was drawn from
            drafts = torch.cat([drafts, torch.multinomial(q[-1], 1, generator=generator)], 1)
        drafts, q = drafts[:, 1:], torch.stack(q, 1) if n else None
        logits, _ = model.forward_cached(torch.cat([idx[:, -1:], drafts], 1), cache, pos, r)  # (B, n + 1, V)
        p = token_probs(logits, temperature, top_k)
        new = accept(p, q, drafts, generator) if n else torch.multinomial(p[:, 0], 1, generator=generator)
        idx, pos = torch.cat([idx, new], 1), pos + new.size(1)
        stats = dict(drafted=stats['drafted'] + n, accepted=stats['accepted'] + new.size(1) - 1,
                     passes=stats['passes'] + 1, iterations=stats['iterations'] + n * draft_depth + (n + 1) * r)
    return idx, stats


# -- sampling ---------------------------------------------------------------------------------------------------------
def generate_sample(model, x, cfg, r, generator):
    """The decoding the flags ask for -> (tokens (B, P + N), iterations per new token (B, N), speculative stats)."""
    if cfg.speculative:
        out, stats = generate_speculative(model, x, cfg.max_new_tokens, r, cfg.draft_depth, cfg.n_draft,
                                          cfg.temperature, cfg.top_k, generator)
        return out, torch.full((x.size(0), cfg.max_new_tokens), r), stats  # every kept token ran r iterations
    out, depths = generate(model, x, cfg.max_new_tokens, num_steps=r, temperature=cfg.temperature, top_k=cfg.top_k,
                           exit_threshold=cfg.exit_threshold, exit_rule=cfg.exit_rule, generator=generator,
                           warm_start=cfg.warm_start)
    return out, depths, None


def run_samples(model, cfg, r, path, ctx):
    meta, prompt = vocabulary(path, model.config.vocab_size), read_start(cfg.start)
    x = torch.tensor([prepare.encode(prompt, meta)], dtype=torch.long, device=cfg.device)
    use_color = cfg.color == 'always' or (cfg.color == 'auto' and sys.stdout.isatty())
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    if use_color:
        print('iterations per token: ' + ' '.join(colored(d, d, r) for d in range(1, r + 1)) + '  (prompt: plain)')
    for i in range(cfg.num_samples):
        sync(cfg.device)
        t0 = time.perf_counter()
        with ctx:
            out, depths, stats = generate_sample(model, x, cfg, r, generator)
        sync(cfg.device)
        text, d = token_pieces(out[0, x.size(1):].tolist(), meta), depths[0].tolist()
        print(prompt + ''.join(colored(t, k, r) for t, k in zip(text, d)) if use_color else markup(prompt, text, d))
        print(summary(i, cfg.num_samples, depths[0], r, time.perf_counter() - t0, stats))


# -- the sweep: quality vs compute, teacher-forced (METHOD.md §5); train.py evaluates with it too ----------------------
def sweep_depths(max_depth):
    """1, 2, 4, ... up to max_depth (and max_depth itself), then 2 * max_depth: extrapolation beyond training."""
    return sorted({2 ** i for i in range(max_depth.bit_length())} | {max_depth, 2 * max_depth})


def val_loss(logits, targets):
    """The sweep's default metric: mean next-token cross-entropy (lower is better)."""
    return cross_entropy(logits.float(), targets).item()


@torch.no_grad()
def depth_sweep(model, batches, depths, thresholds=(), exit_rule='kl', metric=val_loss, seed=0):
    """A row per fixed depth r, then per adaptive-exit threshold eps (adaptive_forward, at most max_depth), the
    same noise initial state (seed) for each: setting, rule, r, eps, mean_iterations (loop iterations per token) and
    value, metric(logits, targets) averaged over the batches (val loss, or e.g. a task's accuracy)."""
    rows = []
    for r, eps in [(r, None) for r in depths] + [(model.config.max_depth, eps) for eps in thresholds]:
        torch.manual_seed(seed)
        outs = [(model(x, num_steps=r)[0], torch.full_like(x, r)) if eps is None else
                adaptive_forward(model, x, exit_threshold=eps, exit_rule=exit_rule)[::2] for x, _ in batches]
        values = [metric(logits, y) for (logits, _), (_, y) in zip(outs, batches)]
        rows.append(dict(setting=f"r={r}" if eps is None else f"{exit_rule} eps={eps:g}", r=r, eps=eps,
                         rule='fixed' if eps is None else exit_rule, value=sum(values) / len(values),
                         mean_iterations=sum(d.float().mean().item() for _, d in outs) / len(outs)))
    return rows


def save_plot(rows, path, metric_name, title):
    """Quality vs compute: fixed depths as one curve, adaptive exit (one point per eps) as another."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for fixed, style, label in ((True, 'o-', 'fixed depth r'), (False, 's--', f"adaptive exit ({rows[-1]['rule']})")):
        part = [row for row in rows if (row['rule'] == 'fixed') == fixed]
        ax.plot([row['mean_iterations'] for row in part], [row['value'] for row in part], style, label=label)
        for row in part:
            ax.annotate(row['setting'].split(' ')[-1], (row['mean_iterations'], row['value']), fontsize=7)
    ax.set_xscale('log', base=2)
    ax.set(xlabel='loop iterations per token (compute)', ylabel=metric_name, title=title)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def run_sweep(model, cfg, path, ctx):
    config, generator = model.config, torch.Generator().manual_seed(cfg.seed)  # the same windows for every setting
    batches = [prepare.get_batch(path, 'val', cfg.sweep_batch_size, config.block_size, generator, cfg.device)
               for _ in range(cfg.sweep_batches)]  # no val.bin: prepare.get_batch says how to make it
    with ctx:
        rows = depth_sweep(model, batches, sweep_depths(config.max_depth), parse_thresholds(cfg.sweep_thresholds),
                           cfg.exit_rule, val_loss, cfg.seed)
    print(f"sweep: {path} val, {cfg.sweep_batches} x {cfg.sweep_batch_size} x {config.block_size} tokens, trained "
          f"depth mean {config.mean_depth} max {config.max_depth} (adaptive exit: at most max, teacher-forced)")
    print(f"{'setting':<22}{'iterations/token':>18}{'compute vs r=' + str(config.max_depth):>18}{'val_loss':>12}")
    for row in rows:
        print(f"{row['setting']:<22}{row['mean_iterations']:>18.2f}{row['mean_iterations'] / config.max_depth:>18.2f}"
              f"{row['value']:>12.4f}")
    if cfg.plot:
        save_plot(rows, cfg.plot, 'val_loss', f"{os.path.basename(path)}: val_loss vs compute")
        print(f"plot saved to {cfg.plot}")
    return rows


# -----------------------------------------------------------------------------
def run(settings):
    cfg = types.SimpleNamespace(**settings)
    check_flags(cfg)
    torch.manual_seed(cfg.seed)
    model, ckpt = load_checkpoint(cfg.out_dir, cfg.device)
    r, train_cfg = depth(cfg, model.config), ckpt.get('config', {})
    path = prepare.dataset_dir(train_cfg.get('dataset', 'shakespeare_char'), cfg.data_dir or train_cfg.get('data_dir'))
    if cfg.compile:
        model.compile_loop()  # the loop over r stays in Python: no recompile per depth (METHOD.md §3)
    ctx = nullcontext() if cfg.dtype == 'float32' else torch.autocast(torch.device(cfg.device).type, DTYPES[cfg.dtype])
    return run_sweep(model, cfg, path, ctx) if cfg.sweep else run_samples(model, cfg, r, path, ctx)


def main(argv=None):
    try:
        run(configure(DEFAULTS, sys.argv[1:] if argv is None else argv))
    except ValueError as e:  # our own checks, the loader's and the model's: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
