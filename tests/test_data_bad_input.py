"""Bad input, each case proved: unreadable images are skipped with a reason (or stop the run with strict),
colour and 16-bit images follow the documented conversion, bad CSVs and bad folders fail clearly."""
import errno
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexcy.data import LABELS, ImageReadError, PreparedDataset, load_image
from chexcy.data import prepare as prep
from chexcy.data.schema import COLUMNS, read_csv
from chexcy.fileio import DamagedFileError

from data_fixtures import fresh_dir, synthetic_download, train_csv

BASE = "CheXpert-v1.0-small"


def _first_jpeg():
    return os.path.join(synthetic_download(), read_csv(train_csv())["Path"][0])


def _make_bad_files(folder):
    """Write one file per kind of trouble; returns {kind: absolute path}."""
    good = open(_first_jpeg(), "rb").read()
    files = {}

    def put(kind, data, ext="jpg"):
        path = os.path.join(folder, f"{kind}.{ext}")
        with open(path, "wb") as f:
            f.write(data)
        files[kind] = path

    put("truncated", good[: len(good) // 2])
    scrambled = bytearray(good)
    for i in range(600, len(scrambled) - 2, 7):      # keep the headers, wreck the entropy-coded data
        scrambled[i] = (scrambled[i] * 31 + 7) % 256
    put("corrupt", bytes(scrambled))
    put("empty", b"")
    put("text", b"Path,Sex\nthis is not an image\n")
    files["missing"] = os.path.join(folder, "missing.jpg")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(os.path.join(folder, "rgb.png"))
    files["rgb"] = os.path.join(folder, "rgb.png")
    wide = (rng.integers(0, 65536, size=(40, 30))).astype(np.uint16)
    Image.fromarray(wide).save(os.path.join(folder, "gray16.png"))
    files["gray16"] = os.path.join(folder, "gray16.png")
    return files, rgb, wide


@pytest.mark.parametrize("kind,reason", [
    ("missing", "missing file"), ("empty", "empty file"), ("text", "not an image"),
    ("truncated", "truncated or corrupt"), ("corrupt", "truncated or corrupt"),
])
def test_load_image_names_the_file_and_the_reason(kind, reason):
    files, _, _ = _make_bad_files(fresh_dir("bad-" + kind))
    with pytest.raises(ImageReadError, match=reason) as info:
        load_image(files[kind], 16)
    assert info.value.path == files[kind] and files[kind] in str(info.value)
    assert isinstance(info.value, ValueError)


def _unopenable_paths(folder):
    """One path per way an image path can fail to open; returns {kind: (path, reason in skipped.csv)}."""
    loop = os.path.join(folder, "loop.jpg")
    os.symlink("loop.jpg", loop)                              # a symlink to itself: ELOOP
    plain = os.path.join(folder, "plain.txt")
    with open(plain, "w") as f:
        f.write("a file, not a folder")
    directory = os.path.join(folder, "folder.jpg")
    os.mkdir(directory)
    fifo = os.path.join(folder, "fifo.jpg")
    os.mkfifo(fifo)                                           # opening must not wait for a writer
    return {
        "symlink-loop": (loop, "symlink loop"),
        "parent-is-a-file": (os.path.join(plain, "view1_frontal.jpg"), "a parent of the path is not a folder"),
        "directory": (directory, "is a directory"),
        "name-too-long": (os.path.join(folder, "x" * 300 + ".jpg"), "path too long"),
        "fifo": (fifo, "not a regular file"),
    }


@pytest.mark.parametrize("kind", ["symlink-loop", "parent-is-a-file", "directory", "name-too-long", "fifo"])
def test_load_image_names_every_path_that_cannot_be_opened(kind):
    path, reason = _unopenable_paths(fresh_dir("unopenable-" + kind))[kind]
    with pytest.raises(ImageReadError) as info:
        load_image(path, 16)
    assert info.value.reason == reason and info.value.path == path


@pytest.mark.parametrize("error,reason", [(errno.EACCES, "permission denied"), (errno.EPERM, "permission denied"),
                                          (errno.EIO, "cannot open (Input/output error)")])
def test_load_image_names_other_open_errors(monkeypatch, error, reason):
    # Permission bits do not stop root (the tests may run as root), so the refusal is simulated.
    real_open = os.open

    def refused(path, flags, *args, **kwargs):
        if os.fspath(path).endswith("refused.jpg"):
            raise OSError(error, os.strerror(error), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(ImageReadError) as info:
        load_image(os.path.join(fresh_dir("refused"), "refused.jpg"), 16)
    assert info.value.reason == reason


def test_prepare_lists_unopenable_paths_in_skipped_csv():
    folder = fresh_dir("unopenable")
    bad = _unopenable_paths(folder)
    good = _first_jpeg()
    template = pd.read_csv(train_csv(), dtype=str, keep_default_na=False)
    df = template.head(len(bad) + 1).copy()
    root = os.path.join(folder, "root")
    paths = [f"{BASE}/train/patient{90000 + i:05d}/study1/view1_frontal.jpg" for i in range(len(df))]
    df["Path"] = paths
    for rel, (kind, (target, _)) in zip(paths, [("good", (good, None))] + list(bad.items())):
        dst = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if kind == "good":
            shutil.copyfile(target, dst)
        elif kind == "parent-is-a-file":          # the study folder is a file
            os.rmdir(os.path.dirname(dst))
            shutil.copyfile(os.path.join(folder, "plain.txt"), os.path.dirname(dst))
        elif kind == "symlink-loop":
            os.symlink(os.path.basename(dst), dst)
        elif kind == "name-too-long":
            df.loc[len(df) - len(bad) + list(bad).index(kind), "Path"] = rel.replace("view1", "view1" + "x" * 300)
        else:
            os.symlink(target, dst)               # a directory, a FIFO
    csv = os.path.join(folder, "rows.csv")
    df.to_csv(csv, index=False)
    out = fresh_dir("unopenable-out")
    manifest = prep.prepare(csv, out, root=root, size=16, quiet=True, workers=2, chunk_rows=2)
    skipped = pd.read_csv(os.path.join(out, "skipped.csv"))
    assert manifest["count"] == 1 and manifest["skipped"] == len(bad)
    assert list(skipped["csv_row"]) == list(range(1, len(df)))
    assert list(skipped["reason"]) == [reason for _, reason in bad.values()]


def test_rgb_and_16bit_images_are_converted_by_the_documented_rule():
    files, rgb, wide = _make_bad_files(fresh_dir("convert"))
    # Centred square 30x30 of a 30x40 image, box-resized 30 -> 30 (identity), so pixels compare directly.
    got = load_image(files["rgb"], 30)[0]
    r, g, b = (rgb[5:35, :, k].astype(np.float64) for k in range(3))
    luma = (r * 299 + g * 587 + b * 114) / 1000
    assert np.abs(got - luma).max() <= 1.0, "RGB -> L uses ITU-R 601-2 luma"
    got16 = load_image(files["gray16"], 30)[0]
    np.testing.assert_array_equal(got16, np.rint(wide[5:35].astype(np.float64) / 257).astype(np.uint8))


def _csv_with(folder, rows):
    """A CheXpert CSV in `folder` whose rows point at the given absolute paths (Path relative to root)."""
    template = pd.read_csv(train_csv(), dtype=str, keep_default_na=False)
    df = template.head(len(rows)).copy()
    df["Path"] = [f"{BASE}/train/patient{90000 + i:05d}/study1/{os.path.basename(p)}" for i, p in enumerate(rows)]
    root = os.path.join(folder, "root")
    for rel, src in zip(df["Path"], rows):
        dst = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(src):
            shutil.copyfile(src, dst)
    csv = os.path.join(folder, "rows.csv")
    df.to_csv(csv, index=False)
    return csv, root, df


def test_prepare_skips_unreadable_files_and_lists_them_with_reasons():
    folder = fresh_dir("skips")
    files, _, _ = _make_bad_files(folder)
    goods = [os.path.join(synthetic_download(), p) for p in read_csv(train_csv())["Path"][:3]]
    order = [goods[0], files["missing"], files["truncated"], goods[1], files["empty"], files["text"],
             files["rgb"], files["corrupt"], files["gray16"], goods[2]]
    csv, root, df = _csv_with(folder, order)
    out = fresh_dir("skips-out")
    manifest = prep.prepare(csv, out, root=root, size=16, quiet=True, chunk_rows=4, workers=2)
    skipped = pd.read_csv(os.path.join(out, "skipped.csv"))
    bad_rows = [1, 2, 4, 5, 7]
    assert list(skipped["csv_row"]) == bad_rows
    assert list(skipped["path"]) == [df["Path"][i] for i in bad_rows]
    reasons = dict(zip(skipped["csv_row"], skipped["reason"]))
    assert reasons[1] == "missing file" and reasons[4].startswith("empty file")
    assert reasons[5].startswith("not an image") and "truncated" in reasons[2] and "corrupt" in reasons[7]
    ds = PreparedDataset(out)
    kept = [0, 3, 6, 8, 9]
    assert manifest["count"] == len(ds) == len(ds.labels) == len(ds.meta) == ds.images.shape[0] == len(kept)
    assert manifest["skipped"] == len(skipped) == len(bad_rows) and manifest["selected"] == len(order)
    assert list(ds.meta["csv_row"]) == kept
    for i, row in enumerate(kept):
        np.testing.assert_array_equal(ds.images[i], load_image(os.path.join(root, df["Path"][row]), 16))
    raw = read_csv(csv)[list(LABELS)].to_numpy()[kept]
    np.testing.assert_array_equal(ds.meta[list(LABELS)].to_numpy(), raw)


def test_strict_stops_at_the_first_unreadable_file():
    folder = fresh_dir("strict")
    files, _, _ = _make_bad_files(folder)
    good = os.path.join(synthetic_download(), read_csv(train_csv())["Path"][0])
    csv, root, df = _csv_with(folder, [good, files["empty"]])
    with pytest.raises(RuntimeError, match=r"patient90001/study1/empty\.jpg: empty file.*--strict"):
        prep.prepare(csv, fresh_dir("strict-out"), root=root, size=16, quiet=True, strict=True)


def _broken_csv(edit):
    df = pd.read_csv(train_csv(), dtype=str, keep_default_na=False).head(20)
    df = edit(df)
    path = os.path.join(fresh_dir("csv"), "train.csv")
    df.to_csv(path, index=False)
    return path


def test_csv_without_required_columns_lists_them():
    path = _broken_csv(lambda df: df.drop(columns=["Age", "Edema"]))
    with pytest.raises(ValueError, match=r"missing required column\(s\): Age, Edema"):
        read_csv(path)


def test_unknown_sex_value_is_named_with_its_line():
    def edit(df):
        df.loc[3, "Sex"] = "Robot"
        return df
    with pytest.raises(ValueError, match=r"'Sex' has unknown value\(s\) \['Robot'\] at line\(s\) 5"):
        read_csv(_broken_csv(edit))


def test_non_numeric_age_is_named_with_its_line():
    def edit(df):
        df.loc[0, "Age"] = "sixty"
        return df
    with pytest.raises(ValueError, match=r"'Age' has non-numeric value\(s\) \['sixty'\] at line\(s\) 2"):
        read_csv(_broken_csv(edit))


def test_bad_label_value_and_case_insensitive_values():
    def edit(df):
        df.loc[1, "Edema"] = "2.0"
        return df
    with pytest.raises(ValueError, match=r"'Edema' has value\(s\) \['2.0'\]"):
        read_csv(_broken_csv(edit))

    def lower(df):
        df["Sex"] = df["Sex"].str.upper()
        df["Frontal/Lateral"] = df["Frontal/Lateral"].str.lower()
        return df
    df = read_csv(_broken_csv(lower))
    assert set(df["Sex"]) <= {"Male", "Female"} and set(df["Frontal/Lateral"]) <= {"Frontal", "Lateral"}


def test_empty_selection_names_the_filter_that_emptied_it():
    with pytest.raises(ValueError, match=r"empty after --age-min 95 \(it kept 0 of \d+ rows\)"):
        prep.prepare(train_csv(), fresh_dir("empty-sel"), size=16, quiet=True, view="frontal", age_min=95)
    with pytest.raises(ValueError, match="--sex: unknown value 'robot'"):
        prep.prepare(train_csv(), fresh_dir("bad-sex"), size=16, quiet=True, sex="robot")


def test_output_folder_holding_a_different_dataset_is_refused():
    out = fresh_dir("other-dataset")
    prep.prepare(train_csv(), out, size=16, quiet=True, view="lateral")
    with pytest.raises(FileExistsError, match="different prepared dataset"):
        prep.prepare(train_csv(), out, size=16, quiet=True, view="frontal")
    assert set(PreparedDataset(out).meta["view"]) == {"Lateral"}, "the refused run must not touch the folder"


def test_prepared_dataset_refuses_missing_incomplete_or_damaged_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        PreparedDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a chexcy prepared folder"):
        PreparedDataset(tmp_path)
    out = fresh_dir("damaged")
    prep.prepare(train_csv(), out, size=16, quiet=True, limit=10)
    np.save(os.path.join(out, "labels.npy"), np.zeros((9, 14), np.float32))
    with pytest.raises(DamagedFileError, match=r"labels.npy: holds 9 label rows but manifest.json counts 10"):
        PreparedDataset(out)
    os.remove(os.path.join(out, "images.npy"))
    with pytest.raises(DamagedFileError, match="images.npy: missing"):
        PreparedDataset(out)


def test_columns_constant_is_the_real_header():
    assert COLUMNS[:5] == ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") and COLUMNS[5:] == LABELS
    assert len(LABELS) == 14
