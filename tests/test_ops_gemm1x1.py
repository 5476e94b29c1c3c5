"""The POINTWISE_GEMM path (chexcy/_ops_pointwise.h): 1x1 convolutions as products whose columns span
the whole batch, forward, dx and dweight; and the dot-product forward of dense layers of a few rows
(chexcy_gemm_dot_rows in chexcy/_ops_gemm.h).

Each case is checked to take the path, then compared with the reference on every instruction-set
variant built here, at 1 thread, and bit for bit at 2 and 3 threads (check_conv_on_every_variant). The
shapes aim at the kernel's edges: column strips (32 columns on AVX-512, 16 on AVX2, 8 on SSE2) that
cross one or several sample boundaries or run past the last column (P below, at and just above a strip,
P = 1, a batch of one), output channels not a multiple of the register tile's rows (12 / 6 / 4), input
channels not a multiple of a strip (dweight's columns), products deeper than one K block of 256 (forward
and dx: Cg or Fg > 256; dweight: N P > 256 columns, blocks that cross samples), groups, and strides 2
and 3 (the subsample gathered by the packing, runs broken at every output row) with odd sizes, weights
tall enough to be cut into row blocks, and products of few strips cut as a line (_pw_grid).
"""
import numpy as np
import pytest

from chexcy import ops, reference

from ops_cases import COMPILED, assert_close, check_conv_on_every_variant, runnable_variants

needs_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled module is not built (fallback-only run)")

# x shape, F, stride, groups
CASES = [
    ((1, 16, 1, 1), 8, 1, 1),          # one column in all
    ((5, 33, 1, 1), 47, 1, 1),         # P = 1: every strip spans 32 (or 8, 16) samples
    ((3, 17, 3, 5), 9, 1, 1),          # 45 columns, strips across samples, last strip short
    ((4, 32, 7, 7), 40, 1, 1),         # 7x7: 196 columns, a boundary in most strips
    ((2, 20, 4, 8), 13, 1, 1),         # P = 32: every strip exactly one sample (AVX-512)
    ((3, 19, 3, 11), 25, 1, 1),        # P = 33: one column over into every next strip
    ((1, 300, 6, 7), 30, 1, 1),        # batch 1, K = 300: two K blocks, forward and dweight rows
    ((2, 48, 5, 5), 270, 1, 1),        # Fg = 270: dx has two K blocks; 22.5 tiles of 12 rows
    ((3, 70, 11, 13), 29, 1, 1),       # N P = 429: dweight's second K block crosses a sample
    ((2, 64, 8, 9), 68, 1, 2),         # groups
    ((3, 48, 5, 6), 36, 1, 3),         # three groups of odd sizes
    ((2, 40, 9, 11), 26, 2, 1),        # stride 2, odd sizes: runs end at every output row
    ((1, 24, 40, 37), 16, (2, 1), 1),  # row stride only
    ((2, 24, 9, 13), 17, (1, 2), 1),   # column stride only
    ((2, 18, 10, 14), 20, 3, 1),       # stride 3
    ((3, 32, 13, 13), 24, 2, 2),       # stride 2 with groups
    ((2, 260, 5, 5), 110, 1, 1),       # a weight block (rows x 256) over 384 KiB: row blocks, 2 K blocks
    ((1, 64, 3, 4), 1600, 1, 1),       # K = 64: rows in blocks of 1536 at most, so two
    ((4, 40, 16, 16), 64, 1, 1),       # 1024 columns, whole strips: the prefetch of the next strip's rows
    # few strips: the product cut as a line of (group, strip, row tile), strips cut between threads
    ((8, 96, 7, 7), 128, 1, 1),        # DenseNet's 7x7: 13 strips of 11 tiles (AVX-512), a line at 2 threads
    ((3, 72, 7, 7), 72, 1, 2),         # groups: at 3 threads a line across the groups' strips
    ((2, 96, 9, 9), 36, 1, 1),         # dweight as a line (AVX-512: 3 strips of 3 tiles, 5 pairs and 4)
    ((3, 96, 13, 11), 36, 1, 1),       # the same over two K blocks, one across a sample
    ((2, 96, 9, 9), 72, 1, 2),         # dweight's line across groups at 3 threads
    # dweight summed in chunks of the columns (_pw_dweight_chunks: Fg <= 144, Fg Cg <= 16384, N P >= 2048)
    ((3, 20, 30, 31), 14, 1, 1),       # N P = 2790: two chunks (5 and 6 K blocks), a cut inside a sample
    ((8, 16, 40, 40), 20, 1, 1),       # N P = 12800: eight chunks, the most
    ((2, 40, 48, 48), 30, 1, 2),       # groups: four chunks of each group
    ((4, 16, 50, 45), 24, 2, 1),       # stride 2: chunks of the sampled grid (N P = 2300)
    ((1, 113, 46, 46), 144, 1, 1),     # Fg 144, Fg Cg = 16272: chunks, just inside both limits
    ((1, 20, 46, 46), 145, 1, 1),      # Fg 145: rectangles, just past the rows limit
    ((1, 114, 46, 46), 144, 1, 1),     # Fg Cg = 16416: rectangles, just past the size limit
]


