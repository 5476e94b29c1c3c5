"""`chexcy evaluate`: ROC AUC per observation of a checkpoint on prepared data, as radiology papers report it.

Reported: image-level AUC (every view scored on its own), study-level AUC (a study's probability is the
maximum over its views, as in the CheXpert paper), the mean over the 5 competition tasks, optional
percentile-bootstrap 95% intervals (rows resampled; for study level, studies resampled), and the label
policy of the prepared data (an AUC means little without it). `--plot DIR` draws ROC curves and the
training curves of the checkpoint's log.jsonl (matplotlib, the optional extra `plot`).

Every file is written through chexcy.fileio.atomic_write (whole or not at all, with the umask's
permissions); an output folder that does not exist is an error, except the one --plot names, which is
created when its parent exists.
"""
import json
import math
import os
import sys

import numpy as np

from chexcy import metrics
from chexcy.data.prepare import policy_text  # noqa: F401  (its home is the policy code)
from chexcy.scoring import Predictions, predict_dataset  # noqa: F401  (chexcy.evaluate.* for callers)


def study_keys(dataset):
    """int64 (N,): a study number per dataset row (rows of one patient's study share it)."""
    meta = dataset.meta
    key = meta["patient"].astype(str) + "/" + meta["study"].astype(str)
    _, inverse = np.unique(key.to_numpy(), return_inverse=True)
    return inverse.astype(np.int64)


def study_level(pred, dataset):
    """Image-level Predictions -> (probs (S, 14), labels (S, 14)): the max probability over each study's views
    and the study's labels (its first view's; views of a study share their labels)."""
    if pred.kind == "study":
        return pred.probs, pred.labels
    keys = study_keys(dataset)[pred.groups]
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    probs = np.zeros((len(uniq), pred.probs.shape[1]))
    np.maximum.at(probs, inverse, pred.probs)
    return probs, pred.labels[first]


def mean5(aucs):
    from chexcy.data import COMPETITION_TASKS, LABELS
    return metrics.mean_auc(aucs, LABELS, COMPETITION_TASKS)


def _auc_with_ci(labels, probs, n_boot, seed, min_count):
    """(aucs (L,), ci (L, 2) or None, mean5, mean5 interval or None)."""
    from chexcy.data import COMPETITION_TASKS, LABELS
    aucs = metrics.per_label_auc(labels, probs, min_count=min_count)
    if not n_boot:
        return aucs, None, mean5(aucs), None
    samples = metrics.bootstrap_auc_samples(labels, probs, n_boot=n_boot, seed=seed)
    ci = metrics.percentile_interval(samples)
    ci[np.isnan(aucs)] = np.nan
    task_cols = [LABELS.index(t) for t in COMPETITION_TASKS]
    means = samples[:, task_cols].mean(axis=1)        # NaN when a resample lacks a class in a task
    mean_ci = metrics.percentile_interval(means[:, None])[0]
    return aucs, ci, mean5(aucs), mean_ci


def evaluate_checkpoint(checkpoint, data, bootstrap=0, seed=0, batch_size=64, min_count=metrics.MIN_CLASS_COUNT):
    """Evaluate a checkpoint (path or chexcy.checkpoint.Checkpoint) on a prepared folder. Returns a dict
    with image- and study-level AUCs (lists, None = n/a), means over the 5 tasks, intervals and counts."""
    from chexcy.checkpoint import Checkpoint, load_checkpoint
    from chexcy.data import LABELS
    from chexcy.data.dataset import open_dataset
    from chexcy.train import _check_image_size
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    dataset = open_dataset(data)
    _check_image_size(dataset, ckpt.image_size, f"--data {data}")
    model = ckpt.build_model()
    pred = predict_dataset(model, dataset, batch_size=batch_size)
    result = dict(checkpoint=str(ckpt.path), data=str(data), arch=ckpt.config["arch"],
                  policy=policy_text(getattr(dataset, "manifest", {}) or {}),
                  train_policy=ckpt.config.get("policy"), labels=list(LABELS), loss=pred.loss, kind=pred.kind)
    levels = []
    if pred.kind == "image":
        levels.append(("image", pred.labels, pred.probs))
    s_probs, s_labels = study_level(pred, dataset)
    levels.append(("study", s_labels, s_probs))
    for name, labels, probs in levels:
        aucs, ci, m5, m5_ci = _auc_with_ci(labels, probs, bootstrap, seed, min_count)
        n_pos, n_neg = metrics.class_counts(labels)
        result[name] = dict(n=len(labels), auc=aucs, ci=ci, mean5=m5, mean5_ci=m5_ci, n_pos=n_pos, n_neg=n_neg,
                            labels=labels, probs=probs)
    return result


