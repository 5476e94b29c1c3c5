"""A damaged prepared folder is refused where it is opened, with chexcy.fileio.DamagedFileError naming the file
and what is wrong with it; the command line prints that as one line and exits with 1."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from chexcy.cli import main
from chexcy.data import LABELS, PreparedDataset
from chexcy.data.npyfile import read_npy_header
from chexcy.fileio import DamagedFileError

from data_fixtures import prepared

COUNT = 10      # rows of the folder every case damages a copy of


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "prepared"
    shutil.copytree(prepared(size=16, limit=COUNT), out)
    return out


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _edit_manifest(folder, edit):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(edit(manifest)))


def _edit_meta(folder, edit):
    path = folder / "meta.csv"
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(meta).to_csv(path, index=False)


def _labels_with(folder, row, col, value):
    labels = np.load(folder / "labels.npy")
    labels[row, col] = value
    np.save(folder / "labels.npy", labels)


def _truncate(path, by):
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - by)


def _drop(key):
    def edit(manifest):
        del manifest[key]
        return manifest
    return edit


def _set(key, value):
    def edit(manifest):
        manifest[key] = value
        return manifest
    return edit


# (case id, damage(folder), damaged file, expected problem as a regex)
CASES = [
    ("images-empty", lambda d: _write(d / "images.npy", b""), "images.npy", r"empty file \(0 bytes\)"),
    ("images-truncated", lambda d: _truncate(d / "images.npy", 100), "images.npy",
     r"truncated: 2460 bytes of data where its header's uint8 \(10, 1, 16, 16\) needs 2560"),
    ("images-not-npy", lambda d: _write(d / "images.npy", b"GIF89a" + bytes(2000)), "images.npy", "not a .npy file"),
    ("images-header", lambda d: _write(d / "images.npy", b"\x93NUMPY\x01\x00\x20\x00{'descr': '|u1', 'shape'"),
     "images.npy", r"damaged \.npy header"),
    ("images-count", lambda d: np.save(d / "images.npy", np.zeros((9, 1, 16, 16), np.uint8)), "images.npy",
     "holds 9 image rows but manifest.json counts 10"),
    ("images-dtype", lambda d: np.save(d / "images.npy", np.zeros((10, 1, 16, 16), np.float32)), "images.npy",
     r"expected uint8 \(10, 1, 16, 16\) .*found float32"),
    ("images-missing", lambda d: os.remove(d / "images.npy"), "images.npy", "missing"),
    ("labels-quarter", lambda d: _labels_with(d, 3, LABELS.index("Edema"), 0.25), "labels.npy",
     r"label value 0.25 at row 3 \(Edema\); prepared labels are 0, 1 or NaN"),
    ("labels-above-one", lambda d: _labels_with(d, 0, 0, 2.0), "labels.npy", r"label value 2 at row 0 \(No Finding\)"),
    ("labels-uncertain", lambda d: _labels_with(d, 9, 13, -1.0), "labels.npy", "label value -1 at row 9"),
    ("labels-inf", lambda d: _labels_with(d, 1, 2, np.inf), "labels.npy", "label value inf at row 1"),
    ("labels-shape", lambda d: np.save(d / "labels.npy", np.zeros((10, 13), np.float32)), "labels.npy",
     r"expected float32 \(10, 14\) .*found float32 \(10, 13\)"),
    ("labels-count", lambda d: np.save(d / "labels.npy", np.zeros((9, 14), np.float32)), "labels.npy",
     "holds 9 label rows but manifest.json counts 10"),
    ("labels-float64", lambda d: np.save(d / "labels.npy", np.zeros((10, 14), np.float64)), "labels.npy",
     "expected float32"),
    ("labels-truncated", lambda d: _truncate(d / "labels.npy", 4), "labels.npy", "truncated"),
    ("meta-empty", lambda d: _write(d / "meta.csv", b""), "meta.csv", "empty file"),
    ("meta-no-column", lambda d: _edit_meta(d, lambda m: m.drop(columns=["age"])), "meta.csv",
     r"missing column\(s\): age"),
    ("meta-no-columns", lambda d: _edit_meta(d, lambda m: m.drop(columns=["sex", "study"])), "meta.csv",
     r"missing column\(s\): study, sex"),
    ("meta-utf8", lambda d: _write(d / "meta.csv", (d / "meta.csv").read_bytes().replace(b"Female", b"Fem\xe4le", 1)),
     "meta.csv", "not valid UTF-8"),
    ("meta-age-text", lambda d: _edit_meta(d, lambda m: m.assign(age=["abc"] + list(m["age"][1:]))), "meta.csv",
     r"column 'age' has value\(s\) \['abc'\] at line\(s\) 2"),
    ("meta-age-negative", lambda d: _edit_meta(d, lambda m: m.assign(age=list(m["age"][:4]) + ["-5"] + list(m["age"][5:]))),
     "meta.csv", r"column 'age' has value\(s\) \['-5'\] at line\(s\) 6"),
    ("meta-age-blank", lambda d: _edit_meta(d, lambda m: m.assign(age=[""] + list(m["age"][1:]))), "meta.csv",
     "column 'age' has value"),
    ("meta-sex", lambda d: _edit_meta(d, lambda m: m.assign(sex=["Robot"] * len(m))), "meta.csv",
     r"column 'sex' has value\(s\) \['Robot'\]"),
    ("meta-view", lambda d: _edit_meta(d, lambda m: m.assign(view=["Oblique"] * len(m))), "meta.csv",
     r"column 'view' has value\(s\) \['Oblique'\]"),
    ("meta-rows", lambda d: _edit_meta(d, lambda m: m.head(9)), "meta.csv",
     "holds 9 rows but manifest.json counts 10 images"),
    ("manifest-no-size", lambda d: _edit_manifest(d, _drop("size")), "manifest.json", "no 'size' entry"),
    ("manifest-no-count", lambda d: _edit_manifest(d, _drop("count")), "manifest.json", "no 'count' entry"),
    ("manifest-list", lambda d: (d / "manifest.json").write_text("[]"), "manifest.json",
     "expected a JSON object, found an array"),
    ("manifest-not-json", lambda d: (d / "manifest.json").write_text("{'size': 16,"), "manifest.json",
     "not valid JSON"),
    ("manifest-empty", lambda d: (d / "manifest.json").write_text(""), "manifest.json", "empty file"),
    ("manifest-size-text", lambda d: _edit_manifest(d, _set("size", "big")), "manifest.json",
     "'size' must be a positive integer, found 'big'"),
    ("manifest-size-zero", lambda d: _edit_manifest(d, _set("size", 0)), "manifest.json",
     "'size' must be a positive integer, found 0"),
    ("manifest-size-float", lambda d: _edit_manifest(d, _set("size", 16.5)), "manifest.json",
     "'size' must be a positive integer, found 16.5"),
    ("manifest-size-other", lambda d: _edit_manifest(d, _set("size", 20)), "images.npy",
     r"expected uint8 \(10, 1, 20, 20\) \(per manifest.json\), found uint8 \(10, 1, 16, 16\)"),
    ("manifest-count-other", lambda d: _edit_manifest(d, _set("count", 11)), "images.npy",
     "holds 10 image rows but manifest.json counts 11"),
    ("manifest-version", lambda d: _edit_manifest(d, _set("format_version", 99)), "manifest.json",
     "format_version 99 is not supported"),
    ("manifest-labels", lambda d: _edit_manifest(d, _set("label_names", ["a"])), "manifest.json",
     "label_names .* differ"),
]


@pytest.mark.parametrize("damage,name,problem", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_folder_raises_damaged_file_error_naming_the_file(folder, damage, name, problem):
    damage(folder)
    with pytest.raises(DamagedFileError, match=problem) as info:
        PreparedDataset(folder)
    assert info.value.path == str(folder / name), f"names {info.value.path}, expected {name}"
    assert str(info.value).startswith(str(folder / name) + ": ")


def test_the_undamaged_copy_opens(folder):
    ds = PreparedDataset(folder)
    assert len(ds) == COUNT and ds.images.shape == (COUNT, 1, 16, 16)
    assert np.isin(ds.labels[~np.isnan(ds.labels)], (0.0, 1.0)).all()


def test_command_line_prints_one_line_and_exits_1(folder, tmp_path, capsys):
    _labels_with(folder, 2, 0, 0.25)
    status = main(["train", "--data", str(folder), "--epochs", "1", "--checkpoint-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.strip().splitlines() == [f"chexcy train: error: {folder / 'labels.npy'}: label value 0.25 at "
                                        "row 2 (No Finding); prepared labels are 0, 1 or NaN (masked)"]


def test_one_npy_header_reader_for_every_format_version(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for version in ((1, 0), (2, 0), (3, 0)):
        path = tmp_path / f"v{version[0]}.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array(f, array, version=version)
        header = read_npy_header(path)
        assert (header.dtype, header.shape, header.fortran_order) == (np.dtype(np.uint8), (2, 3, 4), False)
        with open(path, "rb") as f:
            f.seek(header.offset)
            assert f.read() == array.tobytes(), f"data offset wrong for version {version}"
    path = tmp_path / "v9.npy"
    _write(path, b"\x93NUMPY\x09\x00" + bytes(100))
    with pytest.raises(DamagedFileError, match="unsupported .npy format version 9.0"):
        read_npy_header(path)


def test_read_images_names_a_file_truncated_after_opening(folder):
    ds = PreparedDataset(folder)
    _truncate(folder / "images.npy", 100)
    with pytest.raises(DamagedFileError, match="truncated") as info:
        ds.read_images([COUNT - 1])
    assert info.value.path == str(folder / "images.npy")


@pytest.mark.parametrize("name", ["images.npy", "manifest.json"])
def test_a_file_that_cannot_be_read_is_named(folder, monkeypatch, name):
    # Permission bits do not stop root (the tests may run as root), so the refusal is simulated.
    real_open = open

    def refused(path, *args, **kwargs):
        if os.fspath(path).endswith(name):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refused)
    with pytest.raises(DamagedFileError, match=r"cannot be read \(Permission denied\)") as info:
        PreparedDataset(folder)
    assert info.value.path == str(folder / name)
