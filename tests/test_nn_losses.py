"""Masked multi-label BCE with logits: values against a direct formula, stability at +-100, masking, pos_weight,
and the gradient against central finite differences (float64)."""
import numpy as np
import pytest

from chexcy.nn import BCEWithLogitsLoss, bce_with_logits


def direct_bce(z, y, w):
    """The textbook formula (fine for moderate logits): -(w y log s + (1 - y) log(1 - s))."""
    s = 1 / (1 + np.exp(-z))
    return -(w * y * np.log(s) + (1 - y) * np.log(1 - s))


def test_value_matches_direct_formula_with_mask_and_pos_weight():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 14)) * 3
    y = rng.integers(0, 2, (6, 14)).astype(np.float64)
    y[rng.random((6, 14)) < 0.3] = np.nan
    w = rng.uniform(0.5, 4, 14)
    loss, _ = bce_with_logits(z, y, pos_weight=w)
    present = ~np.isnan(y)
    want = direct_bce(z, np.nan_to_num(y), w)[present].mean()
    assert loss == pytest.approx(want, rel=1e-12)


def test_stable_at_plus_minus_100():
    z = np.array([[100.0, -100.0, 100.0, -100.0]], dtype=np.float32)
    y = np.array([[1.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    loss, grad = bce_with_logits(z, y)
    # Right answers: ~0, ~0, 100 and 100 (softplus(100) = 100 + log1p(e^-100)).
    assert loss == pytest.approx((0 + 0 + 100 + 100) / 4, rel=1e-12)
    assert np.all(np.isfinite(grad)) and grad.dtype == np.float32
    assert grad[0, 0] == pytest.approx(0, abs=1e-30) and grad[0, 2] == pytest.approx(0.25)
    assert grad[0, 3] == pytest.approx(-0.25)


def test_mask_argument_and_nan_targets_agree_and_mean_is_over_present_labels():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4, 5))
    y = rng.integers(0, 2, (4, 5)).astype(np.float64)
    mask = (rng.random((4, 5)) > 0.5).astype(np.float32)
    mask[0, 0] = 1
    y_nan = np.where(mask > 0, y, np.nan)
    a = bce_with_logits(z, np.where(mask > 0, y, 0), mask=mask)
    b = bce_with_logits(z, y_nan)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert np.all(a[1][mask == 0] == 0)
    # Changing a masked logit changes nothing.
    z2 = z.copy()
    z2[mask == 0] += 50
    assert bce_with_logits(z2, y_nan)[0] == b[0]
    # Mean over present labels: one present label gives exactly its own loss.
    only = np.full_like(y, np.nan)
    only[2, 3] = 1.0
    assert bce_with_logits(z, only)[0] == pytest.approx(np.log1p(np.exp(-z[2, 3])))


def test_nothing_present_gives_zero():
    loss, grad = bce_with_logits(np.ones((2, 3), np.float32), np.full((2, 3), np.nan))
    assert loss == 0.0 and np.all(grad == 0)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((3, 4)) * 2
    y = rng.random((3, 4))                    # soft targets too
    y[0, 1] = np.nan
    w = rng.uniform(0.5, 3, 4)
    _, grad = bce_with_logits(z, y, pos_weight=w)
    eps = 1e-6
    num = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        num[idx] = (bce_with_logits(zp, y, pos_weight=w)[0] - bce_with_logits(zm, y, pos_weight=w)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, num, rtol=1e-7, atol=1e-10)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="targets"):
        bce_with_logits(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="pos_weight"):
        bce_with_logits(np.zeros((2, 3)), np.zeros((2, 3)), pos_weight=np.ones(2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bce_with_logits(np.zeros((1, 2)), np.array([[-1.0, 0.0]]))
    crit = BCEWithLogitsLoss()
    with pytest.raises(RuntimeError):
        crit.backward()
