"""
Sample from a trained nanoloop model and show how long it thought about every token (METHOD.md §5).

    python sample.py --out_dir=out                              # fixed depth: every token runs R = mean_depth loops
    python sample.py --exit_threshold=5e-4                      # adaptive exit (Huginn's KL rule): depth per token
    python sample.py --exit_threshold=5e-4 --warm_start         # continuous thought: start from the last state
    python sample.py --exit_rule=argmax-stable --exit_threshold=0  # other rules: kl | entropy | argmax-stable | router
    python sample.py --speculative --temperature=0              # self-speculative decoding (draft shallow, verify deep)
    python sample.py --sweep --plot=sweep.png                   # val loss vs fixed depth r and vs EPS, with compute
    python sample.py --start=FILE:prompt.txt --color=never      # prompt from a file; text[depth] markup

On a terminal each generated token is coloured by its number of loop iterations (a legend comes first); with
--color=never, or when stdout is not a terminal, every sample is ONE line of markup: the prompt tagged [prompt], then
each token's text followed by [iterations]; backslash escapes \\ \\[ \\] and newlines (\\n, \\r) in the text, so
parse_markup() recovers every token exactly. After each sample a summary line: iterations per token, the compute saved
versus running every token at the fixed depth R, tokens/s.
"""

import codecs
import importlib.util
import os
import re
import sys
import time
import types
from contextlib import nullcontext

import torch
from torch.nn import functional as F

import prepare
from configurator import configure
from model import EXIT_RULES, load_checkpoint

# -----------------------------------------------------------------------------
# default config values, overridden by config/<file>.py and --key=value (configurator.py; a bare --flag = True)
out_dir = 'out'                # folder with ckpt.pt (train.py's or etd.py's out_dir), or the ckpt.pt file itself
start = '\n'                   # the prompt, or 'FILE:prompt.txt' to read it from a file
num_samples = 3                # samples, one after the other at batch 1
max_new_tokens = 300           # tokens generated per sample
temperature = 0.8              # 0 = greedy; < 1 sharper, > 1 more random
top_k = 200                    # keep the k most likely tokens (>= 1; the vocabulary size or more keeps all)
seed = 1337
num_steps = 0                  # R, loop iterations per token; 0 = mean_depth, or max_depth with adaptive exit
exit_threshold = -1.0          # EPS: adaptive exit once the rule's distance < EPS (Huginn: kl 5e-4); < 0 = off
exit_rule = 'kl'               # 'kl' | 'entropy' | 'argmax-stable' | 'router' (a model trained with a halting router)
warm_start = False             # continuous thought: a token's first state is the previous token's last state (§5)
speculative = False            # self-speculative decoding: draft with draft_steps loops, verify at depth R
draft_steps = 1                # loop iterations of a drafted token (1..R)
n_draft = 4                    # tokens drafted before each verify pass
sweep = False                  # instead of sampling: val loss at fixed depths and under adaptive exit, as a table
sweep_thresholds = '1e-1,1e-2,1e-3,5e-4,1e-4,0'  # the EPS values of the sweep, comma separated
sweep_batches = 8              # fixed val batches of the sweep
sweep_batch_size = 8           # sequences per sweep batch (each block_size tokens long)
plot = ''                      # with --sweep: save a quality-vs-compute plot here (needs matplotlib)
color = 'auto'                 # 'auto' (colour on a terminal) | 'always' | 'never' (text[depth] markup)
data_dir = ''                  # folder holding <dataset>/ ('' = the checkpoint's data_dir, else data/ beside this file)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # | 'float16'
compile = False                # torch.compile prelude / loop step / coda (model.compile_loop)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
COLORS = ('auto', 'always', 'never')

