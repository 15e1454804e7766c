"""
The exercises: the properties that define each student function (the product's own functions pass them; `python -m
exercises check N` runs them with the student's function swapped in), then the grader's own tests. A property's
assertion message is what the student reads: what happened with its numbers labelled, then ' -- hint: ' for that
failure and ' -- more: ', a hint that gives more away, shown only after the same property failed before.
Exercise 5's properties are tests/test_etd.py's. Tiny CPU models, no network.
"""
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model  # noqa: E402
from exercises import check  # noqa: E402
from exercises.__main__ import main, observe_1  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sample import adaptive_forward, generate  # noqa: E402

V = 64  # vocabulary of the tiny models


def tiny(std=None, **kwargs):
    """A tiny looped model in eval mode with an exact initial state; std: larger random weights, so successive
    iterations change the prediction and early exit picks varied depths. GPT-2's blocks and positions with Huginn's
    adapter unless kwargs say otherwise: the measured behaviours below must not move with model.py's defaults."""
    torch.manual_seed(0)
    cfg = dict(block_size=32, vocab_size=V, n_embd=32, n_head=4, n_prelude=1, n_loop=2, n_coda=1, mean_depth=3,
               max_depth=8, backprop_depth=2, norm='pre', pos='learned', inject='concat', norm_state=True,
               init_state='embed' if kwargs.get('inject') == 'none' else 'zeros')
    gpt = GPT(GPTConfig(**{**cfg, **kwargs})).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            if std and p.dim() >= 2:
                p.normal_(0, std)
    return gpt


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def grads(gpt, loss):
    gpt.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}

# -- exercise 1: sample_depth ------------------------------------------------------------------------------------------


def test_ex1_depth_lies_in_1_to_max_depth():
    """r counts iterations: at least 1, at most max_depth, and the cap is reached."""
    g = torch.Generator().manual_seed(0)
    draws = [model.sample_depth(8, 10, generator=g) for _ in range(2000)]
    assert min(draws) >= 1, (f"smallest of 2000 draws at mean_depth 8 was {min(draws)}, expected >= 1 -- hint: every "
                             f"step runs the loop at least once, and a Poisson draw alone can be 0")
    assert max(draws) == 10, (f"largest of 2000 draws with max_depth 10 was {max(draws)}, expected exactly 10 -- hint: "
                              + ("the tail is heavy: cap the draw" if max(draws) > 10 else "at mean 8 a cap of 10 is "
                                 "reached often: is the rate drawn around mean_depth?"))


def test_ex1_depth_mean_is_mean_depth_plus_one():
    """E[r] = mean_depth + 1 (§3): the Poisson's mean is mean_depth, and every step runs one iteration more."""
    g = torch.Generator().manual_seed(0)
    mean = sum(model.sample_depth(8, 1000, generator=g) for _ in range(4000)) / 4000
    assert abs(mean - 9) < 0.4, f"sample mean {mean:.2f} at mean_depth 8, expected 9 ± 0.4 -- hint: " + (
        "the +1 is missing: r is the Poisson draw plus one iteration" if abs(mean - 8) < 0.4 else
        "too deep: with tau ~ Normal(log m, sigma) the rate's mean is m e^(sigma^2 / 2); see tau's mean in the "
        "docstring" if mean > 9 else "the Poisson rate is exp(tau), with tau drawn as the docstring says")


def test_ex1_depth_is_heavy_tailed():
    """The Poisson rate is itself log-normal (§3): Var[r] = m + m^2 (e^(sigma^2) - 1), about 26 at m = 8."""
    g = torch.Generator().manual_seed(0)
    var = torch.tensor([model.sample_depth(8, 1000, generator=g) for _ in range(4000)], dtype=torch.float).var()
    assert 18 < var < 36, f"variance of 4000 draws {var:.1f} at mean_depth 8, expected 18..36 (a plain Poisson: 8) " \
        f"-- hint: " + ("draw a fresh tau every call and use exp(tau) as the Poisson rate" if var < 18 else
                        "tau's standard deviation is sigma")