def format_report(result):
    """The printed report of evaluate_checkpoint's result (str)."""
    from chexcy.data import LABELS
    lines = [f"checkpoint: {result['checkpoint']} ({result['arch']})",
             f"data: {result['data']} | {result['policy']}"]
    if result.get("train_policy") and result["train_policy"] != result["policy"]:
        lines.append(f"(trained with {result['train_policy']})")
    primary = result.get("image") or result["study"]
    extra = {"study": result["study"]["auc"]} if "image" in result else None
    level = "image-level (each view)" if "image" in result else "study-level (frontal + lateral model)"
    lines.append(f"{primary['n']} {'images' if 'image' in result else 'studies'}, {result['study']['n']} studies; "
                 f"loss {result['loss']:.4f}; AUC {level}" + (", study = max over a study's views" if extra else ""))
    lines.append(metrics.auc_table(LABELS, primary["auc"], primary["n_pos"], primary["n_neg"], primary["ci"], extra))

    def mean_line(name, level_result):
        text = f"mean AUC over the 5 competition tasks, {name}: {metrics.format_auc(level_result['mean5']).strip()}"
        if level_result["mean5_ci"] is not None and not math.isnan(level_result["mean5_ci"][0]):
            lo, hi = level_result["mean5_ci"]
            text += f"  95% CI [{lo:.3f}, {hi:.3f}]"
        return text

    if "image" in result:
        lines.append(mean_line("image level", result["image"]))
    lines.append(mean_line("study level", result["study"]))
    if primary["ci"] is not None:
        lines.append("(95% CIs: percentile bootstrap over "
                     f"{'images' if 'image' in result else 'studies'}; n/a: fewer than "
                     f"{metrics.MIN_CLASS_COUNT} positives or negatives)")
    else:
        lines.append(f"(n/a: fewer than {metrics.MIN_CLASS_COUNT} positives or negatives)")
    return "\n".join(lines)


def result_json(result):
    """evaluate_checkpoint's result as JSON-able dict (no per-row arrays)."""
    out = {k: v for k, v in result.items() if k not in ("image", "study")}
    for level in ("image", "study"):
        if level in result:
            r = result[level]
            out[level] = dict(n=r["n"], mean5=None if math.isnan(r["mean5"]) else r["mean5"],
                              auc={n: (None if math.isnan(a) else float(a)) for n, a in zip(result["labels"], r["auc"])},
                              n_pos=r["n_pos"].tolist(), n_neg=r["n_neg"].tolist())
            if r["ci"] is not None:
                out[level]["ci"] = {n: (None if math.isnan(c[0]) else c.tolist()) for n, c in zip(result["labels"], r["ci"])}
    return out


# -- plots -----------------------------------------------------------------------------------------------
# What to type to get matplotlib, from where a user of chexcy stands: chexcy is installed from a clone
# (`pip install .`), not from a package index, so `pip install 'chexcy[plot]'` would not find it.
MATPLOTLIB_INSTALL = "pip install matplotlib"
MATPLOTLIB_INSTALL_FROM_CLONE = 'pip install ".[plot]"'
MATPLOTLIB_HINT = f"{MATPLOTLIB_INSTALL} (or, in the chexcy folder: {MATPLOTLIB_INSTALL_FROM_CLONE})"


