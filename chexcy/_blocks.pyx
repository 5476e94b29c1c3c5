# cython: language_level=3
"""chexcy._blocks: where the compiled ops get their outputs and scratch arrays (chexcy._ops, every
instruction-set variant of it, calls empty / empty_at).

Arrays start on a 64-byte boundary; those of POPULATE_MIN bytes or more, while glibc is not tuned for
reuse (chexcy.memory), come from a cache of freed blocks of mapped pages. Nothing here is arithmetic, so
setup.py builds this module once, without instruction-set flags, and every variant shares its one cache.
It pays where glibc is not tuned (a user's own loop of op calls; 2 threads, median ms a call, with the
cache / with CHEXCY_BLOCK_CACHE_MB=0): resnet18's stem conv at batch 16, 224 px (a 51 MB output) 23 / 37,
ReLU on 51 MB 2.1 / 15.3; ref-cnn's training step 61 / 86 when CHEXCY_MALLOC_TUNING=0. A training step
with glibc tuned (chexcy train, tools/bench_train.py) does not use it.
"""
import os

import numpy as np

cdef extern from "_ops_pages.h" nogil:
    int chexcy_populate(void* addr, size_t n)
    void* chexcy_map(size_t n)
    void chexcy_unmap(void* p, size_t n)
    void chexcy_raise_heap_thresholds()

POPULATE_MIN = 32 << 20     # bytes: glibc's largest mmap threshold; larger blocks are always fresh pages
_memory = None

# Large blocks (POPULATE_MIN bytes or more) while glibc is not tuned: chexcy maps them itself and keeps
# freed ones for the next output of about the same size (see empty). Oldest evicted first; at most
# BLOCK_CACHE_SLOTS blocks and _cache_max bytes (CHEXCY_BLOCK_CACHE_MB, default 1024; 0 keeps none).
# A plain C table: blocks come back from _Block.__dealloc__, where the GIL is held but Python objects
# may already be gone (interpreter shutdown).
cdef enum:
    BLOCK_CACHE_SLOTS = 8
    PAGE_BYTES = 4096
cdef void* _cache_ptr[BLOCK_CACHE_SLOTS]
cdef size_t _cache_len[BLOCK_CACHE_SLOTS]
cdef int _cache_n = 0
cdef size_t _cache_bytes = 0
cdef size_t _cache_max = 1 << 30


def set_cache_mb(value):
    """Cap the block cache from CHEXCY_BLOCK_CACHE_MB (a whole number of MB, 0 = keep nothing)."""
    global _cache_max
    text = str(value).strip() or "1024"      # set but empty: the default
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"CHEXCY_BLOCK_CACHE_MB must be a whole number of MB (0 = no cache), got {value!r}")
    _cache_max = <size_t>min(int(text), 1 << 30) << 20
    _cache_trim(0)


set_cache_mb(os.environ.get("CHEXCY_BLOCK_CACHE_MB", "1024"))

# Arrays below POPULATE_MIN are glibc's: move its thresholds now to where freeing one large array moves
# them, so that they are reused from the first calls on (see empty). CHEXCY_MALLOC_TUNING=0 leaves the
# allocator alone here too.
if os.environ.get("CHEXCY_MALLOC_TUNING", "1").strip() != "0":
    chexcy_raise_heap_thresholds()


cdef void* _cache_remove(int i) noexcept:
    """Take block i out of the table (closing the gap, oldest first still) and return its address."""
    global _cache_n, _cache_bytes
    cdef void* p = _cache_ptr[i]
    _cache_bytes -= _cache_len[i]
    _cache_n -= 1
    for i in range(i, _cache_n):
        _cache_ptr[i] = _cache_ptr[i + 1]
        _cache_len[i] = _cache_len[i + 1]
    return p


cdef void _cache_drop(int i) noexcept:
    """Unmap cached block i."""
    cdef size_t n = _cache_len[i]
    chexcy_unmap(_cache_remove(i), n)


cdef void _cache_trim(size_t room) noexcept:
    """Evict the oldest blocks until one more block of `room` bytes fits."""
    while _cache_n > 0 and (_cache_n >= BLOCK_CACHE_SLOTS or _cache_bytes + room > _cache_max):
        _cache_drop(0)


cdef void _cache_put(void* p, size_t n) noexcept:
    global _cache_n, _cache_bytes
    if n > _cache_max:
        chexcy_unmap(p, n)
        return
    _cache_trim(n)
    _cache_ptr[_cache_n] = p
    _cache_len[_cache_n] = n
    _cache_n += 1
    _cache_bytes += n


cdef void* _cache_take(size_t n, size_t* got) noexcept:
    """The smallest cached block of n to n + n/4 bytes (then no longer cached), or NULL."""
    cdef int i, best = -1
    for i in range(_cache_n):
        if n <= _cache_len[i] <= n + n // 4 and (best < 0 or _cache_len[i] < _cache_len[best]):
            best = i
    if best < 0:
        return NULL
    got[0] = _cache_len[best]
    return _cache_remove(best)


