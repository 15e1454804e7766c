"""etd.py (METHOD.md §4): the layer split, and conversions that keep every parameter and, at r = 1, every logit.
Tiny CPU models, no network; the GPT-2 mapping is checked against transformers' own model, built offline."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import etd  # noqa: E402
from model import GPT, plain_config  # noqa: E402
from sample import load_checkpoint  # noqa: E402

TOL = 1e-5  # fp32 identity tolerance of the issue: a missed transpose or exact GELU shows far above it


def planted_curve(a, b, c, seed):
    """An ETD-shaped curve (§4) with a known split: a falling prelude, a flat noisy loop, a rising coda."""
    noise = 0.01 * (torch.rand(b, generator=torch.Generator().manual_seed(seed)) - 0.5)
    prelude = torch.linspace(0.6, 0.3, a) if a > 1 else torch.full((a,), 0.6)
    coda = torch.linspace(0.25, 0.5, c) if c > 1 else torch.full((c,), 0.5)
    return torch.cat([prelude, 0.05 + noise, coda]).tolist()


def plain_checkpoint(path, n_layer=4, split=None, **overrides):
    """A randomly initialised plain GPT saved in train.py's checkpoint format; returns the model (eval mode)."""
    config = plain_config(n_layer, block_size=32, vocab_size=50, n_embd=32, n_head=4, bias=True)
    if split is not None:  # the same plain GPT with its blocks filed under prelude / loop / coda (still r = 1)
        config = dataclasses.replace(config, n_prelude=split[0], n_loop=split[1], n_coda=split[2])
    config = dataclasses.replace(config, **overrides)
    torch.manual_seed(0)
    model = GPT(config).eval()
    torch.save({'model': model.state_dict(), 'model_args': dataclasses.asdict(config)}, path)
    return model


def token_batches(vocab, n=3, shape=(4, 32)):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


def convert(source, split='auto', **kwargs):
    """etd.convert of the base that etd.load_base reads: a checkpoint, a transformers directory or a GPT-2 name."""
    return etd.convert(etd.load_base(source), split, source=source, **kwargs)


def max_diff(a, b):
    return (a - b).abs().max().item()


# -- the split --------------------------------------------------------------------------------------------------------


def test_ex5_knee_of_a_falling_curve_is_where_it_turns_flat():
    """find_knee on a steep drop into a plateau returns the plateau's first point."""
    curve = [1.0, 0.5, 0.1, 0.1, 0.1, 0.1]
    got = etd.find_knee(curve)
    assert got == 2, f"find_knee({curve}) = {got}, expected 2 -- hint: " + (
        "that is the middle of the curve, whatever its values" if got == len(curve) // 2 else
        "scale both axes to [0, 1] and look for the point farthest below the chord from (0, 1) to (1, 0)")


@pytest.mark.parametrize('bad', ['1,2', '1,0,3', '2,2,2', 'a,b,c', '-1,4,1', '', (1, 2), 7])
def test_manual_split_errors_name_the_bad_value(bad):
    """A manual split that is not three counts with n_loop >= 1 adding up to n_layer is a ValueError naming it."""
    with pytest.raises(ValueError, match='split='):
        etd.parse_split(bad, 4)


def test_manual_split_parses_string_and_tuple():
    """'1,2,1' and (1, 2, 1) both mean 1 prelude, 2 loop and 1 coda layer."""
    assert etd.parse_split('1, 2,1', 4) == etd.parse_split((1, 2, 1), 4) == (1, 2, 1)


