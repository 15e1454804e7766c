"""
Properties of model.py, one per test. Tiny fp32 CPU models, no network: `python -m pytest -q test_model.py`.
The method's functions are reached as `model.<name>` at call time, so exercises/ can swap a student's version in.
"""

import math

import pytest
import torch

import model
from model import GPT, GPTConfig
from sample import adaptive_forward, generate

V = 50  # vocabulary of the tiny test models


def tiny(**kwargs):
    """A tiny looped model in eval mode with a deterministic initial state (zeros, or e when nothing is injected)."""
    torch.manual_seed(0)
    inject = kwargs.get('inject', 'concat')
    cfg = dict(block_size=32, vocab_size=V, n_embd=32, n_head=4, n_prelude=1, n_loop=2, n_coda=1, mean_depth=3,
               max_depth=8, backprop_depth=2, init_state='embed' if inject == 'none' else 'zeros')
    return GPT(GPTConfig(**{**cfg, **kwargs})).eval()


def lively(gpt, std=0.25):
    """Larger random weights, so successive iterations change the prediction and early exit picks varied depths."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return gpt


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- configuration ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('field, value', [
    ('n_embd', 30), ('n_head', 0), ('n_prelude', -1), ('n_coda', -1), ('n_loop', 0), ('mean_depth', 0),
    ('backprop_depth', 0), ('max_depth', 2), ('inject', 'mul'), ('init_state', 'ones'), ('state_std', 0.0),
    ('dropout', 1.0), ('block_size', 0), ('mean_depth', 2.5)])
def test_impossible_config_raises_valueerror_naming_the_field(field, value):
    """Every impossible GPTConfig fails at construction with one line naming the field and its value."""
    with pytest.raises(ValueError) as err:
        GPTConfig(**{**dict(n_embd=32, n_head=4, mean_depth=3, max_depth=8), field: value})
    message = str(err.value)
    assert field in message and repr(value) in message and '\n' not in message, message


def test_parameter_count_does_not_depend_on_depth():
    """Depth is a run-time choice: mean/max depth change no parameter, and running deeper creates none."""
    counts = {tiny(mean_depth=m, max_depth=64).get_num_params() for m in (1, 4, 32)}
    assert len(counts) == 1, counts
    gpt = tiny()
    before = [p.shape for p in gpt.parameters()]
    gpt(tokens(), num_steps=20)
    assert [p.shape for p in gpt.parameters()] == before


# --- the method's functions ---------------------------------------------------------------------------------------------

def test_depth_sampler_mean_is_mean_depth_plus_one_and_respects_the_cap():
    """Log-normal Poisson + 1 (§3): E[r] = mean_depth + 1; every draw lies in 1..max_depth."""
    g = torch.Generator().manual_seed(0)
    draws = [model.sample_depth(8, 1000, generator=g) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 9) < 0.4, sum(draws) / len(draws)
    capped = [model.sample_depth(8, 10, generator=g) for _ in range(2000)]
    assert min(capped) >= 1 and max(capped) == 10


def test_depth_sampler_is_reproducible_from_a_seed():
    """The same seed gives the same depths (what makes DDP ranks and resume agree)."""
    draw = lambda: [model.sample_depth(4, 32, generator=torch.Generator().manual_seed(s)) for s in range(50)]
    assert draw() == draw() and len(set(draw())) > 3


def test_noise_state_is_reproducible_with_a_generator():
    """init_state='noise' is random per call, yet exact given a seeded generator."""
    gpt = tiny(init_state='noise', state_std=0.5)
    x = tokens()
    run = lambda seed: gpt(x, generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_noise_state_is_a_truncated_normal_of_the_configured_std():
    """Huginn's s_0 (§2): mean 0, the configured std, nothing beyond 3 std."""
    e = torch.zeros(64, 64, 32)
    s = model.init_state(e, 'noise', 0.1, torch.Generator().manual_seed(0))
    assert s.shape == e.shape and s.abs().max() <= 0.3 + 1e-6
    assert abs(s.mean()) < 0.005 and 0.08 < s.std() < 0.1


def test_kl_exit_clamps_negative_kl_so_threshold_zero_never_exits():
    """Identical distributions give KL ~ 0 (or -1e-7 in fp32): with eps 0 that must not count as converged."""
    logp = torch.log_softmax(torch.randn(4, 1, V) * 10, -1)
    assert not model.kl_converged(logp, logp.clone(), 0.0).any()
    assert model.kl_converged(logp, logp.clone(), 1e-6).all()


