"""`chexcy prepare`: the prepared format, filters, label policies, resume after a kill, folder safety."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from chexcy.data import LABELS, PreparedDataset, load_image
from chexcy.data import prepare as prep
from chexcy.data.schema import read_csv

from data_fixtures import fresh_dir, interrupted_prepare, prepared, prepared_bytes, synthetic_download, train_csv

def test_prepared_folder_matches_csv_order_images_and_manifest():
    folder = prepared(size=32)
    ds = PreparedDataset(folder)
    df = read_csv(train_csv())
    n = len(df)
    assert ds.images.shape == (n, 1, 32, 32) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n, 14) and ds.labels.dtype == np.float32
    assert list(ds.meta["path"]) == list(df["Path"]), "rows keep CSV order and the source Path"
    assert list(ds.meta["csv_row"]) == list(range(n))
    root = synthetic_download()
    for i in (0, n // 2, n - 1):
        np.testing.assert_array_equal(ds.images[i], load_image(os.path.join(root, df["Path"][i]), 32),
                                      err_msg=f"row {i} differs from load_image of its file")
    # Default policy: uncertain and blank masked, 1/0 kept.
    raw = df[list(LABELS)].to_numpy()
    expected = np.where((raw == -1) | np.isnan(raw), np.nan, raw).astype(np.float32)
    np.testing.assert_array_equal(ds.labels, expected)
    np.testing.assert_array_equal(ds.meta[list(LABELS)].to_numpy(), raw)      # raw values kept in meta
    m = ds.manifest
    assert m["count"] == n and m["skipped"] == 0 and m["size"] == 32 and m["label_names"] == list(LABELS)
    assert m["source_sha256"] == prep.file_sha256(train_csv()) and m["format_version"] == 1
    assert {"filters", "policy", "chexcy_version", "source_csv"} <= set(m)
    assert pd.read_csv(os.path.join(folder, "skipped.csv")).empty
    assert not os.path.exists(os.path.join(folder, "request.json"))
    assert not os.path.exists(os.path.join(folder, "progress.jsonl"))


def test_filters_count_each_step_and_match_pandas():
    df = read_csv(train_csv())
    sel, steps = prep.select_rows(df, sex="MALE", view="Frontal", projection="ap", age_min=40, age_max=80,
                                  unique_patients=True, limit=20)
    want = df[(df["Sex"] == "Male") & (df["Frontal/Lateral"] == "Frontal") & (df["AP/PA"] == "AP")
              & df["Age"].between(40, 80)]
    patient = want["Path"].str.extract(r"(patient\d+)")[0]
    want = want[~patient.duplicated()].head(20)
    assert list(sel["Path"]) == list(want["Path"])
    assert [name for name, _ in steps] == ["rows in CSV", "--view frontal", "--projection AP", "--sex male",
                                           "--age-min 40", "--age-max 80", "--unique-patients", "--limit 20"]
    assert steps[-1][1] == len(want) and steps[0][1] == len(df)
    assert all(a[1] >= b[1] for a, b in zip(steps, steps[1:]))


def test_label_policies_and_per_column_overrides():
    raw = np.array([[1, 0, -1, np.nan] + [np.nan] * 10,
                    [np.nan, -1, -1, -1] + [-1] * 10], dtype=np.float64)
    policy = prep.resolve_policy("zeros", "zeros", uncertain_ones="cardiomegaly, Lung Opacity",
                                 uncertain_ignore="Enlarged Cardiomediastinum")
    got = prep.apply_policy(raw, policy)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[0, :4], [1, 0, 1, 0])               # blank -> 0, -1 -> 1 (override)
    np.testing.assert_array_equal(got[1, :4], [0, np.nan, 1, 1])          # blank -> 0, ignore -> NaN
    assert (got[1, 4:] == 0).all()                                       # default uncertain zeros
    masked = prep.apply_policy(raw, prep.resolve_policy("ones", "ignore"))
    assert np.isnan(masked[0, 3]) and masked[1, 1] == 1
    with pytest.raises(ValueError, match="unknown observation 'Edemaa'"):
        prep.resolve_policy(uncertain_ones="Edemaa")
    with pytest.raises(ValueError, match="both --uncertain-ones and --uncertain-zeros"):
        prep.resolve_policy(uncertain_ones="Edema", uncertain_zeros="edema")
    with pytest.raises(ValueError, match="--uncertain"):
        prep.resolve_policy(uncertain="maybe")


def test_policy_and_filters_recorded_and_applied_end_to_end():
    folder = prepared(size=16, sex="female", view="frontal", uncertain="zeros",
                      uncertain_ones="Edema,Atelectasis", blank="zeros")
    ds = PreparedDataset(folder)
    assert set(ds.meta["sex"]) == {"Female"} and set(ds.meta["view"]) == {"Frontal"}
    assert not np.isnan(ds.labels).any()
    raw = ds.meta[list(LABELS)].to_numpy()
    edema = LABELS.index("Edema")
    np.testing.assert_array_equal(ds.labels[raw[:, edema] == -1, edema], 1.0)
    cons = LABELS.index("Consolidation")
    np.testing.assert_array_equal(ds.labels[raw[:, cons] == -1, cons], 0.0)
    assert ds.manifest["policy"]["uncertain"]["Edema"] == "ones"
    assert ds.manifest["filters"]["sex"] == "female"


def test_two_workers_write_the_same_bytes_as_one():
    one, two = fresh_dir("w1"), fresh_dir("w2")
    prep.prepare(train_csv(), one, size=24, workers=1, quiet=True, chunk_rows=16)
    prep.prepare(train_csv(), two, size=24, workers=2, quiet=True, chunk_rows=16)
    assert prepared_bytes(one) == prepared_bytes(two)


def test_interrupted_run_resumes_to_the_bytes_of_a_clean_run(monkeypatch):
    clean, killed = fresh_dir("clean"), fresh_dir("killed")
    prep.prepare(train_csv(), clean, size=24, quiet=True, chunk_rows=16)
    interrupted_prepare(killed, monkeypatch, size=24)
    assert not os.path.exists(os.path.join(killed, "manifest.json"))
    with pytest.raises(ValueError, match="incomplete"):
        PreparedDataset(killed)
    with open(os.path.join(killed, "progress.jsonl"), "a") as f:
        f.write('{"chunk": 7, "skipp')                     # a torn line, as a kill mid-write leaves
    lines = []
    # chunk_rows differs on purpose: the resume keeps the chunking the run started with.
    manifest = prep.prepare(train_csv(), killed, size=24, quiet=False, chunk_rows=5, log=lines.append)
    assert any("resuming, 3 of" in line for line in lines), lines
    assert manifest["count"] == len(read_csv(train_csv()))
    assert prepared_bytes(killed) == prepared_bytes(clean)


def test_same_arguments_again_is_a_no_op_and_other_arguments_are_refused():
    out = fresh_dir("again")
    prep.prepare(train_csv(), out, size=16, quiet=True)
    before = prepared_bytes(out)
    lines = []
    prep.prepare(train_csv(), out, size=16, log=lines.append)
    assert any("already holds this dataset" in line for line in lines)
    assert prepared_bytes(out) == before
    with pytest.raises(FileExistsError, match="different prepared dataset.*size"):
        prep.prepare(train_csv(), out, size=20, quiet=True)
    with pytest.raises(FileExistsError, match="different prepared dataset.*filters"):
        prep.prepare(train_csv(), out, size=16, sex="male", quiet=True)
    manifest = prep.prepare(train_csv(), out, size=20, quiet=True, overwrite=True)
    assert manifest["size"] == 20 and PreparedDataset(out).images.shape[-1] == 20


def test_refuses_a_folder_holding_unrelated_files():
    out = fresh_dir("foreign")
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        prep.prepare(train_csv(), out, size=16, quiet=True)
    prep.prepare(train_csv(), out, size=16, quiet=True, overwrite=True)
    assert os.path.exists(os.path.join(out, "notes.txt")), "--overwrite removes only chexcy's own files"


def test_root_flag_and_default_root():
    root = synthetic_download()
    base = os.path.join(root, "CheXpert-v1.0-small")
    assert prep.default_root(os.path.join(base, "train.csv"), "CheXpert-v1.0-small/train/x") == root
    # A CSV copied elsewhere finds its images with --root.
    elsewhere = fresh_dir("csv-elsewhere")
    df = pd.read_csv(train_csv(), dtype=str, keep_default_na=False).head(12)
    csv = os.path.join(elsewhere, "mine.csv")
    df.to_csv(csv, index=False)
    out = fresh_dir("rooted")
    m = prep.prepare(csv, out, size=16, root=root, quiet=True)
    assert m["count"] == 12 and m["skipped"] == 0
    out2 = fresh_dir("unrooted")
    with pytest.raises(ValueError, match="none of the 12 selected images could be read.*missing file"):
        prep.prepare(csv, out2, size=16, quiet=True)          # without --root the images are not found


def test_progress_counts_and_label_table_are_printed():
    lines = []
    prep.prepare(train_csv(), fresh_dir("printed"), size=16, view="lateral", log=lines.append)
    text = "\n".join(lines)
    assert "--view lateral" in text and "rows in CSV" in text
    for label in LABELS:
        assert label in text


def test_cli_prepare_and_synth_commands(tmp_path):
    import argparse
    from chexcy.data import commands
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", "--out", str(tmp_path / "dl"), "--n-train", "6", "--n-valid", "2",
                              "--quiet", "--workers", "1"])
    assert args.func(args) == 0
    csv = tmp_path / "dl" / "CheXpert-v1.0-small" / "train.csv"
    args = parser.parse_args(["prepare", str(csv), "--out", str(tmp_path / "p"), "--size", "16",
                              "--view", "FRONTAL", "--uncertain", "ones", "--blank", "zeros", "--quiet"])
    assert args.func(args) == 0
    ds = PreparedDataset(tmp_path / "p")
    assert set(ds.meta["view"]) == {"Frontal"} and not np.isnan(ds.labels).any()
    with open(tmp_path / "p" / "manifest.json") as f:
        assert json.load(f)["policy"]["blank"] == "zeros"


def test_the_chexcy_command_runs_synth_and_prepare_and_reports_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def chexcy(*argv):
        return subprocess.run([sys.executable, "-m", "chexcy", *argv], env=env, capture_output=True, text=True)

    done = chexcy("synth", "--out", str(tmp_path / "dl"), "--n-train", "8", "--n-valid", "3", "--seed", "1")
    assert done.returncode == 0, done.stderr
    csv = tmp_path / "dl" / "CheXpert-v1.0-small" / "train.csv"
    done = chexcy("prepare", str(csv), "--out", str(tmp_path / "p"), "--size", "16", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "rows in CSV" in done.stdout and "Pleural Effusion" in done.stdout
    assert done.stderr == "", "no progress bar when stderr is not a terminal"
    assert PreparedDataset(tmp_path / "p").manifest["count"] == 8
    done = chexcy("prepare", str(csv), "--out", str(tmp_path / "p"), "--size", "24")
    assert done.returncode == 2 and "different prepared dataset" in done.stderr
    done = chexcy("prepare", str(csv), "--out", str(tmp_path / "q"), "--age-min", "200", "--quiet")
    assert done.returncode == 2 and "empty after --age-min 200" in done.stderr and done.stdout == ""
