"""usage: python -m exercises check N|all [--solution] [--dir=FOLDER]
       python -m exercises observe N [--solution] [--dir=FOLDER] [--ckpt=PATH]
  N: exercise 1..6 (exercises/README.md); --solution: the project's functions; --dir: your ex*.py files' folder
  (default exercises/); --ckpt: the trained model observe 4 and 5 use (default out/ckpt.pt, out-etd-base/)."""
import os
import sys
import textwrap
import time

import torch

import etd
import model
import prepare
from configurator import configure
from exercises import check
from sample import adaptive_forward, generate, load_checkpoint


# -- observe N: exercise N's experiment, run with the student's functions; its docstring says what to look for ------
def random_model(B=4, T=64, **overrides):
    """A small looped GPT in training mode with random weights (seed 0), and B x T random tokens x, y for it."""
    torch.manual_seed(0)
    config = dict(block_size=64, vocab_size=64, n_embd=64, n_head=4, n_prelude=1, n_loop=2, n_coda=1, mean_depth=4,
                  max_depth=16, backprop_depth=4, init_state='zeros', norm='pre', pos='learned', inject='concat',
                  norm_state=True, state_std=0.02)  # fixed here: the README's numbers must not move with model.py
    gpt = model.GPT(model.GPTConfig(**{**config, **overrides}))
    x, y = torch.randint(0, 64, (2, B, T), generator=torch.Generator().manual_seed(0))
    return gpt, x, y


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
    for inject, init in (('concat', 'noise'), ('add', 'noise'), ('none', 'embed')):  # none: ETD's s_0 = e
        gpt, x, y = random_model(T=32, inject=inject, init_state=init, backprop_depth=2)
        norms = []
        for r in (2, 6):
            loss = gpt(x, y, num_steps=r, generator=torch.Generator().manual_seed(0))[1]
            grads = torch.autograd.grad(loss, list(gpt.transformer.prelude.parameters()), allow_unused=True)
            norms.append(sum(g.norm() ** 2 for g in grads if g is not None) ** 0.5)  # None: no path back
        print(f"  {inject:8} {norms[0]:>22.2e} {norms[1]:>26.2e}")


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
    """Activation memory of truncated backprop (k = 8) against full backprop (k = r), at r = 8 and r = 64. Truncation
    keeps memory and backward time flat while the forward grows with r; k = r grows all three."""
    print("memory autograd keeps for backward (weights included, each tensor once), batch 4 x 64 tokens, d = 128:")
    print(f"  {'r':>3} {'k':>3} {'saved MB':>9} {'forward s':>10} {'backward s':>11}")
    for r, k in ((8, 8), (64, 8), (64, 64)):
        gpt, x, y = random_model(n_embd=128, max_depth=64, backprop_depth=k)
        runs = [saved_for_backward(gpt, x, y, r) for _ in range(3)]  # the fastest of 3: the first pays for allocations
        print(f"  {r:>3} {k:>3} {runs[0][0]:>9.1f} {min(t[1] for t in runs):>10.2f} {min(t[2] for t in runs):>11.2f}")


def observe_4(ckpt):
    """Iterations per token against the exit threshold, and their cost in loss (teacher-forced). eps = 0 must run every
    token to the cap (the clamp), a huge eps stops each after one; in between, compare each loss with eps = 0's."""
    path = ckpt or os.path.join(check.ROOT, 'out', 'ckpt.pt')
    if ckpt or os.path.isfile(path):
        gpt, saved = load_checkpoint(path)  # a missing or bad --ckpt is one line, never a random model in silence
        cfg = saved.get('config', {})
        data = prepare.dataset_dir(cfg.get('dataset', 'shakespeare_char'), cfg.get('data_dir', ''))
        x, y = prepare.get_batch(data, 'val', 8, gpt.config.block_size, torch.Generator().manual_seed(0))
        what = f"{path} on 8 val windows of {os.path.basename(data)}"
    else:  # no trained model: a random one whose loop converges, so the depths (not the losses) mean something
        print(f"no checkpoint at {path} (`python train.py` trains one in a few CPU minutes, or pass --ckpt=PATH): "
              f"a random model, only its depths mean something\n")
        gpt, x, y = random_model(norm_state=False)  # GPT-2's small init and no state norm: the state settles
        what = 'a random model'
    print(f"adaptive exit with the kl rule, at most {gpt.config.max_depth} iterations, {what}:")
    print(f"  {'eps':>8} {'mean iterations':>16} {'val loss':>9}")
    for eps in (0.0, 1e-4, 5e-4, 1e-3, 1e-2, 1e-1, 1e9):
        _, loss, depths = adaptive_forward(gpt.eval(), x, y, exit_threshold=eps, num_steps=gpt.config.max_depth)
        print(f"  {eps:>8.0e} {depths.float().mean():>16.2f} {loss:>9.4f}")


