"""
Grade an exercise (python -m exercises check N|all): put the student's function into the model in place of the real
one (model.<name>, etd.<name>) and run the property tests that define it, `test_ex<N>_*` in tests/test_exercises.py
and tests/test_etd.py, one line per property. Under a failure: why (what happened, its numbers labelled) and a hint
for that failure; a hint that gives more away shows only when the same property failed on the previous run too.
The answers are the product's own functions (--solution).
"""
import contextlib
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import os
import sys
import tempfile
import textwrap
import time
import traceback
from collections import namedtuple

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # the grader imports the repository's modules wherever it is started from
    sys.path.insert(0, ROOT)
import etd  # noqa: E402
import model  # noqa: E402

TESTS = [os.path.join(ROOT, 'tests', name) for name in ('test_exercises.py', 'test_etd.py')]


# the student's file in exercises/, the module holding the real functions, the functions the student writes
Exercise = namedtuple('Exercise', 'number file home names minutes')
Result = namedtuple('Result', 'node passed statement why hint')  # statement: the property (test docstring); why: 1 line
EXERCISES = [Exercise(1, 'ex1_sample_depth.py', model, ('sample_depth',), 20),
             Exercise(2, 'ex2_init_state_inject.py', model, ('init_state', 'inject'), 25),
             Exercise(3, 'ex3_truncated_loop.py', model, ('truncated_loop',), 25),
             Exercise(4, 'ex4_kl_exit.py', model, ('kl_converged',), 20),
             Exercise(5, 'ex5_etd_split.py', etd, ('angular_distances', 'find_knee', 'choose_split'), 40),
             Exercise(6, 'ex6_fill_latest.py', model, ('fill_latest',), 50)]
BY_NUMBER = {ex.number: ex for ex in EXERCISES}
ORIGINAL = {name: getattr(ex.home, name) for ex in EXERCISES for name in ex.names}  # the answers, before any swap


def shape_of(arg):
    return (lambda a, out: tuple(getattr(out, 'shape', '?')) == tuple(a[arg].shape),
            lambda a: f"a tensor of {arg}'s shape {tuple(a[arg].shape)}")


CONTRACTS = {  # name -> (is the result what the model needs?, what to return instead): checked at every return
    'sample_depth': (lambda a, out: type(out) is int, lambda a: "a Python int (int(...) or .item())"),
    'init_state': shape_of('e'), 'inject': shape_of('s'), 'truncated_loop': shape_of('s'),
    'kl_converged': (lambda a, out: getattr(out, 'dtype', 0) == torch.bool and out.shape == a['logp'].shape[:-1],
                     lambda a: f"a bool tensor of shape {tuple(a['logp'].shape[:-1])}, one answer per token"),
    'angular_distances': (lambda a, out: tuple(getattr(out, 'shape', '?')) == (len(a['hidden_states']) - 1,),
                          lambda a: f"one distance per block, shape ({len(a['hidden_states']) - 1},)"),
    'find_knee': (lambda a, out: type(out) is int and 0 <= out < len(a['curve']),
                  lambda a: f"a Python int index into curve, 0..{len(a['curve']) - 1}"),
    'choose_split': (lambda a, out: isinstance(out, tuple) and len(out) == 3 and all(type(n) is int for n in out),
                     lambda a: "a tuple of three ints (n_prelude, n_loop, n_coda)"),
    'fill_latest': (lambda a, out: out is None, lambda a: "nothing: write into loop_kv in place"),
}


class ContractError(Exception):
    """The student's function returned something the model cannot use: stopped at its return, in one line."""


# -- the student's functions, checked at every return and swapped into the model --------------------------------------


