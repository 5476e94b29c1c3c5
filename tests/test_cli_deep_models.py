"""`chexcy prepare / train / evaluate / predict --heatmap` end to end with torchvision's networks, small:
a few synthetic images at 64 px, one short epoch (the numbers are meaningless; the plumbing is tested)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from chexcy.checkpoint import load_checkpoint
from chexcy.data.synth import make_synthetic
from test_cli_train_commands import run_cli


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("deep")
    make_synthetic(base / "raw", n_train=16, n_valid=8, seed=3, workers=1)
    csv_dir = base / "raw" / "CheXpert-v1.0-small"
    for split in ("train", "valid"):
        done = run_cli("prepare", csv_dir / f"{split}.csv", "--root", base / "raw", "--out", base / split,
                       "--size", "64", "--workers", "1", "--quiet")
        assert done.returncode == 0, done.stderr
    return dict(base=base, raw=csv_dir)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_train_evaluate_predict_with_heatmaps(prepared, arch, tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "--arch", arch, "--data", prepared["base"] / "train", "--valid",
                   prepared["base"] / "valid", "--epochs", "1", "--batch-size", "8", "--optimizer", "adamw",
                   "--checkpoint-dir", run, "--log-every", "1", "--threads", "2")
    assert done.returncode == 0, done.stderr
    assert f"{arch} (" in done.stdout and "epoch 1 | train loss" in done.stdout
    ckpt = load_checkpoint(run / "last.npz")
    assert ckpt.config["arch"] == arch
    first = "conv1.weight" if arch == "resnet18" else "features.conv0.weight"
    assert ckpt.build_model().state_dict()[first].shape == (64, 1, 7, 7)     # torchvision's names in the file
    done = run_cli("evaluate", "--checkpoint", run / "last.npz", "--data", prepared["base"] / "valid",
                   "--json", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["arch"] == arch
    images = sorted(str(p) for p in (prepared["raw"] / "valid").rglob("*.jpg"))[:2]
    done = run_cli("predict", "--checkpoint", run / "last.npz", *images, "--heatmap", tmp_path / "heat",
                   "--observation", "Pleural Effusion", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 2
    maps = sorted(os.listdir(tmp_path / "heat"))
    assert len(maps) == 2
    with Image.open(tmp_path / "heat" / maps[0]) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 30       # a coloured map is drawn on the image
