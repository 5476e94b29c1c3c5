"""Faults around `chexcy train`: runs that would clobber or mix each other, damaged checkpoints, divergence,
a full disk, ranks that were not given the same run.

The specification: a run folder holds one run, written by one process at a time; --resume continues that
run on its own data; every failure ends with one line naming the file or folder and what to do, exit
status 1 (a failure) or 2 (a usage mistake), never a traceback, never a half-written file. SIGKILL and
resume are covered by tests/test_train_resume.py.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from chexcy import checkpoint, cli, fileio, train
from chexcy.checkpoint import CheckpointError, load_checkpoint
from chexcy.data.prepare import prepare
from chexcy.data.synth import make_synthetic
from chexcy.fileio import DamagedFileError
from chexcy.runfolder import RunFolderBusy, RunFolderError, RunLock

from test_mpi import MPI_TIMEOUT_S, find_mpiexec, mpi_skip_reason, needs_mpi, subprocess_env
from test_train_resume import chexcy_env

SMALL = dict(width=4, depth=2, batch_size=8, optimizer="sgd", lr=0.05)


def run_cli(*argv, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "chexcy", *map(str, argv)], env=chexcy_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def small_train_args(data, *extra):
    return ["train", "--data", data, "--width", "4", "--depth", "2", "--batch-size", "8", "--lr", "0.05",
            "--log-every", "0", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Prepared 16x16 folders of one synthetic download: train (policy U-Zeros), the same rows under U-Ones,
    two validation sets (U-Zeros, U-Ones)."""
    base = tmp_path_factory.mktemp("faults_data")
    make_synthetic(base / "raw", n_train=32, n_valid=16, seed=4, workers=1)
    csv_dir = base / "raw" / "CheXpert-v1.0-small"
    out = {}
    for name, split, policy in (("train", "train", "zeros"), ("train_ones", "train", "ones"),
                                ("valid", "valid", "zeros"), ("valid_ones", "valid", "ones")):
        prepare(csv_dir / f"{split}.csv", base / name, size=16, quiet=True, uncertain=policy)
        out[name] = str(base / name)
    return out


def records(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "log.jsonl")) if line.strip()]


# -- one run per folder (item 1) ------------------------------------------------------------------------

def test_a_new_run_into_a_folder_holding_one_is_refused_and_overwrite_starts_clean(data, tmp_path):
    run = tmp_path / "run"
    train.fit(data["train"], checkpoint_dir=run, epochs=2, out=None, **SMALL)
    before = {name: (run / name).read_bytes() for name in ("last.npz", "best.npz", "log.jsonl")}
    with pytest.raises(RunFolderError) as info:
        train.fit(data["train"], checkpoint_dir=run, epochs=1, out=None, **{**SMALL, "lr": 0.5})
    message = str(info.value)
    for part in (str(run), "last.npz, best.npz, log.jsonl", "--resume", "--overwrite"):
        assert part in message, (part, message)
    assert {name: (run / name).read_bytes() for name in before} == before, "the refused run touched the folder"

    train.fit(data["train"], checkpoint_dir=run, epochs=1, overwrite=True, out=None, **{**SMALL, "lr": 0.5})
    events = [r["event"] for r in records(run)]
    assert events.count("start") == 1 and events.count("epoch") == 1, events     # a fresh log, not appended
    assert load_checkpoint(run / "best.npz").config["train"]["lr"] == 0.5


def test_cli_refuses_reuse_in_one_line_and_rejects_resume_with_overwrite(data, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*small_train_args(data["train"], "--epochs", "1", "--checkpoint-dir", run)).returncode == 0
    done = run_cli(*small_train_args(data["train"], "--epochs", "1", "--checkpoint-dir", run))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"chexcy train: error: run folder {run} already holds a run (last.npz, best.npz, log.jsonl); pass --resume "
        f"to continue it, --overwrite to delete it and start over, or another --checkpoint-dir"], done.stderr
    done = run_cli(*small_train_args(data["train"], "--checkpoint-dir", run, "--resume", "--overwrite"))
    assert done.returncode == 2 and "pass one of them" in done.stderr, done.stderr


