"""Batches for training and evaluation: `BatchLoader` (images) and `StudyLoader` (a study's views).

Determinism contract (what makes `--resume` exact):
- the order of epoch e is a permutation drawn from (seed, e) only;
- the augmentation of dataset row r in epoch e depends on (seed, e, r) only (augment.hashed_uniform);
so `batches(e, start=k)` yields exactly the batches k, k+1, ... of `batches(e)`.

Overlap: batches are assembled by `workers` background threads, up to `prefetch` batches ahead of the
caller, and handed out in order. The heavy parts (positional reads of images.npy, Pillow's affine resampling,
NumPy's float arithmetic) release the GIL, so the threads run while the caller computes.
"""
import math
from collections import deque, namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from chexcy.data.augment import ChestAugment
from chexcy.data.images import normalize
from chexcy.data.studies import StudyIndex

Batch = namedtuple("Batch", "images labels mask index tabular")
Batch.__doc__ = """images float32 (B, 1, S, S) normalised; labels float32 (B, 14) masked entries 0; mask float32
(B, 14) 1 = label present; index int64 (B,) dataset rows; tabular float32 (B, 2) (age / 100, sex code)."""
StudyBatch = namedtuple("StudyBatch", "frontal lateral has_frontal has_lateral tabular labels mask study_rows")
StudyBatch.__doc__ = """frontal, lateral float32 (B, 1, S, S) normalised, all zeros where the view is missing;
has_frontal, has_lateral float32 (B,) 1 = present; tabular float32 (B, 2); labels, mask float32 (B, 14);
study_rows int64 (B,) entries of the StudyIndex."""


def _targets(labels):
    """float32 (B, 14) with NaN = masked -> (labels with masked entries 0, mask)."""
    mask = ~np.isnan(labels)
    return np.where(mask, labels, 0.0).astype(np.float32), mask.astype(np.float32)


def _read_rows(dataset, rows):
    """uint8 (B, 1, S, S) copy of dataset.images[rows].

    A PreparedDataset reads the rows with positional reads (PreparedDataset.read_images): indexing its
    memory map instead would leave the touched file pages mapped into this process, so peak RSS would
    grow with every random batch of an epoch. Other datasets (any object with an `images` array) are
    indexed directly, in ascending row order (sequential on disk for a memory map).
    """
    read = getattr(dataset, "read_images", None)
    if read is not None:
        return read(rows)
    images = dataset.images
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + images.shape[1:], dtype=np.uint8)
    out[order] = images[rows[order]]
    return out


class _OrderedPrefetcher:
    """Shared machinery: epoch order, len, and in-order background assembly of batches."""

    # Data-parallel hook (chexcy.distributed): positions of one global batch -> this rank's part of them,
    # so that a rank decodes only its own rows. None: every batch whole.
    shard = None

    def __init__(self, n_items, batch_size, shuffle, seed, drop_last, workers, prefetch):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(workers) < 0 or int(prefetch) < 1:
            raise ValueError(f"workers must be >= 0 and prefetch >= 1, got workers={workers}, prefetch={prefetch}")
        self.n_items = int(n_items)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.workers = int(workers)
        self.prefetch = int(prefetch)

    def __len__(self):
        if self.drop_last:
            return self.n_items // self.batch_size
        return math.ceil(self.n_items / self.batch_size)

    def order(self, epoch):
        """int64 (n_items,) positions of epoch `epoch` (a permutation from (seed, epoch) when shuffling)."""
        if not self.shuffle:
            return np.arange(self.n_items, dtype=np.int64)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_items).astype(np.int64)

    def batches(self, epoch, start=0):
        """Yield the batches of `epoch` from batch number `start` on (exactly the tail of a full epoch)."""
        n = len(self)
        start = int(start)
        if not 0 <= start <= n:
            raise ValueError(f"start must be in [0, {n}], got {start}")
        order = self.order(epoch)
        chunks = (order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, n))
        if self.shard is not None:
            chunks = map(self.shard, chunks)
        if self.workers == 0:                 # synchronous: handy for debugging
            for positions in chunks:
                yield self._make(epoch, positions)
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="chexcy-loader")
        pending = deque()
        depth = max(self.prefetch, self.workers)
        try:
            for positions in chunks:
                pending.append(pool.submit(self._make, epoch, positions))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:                               # the caller may stop early: drop queued work
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)

    def __iter__(self):
        return self.batches(0)