# --- forward ------------------------------------------------------------------------------------------------------------

HUGINN = dict(norm='sandwich', pos='rope', inject='add')  # the blocks and positions of Huginn's recipe
SHOWCASE = dict(HUGINN, window=2)  # the depth showcase's model: a local attention window
GPT2 = dict(norm='pre', pos='learned', norm_state=True)  # GPT-2's blocks and positions, with a state norm


@pytest.mark.parametrize('r', [1, 3, 7])
@pytest.mark.parametrize('variant', [{}, HUGINN], ids=['gpt2', 'huginn'])
def test_changing_later_tokens_never_changes_earlier_logits(r, variant):
    """Causality holds at every depth, with either blocks and positions: the loop mixes positions only through
    causal attention (RoPE turns q and k by their own positions, never by later ones)."""
    gpt = lively(tiny(**variant))
    x = tokens(T=16)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % V
    a, b = gpt(x, num_steps=r)[0], gpt(y, num_steps=r)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def plain_reference(gpt, idx):
    """An ordinary GPT forward through the same blocks in sequence: embeddings, every block, final norm, head."""
    t = gpt.transformer
    x = t.wte(idx) + (t.wpe(torch.arange(idx.size(1))) if t.wpe is not None else 0)
    for block in [*t.prelude, *t.loop, *t.coda]:
        x = block(x)
    return gpt.lm_head(t.ln_f(x))


@pytest.mark.parametrize('variant', [{}, dict(norm='sandwich'), dict(norm='sandwich', pos='rope')],
                         ids=['gpt2', 'sandwich', 'sandwich-rope'])
def test_one_iteration_without_injection_is_a_plain_gpt(variant):
    """r = 1, inject none, init embed, no state norm is exactly the n_prelude + n_loop + n_coda layer GPT (§1), with
    GPT-2's blocks or Huginn's sandwich blocks and rotary positions: the plain twin is the same network run once."""
    gpt = lively(tiny(inject='none', init_state='embed', norm_state=False, **variant), std=0.05)
    x = tokens()
    assert torch.allclose(gpt(x, num_steps=1)[0], plain_reference(gpt, x), atol=1e-6)
    plain = GPT(model.plain_config(4, block_size=32, vocab_size=V, n_embd=32, n_head=4, **variant))
    plain.load_state_dict(dict(zip(plain.state_dict(), gpt.state_dict().values())))  # same order, same shapes
    plain.eval()
    assert torch.allclose(plain(x)[0], plain_reference(gpt, x), atol=1e-6)


def test_sandwich_blocks_keep_the_state_normalised_at_any_depth():
    """Huginn's sandwich block ends in a LayerNorm, so the state after every iteration has RMS ~1 however long the
    loop runs; GPT-2's pre-norm residual stream without a state norm is free to drift (the §3 trap)."""
    gpt = lively(tiny(norm='sandwich', inject='add', norm_state=False))
    e = gpt.prelude(tokens())
    s = torch.zeros_like(e)
    for _ in range(64):
        s = gpt.loop_step(s, e)
        rms = s.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3), rms


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    """RoPE: q_m . k_n is a function of m - n, so a pattern learned at one place works at every place (and depth)."""
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = model.rotary_table(64, 8)
    score = lambda m, n: (model.rotate(q, cos[m], sin[m]) * model.rotate(k, cos[n], sin[n])).sum().item()
    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5) and score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    assert torch.allclose(model.rotate(q, cos[0], sin[0]), q)  # position 0 is not turned


@pytest.mark.parametrize('r', [1, 3, 6])
def test_a_window_of_two_carries_information_one_position_per_layer(r):
    """window=2: a token reaches one position further per layer it passes, so after the prelude, r iterations and
    the coda it has reached exactly n_prelude + r * n_loop + n_coda positions: one more iteration, one step further."""
    gpt = lively(tiny(window=2, **HUGINN))
    x = tokens(T=20)
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % V
    changed = (gpt(x, num_steps=r)[0] - gpt(y, num_steps=r)[0]).abs().amax(dim=(0, 2)) > 1e-6  # (T,)
    reach = 1 + r * 2 + 1
    assert changed[:reach + 1].all() and not changed[reach + 1:].any(), (r, changed.int().tolist())


def test_window_mask_sees_itself_and_the_previous_tokens_only():
    """The mask of a chunk at pos: key j is visible to query q iff q - window < j <= q."""
    mask = model.attention_mask(3, 4, 2, 'cpu')
    expected = [[q - 2 < j <= q for j in range(7)] for q in range(4, 7)]
    assert mask.tolist() == expected
    assert model.attention_mask(2, 0, 0, 'cpu').tolist() == [[True, False], [True, True]]


