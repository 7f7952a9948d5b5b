"""
Poor Man's Configurator, as in nanoGPT, but strict. Example:
$ python train.py config/override_file.py --batch_size=32
this will first run config/override_file.py, then override batch_size to 32.

- Config files are Python and are executed: only the files you name on the command line.
  They may set known keys only (helper names starting with '_' and imported modules are ignored).
- --key=value is parsed as a Python literal (ast.literal_eval) and NEVER executed; a value that is
  not a literal is taken as a plain string.
- Unknown keys and values of the wrong type are errors: one line on stderr, exit code 2. So is a config
  file that is not UTF-8 text, does not compile, raises, or calls sys.exit.
- Other dialects: a table of foreign keys (`foreign`: FORK_KEYS below, the seed forks') translates
  theirs into these, with one printed line per file or override saying what was translated or ignored.
"""

import os
import re
import sys
import types
from ast import literal_eval
from contextlib import contextmanager
from dataclasses import dataclass


def fail(message):
    """Report bad input in one line and stop before any work is done (exit code 2)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def fail_on(*errors, prefix=''):
    """`with fail_on(ValueError): ...`: one of these errors in the block is bad input: fail(its message)."""
    try:
        yield
    except errors as e:
        fail(prefix + str(e))


# -----------------------------------------------------------------------------
# checks of values, before any work: each fails with one line naming the value and what is allowed


def check_choice(config, key, allowed):
    """config[key] is one of `allowed`."""
    if config[key] not in allowed:
        fail(f"{key}={config[key]!r}; allowed: {', '.join(map(repr, allowed))}")


def check_range(config, keys, low, high=None):
    """low <= config[key] (< high if given, else finite) for each key."""
    for key in keys:
        if not low <= config[key] < (float('inf') if high is None else high):
            fail(f"{key}={config[key]} must be >= {low} and " + (f"< {high}" if high is not None
                                                                 else "finite"))


def check_device(device):
    """'cpu', 'cuda' or 'cuda:N', and there."""
    import torch
    if not re.fullmatch(r'cpu|cuda(:\d+)?', device):
        fail(f"device={device!r}; allowed: 'cpu', 'cuda', 'cuda:N' (mps and other devices are not supported)")
    if device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={device!r} but CUDA is not available here; use --device=cpu")
    if device.startswith('cuda:') and int(device[5:]) >= torch.cuda.device_count():
        fail(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA devices")


def available_memory(device):
    """Bytes the run may use: the GPU's memory, or the machine's RAM that is available now (MemAvailable:
    other processes' memory is not ours), else all of it."""
    import torch
    if device.startswith('cuda'):
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError, IndexError):
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_memory(need, device, hint="make it smaller (batch_size, block_size, n_layer, n_embd, n_expert, "
                                    "expert_hidden) or recompute activations (activation_checkpointing)"):
    """need ({part: bytes}, init_model.memory_need) fits in the device's memory, else one line naming the
    parts: checked before anything is allocated, instead of an out-of-memory kill minutes later. Processes
    sharing a CPU (torchrun's LOCAL_WORLD_SIZE ranks) share its RAM."""
    ranks = 1 if device.startswith('cuda') else int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    total, have = ranks * sum(need.values()), available_memory(device)
    if total > have:
        parts = ', '.join(f"{k} {v / 2**30:.1f}" for k, v in need.items())
        ranks = f"; times {ranks} ranks" if ranks > 1 else ''
        fail(f"the run needs at least {total / 2**30:.1f} GiB ({parts}{ranks}), more than the "
             f"{have / 2**30:.1f} GiB available on {device}; {hint}")


def check_dataset(data_dir, dataset, block_size):
    """train.bin and val.bin exist and hold uint16 token ids, at least block_size + 1 of them. Only their
    sizes are read (a 9B-token file costs nothing here); train.py checks the ids of every batch."""
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.exists(path):
            fail(f"dataset {dataset!r} is not prepared: {path} is missing; " + (
                "write train.bin and val.bin there (uint16 token ids; "
                "see data/openwebtext/prepare.py --out_dir)"
                if os.path.isabs(dataset) else f"run: python data/{dataset}/prepare.py"))
        size = os.path.getsize(path)
        if size % 2 or size // 2 < block_size + 1:
            fail(f"{path} holds {size} bytes: it must be uint16 token ids (an even number of bytes), "
                 f"at least block_size + 1 = {block_size + 1} of them")


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
    fail(f"{key}={value!r} (from {source}) must be of type {type(default).__name__}, "
         f"got {type(value).__name__}")


