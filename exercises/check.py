"""
Grade an exercise: put the student's function into the model in place of the real one (model.<name>, etd.<name>) and
run the project's own property tests that define it (test_model.py, tests/test_etd.py), one line per property.
Nothing here copies a test or a solution: the tests are the definition and the product's functions are the answers.

    python -m exercises check 3                       # grade exercises/ex3_truncated_loop.py
    python -m exercises check all                     # every exercise, then a scoreboard
    python -m exercises check 3 --solution            # the project's own function: what passing looks like
    python -m exercises check all --dir=work/alice    # grade a student's copies kept in another folder
    python exercises/check.py 3                       # the same as `python -m exercises check 3`
"""

import ast
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import io
import os
import sys
import textwrap
import time
import traceback

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # `python exercises/check.py` puts exercises/ on the path, not the repo
    sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------------------------------------------------
# What a student's function must return, checked on every call so that a wrong type or shape is one readable line
# instead of a shape error deep inside the model.

class ContractError(Exception):
    pass


def _describe(x):
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    return f"{x!r} ({type(x).__name__})"


def python_int(args, out):
    if type(out) is not int:
        return f"returned {_describe(out)}; return a Python int (int(...) or .item())"


def shape_of(arg):
    def contract(args, out):
        want = tuple(args[arg].shape)
        if not hasattr(out, 'shape') or tuple(out.shape) != want:
            return f"returned {_describe(out)}; it must have the shape of {arg}, {want}"
    return contract


def bool_per_token(args, out):
    want = tuple(args['logp'].shape[:-1])
    if getattr(out, 'dtype', None) != torch.bool or tuple(out.shape) != want:
        return f"returned {_describe(out)}; return a bool tensor of shape {want}, one answer per token (e.g. kl < eps)"


def in_place(args, out):
    if out is not None:
        return f"returned {_describe(out)}; write into loop_kv in place and return nothing (the model ignores results)"


def layer_curve(args, out):
    want = (args['hidden_states'].shape[0] - 1,)
    if not hasattr(out, 'shape') or tuple(out.shape) != want:
        return f"returned {_describe(out)}; return one distance per block, shape {want}"


def index_into(args, out):
    if type(out) is not int or not 0 <= out < len(args['curve']):
        return f"returned {_describe(out)}; return a Python int index into curve, 0..{len(args['curve']) - 1}"


def three_counts(args, out):
    if not (isinstance(out, tuple) and len(out) == 3 and all(type(n) is int for n in out)):
        return f"returned {_describe(out)}; return a tuple of three ints (n_prelude, n_loop, n_coda)"


# ----------------------------------------------------------------------------------------------------------------------
# The exercises: the functions a student writes, and the property tests (pytest node ids) that define them, fast and
# precise ones first, then the ones that run the whole model with the student's function inside. Each hint is what to
# look at when that property fails.

@dataclasses.dataclass
class Exercise:
    number: int
    file: str          # the student's file in exercises/
    home: str          # the module holding the real functions
    contracts: dict    # function name -> contract on its result
    properties: list   # (node id, hint)
    minutes: int

    @property
    def names(self):
        return tuple(self.contracts)


