"""
Datasets: data/<name>/{train,val}.bin (np.uint16 token ids, nanoGPT's format) + meta.json, and the functions every
script reads them with (dataset_dir, read_meta, get_batch, encode, decode). meta.json is plain JSON (reading it never
runs code, unlike nanoGPT's meta.pkl) and holds the settings: a dataset made with the same ones is skipped.
  python prepare.py shakespeare_char                      # the embedded default, char-level (< 1 s)
  python prepare.py text --input=notes.txt [--name=notes]  # any UTF-8 file or folder, GPT-2 BPE (tiktoken)
  python prepare.py prefix_sums                           # the depth showcase's task, a target at every position
"""
import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import torch

from configurator import checked, configure
from model import check

REPO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
SHAKESPEARE = os.path.join(REPO_DATA, 'shakespeare_char', 'input.txt')  # shipped in the repo
BPE_PATH = os.path.join(REPO_DATA, 'gpt2_bpe.tiktoken')  # GPT-2 merge ranks, shipped so `text` works offline
BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'  # the hash tiktoken checks (r50k_base)
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256  # <|endoftext|>, put between the files of a `text` folder
SAFE_CUT = re.compile(r'(?<=\S)\n(?=\S)')  # a newline between non-spaces: GPT2_PAT never joins tokens across it
STREAM = ('train.bin', 'val.bin', 'meta.json')  # all present + meta with the same settings = done
OUTPUTS = {'shakespeare_char': STREAM, 'text': STREAM, 'prefix_sums': ('train_targets.bin', 'val_targets.bin', *STREAM)}
VERSION = {'shakespeare_char': 1, 'text': 1, 'prefix_sums': 2}  # bump on a change to the outputs: redone (2: BOS)

# options of each dataset with their defaults; a CLI --key=value is converted to the default's type
COMMON = dict(data_dir=REPO_DATA,  # folder that holds <name>/
              force=False)         # True: redo even if outputs with the same settings exist
DEFAULTS = {
    'shakespeare_char': dict(),
    'text': dict(input='',   # a UTF-8 file, or a folder: all its files (sorted, hidden ones skipped)
                 name=''),   # output folder name; '' = the input's stem
    'prefix_sums': dict(modulus=3,        # digits 0..modulus-1, targets mod modulus (chance = 1 / modulus)
                        length=32,        # digits per example = the hardest position
                        n_train=200_000,  # train examples
                        n_val=4_096,      # test examples (val.bin), none of them in train
                        seed=1337),
}
# what each value must be beyond its type: {dataset: {key: (what is allowed, test)}}, for model.check
RULES = {'text': {'input': ('an existing UTF-8 file or folder of them', lambda v: bool(v) and os.path.exists(v))},
         'prefix_sums': {'modulus': ('an integer from 2 to 65535 (uint16 ids)', lambda v: 2 <= v < 2**16),
                         **{key: ('an integer >= 1', lambda v: v >= 1) for key in ('length', 'n_train', 'n_val')}}}


# -- writing: atomic files, meta.json last -----------------------------------------------------------------------------
def save_atomic(path, write):
    """write(f) into a temp file named per process (two runs at once do not collide), then rename it over path:
    a kill while writing leaves the old file whole. Every file nanoloop writes goes through here."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        write(f)
    os.replace(tmp, path)


def is_prepared(out_dir, settings, files):
    """True if every output exists and meta.json was written with exactly these settings."""
    try:
        return (all(os.path.exists(os.path.join(out_dir, f)) for f in files)
                and read_meta(out_dir).get('settings') == settings)
    except ValueError:  # unreadable meta: redo
        return False


def write_splits(out_dir, train_ids, val_ids, meta, targets=()):
    """train.bin, val.bin, a task's (train targets, val targets) as {train,val}_targets.bin, and meta.json last."""
    os.makedirs(out_dir, exist_ok=True)
    arrays = {'train': train_ids, 'val': val_ids, **dict(zip(('train_targets', 'val_targets'), targets))}
    with contextlib.suppress(FileNotFoundError):  # a kill from here on leaves a folder is_prepared() redoes
        os.remove(os.path.join(out_dir, 'meta.json'))
    for name, ids in arrays.items():
        save_atomic(os.path.join(out_dir, f'{name}.bin'), np.asarray(ids, dtype=np.uint16).tofile)
    save_atomic(os.path.join(out_dir, 'meta.json'), lambda f: f.write(json.dumps(meta, indent=1).encode()))  # last


