"""
Datasets: data/<name>/{train,val}.bin (np.uint16 token ids, nanoGPT's format) + meta.json, and the functions every
script reads them with (dataset_dir, read_meta, get_batch, decode).

  python prepare.py shakespeare_char                      # the embedded default, char-level (< 1 s)
  python prepare.py text --input=notes.txt [--name=notes]  # any UTF-8 file or folder, GPT-2 BPE (tiktoken)
  python prepare.py prefix_sums                           # the depth showcase's task, a target at every position

Every dataset also takes --data_dir=DIR (where data/<name>/ goes) and --force (redo). Finished work is
skipped: meta.json stores the settings it was made with, and a dataset is redone only when they differ.
meta.json is plain JSON: reading a dataset never runs code (nanoGPT's meta.pkl could).
"""
import os
import re
import sys
import time
import json
import hashlib
import functools
import numpy as np
import torch

from configurator import checked, configure

REPO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
SHAKESPEARE = os.path.join(REPO_DATA, 'shakespeare_char', 'input.txt')  # shipped in the repo, never ../shared
BPE_PATH = os.path.join(REPO_DATA, 'gpt2_bpe.tiktoken')  # GPT-2 merge ranks, shipped so `text` works offline
BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'  # the hash tiktoken checks (r50k_base)
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256  # <|endoftext|>, put between the files of a `text` folder
OUTPUTS = {'shakespeare_char': ('train.bin', 'val.bin', 'meta.json'),  # all present + same settings = done
           'text': ('train.bin', 'val.bin', 'meta.json'),
           'prefix_sums': ('train.bin', 'val.bin', 'train_targets.bin', 'val_targets.bin', 'meta.json')}
TRAIN_FRAC = 0.9  # first 90% of the tokens -> train.bin, the rest -> val.bin (nanoGPT's split)
FORMAT_VERSION = 1  # bump when an output changes: stored settings then differ and the data is redone

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
# shared by all datasets: atomic writes, settings check, split


def save_atomic(path, write):
    """write(f) into a temporary file, then rename: an interrupted run never leaves a half file under the real name.
    The temporary name carries the process id, so two runs preparing the same dataset at once do not collide.
    Replacing any other output first removes meta.json, which is written last: a run killed halfway leaves a folder
    that is_prepared() redoes, never old meta beside new data."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        write(f)
    meta = os.path.join(os.path.dirname(path), 'meta.json')
    if path != meta:
        try:
            os.remove(meta)
        except FileNotFoundError:  # not there yet, or a concurrent run removed it first
            pass
    os.replace(tmp, path)


def is_prepared(out_dir, settings, files=('train.bin', 'val.bin', 'meta.json')):
    """True if every output exists and meta.json was written with exactly these settings."""
    if not all(os.path.exists(os.path.join(out_dir, f)) for f in files):
        return False
    try:
        return read_meta(out_dir).get('settings') == settings
    except ValueError:  # unreadable meta: redo
        return False


def as_uint16(ids, vocab_size):
    if vocab_size > 2**16:  # train.py reads the .bin files as uint16, like nanoGPT
        raise ValueError(f'vocab_size {vocab_size} does not fit in uint16 token ids (max 65536)')
    return np.asarray(ids, dtype=np.uint16)


def write_splits(out_dir, train_ids, val_ids, meta):
    """train.bin, val.bin, and meta.json last; returns the two lengths."""
    os.makedirs(out_dir, exist_ok=True)
    for split, ids in (('train', train_ids), ('val', val_ids)):
        save_atomic(os.path.join(out_dir, f'{split}.bin'), as_uint16(ids, meta['vocab_size']).tofile)
    meta_json = json.dumps(meta, indent=1).encode()
    save_atomic(os.path.join(out_dir, 'meta.json'), lambda f: f.write(meta_json))  # last: marks the dataset complete
    return len(train_ids), len(val_ids)


def write_dataset(out_dir, ids, meta):
    """One token stream: the first 90% is train, the rest val (nanoGPT's split)."""
    n = int(len(ids) * TRAIN_FRAC)
    return write_splits(out_dir, ids[:n], ids[n:], meta)


def read_utf8(path):
    """The file's text, or one clear error naming the file and the first bad byte."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8')  # bytes -> str ourselves: no newline translation, exact offsets
    except UnicodeDecodeError as e:
        raise ValueError(f'{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); '
                         f'convert it first, e.g. iconv -t utf-8') from None


def file_fingerprint(paths):
    """Cheap identity of the input files (path, size, mtime): edit an input and the data is redone."""
    stats = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    return hashlib.sha1(repr(stats).encode()).hexdigest()

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


def prepare_shakespeare_char(out_dir, settings):
    text = read_utf8(SHAKESPEARE)
    meta = {**char_meta(text), 'settings': settings}
    return write_dataset(out_dir, encode(text, meta), meta)

# -----------------------------------------------------------------------------
# text: any UTF-8 file or folder, GPT-2 BPE through tiktoken


@functools.lru_cache(maxsize=None)
def gpt2_encoding(path=BPE_PATH):
    """GPT-2's tokenizer, built offline from the shipped ranks; tiktoken's download only if the file is gone."""
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        raise ValueError('the GPT-2 tokenizer needs tiktoken: pip install tiktoken') from None
    if not os.path.exists(path):
        return gpt2_download(tiktoken, path)
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=BPE_SHA256)
    except ValueError:
        raise ValueError(f'{path} is corrupted (sha256 is not {BPE_SHA256}); restore it: git checkout {path}') from None
    return tiktoken.Encoding(name='gpt2', pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': EOT})


def gpt2_download(tiktoken, path):
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # offline: requests raises its own errors, tiktoken wraps none of them
        raise ValueError(f'GPT-2 BPE ranks are needed but {path} is missing and tiktoken could not fetch them '
                         f'({type(e).__name__}); fix: git checkout {path}, run once online, or set '
                         f'TIKTOKEN_CACHE_DIR to a folder holding tiktoken\'s cached gpt2 files') from None


def list_inputs(path):
    """[path] for a file; all files under a folder, sorted, hidden ones (.git, .DS_Store) skipped."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f'--input={path!r} does not exist (need a UTF-8 text file or a folder of them)')
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith('.')]  # prune hidden folders in place
        files += [os.path.join(root, f) for f in names if not f.startswith('.')]
    files.sort()
    if not files:
        raise ValueError(f'--input={path!r} is a folder with no (non-hidden) files')
    return files


