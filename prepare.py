"""
Prepare a dataset as token ids: data/<name>/{train,val}.bin (np.uint16) + meta.pkl (nanoGPT's format).

  python prepare.py shakespeare_char                      # the embedded default, char-level (< 1 s)
  python prepare.py text --input=notes.txt [--name=notes]  # any UTF-8 file or folder, GPT-2 BPE (tiktoken)
  python prepare.py reasoning --max_hops=4                 # synthetic multi-hop variable resolution, + test.pkl

Every dataset also takes --data_dir=DIR (where data/<name>/ goes) and --force (redo). Finished work is
skipped: meta.pkl stores the settings it was made with, and a dataset is redone only when they differ.
Importable: prepare(dataset, **kwargs) -> data dir; gpt2_encoding(), encode/decode (char-level), solve (reasoning).
reasoning also writes test.pkl = {hops: [(prompt, answer_digit), ...]} for hops 1..2*max_hops; each prompt is
'\n' + problem + '?v=' (the newline is the context a line has in the train stream); query_hops(prompt) == hops.
"""
import os
import re
import sys
import time
import pickle
import random
import string
import hashlib
import functools
import numpy as np

REPO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
SHAKESPEARE = os.path.join(REPO_DATA, 'shakespeare_char', 'input.txt')  # shipped in the repo, never ../shared
BPE_PATH = os.path.join(REPO_DATA, 'gpt2_bpe.tiktoken')  # GPT-2 merge ranks, shipped so `text` works offline
BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'  # the hash tiktoken checks (r50k_base)
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256  # <|endoftext|>, put between the files of a `text` folder
OUTPUTS = {'shakespeare_char': ('train.bin', 'val.bin', 'meta.pkl'),  # all present + same settings = done
           'text': ('train.bin', 'val.bin', 'meta.pkl'),
           'reasoning': ('train.bin', 'val.bin', 'test.pkl', 'meta.pkl')}
TRAIN_FRAC = 0.9  # first 90% of the tokens -> train.bin, the rest -> val.bin (nanoGPT's split)
FORMAT_VERSION = 1  # bump when an output changes: stored settings then differ and the data is redone

# options of each dataset with their defaults; a CLI --key=value is converted to the default's type
COMMON = dict(data_dir=REPO_DATA,  # folder that holds <name>/
              force=False)         # True: redo even if outputs with the same settings exist
DEFAULTS = {
    'shakespeare_char': dict(),
    'text': dict(input='',   # a UTF-8 file, or a folder: all its files (sorted, hidden ones skipped)
                 name=''),   # output folder name; '' = the input's stem
    'reasoning': dict(max_hops=4,       # train on 1..max_hops hops, test on 1..2*max_hops
                      n_chains=3,       # chains per problem: the asked one + (n_chains - 1) distractors
                      n_train=100_000,  # train lines (problems)
                      n_val=5_000,      # val lines, same distribution, another seed
                      n_test=500,       # test prompts per hop count
                      seed=1337),       # train uses seed, val seed+1, test seed+2
}

# -----------------------------------------------------------------------------
# shared by all datasets: atomic writes, settings check, split


def save_atomic(path, write):
    """write(f) into path.tmp, then rename: an interrupted run never leaves a half file under the real name."""
    with open(path + '.tmp', 'wb') as f:
        write(f)
    os.replace(path + '.tmp', path)


def save_pickle(path, obj):
    save_atomic(path, lambda f: pickle.dump(obj, f))


def load_meta(out_dir):
    with open(os.path.join(out_dir, 'meta.pkl'), 'rb') as f:
        return pickle.load(f)


def is_prepared(out_dir, settings, files=('train.bin', 'val.bin', 'meta.pkl')):
    """True if every output exists and meta.pkl was written with exactly these settings."""
    if not all(os.path.exists(os.path.join(out_dir, f)) for f in files):
        return False
    try:
        return load_meta(out_dir).get('settings') == settings
    except (pickle.UnpicklingError, EOFError, AttributeError):  # unreadable meta: redo
        return False