# -----------------------------------------------------------------------------
# flags
def check_flags(cfg):
    """Every impossible value or combination, in one line, before any work is done."""
    for key, low in (('num_samples', 1), ('max_new_tokens', 1), ('num_steps', 0), ('top_k', 1), ('draft_steps', 1),
                     ('n_draft', 1), ('sweep_batches', 1), ('sweep_batch_size', 1)):
        if getattr(cfg, key) < low:
            raise ValueError(f"{key}={getattr(cfg, key)} is not allowed: expected an integer >= {low}")
    if cfg.temperature < 0:
        raise ValueError(f"temperature={cfg.temperature} is not allowed: expected a number >= 0 (0 = greedy)")
    for key, allowed in (('exit_rule', tuple(EXIT_RULES)), ('color', COLORS), ('dtype', tuple(DTYPES))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not allowed: expected one of {allowed}")
    for a, b, why in (('speculative', 'exit_threshold', 'every token is verified at the full depth R'),
                      ('speculative', 'warm_start', 'the verify pass runs a chunk at once'),
                      ('sweep', 'speculative', 'the sweep is teacher-forced, it decodes nothing'),
                      ('sweep', 'warm_start', 'the sweep is teacher-forced, it decodes nothing')):
        if getattr(cfg, a) and (cfg.exit_threshold >= 0 if b == 'exit_threshold' else getattr(cfg, b)):
            raise ValueError(f"--{a} with --{b}={getattr(cfg, b)} is not possible: {why}")
    check_device(cfg.device)  # before the checkpoint: a bad device is never blamed on the file
    if cfg.plot and not cfg.sweep:
        raise ValueError(f"plot={cfg.plot!r} needs --sweep (it plots the sweep)")
    if cfg.plot and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.plot))):
        raise ValueError(f"plot={cfg.plot!r}: its folder does not exist (create it first)")
    if cfg.plot and importlib.util.find_spec('matplotlib') is None:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install matplotlib (or drop --plot)")
    sweep_eps(cfg.sweep_thresholds)


def sweep_eps(text):
    """'1e-2,1e-3' -> [0.01, 0.001]; a value that is not a number >= 0 is named."""
    try:
        values = [float(v) for v in text.split(',') if v.strip()]
    except ValueError:
        values = [-1.0]
    if not values or min(values) < 0:
        raise ValueError(f"sweep_thresholds={text!r} is not allowed: expected comma separated numbers >= 0")
    return values


def check_model_flags(cfg, config):
    """The checks that need the checkpoint's architecture; returns R, the depth every token is compared against."""
    if cfg.exit_rule == 'router' and (cfg.exit_threshold >= 0 or cfg.sweep) and not config.router:
        raise ValueError("exit_rule='router' needs a model trained with the halting router (router=True); this "
                         "checkpoint has none: use kl, entropy or argmax-stable")
    R = cfg.num_steps or (config.max_depth if cfg.exit_threshold >= 0 else config.mean_depth)
    if cfg.speculative and cfg.draft_steps > R:
        raise ValueError(f"draft_steps={cfg.draft_steps} is not allowed: expected 1..R={R} (drafts are the cheap ones)")
    return R


def check_device(device):
    """One line naming a device that is not usable here, and the ones that are (bench.py uses it too)."""
    here = ['cpu', *(f'cuda:{i}' for i in range(torch.cuda.device_count()))]
    here += ['mps'] * torch.backends.mps.is_available()
    if device not in here + ['cuda'] * torch.cuda.is_available():
        raise ValueError(f"device={device!r} is not available here: expected one of {', '.join(here)}")


def sync(device):
    """CUDA launches are asynchronous: wait for the GPU so the clock measures its work, not the launch."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()

# -----------------------------------------------------------------------------
# vocabulary and prompt (prepare.py's meta.json, encode and decode)
def vocabulary(cfg, train_cfg, vocab_size):
    """(encode: str -> ids, pieces: ids -> one string per token) in the vocabulary of the checkpoint's dataset."""
    path = prepare.dataset_dir(train_cfg.get('dataset', 'shakespeare_char'), cfg.data_dir or train_cfg.get('data_dir'))
    meta = prepare.read_meta(path) or ({'tokenizer': 'gpt2'} if vocab_size >= 50257 else {})  # GPT-2 from etd.py
    if 'chars' in meta and meta['vocab_size'] != vocab_size:
        raise ValueError(f"{path} has {meta['vocab_size']} tokens but the checkpoint {vocab_size}: pass --data_dir=DIR "
                         f"holding the dataset it was trained on")
    if 'chars' in meta:
        return lambda s: prepare.encode(s, meta), lambda ids: [prepare.decode([i], meta) for i in ids]
    if meta.get('tokenizer') == 'gpt2':
        return lambda s: prepare.encode(s, meta), lambda ids: bpe_pieces(prepare.gpt2_encoding(), ids)
    raise ValueError(f"no vocabulary for this checkpoint: {path}/meta.json is missing (pass --data_dir=DIR holding the "
                     f"dataset it was trained on, or prepare it with prepare.py)")


def bpe_pieces(enc, ids):
    """One string per GPT-2 token. BPE is byte-level, so a token can end inside a multi-byte character: its bytes
    wait in the incremental decoder and show up with the token that completes the character. Ids above GPT-2's
    50257 (the vocabulary is padded to 50304) show as U+FFFD."""
    decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
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