# a newline between two non-space characters: GPT-2's pre-tokenizer (GPT2_PAT) never joins across it
SAFE_CUT = re.compile(r'(?<=\S)\n(?=\S)')


def split_chunks(text, chunk_chars=1 << 20):
    """Cut text into pieces of about chunk_chars at SAFE_CUT newlines, so that the tokens of the
    pieces equal the tokens of the whole (tested) while a progress bar can move."""
    cuts = [0]
    while len(text) - cuts[-1] > chunk_chars:
        m = SAFE_CUT.search(text, cuts[-1] + chunk_chars)
        if m is None:
            break
        cuts.append(m.end())
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def tokenize_files(files, enc, chunk_chars=1 << 20):
    """GPT-2 token ids of all files, <|endoftext|> between files; a tqdm bar over the input bytes."""
    from tqdm import tqdm
    pieces = []
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit='B', unit_scale=True, desc='tokenizing', disable=None)
    for i, path in enumerate(files):
        if i > 0:
            pieces.append(np.array([EOT], dtype=np.uint16))
        for chunk in split_chunks(read_utf8(path), chunk_chars):
            # encode_ordinary: a literal "<|endoftext|>" in the text is plain text, not the special token
            pieces.append(np.array(enc.encode_ordinary(chunk), dtype=np.uint16))  # 50257 < 2**16
            bar.update(len(chunk.encode('utf-8')))
    bar.close()
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def text_out_name(input_path, name):
    """--name, else the input's stem; refuses names that would overwrite the built-in datasets."""
    name = name or os.path.splitext(os.path.basename(os.path.normpath(input_path)))[0]
    if not re.fullmatch(r'\w[\w.-]*', name) or name in DEFAULTS:  # no '/', no hidden '.x'
        raise ValueError(f'--name={name!r} cannot be a dataset folder name (use letters, digits, _ . - '
                         f'and no leading dot; not one of {sorted(DEFAULTS)})')
    return name


def prepare_text(out_dir, settings, files):
    enc = gpt2_encoding()
    ids = tokenize_files(files, enc)
    if len(ids) < 2:
        raise ValueError(f'--input={settings["input"]!r} has {len(ids)} tokens; train and val need at least 1 each')
    meta = {'vocab_size': enc.n_vocab, 'tokenizer': 'gpt2', 'settings': settings}  # 50257
    return write_dataset(out_dir, ids, meta)

# -----------------------------------------------------------------------------
# prefix_sums: the depth showcase's task (Schwarzschild et al. 2021, arXiv 2106.04537). Input digits x_1..x_L in
# 0..modulus-1; the target at every position t is (x_1 + ... + x_t) mod modulus. Every position is supervised
# (dense targets: no induction-head plateau), and position t needs t sequential additions, so the position is
# the difficulty. Files: {train,val}.bin hold the inputs, {train,val}_targets.bin the targets, `length` tokens per
# example; val is the test set, disjoint from train.


