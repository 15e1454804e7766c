"""What to observe after each exercise (python -m exercises observe N): an experiment of seconds per exercise, with the
student's functions in the model (--solution: ours); its docstring, printed first, says what to look for."""
import os
import time

import torch

import etd
import model
import prepare
from exercises.check import ROOT, swapped
from model import GPT, GPTConfig
from sample import load_checkpoint


def random_model(std=None, **overrides):
    """A small looped GPT with random weights (seed 0). std: draw the matrices from N(0, std^2) instead of GPT-2's init,
    large enough that the prediction keeps changing from iteration to iteration (so early exit has something to do)."""
    torch.manual_seed(0)
    config = dict(block_size=64, vocab_size=64, n_embd=64, n_head=4, n_prelude=1, n_loop=2, n_coda=1, mean_depth=4,
                  max_depth=16, backprop_depth=4, init_state='zeros', norm='pre', pos='learned', inject='concat',
                  norm_state=True, state_std=0.02)  # fixed here: the README's numbers must not move with model.py
    gpt = GPT(GPTConfig(**{**config, **overrides}))
    for p in gpt.parameters() if std is not None else ():
        if p.dim() >= 2:
            p.data.normal_(0, std)  # .data: a re-initialisation, not a step for autograd to record
    return gpt


def random_batch(gpt, B=4, T=None, seed=0):
    g, shape = torch.Generator().manual_seed(seed), (B, T or gpt.config.block_size)
    return tuple(torch.randint(0, gpt.config.vocab_size, shape, generator=g) for _ in range(2))


def observe_1(ckpt):
    """The depth distribution at Huginn's training mean, r-bar = 32: most steps near the mean, a long right tail.
    Look at the share of steps deeper than twice the mean: why training needs a cap and truncated backprop (ex. 3)."""
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([model.sample_depth(32, 128, generator=g) for _ in range(10_000)], dtype=torch.float)
    q = torch.quantile(draws, torch.tensor([0.1, 0.5, 0.9, 0.99])).tolist()
    print(f"10,000 draws of r with mean_depth=32, max_depth=128: mean {draws.mean():.1f} (E[r] = 33), "
          f"10% {q[0]:.0f}, median {q[1]:.0f}, 90% {q[2]:.0f}, 99% {q[3]:.0f}, max {draws.max():.0f}")
    counts = torch.histc(draws, bins=16, min=0, max=128).tolist()
    for i, c in enumerate(counts):  # histc puts the cap, 128, into the last bin: its label says so
        print(f"  r in {8 * i:>3}..{8 * i + 7 if i < 15 else 128:<3} {int(c):>5}  {'#' * round(60 * c / max(counts))}")
    print(f"{(draws > 64).float().mean():.1%} of steps run more than twice the mean")


def observe_2(ckpt):
    """Does the prelude learn? Its gradient with each injection, within k and beyond k iterations. With inject='none'
    the state is cut after the no-grad iterations: no gradient once r > k (§3 trap), so ETD backprops through all."""
    print("prelude gradient norm after one backward pass (backprop_depth k = 2):")
    print(f"  {'inject':8} {'r = 2 (all with grad)':>22} {'r = 6 (last 2 with grad)':>26}")
    for inject in ('concat', 'add', 'none'):
        gpt = random_model(inject=inject, init_state='embed' if inject == 'none' else 'noise', backprop_depth=2).train()
        (x, y), norms = random_batch(gpt, T=32), []
        for r in (2, 6):
            gpt.zero_grad()
            gpt(x, y, num_steps=r, generator=torch.Generator().manual_seed(0))[1].backward()
            grads = [p.grad for p in gpt.transformer.prelude.parameters() if p.grad is not None]  # None: no path back
            norms.append(sum(g.norm() ** 2 for g in grads) ** 0.5 if grads else 0.0)
        print(f"  {inject:8} {norms[0]:>22.2e} {norms[1]:>26.2e}")


