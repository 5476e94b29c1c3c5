"""`PreparedDataset`: a folder written by `chexcy prepare` (DESIGN.md section 5), opened and validated.

Everything a model will learn from is checked here, where it enters: the manifest's fields, the arrays'
dtypes, shapes and sizes against the manifest, the label values (0, 1 or NaN), the meta.csv columns and
values, the row counts of every file. A damaged file raises chexcy.fileio.DamagedFileError naming the file
and what is wrong with it.
"""
import json
import os
import threading

import numpy as np

from chexcy.data.npyfile import read_npy_header
from chexcy.data.schema import AGE_LIMIT, LABELS, PREPARED_META_COLUMNS, SEX_VALUES, VIEW_VALUES, lines_where
from chexcy.fileio import DamagedFileError

SUPPORTED_FORMATS = (1,)
# Prepared targets after the label policy: 1 positive, 0 negative, NaN masked. Anything else (0.25, -1,
# inf) would be trained on as if it were a probability, so it is refused where the labels are read.
TARGET_VALUES = (0.0, 1.0)


class PreparedDataset:
    """A prepared folder. Attributes:

    images: uint8 (N, 1, S, S), memory-mapped read-only; labels: float32 (N, 14), NaN = masked;
    meta: pandas DataFrame, one row per image (path, csv_row, patient, study, view, ap_pa, sex, age and the
    14 raw CSV values); tabular: float32 (N, 2) = (age / 100, 1 male / 0 female / 0.5 unknown);
    manifest: dict; size: S; label_names: tuple of 14 names; path: the folder. len(ds) = N.
    `read_images(rows)` copies rows of images.npy with positional reads (what the loaders use; see there).
    Raises FileNotFoundError when the folder does not exist, ValueError when it is not a prepared folder or
    its `chexcy prepare` was interrupted, and chexcy.fileio.DamagedFileError(path, problem) for a damaged
    or inconsistent file.
    """

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"prepared folder {self.path!r} does not exist")
        manifest_path = os.path.join(self.path, "manifest.json")
        if not os.path.exists(manifest_path):
            if os.path.exists(os.path.join(self.path, "request.json")):
                raise ValueError(f"{self.path} is incomplete: `chexcy prepare` was interrupted; run the same "
                                 "command again to finish it")
            raise ValueError(f"{self.path} is not a chexcy prepared folder (no manifest.json)")
        self.manifest = _read_manifest(manifest_path)
        count, size = self.manifest["count"], self.manifest["size"]
        self._images_path = self._file_path("images.npy")
        header = read_npy_header(self._images_path)
        _check_array(self._images_path, header, np.uint8, (count, 1, size, size), "image")
        self.images = np.memmap(self._images_path, dtype=np.uint8, mode="r", offset=header.offset,
                                shape=header.shape)
        self._images_offset = header.offset
        self._fd = None                        # opened on the first read_images call
        self._fd_lock = threading.Lock()
        self.labels = _read_labels(self._file_path("labels.npy"), count)
        self.meta = _read_meta(self._file_path("meta.csv"), count)
        self.size = size
        self.label_names = LABELS
        sex = self.meta["sex"].map({"Male": 1.0, "Female": 0.0}).fillna(0.5).to_numpy(np.float32)
        age = self.meta["age"].to_numpy(np.float32) / 100.0
        self.tabular = np.stack([age, sex], axis=1).astype(np.float32)

    def _file_path(self, name):
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            raise DamagedFileError(path, "missing (the prepared folder is damaged; prepare it again)")
        return path

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