# -- one process per folder (item 2) --------------------------------------------------------------------

def test_a_second_run_into_a_locked_folder_fails_at_once_naming_the_holder(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):                        # this test process holds the folder, as a running train would
        done = run_cli(*small_train_args(data["train"], "--epochs", "1", "--checkpoint-dir", run))
        assert done.returncode == 1, done.stderr
        assert f"run folder {run} is in use by another chexcy train (pid {os.getpid()} on host" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert sorted(os.listdir(run)) == ["train.lock", "train.lock.json"]     # nothing written
        with pytest.raises(RunFolderBusy):
            train.fit(data["train"], checkpoint_dir=run, resume=True, out=None)
    assert os.listdir(run) == ["train.lock"]    # the holder's note goes with the lock; flock itself is gone


def test_two_concurrent_trainings_into_one_folder_the_second_is_refused(data, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "chexcy", *small_train_args(
        data["train"], "--epochs", "5000", "--checkpoint-dir", run)], env=chexcy_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "log.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = run_cli(*small_train_args(data["train"], "--epochs", "5000", "--checkpoint-dir", run, "--overwrite"))
        assert second.returncode == 1, second.stderr
        assert f"pid {first.pid} on host" in second.stderr, second.stderr
        assert f": chexcy train --data {data['train']} " in second.stderr, second.stderr
        assert first.poll() is None, "the first run must go on undisturbed"
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM
    events = [r["event"] for r in records(run)]
    assert events.count("start") == 1 and events[-1] == "interrupted", events    # one run's log, not two
    with RunLock(run):                          # the folder is free again once its run has ended
        pass


# -- a resume continues the same run (items 3 and 5) ----------------------------------------------------

def test_resume_refuses_other_prepared_data_with_the_same_count_and_size(data, tmp_path):
    train.fit(data["train"], checkpoint_dir=tmp_path, epochs=1, out=None, **SMALL)
    with pytest.raises(ValueError) as info:
        train.fit(data["train_ones"], checkpoint_dir=tmp_path, resume=True, epochs=2, out=None)
    message = str(info.value)
    assert f"--data {data['train_ones']} is not the prepared data the run in" in message, message
    assert "policy.uncertain.Atelectasis: 'zeros' in the run, 'ones' now" in message, message
    # a copy of the same data in another place is the same data
    shutil.copytree(data["train"], tmp_path / "copy")
    assert train.fit(str(tmp_path / "copy"), checkpoint_dir=tmp_path, resume=True, epochs=2, out=None).global_step == 8


def test_resume_keeps_the_validation_set_that_picks_best(data, tmp_path):
    train.fit(data["train"], data["valid"], checkpoint_dir=tmp_path, epochs=1, out=None, **SMALL)
    best = (tmp_path / "best.npz").read_bytes()
    with pytest.raises(ValueError, match=rf"validates on {data['valid']} \(16 images\), which picks best.npz; "
                                         rf"pass --valid {data['valid']}"):
        train.fit(data["train"], checkpoint_dir=tmp_path, resume=True, epochs=2, out=None)
    with pytest.raises(ValueError, match="is not the validation data of the run"):
        train.fit(data["train"], data["valid_ones"], checkpoint_dir=tmp_path, resume=True, epochs=2, out=None)
    assert (tmp_path / "best.npz").read_bytes() == best
    other = tmp_path / "novalid"
    train.fit(data["train"], checkpoint_dir=other, epochs=1, out=None, **SMALL)
    with pytest.raises(ValueError, match="was started without --valid"):
        train.fit(data["train"], data["valid"], checkpoint_dir=other, resume=True, epochs=2, out=None)


