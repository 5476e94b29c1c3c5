"""chexcy.data: the CheXpert CSV schema, `chexcy synth`, `chexcy prepare`, the prepared dataset and loaders.

Data flows one way: CSV + JPEGs -> `prepare` -> a prepared folder (images.npy, labels.npy, meta.csv,
manifest.json) -> `PreparedDataset` -> `BatchLoader` / `StudyLoader` -> normalised float32 batches.
`load_image` and `normalize` are the single definitions of preprocessing and normalisation.
Importing this package is cheap: pandas and Pillow load only when used.
"""
from chexcy.data.schema import COLUMNS, COMPETITION_TASKS, LABELS
from chexcy.data.images import PIXEL_MEAN, PIXEL_STD, ImageReadError, load_image, normalize
from chexcy.data.augment import ChestAugment
from chexcy.data.dataset import PreparedDataset
from chexcy.data.studies import StudyIndex
from chexcy.data.loader import Batch, BatchLoader, StudyBatch, StudyLoader

__all__ = [
    "LABELS", "COMPETITION_TASKS", "COLUMNS", "PIXEL_MEAN", "PIXEL_STD", "ImageReadError", "load_image",
    "normalize", "ChestAugment", "PreparedDataset", "StudyIndex", "Batch", "BatchLoader", "StudyBatch",
    "StudyLoader",
]