def test_ex1_depth_is_reproducible_from_a_seed():
    """The same seed gives the same depths: what makes DDP ranks and a resumed run agree."""
    draw = lambda: [model.sample_depth(4, 32, generator=torch.Generator().manual_seed(s)) for s in range(50)]
    first, second = draw(), draw()
    assert first == second, (f"seeds 0..49 drawn twice gave different depths (first at seed "
                             f"{[a == b for a, b in zip(first, second)].index(False)}) -- hint: draw every random "
                             f"number from `generator`: torch.normal and torch.poisson both take it")
    assert len(set(first)) > 3, f"seeds 0..49 gave only {len(set(first))} distinct depths -- hint: the depth must " \
        "come from the generator's draws"


def test_ex1_training_draws_a_depth_in_the_model():
    """In the model: eval runs mean_depth iterations, training draws r each step (without a generator), <= max_depth."""
    gpt, calls, depths = tiny(0.25), [], []
    step = gpt.loop_step
    gpt.loop_step = lambda *args: calls.append(1) or step(*args)
    for _ in range(20):
        calls.clear()
        gpt.train()(tokens())
        depths.append(len(calls))
    assert len(set(depths)) > 2 and max(depths) <= 8, (
        f"20 training steps ran depths {sorted(set(depths))} (mean_depth 3, max_depth 8), expected at least 3 "
        f"different ones, none above 8 -- hint: the model calls sample_depth(mean_depth, max_depth) with no generator")

# -- exercise 2: init_state, inject ------------------------------------------------------------------------------------


def test_ex2_embed_and_zeros_states_are_exact():
    """'embed' is e itself (ETD continues the residual stream), 'zeros' is zeros of e's shape (§2)."""
    e = torch.randn(2, 5, 8)
    assert torch.equal(model.init_state(e, 'embed', 0.1), e), "init_state 'embed' is not e -- hint: s_0 = e"
    assert not model.init_state(e, 'zeros', 0.1).any(), "init_state 'zeros' has entries that are not 0"


def test_ex2_noise_state_is_a_truncated_normal():
    """Huginn's s_0 (§2): mean 0, the configured std, nothing beyond 3 std."""
    s = model.init_state(torch.zeros(64, 64, 32), 'noise', 0.1, torch.Generator().manual_seed(0))
    assert s.abs().max() <= 0.3 + 1e-6, (f"largest |s_0| {s.abs().max():.3f} at std 0.1, expected <= 3 std = 0.3 -- "
                                         f"hint: trunc_normal_'s cut points a and b are absolute values")
    assert abs(s.mean()) < 0.005 and 0.08 < s.std() < 0.1, (
        f"s_0 mean {s.mean():.4f}, std {s.std():.4f} at std 0.1, expected mean 0 ± 0.005 and std 0.08..0.1 (cut at "
        f"3 std) -- hint: a normal of mean 0 and standard deviation `std`")


def test_ex2_noise_state_is_reproducible():
    """init_state='noise' is fresh per call, yet exact given a seeded generator."""
    e = torch.zeros(2, 5, 8)
    noise = lambda g: model.init_state(e, 'noise', 0.1, g)
    assert torch.equal(noise(torch.Generator().manual_seed(0)), noise(torch.Generator().manual_seed(0))), \
        "two generators with seed 0 gave different states -- hint: draw the noise with the generator"
    assert not torch.equal(noise(None), noise(None)), "two calls without a generator gave the same state -- hint: " \
        "without a generator the noise must be fresh every call"