def test_resume_with_fewer_epochs_than_done_is_an_error_and_a_finished_run_says_so(data, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*small_train_args(data["train"], "--epochs", "2", "--checkpoint-dir", run)).returncode == 0
    done = run_cli(*small_train_args(data["train"], "--epochs", "1", "--checkpoint-dir", run, "--resume"))
    assert done.returncode == 2, done.stderr
    assert f"--epochs 1: the run in {run / 'last.npz'} is already at epoch 2; pass --epochs N with N > 2" in done.stderr
    done = run_cli(*small_train_args(data["train"], "--checkpoint-dir", run, "--resume"))
    assert done.returncode == 0 and "has finished its 2 epochs: nothing to train" in done.stdout, done


# -- no model trained for nothing (item 6) --------------------------------------------------------------

def test_train_without_checkpoint_dir_keeps_the_run_in_a_new_folder(data, tmp_path):
    done = run_cli(*small_train_args(data["train"], "--epochs", "1"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1 and f"no --checkpoint-dir given: this run goes to runs/{runs[0]}" in done.stdout
    assert load_checkpoint(tmp_path / "runs" / runs[0] / "best.npz").config["position"]["epoch"] == 1


# -- divergence leaves a checkpoint worth resuming (item 7) ---------------------------------------------

def test_weights_that_blow_up_are_never_checkpointed(data, tmp_path, monkeypatch):
    real = train.build_optimizer
    steps = []

    def exploding(*args, **kwargs):     # at step 6 one weight jumps to 1e28 while the loss is still finite
        opt = real(*args, **kwargs)
        step = opt.step

        def step_then_explode():
            step()
            steps.append(1)
            if len(steps) == 6:
                opt.params[0].data[...] = 1e28
        opt.step = step_then_explode
        return opt

    monkeypatch.setattr(train, "build_optimizer", exploding)
    with pytest.raises(train.TrainingDiverged) as info:
        train.fit(data["train"], checkpoint_dir=tmp_path, epochs=3, checkpoint_every=1, out=None, **SMALL)
    message = str(info.value)
    assert "reached 1e+28" in message and f"the last good state is {tmp_path / 'last.npz'} (global step 5" in message
    assert "start over (--overwrite) with --lr 0.005 (this run: 0.05)" in message, message
    saved = load_checkpoint(tmp_path / "last.npz")
    assert saved.config["position"]["global_step"] == 5
    assert all(np.abs(v).max() < train.PARAM_LIMIT for v in saved.model_state.values())


def test_a_loss_that_explodes_stops_before_it_overflows(data, tmp_path, monkeypatch):
    real = train.bce_with_logits

    def exploding(logits, *args, **kwargs):
        loss, grad = real(logits, *args, **kwargs)
        return loss * 1e5, grad

    monkeypatch.setattr(train, "bce_with_logits", exploding)
    with pytest.raises(train.TrainingDiverged, match=r"loss is [0-9.e+]+ \(limit 10000\) at epoch 1, step 1/4"):
        train.fit(data["train"], checkpoint_dir=tmp_path, epochs=1, out=None, **SMALL)


# -- damaged checkpoints (item 11) ----------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    (b"", "empty file (0 bytes)"),
    (b"\x80\x04\x95 pickled", "not a chexcy checkpoint (not an .npz archive)"),
    (None, "a single NumPy array (.npy)"),
    (b"PK\x03\x04 torn", "corrupt or truncated checkpoint"),
], ids=["empty", "pickle", "npy", "torn-zip"])
def test_a_damaged_checkpoint_is_one_damaged_file_error_naming_it(tmp_path, content, problem):
    path = tmp_path / "bad.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.arange(3, dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    with pytest.raises(DamagedFileError) as info:
        load_checkpoint(path)
    assert isinstance(info.value, CheckpointError) and info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: {problem}"), str(info.value)
    assert "allow_pickle" not in str(info.value)


def test_checkpoints_get_the_umask_permissions(data, tmp_path):
    old = os.umask(0o022)
    try:
        train.fit(data["train"], checkpoint_dir=tmp_path, epochs=1, out=None, **SMALL)
    finally:
        os.umask(old)
    for name in ("last.npz", "best.npz", "log.jsonl"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644), name


# -- a full disk (item 10) ------------------------------------------------------------------------------

