"""`PreparedDataset`: a folder written by `chexcy prepare` (DESIGN.md section 5), opened and validated."""
import json
import os
import threading

import numpy as np

from chexcy.data.schema import LABELS

SUPPORTED_FORMATS = (1,)


class PreparedDataset:
    """A prepared folder. Attributes:

    images: uint8 (N, 1, S, S), memory-mapped read-only; labels: float32 (N, 14), NaN = masked;
    meta: pandas DataFrame, one row per image (path, csv_row, patient, study, view, ap_pa, sex, age and the
    14 raw CSV values); tabular: float32 (N, 2) = (age / 100, 1 male / 0 female / 0.5 unknown);
    manifest: dict; size: S; label_names: tuple of 14 names; path: the folder. len(ds) = N.
    `read_images(rows)` copies rows of images.npy with positional reads (what the loaders use; see there).
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
        if not self.images.flags.c_contiguous:
            raise ValueError(f"{self.path}/images.npy: stored in Fortran order; chexcy writes C order")
        self._images_path = os.path.join(self.path, "images.npy")
        self._images_offset = _npy_data_offset(self._images_path)
        self._fd = None                        # opened on the first read_images call
        self._fd_lock = threading.Lock()
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

    def read_images(self, rows, out=None):
        """uint8 (B, 1, S, S) copy of images[rows], byte for byte what `np.asarray(self.images[rows])` gives.

        rows: int array (B,) in [0, N), any order, repeats allowed; out: optional uint8 C-contiguous
        (B, 1, S, S) array to fill (returned). The rows are read with positional reads (os.preadv) straight
        into `out`, runs of consecutive rows in one call, instead of through the memory map: touching the
        map would map the file's pages into this process (plus the kernel's fault-around neighbours), and
        over an epoch of random batches that makes most of images.npy count in the process's RSS. Reads
        land in the page cache only, which the kernel reclaims freely. preadv releases the GIL and has no
        shared file position, so loader threads may call this concurrently.
        """
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise TypeError(f"rows: expected a 1-D integer array, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64, copy=False)
        shape = (len(rows),) + self.images.shape[1:]
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif out.dtype != np.uint8 or out.shape != shape or not out.flags.c_contiguous:
            raise ValueError(f"out: expected a C-contiguous uint8 array {shape}, got {out.dtype} {out.shape}")
        if len(rows) == 0:
            return out
        n = len(self)
        if rows.min() < -n or rows.max() >= n:
            raise IndexError(f"rows: must be in [-{n}, {n}), got min {rows.min()} max {rows.max()}")
        rows = np.where(rows < 0, rows + n, rows)
        if not hasattr(os, "preadv"):           # e.g. Windows: copy through the memory map
            out[...] = self.images[rows]
            return out
        # Each distinct row is read once, into the slot of its first occurrence, in ascending file order.
        uniq, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        row_bytes = out[0].nbytes
        flat = out.reshape(len(rows), row_bytes)
        fd = self._file()
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1        # starts of runs of consecutive rows
        for run_rows, run_slots in zip(np.split(uniq, breaks), np.split(first, breaks)):
            for i in range(0, len(run_rows), _IOV_MAX):
                _preadv_exactly(fd, [flat[slot] for slot in run_slots[i:i + _IOV_MAX]],
                                self._images_offset + int(run_rows[i]) * row_bytes, self._images_path)
        if len(uniq) < len(rows):               # repeated rows: copy from the slot that was read
            src = first[inverse.reshape(-1)]
            dup = np.flatnonzero(src != np.arange(len(rows)))
            flat[dup] = flat[src[dup]]
        return out

    def _file(self):
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self._images_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return self._fd

    def close(self):
        """Close the file descriptor read_images uses (reopened on the next call). The memory map stays."""
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:                      # interpreter shutdown: os may already be gone
            pass

    def __repr__(self):
        return f"PreparedDataset({self.path!r}: {len(self)} images of {self.size}x{self.size})"


_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names \
    else 1024


def _npy_data_offset(path):
    """Byte offset of the array data in the .npy file `path` (the header's length varies with the version)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            np.lib.format.read_array_header_2_0(f)     # 3.0 differs only in the header's text encoding
        else:
            raise ValueError(f"{path}: unsupported .npy format version {version}")
        return f.tell()


def _preadv_exactly(fd, buffers, offset, path):
    """Fill every buffer (writable uint8 arrays) from the file at `offset`, retrying short reads."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        got = os.preadv(fd, views, offset)
        if got == 0:
            raise ValueError(f"{path}: ends before byte {offset} (the file is truncated; prepare it again)")
        offset += got
        while views and got >= views[0].nbytes:
            got -= views[0].nbytes
            views.pop(0)
        if got:
            views[0] = views[0][got:]
