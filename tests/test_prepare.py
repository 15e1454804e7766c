"""Tests of prepare.py: every dataset written into a tmp dir, offline, in a few seconds."""
import os
import sys
import subprocess
import numpy as np
import pytest

import prepare as P  # pytest.ini puts the repo root on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(n_train=200, n_val=20, length=8)  # a tiny prefix_sums set


def read_bins(out_dir):
    return [np.fromfile(os.path.join(out_dir, f'{s}.bin'), dtype=np.uint16) for s in ('train', 'val')]


def cli(*args, script='prepare.py'):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, OMP_NUM_THREADS='1'))


@pytest.fixture(scope='module')
def shakespeare(tmp_path_factory):
    return P.prepare('shakespeare_char', data_dir=str(tmp_path_factory.mktemp('data')))

# ---- shakespeare_char


def test_shipped_shakespeare_is_the_known_corpus():
    """data/shakespeare_char/input.txt is byte-identical to tiny Shakespeare (sha256 from shared/README)."""
    import hashlib
    with open(P.SHAKESPEARE, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed', 'shipped corpus changed'


def test_char_encode_decode_round_trips():
    """decode(encode(text)) == text for the whole corpus."""
    text = P.read_utf8(P.SHAKESPEARE)
    meta = P.char_meta(text)
    assert P.decode(P.encode(text, meta), meta) == text


def test_char_encode_rejects_unknown_character():
    """A character outside the vocabulary raises ValueError naming it, instead of being dropped."""
    with pytest.raises(ValueError, match="'Z'"):
        P.encode('abZ', P.char_meta('abc'))


def test_shakespeare_bins_are_uint16_and_cover_the_corpus(shakespeare):
    """train.bin + val.bin hold every character of input.txt, as uint16 ids, in order."""
    text = P.read_utf8(P.SHAKESPEARE)
    train, val = read_bins(shakespeare)
    meta = P.read_meta(shakespeare)
    assert os.path.getsize(os.path.join(shakespeare, 'train.bin')) == 2 * len(train), 'not 2 bytes per token'
    assert len(train) + len(val) == len(text)
    assert P.decode(np.concatenate([train, val]), meta) == text


def test_shakespeare_split_is_90_10(shakespeare):
    """train is the first int(0.9 n) tokens (nanoGPT: 1,003,854 train / 111,540 val)."""
    train, val = read_bins(shakespeare)
    assert (len(train), len(val)) == (1_003_854, 111_540)


def test_shakespeare_meta_is_plain_json(shakespeare):
    """meta.json holds vocab_size, the 65 sorted characters (id = index) and the settings; no meta.pkl is written."""
    meta = P.read_meta(shakespeare)
    assert set(meta) == {'vocab_size', 'chars', 'settings'}
    assert meta['vocab_size'] == 65 == len(meta['chars']) and meta['chars'] == sorted(meta['chars'])
    assert not os.path.exists(os.path.join(shakespeare, 'meta.pkl'))

# ---- text (GPT-2 BPE, offline)


def test_text_uses_shipped_bpe_offline(tmp_path, monkeypatch):
    """'hello world' -> [31373, 995] with tiktoken's download disabled: the shipped ranks suffice."""
    import tiktoken
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: pytest.fail('tried to download the BPE'))
    (tmp_path / 'hw.txt').write_text('hello world')
    out = P.prepare('text', input=str(tmp_path / 'hw.txt'), data_dir=str(tmp_path / 'data'))
    assert out == str(tmp_path / 'data' / 'hw'), 'output folder is not named after the input stem'
    assert np.concatenate(read_bins(out)).tolist() == [31373, 995]
    assert P.read_meta(out)['vocab_size'] == 50257 and P.read_meta(out)['tokenizer'] == 'gpt2'