# -----------------------------------------------------------------------------
# showing the depth of every token: 256-colour shading, or text[depth] markup
RAMP = (27, 33, 39, 45, 51, 50, 49, 48, 47, 46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)  # blue -> red
ESCAPES = {'\\': '\\\\', '[': '\\[', ']': '\\]', '\n': '\\n', '\r': '\\r'}
UNESCAPES = {'\\': '\\', '[': '[', ']': ']', 'n': '\n', 'r': '\r'}
MARKUP = re.compile(r'((?:[^\\\[\]]|\\[\\\[\]nr])*)\[(\d+|prompt)\]')  # escaped text, then [iterations] or [prompt]


def colored(text, d, R):
    """text in the 256-colour code for d iterations out of R: few = blue, many = red."""
    return f"\033[38;5;{RAMP[round((min(d, R) - 1) * (len(RAMP) - 1) / max(R - 1, 1))]}m{text}\033[0m"


def markup(prompt, pieces, depths):
    """One line: 'prompt[prompt]' then 'text[iterations]' per generated token, text escaped (see parse_markup)."""
    escape = lambda text: ''.join(ESCAPES.get(c, c) for c in text)
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


def summary(i, n, depths, R, seconds, stats=None):
    """Iterations per token and the compute saved against running every token at R (loop iterations only; negative
    when more were spent, as self-speculative decoding does)."""
    d = depths.float()
    spent = stats['loop_iters'] if stats else d.sum().item()  # speculative: drafts and rejected positions count too
    saved = 100 * (1 - spent / (R * d.numel()))
    line = (f"--- sample {i + 1}/{n}: {d.numel()} tokens, iterations/token mean {d.mean().item():.2f} min "
            f"{int(d.min())} max {int(d.max())}, compute saved vs fixed R={R}: {saved:.1f}%, "
            f"{d.numel() / seconds:.1f} tok/s")
    if stats:
        line += (f" | speculative: {stats['accepted']}/{stats['drafted']} drafts accepted "
                 f"({100 * stats['accepted'] / max(stats['drafted'], 1):.0f}%), {d.numel() / stats['passes']:.2f} "
                 f"tokens/verify pass, {stats['loop_iters'] / d.numel():.2f} loop iterations/token (plain: {R})")
    return line