@pytest.mark.parametrize('kind', ['concat', 'add', 'none'])
def test_ex2_injection_formula(kind):
    """inject (§2): 'concat' is Huginn's adapter W [s; e] (state first), 'add' is s + e, 'none' returns s."""
    g = torch.Generator().manual_seed(0)
    s, e, adapter = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.nn.Linear(16, 8, False)
    W = adapter.weight.detach()
    want = {'concat': s @ W[:, :8].T + e @ W[:, 8:].T, 'add': s + e, 'none': s}[kind]
    inject = lambda e: model.inject(s, e, kind, adapter if kind == 'concat' else None).detach()
    got = inject(e)
    ignores_e = kind != 'none' and torch.equal(got, inject(torch.zeros_like(e)))
    order = kind == 'concat' and torch.allclose(got, e @ W[:, :8].T + s @ W[:, 8:].T, atol=1e-6)
    assert torch.allclose(got, want, atol=1e-6), (
        f"inject {kind!r} ignores e: the result does not change with e -- hint: e must enter it" if ignores_e else
        f"inject {kind!r} differs from its formula by up to {(got - want).abs().max():.2e} -- hint: " +
        ("the state comes first in [s; e]" if order else f"see the docstring's line for {kind!r}"))


def test_ex2_one_iteration_without_injection_is_a_plain_gpt():
    """r = 1 with inject 'none' and init 'embed' is exactly the plain GPT through the same blocks (§1)."""
    gpt, x = tiny(0.05, inject='none', norm_state=False), tokens()
    t = gpt.transformer
    h = t.wte(x) + t.wpe(torch.arange(x.size(1)))
    for block in [*t.prelude, *t.loop, *t.coda]:
        h = block(h)
    diff = (gpt(x, num_steps=1)[0] - gpt.lm_head(t.ln_f(h))).abs().max().item()
    assert diff < 1e-6, f"logits at r = 1 differ from the plain GPT's by {diff:.2e} (tolerance 1e-6) -- hint: with " \
        "'none' the loop's input is exactly the state, and 'embed' starts it at e"


def test_ex2_prelude_learns_through_the_injection():
    """With injection the prelude gets gradient even when r = 6 > k = 2: e enters every iteration."""
    gpt = tiny(backprop_depth=2).train()
    g = grads(gpt, gpt(tokens(), tokens(seed=1), num_steps=6)[1])
    norm = sum(v.norm() ** 2 for n, v in g.items() if n.startswith('transformer.prelude.')) ** 0.5
    assert norm > 0, "prelude gradient 0 at r = 6, k = 2 with inject 'concat' -- hint: after the no-grad iterations " \
        "only the injection connects e to the loss"

# -- exercise 3: truncated_loop ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('r, k', [(5, 2), (2, 4), (3, 3)])
def test_ex3_truncated_loop_runs_r_iterations_and_backprops_the_last_k(r, k):
    """step(s, i) runs for i = 0..r-1 in order and the gradient sees only the last min(r, k) calls: for s <- w s from
    s = 1 at w = 2, d s_r / d w = min(r, k) 2^(r-1) (full backprop: r 2^(r-1))."""
    w, calls = torch.tensor(2.0, requires_grad=True), []
    out = model.truncated_loop(lambda s, i: calls.append(i) or w * s, torch.tensor(1.0), r, k)
    assert calls == list(range(r)), f"r={r}, k={k}: step was called with i = {calls}, expected {list(range(r))} -- " \
        f"hint: call step exactly r times, i counting up from 0"
    grad = torch.autograd.grad(out, w, allow_unused=True)[0] if out.requires_grad else None
    got, want = 0.0 if grad is None else grad.item(), min(r, k) * 2 ** (r - 1)
    assert got == want, f"r={r}, k={k}: d s_r / d w = {got:g}, expected {want:g} (the last {min(r, k)} iterations) -- " \
        "hint: " + ("every iteration was recorded: the first r - k must run without autograd" if got == r * 2 ** (r - 1)
                    else "no iteration was recorded" if got == 0 else "how many iterations run without autograd?")