def load_student(ex, folder=HERE):
    """The student's functions from their exercise file -> {name: function}; ValueError with one line if it cannot."""
    path = os.path.join(folder, ex.file)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist (copy it from exercises/ to start)")
    spec = importlib.util.spec_from_file_location(f'student_ex{ex.number}', path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a syntax error or a failing import in the student's file
        raise ValueError(f"{ex.file} does not load: {one_line(err, path)}") from None
    missing = [name for name in ex.names if not callable(getattr(module, name, None))]
    if missing:
        raise ValueError(f"{ex.file} defines no function {missing[0]}")
    return {name: getattr(module, name) for name in ex.names}


def guarded(fn, name):
    """fn with its result checked against the contract at every return, so that a wrong type or shape is one readable
    line instead of an error deep inside the model. fill_latest works in place: the entries a stopped row never
    computed are set to NaN first, and if all of them still are afterwards, loop_kv was not written."""
    signature, (ok, want) = inspect.signature(ORIGINAL[name]), CONTRACTS[name]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        if name == 'fill_latest':
            iters = torch.arange(len(a['loop_kv']), device=a['depths'].device)
            missing = torch.zeros_like(a['loop_kv'], dtype=torch.bool)
            missing[:, :, :, :, :, a['pos']] = (iters[:, None] >= a['depths'])[:, None, None, :, None, None]
            a['loop_kv'][missing] = float('nan')
        out = fn(*args, **kwargs)
        if not ok(a, out):
            raise ContractError(f"your {name} returned {describe(out)}; return {want(a)}")
        if name == 'fill_latest' and missing.any() and a['loop_kv'][missing].isnan().all():
            raise ContractError("loop_kv was not written by your fill_latest, yet a row stopped early: assign into "
                                "loop_kv's entries (rebinding the name to a new tensor changes nothing in the cache)")
        return out
    return wrapper


def describe(x):
    return f"a {str(x.dtype)[6:]} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else \
        f"{x!r} ({type(x).__name__})"


@contextlib.contextmanager
def swapped(module, functions):
    """Replace module.<name> by the student's function for the duration, and every EXIT_RULES entry pointing to the
    real one (model.EXIT_RULES holds kl_converged itself, not its name)."""
    saved, rules = {name: getattr(module, name) for name in functions}, dict(model.EXIT_RULES)
    for name, fn in functions.items():
        setattr(module, name, fn)
        model.EXIT_RULES.update({r: (fn, n) for r, (test, n) in rules.items() if test is saved[name]})
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
        model.EXIT_RULES.update(rules)

# -- running the properties and explaining a failure in one line -------------------------------------------------------


def one_line(err, student_path=None):
    """An exception as one line: a property's own message (pytest adds '\\nassert ...' to it), or the error's type and
    first line with where it was raised: the student's file:line, or the model's, called with their function."""
    text = str(err).strip()
    if isinstance(err, (AssertionError, ContractError)):
        return ' '.join(text.split('\nassert ')[0].split()) if not text.startswith('assert ') else \
            f"the property does not hold: {text.splitlines()[0]}"
    message = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(': ')
    frames = [] if isinstance(err, SyntaxError) else traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if student_path and os.path.abspath(f.filename) == os.path.abspath(student_path)]
    if isinstance(err, SyntaxError) and err.lineno:
        message += f" (line {err.lineno})"
    elif frames:
        f = (mine or frames)[-1]
        message += f" ({'your code, ' if mine else 'in '}{os.path.basename(f.filename)}:{f.lineno}" \
                   f"{'' if mine else ', called with your function'})"
    return message[:300]


class Grader:
    """A pytest plugin: keeps only the exercise's tests (test_ex<N>_*), in file order, and records each outcome."""

    def __init__(self, number):
        self.prefix, self.items, self.outcomes = f'test_ex{number}_', [], {}

    def pytest_collection_modifyitems(self, session, config, items):
        items[:] = self.items = [item for item in items if item.name.startswith(self.prefix)]

    def pytest_runtest_makereport(self, item, call):
        if call.when == 'call' or call.excinfo is not None:
            self.outcomes.setdefault(item.nodeid, call.excinfo.value if call.excinfo else None)


# Our report replaces pytest's: no tracebacks (--tb=no), no cache, no third-party plugins (one that reorders or
# reseeds tests would make a grade depend on what else is installed), and no unraisableexception plugin, whose five
# gc.collect() passes per session cost 0.4 s each with torch loaded.
PYTEST_ARGS = ['-q', '-p', 'no:cacheprovider', '-p', 'no:unraisableexception', '--tb=no', '-W', 'ignore', '--rootdir',
               ROOT, '-c', os.path.join(ROOT, 'pytest.ini')]


