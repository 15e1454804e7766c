"""
Properties of sample.py, one per test, on a tiny random char model written to a tmp checkpoint with its own tiny
dataset (meta.json + val.bin). Successful runs go through sample.main() in-process (stdout is then no terminal, so
markup); the error cases also run the real command in subprocesses, started at once so their torch imports overlap.
"""

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import model as model_module
import prepare
import sample
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = sorted(set('abcde fgh[]\\\n'))  # brackets, a backslash and a newline: the markup must escape them
MAX_DEPTH = 6  # max_depth of the tiny model


def tiny_model(inject='concat'):
    """A tiny looped model with a deterministic initial state and large random weights, so that successive iterations
    change the prediction and adaptive exit picks varied depths."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=len(CHARS), n_embd=16, n_head=2, n_prelude=1, n_loop=1, n_coda=1,
                    mean_depth=3, max_depth=MAX_DEPTH, backprop_depth=2, inject=inject,
                    init_state='embed' if inject == 'none' else 'zeros')
    gpt = GPT(cfg).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return gpt


@pytest.fixture(scope='module')
def ckpt_dir(tmp_path_factory):
    """out/ckpt.pt in train.py's format and data/tiny/{meta.json, val.bin}."""
    root = tmp_path_factory.mktemp('sample')
    data = root / 'data' / 'tiny'
    data.mkdir(parents=True)
    (data / 'meta.json').write_text(json.dumps({'vocab_size': len(CHARS), 'chars': CHARS}))
    np.random.default_rng(0).integers(0, len(CHARS), 2000).astype(np.uint16).tofile(data / 'val.bin')
    gpt = tiny_model()
    (root / 'out').mkdir()
    torch.save({'model': gpt.state_dict(), 'model_args': dataclasses.asdict(gpt.config),
                'config': {'dataset': 'tiny', 'data_dir': str(root / 'data')}}, root / 'out' / 'ckpt.pt')
    return root


def cli(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'sample.py'), '--device=cpu', '--dtype=float32', *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine spinning threads cost 10-40x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module', autouse=True)
def runs(ckpt_dir):
    """The real command's error runs, started before the first test so that they overlap with the in-process tests;
    each test waits for its own."""
    out = f"--out_dir={ckpt_dir / 'out'}"
    (ckpt_dir / 'latin1.txt').write_bytes('ab\xe9'.encode('latin-1'))
    procs = {'missing_checkpoint': cli(f"--out_dir={ckpt_dir / 'nowhere'}"),
             'char_outside_vocab': cli(out, '--start=abZ'),
             'bad_device': cli(out, '--device=foo'),
             'prompt_not_utf8': cli(out, f"--start=FILE:{ckpt_dir / 'latin1.txt'}")}
    return {name: types.SimpleNamespace(name=name, proc=p) for name, p in procs.items()}


def result(run):
    if not hasattr(run, 'stdout'):
        run.stdout, run.stderr = run.proc.communicate(timeout=120)
    return run


def settings(**overrides):
    return types.SimpleNamespace(**{**sample.DEFAULTS, **overrides})

# --- markup ---------------------------------------------------------------------------------------------------------


def test_markup_round_trips_any_text():
    """parse_markup(markup(...)) gives back every token's text and depth, brackets/backslashes/newlines included."""
    pieces = ['a', '[', ']', '\\', '\n', '[3]', '\\[', '', 'x]y[', '\r\n']
    depths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    line = sample.markup('pro[mpt]\\\n', pieces, depths)
    assert '\n' not in line, "a sample's markup must be one line"
    assert sample.parse_markup(line) == [('pro[mpt]\\\n', None)] + list(zip(pieces, depths))


def test_parse_markup_rejects_text_that_is_not_markup():
    """An unescaped bracket without a depth is an error, never a silently wrong parse."""
    with pytest.raises(ValueError):
        sample.parse_markup('ab[c]')


def test_main_markup_depths_equal_generate(ckpt_dir, capsys):
    """Off a terminal, sample.py prints one markup line per sample whose tokens and depths are exactly generate's."""
    sample.main([f"--out_dir={ckpt_dir / 'out'}", '--device=cpu', '--dtype=float32', '--start=a[b\\', '--seed=7',
                 '--num_samples=2', '--max_new_tokens=12', '--exit_threshold=1e-2', '--temperature=1.0'])
    lines = capsys.readouterr().out.rstrip('\n').split('\n')
    assert len(lines) == 4 and lines[1].startswith('--- sample 1/2') and lines[3].startswith('--- sample 2/2'), lines
    gpt, _ = sample.load_checkpoint(str(ckpt_dir / 'out'))
    x = torch.tensor([[CHARS.index(c) for c in 'a[b\\']])
    generator = torch.Generator().manual_seed(7)
    for line in (lines[0], lines[2]):
        out, depths = sample.generate(gpt, x, 12, num_steps=MAX_DEPTH, temperature=1.0, top_k=200, exit_threshold=1e-2,
                                   generator=generator)
        parsed = sample.parse_markup(line)
        assert parsed[0] == ('a[b\\', None)
        assert [t for t, _ in parsed[1:]] == [CHARS[i] for i in out[0, 4:].tolist()]
        assert [d for _, d in parsed[1:]] == depths[0].tolist()
    assert len(set(d for _, d in parsed[1:])) > 1, "the tiny model should exit at several depths"