def test_disk_full_while_checkpointing_names_the_file_and_keeps_the_previous(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train.fit(data["train"], checkpoint_dir=run, epochs=1, out=None, **SMALL)
    before = (run / "last.npz").read_bytes()

    def full_disk(path, writer, **kwargs):          # the device fills up half-way through the write
        def write_some(f):
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fileio.atomic_write(path, write_some, **kwargs)

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    status = cli.main(["train", "--data", data["train"], "--checkpoint-dir", str(run), "--resume", "--epochs", "2",
                       "--log-every", "0"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.strip().splitlines() == [
        f"chexcy train: error: disk full while writing {run / 'last.npz'}; the previous last.npz is intact; free "
        f"some space, then continue the run with --resume"], err
    assert (run / "last.npz").read_bytes() == before
    assert sorted(os.listdir(run)) == ["best.npz", "last.npz", "log.jsonl", "train.lock"], "a temporary file was left"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_disk_full_while_logging_names_the_log(data, tmp_path, capsys):
    run = tmp_path / "run"
    train.fit(data["train"], checkpoint_dir=run, epochs=1, out=None, **SMALL)
    (run / "log.jsonl").unlink()
    (run / "log.jsonl").symlink_to("/dev/full")       # every write(2) to it fails with ENOSPC
    status = cli.main(["train", "--data", data["train"], "--checkpoint-dir", str(run), "--resume", "--epochs", "2"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.strip().splitlines() == [f"chexcy train: error: disk full while writing {run / 'log.jsonl'}; the "
                                        f"records already in it are intact"], err


def test_a_log_cut_short_by_a_crash_gets_its_newline_before_the_next_record(data, tmp_path):
    train.fit(data["train"], checkpoint_dir=tmp_path, epochs=1, out=None, **SMALL)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"event": "step", "los')                 # killed mid-write
    train.fit(data["train"], checkpoint_dir=tmp_path, resume=True, epochs=2, out=None)
    events = [r["event"] for r in train.read_log(tmp_path / "log.jsonl")]
    assert events.count("resume") == 1 and events.count("epoch") == 2, events


def _mount_small_tmpfs(folder, size):
    """Mount a tmpfs of `size` at folder; returns None, or the reason it cannot be done here."""
    if not sys.platform.startswith("linux"):
        return "tmpfs mounts need Linux"
    if shutil.which("mount") is None:
        return "no mount command"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
    return None


def test_disk_full_on_a_real_small_tmpfs(data, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    reason = _mount_small_tmpfs(mnt, "4m")
    if reason:
        pytest.skip(reason)
    try:
        run = mnt / "run"
        assert run_cli(*small_train_args(data["train"], "--epochs", "1", "--checkpoint-dir", run)).returncode == 0
        before = (run / "last.npz").read_bytes()
        # Fill the device until less than half a checkpoint is free: the next last.npz cannot be written.
        free = shutil.disk_usage(mnt).free
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - len(before) // 2))
        done = run_cli(*small_train_args(data["train"], "--epochs", "2", "--checkpoint-dir", run, "--resume"))
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and "disk full while writing" in done.stderr, done.stderr
        assert (run / "last.npz").read_bytes() == before
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")], os.listdir(run)
        assert load_checkpoint(run / "last.npz").config["position"]["epoch"] == 1
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- ranks of one MPI job must train one run (items 2 and 8) --------------------------------------------



@pytest.fixture(scope="module")
def mpi_data(data, tmp_path_factory):
    """The train folder (32 rows) and the same CSV limited to 24 rows: a different length."""
    if mpi_skip_reason():
        pytest.skip(mpi_skip_reason())
    base = tmp_path_factory.mktemp("mpi_faults")
    csv = os.path.join(os.path.dirname(data["train"]), "raw", "CheXpert-v1.0-small", "train.csv")
    prepare(csv, base / "short", size=16, quiet=True, uncertain="zeros", limit=24)
    return {"train": data["train"], "short": str(base / "short"), "base": base}


def mpmd(per_rank_args):
    """`mpiexec -n 1 chexcy ARGS0 : -n 1 chexcy ARGS1 ...`: each rank its own command line."""
    cmd = [find_mpiexec()]
    for i, args in enumerate(per_rank_args):
        cmd += ([":"] if i else []) + ["-n", "1", sys.executable, "-m", "chexcy", *map(str, args)]
    return cmd


def run_job(cmd, cwd, timeout=MPI_TIMEOUT_S):
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@needs_mpi
@pytest.mark.mpi
def test_ranks_whose_data_differ_in_length_fail_at_start_on_every_rank(mpi_data, tmp_path):
    common = ["--epochs", "2", "--width", "4", "--depth", "2", "--batch-size", "8", "--log-every", "0",
              "--checkpoint-dir", tmp_path / "run", "--distributed"]
    done = run_job(mpmd([["train", "--data", mpi_data["train"], *common],
                         ["train", "--data", mpi_data["short"], *common]]), tmp_path)
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    # The same clear message from each rank (their lines share one pipe and may run together).
    assert done.stderr.count("were not given the same run") == 2, done.stderr
    assert "--data: rank 0 '32 images, fingerprint " in done.stderr, done.stderr
    assert "rank 1 '24 images, fingerprint " in done.stderr, done.stderr


@needs_mpi
@pytest.mark.mpi
def test_ranks_given_different_learning_rates_fail_at_start(mpi_data, tmp_path):
    common = ["--data", mpi_data["train"], "--epochs", "1", "--width", "4", "--depth", "2", "--batch-size", "8",
              "--log-every", "0", "--checkpoint-dir", tmp_path / "run", "--distributed"]
    done = run_job(mpmd([["train", *common, "--lr", "0.05"], ["train", *common, "--lr", "0.1"]]), tmp_path)
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "settings lr: rank 0 0.05, rank 1 0.1" in done.stderr, done.stderr
    assert not (tmp_path / "run" / "last.npz").exists()


@needs_mpi
@pytest.mark.mpi
def test_a_locked_run_folder_ends_every_rank(mpi_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        done = run_job([find_mpiexec(), "-n", "2", sys.executable, "-m", "chexcy", "train", "--data",
                        mpi_data["train"], "--epochs", "1", "--width", "4", "--depth", "2", "--batch-size", "8",
                        "--checkpoint-dir", run, "--distributed"], tmp_path)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stderr.count(f"run folder {run} is in use by another chexcy train (pid {os.getpid()}") == 2, done.stderr
    assert "Traceback" not in done.stderr


@needs_mpi
@pytest.mark.mpi
def test_sigterm_ends_a_job_whose_rank_is_blocked_in_a_collective(tmp_path):
    # Rank 0 waits in a barrier rank 1 never enters (as after a mismatch the start check did not catch).
    # Python cannot run rank 0's signal handler inside the MPI call: the watchdog must end it.
    script = tmp_path / "blocked.py"
    script.write_text(
        "import sys, time\n"
        "from chexcy import distributed, parallel\n"
        "from chexcy.nn import build_model\n"
        "parallel.STUCK_AFTER_SIGNAL_S = 1.0\n"
        "comm = distributed.init(True)\n"
        "dp = distributed.DataParallel(build_model('simple', widths=[2]), comm)\n"
        "distributed.StopRequest(comm).__enter__()\n"
        "print('ready', comm.rank, flush=True)\n"
        "if comm.rank == 0:\n"
        "    comm.barrier()\n"
        "else:\n"
        "    while True:\n"
        "        time.sleep(0.05)\n")
    proc = subprocess.Popen([find_mpiexec(), "-n", "2", sys.executable, str(script)], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The ranks share one pipe, so their lines may interleave ("readyready 1\n 0\n"): wait until both
        # words have arrived, however they were cut.
        seen = ""
        while seen.count("ready") < 2:
            line = proc.stdout.readline()
            assert line, f"the job ended before both ranks were ready: {seen!r}"
            seen += line
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "rank 0 of 2: SIGTERM received and this rank stayed blocked in a collective for 1 s" in err, err
