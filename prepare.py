"""
Datasets: data/<name>/{train,val}.bin (np.uint16 token ids, nanoGPT's format) + meta.json, and the functions every
script reads them with (dataset_dir, read_meta, get_batch, encode, decode).

  python prepare.py shakespeare_char                      # the embedded default, char-level (< 1 s)
  python prepare.py text --input=notes.txt [--name=notes]  # any UTF-8 file or folder, GPT-2 BPE (tiktoken)
  python prepare.py prefix_sums                           # the depth showcase's task, a target at every position

Every dataset also takes --data_dir=DIR (where data/<name>/ goes) and --force (redo). Finished work is skipped: the
plain-JSON meta.json (reading it never runs code, unlike nanoGPT's meta.pkl) stores the settings it was made with.
"""
import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import torch

from configurator import checked, configure

REPO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
SHAKESPEARE = os.path.join(REPO_DATA, 'shakespeare_char', 'input.txt')  # shipped in the repo
BPE_PATH = os.path.join(REPO_DATA, 'gpt2_bpe.tiktoken')  # GPT-2 merge ranks, shipped so `text` works offline
BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'  # the hash tiktoken checks (r50k_base)
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256  # <|endoftext|>, put between the files of a `text` folder
OUTPUTS = {'shakespeare_char': ('train.bin', 'val.bin', 'meta.json'),  # all present + same settings = done
           'text': ('train.bin', 'val.bin', 'meta.json'),
           'prefix_sums': ('train.bin', 'val.bin', 'train_targets.bin', 'val_targets.bin', 'meta.json')}
TRAIN_FRAC = 0.9  # first 90% of the tokens -> train.bin, the rest -> val.bin (nanoGPT's split)
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


# -----------------------------------------------------------------------------
# writing: atomic files, meta.json last
def save_atomic(path, write):
    """write(f) into a temp file named per process (two runs at once do not collide), then rename. Any other output
    first removes meta.json, written last: a killed run leaves a folder is_prepared() redoes, never stale meta."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        write(f)
    meta = os.path.join(os.path.dirname(path), 'meta.json')
    if path != meta:
        with contextlib.suppress(FileNotFoundError):  # not there yet, or a concurrent run removed it first
            os.remove(meta)
    os.replace(tmp, path)


def is_prepared(out_dir, settings, files):
    """True if every output exists and meta.json was written with exactly these settings."""
    try:
        return (all(os.path.exists(os.path.join(out_dir, f)) for f in files)
                and read_meta(out_dir).get('settings') == settings)
    except ValueError:  # unreadable meta: redo
        return False


def write_splits(out_dir, train_ids, val_ids, meta):
    """train.bin, val.bin, and meta.json last; returns the two lengths."""
    if meta['vocab_size'] > 2**16:  # train.py reads the .bin files as uint16, like nanoGPT
        raise ValueError(f"vocab_size {meta['vocab_size']} does not fit in uint16 token ids (max 65536)")
    os.makedirs(out_dir, exist_ok=True)
    for split, ids in (('train', train_ids), ('val', val_ids)):
        save_atomic(os.path.join(out_dir, f'{split}.bin'), np.asarray(ids, dtype=np.uint16).tofile)
    meta_json = json.dumps(meta, indent=1).encode()
    save_atomic(os.path.join(out_dir, 'meta.json'), lambda f: f.write(meta_json))  # last: marks the dataset complete
    return len(train_ids), len(val_ids)


def read_utf8(path):
    """The file's text, or one clear error naming the file and the first bad byte."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8')  # bytes -> str ourselves: no newline translation, exact offsets
    except UnicodeDecodeError as e:
        raise ValueError(f'{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); '
                         f'convert it first, e.g. iconv -t utf-8') from None


# -----------------------------------------------------------------------------
# reading a prepared dataset: every script goes through these
def dataset_dir(dataset, data_dir=''):
    """The folder of a prepared dataset: <data_dir>/<dataset>, data_dir defaulting to data/ beside this file."""
    return os.path.join(data_dir or REPO_DATA, dataset)


