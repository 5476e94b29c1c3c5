"""Every backend against the reference, for every op, forward and backward.

The grids in ops_cases.py cover batch 1, odd and non-square sizes, KH != KW, strides 1-3, padding
0-2 / "same" / "valid", dilation 1-3, groups 1 / 2 / 3 / depthwise, kernels 1x1 to 7x7, with and
without bias; hypothesis adds random geometries. The reference's result for a case is computed once
and reused for every backend (it is the slow part).
"""
import functools
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

from chexcy import ops
from ops_cases import (AVG_POOL_CASES, BACKENDS, CONV_CASES, GLOBAL_POOL_SHAPES, LINEAR_CASES,
                       MAX_POOL_CASES, TILE_CONV_CASES, WIDE_CONV_CASES, WINOGRAD_CONV_CASES, ConvCase,
                       PoolCase, assert_close, avg_pool_args, case_id, conv_args,
                       make_conv_inputs, max_pool_args, randn, run)

SEED = 7


def case_rng(*key):
    """A generator seeded by the case, so the reference result can be cached across backends."""
    # crc32, not hash(): str hashes change from process to process.
    return np.random.default_rng([SEED, *[zlib.crc32(repr(k).encode()) for k in key]])


# ----------------------------------------------------------------------------------------------
# conv2d

def _conv_data(case):
    rng = case_rng("conv", case)
    x, weight, bias = make_conv_inputs(rng, case)
    out_shape = run("reference", "conv2d_forward", x, weight, bias, **conv_args(case)).shape
    dout = randn(rng, out_shape)
    return x, weight, bias, dout


@functools.cache
def _conv_expected(case):
    x, weight, bias, dout = _conv_data(case)
    out = run("reference", "conv2d_forward", x, weight, bias, **conv_args(case))
    grads = run("reference", "conv2d_backward", dout, x, weight, **conv_args(case))
    return out, grads


def check_conv(backend, case):
    x, weight, bias, dout = _conv_data(case)
    want_out, want_grads = _conv_expected(case)
    out = run(backend, "conv2d_forward", x, weight, bias, **conv_args(case))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert_close(out, want_out, "conv2d", f"{backend} out {case_id(case)}")
    grads = run(backend, "conv2d_backward", dout, x, weight, **conv_args(case))
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, want_grads):
        assert got.dtype == np.float32, f"{backend} {name} dtype {got.dtype}"
        assert_close(got, want, "conv2d_backward", f"{backend} {name} {case_id(case)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES + TILE_CONV_CASES + WIDE_CONV_CASES
                         + WINOGRAD_CONV_CASES, ids=case_id)
def test_conv2d_matches_reference(backend, case):
    check_conv(backend, case)


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    Cg, Fg = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    KH, KW = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dil = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    same = draw(st.booleans()) and draw(st.booleans())  # about one case in four
    stride = (1, 1) if same else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = "same" if same else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    sizes = []
    for k, d, p in ((KH, dil[0], pad), (KW, dil[1], pad)):
        reach = d * (k - 1) + 1
        p_axis = 0 if same else p[len(sizes)]
        low = max(1, reach - 2 * p_axis) if not same else 1
        sizes.append(draw(st.integers(low, max(low, 11))))
    return ConvCase(draw(st.integers(1, 2)), Cg * groups, sizes[0], sizes[1], Fg * groups, KH, KW,
                    stride, pad, dil, groups, draw(st.booleans()))


