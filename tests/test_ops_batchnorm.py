"""batch_norm2d_forward / batch_norm2d_backward: every backend against the reference, the reference
against hand-computed values and central finite differences, thread invariance of the compiled kernel,
and the public API's conversions.

Tolerances (float32, unit-scale data; the reference computes in float64 and rounds once):
  out          atol 2e-5: an elementwise map with per-channel coefficients; the backends round the
               coefficients and the centred values to float32 (a few ulps of values of size ~1-5).
  dx           atol 1e-6 * the size of the terms it is made of, per channel:
               |weight| / std * (max|dout| + |mean(dout)| + max|xhat| * |mean(dout * xhat)|); dx is their
               difference and can be far smaller than each (with M = 2 it cancels to ~0), so its float32
               rounding error scales with the terms, not with dx (1e-6 is ~16 ulps of them).
  mean         rtol 1e-6 plus atol 1e-6 * |offset|: float64 sums, rounded to float32 once.
  var          rtol 1e-5: float64 sums (the fallback's per-plane products are float32, ~1e-7 each).
  dweight, dbias  rtol 1e-5, atol 1e-5 * sqrt(M): sums of M = N * H * W products of size ~1; the
               fallback forms the per-plane products of dweight in float32.
A one-pass variance in float32 (E[x^2] - E[x]^2) fails the `offset=100` cases by orders of magnitude.
"""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from chexcy import ops, reference
from ops_cases import BACKENDS, COMPILED, central_differences

# (N, C, H, W, offset): offset is added to x, so a one-pass variance loses its digits there.
BN_SHAPES = [
    (1, 3, 4, 5, 0.0),          # batch 1, H * W > 1
    (2, 1, 3, 3, 0.0),          # one channel
    (3, 5, 7, 9, 0.0),          # odd sizes
    (2, 4, 1, 1, 0.0),          # 1 x 1 planes: statistics over the batch only
    (1, 2, 1, 2, 0.0),          # the smallest legal count, M = 2
    (2, 3, 33, 35, 0.0),        # planes longer than the vector loop, with a tail
    (4, 16, 16, 16, 0.0),       # ref-cnn-like: whole vectors, no tail
    (2, 3, 9, 11, 100.0),       # large mean offset
    (5, 2, 16, 17, 100.0),      # large mean offset, longer planes
    (1, 1, 3, 3, -1000.0),      # large negative offset, one plane
]


def shape_id(case):
    return "x".join(str(s) for s in case[:4]) + (f"+{case[4]:g}" if case[4] else "")


def make_bn_inputs(rng, case, dtype=np.float32):
    N, C, H, W, offset = case
    x = (rng.standard_normal((N, C, H, W)) * rng.uniform(0.5, 3.0, (1, C, 1, 1)) + offset).astype(dtype)
    weight = (rng.uniform(0.5, 2.0, C) * rng.choice([-1, 1], C)).astype(dtype)   # negative too
    bias = rng.standard_normal(C).astype(dtype)
    dout = rng.standard_normal((N, C, H, W)).astype(dtype)
    return x, weight, bias, dout


def dx_term_scale(dout, x, mean, var, weight, eps):
    """(1, C, 1, 1) float64: the size of the terms dx is a difference of (see the module doc)."""
    s = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    xhat = (x - mean[:, None, None].astype(np.float64)) * s[:, None, None]
    g = dout.astype(np.float64)
    scale = np.abs(weight) * s * (np.abs(g).max(axis=(0, 2, 3)) + np.abs(g.mean(axis=(0, 2, 3)))
                                  + np.abs(xhat).max(axis=(0, 2, 3)) * np.abs((g * xhat).mean(axis=(0, 2, 3))))
    return scale[None, :, None, None]