M, E = 'test_model.py::', 'tests/test_etd.py::'
EXERCISES = [
    Exercise(1, 'ex1_sample_depth.py', 'model', {'sample_depth': python_int}, [
        (M + 'test_depth_sampler_returns_a_python_int',
         "turn the one-element tensor into a number: int(r.item())"),
        (M + 'test_depth_sampler_mean_is_mean_depth_plus_one_and_respects_the_cap',
         "r = Poisson(exp(tau)) + 1 (at least one iteration), tau's mean log(mean) - sigma^2/2, then min(r, max_depth)"),
        (M + 'test_depth_sampler_is_heavy_tailed_like_a_lognormal_poisson',
         "the Poisson rate is exp(tau) with a fresh tau ~ Normal per call, not mean_depth itself"),
        (M + 'test_depth_sampler_is_reproducible_from_a_seed',
         "pass generator=generator to torch.normal and torch.poisson (no random / numpy draws)"),
        (M + 'test_eval_uses_mean_depth_and_training_draws_a_depth',
         "the model calls sample_depth(mean_depth, max_depth) with no generator in training: that must work too"),
    ], 20),
    Exercise(2, 'ex2_init_state_inject.py', 'model', {'init_state': shape_of('e'), 'inject': shape_of('s')}, [
        (M + 'test_embed_and_zeros_initial_states_are_exact',
         "'embed' returns e itself, 'zeros' torch.zeros_like(e)"),
        (M + 'test_noise_state_is_a_truncated_normal_of_the_configured_std',
         "torch.nn.init.trunc_normal_(s, 0.0, std, -3 * std, 3 * std): the cut points are absolute values"),
        (M + 'test_noise_state_is_reproducible_with_a_generator',
         "draw the noise with generator=generator; without a generator it must differ from call to call"),
        (M + 'test_injection_is_its_section_2_formula[concat]',
         "'concat' is adapter(torch.cat([s, e], dim=-1)): the state first, then e"),
        (M + 'test_injection_is_its_section_2_formula[add]', "'add' is s + e"),
        (M + 'test_injection_is_its_section_2_formula[none]', "'none' returns s unchanged"),
        (M + 'test_one_iteration_without_injection_is_a_plain_gpt',
         "with inject 'none' and init 'embed', one iteration must be exactly the next block of an ordinary GPT"),
        (M + 'test_loop_and_prelude_weights_get_gradient[concat]',
         "the prelude learns only through the injection: the loop's input must depend on e at every iteration"),
    ], 25),
    Exercise(3, 'ex3_truncated_loop.py', 'model', {'truncated_loop': shape_of('s')}, [
        (M + 'test_truncated_loop_runs_r_steps_and_backprops_through_the_last_k[5-2]',
         "run max(r - k, 0) steps inside `with torch.no_grad():`, then the remaining ones outside it; pass i = 0..r-1"),
        (M + 'test_truncated_loop_runs_r_steps_and_backprops_through_the_last_k[2-4]',
         "when r <= k every one of the r steps runs with gradient (and never more than r steps)"),
        (M + 'test_truncated_loop_runs_r_steps_and_backprops_through_the_last_k[3-3]',
         "r == k: no step without gradient"),
        (M + 'test_truncated_backprop_equals_detaching_after_r_minus_k_iterations',
         "the model's gradient must be that of r - k iterations, a cut, then k iterations with autograd"),
        (M + 'test_activation_memory_does_not_grow_with_depth',
         "the autograd graph must not grow with r: the first r - k steps may not be recorded at all"),
    ], 25),
    Exercise(4, 'ex4_kl_exit.py', 'model', {'kl_converged': bool_per_token}, [
        (M + 'test_kl_exit_weighs_by_the_new_distribution_and_first_compares_against_uniform',
         "KL(p || p_prev) = (p * (logp - logp_prev)).sum(-1) with p = logp.exp(), the NEW distribution"),
        (M + 'test_kl_exit_clamps_negative_kl_so_threshold_zero_never_exits',
         "compare strictly, kl < eps: with eps = 0 a KL of exactly 0 must not exit"),
        (M + 'test_kl_exit_never_holds_at_eps_zero_even_where_fp32_kl_is_negative',
         "clamp the KL at 0 before comparing (.clamp_min(0)): a KL of -1e-9 is below eps = 0"),
        (M + 'test_teacher_forced_exit_threshold_zero_is_max_depth_and_huge_is_one',
         "inside the model: eps 0 must never hold and a huge eps must always hold, for every position"),
        (M + 'test_threshold_zero_runs_every_token_to_full_depth_and_a_huge_one_stops_at_one',
         "while decoding with the KV cache: the same two limits, token by token"),
    ], 20),
    Exercise(5, 'ex5_etd_split.py', 'etd',
             {'angular_distances': layer_curve, 'find_knee': index_into, 'choose_split': three_counts}, [
        (E + 'test_angular_distance_is_0_for_same_half_for_orthogonal_1_for_opposite',
         "cosine of consecutive layers along the last dim (F.cosine_similarity(h[:-1], h[1:], dim=-1)), arccos / pi, "
         "last token only by default (h[:, :, -1:]), then the mean over batch and tokens"),
        (E + 'test_knee_of_a_falling_curve_is_where_it_turns_flat',
         "scale x and y to [0, 1]; the knee is the argmax of the distance below the chord x + y = 1: of 1 - x - y"),
        (E + 'test_knees_find_the_planted_split[planted0]',
         "encoder = the blocks before the first knee; the reversed curve's knee counts decoder blocks from the end"),
        (E + 'test_knees_find_the_planted_split[planted3]', "ETD's OLMo-2 split 7 / 4 / 5: the same two knees"),
        (E + 'test_every_curve_gives_a_valid_split',
         "n_loop = last - first + 1 >= 1 and the three counts add up to n_layer; a flat curve's knee is 0"),
        (E + 'test_curve_is_measured_on_the_base_model',
         "etd.convert_pretrained measures the curve with your angular_distances: same shapes, float64 is safest"),
    ], 40),
    Exercise(6, 'ex6_fill_latest.py', 'model', {'fill_latest': in_place}, [
        (M + 'test_fill_latest_copies_each_rows_last_entry_to_its_later_iterations',
         "source iteration src[i, b] = min(i, depths[b] - 1); loop_kv[i, :, :, b, :, pos] = "
         "loop_kv[src[i, b], :, :, b, :, pos] for every i and b, and nothing at other positions"),
        (M + 'test_early_exit_cached_generation_equals_forward_with_its_depths[concat]',
         "decoding with early exit must equal the per-token-depth forward: later tokens read the latest keys/values"),
        (M + 'test_early_exit_cached_generation_equals_forward_with_its_depths[add]',
         "the same with the other injection: fill every loop layer, keys and values alike"),
        (M + 'test_early_exit_cached_generation_equals_forward_with_its_depths[none]',
         "the same with ETD's loop (no injection), where tokens exit at other depths"),
    ], 50),
]
BY_NUMBER = {ex.number: ex for ex in EXERCISES}


