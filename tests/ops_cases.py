"""Shared material for the op tests: the backends under test, case grids, tolerances and helpers.

Cases are plain namedtuples whose fields are the public arguments of chexcy.ops, so a test can call
the op with ``**case.args`` and a failure names the case by its id.
"""
import importlib
import os
from collections import namedtuple

import numpy as np
from numpy.testing import assert_allclose, assert_array_equal

from chexcy import _native, ops, reference

# ----------------------------------------------------------------------------------------------
# Backends under test.
# Every available backend is compared with the reference. When CHEXCY_BACKEND names one (CI runs the
# suite once per backend), only that one is tested, so the compiled run does not repeat the fallback's
# work. The reference itself is proved separately (finite differences and hand-computed examples) and
# is only compared with itself through chexcy.ops in a cheap sanity loop.
_ENV_BACKEND = os.environ.get("CHEXCY_BACKEND", "").strip()
AVAILABLE_BACKENDS = ops.available_backends()
BACKENDS = [_ENV_BACKEND] if _ENV_BACKEND in AVAILABLE_BACKENDS else \
    [b for b in AVAILABLE_BACKENDS if b != "reference"]
COMPILED = "cython" in AVAILABLE_BACKENDS


def runnable_variants():
    """(name, module) for every compiled variant that is built here and that this CPU can run, fastest first."""
    out = []
    for name in _native.supported_variants():
        try:
            out.append((name, importlib.import_module(_native.VARIANTS[name][0])))
        except ImportError:
            pass
    return out


def check_conv_on_every_variant(rng, x_shape, w_shape, stride, padding, dilation, groups, case=""):
    """Random float32 conv2d inputs (x x_shape, weight w_shape, a bias, dout) run through forward and backward
    on every runnable variant: at 1 thread compared with the reference, at 2 and 3 threads with the 1-thread
    result bit for bit. stride, padding, dilation: (h, w) tuples, as the compiled modules take them."""
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    args = (stride, padding, dilation, groups)
    want = reference.conv2d_forward(x, w, b, *args)
    dout = rng.standard_normal(want.shape).astype(np.float32)
    want_b = reference.conv2d_backward(dout, x, w, *args)
    for name, mod in runnable_variants():
        results = {}
        try:
            for threads in (1, 2, 3):
                mod.set_num_threads(threads)
                results[threads] = (mod.conv2d_forward(x, w, b, *args),) + tuple(mod.conv2d_backward(dout, x, w, *args))
        finally:
            mod.set_num_threads(0)
        assert_close(results[1][0], want, "conv2d", err_msg=f"variant {name} {case}")
        for label, got, exp in zip(("dx", "dweight", "dbias"), results[1][1:], want_b):
            assert_close(got, exp, "conv2d_backward", err_msg=f"variant {name} {label} {case}")
        for threads in (2, 3):
            for i, label in enumerate(("out", "dx", "dweight", "dbias")):
                assert_array_equal(results[threads][i], results[1][i],
                                   err_msg=f"variant {name} {label} {case}: {threads} threads differ")


