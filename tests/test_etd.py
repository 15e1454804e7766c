"""etd.py (METHOD.md §4): the layer split, and conversions that keep every parameter and, at k = 1, every logit.
Tiny CPU models, no network; the GPT-2 mapping is checked against transformers' own model, built offline."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import etd  # noqa: E402
import train  # noqa: E402
from model import GPT, plain_config  # noqa: E402

TOL = 1e-5  # fp32 identity tolerance of the issue: a missed transpose or exact GELU shows far above it


def planted_curve(a, b, c, seed):
    """An ETD-shaped curve (§4) with a known split: a falling encoder, a flat noisy middle, a rising decoder."""
    noise = 0.01 * (torch.rand(b, generator=torch.Generator().manual_seed(seed)) - 0.5)
    encoder = torch.linspace(0.6, 0.3, a) if a > 1 else torch.full((a,), 0.6)
    decoder = torch.linspace(0.25, 0.5, c) if c > 1 else torch.full((c,), 0.5)
    return torch.cat([encoder, 0.05 + noise, decoder]).tolist()


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


def max_diff(a, b):
    return (a - b).abs().max().item()


# -- the split --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('planted', [(1, 4, 1), (2, 6, 2), (3, 5, 4), (7, 4, 5), (1, 10, 1), (4, 20, 8)])
def test_knees_find_the_planted_split(planted):
    """choose_split returns the (encoder, thinking, decoder) sizes planted in a synthetic U-shaped curve."""
    for seed in range(3):
        split = etd.choose_split(planted_curve(*planted, seed), sum(planted))
        assert split == planted, f"seed {seed}: found {split}, planted {planted}"


def test_every_curve_gives_a_valid_split():
    """Any curve (random, flat, one layer) gives n_prelude, n_coda >= 0 and n_loop >= 1 adding up to n_layer."""
    g = torch.Generator().manual_seed(0)
    curves = [torch.rand(n, generator=g).tolist() for n in range(1, 17) for _ in range(20)]
    for curve in curves + [[0.3] * 6, [0.5], [1.0, 0.0]]:
        a, b, c = etd.choose_split(curve, len(curve))
        assert min(a, c) >= 0 and b >= 1 and a + b + c == len(curve), f"{curve} -> {(a, b, c)}"


def test_knee_of_a_falling_curve_is_where_it_turns_flat():
    """find_knee on a steep drop into a plateau returns the plateau's first point."""
    assert etd.find_knee([1.0, 0.5, 0.1, 0.1, 0.1, 0.1]) == 2


@pytest.mark.parametrize('bad', ['1,2', '1,0,3', '2,2,2', 'a,b,c', '-1,4,1', '', (1, 2), 7])
def test_manual_split_errors_name_the_bad_value(bad):
    """A manual split that is not three counts with n_loop >= 1 adding up to n_layer is a ValueError naming it."""
    with pytest.raises(ValueError, match='etd_split='):
        etd.parse_split(bad, 4)


def test_manual_split_parses_string_and_tuple():
    """'1,2,1' and (1, 2, 1) both mean 1 encoder, 2 thinking and 1 decoder layer."""
    assert etd.parse_split('1, 2,1', 4) == etd.parse_split((1, 2, 1), 4) == (1, 2, 1)


def test_angular_distance_is_0_for_same_half_for_orthogonal_1_for_opposite():
    """d = arccos(cos)/pi: 0 for an unchanged direction, 0.5 for orthogonal, 1 for reversed; last token by default."""
    h0 = torch.tensor([1.0, 0.0]).expand(1, 3, 2)
    e2 = torch.tensor([0.0, 1.0]).expand(1, 3, 2)
    h = torch.stack([h0, 2 * h0, e2, -e2]).clone()  # (L + 1 = 4, B = 1, T = 3, C = 2)
    assert torch.allclose(etd.angular_distances(h), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), atol=1e-6)
    h[1, 0, 0] = torch.tensor([0.0, 1.0])  # only the first token of layer 1 moves: invisible to last_token
    assert etd.angular_distances(h)[0] < 1e-6 < etd.angular_distances(h, last_token=False)[0]


# -- converting a plain nanoloop checkpoint ---------------------------------------------------------------------------


