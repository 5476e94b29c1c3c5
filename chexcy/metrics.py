"""ROC AUC, the figure radiology papers report per observation, plus the helpers around it.

`roc_auc(y_true, y_score)` equals scikit-learn's ``roc_auc_score`` for binary targets, ties included: it
is the Mann-Whitney statistic, i.e. the probability that a random positive scores above a random negative,
counting a tie as one half. That is exactly the area under the ROC curve drawn with diagonal segments
through tied scores (what scikit-learn's trapezoidal rule computes).

Shapes: y_true (N,) of 0/1 (float or int), y_score (N,) of any real dtype; per-label helpers take
(N, L) arrays where NaN in y_true means "no label" and the row is left out for that column only.
"""
import math

import numpy as np

# A label column gets an AUC in training/evaluation reports only when it has at least this many
# positives and this many negatives (fewer makes the number noise). One source of truth.
MIN_CLASS_COUNT = 5


def _average_ranks(values):
    """Ranks 1..N of values (N,), ties getting the mean of the ranks they span. float64 (N,)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    n = len(values)
    # Start of each run of equal values in sorted order.
    boundaries = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1], True])
    starts, ends = boundaries[:-1], boundaries[1:]          # run covers sorted positions [start, end)
    mean_rank = (starts + ends + 1) / 2.0                     # mean of ranks start+1 .. end
    ranks_sorted = np.repeat(mean_rank, ends - starts)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def _check_binary(y_true, y_score, name="roc_auc"):
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 1 or y_score.ndim != 1 or len(y_true) != len(y_score):
        raise ValueError(f"{name}: y_true and y_score must be 1-D of the same length, "
                         f"got {y_true.shape} and {y_score.shape}")
    if np.isnan(y_score).any():
        raise ValueError(f"{name}: y_score contains NaN")
    y_true = y_true.astype(np.float64)
    if not np.isin(y_true, (0.0, 1.0)).all():
        bad = y_true[~np.isin(y_true, (0.0, 1.0))][:3]
        raise ValueError(f"{name}: y_true must hold only 0 and 1, found e.g. {bad.tolist()}")
    return y_true.astype(bool), y_score


def roc_auc(y_true, y_score):
    """Area under the ROC curve of binary targets y_true (N,) for scores y_score (N,). Returns a float.

    Raises ValueError when only one class is present (the AUC is undefined), like scikit-learn.
    """
    positive, score = _check_binary(y_true, y_score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = _average_ranks(score)
    # Rank sums are integers or half-integers well below 2**53, so this is exact until the division.
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true, y_score):
    """ROC curve points for plotting: (fpr, tpr, thresholds), float64 arrays of equal length.

    One point per distinct score (highest first) plus the origin; threshold t means "positive if score >= t".
    """
    positive, score = _check_binary(y_true, y_score, "roc_curve")
    order = np.argsort(-score, kind="mergesort")
    score, positive = score[order], positive[order]
    last_of_run = np.r_[score[1:] != score[:-1], True]
    tps = np.cumsum(positive)[last_of_run].astype(np.float64)
    fps = np.cumsum(~positive)[last_of_run].astype(np.float64)
    n_pos, n_neg = tps[-1] if len(tps) else 0.0, fps[-1] if len(fps) else 0.0
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.r_[0.0, np.full(len(tps), np.nan)]
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.r_[0.0, np.full(len(fps), np.nan)]
    thresholds = np.r_[np.inf, score[last_of_run]]
    return fpr, tpr, thresholds


def class_counts(y_true):
    """(n_pos, n_neg) per column of y_true (N, L) with NaN = no label. Two int64 arrays (L,)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    return (y_true == 1).sum(axis=0), (y_true == 0).sum(axis=0)