# ----------------------------------------------------------------------------------------------
# Tolerances: one table, per op and dtype, with the reason for each entry.
#   float32: every backend computes in float32 but sums in a different order (the reference per output
#   position, the fallback through BLAS blocks, the kernels in register tiles), so results differ by a
#   few ulps of the partial sums. Inputs are standard normal; a conv output sums up to
#   K = Cg * KH * KW <= ~200 products of magnitude ~1, whose float32 rounding error is ~K * 6e-8 * sqrt(K).
#   float64: finite differences with eps = 1e-6 on smooth (linear in each argument) functions; the
#   truncation error is zero for linear maps and the rounding error is ~1e-16 / 1e-6 * |f| ~ 1e-9.
Tol = namedtuple("Tol", "rtol atol reason")
TOLERANCES = {
    ("conv2d", "float32"): Tol(1e-4, 1e-4, "sums of up to ~200 float32 products in different orders"),
    ("conv2d_backward", "float32"): Tol(1e-4, 2e-4, "dweight sums N * OH * OW products; orders differ"),
    ("max_pool2d", "float32"): Tol(0.0, 0.0, "selecting a maximum is exact; argmax must match exactly"),
    ("max_pool2d_backward", "float32"): Tol(1e-6, 1e-6, "adds at most KH * KW values per input position"),
    ("avg_pool2d", "float32"): Tol(1e-5, 1e-6, "sums of up to 49 float32 values, then one division"),
    ("avg_pool2d_backward", "float32"): Tol(1e-5, 1e-6, "up to 49 shares added per input position"),
    ("global_avg_pool2d", "float32"): Tol(1e-5, 1e-6, "mean of H * W values (pairwise vs sequential)"),
    ("global_avg_pool2d_backward", "float32"): Tol(1e-6, 1e-7, "one division, order-free"),
    ("linear", "float32"): Tol(1e-4, 1e-4, "dot products of up to 1100 float32 terms (error ~3e-5 measured "
                                           "at K = 1024-1100, for the BLAS fallback and the kernels alike)"),
    ("linear_backward", "float32"): Tol(1e-4, 1e-4, "dot products over N or out_features terms (<= 300)"),
    ("finite_difference", "float64"): Tol(1e-6, 1e-7, "central differences of maps linear in each "
                                                       "argument: only rounding error, ~1e-9"),
}


def assert_close(got, want, op, err_msg="", dtype="float32"):
    """Compare with the table's tolerance for `op`; exact comparison when the table says 0."""
    tol = TOLERANCES[(op, dtype)]
    assert got.shape == want.shape, f"{op}: shape {got.shape} != expected {want.shape} {err_msg}"
    if tol.rtol == 0 and tol.atol == 0:
        assert_array_equal(got, want, err_msg=f"{op} {err_msg}")
    else:
        assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol, err_msg=f"{op} {err_msg}")


# ----------------------------------------------------------------------------------------------
# Case grids.

ConvCase = namedtuple("ConvCase", "N C H W F KH KW stride padding dilation groups bias")


def conv_args(case):
    return dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)