def assert_bn_close(got, want, names, case, dx_scale=None):
    N, C, H, W, offset = case
    M = N * H * W
    tols = {"out": dict(rtol=0, atol=2e-5), "dx": dict(rtol=0, atol=0),
            "mean": dict(rtol=1e-6, atol=1e-6 * (1 + abs(offset))), "var": dict(rtol=1e-5, atol=0),
            "dweight": dict(rtol=1e-5, atol=1e-5 * np.sqrt(M)), "dbias": dict(rtol=1e-5, atol=1e-5 * np.sqrt(M))}
    for name, g, w in zip(names, got, want):
        assert g.dtype == np.float32, f"{name}: dtype {g.dtype}, expected float32 ({shape_id(case)})"
        assert g.shape == w.shape, f"{name}: shape {g.shape}, expected {w.shape} ({shape_id(case)})"
        if name == "dx":
            assert_allclose(g / dx_scale, w / dx_scale, rtol=0, atol=1e-6,
                            err_msg=f"dx / its term scale {shape_id(case)}")
            continue
        assert_allclose(g, w, **tols[name], err_msg=f"{name} {shape_id(case)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BN_SHAPES, ids=shape_id)
def test_batch_norm_forward_matches_reference(backend, case, rng):
    x, weight, bias, _ = make_bn_inputs(rng, case)
    want = reference.batch_norm2d_forward(x, weight, bias, 1e-5)
    with ops.use_backend(backend):
        got = ops.batch_norm2d_forward(x, weight, bias, eps=1e-5)
    assert_bn_close(got, want, ("out", "mean", "var"), case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BN_SHAPES, ids=shape_id)
def test_batch_norm_backward_matches_reference(backend, case, rng):
    x, weight, bias, dout = make_bn_inputs(rng, case)
    _, mean, var = reference.batch_norm2d_forward(x, weight, bias, 1e-5)
    want = reference.batch_norm2d_backward(dout, x, mean, var, weight, 1e-5)
    with ops.use_backend(backend):
        got = ops.batch_norm2d_backward(dout, x, mean, var, weight, eps=1e-5)
    assert_bn_close(got, want, ("dx", "dweight", "dbias"), case,
                    dx_scale=dx_term_scale(dout, x, mean, var, weight, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_eps_reaches_the_kernels(backend, rng):
    # A constant channel has var 0: the output is bias exactly when eps is used, and eps sets dx's scale.
    x = np.full((2, 2, 3, 3), 7.0, np.float32)
    x[:, 1] = rng.standard_normal((2, 3, 3)) * 1e-2
    weight, bias = np.array([1.5, 2.0], np.float32), np.array([0.25, -1.0], np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    for eps in (1e-5, 0.5):
        want_out, want_mean, want_var = reference.batch_norm2d_forward(x, weight, bias, eps)
        want_grads = reference.batch_norm2d_backward(dout, x, want_mean, want_var, weight, eps)
        with ops.use_backend(backend):
            out, mean, var = ops.batch_norm2d_forward(x, weight, bias, eps)
            grads = ops.batch_norm2d_backward(dout, x, mean, var, weight, eps)
        assert_array_equal(out[:, 0], 0.25, err_msg=f"{backend}: a constant channel must give bias")
        assert var[0] == 0, f"{backend}: constant channel var {var[0]}"
        assert_allclose(out, want_out, rtol=1e-5, atol=2e-5, err_msg=f"{backend} eps={eps}")
        for name, g, w in zip(("dx", "dweight", "dbias"), grads, want_grads):
            assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"{backend} {name} eps={eps}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1.0, 1e-3, 1e4, 1e19, 1e30])
def test_batch_norm_forward_survives_huge_activations(backend, magnitude, rng):
    # (x - mean)^2 overflows float32 from |x| ~ 1e19: a diverging network's activations must still be
    # normalised like the reference does (it sums in float64), not turned into zeros. At 1e30 the
    # variance itself is past float32's range, so var is +inf in every backend; out stays finite.
    case = (2, 3, 5, 7, 0.0)
    x, weight, bias, _ = make_bn_inputs(rng, case)
    x = (x.astype(np.float64) * magnitude).astype(np.float32)
    with np.errstate(over="ignore"):          # var's cast to float32 at 1e30 overflows, as it should
        want = reference.batch_norm2d_forward(x, weight, bias, 1e-5)
        with ops.use_backend(backend):
            got = ops.batch_norm2d_forward(x, weight, bias, eps=1e-5)
    assert np.all(np.isfinite(got[0])), f"{backend}: non-finite output at |x| ~ {magnitude:g}"
    assert_allclose(got[0], want[0], rtol=0, atol=2e-5, err_msg=f"{backend} out at |x| ~ {magnitude:g}")
    assert_allclose(got[1], want[1], rtol=1e-6, atol=0, err_msg=f"{backend} mean at |x| ~ {magnitude:g}")
    assert_allclose(got[2], want[2], rtol=1e-5, atol=0, err_msg=f"{backend} var at |x| ~ {magnitude:g}")


# ----------------------------------------------------------------------------------------------
# The reference proved

def test_reference_hand_example():
    # One channel holding 1, 2, 3, 4 (over N and W): mean 2.5, biased var 1.25.
    x = np.array([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])                   # (2, 1, 1, 2)
    out, mean, var = reference.batch_norm2d_forward(x, np.array([2.0]), np.array([0.5]), 0.0)
    assert_allclose(mean, [2.5])
    assert_allclose(var, [1.25])
    assert_allclose(out.ravel(), 2.0 * (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / np.sqrt(1.25) + 0.5)
    # dout = 1 everywhere: the output moves with bias only, so dx = 0, dbias = 4, dweight = sum(xhat) = 0.
    dx, dweight, dbias = reference.batch_norm2d_backward(np.ones_like(x), x, mean, var, np.array([2.0]), 0.0)
    assert_allclose(dx, 0.0, atol=1e-15)
    assert_allclose(dbias, [4.0])
    assert_allclose(dweight, [0.0], atol=1e-15)


def test_reference_statistics_are_numpys_mean_and_biased_var(rng):
    x = rng.standard_normal((3, 4, 5, 6)) * 2 + 3
    _, mean, var = reference.batch_norm2d_forward(x, np.ones(4), np.zeros(4), 1e-5)
    assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-14)
    assert_allclose(var, x.var(axis=(0, 2, 3)), rtol=1e-13)


@pytest.mark.parametrize("shape", [(2, 3, 3, 2), (1, 2, 2, 3), (3, 1, 1, 1)])
def test_reference_gradients_match_central_differences(shape, rng):
    """Loss L = sum(out * R); every gradient entry against (L(p + h) - L(p - h)) / 2h, float64."""
    C = shape[1]
    x = rng.standard_normal(shape) * 1.5 + 0.5
    weight, bias = rng.uniform(0.5, 2.0, C), rng.standard_normal(C)
    R = rng.standard_normal(shape)
    eps, h = 1e-3, 1e-6

    def loss():
        return float((reference.batch_norm2d_forward(x, weight, bias, eps)[0] * R).sum())

    _, mean, var = reference.batch_norm2d_forward(x, weight, bias, eps)
    grads = dict(zip(("x", "weight", "bias"), reference.batch_norm2d_backward(R, x, mean, var, weight, eps)))
    for name, param in (("x", x), ("weight", weight), ("bias", bias)):
        numeric = central_differences(loss, param, eps=h)
        assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8,
                        err_msg=f"reference d{name} vs central differences, shape {shape}")


# ----------------------------------------------------------------------------------------------
# The compiled kernel: thread invariance

needs_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled backend (chexcy._ops) is not built")


@needs_compiled
def test_batch_norm_bitwise_identical_for_1_2_3_threads(rng):
    # N * C = 35 planes: no thread count here divides the work evenly.
    x, weight, bias, dout = make_bn_inputs(rng, (5, 7, 19, 23, 3.0))
    results = {}
    try:
        with ops.use_backend("cython"):
            for n in (1, 2, 3, 1):
                ops.set_num_threads(n)
                out, mean, var = ops.batch_norm2d_forward(x, weight, bias)
                results.setdefault(n, []).append((out, mean, var,
                                                  *ops.batch_norm2d_backward(dout, x, mean, var, weight)))
    finally:
        ops.set_num_threads(None)
    names = ("out", "mean", "var", "dx", "dweight", "dbias")
    for n in (1, 2, 3):
        for name, a, b in zip(names, results[1][0], results[n][-1]):
            assert np.array_equal(a, b), (f"{name}: 1 and {n} threads differ, max abs diff "
                                          f"{np.max(np.abs(a.astype(np.float64) - b)):.3g}")


# ----------------------------------------------------------------------------------------------
# The public API: conversions and defaults

@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_converts_float64_and_strided_input_once(backend, rng):
    x, weight, bias, dout = make_bn_inputs(rng, (2, 3, 5, 4, 0.0), np.float64)
    strided = np.asfortranarray(x)
    with ops.use_backend(backend):
        want = ops.batch_norm2d_forward(x.astype(np.float32), weight.astype(np.float32),
                                        bias.astype(np.float32))
        got = ops.batch_norm2d_forward(strided, weight, bias)
        want_b = ops.batch_norm2d_backward(dout.astype(np.float32), x.astype(np.float32), want[1], want[2],
                                           weight.astype(np.float32))
        got_b = ops.batch_norm2d_backward(np.asfortranarray(dout), strided, want[1].astype(np.float64),
                                          want[2], weight)
    for g, w in zip(got + got_b, want + want_b):
        assert g.dtype == np.float32 and g.flags.c_contiguous
        assert_array_equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_none_weight_and_bias_mean_ones_and_zeros(backend, rng):
    x, _, _, dout = make_bn_inputs(rng, (2, 3, 4, 4, 0.0))
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    with ops.use_backend(backend):
        assert all(np.array_equal(a, b) for a, b in zip(ops.batch_norm2d_forward(x, None, None),
                                                        ops.batch_norm2d_forward(x, ones, zeros)))
        out, mean, var = ops.batch_norm2d_forward(x, None, None)
        assert all(np.array_equal(a, b) for a, b in zip(ops.batch_norm2d_backward(dout, x, mean, var, None),
                                                        ops.batch_norm2d_backward(dout, x, mean, var, ones)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_backward_returns_fresh_arrays(backend, rng):
    x, weight, bias, dout = make_bn_inputs(rng, (2, 2, 3, 3, 0.0))
    x_copy, dout_copy = x.copy(), dout.copy()
    with ops.use_backend(backend):
        out, mean, var = ops.batch_norm2d_forward(x, weight, bias)
        dx, _, _ = ops.batch_norm2d_backward(dout, x, mean, var, weight)
    assert not np.shares_memory(dx, dout) and not np.shares_memory(dx, x) and not np.shares_memory(out, x)
    assert_array_equal(x, x_copy)
    assert_array_equal(dout, dout_copy)


# ----------------------------------------------------------------------------------------------
# The two halves (per-plane statistics, then the elementwise map) that BatchNorm2d uses when its batch is
# spread over ranks: the batch is cut into parts as ranks would hold it, each part's statistics computed
# alone, combined in batch order, and each part mapped with the combined statistics.

def split_rows(N):
    """Contiguous row ranges of a batch of N over two "ranks" (one when N == 1), as shard_bounds cuts it."""
    return [(0, N)] if N == 1 else [(0, (N + 1) // 2), ((N + 1) // 2, N)]


def run_halves(x, weight, bias, dout, eps=1e-5):
    """(out, mean, var, dx, dweight, dbias) of batch norm computed part by part with the split ops."""
    parts = split_rows(x.shape[0])
    stats = [ops.batch_norm2d_plane_stats(x[a:b]) for a, b in parts]
    plane_sum = np.concatenate([s[0] for s in stats], axis=1)
    plane_m2 = np.concatenate([s[1] for s in stats], axis=1)
    mean64, var64 = ops.batch_norm2d_combine_stats(plane_sum, plane_m2, x.shape[2] * x.shape[3])
    out = np.concatenate([ops.batch_norm2d_apply(x[a:b], mean64, var64, weight, bias, eps) for a, b in parts])
    mean, var = mean64.astype(np.float32), var64.astype(np.float32)
    sums = [ops.batch_norm2d_plane_grad_sums(dout[a:b], x[a:b], mean) for a, b in parts]
    sum_g = np.concatenate([s[0] for s in sums], axis=1).sum(axis=1)
    sum_gx = np.concatenate([s[1] for s in sums], axis=1).sum(axis=1)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    dx = np.concatenate([ops.batch_norm2d_backward_apply(dout[a:b], x[a:b], mean, var, weight, sum_g, sum_gx,
                                                          count, eps) for a, b in parts])
    s = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    return out, mean, var, dx, (sum_gx * s).astype(np.float32), sum_g.astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BN_SHAPES, ids=shape_id)
def test_batch_norm_halves_over_parts_of_the_batch_match_reference(backend, case, rng):
    x, weight, bias, dout = make_bn_inputs(rng, case)
    out_ref, mean_ref, var_ref = reference.batch_norm2d_forward(x, weight, bias, 1e-5)
    grads_ref = reference.batch_norm2d_backward(dout, x, mean_ref, var_ref, weight, 1e-5)
    with ops.use_backend(backend):
        out, mean, var, dx, dweight, dbias = run_halves(x, weight, bias, dout)
    assert_bn_close((out, mean, var), (out_ref, mean_ref, var_ref), ("out", "mean", "var"), case)
    assert_bn_close((dx, dweight, dbias), grads_ref, ("dx", "dweight", "dbias"), case,
                    dx_scale=dx_term_scale(dout, x, mean, var, weight, 1e-5))


@pytest.mark.skipif(not COMPILED, reason="the compiled kernels are not built")
@pytest.mark.parametrize("case", BN_SHAPES, ids=shape_id)
def test_compiled_batch_norm_halves_equal_the_fused_kernels_bit_for_bit(case, rng):
    # What makes K ranks equal one process exactly: the same plane kernels, combined in the same order.
    x, weight, bias, dout = make_bn_inputs(rng, case)
    with ops.use_backend("cython"):
        out, mean, var = ops.batch_norm2d_forward(x, weight, bias, eps=1e-5)
        grads = ops.batch_norm2d_backward(dout, x, mean, var, weight, eps=1e-5)
        halves = run_halves(x, weight, bias, dout)
    for name, got, want in zip(("out", "mean", "var", "dx", "dweight", "dbias"), halves, (out, mean, var) + grads):
        assert_array_equal(got, want, err_msg=f"{name} {shape_id(case)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_halves_reject_bad_arguments_by_name(backend, rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="batch_norm2d_plane_stats: x"):
            ops.batch_norm2d_plane_stats(x[0])
        with pytest.raises(ValueError, match="mean must have shape"):
            ops.batch_norm2d_apply(x, np.zeros(2), np.ones(3), None, None)
        with pytest.raises(ValueError, match="dout must have x's shape"):
            ops.batch_norm2d_plane_grad_sums(x[:1], x, np.zeros(3))
        with pytest.raises(ValueError, match="count must be >= 2"):
            ops.batch_norm2d_backward_apply(x, x, np.zeros(3), np.ones(3), None, np.zeros(3), np.zeros(3), 1)
        with pytest.raises(ValueError, match="more than one value per channel"):
            ops.batch_norm2d_combine_stats(np.zeros((3, 1)), np.zeros((3, 1)), 1)


# ----------------------------------------------------------------------------------------------
# batch_norm2d_apply with its ReLU, into a given array, on a channel prefix of a larger array (how a dense
# block normalises the first c channels of its buffer without copying them).

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BN_SHAPES, ids=shape_id)
def test_batch_norm_apply_relu_into_out_on_a_channel_prefix_matches_reference(backend, case, rng):
    N, C, H, W, offset = case
    big = (rng.standard_normal((N, C + 3, H, W)) + offset).astype(np.float32)
    x = big[:, :C]                                      # planes contiguous, samples (C + 3) H W apart
    mean = x.astype(np.float64).mean(axis=(0, 2, 3))
    var = x.astype(np.float64).var(axis=(0, 2, 3)) + 0.5
    big[0, 0, 0, 0] = np.nan                            # a NaN stays NaN through the ReLU
    weight = rng.standard_normal(C).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    want = reference.batch_norm2d_apply(x, mean, var, weight, bias, 1e-5, relu=True)
    if x.size >= 16:
        assert (want == 0).any() and (want > 0).any()  # the ReLU cuts somewhere, passes somewhere
    before = big.copy()
    with ops.use_backend(backend):
        fresh = ops.batch_norm2d_apply(x, mean, var, weight, bias, 1e-5, relu=True)
        out = np.full((N, C, H, W), 7.0, np.float32)
        got = ops.batch_norm2d_apply(x, mean, var, weight, bias, 1e-5, relu=True, out=out)
        plain = ops.batch_norm2d_apply(x, mean, var, weight, bias, 1e-5)
    assert got is out
    assert np.isnan(got[0, 0, 0, 0]) and np.isnan(fresh[0, 0, 0, 0])
    assert_allclose(got, want, atol=2e-5 * max(1.0, abs(offset)), equal_nan=True)
    assert_array_equal(fresh, got)
    assert_array_equal(np.maximum(plain, 0), got)       # relu=True is the plain map, then max(., 0)
    assert_array_equal(big, before)                     # x (and the channels past it) untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_apply_in_place_and_bad_out(backend, rng):
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    mean, var = np.zeros(3), np.ones(3)
    w, b = np.full(3, 2.0, np.float32), np.full(3, -0.5, np.float32)
    want = np.maximum(x * np.float32(2.0 / np.sqrt(1 + 1e-5)) - 0.5, 0)
    with ops.use_backend(backend):
        y = x.copy()
        assert ops.batch_norm2d_apply(y, mean, var, w, b, relu=True, out=y) is y
        assert_allclose(y, want, atol=1e-6)
        with pytest.raises(ValueError, match="out has shape"):
            ops.batch_norm2d_apply(x, mean, var, w, b, out=np.empty((2, 3, 5, 5), np.float32))
        with pytest.raises(ValueError, match="C-contiguous float32"):
            ops.batch_norm2d_apply(x, mean, var, w, b, out=np.empty((2, 3, 5, 4)))
        with pytest.raises(ValueError, match="read-only"):
            ro = np.empty_like(x)
            ro.flags.writeable = False
            ops.batch_norm2d_apply(x, mean, var, w, b, out=ro)
        big = np.zeros((2, 6, 5, 4), np.float32)
        with pytest.raises(ValueError, match="overlaps x"):
            ops.batch_norm2d_apply(big[:, :3], mean, var, w, b, out=big.reshape(-1)[8:8 + x.size].reshape(x.shape))


# ----------------------------------------------------------------------------------------------
# batch_norm2d_backward on channel prefixes, into (or added to) a given array: how a dense block's layer
# takes the gradient of its buffer's first c channels without copying them and adds it to the block's
# gradient buffer in the same pass.

def prefix_of(rng, shape, extra, fill=None):
    """A channel prefix view (N, C, H, W) of a C-contiguous (N, C + extra, H, W) array, and that array."""
    N, C, H, W = shape
    big = rng.standard_normal((N, C + extra, H, W)).astype(np.float32) if fill is None else \
        np.full((N, C + extra, H, W), fill, np.float32)
    return big[:, :C], big


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("case", BN_SHAPES, ids=shape_id)
def test_batch_norm_backward_on_a_channel_prefix_into_out_equals_a_fresh_dx(backend, case, rng):
    N, C, H, W, offset = case
    x, weight, bias, dout = make_bn_inputs(rng, case)
    x_view, x_big = prefix_of(rng, x.shape, 3)
    x_view[...] = x
    dout_view, _ = prefix_of(rng, x.shape, 1)
    dout_view[...] = dout
    target, target_big = prefix_of(rng, x.shape, 2)
    before, x_before = target_big.copy(), x_big.copy()
    with ops.use_backend(backend):
        _, mean, var = ops.batch_norm2d_forward(x, weight, bias)
        want = ops.batch_norm2d_backward(dout, x, mean, var, weight)
        added = ops.batch_norm2d_backward(dout_view, x_view, mean, var, weight, out=target, accumulate=True)
        assert added[0] is target
        after_add = target_big.copy()
        written = ops.batch_norm2d_backward(dout_view, x_view, mean, var, weight, out=target)
    # dx rounded to float32, then one float32 add: `target += dx` with a fresh dx, up to the contraction
    # of dx's expression into FMAs, which the build without OpenMP compiled differently in the adding
    # kernel (a float32 rounding of dx's terms); a dx not added, or added twice, is off by |dx|.
    scale = dx_term_scale(dout, x, mean, var, weight, 1e-5) + np.abs(before[:, :C])
    assert_allclose(after_add[:, :C] / scale, (before[:, :C] + want[0]) / scale, rtol=0, atol=1e-6,
                    err_msg=f"accumulate {shape_id(case)}")
    assert_allclose(target / scale, want[0] / scale, rtol=0, atol=1e-6, err_msg=f"out {shape_id(case)}")
    assert_array_equal(target_big[:, C:], before[:, C:])         # the channels past the prefix untouched
    for got in (added, written):
        assert_array_equal(got[1], want[1])
        assert_array_equal(got[2], want[2])
    assert_array_equal(x_big, x_before)


@needs_compiled
def test_batch_norm_backward_into_a_prefix_bitwise_identical_for_1_2_3_threads(rng):
    # C = 7 (< 4 blocks per thread: the plane-split path at 2 and 3 threads) and C = 40 (channel blocks).
    for C in (7, 40):
        x, weight, bias, dout = make_bn_inputs(rng, (3, C, 9, 11, 1.0))
        x_view, _ = prefix_of(rng, x.shape, 5)
        x_view[...] = x
        start = rng.standard_normal((3, C + 4, 9, 11)).astype(np.float32)
        results = {}
        try:
            with ops.use_backend("cython"):
                _, mean, var = ops.batch_norm2d_forward(x, weight, bias)
                for n in (1, 2, 3):
                    ops.set_num_threads(n)
                    big = start.copy()
                    _, dw, db = ops.batch_norm2d_backward(dout, x_view, mean, var, weight, out=big[:, :C],
                                                          accumulate=True)
                    results[n] = (big, dw, db)
        finally:
            ops.set_num_threads(None)
        for n in (2, 3):
            for name, a, b in zip(("buffer", "dweight", "dbias"), results[1], results[n]):
                assert np.array_equal(a, b), f"C={C} {name}: 1 and {n} threads differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_backward_rejects_a_bad_out_by_name(backend, rng):
    x, weight, bias, dout = make_bn_inputs(rng, (2, 3, 5, 4, 0.0))
    with ops.use_backend(backend):
        _, mean, var = ops.batch_norm2d_forward(x, weight, bias)

        def call(**kw):
            return ops.batch_norm2d_backward(dout, x, mean, var, weight, **kw)
        with pytest.raises(ValueError, match="accumulate=True adds dx into out, but out is None"):
            call(accumulate=True)
        with pytest.raises(ValueError, match="out has shape"):
            call(out=np.empty((2, 3, 5, 5), np.float32))
        with pytest.raises(ValueError, match="contiguous \\(C, H, W\\) planes"):
            call(out=np.empty((2, 3, 5, 4)))                       # float64
        with pytest.raises(ValueError, match="contiguous \\(C, H, W\\) planes"):
            call(out=np.empty((2, 3, 5, 5), np.float32)[:, :, :, :4])
        ro = np.empty_like(x)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            call(out=ro)
        with pytest.raises(ValueError, match="out overlaps x"):
            ops.batch_norm2d_backward(dout, x, mean, var, weight, out=x)
        with pytest.raises(ValueError, match="out overlaps dout"):
            g = dout.copy()
            ops.batch_norm2d_backward(g, x, mean, var, weight, out=g, accumulate=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_backward_takes_any_stride_on_a_size_one_dimension(backend, rng):
    # NumPy calls (2, 1, 4, 3) arrays with strides (48, 4, 12, 4) C-contiguous: they reach the kernels
    # uncopied, and the channel axis's stride must not matter there.
    x, weight, bias, dout = make_bn_inputs(rng, (2, 1, 4, 3, 0.0))
    def odd(a):
        return np.lib.stride_tricks.as_strided(a.copy(), a.shape, (48, 4, 12, 4))
    odd_x, odd_g = odd(x), odd(dout)
    assert odd_x.flags.c_contiguous and odd_x.strides[1] == 4
    with ops.use_backend(backend):
        _, mean, var = ops.batch_norm2d_forward(x, weight, bias)
        want = ops.batch_norm2d_backward(dout, x, mean, var, weight)
        got = ops.batch_norm2d_backward(odd_g, odd_x, mean, var, weight)
        target = odd(np.zeros_like(x))
        ops.batch_norm2d_backward(odd_g, odd_x, mean, var, weight, out=target, accumulate=True)
    for g, w in zip(got, want):
        assert_array_equal(g, w)
    assert_allclose(target, want[0], rtol=0, atol=1e-6 * np.abs(want[0]).max())
