# cython: language_level=3
"""chexcy._ops: the compiled kernels (Cython + OpenMP) behind chexcy.ops.

Called only by chexcy.ops, which has already validated every shape and index, made every array
C-contiguous float32 and turned stride / padding / dilation / kernel_size into (h, w) int tuples.
Bounds checks are off (a CHEXCY_DEBUG=1 build turns them back on), so these kernels trust that.
"""
# Legend: N batch, C in-channels, F out-channels, G groups, Cg = C // G and Fg = F // G per group,
# H W input, OH OW output, KH KW kernel, sh sw stride, ph pw padding, dil_h dil_w dilation,
# Hp Wp zero-padded input (H + 2*ph, W + 2*pw). Gradients are d + full name (dout, dx, dweight, dbias).
#
# Design
# ------
# * Every parallel loop is a `prange` whose body is one call to a `noexcept nogil` helper that computes
#   one independent piece and owns its writes: forward over (n, group, block of output channels),
#   dx over (n, c_in) planes (or, for stride 1, as a forward conv over (n, block of c_in)), dweight over
#   blocks of output channels, pools over (n, c) planes, linear over (block of rows, column strip) tiles
#   of its product (chexcy/_ops_gemm.h). No two threads write the same
#   place and no piece's arithmetic depends on which thread runs it, so results are bitwise identical
#   for any thread count. The thread count is passed to every prange explicitly (see _threads()).
# * Fast conv (forward, and dx for stride 1 as the transposed conv): register tiling. A tile of FWD_F
#   output channels x FWD_W output columns lives in a small local array that the C compiler keeps in
#   vector registers; for each (c, kh, kw) it loads one input row segment once and does FWD_F x FWD_W
#   multiply-adds with broadcast weights. The input of the current (n, group) is first copied into a
#   per-thread zero-padded buffer, so the tile loop has no bounds checks at all. Weights are packed so
#   the FWD_F weights of one tap are adjacent.
# * 3x3, stride 1, dilation 1, one group, from WINO_MIN_C / WINO_MIN_F channels (forward, and so dx):
#   Winograd F(2x2, 3x3), 16 matrix products over channels instead of 36 multiply-adds per output
#   pair and channel pair (chexcy/_ops_winograd.h, _wino_unit).
# * Fast dweight (column stride 1): per block of DW_F output channels, vector accumulators for
#   DW_F channels x 3 kernel columns (x 3 kernel rows for 3-row kernels) x DW_V lanes stay in registers
#   over an L1-sized chunk of dout; lanes are summed in a fixed order at the end (lane-split sums: no
#   fast-math, no reassociation by the compiler). Wide layers (DWC_MIN_CG input channels per group or
#   more, stride 1) instead take dweight as one matrix product per kernel tap over a channel-blocked
#   copy of the input, with the dense layer's register tile (_dwc_thread); 3x3 ones take Winograd.
#   docs/performance.md describes each kernel.
# * Anything else (column stride > 1, padding wider than the kernel for dx) takes a plain loop path:
#   slower, simple, and tested against the reference like the fast one.
# * Tile sizes depend on the instruction set (_ops_config.h); setup.py compiles this file once per
#   instruction-set variant and chexcy._native picks the best one the CPU runs.
# * The C kernels sit in one header per job, declared in _ops_kernels.pxd; outputs and scratch come from
#   chexcy._blocks (built once, shared by the variants). docs/kernels.md maps the files.

import numpy as np

from cython.parallel cimport prange, threadid
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t

from chexcy._ops_kernels cimport *
from chexcy._blocks cimport empty_at as _empty_at   # outputs: 64-byte aligned, large ones from the block
#                                                     cache (chexcy/_blocks.pyx, built once)
cdef object _F32 = np.float32


cdef inline object _empty(shape, dtype=_F32):
    """An array of `shape` (float32 unless dtype says) from chexcy._blocks (64-byte aligned, its pages
    mapped), by a C call: a conv call makes several, each right after a kernel has pushed the
    interpreter's data out of the caches."""
    return _empty_at(shape, dtype, NULL)


cdef inline object _floats(Py_ssize_t n, float** data):
    """_empty((n,)) and its data pointer in *data: scratch read through the pointer alone, without a
    memoryview of it."""
    return _empty_at((n,), _F32, <void**>data)

cdef enum:
    DW_CHUNK = 4096     # floats of dout (one channel block) per dweight chunk: 16 KiB, within L1
    DWC_MIN_CG = 64     # input channels per group from which stride-1 dweight is channel-blocked
    DWC_KC = 128        # dout positions per K block of the channel-blocked dweight (_dwc_thread)

cdef enum:
    # channels from which a 3x3 stride-1 conv takes Winograd (measured, ref-cnn at 128x128, 2 threads:
    # conv2's forward, 16 -> 32 channels, 3.6 -> 3.3-3.4 ms; its dx, 32 -> 16, was 1.4 ms slower: 16
    # output channels fill 2 register tiles of 12 rows by two thirds, and 16 input steps are short)
    WINO_MIN_C = 16
    WINO_MIN_F = 24
    WINO_TILES = 128    # 2x2 output tiles per Winograd work unit at most (whole rows of tiles; 64-256 measured)
    WINO_KC = 256       # input channels per K block of its products
    WDW_MIN_C = 32      # channels from which a 3x3 stride-1 dweight takes Winograd
    WDW_MIN_F = 24
    # UNDILATED (dilated 3x3 forward on Winograd through phase planes) from this many channels in and out,
    # when each phase's output is at least UNDIL_MIN_SIDE on a side. Forward at batch 8, 2 threads, time
    # on DIRECT / time so (A/B in one process): dilation 2: 64>64@28 0.66-0.93, 32>32@56 0.87-0.90,
    # 96>128@28 1.29, 128>128@14 1.14, 128>128@56 1.47, 256>256@14 1.27-1.40; phase outputs 7 on a
    # side: 128>128@28 dilation 4 1.19; 5: 256>256@28 dilation 6 0.86, 512>512@14 dilation 3 0.81
    UNDIL_MIN_C = 96
    UNDIL_MIN_SIDE = 7
    WDW_PARTS = 4       # partial sums of the Winograd dweight (fixed by the shape, not the threads)
    WDW_WHOLE_BYTES = 64 << 20  # Z and V of the whole batch at most, for its one-pass dweight

cdef enum:
    # DEPTHWISE_LANES (chexcy/_ops_depthwise_lanes.h): depthwise convs from DWL_MIN_C channels (4 blocks of
    # 16 lanes, so that the backward's blocks keep two threads busy) take the channels-in-lanes kernels
    # on planes of at most DWL_MAX_HW pixels when strided, DWL_MAX_HW_S1 at stride 1. Measured against the
    # phase planes (DEPTHWISE), AVX-512, batch 8, 2 threads, fwd+bwd: 576 @7 1.7-1.8x, 576 @10
    # 1.2-1.6x; stride 2: 576 @14 2.0x, 192 @28 1.4-1.5x, 144 @56 1.0-1.1x; stride 1: 384 and 576 @14
    # 0.8-1.0x, 192 @28 0.9-1.3x (there the two transposes per pixel cost more than the phase planes'
    # row copies).
    DWL_MIN_C = 64
    DWL_MAX_HW = 1024
    DWL_MAX_HW_S1 = 144

cdef enum:
    # The matrix-product paths (_gemm_conv) need products deep and tall enough to fill the register
    # tile: K = Cg * KH * KW steps and Fg output channels per group. Below that (depthwise, 1-2 channel
    # 3x3s) the packing costs more than the tile saves, and the direct kernels run.
    GEMM_MIN_K = 16
    GEMM_MIN_F = 8
    GEMM_TASK_COLS = 256    # output positions per task of _gemm_conv (its output block stays in L2)
    GEMM_DW_PARTS = 4       # sample ranges of the IM2COL_GEMM dweight, summed in order (fixed by the shape)
    # ... used only below this many units of column strips: a deep K (3x3 stride 2, 512 channels at 14x14:
    # 12 units) is parallel enough, and its 4 partial sums of 9 MiB each cost more to zero and add than
    # they saved
    GEMM_DW_MIN_UNITS = 8
    # K strips (GEMM_NR columns of dweight) per unit of the IM2COL_GEMM dweight: each unit packs its blocks
    # of dout once for all of them (one strip per unit packed them once per strip: 11% of the backward
    # of 3x3 stride 2, 128 channels at 56x56, more than the gather of B^T)
    GEMM_DW_STRIPS = 12
    # The IM2COL_GEMM dx is gathered phase by phase (_gemm_conv_dx_phase: a product of Cg rows per phase)
    # from GEMM_DX_PHASE_MIN_CG input channels per group and GEMM_DX_PHASE_MIN_P output positions, else
    # scattered back by col2im (_gemm_conv_dx, Cg KH KW rows). Measured, one thread, CPU time, 3x3 stride
    # 2, batch 8: 32>32@28 0.71 -> 0.37 ms, 128>128@56 23.0 -> 20.4 ms, 256>256@28 19.8 -> 18.9 ms;
    # 3>32@224 6.5 -> 10.6 ms (3 of the tile's rows used), 512>512@14 (7x7 outputs) 22.8 -> 26.6 ms.
    GEMM_DX_PHASE_MIN_CG = 16
    # K = Cg KH KW from which the IM2COL_GEMM forward runs on phase planes (_gemm_conv_phase); below it the
    # gathering _gemm_conv (same sums, bitwise), which writes the tiles straight into out: with few
    # multiply-adds per output the phase path's copy of its blocks into out costs more than the gathers
    # save. One thread, CPU time, batch 8 at 224: 7x7 stride 2, 1 -> 64 channels (K 49) 8.3 -> 10.8 ms on
    # phase planes, 3 -> 64 (K 147) 20.9 -> 18.3 ms; 3x3 stride 2, 3 -> 32 (K 27) 3.8 -> 4.0 ms.
    GEMM_PHASE_MIN_K = 64
    GEMM_DX_PHASE_MIN_P = 100
    # Bytes of a POINTWISE_GEMM task's weight block at most (its rows x one K block): it stays in L2 while
    # each strip of the task passes over it
    PW_MAX_A_BYTES = 384 << 10
    # Floats of a group's POINTWISE_GEMM dweight at most for the sum to be cut into chunks of columns
    # (_pw_dweight_chunks): the partial results, up to 8 of them, stay in L2
    PW_DW_CHUNK_FLOATS = 16384
    # A dense forward of at most this many outputs takes dot products at any batch (a classifier's 14)
    LINEAR_DOT_MAX_O = 32

# ------------------------------------------------------------------------------------------------
# Threads and build facts
# ------------------------------------------------------------------------------------------------

cdef int _requested_threads = 0     # 0 = not set: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)
_MAX_THREADS = 4096


def set_num_threads(n):
    """Use n OpenMP threads in every kernel (n >= 1); 0 returns to OpenMP's own choice."""
    global _requested_threads
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if n < 0 or n > _MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be in [0, {_MAX_THREADS}] (0 = not set), got {n}")
    _requested_threads = int(n)


def get_num_threads():
    """Threads the next kernel call will use (1 in a build without OpenMP)."""
    return _threads()


cdef int _threads() noexcept:
    # Read at call time, in the calling thread: omp_get_max_threads() reflects OMP_NUM_THREADS and
    # threadpoolctl's per-thread limit, which prange would not see from its worker threads.
    if not CHEXCY_OPENMP:
        return 1
    if _requested_threads > 0:
        return _requested_threads
    n = omp_get_max_threads()
    return n if n > 0 else 1


def openmp_enabled():
    """True when this module was compiled with OpenMP."""
    return bool(CHEXCY_OPENMP)


def build_info():
    """How this module was built: dict of variant, isa, compile flags, compiler, openmp, tile sizes."""
    return {
        "module": __name__,
        "variant": CHEXCY_VARIANT.decode(),
        "isa": CHEXCY_ISA.decode(),
        "cflags": CHEXCY_CFLAGS.decode(),
        "compiler": CHEXCY_COMPILER.decode(),
        "openmp": bool(CHEXCY_OPENMP),
        "debug": _DEBUG_BUILD,
        "tiles": {"forward": (int(FWD_F), int(FWD_NR), int(FWD_W)), "dweight": (int(DW_F), 3, int(DW_V))},
    }


_DEBUG_BUILD = bool(CHEXCY_DEBUG_BUILD)


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------

