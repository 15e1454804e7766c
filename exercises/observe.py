"""
What to observe after each exercise: one short experiment per exercise, run with the student's function inside the
model (or the project's own with --solution). Each takes seconds on a laptop CPU, except where it says otherwise.

    python -m exercises observe N [--solution] [--dir=FOLDER] [--ckpt=PATH]
"""

import os
import time

import torch

import etd
import model
import prepare
from exercises.check import BY_NUMBER, ROOT, load_student, one_line, swapped
from model import GPT, GPTConfig, load_checkpoint


def random_model(std=None, **overrides):
    """A small looped GPT with random weights (seed 0). std: draw the matrices from N(0, std^2) instead of GPT-2's init,
    large enough that the prediction keeps changing from iteration to iteration (so early exit has something to do)."""
    torch.manual_seed(0)
    config = dict(block_size=64, vocab_size=64, n_embd=64, n_head=4, n_prelude=1, n_loop=2, n_coda=1, mean_depth=4,
                  max_depth=16, backprop_depth=4, init_state='zeros', norm='pre', pos='learned', inject='concat',
                  norm_state=True, state_std=0.02)  # fixed here: the README's numbers must not move with model.py
    gpt = GPT(GPTConfig(**{**config, **overrides}))
    if std is not None:
        with torch.no_grad():
            for p in gpt.parameters():
                if p.dim() >= 2:
                    p.normal_(0, std)
    return gpt


