"""Tests of prepare.py: every dataset written into a tmp dir, offline, in a few seconds."""
import os
import sys
import pickle
import subprocess
import numpy as np
import pytest

import prepare as P  # pytest.ini puts the repo root on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(max_hops=3, n_chains=3, n_train=2000, n_val=200, n_test=50, seed=0)  # a tiny reasoning set


def read_bins(out_dir):
    return [np.fromfile(os.path.join(out_dir, f'{s}.bin'), dtype=np.uint16) for s in ('train', 'val')]


def load(out_dir, filename):
    with open(os.path.join(out_dir, filename), 'rb') as f:
        return pickle.load(f)


@pytest.fixture(scope='module')
def shakespeare(tmp_path_factory):
    return P.prepare('shakespeare_char', data_dir=str(tmp_path_factory.mktemp('data')))


@pytest.fixture(scope='module')
def reasoning(tmp_path_factory):
    return P.prepare('reasoning', data_dir=str(tmp_path_factory.mktemp('data')), **SMALL)


def reasoning_text(out_dir, split='train'):
    return P.decode(read_bins(out_dir)[split == 'val'], load(out_dir, 'meta.pkl'))

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
    meta = load(shakespeare, 'meta.pkl')
    assert os.path.getsize(os.path.join(shakespeare, 'train.bin')) == 2 * len(train), 'not 2 bytes per token'
    assert len(train) + len(val) == len(text)
    assert P.decode(np.concatenate([train, val]), meta) == text


def test_shakespeare_split_is_90_10(shakespeare):
    """train is the first int(0.9 n) tokens (nanoGPT: 1,003,854 train / 111,540 val)."""
    train, val = read_bins(shakespeare)
    assert (len(train), len(val)) == (1_003_854, 111_540)


def test_shakespeare_meta_is_nanogpt_format(shakespeare):
    """meta.pkl has vocab_size, itos, stoi with 65 sorted characters."""
    meta = load(shakespeare, 'meta.pkl')
    assert meta['vocab_size'] == 65 == len(meta['itos']) == len(meta['stoi'])
    assert [meta['itos'][i] for i in range(65)] == sorted(meta['stoi'])

# ---- text (GPT-2 BPE, offline)


def test_text_uses_shipped_bpe_offline(tmp_path, monkeypatch):
    """'hello world' -> [31373, 995] with tiktoken's download disabled: the shipped ranks suffice."""
    import tiktoken
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: pytest.fail('tried to download the BPE'))
    (tmp_path / 'hw.txt').write_text('hello world')
    out = P.prepare('text', input=str(tmp_path / 'hw.txt'), data_dir=str(tmp_path / 'data'))
    assert out == str(tmp_path / 'data' / 'hw'), 'output folder is not named after the input stem'
    assert np.concatenate(read_bins(out)).tolist() == [31373, 995]
    assert load(out, 'meta.pkl')['vocab_size'] == 50257 and load(out, 'meta.pkl')['tokenizer'] == 'gpt2'


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
    """Another seed gives different reasoning data under the same folder, and meta records it."""
    kw = dict(SMALL, n_train=100, n_val=10, n_test=5)
    out = P.prepare('reasoning', data_dir=str(tmp_path), **kw)
    before = read_bins(out)[0].tolist()
    P.prepare('reasoning', data_dir=str(tmp_path), **dict(kw, seed=1))
    assert read_bins(out)[0].tolist() != before and load(out, 'meta.pkl')['settings']['seed'] == 1

# ---- reasoning


def test_solver_on_a_hand_written_problem():
    """solve follows a=7 -> k -> q in shuffled order: ?q= is 7 after 3 hops; distractor x ignored."""
    problem = 'q=k;x=3;a=7;k=a;?q='
    assert P.solve(problem) == '7' and P.query_hops(problem) == 3
    assert P.solve('q=k;x=3;a=7;k=a;?q=7;?x=') == '3'


def test_solver_agrees_with_every_answer_in_train_lines(reasoning):
    """For every query of every train line, solve(text up to '?v=') is the digit that follows."""
    lines = reasoning_text(reasoning).split('\n')[:-1]
    n = 0
    for line in lines[:300]:
        for pos in (i for i, c in enumerate(line) if c == '='):
            if line.rfind('?', 0, pos) > line.rfind(';', 0, pos):  # '=' of a query, not of an assignment
                assert P.solve(line[:pos + 1]) == line[pos + 1], f'wrong answer in {line!r}'
                n += 1
    assert n > 300 * 2, 'lines should hold many queries each'