def read_meta(path):
    """meta.json of the dataset folder `path` ({} if there is none): vocab_size; chars (char-level), or
    tokenizer='gpt2'; example_len for task datasets. An old nanoGPT meta.pkl is refused, never unpickled."""
    meta_path = os.path.join(path, 'meta.json')
    if not os.path.exists(meta_path):
        if os.path.exists(os.path.join(path, 'meta.pkl')):
            raise ValueError(f'{path}/meta.pkl is a pickle, which could run code when read; nanoloop reads only '
                             f'meta.json: re-run prepare.py for this dataset')
        return {}
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
        assert isinstance(meta, dict) and isinstance(meta.get('vocab_size'), int)
    except (ValueError, AssertionError, OSError):
        raise ValueError(f'{meta_path} is not a meta.json written by prepare.py: re-run prepare.py') from None
    return meta


def get_batch(path, split, batch_size, block_size, generator, device='cpu'):
    """batch_size random training pairs (x, y) of length block_size from data folder `path`. A token stream gives
    windows with y = x shifted by one (nanoGPT); a task dataset (meta example_len) gives whole examples and their
    targets. The draws come from `generator`, so a checkpointed generator state replays the same batches."""
    if not os.path.exists(os.path.join(path, f'{split}.bin')):
        raise ValueError(f"no {path}/{split}.bin: prepare the dataset first (python prepare.py ...) or pass --data_dir")
    data = np.memmap(os.path.join(path, f'{split}.bin'), dtype=np.uint16, mode='r')  # reopened: no memmap leak
    length = read_meta(path).get('example_len')
    if length:  # one row per example, its targets in <split>_targets.bin
        targets = np.memmap(os.path.join(path, f'{split}_targets.bin'), dtype=np.uint16, mode='r')
        rows = torch.randint(len(data) // length, (batch_size,), generator=generator).numpy()
        index = rows[:, None] * length + np.arange(min(block_size, length))
        x, y = (torch.from_numpy(a[index].astype(np.int64)) for a in (data, targets))
    else:
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
    try:
        return [stoi[c] for c in s]
    except KeyError as e:
        raise ValueError(f'character {e.args[0]!r} is not in this vocabulary of {len(stoi)} chars') from None


def decode(ids, meta):
    """List (or array) of token ids -> string, in the dataset's vocabulary."""
    if meta.get('tokenizer') == 'gpt2':
        return gpt2_encoding().decode([int(i) for i in ids])
    return ''.join(meta['chars'][int(i)] for i in ids)


# -----------------------------------------------------------------------------
# text: any UTF-8 file or folder, GPT-2 BPE through tiktoken
@functools.lru_cache(maxsize=None)
def gpt2_encoding(path=BPE_PATH):
    """GPT-2's tokenizer, built offline from the shipped ranks; tiktoken's download only if the file is gone."""
    try:
        import tiktoken.load  # binds tiktoken too
    except ImportError:
        raise ValueError('the GPT-2 tokenizer needs tiktoken: pip install tiktoken') from None
    if not os.path.exists(path):
        try:
            return tiktoken.get_encoding('gpt2')
        except Exception as e:  # offline: requests raises its own errors, tiktoken wraps none of them
            raise ValueError(f'GPT-2 BPE ranks are needed but {path} is missing and tiktoken could not fetch them '
                             f'({type(e).__name__}); fix: git checkout {path}, run once online, or set '
                             f'TIKTOKEN_CACHE_DIR to a folder holding tiktoken\'s cached gpt2 files') from None
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=BPE_SHA256)
    except ValueError:
        raise ValueError(f'{path} is corrupted (sha256 is not {BPE_SHA256}); restore it: git checkout {path}') from None
    return tiktoken.Encoding(name='gpt2', pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': EOT})


# a newline between two non-space characters: GPT-2's pre-tokenizer (GPT2_PAT) never joins across it
SAFE_CUT = re.compile(r'(?<=\S)\n(?=\S)')


def split_chunks(text, chunk_chars=1 << 20):
    """Cut text into pieces of about chunk_chars at SAFE_CUT newlines, so that the tokens of the pieces equal the
    tokens of the whole (tested) while a progress bar can move."""
    cuts = [0]
    while len(text) - cuts[-1] > chunk_chars and (m := SAFE_CUT.search(text, cuts[-1] + chunk_chars)):
        cuts.append(m.end())
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def tokenize_files(files, enc):
    """GPT-2 token ids of all files, <|endoftext|> between files; a tqdm bar over the input bytes."""
    from tqdm import tqdm
    pieces = []
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit='B', unit_scale=True, desc='tokenizing', disable=None)
    for i, path in enumerate(files):
        if i > 0:
            pieces.append(np.array([EOT], dtype=np.uint16))
        for chunk in split_chunks(read_utf8(path)):
            # encode_ordinary: a literal "<|endoftext|>" in the text is plain text, not the special token
            pieces.append(np.array(enc.encode_ordinary(chunk), dtype=np.uint16))  # 50257 < 2**16
            bar.update(len(chunk.encode('utf-8')))
    bar.close()
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


