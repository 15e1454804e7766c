"""python -m exercises check N|all: the properties (tests test_ex<N>_*) run with the student's functions swapped in."""
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
PYTEST_ARGS = ['-q', '--tb=no', '-p', 'no:cacheprovider', '-p', 'no:unraisableexception', '-W', 'ignore']

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
    """fn with its result checked against CONTRACTS at every return: one line there, not an error deep in the model."""
    signature, (ok, want) = inspect.signature(ORIGINAL[name]), CONTRACTS[name]

    def wrapper(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        version = a['loop_kv']._version if name == 'fill_latest' else None  # in place: any write bumps it
        out = fn(*args, **kwargs)
        if not ok(a, out):
            got = f"a {str(out.dtype)[6:]} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else \
                f"{out!r} ({type(out).__name__})"
            raise AssertionError(f"your {name} returned {got}; return {want(a)}")
        if name == 'fill_latest' and a['loop_kv']._version == version and (a['depths'] < len(a['loop_kv'])).any():
            raise AssertionError("loop_kv was not written by your fill_latest, yet a row stopped early: assign into "
                                "loop_kv's entries (rebinding the name to a new tensor changes nothing in the cache)")
        return out
    return wrapper


@contextlib.contextmanager
def swapped(module, functions):
    """module.<name>, and every model.EXIT_RULES entry (it holds functions, not names), are `functions`' meanwhile."""
    rules = {rule: (functions.get(test.__name__, test), n) for rule, (test, n) in model.EXIT_RULES.items()}
    with mock.patch.dict(vars(module), functions), mock.patch.dict(model.EXIT_RULES, rules):
        yield


def one_line(err, student_path=None):
    """An exception as one line: a property's message, or the error and where it was raised (the student's line)."""
    text = str(err).strip()
    if isinstance(err, AssertionError):  # a property's message or a contract's (pytest appends '\nassert ...')
        return f"the property does not hold: {text.splitlines()[0]}" if text.startswith('assert ') else \
            ' '.join(text.split('\nassert ')[0].split())
    message = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(': ')
    if isinstance(err, SyntaxError):  # its text ends with (file, line N); the traceback is the loader's
        return message
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if student_path and os.path.abspath(f.filename) == os.path.abspath(student_path)]
    if isinstance(err, NotImplementedError) and mine:  # the blank stub: name the function, nothing more
        return f"your {mine[-1].name} is not written yet (it raises NotImplementedError; --solution runs the project's)"
    f = (mine or frames)[-1]  # where it was raised: the student's own line if their code is on the way
    where = f"{os.path.basename(f.filename)}:{f.lineno}"
    return (f"{message} (your code, {where})" if mine else f"{message} (in {where}, called with your function)")[:300]


class Grader:
    """A pytest plugin: each property run (a pytest item) -> its exception, None if it held, in file order."""

    def __init__(self):
        self.outcomes = {}

    def pytest_runtest_makereport(self, item, call):
        if call.when == 'call' or call.excinfo is not None:  # a failed setup is the result too
            self.outcomes.setdefault(item, call.excinfo.value if call.excinfo else None)


def grade(number, functions=None, solution=False, folder=HERE, exitfirst=False, failed_before=()):
    """Exercise `number` -> [Result]: `functions` {name: fn}, by default the student's file in folder, or ours."""
    ex, path = BY_NUMBER[number], os.path.join(folder, BY_NUMBER[number].file)
    if not solution and functions is None:
        try:
            functions = load_student(ex, folder)
        except ValueError as err:
            return [Result('load', False, f"{ex.file} loads and defines {', '.join(ex.names)}", str(err), '')]
    grader, swap = Grader(), {} if solution else {name: guarded(fn, name) for name, fn in functions.items()}
    with swapped(ex.home, swap), mock.patch.dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD='1'), \
            contextlib.redirect_stdout(io.StringIO()):
        pytest.main([*TESTS, *PYTEST_ARGS, '-k', f'test_ex{number}_'] + ['-x'] * exitfirst, plugins=[grader])
    results = []
    for item, err in grader.outcomes.items():  # in file order: the fast, precise properties first, then the whole model
        why, _, hint = ('' if err is None else one_line(err, path)).partition(' -- hint: ')  # ' -- more: ': a give-away
        hint = hint.replace(' -- more: ', ' ') if item.nodeid in failed_before else hint.partition(' -- more: ')[0]
        statement = ' '.join(f"{item.function.__doc__} {item.name[len(item.originalname):]}".split())  # + [its case]
        results.append(Result(item.nodeid, err is None, statement, why, hint))
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
    """Print one exercise's report or all (then a scoreboard) -> exit code 0 if all hold; failures kept per folder."""
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
