"""The oracle proved: chexcy.reference against hand-computed results and central finite differences.

Everything else is tested against chexcy.reference, so it is tested here against things that do not
depend on it: small results worked out by hand (fixing the conventions: cross-correlation, where the
"same" padding goes, -inf padding in max pool, count_include_pad) and, for every gradient, central
finite differences in float64 of the scalar loss sum(forward(...) * dout).
"""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from chexcy import ops, reference
from ops_cases import TOLERANCES, central_differences, randn

FD = TOLERANCES[("finite_difference", "float64")]
EPS = 1e-6


def numerical_gradient(loss, array):
    """d loss / d array by central differences (float64)."""
    return central_differences(loss, array, eps=EPS)


def check(analytic, numeric, name):
    assert_allclose(analytic, numeric, rtol=FD.rtol, atol=FD.atol,
                    err_msg=f"reference gradient {name} vs central differences")


# ----------------------------------------------------------------------------------------------
# Hand-computed examples.

def test_conv2d_is_cross_correlation_not_flipped():
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    weight = np.zeros((1, 1, 2, 2))
    weight[0, 0, 0, 0] = 1.0  # picks the window's top-left input
    out = reference.conv2d_forward(x, weight, None, (1, 1), (0, 0), (1, 1), 1)
    assert_array_equal(out[0, 0], x[0, 0, :3, :3])


def test_conv2d_hand_example_with_padding_stride_dilation_bias():
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)    # 1..9
    weight = np.ones((1, 1, 2, 2))
    out = reference.conv2d_forward(x, weight, np.array([0.5]), (2, 2), (1, 1), (1, 1), 1)
    # padded 5x5, windows at rows/cols 0 and 2: [[1, 2+3], [4+7, 5+6+8+9]] + 0.5
    assert_array_equal(out[0, 0], [[1.5, 5.5], [11.5, 28.5]])
    out = reference.conv2d_forward(x, weight, None, (1, 1), (0, 0), (2, 2), 1)
    assert_array_equal(out[0, 0], [[1 + 3 + 7 + 9]])              # dilated taps: the four corners


def test_conv2d_groups_use_their_own_channels():
    x = np.stack([np.full((3, 3), 1.0), np.full((3, 3), 10.0)])[None]     # (1, 2, 3, 3)
    weight = np.ones((2, 1, 1, 1))
    weight[1] = 2.0
    out = reference.conv2d_forward(x, weight, None, (1, 1), (0, 0), (1, 1), 2)
    assert_array_equal(out[0, :, 0, 0], [1.0, 20.0])


def test_same_padding_puts_the_odd_row_bottom_right():
    # Kernel 2x2 picking the bottom-right tap: "same" pads 0 at top/left and 1 at bottom/right (as
    # PyTorch), so out[i, j] = x[i + 1, j + 1] with zeros past the edge.
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
    weight = np.zeros((1, 1, 2, 2), np.float32)
    weight[0, 0, 1, 1] = 1.0
    with ops.use_backend("reference"):
        out = ops.conv2d_forward(x, weight, padding="same")
    assert_array_equal(out[0, 0], [[5, 6, 0], [8, 9, 0], [0, 0, 0]])


def test_max_pool_hand_example_pads_with_minus_inf_and_returns_flat_argmax():
    x = -np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)    # all negative: zero padding would win
    out, argmax = reference.max_pool2d_forward(x, (2, 2), (2, 2), (1, 1), (1, 1))
    assert_array_equal(out[0, 0], [[-1, -2], [-4, -5]])
    assert_array_equal(argmax[0, 0], [[0, 1], [3, 4]])
    assert argmax.dtype == np.int64


def test_max_pool_ties_take_the_first_in_scan_order():
    x = np.zeros((1, 1, 2, 2))
    out, argmax = reference.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1))
    assert argmax[0, 0, 0, 0] == 0
    dx = reference.max_pool2d_backward(np.ones((1, 1, 1, 1)), argmax, (1, 1, 2, 2))
    assert_array_equal(dx[0, 0], [[1, 0], [0, 0]])


def test_max_pool_overlapping_windows_accumulate_gradient():
    x = np.array([[[[0.0, 5.0, 0.0]]]])                            # the 5 is in both windows
    out, argmax = reference.max_pool2d_forward(x, (1, 2), (1, 1), (0, 0), (1, 1))
    dx = reference.max_pool2d_backward(np.array([[[[1.0, 2.0]]]]), argmax, (1, 1, 1, 3))
    assert_array_equal(dx[0, 0, 0], [0.0, 3.0, 0.0])


@pytest.mark.parametrize("count_include_pad, expected", [(True, [12 / 4, 20 / 4]),
                                                         (False, [12 / 2, 20 / 4])])
def test_avg_pool_count_include_pad(count_include_pad, expected):
    x = np.array([[[[2.0, 10.0, 0.0], [10.0, 0.0, 10.0]]]])       # (1, 1, 2, 3), W padded by 1
    out = reference.avg_pool2d_forward(x, (2, 2), (2, 2), (0, 1), count_include_pad)
    # window 0 covers columns (-1, 0): 2 + 10 = 12 over 2 real taps (4 with the padding);
    # window 1 covers columns (1, 2): 10 + 0 + 0 + 10 = 20 over 4 real taps.
    assert_allclose(out[0, 0, 0], expected)
    assert out.shape == (1, 1, 1, 2)


