"""
Poor Man's Configurator, as in nanoGPT, but strict. Example:
$ python train.py config/override_file.py --batch_size=32
this will first run config/override_file.py, then override batch_size to 32.

- Config files are Python and are executed: only the files you name on the command line.
  They may set known keys only (helper names starting with '_' and imported modules are ignored).
- --key=value is parsed as a Python literal (ast.literal_eval) and NEVER executed; a value that is
  not a literal is taken as a plain string.
- Unknown keys and values of the wrong type are errors: one line on stderr, exit code 2.
"""

import os
import sys
import types
from ast import literal_eval


def fail(message):
    """Report bad input in one line and stop before any work is done (exit code 2)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_choice(config, key, allowed):
    """fail() unless config[key] is one of `allowed`."""
    if config[key] not in allowed:
        fail(f"{key}={config[key]!r}; allowed: {', '.join(map(repr, allowed))}")


def _parse(text, default):
    """A string key takes the text as typed (--wandb_run_name=123 is '123'); any other key takes a
    Python literal (ast.literal_eval: never executed), or the text if it is no literal."""
    if isinstance(default, str):
        return text
    try:
        return literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return text


def _checked(key, value, config, source):
    if key not in config:
        fail(f"unknown config key {key!r} (from {source}); known keys: {', '.join(sorted(config))}")
    default = config[key]
    if default is None or value is None or type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    fail(f"{key}={value!r} (from {source}) must be of type {type(default).__name__}, got {type(value).__name__}")


def configure(config, args):
    """Apply config files and --key=value overrides from `args` to the dict `config`, in order."""
    for arg in args:
        if '=' not in arg:
            # assume it's the name of a config file
            if arg.startswith('-'):
                fail(f"bad argument {arg!r}: use --key=value or a config file path")
            if not os.path.isfile(arg):
                fail(f"config file {arg!r} not found")
            print(f"Overriding config with {arg}:")
            with open(arg) as f:
                source = f.read()
            print(source)
            namespace = {}
            exec(compile(source, arg, 'exec'), namespace)
            for key, value in namespace.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue
                config[key] = _checked(key, value, config, arg)
        else:
            # assume it's a --key=value argument
            if not arg.startswith('--'):
                fail(f"bad argument {arg!r}: use --key=value")
            key, val = arg[2:].split('=', 1)
            config[key] = _checked(key, _parse(val, config.get(key)), config, arg)
            print(f"Overriding: {key} = {config[key]!r}")
    return config
