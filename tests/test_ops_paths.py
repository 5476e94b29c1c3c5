"""The conv planner and every kernel path it names, the general max pool and ReLU.

chexcy/_ops.pyx chooses among kernel paths in one table (conv_plan). Each case below names the path
it must take (so a change of threshold shows up here) and is compared with the reference on every
instruction-set variant built here, at 1, 2 and 3 threads (bitwise identical results). Cases sit just
below and just above each threshold of the table: GEMM_MIN_K (16) product depth and GEMM_MIN_F (8)
output channels for the matrix-product paths, WINO_MIN_C / WINO_MIN_F (16 / 24) for Winograd, one input
channel for FIRST_LAYER, DWC_MIN_CG (64) for CHANNEL_BLOCKED; with odd sizes, strides 2 and 3, padding,
dilation, groups, batch 1, several K blocks (K > 256) and channels left over after full register tiles.
"""
import numpy as np
import pytest

from chexcy import ops, reference

from ops_cases import COMPILED, assert_close, check_conv_on_every_variant, runnable_variants


needs_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled module is not built (fallback-only run)")

# x shape, (F, KH, KW), stride, padding, dilation, groups -> (forward, dx, dweight)
PATH_CASES = [
    # POINTWISE_GEMM: 1x1, no padding, K = Cg >= 16 and Fg >= 8 (backward: both ways round)
    (((2, 16, 9, 11), (16, 1, 1), 1, 0, 1, 1), ("POINTWISE_GEMM", "POINTWISE_GEMM", "POINTWISE_GEMM")),
    (((1, 15, 9, 11), (16, 1, 1), 1, 0, 1, 1), ("DIRECT", "DIRECT", "LANE_SUM")),
    (((2, 16, 7, 5), (8, 1, 1), 1, 0, 1, 1), ("POINTWISE_GEMM", "DIRECT", "LANE_SUM")),
    (((2, 16, 7, 5), (7, 1, 1), 1, 0, 1, 1), ("DIRECT", "DIRECT", "LANE_SUM")),
    (((2, 20, 9, 11), (26, 1, 1), 2, 0, 1, 1), ("POINTWISE_GEMM", "POINTWISE_GEMM", "POINTWISE_GEMM")),
    (((1, 300, 6, 7), (30, 1, 1), 1, 0, 1, 1), ("POINTWISE_GEMM", "POINTWISE_GEMM", "POINTWISE_GEMM")),
    (((2, 32, 8, 9), (34, 1, 1), 1, 0, 1, 2), ("POINTWISE_GEMM", "POINTWISE_GEMM", "POINTWISE_GEMM")),
    (((2, 4, 9, 9), (6, 1, 1), 2, 0, 1, 1), ("SUBSAMPLED>DIRECT", "SUBSAMPLED>DIRECT", "SUBSAMPLED>LANE_SUM")),
    (((1, 24, 40, 37), (16, 1, 1), (2, 1), 0, 1, 1), ("POINTWISE_GEMM", "POINTWISE_GEMM", "POINTWISE_GEMM")),
    # IM2COL_GEMM: strided, K = Cg KH KW >= 16, Fg >= 8 (stems, 3x3 stride 2)
    (((2, 1, 23, 21), (10, 7, 7), 2, 3, 1, 1), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    (((1, 3, 33, 35), (8, 7, 7), 2, 3, 1, 1), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    (((2, 1, 23, 21), (7, 7, 7), 2, 3, 1, 1),
     ("STRIDE1_SUBSAMPLED>DIRECT", "SPREAD>DIRECT", "SPREAD>LANE_SUM")),
    (((2, 2, 13, 11), (9, 3, 3), 2, 1, 1, 1), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    (((2, 1, 13, 11), (9, 3, 3), 2, 1, 1, 1),
     ("STRIDE1_SUBSAMPLED>DIRECT", "SPREAD>FIRST_LAYER", "SPREAD>FIRST_LAYER")),
    (((1, 40, 15, 15), (26, 3, 3), 2, 1, 1, 1), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    (((2, 8, 11, 10), (8, 3, 3), 1, 2, 2, 1), ("DIRECT", "DIRECT", "LANE_SUM")),       # dilated, stride 1
    # UNDILATED: a dilated 3x3 forward at stride 1 on Winograd through its phase planes, from 96 channels
    # in and out and phase outputs of 7 or more on a side
    (((2, 96, 18, 17), (96, 3, 3), 1, 2, 2, 1), ("UNDILATED>WINOGRAD", "DIRECT", "CHANNEL_BLOCKED")),
    (((1, 95, 18, 17), (96, 3, 3), 1, 2, 2, 1), ("DIRECT", "DIRECT", "CHANNEL_BLOCKED")),
    (((1, 96, 18, 17), (95, 3, 3), 1, 2, 2, 1), ("DIRECT", "DIRECT", "CHANNEL_BLOCKED")),
    (((1, 96, 14, 14), (96, 3, 3), 1, 2, 2, 1), ("UNDILATED>WINOGRAD", "DIRECT", "CHANNEL_BLOCKED")),
    (((1, 96, 12, 14), (96, 3, 3), 1, 2, 2, 1), ("DIRECT", "DIRECT", "CHANNEL_BLOCKED")),   # phases 6 high
    (((1, 96, 15, 16), (100, 3, 3), 1, (2, 1), (2, 1), 1),
     ("UNDILATED>WINOGRAD", "DIRECT", "CHANNEL_BLOCKED")),
    (((2, 96, 29, 31), (97, 3, 3), 1, 0, 3, 1), ("UNDILATED>WINOGRAD", "DIRECT", "CHANNEL_BLOCKED")),
    (((2, 8, 15, 13), (8, 3, 3), 2, 2, 2, 1), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    (((2, 8, 12, 9), (16, 3, 3), 2, 1, 1, 2), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    (((1, 4, 14, 16), (12, 3, 3), 3, 1, 1, 1), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    (((2, 6, 9, 14), (13, 3, 2), (2, 1), (1, 0), (1, 2), 1), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    (((1, 16, 5, 5), (12, 3, 3), 2, 0, 1, 1), ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")),
    # the paths that were there before the planner
    (((2, 16, 9, 10), (24, 3, 3), 1, 1, 1, 1), ("WINOGRAD", "DIRECT", "LANE_SUM")),
    (((2, 15, 9, 10), (24, 3, 3), 1, 1, 1, 1), ("DIRECT", "DIRECT", "LANE_SUM")),
    (((1, 32, 9, 10), (24, 3, 3), 1, 1, 1, 1), ("WINOGRAD", "WINOGRAD", "WINOGRAD")),
    (((2, 1, 12, 13), (16, 3, 3), 1, 1, 1, 1), ("DIRECT", "FIRST_LAYER", "FIRST_LAYER")),
    (((1, 64, 8, 9), (8, 3, 3), 1, 1, 1, 1), ("DIRECT", "DIRECT", "CHANNEL_BLOCKED")),
    (((1, 63, 8, 9), (8, 3, 3), 1, 1, 1, 1), ("DIRECT", "DIRECT", "LANE_SUM")),
    # DEPTHWISE: groups = C = F, strides up to 4, kernels up to 7x7, any padding (even wider than the
    # kernel) and dilation (more cases: test_ops_depthwise.py)
    (((2, 4, 9, 7), (4, 3, 3), 2, 1, 1, 4), ("DEPTHWISE", "DEPTHWISE", "DEPTHWISE")),
    (((1, 5, 16, 35), (5, 3, 3), 1, 1, 1, 5), ("DEPTHWISE", "DEPTHWISE", "DEPTHWISE")),
    (((2, 3, 13, 11), (3, 5, 5), 2, 2, 1, 3), ("DEPTHWISE", "DEPTHWISE", "DEPTHWISE")),
    (((1, 3, 12, 14), (3, 3, 3), (1, 3), 3, 2, 3), ("DEPTHWISE", "DEPTHWISE", "DEPTHWISE")),
    (((1, 1, 6, 9), (1, 2, 3), (1, 2), (2, 0), 1, 1), ("DEPTHWISE", "DEPTHWISE", "DEPTHWISE")),
    (((1, 2, 15, 9), (2, 3, 3), (3, 1), 4, (2, 1), 2), ("DEPTHWISE", "DEPTHWISE", "DEPTHWISE")),
    (((2, 4, 9, 7), (8, 3, 3), 2, 1, 1, 4),          # two output channels per group: not depthwise
     ("STRIDE1_SUBSAMPLED>DIRECT", "SPREAD>DIRECT", "SPREAD>LANE_SUM")),
    (((1, 1, 13, 13), (3, 3, 3), 3, 1, 1, 1), ("PLAIN", "SPREAD>FIRST_LAYER", "SPREAD>FIRST_LAYER")),
    (((1, 2, 6, 7), (3, 2, 2), 1, 2, 1, 1), ("DIRECT", "PLAIN", "LANE_SUM")),
    (((1, 2, 9, 9), (3, 3, 3), (2, 3), 3, 1, 1), ("PLAIN", "PLAIN", "PLAIN")),
]


def _case_id(item):
    (xs, (F, KH, KW), s, p, d, g), _ = item
    return f"x{'x'.join(map(str, xs))}-w{F}x{KH}x{KW}-s{s}-p{p}-d{d}-g{g}"


@needs_compiled
@pytest.mark.parametrize("item", PATH_CASES, ids=_case_id)
def test_conv2d_plan_names_the_path_each_case_takes(item):
    (xs, (F, KH, KW), s, p, d, g), want = item
    with ops.use_backend("cython"):
        plan = ops.conv2d_plan(xs, (F, xs[1] // g, KH, KW), stride=s, padding=p, dilation=d, groups=g)
    assert plan == ops.ConvPlan(*want), f"{_case_id(item)}: planned {plan}, expected {want}"


@needs_compiled
@pytest.mark.parametrize("item", PATH_CASES, ids=_case_id)
def test_every_path_matches_the_reference_on_every_variant_and_thread_count(item, rng):
    (xs, (F, KH, KW), s, p, d, g), _ = item
    args = _norm(dict(stride=s, padding=p, dilation=d, groups=g))
    check_conv_on_every_variant(rng, xs, (F, xs[1] // g, KH, KW), **args, case=_case_id(item))


@needs_compiled
@pytest.mark.parametrize("item", PATH_CASES, ids=_case_id)
def test_every_path_adds_a_residual_and_applies_relu_like_the_separate_ops(item, rng):
    """conv2d_forward(..., residual=r, relu=True) on every path, variant and thread count: bit for bit
    relu_forward(conv2d_forward(...), residual=r) of the same variant (in the tiles' stores on
    POINTWISE_GEMM, the ReLU in Winograd's output transform, a pass after the conv elsewhere), NaN in the
    residual kept, -0 and 0 as the op gives them; and with weight_scale (applied while the weight is
    packed), bit for bit the conv of the scaled weight."""
    (xs, (F, KH, KW), s, p, d, g), _ = item
    args = _norm(dict(stride=s, padding=p, dilation=d, groups=g))
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal((F, xs[1] // g, KH, KW)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    want_plain = reference.conv2d_forward(x, w, b, *args.values())
    r = rng.standard_normal(want_plain.shape).astype(np.float32)
    r.reshape(-1)[::7] = np.nan
    scale = rng.uniform(0.25, 4, F).astype(np.float32)
    for name, mod in runnable_variants():
        try:
            for threads in (1, 2, 3):
                mod.set_num_threads(threads)
                plain = mod.conv2d_forward(x, w, b, *args.values())
                for residual, relu in ((None, True), (r, False), (r, True)):
                    got = mod.conv2d_forward(x, w, b, *args.values(), residual, relu)
                    want = plain + residual if residual is not None else plain.copy()
                    if relu:
                        want = mod.relu_forward(want, True)
                    np.testing.assert_array_equal(
                        got, want, err_msg=f"variant {name}, {threads} threads, residual {residual is not None}, "
                                           f"relu {relu}, {_case_id(item)}")
                scaled = mod.conv2d_forward(x, w * scale[:, None, None, None], b, *args.values(), r, True)
                np.testing.assert_array_equal(
                    mod.conv2d_forward(x, w, b, *args.values(), r, True, scale), scaled,
                    err_msg=f"variant {name}, {threads} threads, weight_scale, {_case_id(item)}")
        finally:
            mod.set_num_threads(0)


def test_conv2d_residual_and_relu_match_the_reference_and_check_their_arguments(backend, rng):
    x = rng.standard_normal((2, 20, 7, 9)).astype(np.float32)
    w = rng.standard_normal((26, 20, 1, 1)).astype(np.float32)
    r = rng.standard_normal((2, 26, 4, 5)).astype(np.float32)
    for relu in (False, True):
        got = ops.conv2d_forward(x, w, None, stride=2, residual=r, relu=relu)
        want = reference.conv2d_forward(x, w, None, (2, 2), (0, 0), (1, 1), 1) + r
        assert_close(got, np.maximum(want, 0) if relu else want, "conv2d", err_msg=f"{backend} relu={relu}")
    assert np.all(ops.conv2d(x, w, stride=2, relu=True) >= 0)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 26, 4, 5\)"):
        ops.conv2d_forward(x, w, stride=2, residual=r[:, :, :3])
    with pytest.raises(ValueError, match="relu must be True or False"):
        ops.conv2d_forward(x, w, relu="yes")
    scale = rng.uniform(0.5, 2, 26).astype(np.float32)
    assert_close(ops.conv2d(x, w, stride=2, weight_scale=scale),
                 reference.conv2d_forward(x, w * scale[:, None, None, None], None, (2, 2), (0, 0), (1, 1), 1),
                 "conv2d", err_msg=f"{backend} weight_scale")
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(26,\)"):
        ops.conv2d_forward(x, w, weight_scale=scale[:5])


def _norm(args):
    """The (h, w) tuples the backend modules take (chexcy.ops normalises them for users)."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return dict(stride=pair(args["stride"]), padding=pair(args["padding"]), dilation=pair(args["dilation"]),
                groups=args["groups"])


def test_conv2d_plan_of_the_numpy_backends_and_bad_shapes():
    with ops.use_backend("reference"):
        assert ops.conv2d_plan((1, 3, 8, 8), (4, 3, 3, 3)) == ("REFERENCE",) * 3
    with ops.use_backend("python"):
        assert ops.conv2d_plan((1, 3, 8, 8), (4, 3, 3, 3), padding="same").forward == "IM2COL_BLAS"
    with pytest.raises(ValueError, match="x has C=3 but weight expects C=4"):
        ops.conv2d_plan((1, 3, 8, 8), (4, 4, 3, 3))
    with pytest.raises(TypeError, match="x_shape must be a sequence of 4 ints"):
        ops.conv2d_plan(None, (4, 3, 3, 3))
    with pytest.raises(ValueError, match="kernel"):
        ops.conv2d_plan((1, 3, 2, 2), (4, 3, 3, 3))


# -- max pool: every kernel, stride, padding and dilation ------------------------------------------

POOL_CASES = [
    ((2, 3, 112 // 8, 112 // 8), 3, 2, 1, 1),        # ResNet's stem pool, small
    ((1, 2, 15, 17), 3, 2, 1, 1),                    # odd sizes
    ((2, 2, 9, 10), 2, 2, 0, 1),                     # the 2x2 row kernel (not this file's)
    ((1, 2, 9, 10), 2, 1, 0, 1),                     # overlapping, stride 1
    ((1, 2, 11, 13), 3, 3, 1, 1),                    # stride 3
    ((1, 2, 12, 12), (3, 2), (2, 1), (1, 1), 1),     # non-square everything
    ((1, 2, 13, 14), 3, 2, 1, 2),                    # dilation 2
    ((1, 1, 40, 70), 5, 2, 2, 1),                    # wide rows: several vectors per row
    ((1, 1, 1, 1), 1, 1, 0, 1),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"x{c[0]}-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}")
def test_max_pool_any_window_matches_reference_with_nan_ties_and_inf(case, rng, backend):
    xs, k, s, p, d = case
    x = rng.standard_normal(xs).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7] = 1.0                 # ties: the first in (kh, kw) order wins
    flat[::13] = -np.inf
    flat[5::29] = np.nan            # a NaN wins over numbers (the first NaN)
    x[0, 0, :2, :] = -np.inf        # whole windows of -inf (and padding, never chosen)
    want = reference.max_pool2d_forward(x, _p(k), _p(s), _p(p), _p(d))
    got = ops.max_pool2d_forward(x, k, s, p, d)
    for label, g, w in zip(("out", "argmax"), got, want):
        assert_close(g, w, "max_pool2d", err_msg=f"{backend} {label} {case}")
    np.testing.assert_array_equal(ops.max_pool2d(x, k, s, p, d), got[0],
                                  err_msg=f"{backend} {case}: the values-only pool differs")
    dout = rng.standard_normal(want[0].shape).astype(np.float32)
    assert_close(ops.max_pool2d_backward(dout, got[1], xs), reference.max_pool2d_backward(dout, want[1], xs),
                 "max_pool2d_backward", err_msg=f"{backend} {case}")


def _p(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@needs_compiled
def test_max_pool_rows_kernel_on_every_variant_and_thread_count(rng):
    x = rng.standard_normal((3, 5, 29, 31)).astype(np.float32)
    x.reshape(-1)[3::17] = np.nan
    want = reference.max_pool2d_forward(x, (3, 3), (2, 2), (1, 1), (1, 1))
    for name, mod in runnable_variants():
        try:
            for threads in (1, 2, 3):
                mod.set_num_threads(threads)
                out, arg = mod.max_pool2d_forward(x, (3, 3), (2, 2), (1, 1), (1, 1))
                np.testing.assert_array_equal(out, want[0], err_msg=f"variant {name}, {threads} threads")
                np.testing.assert_array_equal(arg, want[1], err_msg=f"variant {name}, {threads} threads")
                np.testing.assert_array_equal(mod.max_pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1)), want[0],
                                              err_msg=f"variant {name}, {threads} threads, values only")
        finally:
            mod.set_num_threads(0)


# -- ReLU -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (70001,), (3, 0, 4), (1 << 15) + 3])
def test_relu_forward_and_backward_match_reference(shape, rng, backend):
    x = rng.standard_normal(shape).astype(np.float32)
    if x.size:
        x.reshape(-1)[::11] = 0.0
        x.reshape(-1)[1::13] = np.nan
        x.reshape(-1)[2::17] = -np.inf
    dout = rng.standard_normal(x.shape).astype(np.float32)
    want = reference.relu_forward(x, False)
    got = ops.relu_forward(x)
    np.testing.assert_array_equal(got, want, err_msg=backend)
    assert got is not x
    np.testing.assert_array_equal(ops.relu_backward(dout, got), reference.relu_backward(dout, want),
                                  err_msg=backend)
    np.testing.assert_array_equal(ops.relu_backward(dout, x), reference.relu_backward(dout, want),
                                  err_msg=f"{backend}: the input gives the same mask as the output")
    y = x.copy()
    assert ops.relu_forward(y, inplace=True) is y
    np.testing.assert_array_equal(y, want, err_msg=f"{backend} in place")


def test_relu_in_place_refuses_what_it_cannot_write(backend):
    with pytest.raises(ValueError, match="C-contiguous float32"):
        ops.relu_forward(np.ones((3, 4)), inplace=True)           # float64: a copy would be written
    with pytest.raises(ValueError, match="C-contiguous float32"):
        ops.relu_forward(np.ones((3, 4), np.float32).T, inplace=True)
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ops.relu_forward(ro, inplace=True)
    with pytest.raises(ValueError, match="same shape"):
        ops.relu_backward(np.ones(3, np.float32), np.ones(4, np.float32))
    np.testing.assert_array_equal(ops.relu_forward([-1.0, 2.0]), [0.0, 2.0])   # converted once


@needs_compiled
def test_relu_on_every_variant(rng):
    x = rng.standard_normal((3, (1 << 15) + 5)).astype(np.float32)
    x[0, ::5] = np.nan
    dout = rng.standard_normal(x.shape).astype(np.float32)
    for name, mod in runnable_variants():
        y = mod.relu_forward(x, False)
        np.testing.assert_array_equal(y, reference.relu_forward(x, False), err_msg=name)
        np.testing.assert_array_equal(mod.relu_backward(dout, y), reference.relu_backward(dout, y), err_msg=name)


# -- average pool: the 2x2 / stride 2 rows and the general loop -----------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 2, 9, 11), (2, 1, 1, 3), (1, 4, 56, 56)])
@pytest.mark.parametrize("k, s, p", [(2, 2, 0), (2, 2, 1), (3, 2, 1), (2, 1, 0)])
def test_avg_pool_matches_reference(shape, k, s, p, rng, backend):
    x = rng.standard_normal(shape).astype(np.float32)
    if shape[2] + 2 * p < k or shape[3] + 2 * p < k:       # a window larger than the padded input
        with pytest.raises(ValueError, match="avg_pool2d"):
            ops.avg_pool2d_forward(x, k, s, p)
        return
    for inc in (True, False):
        want = reference.avg_pool2d_forward(x, (k, k), (s, s), (p, p), inc)
        assert_close(ops.avg_pool2d_forward(x, k, s, p, inc), want, "avg_pool2d", err_msg=f"{backend} {shape}")
        dout = rng.standard_normal(want.shape).astype(np.float32)
        assert_close(ops.avg_pool2d_backward(dout, shape, k, s, p, inc),
                     reference.avg_pool2d_backward(dout, shape, (k, k), (s, s), (p, p), inc),
                     "avg_pool2d_backward", err_msg=f"{backend} {shape}")


@needs_compiled
def test_avg_pool_2x2_rows_on_every_variant_and_thread_count(rng):
    x = rng.standard_normal((3, 5, 29, 31)).astype(np.float32)
    want = reference.avg_pool2d_forward(x, (2, 2), (2, 2), (0, 0), True)
    dout = rng.standard_normal(want.shape).astype(np.float32)
    want_dx = reference.avg_pool2d_backward(dout, x.shape, (2, 2), (2, 2), (0, 0), True)
    for name, mod in runnable_variants():
        try:
            got = {}
            for threads in (1, 2, 3):
                mod.set_num_threads(threads)
                got[threads] = (mod.avg_pool2d_forward(x, (2, 2), (2, 2), (0, 0), True),
                                mod.avg_pool2d_backward(dout, x.shape, (2, 2), (2, 2), (0, 0), True))
        finally:
            mod.set_num_threads(0)
        assert_close(got[1][0], want, "avg_pool2d", err_msg=name)
        assert_close(got[1][1], want_dx, "avg_pool2d_backward", err_msg=name)
        for threads in (2, 3):
            for a, b in zip(got[threads], got[1]):
                np.testing.assert_array_equal(a, b, err_msg=f"variant {name}, {threads} threads")