HYPOTHESIS = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("backend", BACKENDS)
@HYPOTHESIS
@given(case=conv_cases())
def test_conv2d_random_geometry_matches_reference(backend, case):
    check_conv(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C, F", [(32, 24), (3, 4)], ids=["winograd", "direct"])
def test_conv2d_nan_stays_within_the_output_tiles_around_it(backend, C, F, rng):
    """A NaN in the input makes every output NaN that the reference makes NaN, and spreads no further
    than the rest of their 2x2 output tiles (the Winograd layers mix a tile's four outputs); every
    other output matches the reference."""
    x, w = randn(rng, (2, C, 9, 10)), randn(rng, (F, C, 3, 3))
    x[1, C // 2, 4, 5] = np.nan
    want = run("reference", "conv2d_forward", x, w, None, stride=1, padding=1)
    got = run(backend, "conv2d_forward", x, w, None, stride=1, padding=1)
    ref_nan = np.isnan(want)
    assert ref_nan.any() and not ref_nan.all()
    assert np.isnan(got)[ref_nan].all(), f"{backend}: an output the reference makes NaN is a number"
    tiles = np.pad(ref_nan, ((0, 0), (0, 0), (0, 1), (0, 0))).reshape(2, F, 5, 2, 5, 2).any(axis=(3, 5))
    near = np.repeat(np.repeat(tiles, 2, axis=2), 2, axis=3)[:, :, :9, :10]
    assert not np.isnan(got)[~near].any(), f"{backend}: NaN outside the 2x2 tiles of the reference's"
    assert_close(got[~near], want[~near], "conv2d", f"{backend} outputs away from the NaN")


# ----------------------------------------------------------------------------------------------
# pooling

def _pool_input(kind, case):
    rng = case_rng(kind, case)
    return rng, randn(rng, (case.N, case.C, case.H, case.W))


@functools.cache
def _max_pool_expected(case):
    rng, x = _pool_input("max", case)
    out, argmax = run("reference", "max_pool2d_forward", x, **max_pool_args(case))
    dout = randn(rng, out.shape)
    return x, out, argmax, dout, run("reference", "max_pool2d_backward", dout, argmax, x.shape)


def check_max_pool(backend, case):
    x, want_out, want_argmax, dout, want_dx = _max_pool_expected(case)
    out, argmax = run(backend, "max_pool2d_forward", x, **max_pool_args(case))
    assert argmax.dtype == np.int64 and out.dtype == np.float32
    assert_close(out, want_out, "max_pool2d", f"{backend} out {case_id(case)}")
    assert_array_equal(argmax, want_argmax, err_msg=f"{backend} argmax {case_id(case)}")
    dx = run(backend, "max_pool2d_backward", dout, argmax, x.shape)
    assert_close(dx, want_dx, "max_pool2d_backward", f"{backend} dx {case_id(case)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MAX_POOL_CASES, ids=case_id)
def test_max_pool2d_matches_reference(backend, case):
    check_max_pool(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool2d_ties_and_minus_inf_match_reference(backend, rng):
    """Ties go to the first tap in scan order; an all -inf window still points at a real input."""
    x = rng.integers(0, 3, (2, 3, 7, 8)).astype(np.float32)   # many ties
    x[0, 0] = -np.inf                                         # a plane with nothing but -inf
    x[1, 2, :3, :3] = -np.inf
    for kwargs in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2),
                   dict(kernel_size=3, stride=1, padding=1, dilation=2)):
        want_out, want_argmax = run("reference", "max_pool2d_forward", x, **kwargs)
        out, argmax = run(backend, "max_pool2d_forward", x, **kwargs)
        assert_array_equal(out, want_out, err_msg=f"{backend} out {kwargs}")
        assert_array_equal(argmax, want_argmax, err_msg=f"{backend} argmax {kwargs}")
        dout = np.ones(out.shape, np.float32)
        assert_array_equal(run(backend, "max_pool2d_backward", dout, argmax, x.shape),
                           run("reference", "max_pool2d_backward", dout, want_argmax, x.shape))


@functools.cache
def _avg_pool_expected(case, count_include_pad):
    rng, x = _pool_input("avg", case)
    args = avg_pool_args(case, count_include_pad)
    out = run("reference", "avg_pool2d_forward", x, **args)
    dout = randn(rng, out.shape)
    return x, out, dout, run("reference", "avg_pool2d_backward", dout, x.shape, **args)


def check_avg_pool(backend, case, count_include_pad):
    x, want_out, dout, want_dx = _avg_pool_expected(case, count_include_pad)
    args = avg_pool_args(case, count_include_pad)
    out = run(backend, "avg_pool2d_forward", x, **args)
    assert_close(out, want_out, "avg_pool2d", f"{backend} out {case_id(case)} cip={count_include_pad}")
    dx = run(backend, "avg_pool2d_backward", dout, x.shape, **args)
    assert_close(dx, want_dx, "avg_pool2d_backward", f"{backend} dx {case_id(case)} "
                                                      f"cip={count_include_pad}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", AVG_POOL_CASES, ids=case_id)
def test_avg_pool2d_matches_reference(backend, case, count_include_pad):
    check_avg_pool(backend, case, count_include_pad)


@st.composite
def pool_cases(draw, dilated):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if dilated else (1, 1)
    sizes = [draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), 11))
             for k, p, d in zip(kernel, padding, dilation)]
    return PoolCase(draw(st.integers(1, 2)), draw(st.integers(1, 3)), sizes[0], sizes[1], kernel,
                    stride, padding, dilation)