def test_ex5_angular_distance_is_0_for_same_half_for_orthogonal_1_for_opposite():
    """d = arccos(cos)/pi: 0 for an unchanged direction, 0.5 for orthogonal, 1 for reversed; last token by default."""
    h0 = torch.tensor([1.0, 0.0]).expand(1, 3, 2)
    e2 = torch.tensor([0.0, 1.0]).expand(1, 3, 2)
    h = torch.stack([h0, 2 * h0, e2, -e2]).clone()  # (L + 1 = 4, B = 1, T = 3, C = 2)
    got = [round(d, 4) for d in etd.angular_distances(h).tolist()]
    assert got == [0, 0.5, 1], f"distances {got} for an unchanged, an orthogonal and a reversed block, expected " \
        "[0, 0.5, 1] -- hint: the angle between consecutive layers, divided by pi"
    h[1, 0, 0] = torch.tensor([0.0, 1.0])  # only the first token of layer 1 moves: invisible to last_token
    last, every = etd.angular_distances(h)[0].item(), etd.angular_distances(h, last_token=False)[0].item()
    assert last < 1e-6 < every, f"moving only the first token gave d(0, 1) = {last:.3f} (last token) and " \
        f"{every:.3f} (every token), expected 0 and more than 0 -- hint: last_token=True reads the last position only"


@pytest.mark.parametrize('planted', [(1, 4, 1), (2, 6, 2), (3, 5, 4), (7, 4, 5), (1, 10, 1), (4, 20, 8)])
def test_ex5_knees_find_the_planted_split(planted):
    """choose_split returns the (prelude, loop, coda) sizes planted in a synthetic U-shaped curve."""
    for seed in range(3):
        split = etd.choose_split(planted_curve(*planted, seed), sum(planted))
        assert split == planted, f"seed {seed}: found {split} in a curve planted with {planted} -- hint: the " \
            "reversed curve's knee counts coda blocks from the end"


def test_ex5_every_curve_gives_a_valid_split():
    """Any curve (random, flat, one layer) gives n_prelude, n_coda >= 0 and n_loop >= 1 adding up to n_layer."""
    g = torch.Generator().manual_seed(0)
    curves = [torch.rand(n, generator=g).tolist() for n in range(1, 17) for _ in range(20)]
    for curve in curves + [[0.3] * 6, [0.5], [1.0, 0.0]]:
        a, b, c = etd.choose_split(curve, len(curve))
        assert min(a, c) >= 0 and b >= 1 and a + b + c == len(curve), f"a curve of {len(curve)} values gave " \
            f"{(a, b, c)} -- hint: n_loop counts the blocks from the first knee to the last, both included"


# -- converting a plain nanoloop checkpoint ---------------------------------------------------------------------------


@pytest.mark.parametrize('split', ['1,2,1', '0,1,3', 'auto'])
def test_plain_checkpoint_keeps_parameters_and_logits_at_r1(tmp_path, split):
    """Converting a plain nanoloop checkpoint keeps the parameter count, and at r = 1 the base model's logits."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt')
    idx = token_batches(50, 1)[0]
    model, info = convert(str(tmp_path / 'ckpt.pt'), split, batches=token_batches(50), mean_depth=3)
    assert model.get_num_params(False) == base.get_num_params(False)
    assert max_diff(model(idx, num_steps=1)[0], base(idx)[0]) <= TOL
    assert sum(info['split']) == 4 and model.config.mean_depth == 3 and model.config.inject == 'none'
    assert info['curve'] is not None and len(info['curve']) == 4


def test_checkpoint_split_into_stages_is_read_in_layer_order(tmp_path):
    """A plain checkpoint whose blocks are filed as prelude/loop/coda (r = 1) converts to the same function."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt', split=(1, 1, 2))
    idx = token_batches(50, 1)[0]
    model, _ = convert(str(tmp_path), '2,1,1')  # the out_dir holding ckpt.pt also works
    assert max_diff(model(idx, num_steps=1)[0], base(idx)[0]) <= TOL