def test_every_variable_is_queried(reasoning):
    """Each line asks for every variable it assigns: many supervised positions per line (METHOD.md §3)."""
    for line in reasoning_text(reasoning).split('\n')[:200]:
        assigned = {seg[0] for seg in line.split(';') if seg and seg[0] != '?'}
        asked = {seg[1] for seg in line.split(';') if seg.startswith('?')}
        assert assigned == asked, line


def test_train_hops_stay_within_max_hops(reasoning):
    """No train query needs more than max_hops hops, and all of 1..max_hops occur."""
    hops = set()
    for line in reasoning_text(reasoning).split('\n')[:500]:
        problem = line[:line.index('?')]
        hops |= {P.query_hops(problem + q[:3]) for q in line[len(problem):].split(';') if q}
    assert hops == set(range(1, SMALL['max_hops'] + 1))


def test_assignments_are_shuffled(reasoning):
    """Some lines use a variable before the line defines it: the chain is not in reading order."""
    def forward_ref(line):
        segs = [s for s in line.split(';') if s and s[0] != '?']
        defined = set()
        for lhs, rhs in (s.split('=') for s in segs):
            if rhs.isalpha() and rhs not in defined:
                return True
            defined.add(lhs)
        return False
    lines = reasoning_text(reasoning).split('\n')[:500]
    assert sum(map(forward_ref, lines)) > 100


def test_test_prompts_cover_hops_1_to_2h_and_fit(reasoning):
    """test.pkl has n_test prompts for each hops 1..2H, each ending in '?v=', <= 256 chars, one-digit answers."""
    test = load(reasoning, 'test.pkl')
    assert sorted(test) == list(range(1, 2 * SMALL['max_hops'] + 1))
    for hops, pairs in test.items():
        assert len(pairs) == SMALL['n_test']
        for prompt, answer in pairs:
            assert len(prompt) <= 256 and prompt.endswith('=') and answer in '0123456789'


def test_test_answers_and_hops_verified_by_solver(reasoning):
    """solve(prompt) == stored answer and the query needs exactly `hops` hops (the test.pkl key)."""
    for hops, pairs in load(reasoning, 'test.pkl').items():
        for prompt, answer in pairs:
            assert P.solve(prompt) == answer and P.query_hops(prompt) == hops, prompt


def test_no_test_problem_appears_in_train_or_val(reasoning):
    """No test problem text (the assignments) is identical to a train or val problem."""
    seen = {line[:line.index('?')] for split in ('train', 'val')
            for line in reasoning_text(reasoning, split).split('\n') if line}
    test = [p[1:p.rindex('?')] for pairs in load(reasoning, 'test.pkl').values() for p, _ in pairs]
    assert len(set(test)) == len(test), 'duplicate test problems'
    assert not seen & set(test)


def test_test_excludes_train_even_when_collisions_are_likely(tmp_path):
    """With few possible 1-hop problems (2 chains: 58,500), train covers many; test still avoids them all."""
    out = P.prepare('reasoning', data_dir=str(tmp_path), max_hops=1, n_chains=2, n_train=20_000, n_val=100, n_test=100)
    train = {line[:line.index('?')] for line in reasoning_text(out).split('\n') if line}
    assert not train & {p[1:p.rindex('?')] for p, _ in load(out, 'test.pkl')[1]}


def test_reasoning_vocab_is_fixed_across_settings(tmp_path, reasoning):
    """Another max_hops / n_chains gives the same stoi: checkpoints stay comparable across settings."""
    other = P.prepare('reasoning', data_dir=str(tmp_path), max_hops=1, n_chains=2, n_train=50, n_val=5, n_test=5)
    assert load(other, 'meta.pkl')['stoi'] == load(reasoning, 'meta.pkl')['stoi']
    assert load(other, 'meta.pkl')['vocab_size'] == 40

# ---- errors


def test_python_api_rejects_bad_options():
    """prepare raises ValueError for an unknown dataset, an unknown option and a wrong type."""
    for name, kw in (('nope', {}), ('reasoning', {'hops': 2}), ('reasoning', {'max_hops': '2'})):
        with pytest.raises(ValueError):
            P.prepare(name, **kw)


@pytest.mark.parametrize('args', [
    ['nope'],
    ['shakespeare_char', '--bogus=1'],
    ['text', '--input=does/not/exist.txt'],
    ['text', '--input={bad}'],  # a Latin-1 file, written below
    ['reasoning', '--max_hops=abc'],
    ['reasoning', '--max_hops=20'],
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