CONV_CASES = [
    ConvCase(1, 1, 5, 5, 1, 1, 1, 1, 0, 1, 1, True),                   # batch 1, 1x1, smallest
    ConvCase(2, 3, 7, 9, 4, 3, 3, 1, 1, 1, 1, True),                   # odd, non-square
    ConvCase(1, 4, 8, 8, 6, 3, 3, 2, 1, 1, 2, False),                  # groups 2, stride 2
    ConvCase(2, 4, 9, 7, 4, 3, 3, 1, 1, 1, 4, True),                   # depthwise
    ConvCase(2, 4, 6, 6, 8, 3, 3, 1, 1, 1, 4, False),                  # depthwise, multiplier 2
    ConvCase(1, 6, 7, 7, 6, 3, 3, 2, 1, 1, 3, True),                   # groups 3
    ConvCase(2, 3, 11, 10, 5, 5, 5, 2, 2, 1, 1, True),                 # 5x5, pad 2
    ConvCase(1, 2, 13, 12, 3, 7, 7, 3, 2, 1, 1, False),                # 7x7, stride 3
    ConvCase(2, 2, 9, 11, 3, 2, 3, 1, 0, 1, 1, True),                  # KH != KW, even KH
    ConvCase(1, 3, 10, 9, 2, 3, 2, (2, 1), (1, 0), (2, 1), 1, True),   # every argument as a pair
    ConvCase(2, 2, 12, 12, 4, 3, 3, 1, 2, 2, 2, True),                 # dilation 2, pad 2, groups 2
    ConvCase(1, 2, 14, 13, 2, 3, 3, 1, 0, 3, 1, False),                # dilation 3
    ConvCase(2, 2, 10, 8, 2, 6, 4, 2, (2, 1), (1, 2), 2, True),        # even kernel, mixed pairs
    ConvCase(2, 2, 4, 4, 3, 3, 3, 3, 2, 1, 1, True),                   # stride 3 > kernel reach
    ConvCase(1, 1, 5, 6, 3, 5, 6, 1, 0, 1, 1, True),                   # kernel == input: 1x1 output
    ConvCase(1, 3, 15, 6, 2, 1, 1, 2, 0, 1, 1, True),                  # 1x1 stride 2
    ConvCase(2, 4, 10, 11, 6, 1, 1, (3, 2), 0, 1, 2, False),           # 1x1 strided shortcut, groups
    ConvCase(2, 16, 16, 17, 32, 1, 1, 2, 0, 1, 1, True),               # 1x1 stride 2, full tiles
    ConvCase(2, 16, 17, 20, 32, 3, 3, 2, 1, 1, 1, True),               # 3x3 stride 2, full tiles
    ConvCase(1, 8, 13, 14, 16, 3, 3, (2, 3), 1, (1, 2), 2, False),     # strides, dilation, groups
    ConvCase(1, 2, 9, 9, 2, 1, 1, 1, 1, 1, 1, False),                  # 1x1 with padding
    ConvCase(2, 3, 8, 7, 4, 3, 3, 1, "same", 1, 1, True),              # same, odd kernel
    ConvCase(1, 2, 8, 9, 2, 4, 2, 1, "same", 1, 2, False),             # same, even kernel: asymmetric
    ConvCase(1, 2, 9, 8, 4, 2, 3, 1, "same", 2, 2, True),              # same with dilation
    ConvCase(1, 2, 5, 5, 2, 3, 3, 1, "same", 3, 1, True),              # same, kernel reach > input
    ConvCase(2, 3, 7, 6, 2, 3, 3, 1, "valid", 1, 1, True),             # valid
    ConvCase(2, 1, 16, 16, 4, 3, 3, 1, 1, 1, 1, True),                 # ref-cnn conv1 in miniature
]

# Larger planes and channel counts, so that compiled kernels that work in register tiles (several
# output channels x 16 output columns) run full tiles AND remainders, on their fast paths (stride 1,
# 3-wide kernels) and their general ones.
TILE_CONV_CASES = [
    ConvCase(2, 5, 37, 35, 19, 3, 3, 1, 1, 1, 1, True),                # full tiles + remainders
    ConvCase(1, 6, 33, 40, 18, 3, 3, 1, 1, 1, 2, False),               # groups 2, Fg = 9
    ConvCase(1, 2, 17, 64, 5, 3, 3, 1, 1, 1, 1, True),                 # dweight chunks of 16 + 1 rows
    ConvCase(2, 3, 2, 9, 4, 3, 3, 1, 1, 1, 1, True),                   # 2 output rows: no steady state
    ConvCase(2, 5, 8, 8, 19, 3, 3, 1, 1, 1, 1, True),                  # 8 x 8 planes: 2 rows per tile row
    ConvCase(3, 1, 17, 64, 6, 3, 3, 1, (1, 2), (1, 2), 1, True),       # first layer (one input channel):
    ConvCase(1, 1, 6, 9, 16, 3, 5, 1, (0, 2), 1, 1, False),            # dx, dweight, dbias per sample
    ConvCase(1, 3, 4, 4, 8, 3, 3, 1, 1, 1, 1, True),                   # 4 x 4 planes: 4 rows per tile row
    ConvCase(1, 4, 12, 8, 6, 3, 3, 1, (2, 1), (2, 1), 2, False),       # narrow planes, dilation, groups
    # dweight takes whole planes in chunks of NB samples (NB = 4 at 16 columns, 16 at 8): batches with
    # a shorter last chunk, whose padded planes are laid out with that chunk's own sample count
    ConvCase(5, 3, 16, 16, 6, 3, 3, 1, 1, 1, 1, True),                 # chunks of 4 + 1 samples
    ConvCase(18, 2, 8, 8, 6, 3, 3, 1, 1, 1, 2, False),                 # 16 + 2, groups 2
    ConvCase(2, 16, 18, 18, 32, 3, 3, 1, 1, 1, 1, True),               # ref-cnn conv2-like
    ConvCase(2, 1, 40, 40, 16, 3, 3, 1, 1, 1, 1, True),                # ref-cnn conv1-like
    ConvCase(2, 3, 34, 34, 17, 5, 3, 1, 2, 1, 1, True),                # KH != 3
    ConvCase(1, 4, 35, 35, 24, 7, 7, 1, 3, 1, 1, False),               # 7x7, 3 full channel tiles
    ConvCase(1, 4, 30, 41, 16, 3, 3, 2, 1, 1, 1, True),                # stride 2: general path
    ConvCase(1, 3, 20, 36, 9, 3, 3, 1, 4, 1, 1, True),                 # padding wider than the kernel
    ConvCase(1, 8, 24, 33, 8, 3, 3, 1, 1, 2, 8, True),                 # depthwise, dilation 2
    ConvCase(1, 4, 19, 34, 12, 3, 4, 1, "same", 1, 2, True),           # same, even KW
    # One output channel with a 3-row kernel at stride 1 takes the one-channel multi-row tile
    # (8 rows x 48 columns on AVX-512, 4 x 16 on AVX2 / SSE2): heights leave rows over for the
    # one-row tile, widths leave a partial last column tile; dx of a 1-channel input runs it too.
    ConvCase(2, 3, 29, 53, 1, 3, 3, 1, 1, 1, 1, True),                 # F = 1: rows and columns over
    ConvCase(2, 1, 27, 51, 9, 3, 3, 1, 1, 1, 1, False),                # dx of C = 1 through that tile
    ConvCase(1, 2, 21, 37, 1, 3, 3, 1, (1, 2), (1, 2), 1, True),       # column dilation 2 in it
    ConvCase(2, 4, 30, 100, 2, 3, 5, 1, "valid", 1, 2, True),          # KW 5, groups, full tiles
]