def release_cache():
    """Unmap every cached block; returns the bytes released."""
    cdef size_t released = _cache_bytes
    while _cache_n > 0:
        _cache_drop(0)
    return released


def cache_info():
    """(blocks, bytes) held by the cache now, and its byte cap."""
    return _cache_n, _cache_bytes, _cache_max


cdef class _Block:
    """Mapped pages behind one large array (exported as bytes); cached again when the array dies."""
    cdef void* ptr
    cdef Py_ssize_t nbytes
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __getbuffer__(self, Py_buffer* view, int flags):
        self.shape[0] = self.nbytes
        self.strides[0] = 1
        view.buf = self.ptr
        view.obj = self
        view.len = self.nbytes
        view.readonly = 0
        view.itemsize = 1
        view.format = "B"
        view.ndim = 1
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __dealloc__(self):
        if self.ptr != NULL:
            _cache_put(self.ptr, self.nbytes)
            self.ptr = NULL


cdef object _block_array(Py_ssize_t n, tuple dims, dtype, void** data):
    """An array of n bytes on a cached block, or on fresh pages populated in one system call."""
    cdef size_t size = 0
    cdef void* p = _cache_take(n, &size)
    if p == NULL:
        size = (n + PAGE_BYTES - 1) // PAGE_BYTES * PAGE_BYTES
        if size <= _cache_max:       # will be cached when freed: make room now, so that evicted pages
            _cache_trim(size)        # go back to the system before new ones come
        p = chexcy_map(size)
        if p == NULL:
            raise MemoryError(f"cannot map {size} bytes for an array of shape {dims}")
        chexcy_populate(p, size)
    try:
        block = _Block.__new__(_Block)
    except BaseException:
        chexcy_unmap(p, size)
        raise
    (<_Block>block).ptr = p
    (<_Block>block).nbytes = size
    if data != NULL:
        data[0] = p
    return np.frombuffer(block, np.uint8, n).view(dtype).reshape(dims)


cdef bint _pages_may_be_fresh():
    """False once chexcy.memory.reuse_freed_memory() has made glibc reuse freed blocks (training)."""
    global _memory
    if _memory is None:
        from chexcy import memory as _m
        _memory = _m
    return not _memory.reusing_freed_memory()


def empty(shape, dtype=np.float32):
    """np.empty(shape, dtype) whose data starts on a 64-byte boundary (a cache line), its pages mapped.

    Alignment: NumPy's own large arrays start 16 bytes past a page, so every full-width vector store
    into them straddles two cache lines; the kernels bound by their stores (conv outputs, fills) are
    2-8% faster aligned.
    Pages: glibc serves blocks above its largest mmap threshold (32 MB) with fresh mmap()ed pages on
    every call, unless chexcy.memory.reuse_freed_memory() was called, and unmaps them on free. Fresh
    pages fault in one at a time under whichever thread touches them first, and in this VM two threads
    faulting at once were 15x slower than one: conv1's forward (a 33.5 MB output) took 51 ms at 2
    threads against 3.2 ms at 1. So such blocks come from chexcy's own block cache instead
    (_block_array): a block freed by an earlier output of about the same size is reused as it is
    (conv1's forward, called in a loop: 2.5 -> 1.0 ms at 2 threads), and a new one is populated with
    one madvise(MADV_POPULATE_WRITE) before the kernels write it (chexcy_populate, ~2x faster than
    faulting even on one thread). Smaller outputs are glibc's, which keeps them mapped between calls
    once its thresholds have moved up (chexcy_raise_heap_thresholds, at import): before, a loop of
    3x3 stride-2 backward calls (64 -> 128 channels at 56, batch 8) faulted in its 6.4 MB dx afresh
    on every call, 1564 page faults a call, 19.5-21.0 ms against 15.6-16.7 after (2 threads, medians)."""
    return empty_at(shape, dtype, NULL)


cdef object empty_at(shape, dtype, void** data):
    """empty(shape, dtype), and its data pointer in *data unless data is NULL."""
    cdef Py_ssize_t n = 4 if dtype is np.float32 else np.dtype(dtype).itemsize, off, k
    cdef unsigned char[::1] bv
    cdef tuple dims = tuple(shape)
    for k in range(len(dims)):
        n *= <Py_ssize_t>dims[k]
    if n >= POPULATE_MIN and _pages_may_be_fresh():
        return _block_array(n, dims, dtype, data)
    buf = np.empty(n + 64, np.uint8)
    bv = buf
    off = (64 - <size_t>&bv[0] % 64) % 64
    if data != NULL:
        data[0] = &bv[off]
    return buf[off:off + n].view(dtype).reshape(shape)