def test_text_folder_files_are_sorted_and_joined_with_endoftext(tmp_path):
    """A folder gives enc(a) + <|endoftext|> + enc(b), files in sorted order, hidden files skipped."""
    folder = tmp_path / 'corpus'
    folder.mkdir()
    (folder / 'b.txt').write_text('world')
    (folder / 'a.txt').write_text('hello')
    (folder / '.hidden').write_text('secret')
    out = P.prepare('text', input=str(folder), name='mine', data_dir=str(tmp_path / 'data'))
    enc = P.gpt2_encoding()
    expected = enc.encode_ordinary('hello') + [P.EOT] + enc.encode_ordinary('world')
    assert out.endswith('mine') and np.concatenate(read_bins(out)).tolist() == expected


def test_chunked_tokenization_equals_whole_text():
    """Cutting at SAFE_CUT newlines gives exactly the tokens of the whole text (338,025 for Shakespeare)."""
    text = P.read_utf8(P.SHAKESPEARE)
    enc = P.gpt2_encoding()
    chunks = P.split_chunks(text, chunk_chars=20_000)
    assert len(chunks) > 10 and ''.join(chunks) == text
    pieces = [t for c in chunks for t in enc.encode_ordinary(c)]
    whole = enc.encode_ordinary(text)
    assert len(whole) == 338_025 and pieces == whole


def test_missing_bpe_offline_gives_one_clear_error(tmp_path, monkeypatch):
    """Without the shipped file and without network, the error says what is needed and how to fix it."""
    import tiktoken

    def offline(name):
        raise ConnectionError('no network')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(ValueError, match='TIKTOKEN_CACHE_DIR') as e:
        P.gpt2_encoding(str(tmp_path / 'absent.tiktoken'))
    assert '\n' not in str(e.value)

# ---- idempotence


def test_second_run_does_not_rewrite(tmp_path):
    """Same settings twice: the .bin files keep their mtime; --force rewrites them."""
    out = P.prepare('shakespeare_char', data_dir=str(tmp_path))
    path = os.path.join(out, 'train.bin')
    os.utime(path, ns=(1, 1))  # an old mtime that any rewrite would change
    P.prepare('shakespeare_char', data_dir=str(tmp_path))
    assert os.stat(path).st_mtime_ns == 1, 'second run rewrote train.bin'
    P.prepare('shakespeare_char', data_dir=str(tmp_path), force=True)
    assert os.stat(path).st_mtime_ns != 1, '--force did not rewrite'


def test_changed_settings_redo_the_data(tmp_path):
    """Another seed gives different prefix_sums data under the same folder, and meta records it."""
    out = P.prepare('prefix_sums', data_dir=str(tmp_path), **SMALL)
    before = read_bins(out)[0].tolist()
    P.prepare('prefix_sums', data_dir=str(tmp_path), **dict(SMALL, seed=1))
    assert read_bins(out)[0].tolist() != before and P.read_meta(out)['settings']['seed'] == 1


def test_interrupted_reprepare_is_redone(tmp_path, monkeypatch):
    """Killed after replacing train.bin with new data: meta.json (written last) is gone, so neither the old nor the
    new settings count as prepared and the next run redoes the folder instead of pairing old meta with new data."""
    out = P.prepare('prefix_sums', data_dir=str(tmp_path), **SMALL)
    real_save, calls = P.save_atomic, []

    def killed_after_first_file(path, write):
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        real_save(path, write)

    monkeypatch.setattr(P, 'save_atomic', killed_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        P.prepare('prefix_sums', data_dir=str(tmp_path), **dict(SMALL, seed=1))
    monkeypatch.setattr(P, 'save_atomic', real_save)
    assert not os.path.exists(os.path.join(out, 'meta.json')), 'old meta.json left beside new data'
    P.prepare('prefix_sums', data_dir=str(tmp_path), **SMALL)
    assert P.read_meta(out)['settings']['seed'] == 1337 and not [f for f in os.listdir(out) if f.endswith('.tmp')]


def test_two_concurrent_prepares_both_succeed(tmp_path):
    """Two processes preparing the same dataset at once (per-process temp names, atomic renames): both exit 0 and
    the folder is complete and readable."""
    args = [sys.executable, os.path.join(ROOT, 'prepare.py'), 'prefix_sums', '--n_train=20000', '--length=16',
            f'--data_dir={tmp_path}']
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    out = tmp_path / 'prefix_sums'
    assert P.read_meta(str(out))['example_len'] == 17 and len(read_bins(str(out))[0]) == 20000 * 17  # BOS + 16
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]