def test_ex5_curve_is_measured_on_the_base_model(tmp_path):
    """The stored curve is angular_distances of the base model's hidden states, one value per layer."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt')
    batches = token_batches(50)
    _, info = convert(str(tmp_path / 'ckpt.pt'), 'auto', batches=batches)
    expected = torch.stack([etd.angular_distances(etd.hidden_states_per_layer(base, b)) for b in batches]).mean(0)
    worst = np.abs(np.array(info['curve']) - expected.numpy()).max()
    assert worst <= 1e-6, f"the converted model's curve differs from the base's distances by up to {worst:.1e} " \
        "-- hint: compute in float64, where arccos near 1 is not swamped by rounding"
    assert 'prelude' in etd.curve_chart(info) and 'loop' in etd.curve_chart(info)


def test_non_plain_checkpoint_is_rejected(tmp_path):
    """A checkpoint trained with a loop (inject concat, r > 1) is not a plain GPT: one ValueError saying so."""
    plain_checkpoint(tmp_path / 'ckpt.pt', inject='concat', norm_state=True, mean_depth=2, max_depth=4)
    with pytest.raises(ValueError, match='not a plain GPT'):
        convert(str(tmp_path / 'ckpt.pt'), '1,2,1')


def test_conversion_backprops_every_iteration_so_the_prelude_learns(tmp_path):
    """§3 trap: by default backprop_depth = max_depth, so at the deepest r the prelude still gets gradient."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    model = convert(str(tmp_path / 'ckpt.pt'), '1,2,1', mean_depth=2, max_depth=5)[0].train()
    assert model.config.backprop_depth == 5
    idx = token_batches(50, 1)[0]
    model(idx, idx, num_steps=5)[1].backward()
    assert model.transformer.prelude[0].mlp.c_fc.weight.grad.abs().sum() > 0, "the prelude got no gradient"


def test_router_is_the_only_new_parameter(tmp_path):
    """With ETD's halting router the conversion adds exactly its Linear(d -> 1), and logits at r = 1 are unchanged."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt')
    model, _ = convert(str(tmp_path / 'ckpt.pt'), '1,2,1', router=True)
    idx = token_batches(50, 1)[0]
    assert model.get_num_params(False) == base.get_num_params(False) + 32 + 1
    assert max_diff(model(idx, num_steps=1)[0], base(idx)[0]) <= TOL


def test_settings_fixed_by_the_base_cannot_be_overridden(tmp_path):
    """Only depth, dropout and router settings may be passed: n_embd comes from the base, with one clear error."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    with pytest.raises(ValueError, match='n_embd=64 cannot be set'):
        convert(str(tmp_path / 'ckpt.pt'), '1,2,1', n_embd=64)


