"""Tests of bench.py: each measurement runs on a tiny CPU model and returns sane fields. No timing is asserted."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import bench  # pytest.ini puts the repo root on sys.path
from model import GPTConfig
from sample import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = GPTConfig(block_size=32, vocab_size=64, n_embd=32, n_head=2, n_prelude=1, n_loop=2, n_coda=1,
                 mean_depth=3, max_depth=64, backprop_depth=2)


@pytest.fixture(scope='module')
def results():
    """The four measurements once on TINY, in the shape bench.run() reports them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as bench.py on CPU: tiny ops on 2 shared cores crawl with 2 threads
    res = bench.header(TINY, 'cpu', 2, quick=True, argv=['--tiny'])
    res['train'] = bench.train_throughput(TINY, 'cpu', 2, warmup=0, repeats=1)
    parent_hog = torch.ones(2 ** 27)  # 512 MiB alive in this process while the children measure theirs
    res['memory'] = bench.memory_vs_depth(TINY, 'cpu', 1, depths=(64,))  # one child: ~3 s each
    res['parent_rss'] = bench.peak_memory('cpu')
    del parent_hog
    res['compile'] = dict(bench.compile_check(TINY, 'cpu', 2, depth_changes=6, backend='eager'),
                          backend='eager', flash=bench.flash_check(TINY, 'cpu'))
    res['decode'] = dict(bench.decode_speed(bench.build(TINY, 'cpu'), 'cpu', new_tokens=4, repeats=1),
                         model='random init')
    yield res
    torch.set_num_threads(threads)


def test_equal_flop_plain_gpt_is_the_closest_depth():
    """The plain twin's layer count gives training FLOPs per token closer to the loop's than one layer more or less."""
    for dev in ('cpu', 'cuda'):
        cfg = bench.GPTConfig(**bench.SIZES[dev], **bench.LOOP)
        target, n = bench.training_flops(cfg, cfg.mean_depth), bench.equal_flop_layers(cfg)
        gap = lambda n: abs(bench.training_flops(bench.plain_config(n, **bench.width(cfg)), 1) - target)
        assert gap(n) <= min(gap(n - 1), gap(n + 1)), f"{dev}: {n} layers is not the closest equal-FLOP plain GPT"


def test_training_rows_count_flops_and_rates(results):
    """Every training row has a positive rate, and the loop's FLOPs per token match the plain twin's within a layer."""
    rows = results['train']['rows']
    assert set(rows) == {'loop', 'plain', 'unrolled'}
    assert all(r['tokens_per_s'] > 0 and 0 < r['of_ceiling'] for r in rows.values()), rows
    layer = bench.training_flops(bench.plain_config(2, **bench.width(TINY)), 1) - \
        bench.training_flops(bench.plain_config(1, **bench.width(TINY)), 1)
    assert abs(rows['loop']['flops_per_token'] - rows['plain']['flops_per_token']) <= layer / 2
    assert rows['loop']['mfu'] is None, "MFU needs a spec peak, which a CPU does not have"


def test_truncated_backprop_trains_cheaper_than_the_unrolled_stack(results):
    """At r > k the loop's counted training FLOPs per token are below those of the plain GPT with the same forward."""
    rows = results['train']['rows']
    assert rows['loop']['flops_per_token'] < rows['unrolled']['flops_per_token']


def test_memory_is_measured_per_depth_in_a_fresh_process(results):
    """A depth's step memory is positive, and the child's peak does not inherit its big parent's (ru_maxrss would)."""
    mem = results['memory']
    assert set(mem['rows']) == {64} and mem['rows'][64]['step'] > 0, mem
    assert mem['rows'][64]['total'] * 2 ** 20 < results['parent_rss'] - 2 ** 28, \
        "the child's peak RSS includes the parent's memory"


def test_no_recompiles_when_depth_changes_every_step(results):
    """After the warm-up, new depths every step build no new graph (the loop stays in Python, METHOD.md §3)."""
    c = results['compile']
    assert c['warmup_graphs'] >= 3, f"warm-up should compile prelude, loop_step and coda: {c}"
    assert len(set(c['depths'])) > 1, f"the depths did not change: {c['depths']}"
    assert c['recompiles'] == 0, f"recompiled while r changed over {c['depths']}"