def test_global_avg_pool_and_linear_by_hand():
    x = np.arange(8, dtype=np.float64).reshape(1, 2, 2, 2)
    assert_array_equal(reference.global_avg_pool2d_forward(x), [[1.5, 5.5]])
    out = reference.linear_forward(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [5.0, 6.0]]),
                                   np.array([0.5, -0.5]))
    assert_array_equal(out, [[11.5, 16.5]])


# ----------------------------------------------------------------------------------------------
# Finite differences (float64).

CONV_GEOMETRIES = [
    # (x shape, weight shape, stride, padding, dilation, groups)
    ((2, 2, 5, 4), (2, 2, 2, 3), (1, 1), (0, 0), (1, 1), 1),
    ((1, 4, 6, 5), (4, 2, 3, 2), (2, 1), (1, 2), (1, 2), 2),          # groups, stride, pad, dilation
    ((1, 3, 5, 6), (3, 1, 3, 3), (1, 2), (2, 1), (2, 1), 3),          # depthwise
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: f"x{g[0]}w{g[1]}s{g[2]}p{g[3]}d{g[4]}g{g[5]}")
def test_reference_conv2d_gradients_match_finite_differences(geometry, rng):
    x_shape, w_shape, stride, padding, dilation, groups = geometry
    x, weight, bias = randn(rng, x_shape, np.float64), randn(rng, w_shape, np.float64), \
        randn(rng, (w_shape[0],), np.float64)
    out = reference.conv2d_forward(x, weight, bias, stride, padding, dilation, groups)
    dout = randn(rng, out.shape, np.float64)

    def loss():
        return float(np.sum(reference.conv2d_forward(x, weight, bias, stride, padding, dilation, groups)
                            * dout))

    dx, dweight, dbias = reference.conv2d_backward(dout, x, weight, stride, padding, dilation, groups)
    check(dx, numerical_gradient(loss, x), "conv2d dx")
    check(dweight, numerical_gradient(loss, weight), "conv2d dweight")
    check(dbias, numerical_gradient(loss, bias), "conv2d dbias")


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((2, 2), (2, 2), (0, 0), (1, 1)),
    ((3, 2), (1, 2), (1, 1), (1, 1)),        # overlapping windows
    ((2, 3), (1, 1), (1, 1), (2, 2)),        # dilation
])
def test_reference_max_pool_gradient_matches_finite_differences(kernel, stride, padding, dilation, rng):
    # Distinct values with gaps >> EPS keep every argmax fixed under the perturbation.
    x = rng.permutation(2 * 2 * 5 * 6).reshape(2, 2, 5, 6).astype(np.float64) * 0.01
    out, argmax = reference.max_pool2d_forward(x, kernel, stride, padding, dilation)
    dout = randn(rng, out.shape, np.float64)

    def loss():
        return float(np.sum(reference.max_pool2d_forward(x, kernel, stride, padding, dilation)[0] * dout))

    check(reference.max_pool2d_backward(dout, argmax, x.shape), numerical_gradient(loss, x), "max_pool2d dx")


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 2), (2, 1), (1, 1))])
def test_reference_avg_pool_gradient_matches_finite_differences(kernel, stride, padding,
                                                                count_include_pad, rng):
    x = randn(rng, (2, 2, 5, 6), np.float64)
    out = reference.avg_pool2d_forward(x, kernel, stride, padding, count_include_pad)
    dout = randn(rng, out.shape, np.float64)

    def loss():
        return float(np.sum(reference.avg_pool2d_forward(x, kernel, stride, padding, count_include_pad)
                            * dout))

    dx = reference.avg_pool2d_backward(dout, x.shape, kernel, stride, padding, count_include_pad)
    check(dx, numerical_gradient(loss, x), "avg_pool2d dx")


def test_reference_global_avg_pool_gradient_matches_finite_differences(rng):
    x = randn(rng, (2, 3, 4, 5), np.float64)
    dout = randn(rng, (2, 3), np.float64)
    check(reference.global_avg_pool2d_backward(dout, x.shape),
          numerical_gradient(lambda: float(np.sum(reference.global_avg_pool2d_forward(x) * dout)), x),
          "global_avg_pool2d dx")


def test_reference_linear_gradients_match_finite_differences(rng):
    x, weight, bias = randn(rng, (3, 5), np.float64), randn(rng, (4, 5), np.float64), \
        randn(rng, (4,), np.float64)
    dout = randn(rng, (3, 4), np.float64)

    def loss():
        return float(np.sum(reference.linear_forward(x, weight, bias) * dout))

    dx, dweight, dbias = reference.linear_backward(dout, x, weight)
    check(dx, numerical_gradient(loss, x), "linear dx")
    check(dweight, numerical_gradient(loss, weight), "linear dweight")
    check(dbias, numerical_gradient(loss, bias), "linear dbias")