# -----------------------------------------------------------------------------
# prefix_sums, the depth showcase's task (Schwarzschild et al. 2021, arXiv 2106.04537): digits x_1..x_L in 0..modulus-1
# and at every position t the target (x_1 + ... + x_t) mod modulus. Every position is supervised (dense targets: no
# induction-head plateau) and needs t sequential additions: the position is the difficulty. A BOS token (id = modulus,
# target 0, the empty sum) gives every digit a predecessor, so the step from t - 1 to t is the same everywhere (what
# lets the loop extrapolate). {train,val}.bin: inputs, {train,val}_targets.bin: targets, length + 1 tokens an example.
def prefix_sums(x, modulus):
    """Targets of the task: the running sum of each row of digits x (N, L), mod modulus."""
    return np.cumsum(x, axis=1) % modulus


def prepare_prefix_sums(out_dir, settings, modulus, length, n_train, n_val, seed):
    if modulus < 2 or length < 1 or n_train < 1 or n_val < 1:
        raise ValueError(f'prefix_sums needs --modulus >= 2 and --length, --n_train, --n_val >= 1; got {modulus}, '
                         f'{length}, {n_train}, {n_val}')
    rng = np.random.default_rng(seed)
    train, val = (rng.integers(0, modulus, size=(n, length), dtype=np.uint16) for n in (n_train, n_val))
    seen = {row.tobytes() for row in train}
    val = val[np.array([row.tobytes() not in seen for row in val], dtype=bool)]  # no test example is in train
    meta = {'vocab_size': modulus + 1, 'chars': [str(d) for d in range(modulus)] + ['^'], 'example_len': length + 1,
            'bos': True, 'settings': settings}
    with_bos = lambda x, first: np.concatenate([np.full((len(x), 1), first, dtype=np.uint16), x.astype(np.uint16)], 1)
    os.makedirs(out_dir, exist_ok=True)
    for split, x in (('train', train), ('val', val)):  # the BOS's target is the empty sum, 0
        save_atomic(os.path.join(out_dir, f'{split}_targets.bin'), with_bos(prefix_sums(x, modulus), 0).tofile)
    return write_splits(out_dir, with_bos(train, modulus).ravel(), with_bos(val, modulus).ravel(), meta)


# -----------------------------------------------------------------------------
# entry points
def check_options(name, kwargs):
    """Known dataset, known options, values of the default's type; returns all options with defaults filled in."""
    if name not in DEFAULTS:
        raise ValueError(f'unknown dataset {name!r}; allowed: {", ".join(DEFAULTS)}')
    allowed = {**COMMON, **DEFAULTS[name]}
    return {**allowed, **{key: checked(allowed, key, value, f'options of {name}') for key, value in kwargs.items()}}


