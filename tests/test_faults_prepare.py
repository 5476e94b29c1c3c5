"""Faults around `chexcy prepare`: a kill mid-run, a rerun with other inputs, two runs into one folder at
once, a full disk (simulated on every machine; for real on a small tmpfs where mounting is allowed).

After each fault the user gets one line in words (no traceback), nothing is mixed or half-written, no
temporary file is left, and the same command run again ends with the bytes of an uninterrupted run.
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from chexcy.cli import main
from chexcy.data import prepare as prep
from chexcy.fileio import DiskFullError
from chexcy.locks import HOLDER_FILE, FolderBusyError, hold_folder_lock, read_holder

from data_fixtures import fresh_dir, interrupted_prepare, prepared_bytes, synthetic_download, train_csv

def _temporaries(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def _slow_prepare_child(csv, out, gate=None, **options):
    """A child process running prepare at 20 ms per image, so that it can be caught part-way through.

    gate: a path; from its 9th image on, the child waits until that file exists (at most 120 s), so a test
    can act while the child is certainly mid-run however slowly the machine starts other processes."""
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    script = (
        "import os, sys, time\n"
        "import chexcy.data.prepare as p\n"
        "real = p.load_image\n"
        "calls = [0]\n"
        f"gate = {gate!r}\n"
        "def slow(path, size):\n"
        "    time.sleep(0.02)\n"
        "    calls[0] += 1\n"
        "    deadline = time.time() + 120\n"
        "    while gate and calls[0] > 8 and not os.path.exists(gate) and time.time() < deadline:\n"
        "        time.sleep(0.02)\n"
        "    return real(path, size)\n"
        "p.load_image = slow\n"
        f"p.prepare({csv!r}, {out!r}, quiet=True, {args})\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], env=_env())


def _wait_for_records(out, n, child):
    progress = os.path.join(out, "progress.jsonl")
    deadline = time.time() + 60
    while time.time() < deadline and child.poll() is None:
        if os.path.exists(progress):
            with open(progress) as f:
                if sum(1 for _ in f) >= n:
                    return
        time.sleep(0.02)
    raise AssertionError(f"the child wrote fewer than {n} progress records (exit status {child.poll()})")


def _chexcy(*argv):
    return subprocess.run([sys.executable, "-m", "chexcy", *argv], env=_env(), capture_output=True, text=True)


# ----------------------------------------------------------------------------------------------- kill
def test_sigkilled_process_resumes_to_the_bytes_of_a_clean_run():
    clean, killed = fresh_dir("clean-k"), fresh_dir("killed-k")
    prep.prepare(train_csv(), clean, size=24, quiet=True, chunk_rows=8)
    child = _slow_prepare_child(train_csv(), killed, size=24, chunk_rows=8)
    _wait_for_records(killed, 3, child)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the child should have been killed mid-run"
    assert not os.path.exists(os.path.join(killed, "manifest.json"))
    prep.prepare(train_csv(), killed, size=24, quiet=True, chunk_rows=8)
    assert prepared_bytes(killed) == prepared_bytes(clean)
    assert _temporaries(killed) == []


def test_rerun_removes_the_temporary_of_an_atomic_write_cut_short_by_a_kill(monkeypatch):
    clean, out = fresh_dir("stale-clean"), fresh_dir("stale")
    prep.prepare(train_csv(), clean, size=24, quiet=True, chunk_rows=16)
    interrupted_prepare(out, monkeypatch, size=24)
    for name in (".meta.csv.k1ll3d_x.tmp", ".labels.npy.abcdefgh.tmp"):    # as atomic_write names them
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"half")
    with open(os.path.join(out, "notes.tmp"), "wb") as f:                  # not ours: left alone
        f.write(b"mine")
    prep.prepare(train_csv(), out, size=24, quiet=True)
    assert prepared_bytes(out) == prepared_bytes(clean)
    assert _temporaries(out) == ["notes.tmp"]


def test_killed_run_resumed_with_another_root_or_csv_is_refused(monkeypatch):
    out = fresh_dir("mixed")
    interrupted_prepare(out, monkeypatch, size=24)
    # Another root holding the same layout: the rows would come from a second set of images.
    other_root = fresh_dir("other-root")
    os.symlink(os.path.join(synthetic_download(), "CheXpert-v1.0-small"), os.path.join(other_root, "CheXpert-v1.0-small"))
    with pytest.raises(FileExistsError, match=rf"unfinished prepare of a different dataset \(differs in: root "
                                              rf"\({synthetic_download()} there, {other_root} asked for\)\)"):
        prep.prepare(train_csv(), out, size=24, quiet=True, root=other_root)
    # Another CSV, with other rows.
    other_csv = os.path.join(fresh_dir("other-csv"), "train.csv")
    pd.read_csv(train_csv(), dtype=str, keep_default_na=False).iloc[::-1].to_csv(other_csv, index=False)
    with pytest.raises(FileExistsError, match="differs in: source_csv .*source_sha256"):
        prep.prepare(other_csv, out, size=24, quiet=True, root=synthetic_download())
    with pytest.raises(FileExistsError, match=r"differs in: filters.limit \(None there, 50 asked for\)"):
        prep.prepare(train_csv(), out, size=24, quiet=True, limit=50)
    # The refused runs left the unfinished one as it was: the same command finishes it.
    clean = fresh_dir("mixed-clean")
    prep.prepare(train_csv(), clean, size=24, quiet=True, chunk_rows=16)
    prep.prepare(train_csv(), out, size=24, quiet=True)
    assert prepared_bytes(out) == prepared_bytes(clean)
    # --overwrite starts the other dataset afresh.
    manifest = prep.prepare(train_csv(), out, size=24, quiet=True, root=other_root, overwrite=True)
    assert manifest["root"] == other_root and manifest["identity"]["root"] == other_root


# ------------------------------------------------------------------------------------ concurrent runs
def test_hold_folder_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with hold_folder_lock(tmp_path, "chexcy test") as holder:
        assert read_holder(tmp_path) == holder and holder["pid"] == os.getpid()
        with pytest.raises(FolderBusyError) as info:
            with hold_folder_lock(tmp_path, "another test"):
                pass
        assert info.value.holder == holder
        message = str(info.value)
        assert message.startswith(f"{tmp_path} is in use by another chexcy test (pid {os.getpid()} on ")
        assert holder["started"] in message and "wait for it to finish or use another folder" in message
    assert not os.path.exists(tmp_path / HOLDER_FILE), "the holder record goes with the lock"
    with pytest.raises(RuntimeError, match="boom"):
        with hold_folder_lock(tmp_path, "chexcy test"):
            raise RuntimeError("boom")
    with hold_folder_lock(tmp_path, "chexcy test"):          # released by the exception above
        pass
    with pytest.raises(FileNotFoundError, match="no such folder"):
        with hold_folder_lock(tmp_path / "nope", "chexcy test"):
            pass


def test_second_prepare_into_a_busy_folder_fails_at_once_naming_the_first():
    clean, out = fresh_dir("busy-clean"), fresh_dir("busy")
    prep.prepare(train_csv(), clean, size=24, quiet=True, chunk_rows=8)
    gate = os.path.join(fresh_dir("busy-gate"), "release")
    first = _slow_prepare_child(train_csv(), out, gate=gate, size=24, chunk_rows=8)
    try:
        _wait_for_records(out, 1, first)
        for size in ("24", "16"):               # the same dataset, or another one: the folder is busy
            t0 = time.time()
            second = _chexcy("prepare", train_csv(), "--out", out, "--size", size, "--quiet")
            assert second.returncode == 1, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
            assert lines[0].startswith(f"chexcy prepare: error: {out} is in use by another chexcy prepare "
                                       f"(pid {first.pid} on "), lines[0]
            assert time.time() - t0 < 30 and first.poll() is None, "the second run must not wait for the first"
        open(gate, "w").close()
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert prepared_bytes(out) == prepared_bytes(clean), "the refused runs must not have touched the first run's output"
    assert _temporaries(out) == [] and not os.path.exists(os.path.join(out, HOLDER_FILE))


# ----------------------------------------------------------------------------------- disk full, simulated
def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to tell files apart")


def _full_after(monkeypatch, name, calls, target="pwrite"):
    """Make os.<target> raise ENOSPC from its `calls`-th call on a file whose name contains `name`."""
    real = getattr(os, target)
    seen = []

    def full(fd, *args, **kwargs):
        if name in os.path.basename(_fd_path(fd)):
            seen.append(fd)
            if len(seen) >= calls:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, target, full)


def _csv_with_a_missing_image():
    """train.csv with its first image pointing at a missing file (so prepare copies the kept rows)."""
    df = pd.read_csv(train_csv(), dtype=str, keep_default_na=False)
    df.loc[0, "Path"] = "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg"
    csv = os.path.join(fresh_dir("one-missing"), "train.csv")
    df.to_csv(csv, index=False)
    return csv


@needs_proc
def test_disk_full_while_decoding_says_so_and_a_rerun_finishes(monkeypatch, capsys):
    clean = fresh_dir("full-clean")
    prep.prepare(train_csv(), clean, size=24, quiet=True, chunk_rows=16)
    # Part-way through: the chunks written before the disk filled up are kept and not decoded again.
    out = fresh_dir("full")
    with monkeypatch.context() as patch:
        _full_after(patch, "images.partial.npy", 3)
        with pytest.raises(DiskFullError, match="images.partial.npy"):
            prep.prepare(train_csv(), out, size=24, quiet=True, chunk_rows=16)
    assert _temporaries(out) == []
    lines = []
    prep.prepare(train_csv(), out, size=24, log=lines.append)
    assert any("resuming, 2 of 10 chunks" in line for line in lines), lines
    assert prepared_bytes(out) == prepared_bytes(clean)
    # The command line says it in one line and exits with 1.
    out = fresh_dir("full-cli")
    argv = ["prepare", train_csv(), "--out", out, "--size", "24", "--workers", "1", "--quiet"]
    with monkeypatch.context() as patch:
        _full_after(patch, "images.partial.npy", 1)
        assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"chexcy prepare: error: disk full while writing {out}/images.partial.npy; the images decoded so far are "
        "kept: free some space and run the same command again to finish"]
    assert _temporaries(out) == []
    assert main(argv) == 0
    assert prepared_bytes(out) == prepared_bytes(clean)


@needs_proc
def test_disk_full_while_copying_the_kept_rows_leaves_no_temporary_file(monkeypatch):
    csv = _csv_with_a_missing_image()
    clean, out = fresh_dir("copy-clean"), fresh_dir("copy-full")
    prep.prepare(csv, clean, size=24, quiet=True, root=synthetic_download())
    with monkeypatch.context() as patch:
        _full_after(patch, "images.npy.tmp", 1)
        with pytest.raises(DiskFullError) as info:
            prep.prepare(csv, out, size=24, quiet=True, root=synthetic_download())
    assert info.value.strerror.startswith(f"disk full while writing {out}/images.npy;")
    assert _temporaries(out) == [] and not os.path.exists(os.path.join(out, "images.npy"))
    prep.prepare(csv, out, size=24, quiet=True, root=synthetic_download())
    assert prepared_bytes(out) == prepared_bytes(clean)


@needs_proc
@pytest.mark.parametrize("name", ["request.json", "labels.npy", "meta.csv", "skipped.csv", "manifest.json"])
def test_disk_full_in_an_atomic_write_keeps_the_previous_state(monkeypatch, name):
    clean, out = fresh_dir("atomic-clean"), fresh_dir("atomic-full")
    prep.prepare(train_csv(), clean, size=16, quiet=True)
    with monkeypatch.context() as patch:
        _full_after(patch, f".{name}.", 1, target="fsync")      # atomic_write's temporary of `name`
        with pytest.raises(DiskFullError) as info:
            prep.prepare(train_csv(), out, size=16, quiet=True)
    assert info.value.strerror == (f"disk full while writing {out}/{name}; the previous {name} is intact "
                                   "(free some space and run the command again)")
    assert _temporaries(out) == [] and not os.path.exists(os.path.join(out, "manifest.json"))
    prep.prepare(train_csv(), out, size=16, quiet=True)
    assert prepared_bytes(out) == prepared_bytes(clean)


def test_disk_full_while_recording_progress_leaves_a_readable_record(monkeypatch):
    clean, out = fresh_dir("records-clean"), fresh_dir("records-full")
    prep.prepare(train_csv(), clean, size=16, quiet=True, chunk_rows=16)
    real_write = os.write
    records = []

    def torn(fd, data):
        if data.startswith(b'{"chunk"'):
            records.append(data)
            if len(records) == 3:                    # half a line fits, then the disk is full
                return real_write(fd, data[: len(data) // 2])
        return real_write(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", torn)
        with pytest.raises(DiskFullError, match="progress.jsonl"):
            prep.prepare(train_csv(), out, size=16, quiet=True, chunk_rows=16)
    lines = []
    prep.prepare(train_csv(), out, size=16, log=lines.append)
    assert any("resuming, 2 of" in line for line in lines), lines
    assert prepared_bytes(out) == prepared_bytes(clean)


# ---------------------------------------------------------------------------------- disk full, for real
@pytest.fixture
def small_tmpfs(tmp_path):
    """A mounted tmpfs of 2 MB and a function resizing it (`resize("8m")`); skipped where mounting is not
    allowed (the simulated tests above cover the logic there)."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux and mount(8) to mount a small tmpfs")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the simulated disk-full tests cover the logic")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs ({done.stderr.strip() or done.returncode}); "
                    "the simulated disk-full tests cover the logic")

    def resize(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    try:
        yield mount_point, resize
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("phase", ["decoding", "copying the kept rows"])
def test_real_full_disk_says_so_leaves_nothing_behind_and_a_rerun_finishes(small_tmpfs, phase):
    mount_point, resize = small_tmpfs
    # 160 images of 128 x 128 are 2.6 MB: they do not fit in 2 MB. With one image missing they fit in
    # 4 MB, but their copy without the missing row does not fit beside them.
    csv, args = (train_csv(), []) if phase == "decoding" else (_csv_with_a_missing_image(), ["--root", synthetic_download()])
    if phase != "decoding":
        resize("4m")
    clean, out = fresh_dir("real-clean"), str(mount_point / "prepared")
    assert _chexcy("prepare", csv, "--out", clean, "--size", "128", "--quiet", *args).returncode == 0
    failed = _chexcy("prepare", csv, "--out", out, "--size", "128", "--workers", "2", "--quiet", *args)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    written = "images.partial.npy" if phase == "decoding" else "images.npy"
    assert failed.stderr.startswith(f"chexcy prepare: error: disk full while writing {out}/{written}; "), failed.stderr
    assert _temporaries(out) == []
    resize("16m")
    again = _chexcy("prepare", csv, "--out", out, "--size", "128", "--workers", "2", "--quiet", *args)
    assert again.returncode == 0, again.stderr
    assert prepared_bytes(out) == prepared_bytes(clean)