def _translate(found, seen, foreign, source, config, given):
    """Apply the foreign keys `found` of one source (a file or an override) through the table `foreign`
    (ForkKey rows), and print one line per fork of what was translated and one of what was
    ignored, with why. `seen` holds every foreign key given so far: a key whose switch is False there is
    dropped, and a switch given here applies (or drops) the keys it gates that were given before."""
    seen.update(found)
    translated, ignored = {}, {}
    for key, row in foreign.items():  # the table's order
        if key not in found and not (row.switch in found and key in seen):
            continue
        value, said = seen[key], f"{key}={seen[key]!r}"
        if row.switch in seen and not seen[row.switch]:
            ignored.setdefault(row.fork, []).append(f"{said}: {row.switch}={seen[row.switch]!r} turns it off")
            continue
        out = row.translate(value)
        if isinstance(out, str):
            ignored.setdefault(row.fork, []).append(f"{said}: {out}")
            continue
        for k, v in out.items():
            config[k] = _checked(k, v, config, f"{source}, for {said}")
            given.add(k)
        to = [', '.join(f"{k}={v!r}" for k, v in out.items())] if out else []
        to += [f"({row.note})"] if row.note else []
        translated.setdefault(row.fork, []).append(f"{said} -> {' '.join(to) or '(on)'}")
    for fork, items in translated.items():
        print(f"translated from {fork}'s keys: {'; '.join(items)}")
    for fork, items in ignored.items():
        print(f"ignored {fork}'s keys: {'; '.join(items)}")




def _run_config_file(path):
    """The names a config file sets (it is Python, and executed). A file that is not UTF-8 text, does not
    compile, raises or exits (sys.exit: nothing would run, with exit code 0) is one line naming it."""
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
        code = compile(source, path, 'exec')
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else e.reason
        fail(f"config file {path!r} cannot be read as UTF-8 text ({reason})")
    except (SyntaxError, ValueError) as e:  # (ValueError: null bytes, before Python 3.12)
        where = f" (line {e.lineno})" if getattr(e, 'lineno', None) else ''
        fail(f"config file {path!r} is not valid Python{where}: {getattr(e, 'msg', None) or e}")
    print(f"Overriding config with {path}:")
    print(source)
    namespace = {}
    try:
        exec(code, namespace)
    except SystemExit as e:
        fail(f"config file {path!r} calls sys.exit({e.code!r}): a config file only sets keys")
    except Exception as e:
        tb = e.__traceback__
        line = None
        while tb is not None:  # the file's own line, not that of whatever it called
            line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == path else line
            tb = tb.tb_next
        fail(f"config file {path!r} raised {type(e).__name__}" + (f" at line {line}" if line else '')
             + (f": {' '.join(str(e).split())[:200]}" if str(e).strip() else ''))
    return namespace


def configure(config, args, given=None, foreign=None):
    """Apply config files and --key=value overrides from `args` to the dict `config`, in order. The set
    `given`, if passed, collects the keys they set (also to their default value). `foreign`, if passed,
    maps keys of other dialects to these (FORK_KEYS); a key of `config` is never foreign."""
    given = set() if given is None else given
    foreign = {} if foreign is None else foreign
    seen = {}  # the foreign keys given so far, for their switches
    for arg in args:
        if '=' not in arg:
            # assume it's the name of a config file
            if arg.startswith('-'):
                fail(f"bad argument {arg!r}: use --key=value or a config file path")
            if not os.path.isfile(arg):
                fail(f"config file {arg!r} not found")
            namespace, found = _run_config_file(arg), {}
            for key, value in namespace.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue
                if key not in config and key in foreign:
                    found[key] = value
                    continue
                config[key] = _checked(key, value, config, arg)
                given.add(key)
            if found:  # after the file's own keys: a switch in it wins over them
                _translate(found, seen, foreign, arg, config, given)
        else:
            # assume it's a --key=value argument
            if not arg.startswith('--'):
                fail(f"bad argument {arg!r}: use --key=value")
            key, val = arg[2:].split('=', 1)
            if key not in config and key in foreign:
                _translate({key: _parse(val, None)}, seen, foreign, arg, config, given)
                continue
            config[key] = _checked(key, _parse(val, config.get(key)), config, arg)
            given.add(key)
            print(f"Overriding: {key} = {config[key]!r}")
    return config