def require_matplotlib(what="--plot"):
    """Import matplotlib with the Agg backend, or raise RuntimeError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(f"{what} needs matplotlib, which is not installed: {MATPLOTLIB_HINT}") from None
    return plt


def save_figure(fig, path):
    """A matplotlib figure -> PNG at path, written atomically with the umask's permissions; returns path.

    The figure is closed afterwards, also when the write fails: pyplot keeps every open figure alive."""
    from chexcy.fileio import atomic_write
    plt = require_matplotlib()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


# ROC curves: 14 (colour, line style) pairs that differ, the 5 competition tasks solid and thick.
ROC_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:gray", "tab:olive", "tab:cyan")


def roc_style(j, name):
    """Line keyword arguments of label j (name) in ROC plots: distinct for each of the 14 labels."""
    from chexcy.data import COMPETITION_TASKS
    task = name in COMPETITION_TASKS
    # Labels j and j + 10 share a colour; the style tells them apart (solid task, dashed, dotted).
    style = "-" if task else ("--" if j < len(ROC_COLOURS) else ":")
    return dict(color=ROC_COLOURS[j % len(ROC_COLOURS)], linestyle=style, lw=2.2 if task else 1.2)


def roc_figure(result):
    """The matplotlib figure of plot_roc (for tests and notebooks)."""
    from chexcy.data import LABELS
    plt = require_matplotlib()
    level = result.get("image") or result["study"]
    fig, ax = plt.subplots(figsize=(7, 6.5))
    for j, name in enumerate(LABELS):
        if math.isnan(level["auc"][j]):
            continue
        present = ~np.isnan(level["labels"][:, j])
        fpr, tpr, _ = metrics.roc_curve(level["labels"][present, j], level["probs"][present, j])
        ax.plot(fpr, tpr, label=f"{name} {level['auc'][j]:.3f}", **roc_style(j, name))
    ax.plot([0, 1], [0, 1], color="black", linestyle=(0, (1, 4)), lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"ROC ({'image' if 'image' in result else 'study'} level), AUC in the legend\n"
                 f"labels: {result['policy']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right", handlelength=3)
    return fig


def plot_roc(result, path):
    """ROC curves of the labels that have an AUC (the 5 competition tasks solid and thicker) -> PNG at path."""
    return save_figure(roc_figure(result), path)


def auc_axis_limits(values, min_span=0.1):
    """(low, high) of an AUC axis showing `values`: at least `min_span` wide, inside [0, 1], so that a
    short run's 0.600-0.608 is not blown up into a steep climb."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.5, 0.5)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    shift = max(0.0, -lo) - max(0.0, hi - 1.0)
    return max(0.0, lo + shift), min(1.0, hi + shift)


