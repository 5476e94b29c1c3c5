"""`chexcy train / evaluate / predict / demo` as commands: output, files, exit statuses, error messages."""
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import chexcy
from chexcy import cli, evaluate
from chexcy.data import LABELS, PreparedDataset
from chexcy.data.prepare import prepare
from chexcy.data.synth import make_synthetic


def run_cli(*argv, timeout=300):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(chexcy.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "chexcy", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic download, its prepared valid split and a checkpoint trained by `chexcy train`."""
    base = tmp_path_factory.mktemp("cli")
    make_synthetic(base / "raw", n_train=64, n_valid=40, seed=9, workers=1)
    csv_dir = base / "raw" / "CheXpert-v1.0-small"
    for split in ("train", "valid"):
        prepare(csv_dir / f"{split}.csv", base / split, size=24, quiet=True, uncertain="ones")
    done = run_cli("train", "--data", base / "train", "--valid", base / "valid", "--epochs", "2", "--batch-size", "16",
                   "--width", "4", "--depth", "3", "--optimizer", "adamw", "--checkpoint-dir", base / "run",
                   "--log-every", "2")
    assert done.returncode == 0, done.stderr
    return dict(base=base, raw=csv_dir, valid=base / "valid", run=base / "run", train_stdout=done.stdout)


def test_train_prints_progress_epoch_auc_and_policy(trained):
    out = trained["train_stdout"]
    assert "labels: uncertain (-1) U-Ones, blank masked" in out
    assert "epoch 1 step 2/4 | loss" in out and "img/s" in out and "ETA" in out
    assert "epoch 2 | train loss" in out and "valid loss" in out and "mean(5)" in out and "ckpt saved" in out
    assert all(os.path.exists(trained["run"] / f) for f in ("last.npz", "best.npz", "log.jsonl"))


def test_evaluate_reports_policy_auc_table_study_level_and_bootstrap(trained):
    done = run_cli("evaluate", "--checkpoint", trained["run"] / "best.npz", "--data", trained["valid"],
                   "--bootstrap", "30", "--json", trained["base"] / "eval.json")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "uncertain (-1) U-Ones, blank masked" in out
    for name in LABELS:
        assert name in out
    assert "95% CI" in out and "study" in out
    assert "mean AUC over the 5 competition tasks, image level" in out
    assert "mean AUC over the 5 competition tasks, study level" in out
    doc = json.loads((trained["base"] / "eval.json").read_text())
    # The printed numbers are those of the Python API.
    result = evaluate.evaluate_checkpoint(trained["run"] / "best.npz", trained["valid"])
    for j, name in enumerate(LABELS):
        want = None if np.isnan(result["image"]["auc"][j]) else result["image"]["auc"][j]
        assert doc["image"]["auc"][name] == pytest.approx(want)
    assert doc["study"]["n"] < doc["image"]["n"]


def test_evaluate_plot_writes_pngs(trained, tmp_path):
    pytest.importorskip("matplotlib")
    done = run_cli("evaluate", "--checkpoint", trained["run"] / "best.npz", "--data", trained["valid"],
                   "--plot", tmp_path / "plots")
    assert done.returncode == 0, done.stderr
    for name in ("roc.png", "training.png"):
        with Image.open(tmp_path / "plots" / name) as img:
            assert img.format == "PNG" and img.size[0] > 300


def test_evaluate_plot_without_matplotlib_says_how_to_install(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    status = cli.main(["evaluate", "--checkpoint", str(trained["run"] / "best.npz"), "--data",
                       str(trained["valid"]), "--plot", str(tmp_path / "plots")])
    assert status == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "plots")


def test_predict_matches_training_preprocessing_in_every_format(trained, tmp_path):
    ds = PreparedDataset(trained["valid"])
    root = trained["raw"].parent
    files = [str(root / p) for p in ds.meta["path"][:3]]
    tables = {}
    for fmt in ("table", "csv", "json"):
        done = run_cli("predict", "--checkpoint", trained["run"] / "best.npz", *files, "--format", fmt)
        assert done.returncode == 0, done.stderr
        tables[fmt] = done.stdout
    rows = list(csv.reader(io.StringIO(tables["csv"])))
    assert rows[0] == ["path", *LABELS] and len(rows) == 4
    doc = json.loads(tables["json"])
    assert [d["path"] for d in doc] == files
    # Same numbers as scoring the prepared arrays: prediction preprocesses exactly like prepare + loader.
    result = evaluate.evaluate_checkpoint(trained["run"] / "best.npz", trained["valid"])
    for i, row in enumerate(rows[1:]):
        np.testing.assert_allclose([float(v) for v in row[1:]], result["image"]["probs"][i], atol=2e-6)
        assert [round(doc[i]["probabilities"][n], 3) for n in LABELS] == pytest.approx(
            [float(v) for v in tables["table"].splitlines()[i + 1].split()[1:]], abs=1.5e-3)


def test_predict_heatmaps_and_unreadable_files(trained, tmp_path):
    folder = trained["raw"] / "valid"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    done = run_cli("predict", "--checkpoint", trained["run"] / "best.npz", folder, broken, tmp_path / "nope.png",
                   "--heatmap", tmp_path / "heat", "--observation", "cardiomegaly", "--format", "csv")
    assert done.returncode == 1
    n_images = sum(name.endswith(".jpg") for _, _, names in os.walk(folder) for name in names)
    rows = list(csv.reader(io.StringIO(done.stdout)))
    assert len(rows) == n_images + 1 and rows[0][-1] == "heatmap"
    assert "cannot label" in done.stderr and "broken.jpg" in done.stderr and "nope.png" in done.stderr
    assert "2 input(s) could not be labelled" in done.stderr
    heatmaps = sorted(os.listdir(tmp_path / "heat"))
    assert len(heatmaps) == n_images and all(h.endswith("_cardiomegaly_gradcam.png") for h in heatmaps)
    with Image.open(tmp_path / "heat" / heatmaps[0]) as img:
        assert img.mode == "RGB" and img.size[0] >= 256
        pixels = np.asarray(img).astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 30      # coloured: the map is drawn on the image


def test_predict_and_evaluate_errors_are_one_clear_line(trained, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    for argv in (["predict", "--checkpoint", bad, trained["raw"] / "valid"],
                 ["evaluate", "--checkpoint", bad, "--data", trained["valid"]],
                 ["train", "--data", trained["base"] / "train", "--resume", bad]):
        done = run_cli(*argv)
        assert done.returncode == 1, (argv, done.stderr)
        assert f"{bad}: not a chexcy checkpoint" in done.stderr and "Traceback" not in done.stderr
        assert "allow_pickle" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = run_cli("predict", "--checkpoint", trained["run"] / "best.npz", trained["raw"] / "valid",
                   "--heatmap", tmp_path / "h")
    assert done.returncode == 2 and "--heatmap needs --observation" in done.stderr
    done = run_cli("predict", "--checkpoint", trained["run"] / "best.npz", trained["raw"] / "valid",
                   "--heatmap", tmp_path / "h", "--observation", "Bronchitis")
    assert done.returncode == 2 and "unknown observation 'Bronchitis'" in done.stderr


def test_demo_quick_runs_end_to_end(tmp_path):
    done = run_cli("demo", "--quick", "--out", tmp_path / "demo")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in out
    assert "mean AUC over the 5 competition tasks" in out and "U-Ones for Edema, Atelectasis" in out
    for path in ("synthetic/CheXpert-v1.0-small/train.csv", "prepared/train/manifest.json",
                 "prepared/valid/images.npy", "run/best.npz", "run/log.jsonl"):
        assert (tmp_path / "demo" / path).exists(), path
        assert str(tmp_path / "demo") in out
