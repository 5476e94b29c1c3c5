"""`chexcy evaluate`: ROC AUC per observation of a checkpoint on prepared data, as radiology papers report it.

Reported: image-level AUC (every view scored on its own), study-level AUC (a study's probability is the
maximum over its views, as in the CheXpert paper), the mean over the 5 competition tasks, optional
percentile-bootstrap 95% intervals (rows resampled; for study level, studies resampled), and the label
policy of the prepared data (an AUC means little without it). `--plot DIR` draws ROC curves and the
training curves of the checkpoint's log.jsonl (matplotlib, the optional extra `chexcy[plot]`).
"""
import collections
import json
import math
import os
import sys

import numpy as np

from chexcy import metrics
from chexcy.nn import bce_with_logits, sigmoid

Predictions = collections.namedtuple("Predictions", "probs labels loss groups kind")
Predictions.__doc__ = """Scores of a dataset: probs float64 (M, 14) in [0, 1]; labels float64 (M, 14) 0/1 with NaN
where not labelled; loss the masked mean BCE; groups int64 (M,) dataset rows (kind "image") or study
numbers (kind "study")."""


UNCERTAIN_NAMES = {"ignore": "U-Ignore", "zeros": "U-Zeros", "ones": "U-Ones"}
BLANK_NAMES = {"ignore": "masked", "zeros": "read as negative (0)"}


def policy_text(manifest):
    """A one-line statement of a prepared folder's label policy (manifest["policy"] as `chexcy prepare`
    writes it: {"uncertain": {label: "ignore"|"zeros"|"ones"}, "blank": "ignore"|"zeros"})."""
    policy = manifest.get("policy") if isinstance(manifest, dict) else None
    if not isinstance(policy, dict) or not isinstance(policy.get("uncertain"), dict):
        return "label policy unknown (no policy in manifest.json)" if policy is None else f"label policy {policy!r}"
    modes = policy["uncertain"]
    counts = collections.Counter(modes.values())
    default = counts.most_common(1)[0][0]
    text = f"uncertain (-1) {UNCERTAIN_NAMES.get(default, default)}"
    exceptions = collections.defaultdict(list)
    for label, mode in modes.items():
        if mode != default:
            exceptions[mode].append(label)
    if exceptions:
        text += " (" + "; ".join(f"{UNCERTAIN_NAMES.get(m, m)} for {', '.join(names)}"
                                 for m, names in sorted(exceptions.items())) + ")"
    blank = policy.get("blank")
    return f"{text}, blank {BLANK_NAMES.get(blank, blank)}"


def predict_dataset(model, dataset, batch_size=64, pos_weight=None):
    """Score every image (image models) or every study (multiview) of `dataset` in eval mode -> Predictions.

    The model is left in eval mode; the loss uses `pos_weight` (L,) when given, as training does.
    """
    from chexcy.train import make_loader
    model.eval()
    loader = make_loader(model, dataset, batch_size, shuffle=False, seed=0, augment=False)
    logits, labels, groups = [], [], []
    for batch in loader.batches(0):
        logits.append(np.asarray(model.forward_batch(batch), dtype=np.float64))
        labels.append(np.where(np.asarray(batch.mask) > 0, batch.labels, np.nan))
        groups.append(np.asarray(batch.index if model.input_kind == "image" else batch.study_rows))
    logits = np.concatenate(logits) if logits else np.zeros((0, 14))
    labels = np.concatenate(labels).astype(np.float64) if labels else np.zeros((0, 14))
    groups = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    loss, _ = bce_with_logits(logits, labels, pos_weight=pos_weight)
    return Predictions(sigmoid(logits), labels, loss, groups, model.input_kind)


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
    from chexcy.train import _check_image_size, open_dataset
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
def require_matplotlib():
    """Import matplotlib with the Agg backend, or raise RuntimeError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install 'chexcy[plot]'") from None
    return plt


def _save_figure(fig, path):
    from chexcy.fileio import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def plot_roc(result, path):
    """ROC curves of the labels that have an AUC (the 5 competition tasks drawn thicker) -> PNG at path."""
    from chexcy.data import COMPETITION_TASKS, LABELS
    plt = require_matplotlib()
    level = result.get("image") or result["study"]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for j, name in enumerate(LABELS):
        if math.isnan(level["auc"][j]):
            continue
        present = ~np.isnan(level["labels"][:, j])
        fpr, tpr, _ = metrics.roc_curve(level["labels"][present, j], level["probs"][present, j])
        task = name in COMPETITION_TASKS
        ax.plot(fpr, tpr, lw=2.0 if task else 0.8, alpha=1.0 if task else 0.5,
                label=f"{name} {level['auc'][j]:.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"ROC ({'image' if 'image' in result else 'study'} level)\nlabels: {result['policy']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_training(log_path, path):
    """Training curves from a log.jsonl: per-step loss (and a moving average), validation loss and mean AUC
    per epoch -> PNG at path. Steps replayed after a resume count once (the later record wins)."""
    from chexcy.train import read_log
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
    ax1.plot(xs, ys, lw=0.5, alpha=0.4, label="step loss")
    k = max(1, len(ys) // 50)
    if len(ys) >= k:
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax1.plot(xs[k - 1:], smooth, lw=1.5, label=f"moving mean ({k})")
    ep = sorted(epochs)
    if ep:
        ax1.plot([epochs[e]["global_step"] for e in ep], [epochs[e]["train_loss"] for e in ep], "o-", label="epoch train loss")
        if any(epochs[e].get("valid_loss") is not None for e in ep):
            ax1.plot([epochs[e]["global_step"] for e in ep], [epochs[e].get("valid_loss") for e in ep], "s-",
                     label="valid loss")
    ax1.set(xlabel="step", ylabel="loss", title="loss")
    ax1.legend(fontsize=8)
    aucs = [(e, epochs[e].get("mean_auc")) for e in ep if epochs[e].get("mean_auc") is not None]
    if aucs:
        ax2.plot([a[0] for a in aucs], [a[1] for a in aucs], "o-")
    ax2.set(xlabel="epoch", ylabel="mean AUC (5 tasks)", title="validation mean AUC (5 competition tasks)")
    _save_figure(fig, path)
    plt.close(fig)
    return path


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
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    result = evaluate_checkpoint(args.checkpoint, args.data, bootstrap=args.bootstrap, seed=args.seed,
                                 batch_size=args.batch_size, min_count=args.min_count)
    print(format_report(result))
    if args.json:
        from chexcy.fileio import atomic_write
        text = json.dumps(result_json(result), indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else v)
        atomic_write(args.json, lambda f: f.write(text.encode()))
        print(f"wrote {args.json}")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        print(f"wrote {plot_roc(result, os.path.join(args.plot, 'roc.png'))}")
        log = find_log(args.checkpoint)
        if log:
            print(f"wrote {plot_training(log, os.path.join(args.plot, 'training.png'))}")
        else:
            print(f"no log.jsonl beside {args.checkpoint}: training curves not drawn", file=sys.stderr)
    return 0