# Wide layers: from 64 input channels per group, stride-1 dweight (when not Winograd: groups, dilation,
# kernels other than 3x3) is a product per kernel tap over channel-blocked input (GEMM_MR = 12 output
# x GEMM_NR = 32 input channels per tile on AVX-512, K blocks of 128 // OW rows of one sample).
WIDE_CONV_CASES = [
    ConvCase(2, 64, 9, 11, 26, 3, 3, 1, (1, 2), (1, 2), 1, True),      # 26 output channels: 2 tiles + 2
    ConvCase(1, 70, 6, 7, 13, 3, 3, 1, 1, 1, 1, False),                # a partial block of input channels
    ConvCase(2, 128, 7, 6, 12, 3, 3, 1, 2, 2, 2, True),                # groups 2, dilation 2, pad 2
    ConvCase(1, 64, 7, 40, 14, 3, 5, 1, (1, 2), 1, 1, True),           # KW 5; 3-row K blocks, short last
    ConvCase(2, 66, 20, 9, 5, 1, 1, 1, 0, 1, 1, True),                 # 1x1
    ConvCase(3, 64, 4, 140, 7, 3, 3, 1, 1, 1, 1, False),               # rows wider than a K block
    ConvCase(1, 64, 11, 12, 16, 3, 3, 2, 1, 1, 1, True),               # stride 2 (spread onto stride 1)
    ConvCase(1, 64, 8, 8, 8, 2, 3, 1, "same", (2, 1), 1, True),        # same, even KH, row dilation
]