cdef void _pad_planes(
        const float* src,           # IN  (P, H, W)
        float* dst,                 # OUT (P, H + 2*ph, W + 2*pw)
        Py_ssize_t P, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    """Copy P planes into a zero-bordered buffer (chexcy_pad_planes)."""
    chexcy_pad_planes(src, dst, P, H, W, ph, pw, NULL)


cdef void _pad_shifted(
        const float* src,           # IN  (P, H, W)
        float* dst,                 # OUT (KW, P, Hp, OW): dst[kw, p, r, j] = padded x[p, r, j + kw * dil_w]
        Py_ssize_t P, Py_ssize_t H, Py_ssize_t W, Py_ssize_t Hp, Py_ssize_t OW, Py_ssize_t KW,
        Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dil_w) noexcept nogil:
    """For planes narrower than a tile: one copy of the padded input per kernel column, each row cut to
    the OW columns that kernel column reads, so consecutive rows are contiguous (see _conv_core)."""
    cdef Py_ssize_t kw, p, r, j0, j1, shift
    cdef float* d
    for kw in range(KW):
        shift = kw * dil_w - pw                        # input column of output column 0
        j0 = min(OW, max(0, -shift))                # output columns [j0, j1) read inside the input
        j1 = max(j0, min(OW, W - shift))
        for p in range(P):
            for r in range(Hp):
                d = dst + ((kw * P + p) * Hp + r) * OW
                if r < ph or r >= ph + H:
                    memset(d, 0, OW * sizeof(float))
                    continue
                memset(d, 0, j0 * sizeof(float))
                memcpy(d + j0, src + (p * H + r - ph) * W + j0 + shift, (j1 - j0) * sizeof(float))
                memset(d + j1, 0, (OW - j1) * sizeof(float))


def _pack_weight(weight, int groups):
    """(F, Cg, KH, KW) -> (G, Fg // FWD_F, Cg, KH, KW, FWD_F): the FWD_F weights of a tap adjacent.

    Only whole blocks are packed; a group's leftover channels (Fg % FWD_F) use the unpacked weight."""
    F, Cg, KH, KW = weight.shape
    Fg = F // groups
    nfull = Fg // FWD_F
    w = weight.reshape(groups, Fg, Cg, KH, KW)[:, :nfull * FWD_F]
    w = w.reshape(groups, nfull, FWD_F, Cg, KH, KW).transpose(0, 1, 3, 4, 5, 2)
    return np.ascontiguousarray(w, dtype=np.float32)


cdef inline Py_ssize_t _conv_out_size(Py_ssize_t size, Py_ssize_t k, int s, int p, int d) noexcept:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# ------------------------------------------------------------------------------------------------
# conv2d forward (also dx of stride-1 convs, as a conv of dout with flipped, transposed weights)
# ------------------------------------------------------------------------------------------------

cdef void _fwd_strided(
        const float* xt,            # IN  padded input at (c=0, first input row of this output row, column 0)
        const float* wt,            # IN  (Cg, KH, KW, FB) weights, FB adjacent per tap
        Py_ssize_t FB, Py_ssize_t Cg, Py_ssize_t KH, Py_ssize_t KW,
        Py_ssize_t plane, Py_ssize_t Wp, Py_ssize_t dil_h, Py_ssize_t dil_w,
        Py_ssize_t ow0, Py_ssize_t width, Py_ssize_t sw,
        float* tile, Py_ssize_t tile_w) noexcept nogil:    # OUT (FB, tile_w), first `width` columns
    """Plain path for column stride > 1: no register tiling, no reads past the row."""
    cdef Py_ssize_t c, kh, kw, f, j
    cdef const float* xr
    cdef float wv
    for f in range(FB):
        for j in range(width):
            tile[f * tile_w + j] = 0
    for c in range(Cg):
        for kh in range(KH):
            xr = xt + c * plane + kh * dil_h * Wp
            for kw in range(KW):
                for f in range(FB):
                    wv = wt[((c * KH + kh) * KW + kw) * FB + f]
                    for j in range(width):
                        tile[f * tile_w + j] += wv * xr[(ow0 + j) * sw + kw * dil_w]


cdef void _conv_rows(
        const float* xpad,          # IN  (Cg, Hp, Wp) zero-padded input of this (n, group)
        const float* wt,            # IN  (Cg, KH, KW, FB) weights of these FB output channels
        const float* bias,          # IN  (FB,)
        float* out,                 # OUT (FB, OH, OW) planes of these output channels
        Py_ssize_t FB, Py_ssize_t Cg, Py_ssize_t Hp, Py_ssize_t Wp, Py_ssize_t KH, Py_ssize_t KW,
        Py_ssize_t OH, Py_ssize_t OW, int sh, int sw, int dil_h, int dil_w) noexcept nogil:
    """FB output planes (FB = FWD_F, or 1 for leftover channels), tile by tile: FWD_NR rows at a time
    (2 or 1 for the rows left over, one for leftover channels), FWD_W (or FWD_W1) columns at a time. One channel with a
    3-row kernel at stride 1 goes FWD_NR3 rows x FWD_W3 columns at a time (rows left over: one by one)."""
    cdef bint rows3 = FB == 1 and KH == 3 and dil_h == 1 and sh == 1 and sw == 1
    cdef bint use3
    cdef Py_ssize_t tile_w
    cdef Py_ssize_t oh, ow0, width, f, r, j, nr
    # scratch for a partial last tile: the largest of the three tile shapes
    cdef float tile[FWD_F * FWD_NR * FWD_W + FWD_W1 + FWD_NR3 * FWD_W3]
    cdef float* orow
    cdef float* dst
    cdef Py_ssize_t fstride, rstride
    cdef const float* xrow
    oh = 0
    while oh < OH:
        use3 = rows3 and oh + FWD_NR3 <= OH
        if use3:
            nr, tile_w = FWD_NR3, FWD_W3
        else:
            nr = 1
            if FB == FWD_F and sw == 1:
                # FWD_NR rows at a time; 4 rows left go as 2 + 2 rather than 3 + 1 (a 1-row tile
                # does a weight load per FMA)
                nr = 2 if FWD_NR == 3 and OH - oh == 4 else min(FWD_NR, OH - oh)
            tile_w = FWD_W if FB == FWD_F else FWD_W1
        xrow = xpad + oh * sh * Wp
        ow0 = 0
        while ow0 < OW:
            width = min(tile_w, OW - ow0)
            orow = out + oh * OW + ow0
            if sw != 1:
                _fwd_strided(xrow, wt, FB, Cg, KH, KW, Hp * Wp, Wp, dil_h, dil_w, ow0, width, sw, tile, tile_w)
                for f in range(FB):
                    for j in range(width):
                        orow[f * OH * OW + j] = tile[f * tile_w + j] + bias[f]
                ow0 += tile_w
                continue
            if width == tile_w:     # whole tile: straight into the output planes
                dst, fstride, rstride = orow, OH * OW, OW
            else:                   # last, partial tile: via scratch (its extra lanes are discarded)
                dst, fstride, rstride = tile, nr * tile_w, tile_w
            if use3:
                chexcy_fwd_tile1_k3(xrow + ow0, wt, Cg, KW, Hp * Wp, Wp, dil_w, bias[0], dst, rstride)
            elif FB != FWD_F:
                chexcy_fwd_tile1(xrow + ow0, wt, Cg, KH, KW, Hp * Wp, Wp, dil_h, dil_w, sh * Wp,
                                 bias, dst, fstride, rstride)
            else:
                chexcy_fwd_tile_rows(nr, xrow + ow0, wt, Cg, KH, KW, Hp * Wp, Wp, dil_h, dil_w, sh * Wp,
                                     bias, dst, fstride, rstride)
            if width != tile_w:
                for f in range(FB):
                    for r in range(nr):
                        for j in range(width):
                            orow[f * OH * OW + r * OW + j] = tile[(f * nr + r) * tile_w + j]
            ow0 += tile_w
        oh += nr


cdef void _conv_unit(
        const float[:, :, :, ::1] x,                # IN  (N, G*Cg, H, W)
        const float[:, :, :, ::1] w,                # IN  (G*Fg, Cg, KH, KW) unpacked (leftover channels)
        const float[:, :, :, :, :, ::1] wp,         # IN  (G, Fg // FWD_F, Cg, KH, KW, FWD_F) packed
        const float[::1] bias,                      # IN  (G*Fg,)
        float[:, :, :, ::1] out,                    # OUT (N, G*Fg, OH, OW): this unit's planes
        Py_ssize_t unit,                            # which (n, g, block)
        float* xpad,                                # scratch (Cg, Hp, Wp) + FWD_WMAX, this thread's
        Py_ssize_t* padded_for,                     # which (n, g) xpad holds, this thread's
        int groups, int sh, int sw, int ph, int pw, int dil_h, int dil_w,
        Py_ssize_t k) noexcept nogil:               # output rows per tile row (narrow planes), else 0
    """One work unit, owned by one thread: a block of FWD_F output channels of sample n in group g,
    or (the last unit of a group when Fg % FWD_F != 0) its leftover channels one at a time."""
    cdef Py_ssize_t Cg = w.shape[1], KH = w.shape[2], KW = w.shape[3]
    cdef Py_ssize_t H = x.shape[2], W = x.shape[3], OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t Fg = out.shape[1] // groups, nfull = Fg // FWD_F
    cdef Py_ssize_t per_group = nfull + (1 if Fg % FWD_F else 0)
    cdef Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw
    cdef Py_ssize_t fb = unit % per_group, ng = unit // per_group
    cdef Py_ssize_t g = ng % groups, n = ng // groups, f0 = g * Fg + fb * FWD_F, f
    if k > 1:
        # Narrow planes: k output rows of OW columns fill one tile row of FWD_W = k * OW columns. With
        # one row-cut copy of the input per kernel column, the k input rows a tile row reads are
        # contiguous too: the tiles run unchanged on "rows" of k * OW, the kernel column step being
        # the distance between the copies.
        if padded_for[0] != ng:
            _pad_shifted(&x[n, g * Cg, 0, 0], xpad, Cg, H, W, Hp, OW, KW, ph, pw, dil_w)
            padded_for[0] = ng
        if fb < nfull:
            _conv_rows(xpad, &wp[g, fb, 0, 0, 0, 0], &bias[f0], &out[n, f0, 0, 0],
                       FWD_F, Cg, Hp, OW, KH, KW, OH // k, k * OW, <int>k, 1, dil_h, <int>(Cg * Hp * OW))
        else:
            for f in range(f0, (g + 1) * Fg):
                _conv_rows(xpad, &w[f, 0, 0, 0], &bias[f], &out[n, f, 0, 0],
                           1, Cg, Hp, OW, KH, KW, OH // k, k * OW, <int>k, 1, dil_h, <int>(Cg * Hp * OW))
        return
    if padded_for[0] != ng:
        _pad_planes(&x[n, g * Cg, 0, 0], xpad, Cg, H, W, ph, pw)
        padded_for[0] = ng
    if fb < nfull:
        _conv_rows(xpad, &wp[g, fb, 0, 0, 0, 0], &bias[f0], &out[n, f0, 0, 0],
                   FWD_F, Cg, Hp, Wp, KH, KW, OH, OW, sh, sw, dil_h, dil_w)
    else:
        for f in range(f0, (g + 1) * Fg):
            _conv_rows(xpad, &w[f, 0, 0, 0], &bias[f], &out[n, f, 0, 0],
                       1, Cg, Hp, Wp, KH, KW, OH, OW, sh, sw, dil_h, dil_w)


cdef inline void _wino_span(Py_ssize_t unit, Py_ssize_t N, Py_ssize_t TH, Py_ssize_t TB, Py_ssize_t G,
                            Py_ssize_t* n0, Py_ssize_t* ns, Py_ssize_t* ty0, Py_ssize_t* nty) noexcept nogil:
    """Winograd work unit -> samples [n0, n0 + ns), tile rows [ty0, ty0 + nty) of each (_wino_plan)."""
    cdef Py_ssize_t nblk = (TH + TB - 1) // TB
    if nblk == 1:
        n0[0] = unit * G
        ns[0] = min(G, N - n0[0])
        ty0[0] = 0
        nty[0] = TH
    else:
        n0[0] = unit // nblk
        ns[0] = 1
        ty0[0] = unit % nblk * TB
        nty[0] = min(TB, TH - ty0[0])


cdef (Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t) _wino_plan(Py_ssize_t N, Py_ssize_t TH, Py_ssize_t TW):
    """How the 2x2 output tiles are cut into work units of at most WINO_TILES tiles (at least a row):
    (TB tile rows per block, G samples per unit, units, tiles per unit at most). A sample with fewer
    than 2 GEMM_NR tiles is taken whole, G samples to a unit, so that small planes (16 tiles at 8x8)
    still fill the register tile's strips of GEMM_NR tiles; more per unit only outgrew L2 (conv4 of
    ref-cnn, 64 tiles a sample, 2 samples a unit: 2.2 -> 2.4 ms forward)."""
    cdef Py_ssize_t TB = max(1, min(TH, WINO_TILES // TW)), G = 1
    if TB >= TH:
        G = max(1, min(WINO_TILES // (TH * TW), (2 * GEMM_NR + TH * TW - 1) // (TH * TW)))
        return TH, G, (N + G - 1) // G, G * TH * TW
    return TB, 1, N * ((TH + TB - 1) // TB), TB * TW


cdef void _wino_unit(
        const float[:, :, :, ::1] x,                # IN  (N, C, H, W)
        const float* up,                            # IN  U packed: (16, ceil(F / GEMM_MR)) strips (C, GEMM_MR)
        const float[::1] bias,                      # IN  (F,)
        float[:, :, :, ::1] out,                    # OUT (N, F, OH, OW): the unit's samples and tile rows
        Py_ssize_t unit,                            # see _wino_plan / _wino_span
        float* scratch,                             # this thread's: V, M, column halves, outputs
        Py_ssize_t TB, Py_ssize_t G, Py_ssize_t Tp, Py_ssize_t PS, int ph, int pw, int relu) noexcept nogil:
    """One work unit of the Winograd convolution F(2x2, 3x3) (chexcy/_ops_winograd.h): the input
    transform of its nt tiles (sample by sample, t = s * nty * TW + ty * TW + tx) for every channel into
    V (16, C, Tp), the 16 products M[xi] (Fp, Tp) = U[xi] (Fp, C) V[xi] (C, Tp) with the dense layer's
    register tile (columns: tiles), then the output transform plus bias (then max(., 0) when relu) into
    the output rows. All of it
    in this thread's scratch (L2-sized for ref-cnn's layers); the arithmetic of a unit does not depend
    on the thread that runs it."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = out.shape[1], OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t TH = (OH + 1) // 2, TW = (OW + 1) // 2, ncot = (F + GEMM_MR - 1) // GEMM_MR
    cdef Py_ssize_t Fp = ncot * GEMM_MR, n0, nsam, ty0, nty, ts, nt, ns
    cdef Py_ssize_t c, sm, xi, k0, kc, q, s, f, ty, oh
    _wino_span(unit, N, TH, TB, G, &n0, &nsam, &ty0, &nty)
    ts = nty * TW                                   # tiles per sample in this unit
    nt = nsam * ts
    ns = (nt + GEMM_NR - 1) // GEMM_NR
    cdef float* V = scratch
    cdef float* M = V + 16 * C * Tp
    cdef float* pe = M + 16 * Fp * Tp               # column halves of the even input rows (4, PS)
    cdef float* po = pe + 4 * PS                    # and of the odd ones
    cdef float* Y = po + 4 * PS                     # outputs of one channel (4, Tp)
    cdef float* row = Y + 4 * Tp                    # one output row, interleaved
    for c in range(C):
        for sm in range(nsam):
            # padded input rows 2 ty0 .. 2 (ty0 + nty) + 1
            chexcy_wino_cols(&x[n0 + sm, c, 0, 0], H, W, ph, pw, 2 * ty0, 2 * nty + 2, TW, pe, po, PS)
            chexcy_wino_rows(pe, po, PS, TW, ts, V + c * Tp + sm * ts, C * Tp)
        if nt % GEMM_NR:    # the products read whole strips: no uninitialised memory past the tiles
            for xi in range(16):
                memset(V + (xi * C + c) * Tp + nt, 0, (ns * GEMM_NR - nt) * sizeof(float))
    for xi in range(16):
        # strips of GEMM_NR tiles outermost: a strip's block of V stays in L1 while the packed U strips
        # of every block of output channels pass over it
        for s in range(ns):
            k0 = 0
            while k0 < C:
                kc = min(<Py_ssize_t>WINO_KC, C - k0)
                for q in range(ncot):   # (the last block's rows past F: never read, not computed)
                    chexcy_gemm_tile_rows_part(kc, 1, up + (xi * ncot + q) * C * GEMM_MR + k0 * GEMM_MR,
                                               V + (xi * C + k0) * Tp + s * GEMM_NR, Tp,
                                               M + (xi * Fp + q * GEMM_MR) * Tp + s * GEMM_NR, Tp, k0 > 0,
                                               min(<Py_ssize_t>GEMM_MR, F - q * GEMM_MR))
                k0 += kc
    for f in range(F):
        chexcy_wino_output(M + f * Tp, Fp * Tp, nt, bias[f], Y, Tp, relu)
        for sm in range(nsam):
            for ty in range(nty):
                oh = 2 * (ty0 + ty)
                chexcy_wino_store_rows(Y + sm * ts + ty * TW, Tp, TW, row, &out[n0 + sm, f, oh, 0],
                                       &out[n0 + sm, f, oh + 1, 0] if oh + 1 < OH else NULL, OW)


cdef _wino_conv(x, w, const float[::1] bias, float[:, :, :, ::1] out, int ph, int pw, bint flip=False,
                bint relu=False, const float* wscale=NULL):
    """3x3, stride 1, dilation 1, one group: out = conv(x, w) + bias (then max(., 0) when relu, in the
    output transform) by Winograd F(2x2, 3x3), every
    (sample, block of rows of 2x2 output tiles) unit in parallel. w (F, C, 3, 3); with flip, w is the
    weight of the conv whose dx this is, (C, F, 3, 3), read transposed and turned by 180 degrees."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], F = out.shape[1], OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t TH = (OH + 1) // 2, TW = (OW + 1) // 2, ncot = (F + GEMM_MR - 1) // GEMM_MR
    cdef Py_ssize_t TB, G, units, TU
    TB, G, units, TU = _wino_plan(N, TH, TW)
    cdef Py_ssize_t TWc = (TW + DW_V - 1) // DW_V * DW_V
    # tile columns of V, M and Y: whole strips, plus room for the output rows' last vector
    cdef Py_ssize_t Tp = (TU + GEMM_NR - 1) // GEMM_NR * GEMM_NR + GEMM_NR
    # a column half: TB + 1 input rows of TW tiles, plus what the last vector reads past them
    cdef Py_ssize_t PS = ((TB + 1) * TW + 2 * DW_V + 15) // 16 * 16
    cdef Py_ssize_t per = (16 * C * Tp + 16 * ncot * GEMM_MR * Tp + 8 * PS + 4 * Tp + 2 * TWc + 15) // 16 * 16
    cdef Py_ssize_t i, u
    cdef const float[:, :, :, ::1] wv = w
    cdef const float[:, :, :, ::1] xv = x
    up = _empty((16 * ncot * C * GEMM_MR,))
    cdef float[::1] upv = up
    scratch = _empty((n_threads, per))
    cdef float[:, ::1] sv = scratch
    for i in prange(ncot, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_wino_weight_pack(&wv[0, 0, 0, 0], 9 if flip else C * 9, F * 9 if flip else 9, flip, F, C, i,
                                &upv[0], ncot * C * GEMM_MR, wscale)
    for u in prange(units, nogil=True, schedule="static", num_threads=n_threads):
        _wino_unit(xv, &upv[0], bias, out, u, &sv[omp_get_thread_num(), 0], TB, G, Tp, PS, ph, pw, relu)


cdef _conv_core(
        const float[:, :, :, ::1] x,                # IN  (N, G*Cg, H, W)
        const float[:, :, :, ::1] w,                # IN  (G*Fg, Cg, KH, KW)
        const float[::1] bias,                      # IN  (G*Fg,)
        float[:, :, :, ::1] out,                    # OUT (N, G*Fg, OH, OW)
        int groups, int sh, int sw, int ph, int pw, int dil_h, int dil_w):
    """Forward conv with symmetric zero padding; every (n, g, block) unit in parallel."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], Cg = w.shape[1], Fg = w.shape[0] // groups
    cdef Py_ssize_t per_group = Fg // FWD_F + (1 if Fg % FWD_F else 0)
    cdef Py_ssize_t Hp = x.shape[2] + 2 * ph, OH = out.shape[2], OW = out.shape[3], k = 0
    cdef Py_ssize_t KW = w.shape[3]
    cdef Py_ssize_t buf_len = Cg * Hp * (x.shape[3] + 2 * pw) + FWD_WMAX
    if sh == 1 and sw == 1 and OW < FWD_W and FWD_W % OW == 0 and OH % (FWD_W // OW) == 0:
        # planes narrower than a tile (e.g. 8 x 8 under 16-float vectors): see _conv_unit
        k = FWD_W // OW
        buf_len = max(buf_len, KW * Cg * Hp * OW + FWD_WMAX)
    cdef Py_ssize_t units = N * groups * per_group, u
    cdef int tid
    if _is_winograd(Cg, Fg, w.shape[2], KW, sh, sw, dil_h, dil_w, groups, WINO_MIN_C, WINO_MIN_F):
        _wino_conv(x, w, bias, out, ph, pw)     # (the planner's WINOGRAD; dx of stride 1 arrives here)
        return
    cdef const float[:, :, :, :, :, ::1] wp = _pack_weight(np.asarray(w), groups)
    # zeros: the slack after the last row is read (into discarded lanes) by the last tile
    scratch = np.zeros((n_threads, buf_len), np.float32)
    tags = np.full(n_threads, -1, np.intp)
    cdef float[:, ::1] sv = scratch
    cdef Py_ssize_t[::1] tv = tags
    for u in prange(units, nogil=True, schedule="static", num_threads=n_threads):
        tid = omp_get_thread_num()
        _conv_unit(x, w, wp, bias, out, u, &sv[tid, 0], &tv[tid], groups, sh, sw, ph, pw, dil_h, dil_w, k)


# ------------------------------------------------------------------------------------------------
# The conv planner: which kernel path each part of a convolution takes
# ------------------------------------------------------------------------------------------------
#
#   path                forward / dx / dweight of ...                               kernel
#   DEPTHWISE           groups = C = F (one channel in and out per group; C > 1 at   _depthwise_forward,
#                       stride 1), up to CHEXCY_DWC_MAX_TAPS taps and strides up to   _depthwise_backward
#                       CHEXCY_DWC_MAX_STRIDE, any padding, dilation: plane by plane
#   DEPTHWISE_LANES     the same from DWL_MIN_C channels on planes of at most        (the same, with
#                       DWL_MAX_HW pixels (DWL_MAX_HW_S1 at stride 1): the           lanes)
#                       channels in the vector lanes
#   WINOGRAD            3x3, stride 1, dilation 1, one group, from WINO_MIN_C in     _wino_conv, _dweight_winograd
#                       and WINO_MIN_F out channels (dweight: WDW_MIN_C / WDW_MIN_F)
#   POINTWISE_GEMM      1x1, no padding, any stride, from GEMM_MIN_K in and          _pw_conv, _pw_dx (the same
#                       GEMM_MIN_F out channels per group: a matrix product per       product on dout with W^T),
#                       group over the whole batch; strided: on the sampled grid,    _pw_dweight
#                       copied out first (_strided_grid)
#   IM2COL_GEMM         strided convs with K = Cg KH KW >= GEMM_MIN_K and            _gemm_conv_phase,
#                       Fg >= GEMM_MIN_F (stems, 3x3 stride 2): the im2col matrix    _gemm_conv_dx_phase or
#                       copied from phase planes into the packing from K >=         _gemm_conv_dx,
#                       GEMM_PHASE_MIN_K (else gathered: _gemm_conv), never stored;  _gemm_conv_dweight
#                       dx by phases from GEMM_DX_PHASE_MIN_CG / _MIN_P, else col2im
#   FIRST_LAYER         one input channel, 3 kernel rows, stride 1: dx, dweight and   _backward_one_channel
#                       dbias of a sample together
#   DIRECT              forward (and dx of stride 1, as the transposed conv) by       _conv_core
#                       register tiles
#   CHANNEL_BLOCKED     dweight, stride 1, from DWC_MIN_CG input channels per group   _dweight_blocked
#   LANE_SUM            dweight, column stride 1                                     _dw_block
#   PLAIN               what is left: column strides > 2 forward, padding wider      _fwd_strided, _dx_plane,
#                       than the kernel's reach (dx), column stride > 1 (dweight)    _dw_plain
# and reductions that hand another problem to the table again ("A>B": A, then B on the result):
#   STRIDE1_SUBSAMPLED  forward at stride 2 (sh * sw <= 4): the stride-1 conv, every sh-th row and
#                       sw-th column kept
#   SPREAD              dx, dweight of a stride > 1: dout spread onto the stride-1 grid (zeros between)
#   SUBSAMPLED          a strided 1x1 without padding: a stride-1 one on the sampled pixels
#   UNDILATED           forward of a dilated 3x3 conv at stride 1, one group, from UNDIL_MIN_C in and
#                       out channels whose phases' outputs are at least UNDIL_MIN_SIDE on a side: the
#                       dil_h x dil_w phase planes of the padded input (rows i dil_h + a, columns
#                       j dil_w + b) as a batch of dil_h dil_w N inputs, convolved undilated without
#                       padding, on WINOGRAD (its backward measured slower so: dx and dweight stay on
#                       the table's dilated paths; dilation 2, 64 channels at 28x28, batch 8: 4.3 vs 7.1 ms)

cdef bint _is_winograd(Py_ssize_t Cg, Py_ssize_t Fg, Py_ssize_t KH, Py_ssize_t KW, int sh, int sw, int dil_h, int dil_w,
                       int groups, Py_ssize_t min_c, Py_ssize_t min_f):
    return (groups == 1 and KH == 3 and KW == 3 and sh == 1 and sw == 1 and dil_h == 1 and dil_w == 1
            and Cg >= min_c and Fg >= min_f)


cdef bint _is_pointwise(Py_ssize_t Cg, Py_ssize_t Fg, Py_ssize_t KH, Py_ssize_t KW, int ph, int pw):
    return KH == 1 and KW == 1 and ph == 0 and pw == 0 and Cg >= GEMM_MIN_K and Fg >= GEMM_MIN_F


cdef bint _is_first_layer(Py_ssize_t N, Py_ssize_t C, Py_ssize_t F, Py_ssize_t KH, Py_ssize_t KW,
                          int sh, int sw, int ph, int pw, int dil_h, int dil_w, int groups):
    return (groups == 1 and C == 1 and sh == 1 and sw == 1 and KH == 3 and dil_h == 1
            and ph <= 2 and pw <= dil_w * (KW - 1)
            # its per-sample lane sums: N x ceil(F / DW_F) x 3 x ceil(KW / 3) x DW_F x 3 x DW_V floats
            and N * ((F + DW_F - 1) // DW_F) * 9 * ((KW + 2) // 3) * DW_F * DW_V * 4 <= (64 << 20))


def _undilated_shape(x_shape, int ph, int pw, int dil_h, int dil_w):
    """The input of UNDILATED's problem: (N dil_h dil_w, C, Hq, Wq), the phase planes of the padded input."""
    return (x_shape[0] * dil_h * dil_w, x_shape[1], (x_shape[2] + 2 * ph + dil_h - 1) // dil_h,
            (x_shape[3] + 2 * pw + dil_w - 1) // dil_w)


cdef _phase_batch(x, int ph, int pw, int dil_h, int dil_w):
    """UNDILATED's input: x (N, C, H, W) zero-padded by (ph, pw), its phase planes as a batch (N dil_h dil_w,
    C, Hq, Wq), sample n dil_h dil_w + a dil_w + b [c, i, j] = xpad[n, c, i dil_h + a, j dil_w + b] (zero
    past xpad); planes in parallel."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], u
    cdef int n_threads = _threads()
    _, _, Hq, Wq = _undilated_shape(x.shape, ph, pw, dil_h, dil_w)
    out = _empty((N * dil_h * dil_w, C, Hq, Wq))
    cdef const float[:, :, :, ::1] xv = x
    cdef float[:, :, :, ::1] ov = out
    cdef Py_ssize_t hq = Hq, wq = Wq
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_cg_phase_split(&xv[u // C, u % C, 0, 0], H, W, ph, pw, dil_h, dil_w, hq, wq,
                              &ov[u // C * dil_h * dil_w, u % C, 0, 0], C * hq * wq)
    return out


cdef _phase_unbatch(q, Py_ssize_t H, Py_ssize_t W, int dil_h, int dil_w):
    """The inverse of an unpadded _phase_batch: (N, C, H, W) from q (N dil_h dil_w, C, Hq, Wq), dropping
    what lies past H, W."""
    cdef Py_ssize_t N = q.shape[0] // (dil_h * dil_w), C = q.shape[1], Hq = q.shape[2], Wq = q.shape[3], u
    cdef int n_threads = _threads()
    out = _empty((N, C, H, W))
    cdef const float[:, :, :, ::1] qv = q
    cdef float[:, :, :, ::1] ov = out
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_cg_phase_merge(&qv[u // C * dil_h * dil_w, u % C, 0, 0], C * Hq * Wq, Wq, dil_h, dil_w,
                              &ov[u // C, u % C, 0, 0], H, W)
    return out


cdef dict _plans = {}


cdef tuple _plan_of(x_shape, w_shape, stride, padding, dilation, int groups):
    """conv_plan(...), remembered by its arguments: the entry points ask it on every call (5 us right
    after a kernel, against 0.4 warm)."""
    key = (x_shape, w_shape, stride, padding, dilation, groups)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 4096:
            _plans.clear()
        plan = _plans[key] = conv_plan(x_shape, w_shape, stride, padding, dilation, groups)
    return <tuple>plan


def conv_plan(x_shape, w_shape, stride, padding, dilation, int groups):
    """The kernel paths of a convolution: (forward, dx, dweight) names from the table above, for x
    (N, C, H, W) and weight (F, C // groups, KH, KW) with (h, w) stride / padding / dilation tuples
    (already validated by chexcy.ops). The entry points below follow it."""
    cdef Py_ssize_t N = x_shape[0], C = x_shape[1]
    cdef Py_ssize_t F = w_shape[0], Cg = w_shape[1], KH = w_shape[2], KW = w_shape[3]
    cdef int sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1]
    cdef int dil_h = dilation[0], dil_w = dilation[1]
    cdef Py_ssize_t Fg = F // groups
    cdef bint strided = sh > 1 or sw > 1
    cdef bint reach_ok = ph <= dil_h * (KH - 1) and pw <= dil_w * (KW - 1)
    stride1 = (1, 1)
    if (groups == C and F == C and (strided or C > 1) and KH * KW <= CHEXCY_DWC_MAX_TAPS
            and sh <= CHEXCY_DWC_MAX_STRIDE and sw <= CHEXCY_DWC_MAX_STRIDE):
        if C >= DWL_MIN_C and x_shape[2] * x_shape[3] <= (DWL_MAX_HW if strided else DWL_MAX_HW_S1):
            return "DEPTHWISE_LANES", "DEPTHWISE_LANES", "DEPTHWISE_LANES"
        return "DEPTHWISE", "DEPTHWISE", "DEPTHWISE"
    # forward
    if _is_winograd(Cg, Fg, KH, KW, sh, sw, dil_h, dil_w, groups, WINO_MIN_C, WINO_MIN_F):
        fwd = "WINOGRAD"
    elif (not strided and (dil_h > 1 or dil_w > 1)
            and _is_winograd(Cg, Fg, KH, KW, 1, 1, 1, 1, groups, UNDIL_MIN_C, UNDIL_MIN_C)
            and min(_undilated_shape(x_shape, ph, pw, dil_h, dil_w)[2:]) - 2 >= UNDIL_MIN_SIDE):
        fwd = "UNDILATED>WINOGRAD"
    elif _is_pointwise(Cg, Fg, KH, KW, ph, pw):
        fwd = "POINTWISE_GEMM"
    elif strided and Cg * KH * KW >= GEMM_MIN_K and Fg >= GEMM_MIN_F:
        # (dilated convs at stride 1 are not products: 3x3, dilation 2, 64 channels at 28x28 measured 2x
        # slower as one than DIRECT, one thread, A/B in one process; on phase planes still 1.25x, 4.5 vs
        # 3.6 ms; UNDILATED above takes those that Winograd can)
        fwd = "IM2COL_GEMM"
    elif strided and KH == 1 and KW == 1 and ph == 0 and pw == 0:
        fwd = "SUBSAMPLED>" + conv_plan(x_shape, w_shape, stride1, padding, dilation, groups)[0]
    elif strided and sh * sw <= 4:
        fwd = "STRIDE1_SUBSAMPLED>" + conv_plan(x_shape, w_shape, stride1, padding, dilation, groups)[0]
    elif sw > 1:
        fwd = "PLAIN"
    else:
        fwd = "DIRECT"
    # backward
    if _is_first_layer(N, C, F, KH, KW, sh, sw, ph, pw, dil_h, dil_w, groups):
        return fwd, "FIRST_LAYER", "FIRST_LAYER"
    if _is_pointwise(Cg, Fg, KH, KW, ph, pw) and _is_pointwise(Fg, Cg, KH, KW, ph, pw):
        return fwd, "POINTWISE_GEMM", "POINTWISE_GEMM"
    if strided and KH == 1 and KW == 1 and ph == 0 and pw == 0:
        _, dx, dwt = conv_plan(x_shape, w_shape, stride1, padding, dilation, groups)
        return fwd, "SUBSAMPLED>" + dx, "SUBSAMPLED>" + dwt
    if fwd == "IM2COL_GEMM":
        return fwd, "IM2COL_GEMM", "IM2COL_GEMM"
    if strided and reach_ok:
        _, dx, dwt = conv_plan(x_shape, w_shape, stride1, padding, dilation, groups)
        return fwd, "SPREAD>" + dx, "SPREAD>" + dwt
    if not strided and reach_ok:
        # dx is the forward conv of dout with the kernel flipped and in/out channels swapped
        dx = "WINOGRAD" if _is_winograd(Fg, Cg, KH, KW, 1, 1, dil_h, dil_w, groups, WINO_MIN_C, WINO_MIN_F) \
            else "DIRECT"
    else:
        dx = "PLAIN"
    if _is_winograd(C, F, KH, KW, sh, sw, dil_h, dil_w, groups, WDW_MIN_C, WDW_MIN_F):
        dwt = "WINOGRAD"
    elif not strided and Cg >= DWC_MIN_CG:
        dwt = "CHANNEL_BLOCKED"
    elif sw == 1:
        dwt = "LANE_SUM"
    else:
        dwt = "PLAIN"
    return fwd, dx, dwt


cdef void _gemm_conv_unit(
        const float* xp,            # IN  (N, C, Hp, Wp) input, zero-padded (or x itself when unpadded)
        const float* ap,            # IN  (G, apack) packed weights, one block per group
        const float* bias,          # IN  (F,)
        float* out,                 # OUT (N, F, OH, OW): this unit's columns of one (n, g)
        float* bbuf,                # this thread's (GEMM_KC, GEMM_NR) packing buffer
        Py_ssize_t unit, Py_ssize_t nsb, Py_ssize_t SB, Py_ssize_t nstrips, Py_ssize_t apack,
        Py_ssize_t groups, Py_ssize_t C, Py_ssize_t Fg, Py_ssize_t Hp, Py_ssize_t Wp, Py_ssize_t KH,
        Py_ssize_t KW, Py_ssize_t OH, Py_ssize_t OW, int sh, int sw, int dil_h, int dil_w) noexcept nogil:
    """One unit of _gemm_conv: strips [sb SB, (sb + 1) SB) of the product of (n, g), unit = (n G + g) nsb + sb."""
    cdef chexcy_cg_geom geo
    cdef Py_ssize_t sb = unit % nsb, ng = unit // nsb, g = ng % groups, n = ng // groups
    cdef Py_ssize_t Cg = C // groups, F = Fg * groups
    geo.x = xp + (n * C + g * Cg) * Hp * Wp
    geo.Hp, geo.Wp, geo.KH, geo.KW = Hp, Wp, KH, KW
    geo.sh, geo.sw, geo.dil_h, geo.dil_w = sh, sw, dil_h, dil_w
    geo.OW, geo.P = OW, OH * OW
    chexcy_cg_task(&geo, ap + g * apack, bias + g * Fg, Fg, Cg * KH * KW, sb * SB,
                   min(nstrips, (sb + 1) * SB), out + (n * F + g * Fg) * OH * OW, bbuf)


cdef _packed_weight(const float* w, Py_ssize_t gs, Py_ssize_t rs, Py_ssize_t cs, int groups, Py_ssize_t M,
                    Py_ssize_t K, const float* scale, int n_threads):
    """_pack_weight_into a fresh (groups, chexcy_gemm_apack_floats(M, K)) array."""
    cdef float* ap
    packed = _floats(groups * chexcy_gemm_apack_floats(M, K), &ap)
    _pack_weight_into(ap, w, gs, rs, cs, groups, M, K, scale, n_threads)
    return packed.reshape(groups, -1)


cdef void _pack_weight_into(float* ap, const float* w, Py_ssize_t gs, Py_ssize_t rs, Py_ssize_t cs, int groups,
                            Py_ssize_t M, Py_ssize_t K, const float* scale, int n_threads) noexcept:
    """Each group's weight (M, K), element (m, k) of group g at w[g gs + m rs + k cs] (times scale[g M + m]
    when scale is not NULL), packed for the block products into ap, group g at g
    chexcy_gemm_apack_floats(M, K). Units are (group, K block, run of row strips), about 8 per thread
    where the strips allow. In whole K blocks a 768-deep weight was 3 units and a 128-deep one 1, packed
    by one thread while the other waited: 1x1 768>128 at 7x7, batch 8, fwd+bwd, 2 threads, about 40 us
    of a 1.1 ms call."""
    cdef Py_ssize_t nkb = (K + GEMM_KC - 1) // GEMM_KC, nq = (M + GEMM_MR - 1) // GEMM_MR
    cdef Py_ssize_t parts = min(nq, max(1, (8 * n_threads + groups * nkb - 1) // (groups * nkb)))
    cdef Py_ssize_t u, b, p, apack = chexcy_gemm_apack_floats(M, K)
    for u in prange(groups * nkb * parts, nogil=True, schedule="static", num_threads=n_threads):
        b = u // parts
        p = u % parts
        chexcy_gemm_pack_a_part(w + b // nkb * gs, rs, cs, M, K, b % nkb, p * nq // parts, (p + 1) * nq // parts,
                                ap + b // nkb * apack, scale + b // nkb * M if scale != NULL else NULL)


cdef _gemm_conv(x, w, const float[::1] bias, float[:, :, :, ::1] out,
                int groups, int sh, int sw, int ph, int pw, int dil_h, int dil_w, const float* wscale=NULL):
    """out = conv(x, w) + bias as one matrix product per (sample, group) (chexcy/_ops_conv_gemm.h): the
    IM2COL_GEMM path. Units are (n, g, block of GEMM_TASK_COLS output positions)."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = w.shape[0], Cg = w.shape[1], KH = w.shape[2], KW = w.shape[3], Fg = F // groups
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3], K = Cg * KH * KW
    cdef Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw, u
    cdef Py_ssize_t apack = chexcy_gemm_apack_floats(Fg, K)
    cdef Py_ssize_t nstrips = (OH * OW + GEMM_NR - 1) // GEMM_NR
    cdef Py_ssize_t SB = max(1, GEMM_TASK_COLS // GEMM_NR), nsb = (nstrips + SB - 1) // SB
    cdef const float[:, :, :, ::1] wv = w
    cdef const float[:, :, :, ::1] pv = _padded(x, ph, pw, n_threads)
    cdef const float[:, ::1] av = _packed_weight(&wv[0, 0, 0, 0], Fg * K, K, 1, groups, Fg, K, wscale, n_threads)
    bbuf = _empty((n_threads, GEMM_KC * GEMM_NR))
    cdef float[:, ::1] bv = bbuf
    for u in prange(N * groups * nsb, nogil=True, schedule="static", num_threads=n_threads):
        _gemm_conv_unit(&pv[0, 0, 0, 0], &av[0, 0], &bias[0], &out[0, 0, 0, 0], &bv[omp_get_thread_num(), 0],
                        u, nsb, SB, nstrips, apack, groups, C, Fg, Hp, Wp, KH, KW, OH, OW, sh, sw, dil_h, dil_w)


cdef void _pw_unit(
        const float* src, const float* ap, const float* bias, float* out, float* bbuf, float* cbuf, Py_ssize_t u,
        Py_ssize_t rb, Py_ssize_t nsb, Py_ssize_t SB, Py_ssize_t nstrips, Py_ssize_t apack, Py_ssize_t Fo,
        Py_ssize_t K, Py_ssize_t src_ns, Py_ssize_t src_cs, Py_ssize_t OW, Py_ssize_t P, Py_ssize_t rowstep,
        int sw, Py_ssize_t NP, Py_ssize_t out_ns, int relu, const float* res) noexcept nogil:
    """Unit u = (g, r, sb) of _pw_product: row block r (of rb, whole tiles) of strips [sb SB, (sb + 1) SB)
    of group g's product."""
    cdef chexcy_pw_geom geo
    cdef Py_ssize_t g = u // (rb * nsb), r = u // nsb % rb, sb = u % nsb
    cdef Py_ssize_t Fp = (Fo + GEMM_MR - 1) // GEMM_MR * GEMM_MR, nt = Fp // GEMM_MR
    geo.x = src + g * K * src_cs
    geo.ns, geo.cs, geo.OW, geo.P, geo.rowstep, geo.sw, geo.NP = src_ns, src_cs, OW, P, rowstep, sw, NP
    chexcy_pw_task(&geo, ap + g * apack, bias + g * Fp, Fo, K, sb * SB, min(nstrips, (sb + 1) * SB),
                   r * nt // rb, (r + 1) * nt // rb, out + g * Fo * P, out_ns, bbuf, cbuf, relu,
                   res + g * Fo * P if res != NULL else NULL)


cdef void _pw_line_unit(
        const float* src, const float* ap, const float* bias, float* out, float* bbuf, float* cbuf, Py_ssize_t u,
        Py_ssize_t nu, Py_ssize_t SB, Py_ssize_t nstrips, Py_ssize_t apack, Py_ssize_t Fo, Py_ssize_t K,
        Py_ssize_t src_ns, Py_ssize_t src_cs, Py_ssize_t OW, Py_ssize_t P, Py_ssize_t rowstep, int sw, Py_ssize_t NP,
        Py_ssize_t out_ns, int relu, const float* res, int groups) noexcept nogil:
    """Unit u of nu of _pw_product cut as a line: the (group, strip, row tile) triples in that order, cut
    into nu runs of equal length (_pw_grid). A strip cut between two runs is packed by both; whole strips
    go SB at a time."""
    cdef chexcy_pw_geom geo
    cdef Py_ssize_t nt = (Fo + GEMM_MR - 1) // GEMM_MR, L = groups * nstrips * nt
    cdef Py_ssize_t a = u * L // nu, b = (u + 1) * L // nu, s, g, t0, t1, n
    geo.ns, geo.cs, geo.OW, geo.P, geo.rowstep, geo.sw, geo.NP = src_ns, src_cs, OW, P, rowstep, sw, NP
    while a < b:
        g = a // (nstrips * nt)
        s = a // nt % nstrips
        t0 = a % nt
        t1 = min(nt, t0 + b - a)
        n = 1
        if t0 == 0 and t1 == nt:        # whole strips, up to SB of them within the group
            n = min(SB, nstrips - s, (b - a) // nt)
        geo.x = src + g * K * src_cs
        chexcy_pw_task(&geo, ap + g * apack, bias + g * nt * GEMM_MR, Fo, K, s, s + n, t0, t1, out + g * Fo * P,
                       out_ns, bbuf, cbuf, relu, res + g * Fo * P if res != NULL else NULL)
        a += (n - 1) * nt + t1 - t0


cdef Py_ssize_t _pw_worst(Py_ssize_t U, Py_ssize_t rb, Py_ssize_t nsb, Py_ssize_t SB, Py_ssize_t nt,
                          Py_ssize_t nstrips, int n_threads) noexcept nogil:
    """Work of the busiest thread over the U units of a (groups, rb, nsb) grid under OpenMP's static
    schedule (contiguous chunks, the first U % n_threads one unit longer), in tile-sized steps: each strip
    is one step of packing plus one per row tile. One pass over the units without a division per unit:
    _pw_grid asks this of up to 40 grids, and with a division per unit the choice took ~9 us of a 7x7
    layer's forward, on one thread while the others waited."""
    cdef Py_ssize_t u, r = 0, sb = 0, t = 0, q = U // n_threads, extra = U % n_threads
    cdef Py_ssize_t end = q + (extra > 0), load = 0, worst = 0, steps = nt // rb + 1
    for u in range(U):
        load += (min(nstrips, (sb + 1) * SB) - sb * SB) * steps
        sb += 1
        if sb == nsb:
            sb = 0
            r = r + 1 if r + 1 < rb else 0
            steps = (r + 1) * nt // rb - r * nt // rb + 1
        if u + 1 == end:
            worst = max(worst, load)
            load = 0
            t += 1
            end += q + (t < extra)
    return worst


cdef void _pw_grid(Py_ssize_t nt, Py_ssize_t nstrips, Py_ssize_t K, int groups, int n_threads, Py_ssize_t* rb_out,
                   Py_ssize_t* sb_out, Py_ssize_t* line_out) noexcept nogil:
    """The units of _pw_product: row blocks whose weight block (rows x one K block) is at most
    PW_MAX_A_BYTES, strip blocks of at most PW_MAX_STRIPS strips whose output block (strips x rows) stays
    within ~512 KiB of L2; among those, the grid whose busiest thread (OpenMP's static schedule:
    contiguous chunks) has the least work, fewer units on a tie. line_out: 0, or n_threads when one run
    of the line of (group, strip, tile) per thread (_pw_line_unit) is less work for the busiest thread
    than the best grid: 13 strips of 11 tiles (7x7, batch 8, 128 outputs) are 7 strips and 6 in a grid,
    84 steps against 78 and 79 on the line."""
    cdef Py_ssize_t max_rows = max(GEMM_MR, PW_MAX_A_BYTES // (4 * min(K, GEMM_KC)))
    cdef Py_ssize_t rb0 = max(1, (nt * GEMM_MR + max_rows - 1) // max_rows), rb, SB, nsb, U
    cdef Py_ssize_t worst, best = -1, best_units = 0
    rb_out[0], sb_out[0] = rb0, 1
    for rb in range(rb0, min(nt, rb0 + 2 * n_threads) + 1):
        for SB in range(1, PW_MAX_STRIPS + 1):
            if SB > 1 and SB * GEMM_NR * ((nt + rb - 1) // rb) * GEMM_MR > (1 << 17):
                break
            nsb = (nstrips + SB - 1) // SB
            U = groups * rb * nsb
            if U > 64 * n_threads:          # plenty of units: the chunks differ by at most one
                worst = (U + n_threads - 1) // n_threads * SB * ((nt + rb - 1) // rb + 1)
            else:
                worst = _pw_worst(U, rb, nsb, SB, nt, nstrips, n_threads)
            if best < 0 or worst < best or (worst == best and U < best_units):
                best, best_units, rb_out[0], sb_out[0] = worst, U, rb, SB
    line_out[0] = 0
    if n_threads == 1 or nt * GEMM_MR > max_rows or groups * nstrips > 64 * n_threads:
        return
    # the line's busiest run: its tiles, plus a packing step for every strip it touches
    cdef Py_ssize_t L = groups * nstrips * nt, t, a, b
    SB = PW_MAX_STRIPS
    while SB > 1 and SB * GEMM_NR * nt * GEMM_MR > (1 << 17):
        SB -= 1
    worst = 0
    for t in range(n_threads):
        a, b = t * L // n_threads, (t + 1) * L // n_threads
        worst = max(worst, b - a + (b + nt - 1) // nt - a // nt)
    if worst < best:
        rb_out[0], sb_out[0], line_out[0] = 1, SB, n_threads


cdef _pw_product(const float* src, Py_ssize_t N, Py_ssize_t src_ns, Py_ssize_t src_cs, Py_ssize_t OW,
                 Py_ssize_t P, Py_ssize_t rowstep, int sw, const float* w, Py_ssize_t w_gs, Py_ssize_t w_rs,
                 Py_ssize_t w_cs, int groups, Py_ssize_t Fo, Py_ssize_t K, const float* bias, float* out,
                 Py_ssize_t out_ns, int relu=0, const float* res=NULL, const float* wscale=NULL):
    """The POINTWISE_GEMM product (chexcy/_ops_pointwise.h), per group g and over the whole batch:
        out[n, g Fo + f, p] = bias[g Fo + f] + sum over k < K of Wg[f, k] src[n, g K + k, p]
    with Wg[f, k] = w[g w_gs + f w_rs + k w_cs] and src[n, c, p] at src + n src_ns + c src_cs +
    (p // OW) rowstep + (p % OW) sw; bias may be NULL (zeros); out (N, groups Fo, P) rows P floats apart,
    samples out_ns apart; then max(., 0) when relu, as each tile is finished. wscale (Fo per group) or
    NULL: Wg's row f times wscale[g Fo + f], as the weight is packed. Units: (group, block of rows,
    block of column strips), or runs of the line of (group, strip, row tile) (_pw_grid)."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t NP = N * P, apack = chexcy_gemm_apack_floats(Fo, K)
    cdef Py_ssize_t Fp = (Fo + GEMM_MR - 1) // GEMM_MR * GEMM_MR, u, f, rb, SB, line
    cdef Py_ssize_t nstrips = (NP + GEMM_NR - 1) // GEMM_NR
    _pw_grid(Fp // GEMM_MR, nstrips, K, groups, n_threads, &rb, &SB, &line)
    cdef Py_ssize_t nsb = (nstrips + SB - 1) // SB
    # one scratch block: the packed weight, the bias padded to Fp per group, and per thread a unit's
    # strips of one K block (packed) and its edge tiles, each part starting on a cache line
    cdef Py_ssize_t alen = (groups * apack + 15) // 16 * 16, blen = (groups * Fp + 15) // 16 * 16
    cdef Py_ssize_t bblen = (SB * GEMM_KC * GEMM_NR + 15) // 16 * 16
    cdef Py_ssize_t cblen = (SB * ((Fp // GEMM_MR + rb - 1) // rb) * GEMM_MR * GEMM_NR + 15) // 16 * 16
    cdef float* ap
    _scratch = _floats(alen + blen + n_threads * (bblen + cblen), &ap)     # alive until the return
    cdef float* bp = ap + alen
    cdef float* bb = bp + blen
    cdef float* cb = bb + n_threads * bblen
    _pack_weight_into(ap, w, w_gs, w_rs, w_cs, groups, Fo, K, wscale, n_threads)
    for u in range(groups):
        for f in range(Fp):
            bp[u * Fp + f] = bias[u * Fo + f] if bias != NULL and f < Fo else 0
    if line:
        for u in prange(line, nogil=True, schedule="static", num_threads=n_threads):
            _pw_line_unit(src, ap, bp, out, bb + omp_get_thread_num() * bblen, cb + omp_get_thread_num() * cblen,
                          u, line, SB, nstrips, apack, Fo, K, src_ns, src_cs, OW, P, rowstep, sw, NP, out_ns, relu,
                          res, groups)
        return
    with nogil:
        for u in prange(groups * rb * nsb, schedule="static", num_threads=n_threads):
            _pw_unit(src, ap, bp, out, bb + omp_get_thread_num() * bblen, cb + omp_get_thread_num() * cblen,
                     u, rb, nsb, SB, nstrips, apack, Fo, K, src_ns, src_cs, OW, P, rowstep, sw, NP, out_ns,
                     relu, res)


cdef _pw_conv(x, w, const float[::1] bias, float* out, Py_ssize_t OH, Py_ssize_t OW, int groups, int sh, int sw,
              int relu, const float* res=NULL, const float* wscale=NULL):
    """POINTWISE_GEMM forward: out (N, F, OH, OW) = conv(x, w) + bias (then max(., 0) when relu) for a 1x1
    kernel without padding, any stride."""
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[:, :, :, ::1] wv = w
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = w.shape[0], Cg = w.shape[1], Fg = F // groups
    _pw_product(&xv[0, 0, 0, 0], N, C * H * W, H * W, OW, OH * OW, sh * W, sw, &wv[0, 0, 0, 0], Fg * Cg, Cg, 1,
                groups, Fg, Cg, &bias[0], out, F * OH * OW, relu, res, wscale)


cdef _pw_dx(dout, w, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, int groups):
    """POINTWISE_GEMM dx at stride 1: dx[n, g] (Cg, HW) = W[g]^T (Cg, Fg) . dout[n, g] (Fg, HW), the
    forward product on dout with the weight read transposed."""
    cdef const float[:, :, :, ::1] dv = dout
    cdef const float[:, :, :, ::1] wv = w
    cdef Py_ssize_t N = dout.shape[0], F = dout.shape[1], Fg = F // groups, Cg = C // groups
    cdef float* dxp
    dx = _empty_at((N, C, H, W), _F32, <void**>&dxp)
    _pw_product(&dv[0, 0, 0, 0], N, F * H * W, H * W, W, H * W, W, 1, &wv[0, 0, 0, 0], Fg * Cg, 1, Cg,
                groups, Cg, Fg, NULL, dxp, C * H * W)
    return dx


cdef void _pw_dweight_unit(const float* dout, const float* x, float* dweight, float* abuf, float* bbuf,
                           Py_ssize_t u, Py_ssize_t rb, Py_ssize_t cb, Py_ssize_t N, Py_ssize_t C, Py_ssize_t F,
                           Py_ssize_t P, int groups) noexcept nogil:
    """Unit u = (g, row block, column block) of _pw_dweight: the blocks cut the group's GEMM_MR-row
    tiles and GEMM_NR-column strips as evenly as they go."""
    cdef Py_ssize_t Cg = C // groups, Fg = F // groups
    cdef Py_ssize_t nF = (Fg + GEMM_MR - 1) // GEMM_MR, nS = (Cg + GEMM_NR - 1) // GEMM_NR
    cdef Py_ssize_t g = u // (rb * cb), r = u // cb % rb, c = u % cb
    cdef Py_ssize_t m0 = r * nF // rb * GEMM_MR, m1 = min(Fg, (r + 1) * nF // rb * GEMM_MR)
    if m1 <= m0 or (c + 1) * nS // cb <= c * nS // cb:
        return
    chexcy_pw_dweight_task(dout + g * Fg * P, F * P, x + g * Cg * P, C * P, P, 0, N * P, Cg, m0, m1 - m0,
                           c * nS // cb, (c + 1) * nS // cb, 0, (m1 - m0 + GEMM_MR - 1) // GEMM_MR,
                           dweight + g * Fg * Cg, Cg, abuf, bbuf)


cdef void _pw_dweight_line_unit(const float* dout, const float* x, float* dweight, float* abuf, float* bbuf,
                                Py_ssize_t u, Py_ssize_t nu, Py_ssize_t N, Py_ssize_t C, Py_ssize_t F,
                                Py_ssize_t P, int groups) noexcept nogil:
    """Unit u of nu of _pw_dweight cut as a line: the (group, column strip, row tile) triples of the
    result in that order, cut into nu runs of equal length; one task per group a run touches."""
    cdef Py_ssize_t Cg = C // groups, Fg = F // groups
    cdef Py_ssize_t nF = (Fg + GEMM_MR - 1) // GEMM_MR, nS = (Cg + GEMM_NR - 1) // GEMM_NR, L = groups * nS * nF
    cdef Py_ssize_t a = u * L // nu, b = (u + 1) * L // nu, g, e
    while a < b:
        g = a // (nS * nF)
        e = min(b, (g + 1) * nS * nF) - g * nS * nF       # the run's end within group g's pairs
        chexcy_pw_dweight_task(dout + g * Fg * P, F * P, x + g * Cg * P, C * P, P, 0, N * P, Cg, 0, Fg,
                               a // nF % nS, (e - 1) // nF + 1, a % nF, (e - 1) % nF + 1, dweight + g * Fg * Cg,
                               Cg, abuf, bbuf)
        a = g * nS * nF + e


cdef Py_ssize_t _pw_dweight_chunks(Py_ssize_t Fg, Py_ssize_t Cg, Py_ssize_t NP) noexcept nogil:
    """How many chunks of the batch's NP columns _pw_dweight sums separately, 1 for none. A small result
    (at most 144 rows and PW_DW_CHUNK_FLOATS floats per group) over many columns is cut along the sum:
    cut into rectangles, each thread would pack all of x (or dout) again for its few tiles, and the
    packing is most of the work there (144>24 at 56x56, batch 8, backward: 2 threads 1.51x one in
    rectangles, 1.95x in chunks). Chunks of at least 4 K blocks, at most 8, fixed by the shape alone:
    the same bits for any thread count."""
    if Fg > 144 or Fg * Cg > PW_DW_CHUNK_FLOATS:
        return 1
    return max(1, min(8, NP // (4 * GEMM_KC)))


cdef void _pw_dweight_chunk(const float* dout, const float* x, float* part, float* abuf, float* bbuf,
                            Py_ssize_t u, Py_ssize_t ks, Py_ssize_t N, Py_ssize_t C, Py_ssize_t F, Py_ssize_t P,
                            int groups) noexcept nogil:
    """Unit u = (g, chunk) of _pw_dweight_chunked: group g's whole dweight summed over the chunk's columns
    (whole K blocks), into part (Fg, Cg)."""
    cdef Py_ssize_t Cg = C // groups, Fg = F // groups, g = u // ks, k = u % ks
    cdef Py_ssize_t nkb = (N * P + GEMM_KC - 1) // GEMM_KC
    chexcy_pw_dweight_task(dout + g * Fg * P, F * P, x + g * Cg * P, C * P, P, k * nkb // ks * GEMM_KC,
                           min(N * P, (k + 1) * nkb // ks * GEMM_KC), Cg, 0, Fg, 0,
                           (Cg + GEMM_NR - 1) // GEMM_NR, 0, (Fg + GEMM_MR - 1) // GEMM_MR, part, Cg, abuf, bbuf)


cdef _pw_dweight_chunked(dout, x, int groups, Py_ssize_t ks):
    """_pw_dweight cut along the sum: units (group, chunk of columns) each compute a whole partial
    dweight; then each group's ks partials are added in chunk order."""
    cdef int n_threads = _threads()
    cdef const float[:, :, :, ::1] dv = dout
    cdef const float[:, :, :, ::1] xv = x
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2] * x.shape[3], F = dout.shape[1]
    cdef Py_ssize_t Cg = C // groups, Fg = F // groups, u, k, j, n = Fg * Cg
    cdef Py_ssize_t alen = ((Fg + GEMM_MR - 1) // GEMM_MR) * GEMM_MR * GEMM_KC, blen = GEMM_KC * GEMM_NR
    parts = _empty((groups * ks, n))
    cdef float[:, ::1] pv = parts
    scratch = _empty((n_threads, alen + blen))
    cdef float[:, ::1] sv = scratch
    dweight = _empty((F, Cg, 1, 1))
    cdef float[:, :, :, ::1] wv = dweight
    cdef float* o
    for u in prange(groups * ks, nogil=True, schedule="static", num_threads=n_threads):
        _pw_dweight_chunk(&dv[0, 0, 0, 0], &xv[0, 0, 0, 0], &pv[u, 0], &sv[omp_get_thread_num(), 0],
                          &sv[omp_get_thread_num(), alen], u, ks, N, C, F, P, groups)
    with nogil:
        for u in range(groups):
            o = &wv[u * Fg, 0, 0, 0]
            for j in range(n):
                o[j] = pv[u * ks, j]
            for k in range(1, ks):
                for j in range(n):
                    o[j] = o[j] + pv[u * ks + k, j]
    return dweight


cdef _pw_dweight(dout, x, int groups):
    """POINTWISE_GEMM dweight at stride 1: dweight[g] (Fg, Cg) = sum over the batch's columns of
    dout[n, g] (Fg, P) x[n, g]^T (P, Cg) (chexcy_pw_dweight_task). Units: rectangles of each group's
    result (row blocks x column blocks), as many as the threads need and no finer, or one run per thread
    of the line of (group, strip, tile) (_pw_dweight_line_unit); which thread computes which element does
    not change a bit of the result."""
    cdef int n_threads = _threads()
    cdef const float[:, :, :, ::1] dv = dout
    cdef const float[:, :, :, ::1] xv = x
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2] * x.shape[3], F = dout.shape[1]
    cdef Py_ssize_t Cg = C // groups, Fg = F // groups, u
    cdef Py_ssize_t nF = (Fg + GEMM_MR - 1) // GEMM_MR, nS = (Cg + GEMM_NR - 1) // GEMM_NR
    cdef Py_ssize_t ks = _pw_dweight_chunks(Fg, Cg, N * P)
    if ks > 1:
        return _pw_dweight_chunked(dout, x, groups, ks)
    # row blocks of at most 12 tiles (144 rows: the packed dout block, 144 x GEMM_KC floats, in L2), then
    # the (row blocks, column blocks) pair whose slowest thread has the fewest tiles
    cdef Py_ssize_t rb0 = (nF + 11) // 12, rb = rb0, cb = 1, r, c, best = -1, cost, tasks
    for r in range(rb0, min(nF, rb0 + 2 * n_threads) + 1):
        for c in range(1, min(nS, 2 * n_threads) + 1):
            tasks = groups * r * c
            cost = ((tasks + n_threads - 1) // n_threads) * ((nF + r - 1) // r) * ((nS + c - 1) // c) * 64 \
                + tasks * ((nF + r - 1) // r + (nS + c - 1) // c)     # the tiles, then the packing
            if best < 0 or cost < best:
                best, rb, cb = cost, r, c
    # or the line of (group, strip, tile) cut into one run per thread, when its busiest run is less work
    # (each run packs all its rows of dout, and the strips it touches): 128 x 288 (9 strips of 11 tiles)
    # in two rectangles of 5 strips and 4 had 2 threads at 1.45x one on dweight (288 > 128 at 14x14)
    cdef Py_ssize_t line = 0, pairs = groups * nF * nS, tr = (nF + rb - 1) // rb, ts = (nS + cb - 1) // cb
    cdef Py_ssize_t rect_worst = (groups * rb * cb + n_threads - 1) // n_threads * (tr * ts * 64 + tr + ts)
    cdef Py_ssize_t line_worst = (pairs + n_threads - 1) // n_threads * 64 + nF + (nS + n_threads - 1) // n_threads + 1
    if n_threads > 1 and nF <= 12 and pairs <= 64 * n_threads and line_worst < rect_worst:
        line, rb, cb = n_threads, 1, 1
    cdef Py_ssize_t alen = ((nF + rb - 1) // rb + 1) * GEMM_MR * GEMM_KC, blen = GEMM_KC * GEMM_NR
    cdef float* wp
    cdef float* sp
    dweight = _floats(F * Cg, &wp).reshape(F, Cg, 1, 1)
    _scratch = _floats(n_threads * (alen + blen), &sp)     # alive until the return
    if line:
        for u in prange(line, nogil=True, schedule="static", num_threads=n_threads):
            _pw_dweight_line_unit(&dv[0, 0, 0, 0], &xv[0, 0, 0, 0], wp, sp + omp_get_thread_num() * (alen + blen),
                                  sp + omp_get_thread_num() * (alen + blen) + alen, u, line, N, C, F, P, groups)
        return dweight
    for u in prange(groups * rb * cb, nogil=True, schedule="static", num_threads=n_threads):
        _pw_dweight_unit(&dv[0, 0, 0, 0], &xv[0, 0, 0, 0], wp, sp + omp_get_thread_num() * (alen + blen),
                         sp + omp_get_thread_num() * (alen + blen) + alen, u, rb, cb, N, C, F, P, groups)
    return dweight


cdef _gemm_conv_phase(x, w, const float[::1] bias, float[:, :, :, ::1] out,
                      int groups, int sh, int sw, int ph, int pw, int dil_h, int dil_w, const float* wscale=NULL):
    """out = conv(x, w) + bias, the IM2COL_GEMM forward on phase planes (chexcy_cg_task_phase): the
    input split once into (N, C, sh sw, Hq, Wq), then one product per (sample, group) whose B rows are
    contiguous copies. Units are (n, g, block of GEMM_TASK_COLS columns); bitwise the same sums as
    _gemm_conv."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = w.shape[0], Cg = w.shape[1], KH = w.shape[2], KW = w.shape[3], Fg = F // groups
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3], K = Cg * KH * KW, u, n, g, sb
    cdef Py_ssize_t Hq = (H + 2 * ph + sh - 1) // sh, Wq = (W + 2 * pw + sw - 1) // sw
    cdef Py_ssize_t cs = sh * sw * Hq * Wq
    cdef Py_ssize_t nstrips = (OH * Wq + GEMM_NR - 1) // GEMM_NR
    cdef Py_ssize_t SB = max(1, GEMM_TASK_COLS // GEMM_NR), nsb = (nstrips + SB - 1) // SB
    cdef Py_ssize_t ctlen = (Fg * SB * GEMM_NR + 15) // 16 * 16
    cdef const float[:, :, :, ::1] wv = w
    cdef const float[:, :, :, ::1] xv = x
    # the tasks' last strips read up to GEMM_NR + Wq floats past the last plane (into dropped columns)
    xq = _empty((N * C * cs + Wq + 2 * GEMM_NR,))
    xq[N * C * cs:] = 0
    cdef float[::1] qv = xq
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_cg_phase_split(&xv[u // C, u % C, 0, 0], H, W, ph, pw, sh, sw, Hq, Wq, &qv[u * cs], Hq * Wq)
    offs = np.empty(KH * KW, np.intp)
    cdef Py_ssize_t[::1] ov = offs
    chexcy_cg_phase_taps(KH, KW, sh, sw, dil_h, dil_w, Hq, Wq, &ov[0])
    cdef const float[:, ::1] av = _packed_weight(&wv[0, 0, 0, 0], Fg * K, K, 1, groups, Fg, K, wscale, n_threads)
    scratch = _empty((n_threads, ctlen + GEMM_KC * GEMM_NR))
    cdef float[:, ::1] sv = scratch
    for u in prange(N * groups * nsb, nogil=True, schedule="static", num_threads=n_threads):
        sb = u % nsb
        g = u // nsb % groups
        n = u // nsb // groups
        chexcy_cg_task_phase(&qv[(n * C + g * Cg) * cs], &ov[0], KH * KW, cs, Wq, OH, OW, &av[g, 0],
                             &bias[g * Fg], Fg, K, sb * SB, min(nstrips, (sb + 1) * SB),
                             &out[n, g * Fg, 0, 0], &sv[omp_get_thread_num(), 0],
                             &sv[omp_get_thread_num(), ctlen])


def _im2col_forward_phase(x, weight, bias, stride, padding, dilation, int groups):
    """The IM2COL_GEMM forward on phase planes for any shape, whatever conv_plan picks (for the tests
    and benchmarks of the path): x (N, C, H, W), weight (F, C // groups, KH, KW), bias (F,)."""
    N, _, H, W = x.shape
    F, _, KH, KW = weight.shape
    out = _empty((N, F, _conv_out_size(H, KH, stride[0], padding[0], dilation[0]),
                  _conv_out_size(W, KW, stride[1], padding[1], dilation[1])))
    _gemm_conv_phase(x, weight, bias, out, groups, stride[0], stride[1], padding[0], padding[1],
                     dilation[0], dilation[1])
    return out


cdef void _sample_plane(float* a, Py_ssize_t W, float* b, Py_ssize_t OH, Py_ssize_t OW, int sh, int sw,
                        bint spread) noexcept nogil:
    """One plane of the strided grid: b (OH, OW) = a[::sh, ::sw] (a rows W floats long), or with spread
    the other way, a[::sh, ::sw] = b and the rest of a's OH sh (clipped by the caller) rows zero."""
    cdef Py_ssize_t oh, ow
    for oh in range(OH):
        if spread:
            for ow in range(OW):
                a[oh * sh * W + ow * sw] = b[oh * OW + ow]
        elif sw == 2:       # a constant stride, which the compiler vectorises
            for ow in range(OW):
                b[oh * OW + ow] = a[oh * sh * W + 2 * ow]
        else:
            for ow in range(OW):
                b[oh * OW + ow] = a[oh * sh * W + ow * sw]


cdef _strided_grid(x, Py_ssize_t OH, Py_ssize_t OW, int sh, int sw):
    """x[:, :, ::sh, ::sw] (OH x OW of each plane) as a fresh C-contiguous array, planes in parallel."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], W = x.shape[3], u
    cdef int n_threads = _threads()
    out = _empty((N, C, OH, OW))
    cdef const float[:, :, :, ::1] xv = x
    cdef float[:, :, :, ::1] ov = out
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):     # (x only read)
        _sample_plane(<float*>&xv[u // C, u % C, 0, 0], W, &ov[u // C, u % C, 0, 0], OH, OW, sh, sw, False)
    return out


cdef _spread_grid(g, Py_ssize_t H, Py_ssize_t W, int sh, int sw):
    """The gradient of _strided_grid: (N, C, H, W) zeros with g (N, C, OH, OW) at [::sh, ::sw]."""
    cdef Py_ssize_t N = g.shape[0], C = g.shape[1], OH = g.shape[2], OW = g.shape[3], u
    cdef int n_threads = _threads()
    out = _empty((N, C, H, W))
    cdef const float[:, :, :, ::1] gv = g
    cdef float[:, :, :, ::1] ov = out
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):     # (g only read)
        memset(&ov[u // C, u % C, 0, 0], 0, H * W * sizeof(float))
        _sample_plane(&ov[u // C, u % C, 0, 0], W, <float*>&gv[u // C, u % C, 0, 0], OH, OW, sh, sw, True)
    return out


def conv2d_forward(x, weight, bias, stride, padding, dilation, int groups, residual=None, bint relu=False,
                   weight_scale=None):
    """x (N, C, H, W), weight (F, C // groups, KH, KW), bias (F,) or None -> out (N, F, OH, OW); then
    + residual (out's shape, C-contiguous float32, when given) and max(., 0) when relu: in the tiles'
    stores on the POINTWISE_GEMM path, the ReLU alone in the output transform on WINOGRAD, else one
    compiled pass after the conv. weight_scale (F,) float32: the conv of weight * weight_scale[:, None,
    None, None], scaled as the POINTWISE_GEMM, WINOGRAD and IM2COL_GEMM paths pack the weight (no scaled
    copy of it), by a copy first on the others."""
    cdef int sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1]
    cdef int dil_h = dilation[0], dil_w = dilation[1]
    N, _, H, W = x.shape
    F, _, KH, KW = weight.shape
    cdef Py_ssize_t OH = _conv_out_size(H, KH, sh, ph, dil_h), OW = _conv_out_size(W, KW, sw, pw, dil_w)
    path = _plan_of(x.shape, weight.shape, stride, padding, dilation, groups)[0]
    if path.startswith("SUBSAMPLED>") or (path == "POINTWISE_GEMM" and (sh > 1 or sw > 1)):
        # the sampled pixels copied out once (planes in parallel), then the stride-1 product reads whole
        # rows: faster than gathering every other float into the packing (1x1 stride 2, 256 -> 512 at 56,
        # batch 16, 2 threads: 16.3 ms strided, 8.9 + ~1 ms this way)
        return conv2d_forward(_strided_grid(x, OH, OW, sh, sw), weight, bias, (1, 1), padding, dilation, groups,
                              residual, relu, weight_scale)
    if path.startswith("UNDILATED>"):
        # output pixel (i dil_h + a, j dil_w + b) is pixel (i, j) of the undilated conv of phase (a, b)
        outq = conv2d_forward(_phase_batch(x, ph, pw, dil_h, dil_w), weight, bias, (1, 1), (0, 0), (1, 1), 1,
                              None, relu and residual is None, weight_scale)
        out = _phase_unbatch(outq, OH, OW, dil_h, dil_w)
        return _conv_epilogue(out, residual, relu) if residual is not None else out
    cdef const float[::1] scv
    cdef const float* sc = NULL
    if weight_scale is not None:
        if path not in ("POINTWISE_GEMM", "WINOGRAD", "IM2COL_GEMM"):
            weight = weight * weight_scale[:, None, None, None]
        else:
            scv = weight_scale
            sc = &scv[0]
    if path.startswith("STRIDE1_SUBSAMPLED>"):
        # Stride 2: the register-tiled stride-1 kernel on every position, then every sh-th row and
        # sw-th column, is ~5x faster than the strided loop despite the sh * sw times the work.
        full = conv2d_forward(x, weight, bias, (1, 1), padding, dilation, groups)
        out = np.ascontiguousarray(full[:, :, :(OH - 1) * sh + 1:sh, :(OW - 1) * sw + 1:sw])
        return _conv_epilogue(out, residual, relu)
    cdef float* op
    out = _empty_at((N, F, OH, OW), _F32, <void**>&op)
    b = np.zeros(F, np.float32) if bias is None else bias
    cdef const float[:, :, :, ::1] rv
    if path == "POINTWISE_GEMM":                # the sum and the ReLU in the tiles' stores
        if residual is None:
            _pw_conv(x, weight, b, op, OH, OW, groups, sh, sw, relu, NULL, sc)
        else:
            rv = residual
            _pw_conv(x, weight, b, op, OH, OW, groups, sh, sw, relu, &rv[0, 0, 0, 0], sc)
        return out
    if path == "WINOGRAD" and residual is None:     # the ReLU in the output transform
        _wino_conv(x, weight, b, out, ph, pw, False, relu, sc)
        return out
    if path == "IM2COL_GEMM" and weight.shape[1] * KH * KW >= GEMM_PHASE_MIN_K:
        _gemm_conv_phase(x, weight, b, out, groups, sh, sw, ph, pw, dil_h, dil_w, sc)
    elif path == "IM2COL_GEMM":
        _gemm_conv(x, weight, b, out, groups, sh, sw, ph, pw, dil_h, dil_w, sc)
    elif path in ("DEPTHWISE", "DEPTHWISE_LANES"):
        _depthwise_forward(x, weight, b, out, sh, sw, ph, pw, dil_h, dil_w, path == "DEPTHWISE_LANES")
    elif path == "WINOGRAD":
        _wino_conv(x, weight, b, out, ph, pw, False, False, sc)
    else:                   # DIRECT, PLAIN (_conv_rows takes the strided loop for sw > 1)
        _conv_core(x, weight, b, out, groups, sh, sw, ph, pw, dil_h, dil_w)
    return _conv_epilogue(out, residual, relu)


cdef _conv_epilogue(out, residual, bint relu):
    """out + residual (when given), then max(., 0) when relu, in place on out (a fresh conv output)."""
    if relu:
        return relu_forward(out, True, residual)
    if residual is not None:
        np.add(out, residual, out=out)
    return out


# ------------------------------------------------------------------------------------------------
# conv2d backward
# ------------------------------------------------------------------------------------------------

cdef void _dx_plane(
        const float[:, :, :, ::1] dout,             # IN  (N, F, OH, OW)
        const float[:, :, :, ::1] w,                # IN  (F, Cg, KH, KW)
        float[:, :, :, ::1] dx,                     # OUT (N, C, H, W), plane (n, c)
        Py_ssize_t nc, int groups, int sh, int sw, int ph, int pw, int dil_h, int dil_w) noexcept nogil:
    """General dx path: scatter every dout of the group into the (n, c) plane this thread owns."""
    cdef Py_ssize_t C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t F = dout.shape[1], OH = dout.shape[2], OW = dout.shape[3]
    cdef Py_ssize_t Cg = w.shape[1], KH = w.shape[2], KW = w.shape[3], Fg = F // groups
    cdef Py_ssize_t n = nc // C, c = nc % C, g = c // Cg, cl = c % Cg
    cdef Py_ssize_t f, kh, kw, oh, ow, ih, iw
    cdef float wv
    cdef float* plane = &dx[n, c, 0, 0]
    cdef const float* drow
    memset(plane, 0, H * W * sizeof(float))
    for f in range(g * Fg, (g + 1) * Fg):
        for kh in range(KH):
            for kw in range(KW):
                wv = w[f, cl, kh, kw]
                for oh in range(OH):
                    ih = oh * sh - ph + kh * dil_h
                    if ih < 0 or ih >= H:
                        continue
                    drow = &dout[n, f, oh, 0]
                    for ow in range(OW):
                        iw = ow * sw - pw + kw * dil_w
                        if iw >= 0 and iw < W:
                            plane[ih * W + iw] += wv * drow[ow]


cdef void _dbias_one(
        const float[:, :, :, ::1] dout,             # IN  (N, F, OH, OW)
        float* dbias,                               # OUT (F,), entry f
        Py_ssize_t f) noexcept nogil:
    cdef Py_ssize_t n, HW = dout.shape[2] * dout.shape[3]
    cdef double s = 0
    for n in range(dout.shape[0]):
        s += chexcy_sum(&dout[n, f, 0, 0], HW)
    dbias[f] = <float>s


cdef void _dw_rows(
        const float* xc,                            # IN  padded input plane at the chunk's first row
        const float** drows,                        # IN  DW_F dout rows (the chunk's first), DW_F channels
        Py_ssize_t nb, Py_ssize_t x_nstride, Py_ssize_t d_nstride,   # samples in the chunk, their strides
        Py_ssize_t rr, Py_ssize_t OW, Py_ssize_t ds, Py_ssize_t Wp,  # chunk rows, width, dout/x row steps
        int sh, int dil_h, int dil_w, Py_ssize_t KH, Py_ssize_t nkc, bint rows33,
        float* part,                                # IN/OUT (KH, nkc, DW_F, 3, DW_V) lane sums, this channel
        const float* pf) noexcept nogil:            # IN  the next call's input (prefetched), laid out as xc
    """One chunk of dweight lane sums for one input channel: all kernel rows and groups of 3 columns,
    with the 3-row tile when it applies (rows33: KH == 3, stride and row dilation 1; 2 rows or more).
    The 3-row tile prefetches `pf` (its calls for the DW_F // DWR_F channel pairs take turns over the
    two halves of each 128-byte stretch of a row)."""
    cdef Py_ssize_t part_len = DW_F * 3 * DW_V, kh, kc, j
    if rows33 and rr >= 2:
        for kc in range(nkc):
            for j in range(DW_F // DWR_F):
                chexcy_dw_rows33(xc + kc * 3 * dil_w, &drows[j * DWR_F], nb, x_nstride, d_nstride, rr, OW, ds, Wp,
                                 dil_w, part + kc * part_len + j * DWR_F * 3 * DW_V, nkc * part_len,
                                 pf + kc * 3 * dil_w + (j % 2) * 16)
        return
    for kh in range(KH):
        for kc in range(nkc):
            chexcy_dw_rows3(xc + kh * dil_h * Wp + kc * 3 * dil_w, drows, nb, x_nstride, d_nstride, rr, OW, ds,
                            sh * Wp, dil_w, part + (kh * nkc + kc) * part_len)


cdef inline Py_ssize_t _chunk_plane(Py_ssize_t n, Py_ssize_t c, Py_ssize_t N, Py_ssize_t C,
                                    Py_ssize_t NB) noexcept nogil:
    """Where dweight keeps the padded plane (n, c): chunk-major, (N / NB chunks, C, NB samples). The
    planes a _dw_rows call reads (NB samples of one channel) are then contiguous, and so are the calls
    for consecutive channels, so the next call's input is one stretch of memory to prefetch."""
    cdef Py_ssize_t n0 = n - n % NB
    return n0 * C + c * min(NB, N - n0) + (n - n0)


cdef void _dw_block(
        const float[:, :, :, ::1] dout,             # IN  (N, F, OH, OW)
        const float[:, :, :, ::1] x,                # IN  (N, C, H, W)
        float[:, :, :, ::1] dweight,                # OUT (F, Cg, KH, KW), channels [f0, f0 + nf)
        const float* xpad,                          # IN  x zero-padded once, chunk-major (_chunk_plane)
        Py_ssize_t unit,                            # which (g, block of DW_F output channels)
        Py_ssize_t R,                               # dout rows per chunk (whole planes if NB > 1)
        Py_ssize_t NB,                              # samples per chunk (1 unless R covers a plane)
        float* part,                                # scratch (Cg, KH, ceil(KW/3), DW_F, 3, DW_V)
        float* dchunk,                              # scratch (DW_F, NB, R, OW), 64-byte aligned
        float* dbias,                               # OUT (F,) entries [f0, f0 + nf)
        int groups, int sh, int ph, int pw, int dil_h, int dil_w) noexcept nogil:
    """Fast dweight (column stride 1) and dbias for one block of DW_F output channels, owned by one thread.

    dout is walked in chunks of R rows of NB samples (about 16 KiB for the DW_F channels, so it stays
    in L1) and every (input channel, kernel row, group of 3 kernel columns) sums over the chunk, its
    lane sums loaded from and stored back to `part`; dbias sums the chunk while it is in L1. The order of
    every sum is fixed by the shape alone (the chunk size depends on OW only). Each chunk is first
    copied into `dchunk`, contiguous and cache-line aligned: read in place, most of its vectors
    straddled two cache lines (dout rarely starts on one), which cost dweight 4-10%."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = dout.shape[1], OH = dout.shape[2], OW = dout.shape[3], Fg = F // groups
    cdef Py_ssize_t Cg = dweight.shape[1], KH = dweight.shape[2], KW = dweight.shape[3]
    cdef Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw, nkc = (KW + 2) // 3
    cdef Py_ssize_t nfb = (Fg + DW_F - 1) // DW_F, g = unit // nfb, fb = unit % nfb
    cdef Py_ssize_t f0 = g * Fg + fb * DW_F, nf = Fg - fb * DW_F
    cdef Py_ssize_t part_len = DW_F * 3 * DW_V
    cdef Py_ssize_t n0, nb, r0, rr, c, kh, f, j, kw, plane
    cdef const float* drows[DW_F]
    cdef const float* xc
    cdef const float* pf
    cdef float* p
    cdef double bsum[DW_F]
    # 3 kernel rows, stride and dilation 1 in rows: each input row feeds all 3 (chexcy_dw_rows33)
    cdef bint rows33 = KH == 3 and sh == 1 and dil_h == 1
    if nf > DW_F:
        nf = DW_F
    memset(part, 0, Cg * KH * nkc * part_len * sizeof(float))
    for f in range(DW_F):
        bsum[f] = 0
    n0 = 0
    while n0 < N:
        nb = min(NB, N - n0)
        r0 = 0
        while r0 < OH:
            rr = min(R, OH - r0)
            for f in range(DW_F):
                # channels past the end of the group repeat the last one; their sums are never stored
                drows[f] = dchunk + (f if f < nf else nf - 1) * nb * rr * OW
            for f in range(nf):
                for j in range(nb):
                    memcpy(<float*>drows[f] + j * rr * OW, &dout[n0 + j, f0 + f, r0, 0], rr * OW * sizeof(float))
                    bsum[f] += chexcy_sum(drows[f] + j * rr * OW, rr * OW)
            for c in range(Cg):
                plane = _chunk_plane(n0, g * Cg + c, N, C, NB)
                xc = xpad + plane * Hp * Wp + r0 * sh * Wp
                # the next channel's planes (or the next chunk's first: they follow on), when all in x
                pf = xc + nb * Hp * Wp if plane + 2 * nb <= N * C else xc
                _dw_rows(xc, drows, nb, Hp * Wp, rr * OW, rr, OW, OW, Wp, sh, dil_h, dil_w, KH, nkc, rows33,
                         part + c * KH * nkc * part_len, pf)
            r0 += rr
        n0 += nb
    for f in range(nf):
        dbias[f0 + f] = <float>bsum[f]
        for c in range(Cg):
            for kh in range(KH):
                for kw in range(KW):
                    p = part + ((c * KH + kh) * nkc + kw // 3) * part_len + (f * 3 + kw % 3) * DW_V
                    dweight[f0 + f, c, kh, kw] = chexcy_lane_total(p)


cdef void _dwc_pack_x(
        const float[:, :, :, ::1] x,                # IN  (N, C, H, W)
        float* xt,                                  # OUT (G, nct, N, Hp, Wp, GEMM_NR), block `unit`
        Py_ssize_t unit,                            # which (g, channel block ct, n): (g * nct + ct) * N + n
        int groups, Py_ssize_t nct, int ph, int pw,
        Py_ssize_t Hp, Py_ssize_t Wp) noexcept nogil:   # padded size, at least H + 2 ph by W + 2 pw
    """One block of the channel-blocked padded input of _dwc_thread (and _wdw_unit): channel
    ct * GEMM_NR + j of group g in lane j of every padded position; zero in the padding (ph rows on top,
    pw columns on the left, the rest of Hp x Wp below and right) and in lanes past the group's channels."""
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3], Cg = x.shape[1] // groups
    cdef Py_ssize_t n = unit % N, ct = unit // N % nct
    cdef Py_ssize_t c0 = unit // N // nct * Cg + ct * GEMM_NR, cn = min(<Py_ssize_t>GEMM_NR, Cg - ct * GEMM_NR)
    cdef Py_ssize_t h, row = Wp * GEMM_NR
    cdef float* d = xt + unit * Hp * row
    memset(d, 0, ph * row * sizeof(float))
    memset(d + (ph + H) * row, 0, (Hp - ph - H) * row * sizeof(float))
    for h in range(H):
        memset(d + (ph + h) * row, 0, pw * GEMM_NR * sizeof(float))
        # position after position, the cn channel rows side by side, lanes past cn zero
        chexcy_gemm_pack_b(&x[n, c0, h, 0], 1, H * W, W, cn, 0, d + (ph + h) * row + pw * GEMM_NR)
        memset(d + (ph + h) * row + (pw + W) * GEMM_NR, 0, (Wp - pw - W) * GEMM_NR * sizeof(float))


cdef void _dwc_thread(
        const float[:, :, :, ::1] dout,             # IN  (N, F, OH, OW)
        const float* xt,                            # IN  x channel-blocked and padded (_dwc_pack_x)
        float* cbuf,                                # IN/OUT (G * ncot * GEMM_MR, KH * KW, nct * GEMM_NR)
        double* bsum,                               # IN/OUT (G * ncot * GEMM_MR,) dbias sums
        float* abuf,                                # scratch: packed dout strips, _dwc_abuf_floats
        Py_ssize_t t, Py_ssize_t T,                 # which of the T equal shares of the work
        int groups, Py_ssize_t Cg, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t Hp, Py_ssize_t Wp,
        Py_ssize_t rb, int dil_h, int dil_w) noexcept nogil:
    """Share t of T of the channel-blocked dweight of a stride-1 convolution. Per group and kernel tap
    (kh, kw) dweight is a matrix product, dweight[:, :, kh, kw] (Fg, Cg) = dout (Fg, N OH OW) times the
    input shifted by the tap (N OH OW, Cg), computed with the register tile of the dense layer
    (GEMM_MR output channels x GEMM_NR input channels, chexcy_gemm_tile_rows): each step broadcasts
    GEMM_MR dout values and loads GEMM_NR adjacent input channels, so no lanes are left to add up.
    Work units are (g, block of GEMM_MR output channels, tap) and share t owns units [t U / T,
    (t + 1) U / T) and their rows of cbuf (and the dbias of the blocks whose tap 0 it owns). K blocks of
    rb output rows of one sample go in order, each summed from 0 and then added: every element's
    arithmetic is fixed by the shape, whichever share computes it (bitwise the same for any T)."""
    cdef Py_ssize_t N = dout.shape[0], F = dout.shape[1], OH = dout.shape[2], OW = dout.shape[3]
    cdef Py_ssize_t Fg = F // groups, ncot = (Fg + GEMM_MR - 1) // GEMM_MR
    cdef Py_ssize_t nct = (Cg + GEMM_NR - 1) // GEMM_NR, taps = KH * KW, Cgp = nct * GEMM_NR
    cdef Py_ssize_t U = groups * ncot * taps, u0 = t * U // T, u1 = (t + 1) * U // T
    cdef Py_ssize_t q0 = u0 // taps, q1 = (u1 - 1) // taps + 1
    cdef Py_ssize_t n, r0, rr, kc, q, m0, mc, i, ct, u, tap, g
    cdef const float* b
    if u0 >= u1:
        return
    for n in range(N):
        r0 = 0
        while r0 < OH:
            rr = min(rb, OH - r0)
            kc = rr * OW
            for q in range(q0, q1):
                m0 = q // ncot * Fg + q % ncot * GEMM_MR
                mc = min(<Py_ssize_t>GEMM_MR, Fg - q % ncot * GEMM_MR)
                chexcy_gemm_pack_a(&dout[n, 0, 0, 0], OH * OW, 1, m0, mc, r0 * OW, kc,
                                   abuf + (q - q0) * kc * GEMM_MR)
                if q * taps >= u0:      # tap 0 of this block is ours: so is its dbias
                    for i in range(mc):
                        bsum[q * GEMM_MR + i] += chexcy_sum(&dout[n, m0 + i, r0, 0], kc)
            for ct in range(nct):
                for u in range(u0, u1):
                    q = u // taps
                    tap = u % taps
                    g = q // ncot
                    b = (xt + (((g * nct + ct) * N + n) * Hp + r0 + tap // KW * dil_h) * Wp * GEMM_NR
                         + tap % KW * dil_w * GEMM_NR)
                    chexcy_gemm_tile_rows_part(rr, OW, abuf + (q - q0) * kc * GEMM_MR, b, Wp * GEMM_NR,
                                               cbuf + (q * GEMM_MR * taps + tap) * Cgp + ct * GEMM_NR, taps * Cgp,
                                               1, min(<Py_ssize_t>GEMM_MR, Fg - q % ncot * GEMM_MR))
            r0 += rr


cdef void _wdw_transforms(
        const float[:, :, :, ::1] dout,             # IN  (N, F, OH, OW)
        const float* xt,                            # IN  x channel-blocked, padded to (2 TH + 2, 2 TW + 2)
        float* z,                                   # OUT Z strips (16, nfb, ql, GEMM_MR) + a vector of slack
        float* v,                                   # OUT V strips (16, nct, ql, GEMM_NR)
        float* dt,                                  # this thread's dout rows (2 TB, 2 TW, Fs)
        Py_ssize_t unit, Py_ssize_t nct, Py_ssize_t TB, Py_ssize_t G, Py_ssize_t Fs,
        Py_ssize_t ql, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """The transforms of one work unit of the Winograd dweight (chexcy/_ops_winograd.h, _wino_plan /
    _wino_span): Z = A dY A^T of its tiles (output channels in the lanes) and V = B^T d B (input
    channels in the lanes), straight into rows r0 ... of strips ql rows long, sample by sample; rows
    from r0 + its tiles to r1 are zeroed (they take the last Z stores' spill), so a product may run
    over them."""
    cdef Py_ssize_t N = dout.shape[0], F = dout.shape[1], OH = dout.shape[2], OW = dout.shape[3]
    cdef Py_ssize_t TH = (OH + 1) // 2, TW = (OW + 1) // 2, nfb = (F + GEMM_MR - 1) // GEMM_MR
    cdef Py_ssize_t Hq = 2 * TH + 2, Wq = 2 * TW + 2
    cdef Py_ssize_t n0, nsam, ty0, nty, ts, sm, ct, xi, fb, r
    _wino_span(unit, N, TH, TB, G, &n0, &nsam, &ty0, &nty)
    ts = nty * TW
    for sm in range(nsam):          # in order: each sample's Z stores spill onto the next one's first row
        chexcy_wdw_dout_rows(&dout[n0 + sm, 0, 0, 0], F, OH, OW, 2 * ty0, 2 * nty, 2 * TW, Fs, dt)
        chexcy_wdw_dout_tiles(dt, Fs, TW, nty, nfb, ql, z + (r0 + sm * ts) * GEMM_MR)
        for ct in range(nct):
            chexcy_wdw_input_tiles(xt + ((ct * N + n0 + sm) * Hq + 2 * ty0) * Wq * GEMM_NR, Wq, TW, nty,
                                   v + (ct * ql + r0 + sm * ts) * GEMM_NR, nct * ql * GEMM_NR)
    r = r0 + nsam * ts
    if r < r1:
        for xi in range(16):
            for fb in range(nfb):
                memset(z + ((xi * nfb + fb) * ql + r) * GEMM_MR, 0, (r1 - r) * GEMM_MR * sizeof(float))
            for ct in range(nct):
                memset(v + ((xi * nct + ct) * ql + r) * GEMM_NR, 0, (r1 - r) * GEMM_NR * sizeof(float))


cdef void _wdw_products(const float* z, const float* v, float* s, Py_ssize_t xi, Py_ssize_t fb0, Py_ssize_t fb1,
                        Py_ssize_t F, Py_ssize_t nct, Py_ssize_t ql, Py_ssize_t K, int add) noexcept nogil:
    """S[xi] (+)= Z[xi] V[xi]^T for the output-channel blocks [fb0, fb1), K rows of the strips (S: (16, Fp,
    Cp)) with the dense layer's register tile; a V strip stays in L1 while the Z strips pass over it. The
    rows of S past F are never read, and not computed."""
    cdef Py_ssize_t nfb = (F + GEMM_MR - 1) // GEMM_MR, Fp = nfb * GEMM_MR, Cp = nct * GEMM_NR, ct, fb
    for ct in range(nct):
        for fb in range(fb0, fb1):
            chexcy_gemm_tile_rows_part(K, 1, z + (xi * nfb + fb) * ql * GEMM_MR,
                                       v + (xi * nct + ct) * ql * GEMM_NR, GEMM_NR,
                                       s + (xi * Fp + fb * GEMM_MR) * Cp + ct * GEMM_NR, Cp, add,
                                       min(<Py_ssize_t>GEMM_MR, F - fb * GEMM_MR))


cdef void _wdw_unit(
        const float[:, :, :, ::1] dout, const float* xt,
        float* s,                                   # IN/OUT S (16, Fp, Cp): this unit's sums added (or stored)
        float* scratch,                             # this thread's: dout rows, Z strips, V strips
        Py_ssize_t unit, int add,                   # see _wino_plan / _wino_span; add to s or store
        Py_ssize_t nct, Py_ssize_t TB, Py_ssize_t G, Py_ssize_t tq, Py_ssize_t Fs) noexcept nogil:
    """One work unit of the Winograd dweight by partial sums: its transforms into this thread's scratch,
    then its products, K = the unit's tiles, added to (or stored in) s."""
    cdef Py_ssize_t TW = (dout.shape[3] + 1) // 2, nfb = (dout.shape[1] + GEMM_MR - 1) // GEMM_MR, xi
    cdef float* dt = scratch                        # (2 TB, 2 TW, Fs)
    cdef float* z = dt + 4 * TB * TW * Fs           # (16, nfb, tq, GEMM_MR) + a vector of slack
    cdef float* v = z + 16 * nfb * tq * GEMM_MR + DW_V     # (16, nct, tq, GEMM_NR)
    cdef Py_ssize_t n0, nsam, ty0, nty
    _wino_span(unit, dout.shape[0], (dout.shape[2] + 1) // 2, TB, G, &n0, &nsam, &ty0, &nty)
    _wdw_transforms(dout, xt, z, v, dt, unit, nct, TB, G, Fs, tq, 0, 0)
    for xi in range(16):
        _wdw_products(z, v, s, xi, 0, nfb, dout.shape[1], nct, tq, nsam * nty * TW, add)


cdef void _wdw_part(
        const float[:, :, :, ::1] dout, const float* xt, float* sp, float* scratch,
        Py_ssize_t p, Py_ssize_t P, Py_ssize_t U, Py_ssize_t nct, Py_ssize_t TB, Py_ssize_t G,
        Py_ssize_t tq, Py_ssize_t Fs, Py_ssize_t ps) noexcept nogil:
    """Partial sum p of P: units [p U / P, (p + 1) U / P) in order into sp + p * ps, the first stored."""
    cdef Py_ssize_t u, u0 = p * U // P, u1 = (p + 1) * U // P
    for u in range(u0, u1):
        _wdw_unit(dout, xt, sp + p * ps, scratch, u, u > u0, nct, TB, G, tq, Fs)


cdef _dweight_winograd(dout, x, int ph, int pw):
    """dweight and dbias of a 3x3, stride-1, dilation-1, one-group convolution by Winograd F(2x2, 3x3).
    Small planes (several samples to a unit of _wino_plan): every unit's transforms side by side in one
    set of strips, then the 16 products once over all the batch's tiles, cut by blocks of output
    channels. Larger planes: the units are cut into WDW_PARTS partial sums by the shape alone, each
    computed by one thread and then added in order. Both bitwise the same for any thread count."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t F = dout.shape[1], OH = dout.shape[2], OW = dout.shape[3]
    cdef Py_ssize_t TH = (OH + 1) // 2, TW = (OW + 1) // 2, TB, G, U, TU
    TB, G, U, TU = _wino_plan(N, TH, TW)
    cdef Py_ssize_t nct = (C + GEMM_NR - 1) // GEMM_NR, nfb = (F + GEMM_MR - 1) // GEMM_MR
    cdef Py_ssize_t Cp = nct * GEMM_NR, Fp = nfb * GEMM_MR, Fs = Fp + DW_V, tq = TU + 1, ql = U * tq
    # the batch's strips at once: S is written once, not once per unit and added up per part (3x3 at
    # 7x7, 512 channels, batch 8: 16 MiB of S per unit; the partial sums made the whole backward 2.9x
    # torch's time)
    cdef bint whole = G > 1 and 16 * (Fp + Cp) * ql * 4 <= WDW_WHOLE_BYTES
    cdef Py_ssize_t P = 1 if whole else min(U, <Py_ssize_t>WDW_PARTS)
    cdef Py_ssize_t Hq = 2 * TH + 2, Wq = 2 * TW + 2, ps = 16 * Fp * Cp, u, f
    cdef Py_ssize_t per = (4 * TB * TW * Fs + 15) // 16 * 16 + max(
        16 * nfb * tq * GEMM_MR + DW_V + 16 * nct * tq * GEMM_NR if not whole else 0, 16 * C)
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[:, :, :, ::1] dv = dout
    xt = _empty((nct * N * Hq * Wq * GEMM_NR,))
    sp = _empty((P, ps))
    scratch = _empty((n_threads, per))
    dweight = _empty((F, C, 3, 3))
    dbias = np.empty(F, np.float32)
    cdef float[::1] xtv = xt
    cdef float[:, ::1] spv = sp
    cdef float[:, ::1] sv = scratch
    cdef float[:, :, :, ::1] dwv = dweight
    cdef float[::1] dbv = dbias
    cdef float[::1] zv
    cdef float[::1] vv
    for u in prange(nct * N, nogil=True, schedule="static", num_threads=n_threads):
        _dwc_pack_x(xv, &xtv[0], u, 1, nct, ph, pw, Hq, Wq)
    if whole:
        z = _empty((16 * nfb * ql * GEMM_MR + DW_V,))
        v = _empty((16 * nct * ql * GEMM_NR,))
        zv = z
        vv = v
        for u in prange(U, nogil=True, schedule="static", num_threads=n_threads):
            _wdw_transforms(dv, &xtv[0], &zv[0], &vv[0], &sv[omp_get_thread_num(), 0], u, nct, TB, G, Fs, ql,
                            u * tq, (u + 1) * tq)
        for u in prange(16 * nfb, nogil=True, schedule="static", num_threads=n_threads):
            _wdw_products(&zv[0], &vv[0], &spv[0, 0], u // nfb, u % nfb, u % nfb + 1, F, nct, ql, ql, 0)
    else:
        for u in prange(P, nogil=True, schedule="static", num_threads=n_threads):
            _wdw_part(dv, &xtv[0], &spv[0, 0], &sv[omp_get_thread_num(), 0], u, P, U, nct, TB, G, tq, Fs, ps)
    for f in prange(F, nogil=True, schedule="static", num_threads=n_threads):
        _dbias_one(dv, &dbv[0], f)
        chexcy_wdw_weight_row(&spv[0, 0] + f * Cp, P, ps, Fp * Cp, C, &sv[omp_get_thread_num(), 0],
                              &dwv[f, 0, 0, 0])
    return dweight, dbias


cdef _dweight_blocked(dout, x, Py_ssize_t KH, Py_ssize_t KW, int groups, int ph, int pw, int dil_h, int dil_w):
    """dweight and dbias of a stride-1 convolution by _dwc_thread (channel-blocked products)."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], Cg = C // groups
    cdef Py_ssize_t F = dout.shape[1], OW = dout.shape[3], Fg = F // groups
    cdef Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw
    cdef Py_ssize_t ncot = (Fg + GEMM_MR - 1) // GEMM_MR, nct = (Cg + GEMM_NR - 1) // GEMM_NR
    cdef Py_ssize_t taps = KH * KW, U = groups * ncot * taps, rb = max(1, DWC_KC // OW)
    cdef Py_ssize_t t, u, nq = 0, abuf_len
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[:, :, :, ::1] dv = dout
    for t in range(n_threads):      # the most blocks of output channels one share packs
        if (t + 1) * U // n_threads > t * U // n_threads:
            nq = max(nq, ((t + 1) * U // n_threads - 1) // taps + 1 - t * U // n_threads // taps)
    abuf_len = (nq * min(rb, dout.shape[2]) * OW * GEMM_MR + 15) // 16 * 16
    xt = _empty((groups * nct * N * Hp * Wp * GEMM_NR,))
    cbuf = np.zeros((groups * ncot * GEMM_MR, taps, nct * GEMM_NR), np.float32)
    bsum = np.zeros(groups * ncot * GEMM_MR, np.float64)
    abuf = _empty((n_threads, abuf_len))
    cdef float[::1] xtv = xt
    cdef float[:, :, ::1] cv = cbuf
    cdef double[::1] bv = bsum
    cdef float[:, ::1] av = abuf
    for u in prange(groups * nct * N, nogil=True, schedule="static", num_threads=n_threads):
        _dwc_pack_x(xv, &xtv[0], u, groups, nct, ph, pw, Hp, Wp)
    for t in prange(n_threads, nogil=True, schedule="static", num_threads=n_threads):
        _dwc_thread(dv, &xtv[0], &cv[0, 0, 0], &bv[0], &av[omp_get_thread_num(), 0], t, n_threads,
                    groups, Cg, KH, KW, Hp, Wp, rb, dil_h, dil_w)
    dweight = np.ascontiguousarray(
        cbuf.reshape(groups, ncot * GEMM_MR, KH, KW, nct * GEMM_NR)[:, :Fg, :, :, :Cg]
        .transpose(0, 1, 4, 2, 3)).reshape(F, Cg, KH, KW)
    dbias = bsum.reshape(groups, ncot * GEMM_MR)[:, :Fg].astype(np.float32).reshape(F)
    return dweight, dbias


cdef void _dw_plain(
        const float[:, :, :, ::1] dout,             # IN  (N, F, OH, OW)
        const float[:, :, :, ::1] x,                # IN  (N, C, H, W)
        float[:, :, :, ::1] dweight,                # OUT (F, Cg, KH, KW), channel f
        Py_ssize_t f, int groups, int sh, int sw, int ph, int pw, int dil_h, int dil_w) noexcept nogil:
    """General dweight path (column stride > 1): direct sums with bounds checks."""
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = dout.shape[2], OW = dout.shape[3], Fg = dout.shape[1] // groups
    cdef Py_ssize_t Cg = dweight.shape[1], KH = dweight.shape[2], KW = dweight.shape[3]
    cdef Py_ssize_t g = f // Fg, cl, kh, kw, n, oh, ow, ih, iw
    cdef double s
    cdef const float* xr
    cdef const float* dr
    for cl in range(Cg):
        for kh in range(KH):
            for kw in range(KW):
                s = 0
                for n in range(N):
                    for oh in range(OH):
                        ih = oh * sh - ph + kh * dil_h
                        if ih < 0 or ih >= H:
                            continue
                        xr = &x[n, g * Cg + cl, ih, 0]
                        dr = &dout[n, f, oh, 0]
                        for ow in range(OW):
                            iw = ow * sw - pw + kw * dil_w
                            if iw >= 0 and iw < W:
                                s += dr[ow] * xr[iw]
                dweight[f, cl, kh, kw] = <float>s


cdef void _dw_one_sample(
        const float* dn,            # IN  (F planes of dplane floats) dout of one sample, rows ds floats apart
        const float* xp,            # IN  (Hp, Wp) + slack: the sample's one input plane, zero-padded
        float* part,                # OUT (nfb, 3, nkc, DW_F, 3, DW_V) lane sums of this sample
        Py_ssize_t F, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t dplane, Py_ssize_t ds, Py_ssize_t Wp,
        Py_ssize_t KW, Py_ssize_t R, int dil_w) noexcept nogil:
    """dweight terms of one sample for a one-input-channel, 3-row, stride-1 convolution: the blocks of
    _dw_block, over this sample only, written to its own scratch (summed over samples later). Its dbias
    terms come from the copy of dout into the padded buffer (chexcy_pad_planes with sums)."""
    cdef Py_ssize_t nkc = (KW + 2) // 3, nfb = (F + DW_F - 1) // DW_F, part_len = DW_F * 3 * DW_V
    cdef Py_ssize_t blk = 3 * nkc * part_len, fb, f0, nf, f, r0, rr
    cdef const float* drows[DW_F]
    memset(part, 0, nfb * blk * sizeof(float))
    for fb in range(nfb):
        f0 = fb * DW_F
        nf = min(DW_F, F - f0)
        r0 = 0
        while r0 < OH:
            rr = min(R, OH - r0)
            for f in range(DW_F):
                # channels past the end repeat the last one; their sums are never used
                drows[f] = dn + (f0 + (f if f < nf else nf - 1)) * dplane + r0 * ds
            _dw_rows(xp + r0 * Wp, drows, 1, 0, 0, rr, OW, ds, Wp, 1, 1, dil_w, 3, nkc, True, part + fb * blk,
                     xp + r0 * Wp)      # the plane is in L1 already: nothing further to prefetch
            r0 += rr


cdef _backward_one_channel(dout, x, weight, int ph, int pw, int dil_w):
    """conv2d backward for a first layer: one input channel, groups 1, stride 1, 3 kernel rows, row
    dilation 1. dx, dweight and dbias of a sample are computed together, so its `dout` (F planes) is read
    from memory once, into the cache, instead of once for dx and once more for dweight + dbias (conv1 of
    ref-cnn: 33.5 MB). Per-sample lane sums are added over the samples in order afterwards, so the result
    does not depend on the thread count."""
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = weight.shape[0], KW = weight.shape[3], OH = dout.shape[2], OW = dout.shape[3]
    cdef Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw, nkc = (KW + 2) // 3
    cdef Py_ssize_t nfb = (F + DW_F - 1) // DW_F, part_len = DW_F * 3 * DW_V, blk = 3 * nkc * part_len
    cdef Py_ssize_t R = min(OH, max(1, DW_CHUNK // (DW_F * OW))), n, f, kh, kw, j
    cdef int n_threads = _threads(), tid
    cdef int qh = 2 - ph, qw = dil_w * (KW - 1) - pw       # dx: the forward conv of dout, flipped kernel
    cdef Py_ssize_t Hq = OH + 2 * qh, Wq = OW + 2 * qw       # dout padded for dx
    cdef Py_ssize_t dx_buf = F * Hq * Wq + FWD_WMAX
    cdef Py_ssize_t x_buf = Hp * Wp + 3 * dil_w + DW_V
    cdef const float[:, :, :, ::1] dv = dout
    cdef const float[:, :, :, ::1] xv = x
    wt = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))     # (1, F, 3, KW)
    cdef const float[:, :, :, ::1] wtv = wt
    cdef const float[:, :, :, :, :, ::1] wpv = _pack_weight(wt, 1)
    cdef const float[::1] zero = np.zeros(1, np.float32)
    dx = _empty((N, 1, H, W))
    cdef float[:, :, :, ::1] dxv = dx
    scratch = np.zeros((n_threads, dx_buf + x_buf), np.float32)
    tags = np.full(n_threads, -1, np.intp)
    parts = np.empty((N, nfb * blk), np.float32)
    bsums = np.empty((N, F), np.float64)
    cdef float[:, ::1] sv = scratch
    cdef Py_ssize_t[::1] tv = tags
    cdef float[:, ::1] pv = parts
    cdef double[:, ::1] bv = bsums
    for n in prange(N, nogil=True, schedule="static", num_threads=n_threads):
        tid = omp_get_thread_num()
        # The sample's dout is read from memory once, by the copy into dx's padded buffer (1 MB for
        # conv1, it stays in L2), which also sums it for dbias; dweight then reads that copy, and so
        # does the dx tile.
        chexcy_pad_planes(&dv[n, 0, 0, 0], &sv[tid, 0], F, OH, OW, qh, qw, &bv[n, 0])
        tv[tid] = n                                 # tells _conv_unit the buffer already holds sample n
        _pad_planes(&xv[n, 0, 0, 0], &sv[tid, dx_buf], 1, H, W, ph, pw)
        _dw_one_sample(&sv[tid, qh * Wq + qw], &sv[tid, dx_buf], &pv[n, 0], F, OH, OW, Hq * Wq, Wq,
                       Wp, KW, R, dil_w)
        _conv_unit(dv, wtv, wpv, zero, dxv, n, &sv[tid, 0], &tv[tid], 1, 1, 1, qh, qw, 1, dil_w, 0)
    # samples in order, then lanes in order: the same sums whatever thread did which sample
    lanes = parts.reshape(N, nfb, 3, nkc, DW_F, 3, DW_V)
    acc = lanes[0].copy()
    for n in range(1, N):
        acc += lanes[n]
    cdef float[:, :, :, :, :, ::1] av = acc
    dweight = np.empty((F, 1, 3, KW), np.float32)
    cdef float[:, :, :, ::1] dwv = dweight
    cdef float s
    for f in range(F):
        for kh in range(3):
            for kw in range(KW):
                s = 0
                for j in range(DW_V):
                    s = s + av[f // DW_F, kh, kw // 3, f % DW_F, kw % 3, j]
                dwv[f, 0, kh, kw] = s
    dbias = bsums.sum(axis=0).astype(np.float32)
    return dx, dweight, dbias


cdef inline void _cg_geom(chexcy_cg_geom* geo, const float* xp, Py_ssize_t Hp, Py_ssize_t Wp, Py_ssize_t KH,
                          Py_ssize_t KW, int sh, int sw, int dil_h, int dil_w,
                          Py_ssize_t OH, Py_ssize_t OW) noexcept nogil:
    geo.x = xp
    geo.Hp, geo.Wp, geo.KH, geo.KW = Hp, Wp, KH, KW
    geo.sh, geo.sw, geo.dil_h, geo.dil_w = sh, sw, dil_h, dil_w
    geo.OW, geo.P = OW, OH * OW


cdef _padded(x, int ph, int pw, int n_threads):
    """x (N, C, H, W) zero-padded by (ph, pw), or x itself when there is no padding."""
    if ph == 0 and pw == 0:
        return x
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], u
    xp = _empty((N, C, H + 2 * ph, W + 2 * pw))
    cdef const float[:, :, :, ::1] xv = x
    cdef float[:, :, :, ::1] pv = xp
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        _pad_planes(&xv[u // C, u % C, 0, 0], &pv[u // C, u % C, 0, 0], 1, H, W, ph, pw)
    return xp


cdef void _cg_dweight_unit(
        const float* xp, const float* dout, float* parts, float* abuf, float* bbuf,
        Py_ssize_t u, Py_ssize_t nst, Py_ssize_t nparts, Py_ssize_t N, Py_ssize_t C, Py_ssize_t F, int groups,
        Py_ssize_t Hp, Py_ssize_t Wp, Py_ssize_t KH, Py_ssize_t KW, int sh, int sw, int dil_h, int dil_w,
        Py_ssize_t OH, Py_ssize_t OW) noexcept nogil:
    """Unit u = (part, g, chunk) of _gemm_conv_dweight: strips chunk GEMM_DW_STRIPS ... of dweight[g]
    (nst chunks per group) over the part's samples (nparts parts), zeroed here first."""
    cdef chexcy_cg_geom geo
    cdef Py_ssize_t Cg = C // groups, Fg = F // groups, K = Cg * KH * KW, P = OH * OW, r
    cdef Py_ssize_t s = u % nst * GEMM_DW_STRIPS, g = u // nst % groups, part = u // nst // groups
    cdef Py_ssize_t s1 = min(s + GEMM_DW_STRIPS, (K + GEMM_NR - 1) // GEMM_NR)
    cdef Py_ssize_t n0 = part * N // nparts, n1 = (part + 1) * N // nparts
    cdef float* dst = parts + (part * F + g * Fg) * K
    for r in range(Fg):
        memset(dst + r * K + s * GEMM_NR, 0, (min(s1 * GEMM_NR, K) - s * GEMM_NR) * sizeof(float))
    if n1 <= n0:
        return
    _cg_geom(&geo, xp + (n0 * C + g * Cg) * Hp * Wp, Hp, Wp, KH, KW, sh, sw, dil_h, dil_w, OH, OW)
    chexcy_cg_dweight_task(geo, n1 - n0, C * Hp * Wp, dout + (n0 * F + g * Fg) * P, F * P, Fg, K, s, s1,
                           dst, abuf, bbuf)


cdef void _sum_parts(const float* parts, Py_ssize_t nparts, Py_ssize_t plen, Py_ssize_t row, Py_ssize_t K,
                     float* out) noexcept nogil:
    """out row = parts[0] row + parts[1] row + ..., added in that order (rows K floats long)."""
    cdef Py_ssize_t p, k
    cdef float* o = out + row * K
    memcpy(o, parts + row * K, K * sizeof(float))
    for p in range(1, nparts):
        for k in range(K):
            o[k] += parts[p * plen + row * K + k]


cdef _gemm_conv_dweight(dout, x, Py_ssize_t KH, Py_ssize_t KW, int groups, int sh, int sw, int ph, int pw,
                        int dil_h, int dil_w):
    """IM2COL_GEMM dweight (F, Cg, KH, KW) = sum over (n, p) of dout (Fg, P) B_n^T (P, K), per group
    (chexcy/_ops_conv_gemm.h). Units: (sample range, group, chunk of GEMM_DW_STRIPS strips of GEMM_NR columns
    of K). Where the chunks alone are fewer than GEMM_DW_MIN_UNITS, the batch is cut into GEMM_DW_PARTS
    sample ranges whose partial sums are added in order at the end (the count fixed by the shape)."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t F = dout.shape[1], OH = dout.shape[2], OW = dout.shape[3], Cg = C // groups
    cdef Py_ssize_t Fg = F // groups, K = Cg * KH * KW, u
    cdef Py_ssize_t nst = ((K + GEMM_NR - 1) // GEMM_NR + GEMM_DW_STRIPS - 1) // GEMM_DW_STRIPS
    cdef Py_ssize_t alen = ((Fg + GEMM_MR - 1) // GEMM_MR * GEMM_MR * GEMM_KC + 15) // 16 * 16
    cdef Py_ssize_t blen = GEMM_KC * GEMM_NR
    xp = _padded(x, ph, pw, n_threads)
    cdef const float[:, :, :, ::1] pv = xp
    cdef const float[:, :, :, ::1] dv = dout
    cdef Py_ssize_t nparts = 1 if groups * nst >= GEMM_DW_MIN_UNITS else GEMM_DW_PARTS
    parts = _empty((nparts, F, K))
    cdef float[:, :, ::1] rv = parts
    scratch = _empty((n_threads, alen + blen))
    cdef float[:, ::1] sv = scratch
    for u in prange(nparts * groups * nst, nogil=True, schedule="static", num_threads=n_threads):
        _cg_dweight_unit(&pv[0, 0, 0, 0], &dv[0, 0, 0, 0], &rv[0, 0, 0], &sv[omp_get_thread_num(), 0],
                         &sv[omp_get_thread_num(), alen], u, nst, nparts, N, C, F, groups, pv.shape[2],
                         pv.shape[3], KH, KW, sh, sw, dil_h, dil_w, OH, OW)
    if nparts == 1:
        return parts.reshape(F, Cg, KH, KW)
    dweight = _empty((F, Cg, KH, KW))
    cdef float[:, :, :, ::1] dwv = dweight
    for u in prange(F, nogil=True, schedule="static", num_threads=n_threads):
        _sum_parts(&rv[0, 0, 0], nparts, F * K, u, K, &dwv[0, 0, 0, 0])     # in order, whatever thread
    return dweight


cdef void _cg_dx_unit(
        const float* dout, const float* wt, float[:, :, :, ::1] dx, float* scratch,
        Py_ssize_t u, int groups, Py_ssize_t Hp, Py_ssize_t Wp, Py_ssize_t KH, Py_ssize_t KW,
        int sh, int sw, int ph, int pw, int dil_h, int dil_w, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t wlen,
        Py_ssize_t F) noexcept nogil:
    """Unit u = (n, g) of _gemm_conv_dx: the padded gradient of the group's planes in this thread's
    scratch, then its inside copied to dx[n, g Cg ...]."""
    cdef chexcy_cg_geom geo
    cdef Py_ssize_t C = dx.shape[1], H = dx.shape[2], W = dx.shape[3], Cg = C // groups, Fg = F // groups
    cdef Py_ssize_t n = u // groups, g = u % groups, K = Cg * KH * KW, P = OH * OW, c, r
    cdef float* dxp = scratch
    cdef float* bbuf = dxp + (Cg * Hp * Wp + 15) // 16 * 16
    cdef float* t = bbuf + GEMM_KC * GEMM_NR
    _cg_geom(&geo, NULL, Hp, Wp, KH, KW, sh, sw, dil_h, dil_w, OH, OW)
    chexcy_cg_dx_task(&geo, dxp, Cg, wt + g * wlen, dout + (n * F + g * Fg) * P, Fg, K, bbuf, t)
    for c in range(Cg):
        for r in range(H):
            memcpy(&dx[n, g * Cg + c, r, 0], dxp + (c * Hp + r + ph) * Wp + pw, W * sizeof(float))


cdef _gemm_conv_dx(dout, w, x_shape, int groups, int sh, int sw, int ph, int pw, int dil_h, int dil_w):
    """IM2COL_GEMM dx: per (n, g), dcols = W[g]^T dout[n, g] strip by strip, added back where the forward
    read each column (chexcy_cg_dx_task); units (n, g), each owning its dx planes."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x_shape[0], C = x_shape[1], H = x_shape[2], W = x_shape[3]
    cdef Py_ssize_t F = w.shape[0], Cg = w.shape[1], KH = w.shape[2], KW = w.shape[3], Fg = F // groups
    cdef Py_ssize_t K = Cg * KH * KW, Kp = (K + GEMM_MR - 1) // GEMM_MR * GEMM_MR
    cdef Py_ssize_t OH = dout.shape[2], OW = dout.shape[3], Hp = H + 2 * ph, Wp = W + 2 * pw, u
    cdef Py_ssize_t wlen = chexcy_gemm_apack_floats(K, Fg)
    cdef Py_ssize_t per = (Cg * Hp * Wp + 15) // 16 * 16 + GEMM_KC * GEMM_NR + Kp * GEMM_NR
    cdef const float[:, :, :, ::1] wv = w
    cdef const float[:, :, :, ::1] dv = dout
    # per group: W^T (K, Fg) packed, its blocks over Fg
    cdef const float[:, ::1] tv = _packed_weight(&wv[0, 0, 0, 0], Fg * K, 1, K, groups, K, Fg, NULL, n_threads)
    dx = _empty((N, C, H, W))
    cdef float[:, :, :, ::1] dxv = dx
    scratch = _empty((n_threads, per))
    cdef float[:, ::1] sv = scratch
    for u in prange(N * groups, nogil=True, schedule="static", num_threads=n_threads):
        _cg_dx_unit(&dv[0, 0, 0, 0], &tv[0, 0], dxv, &sv[omp_get_thread_num(), 0], u, groups, Hp, Wp,
                    KH, KW, sh, sw, ph, pw, dil_h, dil_w, OH, OW, wlen, F)
    return dx


cdef _gemm_conv_dx_phase(dout, w, x_shape, int groups, int sh, int sw, int ph, int pw, int dil_h, int dil_w):
    """IM2COL_GEMM dx gathered phase by phase (chexcy_cg_dx_phase_task): dout zero-padded once into
    (N, F, Hd, Wd), then per (n, g, phase, block of columns) one product of the phase's taps. Every
    pixel of dx is written by exactly one unit."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x_shape[0], C = x_shape[1], H = x_shape[2], W = x_shape[3]
    cdef Py_ssize_t F = w.shape[0], Cg = w.shape[1], KH = w.shape[2], KW = w.shape[3], Fg = F // groups
    cdef Py_ssize_t OH = dout.shape[2], OW = dout.shape[3], S = sh * sw, u, n, g, ph_i, sb, T
    cdef Py_ssize_t Hq = (H + 2 * ph + sh - 1) // sh, Wq = (W + 2 * pw + sw - 1) // sw
    cdef Py_ssize_t mh = (KH - 1) * dil_h // sh, mw = (KW - 1) * dil_w // sw
    cdef Py_ssize_t Hd = Hq + mh, Wd = Wq + mw, dplane = Hd * Wd
    cdef Py_ssize_t nstrips = (Hq * Wd + GEMM_NR - 1) // GEMM_NR
    cdef Py_ssize_t SB = max(1, GEMM_TASK_COLS // GEMM_NR), nsb = (nstrips + SB - 1) // SB
    cdef Py_ssize_t Cgp = (Cg + GEMM_MR - 1) // GEMM_MR * GEMM_MR, ctlen = (Cg * SB * GEMM_NR + 15) // 16 * 16
    cdef Py_ssize_t kh, kw
    ublk = np.zeros(S + 1, np.intp)     # units of the weight packing: (group, phase, K block)
    # the taps of each phase (a, b) = (r % sh, s % sw): their indices kh KW + kw, offsets in doutpad,
    # and where A_ab (Cg, Fg T) of each group starts in the packed weights
    taps = np.zeros((S, KH * KW), np.intp)
    offs = np.zeros((S, KH * KW), np.intp)
    ntaps = np.zeros(S, np.intp)
    aoff = np.zeros(S + 1, np.intp)
    for ph_i in range(S):
        T = 0
        for kh in range(KH):
            for kw in range(KW):
                if kh * dil_h % sh == ph_i // sw and kw * dil_w % sw == ph_i % sw:
                    taps[ph_i, T] = kh * KW + kw
                    offs[ph_i, T] = (mh - kh * dil_h // sh) * Wd + mw - kw * dil_w // sw
                    T += 1
        ntaps[ph_i] = T
        aoff[ph_i + 1] = aoff[ph_i] + Cgp * Fg * T
        ublk[ph_i + 1] = ublk[ph_i] + (Fg * T + GEMM_KC - 1) // GEMM_KC
    ap = _empty((groups, max(1, aoff[S])))
    cdef float[:, ::1] av = ap
    cdef const Py_ssize_t[:, ::1] tpv = taps
    cdef const Py_ssize_t[::1] ubv = ublk
    cdef const float[:, :, :, ::1] wv = w
    cdef const Py_ssize_t[:, ::1] ov = offs
    cdef const Py_ssize_t[::1] tv = ntaps
    cdef const Py_ssize_t[::1] aov = aoff
    for u in prange(groups * ubv[S], nogil=True, schedule="static", num_threads=n_threads):
        g = u // ubv[S]
        ph_i = 0
        while ubv[ph_i + 1] <= u % ubv[S]:
            ph_i = ph_i + 1
        chexcy_cg_pack_a_phase(&wv[g * Fg, 0, 0, 0], Fg, Cg, KH * KW, &tpv[ph_i, 0], tv[ph_i],
                               u % ubv[S] - ubv[ph_i], &av[g, aov[ph_i]])
    cdef const float[:, :, :, ::1] dv = dout
    # doutpad: the tasks' last strips read up to GEMM_NR + Wd floats past the last plane (dropped columns)
    dpad = _empty((N * F * dplane + Wd + 2 * GEMM_NR,))
    dpad[N * F * dplane:] = 0
    cdef float[::1] pv = dpad
    for u in prange(N * F, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_cg_dout_pad(&dv[u // F, u % F, 0, 0], OH, OW, mh, mw, Hd, Wd, &pv[u * dplane])
    dx = _empty((N, C, H, W))
    cdef float[:, :, :, ::1] dxv = dx
    scratch = _empty((n_threads, ctlen + GEMM_KC * GEMM_NR))
    cdef float[:, ::1] sv = scratch
    for u in prange(N * groups * S * nsb, nogil=True, schedule="static", num_threads=n_threads):
        sb = u % nsb
        ph_i = u // nsb % S
        g = u // nsb // S % groups
        n = u // nsb // S // groups
        # (&av[g, 0] + offset: a phase without taps starts at the end of the row, which is no index)
        chexcy_cg_dx_phase_task(&pv[(n * F + g * Fg) * dplane], &ov[ph_i, 0], tv[ph_i], Fg, Hd, Wd, Hq, Wq,
                                &av[g, 0] + aov[ph_i], Cg, ph_i // sw, ph_i % sw, sh, sw, ph, pw, H, W,
                                sb * SB, min(nstrips, (sb + 1) * SB), &dxv[n, g * Cg, 0, 0],
                                &sv[omp_get_thread_num(), 0], &sv[omp_get_thread_num(), ctlen])
    return dx


def _im2col_dx_col2im(dout, weight, x_shape, stride, padding, dilation, int groups):
    """The IM2COL_GEMM dx by col2im for any shape (below GEMM_DX_PHASE_MIN_CG input channels per group the
    path's own; for the tests and benchmarks): dout (N, F, OH, OW), weight -> dx (N, C, H, W)."""
    return _gemm_conv_dx(dout, weight, x_shape, groups, stride[0], stride[1], padding[0], padding[1],
                         dilation[0], dilation[1])


def _im2col_dx_phase(dout, weight, x_shape, stride, padding, dilation, int groups):
    """The IM2COL_GEMM dx on phase planes for any shape, whatever conv_plan picks (for the tests and
    benchmarks of the path): dout (N, F, OH, OW), weight (F, C // groups, KH, KW) -> dx (N, C, H, W)."""
    return _gemm_conv_dx_phase(dout, weight, x_shape, groups, stride[0], stride[1], padding[0], padding[1],
                               dilation[0], dilation[1])


cdef _depthwise_forward(x, w, const float[::1] bias, float[:, :, :, ::1] out, int sh, int sw, int ph, int pw,
                        int dil_h, int dil_w, bint lanes):
    """groups = C = F, split evenly between the threads: units of B samples of one channel over phase
    planes (DEPTHWISE, chexcy/_ops_depthwise.h), or with lanes, of one sample's block of CHEXCY_DWL_L
    channels (DEPTHWISE_LANES, chexcy/_ops_depthwise_lanes.h)."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], u, units, per
    cdef chexcy_dwc_geom geo
    cdef chexcy_dwl_geom lgeo
    if lanes:
        chexcy_dwl_init(&lgeo, C, H, W, w.shape[2], w.shape[3], sh, sw, ph, pw, dil_h, dil_w)
        per = chexcy_dwl_scratch_floats(&lgeo)
        units = N * ((C + CHEXCY_DWL_L - 1) // CHEXCY_DWL_L)
    else:
        chexcy_dwc_init(&geo, N, H, W, w.shape[2], w.shape[3], sh, sw, ph, pw, dil_h, dil_w)
        per = chexcy_dwc_scratch_floats(&geo)
        units = N // geo.B * C
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[:, :, :, ::1] wv = w
    # zeros: the padding of the phase planes (the border of the lanes' pixels) is never written
    scratch = np.zeros((n_threads, (per + 15) // 16 * 16), np.float32)
    cdef float[:, ::1] sv = scratch
    if lanes:
        for u in prange(units, nogil=True, schedule="static", num_threads=n_threads):
            chexcy_dwl_forward_unit(&lgeo, u, &xv[0, 0, 0, 0], &wv[0, 0, 0, 0], &bias[0], &out[0, 0, 0, 0],
                                    &sv[omp_get_thread_num(), 0])
    else:
        for u in prange(units, nogil=True, schedule="static", num_threads=n_threads):
            chexcy_dwc_forward_unit(&geo, C, u, &xv[0, 0, 0, 0], &wv[0, 0, 0, 0], &bias[0], &out[0, 0, 0, 0],
                                    &sv[omp_get_thread_num(), 0])


cdef _depthwise_backward(dout, x, w, int sh, int sw, int ph, int pw, int dil_h, int dil_w, bint lanes):
    """groups = C = F: dx, dweight and dbias of every channel together (DEPTHWISE), or of each block of
    CHEXCY_DWL_L channels over the samples in order (lanes: DEPTHWISE_LANES); channels or blocks split
    evenly between the threads."""
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], c, units, per
    cdef chexcy_dwc_geom geo
    cdef chexcy_dwl_geom lgeo
    if lanes:
        chexcy_dwl_init(&lgeo, C, H, W, w.shape[2], w.shape[3], sh, sw, ph, pw, dil_h, dil_w)
        per = chexcy_dwl_scratch_floats(&lgeo)
        units = (C + CHEXCY_DWL_L - 1) // CHEXCY_DWL_L
    else:
        chexcy_dwc_init(&geo, N, H, W, w.shape[2], w.shape[3], sh, sw, ph, pw, dil_h, dil_w)
        per = chexcy_dwc_scratch_floats(&geo)
        units = C
    cdef const float[:, :, :, ::1] dv = dout
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[:, :, :, ::1] wv = w
    dx = _empty((N, C, H, W))
    dweight = np.empty(w.shape, np.float32)
    dbias = np.empty(C, np.float32)
    cdef float[:, :, :, ::1] dxv = dx
    cdef float[:, :, :, ::1] dwv = dweight
    cdef float[::1] dbv = dbias
    scratch = np.zeros((n_threads, (per + 15) // 16 * 16), np.float32)
    cdef float[:, ::1] sv = scratch
    if lanes:
        for c in prange(units, nogil=True, schedule="static", num_threads=n_threads):
            chexcy_dwl_backward_block(&lgeo, N, c, &dv[0, 0, 0, 0], &xv[0, 0, 0, 0], &wv[0, 0, 0, 0],
                                      &dxv[0, 0, 0, 0], &dwv[0, 0, 0, 0], &dbv[0], &sv[omp_get_thread_num(), 0])
    else:
        for c in prange(units, nogil=True, schedule="static", num_threads=n_threads):
            chexcy_dwc_backward_channel(&geo, N, C, c, &dv[0, 0, 0, 0], &xv[0, 0, 0, 0], &wv[c, 0, 0, 0],
                                        &dxv[0, 0, 0, 0], &dwv[c, 0, 0, 0], &dbv[0], &sv[omp_get_thread_num(), 0])
    return dx, dweight, dbias


def conv2d_backward(dout, x, weight, stride, padding, dilation, int groups):
    """dout (N, F, OH, OW), x (N, C, H, W), weight (F, C // groups, KH, KW)
    -> (dx like x, dweight like weight, dbias (F,)). Paths: conv_plan (the table above)."""
    cdef int sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1]
    cdef int dil_h = dilation[0], dil_w = dilation[1]
    cdef int n_threads = _threads()
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = weight.shape[0], Cg = weight.shape[1], KH = weight.shape[2], KW = weight.shape[3]
    cdef Py_ssize_t Fg = F // groups, u, units, nkc, nb, Hp, Wp, rows, part_n, chunk_n
    cdef int tid
    cdef const float[:, :, :, ::1] dv = dout
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[:, :, :, ::1] wv = weight
    _, dx_path, dw_path = _plan_of(x.shape, weight.shape, stride, padding, dilation, groups)

    if dx_path == "FIRST_LAYER":
        return _backward_one_channel(dout, x, weight, ph, pw, dil_w)
    if dx_path in ("DEPTHWISE", "DEPTHWISE_LANES"):
        return _depthwise_backward(dout, x, weight, sh, sw, ph, pw, dil_h, dil_w, dx_path == "DEPTHWISE_LANES")

    cdef float* dbp
    dbias = _floats(F, &dbp)
    if sw != 1 or sh > 1 or dw_path in ("POINTWISE_GEMM", "IM2COL_GEMM"):   # else the dweight blocks sum it
        for u in prange(F, nogil=True, schedule="static", num_threads=n_threads):
            _dbias_one(dv, dbp, u)

    cdef Py_ssize_t OH = dout.shape[2], OW = dout.shape[3], Hs, Ws
    if dx_path == "IM2COL_GEMM":
        return (_gemm_conv_dx_phase(dout, weight, x.shape, groups, sh, sw, ph, pw, dil_h, dil_w)
                if Cg >= GEMM_DX_PHASE_MIN_CG and OH * OW >= GEMM_DX_PHASE_MIN_P
                else _gemm_conv_dx(dout, weight, x.shape, groups, sh, sw, ph, pw, dil_h, dil_w),
                _gemm_conv_dweight(dout, x, KH, KW, groups, sh, sw, ph, pw, dil_h, dil_w), dbias)
    if dx_path == "POINTWISE_GEMM" or dx_path.startswith("SUBSAMPLED>"):
        if sh > 1 or sw > 1:
            # a strided 1x1 convolution (a residual shortcut) is a stride-1 one on the sampled pixels
            dx_sub, dweight, _ = conv2d_backward(dout, _strided_grid(x, OH, OW, sh, sw), weight, (1, 1), padding,
                                                 dilation, groups)
            return _spread_grid(dx_sub, H, W, sh, sw), dweight, dbias
        return _pw_dx(dout, weight, C, H, W, groups), _pw_dweight(dout, x, groups), dbias

    # Strided convolutions: spread dout onto the stride-1 grid, zeros between the samples
    # (dout_s[oh * sh, ow * sw] = dout[oh, ow]), so dx and dweight take the fast stride-1 kernels below.
    # It costs sh * sw times the multiply-adds, all on zeros, and is still ~10x faster than the plain
    # strided loops. The extra rows/columns at the bottom/right (fewer than the stride) reach the input
    # rows that no output window covered, so that dx comes out with exactly H x W.
    if dx_path.startswith("SPREAD>"):
        Hs = (OH - 1) * sh + 1
        Ws = (OW - 1) * sw + 1
        dout_s = np.zeros((N, F, H + 2 * ph - dil_h * (KH - 1), W + 2 * pw - dil_w * (KW - 1)), np.float32)
        dout_s[:, :, :Hs:sh, :Ws:sw] = dout
        dx, dweight, _ = conv2d_backward(dout_s, x, weight, (1, 1), padding, dilation, groups)
        return dx, dweight, dbias

    # dx: for stride 1 it is the forward conv of dout (padded by the kernel's reach minus the
    # padding) with the kernel flipped and in/out channels swapped per group (WINOGRAD or DIRECT).
    dx = _empty((N, C, H, W))
    cdef float[:, :, :, ::1] dxv = dx
    if dx_path == "WINOGRAD":
        _wino_conv(dout, weight, np.zeros(C, np.float32), dx, 2 - ph, 2 - pw, flip=True)
    elif dx_path != "PLAIN":
        wt = (weight.reshape(groups, Fg, Cg, KH, KW)[:, :, :, ::-1, ::-1]
              .transpose(0, 2, 1, 3, 4).reshape(C, Fg, KH, KW))
        _conv_core(dout, np.ascontiguousarray(wt), np.zeros(C, np.float32), dx, groups,
                   1, 1, dil_h * (KH - 1) - ph, dil_w * (KW - 1) - pw, dil_h, dil_w)
    else:
        for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
            _dx_plane(dv, wv, dxv, u, groups, sh, sw, ph, pw, dil_h, dil_w)

    if dw_path == "WINOGRAD":
        dweight, dbias = _dweight_winograd(dout, x, ph, pw)
        return dx, dweight, dbias
    # Channel-blocked dweight from DWC_MIN_CG input channels per group (measured, ref-cnn at 128x128,
    # 2 threads: conv4, 64 channels, 8.3 -> 7.7 ms for the whole backward on AVX-512; 32 channels there
    # and 16 on SSE2 (two of its 8-channel tiles) were 3% and 10% slower than the lane-sum kernel below)
    if dw_path == "CHANNEL_BLOCKED":
        dweight, dbias = _dweight_blocked(dout, x, KH, KW, groups, ph, pw, dil_h, dil_w)
        return dx, dweight, dbias
    dweight = np.empty((F, Cg, KH, KW), np.float32)
    cdef float[:, :, :, ::1] dwv = dweight
    cdef float[:, ::1] pad_s
    cdef float[:, ::1] part_s
    if dw_path == "LANE_SUM":
        nkc = (KW + 2) // 3
        # chunks of dout for one channel block, re-read for every (input channel, kernel row), of about
        # 16 KiB so that they stay in L1: R rows of one sample, or NB whole planes when a plane is small
        rows = max(1, DW_CHUNK // (DW_F * OW))
        nb = max(1, min(N, rows // OH)) if rows >= OH else 1
        # x zero-padded once, shared read-only by all units; slack: kernel-column groups of 3 may
        # read up to 2 * dil_w past the last row (into lanes whose sums are never stored)
        Hp = H + 2 * ph
        Wp = W + 2 * pw
        xpad_flat = _empty((N * C * Hp * Wp + 3 * dil_w + DW_V,))
        xpad_flat[N * C * Hp * Wp:] = 0     # the slack; _pad_planes writes every float of the planes
        pad_s = xpad_flat[:N * C * Hp * Wp].reshape(N * C, Hp * Wp)
        for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
            _pad_planes(&xv[u // C, u % C, 0, 0], &pad_s[_chunk_plane(u // C, u % C, N, C, nb), 0], 1, H, W,
                        ph, pw)
        # per thread: lane sums, then the dout chunk (both start on a cache line: whole vectors of 16)
        part_n = Cg * KH * nkc * DW_F * 3 * DW_V
        chunk_n = (DW_F * nb * min(rows, OH) * OW + 15) // 16 * 16
        part_s = _empty((n_threads, part_n + chunk_n))
        units = groups * ((Fg + DW_F - 1) // DW_F)
        for u in prange(units, nogil=True, schedule="static", num_threads=n_threads):
            tid = omp_get_thread_num()
            _dw_block(dv, xv, dwv, &pad_s[0, 0], u, min(rows, OH), nb, &part_s[tid, 0], &part_s[tid, part_n],
                      dbp, groups, sh, ph, pw, dil_h, dil_w)
    else:
        for u in prange(F, nogil=True, schedule="static", num_threads=n_threads):
            _dw_plain(dv, xv, dwv, u, groups, sh, sw, ph, pw, dil_h, dil_w)
    return dx, dweight, dbias


# ------------------------------------------------------------------------------------------------
# Pooling
# ------------------------------------------------------------------------------------------------

cdef void _max_pool_plane(
        const float* xp,            # IN  (H, W)
        float* op,                  # OUT (OH, OW)
        int64_t* ap,                # OUT (OH, OW) flat index ih * W + iw of each maximum
        Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
        Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dil_h, Py_ssize_t dil_w) noexcept nogil:
    """First maximum in (kh, kw) scan order; a NaN wins over numbers (the first NaN); padding is -inf."""
    cdef Py_ssize_t oh, ow, kh, kw, ih, iw, idx
    cdef float best, v
    for oh in range(OH):
        for ow in range(OW):
            best = -INFINITY
            idx = -1
            for kh in range(KH):
                ih = oh * sh - ph + kh * dil_h
                if ih < 0 or ih >= H:
                    continue
                for kw in range(KW):
                    iw = ow * sw - pw + kw * dil_w
                    if iw < 0 or iw >= W:
                        continue
                    v = xp[ih * W + iw]
                    if idx < 0 or v > best or (v != v and best == best):
                        best = v
                        idx = ih * W + iw
            op[oh * OW + ow] = best
            ap[oh * OW + ow] = idx


cdef void _max_pool_2x2(
        const float* xp, float* op, int64_t* ap,    # IN (H, W), OUT (OH, OW), OUT (OH, OW)
        Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW) noexcept nogil:
    """kernel 2, stride 2, no padding, no dilation: the common case, same tie and NaN rule."""
    cdef Py_ssize_t oh
    for oh in range(OH):
        chexcy_max_pool_2x2_row(xp + 2 * oh * W, xp + (2 * oh + 1) * W, op + oh * OW, ap + oh * OW,
                                2 * oh * W, W, OW)


def max_pool2d_forward(x, kernel_size, stride, padding, dilation):
    """x (N, C, H, W) -> (out (N, C, OH, OW), argmax int64 (N, C, OH, OW))."""
    return _max_pool(x, kernel_size, stride, padding, dilation, True)


def max_pool2d(x, kernel_size, stride, padding, dilation):
    """max_pool2d_forward's out alone (an eval-mode forward): on the general path no argmax is formed or
    written (ResNet's 3x3 / stride 2 stem pool at 112x112, batch 16: 9.1 -> 4.6 ms; np.copyto of the
    input's bytes 4.0 ms); the 2x2 / stride 2 kernel and the scalar loop still form it."""
    return _max_pool(x, kernel_size, stride, padding, dilation, False)[0]


cdef _max_pool(x, kernel_size, stride, padding, dilation, bint want_argmax):
    """(out, argmax) of max pooling; argmax None when not wanted and the general path runs."""
    cdef Py_ssize_t KH = kernel_size[0], KW = kernel_size[1], sh = stride[0], sw = stride[1]
    cdef Py_ssize_t ph = padding[0], pw = padding[1], dil_h = dilation[0], dil_w = dilation[1]
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = _conv_out_size(H, KH, sh, ph, dil_h), OW = _conv_out_size(W, KW, sw, pw, dil_w)
    cdef int n_threads = _threads()
    cdef bint fast = (KH == 2 and KW == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
                      and dil_h == 1 and dil_w == 1)
    # any other window: a row at a time, every tap over the whole row (chexcy/_ops_pool.h), indices
    # kept in int32 while the plane's are below 2^31 (else the scalar loop per output)
    cdef bint rows = not fast and H * W < (1 << 31) - 1
    cdef bint keep = want_argmax or not rows
    out = _empty((N, C, OH, OW))
    argmax = _empty((N, C, OH, OW), np.int64) if keep else _empty((1, 1, 1, 1), np.int64)
    # per thread: OW maxima, OW int32 indices, then a W + 2 float row buffer
    scratch = _empty((n_threads, 2 * OW + W + 32))
    cdef const float[:, :, :, ::1] xv = x
    cdef float[:, :, :, ::1] ov = out
    cdef int64_t[:, :, :, ::1] av = argmax
    cdef float[:, ::1] sv = scratch
    cdef Py_ssize_t u
    cdef int tid
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        tid = omp_get_thread_num()
        if fast:
            _max_pool_2x2(&xv[u // C, u % C, 0, 0], &ov[u // C, u % C, 0, 0], &av[u // C, u % C, 0, 0],
                          W, OH, OW)
        elif rows:
            chexcy_max_pool_plane(&xv[u // C, u % C, 0, 0], &ov[u // C, u % C, 0, 0],
                                  &av[u // C, u % C, 0, 0] if keep else <int64_t*>NULL,
                                  H, W, OH, OW, KH, KW, sh, sw, ph, pw, dil_h, dil_w,
                                  &sv[tid, 0], <int32_t*>&sv[tid, OW], &sv[tid, 2 * OW + 16])
        else:
            _max_pool_plane(&xv[u // C, u % C, 0, 0], &ov[u // C, u % C, 0, 0],
                            &av[u // C, u % C, 0, 0], H, W, OH, OW, KH, KW, sh, sw, ph, pw, dil_h, dil_w)
    return out, argmax if keep else None


cdef int _max_unpool_plane(
        const float* dp,            # IN  (OH, OW)
        const int64_t* ap,          # IN  (OH, OW), values checked here to lie in [0, H*W)
        float* dxp,                 # OUT (H, W), uninitialised on entry
        Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW) noexcept nogil:
    """dx = 0, then dx[argmax] += dout over one plane. Returns 1 (and stops) at an index outside the
    plane, else 0: the range check rides on the pass that reads every index anyway.

    Fast path: when every argmax lies in its own 2 x 2 cell (always so after a 2 x 2 / stride 2 pool, the
    common case), the cells are disjoint and dx is written whole in one vectorised pass. Otherwise
    (overlapping windows, padding, other kernels) the plane is zeroed and the gradients scattered."""
    cdef Py_ssize_t i, oh
    cdef int64_t a
    if 2 * OH <= H and 2 * OW <= W and chexcy_argmax_in_2x2_cells(ap, W, OH, OW):
        for oh in range(OH):
            chexcy_max_unpool_2x2_row(dp + oh * OW, ap + oh * OW, dxp + 2 * oh * W, dxp + (2 * oh + 1) * W,
                                      2 * oh * W, W, OW)
            if W > 2 * OW:          # the columns no window reached
                memset(dxp + 2 * oh * W + 2 * OW, 0, (W - 2 * OW) * sizeof(float))
                memset(dxp + (2 * oh + 1) * W + 2 * OW, 0, (W - 2 * OW) * sizeof(float))
        if H > 2 * OH:              # the rows no window reached
            memset(dxp + 2 * OH * W, 0, (H - 2 * OH) * W * sizeof(float))
        return 0                    # every index lies in its cell, so inside the plane
    memset(dxp, 0, H * W * sizeof(float))
    for i in range(OH * OW):
        a = ap[i]
        if a < 0 or a >= H * W:
            return 1
        dxp[a] += dp[i]
    return 0


def max_pool2d_backward(dout, argmax, x_shape):
    """dout (N, C, OH, OW), argmax int64 like dout -> dx (N, C, H, W)."""
    cdef Py_ssize_t N = x_shape[0], C = x_shape[1], H = x_shape[2], W = x_shape[3]
    cdef Py_ssize_t OH = dout.shape[2], OW = dout.shape[3], u
    cdef int n_threads = _threads()
    dx = _empty((N, C, H, W))
    cdef const float[:, :, :, ::1] dv = dout
    cdef const int64_t[:, :, :, ::1] av = argmax
    cdef float[:, :, :, ::1] dxv = dx
    cdef int bad = 0
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        bad += _max_unpool_plane(&dv[u // C, u % C, 0, 0], &av[u // C, u % C, 0, 0],
                                 &dxv[u // C, u % C, 0, 0], H, W, OH, OW)
    if bad:
        raise IndexError(f"argmax holds values outside [0, H * W = {H * W})")
    return dx


# ops.py leaves the argmax range check of max_pool2d_backward to this module (see _max_unpool_plane)
checks_argmax_range = True


cdef inline Py_ssize_t _avg_divisor(
        Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t H, Py_ssize_t W, Py_ssize_t KH, Py_ssize_t KW,
        Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, bint include_pad) noexcept nogil:
    """KH*KW, or the number of window cells inside the unpadded input."""
    cdef Py_ssize_t h0, w0, h1, w1
    if include_pad:
        return KH * KW
    h0 = oh * sh - ph
    w0 = ow * sw - pw
    h1 = min(h0 + KH, H)
    w1 = min(w0 + KW, W)
    h0 = max(h0, 0)
    w0 = max(w0, 0)
    return (h1 - h0) * (w1 - w0)


cdef void _avg_pool_plane(
        const float* xp, float* op,                 # IN (H, W), OUT (OH, OW)
        Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
        Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, bint include_pad) noexcept nogil:
    cdef Py_ssize_t oh, ow, ih, iw, h0, w0
    cdef float s
    for oh in range(OH):
        for ow in range(OW):
            h0 = oh * sh - ph
            w0 = ow * sw - pw
            s = 0
            for ih in range(max(h0, 0), min(h0 + KH, H)):
                for iw in range(max(w0, 0), min(w0 + KW, W)):
                    s = s + xp[ih * W + iw]
            op[oh * OW + ow] = s / _avg_divisor(oh, ow, H, W, KH, KW, sh, sw, ph, pw, include_pad)


cdef void _avg_unpool_plane(
        const float* dp, float* dxp,                # IN (OH, OW), OUT (H, W)
        Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
        Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, bint include_pad) noexcept nogil:
    cdef Py_ssize_t oh, ow, ih, iw, h0, w0
    cdef float g
    memset(dxp, 0, H * W * sizeof(float))
    for oh in range(OH):
        for ow in range(OW):
            h0 = oh * sh - ph
            w0 = ow * sw - pw
            g = dp[oh * OW + ow] / _avg_divisor(oh, ow, H, W, KH, KW, sh, sw, ph, pw, include_pad)
            for ih in range(max(h0, 0), min(h0 + KH, H)):
                for iw in range(max(w0, 0), min(w0 + KW, W)):
                    dxp[ih * W + iw] += g


def avg_pool2d_forward(x, kernel_size, stride, padding, count_include_pad):
    """x (N, C, H, W) -> out (N, C, OH, OW)."""
    cdef Py_ssize_t KH = kernel_size[0], KW = kernel_size[1], sh = stride[0], sw = stride[1]
    cdef Py_ssize_t ph = padding[0], pw = padding[1]
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = _conv_out_size(H, KH, sh, ph, 1), OW = _conv_out_size(W, KW, sw, pw, 1), u
    cdef bint inc = bool(count_include_pad)
    cdef int n_threads = _threads()
    cdef bint two = KH == 2 and KW == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    out = _empty((N, C, OH, OW))
    cdef const float[:, :, :, ::1] xv = x
    cdef float[:, :, :, ::1] ov = out
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        if two:     # DenseNet's transitions: a plane per call (chexcy_avg_pool_2x2_plane)
            chexcy_avg_pool_2x2_plane(&xv[u // C, u % C, 0, 0], W, &ov[u // C, u % C, 0, 0], OH, OW)
        else:
            _avg_pool_plane(&xv[u // C, u % C, 0, 0], &ov[u // C, u % C, 0, 0],
                            H, W, OH, OW, KH, KW, sh, sw, ph, pw, inc)
    return out


def avg_pool2d_backward(dout, x_shape, kernel_size, stride, padding, count_include_pad):
    """dout (N, C, OH, OW) -> dx (N, C, H, W)."""
    cdef Py_ssize_t KH = kernel_size[0], KW = kernel_size[1], sh = stride[0], sw = stride[1]
    cdef Py_ssize_t ph = padding[0], pw = padding[1]
    cdef Py_ssize_t N = x_shape[0], C = x_shape[1], H = x_shape[2], W = x_shape[3]
    cdef Py_ssize_t OH = dout.shape[2], OW = dout.shape[3], u
    cdef bint inc = bool(count_include_pad)
    cdef int n_threads = _threads()
    cdef bint two = KH == 2 and KW == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    dx = _empty((N, C, H, W))
    cdef const float[:, :, :, ::1] dv = dout
    cdef float[:, :, :, ::1] dxv = dx
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        if two:     # disjoint windows: every input row written once, no zeroing pass
            chexcy_avg_unpool_2x2_plane(&dv[u // C, u % C, 0, 0], &dxv[u // C, u % C, 0, 0], H, W, OH, OW)
        else:
            _avg_unpool_plane(&dv[u // C, u % C, 0, 0], &dxv[u // C, u % C, 0, 0],
                              H, W, OH, OW, KH, KW, sh, sw, ph, pw, inc)
    return dx


cdef void _plane_mean(const float* xp, float* o, Py_ssize_t HW) noexcept nogil:
    """Mean of one plane, summed in float64 in a fixed order; prefetches min(HW, 1024) floats from 4 KB
    past the plane's start (the next planes when they are small)."""
    chexcy_prefetch_ahead(xp, CHEXCY_FILL_AHEAD, HW)
    o[0] = <float>(chexcy_sum(xp, HW) / HW)


def global_avg_pool2d_forward(x):
    """x (N, C, H, W) -> out (N, C)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2] * x.shape[3], u
    cdef int n_threads = _threads()
    out = np.empty((N, C), np.float32)
    cdef const float[:, :, :, ::1] xv = x
    cdef float[:, ::1] ov = out
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        _plane_mean(&xv[u // C, u % C, 0, 0], &ov[u // C, u % C], HW)
    return out


cdef enum:
    FILL_MIN_SHARE = 16384  # floats (64 KB, ~2 us of stores) per thread at least: below that, fewer threads


def global_avg_pool2d_backward(dout, x_shape):
    """dout (N, C) -> dx (N, C, H, W), each cell dout / (H * W)."""
    cdef Py_ssize_t HW = x_shape[2] * x_shape[3], total = x_shape[0] * x_shape[1] * HW, t, nt
    cdef float* dxp = NULL
    dx = _empty_at(tuple(x_shape), np.float32, <void**>&dxp)
    cdef const float[:, ::1] dv = dout
    cdef const float* dp = &dv[0, 0]
    cdef float inv = 1.0 / HW
    if total == 0:                  # (ops.py rejects empty shapes; the kernel would divide by HW)
        return dx
    # One contiguous share of the flat output per thread, starting on a cache line (dx is 64-byte
    # aligned), whatever the plane size: a few large planes split as evenly as many small ones.
    nt = min(<Py_ssize_t>_threads(), total // FILL_MIN_SHARE)
    if nt < 1:
        nt = 1
    for t in prange(nt, nogil=True, schedule="static", chunksize=1, num_threads=nt):
        chexcy_fill_planes(dxp, dp, HW, inv, (total * t // nt) & ~15,
                           total if t == nt - 1 else (total * (t + 1) // nt) & ~15)
    return dx


# ------------------------------------------------------------------------------------------------
# ReLU (chexcy/_ops_relu.h): elementwise, in fixed chunks of the flat array
# ------------------------------------------------------------------------------------------------

cdef enum:
    RELU_CHUNK = 1 << 15    # floats per loop iteration (128 KiB): the order of work does not matter here


def relu_forward(x, bint inplace, residual=None):
    """x (any shape, C-contiguous float32) -> max(x, 0) (NaN stays NaN), into x itself when inplace;
    with residual (x's shape, C-contiguous float32), max(x + residual, 0)."""
    out = x if inplace else _empty(x.shape)
    cdef Py_ssize_t n = x.size, u, nchunks = (n + RELU_CHUNK - 1) // RELU_CHUNK
    if n == 0:
        return out
    cdef const float[::1] xv = x.reshape(-1)
    cdef float[::1] ov = out.reshape(-1)
    cdef const float[::1] rv
    cdef int n_threads = <int>min(<Py_ssize_t>_threads(), nchunks)
    if residual is not None:
        rv = residual.reshape(-1)
        for u in prange(nchunks, nogil=True, schedule="static", num_threads=n_threads):
            chexcy_relu_add(&xv[u * RELU_CHUNK], &rv[u * RELU_CHUNK], &ov[u * RELU_CHUNK],
                            min(<Py_ssize_t>RELU_CHUNK, n - u * RELU_CHUNK))
        return out
    for u in prange(nchunks, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_relu(&xv[u * RELU_CHUNK], &ov[u * RELU_CHUNK], min(<Py_ssize_t>RELU_CHUNK, n - u * RELU_CHUNK))
    return out


def relu_backward(dout, y):
    """dout, y (the same shape, C-contiguous float32) -> dx = dout where y > 0, else 0 (a fresh array)."""
    dx = _empty(dout.shape)
    cdef Py_ssize_t n = dout.size, u, nchunks = (n + RELU_CHUNK - 1) // RELU_CHUNK
    if n == 0:
        return dx
    cdef const float[::1] gv = dout.reshape(-1)
    cdef const float[::1] yv = y.reshape(-1)
    cdef float[::1] dv = dx.reshape(-1)
    cdef int n_threads = <int>min(<Py_ssize_t>_threads(), nchunks)
    for u in prange(nchunks, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_relu_grad(&gv[u * RELU_CHUNK], &yv[u * RELU_CHUNK], &dv[u * RELU_CHUNK],
                         min(<Py_ssize_t>RELU_CHUNK, n - u * RELU_CHUNK))
    return dx


# ------------------------------------------------------------------------------------------------
# Linear: y = x @ W.T + b
# ------------------------------------------------------------------------------------------------
# All three products of a dense layer are one blocked matrix multiply (_ops_gemm.h), C = init + A B,
# with A and B read through element strides:
#   forward  out (N, O)    = b + x (N, K) . W^T (K, O)
#   dx       dx (N, K)     = dout (N, O) . W (O, K)
#   dweight  dweight (O, K) = dout^T (O, N) . x (N, K)
# The B operand is packed once per call (parallel over its column strips); then each task (a block of
# rows of C x a range of column strips) packs its rows of A per K block and runs the register tiles.
# Every element of C is its init plus the sums of the K blocks (each in k order) added in order,
# whichever task computes it, so the result is bitwise the same for any thread count (see _ops_gemm.h).


cdef void _gemm_task(
        const float* A, Py_ssize_t a_rs, Py_ssize_t a_cs, Py_ssize_t M, Py_ssize_t K,   # IN A (M, K)
        const float* bp, Py_ssize_t N, const float* init,      # IN packed B (K, N) strips, init (N_pad,)
        float* C, float* abuf, Py_ssize_t abuf_len,            # OUT C (M, N); per-thread scratch
        Py_ssize_t mc, Py_ssize_t ncb, Py_ssize_t n_strips, Py_ssize_t t) noexcept nogil:
    """Task t of the grid (row blocks of mc rows) x (ncb ranges of column strips)."""
    cdef Py_ssize_t rb = t // ncb, cb = t % ncb
    cdef Py_ssize_t m0 = rb * mc
    cdef Py_ssize_t rows = M - m0 if M - m0 < mc else mc
    chexcy_gemm_task(A, a_rs, a_cs, m0, rows, K, bp, cb * n_strips // ncb, (cb + 1) * n_strips // ncb,
                     N, init, C, N, abuf + omp_get_thread_num() * abuf_len)


cdef struct _GemmPlan:
    Py_ssize_t n_strips     # column strips of GEMM_NR
    Py_ssize_t mc           # rows per task (a multiple of GEMM_MR)
    Py_ssize_t ncb          # ranges of column strips per row block
    Py_ssize_t n_tasks
    int n_threads
    Py_ssize_t pb_len       # floats of packed B (a multiple of 16)
    Py_ssize_t abuf_len     # floats of one thread's packed A block (a multiple of 16)
    Py_ssize_t scratch_len  # floats of scratch in all, with the init row and the alignment slack


cdef _GemmPlan _gemm_plan(Py_ssize_t M, Py_ssize_t K, Py_ssize_t N, int n_threads) noexcept:
    """How C (M, N) = A (M, K) B (K, N) is cut into tasks and how much scratch it needs.
    Task grid, from the shape: row blocks of at most GEMM_MC rows, equal sizes (rounded up to the tile
    height); when that gives fewer than 4 blocks, the column strips are split too, so 2-3 threads have
    work to share. (Which thread runs which task does not change the result: see _ops_gemm.h.)"""
    cdef _GemmPlan p
    cdef Py_ssize_t nbm = (M + GEMM_MC - 1) // GEMM_MC
    p.n_strips = (N + GEMM_NR - 1) // GEMM_NR
    p.mc = ((M + nbm - 1) // nbm + GEMM_MR - 1) // GEMM_MR * GEMM_MR
    nbm = (M + p.mc - 1) // p.mc
    p.ncb = min(p.n_strips, (4 + nbm - 1) // nbm)
    p.n_tasks = nbm * p.ncb
    p.n_threads = <int>min(<Py_ssize_t>n_threads, p.n_tasks)
    if M * N * K < GEMM_SERIAL_MADDS:   # waking a second thread costs more than the work
        p.n_threads = 1
    p.pb_len = (p.n_strips * K * GEMM_NR + 15) // 16 * 16
    p.abuf_len = (chexcy_gemm_abuf_floats(p.mc, K) + 15) // 16 * 16
    p.scratch_len = p.pb_len + p.n_threads * p.abuf_len + p.n_strips * GEMM_NR + 16
    return p


cdef void _gemm_run(const float* a, Py_ssize_t a_rs, Py_ssize_t a_cs, Py_ssize_t M, Py_ssize_t K,
                    const float* b, Py_ssize_t b_rs, Py_ssize_t b_cs, Py_ssize_t N, const float* bias,
                    float* c, _GemmPlan p, float* scratch) noexcept nogil:
    """C (M, N) = bias + A (M, K) B (K, N) (bias may be NULL: zeros), in scratch of p.scratch_len floats."""
    cdef Py_ssize_t s, t
    # scratch, cut into 64-byte aligned pieces: packed B, the threads' packed A blocks, the init row
    cdef float* pb = scratch + (64 - <size_t>scratch % 64) % 64 // 4
    cdef float* ab = pb + p.pb_len
    cdef float* init = ab + p.n_threads * p.abuf_len
    memset(init, 0, p.n_strips * GEMM_NR * sizeof(float))
    if bias != NULL:
        memcpy(init, bias, N * sizeof(float))
    if p.n_threads == 1:    # no parallel region at all: a tiny layer is all per-call overhead
        for s in range(p.n_strips):
            chexcy_gemm_pack_b(b, b_rs, b_cs, K, N, s, pb + s * K * GEMM_NR)
        for t in range(p.n_tasks):
            _gemm_task(a, a_rs, a_cs, M, K, pb, N, init, c, ab, p.abuf_len, p.mc, p.ncb, p.n_strips, t)
        return
    for s in prange(p.n_strips, schedule="static", num_threads=p.n_threads):
        chexcy_gemm_pack_b(b, b_rs, b_cs, K, N, s, pb + s * K * GEMM_NR)
    for t in prange(p.n_tasks, schedule="static", num_threads=p.n_threads):
        _gemm_task(a, a_rs, a_cs, M, K, pb, N, init, c, ab, p.abuf_len, p.mc, p.ncb, p.n_strips, t)


def linear_forward(x, weight, bias):
    """x (N, K), weight (O, K), bias (O,) or None -> out (N, O) = x @ weight.T + bias."""
    cdef const float[:, ::1] xv = x
    cdef const float[:, ::1] wv = weight
    cdef const float[::1] bv
    cdef const float* bp = NULL
    cdef Py_ssize_t N = xv.shape[0], K = xv.shape[1], O = wv.shape[0]
    cdef _GemmPlan p = _gemm_plan(N, K, O, _threads())
    if bias is not None:
        bv = bias
        bp = &bv[0]
    out = np.empty((N, O), np.float32)
    cdef float[:, ::1] ov = out
    cdef Py_ssize_t u, units = (O + 23) // 24, rblocks = (N + GEMM_DOT_M - 1) // GEMM_DOT_M
    cdef int n_dot = _threads() if N * K * O >= GEMM_SERIAL_MADDS else 1
    if N <= GEMM_DOT_M or O <= LINEAR_DOT_MAX_O:
        # dot products straight from W and x, no packing (chexcy_gemm_dot_rows): a few rows (threads
        # over blocks of outputs) or a few outputs (a classifier's; threads over blocks of rows)
        with nogil:
            if n_dot == 1:
                chexcy_gemm_dot_rows(&xv[0, 0], N, K, &wv[0, 0], 0, O, bp, &ov[0, 0], O)
            elif N <= GEMM_DOT_M:
                for u in prange(units, schedule="static", num_threads=n_dot):
                    chexcy_gemm_dot_rows(&xv[0, 0], N, K, &wv[0, 0], u * 24, min(O, u * 24 + 24), bp,
                                         &ov[0, 0], O)
            else:
                for u in prange(rblocks, schedule="static", num_threads=n_dot):
                    chexcy_gemm_dot_rows(&xv[u * GEMM_DOT_M, 0], min(GEMM_DOT_M, N - u * GEMM_DOT_M), K,
                                         &wv[0, 0], 0, O, bp, &ov[u * GEMM_DOT_M, 0], O)
        return out
    cdef float* scratch = <float*>malloc(p.scratch_len * sizeof(float))
    if scratch == NULL:
        raise MemoryError(f"linear: no memory for {p.scratch_len * 4} bytes of packing scratch")
    with nogil:     # A = x (rows contiguous), B = weight^T (columns contiguous)
        _gemm_run(&xv[0, 0], K, 1, N, K, &wv[0, 0], 1, K, O, bp, &ov[0, 0], p, scratch)
    free(scratch)
    return out


def linear_backward(dout, x, weight):
    """dout (N, O), x (N, K), weight (O, K) -> (dx (N, K), dweight (O, K), dbias (O,))."""
    cdef int n_threads = _threads()
    cdef const float[:, ::1] dv = dout
    cdef const float[:, ::1] xv = x
    cdef const float[:, ::1] wv = weight
    cdef Py_ssize_t N = dv.shape[0], O = dv.shape[1], K = xv.shape[1], u, n_blocks = (O + 63) // 64
    cdef _GemmPlan pdx = _gemm_plan(N, O, K, n_threads)     # dx (N, K) = dout (N, O) W (O, K)
    cdef _GemmPlan pdw = _gemm_plan(O, N, K, n_threads)     # dweight (O, K) = dout^T (O, N) x (N, K)
    dx = np.empty((N, K), np.float32)
    dweight = np.empty((O, K), np.float32)
    dbias = np.empty(O, np.float32)
    cdef float[:, ::1] dxv = dx
    cdef float[:, ::1] dwv = dweight
    cdef float[::1] dbv = dbias
    # one scratch for both products (half the fresh pages); none for a few rows, which pack nothing
    cdef float* scratch = NULL
    if N > GEMM_DOT_M:
        scratch = <float*>malloc(max(pdx.scratch_len, pdw.scratch_len) * sizeof(float))
        if scratch == NULL:
            raise MemoryError(f"linear_backward: no memory for "
                              f"{max(pdx.scratch_len, pdw.scratch_len) * 4} bytes of packing scratch")
    if N * O < GEMM_SERIAL_MADDS // 16:
        n_threads = 1
    cdef Py_ssize_t n_kb = (K + 127) // 128
    cdef int n_dot = _threads() if N * O * K >= GEMM_SERIAL_MADDS else 1
    with nogil:
        if N <= GEMM_DOT_M:     # a few rows: no packing (chexcy_gemm_dx_rows / _outer_rows); W read once
            for u in prange(n_kb, schedule="static", num_threads=n_dot):
                chexcy_gemm_dx_rows(&dv[0, 0], N, O, &wv[0, 0], K, u * 128, min(K, u * 128 + 128), &dxv[0, 0])
            for u in prange(n_blocks, schedule="static", num_threads=n_dot):
                chexcy_gemm_outer_rows(&dv[0, 0], N, O, &xv[0, 0], K, u * 64, min(O, u * 64 + 64), &dwv[0, 0])
        else:
            _gemm_run(&dv[0, 0], O, 1, N, O, &wv[0, 0], K, 1, K, NULL, &dxv[0, 0], pdx, scratch)
            _gemm_run(&dv[0, 0], 1, O, O, N, &xv[0, 0], K, 1, K, NULL, &dwv[0, 0], pdw, scratch)
        # dbias: column sums in float64, 64 columns per piece, each piece summed over the rows in order
        if n_threads == 1:
            chexcy_col_sums(&dv[0, 0], N, O, 0, O, &dbv[0])
        else:
            for u in prange(n_blocks, schedule="static", num_threads=n_threads):
                chexcy_col_sums(&dv[0, 0], N, O, u * 64, 64 if O - u * 64 > 64 else O - u * 64, &dbv[0])
    free(scratch)
    return dx, dweight, dbias


# ------------------------------------------------------------------------------------------------
# Batch norm, training mode: statistics per channel over (N, H, W)
# ------------------------------------------------------------------------------------------------
# The kernels are chexcy/_ops_batchnorm.h's (its header says what they compute and why they are fast).
# The fused ops give each thread blocks of whole channels (statistics of their planes, their combination
# in plane order, then the elementwise map while the block is in L1/L2: one parallel region, x read from
# memory once); a block holds up to BN_BLOCK_FLOATS floats (at least one channel, at most
# CHEXCY_BN_BLOCK). With fewer than BN_BLOCKS_PER_THREAD one-channel blocks per thread (a 3-channel
# input layer) whole channels would leave threads idle, so the planes are split instead: per-plane sums
# into a (C, N) scratch, a serial combine, then a parallel map. Both ways run the same plane kernels and the same
# combine in the same order, so they, and the thread count, give the same bits.

from libc.math cimport sqrt

cdef enum:
    BN_BLOCKS_PER_THREAD = 4
    BN_BLOCK_FLOATS = 16384     # 64 KiB of x per channel block


cdef Py_ssize_t _bn_block(Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, int n_threads) noexcept:
    """Channels per block of the fused batch-norm kernels, or 0 for the plane-split path."""
    cdef Py_ssize_t cb = max(1, min(<Py_ssize_t>CHEXCY_BN_BLOCK, BN_BLOCK_FLOATS // (N * HW)))
    if n_threads == 1:
        return cb
    cb = min(cb, C // (BN_BLOCKS_PER_THREAD * n_threads))
    return cb


def batch_norm2d_forward(x, weight, bias, double eps):
    """x (N, C, H, W), weight (C,), bias (C,) -> (out (N, C, H, W), mean (C,), var (C,) biased), float32.

    out = (x - mean) / sqrt(var + eps) * weight + bias, computed as (x - mean32) * a + b with a and b
    from float64 statistics; b also absorbs mean - mean32, the rounding of the mean to float32."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2] * x.shape[3], u, c
    cdef double mu, v
    cdef int n_threads = _threads()
    out = _empty(x.shape)
    mean = np.empty(C, np.float32)
    var = np.empty(C, np.float32)
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[::1] wv = weight
    cdef const float[::1] bv = bias
    cdef float[:, :, :, ::1] ov = out
    cdef float[::1] mv = mean
    cdef float[::1] vv = var
    cdef const float* xp = &xv[0, 0, 0, 0]
    cdef float* op = &ov[0, 0, 0, 0]
    cdef double* scratch
    cdef double[:, ::1] ps
    cdef double[:, ::1] pm
    cdef float[:, ::1] k
    cdef Py_ssize_t cb = _bn_block(N, C, HW, n_threads)
    if cb > 0:
        scratch = <double*>malloc(<size_t>n_threads * 2 * N * cb * sizeof(double))
        if scratch == NULL:
            raise MemoryError(f"batch_norm2d: no memory for {n_threads} x {2 * N * cb} float64 sums")
        for u in prange((C + cb - 1) // cb, nogil=True, schedule="static", num_threads=n_threads):
            chexcy_bn_forward_block(xp, op, N, C * HW, HW, u * cb, min(C, u * cb + cb), &wv[0], &bv[0], eps,
                                    scratch + 2 * N * cb * threadid(), &mv[0], &vv[0])
        free(scratch)
        return out, mean, var
    plane_sum = np.empty((C, N), np.float64)
    plane_m2 = np.empty((C, N), np.float64)
    coef = np.empty((C, 3), np.float32)             # per channel: mean32, a, b
    ps = plane_sum
    pm = plane_m2
    k = coef
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_bn_plane_stats(xp + u * HW, HW, &ps[u % C, u // C], &pm[u % C, u // C])
    with nogil:
        for c in range(C):
            chexcy_bn_combine(&ps[c, 0], &pm[c, 0], N, HW, &mu, &v)
            chexcy_bn_coefficients(mu, v, wv[c], bv[c], eps, &k[c, 0])
            mv[c] = k[c, 0]
            vv[c] = <float>v
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_bn_apply(xp + u * HW, op + u * HW, HW, k[u % C, 0], k[u % C, 1], k[u % C, 2], 0)
    return out, mean, var


cdef Py_ssize_t _plane_sample_stride(const float[:, :, :, :] v, str name) except -1:
    """The distance in floats between v's samples, v (N, C, H, W) with contiguous (C, H, W) planes (a
    channel prefix of a larger C-contiguous array has them). A dimension of size 1 may have any stride
    (NumPy calls such arrays C-contiguous)."""
    cdef Py_ssize_t W = v.shape[3], HW = v.shape[2] * v.shape[3]
    if (W > 1 and v.strides[3] != 4) or (v.shape[2] > 1 and v.strides[2] != 4 * W) \
            or (v.shape[1] > 1 and v.strides[1] != 4 * HW) \
            or (v.shape[0] > 1 and (v.strides[0] < 4 * v.shape[1] * HW or v.strides[0] % 4)):
        raise ValueError(f"batch_norm2d_backward: {name} needs contiguous (C, H, W) planes, got strides "
                         f"{[v.strides[i] for i in range(4)]} for shape {[v.shape[i] for i in range(4)]}")
    return v.strides[0] // 4 if v.shape[0] > 1 else 0


def batch_norm2d_backward(dout, x, mean, var, weight, double eps, out=None, bint add=False):
    """dout, x (N, C, H, W), mean, var, weight (C,) -> (dx (N, C, H, W), dweight (C,), dbias (C,)), float32.

    With s = 1 / sqrt(var + eps), Sg = sum(dout) and Sgx = sum(dout * (x - mean)) per channel over
    M = N * H * W values: dbias = Sg, dweight = s * Sgx and
    dx = weight * s * (dout - Sg / M - (x - mean) * s^2 * Sgx / M) = a * dout + ((x - mean) * b + c).
    x, dout and out need contiguous (C, H, W) planes only (channel prefixes of larger arrays are read
    and written in place). dx goes to out when given (added to it with add), else to a fresh array."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2] * x.shape[3], u, n, c
    cdef double sg, sgx
    cdef int n_threads = _threads()
    dx = _empty(x.shape) if out is None else out
    dweight = np.empty(C, np.float32)
    dbias = np.empty(C, np.float32)
    cdef const float[:, :, :, :] gv = dout       # planes contiguous (checked), samples strided
    cdef const float[:, :, :, :] xv = x
    cdef const float[::1] mv = mean
    cdef const float[::1] vv = var
    cdef const float[::1] wv = weight
    cdef float[:, :, :, :] dxv = dx
    cdef float[::1] dwv = dweight
    cdef float[::1] dbv = dbias
    cdef Py_ssize_t gs = _plane_sample_stride(gv, "dout"), xs = _plane_sample_stride(xv, "x")
    cdef Py_ssize_t ds = _plane_sample_stride(dxv, "out")
    cdef int acc = add and out is not None
    cdef const float* gp = &gv[0, 0, 0, 0]
    cdef const float* xp = &xv[0, 0, 0, 0]
    cdef float* dxp = &dxv[0, 0, 0, 0]
    cdef double[:, ::1] pg
    cdef double[:, ::1] pgx
    cdef float[:, ::1] k
    cdef Py_ssize_t cb = _bn_block(N, C, HW, n_threads)
    if cb > 0:
        for u in prange((C + cb - 1) // cb, nogil=True, schedule="static", num_threads=n_threads):
            chexcy_bn_backward_block(gp, gs, xp, xs, dxp, ds, acc, N, HW, u * cb, min(C, u * cb + cb), &mv[0],
                                     &vv[0], &wv[0], eps, &dwv[0], &dbv[0])
        return dx, dweight, dbias
    plane_g = np.empty((C, N), np.float64)
    plane_gx = np.empty((C, N), np.float64)
    coef = np.empty((C, 3), np.float32)             # per channel: a, b, c
    pg = plane_g
    pgx = plane_gx
    k = coef
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_bn_plane_grad_sums(gp + u // C * gs + u % C * HW, xp + u // C * xs + u % C * HW, HW, mv[u % C],
                                  &pg[u % C, u // C], &pgx[u % C, u // C])
    with nogil:
        for c in range(C):
            sg = 0
            sgx = 0
            for n in range(N):
                sg = sg + pg[c, n]
                sgx = sgx + pgx[c, n]
            dbv[c] = <float>sg
            dwv[c] = <float>(sgx * (1.0 / sqrt(<double>vv[c] + eps)))
            chexcy_bn_grad_coefficients(vv[c], wv[c], sg, sgx, <double>N * HW, eps, &k[c, 0])
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        if acc:     # add as a constant in each call (see chexcy_bn_backward_block)
            chexcy_bn_apply_grad(gp + u // C * gs + u % C * HW, xp + u // C * xs + u % C * HW,
                                 dxp + u // C * ds + u % C * HW, HW, mv[u % C], k[u % C, 0], k[u % C, 1],
                                 k[u % C, 2], 1)
        else:
            chexcy_bn_apply_grad(gp + u // C * gs + u % C * HW, xp + u // C * xs + u % C * HW,
                                 dxp + u // C * ds + u % C * HW, HW, mv[u % C], k[u % C, 0], k[u % C, 1],
                                 k[u % C, 2], 0)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Batch norm in two halves: per-plane statistics, then the elementwise map with given channel statistics.
# chexcy.nn.BatchNorm2d uses them when its statistics are those of a batch spread over ranks: each rank
# computes its planes' statistics, the ranks exchange them, every rank combines them
# (chexcy.ops.batch_norm2d_combine_stats) and applies the map to its own rows. The plane kernels and the
# coefficient arithmetic are those of batch_norm2d_forward/backward above, so planes combined in batch
# order give the fused results bit for bit.

def batch_norm2d_plane_stats(x):
    """x (N, C, H, W) float32 -> (plane_sum (C, N), plane_m2 (C, N)) float64: each plane's sum and sum of
    squared deviations from the plane's own mean."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2] * x.shape[3], u
    cdef int n_threads = _threads()
    plane_sum = np.empty((C, N), np.float64)
    plane_m2 = np.empty((C, N), np.float64)
    cdef const float[:, :, :, ::1] xv = x
    cdef double[:, ::1] ps = plane_sum
    cdef double[:, ::1] pm = plane_m2
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_bn_plane_stats(&xv[u // C, u % C, 0, 0], HW, &ps[u % C, u // C], &pm[u % C, u // C])
    return plane_sum, plane_m2


def batch_norm2d_apply(x, mean, var, weight, bias, double eps, bint relu=False, out=None):
    """x (N, C, H, W) float32, planes contiguous (samples any distance apart: a channel prefix of a larger
    array); mean, var (C,) float64 channel statistics; weight, bias (C,) float32 -> out = (x - mean) /
    sqrt(var + eps) * weight + bias, then max(., 0) when relu, float32 (N, C, H, W): a fresh array, or
    written into out (C-contiguous, may be x itself)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2] * x.shape[3], u, c
    cdef int n_threads = _threads()
    if out is None:
        out = _empty(x.shape)
    coef = np.empty((C, 3), np.float32)             # per channel: mean32, a, b
    cdef const float[:, :, :, :] xv = x          # planes contiguous (chexcy.ops checks), samples strided
    cdef const double[::1] mv = mean
    cdef const double[::1] vv = var
    cdef const float[::1] wv = weight
    cdef const float[::1] bv = bias
    cdef float[:, :, :, ::1] ov = out
    cdef float[:, ::1] k = coef
    with nogil:
        for c in range(C):
            chexcy_bn_coefficients(mv[c], vv[c], wv[c], bv[c], eps, &k[c, 0])
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_bn_apply(&xv[u // C, u % C, 0, 0], &ov[u // C, u % C, 0, 0], HW,
                        k[u % C, 0], k[u % C, 1], k[u % C, 2], relu)
    return out


def batch_norm2d_plane_grad_sums(dout, x, mean):
    """dout, x (N, C, H, W) float32, mean (C,) float32 -> (plane_g (C, N), plane_gx (C, N)) float64: each
    plane's sum(dout) and sum(dout * (x - mean))."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2] * x.shape[3], u
    cdef int n_threads = _threads()
    plane_g = np.empty((C, N), np.float64)
    plane_gx = np.empty((C, N), np.float64)
    cdef const float[:, :, :, ::1] gv = dout
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[::1] mv = mean
    cdef double[:, ::1] pg = plane_g
    cdef double[:, ::1] pgx = plane_gx
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_bn_plane_grad_sums(&gv[u // C, u % C, 0, 0], &xv[u // C, u % C, 0, 0], HW, mv[u % C],
                                  &pg[u % C, u // C], &pgx[u % C, u // C])
    return plane_g, plane_gx


def batch_norm2d_backward_apply(dout, x, mean, var, weight, sum_g, sum_gx, double count, double eps):
    """dx of batch norm from the channel sums Sg = sum(dout), Sgx = sum(dout * (x - mean)) over `count`
    values per channel: dx = a * dout + (x - mean) * b + c (coefficients as batch_norm2d_backward).
    dout, x float32 (N, C, H, W); mean, var, weight (C,) float32; sum_g, sum_gx (C,) float64."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2] * x.shape[3], u, c
    cdef int n_threads = _threads()
    dx = _empty(x.shape)
    coef = np.empty((C, 3), np.float32)             # per channel: a, b, c
    cdef const float[:, :, :, ::1] gv = dout
    cdef const float[:, :, :, ::1] xv = x
    cdef const float[::1] mv = mean
    cdef const float[::1] vv = var
    cdef const float[::1] wv = weight
    cdef const double[::1] sgv = sum_g
    cdef const double[::1] sgxv = sum_gx
    cdef float[:, :, :, ::1] dxv = dx
    cdef float[:, ::1] k = coef
    with nogil:
        for c in range(C):
            chexcy_bn_grad_coefficients(vv[c], wv[c], sgv[c], sgxv[c], count, eps, &k[c, 0])
    for u in prange(N * C, nogil=True, schedule="static", num_threads=n_threads):
        chexcy_bn_apply_grad(&gv[u // C, u % C, 0, 0], &xv[u // C, u % C, 0, 0], &dxv[u // C, u % C, 0, 0],
                             HW, mv[u % C], k[u % C, 0], k[u % C, 1], k[u % C, 2], 0)
    return dx