def grade(number, functions=None, solution=False, folder=HERE, exitfirst=False, failed_before=()):
    """Grade exercise `number` -> [Result]. functions: {name: fn} to check, default the student's file in `folder`;
    solution=True: the project's own. failed_before: properties that failed last time (their `more` hint shows)."""
    ex, path = BY_NUMBER[number], os.path.join(folder, BY_NUMBER[number].file)
    if not solution and functions is None:
        try:
            functions = load_student(ex, folder)
        except ValueError as err:
            return [Result('load', False, f"{ex.file} loads and defines {', '.join(ex.names)}", str(err), '')]
    grader, threads, env = Grader(number), torch.get_num_threads(), dict(os.environ)
    torch.set_num_threads(1)  # tiny models: on 2 busy cores a second thread cost one test 14 s of CPU instead of 0.1 s
    os.environ['PYTEST_DISABLE_PLUGIN_AUTOLOAD'] = '1'
    try:
        with swapped(ex.home, {n: guarded(fn, n) for n, fn in (functions or {}).items()} if not solution else {}), \
                contextlib.redirect_stdout(io.StringIO()):
            pytest.main([*TESTS, *PYTEST_ARGS] + ['-x'] * exitfirst, plugins=[grader])
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(env)
    results = []
    for item in grader.items:
        err = grader.outcomes.get(item.nodeid, AssertionError('not run: an earlier property failed'))
        why = '' if err is None else f"your {', '.join(ex.names)} is not written yet (it raises NotImplementedError)" \
            if isinstance(err, NotImplementedError) else one_line(err, path if os.path.isfile(path) else None)
        why, _, hint = why.partition(' -- hint: ')
        hint, _, more = hint.partition(' -- more: ')
        case = f" [{item.callspec.id}]" if hasattr(item, 'callspec') else ''  # a parametrized property: which case
        statement = ' '.join((item.function.__doc__ or item.name).split()) + case
        results.append(Result(item.nodeid, err is None, statement, why,
                              f"{hint} {more}".strip() if item.nodeid in failed_before else hint))
    return results

# -- reports -----------------------------------------------------------------------------------------------------------


def report(ex, results, seconds, solution=False, folder=HERE):
    """Lines for one exercise: a pass/fail line per property, the reason and a hint under each failure."""
    wrap = functools.partial(textwrap.fill, width=116, subsequent_indent=' ' * 8)
    source = "the project's own functions" if solution else os.path.relpath(os.path.join(folder, ex.file))
    lines = [f"exercise {ex.number}: {', '.join(ex.names)}   ({source})"]
    for r in results:
        lines.append(wrap(f"  {'ok  ' if r.passed else 'FAIL'}  {r.statement}"))
        lines += [wrap(f"        {k + ':':6}{v}") for k, v in (('why', r.why), ('hint', r.hint)) if v and not r.passed]
    held = sum(r.passed for r in results)
    return lines + [f"  {held}/{len(results)} properties hold ({seconds:.1f} s){'   -> done' * (held == len(results))}"]


def check(which, solution=False, folder=HERE):
    """Grade one exercise or all of them, print the report (and for `all` a scoreboard); exit code 0 if all hold.
    The properties that failed are kept in a temp file per folder: a second failure of one shows its `more` hint."""
    history = os.path.join(tempfile.gettempdir(), 'nanoloop-check-' + hashlib.sha1(folder.encode()).hexdigest()[:12])
    try:
        with open(history) as f:
            failed = set(json.load(f))
    except (OSError, ValueError):
        failed = set()
    rows = []
    for ex in EXERCISES if which == 'all' else [BY_NUMBER[which]]:
        t0 = time.time()
        results = grade(ex.number, solution=solution, folder=folder, failed_before=failed)
        print('\n'.join(report(ex, results, time.time() - t0, solution, folder)), flush=True)
        failed = {node for node in failed if f'test_ex{ex.number}_' not in node} | {  # a blank stub does not count
            r.node for r in results if not r.passed and 'NotImplementedError' not in r.why}
        blank = all('NotImplementedError' in r.why for r in results)  # still the shipped stub
        held = sum(r.passed for r in results)
        rows.append(f"{ex.number:>2} {', '.join(ex.names):46}  {f'{held}/{len(results)}':>10}  {time.time() - t0:>7.1f}"
                    f"  {'done' if held == len(results) else 'not started' if blank else 'in progress'}")
    if not solution:
        with open(history, 'w') as f:
            json.dump(sorted(failed), f)
    if which == 'all':
        done = sum(row.endswith('done') for row in rows)
        print('\n'.join(['', f" # {'exercise':46}  properties  seconds  status", *rows,
                         f"{done} of {len(rows)} exercises done"]))
    return 0 if all(row.endswith('done') for row in rows) else 1