def as_uint16(ids, vocab_size):
    if vocab_size > 2**16:  # train.py reads the .bin files as uint16, like nanoGPT
        raise ValueError(f'vocab_size {vocab_size} does not fit in uint16 token ids (max 65536)')
    return np.asarray(ids, dtype=np.uint16)


def write_splits(out_dir, train_ids, val_ids, meta, extra=None):
    """train.bin, val.bin, extra {filename: object} pickles, and meta.pkl last; returns the two lengths."""
    os.makedirs(out_dir, exist_ok=True)
    for split, ids in (('train', train_ids), ('val', val_ids)):
        save_atomic(os.path.join(out_dir, f'{split}.bin'), as_uint16(ids, meta['vocab_size']).tofile)
    for filename, obj in (extra or {}).items():
        save_pickle(os.path.join(out_dir, filename), obj)
    save_pickle(os.path.join(out_dir, 'meta.pkl'), meta)  # last: its settings mark the dataset complete
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
# char-level vocabulary (shakespeare_char, reasoning)


def char_meta(chars):
    """nanoGPT's char-level meta: ids follow the sorted characters."""
    chars = sorted(set(chars))
    return {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}


def encode(s, meta):
    """String -> list of char ids; a character outside the vocabulary is an error, never dropped."""
    stoi = meta['stoi']
    try:
        return [stoi[c] for c in s]
    except KeyError as e:
        raise ValueError(f'character {e.args[0]!r} is not in this vocabulary of {len(stoi)} chars') from None


def decode(ids, meta):
    """List (or array) of char ids -> string."""
    itos = meta['itos']
    return ''.join(itos[int(i)] for i in ids)


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
# reasoning: multi-hop variable resolution (issue 6), e.g. "k=a;x=3;a=7;q=k;?q=7;?a=7;?x=3;?k=7;"
# One line = one problem: shuffled assignments, then a query "?v=d;" for EVERY variable, so each line
# supervises many answer positions (METHOD.md §3 trap: with only the last position supervised, small looped
# models learn slowly). With at most 26 variables a line is < 128 chars at any setting that validates.

DIGITS = string.digits
LETTERS = string.ascii_lowercase  # variables are single letters
REASONING_CHARS = '\n;=?' + DIGITS + LETTERS  # fixed alphabet: the same 40-char vocab for every setting


def make_chains(hops, n_chains, rng):
    """The asked chain of exactly `hops` links + n_chains-1 distractor chains of 1..hops links.
    A chain [d, v1, .., vh] means v1=d; v2=v1; ...: resolving v_i takes i hops. The roots are distinct
    digits, so answering with any digit seen in the problem is right only 1/n_chains of the time."""
    lengths = [hops] + [rng.randint(1, hops) for _ in range(n_chains - 1)]
    names = iter(rng.sample(LETTERS, sum(lengths)))
    roots = rng.sample(DIGITS, n_chains)
    return [[root] + [next(names) for _ in range(n)] for root, n in zip(roots, lengths)]


def problem_text(chains, rng):
    """'v=src;' per link, shuffled: the chain must be followed, it cannot be read left to right."""
    links = [f'{c[i]}={c[i - 1]};' for c in chains for i in range(1, len(c))]
    rng.shuffle(links)
    return ''.join(links)


def chain_queries(chains, rng):
    """(variable, answer digit, hops) for every variable, in random order."""
    queries = [(c[i], c[0], i) for c in chains for i in range(1, len(c))]
    rng.shuffle(queries)
    return queries


def parse_assignments(problem):
    """{variable: source} from the text's 'v=src' segments; queries ('?v=...') are skipped."""
    assign = {}
    for seg in problem.strip().split(';'):
        if seg and not seg.startswith('?'):
            lhs, eq, rhs = seg.partition('=')
            if not (eq and lhs and rhs):
                raise ValueError(f'bad assignment {seg!r}: expected v=src')
            assign[lhs] = rhs
    return assign