@pytest.mark.parametrize('split', ['1,2,1', '0,1,3', 'auto'])
def test_plain_checkpoint_keeps_parameters_and_logits_at_k1(tmp_path, split):
    """Converting a plain nanoloop checkpoint keeps the parameter count, and at k = 1 the base model's logits."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt')
    idx = token_batches(50, 1)[0]
    model = GPT.from_pretrained(str(tmp_path / 'ckpt.pt'), split, batches=token_batches(50), mean_depth=3).eval()
    assert model.get_num_params(False) == base.get_num_params(False)
    assert max_diff(model(idx, num_steps=1)[0], base(idx)[0]) <= TOL
    assert sum(model.etd_info['split']) == 4 and model.config.mean_depth == 3 and model.config.inject == 'none'
    assert model.etd_info['curve'] is not None and len(model.etd_info['curve']) == 4


def test_checkpoint_split_into_stages_is_read_in_layer_order(tmp_path):
    """A plain checkpoint whose blocks are filed as prelude/loop/coda (r = 1) converts to the same function."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt', split=(1, 1, 2))
    idx = token_batches(50, 1)[0]
    model = etd.convert_pretrained(str(tmp_path), '2,1,1').eval()  # the out_dir holding ckpt.pt also works
    assert max_diff(model(idx, num_steps=1)[0], base(idx)[0]) <= TOL


def test_curve_is_measured_on_the_base_model(tmp_path):
    """The stored curve is angular_distances of the base model's hidden states, one value per layer."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt')
    batches = token_batches(50)
    model = etd.convert_pretrained(str(tmp_path / 'ckpt.pt'), 'auto', batches=batches)
    expected = torch.stack([etd.angular_distances(etd.hidden_states_per_layer(base, b)) for b in batches]).mean(0)
    assert np.allclose(model.etd_info['curve'], expected.tolist(), atol=1e-6)
    assert 'encode' in etd.curve_chart(model.etd_info) and 'think' in etd.curve_chart(model.etd_info)


def test_non_plain_checkpoint_is_rejected(tmp_path):
    """A checkpoint trained with a loop (inject concat, r > 1) is not a plain GPT: one ValueError saying so."""
    plain_checkpoint(tmp_path / 'ckpt.pt', inject='concat', norm_state=True, mean_depth=2, max_depth=4)
    with pytest.raises(ValueError, match='not a plain GPT'):
        etd.convert_pretrained(str(tmp_path / 'ckpt.pt'), '1,2,1')


def test_conversion_backprops_every_iteration_so_the_encoder_learns(tmp_path):
    """§3 trap: by default backprop_depth = max_depth, so at the deepest r the prelude still gets gradient."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    model = etd.convert_pretrained(str(tmp_path / 'ckpt.pt'), '1,2,1', mean_depth=2, max_depth=5).train()
    assert model.config.backprop_depth == 5
    idx = token_batches(50, 1)[0]
    model(idx, idx, num_steps=5)[1].backward()
    assert model.transformer.prelude[0].mlp.c_fc.weight.grad.abs().sum() > 0, "encoder got no gradient"


def test_router_is_the_only_new_parameter(tmp_path):
    """With ETD's halting router the conversion adds exactly its Linear(d -> 1), and logits at k = 1 are unchanged."""
    base = plain_checkpoint(tmp_path / 'ckpt.pt')
    model = etd.convert_pretrained(str(tmp_path / 'ckpt.pt'), '1,2,1', router=True).eval()
    idx = token_batches(50, 1)[0]
    assert model.get_num_params(False) == base.get_num_params(False) + 32 + 1
    assert max_diff(model(idx, num_steps=1)[0], base(idx)[0]) <= TOL


def test_settings_fixed_by_the_base_cannot_be_overridden(tmp_path):
    """Only depth, dropout and router settings may be passed: n_embd comes from the base, with one clear error."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    with pytest.raises(ValueError, match='n_embd=64 cannot be set'):
        etd.convert_pretrained(str(tmp_path / 'ckpt.pt'), '1,2,1', n_embd=64)


def test_auto_split_without_text_and_unknown_source_are_clear_errors(tmp_path):
    """split='auto' needs sample batches, and a path that is neither GPT-2 nor a checkpoint is named in the error."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    with pytest.raises(ValueError, match='needs sample text'):
        etd.convert_pretrained(str(tmp_path / 'ckpt.pt'), 'auto')
    with pytest.raises(ValueError, match='nowhere.pt'):
        etd.convert_pretrained(str(tmp_path / 'nowhere.pt'), '1,2,1')


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
def test_gpt2_conversion_matches_transformers_logits_at_k1(tiny_gpt2, split):
    """Our GPT-2 mapping (Conv1D transposes, tanh GELU, tied head) reproduces transformers' logits at k = 1, with the
    same parameter count."""
    path, hf = tiny_gpt2
    idx = token_batches(50, 1)[0]
    model = etd.convert_pretrained(path, split, batches=token_batches(50), mean_depth=2).eval()
    with torch.no_grad():
        assert max_diff(model(idx, num_steps=1)[0], hf(idx).logits) <= TOL
    assert model.get_num_params(False) == sum(p.numel() for p in hf.parameters())