# --- self-speculative decoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize('prompt_len, new, batch, draft_depth, n_draft, inject', [
    (1, 40, 1, 1, 3, 'concat'),   # a one-token prompt, crossing block_size (16) twice
    (5, 12, 2, 2, 5, 'concat'),   # a longer prompt, a batch whose rows accept different prefixes
    (20, 6, 1, 1, 2, 'none'),     # a prompt longer than block_size; ETD's injection-free loop
])
def test_speculative_greedy_equals_plain_greedy(prompt_len, new, batch, draft_depth, n_draft, inject):
    """At temperature 0 self-speculative decoding outputs exactly sample.generate's greedy tokens at full depth R."""
    gpt = tiny_model(inject)
    x = torch.randint(0, len(CHARS), (batch, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    plain, _ = sample.generate(gpt, x, new, num_steps=4, temperature=0)
    spec, stats = sample.generate_speculative(gpt, x, new, 4, draft_depth, n_draft, temperature=0)
    assert torch.equal(spec, plain), f"first difference at {(spec != plain).nonzero()[0].tolist()}"
    assert 0 < stats['accepted'] < stats['drafted'], f"the test should see accepted and rejected drafts: {stats}"


def test_speculative_draft_at_full_depth_is_always_accepted():
    """When the drafter runs the verifier's depth their distributions match, so sampling keeps every draft."""
    gpt = tiny_model()
    x = torch.zeros(1, 1, dtype=torch.long)
    _, stats = sample.generate_speculative(gpt, x, 12, 3, draft_depth=3, n_draft=3, temperature=1.0,
                                           generator=torch.Generator().manual_seed(0))
    assert stats['accepted'] == stats['drafted'] > 0, stats


def test_speculative_sampling_keeps_the_verifier_distribution():
    """accept(): the first new token is distributed as the verifier's p, whatever the drafter's q (Leviathan et al.)."""
    B = 40000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).expand(B, 2, 4)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(B, 1, 4)
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q[:, 0], 1, generator=g)
    first = sample.accept(p, q, drafts, generator=g)[:, 0]
    freq = torch.bincount(first, minlength=4).float() / B
    assert torch.allclose(freq, p[0, 0], atol=0.01), freq

# --- continuous thought ---------------------------------------------------------------------------------------------


def test_warm_start_replaces_only_the_initial_state(monkeypatch):
    """--warm_start output == cold-start output when init_state is made to return the previous token's final state,
    and differs from plain cold start: continuous thought changes the initial state and nothing else."""
    gpt = tiny_model()
    x = torch.zeros(1, 1, dtype=torch.long)
    cfg = dict(max_new_tokens=10, temperature=0.0, exit_threshold=1e-2, exit_rule='kl', speculative=False)
    run = lambda warm: sample.generate_sample(gpt, x, settings(**cfg, warm_start=warm), MAX_DEPTH, None)[:2]
    warm, cold = run(True), run(False)
    last = {}
    forward_cached = gpt.forward_cached
    def recording(*args, **kwargs):
        logits, s = forward_cached(*args, **kwargs)
        last['s'] = s
        return logits, s
    real_init = model_module.init_state
    monkeypatch.setattr(gpt, 'forward_cached', recording)
    previous_state = lambda e, *a, **k: last['s'] if 's' in last else real_init(e, *a, **k)
    monkeypatch.setattr(model_module, 'init_state', previous_state)
    patched = run(False)
    assert all(torch.equal(a, b) for a, b in zip(warm, patched)), "warm start changed more than the initial state"
    assert not all(torch.equal(a, b) for a, b in zip(warm, cold)), "warm start had no effect at all"

# --- sweep ----------------------------------------------------------------------------------------------------------


def sweep_batches(ckpt_dir):
    g = torch.Generator().manual_seed(0)
    return [prepare.get_batch(str(ckpt_dir / 'data' / 'tiny'), 'val', 2, 16, g) for _ in range(2)]


def test_sweep_returns_one_row_per_setting(ckpt_dir):
    """One row per fixed depth (its iterations = r) and per EPS (EPS 0 runs max_depth on every token)."""
    rows = sample.depth_sweep(tiny_model(), sweep_batches(ckpt_dir), [1, 2, 4, 12], [1e-1, 0.0], 'kl')
    assert [r['setting'] for r in rows] == ['r=1', 'r=2', 'r=4', 'r=12', 'kl eps=0.1', 'kl eps=0']
    assert [r['mean_iterations'] for r in rows[:4]] == [1, 2, 4, 12]
    assert rows[-1]['mean_iterations'] == MAX_DEPTH and rows[-2]['mean_iterations'] < MAX_DEPTH
    assert all(np.isfinite(r['value']) for r in rows)


