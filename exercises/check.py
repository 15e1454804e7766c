"""Grade an exercise (python -m exercises check N|all): swap the student's functions into the model (model.<name>,
etd.<name>) and run the properties that define them, the tests test_ex<N>_*, one line each; under a failure, why (its
numbers labelled) and a hint for that failure. The answers are the product's own functions (--solution).
"""
import contextlib
import inspect
import io
import os
import pathlib
import runpy
import tempfile
import textwrap
import time
import traceback
from collections import namedtuple
from unittest import mock

import pytest
import torch

import etd
import model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = [os.path.join(ROOT, 'tests', name) for name in ('test_exercises.py', 'test_etd.py')]
# no pytest report (ours replaces it), no cache, no slow-gc unraisable plugin, no third-party ones (could reseed tests)
PYTEST_ARGS = ['-q', '-p', 'no:cacheprovider', '-p', 'no:unraisableexception', '--tb=no', '-W', 'ignore', '--rootdir',
               ROOT, '-c', os.path.join(ROOT, 'pytest.ini')]

Exercise = namedtuple('Exercise', 'number file home names')  # home: the module holding the real functions
Result = namedtuple('Result', 'node passed statement why hint')  # statement: the property (test docstring); why: 1 line
EXERCISES = [Exercise(1, 'ex1_sample_depth.py', model, ('sample_depth',)),
             Exercise(2, 'ex2_init_state_inject.py', model, ('init_state', 'inject')),
             Exercise(3, 'ex3_truncated_loop.py', model, ('truncated_loop',)),
             Exercise(4, 'ex4_kl_exit.py', model, ('kl_converged',)),
             Exercise(5, 'ex5_etd_split.py', etd, ('angular_distances', 'find_knee', 'choose_split')),
             Exercise(6, 'ex6_fill_latest.py', model, ('fill_latest',))]
BY_NUMBER = {ex.number: ex for ex in EXERCISES}
ORIGINAL = {name: getattr(ex.home, name) for ex in EXERCISES for name in ex.names}  # the answers, before any swap


def shape_of(arg):  # the contract of a function that returns a tensor of its argument arg's shape
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


def load_student(ex, folder=HERE):
    """The student's functions from their exercise file -> {name: function}; ValueError with one line if it cannot."""
    path = os.path.join(folder, ex.file)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist (copy it from exercises/ to start)")
    try:
        namespace = runpy.run_path(path)
    except Exception as err:  # a syntax error or a failing import in the student's file
        raise ValueError(f"{ex.file} does not load: {one_line(err, path)}") from None
    missing = [name for name in ex.names if not callable(namespace.get(name))]
    if missing:
        raise ValueError(f"{ex.file} defines no function {missing[0]}")
    return {name: namespace[name] for name in ex.names}


def guarded(fn, name):
    """fn with its result checked against CONTRACTS at every return: a wrong type or shape is one line there, not an
    error deep in the model. fill_latest works in place: the entries it must write are NaN first, still NaN if not."""
    signature, (ok, want) = inspect.signature(ORIGINAL[name]), CONTRACTS[name]

    def wrapper(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        if name == 'fill_latest':  # loop_kv: (r, n_loop, 2, B, H, T, hd)
            later = torch.arange(len(a['loop_kv']), device=a['depths'].device)[:, None] >= a['depths']  # (r, B)
            missing = torch.zeros_like(a['loop_kv'], dtype=torch.bool)
            missing[:, :, :, :, :, a['pos']] = later[:, None, None, :, None, None]
            a['loop_kv'][missing] = float('nan')
        out = fn(*args, **kwargs)
        if not ok(a, out):
            got = f"a {str(out.dtype)[6:]} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else \
                f"{out!r} ({type(out).__name__})"
            raise AssertionError(f"your {name} returned {got}; return {want(a)}")
        if name == 'fill_latest' and missing.any() and a['loop_kv'][missing].isnan().all():
            raise AssertionError("loop_kv was not written by your fill_latest, yet a row stopped early: assign into "
                                "loop_kv's entries (rebinding the name to a new tensor changes nothing in the cache)")
        return out
    return wrapper


@contextlib.contextmanager
def swapped(module, functions):
    """module.<name> is the student's function for the duration, and so is every EXIT_RULES entry that held the real
    one (model.EXIT_RULES holds kl_converged itself, not its name); both are restored afterwards."""
    rules = {rule: (functions.get(test.__name__, test), n) for rule, (test, n) in model.EXIT_RULES.items()}
    with mock.patch.dict(model.EXIT_RULES, rules), \
            (mock.patch.multiple(module, **functions) if functions else contextlib.nullcontext()):
        yield


def one_line(err, student_path=None):
    """An exception as one line: a property's own message (pytest adds '\\nassert ...' to it), or the error's type and
    first line with where it was raised: the student's file:line, or the model's, called with their function."""
    text = str(err).strip()
    if isinstance(err, AssertionError):  # a property's message or a contract's
        return f"the property does not hold: {text.splitlines()[0]}" if text.startswith('assert ') else \
            ' '.join(text.split('\nassert ')[0].split())
    message = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(': ')
    if isinstance(err, SyntaxError):
        return message + (f" (line {err.lineno})" if err.lineno else '')
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if student_path and os.path.abspath(f.filename) == os.path.abspath(student_path)]
    f = (mine or frames)[-1]  # where it was raised: the student's own line if their code is on the way
    where = f"your code, {os.path.basename(f.filename)}:{f.lineno}" if mine else \
        f"in {os.path.basename(f.filename)}:{f.lineno}, called with your function"
    return f"{message} ({where})"[:300]