# ----------------------------------------------------------------------------------------------------------------------
# Loading the student's functions

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


def is_blank(fn):
    """True while fn is still the shipped stub: a docstring and `raise NotImplementedError(...)`, nothing else."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body
    except (OSError, TypeError, SyntaxError):
        return False
    body = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    return (len(body) == 1 and isinstance(body[0], ast.Raise) and
            'NotImplementedError' in ast.unparse(body[0].exc or ast.Constant(None)))


def guarded(fn, real, contract, name):
    """fn with its arguments bound like the real function's and its result checked against the contract."""
    signature = inspect.signature(real)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        problem = contract(bound.arguments, out)
        if problem:
            raise ContractError(f"your {name} {problem}")
        return out
    return wrapper


@contextlib.contextmanager
def swapped(module, functions):
    """Replace module.<name> by the student's function for the duration, and every EXIT_RULES entry pointing to the
    real one (model.EXIT_RULES holds kl_converged itself, not its name)."""
    import model
    saved, rules = {name: getattr(module, name) for name in functions}, dict(model.EXIT_RULES)
    for name, fn in functions.items():
        setattr(module, name, fn)
        for rule, (test, patience) in rules.items():
            if test is saved[name]:
                model.EXIT_RULES[rule] = (fn, patience)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
        model.EXIT_RULES.update(rules)


# ----------------------------------------------------------------------------------------------------------------------
# Running the property tests and explaining their failures in one line

@dataclasses.dataclass
class Result:
    node: str
    passed: bool
    statement: str = ''  # the property: the test's docstring
    why: str = ''        # one line: what went wrong
    hint: str = ''


def one_line(err, student_path=None, limit=220):
    """An exception as one line; the location in the student's file when the error was raised there."""
    if isinstance(err, ContractError):
        return str(err)
    text = str(err).strip()
    if isinstance(err, AssertionError):  # pytest's rewritten assert: "custom message\nassert expr\n + where ..."
        lines = text.splitlines()
        expr = next((i for i, line in enumerate(lines) if line.startswith('assert ')), len(lines))
        said = ' '.join(lines[:expr]).strip()
        text = ' '.join(filter(None, [lines[expr] if expr < len(lines) else '', f"({said})" if said else '']))
        message = f"the property does not hold: {text or 'assertion failed'}"
    else:
        message = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(': ')
        if isinstance(err, SyntaxError) and err.lineno:
            message += f" (line {err.lineno})"
    frames = [] if isinstance(err, (AssertionError, SyntaxError)) else traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if student_path and os.path.abspath(f.filename) == os.path.abspath(student_path)]
    if mine:
        message += f" (your code, {os.path.basename(mine[-1].filename)}:{mine[-1].lineno})"
    elif frames:  # raised in the model or a test, from what the student's function gave it
        message += f" (in {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}, called with your function)"
    return message if len(message) <= limit else message[:limit - 3] + '...'