@pytest.mark.parametrize("backend", BACKENDS)
@HYPOTHESIS
@given(case=pool_cases(dilated=True))
def test_max_pool2d_random_geometry_matches_reference(backend, case):
    try:
        ops.max_pool2d_forward(np.zeros((1, 1, case.H, case.W), np.float32), **max_pool_args(case))
    except ValueError as exc:
        # Dilated windows lying entirely in the padding are rejected (no maximum exists there).
        assert "entirely in the padding" in str(exc)
        return
    check_max_pool(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@HYPOTHESIS
@given(case=pool_cases(dilated=False), count_include_pad=st.booleans())
def test_avg_pool2d_random_geometry_matches_reference(backend, case, count_include_pad):
    check_avg_pool(backend, case, count_include_pad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GLOBAL_POOL_SHAPES, ids=str)
def test_global_avg_pool2d_matches_reference(backend, shape, rng):
    x = randn(rng, shape)
    out = run(backend, "global_avg_pool2d_forward", x)
    assert_close(out, run("reference", "global_avg_pool2d_forward", x), "global_avg_pool2d",
                 f"{backend} {shape}")
    dout = randn(rng, shape[:2])
    assert_close(run(backend, "global_avg_pool2d_backward", dout, shape),
                 run("reference", "global_avg_pool2d_backward", dout, shape),
                 "global_avg_pool2d_backward", f"{backend} {shape}")


# ----------------------------------------------------------------------------------------------
# linear

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_linear_matches_reference(backend, case, rng):
    x = randn(rng, (case.N, case.in_features))
    weight = randn(rng, (case.out_features, case.in_features))
    bias = randn(rng, (case.out_features,)) if case.bias else None
    assert_close(run(backend, "linear_forward", x, weight, bias),
                 run("reference", "linear_forward", x, weight, bias), "linear", f"{backend} {case_id(case)}")
    dout = randn(rng, (case.N, case.out_features))
    got = run(backend, "linear_backward", dout, x, weight)
    want = run("reference", "linear_backward", dout, x, weight)
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want):
        assert_close(g, w, "linear_backward", f"{backend} {name} {case_id(case)}")


# ----------------------------------------------------------------------------------------------
# The forward-only conveniences are the forward functions.

def test_conveniences_equal_the_forward_functions(backend, rng):
    x = randn(rng, (2, 4, 9, 8))
    weight, bias = randn(rng, (6, 2, 3, 3)), randn(rng, (6,))
    assert_array_equal(ops.conv2d(x, weight, bias, 2, 1, 1, 2),
                       ops.conv2d_forward(x, weight, bias, 2, 1, 1, 2))
    assert_array_equal(ops.max_pool2d(x, 3, 2, 1), ops.max_pool2d_forward(x, 3, 2, 1)[0])
    assert_array_equal(ops.avg_pool2d(x, 3, 2, 1, False), ops.avg_pool2d_forward(x, 3, 2, 1, False))
    flat = x.reshape(2, -1)
    w_lin = randn(rng, (5, flat.shape[1]))
    assert_array_equal(ops.linear(flat, w_lin), ops.linear_forward(flat, w_lin))


