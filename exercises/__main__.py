"""The exercises' command line: python -m exercises check N|all, or observe N (USAGE below, exercises/README.md)."""
import os
import sys

from exercises import check, observe

USAGE = """usage: python -m exercises check N|all [--solution] [--dir=FOLDER]
       python -m exercises observe N [--solution] [--dir=FOLDER] [--ckpt=PATH]
  N is an exercise number, 1..6 (exercises/README.md lists them); --solution uses the project's own functions;
  --dir takes the exercise files from FOLDER instead of exercises/; --ckpt is the trained model observe 4 and 5 use."""


def parse_args(argv):
    """-> (command, exercise number or 'all', solution, folder, ckpt); ValueError with one line for anything else."""
    options, positional = {'solution': False, 'dir': check.HERE, 'ckpt': ''}, []
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
    if len(positional) != 2 or positional[0] not in ('check', 'observe'):
        raise ValueError(f"expected `check N|all` or `observe N`, got {' '.join(argv) or 'nothing'!r}")
    command, which = positional
    allowed = [str(n) for n in check.BY_NUMBER] + (['all'] if command == 'check' else [])
    if which not in allowed:
        raise ValueError(f"exercise {which!r} is not allowed: expected one of {', '.join(allowed)}")
    if not os.path.isdir(options['dir']):
        raise ValueError(f"--dir={options['dir']!r} is not a folder")
    if options['ckpt'] and not os.path.exists(options['ckpt']):  # never a silent random model instead
        raise ValueError(f"--ckpt={options['ckpt']!r} does not exist: train one, or leave --ckpt out")
    return command, which if which == 'all' else int(which), options['solution'], options['dir'], options['ckpt']


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ('-h', '--help', 'help'):
        print(USAGE)
        return 0
    try:
        command, which, solution, folder, ckpt = parse_args(argv)
        if command == 'check':
            return check.check(which, solution, folder)
        return observe.main(which, solution, folder, ckpt)
    except ValueError as err:
        print(f"error: {err} (python -m exercises --help)", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
