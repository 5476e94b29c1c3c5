"""The fit() API and its failure modes: learning, divergence, bad or mismatched checkpoints, settings on resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from chexcy import train
from chexcy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from chexcy.data.prepare import prepare
from chexcy.data.synth import make_synthetic
from chexcy.evaluate import evaluate_checkpoint
from chexcy.nn import build_model

SMALL = dict(width=4, depth=2, batch_size=8, optimizer="adamw", lr=0.01)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("fit_data")
    make_synthetic(base / "raw", n_train=64, n_valid=40, seed=5, workers=1)
    csv_dir = base / "raw" / "CheXpert-v1.0-small"
    out = {}
    for split, size in (("train", 16), ("valid", 16)):
        prepare(csv_dir / f"{split}.csv", base / split, size=size, quiet=True, uncertain="zeros",
                uncertain_ones="Edema,Atelectasis")
        out[split] = str(base / split)
    prepare(csv_dir / "valid.csv", base / "valid32", size=32, quiet=True)
    out["valid32"] = str(base / "valid32")
    return out


def test_fit_learns_a_small_set(data, tmp_path):
    # 8 images, many passes: the training loss must fall far below its starting value.
    from chexcy.data import PreparedDataset
    result = train.fit(data["train"], checkpoint_dir=tmp_path, epochs=40, out=None, **{**SMALL, "batch_size": 64})
    losses = [h["train_loss"] for h in result.history]
    assert result.status == "completed" and result.global_step == 40
    assert losses[-1] < 0.6 * losses[0], losses
    assert os.path.exists(tmp_path / "last.npz") and os.path.exists(tmp_path / "best.npz")
    ckpt = load_checkpoint(tmp_path / "last.npz")
    assert ckpt.config["position"] == dict(epoch=40, step_in_epoch=0, global_step=40, epoch_loss_sum=0.0,
                                           epoch_loss_count=0)
    assert ckpt.image_size == PreparedDataset(data["train"]).size == 16
    assert "U-Ones for Edema, Atelectasis" in ckpt.config["policy"]


def test_epoch_report_has_valid_loss_auc_per_label_and_mean(data, tmp_path, capsys):
    import io
    out = io.StringIO()
    result = train.fit(data["train"], data["valid"], checkpoint_dir=tmp_path, epochs=2, out=out, log_every=3, **SMALL)
    text = out.getvalue()
    assert "labels: uncertain (-1) U-Zeros (U-Ones for Edema, Atelectasis), blank masked" in text
    assert "epoch 1 step 3/8 | loss" in text and "img/s" in text and "ETA" in text
    epoch_lines = [line for line in text.splitlines() if line.startswith("epoch 2 | ")]
    assert epoch_lines and "valid loss" in epoch_lines[0] and "mean(5)" in epoch_lines[0]
    assert "n/a" in text                       # 40 validation images: rare labels have too few positives
    record = result.history[-1]
    assert set(record["auc"]) == set(train.SHORT_NAMES) and record["valid_loss"] > 0
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["event"] for r in log].count("step") == 16 and log[0]["event"] == "start"
    assert log[0]["policy"].startswith("uncertain") and log[-1]["event"] == "end"


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    train.fit(data["train"], checkpoint_dir=tmp_path, epochs=1, out=None, **SMALL)
    good = (tmp_path / "last.npz").read_bytes()
    real = train.bce_with_logits
    calls = []

    def poisoned(logits, *args, **kwargs):
        calls.append(1)
        loss, grad = real(logits, *args, **kwargs)
        return (float("nan"), grad) if len(calls) == 3 else (loss, grad)

    monkeypatch.setattr(train, "bce_with_logits", poisoned)
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at epoch 2, step 3/8 \(global step 11\)") as info:
        train.fit(data["train"], checkpoint_dir=tmp_path, resume=True, epochs=2, checkpoint_every=1, out=None)
    assert str(tmp_path / "last.npz") in str(info.value)
    # checkpoint_every=1 saved after steps 1 and 2 of epoch 2: the last good state is global step 10.
    assert load_checkpoint(tmp_path / "last.npz").config["position"]["global_step"] == 10
    assert (tmp_path / "last.npz").read_bytes() != good
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert records[-1]["event"] == "diverged" and records[-1]["global_step"] == 11


def test_huge_learning_rate_diverges_with_a_clear_message(data, tmp_path):
    env = dict(os.environ)
    import chexcy
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(chexcy.__file__)))
    done = subprocess.run([sys.executable, "-m", "chexcy", "train", "--data", data["train"], "--epochs", "3",
                           "--batch-size", "8", "--width", "4", "--depth", "2", "--optimizer", "sgd", "--lr", "1e30",
                           "--checkpoint-dir", str(tmp_path), "--log-every", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "diverged" in done.stderr and "step" in done.stderr and "Traceback" not in done.stderr


def test_corrupt_and_foreign_checkpoints_are_clear_errors(data, tmp_path):
    train.fit(data["train"], checkpoint_dir=tmp_path, epochs=1, out=None, **SMALL)
    blob = (tmp_path / "last.npz").read_bytes()
    (tmp_path / "last.npz").write_bytes(blob[: len(blob) // 2])           # torn file
    with pytest.raises(CheckpointError, match="corrupt"):
        train.fit(data["train"], checkpoint_dir=tmp_path, resume=True, out=None)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match=r"junk.npz: not a chexcy checkpoint \(not an .npz archive\)"):
        load_checkpoint(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="without config.json"):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")


def test_checkpoint_weights_that_do_not_fit_are_reported(tmp_path):
    model = build_model("simple", widths=[2, 3])
    save_checkpoint(tmp_path / "c.npz", model, config=dict(image_size=16))
    with np.load(tmp_path / "c.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["model/trunk.0.weight"] = np.zeros((5, 1, 3, 3), np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(tmp_path / "bad.npz").build_model()


def test_image_size_mismatch_and_changed_settings_on_resume(data, tmp_path):
    train.fit(data["train"], checkpoint_dir=tmp_path, epochs=1, out=None, **SMALL)
    with pytest.raises(ValueError, match=r"32x32 images but the model was trained on 16x16"):
        evaluate_checkpoint(tmp_path / "last.npz", data["valid32"])
    with pytest.raises(ValueError, match=r"32x32 images but the model was trained on 16x16"):
        train.fit(data["valid32"], checkpoint_dir=tmp_path, resume=True, epochs=2, out=None)
    with pytest.raises(ValueError, match=r"lr=0.5 differs from the checkpoint's 0.01"):
        train.fit(data["train"], checkpoint_dir=tmp_path, resume=True, epochs=2, lr=0.5, out=None)
    with pytest.raises(ValueError, match="16x16 images but the model was trained on 32x32|32x32"):
        train.fit(data["train"], data["valid32"], epochs=1, out=None, **SMALL)
    # Extending the run is allowed.
    result = train.fit(data["train"], checkpoint_dir=tmp_path, resume=True, epochs=2, out=None)
    assert result.global_step == 16


def test_multiview_trains_and_evaluates_at_study_level(data, tmp_path):
    result = train.fit(data["train"], data["valid"], checkpoint_dir=tmp_path, epochs=1, arch="multiview",
                       shared=False, dropout=0.2, out=None, **SMALL)
    assert result.model.input_kind == "study"
    report = evaluate_checkpoint(tmp_path / "best.npz", data["valid"])
    assert "image" not in report and report["study"]["n"] < 40     # scored per study, not per image


def test_bad_settings_are_named(data):
    with pytest.raises(ValueError, match="batch_size=0"):
        train.fit(data["train"], batch_size=0, out=None)
    with pytest.raises(ValueError, match="unknown architecture"):
        train.fit(data["train"], arch="vgg", out=None)
    with pytest.raises(TypeError, match="unknown settings"):
        train.fit(data["train"], learning_rate=0.1, out=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.fit("/nonexistent/prepared", out=None)
