"""
The one configurator every script uses (nanoGPT's, without exec'd globals): a script's defaults dict, overridden in
argv order by config files (positional arguments) and --key=value. A value keeps its default's type: strings stay as
typed, the rest are Python literals (3, 1e-3, True; a bool also takes true/false/1/0, a bare --flag is True); a None
default takes any literal, for the script's check(). Each bad key, type, value or device is a one-line ValueError.
"""
import ast
import math
import os
import types

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}  # autocast; float32 = off


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
    if defaults[key] is None:  # None or a literal: the script checks the value
        return value
    expected = type(defaults[key])
    value = float(value) if expected is float and type(value) is int else value  # 3 for a float is 3.0
    if type(value) is not expected:
        raise ValueError(f"{key}={value!r} (from {source}) is {type(value).__name__}, expected {expected.__name__} "
                         f"like the default {defaults[key]!r}")
    if expected is float and not math.isfinite(value):
        raise ValueError(f"{key}={value!r} (from {source}) is not allowed: expected a finite number")
    return value


def read_config_file(path):
    """The plain values a config file assigns, not its imports and functions. It is exec'd, as in nanoGPT: a config
    file is Python you write and run like the scripts. Nothing else nanoloop reads (data, checkpoints) is executed."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found (a positional argument is a config file; use --key=value)")
    try:
        exec(open(path).read(), namespace := {})
    except Exception as e:
        raise ValueError(f"config file {path!r} failed to run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType) and not callable(v)}


def check_device(device, dtype='float32'):
    """device exists on this machine and dtype runs there (CPU autocast runs bfloat16: float16 is GPU only)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed: expected one of {tuple(DTYPES)}")
    n_cuda, mps = torch.cuda.device_count(), torch.backends.mps.is_available()
    try:
        dev = torch.device(device)
    except RuntimeError:  # not a device string at all: 'foo', 'cuda:x'
        dev = torch.device('meta')
    if not (dev.type == 'cpu' or (dev.type == 'cuda' and (dev.index or 0) < n_cuda) or (dev.type == 'mps' and mps)):
        available = ['cpu', *(f'cuda:{i}' for i in range(n_cuda)), *(['mps'] if mps else [])]
        raise ValueError(f"device={device!r} is not available here: this machine has {', '.join(available)}")
    if dtype == 'float16' and dev.type == 'cpu':
        raise ValueError("dtype='float16' is not allowed on the CPU: expected 'bfloat16' or 'float32' there")
    if dtype == 'bfloat16' and dev.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype='bfloat16' is not supported by {device}: expected 'float16' or 'float32'")


def sync(device):
    """CUDA launches are asynchronous: wait for the GPU so that a clock measures its work, not the launch."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()
