"""
A grouped GEMM for the CPU that runs the groups side by side. torch's grouped_mm on the CPU runs an MoE
layer's expert GEMMs one after another, each split over all threads, and an expert's GEMM (tens to a few
hundred rows) is too small to split well. cpu_grouped_mm.cpp instead gives each thread an equal share of
the work, whole groups where it can (a big group is cut into slices of rows), each product at::mm's on one
thread (in float32, the BLAS call at::mm would make, made directly), so the arithmetic is torch's own. On
2 threads one MoE layer of 128 experts (64 rows each) went from 1.37x to 1.23x the time of a dense MLP of the
same FLOPs (RESULTS.md, "One MoE layer").

It is compiled on first use with torch.utils.cpp_extension (a C++ compiler and ninja; a few seconds) into a
folder named after a hash of the source, the flags and torch's version, under ~/.cache/torch_extensions (or
$TORCH_EXTENSIONS_DIR). Once built, every process loads the library from there directly, taking no lock
(torch's own load() takes the build lock, even for a no-op build). A build holds a flock on <folder>.lock,
which the kernel releases however the build ends: the next process waits for a live build (at most
BUILD_WAIT_S), and a build killed midway (kill -9), whose folder torch would wait on forever, is built again
at once. The library defines the ops torch.ops.nanomoe_cpu.grouped_mm and grouped_mm_t; moe_model's
grouped_mm custom ops (which carry the autograd and the fake implementations torch.compile traces) call them
for CPU tensors where available() is True, and torch's grouped_mm elsewhere: on GPUs, where this file does
not build (a warning says why), and with NANOMOE_CPU_GROUPED_MM=0 (to compare the two). It also holds the
CPU kernels of moe_kernels/fused.py's ops (the grouped backend in one op, the softmax router, its aux
losses), which moe_model runs where available() is True. `make venv` builds it ahead of time.
"""
import os
import re
import fcntl
import sys
import time
import shutil
import hashlib
import platform
import warnings

import torch

_built = None  # None: not tried yet; then True or False
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cpu_grouped_mm.cpp')
FLAGS = ['-O3', '-fopenmp']
BUILD_WAIT_S = 120  # longer than a build takes on 2 cores; past it, the lock is a killed build's


def available():
    """Build and load the extension once per process; False (with one warning) where that fails."""
    global _built
    if _built is None:
        _built = False
        if os.environ.get('NANOMOE_CPU_GROUPED_MM', '1') == '0':
            return False
        try:
            _load()
            _built = True
        except Exception as e:  # no compiler, no ninja, another OS: torch's grouped_mm still works
            warnings.warn(f"cpu_grouped_mm.cpp did not build ({build_error(e)}); "
                          "on the CPU the grouped backend uses torch's grouped_mm, "
                          "which runs the experts one after another")
    return _built


def build_folder():
    """Where this source, built with these flags against this torch, lives."""
    with open(SOURCE, 'rb') as f:
        key = hashlib.sha1(f.read() + repr((FLAGS, torch.__version__, platform.machine())).encode()
                           ).hexdigest()[:12]
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or os.path.join(os.path.expanduser('~'), '.cache',
                                                                  'torch_extensions')
    return os.path.join(root, f'nanomoe_cpu_grouped_mm_{key}')


def _load():
    """Load the built library, building it first if need be: under a flock of our own, which the kernel
    releases however a build ends (kill -9 too), so a lock left behind is never waited for."""
    folder = build_folder()
    library = os.path.join(folder, 'nanomoe_cpu_grouped_mm.so')
    if _load_library(library):
        return
    os.makedirs(folder, exist_ok=True)
    with open(folder + '.lock', 'a') as lock:  # (beside the folder: a killed build's folder is emptied below)
        start = time.monotonic()
        if not _try_flock(lock):
            print(f"waiting (at most {BUILD_WAIT_S} s) for another build of cpu_grouped_mm.cpp",
                  file=sys.stderr)
        while not _try_flock(lock):  # a live build: it ends in seconds, or hangs
            if time.monotonic() - start > BUILD_WAIT_S:
                raise RuntimeError(f"gave up after {BUILD_WAIT_S} s waiting for another build of "
                                   f"cpu_grouped_mm.cpp (the process that holds {folder}.lock)")
            time.sleep(0.5)
        if _load_library(library):  # built by the process we waited for
            return
        # no build runs now: anything here is a killed one's (torch's lock file, which torch would wait for
        # forever, half an object file or library): start afresh
        if os.listdir(folder):
            print(f"note: a build of cpu_grouped_mm.cpp was killed midway; building it again in {folder}",
                  file=sys.stderr)
            shutil.rmtree(folder)
            os.makedirs(folder)
        from torch.utils.cpp_extension import load
        if shutil.which('ninja') is None:  # pip's ninja is in this interpreter's bin folder, maybe off PATH
            os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')
        load(name='nanomoe_cpu_grouped_mm', sources=[SOURCE], extra_cflags=FLAGS, extra_ldflags=['-fopenmp'],
             build_directory=folder, is_python_module=False)


def _load_library(path):
    """True if the library at path loaded (not there, or half written by a killed build: False)."""
    if not os.path.exists(path):
        return False
    try:
        torch.ops.load_library(path)
        return True
    except OSError:
        return False


def _try_flock(f):
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def build_error(e):
    """The line of a failed build that says why: torch's message starts with the compile command."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return next((line for line in lines[1:] if re.search(r'error|not found|no such file', line, re.I)),
                lines[0])