def test_sweep_metric_hook_replaces_val_loss(ckpt_dir):
    """sweep(metric=...) reports the given score (e.g. a task accuracy) instead of the loss."""
    def accuracy(logits, targets):
        return (logits.argmax(-1) == targets).float().mean().item()
    batches = sweep_batches(ckpt_dir)
    rows = sample.depth_sweep(tiny_model(), batches, [2], [0.0], 'kl', metric=accuracy)
    expected = sum(accuracy(tiny_model()(x, num_steps=2)[0], y) for x, y in batches) / len(batches)
    assert rows[0]['value'] == pytest.approx(expected) and 0 <= rows[1]['value'] <= 1


def test_sweep_depths_double_up_to_max_and_extrapolate():
    """r = 1, 2, 4, ... max_depth, then 2 * max_depth beyond training."""
    assert sample.sweep_depths(8) == [1, 2, 4, 8, 16] and sample.sweep_depths(6) == [1, 2, 4, 6, 12]


def test_main_sweep_prints_a_table_and_saves_the_plot(ckpt_dir, capsys):
    """--sweep prints one table row per setting, and --plot writes the png."""
    pytest.importorskip('matplotlib', reason='--plot needs matplotlib')
    sample.main([f"--out_dir={ckpt_dir / 'out'}", '--device=cpu', '--dtype=float32', '--sweep', '--sweep_batches=2',
                 '--sweep_batch_size=2', '--sweep_thresholds=1e-1,0', f"--plot={ckpt_dir / 'sweep.png'}"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(('r=', 'kl eps='))]
    assert len(rows) == len(sample.sweep_depths(MAX_DEPTH)) + 2, out
    assert (ckpt_dir / 'sweep.png').stat().st_size > 0


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name, needle', [('missing_checkpoint', 'no checkpoint'), ('char_outside_vocab', "'Z'"),
                                          ('bad_device', "device='foo' is not available here: this machine has cpu"),
                                          ('prompt_not_utf8', 'latin1.txt is not UTF-8 text (byte 0xe9')])
def test_cli_error_is_one_line_without_traceback(runs, name, needle):
    """A bad run of the real command exits != 0 with one 'error:' line naming the problem, no traceback: a bad device
    is named before the checkpoint is read (never blamed on it), a prompt file that is not UTF-8 is named."""
    run = result(runs[name])
    assert run.proc.returncode != 0
    assert 'Traceback' not in run.stderr and run.stderr.startswith('error:') and needle in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize('args, needle', [
    (['--num_samples=0'], 'num_samples=0'),
    (['--max_new_tokens=-1'], 'max_new_tokens=-1'),
    (['--n_draft=0', '--speculative'], 'n_draft=0'),
    (['--temperature=-1'], 'temperature=-1'),
    (['--top_k=0'], 'top_k=0 is not allowed: expected an integer >= 1'),
    (['--device=cuda:7'], "device='cuda:7' is not available here"),
    (['--sweep', '--plot=/nowhere/sweep.png'], "plot='/nowhere/sweep.png' is not allowed"),
    (['--speculative', '--exit_threshold=1e-3'], '--speculative with --exit_threshold'),
    (['--sweep', '--speculative'], '--sweep with --speculative'),
    (['--speculative', '--warm_start'], '--speculative with --warm_start'),
    (['--speculative', '--draft_depth=9', '--num_steps=4'], 'draft_depth=9'),
    (['--num_steps=0'], 'num_steps=0 is not allowed'),
    (['--exit_threshold=-1'], 'exit_threshold=-1 is not allowed: expected None (off)'),
    (['--exit_rule=router', '--exit_threshold=0.99'], "exit_rule='router'"),
    (['--exit_rule=bogus'], "exit_rule='bogus'"),
    (['--color=blue'], "color='blue'"),
    (['--plot=x.png'], "plot='x.png' is not allowed: expected a file in an existing folder, with --sweep"),
    (['--sweep_thresholds=1e-3,x', '--sweep'], 'sweep_thresholds'),
    (['--start='], "start=''"),
    (['--start=FILE:/nonexistent/prompt.txt'], '/nonexistent/prompt.txt'),
    (['--bogus_key=1'], 'bogus_key'),
])
def test_bad_flag_exits_with_one_line_naming_it(ckpt_dir, capsys, args, needle):
    """Every impossible flag or combination stops with exit != 0 and one 'error:' line naming the bad value."""
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"--out_dir={ckpt_dir / 'out'}", '--device=cpu', '--dtype=float32', *args])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and err.startswith('error:') and needle in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_token_probs_is_the_distribution_model_sample_token_draws_from():
    """The speculative acceptance math uses token_probs: it must be exactly model.sample_token's distribution (top_k
    None = all, the k most likely otherwise; one-hot argmax at temperature 0)."""
    logits = torch.randn(1, 6, generator=torch.Generator().manual_seed(0)) * 2
    for top_k in (None, 3):
        draws = sample.sample_token(logits.expand(40000, 6), 0.7, top_k, torch.Generator().manual_seed(1))
        freq = torch.bincount(draws[:, 0], minlength=6).float() / 40000
        assert torch.allclose(freq, sample.token_probs(logits[0], 0.7, top_k), atol=0.01), (top_k, freq)
    assert sample.token_probs(logits, 0.0)[0].argmax() == sample.sample_token(logits, 0.0)[0, 0]