def test_ex3_truncation_equals_a_cut_after_r_minus_k():
    """The model's gradient is exactly that of r - k iterations, a cut (detach), then k iterations (§3)."""
    gpt, x, y = tiny(0.05, backprop_depth=2).train(), tokens(), tokens(seed=1)
    got = grads(gpt, gpt(x, y, num_steps=5)[1])
    e = gpt.prelude(x)
    s = torch.zeros_like(e)
    for i in range(5):
        s = gpt.loop_step(s.detach() if i == 3 else s, e)
    want = grads(gpt, torch.nn.functional.cross_entropy(gpt.coda(s).flatten(0, 1), y.flatten()))
    worst = max((got[n] - want[n]).abs().max().item() if n in got else math.inf for n in want)
    assert worst <= 1e-6, f"the gradient at r = 5, k = 2 differs from a cut after 3 iterations by up to {worst:.2e} " \
        "-- hint: the no-grad part is the first r - k iterations"


def test_ex3_activation_memory_does_not_grow_with_depth():
    """Only the last k iterations are recorded: the autograd graph has the same size at r = 4 and r = 40."""
    gpt = tiny(backprop_depth=2).train()

    def graph_size(r):
        seen, todo = set(), [gpt(tokens(), tokens(seed=1), num_steps=r)[1].grad_fn]
        while todo:
            fn = todo.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                todo += [f for f, _ in fn.next_functions]
        return len(seen)
    a, b = graph_size(4), graph_size(40)
    assert a == b, f"the autograd graph has {a} nodes at r = 4 and {b} at r = 40 (k = 2), expected the same size " \
        "-- hint: the first r - k iterations must not be recorded at all"

# -- exercise 4: kl_converged ------------------------------------------------------------------------------------------


def test_ex4_kl_weighs_by_the_new_distribution():
    """The first test compares p_1 with uniform u (Huginn): KL(p || u) = log V - H(p), weighted by the NEW p."""
    logp = torch.log_softmax(torch.randn(3, 1, V, generator=torch.Generator().manual_seed(0)) * 2, -1)
    uniform, kl = torch.full_like(logp, -math.log(V)), math.log(V) + (logp.exp() * logp).sum(-1)
    for b in range(3):
        held = [model.kl_converged(uniform[b], logp[b], f * kl[b].item()).all().item() for f in (1.05, 0.95)]
        assert held == [True, False], (
            f"row {b}: KL(p || uniform) = {kl[b].item():.3f}; the test held {held} at eps = 1.05 and 0.95 x KL, "
            f"expected [True, False] -- hint: weigh the log-ratio by the new distribution, summed over the vocabulary")


def test_ex4_kl_compares_strictly():
    """Identical distributions (KL = 0): eps = 0 must not hold (0 means never exit), eps = 1e-6 must."""
    logp = torch.log_softmax(torch.randn(4, 1, V, generator=torch.Generator().manual_seed(0)) * 10, -1)
    held = model.kl_converged(logp, logp.clone(), 0.0).sum().item()
    assert held == 0, f"eps = 0 held for {held} of 4 identical distributions, expected none -- hint: compare " \
        "strictly: a KL of exactly 0 is not below eps = 0"
    assert model.kl_converged(logp, logp.clone(), 1e-6).all(), "eps = 1e-6 did not hold for identical distributions"


