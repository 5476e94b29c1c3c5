"""`chexcy train` as a user runs it (a subprocess): exact resume after SIGKILL, clean stop on SIGINT/SIGTERM.

The specification: a run killed at any moment and resumed with --resume produces, step for step, the very
same losses (bitwise: compared as the floats the JSON log holds, which round-trip exactly) and the same
final weights as a run that was never interrupted, on the same backend and thread count.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import chexcy
from chexcy.data.prepare import prepare
from chexcy.data.synth import make_synthetic

STEPS_PER_EPOCH = 12        # 96 images / batch 8
EPOCHS = 40                 # long enough that a kill lands mid-run even on a slow machine
CHECKPOINT_EVERY = 5        # not a divisor of STEPS_PER_EPOCH: most saves are mid-epoch


def chexcy_env():
    """Environment whose `python -m chexcy` imports the same chexcy as this test process."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(chexcy.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume_data")
    make_synthetic(base / "raw", n_train=96, n_valid=24, seed=3, workers=1)
    out = base / "train"
    prepare(base / "raw" / "CheXpert-v1.0-small" / "train.csv", out, size=16, quiet=True, uncertain="zeros")
    return str(out)


def train_command(data, ckpt_dir, *extra):
    return [sys.executable, "-m", "chexcy", "train", "--data", data, "--checkpoint-dir", str(ckpt_dir),
            "--epochs", str(EPOCHS), "--batch-size", "8", "--width", "4", "--depth", "2", "--dropout", "0.3",
            "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--nesterov", "--schedule", "cosine",
            "--warmup", "3", "--augment", "--seed", "11", "--threads", "1", "--log-every", "0",
            "--checkpoint-every", str(CHECKPOINT_EVERY), *extra]


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_losses(records):
    """global_step -> list of every loss logged for it (a resumed run logs replayed steps again)."""
    losses = {}
    for r in records:
        if r["event"] == "step":
            losses.setdefault(r["global_step"], []).append(r["loss"])
    return losses


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(train_command(prepared, ckpt), env=chexcy_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    losses = step_losses(read_records(ckpt / "log.jsonl"))
    assert sorted(losses) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    return ckpt, {k: v[0] for k, v in losses.items()}


def wait_for(proc, log_path, condition, timeout=120):
    """Poll the child's log until condition(records) holds; returns the records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the condition held: {proc.communicate()}")
        if os.path.exists(log_path):
            try:
                records = read_records(log_path)
            except json.JSONDecodeError:          # caught a line half-written
                records = None
            if records and condition(records):
                return records
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("timed out waiting for the training log")


def assert_same_run(ckpt_dir, reference_dir, reference_losses):
    losses = step_losses(read_records(ckpt_dir / "log.jsonl"))
    assert sorted(losses) == sorted(reference_losses), "some steps were skipped or invented"
    for step, values in losses.items():
        for value in values:
            assert value == reference_losses[step], (f"global step {step}: loss {value!r} after resume, "
                                                     f"{reference_losses[step]!r} uninterrupted")
    with np.load(ckpt_dir / "last.npz") as a, np.load(reference_dir / "last.npz") as b:
        for name in b.files:
            if name.startswith(("model/", "optim/")):
                assert np.array_equal(a[name], b[name]), f"{name} differs from the uninterrupted run"


def saved_position(path):
    with np.load(path) as saved:
        return json.loads(saved["config.json"].tobytes())["position"]


def test_sigkill_mid_epoch_then_resume_gives_identical_losses(prepared, uninterrupted, tmp_path):
    reference_dir, reference_losses = uninterrupted
    ckpt = tmp_path / "run"
    proc = subprocess.Popen(train_command(prepared, ckpt), env=chexcy_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(proc, ckpt / "log.jsonl", lambda rs: any(r["event"] == "checkpoint" for r in rs))
    # Freeze the child (SIGSTOP) and look: kill it only at a moment when its newest checkpoint is mid-epoch
    # and it has already logged steps past that checkpoint, so the resume must replay them.
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, "no suitable moment to kill the run"
        proc.send_signal(signal.SIGSTOP)
        position = saved_position(ckpt / "last.npz")
        last_logged = max(r["global_step"] for r in read_records(ckpt / "log.jsonl") if r["event"] == "step")
        if position["step_in_epoch"] > 0 and last_logged > position["global_step"]:
            break
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert last_logged < EPOCHS * STEPS_PER_EPOCH, "the run finished before it was killed"

    done = subprocess.run(train_command(prepared, ckpt, "--resume"), env=chexcy_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    resumed = [r for r in read_records(ckpt / "log.jsonl") if r["event"] == "resume"]
    assert len(resumed) == 1
    assert (resumed[0]["global_step"], resumed[0]["step_in_epoch"]) == (position["global_step"],
                                                                        position["step_in_epoch"])
    assert_same_run(ckpt, reference_dir, reference_losses)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_exits_cleanly_then_resume_matches(prepared, uninterrupted, tmp_path, sig):
    reference_dir, reference_losses = uninterrupted
    ckpt = tmp_path / "run"
    proc = subprocess.Popen(train_command(prepared, ckpt), env=chexcy_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(proc, ckpt / "log.jsonl", lambda rs: sum(r["event"] == "step" for r in rs) >= 15)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    assert f"{name}: stopped after global step" in out and "continue with --resume" in out
    records = read_records(ckpt / "log.jsonl")
    stop = [r for r in records if r["event"] == "interrupted"]
    assert len(stop) == 1 and stop[0]["signal"] == name
    last_step = max(r["global_step"] for r in records if r["event"] == "step")
    assert stop[0]["global_step"] == last_step                  # saved exactly where it stopped
    with np.load(ckpt / "last.npz") as saved:
        position = json.loads(saved["config.json"].tobytes())["position"]
    assert position["global_step"] == last_step

    done = subprocess.run(train_command(prepared, ckpt, "--resume"), env=chexcy_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_run(ckpt, reference_dir, reference_losses)
