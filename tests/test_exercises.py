"""exercises/ (issue 10): every check fails on its blank stub, passes on the project's own function, and names the
property that a planted wrong answer breaks. The checks run the project's property tests in-process, no network."""
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model  # noqa: E402
from exercises import check  # noqa: E402

REAL_KL = model.kl_converged
NUMBERS = sorted(check.BY_NUMBER)


def failures(results):
    return [r for r in results if not r.passed]


# -- planted wrong answers: each is one classic mistake --------------------------------------------------------------

def depth_without_plus_one(mean_depth, max_depth, generator=None, sigma=0.5):
    tau = torch.normal(math.log(mean_depth) - sigma ** 2 / 2, sigma, (1,), generator=generator)
    return int(min(torch.poisson(tau.exp(), generator=generator).item(), max_depth))  # r = Poisson(e^tau), no + 1


def inject_ignoring_e(s, e, kind, adapter=None):
    return adapter(torch.cat([s, torch.zeros_like(e)], dim=-1)) if kind == 'concat' else s


def full_backprop(step, s, r, k):
    for i in range(r):  # every iteration recorded: k is ignored
        s = step(s, i)
    return s


def kl_with_less_or_equal(logp_prev, logp, eps):
    return (logp.exp() * (logp - logp_prev)).sum(-1).clamp_min(0) <= eps


def knee_at_the_midpoint(curve):
    return len(curve) // 2


def fill_with_zeros(loop_kv, depths, pos):
    for b, d in enumerate(depths.tolist()):
        loop_kv[d:, :, :, b, :, pos] = 0  # the missing entries zeroed instead of copied from iteration d - 1


PLANTED = [
    (1, 'sample_depth', depth_without_plus_one, 'test_depth_sampler_mean_is_mean_depth_plus_one_and_respects_the_cap'),
    (2, 'inject', inject_ignoring_e, 'test_injection_is_its_section_2_formula[concat]'),
    (3, 'truncated_loop', full_backprop, 'test_truncated_loop_runs_r_steps_and_backprops_through_the_last_k[5-2]'),
    (4, 'kl_converged', kl_with_less_or_equal, 'test_kl_exit_clamps_negative_kl_so_threshold_zero_never_exits'),
    (5, 'find_knee', knee_at_the_midpoint, 'test_knee_of_a_falling_curve_is_where_it_turns_flat'),
    (6, 'fill_latest', fill_with_zeros, 'test_fill_latest_copies_each_rows_last_entry_to_its_later_iterations'),
]


# -- the three promises of every check ---------------------------------------------------------------------------------

@pytest.mark.parametrize('number', NUMBERS)
def test_blank_stub_fails_every_property_of_its_exercise(number):
    """The shipped stub raises NotImplementedError, and each property of its check fails on that (not on anything
    else): every property really calls the student's function."""
    ex = check.BY_NUMBER[number]
    stubs = check.load_student(ex)
    if not all(check.is_blank(fn) for fn in stubs.values()):
        pytest.skip(f"exercises/{ex.file} has been edited: it is no longer the blank stub")
    results = check.grade(number)
    assert len(results) == len(ex.properties) and not any(r.passed for r in results)
    assert all('NotImplementedError' in r.why for r in results), [r.why for r in results]


@pytest.mark.parametrize('number', NUMBERS)
def test_project_function_passes_its_exercise(number):
    """The product's own functions (the solutions) pass every property of their exercise's check."""
    results = check.grade(number, solution=True)
    assert results and not failures(results), [(r.node, r.why) for r in failures(results)]