# -----------------------------------------------------------------------------
# The seed forks' config keys, so that their config files run here unchanged: configure (above)
# translates each key of sijunhe/nanoMoE or wolfecameron/nanoMoE (none of them is one of this repo's) into
# this repo's keys and prints what it did. translate(value) gives this repo's keys, or a string: why the key
# is ignored. A key gated by a switch (aux_loss_weight by use_aux_loss) is dropped while its switch is False,
# whatever the order they are given in (a switch the files leave out counts as on). The semantics that
# differ (balance-loss scale, capacity at eval, which blocks are MoE) are in README's nanoGPT paragraph.


@dataclass(frozen=True)
class ForkKey:
    fork: str
    translate: object   # value -> {this repo's key: value}, or a str: why the key is ignored
    switch: str = None  # the fork's switch that turns this key off when False
    note: str = ''      # printed beside the translation: what still differs


SIJUNHE, WOLFE = 'sijunhe/nanoMoE', 'wolfecameron/nanoMoE'
_FP32 = 'the router always runs in float32 here'
_INIT = "GPT-2's init here (normal(0, 0.02), residual projections / sqrt(2 * n_layer)), not Switch's"
FORK_KEYS = {
    # sijunhe: use_moe makes every block MoE (no z-loss); its balance loss pools all layers' tokens
    'use_moe': ForkKey(SIJUNHE, lambda v: {'moe_every': 1} if v else {'n_expert': 0}),
    'num_experts': ForkKey(SIJUNHE, lambda v: {'n_expert': v}, switch='use_moe'),
    'expert_load_balance_loss_coef': ForkKey(SIJUNHE, lambda v: {'aux_loss_coef': v}),
    'gradient_checkpointing': ForkKey(SIJUNHE, lambda v: {'activation_checkpointing': 'all' if v else 'none'},
                                      note='its whole blocks; here attention and experts, not the router'),
    # wolfe: n_exp=1 is the dense GPT; MoE in blocks i % stride == 0; always capacity-based (token dropping)
    'n_exp': ForkKey(WOLFE, lambda v: {'n_expert': 0 if v == 1 else v}),
    'use_aux_loss': ForkKey(WOLFE, lambda v: {} if v else {'aux_loss_coef': 0.0}),
    'aux_loss_weight': ForkKey(WOLFE, lambda v: {'aux_loss_coef': v}, switch='use_aux_loss'),
    'use_router_z_loss': ForkKey(WOLFE, lambda v: {} if v else {'z_loss_coef': 0.0}),
    'router_z_loss_weight': ForkKey(WOLFE, lambda v: {'z_loss_coef': v}, switch='use_router_z_loss'),
    'use_noisy_top_k': ForkKey(WOLFE, lambda v: {'router_noise': bool(v)}),
    'train_capacity': ForkKey(WOLFE, lambda v: {'capacity_factor': v, 'expert_impl': 'batched'},
                              note='capacity_factor applies at eval too'),
    'eval_capacity': ForkKey(WOLFE, lambda v: "capacity_factor (train_capacity's) applies at eval too here"),
    'min_capacity': ForkKey(WOLFE, lambda v: "capacity here is ceil(capacity_factor * tokens * top_k / "
                                             "n_expert), with no minimum"),
    'stride': ForkKey(WOLFE, lambda v: {'moe_every': v},
                      note="MoE here: blocks with (i + 1) % moe_every == 0; in the fork: i % stride == 0"),
    'use_switch_tfm_init': ForkKey(WOLFE, lambda v: _INIT if v else {}, note=_INIT),
    'switch_tfm_init_scale': ForkKey(WOLFE, lambda v: _INIT),
    'router_use_full_prec': ForkKey(WOLFE, lambda v: {} if v else _FP32, note=_FP32),
}