def test_missing_transformers_is_one_clear_error(monkeypatch):
    """Without the optional transformers package, a GPT-2 source is a ValueError that says how to install it."""
    monkeypatch.setitem(sys.modules, 'transformers', None)  # makes `import transformers` raise ImportError
    with pytest.raises(ValueError, match='pip install transformers'):
        etd.convert_pretrained('gpt2', '1,10,1')


def run_etd(*args, **env):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'etd.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **env), timeout=120)


def test_offline_gpt2_download_fails_with_one_line(tmp_path):
    """With no network and an empty cache, --init_from=gpt2 exits != 0 with one 'error:' line, no traceback."""
    pytest.importorskip('transformers', reason='transformers (optional) is not installed')
    result = run_etd('--init_from=gpt2', '--etd_split=1,10,1', HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path))
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert "error: cannot load GPT-2 weights 'gpt2'" in result.stderr


def test_cli_prints_the_curve_and_the_chosen_split(tmp_path, capsys):
    """etd.py's main prints one chart line per block of a plain checkpoint, each marked with its stage."""
    plain_checkpoint(tmp_path / 'ckpt.pt')
    data = tmp_path / 'data' / 'tiny'
    os.makedirs(data)
    (np.arange(2000) % 50).astype(np.uint16).tofile(data / 'train.bin')
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 50}, f)
    etd.main([f'--init_from={tmp_path}', '--dataset=tiny', f'--data_dir={tmp_path / "data"}', '--etd_sequences=8'])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if line.lstrip().startswith('block')] == ['0', '1', '2', '3']
    assert 'think' in lines[-2] or 'think' in lines[-3], lines


# -- train.py: init_from=<pretrained model> ---------------------------------------------------------------------------


def tiny_train_config(tmp_path, **overrides):
    """train.py settings for a few steps of a 4-layer, width-32 model on a 12-token counting dataset."""
    data = tmp_path / 'data' / 'tiny'
    os.makedirs(data, exist_ok=True)
    ids = (np.arange(3000) + (np.random.default_rng(0).random(3000) < 0.1)) % 12
    ids[:2700].astype(np.uint16).tofile(data / 'train.bin')
    ids[2700:].astype(np.uint16).tofile(data / 'val.bin')
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 12}, f)
    tiny = dict(dataset='tiny', data_dir=str(tmp_path / 'data'), n_embd=32, n_head=2, block_size=16, batch_size=4,
                eval_iters=2, eval_interval=4, log_interval=1, max_iters=4, warmup_iters=1, learning_rate=1e-2,
                always_save_checkpoint=True, compile=False, device='cpu', dtype='float32', sample_tokens=0)
    return dict(train.DEFAULTS, **dict(tiny, **overrides))


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_train_midtraining_starts_from_the_base_model(tmp_path):
    """train.py with init_from=<plain checkpoint> starts where the base ended (its first val loss at r = 1 is the
    base's last), saves the split, and with fixed_depth runs every step at mean_depth."""
    base_dir, mid_dir = str(tmp_path / 'base'), str(tmp_path / 'mid')
    train.train(tiny_train_config(tmp_path, out_dir=base_dir, n_prelude=0, n_loop=4, n_coda=0, mean_depth=1,
                                  max_depth=1, backprop_depth=1, inject='none', init_state='embed', norm_state=False))
    history = train.train(tiny_train_config(tmp_path, out_dir=mid_dir, init_from=base_dir, etd_sequences=8,
                                            mean_depth=2, max_depth=2, backprop_depth=2, fixed_depth=True))
    assert read_log(mid_dir)[0]['val_loss']['1'] == pytest.approx(read_log(base_dir)[-1]['val_loss']['1'], abs=1e-5)
    assert {r for _, _, r in history} == {2}, history
    with open(os.path.join(mid_dir, 'etd_split.json')) as f:
        split = json.load(f)['split']
    config = torch.load(os.path.join(mid_dir, 'ckpt.pt'), weights_only=True)['model_args']
    assert sum(split) == 4 and [config['n_prelude'], config['n_loop'], config['n_coda']] == split
    assert config['inject'] == 'none' and config['init_state'] == 'embed'


def test_train_rejects_an_unknown_init_from(tmp_path):
    """init_from that is neither scratch, resume, GPT-2 nor an existing path: one ValueError listing what is allowed."""
    with pytest.raises(ValueError, match="'scratch', 'resume'"):
        train.train(tiny_train_config(tmp_path, out_dir=str(tmp_path / 'out'), init_from='no/such/model'))