def follow(assign, var):
    """Resolve var by following assignments to a digit: returns (digit, number of hops)."""
    hops = 0
    while not var.isdigit():
        if var not in assign or hops > len(assign):  # more hops than assignments = a cycle
            raise ValueError(f'variable {var!r} cannot be resolved to a digit')
        var, hops = assign[var], hops + 1
    return var, hops


def last_query(problem):
    """(digit, hops) for the last query of a problem text, e.g. a test prompt ending in '?q='."""
    if '?' not in problem:
        raise ValueError(f'no query "?v=" in {problem!r}')
    var = problem.rsplit('?', 1)[1].split('=')[0]
    return follow(parse_assignments(problem), var)


def solve(problem):
    """The answer digit of the last query, found from the text alone (independent of the generator)."""
    return last_query(problem)[0]


def query_hops(problem):
    """How many assignments the last query's answer is away from its digit."""
    return last_query(problem)[1]


def check_answers(problem, queries):
    """The generator's answers must agree with the solver on every query (answer and hop count)."""
    assign = parse_assignments(problem)
    for var, digit, hops in queries:
        if follow(assign, var) != (digit, hops):
            raise RuntimeError(f'generator bug: {problem}?{var}= gave {digit} in {hops} hops, '
                               f'the solver {follow(assign, var)}')


def reasoning_line(hops, n_chains, rng):
    """(problem, full line): the problem followed by the answered query of every variable."""
    chains = make_chains(hops, n_chains, rng)
    problem = problem_text(chains, rng)
    queries = chain_queries(chains, rng)
    check_answers(problem, queries)
    return problem, problem + ''.join(f'?{v}={d};' for v, d, _ in queries)


def reasoning_lines(n, max_hops, n_chains, rng):
    """n lines with hops uniform in 1..max_hops; also returns the set of their problems (for test exclusion)."""
    from tqdm import tqdm
    problems, lines = set(), []
    for _ in tqdm(range(n), desc='problems', disable=None):
        problem, line = reasoning_line(rng.randint(1, max_hops), n_chains, rng)
        problems.add(problem)
        lines.append(line)
    return lines, problems


def make_test_prompt(hops, n_chains, rng):
    """('\\n' + problem + '?v=', answer) where v is the end of the asked chain: exactly `hops` hops.
    The leading newline is the context a line has in the train stream."""
    chains = make_chains(hops, n_chains, rng)
    problem, target = problem_text(chains, rng), chains[0]
    prompt = f'\n{problem}?{target[-1]}='
    if last_query(prompt) != (target[0], hops):  # the solver checks every stored answer
        raise RuntimeError(f'generator bug: {prompt!r} -> {target[0]} in {hops} hops, solver {last_query(prompt)}')
    return problem, prompt, target[0]


def make_test_set(hops, n, n_chains, rng, seen):
    """n distinct (prompt, answer) pairs whose problem text is not in `seen` (train and val problems)."""
    pairs, problems = [], set()
    for _ in range(100 * n + 1000):  # small settings have few distinct problems: give up with a clear error
        if len(pairs) == n:
            return pairs
        problem, prompt, answer = make_test_prompt(hops, n_chains, rng)
        if problem not in seen and problem not in problems:
            problems.add(problem)
            pairs.append((prompt, answer))
    raise ValueError(f'found only {len(pairs)} of n_test={n} new test problems at {hops} hops; '
                     f'lower --n_test or raise --n_chains')


def check_reasoning_settings(max_hops, n_chains, n_train, n_val, n_test, seed):
    if min(max_hops, n_chains, n_train, n_val, n_test) < 1:
        raise ValueError('--max_hops, --n_chains, --n_train, --n_val and --n_test must all be >= 1')
    if n_chains > len(DIGITS):
        raise ValueError(f'--n_chains={n_chains}: chains need distinct root digits, so at most {len(DIGITS)}')
    if 2 * max_hops * n_chains > len(LETTERS):
        raise ValueError(f'--max_hops={max_hops} --n_chains={n_chains}: test problems need up to 2*max_hops*n_chains'
                         f' = {2 * max_hops * n_chains} variables, but only {len(LETTERS)} letters exist')


