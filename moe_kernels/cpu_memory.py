"""
On Linux, glibc's malloc serves every large block (from 128 KiB, adaptively up to 32 MiB) with fresh pages
mapped from the OS and unmaps them on free, so on a CPU each training step page-faults its large
activations and gradients in again. That costs an MoE with many experts dearly (its expert weight
gradients are large: at 128 experts it was 45% of a layer's forward + backward, RESULTS.md, "One MoE layer"),
and a dense model less. keep_freed_memory() tells glibc to keep freed memory for reuse instead, which is
what jemalloc or tcmalloc (the usual LD_PRELOAD advice for PyTorch on CPU) do. The price: the process
keeps its peak memory until it exits. Elsewhere (macOS, musl, GPU runs) it does nothing.
"""
import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


def keep_freed_memory():
    """Make glibc malloc reuse freed memory instead of returning it to the OS; True if it took effect."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # no mmap for large blocks (they come from the heap, and freed ones are reused), and never trim the heap
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