class Grader:
    """A pytest plugin: keeps only the exercise's tests, in the exercise's order, and records each outcome."""

    def __init__(self, nodes):
        self.nodes, self.outcomes = nodes, {}

    def pytest_collection_modifyitems(self, session, config, items):
        by_node = {item.nodeid: item for item in items}
        items[:] = [by_node[node] for node in self.nodes if node in by_node]

    def pytest_runtest_makereport(self, item, call):
        if call.when == 'call' or call.excinfo is not None:
            doc = ' '.join((item.function.__doc__ or item.name.replace('_', ' ')).split())
            if hasattr(item, 'callspec'):  # a parametrized test: say which case
                doc += f" [{item.callspec.id}]"
            err = call.excinfo.value if call.excinfo is not None else None
            self.outcomes.setdefault(item.nodeid, (err, doc))


# Our report replaces pytest's: no tracebacks to format (--tb=no), no cache, and no unraisableexception plugin, whose
# five gc.collect() passes at the end of every session cost 0.4 s each with torch loaded (measured: 0.7 s -> 0.04 s of
# CPU to grade a blank stub).
PYTEST_ARGS = ['-q', '-p', 'no:cacheprovider', '-p', 'no:unraisableexception', '--tb=no', '-W', 'ignore']


def run_properties(ex, functions=None, student_path=None, exitfirst=False):
    """Run the exercise's property tests with `functions` swapped in (None: the project's own) -> [Result]."""
    module = importlib.import_module(ex.home)
    nodes = [node for node, _ in ex.properties]
    grader = Grader(nodes)
    if functions is not None:
        functions = {name: guarded(fn, getattr(module, name), ex.contracts[name], name)
                     for name, fn in functions.items()}
    files = sorted({os.path.join(ROOT, node.split('::')[0]) for node in nodes})
    args = [*files, *PYTEST_ARGS, '--rootdir', ROOT, '-c', os.path.join(ROOT, 'pytest.ini')] + ['-x'] * exitfirst
    with swapped(module, functions or {}), contextlib.redirect_stdout(io.StringIO()), quiet_plugins(), one_thread():
        pytest.main(args, plugins=[grader])
    return [result(node, hint, grader.outcomes, student_path, exitfirst) for node, hint in ex.properties]


def result(node, hint, outcomes, student_path, exitfirst):
    if node not in outcomes:
        why = 'not run: an earlier property failed' if exitfirst else 'missing: no such test (the check is out of date)'
        return Result(node, False, node.split('::')[-1], why, '')
    err, doc = outcomes[node]
    unwritten = isinstance(err, NotImplementedError)  # a blank stub: the hint would only give the answer away
    return Result(node, err is None, doc, '' if err is None else one_line(err, student_path), '' if unwritten else hint)


@contextlib.contextmanager
def one_thread():
    """The property tests use tiny models, where a second thread only adds waiting: on 2 busy cores one test took 14 s
    of CPU with torch's default threads and 0.1 s with one (measured for this check)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def quiet_plugins():
    """No third-party pytest plugins while grading: the property tests need none, and one that reorders or reseeds
    tests (pytest-randomly) would make a grade depend on what else is installed."""
    old = os.environ.get('PYTEST_DISABLE_PLUGIN_AUTOLOAD')
    os.environ['PYTEST_DISABLE_PLUGIN_AUTOLOAD'] = '1'
    try:
        yield
    finally:
        if old is None:
            del os.environ['PYTEST_DISABLE_PLUGIN_AUTOLOAD']
        else:
            os.environ['PYTEST_DISABLE_PLUGIN_AUTOLOAD'] = old


def grade(number, functions=None, solution=False, folder=HERE, exitfirst=False):
    """Grade exercise `number` -> [Result]. functions: {name: fn} to check; default the student's file in `folder`;
    solution=True checks the project's own functions."""
    ex = BY_NUMBER[number]
    path = os.path.join(folder, ex.file)
    if not solution and functions is None:
        try:
            functions = load_student(ex, folder)
        except ValueError as err:
            return [Result('load', False, f"{ex.file} loads and defines {', '.join(ex.names)}", str(err), '')]
    return run_properties(ex, None if solution else functions, path if os.path.isfile(path) else None, exitfirst)


# ----------------------------------------------------------------------------------------------------------------------
# Reports

