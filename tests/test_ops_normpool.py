"""Batch norm, pooling and ReLU kernels (chexcy/_ops_batchnorm.h, chexcy/_ops_pool.h, chexcy/_ops_relu.h)
against chexcy.reference, on the shapes their fast paths treat specially:

- batch norm: planes of 1 x 1 and 7 x 7 (a partial last vector, no full one at 1 x 1), batch 1, odd
  sizes; both ways the compiled forward splits work (channel blocks, or planes when there are few
  channels per thread), which must give the same bits, also for any thread count; the one-pass plane
  statistics with a large mean offset and with non-finite first values (the shift is 0 then);
- max pooling: every kernel / stride / padding / dilation in a small grid (stride 2 reads split rows),
  ties (the first maximum wins), thread-count invariance;
- the ReLU layer on the compiled op, in place and not.
Tolerances as tests/test_ops_batchnorm.py (batch norm) and exact equality (pooling: no arithmetic).
"""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from chexcy import nn, ops, reference
from ops_cases import COMPILED


@pytest.fixture
def restore_threads():
    yield
    ops.set_num_threads(None)


# ----------------------------------------------------------------------------------------------
# batch norm

BN_CASES = [
    (8, 16, 7, 7, 0.0),         # 7 x 7: two whole AVX-512 vectors (1 full + 1 partial at AVX-512 / AVX2) + 1
    (1, 5, 7, 7, 0.0),          # batch 1
    (3, 7, 1, 1, 0.0),          # 1 x 1 planes: the partial vector alone
    (2, 3, 5, 3, 0.0),          # odd plane below one AVX2 vector... and above an SSE one
    (2, 40, 4, 4, 0.0),         # 16 floats: exactly one AVX-512 vector
    (3, 9, 6, 8, 0.0),          # 48 floats: 2 + 1 AVX-512 vectors, no tail
    (2, 3, 9, 11, 1000.0),      # large mean offset: the shifted sums must keep the variance
    (4, 70, 3, 3, -50.0),       # many channels: channel blocks on 2 threads, offset
]


def case_id(case):
    return "x".join(str(v) for v in case[:4]) + (f"+{case[4]:g}" if case[4] else "")


def bn_inputs(rng, case):
    N, C, H, W, offset = case
    x = (rng.standard_normal((N, C, H, W)) * rng.uniform(0.5, 2.0, (1, C, 1, 1)) + offset).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, C).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    return x, weight, bias, dout


def check_bn_against_reference(x, weight, bias, dout, got, got_grads):
    out_r, mean_r, var_r = reference.batch_norm2d_forward(x, weight, bias, 1e-5)
    dx_r, dw_r, db_r = reference.batch_norm2d_backward(dout, x, mean_r, var_r, weight, 1e-5)
    out, mean, var = got
    dx, dw, db = got_grads
    M = x.shape[0] * x.shape[2] * x.shape[3]
    offset = float(np.abs(x).max())
    assert_allclose(mean, mean_r, rtol=1e-6, atol=1e-6 * offset)
    assert_allclose(var, var_r, rtol=1e-5)
    assert_allclose(out, out_r, atol=2e-5 * max(1.0, float(np.abs(out_r).max()) / 4))
    assert_allclose(db, db_r, rtol=1e-5, atol=1e-5 * np.sqrt(M))
    assert_allclose(dw, dw_r, rtol=1e-5, atol=1e-5 * np.sqrt(M))
    s = weight / np.sqrt(var_r.astype(np.float64) + 1e-5)
    scale = (s * (np.abs(dout).max() + np.abs(dout).mean() + 10.0)).max()
    assert_allclose(dx, dx_r, atol=1e-5 * scale)


@pytest.mark.parametrize("case", BN_CASES, ids=case_id)
def test_batch_norm_small_planes_match_reference(backend, case, rng):
    x, weight, bias, dout = bn_inputs(rng, case)
    out, mean, var = ops.batch_norm2d_forward(x, weight, bias, eps=1e-5)
    grads = ops.batch_norm2d_backward(dout, x, mean, var, weight, eps=1e-5)
    check_bn_against_reference(x, weight, bias, dout, (out, mean, var), grads)