def test_reference_through_ops_agrees_with_itself_sanity(rng):
    """Cheap loop over the reference backend through chexcy.ops (argument plumbing, conversions)."""
    case = CONV_CASES[2]
    x, weight, bias, dout = _conv_data(case)
    out, grads = _conv_expected(case)
    assert_array_equal(run("reference", "conv2d_forward", x, weight, bias, **conv_args(case)), out)
    for g, w in zip(run("reference", "conv2d_backward", dout, x, weight, **conv_args(case)), grads):
        assert_array_equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool2d_propagates_nan_like_pytorch(backend, rng):
    """Values are not scanned for NaN, but a NaN in a window is its maximum (as in PyTorch) and argmax
    points at a NaN, so max_pool2d_backward sends the gradient there."""
    x = randn(rng, (1, 2, 6, 6))
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 4, 5] = np.nan
    out, argmax = run(backend, "max_pool2d_forward", x, kernel_size=3, stride=2, padding=1)
    want_out, _ = run("reference", "max_pool2d_forward", x, kernel_size=3, stride=2, padding=1)
    assert_array_equal(np.isnan(out), np.isnan(want_out), err_msg=f"{backend}: NaN did not propagate")
    nan_windows = np.isnan(out)
    assert np.isnan(x.reshape(1, 2, 36)[0][np.arange(2)[:, None, None], argmax[0]][nan_windows[0]]).all(), \
        f"{backend}: argmax of a window holding NaN does not point at the NaN"


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool2d_2x2_fast_path_ties_and_nan_match_reference(backend, rng):
    """kernel 2 / stride 2 has its own vectorised kernel: rows wide enough for whole vector iterations
    (and a remainder), many ties, NaNs alone and several in one window, -inf windows: all bitwise."""
    x = rng.integers(0, 3, (2, 3, 10, 70)).astype(np.float32)
    x[0, 0][rng.random((10, 70)) < 0.08] = np.nan         # scattered NaNs: every tap position
    x[0, 1, 1, 1::2] = np.nan                             # NaN only at the last tap of whole rows of windows
    x[1, 1, 2:4, 10:12] = np.nan                          # a window of nothing but NaN
    x[1, 2, 4, 20:24] = np.nan                            # two NaNs in one window (first one wins)
    x[0, 2, :2, :6] = -np.inf
    want_out, want_argmax = run("reference", "max_pool2d_forward", x, kernel_size=2)
    out, argmax = run(backend, "max_pool2d_forward", x, kernel_size=2)
    assert_array_equal(out, want_out, err_msg=f"{backend} out")
    assert_array_equal(argmax, want_argmax, err_msg=f"{backend} argmax")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,kwargs", [
    ((2, 3, 10, 70), dict(kernel_size=2)),                      # the 2x2 one-pass path, even sizes
    ((2, 3, 11, 37), dict(kernel_size=2)),                      # a row and a column no window reaches
    ((2, 3, 12, 36), dict(kernel_size=3, stride=2, padding=1)),  # same output size, overlapping windows
    ((1, 2, 9, 9), dict(kernel_size=2, stride=1)),              # overlapping, gradients add up
], ids=["2x2-even", "2x2-odd", "3x3s2p1", "2x2s1"])
def test_max_pool2d_backward_bitwise_equals_reference(backend, rng, shape, kwargs):
    """max-pool backward is exact (no rounding: each gradient lands once, or sums in scan order):
    bitwise equal to the reference, -0.0 and NaN gradients included, whichever kernel path is taken."""
    x = rng.integers(0, 4, shape).astype(np.float32)            # ties
    out, argmax = run("reference", "max_pool2d_forward", x, **kwargs)
    dout = randn(rng, out.shape)
    dout.flat[::5] = -0.0
    dout.flat[3::11] = np.nan
    want = run("reference", "max_pool2d_backward", dout, argmax, x.shape)
    got = run(backend, "max_pool2d_backward", dout, argmax, x.shape)
    assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{backend} {kwargs} {shape}")
