"""train.py on tiny CPU configs: checkpoints, exact resume, the eval log, depth draws, errors. No network."""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import configurator  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sample import generate  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny models run fastest on one thread; two threads spin against each other when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(data_dir, name='tiny', vocab=12, n=3000, chars='abcdefghijklmnopqrstuvwxyz'):
    """A char-level dataset in prepare.py's format: noisy counting mod vocab, so a loss can fall in a few steps."""
    ids = (np.arange(n) + (np.random.default_rng(0).random(n) < 0.1)) % vocab
    meta = dict(prepare.char_meta(chars[:vocab]), settings={})
    prepare.write_splits(os.path.join(data_dir, name), ids[:int(0.9 * n)], ids[int(0.9 * n):], meta)


def tiny_config(tmp_path, **overrides):
    """A config dict for a model of a few thousand parameters, evaluated every 4 steps, with a fresh dataset."""
    make_dataset(str(tmp_path / 'data'))
    tiny = dict(dataset='tiny', data_dir=str(tmp_path / 'data'), out_dir=str(tmp_path / 'out'), n_embd=32, n_head=2,
                block_size=16, batch_size=4, mean_depth=2, max_depth=4, backprop_depth=2, eval_iters=2,
                eval_interval=4, log_interval=1, max_iters=8, lr_decay_iters=8, warmup_iters=2, learning_rate=1e-2,
                compile=False, device='cpu', dtype='float32', sample_tokens=0)
    return dict(train.DEFAULTS, **dict(tiny, **overrides))