def test_auto_split_without_text_and_unknown_source_are_clear_errors(tmp_path):
    """split='auto' needs sample batches, and a path that is neither GPT-2 nor a checkpoint is named in the error."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    with pytest.raises(ValueError, match='needs sample text'):
        convert(str(tmp_path / 'ckpt.pt'), 'auto')
    with pytest.raises(ValueError, match='nowhere.pt'):
        convert(str(tmp_path / 'nowhere.pt'), '1,2,1')


# -- GPT-2 through transformers ---------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    """A random 4-layer GPT-2 built offline by transformers and saved with save_pretrained: (directory, model)."""
    transformers = pytest.importorskip('transformers', reason='transformers (optional) is not installed')
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=32, vocab_size=50,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp('tiny-gpt2')
    model.save_pretrained(path)
    return str(path), model


@pytest.mark.parametrize('split', ['1,2,1', 'auto'])
def test_gpt2_conversion_matches_transformers_logits_at_r1(tiny_gpt2, split):
    """Our GPT-2 mapping (Conv1D transposes, tanh GELU, tied head) reproduces transformers' logits at r = 1, with the
    same parameter count."""
    path, hf = tiny_gpt2
    idx = token_batches(50, 1)[0]
    model, _ = convert(path, split, batches=token_batches(50), mean_depth=2)
    with torch.no_grad():
        assert max_diff(model(idx, num_steps=1)[0], hf(idx).logits) <= TOL
    assert model.get_num_params(False) == sum(p.numel() for p in hf.parameters())


def test_missing_transformers_is_one_clear_error(monkeypatch):
    """Without the optional transformers package, a GPT-2 source is a ValueError that says how to install it."""
    monkeypatch.setitem(sys.modules, 'transformers', None)  # makes `import transformers` raise ImportError
    with pytest.raises(ValueError, match='pip install transformers'):
        convert('gpt2', '1,10,1')


def tiny_dataset(root, vocab=50, n=2000):
    """root/data/tiny/{train,val}.bin and meta.json (a counting stream); returns the data_dir."""
    data = root / 'data' / 'tiny'
    os.makedirs(data, exist_ok=True)
    ids = (np.arange(n) + (np.random.default_rng(0).random(n) < 0.1)) % vocab
    ids[:n * 9 // 10].astype(np.uint16).tofile(data / 'train.bin')
    ids[n * 9 // 10:].astype(np.uint16).tofile(data / 'val.bin')
    (data / 'meta.json').write_text(json.dumps({'vocab_size': vocab}))
    return str(root / 'data')


def run_etd(*args, **env):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'etd.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **env), timeout=120)


def test_offline_gpt2_download_fails_with_one_line(tmp_path):
    """With no network and an empty cache, --init_from=gpt2 exits != 0 with one 'error:' line, no traceback."""
    pytest.importorskip('transformers', reason='transformers (optional) is not installed')
    data_dir = tiny_dataset(tmp_path)
    result = run_etd('--init_from=gpt2', '--split=1,10,1', '--dataset=tiny', f'--data_dir={data_dir}',
                     HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path))
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert result.stderr.startswith("error: cannot load GPT-2 weights 'gpt2'") and result.stderr.count('\n') == 1


# -- the converter: etd.py --out_dir writes an ordinary checkpoint ----------------------------------------------------


def cli_config(tmp_path, **overrides):
    return dict(etd.DEFAULTS, **dict(dict(init_from=str(tmp_path / 'ckpt.pt'), dataset='tiny', etd_sequences=8,
                                          data_dir=tiny_dataset(tmp_path)), **overrides))


def test_cli_prints_the_curve_and_the_chosen_split(tmp_path, capsys):
    """etd.py prints one chart line per block of a plain checkpoint, each marked with its stage; no out_dir, no file."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    etd.run(**cli_config(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if line.lstrip().startswith('block')] == ['0', '1', '2', '3']
    assert any(line.endswith('loop') for line in lines), lines
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'data']


def test_converter_writes_a_checkpoint_the_one_loader_reads(tmp_path):
    """--out_dir gets ckpt.pt in train.py's format (model, model_args, config, iter_num 0, no optimizer) that
    sample.load_checkpoint reads into the base model's function at r = 1, and etd_split.json with the curve."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt')
    out = tmp_path / 'etd'
    model, info = etd.run(init_from=str(tmp_path / 'ckpt.pt'), out_dir=str(out), split='1,2,1', dataset='tiny',
                          data_dir=tiny_dataset(tmp_path), etd_sequences=8)
    loaded, ckpt = load_checkpoint(str(out))
    assert ckpt['iter_num'] == 0 and 'optimizer' not in ckpt and ckpt['config']['dataset'] == 'tiny'
    assert (loaded.config.n_prelude, loaded.config.n_loop, loaded.config.n_coda) == (1, 2, 1)
    assert loaded.config.mean_depth == loaded.config.max_depth == 1 and loaded.config.inject == 'none'
    idx = token_batches(50, 1)[0]
    assert max_diff(loaded(idx)[0], base(idx)[0]) <= TOL
    assert json.loads((out / 'etd_split.json').read_text())['split'] == [1, 2, 1] == info['split']


def test_converter_refuses_a_used_out_dir_unless_overwrite(tmp_path):
    """A non-empty out_dir is refused before any work (its files stay); --overwrite=True replaces them."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    out = tmp_path / 'used'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'an earlier run')
    with pytest.raises(ValueError, match="out_dir=.*used.* is not empty.*--overwrite=True"):
        etd.run(**cli_config(tmp_path, out_dir=str(out)))
    assert (out / 'ckpt.pt').read_bytes() == b'an earlier run'
    etd.run(**cli_config(tmp_path, out_dir=str(out), overwrite=True))
    assert load_checkpoint(str(out))[1]['iter_num'] == 0