def test_rotary_positions_add_no_parameters():
    """pos='rope' drops GPT-2's learned position table: only the token embedding remains."""
    learned, rope = tiny(pos='learned'), tiny(pos='rope')
    assert learned.get_num_params(non_embedding=False) - rope.get_num_params(non_embedding=False) == 32 * 32


def test_eval_uses_mean_depth_and_training_draws_a_depth():
    """num_steps=None: eval runs mean_depth iterations; training draws r (so it varies), capped at max_depth."""
    gpt = lively(tiny())
    x = tokens()
    assert torch.equal(gpt(x)[0], gpt(x, num_steps=3)[0])
    calls, step = [], gpt.loop_step
    gpt.loop_step = lambda *args: calls.append(1) or step(*args)
    depths = []
    for _ in range(20):
        calls.clear()
        gpt.train()(x)
        depths.append(len(calls))
    assert len(set(depths)) > 2 and max(depths) <= gpt.config.max_depth, depths


def grads(gpt, loss):
    gpt.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}


def test_truncated_backprop_equals_detaching_after_r_minus_k_iterations():
    """The gradient is exactly that of: r - k iterations, detach, k iterations with autograd (§3)."""
    gpt = lively(tiny(backprop_depth=2), std=0.05).train()
    x, y = tokens(), tokens(seed=1)
    got = grads(gpt, gpt(x, y, num_steps=5)[1])
    e = gpt.prelude(x)
    s = torch.zeros_like(e)
    for _ in range(3):
        s = gpt.loop_step(s, e)
    s = s.detach()
    for _ in range(2):
        s = gpt.loop_step(s, e)
    logits = gpt.coda(s)
    want = grads(gpt, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


@pytest.mark.parametrize('inject', ['concat', 'add'])
def test_loop_and_prelude_weights_get_gradient(inject):
    """The loop's shared weights learn, and the prelude learns through the injection even when r > k."""
    gpt = tiny(inject=inject, backprop_depth=2).train()
    g = grads(gpt, gpt(tokens(), tokens(seed=1), num_steps=6)[1])
    for part in ('prelude', 'loop', 'coda'):
        assert any(n.startswith(f'transformer.{part}.') and v.abs().sum() > 0 for n, v in g.items()), part


def test_loop_weights_get_gradient_under_bf16_autocast():
    """§3 trap: autocast's weight cache filled in the no-grad iterations must not cut the loop off from its gradient."""
    gpt = tiny(backprop_depth=2).train()
    with torch.autocast('cpu', dtype=torch.bfloat16, cache_enabled=False):
        _, loss = gpt(tokens(), tokens(seed=1), num_steps=6)
    g = grads(gpt, loss)
    assert g['transformer.loop.0.attn.c_attn.weight'].abs().sum() > 0


def test_flops_count_forward_r_and_backward_k():
    """§6: past k, one more iteration adds exactly one forward pass of the loop; within k, forward + backward."""
    gpt = tiny(backprop_depth=2)
    f = gpt.flops_per_token
    one_loop = f(6, backprop_depth=0) - f(5, backprop_depth=0)
    assert f(6) - f(5) == one_loop
    assert f(2) - f(1) == 3 * one_loop


# --- per-token depth ----------------------------------------------------------------------------------------------------

def test_uniform_per_token_depths_equal_a_fixed_depth():
    """forward(depths=full(r)) is forward(num_steps=r)."""
    gpt = lively(tiny())
    x = tokens()
    for r in (1, 4):
        a = gpt(x, depths=torch.full_like(x, r))[0]
        assert torch.allclose(a, gpt(x, num_steps=r)[0], atol=1e-6)


def test_a_frozen_position_still_shows_its_latest_keys_to_later_positions():
    """Stopping token 0 early changes token 0's logits (it is frozen) and, through its keys, the logits after it."""
    gpt = lively(tiny())
    x = tokens()
    deep = torch.full_like(x, 5)
    early = deep.clone()
    early[:, 0] = 2
    a, b = gpt(x, depths=deep)[0], gpt(x, depths=early)[0]
    assert torch.allclose(b[:, 0], gpt(x[:, :1], num_steps=2)[0][:, 0], atol=1e-6)
    assert not torch.allclose(a[:, 1:], b[:, 1:])


@pytest.mark.parametrize('kwargs, word', [
    (dict(num_steps=3, depths='full'), 'not both'), (dict(depths='short'), 'shape'), (dict(depths='zero'), '1..'),
    (dict(depths='big'), '1..'), (dict(depths='float'), 'LongTensor'), (dict(num_steps=0), 'num_steps')])
def test_bad_depth_arguments_raise_valueerror(kwargs, word):
    """depths with num_steps, a wrong shape or dtype, values out of 1..max_depth, or num_steps < 1 are refused."""
    gpt = tiny()
    x = tokens()
    make = {'full': torch.full_like(x, 2), 'short': torch.ones(2, 3, dtype=torch.long), 'zero': torch.zeros_like(x),
            'big': torch.full_like(x, 99), 'float': torch.ones(x.shape)}
    kwargs = {k: make.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=word):
        gpt(x, **kwargs)


# --- decoding -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', [{}, HUGINN, SHOWCASE], ids=['gpt2', 'huginn', 'window'])
def test_cached_generation_equals_the_full_forward_at_fixed_depth(variant):
    """KV-cached decoding gives the logits of recomputing everything (prompt of several tokens); with RoPE the
    cached keys keep the turn of their own position."""
    gpt = lively(tiny(**variant))
    out, depths, logits = generate(gpt, tokens(T=5), 10, num_steps=4, return_logits=True)
    full = gpt(out[:, :-1], num_steps=4)[0]
    assert torch.allclose(logits, full[:, 4:], atol=1e-5)
    assert out.shape == (2, 15) and (depths == 4).all()


@pytest.mark.parametrize('variant', [dict(GPT2, inject='concat'), dict(GPT2, inject='add'), dict(GPT2, inject='none'),
                                     HUGINN, SHOWCASE], ids=['concat', 'add', 'none', 'huginn', 'window'])
def test_early_exit_cached_generation_equals_forward_with_its_depths(variant):
    """The exact test of the early-exit cache (§5): decoding with exits equals forward(out[:, :-1], depths=depths)."""
    gpt = lively(tiny(**variant))
    inject = variant['inject']
    varied = False
    for eps in (1e-3, 1e-2, 5e-2):
        out, depths, logits = generate(gpt, tokens(B=4, T=1), 12, num_steps=8, exit_threshold=eps, return_logits=True)
        full = gpt(out[:, :-1], depths=depths)[0]
        # fp32 rounding through 8 LayerNormed iterations stays below 1e-4; a wrong cache entry is off by more than 1e-2
        assert (full - logits).abs().max() <= 1e-4, (inject, eps, (full - logits).abs().max())
        varied |= len(depths.unique()) > 2 and len(depths[:, 0].unique()) > 1
    assert varied, 'the thresholds should make rows exit at different depths'


def test_threshold_zero_runs_every_token_to_full_depth_and_a_huge_one_stops_at_one():
    """eps = 0 never exits (KL is clamped at 0); an enormous eps exits after the first iteration."""
    gpt = lively(tiny())
    assert (generate(gpt, tokens(T=3), 6, num_steps=5, exit_threshold=0.0)[1] == 5).all()
    assert (generate(gpt, tokens(T=3), 6, num_steps=5, exit_threshold=1e9)[1] == 1).all()


def test_a_batch_generates_what_each_row_generates_alone():
    """Rows exit on their own: a row's tokens and depths do not depend on its neighbours."""
    gpt = lively(tiny())
    prompts = tokens(B=3, T=1)
    out, depths = generate(gpt, prompts, 10, num_steps=8, exit_threshold=1e-2, temperature=0)
    for b in range(3):
        row, row_depths = generate(gpt, prompts[b:b + 1], 10, num_steps=8, exit_threshold=1e-2, temperature=0)
        assert torch.equal(row, out[b:b + 1]) and torch.equal(row_depths, depths[b:b + 1])


def test_long_prompts_are_cropped_and_generation_runs_past_the_block_size():
    """A prompt longer than block_size keeps its last block_size tokens; decoding continues past the window."""
    gpt = tiny()
    out, depths = generate(gpt, tokens(T=40), 30, num_steps=2)
    assert out.shape == (2, 70) and depths.shape == (2, 30)
    assert torch.equal(out[:, :40], tokens(T=40))


def test_teacher_forced_exit_threshold_zero_is_max_depth_and_huge_is_one():
    """adaptive_forward: eps 0 runs every position to the cap, a huge eps stops each after one iteration,
    and its logits are forward(depths=...) for the depths it chose."""
    gpt = lively(tiny())
    x = tokens()
    assert (adaptive_forward(gpt, x, exit_threshold=0.0, num_steps=6)[2] == 6).all()
    assert (adaptive_forward(gpt, x, exit_threshold=1e9, num_steps=6)[2] == 1).all()
    logits, _, depths = adaptive_forward(gpt, x, exit_threshold=1e-2, num_steps=6)
    assert torch.allclose(logits, gpt(x, depths=depths)[0], atol=1e-5)


def test_unknown_exit_rule_is_refused():
    with pytest.raises(ValueError, match='exit_rule'):
        generate(tiny(), tokens(T=1), 2, exit_threshold=0.1, exit_rule='vibes')


# --- compilation --------------------------------------------------------------------------------------------------------

def test_changing_depth_every_step_causes_no_recompilation():
    """compile_loop compiles the stages, not the loop (§3 trap): after warm-up, new r values never recompile."""
    import torch._dynamo
    torch._dynamo.reset()
    gpt = tiny(backprop_depth=2).train().compile_loop(backend='eager')
    x, y = tokens(), tokens(seed=1)
    gpt(x, y, num_steps=3)[1].backward()  # warm-up: both the no-grad and the grad iteration
    with torch._dynamo.config.patch(error_on_recompile=True):
        for r in (1, 2, 5, 9, 17, 4):
            gpt(x, y, num_steps=r)[1].backward()
    assert 'prelude' not in gpt.state_dict() and all('_orig_mod' not in k for k in gpt.state_dict())


# --- the halting router (ETD-style learned exit) ------------------------------------------------------------------------

def test_halting_distribution_sums_to_one():
    """ACT's halting distribution puts all probability somewhere in 1..R."""
    lam = torch.rand(6, 3, 5)
    p = model.halting_distribution(lam)
    assert torch.allclose(p.sum(0), torch.ones(3, 5)) and (p >= 0).all()
    assert torch.allclose(p[0], lam[0])


def test_router_learns_alone_and_leaves_the_language_model_gradient_unchanged():
    """The router's loss reaches only the router: every other gradient equals the router-free model's."""
    gpt = tiny(router=True).train()
    x, y = tokens(), tokens(seed=1)
    with_router = grads(gpt, gpt(x, y, num_steps=4)[1])
    router, gpt.router = gpt.router, None
    without = grads(gpt, gpt(x, y, num_steps=4)[1])
    gpt.router = router
    assert with_router['router.weight'].abs().sum() > 0
    for name, g in without.items():
        assert torch.allclose(with_router[name], g, atol=1e-7), name


def test_router_exit_needs_a_router_and_its_cache_matches_the_forward():
    """exit_rule='router' is refused without a router; with one, eps 0 never halts, and decoding equals forward(depths)."""
    with pytest.raises(ValueError, match='router'):
        generate(tiny(), tokens(T=1), 2, exit_threshold=0.1, exit_rule='router')
    gpt = lively(tiny(router=True))
    assert (generate(gpt, tokens(T=1), 4, num_steps=5, exit_threshold=0.0, exit_rule='router')[1] == 5).all()
    with torch.no_grad():
        gpt.router.bias.fill_(-1.0)  # halt with probability ~ 1/4 per iteration: varied depths
    out, depths, logits = generate(gpt, tokens(B=4, T=1), 10, num_steps=8, exit_threshold=0.3, exit_rule='router',
                                       return_logits=True)
    assert len(depths.unique()) > 1
    assert (gpt(out[:, :-1], depths=depths)[0] - logits).abs().max() <= 1e-5


# --- generate's contract -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, word', [
    (dict(idx=torch.tensor([[V]])), 'token ids'), (dict(idx=torch.tensor([[-1]])), 'token ids'),
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), 'idx'), (dict(idx=torch.tensor([1, 2])), 'idx'),
    (dict(top_k=0), 'top_k'), (dict(top_k=-1), 'top_k'), (dict(max_new_tokens=-1), 'max_new_tokens'),
    (dict(temperature=-1.0), 'temperature'), (dict(num_steps=0), 'num_steps'), (dict(exit_threshold=-1.0), 'exit')])
def test_generate_refuses_bad_arguments_with_one_line(kwargs, word):
    """generate has forward's contract: a bad prompt or setting is one ValueError naming it, never an IndexError
    from deep inside, and num_steps=0 is an error here too (not a silent 'default')."""
    args = {**dict(idx=tokens(T=3), max_new_tokens=2), **kwargs}
    with pytest.raises(ValueError, match=word) as err:
        generate(tiny(), **args)
    assert '\n' not in str(err.value)
