"""
The one configurator every script uses (nanoGPT's, without its exec'd globals): a script's defaults dict, overridden
in argv order by config files (positional arguments) and --key=value, e.g.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False --eval_only

A value keeps its default's type: strings stay as typed, anything else is a Python literal (3, 1e-3, True); a bool
also takes true/false/1/0, and a bare --flag sets it True. A bad key or type is a ValueError of one line.
"""
import ast
import math
import os
import types


def configure(defaults, argv):
    """A new dict: defaults overridden by each argument of argv in turn (a config file or --key=value)."""
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            value = parse_value(raw, defaults.get(key)) if eq else True  # a bare --flag switches a bool on
            cfg[key] = checked(defaults, key, value, arg)
        else:
            for key, value in read_config_file(arg).items():
                cfg[key] = checked(defaults, key, value, arg)
    return cfg


def parse_value(raw, default):
    """'--key=raw' -> a value of the default's type where possible; checked() names anything else."""
    if isinstance(default, str):
        return raw
    if isinstance(default, bool) and raw.lower() in ('true', 'false', '1', '0'):
        return raw.lower() in ('true', '1')
    try:
        return ast.literal_eval(raw)  # literals only: a command line never runs code
    except (ValueError, SyntaxError):
        return raw


def checked(defaults, key, value, source):
    """value, if key is a config key and value has its default's type (an int is accepted for a float)."""
    if key not in defaults:
        raise ValueError(f"unknown config key {key!r} (from {source}); allowed: {', '.join(sorted(defaults))}")
    expected = type(defaults[key])
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:
        raise ValueError(f"{key}={value!r} (from {source}) is {type(value).__name__}, expected {expected.__name__} "
                         f"like the default {defaults[key]!r}")
    if expected is float and not math.isfinite(value):
        raise ValueError(f"{key}={value!r} (from {source}) is not allowed: expected a finite number")
    return value


def read_config_file(path):
    """The plain values a config file assigns; its imports and helper functions are skipped.
    The file is exec'd, as in nanoGPT: a config file is Python the user writes and runs, like the scripts themselves,
    so run only config files you would run as code. Nothing else nanoloop reads (data, checkpoints) is executed."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found (positional arguments are config files; "
                         f"single values go as --key=value)")
    namespace = {}
    try:
        exec(open(path).read(), namespace)
    except Exception as e:
        raise ValueError(f"config file {path!r} failed to run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType) and not callable(v)}