@pytest.mark.skipif(not COMPILED, reason="the compiled kernels are not built")
@pytest.mark.parametrize("case", BN_CASES + [(8, 2, 7, 7, 0.0), (1, 1, 13, 1, 3.0)], ids=case_id)
def test_compiled_batch_norm_same_bits_for_any_thread_count_and_split(case, rng, restore_threads):
    # 1 thread takes channel blocks; 2-4 threads take blocks when there are enough channels, else planes
    # (the 2-channel case): every way must give the bits of the split ops combined in batch order.
    x, weight, bias, dout = bn_inputs(rng, case)
    results = []
    with ops.use_backend("cython"):
        for threads in (1, 2, 3, 4):
            ops.set_num_threads(threads)
            out, mean, var = ops.batch_norm2d_forward(x, weight, bias, eps=1e-5)
            results.append((out, mean, var) + ops.batch_norm2d_backward(dout, x, mean, var, weight, eps=1e-5))
        ops.set_num_threads(1)
        ps, pm = ops.batch_norm2d_plane_stats(x)
        mean64, var64 = ops.batch_norm2d_combine_stats(ps, pm, x.shape[2] * x.shape[3])
        split_out = ops.batch_norm2d_apply(x, mean64, var64, weight, bias, eps=1e-5)
    for got in results[1:]:
        for a, b in zip(results[0], got):
            assert_array_equal(a, b)
    assert_array_equal(results[0][0], split_out)
    assert_array_equal(results[0][1], mean64.astype(np.float32))
    assert_array_equal(results[0][2], var64.astype(np.float32))


def test_batch_norm_plane_stats_shift_keeps_the_variance_of_offset_planes(backend, rng):
    # Planes whose first value is far from the rest (the shift's worst case) and a 1e4 offset with unit
    # spread: the plane m2 must still match the two-pass float64 value.
    x = rng.standard_normal((3, 4, 7, 7))
    x[:, :, 0, 0] = 300.0
    x[:, 2] += 1e4
    x = x.astype(np.float32)
    ps, pm = ops.batch_norm2d_plane_stats(x)
    x64 = x.astype(np.float64).reshape(3, 4, -1)
    want_m2 = ((x64 - x64.mean(axis=2, keepdims=True)) ** 2).sum(axis=2).T
    assert_allclose(ps, x64.sum(axis=2).T, rtol=1e-12)
    assert_allclose(pm, want_m2, rtol=1e-6)


def test_batch_norm_non_finite_first_value_of_a_plane(backend):
    # The shift is 0 when a plane's first value is inf or NaN: +inf gives sum +inf and m2 NaN (as a
    # plain sum does), NaN gives NaN; the other planes are untouched.
    x = np.ones((1, 3, 2, 2), np.float32)
    x[0, 0, 1, 1] = 2.0
    x[0, 1, 0, 0] = np.inf
    x[0, 2, 0, 0] = np.nan
    ps, pm = ops.batch_norm2d_plane_stats(x)
    assert ps[0, 0] == 5.0 and pm[0, 0] == pytest.approx(0.75)
    assert ps[1, 0] == np.inf and np.isnan(pm[1, 0])
    assert np.isnan(ps[2, 0]) and np.isnan(pm[2, 0])


# ----------------------------------------------------------------------------------------------
# max pooling: a grid of kernel / stride / padding / dilation (padding <= half the kernel)