def read_utf8(path):
    """The file's text, or one clear error naming the file and the first bad byte."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8')  # bytes -> str ourselves: no newline translation, exact offsets
    except UnicodeDecodeError as e:
        raise ValueError(f'{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); '
                         f'convert it first, e.g. iconv -t utf-8') from None


# -- reading a prepared dataset: every script goes through these -------------------------------------------------------
def dataset_dir(dataset, data_dir=''):
    """The folder of a prepared dataset: <data_dir>/<dataset>, data_dir defaulting to data/ beside this file."""
    return os.path.join(data_dir or REPO_DATA, dataset)


def read_meta(path):
    """meta.json of dataset folder `path` ({} if none); an old nanoGPT meta.pkl is refused, never unpickled."""
    meta_path = os.path.join(path, 'meta.json')
    if not os.path.exists(meta_path):
        if os.path.exists(os.path.join(path, 'meta.pkl')):
            raise ValueError(f'{path}/meta.pkl is a pickle, which could run code when read; nanoloop reads only '
                             f'meta.json: re-run prepare.py for this dataset')
        return {}
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
    except (ValueError, OSError):  # not JSON, not UTF-8, unreadable
        meta = None
    if not (isinstance(meta, dict) and isinstance(meta.get('vocab_size'), int)):
        raise ValueError(f'{meta_path} is not a meta.json written by prepare.py: re-run prepare.py')
    return meta


def get_batch(path, split, batch_size, block_size, generator, device='cpu'):
    """batch_size random (x, y) of block_size from folder `path`, drawn with `generator`: a saved state replays them."""
    if not os.path.exists(os.path.join(path, f'{split}.bin')):
        raise ValueError(f"no {path}/{split}.bin: prepare the dataset first (python prepare.py ...) or pass --data_dir")
    data = np.memmap(os.path.join(path, f'{split}.bin'), dtype=np.uint16, mode='r')  # reopened: no memmap leak
    if length := read_meta(path).get('example_len'):  # a task: whole examples, their targets in <split>_targets.bin
        targets = np.memmap(os.path.join(path, f'{split}_targets.bin'), dtype=np.uint16, mode='r')
        rows = torch.randint(len(data) // length, (batch_size,), generator=generator).numpy()
        index = rows[:, None] * length + np.arange(min(block_size, length))
        x, y = (torch.from_numpy(a[index].astype(np.int64)) for a in (data, targets))
    else:  # a token stream: windows with y = x shifted by one (nanoGPT)
        if len(data) <= block_size:
            raise ValueError(f"{path}/{split}.bin has {len(data)} tokens: block_size={block_size} needs more")
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
        windows = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
        x, y = windows[:, :-1], windows[:, 1:]
    if 'cuda' in str(device):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def char_meta(chars):
    """nanoGPT's char-level meta: ids follow the sorted characters."""
    return {'vocab_size': len(set(chars)), 'chars': sorted(set(chars))}


def encode(s, meta):
    """String -> list of token ids in the dataset's vocabulary; a character outside it is an error, never dropped."""
    if meta.get('tokenizer') == 'gpt2':
        return gpt2_encoding().encode(s, allowed_special={'<|endoftext|>'})
    stoi = {c: i for i, c in enumerate(meta['chars'])}
    if unknown := set(s) - set(stoi):
        raise ValueError(f'characters {sorted(unknown)} are not in this vocabulary of {len(stoi)} chars')
    return [stoi[c] for c in s]