@pytest.mark.parametrize('overrides, needle', [
    (dict(after='nowhere-mid', eval_depths='1,2'), "after='nowhere-mid': no checkpoint"),
    (dict(etd_sequences=0), 'etd_sequences=0 is not allowed'),
    (dict(eval_depths='1,x'), "eval_depths='1,x'"),
    (dict(split='1,1,1'), "split='1,1,1'"),
])
def test_bad_settings_fail_before_the_curve_is_measured(tmp_path, monkeypatch, overrides, needle):
    """A missing --after checkpoint, no sequences, bad depths or a split that does not fit the base are one
    ValueError naming the value, raised before the (slow) curve is measured."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    monkeypatch.setattr(etd, 'layer_curve', lambda *a, **k: pytest.fail('the curve was measured first'))
    with pytest.raises(ValueError, match=needle.replace('(', r'\(')):
        etd.run(**cli_config(tmp_path, **overrides))


def test_cli_error_is_one_line(tmp_path):
    """The real command: a bad value is one 'error:' line, exit != 0, no traceback."""
    result = run_etd(f'--init_from={tmp_path}', '--etd_sequences=0')
    assert result.returncode != 0 and result.stderr.splitlines() == [
        'error: etd_sequences=0 is not allowed: expected an integer >= 1'], result.stderr


# -- train.py mid-trains the converted checkpoint (init_from=<its path>) ---------------------------------------------


def tiny_train_config(tmp_path, **overrides):
    """train.py settings for a few steps of a 4-layer, width-32 model on a 12-token counting dataset."""
    import train
    tiny = dict(dataset='tiny', data_dir=tiny_dataset(tmp_path, vocab=12, n=3000), n_embd=32, n_head=2, block_size=16,
                batch_size=4, eval_iters=2, eval_interval=4, log_interval=1, max_iters=4, warmup_iters=1,
                learning_rate=1e-2, always_save_checkpoint=True, compile=False, device='cpu', dtype='float32',
                sample_tokens=0)
    return dict(train.DEFAULTS, **dict(tiny, **overrides))


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_train_midtraining_starts_from_the_converted_base(tmp_path):
    """The ETD recipe end to end: train a plain base, convert it (etd.py --out_dir), mid-train the converted checkpoint
    with train.py --init_from=<its ckpt.pt>: the first val loss at r = 1 is the base's last, every step runs at
    mean_depth with fixed_depth, and the split is the converted one."""
    import train
    base_dir, etd_dir, mid_dir = (str(tmp_path / name) for name in ('base', 'etd', 'mid'))
    train.train(tiny_train_config(tmp_path, out_dir=base_dir, n_prelude=0, n_loop=4, n_coda=0, mean_depth=1,
                                  max_depth=1, backprop_depth=1, inject='none', init_state='embed', norm_state=False))
    _, info = etd.run(init_from=base_dir, out_dir=etd_dir, dataset='tiny', data_dir=str(tmp_path / 'data'),
                      etd_sequences=8)
    history = train.train(tiny_train_config(tmp_path, out_dir=mid_dir, init_from=os.path.join(etd_dir, 'ckpt.pt'),
                                            mean_depth=2, max_depth=2, backprop_depth=2, fixed_depth=True))
    assert read_log(mid_dir)[0]['val_loss']['1'] == pytest.approx(read_log(base_dir)[-1]['val_loss']['1'], abs=1e-5)
    assert {r for _, _, r in history} == {2}, history
    config = load_checkpoint(mid_dir)[0].config
    assert [config.n_prelude, config.n_loop, config.n_coda] == info['split'] and config.inject == 'none'