def test_ex4_kl_never_holds_at_eps_zero_where_fp32_kl_is_negative():
    """Distributions a rounding error apart give a KL slightly below 0 in fp32: eps = 0 must still never hold."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1, V, generator=g) * 10
    logp_prev, logp = (torch.log_softmax(t, -1) for t in (logits, logits + 1e-6 * torch.randn(64, 1, V, generator=g)))
    raw = (logp.exp() * (logp - logp_prev)).sum(-1)
    assert raw.min() < 0, 'the fixture should contain a negative fp32 KL'
    held = model.kl_converged(logp_prev, logp, 0.0).sum().item()
    assert held == 0, f"eps = 0 held for {held} of 64 tokens whose fp32 KL is down to {raw.min():.1e}, expected " \
        "none -- hint: a KL is never negative in exact arithmetic; what should fp32's slightly negative ones become?"


def test_ex4_eps_zero_runs_to_the_cap_on_a_converging_model():
    """On a model whose loop converges (its fp32 KL dips below 0), eps = 0 runs every token to the cap, in
    teacher-forced adaptive_forward and in cached decoding: the clamp at work in the whole model."""
    gpt = tiny(norm_state=False, max_depth=16)
    d_tf = adaptive_forward(gpt, tokens(B=4, T=32), exit_threshold=0.0, num_steps=16)[2]
    d_gen = generate(gpt, tokens(B=4, T=4), 12, num_steps=16, exit_threshold=0.0, temperature=0)[1]
    assert d_tf.min() == 16 and d_gen.min() == 16, (
        f"eps = 0 stopped after {d_tf.float().mean():.2f} (teacher-forced) and {d_gen.float().mean():.2f} (decoding) "
        f"iterations per token on average, expected all 16 -- hint: converged tokens exit: the docstring's fp32 trap")


def test_ex4_huge_eps_stops_every_token_after_one_iteration():
    """A huge eps holds at once: every token stops after its first iteration, teacher-forced and while decoding."""
    gpt = tiny(0.25)
    d_tf = adaptive_forward(gpt, tokens(), exit_threshold=1e9, num_steps=6)[2]
    d_gen = generate(gpt, tokens(T=3), 6, num_steps=5, exit_threshold=1e9)[1]
    assert d_tf.max() == 1 and d_gen.max() == 1, f"eps = 1e9 ran up to {d_tf.max().item()} (teacher-forced) and " \
        f"{d_gen.max().item()} (decoding) iterations, expected 1 -- hint: any finite KL is below eps = 1e9"

# -- exercise 6: fill_latest -------------------------------------------------------------------------------------------


WHY = ("hint: which keys/values did a token that stopped after d iterations compute, and which ones does forward("
       "depths=...) show later tokens at the iterations beyond d (METHOD.md §5, per-token depth)? -- more: ")


def test_ex6_fill_latest_gives_later_iterations_the_latest_entry():
    """At position pos a row that ran d iterations gets, at every later iteration, what the per-token-depth forward
    shows later tokens; its own d entries and every other position stay as they were."""
    pos, depths = 2, torch.tensor([1, 3, 5])
    kv = torch.randn(5, 2, 2, 3, 2, 4, 3, generator=torch.Generator().manual_seed(0))  # (r, L, 2, B, H, T, hd)
    got = kv.clone()
    model.fill_latest(got, depths, pos)
    assert torch.equal(got[:, :, :, :, :, [0, 1, 3]], kv[:, :, :, :, :, [0, 1, 3]]), \
        "entries at positions other than pos changed -- hint: only the token at pos exited"
    for b, d in enumerate(depths.tolist()):
        for i in range(5):
            entry = got[i, :, :, b, :, pos]
            source = next((j for j in range(5) if torch.equal(entry, kv[j, :, :, b, :, pos])), None)
            what = 'zeros' if not entry.any() else 'nothing written' if entry.isnan().all() else 'another value' \
                if source is None else f"iteration {source}'s entry"
            assert i >= d or source == i, f"row {b} (depth {d}), iteration {i} < depth now holds {what} -- hint: " \
                "the entries a token computed itself must stay"
            assert i < d or source == d - 1, f"row {b} (depth {d}), iteration {i} holds {what} -- " + WHY + \
                "the latest entry a row computed is iteration d - 1: later iterations at pos should hold copies of it"


@pytest.mark.parametrize('variant', [dict(inject='concat'), dict(inject='add'), dict(inject='none'),
                                     dict(inject='add', norm='sandwich', pos='rope', norm_state=False)],
                         ids=['concat', 'add', 'none', 'huginn'])
def test_ex6_cached_early_exit_equals_the_per_token_depth_forward(variant):
    """The exact test of the early-exit cache (§5): decoding with exits equals forward(out[:, :-1], depths=depths)."""
    gpt, name = tiny(0.25, **variant), '/'.join(str(v) for v in variant.values())
    for eps in (1e-3, 1e-2, 5e-2):
        out, depths, logits = generate(gpt, tokens(B=4, T=1), 12, num_steps=8, exit_threshold=eps, return_logits=True)
        diff = (gpt(out[:, :-1], depths=depths)[0] - logits).abs().max().item()
        assert diff <= 1e-5, f"model {name}, eps {eps}: cached decoding differs from the per-token-depth " \
            f"forward by up to {diff:.1e} (tolerance 1e-5) -- " + WHY + "every loop layer, keys and values alike"

# == the grader's own tests ============================================================================================


def depth_without_plus_one(mean_depth, max_depth, generator=None, sigma=0.5):
    tau = torch.normal(math.log(mean_depth) - sigma ** 2 / 2, sigma, (1,), generator=generator)
    return int(min(torch.poisson(tau.exp(), generator=generator).item(), max_depth))  # r = Poisson(e^tau), no + 1


def depth_at_least_one_without_plus_one(mean_depth, max_depth, generator=None, sigma=0.5):
    return max(depth_without_plus_one(mean_depth, max_depth, generator, sigma), 1)  # 0 patched away, still no + 1


def inject_ignoring_e(s, e, kind, adapter=None):
    return adapter(torch.cat([s, torch.zeros_like(e)], dim=-1)) if kind == 'concat' else s


def full_backprop(step, s, r, k):
    for i in range(r):  # every iteration recorded: k is ignored
        s = step(s, i)
    return s


def kl_with_less_or_equal(logp_prev, logp, eps):
    return (logp.exp() * (logp - logp_prev)).sum(-1).clamp_min(0) <= eps


def knee_at_the_midpoint(curve):
    return len(curve) // 2


def fill_with_zeros(loop_kv, depths, pos):
    for b, d in enumerate(depths.tolist()):
        loop_kv[d:, :, :, b, :, pos] = 0  # the missing entries zeroed instead of copied


def fill_a_copy(loop_kv, depths, pos):
    loop_kv = loop_kv.clone()  # rebinding the name: the model's cache is never written
    loop_kv[:, :, :, :, :, pos] = loop_kv[:1, :, :, :, :, pos]


PLANTED = [  # (exercise, function, mistake, the property it breaks first, words of the message that name it)
    (1, 'sample_depth', depth_without_plus_one, 'test_ex1_depth_lies_in_1_to_max_depth', 'can be 0'),
    (1, 'sample_depth', depth_at_least_one_without_plus_one, 'test_ex1_depth_mean_is_mean_depth_plus_one',
     'the +1 is missing'),
    (2, 'inject', inject_ignoring_e, 'test_ex2_injection_formula[concat]', 'ignores e'),
    (3, 'truncated_loop', full_backprop, 'test_ex3_truncated_loop_runs_r_iterations_and_backprops_the_last_k[5-2]',
     'every iteration was recorded'),
    (4, 'kl_converged', kl_with_less_or_equal, 'test_ex4_kl_compares_strictly', 'compare strictly'),
    (5, 'find_knee', knee_at_the_midpoint, 'test_ex5_knee_of_a_falling_curve_is_where_it_turns_flat', 'the middle'),
    (6, 'fill_latest', fill_with_zeros, 'test_ex6_fill_latest_gives_later_iterations_the_latest_entry', 'holds zeros'),
    (6, 'fill_latest', fill_a_copy, 'test_ex6_fill_latest_gives_later_iterations_the_latest_entry',
     'loop_kv was not written'),
]


def failures(results):
    return [r for r in results if not r.passed]


@pytest.mark.parametrize('number', sorted(check.BY_NUMBER))
def test_blank_stub_fails_every_property_of_its_exercise(number):
    """Each property fails on the shipped stub because it raises NotImplementedError (so every property really calls
    the student's function), with no hint: a hint would only give the answer away."""
    results = check.grade(number)
    if not any('NotImplementedError' in r.why for r in results):
        pytest.skip(f"exercises/{check.BY_NUMBER[number].file} has been edited: it is no longer the blank stub")
    assert len(results) >= 4 and not any(r.passed for r in results)
    assert all('NotImplementedError' in r.why and not r.hint for r in results), [(r.why, r.hint) for r in results]


@pytest.mark.parametrize('number', sorted(check.BY_NUMBER))
def test_project_function_passes_its_exercise(number):
    """The product's own functions (the solutions) pass every property of their exercise."""
    results = check.grade(number, solution=True)
    assert results and not failures(results), [(r.node, r.why) for r in failures(results)]


@pytest.mark.parametrize('number, name, wrong, prop, words', PLANTED, ids=[p[2].__name__ for p in PLANTED])
def test_planted_mistake_fails_with_a_message_naming_it(number, name, wrong, prop, words):
    """A classic mistake fails first at the property it breaks; the FAIL line states the property, and the why or
    hint names the mistake in words, one line each, never the answer's code."""
    results = check.grade(number, functions={name: wrong}, exitfirst=True)
    first = failures(results)[0]
    assert first.node.endswith(prop), (first.node, first.why)
    assert words in first.why + first.hint and '\n' not in first.why + first.hint, (first.why, first.hint)
    lines = check.report(check.BY_NUMBER[number], results, 0.0)
    assert first.statement[:40] in next(line for line in lines if line.lstrip().startswith('FAIL')), lines
    answer = [line.strip() for line in inspect.getsource(check.ORIGINAL[name]).splitlines()[1:] if
              len(line.strip()) > 20 and not line.strip().startswith(('"', '#'))]
    assert not [line for line in answer if line in first.hint], 'a hint prints a line of the answer'


def test_the_give_away_hint_comes_only_after_a_repeated_failure(tmp_path, capsys):
    """Exercise 6 first asks for the reasoning; the hint that spells out the latest entry shows only when the same
    property failed on the previous `check 6` too (kept in a file in the temp folder, per exercise folder)."""
    (tmp_path / 'ex6_fill_latest.py').write_text(
        "def fill_latest(loop_kv, depths, pos):\n"
        "    for b, d in enumerate(depths.tolist()):\n"
        "        loop_kv[d:, :, :, b, :, pos] = 0\n")
    runs = []
    for _ in range(2):
        assert check.check(6, folder=str(tmp_path)) == 1
        runs.append(capsys.readouterr().out)
    assert 'which keys/values' in runs[0] and 'd - 1' not in runs[0], runs[0]
    assert 'which keys/values' in runs[1] and 'd - 1' in runs[1], runs[1]
    first = failures(check.grade(6, functions={'fill_latest': fill_with_zeros}, exitfirst=True))[0]
    assert 'd - 1' in failures(check.grade(6, functions={'fill_latest': fill_with_zeros}, exitfirst=True,
                                           failed_before={first.node}))[0].hint


def test_whole_model_exit_properties_require_the_clamp():
    """Without the clamp the whole-model eps = 0 property fails too, not only the unit property."""
    unclamped = lambda logp_prev, logp, eps: (logp.exp() * (logp - logp_prev)).sum(-1) < eps
    results = {r.node.split('::')[-1]: r for r in check.grade(4, functions={'kl_converged': unclamped})}
    assert not results['test_ex4_eps_zero_runs_to_the_cap_on_a_converging_model'].passed
    assert not results['test_ex4_kl_never_holds_at_eps_zero_where_fp32_kl_is_negative'].passed


def test_wrong_shape_is_one_line_saying_what_shape_is_expected():
    """A function returning the wrong shape gets one line naming the function, the shape it returned and the shape it
    must have, at its return, instead of a shape error deep inside the model."""
    forgot_adapter = lambda s, e, kind, adapter=None: torch.cat([s, e], dim=-1)
    why = failures(check.grade(2, functions={'inject': forgot_adapter}, exitfirst=True))[0].why
    assert why.startswith('your inject returned') and "return a tensor of s's shape" in why and '\n' not in why, why


def test_error_in_the_student_file_names_its_line(tmp_path):
    """An exception raised in the student's own code is one line with its type and file:line."""
    (tmp_path / 'ex4_kl_exit.py').write_text(
        "def kl_converged(logp_prev, logp, eps):\n"
        "    return (logp.exp() * (logp - logp_prev[..., :3])).sum(-1) < eps\n")
    why = failures(check.grade(4, folder=str(tmp_path), exitfirst=True))[0].why
    assert why.startswith('RuntimeError') and 'ex4_kl_exit.py:2' in why and '\n' not in why, why


def test_file_that_does_not_load_is_one_failing_line(tmp_path):
    """A syntax error in the student's file is one failing line that says the file does not load and where."""
    (tmp_path / 'ex1_sample_depth.py').write_text("def sample_depth(mean_depth, max_depth:\n    return 1\n")
    results = check.grade(1, folder=str(tmp_path))
    assert len(results) == 1 and not results[0].passed
    assert 'does not load' in results[0].why and 'SyntaxError' in results[0].why and '\n' not in results[0].why


def test_the_swap_reaches_the_model_path_and_is_undone():
    """An exit rule that always holds makes the model's own adaptive exit stop at depth 1 (so model.EXIT_RULES got
    the swap), and after grading model.kl_converged and EXIT_RULES are the project's again."""
    always = lambda logp_prev, logp, eps: torch.ones(logp.shape[:-1], dtype=torch.bool)
    results = {r.node.split('::')[-1]: r for r in check.grade(4, functions={'kl_converged': always})}
    assert not results['test_ex4_eps_zero_runs_to_the_cap_on_a_converging_model'].passed
    assert model.kl_converged is check.ORIGINAL['kl_converged'] is model.EXIT_RULES['kl'][0]


def test_cli_grades_without_traceback_and_keeps_the_last_failures(tmp_path):
    """`python -m exercises check N` on an unwritten exercise exits 1 with FAIL lines and no traceback."""
    (tmp_path / 'ex4_kl_exit.py').write_text("def kl_converged(logp_prev, logp, eps):\n    raise NotImplementedError\n")
    graded = subprocess.run([sys.executable, '-m', 'exercises', 'check', '4', f'--dir={tmp_path}'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert graded.returncode == 1 and 'FAIL' in graded.stdout, graded.stdout + graded.stderr
    assert 'Traceback' not in graded.stdout + graded.stderr


@pytest.mark.parametrize('argv, word', [
    (['check', '9'], "'9'"), (['observe', 'all'], "'all'"), ([], 'nothing'), (['check', '1', '--fast'], '--fast'),
    (['check', '1', '--dir=/nowhere'], 'nowhere'), (['observe', '4', '--ckpt=/nowhere/ckpt.pt'], '/nowhere/ckpt.pt')])
def test_bad_command_line_is_one_error_line_naming_it(argv, word, capsys):
    """A bad exercise, command, option, folder or checkpoint exits 2 with one `error:` line naming the bad value (a
    missing --ckpt is never replaced by a random model in silence)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error:') and len(err.strip().splitlines()) == 1 and word in err, err


def test_observe_1_labels_the_cap_in_its_last_bin(capsys):
    """The histogram's last bin holds the draws capped at 128, and its label says so."""
    observe_1('')
    assert '120..128' in capsys.readouterr().out