def decode(ids, meta):
    """List (or array) of token ids -> string, in the dataset's vocabulary."""
    if meta.get('tokenizer') == 'gpt2':
        return gpt2_encoding().decode([int(i) for i in ids])
    return ''.join(meta['chars'][int(i)] for i in ids)


# -- text: any UTF-8 file or folder, GPT-2 BPE through tiktoken --------------------------------------------------------
@functools.lru_cache(maxsize=None)
def gpt2_encoding(path=BPE_PATH):
    """GPT-2's tokenizer, built offline from the shipped ranks; tiktoken's download only if the file is gone."""
    import tiktoken.load  # binds tiktoken too; imported here: shakespeare_char and prefix_sums run without it
    if not os.path.exists(path):
        try:
            return tiktoken.get_encoding('gpt2')
        except Exception as e:  # offline: requests raises its own errors, tiktoken wraps none of them
            raise ValueError(f'{path} is missing and tiktoken could not fetch GPT-2 BPE ({type(e).__name__}); fix: git '
                             f'checkout {path}, run once online, or set TIKTOKEN_CACHE_DIR to its cache') from None
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=BPE_SHA256)
    except ValueError:
        raise ValueError(f'{path} is corrupted (sha256 is not {BPE_SHA256}); restore it: git checkout {path}') from None
    return tiktoken.Encoding('gpt2', pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={'<|endoftext|>': EOT})


def text_inputs(opts):
    """The text dataset's files, sorted; fills in opts' absolute input and its name (--name, else the input's stem)."""
    path = os.path.abspath(opts['input'])
    name = opts['name'] or os.path.splitext(os.path.basename(path))[0]
    if not re.fullmatch(r'\w[\w.-]*', name) or name in DEFAULTS:  # no '/', no hidden '.x', no built-in's folder
        raise ValueError(f'--name={name!r} is not allowed: expected a folder name of letters, digits, _ . - (no '
                         f'leading dot), not one of {", ".join(DEFAULTS)}')
    opts['name'], opts['input'] = name, path
    found = glob.glob(os.path.join(glob.escape(path), '**'), recursive=True) if os.path.isdir(path) else [path]
    files = sorted(f for f in found if os.path.isfile(f))  # glob's '**' skips hidden files and folders (.git, ...)
    if not files:
        raise ValueError(f'--input={path!r} holds no (non-hidden) files')
    return files


def split_chunks(text, chunk_chars=1 << 20):
    """Text in pieces of about chunk_chars, cut at SAFE_CUT: their tokens are the whole's, and a progress bar moves."""
    cuts = [0]
    while len(text) - cuts[-1] > chunk_chars and (m := SAFE_CUT.search(text, cuts[-1] + chunk_chars)):
        cuts.append(m.end())
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def tokenize_files(files, enc):
    """GPT-2 token ids of all files, <|endoftext|> between files; a tqdm bar over the input bytes."""
    from tqdm import tqdm
    pieces, total = [], sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, unit='B', unit_scale=True, desc='tokenizing', disable=None) as bar:
        for path in files:
            for chunk in split_chunks(read_utf8(path)):
                # encode_ordinary: a literal "<|endoftext|>" in the text is plain text, not the special token
                pieces.append(np.array(enc.encode_ordinary(chunk), dtype=np.uint16))  # 50257 < 2**16
                bar.update(len(chunk.encode('utf-8')))
            pieces.append(np.array([EOT], dtype=np.uint16))
    return np.concatenate(pieces[:-1])  # <|endoftext|> between files, not after the last


