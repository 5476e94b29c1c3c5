"""`PreparedDataset`: a folder written by `chexcy prepare` (DESIGN.md section 5), opened and validated."""
import json
import os

import numpy as np

from chexcy.data.schema import LABELS

SUPPORTED_FORMATS = (1,)


class PreparedDataset:
    """A prepared folder. Attributes:

    images: uint8 (N, 1, S, S), memory-mapped read-only; labels: float32 (N, 14), NaN = masked;
    meta: pandas DataFrame, one row per image (path, csv_row, patient, study, view, ap_pa, sex, age and the
    14 raw CSV values); tabular: float32 (N, 2) = (age / 100, 1 male / 0 female / 0.5 unknown);
    manifest: dict; size: S; label_names: tuple of 14 names; path: the folder. len(ds) = N.
    Raises FileNotFoundError / ValueError naming the folder and what is wrong with it.
    """

    def __init__(self, path):
        import pandas as pd

        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"prepared folder {self.path!r} does not exist")
        manifest_path = os.path.join(self.path, "manifest.json")
        if not os.path.exists(manifest_path):
            if os.path.exists(os.path.join(self.path, "request.json")):
                raise ValueError(f"{self.path} is incomplete: `chexcy prepare` was interrupted; run the same "
                                 "command again to finish it")
            raise ValueError(f"{self.path} is not a chexcy prepared folder (no manifest.json)")
        try:
            with open(manifest_path) as f:
                self.manifest = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{manifest_path}: corrupt manifest ({exc})") from None
        version = self.manifest.get("format_version")
        if version not in SUPPORTED_FORMATS:
            raise ValueError(f"{manifest_path}: format_version {version!r} is not supported "
                             f"(this chexcy reads {SUPPORTED_FORMATS})")
        count, size = int(self.manifest["count"]), int(self.manifest["size"])
        if tuple(self.manifest.get("label_names", ())) != LABELS:
            raise ValueError(f"{manifest_path}: label_names differ from chexcy's {LABELS}")

        def load(name):
            p = os.path.join(self.path, name)
            if not os.path.exists(p):
                raise ValueError(f"{self.path}: {name} is missing (the folder is damaged; prepare it again)")
            try:
                return np.load(p, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise ValueError(f"{p}: unreadable ({exc})") from None

        self.images = load("images.npy")
        if self.images.dtype != np.uint8 or self.images.shape != (count, 1, size, size):
            raise ValueError(f"{self.path}/images.npy: expected uint8 {(count, 1, size, size)}, "
                             f"found {self.images.dtype} {self.images.shape}")
        self.labels = np.array(load("labels.npy"))
        if self.labels.dtype != np.float32 or self.labels.shape != (count, len(LABELS)):
            raise ValueError(f"{self.path}/labels.npy: expected float32 {(count, len(LABELS))}, "
                             f"found {self.labels.dtype} {self.labels.shape}")
        meta_path = os.path.join(self.path, "meta.csv")
        if not os.path.exists(meta_path):
            raise ValueError(f"{self.path}: meta.csv is missing (the folder is damaged; prepare it again)")
        self.meta = pd.read_csv(meta_path, dtype={"path": str, "patient": str, "study": str, "view": str,
                                                  "ap_pa": str, "sex": str})
        self.meta["ap_pa"] = self.meta["ap_pa"].fillna("")
        if len(self.meta) != count:
            raise ValueError(f"{meta_path}: {len(self.meta)} rows but the manifest counts {count} images")
        self.size = size
        self.label_names = LABELS
        sex = self.meta["sex"].map({"Male": 1.0, "Female": 0.0}).fillna(0.5).to_numpy(np.float32)
        age = self.meta["age"].to_numpy(np.float32) / 100.0
        self.tabular = np.stack([age, sex], axis=1).astype(np.float32)

    def __len__(self):
        return len(self.labels)

    def __repr__(self):
        return f"PreparedDataset({self.path!r}: {len(self)} images of {self.size}x{self.size})"