# ---- prefix_sums (the lead's showcase task): the CLI and its meta


def test_prefix_sums_cli_writes_meta_json_with_example_len(tmp_path):
    """`python prepare.py prefix_sums` writes meta.json with example_len (BOS + digits), the digits and '^' (the BOS)
    as chars, and a bare --force redoes."""
    r = cli('prefix_sums', '--n_train=100', '--n_val=10', '--length=8', f'--data_dir={tmp_path}')
    assert r.returncode == 0, r.stderr
    meta = P.read_meta(str(tmp_path / 'prefix_sums'))
    assert meta['bos'] and meta['example_len'] == 9 and meta['vocab_size'] == 4 and meta['chars'] == list('012^')
    r = cli('prefix_sums', '--n_train=100', '--n_val=10', '--length=8', f'--data_dir={tmp_path}', '--force')
    assert r.returncode == 0 and 'already prepared' not in r.stdout, r.stdout + r.stderr

# ---- nothing executed: a pickled meta is refused, never loaded


class RunsCode:
    """Unpickling this creates its marker file, as a malicious meta.pkl could run any command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_meta_pkl_is_refused_and_never_unpickled(tmp_path):
    """A dataset folder with only a (malicious) nanoGPT meta.pkl: prepare.read_meta and train.py --data_dir=... each
    refuse it with one line telling to re-run prepare.py, and its code never runs."""
    import pickle
    folder, marker = tmp_path / 'data' / 'evil', tmp_path / 'ran'
    folder.mkdir(parents=True)
    for split in ('train', 'val'):
        (np.arange(500) % 5).astype(np.uint16).tofile(folder / f'{split}.bin')
    with open(folder / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 5, 'payload': RunsCode(str(marker))}, f)
    with pytest.raises(ValueError, match='meta.pkl is a pickle.*re-run prepare.py'):
        P.read_meta(str(folder))
    r = cli('--dataset=evil', f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}', '--device=cpu',
            '--compile=False', '--max_iters=1', script='train.py')
    assert r.returncode != 0 and r.stderr.startswith('error: ') and r.stderr.count('\n') == 1, r.stderr
    assert 'meta.pkl' in r.stderr and 'Traceback' not in r.stderr
    assert not marker.exists(), 'the pickle ran its code'

# ---- errors


def test_python_api_rejects_bad_options():
    """prepare raises ValueError for an unknown dataset, an unknown option and a wrong type."""
    for name, kw in (('nope', {}), ('prefix_sums', {'hops': 2}), ('prefix_sums', {'length': '2'}),
                     ('prefix_sums', {'force': 1})):
        with pytest.raises(ValueError):
            P.prepare(name, **kw)


@pytest.mark.parametrize('args', [
    ['nope'],
    ['shakespeare_char', '--bogus=1'],
    ['text', '--input=does/not/exist.txt'],
    ['text', '--input={bad}'],  # a Latin-1 file, written below
    ['prefix_sums', '--length=abc'],
    ['prefix_sums', '--modulus=1'],
    ['shakespeare_char', '--force=maybe'],
    [],
])
def test_cli_errors_are_one_line_without_traceback(args, tmp_path):
    """Bad CLI input: exit != 0, 'error:' on stderr, no Traceback, nothing written."""
    bad = tmp_path / 'latin1.txt'
    bad.write_bytes('caf\xe9'.encode('latin-1'))
    args = [a.format(bad=bad) for a in args]
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), *args, f'--data_dir={tmp_path / "data"}'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.startswith('error:') and r.stderr.count('\n') == 1, r.stderr
    assert not (tmp_path / 'data').exists()