def training_figure(log_path):
    """The matplotlib figure of plot_training (for tests and notebooks)."""
    from matplotlib.ticker import MaxNLocator

    from chexcy.runlog import read_log
    plt = require_matplotlib()
    records = read_log(log_path)
    steps = {}
    for r in records:
        if r.get("event") == "step":
            steps[r["global_step"]] = r["loss"]
    epochs = {}
    for r in records:
        if r.get("event") == "epoch":
            epochs[r["epoch"]] = r
    if not steps:
        raise ValueError(f"{log_path}: no training steps logged")
    xs = np.array(sorted(steps))
    ys = np.array([steps[x] for x in xs])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    k = len(ys) // 50                      # a moving mean only where there are steps enough to smooth
    few = len(ys) <= 200                   # few steps: each one is worth seeing, with a marker
    ax1.plot(xs, ys, color="tab:blue", lw=1.0 if few else 0.6, alpha=0.9 if few or k < 2 else 0.35,
             marker="." if few else None, markersize=4, label="step loss")
    if k >= 2:
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax1.plot(xs[k - 1:], smooth, color="tab:blue", lw=1.8, label=f"moving mean ({k} steps)")
    ep = sorted(epochs)
    if ep:
        ax1.plot([epochs[e]["global_step"] for e in ep], [epochs[e]["train_loss"] for e in ep], "o-",
                 color="tab:orange", label="epoch train loss")
        if any(epochs[e].get("valid_loss") is not None for e in ep):
            ax1.plot([epochs[e]["global_step"] for e in ep], [epochs[e].get("valid_loss") for e in ep], "s-",
                     color="tab:green", label="valid loss")
    ax1.set(xlabel="step", ylabel="loss", title="loss")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.legend(fontsize=8)
    aucs = [(e, epochs[e].get("mean_auc")) for e in ep if epochs[e].get("mean_auc") is not None]
    if aucs:
        ax2.plot([a[0] for a in aucs], [a[1] for a in aucs], "o-", color="tab:green")
    else:
        ax2.text(0.5, 0.5, "no validation AUC logged\n(train with --valid)", ha="center", va="center",
                 transform=ax2.transAxes)
    ax2.set_ylim(*auc_axis_limits([a[1] for a in aucs]))
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set(xlabel="epoch", ylabel="mean AUC (5 tasks)", title="validation mean AUC (5 competition tasks)")
    return fig


def plot_training(log_path, path):
    """Training curves from a log.jsonl: per-step loss (and a moving average on long runs), validation
    loss and mean AUC per epoch -> PNG at path. Steps replayed after a resume count once (the later
    record wins)."""
    return save_figure(training_figure(log_path), path)


def check_output_paths(args):
    """Refuse, before any scoring, output paths that cannot be written: --json FILE in a folder that does
    not exist (a typo there must not create folders), a --json that is a folder, a --plot DIR whose
    parent does not exist or that is a file."""
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            raise ValueError(f"--json {args.json} is a folder; give a file name (e.g. {os.path.join(args.json, 'eval.json')})")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--json {args.json}: folder {folder} does not exist (create it first)")
    if args.plot:
        parent = os.path.dirname(os.path.abspath(args.plot))
        if os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise ValueError(f"--plot {args.plot} is a file, not a folder")
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"--plot {args.plot}: folder {parent} does not exist (create it first)")


def find_log(checkpoint_path):
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "log.jsonl")
    return path if os.path.exists(path) else None


def run(args):
    """`chexcy evaluate` (argparse namespace) -> exit status."""
    from chexcy import ops
    if args.threads:
        ops.set_num_threads(args.threads)
    if args.plot:
        require_matplotlib()      # fail before the (possibly long) scoring, with the install hint
    check_output_paths(args)
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    from chexcy.checkpoint import CheckpointError, load_checkpoint
    from chexcy.predict import check_weights_finite
    ckpt = load_checkpoint(args.checkpoint)
    try:
        check_weights_finite(ckpt)
    except CheckpointError as exc:                     # a readable file that cannot do the job: a failure
        print(f"chexcy evaluate: error: {exc}", file=sys.stderr)
        return 1
    result = evaluate_checkpoint(ckpt, args.data, bootstrap=args.bootstrap, seed=args.seed,
                                 batch_size=args.batch_size, min_count=args.min_count)
    print(format_report(result))
    if args.json:
        from chexcy.fileio import atomic_write_text
        text = json.dumps(result_json(result), indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else v)
        atomic_write_text(args.json, text + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)      # its parent exists (check_output_paths)
        print(f"wrote {plot_roc(result, os.path.join(args.plot, 'roc.png'))}")
        log = find_log(args.checkpoint)
        if log:
            print(f"wrote {plot_training(log, os.path.join(args.plot, 'training.png'))}")
        else:
            print(f"no log.jsonl beside {args.checkpoint}: training curves not drawn", file=sys.stderr)
    return 0