class BatchLoader(_OrderedPrefetcher):
    """Batches of a PreparedDataset (see the module docstring for the determinism contract).

    indices: the dataset rows to draw from (int array, default all); augment: False, True (ChestAugment
    defaults) or a ChestAugment. Yields `Batch` tuples.
    """

    def __init__(self, dataset, batch_size, *, shuffle=True, seed=0, augment=False, drop_last=False,
                 indices=None, workers=1, prefetch=2):
        rows = np.arange(len(dataset), dtype=np.int64) if indices is None else np.asarray(indices)
        if rows.dtype == bool:
            if rows.shape != (len(dataset),):
                raise ValueError(f"indices: boolean mask of shape {rows.shape}, dataset has {len(dataset)} rows")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(dataset)):
            raise ValueError(f"indices: rows must be in [0, {len(dataset)}), got min {rows.min()} max {rows.max()}")
        super().__init__(len(rows), batch_size, shuffle, seed, drop_last, workers, prefetch)
        self.dataset = dataset
        self.rows = rows
        self.augment = ChestAugment() if augment is True else (augment or None)

    def _make(self, epoch, positions):
        rows = self.rows[positions]
        pixels = _read_rows(self.dataset, rows)
        if self.augment is not None:
            images = normalize(self.augment.apply(pixels, self.augment.params(self.seed, epoch, rows)))
        else:
            images = normalize(pixels)
        labels, mask = _targets(self.dataset.labels[rows])
        return Batch(images, labels, mask, rows, self.dataset.tabular[rows])


class StudyLoader(_OrderedPrefetcher):
    """Batches of studies: each study's first frontal and first lateral image, its age/sex and labels.

    indices: entries of the StudyIndex to draw from (default all). Yields `StudyBatch` tuples; a missing
    view is all zeros with its has_ flag 0. Same determinism contract as BatchLoader (augmentation keyed
    by the image's dataset row).
    """

    def __init__(self, dataset, batch_size, *, shuffle=True, seed=0, augment=False, drop_last=False,
                 indices=None, workers=1, prefetch=2, study_index=None):
        self.dataset = dataset
        self.index = study_index if study_index is not None else StudyIndex(dataset)
        entries = np.arange(len(self.index), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if len(entries) and (entries.min() < 0 or entries.max() >= len(self.index)):
            raise ValueError(f"indices: study entries must be in [0, {len(self.index)})")
        super().__init__(len(entries), batch_size, shuffle, seed, drop_last, workers, prefetch)
        self.entries = entries
        self.augment = ChestAugment() if augment is True else (augment or None)

    def _view(self, epoch, rows):
        size = self.dataset.size
        out = np.zeros((len(rows), 1, size, size), dtype=np.float32)
        present = rows >= 0
        if present.any():
            got = rows[present]
            pixels = _read_rows(self.dataset, got)
            if self.augment is not None:
                out[present] = normalize(self.augment.apply(pixels, self.augment.params(self.seed, epoch, got)))
            else:
                out[present] = normalize(pixels)
        return out, present.astype(np.float32)

    def _make(self, epoch, positions):
        entries = self.entries[positions]
        frontal, has_frontal = self._view(epoch, self.index.frontal[entries])
        lateral, has_lateral = self._view(epoch, self.index.lateral[entries])
        labels, mask = _targets(self.index.labels[entries])
        return StudyBatch(frontal, lateral, has_frontal, has_lateral, self.index.tabular[entries], labels, mask,
                          entries)


def make_loader(model, dataset, batch_size, *, shuffle, seed, augment, workers=1):
    """The loader a model reads: StudyLoader for study models (model.input_kind "study"), else BatchLoader."""
    if model.input_kind == "study":
        return StudyLoader(dataset, batch_size, shuffle=shuffle, seed=seed, augment=augment, workers=workers)
    return BatchLoader(dataset, batch_size, shuffle=shuffle, seed=seed, augment=augment, workers=workers)