def prefix_sums(x, modulus):
    """Targets of the task: the running sum of each row of digits x (N, L), mod modulus."""
    return np.cumsum(x, axis=1) % modulus


def random_digits(n, length, modulus, rng):
    return rng.integers(0, modulus, size=(n, length), dtype=np.uint16)


def drop_seen(x, seen):
    """The rows of x whose bytes are not in `seen` (a set of row bytes): the test set shares no example with train."""
    keep = np.array([row.tobytes() not in seen for row in x], dtype=bool)
    return x[keep]


def prepare_prefix_sums(out_dir, settings, modulus, length, n_train, n_val, seed):
    if modulus < 2 or length < 1 or n_train < 1 or n_val < 1:
        raise ValueError(f'prefix_sums needs --modulus >= 2 and --length, --n_train, --n_val >= 1; got {modulus}, '
                         f'{length}, {n_train}, {n_val}')
    rng = np.random.default_rng(seed)
    train = random_digits(n_train, length, modulus, rng)
    val = drop_seen(random_digits(n_val, length, modulus, rng), {row.tobytes() for row in train})
    meta = {'vocab_size': modulus, 'chars': [str(d) for d in range(modulus)], 'example_len': length,
            'settings': settings}
    os.makedirs(out_dir, exist_ok=True)
    for split, x in (('train', train), ('val', val)):
        save_atomic(os.path.join(out_dir, f'{split}_targets.bin'), prefix_sums(x, modulus).astype(np.uint16).tofile)
    return write_splits(out_dir, train.ravel(), val.ravel(), meta)

# -----------------------------------------------------------------------------
# entry points


def check_options(name, kwargs):
    """Known dataset, known options, values of the default's type; returns all options with defaults filled in."""
    if name not in DEFAULTS:
        raise ValueError(f'unknown dataset {name!r}; allowed: {", ".join(DEFAULTS)}')
    allowed = {**COMMON, **DEFAULTS[name]}
    return {**allowed, **{key: checked(allowed, key, value, f'options of {name}') for key, value in kwargs.items()}}


def input_files(name, opts):
    """The files a dataset reads (their fingerprint goes into the settings); fills in text's input and name."""
    if name == 'shakespeare_char':
        return [SHAKESPEARE]
    if name != 'text':
        return []
    if not opts['input']:
        raise ValueError('text needs --input=PATH (a UTF-8 file or a folder of them)')
    opts['name'] = text_out_name(opts['input'], opts['name'])
    opts['input'] = os.path.abspath(opts['input'])
    return list_inputs(opts['input'])


def prepare(dataset, /, **kwargs):
    """Prepare `dataset` into <data_dir>/<dataset>/ unless it is there with the same settings; returns that dir.
    (`dataset` is positional-only because the text dataset has its own --name option.)"""
    opts = check_options(dataset, kwargs)
    data_dir, force = opts.pop('data_dir'), opts.pop('force')
    files = input_files(dataset, opts)
    settings = {'dataset': dataset, 'version': FORMAT_VERSION, **opts, 'inputs': file_fingerprint(files)}
    out_dir = os.path.join(data_dir, opts['name'] if dataset == 'text' else dataset)
    if not force and is_prepared(out_dir, settings, OUTPUTS[dataset]):
        print(f'{out_dir}: already prepared with these settings (--force to redo)')
        return out_dir
    t0 = time.time()
    if dataset == 'shakespeare_char':
        n_train, n_val = prepare_shakespeare_char(out_dir, settings)
    elif dataset == 'text':
        n_train, n_val = prepare_text(out_dir, settings, files)
    else:
        n_train, n_val = prepare_prefix_sums(out_dir, settings, **opts)
    print(f'{out_dir}: train {n_train:,} tokens, val {n_val:,} tokens ({time.time() - t0:.2f} s)')
    return out_dir


def parse_args(argv):
    """['prefix_sums', '--length=16'] -> ('prefix_sums', options): the dataset's options through the shared
    configurator (a bare --force is --force=True)."""
    if not argv or argv[0].startswith('-'):
        raise ValueError(f'usage: python prepare.py <dataset> [--key=value ...]; datasets: {", ".join(DEFAULTS)}')
    check_options(argv[0], {})
    return argv[0], configure({**COMMON, **DEFAULTS[argv[0]]}, argv[1:])


if __name__ == '__main__':
    try:
        name, kwargs = parse_args(sys.argv[1:])
        prepare(name, **kwargs)
    except (ValueError, OSError) as e:  # our own checks and unreadable/unwritable paths: one line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