# -----------------------------------------------------------------------------
# self-speculative decoding: the shallow model drafts, the deep model verifies (METHOD.md §5)
def token_probs(logits, temperature, top_k=None):
    """The distribution model.sample_token draws from (top_k None = all): one-hot argmax at temperature 0, so that
    torch.multinomial on it is the greedy choice too."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[..., -1:], -float('inf'))
    return F.softmax(logits, dim=-1)


def draft_tokens(model, last, cache, pos, steps, n, temperature, top_k, generator):
    """n tokens of the shallow model (`steps` loop iterations), one cached position at a time from pos.
    They write only loop slots 0..steps-1 of their positions; the verify pass rewrites all of them.
    -> (tokens (B, n), the distributions they were drawn from (B, n, V))."""
    tokens, probs = [], []
    for j in range(n):
        logits, _ = model.forward_cached(last, cache, pos + j, steps)
        probs.append(token_probs(logits[:, -1], temperature, top_k))
        last = torch.multinomial(probs[-1], 1, generator=generator)
        tokens.append(last)
    return torch.cat(tokens, 1), torch.stack(probs, 1)


def accept(p, q, drafts, generator=None):
    """Speculative sampling (Leviathan et al. 2023, Alg. 1): keep draft j with probability min(1, p_j(d)/q_j(d)),
    replace the first rejected one by a draw from max(0, p - q), or add a draw from p if none was rejected; every kept
    token is then distributed exactly as the verifier's p. Greedy: p and q are one-hot, so drafts are kept while they
    equal the verifier's argmax, and its argmax follows. Rows advance together by the shortest kept prefix k.
    p: (B, n+1, V) verifier, q: (B, n, V) drafter, drafts: (B, n) -> new tokens (B, k+1)."""
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
def generate_speculative(model, idx, max_new_tokens, num_steps, draft_steps=1, n_draft=4, temperature=0.0,
                         top_k=None, generator=None):
    """Self-speculative decoding -> (tokens (B, P + max_new_tokens), stats dict).
    The same weights draft n_draft tokens with only draft_steps loop iterations each, then ONE forward of the chunk
    [last token, drafts] at the full depth R = num_steps verifies them all; the agreeing prefix is kept plus one
    token of the verifier's own (accept). Every kept token was computed at full depth, so at temperature 0 the text
    equals model.generate(..., num_steps=R, temperature=0); rejected positions of the cache (indexed by position)
    are simply overwritten later. The context window restarts from its last half when full, as model.generate does."""
    cfg, R = model.config, num_steps
    if not (1 <= draft_steps <= R and n_draft >= 1):
        raise ValueError(f"need 1 <= draft_steps ({draft_steps}) <= num_steps ({R}) and n_draft ({n_draft}) >= 1")
    cache, start = model.new_cache(idx, R), idx.size(1)
    pos, _ = model.prefill(idx[:, -cfg.block_size:], cache, R)
    stats = dict(drafted=0, accepted=0, passes=0, loop_iters=0)
    while idx.size(1) - start < max_new_tokens:
        if pos == cfg.block_size:  # window full: re-encode the last half block
            pos, _ = model.prefill(idx[:, -(cfg.block_size // 2):], cache, R)
        n = min(n_draft, max_new_tokens - (idx.size(1) - start) - 1, cfg.block_size - 1 - pos)  # chunk fits
        drafts, q = (draft_tokens(model, idx[:, -1:], cache, pos, draft_steps, n, temperature, top_k, generator)
                     if n else (idx[:, :0], None))
        logits, _ = model.forward_cached(torch.cat([idx[:, -1:], drafts], 1), cache, pos, R)  # (B, n + 1, V)
        p = token_probs(logits, temperature, top_k)
        new = accept(p, q, drafts, generator) if n else torch.multinomial(p[:, 0], 1, generator=generator)
        idx, pos = torch.cat([idx, new], 1), pos + new.size(1)
        stats = dict(drafted=stats['drafted'] + n, accepted=stats['accepted'] + new.size(1) - 1,
                     passes=stats['passes'] + 1, loop_iters=stats['loop_iters'] + n * draft_steps + (n + 1) * R)
    return idx, stats

# -----------------------------------------------------------------------------
# sampling
def generate_sample(model, x, cfg, R, generator):
    """The decoding the flags ask for -> (tokens (B, P + N), iterations per new token (B, N), speculative stats)."""
    if cfg.speculative:
        out, stats = generate_speculative(model, x, cfg.max_new_tokens, R, cfg.draft_steps, cfg.n_draft,
                                          cfg.temperature, cfg.top_k, generator)
        return out, torch.full((x.size(0), cfg.max_new_tokens), R), stats  # every kept token ran R iterations
    out, depths = model.generate(x, cfg.max_new_tokens, num_steps=R, temperature=cfg.temperature, top_k=cfg.top_k,
                                 exit_threshold=cfg.exit_threshold if cfg.exit_threshold >= 0 else None,
                                 exit_rule=cfg.exit_rule, generator=generator, warm_start=cfg.warm_start)
    return out, depths, None


def run_samples(model, cfg, R, train_cfg, ctx):
    encode, pieces = vocabulary(cfg, train_cfg, model.config.vocab_size)
    prompt = read_start(cfg.start)
    x = torch.tensor([encode(prompt)], dtype=torch.long, device=cfg.device)
    use_color = cfg.color == 'always' or (cfg.color == 'auto' and sys.stdout.isatty())
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    if use_color:
        print('iterations per token: ' + ' '.join(colored(d, d, R) for d in range(1, R + 1)) + '  (prompt: plain)')
    for i in range(cfg.num_samples):
        sync(cfg.device)
        t0 = time.perf_counter()
        with ctx:
            out, depths, stats = generate_sample(model, x, cfg, R, generator)
        sync(cfg.device)
        text, d = pieces(out[0, x.size(1):].tolist()), depths[0].tolist()
        print(prompt + ''.join(colored(t, k, R) for t, k in zip(text, d)) if use_color else markup(prompt, text, d))
        print(summary(i, cfg.num_samples, depths[0], R, time.perf_counter() - t0, stats))

# -----------------------------------------------------------------------------
# the sweep: quality vs compute, teacher-forced (METHOD.md §5 "Fixed depth" and "Adaptive exit per token")
def sweep_depths(max_depth):
    """1, 2, 4, ... up to max_depth (and max_depth itself), then 2 * max_depth: extrapolation beyond training."""
    powers = [2 ** i for i in range(max_depth.bit_length()) if 2 ** i <= max_depth]
    return sorted(set(powers + [max_depth, 2 * max_depth]))


def val_loss(logits, targets):
    """The sweep's default metric: mean next-token cross-entropy (lower is better)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1).item()


