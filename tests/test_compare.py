"""compare.py: the twins it trains, the diagnostics of a loop, and one tiny end-to-end comparison."""

import os

import pytest
import torch

import compare
import train
from model import GPT, GPTConfig, plain_config

TINY = ['--max_iters=4', '--eval_interval=2', '--eval_iters=1', '--eval_batches=2', '--n_embd=16', '--n_head=2',
        '--batch_size=4', '--block_size=16', '--mean_depth=2', '--max_depth=4', '--backprop_depth=2']


def config(**overrides):
    return {**train.DEFAULTS, **compare.OWN, 'out_dir': 'o', **overrides}


def built(settings, vocab_size=65):
    return GPT(GPTConfig(**train.model_args(type('C', (), settings)(), vocab_size)))


def test_the_params_twin_has_the_looped_models_parameters_and_runs_once():
    """'params' is the same stack of layers run once: equal parameter count (with add injection, which adds no
    weight), depth 1, no injection; blocks and positions are shared with the looped model."""
    cfg = config(inject='add', norm='sandwich', pos='rope', norm_state=False)
    looped, plain = (built(compare.run_settings(cfg, kind, 1)) for kind in ('looped', 'params'))
    assert looped.get_num_params() == plain.get_num_params()
    assert plain.config.max_depth == 1 and plain.config.inject == 'none'
    assert (plain.config.norm, plain.config.pos) == ('sandwich', 'rope')


def test_the_flops_twin_is_as_deep_as_the_loop_runs_at_mean_depth():
    """'flops' has n_prelude + mean_depth * n_loop + n_coda layers: the looped model's inference FLOPs at mean_depth."""
    cfg = config(n_prelude=1, n_loop=2, n_coda=1, mean_depth=3)
    assert compare.run_settings(cfg, 'flops', 1)['n_loop'] == 1 + 3 * 2 + 1


def test_difficulty_buckets_cover_every_position_once():
    for length in (1, 4, 10, 32, 100):
        covered = [t for a, b in compare.buckets(length) for t in range(a, b + 1)]
        assert covered == list(range(1, length + 1)), (length, compare.buckets(length))


def small_loop(inject='concat'):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=20, n_embd=32, n_head=4, n_prelude=1, n_loop=1, n_coda=1,
                        inject=inject, norm='sandwich'))
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return gpt.eval()


def test_diagnostics_report_a_loop_that_ignores_its_state():
    """A concat adapter whose state half is zero computes s_1 from e alone (Huginn §4.3's failure): the output does
    not depend on s_0 and the state stops moving after the first iteration; the verdict says so."""
    gpt = small_loop()
    with torch.no_grad():
        gpt.adapter.weight[:, :32] = 0
    d = compare.diagnose(gpt, torch.randint(0, 20, (2, 16)))
    assert compare.ignores_state(d) and d['state_share'] == 0
    assert 'IGNORES' in compare.format_diagnosis(d)


def test_diagnostics_report_a_loop_that_reads_its_state():
    """A loop that reads its state: s_0 changes the output at r = 1 and the state keeps moving."""
    d = compare.diagnose(small_loop('add'), torch.randint(0, 20, (2, 16)))
    assert not compare.ignores_state(d) and d['s0_effect'][1] > 1e-3 and d['state_share'] == 0.5
    assert 'uses its state' in compare.format_diagnosis(d)


def test_a_tiny_comparison_trains_both_models_and_reuses_finished_runs(tmp_path, capsys):
    """End to end: the looped model and its plain twin train on the same data, the table shows the looped model at
    several depths and the twin at r = 1; run again, the finished runs are reused, not retrained."""
    args = [*TINY, f'--out_dir={tmp_path}', f'--data_dir={tmp_path / "data"}', '--models=looped,params', '--seeds=7']
    compare.main(args)
    out = capsys.readouterr().out
    assert 'training looped-7' in out and 'training params-7' in out and 'verdict' in out
    table = out.splitlines()
    looped = next(line for line in table if line.startswith('looped 1+1xr+1 s7'))
    assert len(looped.split()) >= 9, looped  # r = 1, 2, 4, 8, 16 and adaptive
    compare.main(args)
    assert 'training' not in capsys.readouterr().out


def test_bad_models_are_one_line(capsys):
    with pytest.raises(SystemExit):
        compare.main(['--models=looped,deep'])
    assert 'models=' in capsys.readouterr().err


def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys):
    """--diagnose on a damaged file: one line naming it, no traceback."""
    bad = tmp_path / 'ckpt.pt'
    bad.write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(SystemExit):
        compare.main([f'--diagnose={bad}'])
    err = capsys.readouterr().err
    assert err.startswith('error: checkpoint') and 'ckpt.pt' in err and err.count('\n') == 1, err
