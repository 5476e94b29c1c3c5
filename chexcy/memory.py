"""Allocator settings for training: reuse freed activation buffers instead of returning them to the OS.

A training step allocates and frees the same large arrays every step (activations, their gradients,
argmax planes: tens of MB each). glibc serves blocks above its mmap threshold (at most 32 MB) with fresh
mmap()ed pages and unmaps them on free, so every step pays a page fault (and the kernel's zeroing) for
every 4 KiB it touches: on ref-cnn at 128x128 that was 15-20% of the step. Raising the mmap threshold and
the trim threshold keeps freed blocks in the heap, where the next step finds them already mapped. Peak
memory is unchanged (the same arrays are alive at the peak); the process simply keeps its peak mapped
between steps.

`chexcy train` / `chexcy.train.fit` call `reuse_freed_memory()` once. It changes a process-wide setting,
so it is not done at import; set CHEXCY_MALLOC_TUNING=0 to leave the allocator alone. Only glibc is tuned;
elsewhere this is a no-op.

Without that tuning (chexcy.ops called from a user's own loop) the compiled ops still reuse their own
large arrays: blocks of 32 MB or more come from a cache of freed blocks in chexcy._blocks, at most 8 blocks
and CHEXCY_BLOCK_CACHE_MB (default 1024; 0 disables it). Smaller ones are glibc's: when the compiled ops
load they allocate and free one block just under 32 MB, which moves glibc's own dynamic thresholds (mmap
32 MB, trim 64 MB) to where any process's first free of an array that large moves them, so a loop's
arrays of a few MB stay mapped between calls from the start (CHEXCY_MALLOC_TUNING=0 skips this too). `release_cached_blocks()` gives them back, and
`reuse_freed_memory()` empties and stops that cache, since glibc then keeps freed blocks itself.
"""
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1          # mallopt parameter numbers from glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_MMAP_THRESHOLD = 2 ** 31 - 1   # blocks of any size come from the heap, so they can be reused
_TRIM_THRESHOLD = 2 ** 31 - 1   # never hand freed heap memory back to the OS while training
_TOP_PAD = 64 << 20             # grow the heap in 64 MB steps (untouched pages cost no memory)

_done = False


def reusing_freed_memory():
    """True once reuse_freed_memory() has tuned the allocator (large outputs then come back mapped)."""
    return _done


def reuse_freed_memory():
    """Tune glibc's malloc for a loop of same-sized large allocations. Returns True when applied."""
    global _done
    if _done:
        return True
    if os.environ.get("CHEXCY_MALLOC_TUNING", "1").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False                                   # not glibc: nothing to tune
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
    _done = ok
    if ok:
        _stop_block_cache()
    return ok


def _block_cache():
    """chexcy._blocks, where the compiled ops (every variant) take their large arrays, once they have loaded
    it; else None."""
    return sys.modules.get("chexcy._blocks")


def _stop_block_cache():
    """glibc now keeps every freed block itself, so the compiled ops map no blocks of their own: unmap
    the ones the cache holds, and those still in use when they are freed."""
    blocks = _block_cache()
    if blocks is not None:
        blocks.set_cache_mb(0)


def release_cached_blocks():
    """Unmap the freed large blocks the compiled ops keep for reuse; returns the bytes released (0 when
    the compiled backend was never loaded, or nothing was cached)."""
    blocks = _block_cache()
    return 0 if blocks is None else int(blocks.release_cache())