def pool_grid():
    for k in (1, 2, 3):
        for s in (1, 2, 3):
            for p in range(k // 2 + 1):
                for d in (1, 2):
                    yield k, s, p, d


@pytest.mark.parametrize("size", [(1, 2, 7, 9), (2, 3, 8, 5)], ids=lambda s: "x".join(map(str, s)))
def test_max_pool_grid_matches_reference(backend, size, rng):
    x = rng.standard_normal(size).astype(np.float32)
    x[..., ::3, 1::2] = x[..., ::3, :1]       # ties within windows
    for k, s, p, d in pool_grid():
        if d * (k - 1) + 1 > min(size[2], size[3]) + 2 * p:
            continue
        out, arg = ops.max_pool2d_forward(x, k, s, p, d)
        out_r, arg_r = reference.max_pool2d_forward(x, (k, k), (s, s), (p, p), (d, d))
        assert_array_equal(out, out_r, err_msg=f"k{k} s{s} p{p} d{d}")
        assert_array_equal(arg, arg_r, err_msg=f"k{k} s{s} p{p} d{d}")
        dout = rng.standard_normal(out.shape).astype(np.float32)
        assert_array_equal(ops.max_pool2d_backward(dout, arg, x.shape),
                           reference.max_pool2d_backward(dout, arg_r, x.shape), err_msg=f"k{k} s{s} p{p} d{d}")


@pytest.mark.parametrize("W", [1, 2, 5, 6, 17])
def test_max_pool_3x3_stride_2_ties_and_all_minus_inf(backend, W):
    # The stem pool's path (rows split by column parity): equal values everywhere -> the first tap of
    # each window inside the input; all -inf -> still an index inside the input, never padding.
    for fill in (1.0, -np.inf):
        x = np.full((1, 1, 5, W), fill, np.float32)
        out, arg = ops.max_pool2d_forward(x, 3, 2, 1)
        out_r, arg_r = reference.max_pool2d_forward(x, (3, 3), (2, 2), (1, 1), (1, 1))
        assert_array_equal(out, out_r)
        assert_array_equal(arg, arg_r)


def test_max_pool_3x3_stride_2_nan_wins_first(backend):
    x = np.zeros((1, 1, 4, 6), np.float32)
    x[0, 0, 1, 2] = np.nan
    x[0, 0, 1, 3] = np.nan
    x[0, 0, 0, 4] = 5.0
    out, arg = ops.max_pool2d_forward(x, 3, 2, 1)
    out_r, arg_r = reference.max_pool2d_forward(x, (3, 3), (2, 2), (1, 1), (1, 1))
    assert_array_equal(out, out_r)
    assert_array_equal(arg, arg_r)


@pytest.mark.skipif(not COMPILED, reason="the compiled kernels are not built")
def test_compiled_pools_same_bits_for_any_thread_count(rng, restore_threads):
    x = rng.standard_normal((3, 5, 15, 14)).astype(np.float32)
    results = []
    with ops.use_backend("cython"):
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            out, arg = ops.max_pool2d_forward(x, 3, 2, 1)
            avg = ops.avg_pool2d_forward(x, 2, 2, 0)
            results.append((out, arg, avg, ops.avg_pool2d_backward(avg, x.shape, 2, 2, 0),
                            ops.max_pool2d_backward(out, arg, x.shape)))
    for got in results[1:]:
        for a, b in zip(results[0], got):
            assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# the ReLU layer

@pytest.mark.parametrize("inplace", [False, True])
def test_relu_layer_matches_reference(backend, inplace, rng):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, -0.0, np.nan]
    dout = rng.standard_normal(x.shape).astype(np.float32)
    want = reference.relu_forward(x.copy(), False)
    want_dx = reference.relu_backward(dout, want)
    layer = nn.ReLU(inplace=inplace)
    x_in = x.copy()
    out = layer.forward(x_in)
    assert_array_equal(out, want)
    assert (out is x_in) == inplace
    assert_array_equal(layer.backward(dout), want_dx)


def test_relu_layer_in_place_on_an_array_the_compiled_op_cannot_take(backend):
    # A non-contiguous view: written in place all the same.
    base = np.array([[-1.0, 2.0, -3.0, 4.0]] * 2, np.float32)
    view = base[:, ::2]
    out = nn.ReLU(inplace=True).forward(view)
    assert np.shares_memory(out, base)
    assert_array_equal(base, [[0.0, 2.0, 0.0, 4.0]] * 2)


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_with_residual_matches_reference(backend, inplace, rng):
    # ops.relu_forward(x, residual=r) = max(x + r, 0) in one pass; sizes around the kernel's chunks of 2^15
    for shape in [(2, 3, 5, 7), (1, 1 << 15), (3, (1 << 15) + 5)]:
        x = rng.standard_normal(shape).astype(np.float32)
        r = rng.standard_normal(shape).astype(np.float32)
        x.reshape(-1)[:3] = [np.nan, 1.0, -2.0]
        r.reshape(-1)[:3] = [1.0, np.nan, 1.5]
        want = reference.relu_forward(x, False, residual=r)
        assert np.isnan(want.reshape(-1)[:2]).all() and want.reshape(-1)[2] == 0
        x_in, r_before = x.copy(), r.copy()
        got = ops.relu_forward(x_in, inplace, residual=r)
        assert_array_equal(got, want)
        assert (got is x_in) == inplace
        assert_array_equal(r, r_before)
        if not inplace:
            assert_array_equal(x_in, x)


def test_relu_with_residual_rejects_bad_arguments_by_name(backend, rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="residual has shape"):
        ops.relu_forward(x, residual=x[:1])
    flat = np.zeros(30, np.float32)
    with pytest.raises(ValueError, match="residual overlaps x"):
        ops.relu_forward(flat[:24].reshape(x.shape), True, residual=flat[6:].reshape(x.shape))


@pytest.mark.parametrize("with_downsample", [False, True])
def test_relu_layer_with_residual_is_relu_of_the_sum(backend, with_downsample, rng):
    # the ResNet block's last step; a residual the kernels cannot take (float64) goes through NumPy
    x = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    skip = rng.standard_normal(x.shape).astype(np.float64 if with_downsample else np.float32)
    want = np.maximum(x + skip, 0).astype(np.float32)
    layer = nn.ReLU(inplace=True)
    out = layer.forward(x.copy(), residual=skip)
    assert_allclose(out, want, rtol=1e-6, atol=1e-7)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    assert_array_equal(layer.backward(dout), np.where(out > 0, dout, 0))