@pytest.mark.parametrize('number, name, wrong, prop', PLANTED, ids=[p[2].__name__ for p in PLANTED])
def test_planted_wrong_answer_fails_with_a_message_naming_the_property(number, name, wrong, prop):
    """A classic mistake fails its check first at the property it breaks, and the report's FAIL line states it."""
    results = check.grade(number, functions={name: wrong}, exitfirst=True)
    first = failures(results)[0]
    assert first.node.endswith(prop), (first.node, first.why)
    lines = check.report(check.BY_NUMBER[number], results, 0.0)
    fail_line = next(line for line in lines if line.lstrip().startswith('FAIL'))
    assert first.statement[:40] in fail_line and first.why and first.hint, lines


# -- readable failures -------------------------------------------------------------------------------------------------

def test_wrong_shape_is_one_line_saying_what_shape_is_expected():
    """A student's function returning the wrong shape gets one line naming the function, the shape it returned and
    the shape it must have, instead of a shape error deep inside the model."""
    forgot_adapter = lambda s, e, kind, adapter=None: torch.cat([s, e], dim=-1)
    why = failures(check.grade(2, functions={'inject': forgot_adapter}, exitfirst=True))[0].why
    assert why.startswith('your inject returned') and 'it must have the shape of s' in why and '\n' not in why, why


def test_error_in_the_student_file_names_its_line(tmp_path):
    """An exception raised in the student's own code is one line with its type and file:line."""
    (tmp_path / 'ex4_kl_exit.py').write_text(
        "def kl_converged(logp_prev, logp, eps):\n"
        "    return (logp.exp() * (logp - logp_prev[..., :3])).sum(-1) < eps\n")
    why = failures(check.grade(4, folder=str(tmp_path), exitfirst=True))[0].why
    assert why.startswith('RuntimeError') and 'ex4_kl_exit.py:2' in why and '\n' not in why, why


def test_file_that_does_not_load_is_one_failing_line(tmp_path):
    """A syntax error in the student's file is one failing line that says the file does not load and where."""
    (tmp_path / 'ex1_sample_depth.py').write_text("def sample_depth(mean_depth, max_depth:\n    return 1\n")
    results = check.grade(1, folder=str(tmp_path))
    assert len(results) == 1 and not results[0].passed
    assert 'does not load' in results[0].why and 'SyntaxError' in results[0].why and '\n' not in results[0].why


def test_the_swap_reaches_the_model_path_and_is_undone():
    """An exit rule that always holds makes the model's own adaptive exit stop at depth 1 (so model.EXIT_RULES got
    the swap), and after grading model.kl_converged and EXIT_RULES are the project's again."""
    always = lambda logp_prev, logp, eps: torch.ones(logp.shape[:-1], dtype=torch.bool)
    results = {r.node.split('::')[-1]: r for r in check.grade(4, functions={'kl_converged': always})}
    assert not results['test_teacher_forced_exit_threshold_zero_is_max_depth_and_huge_is_one'].passed
    assert model.kl_converged is REAL_KL and model.EXIT_RULES['kl'][0] is REAL_KL


def test_cli_grades_without_traceback(tmp_path):
    """`python -m exercises check N` on an unwritten exercise exits 1 with FAIL lines and no traceback."""
    (tmp_path / 'ex4_kl_exit.py').write_text("def kl_converged(logp_prev, logp, eps):\n    raise NotImplementedError\n")
    graded = subprocess.run([sys.executable, '-m', 'exercises', 'check', '4', f'--dir={tmp_path}'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert graded.returncode == 1 and 'FAIL' in graded.stdout, graded.stdout + graded.stderr
    assert 'Traceback' not in graded.stdout + graded.stderr


@pytest.mark.parametrize('argv, word', [
    (['check', '9'], "'9'"), (['observe', 'all'], "'all'"), ([], 'nothing'), (['check', '1', '--fast'], '--fast'),
    (['check', '1', '--dir=/nowhere'], 'nowhere')])
def test_bad_command_line_is_one_error_line_naming_it(argv, word, capsys):
    """A bad exercise, command, option or folder exits 2 with one `error:` line naming the bad value."""
    assert check.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error:') and len(err.strip().splitlines()) == 1 and word in err, err