def run_script(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One tiny run shared by the checkpoint / log tests: (config, history, stdout)."""
    tmp_path = tmp_path_factory.mktemp('run')
    cfg = tiny_config(tmp_path, sample_tokens=20)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        history = train.train(cfg)
    return cfg, history, out.getvalue()


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(trained):
    """ckpt.pt loads with weights_only=True and its state_dict fits GPT(GPTConfig(**model_args)) exactly."""
    cfg, _, _ = trained
    ckpt = torch.load(os.path.join(cfg['out_dir'], 'ckpt.pt'), map_location='cpu', weights_only=True)
    assert ckpt['iter_num'] == cfg['max_iters'], 'the last evaluation should have saved the final step'
    assert ckpt['config']['dataset'] == 'tiny'
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])  # strict: no missing, unexpected or _orig_mod. keys
    assert all(k in ckpt for k in ('optimizer', 'best_val_loss', 'rng', 'tokens_seen'))
    assert not [f for f in os.listdir(cfg['out_dir']) if f.endswith('.tmp')], 'the temp file must be renamed away'


def test_training_lowers_the_loss(trained):
    """The tiny run learns something: the last logged loss is below the first."""
    _, history, _ = trained
    assert history[-1][1] < history[0][1] - 0.1, f"loss did not fall: {history}"


def test_log_has_a_row_per_depth_and_an_adaptive_row(trained):
    """log.jsonl: one object per evaluation, with val loss at depths 1, mean/2, mean, 2*mean and adaptive exit."""
    cfg, _, stdout = trained
    with open(os.path.join(cfg['out_dir'], 'log.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    assert [r['iter'] for r in rows] == [0, 4, 8]
    for row in rows:
        assert sorted(row['val_loss'], key=int) == ['1', '2', '4'], 'mean 2, max 4: depths {1, 1, 2, 4} deduplicated'
        assert sorted(row['train_loss'], key=int) == ['1', '2', '4']
        assert 1 <= row['adaptive']['mean_iterations'] <= cfg['max_depth']
        assert np.isfinite(row['adaptive']['val_loss']) and row['adaptive']['exit_rule'] == 'kl'
        assert {'lr', 'tokens', 'time_s'} <= set(row)
    assert rows[-1]['tokens'] == 8 * 4 * 16
    assert '--- sample' in stdout and 'adaptive' in stdout
    assert f"ckpt.pt (iter 8) and log.jsonl in {cfg['out_dir']}/" in stdout, 'the closing line must say what is there'


def test_resume_continues_exactly(tmp_path):
    """Steps 5..8 after resuming from step 4 give bit-identical losses to an uninterrupted 8-step run
    (noise initial state and dropout both draw from the restored RNG)."""
    common = dict(always_save_checkpoint=True, dropout=0.1, init_state='noise')
    whole = train.train(tiny_config(tmp_path / 'a', **common))
    half_cfg = tiny_config(tmp_path / 'b', **common, max_iters=4)
    first = train.train(half_cfg)
    second = train.train(dict(half_cfg, max_iters=8, init_from='resume'))
    assert first + second == whole, f"resume diverged:\n{first + second}\n{whole}"
    with open(os.path.join(half_cfg['out_dir'], 'log.jsonl')) as f:
        assert [json.loads(line)['iter'] for line in f] == [0, 4, 8], 'a resume must not repeat its evaluation'


def test_depth_draw_is_the_same_on_every_rank_and_varies_over_steps():
    """depth_for_step ignores the global RNG (ranks seed it differently) and the order of calls (resume)."""
    draws = []
    for rank_seed in (0, 1):  # two simulated ranks
        torch.manual_seed(rank_seed)
        draws.append([train.depth_for_step(step, 1337, 4, 16) for step in range(40)])
    assert draws[0] == draws[1]
    assert draws[0][::-1] == [train.depth_for_step(step, 1337, 4, 16) for step in reversed(range(40))]
    assert len(set(draws[0])) > 2, f"r should vary across steps: {draws[0]}"
    assert all(1 <= r <= 16 for r in draws[0])


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A nan loss at step 6 stops with exit 1 and one 'error:' line; ckpt.pt still holds step 4's finite weights."""
    real_step, calls = train.train_step, []

    def poisoned_step(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float('nan') if len(calls) >= 6 else loss

    monkeypatch.setattr(train, 'train_step', poisoned_step)
    cfg = tiny_config(tmp_path, always_save_checkpoint=True)
    argv = [f'--{k}={v}' for k, v in cfg.items() if v != train.DEFAULTS[k]]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert 'error: loss became nan/inf at or before iter 6' in err and 'Traceback' not in err
    ckpt = torch.load(os.path.join(cfg['out_dir'], 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] == 4
    assert all(torch.isfinite(t).all() for t in ckpt['model'].values())


def test_config_file_then_command_line_override_defaults(tmp_path):
    """configure(): a config file overrides the defaults, --key=value overrides the file; int is fine for a float."""
    path = tmp_path / 'my_config.py'
    path.write_text("import math\nbatch_size = 7\nlearning_rate = 1\nout_dir = 'x'\n")
    cfg = configurator.configure(train.DEFAULTS, [str(path), '--out_dir=y', '--compile=True', '--eval_only'])
    assert (cfg['batch_size'], cfg['learning_rate'], cfg['out_dir'], cfg['compile']) == (7, 1.0, 'y', True)
    assert type(cfg['learning_rate']) is float and cfg['eval_only'] is True, 'a bare --flag sets a bool'
    with pytest.raises(ValueError, match="batch_size=True .* expected int"):
        configurator.configure(train.DEFAULTS, ['--batch_size=True'])
    with pytest.raises(ValueError, match="learning_rate=inf .* expected a finite number"):
        configurator.configure(train.DEFAULTS, ['--learning_rate=1e999'])


def test_shipped_config_files_are_valid():
    """Every config/*.py only sets known keys with the right types."""
    config_dir = os.path.join(ROOT, 'config')
    names = sorted(f for f in os.listdir(config_dir) if f.endswith('.py'))
    assert 'train_shakespeare_char.py' in names
    for name in names:
        configurator.configure(train.DEFAULTS, [os.path.join(config_dir, name)])


def test_shakespeare_char_is_prepared_when_missing(tmp_path):
    """The embedded default dataset is prepared on first use, into the configured data_dir."""
    cfg = train.types.SimpleNamespace(**dict(train.DEFAULTS, data_dir=str(tmp_path)))
    train.ensure_data(cfg)
    assert os.path.getsize(tmp_path / 'shakespeare_char' / 'train.bin') > 1_000_000


def test_inject_none_beyond_backprop_depth_warns(capsys):
    """METHOD.md §3 trap: inject='none' with r possibly > k is announced (the prelude would get no gradient)."""
    train.warn_no_prelude_grad(GPTConfig(inject='none', init_state='embed', max_depth=8, backprop_depth=4))
    assert 'no gradient' in capsys.readouterr().err
    train.warn_no_prelude_grad(GPTConfig(inject='none', init_state='embed', max_depth=4, backprop_depth=4))
    assert capsys.readouterr().err == ''


@pytest.mark.parametrize('args, message', [
    (['--no_such_key=1'], "unknown config key 'no_such_key'"),
    (['--batch_size=abc'], "batch_size='abc'"),
])
def test_bad_command_line_gives_one_clear_error(args, message):
    """Unknown keys and wrong types exit != 0 with an 'error:' line naming the value, never a traceback."""
    result = run_script(*args, '--device=cpu')
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr and message in result.stderr, result.stderr


def test_missing_dataset_tells_the_prepare_command(tmp_path):
    """A dataset that is not prepared stops with the command that prepares it."""
    result = run_script('--dataset=notes', f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}',
                        '--device=cpu', '--compile=False')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'python prepare.py text --input=' in result.stderr, result.stderr


def test_router_trains_with_its_compute_cost_and_serves_exit_rule_router(tmp_path):
    """--router=True trains the halting router (GPT.router_loss: expected loss + router_cost per iteration) next to the
    model, and its checkpoint decodes with exit_rule='router'."""
    cfg = tiny_config(tmp_path, router=True, router_cost=0.05)
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(cfg)
    ckpt = torch.load(os.path.join(cfg['out_dir'], 'ckpt.pt'), map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    assert model.router is not None and ckpt['model_args']['router_cost'] == 0.05
    assert model.router.bias.abs().item() > 0, 'the router starts with bias 0: training should have moved it'
    _, depths = generate(model.eval(), torch.zeros(1, 1, dtype=torch.long), 5, num_steps=4, exit_threshold=0.5,
                                      exit_rule='router')
    assert depths.shape == (1, 5) and ((depths >= 1) & (depths <= 4)).all()


# -- nothing lost, nothing executed: each fault class is one 'error:' line and exit 1, before any work ---------------


def main_error(args, capsys):
    """train.main(args) in-process: it must exit 1 with exactly one line 'error: ...'; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith('error: ') and err.count('\n') == 1, err
    return err


def tiny_args(tmp_path, **overrides):
    """Command-line arguments for the tiny run of tiny_config (dataset written, out_dir not)."""
    cfg = tiny_config(tmp_path, **overrides)
    return [f'--{k}={v}' for k, v in cfg.items() if v != train.DEFAULTS[k]]


def md5(path):
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.mark.parametrize('args, message', [
    (['--init_from=nowhere'], "init_from='nowhere' is not allowed"),
    (['--exit_rule=sometimes'], "exit_rule='sometimes' is not allowed"),
    (['missing_config.py'], "config file 'missing_config.py' not found"),
    (['--n_head=5'], "n_embd=32 is not allowed: expected a multiple of n_head (5)"),
    (['--max_iters=0'], "max_iters=0 is not allowed: expected a number >= 1"),
    (['--max_iters=-5'], "max_iters=-5 is not allowed"),
    (['--grad_clip=-1'], "grad_clip=-1.0 is not allowed: expected a number >= 0"),
    (['--warmup_iters=-10'], "warmup_iters=-10 is not allowed"),
    (['--weight_decay=-1'], "weight_decay=-1.0 is not allowed"),
    (['--learning_rate=0'], "learning_rate=0.0 is not allowed: expected a number > 0"),
    (['--min_lr=-1e-4'], "min_lr=-0.0001 is not allowed"),
    (['--temperature=-1'], "temperature=-1.0 is not allowed"),
    (['--sample_tokens=-1'], "sample_tokens=-1 is not allowed"),
    (['--eval_iters=0'], "eval_iters=0 is not allowed"),
    (['--eval_interval=0'], "eval_interval=0 is not allowed"),
    (['--beta2=1'], "beta2=1.0 is not allowed: expected a number in [0, 1)"),
    (['--seed=-1'], "seed=-1 is not allowed"),
    (['--backend=mpi'], "backend='mpi' is not allowed"),
    (['--dtype=half'], "dtype='half' is not allowed"),
    (['--exit_rule=router'], "exit_rule='router' is not allowed: this model has no halting router"),
])
def test_bad_values_exit_with_one_error_line_before_any_work(args, message, tmp_path, capsys):
    """Every config key is checked before work starts: one 'error:' line naming the value, nothing written."""
    err = main_error(tiny_args(tmp_path) + args, capsys)
    assert message in err, err
    assert not os.path.exists(tmp_path / 'out' / 'log.jsonl'), 'a refused run must not write'


def test_block_size_larger_than_the_data_is_refused_before_the_model(tmp_path, capsys):
    """block_size must leave room for a window in both splits; checked once the data exists."""
    assert 'block_size=5000 needs more' in main_error(tiny_args(tmp_path, block_size=5000), capsys)


@pytest.mark.parametrize('device', [
    'foo', 'cuda:x', f'cuda:{torch.cuda.device_count()}',
    pytest.param('cuda', marks=pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')),
    pytest.param('mps', marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason='this machine has MPS')),
])
def test_unavailable_device_names_what_is_available(device, tmp_path, capsys):
    """A device this machine lacks: one line naming it and the devices there are (cpu always)."""
    err = main_error(tiny_args(tmp_path, device=device), capsys)
    assert f"device={device!r} is not available here: this machine has cpu" in err, err


def test_float16_on_cpu_is_refused_and_bfloat16_trains(tmp_path, capsys):
    """CPU autocast runs bfloat16, not float16: float16 is one clear line, bfloat16 is valid."""
    assert "dtype='float16' is not allowed on the CPU" in main_error(tiny_args(tmp_path, dtype='float16'), capsys)
    with contextlib.redirect_stdout(io.StringIO()):
        history = train.train(tiny_config(tmp_path, dtype='bfloat16', max_iters=2, eval_interval=2))
    assert len(history) == 2 and all(np.isfinite(loss) for _, loss, _ in history)


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    """out_dir naming a file, or a folder under a file, is one line before any work."""
    (tmp_path / 'f').write_text('not a folder')
    assert 'is a file: expected a folder' in main_error(tiny_args(tmp_path, out_dir=str(tmp_path / 'f')), capsys)
    assert 'cannot be created' in main_error(tiny_args(tmp_path, out_dir=str(tmp_path / 'f' / 'sub')), capsys)


def test_fresh_run_refuses_a_used_out_dir_and_overwrite_replaces_it(trained, tmp_path, capsys):
    """A fresh run into an out_dir holding ckpt.pt or log.jsonl leaves both untouched; --overwrite=True starts them
    anew (log rows of the new run only)."""
    cfg, _, _ = trained
    before = [md5(os.path.join(cfg['out_dir'], f)) for f in ('ckpt.pt', 'log.jsonl')]
    err = main_error(tiny_args(tmp_path, out_dir=cfg['out_dir'], n_embd=48), capsys)
    assert 'holds an earlier run (ckpt.pt and log.jsonl)' in err and '--overwrite=True' in err, err
    assert [md5(os.path.join(cfg['out_dir'], f)) for f in ('ckpt.pt', 'log.jsonl')] == before
    used = tmp_path / 'used'
    used.mkdir()
    (used / 'log.jsonl').write_text('{"iter": 100}\n')
    (used / 'ckpt.pt').write_bytes(b'an old run')
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(tiny_config(tmp_path, out_dir=str(used), max_iters=4, overwrite=True))
    with open(used / 'log.jsonl') as f:
        assert [json.loads(line)['iter'] for line in f] == [0, 4]
    assert torch.load(used / 'ckpt.pt', weights_only=True)['iter_num'] == 4


@pytest.mark.parametrize('init_from, overrides, message', [
    ('resume', dict(vocab=12, chars='ABCDEFGHIJKL'), 'has another vocabulary than checkpoint'),  # same size
    ('resume', dict(vocab=13), "dataset 'other' (13 tokens) has another vocabulary"),
    ('ckpt', dict(vocab=13), "dataset 'other' (13 tokens) has another vocabulary"),  # mid-training from a path
    ('resume', None, 'max_iters=8 is not allowed: checkpoint'),  # nothing left to train
])
def test_checkpoint_refuses_another_vocabulary(trained, init_from, overrides, message, tmp_path, capsys):
    """Resuming or mid-training a checkpoint on data whose token ids mean other text stops before training, and
    the checkpoint stays as it was."""
    cfg, _, _ = trained
    os.makedirs(tmp_path / 'out')
    ckpt = str(tmp_path / 'out' / 'ckpt.pt')
    shutil.copy(os.path.join(cfg['out_dir'], 'ckpt.pt'), ckpt)
    name = 'other' if overrides else 'tiny'
    make_dataset(str(tmp_path / 'data'), name=name, **(overrides or {}))
    args = [f'--init_from={ckpt if init_from == "ckpt" else init_from}', '--device=cpu', '--compile=False',
            '--dtype=float32', f'--data_dir={tmp_path / "data"}', f'--dataset={name}', '--max_iters=8',
            f'--out_dir={tmp_path / ("out" if init_from == "resume" else "mid")}']
    before = md5(ckpt)
    assert message in main_error(args, capsys)
    assert md5(ckpt) == before


class RunsCode:
    """Unpickling this creates its marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'random', 'malicious'])
def test_damaged_checkpoint_is_one_line_on_resume(trained, damage, tmp_path, capsys):
    """ckpt.pt cut short, empty, random bytes, or a pickle that runs code: one line naming the file, no code run,
    and never torch's advice to retry with weights_only=False."""
    cfg, _, _ = trained
    out, marker = tmp_path / 'out', tmp_path / 'ran'
    out.mkdir()
    good = open(os.path.join(cfg['out_dir'], 'ckpt.pt'), 'rb').read()
    if damage == 'malicious':
        torch.save({'model': RunsCode(str(marker)), 'model_args': {}}, out / 'ckpt.pt')
    else:
        (out / 'ckpt.pt').write_bytes({'truncated': good[:len(good) // 2], 'empty': b'',
                                       'random': np.random.default_rng(0).bytes(4096)}[damage])
    make_dataset(str(tmp_path / 'data'))
    err = main_error([f'--out_dir={out}', '--init_from=resume', '--device=cpu', '--compile=False', '--dataset=tiny',
                      f'--data_dir={tmp_path / "data"}', '--max_iters=12'], capsys)
    assert f"checkpoint {out / 'ckpt.pt'}" in err and 'weights_only=False' not in err, err
    assert not marker.exists(), 'loading the checkpoint ran its code'


def test_truncated_checkpoint_is_one_line_from_the_command_line(trained, tmp_path):
    """The same through `python train.py --init_from=resume`: exit 1, one stderr line, no Traceback."""
    cfg, _, _ = trained
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'ckpt.pt').write_bytes(open(os.path.join(cfg['out_dir'], 'ckpt.pt'), 'rb').read()[:5000])
    result = run_script('--init_from=resume', f'--out_dir={tmp_path / "out"}', f'--data_dir={cfg["data_dir"]}',
                        '--dataset=tiny', '--device=cpu', '--compile=False', '--max_iters=12')
    assert result.returncode == 1 and result.stderr.startswith('error: checkpoint '), result.stderr
    assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr, result.stderr


def test_log_has_no_duplicate_iter_after_a_kill_and_resume(tmp_path, monkeypatch):
    """Killed after log.jsonl got iter 8's row but before ckpt.pt did (it holds iter 4): the resume drops the rows
    after the checkpoint and writes them again, so every iter appears once. eval_only then writes nothing."""
    real_save, saves = train.prepare.save_atomic, []

    def killed_at_second_save(path, write):
        if path.endswith('ckpt.pt'):
            saves.append(path)
            if len(saves) == 2:
                raise KeyboardInterrupt  # the kill
        real_save(path, write)

    monkeypatch.setattr(train.prepare, 'save_atomic', killed_at_second_save)
    cfg = tiny_config(tmp_path, always_save_checkpoint=True)
    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
        train.train(cfg)
    log = os.path.join(cfg['out_dir'], 'log.jsonl')
    iters = lambda: [json.loads(line)['iter'] for line in open(log)]  # noqa: E731
    assert iters() == [0, 4, 8] and len(saves) == 2
    monkeypatch.setattr(train.prepare, 'save_atomic', real_save)
    assert torch.load(os.path.join(cfg['out_dir'], 'ckpt.pt'), weights_only=True)['iter_num'] == 4
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(dict(cfg, init_from='resume'))
        assert iters() == [0, 4, 8], 'a resume repeated a row of log.jsonl'
        before = md5(log), md5(os.path.join(cfg['out_dir'], 'ckpt.pt'))
        train.train(dict(cfg, init_from='resume', eval_only=True))
    assert (md5(log), md5(os.path.join(cfg['out_dir'], 'ckpt.pt'))) == before, 'eval_only wrote'