class Grader:
    """A pytest plugin: keeps only the exercise's tests (test_ex<N>_*), in file order, and records each outcome."""

    def __init__(self, number):
        self.prefix, self.items, self.outcomes = f'test_ex{number}_', [], {}

    def pytest_collection_modifyitems(self, session, config, items):
        items[:] = self.items = [item for item in items if item.name.startswith(self.prefix)]

    def pytest_runtest_makereport(self, item, call):
        if call.when == 'call' or call.excinfo is not None:
            self.outcomes.setdefault(item.nodeid, call.excinfo.value if call.excinfo else None)


def grade(number, functions=None, solution=False, folder=HERE, exitfirst=False, failed_before=()):
    """Grade exercise `number` -> [Result]. functions: {name: fn} to check, default the student's file in `folder`;
    solution=True: the project's own. failed_before: properties that failed last time (their `more` hint shows)."""
    ex, path = BY_NUMBER[number], os.path.join(folder, BY_NUMBER[number].file)
    if not solution and functions is None:
        try:
            functions = load_student(ex, folder)
        except ValueError as err:
            return [Result('load', False, f"{ex.file} loads and defines {', '.join(ex.names)}", str(err), '')]
    grader, threads = Grader(number), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: on 2 busy cores a second thread cost one test 14 s of CPU instead of 0.1 s
    try:
        swap = {} if solution else {name: guarded(fn, name) for name, fn in functions.items()}
        with swapped(ex.home, swap), mock.patch.dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD='1'), \
                contextlib.redirect_stdout(io.StringIO()):
            pytest.main([*TESTS, *PYTEST_ARGS] + ['-x'] * exitfirst, plugins=[grader])
    finally:
        torch.set_num_threads(threads)
    results = []
    for item in grader.items:  # in file order: the fast, precise properties first, then the whole model
        err = grader.outcomes.get(item.nodeid, AssertionError('not run: an earlier property failed'))
        why = '' if err is None else f"your {', '.join(ex.names)} is not written yet (it raises NotImplementedError)" \
            if isinstance(err, NotImplementedError) else one_line(err, path)
        why, _, hint = why.partition(' -- hint: ')
        hint, _, more = hint.partition(' -- more: ')  # the give-away hint, for a property that failed last time too
        case = f" [{item.callspec.id}]" if hasattr(item, 'callspec') else ''  # a parametrized property: which case
        results.append(Result(item.nodeid, err is None, ' '.join((item.function.__doc__ or item.name).split()) + case,
                              why, f"{hint} {more}".strip() if item.nodeid in failed_before else hint))
    return results


def report(ex, results, seconds, solution=False, folder=HERE):
    """Lines for one exercise: a pass/fail line per property, the reason and a hint under each failure."""
    wrap = lambda text: textwrap.fill(text, width=116, subsequent_indent=' ' * 8)
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
    history = pathlib.Path(tempfile.gettempdir(), 'nanoloop-check' + folder.replace(os.sep, '-')[-200:])  # < 255
    failed = set(history.read_text().split()) if history.is_file() else set()  # node ids hold no spaces
    rows = []
    for ex in EXERCISES if which == 'all' else [BY_NUMBER[which]]:
        t0 = time.time()
        results = grade(ex.number, solution=solution, folder=folder, failed_before=failed)
        print('\n'.join(report(ex, results, time.time() - t0, solution, folder)), flush=True)
        started = [r for r in results if 'NotImplementedError' not in r.why]  # the shipped stub's failures do not count
        failed = {n for n in failed if f'test_ex{ex.number}_' not in n} | {r.node for r in started if not r.passed}
        held = sum(r.passed for r in results)
        status = 'done' if held == len(results) else 'in progress' if started else 'not started'
        rows.append(f"{ex.number:>2} {', '.join(ex.names):46}  {f'{held}/{len(results)}':>10}  "
                    f"{time.time() - t0:>7.1f}  {status}")
    if not solution:
        history.write_text('\n'.join(sorted(failed)))
    if which == 'all':
        print('\n'.join(['', f" # {'exercise':46}  properties  seconds  status", *rows,
                         f"{sum(row.endswith('done') for row in rows)} of {len(rows)} exercises done"]))
    return 0 if all(row.endswith('done') for row in rows) else 1