# 3x3, stride 1, dilation 1, one group, from 16 input and 24 output channels: the forward conv (and dx,
# the forward conv of dout) is Winograd F(2x2, 3x3) on 2x2 output tiles, units of up to 128 tiles
# (whole rows of tiles, or several whole samples when a sample has fewer), products in K blocks of 256
# input channels; from 32 input channels dweight too: small planes (several samples to a unit) in one
# pass over the whole batch's tiles, larger ones with their units summed into 4 partial sums.
WINOGRAD_CONV_CASES = [
    ConvCase(2, 16, 9, 11, 24, 3, 3, 1, 1, 1, 1, True),                # odd sizes: half tiles at the edges
    ConvCase(1, 24, 16, 16, 26, 3, 3, 1, 1, 1, 1, False),              # batch 1, 26 channels: 2 tiles + 2
    ConvCase(2, 16, 7, 40, 24, 3, 3, 1, 0, 1, 1, True),                # no padding; 19 tiles a row
    ConvCase(1, 20, 6, 5, 30, 3, 3, 1, 2, 1, 1, True),                 # padding 2 (dx: padding 0)
    ConvCase(1, 264, 5, 6, 24, 3, 3, 1, 1, 1, 1, True),                # 2 K blocks of input channels
    ConvCase(2, 16, 180, 6, 24, 3, 3, 1, 1, 1, 1, False),              # units of 85 + 5 rows of tiles
    ConvCase(2, 16, 3, 2, 24, 3, 3, 1, 1, 1, 1, True),                 # planes narrower than a tile
    ConvCase(1, 16, 8, 70, 48, 3, 3, 1, "same", 1, 1, True),           # 35 tiles a row: 3 vectors
    ConvCase(1, 32, 14, 13, 24, 3, 3, (1, 2), (2, 1), 1, 1, False),    # stride (1, 2): via stride 1
    ConvCase(3, 32, 9, 7, 26, 3, 3, 1, 1, 1, 1, True),                 # dweight: one pass, odd sizes
    ConvCase(2, 40, 180, 6, 24, 3, 3, 1, 1, 1, 1, False),              # dweight: 6 units in 4 sums
    ConvCase(1, 33, 5, 9, 50, 3, 3, 1, 0, 1, 1, True),                 # dweight: no padding, 33 channels
    ConvCase(5, 32, 8, 8, 24, 3, 3, 1, 1, 1, 1, True),                 # 16 tiles a sample: units of 4 + 1
    ConvCase(7, 40, 13, 14, 36, 3, 3, 1, 1, 1, 1, True),               # one pass: 49 tiles, units of 2 + 1
]


PoolCase = namedtuple("PoolCase", "N C H W kernel_size stride padding dilation")

MAX_POOL_CASES = [
    PoolCase(1, 1, 4, 4, 2, None, 0, 1),                 # stride None = kernel
    PoolCase(2, 3, 8, 8, 2, None, 0, 1),
    PoolCase(2, 3, 7, 9, 3, 2, 1, 1),                    # overlapping, padded, odd sizes
    PoolCase(1, 3, 9, 7, (3, 2), (2, 1), (1, 0), 1),     # pairs
    PoolCase(2, 2, 11, 10, 3, 1, 1, 2),                  # dilation 2
    PoolCase(1, 2, 13, 12, 3, 2, 1, 3),                  # dilation 3
    PoolCase(2, 2, 5, 7, 5, 3, 2, 1),                    # 5x5, pad 2
    PoolCase(1, 1, 6, 6, (1, 3), (1, 2), (0, 1), 1),     # 1-row kernel
    PoolCase(2, 3, 7, 7, 7, None, 3, 1),                 # 7x7 kernel, global-like
    PoolCase(1, 2, 8, 6, 4, 3, 2, (1, 2)),               # dilation pair
    PoolCase(1, 2, 5, 5, 1, 2, 0, 1),                    # 1x1 kernel, stride 2
    PoolCase(2, 5, 33, 37, 2, None, 0, 1),               # larger planes (ref-cnn pool-like)
    PoolCase(1, 3, 32, 31, 3, 2, 1, 1),
]