def observe_5(ckpt):
    """ETD's angular-distance curve of a trained plain GPT and the split your knees pick, last token vs every token.
    ETD sees large distances first (its encoder: our prelude), a flat middle (the loop), a late rise (the coda)."""
    path = ckpt or os.path.join(check.ROOT, 'out-etd-base')
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
    gpt, x, _ = random_model(T=1)
    for p in gpt.parameters():  # N(0, 0.25^2), not GPT-2's init: the prediction changes with each iteration
        if p.dim() >= 2:
            p.data.normal_(0, 0.25)  # .data: a re-initialisation, not a step for autograd to record
    print("greedy early-exit decoding (kl rule, eps 1e-2, at most 8 iterations) of 24 tokens, 4 rows:")
    for name, fill in (('fill_latest', model.fill_latest), ('no fill', lambda loop_kv, depths, pos: None)):
        with check.swapped(model, {'fill_latest': fill}):
            out, depths, logits = generate(gpt.eval(), x, 24, num_steps=8, exit_threshold=1e-2, temperature=0,
                                           return_logits=True)
        full = gpt(out[:, :-1], depths=depths)[0]
        print(f"  {name:18} mean iterations {depths.float().mean():5.2f}   "
              f"max |cached - uncached logits| {(full - logits).abs().max():.1e}")


# -- the command line: every bad argument, and every error of the student's code in an experiment, is one line ------
def main(argv=None):
    """Grade (check) or run the experiment (observe) with the student's functions swapped in, or the project's own."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (['-h'], ['--help'], ['help']):
        print(__doc__)
        return 0
    positional = [arg for arg in argv if not arg.startswith('--')]
    try:
        opts = configure(dict(solution=False, dir=check.HERE, ckpt=''), [arg for arg in argv if arg.startswith('--')])
        if len(positional) != 2 or positional[0] not in ('check', 'observe'):
            raise ValueError(f"expected `check N|all` or `observe N`, got {' '.join(argv) or 'nothing'!r}")
        command, which = positional
        allowed = [str(n) for n in check.BY_NUMBER] + ['all'] * (command == 'check')
        model.check(dict(opts, exercise=which), {'exercise': (f"one of {', '.join(allowed)}", lambda v: v in allowed),
                                                 'dir': ('a folder', os.path.isdir)})  # --ckpt: where it is used
        torch.set_num_threads(1)  # tiny models: on 2 busy cores a second thread cost a test 14 s of CPU, not 0.1 s
        if command == 'check':
            return check.check(which if which == 'all' else int(which), opts['solution'], os.path.abspath(opts['dir']))
        ex, experiment = check.BY_NUMBER[int(which)], globals()[f'observe_{which}']
        whose = "the project's own functions" if opts['solution'] else f"your {', '.join(ex.names)}"
        print(textwrap.fill(f"exercise {which}, with {whose}: {' '.join(experiment.__doc__.split())}", 120) + '\n')
        with check.swapped(ex.home, {} if opts['solution'] else check.load_student(ex, opts['dir'])):
            experiment(opts['ckpt'])
        return 0
    except Exception as err:  # ours are ValueErrors of one line; the student's code's: check.one_line
        message = err if isinstance(err, ValueError) else \
            f"the experiment failed: {check.one_line(err, os.path.join(opts['dir'], ex.file))}"
    print(f"error: {message} (python -m exercises --help)", file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