def saved_for_backward(gpt, r):
    """(MB autograd keeps for the backward pass, each storage counted once; forward seconds; backward seconds)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    t0 = time.time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gpt(*random_batch(gpt), num_steps=r)[1]
    t1 = time.time()
    loss.backward()
    return sum(storages.values()) / 2 ** 20, t1 - t0, time.time() - t1


def observe_3(ckpt):
    """Activation memory of truncated backprop (k = 8) against full backprop (k = r), at r = 8 and r = 64. Truncation
    keeps memory and backward time flat while the forward grows with r; k = r grows all three."""
    print("memory autograd keeps for backward (weights included, each tensor once), batch 4 x 64 tokens, d = 128:")
    print(f"  {'r':>3} {'k':>3} {'saved MB':>9} {'forward s':>10} {'backward s':>11}")
    for r, k in ((8, 8), (64, 8), (64, 64)):
        gpt = random_model(n_embd=128, max_depth=64, backprop_depth=k).train()
        runs = [saved_for_backward(gpt, r) for _ in range(3)]  # the fastest of 3: the first pays for allocations
        print(f"  {r:>3} {k:>3} {runs[0][0]:>9.1f} {min(t[1] for t in runs):>10.2f} {min(t[2] for t in runs):>11.2f}")


def observe_4(ckpt):
    """Iterations per token against the exit threshold, and their cost in loss (teacher-forced). eps = 0 must run every
    token to the cap (the clamp), a huge eps stops each after one; in between, compare each loss with eps = 0's."""
    path = ckpt or os.path.join(ROOT, 'out', 'ckpt.pt')
    if ckpt or os.path.isfile(path):
        gpt, saved = load_checkpoint(path)  # a missing or bad --ckpt is one line, never a random model in silence
        cfg = saved.get('config', {})
        data = prepare.dataset_dir(cfg.get('dataset', 'shakespeare_char'), cfg.get('data_dir', ''))
        x, y = prepare.get_batch(data, 'val', 8, gpt.config.block_size, torch.Generator().manual_seed(0))
        what = f"{path} on 8 val windows of {os.path.basename(data)}"
    else:  # no trained model: a random one whose loop converges, so the depths (not the losses) mean something
        print(f"no checkpoint at {path} (`python train.py` trains one in a few CPU minutes, or pass --ckpt=PATH): "
              f"a random model, only its depths mean something\n")
        gpt = random_model(norm_state=False)  # GPT-2's small init and no state norm: the state settles
        (x, y), what = random_batch(gpt), 'a random model'
    print(f"adaptive exit with the kl rule, at most {gpt.config.max_depth} iterations, {what}:")
    print(f"  {'eps':>8} {'mean iterations':>16} {'val loss':>9}")
    for eps in (0.0, 1e-4, 5e-4, 1e-3, 1e-2, 1e-1, 1e9):
        _, loss, depths = gpt.eval().adaptive_forward(x, y, exit_threshold=eps, num_steps=gpt.config.max_depth)
        print(f"  {eps:>8.0e} {depths.float().mean():>16.2f} {loss:>9.4f}")


def observe_5(ckpt):
    """ETD's angular-distance curve of a trained plain GPT and the split your knees pick, last token vs every token.
    ETD sees large distances first (its encoder: our prelude), a flat middle (the loop), a late rise (the coda)."""
    path = ckpt or os.path.join(ROOT, 'out-etd-base')
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: train the plain base first with `python train.py "
                         f"config/etd_base_shakespeare_char.py` (a few CPU minutes), or give --ckpt=PATH")
    cfg = load_checkpoint(path)[1].get('config', {})
    for last_token in (True, False):
        etd.run(init_from=path, last_token=last_token, data_dir=cfg.get('data_dir', ''),
                dataset=cfg.get('dataset', 'shakespeare_char'))


def observe_6(ckpt):
    """Early-exit decoding against the per-token-depth forward, with your fill_latest and with no fill at all. Without
    the fill, tokens that iterate longer read stale keys/values of tokens that stopped early: the cache is wrong."""
    gpt = random_model(std=0.25).eval()
    print("greedy early-exit decoding (kl rule, eps 1e-2, at most 8 iterations) of 24 tokens, 4 rows:")
    for name, fill in (('fill_latest', model.fill_latest), ('no fill', lambda loop_kv, depths, pos: None)):
        with swapped(model, {'fill_latest': fill}):
            out, depths, logits = gpt.generate(random_batch(gpt, B=4, T=1)[0], 24, num_steps=8, exit_threshold=1e-2,
                                               temperature=0, return_logits=True)
        full = gpt(out[:, :-1], depths=depths)[0]
        print(f"  {name:18} mean iterations {depths.float().mean():5.2f}   "
              f"max |cached - uncached logits| {(full - logits).abs().max():.1e}")
