"""reasoning.py: accuracy per (hops, r) on the multi-hop task, its prompt/answer alignment, and its command line."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402
from model import GPT, GPTConfig, plain_config  # noqa: E402
from reasoning import accuracy_by_hops  # noqa: E402

META = prepare.char_meta(prepare.REASONING_CHARS)
DEPTHS = (1, 2, 3)


@pytest.fixture(scope='module')
def test_set():
    """6 prompts per hop count, hops 1..4, from the generator itself (prompt lengths differ within a hop count)."""
    rng = random.Random(0)
    return {h: prepare.make_test_set(h, 6, 2, rng, set()) for h in range(1, 5)}


def tiny_looped():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=len(META['stoi']), n_embd=16, n_head=2, mean_depth=2, max_depth=3,
                         backprop_depth=2))


class Oracle(torch.nn.Module):
    """A fake model that solves each prompt from its text (prepare.solve) and puts the answer digit first at the
    position `at` (-1: the last prompt position, where reasoning.py must read it); every other position says '0'.
    The right argmax at the wrong position would score about 0.1, so 1.0 proves the alignment."""

    def __init__(self, at=-1):
        super().__init__()
        self.config, self.at = GPTConfig(block_size=64, vocab_size=len(META['stoi']), max_depth=3, mean_depth=2), at

    def forward(self, idx, targets=None, num_steps=None, generator=None):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        logits[:, :, META['stoi']['0']] = 1.0
        for b, row in enumerate(idx.tolist()):
            answer = prepare.solve(prepare.decode(row, META))
            logits[b, self.at, META['stoi'][answer]] = 2.0
        return logits, None

    def adaptive_forward(self, idx, targets=None, exit_threshold=None, num_steps=None, exit_rule='kl'):
        logits, _ = self(idx)
        return logits, None, torch.full(idx.shape, 2, dtype=torch.long)


def test_one_accuracy_in_unit_interval_per_hops_and_depth(test_set):
    """An untrained looped model gets one accuracy in [0, 1] for every (hops, r), plus adaptive exit and its depth."""
    res = accuracy_by_hops(tiny_looped(), test_set, META, depths=DEPTHS)
    assert sorted(res) == [1, 2, 3, 4], res.keys()
    for hops, row in res.items():
        assert set(row) == {'r=1', 'r=2', 'r=3', 'adaptive', 'adaptive_iters'}, row
        assert all(0.0 <= row[k] <= 1.0 for k in row if k != 'adaptive_iters'), row
        assert 1.0 <= row['adaptive_iters'] <= max(DEPTHS), row


def test_oracle_reading_the_last_prompt_position_scores_one(test_set):
    """A model whose last-position argmax is the solved answer digit gets accuracy exactly 1.0 everywhere."""
    res = accuracy_by_hops(Oracle(at=-1), test_set, META, depths=DEPTHS)
    assert all(v == 1.0 for row in res.values() for k, v in row.items() if k != 'adaptive_iters'), res


def test_answer_at_another_position_is_not_counted(test_set):
    """The same oracle answering one position too early is not read: accuracy falls far below 1."""
    res = accuracy_by_hops(Oracle(at=-2), test_set, META, depths=(1,), adaptive=False)
    assert max(row['r=1'] for row in res.values()) < 0.5, res


def test_plain_model_gets_only_depth_one(test_set):
    """A plain GPT (max_depth 1, no injection) is evaluated at r = 1 only, without adaptive exit."""
    torch.manual_seed(0)
    plain = GPT(plain_config(2, block_size=64, vocab_size=len(META['stoi']), n_embd=16, n_head=2))
    res = accuracy_by_hops(plain, test_set, META, depths=DEPTHS)
    assert all(set(row) == {'r=1'} for row in res.values()), res


def test_noise_state_results_are_reproducible(test_set):
    """With init_state='noise' the same seed gives the same accuracies (s_0 comes from a seeded generator)."""
    model = tiny_looped()
    assert accuracy_by_hops(model, test_set, META, depths=DEPTHS) == accuracy_by_hops(model, test_set, META,
                                                                                      depths=DEPTHS)


def write_run(tmp_path, test_set):
    """A reasoning dataset folder and a train.py-format checkpoint of the tiny model."""
    data = tmp_path / 'data' / 'reasoning'
    data.mkdir(parents=True)
    prepare.save_pickle(str(data / 'test.pkl'), test_set)
    prepare.save_pickle(str(data / 'meta.pkl'), dict(META, train_hops=[1, 2]))
    model = tiny_looped()
    ckpt = tmp_path / 'ckpt.pt'
    torch.save(dict(model=model.state_dict(), model_args=vars(model.config),
                    config=dict(dataset='reasoning', data_dir=str(tmp_path / 'data'), max_iters=0)), ckpt)
    return ckpt


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'reasoning.py'), *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_prints_table_and_writes_json(tmp_path, test_set):
    """The command line prints one table row per hop count (harder-than-training ones starred) and writes the JSON."""
    ckpt = write_run(tmp_path, test_set)
    out = run_cli(f'--ckpt={ckpt}', '--depths=1,4')
    assert out.returncode == 0, out.stderr
    assert '| 3* |' in out.stdout and '| 1 |' in out.stdout, out.stdout
    res = json.loads((tmp_path / 'reasoning.json').read_text())['results']
    assert sorted(res) == ['1', '2', '3', '4'] and set(res['1']) == {'r=1', 'r=4', 'adaptive', 'adaptive_iters'}


@pytest.mark.parametrize('args, says', [(['--ckpt=/nonexistent/ckpt.pt'], 'is not a file'),
                                        (['--depths=0,2'], '--depths'),
                                        (['--bogus=1'], 'unknown argument'),
                                        (['--exit_rule=magic'], 'exit_rule')])
def test_cli_bad_input_is_one_line_error(tmp_path, test_set, args, says):
    """Bad input exits != 0 with one error line naming the problem, never a traceback."""
    ckpt = write_run(tmp_path, test_set)
    out = run_cli(*([f'--ckpt={ckpt}'] + args if 'ckpt' not in args[0] else args))
    assert out.returncode != 0 and says in out.stderr and 'Traceback' not in out.stderr, out.stderr