def random_batch(gpt, B=4, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = T or gpt.config.block_size
    return (torch.randint(0, gpt.config.vocab_size, (B, T), generator=g),
            torch.randint(0, gpt.config.vocab_size, (B, T), generator=g))


def observe_1(ckpt):
    """The depth distribution at Huginn's training mean, r-bar = 32: most steps near the mean, a long right tail."""
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([model.sample_depth(32, 128, generator=g) for _ in range(10_000)], dtype=torch.float)
    q = torch.quantile(draws, torch.tensor([0.1, 0.5, 0.9, 0.99])).tolist()
    print(f"10,000 draws of r with mean_depth=32, max_depth=128: mean {draws.mean():.1f} (E[r] = 33), "
          f"10% {q[0]:.0f}, median {q[1]:.0f}, 90% {q[2]:.0f}, 99% {q[3]:.0f}, max {draws.max():.0f}")
    counts = torch.histc(draws, bins=16, min=0, max=128).tolist()
    for i, c in enumerate(counts):  # histc puts the cap, 128, into the last bin: its label says so
        print(f"  r in {8 * i:>3}..{8 * i + 7 if i < 15 else 128:<3} {int(c):>5}  {'#' * round(60 * c / max(counts))}")
    print(f"{(draws > 64).float().mean():.1%} of steps run more than twice the mean: why training needs a cap and "
          f"truncated backprop (exercise 3)")


def observe_2(ckpt):
    """Does the encoder (prelude) learn? Its gradient with each injection, within k and beyond k iterations."""
    print("prelude gradient norm after one backward pass (backprop_depth k = 2):")
    print(f"  {'inject':8} {'r = 2 (all with grad)':>22} {'r = 6 (last 2 with grad)':>26}")
    for inject in ('concat', 'add', 'none'):
        init = 'embed' if inject == 'none' else 'noise'
        gpt = random_model(inject=inject, init_state=init, backprop_depth=2).train()
        x, y = random_batch(gpt, T=32)
        norms = []
        for r in (2, 6):
            gpt.zero_grad()
            gpt(x, y, num_steps=r, generator=torch.Generator().manual_seed(0))[1].backward()
            grads = [p.grad for p in gpt.transformer.prelude.parameters() if p.grad is not None]  # None: no path back
            norms.append(sum(g.norm() ** 2 for g in grads) ** 0.5 if grads else 0.0)
        print(f"  {inject:8} {norms[0]:>22.2e} {norms[1]:>26.2e}")
    print("with inject='none' the state is detached after the no-grad iterations: the encoder learns nothing once "
          "r > k (METHOD.md §3 trap); ETD therefore backpropagates through every iteration")


def saved_for_backward(gpt, x, y, r):
    """(MB autograd keeps for the backward pass, each storage counted once; forward seconds; backward seconds)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    t0 = time.time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gpt(x, y, num_steps=r)[1]
    t1 = time.time()
    loss.backward()
    return sum(storages.values()) / 2 ** 20, t1 - t0, time.time() - t1


def observe_3(ckpt):
    """Activation memory of truncated backprop (k = 8) against full backprop (k = r), at r = 8 and r = 64."""
    print("memory autograd keeps for backward (weights included, each tensor once), batch 4 x 64 tokens, d = 128:")
    print(f"  {'r':>3} {'k':>3} {'saved MB':>9} {'forward s':>10} {'backward s':>11}")
    for r, k in ((8, 8), (64, 8), (64, 64)):
        gpt = random_model(n_embd=128, max_depth=64, backprop_depth=k).train()
        x, y = random_batch(gpt)
        runs = [saved_for_backward(gpt, x, y, r) for _ in range(3)]  # the fastest of 3: the first pays for allocations
        saved, forward, backward = runs[0][0], min(run[1] for run in runs), min(run[2] for run in runs)
        print(f"  {r:>3} {k:>3} {saved:>9.1f} {forward:>10.2f} {backward:>11.2f}")
    print("truncation keeps memory and backward time flat from r = 8 to 64 while the forward grows with r; "
          "k = r grows all three")


def observe_4(ckpt):
    """Iterations per token against the exit threshold, and what they cost in loss (teacher-forced, one pass)."""
    path = ckpt or os.path.join(ROOT, 'out', 'ckpt.pt')
    if ckpt or os.path.isfile(path):
        gpt, saved = load_checkpoint(path)  # a missing or bad --ckpt is one line, never a random model in silence
        data = prepare.dataset_dir(saved.get('config', {}).get('dataset', 'shakespeare_char'),
                                   saved.get('config', {}).get('data_dir', ''))
        x, y = prepare.get_batch(data, 'val', 8, gpt.config.block_size, torch.Generator().manual_seed(0))
        what = f"{path} on 8 val windows of {os.path.basename(data)}"
    else:  # no trained model: a random one whose loop converges, so the depths (not the losses) mean something
        print(f"no checkpoint at {path} (`python train.py` trains one in a few CPU minutes, or pass --ckpt=PATH): "
              f"a random model, only its depths mean something\n")
        gpt = random_model(norm_state=False)  # GPT-2's small init and no state norm: the state settles
        (x, y), what = random_batch(gpt), 'a random model'
    R = gpt.config.max_depth
    print(f"adaptive exit with the kl rule, at most {R} iterations, {what}:")
    print(f"  {'eps':>8} {'mean iterations':>16} {'val loss':>9}")
    for eps in (0.0, 1e-4, 5e-4, 1e-3, 1e-2, 1e-1, 1e9):
        _, loss, depths = gpt.eval().adaptive_forward(x, y, exit_threshold=eps, num_steps=R)
        print(f"  {eps:>8.0e} {depths.float().mean():>16.2f} {loss:>9.4f}")
    print("eps = 0 must run every token to the cap (the clamp), a huge eps stops each after one iteration; in between, "
          "compare each row's loss with eps = 0's: what the saved iterations cost")


def observe_5(ckpt):
    """ETD's angular-distance curve of a trained plain GPT and the split your knees pick, last token vs every token."""
    path = ckpt or os.path.join(ROOT, 'out-etd-base')
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: train the plain base first with `python train.py "
                         f"config/etd_base_shakespeare_char.py` (a few CPU minutes), or give --ckpt=PATH")
    config = load_checkpoint(path)[1].get('config', {})
    for last_token in (True, False):
        etd.run(dict(etd.defaults, init_from=path, last_token=last_token, data_dir=config.get('data_dir', ''),
                     dataset=config.get('dataset', 'shakespeare_char')))
    print("ETD sees large distances in the first blocks (encoding), a flat middle (thinking) and a rise at the end "
          "(decoding): compare your model's curve with that picture, and the last-token curve with the all-token one")


def observe_6(ckpt):
    """Early-exit decoding against the per-token-depth forward, with your fill_latest and with no fill at all."""
    gpt = random_model(std=0.25).eval()
    prompt = random_batch(gpt, B=4, T=1)[0]
    print("greedy early-exit decoding (kl rule, eps 1e-2, at most 8 iterations) of 24 tokens, 4 rows:")
    for name, fill in (('fill_latest', model.fill_latest), ('no fill', lambda loop_kv, depths, pos: None)):
        with swapped(model, {'fill_latest': fill}):
            out, depths, logits = gpt.generate(prompt, 24, num_steps=8, exit_threshold=1e-2, temperature=0,
                                               return_logits=True)
        full = gpt(out[:, :-1], depths=depths)[0]
        print(f"  {name:18} mean iterations {depths.float().mean():5.2f}   "
              f"max |cached - uncached logits| {(full - logits).abs().max():.1e}")
    print("without the fill, tokens that think longer read stale keys/values of tokens that stopped early: the cache "
          "no longer computes the model it claims to")


def main(number, solution=False, folder=None, ckpt=''):
    """Run experiment `number` with the student's functions swapped in (or the project's own); exit code."""
    ex, experiment = BY_NUMBER[number], globals()[f'observe_{number}']
    functions = {} if solution else load_student(ex, folder)
    whose = "the project's own functions" if solution else f"your {', '.join(ex.names)}"
    print(f"exercise {number}, with {whose}: {experiment.__doc__}\n")
    torch.set_num_threads(1)  # small models: a second thread only waits, badly so on a busy machine
    try:
        with swapped(ex.home, functions):
            experiment(ckpt)
    except NotImplementedError:
        raise ValueError(f"exercise {number} is not written yet: write it, or add --solution to watch the project's "
                         f"own function") from None
    except ValueError:  # ours, already one line (e.g. a checkpoint that is not one)
        raise
    except Exception as err:  # the student's code failing inside the experiment: one line, not a traceback
        raise ValueError(f"the experiment failed: {one_line(err, os.path.join(folder, ex.file))}") from None
    return 0