def _preadv_exactly(fd, buffers, offset, path):
    """Fill every buffer (writable uint8 arrays) from the file at `offset`, retrying short reads."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        got = os.preadv(fd, views, offset)
        if got == 0:
            raise DamagedFileError(path, f"truncated: it ends before byte {offset} (prepare it again)")
        offset += got
        while views and got >= views[0].nbytes:
            got -= views[0].nbytes
            views.pop(0)
        if got:
            views[0] = views[0][got:]


def _read_manifest(path):
    """manifest.json -> dict, with format_version, count, size and label_names checked."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise DamagedFileError(path, f"cannot be read ({exc.strerror})") from None
    if not text:
        raise DamagedFileError(path, "empty file (0 bytes)")
    try:
        manifest = json.loads(text)
    except ValueError as exc:                # UnicodeDecodeError included
        raise DamagedFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DamagedFileError(path, f"expected a JSON object, found {_json_type(manifest)}")
    for key in ("format_version", "count", "size", "label_names"):
        if key not in manifest:
            raise DamagedFileError(path, f"no {key!r} entry")
    version = manifest["format_version"]
    if version not in SUPPORTED_FORMATS or isinstance(version, bool):
        raise DamagedFileError(path, f"format_version {version!r} is not supported (this chexcy reads "
                                     f"{', '.join(map(str, SUPPORTED_FORMATS))})")
    for key, low in (("count", 1), ("size", 1)):
        value = manifest[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DamagedFileError(path, f"{key!r} must be a positive integer, found {value!r}")
    names = manifest["label_names"]
    if not isinstance(names, list) or tuple(names) != LABELS:
        raise DamagedFileError(path, f"label_names {names!r} differ from chexcy's {list(LABELS)}")
    return manifest


def _json_type(value):
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_array(path, header, dtype, shape, what):
    """Compare a .npy header with the dtype and shape the manifest implies; DamagedFileError if they differ."""
    if header.shape[1:] == shape[1:] and header.shape[0] != shape[0] and header.dtype == dtype:
        raise DamagedFileError(path, f"holds {header.shape[0]} {what} rows but manifest.json counts {shape[0]}")
    if header.dtype != dtype or header.shape != shape:
        raise DamagedFileError(path, f"expected {np.dtype(dtype)} {shape} (per manifest.json), "
                                     f"found {header.dtype} {header.shape}")
    if header.fortran_order and len(shape) > 1:
        raise DamagedFileError(path, "stored in Fortran order; chexcy writes C order")


def _read_labels(path, count):
    """labels.npy -> float32 (count, 14), every value 0, 1 or NaN."""
    header = read_npy_header(path)
    _check_array(path, header, np.float32, (count, len(LABELS)), "label")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DamagedFileError(path, f"unreadable ({exc})") from None
    bad = ~(np.isnan(labels) | np.isin(labels, TARGET_VALUES))
    if bad.any():
        rows, cols = np.nonzero(bad)
        more = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
        raise DamagedFileError(path, f"label value {labels[rows[0], cols[0]]:g} at row {rows[0]} "
                                     f"({LABELS[cols[0]]}){more}; prepared labels are 0, 1 or NaN (masked)")
    return labels


def _read_meta(path, count):
    """meta.csv -> DataFrame of count rows with the prepared columns, valid ages, sexes and views."""
    import pandas as pd

    text_columns = {"path": str, "patient": str, "study": str, "view": str, "ap_pa": str, "sex": str,
                    "age": str}          # parsed below, so a bad age is shown as written
    try:
        meta = pd.read_csv(path, dtype=text_columns, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DamagedFileError(path, "empty file (no header line)") from None
    except UnicodeDecodeError as exc:
        raise DamagedFileError(path, f"not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x}: {exc.reason})") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise DamagedFileError(path, f"not a readable CSV ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise DamagedFileError(path, f"cannot be read ({exc.strerror})") from None
    # The 14 raw CSV values that follow are kept for people, not read by chexcy: only these are required.
    missing = [c for c in PREPARED_META_COLUMNS if c not in meta.columns]
    if missing:
        raise DamagedFileError(path, f"missing column(s): {', '.join(missing)}")
    if len(meta) != count:
        raise DamagedFileError(path, f"holds {len(meta)} rows but manifest.json counts {count} images")
    meta["ap_pa"] = meta["ap_pa"].fillna("")
    age = pd.to_numeric(meta["age"], errors="coerce")
    bad = age.isna() | (age < 0) | (age > AGE_LIMIT)
    if bad.any():
        shown = sorted(set(meta["age"][bad].fillna("")))[:5]
        raise DamagedFileError(path, f"column 'age' has value(s) {shown} at {lines_where(bad)}; "
                                     f"expected a number of years from 0 to {AGE_LIMIT}")
    meta["age"] = age.astype(np.float64)
    for column, allowed in (("sex", SEX_VALUES), ("view", VIEW_VALUES)):
        bad = ~meta[column].isin(allowed)
        if bad.any():
            shown = sorted(set(meta[column][bad].astype(str)))[:5]
            raise DamagedFileError(path, f"column {column!r} has value(s) {shown} at {lines_where(bad)}; "
                                         f"expected one of {', '.join(allowed)}")
    return meta