def _args(case):
    x_shape, f, stride, groups = case
    stride = stride if isinstance(stride, tuple) else (stride, stride)
    return x_shape, (f, x_shape[1] // groups, 1, 1), stride, (0, 0), (1, 1), groups


@needs_compiled
@pytest.mark.parametrize("case", CASES, ids=[f"x{c[0]}-f{c[1]}-s{c[2]}-g{c[3]}" for c in CASES])
def test_pointwise_path_every_variant_and_thread_count(case):
    x_shape, w_shape, stride, padding, dilation, groups = _args(case)
    with ops.use_backend("cython"):
        plan = ops.conv2d_plan(x_shape, w_shape, stride, padding, dilation, groups)
    assert plan.forward == "POINTWISE_GEMM", plan
    check_conv_on_every_variant(np.random.default_rng(7), x_shape, w_shape, stride, padding, dilation,
                                groups, case=str(case))


@pytest.mark.parametrize("case", CASES[:6] + CASES[11:13], ids=lambda c: f"x{c[0]}-f{c[1]}-s{c[2]}")
def test_pointwise_active_backend_matches_reference(case):
    """The active backend (compiled or the fallback) on the same shapes, forward and backward."""
    x_shape, w_shape, stride, padding, dilation, groups = _args(case)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    args = (stride, padding, dilation, groups)
    out = ops.conv2d_forward(x, w, b, *args)
    assert_close(out, reference.conv2d_forward(x, w, b, *args), "conv2d")
    dout = rng.standard_normal(out.shape).astype(np.float32)
    for label, got, want in zip(("dx", "dweight", "dbias"), ops.conv2d_backward(dout, x, w, *args),
                                reference.conv2d_backward(dout, x, w, *args)):
        assert_close(got, want, "conv2d_backward", err_msg=label)


@needs_compiled
def test_pointwise_bias_reaches_every_row_and_column():
    """Zero input, so the output is the bias alone: every row (the padded tile rows past F must not leak)
    and every column, including those of strips that cross samples, hold exactly their channel's bias."""
    x = np.zeros((3, 16, 5, 7), np.float32)
    w = np.ones((13, 16, 1, 1), np.float32)
    b = np.arange(1, 14, dtype=np.float32)
    out = ops.conv2d_forward(x, w, b, (1, 1), (0, 0), (1, 1), 1)
    np.testing.assert_array_equal(out, np.broadcast_to(b[None, :, None, None], out.shape))


# Dense layers of at most 8 rows run as dot products straight from the weight (chexcy_gemm_dot_rows):
# 8 (AVX-512) or 4 rows of x by 3 or 2 rows of W at a time, sums in 16 / 8 / 4 lanes, 48 outputs per
# thread unit. Sizes: 1 row, a block and one past it (4, 5, 8), in_features below a vector, not a
# multiple of one (tail), 2048; out_features not a multiple of 2, 3 or 48; 9 rows take the GEMM again.
DOT_CASES = [(1, 1, 1), (1, 7, 5), (4, 17, 3), (5, 33, 49), (8, 2048, 100), (8, 515, 97), (3, 16, 145),
             (9, 40, 50)]


@needs_compiled
@pytest.mark.parametrize("n,k,o", DOT_CASES)
def test_linear_few_rows_every_variant_and_thread_count(n, k, o):
    x, w, b = _dense_inputs(11, (n, k), (o, k), (o,))
    for bias in (b, None):
        want = reference.linear_forward(x, w, bias)
        for name, results in _by_threads(lambda mod, bias=bias: (mod.linear_forward(x, w, bias),)):
            _check(name, results, (want,), ("out",), "linear", (n, k, o))


# The backward of a dense layer of at most 8 rows (GEMM_DOT_M) runs without packing: dx in blocks of 128
# in_features (chexcy_gemm_dx_rows), dweight in blocks of 64 out_features (chexcy_gemm_outer_rows), both
# compiled once per row count. Sizes: every row count from 1 to 8 (9 takes the GEMM), in_features 127 /
# 128 / 129, 257, 300 and 515 (blocks, register tiles of 1 to 8 vectors and a tail), out_features 1,
# 63 / 65 (a block and one past it) and 1000 (the ImageNet classifier).
DOT_BACKWARD_CASES = [(1, 1, 1), (8, 128, 63), (3, 129, 65), (5, 127, 1), (8, 515, 1000), (9, 130, 66),
                      (2, 300, 70), (4, 257, 33), (6, 144, 17), (7, 513, 129)]


@needs_compiled
@pytest.mark.parametrize("n,k,o", DOT_BACKWARD_CASES)
def test_linear_backward_few_rows_every_variant_and_thread_count(n, k, o):
    x, w, dout = _dense_inputs(12, (n, k), (o, k), (n, o))
    want = reference.linear_backward(dout, x, w)
    for name, results in _by_threads(lambda mod: mod.linear_backward(dout, x, w)):
        _check(name, results, want, ("dx", "dweight", "dbias"), "linear_backward", (n, k, o))


def _dense_inputs(seed, *shapes):
    """Standard-normal float32 arrays of the given shapes, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def _by_threads(call):
    """(variant name, {threads: call(module)}) for every runnable variant at 1, 2 and 3 threads."""
    for name, mod in runnable_variants():
        results = {}
        try:
            for threads in (1, 2, 3):
                mod.set_num_threads(threads)
                results[threads] = call(mod)
        finally:
            mod.set_num_threads(0)
        yield name, results


def _check(name, results, want, labels, op, shape):
    """The 1-thread results close to the reference's, the 2- and 3-thread ones equal to them bit for bit."""
    for label, got, exp in zip(labels, results[1], want):
        assert_close(got, exp, op, err_msg=f"variant {name} {label} {shape}")
    for threads in (2, 3):
        for label, got, exp in zip(labels, results[threads], results[1]):
            np.testing.assert_array_equal(got, exp, err_msg=f"variant {name} {label}: {threads} threads differ")


# The last block of rows of a product (a layer's output channels past the last full register tile of 12
# / 6 / 4 rows) runs on a third or two thirds of the tile where that holds it (chexcy_gemm_tile_part,
# chexcy_gemm_tile_rows_part): row counts R whose remainders cover each smaller tile on each variant
# (R mod 12 = 1, 3, 6, 8, 10; mod 6 = 1, 3, 0, 2, 4; mod 4 = 1, 3, 2, 0, 2), through every path that
# uses them: the dense layer's GEMM (rows of x, rows of dweight), WINOGRAD (F rows forward and dweight, C
# rows for dx), IM2COL_GEMM (F rows forward and dweight, Cg rows for dx), POINTWISE_GEMM (F rows of
# dweight) and the CHANNEL_BLOCKED dweight (F rows).
TILE_ROWS = [25, 27, 30, 32, 34]


@needs_compiled
@pytest.mark.parametrize("rows", TILE_ROWS)
def test_last_row_block_of_the_register_tile_every_variant_and_thread_count(rows):
    R = rows
    convs = [((1, R, 9, 10), (R, R, 3, 3), 1, 1, ("WINOGRAD", "WINOGRAD", None)),
             ((2, 64, 9, 10), (R, 64, 3, 3), 1, 1, ("WINOGRAD", "WINOGRAD", "WINOGRAD")),
             ((2, R, 21, 21), (R, R, 3, 3), 2, 1, ("IM2COL_GEMM",) * 3),
             ((2, R, 9, 9), (R, R, 1, 1), 1, 0, ("POINTWISE_GEMM",) * 3),
             ((1, 64, 8, 9), (R, 64, 5, 5), 1, 2, ("DIRECT", "DIRECT", "CHANNEL_BLOCKED"))]
    for xs, ws, s, p, paths in convs:
        with ops.use_backend("cython"):
            plan = ops.conv2d_plan(xs, ws, stride=s, padding=p)
        assert all(want in (None, got) for want, got in zip(paths, plan)), (xs, ws, plan)
        check_conv_on_every_variant(np.random.default_rng(R), xs, ws, (s, s), (p, p), (1, 1), 1,
                                    case=f"{plan} {R} rows")
    x, w, dout = _dense_inputs(R, (R, 40), (R + 7, 40), (R, R + 7))
    b = np.linspace(-1, 1, R + 7).astype(np.float32)
    want = (reference.linear_forward(x, w, b),) + tuple(reference.linear_backward(dout, x, w))
    for name, results in _by_threads(lambda mod: (mod.linear_forward(x, w, b),) + tuple(mod.linear_backward(dout, x, w))):
        _check(name, results, want, ("out", "dx", "dweight", "dbias"), "linear", (R, 40, R + 7))
