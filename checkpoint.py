"""
Checkpoints: written atomically, loaded safely.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
torch.load(weights_only=True): loading one never runs code from the file.
"""

import os
import pickle
import tempfile

import torch


class CheckpointError(Exception):
    pass


def save_checkpoint(obj, path):
    """Write to a temp file in the same folder, fsync, then rename over `path`: a crash at any
    moment leaves either the old checkpoint or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location='cpu'):
    """torch.load(weights_only=True) with one clear error for a missing, truncated or corrupt file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be loaded ({first_line[:200]})") from None
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a nanoMoE checkpoint (no 'model'/'model_args')")
    return ckpt


def clean_state_dict(state_dict):
    """Strip the '_orig_mod.' prefix that torch.compile adds to parameter names."""
    unwanted_prefix = '_orig_mod.'
    return {k[len(unwanted_prefix):] if k.startswith(unwanted_prefix) else k: v for k, v in state_dict.items()}
