"""The depth showcase's task (prepare.py prefix_sums): its answers, its split, and what compare.py reads from it."""

import numpy as np
import pytest

import compare
import prepare


@pytest.fixture(scope='module')
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    prepare.prepare('prefix_sums', data_dir=str(root), n_train=3000, n_val=500, length=12, modulus=3)
    path = prepare.dataset_dir('prefix_sums', str(root))
    meta = prepare.read_meta(path)
    rows = lambda name: np.fromfile(f'{path}/{name}', dtype=np.uint16).reshape(-1, meta['example_len'])
    return meta, {split: (rows(f'{split}.bin'), rows(f'{split}_targets.bin')) for split in ('train', 'val')}


def solve(digits, modulus):
    """An independent solver: add the digits one at a time, as a person would."""
    total, out = 0, []
    for d in digits:
        total = (total + int(d)) % modulus
        out.append(total)
    return out


def test_every_target_is_the_running_sum_of_the_digits_before_it(task):
    """Each example is BOS + digits; the target at BOS is 0 (the empty sum), at digit t the sum of digits 1..t mod 3."""
    meta, splits = task
    assert meta['example_len'] == 13 and meta['vocab_size'] == 4 and meta['bos']
    for x, y in splits.values():
        assert (x[:, 0] == 3).all() and (y[:, 0] == 0).all()
        for row_x, row_y in zip(x[:200], y[:200]):
            assert row_y[1:].tolist() == solve(row_x[1:], 3)


def test_the_test_set_shares_no_example_with_the_training_set(task):
    _, splits = task
    train = {row.tobytes() for row in splits['train'][0]}
    assert not any(row.tobytes() in train for row in splits['val'][0])
    assert len(splits['val'][0]) > 400  # only the rare duplicates were dropped


def test_a_batch_of_the_task_is_whole_examples_with_their_targets(task, tmp_path):
    """get_batch gives aligned rows (x, y) of a task, never windows that cut an example."""
    import torch
    meta, _ = task
    path = prepare.dataset_dir('prefix_sums', str(tmp_path))
    prepare.prepare('prefix_sums', data_dir=str(tmp_path), n_train=50, n_val=10, length=12)
    x, y = prepare.get_batch(path, 'train', 8, 13, torch.Generator().manual_seed(0))
    assert (x[:, 0] == 3).all()
    for row_x, row_y in zip(x, y):
        assert row_y[1:].tolist() == solve(row_x[1:], 3)


def test_compare_scores_every_digit_and_not_the_bos_token(tmp_path):
    """compare drops the BOS column: accuracy is over the 12 digits, at every test depth and adaptive."""
    import torch
    from model import GPT, GPTConfig
    prepare.prepare('prefix_sums', data_dir=str(tmp_path), n_train=50, n_val=10, length=12)
    batches, metric, groups = compare.test_data({'dataset': 'prefix_sums', 'data_dir': str(tmp_path)})
    assert groups == compare.buckets(12) and batches[0][0].shape[1] == 13  # BOS + 12 digits in, 12 digits scored
    model = GPT(GPTConfig(block_size=13, vocab_size=4, n_embd=16, n_head=2, n_prelude=0, n_loop=1, n_coda=0,
                          mean_depth=1, max_depth=2)).eval()
    rows = compare.evaluate(model, batches, [1, 2], metric)
    assert set(rows) == {1, 2, 'adaptive'} and all(acc.shape == (len(groups),) for acc, _ in rows.values())
    torch.manual_seed(0)  # the noise s_0 the evaluation used
    (x, y), = batches
    correct = 100 * (model(x, num_steps=1)[0].argmax(-1) == y)[:, 1:].float()  # the digits' columns only
    expected = torch.stack([correct[:, a - 1:b].mean() for a, b in groups])
    assert torch.allclose(rows[1][0], expected), (rows[1][0], expected)