AVG_POOL_CASES = [
    PoolCase(1, 1, 4, 4, 2, None, 0, 1),
    PoolCase(2, 3, 8, 8, 2, None, 0, 1),
    PoolCase(2, 3, 7, 9, 3, 2, 1, 1),
    PoolCase(1, 3, 9, 7, (3, 2), (2, 1), (1, 0), 1),
    PoolCase(2, 2, 5, 7, 5, 3, 2, 1),
    PoolCase(1, 1, 6, 6, (1, 3), (1, 2), (0, 1), 1),
    PoolCase(2, 3, 7, 7, 7, None, 3, 1),
    PoolCase(2, 2, 11, 10, 3, 1, 1, 1),
    PoolCase(1, 2, 5, 5, 1, 2, 0, 1),
    PoolCase(2, 5, 33, 37, 2, None, 0, 1),
    PoolCase(1, 3, 32, 31, 3, 2, 1, 1),
]


def max_pool_args(case):
    return dict(kernel_size=case.kernel_size, stride=case.stride, padding=case.padding,
                dilation=case.dilation)


def avg_pool_args(case, count_include_pad):
    return dict(kernel_size=case.kernel_size, stride=case.stride, padding=case.padding,
                count_include_pad=count_include_pad)


GLOBAL_POOL_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 4, 8, 8), (1, 2, 1, 9)]

LinearCase = namedtuple("LinearCase", "N in_features out_features bias")
# The compiled linear op is a tiled matrix multiply (chexcy/_ops_gemm.h): register tiles of MR rows x NR
# columns (AVX-512 12 x 32, AVX2 6 x 16, SSE2 4 x 8), K blocks of 256, tasks of at most 432 rows on
# AVX-512 and 144 elsewhere. The three products put different sizes in those roles (forward: rows N, K
# in, columns out; dx: rows N, K out, columns in; dweight: rows out, K N, columns in), so the sizes below
# are 1, one past a tile or a task (13, 17, 33, 145, 433), not multiples of any tile (3, 7, 49, 100, 300),
# and past one, two and four K blocks (257, 300, 513, 600, 1100).
LINEAR_CASES = [LinearCase(1, 1, 1, True), LinearCase(4, 7, 3, True), LinearCase(5, 16, 14, False),
                LinearCase(3, 128, 14, True), LinearCase(13, 257, 33, True), LinearCase(17, 513, 17, False),
                LinearCase(33, 3, 100, True), LinearCase(100, 600, 3, True), LinearCase(145, 33, 49, True),
                LinearCase(300, 40, 1, False), LinearCase(1, 300, 257, True), LinearCase(64, 1100, 300, True),
                LinearCase(433, 40, 20, True), LinearCase(9, 20, 433, False)]


def case_id(case):
    """Readable pytest id: field=value pairs of the case."""
    return ",".join(f"{k}={v}".replace(" ", "") for k, v in case._asdict().items())


# ----------------------------------------------------------------------------------------------
# Helpers.

def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def central_differences(loss, array, indices=None, eps=1e-6):
    """d loss() / d array[idx] by central differences, perturbing `array` in place one entry at a time.

    indices: the entries to differentiate (default: all of them). Returns an array shaped like `array`
    when indices is None, else a 1-D array in the order of `indices`."""
    chosen = list(np.ndindex(array.shape)) if indices is None else list(indices)
    out = np.zeros(len(chosen))
    for j, idx in enumerate(chosen):
        keep = array[idx]
        array[idx] = keep + eps
        up = loss()
        array[idx] = keep - eps
        down = loss()
        array[idx] = keep
        out[j] = (up - down) / (2 * eps)
    return out.reshape(array.shape) if indices is None else out


def make_conv_inputs(rng, case, dtype=np.float32):
    x = randn(rng, (case.N, case.C, case.H, case.W), dtype)
    weight = randn(rng, (case.F, case.C // case.groups, case.KH, case.KW), dtype)
    bias = randn(rng, (case.F,), dtype) if case.bias else None
    return x, weight, bias


def run(backend, fn, *args, **kwargs):
    """Call chexcy.ops.<fn> on `backend`."""
    with ops.use_backend(backend):
        return getattr(ops, fn)(*args, **kwargs)