def test_flash_check_answers_yes_or_the_reason():
    """runs() says 'yes' for a call that works and 'no: <first line>' for one that raises, instead of falling back."""
    def fails():
        raise RuntimeError("No available kernel. Aborting execution.\ndetails")
    assert bench.runs(lambda: None) == 'yes'
    assert bench.runs(fails) == 'no: No available kernel. Aborting execution.'


def test_decode_rows_report_iterations_within_the_depth(results):
    """Fixed-depth decoders run exactly r iterations per token; adaptive exit runs between 1 and r."""
    d = results['decode']
    rows, r = d['rows'], d['depth']
    assert set(rows) == {'no cache', 'cache', 'cache + exit'} and all(x['tokens_per_s'] > 0 for x in rows.values())
    assert rows['no cache']['mean_iterations'] == rows['cache']['mean_iterations'] == r
    assert 1 <= rows['cache + exit']['mean_iterations'] <= r


def test_uncached_baseline_decodes_the_same_tokens_as_generate():
    """The no-cache baseline is the same greedy decoder as sample.generate (exact with a zero initial state)."""
    model = bench.build(replace(TINY, init_state='zeros'), 'cpu').eval()
    prompt = torch.randint(TINY.vocab_size, (1, 5))
    uncached, _ = bench.generate_uncached(model, prompt, 6, num_steps=3)
    cached, _ = generate(model, prompt, 6, num_steps=3, temperature=0)
    assert torch.equal(uncached, cached)


def test_decoding_reads_the_loop_weights_once_per_iteration():
    """weight_bytes_per_token grows by the loop block's bytes (loop layers, adapter, state norm) per iteration."""
    model = bench.build(TINY, 'cpu')
    parts = (model.transformer.loop, model.adapter, model.ln_state)
    loop = sum(p.numel() * 4 for m in parts if m is not None for p in m.parameters())
    assert bench.weight_bytes_per_token(model, 5) - bench.weight_bytes_per_token(model, 4) == loop


def test_report_prints_every_section_and_one_json_line(results, capsys):
    """print_report renders all four tables from real results, and the result serialises to one JSON line."""
    bench.print_report(results)
    out = capsys.readouterr().out
    assert all(f"\n{i}. " in out for i in range(1, 5)), out
    assert '\n' not in json.dumps(results)


@pytest.mark.parametrize('args, bad', [(['--device=tpu'], "device='tpu'"), (['--threads=0'], 'threads=0'),
                                       (['--quick=maybe'], "'maybe'"), (['--depth=3'], "'depth'"),
                                       (['--decode_compile=default'], "'decode_compile'"),
                                       (['--json_out=/nowhere/b.json'], "json_out='/nowhere/b.json'")])
def test_bad_setting_is_named_before_any_work(args, bad):
    """settings() rejects a bad --key=value (bench.py takes them like every script) with a ValueError naming it."""
    with pytest.raises(ValueError, match=bad):
        bench.settings(['--device=cpu', *args])


def test_bad_checkpoint_is_refused_before_benchmarking(tmp_path):
    """--ckpt=<truncated file> is one line from the one loader, raised by settings(), before any measurement."""
    (tmp_path / 'ckpt.pt').write_bytes(b'PK\x03\x04 not a whole checkpoint')
    with pytest.raises(ValueError, match='ckpt.pt cannot be read'):
        bench.settings(['--device=cpu', f"--ckpt={tmp_path / 'ckpt.pt'}"])


def test_cli_bad_value_exits_with_one_error_line(tmp_path):
    """A bad --key=value or checkpoint on the command line exits != 0 with one 'error:' line, no traceback."""
    for arg, line in (('--device=tpu', "error: device='tpu' is not allowed: expected 'cpu' or 'cuda'"),
                      (f"--ckpt={tmp_path / 'none.pt'}", f"error: no checkpoint at {tmp_path / 'none.pt'}")):
        proc = subprocess.run([sys.executable, 'bench.py', arg], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(line), proc.stderr