def report(ex, results, seconds, solution=False, folder=HERE):
    """Lines for one exercise: a pass/fail line per property, the reason and a hint under each failure."""
    wrap = functools.partial(textwrap.fill, width=116, subsequent_indent=' ' * 8)
    source = "the project's own functions" if solution else os.path.relpath(os.path.join(folder, ex.file))
    lines = [f"exercise {ex.number}: {', '.join(ex.names)}   ({source})"]
    for r in results:
        lines.append(wrap(f"  {'ok  ' if r.passed else 'FAIL'}  {r.statement}"))
        if not r.passed:
            lines.append(wrap(f"        why:  {r.why}"))
            if r.hint:
                lines.append(wrap(f"        hint: {r.hint}"))
    held = sum(r.passed for r in results)
    done = '   -> done' if held == len(results) else ''
    lines.append(f"  {held}/{len(results)} properties hold ({seconds:.1f} s){done}")
    return lines


def scoreboard(rows):
    """rows: (exercise, results, seconds, blank) -> the table `check all` ends with."""
    width = max(len(', '.join(ex.names)) for ex, *_ in rows)
    lines = ['', f" # {'exercise':{width}}  properties  seconds  status"]
    for ex, results, seconds, blank in rows:
        held = sum(r.passed for r in results)
        status = 'done' if held == len(results) else 'not started' if blank else 'in progress'
        score = f'{held}/{len(results)}'
        lines.append(f"{ex.number:>2} {', '.join(ex.names):{width}}  {score:>10}  {seconds:>7.1f}  {status}")
    done = sum(all(r.passed for r in results) for _, results, _, _ in rows)
    lines.append(f"{done} of {len(rows)} exercises done")
    return lines


def check(which, solution=False, folder=HERE):
    """Grade one exercise or all of them and print the report; returns the process exit code (0: all hold)."""
    numbers = sorted(BY_NUMBER) if which == 'all' else [which]
    rows = []
    for n in numbers:
        t0 = time.time()
        results = grade(n, solution=solution, folder=folder)
        seconds = time.time() - t0
        print('\n'.join(report(BY_NUMBER[n], results, seconds, solution, folder)), flush=True)
        rows.append((BY_NUMBER[n], results, seconds, not solution and student_is_blank(BY_NUMBER[n], folder)))
    if which == 'all':
        print('\n'.join(scoreboard(rows)))
    return 0 if all(r.passed for _, results, _, _ in rows for r in results) else 1


def student_is_blank(ex, folder):
    try:
        return all(is_blank(fn) for fn in load_student(ex, folder).values())
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------------------

USAGE = """usage: python -m exercises check N|all [--solution] [--dir=FOLDER]
       python -m exercises observe N [--solution] [--dir=FOLDER] [--ckpt=PATH]
  N is an exercise number, 1..6 (exercises/README.md lists them); --solution uses the project's own functions;
  --dir takes the exercise files from FOLDER instead of exercises/; --ckpt is the trained model observe 4 and 5 use."""


def parse_args(argv):
    """-> (command, exercise number or 'all', solution, folder, ckpt); ValueError with one line for anything else."""
    options, positional = {'solution': False, 'dir': HERE, 'ckpt': ''}, []
    for arg in argv:
        key, eq, value = arg[2:].partition('=')
        if arg == '--solution':
            options['solution'] = True
        elif arg.startswith('--') and eq and key in ('dir', 'ckpt'):
            options[key] = os.path.abspath(value)
        elif arg.startswith('-'):
            raise ValueError(f"option {arg!r} is not allowed: expected --solution, --dir=FOLDER or --ckpt=PATH")
        else:
            positional.append(arg)
    if len(positional) == 1:  # `python exercises/check.py 3` means `check 3`
        positional.insert(0, 'check')
    if len(positional) != 2 or positional[0] not in ('check', 'observe'):
        raise ValueError(f"expected `check N|all` or `observe N`, got {' '.join(argv) or 'nothing'!r}")
    command, which = positional
    allowed = [str(n) for n in BY_NUMBER] + (['all'] if command == 'check' else [])
    if which not in allowed:
        raise ValueError(f"exercise {which!r} is not allowed: expected one of {', '.join(allowed)}")
    if not os.path.isdir(options['dir']):
        raise ValueError(f"--dir={options['dir']!r} is not a folder")
    return command, which if which == 'all' else int(which), options['solution'], options['dir'], options['ckpt']


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ('-h', '--help', 'help'):
        print(USAGE)
        return 0
    try:
        command, which, solution, folder, ckpt = parse_args(argv)
        if command == 'check':
            return check(which, solution, folder)
        from exercises import observe
        return observe.main(which, solution, folder, ckpt)
    except ValueError as err:
        print(f"error: {err} (python -m exercises --help)", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
