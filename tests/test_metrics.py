"""chexcy.metrics: ROC AUC equal to scikit-learn's roc_auc_score (ties included), per-label tables, CIs."""
import math

import numpy as np
import pytest

from chexcy import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")   # test-only dependency ([test] extra)


def test_auc_hand_cases():
    # Perfect ranking, reversed ranking, all tied, and one tie between a positive and a negative.
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # pairs (pos, neg): (0.4 vs 0.1) 1, (0.4 vs 0.4) 0.5, (0.9 vs both) 1 + 1 -> 3.5 / 4
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.9]) == 0.875


@pytest.mark.parametrize("seed", range(20))
def test_auc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    # Coarse scores force many ties, some runs mix classes.
    scores = np.round(rng.standard_normal(n) + 0.7 * y, int(rng.integers(0, 3))).astype(np.float32)
    got = metrics.roc_auc(y, scores)
    want = sklearn_metrics.roc_auc_score(y, scores)
    assert abs(got - want) <= 1e-12, (got, want)


def test_auc_needs_both_classes_and_valid_input():
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        metrics.roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_auc([0, 1], [0.1, np.nan])


def test_roc_curve_area_matches_auc():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.standard_normal(300) + y, 1)
    fpr, tpr, thr = metrics.roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert abs(area - metrics.roc_auc(y, s)) < 1e-12


def test_per_label_auc_masks_nan_and_needs_enough_of_each_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (100, 3)).astype(np.float64)
    s = rng.standard_normal((100, 3)) + y
    y[:50, 0] = np.nan                       # column 0: only the last 50 rows are labelled
    y[:, 2] = 0.0
    y[:3, 2] = 1.0                           # column 2: 3 positives, below min_count=5
    aucs = metrics.per_label_auc(y, s, min_count=5)
    assert aucs[0] == metrics.roc_auc(y[50:, 0], s[50:, 0])
    assert aucs[1] == metrics.roc_auc(y[:, 1], s[:, 1])
    assert math.isnan(aucs[2])
    assert not math.isnan(metrics.per_label_auc(y, s, min_count=3)[2])
    table = metrics.auc_table(["A", "B", "C"], aucs, *metrics.class_counts(y))
    assert table.splitlines()[-1].split()[:2] == ["C", "n/a"]


def test_bootstrap_ci_brackets_auc_and_is_reproducible():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (200, 2)).astype(np.float64)
    s = rng.standard_normal((200, 2)) + y
    ci = metrics.bootstrap_auc_ci(y, s, n_boot=200, seed=7)
    aucs = metrics.per_label_auc(y, s)
    assert np.all(ci[:, 0] < aucs) and np.all(aucs < ci[:, 1])
    assert np.array_equal(ci, metrics.bootstrap_auc_ci(y, s, n_boot=200, seed=7))
    assert np.all(ci[:, 1] - ci[:, 0] < 0.3)


def test_mean_auc_over_tasks():
    names = ["a", "b", "c"]
    assert metrics.mean_auc(np.array([0.5, 0.7, 0.9]), names, ["a", "c"]) == pytest.approx(0.7)
    assert math.isnan(metrics.mean_auc(np.array([0.5, np.nan, 0.9]), names, ["a", "b"]))
    with pytest.raises(ValueError, match="not among"):
        metrics.mean_auc(np.array([0.5, 0.7, 0.9]), names, ["z"])