# -- prefix_sums, the depth showcase's task (Schwarzschild et al. 2021, arXiv 2106.04537) ------------------------------
def prefix_sums(modulus, length, n_train, n_val, seed):
    """Digits x_1..x_L, target (x_1 + ... + x_t) mod modulus at each t: the position is the difficulty. Dense targets
    skip the induction-head plateau; a BOS (id modulus, target 0) makes all steps t-1 -> t alike: loops extrapolate."""
    rng = np.random.default_rng(seed)
    train, val = (rng.integers(0, modulus, size=(n, length), dtype=np.uint16) for n in (n_train, n_val))
    seen = {row.tobytes() for row in train}
    val = val[np.array([row.tobytes() not in seen for row in val], dtype=bool)]  # no test example is in train
    meta = dict(vocab_size=modulus + 1, chars=list(map(str, range(modulus))) + ['^'], example_len=length + 1, bos=True)
    bos_first = lambda x, bos: np.pad(x, ((0, 0), (1, 0)), constant_values=bos).ravel()  # (N, L) -> N * (L + 1)
    targets = [bos_first(np.cumsum(x, axis=1) % modulus, 0) for x in (train, val)]  # running sums; the BOS's is 0
    return bos_first(train, modulus), bos_first(val, modulus), meta, targets


# -- entry points ------------------------------------------------------------------------------------------------------
def options(name):
    """The options of dataset `name` with their defaults."""
    if name not in DEFAULTS:
        raise ValueError(f'unknown dataset {name!r}; allowed: {", ".join(DEFAULTS)}')
    return {**COMMON, **DEFAULTS[name]}


def build(dataset, files, opts):
    """The dataset's (train ids, val ids, meta, targets); a token stream is split 90/10 and has no targets."""
    if dataset == 'prefix_sums':
        return prefix_sums(**opts)
    if dataset == 'shakespeare_char':
        text = read_utf8(SHAKESPEARE)
        meta = char_meta(text)
        ids = encode(text, meta)
    else:
        enc = gpt2_encoding()
        ids, meta = tokenize_files(files, enc), {'vocab_size': enc.n_vocab, 'tokenizer': 'gpt2'}
        if len(ids) < 2:
            raise ValueError(f'--input={opts["input"]!r} has {len(ids)} tokens; train and val need one each')
    n = int(len(ids) * 0.9)  # one token stream: the first 90% is train, the rest val (nanoGPT's split)
    return ids[:n], ids[n:], meta, ()


def prepare(dataset, /, **kwargs):  # positional-only: the text dataset has a --name option
    """Prepare `dataset` into <data_dir>/<dataset>/ unless it is there with the same settings; returns that dir."""
    opts = options(dataset)
    opts.update({key: checked(opts, key, value, f'options of {dataset}') for key, value in kwargs.items()})
    check(opts, RULES.get(dataset, {}))  # before any work: one line naming the bad value
    data_dir, force = opts.pop('data_dir'), opts.pop('force')
    files = text_inputs(opts) if dataset == 'text' else [SHAKESPEARE] if dataset == 'shakespeare_char' else []
    stats = repr([(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]).encode()  # edit an input: redone
    settings = {'dataset': dataset, 'version': VERSION[dataset], **opts, 'inputs': hashlib.sha1(stats).hexdigest()}
    out_dir = os.path.join(data_dir, opts['name'] if dataset == 'text' else dataset)
    if not force and is_prepared(out_dir, settings, OUTPUTS[dataset]):
        print(f'{out_dir}: already prepared with these settings (--force to redo)')
        return out_dir
    t0 = time.time()
    train, val, meta, targets = build(dataset, files, opts)
    write_splits(out_dir, train, val, {**meta, 'settings': settings}, targets)
    print(f'{out_dir}: train {len(train):,} tokens, val {len(val):,} tokens ({time.time() - t0:.2f} s)')
    return out_dir


if __name__ == '__main__':
    try:
        if len(sys.argv) < 2 or sys.argv[1].startswith('-'):
            raise ValueError(f'usage: python prepare.py <dataset> [--key=value ...]; datasets: {", ".join(DEFAULTS)}')
        prepare(sys.argv[1], **configure(options(sys.argv[1]), sys.argv[2:]))  # a bare --force is True
    except (ValueError, OSError) as e:  # our own checks and unreadable/unwritable paths: one line, no traceback
        sys.exit(f'error: {e}')  # to stderr, exit status 1
