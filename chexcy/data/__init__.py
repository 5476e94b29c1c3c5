"""chexcy.data: the CheXpert CSV schema, `chexcy synth`, `chexcy prepare`, the prepared dataset and loaders.

Data flows one way: CSV + JPEGs -> `prepare` -> a prepared folder (images.npy, labels.npy, meta.csv,
manifest.json) -> `PreparedDataset` -> `BatchLoader` / `StudyLoader` -> normalised float32 batches.
`load_image` and `normalize` are the single definitions of preprocessing and normalisation.

Names are imported from their modules on first use (PEP 562), so `import chexcy.data` (and with it
`chexcy --help`, which registers the data sub-commands) does not load NumPy, pandas or Pillow.
"""
import importlib

_EXPORTS = {
    "LABELS": "schema", "NUM_CLASSES": "schema", "COMPETITION_TASKS": "schema", "COLUMNS": "schema",
    "PIXEL_MEAN": "images", "PIXEL_STD": "images", "ImageReadError": "images", "load_image": "images",
    "normalize": "images",
    "ChestAugment": "augment",
    "PreparedDataset": "dataset",
    "StudyIndex": "studies",
    "Batch": "loader", "make_loader": "loader", "open_dataset": "dataset", "policy_text": "prepare",
    "BatchLoader": "loader", "StudyBatch": "loader", "StudyLoader": "loader",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"chexcy.data.{_EXPORTS[name]}"), name)
        globals()[name] = value              # later look-ups skip this function
        return value
    raise AttributeError(f"module 'chexcy.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