def per_label_auc(y_true, y_score, min_count=MIN_CLASS_COUNT):
    """AUC per column of y_true (N, L) (0/1, NaN = no label) and y_score (N, L).

    Returns float64 (L,): NaN where a column has fewer than `min_count` positives or negatives.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise ValueError(f"per_label_auc: y_true and y_score must both be (N, L), "
                         f"got {y_true.shape} and {y_score.shape}")
    out = np.full(y_true.shape[1], np.nan)
    n_pos, n_neg = class_counts(y_true)
    for j in range(y_true.shape[1]):
        if n_pos[j] >= max(min_count, 1) and n_neg[j] >= max(min_count, 1):
            present = ~np.isnan(y_true[:, j])
            out[j] = roc_auc(y_true[present, j], y_score[present, j])
    return out


def bootstrap_auc_samples(y_true, y_score, n_boot=1000, seed=0):
    """AUC of every column on `n_boot` bootstrap resamples of the rows (one shared row sample per
    resample for all columns, so derived statistics such as a mean over columns stay paired).

    Returns float64 (n_boot, L), NaN where a resample lacks a class in that column.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise ValueError(f"bootstrap: y_true and y_score must both be (N, L), got {y_true.shape} and {y_score.shape}")
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n, n_labels = y_true.shape
    out = np.full((n_boot, n_labels), np.nan)
    for b in range(n_boot):
        rows = rng.integers(0, n, size=n)
        yt, ys = y_true[rows], y_score[rows]
        n_pos, n_neg = class_counts(yt)
        for j in np.flatnonzero((n_pos > 0) & (n_neg > 0)):
            present = ~np.isnan(yt[:, j])
            out[b, j] = roc_auc(yt[present, j], ys[present, j])
    return out


def percentile_interval(samples, alpha=0.05, min_samples=10):
    """(lo, hi) percentile interval of each column of samples (B, L) ignoring NaN -> float64 (L, 2);
    NaN rows where fewer than `min_samples` values are usable."""
    samples = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    out = np.full((samples.shape[1], 2), np.nan)
    for j in range(samples.shape[1]):
        column = samples[:, j][~np.isnan(samples[:, j])]
        if len(column) >= min_samples:
            out[j] = np.quantile(column, [alpha / 2, 1 - alpha / 2])
    return out


def bootstrap_auc_ci(y_true, y_score, n_boot=1000, seed=0, alpha=0.05):
    """Percentile bootstrap (1 - alpha) interval of each column's AUC: float64 (L, 2) (NaN rows where
    fewer than 10 resamples had both classes)."""
    return percentile_interval(bootstrap_auc_samples(y_true, y_score, n_boot, seed), alpha)


def mean_auc(aucs, label_names, tasks):
    """Mean of the AUCs of `tasks` (names) given per-label `aucs` (L,) in `label_names` order.

    NaN when any of the tasks has no AUC (a partial mean would not be comparable across runs).
    """
    index = {name: i for i, name in enumerate(label_names)}
    missing = [t for t in tasks if t not in index]
    if missing:
        raise ValueError(f"mean_auc: tasks {missing} are not among the labels {list(label_names)}")
    values = [aucs[index[t]] for t in tasks]
    return float(np.mean(values)) if not any(math.isnan(v) for v in values) else float("nan")


def format_auc(value, width=5):
    """'0.873' or 'n/a' (right-aligned to `width`)."""
    return f"{'n/a' if value is None or math.isnan(value) else f'{value:.3f}':>{width}}"


def auc_table(label_names, aucs, n_pos=None, n_neg=None, ci=None, extra=None):
    """A plain-text table: one row per label with its AUC (n/a when undefined), class counts and CI.

    aucs (L,); n_pos/n_neg (L,) ints or None; ci (L, 2) or None; extra: optional dict column -> (L,) AUCs
    shown as more columns (e.g. study-level). Returns a str (no trailing newline).
    """
    name_w = max(len(n) for n in label_names)
    header = f"{'observation':<{name_w}}  {'AUC':>5}"
    if ci is not None:
        header += f"  {'95% CI':>13}"
    for col in (extra or {}):
        header += f"  {col:>{max(5, len(col))}}"
    if n_pos is not None:
        header += f"  {'pos':>6}  {'neg':>6}"
    lines = [header, "-" * len(header)]
    for j, name in enumerate(label_names):
        row = f"{name:<{name_w}}  {format_auc(aucs[j])}"
        if ci is not None:
            lo, hi = ci[j]
            row += "  " + (f"{'n/a':>13}" if np.isnan(lo) or np.isnan(aucs[j]) else f"[{lo:.3f}, {hi:.3f}]")
        for col, values in (extra or {}).items():
            row += f"  {format_auc(values[j], max(5, len(col)))}"
        if n_pos is not None:
            row += f"  {int(n_pos[j]):>6}  {int(n_neg[j]):>6}"
        lines.append(row)
    return "\n".join(lines)