def text_inputs(opts):
    """The text dataset's files: the input file, or all files under the input folder, sorted, hidden ones (.git,
    .DS_Store) skipped. Fills in opts' absolute input and output name (--name, else the input's stem)."""
    if not opts['input']:
        raise ValueError('text needs --input=PATH (a UTF-8 file or a folder of them)')
    path = os.path.abspath(opts['input'])
    name = opts['name'] or os.path.splitext(os.path.basename(path))[0]
    if not re.fullmatch(r'\w[\w.-]*', name) or name in DEFAULTS:  # no '/', no hidden '.x', no built-in's folder
        raise ValueError(f'--name={name!r} cannot be a dataset folder name (use letters, digits, _ . - '
                         f'and no leading dot; not one of {sorted(DEFAULTS)})')
    if not os.path.exists(path):
        raise ValueError(f'--input={path!r} does not exist (need a UTF-8 text file or a folder of them)')
    opts['name'], opts['input'], files = name, path, [path]
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith('.')]  # prune hidden folders in place
            files += [os.path.join(root, f) for f in names if not f.startswith('.')]
    if not files:
        raise ValueError(f'--input={path!r} is a folder with no (non-hidden) files')
    return sorted(files)


def build(dataset, out_dir, settings, files, opts):
    """Write the dataset's outputs into out_dir -> (train tokens, val tokens)."""
    if dataset == 'prefix_sums':
        return prepare_prefix_sums(out_dir, settings, **opts)
    if dataset == 'shakespeare_char':
        text = read_utf8(SHAKESPEARE)
        meta = {**char_meta(text), 'settings': settings}
        ids = encode(text, meta)
    else:
        enc = gpt2_encoding()
        ids, meta = tokenize_files(files, enc), {'vocab_size': enc.n_vocab, 'tokenizer': 'gpt2', 'settings': settings}
        if len(ids) < 2:
            raise ValueError(f'--input={settings["input"]!r} has {len(ids)} tokens; train and val need one each')
    n = int(len(ids) * TRAIN_FRAC)  # one token stream: the first 90% is train, the rest val (nanoGPT's split)
    return write_splits(out_dir, ids[:n], ids[n:], meta)


def prepare(dataset, /, **kwargs):
    """Prepare `dataset` into <data_dir>/<dataset>/ unless it is there with the same settings; returns that dir.
    (`dataset` is positional-only because the text dataset has its own --name option.)"""
    opts = check_options(dataset, kwargs)
    data_dir, force = opts.pop('data_dir'), opts.pop('force')
    files = text_inputs(opts) if dataset == 'text' else [SHAKESPEARE] if dataset == 'shakespeare_char' else []
    # the inputs' identity (path, size, mtime) is part of the settings: edit an input and the data is redone
    stats = repr([(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]).encode()
    settings = {'dataset': dataset, 'version': VERSION[dataset], **opts, 'inputs': hashlib.sha1(stats).hexdigest()}
    out_dir = os.path.join(data_dir, opts['name'] if dataset == 'text' else dataset)
    if not force and is_prepared(out_dir, settings, OUTPUTS[dataset]):
        print(f'{out_dir}: already prepared with these settings (--force to redo)')
        return out_dir
    t0 = time.time()
    n_train, n_val = build(dataset, out_dir, settings, files, opts)
    print(f'{out_dir}: train {n_train:,} tokens, val {n_val:,} tokens ({time.time() - t0:.2f} s)')
    return out_dir


if __name__ == '__main__':
    try:
        if len(sys.argv) < 2 or sys.argv[1].startswith('-'):
            raise ValueError(f'usage: python prepare.py <dataset> [--key=value ...]; datasets: {", ".join(DEFAULTS)}')
        prepare(sys.argv[1], **configure(check_options(sys.argv[1], {}), sys.argv[2:]))  # a bare --force is True
    except (ValueError, OSError) as e:  # our own checks and unreadable/unwritable paths: one line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