@torch.no_grad()
def depth_sweep(model, batches, depths, thresholds, rule='kl', metric=val_loss, seed=0):
    """One row per setting: every fixed depth r, then adaptive exit (model.adaptive_forward, R = max_depth) at every
    EPS. Row: setting, rule, r, eps, mean_iters (loop iterations per token), value (metric averaged over batches).
    metric(logits, targets) -> float is the hook for a task score (e.g. accuracy) instead of val loss."""
    rows, R = [], model.config.max_depth
    for r, eps in [(r, None) for r in depths] + [(R, eps) for eps in thresholds]:
        torch.manual_seed(seed)  # the same noise initial states for every setting
        outs = [(model(x, num_steps=r)[0], torch.full_like(x, r)) if eps is None else
                model.adaptive_forward(x, exit_threshold=eps, exit_rule=rule)[::2] for x, _ in batches]
        values = [metric(logits, y) for (logits, _), (_, y) in zip(outs, batches)]
        rows.append(dict(setting=f"r={r}" if eps is None else f"{rule} eps={eps:g}", rule='fixed' if eps is None
                         else rule, r=r, eps=eps, mean_iters=sum(d.float().mean().item() for _, d in outs) / len(outs),
                         value=sum(values) / len(values)))
    return rows


def save_plot(rows, path, metric_name, title):
    """Quality vs compute: fixed depths as one curve, adaptive exit (one point per EPS) as another."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for fixed, style, label in ((True, 'o-', 'fixed depth r'), (False, 's--', f"adaptive exit ({rows[-1]['rule']})")):
        part = [r for r in rows if (r['rule'] == 'fixed') == fixed]
        ax.plot([r['mean_iters'] for r in part], [r['value'] for r in part], style, label=label)
        for r in part:
            ax.annotate(r['setting'].split(' ')[-1], (r['mean_iters'], r['value']), fontsize=7)
    ax.set_xscale('log', base=2)
    ax.set(xlabel='loop iterations per token (compute)', ylabel=metric_name, title=title)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def run_sweep(model, cfg, train_cfg, ctx):
    config, dataset = model.config, train_cfg.get('dataset', 'shakespeare_char')
    path = prepare.dataset_dir(dataset, cfg.data_dir or train_cfg.get('data_dir'))
    if not os.path.exists(os.path.join(path, 'val.bin')):
        raise ValueError(f"--sweep needs {path}/val.bin: prepare the dataset (python prepare.py ...) or pass "
                         f"--data_dir=DIR")
    generator = torch.Generator().manual_seed(cfg.seed)  # fixed windows, the same for every setting of the sweep
    batches = [prepare.get_batch(path, 'val', cfg.sweep_batch_size, config.block_size, generator, cfg.device)
               for _ in range(cfg.sweep_batches)]
    with ctx:
        rows = depth_sweep(model, batches, sweep_depths(config.max_depth), sweep_eps(cfg.sweep_thresholds),
                           cfg.exit_rule, val_loss, cfg.seed)
    print(f"sweep: {dataset} val, {cfg.sweep_batches} x {cfg.sweep_batch_size} x {config.block_size} tokens, "
          f"trained depth mean {config.mean_depth} max {config.max_depth}; adaptive exit runs at most "
          f"{config.max_depth} (teacher-forced, model.adaptive_forward)")
    print(f"{'setting':<22}{'iterations/token':>18}{'compute vs r=' + str(config.max_depth):>18}{'val_loss':>12}")
    for row in rows:
        print(f"{row['setting']:<22}{row['mean_iters']:>18.2f}{row['mean_iters'] / config.max_depth:>18.2f}"
              f"{row['value']:>12.4f}")
    if cfg.plot:
        save_plot(rows, cfg.plot, 'val_loss', f"{dataset}: val_loss vs compute")
        print(f"plot saved to {cfg.plot}")
    return rows

# -----------------------------------------------------------------------------
def run(settings):
    cfg = types.SimpleNamespace(**settings)
    check_flags(cfg)
    torch.manual_seed(cfg.seed)
    model, ckpt = load_checkpoint(cfg.out_dir, cfg.device)
    R = check_model_flags(cfg, model.config)
    if cfg.compile:
        model.compile_loop()  # the loop over r stays in Python: no recompile per depth (METHOD.md §3)
    ctx = nullcontext() if cfg.dtype == 'float32' else torch.autocast(torch.device(cfg.device).type, DTYPES[cfg.dtype])
    if cfg.sweep:
        return run_sweep(model, cfg, ckpt.get('config', {}), ctx)
    run_samples(model, cfg, R, ckpt.get('config', {}), ctx)


def main(argv=None):
    try:
        run(configure(DEFAULTS, sys.argv[1:] if argv is None else argv))
    except ValueError as e:  # our own checks, the loader's and the model's: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
