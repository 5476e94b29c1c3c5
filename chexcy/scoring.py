"""Scoring a dataset: predictions of a model over every image or study, gathered across ranks.

`predict_dataset` is the one scoring loop: `chexcy evaluate`, `chexcy predict`'s evaluation and the
validation of `chexcy train` (on one process or K ranks) all run it.
"""
import collections

import numpy as np

from chexcy.comm import LocalComm, shard
from chexcy.data import NUM_CLASSES
from chexcy.data.loader import make_loader
from chexcy.nn import bce_with_logits, sigmoid

Predictions = collections.namedtuple("Predictions", "probs labels loss groups kind")
Predictions.__doc__ = """Scores of a dataset: probs float64 (M, 14) in [0, 1]; labels float64 (M, 14) 0/1 with NaN
where not labelled; loss the masked mean BCE; groups int64 (M,) dataset rows (kind "image") or study
numbers (kind "study")."""


def predict_dataset(model, dataset, batch_size=64, pos_weight=None, comm=None):
    """Score every image (image models) or every study (multiview) of `dataset` in eval mode -> Predictions.

    The model is left in eval mode; the loss uses `pos_weight` (L,) when given, as training does.
    comm (chexcy.comm communicator, None for one process): each rank scores its part of every batch; the
    scores are gathered on rank 0 (Gatherv), put back in row order and shared with every rank, so the
    result (and which checkpoint is best) is that of the whole set and the same everywhere.
    """
    comm = LocalComm() if comm is None else comm
    model.eval()
    loader = make_loader(model, dataset, batch_size, shuffle=False, seed=0, augment=False)
    if comm.size > 1:
        loader.shard = lambda positions: shard(positions, comm)
    logits, labels = [np.zeros((0, NUM_CLASSES))], [np.zeros((0, NUM_CLASSES))]
    groups = [np.zeros(0, np.int64)]
    for batch in loader.batches(0):
        if len(batch.labels) == 0:          # a batch smaller than the number of ranks
            continue
        logits.append(np.asarray(model.forward_batch(batch), dtype=np.float64))
        labels.append(np.where(np.asarray(batch.mask) > 0, batch.labels, np.nan).astype(np.float64))
        groups.append(np.asarray(batch.index if model.input_kind == "image" else batch.study_rows, np.int64))
    logits, labels, groups = (np.concatenate(a) for a in (logits, labels, groups))
    if comm.size > 1:
        logits, labels, groups = comm.bcast_object([comm.gatherv_rows(a) for a in (logits, labels, groups)])
        order = np.argsort(groups, kind="stable")    # the order one process produces
        logits, labels, groups = logits[order], labels[order], groups[order]
    loss, _ = bce_with_logits(logits, labels, pos_weight=pos_weight)
    return Predictions(sigmoid(logits), labels, loss, groups, model.input_kind)
