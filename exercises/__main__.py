"""The exercises' command line: python -m exercises check N|all, or observe N (USAGE below, exercises/README.md)."""
import os
import sys
import textwrap

import torch

from configurator import configure
from exercises import check, observe

USAGE = """usage: python -m exercises check N|all [--solution] [--dir=FOLDER]
       python -m exercises observe N [--solution] [--dir=FOLDER] [--ckpt=PATH]
  N is an exercise number, 1..6 (exercises/README.md lists them); --solution uses the project's own functions;
  --dir takes the exercise files from FOLDER instead of exercises/; --ckpt is the trained model observe 4 and 5 use."""


def parse_args(argv):
    """-> (command, exercise number or 'all', {solution, dir, ckpt}); ValueError with one line for anything else."""
    positional = [arg for arg in argv if not arg.startswith('--')]
    opts = configure(dict(solution=False, dir=check.HERE, ckpt=''), [arg for arg in argv if arg.startswith('--')])
    if len(positional) != 2 or positional[0] not in ('check', 'observe'):
        raise ValueError(f"expected `check N|all` or `observe N`, got {' '.join(argv) or 'nothing'!r}")
    command, which = positional
    allowed = [str(n) for n in check.BY_NUMBER] + ['all'] * (command == 'check')
    if which not in allowed:
        raise ValueError(f"exercise {which!r} is not allowed: expected one of {', '.join(allowed)}")
    if not os.path.isdir(opts['dir']):
        raise ValueError(f"--dir={opts['dir']!r} is not a folder")
    if opts['ckpt'] and not os.path.exists(opts['ckpt']):  # never a silent random model instead
        raise ValueError(f"--ckpt={opts['ckpt']!r} does not exist: train one, or leave --ckpt out")
    return command, which if which == 'all' else int(which), dict(opts, dir=os.path.abspath(opts['dir']))


def main(argv=None):
    """Grade (check) or run the experiment (observe) with the student's functions swapped in, or the project's own."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (['-h'], ['--help'], ['help']):
        print(USAGE)
        return 0
    try:
        command, which, opts = parse_args(argv)
        if command == 'check':
            return check.check(which, opts['solution'], opts['dir'])
        ex, experiment = check.BY_NUMBER[which], getattr(observe, f'observe_{which}')
        whose = "the project's own functions" if opts['solution'] else f"your {', '.join(ex.names)}"
        print(textwrap.fill(f"exercise {which}, with {whose}: {' '.join(experiment.__doc__.split())}", 120) + '\n')
        torch.set_num_threads(1)  # small models: a second thread only waits, badly so on a busy machine
        with check.swapped(ex.home, {} if opts['solution'] else check.load_student(ex, opts['dir'])):
            experiment(opts['ckpt'])
        return 0
    except ValueError as err:  # ours, already one line (a bad argument, a checkpoint that is not one)
        message = err
    except NotImplementedError:
        message = f"exercise {which} is not written yet: write it, or add --solution to watch the project's function"
    except Exception as err:  # the student's code failing inside an experiment: one line, not a traceback
        message = f"the experiment failed: {check.one_line(err, os.path.join(opts['dir'], ex.file))}"
    print(f"error: {message} (python -m exercises --help)", file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