def prepare_reasoning(out_dir, settings, max_hops, n_chains, n_train, n_val, n_test, seed):
    check_reasoning_settings(max_hops, n_chains, n_train, n_val, n_test, seed)
    meta = char_meta(REASONING_CHARS)
    train, train_problems = reasoning_lines(n_train, max_hops, n_chains, random.Random(seed))
    val, val_problems = reasoning_lines(n_val, max_hops, n_chains, random.Random(seed + 1))
    test_rng, seen = random.Random(seed + 2), train_problems | val_problems
    test = {h: make_test_set(h, n_test, n_chains, test_rng, seen) for h in range(1, 2 * max_hops + 1)}
    meta.update(settings=settings, train_hops=list(range(1, max_hops + 1)), test_hops=sorted(test),
                max_line_len=max(map(len, train + val)),  # pick block_size from these two
                max_prompt_len=max(len(p) for pairs in test.values() for p, _ in pairs))
    print(f'reasoning: line length max {meta["max_line_len"]}, test prompt length max {meta["max_prompt_len"]}')
    stream = lambda lines: encode(''.join(line + '\n' for line in lines), meta)  # every line ends in '\n'
    return write_splits(out_dir, stream(train), stream(val), meta, extra={'test.pkl': test})

# -----------------------------------------------------------------------------
# entry points


def check_options(name, kwargs):
    """Known dataset, known options, values of the default's type; returns all options with defaults filled in."""
    if name not in DEFAULTS:
        raise ValueError(f'unknown dataset {name!r}; allowed: {", ".join(DEFAULTS)}')
    allowed = {**COMMON, **DEFAULTS[name]}
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(f'unknown option --{key} for {name}; allowed: {", ".join("--" + k for k in allowed)}')
        default = allowed[key]
        if type(value) is not type(default):  # bool is not accepted for int, nor int for bool
            raise ValueError(f'--{key}={value!r} must be {type(default).__name__} (like the default {default!r})')
    return {**allowed, **kwargs}


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
        n_train, n_val = prepare_reasoning(out_dir, settings, **opts)
    print(f'{out_dir}: train {n_train:,} tokens, val {n_val:,} tokens ({time.time() - t0:.2f} s)')
    return out_dir


def parse_value(key, text, default):
    """CLI string -> the type of the option's default (str stays str, so --name=123 is a name)."""
    if isinstance(default, bool):
        if text.lower() not in ('true', 'false', '1', '0', ''):
            raise ValueError(f'--{key}={text!r} must be true or false')
        return text.lower() in ('true', '1', '')  # a bare --force means true
    if isinstance(default, int):
        try:
            return int(text.replace('_', ''))
        except ValueError:
            raise ValueError(f'--{key}={text!r} must be an integer') from None
    return text


def parse_args(argv):
    """['reasoning', '--max_hops=3'] -> ('reasoning', {'max_hops': 3})."""
    if not argv or argv[0].startswith('-'):
        raise ValueError(f'usage: python prepare.py <dataset> [--key=value ...]; datasets: {", ".join(DEFAULTS)}')
    name, kwargs = argv[0], {}
    check_options(name, {})
    allowed = {**COMMON, **DEFAULTS[name]}
    for arg in argv[1:]:
        key, _, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or key not in allowed:
            raise ValueError(f'unknown option {arg!r} for {name}; allowed: {", ".join("--" + k for k in allowed)}')
        kwargs[key] = parse_value(key, text, allowed[key])
    return name, kwargs


if __name__ == '__main__':
    try:
        name, kwargs = parse_args(sys.argv[1:])
        prepare(name, **kwargs)
    except (ValueError, OSError) as e:  # our own checks and unreadable/unwritable paths: one line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
