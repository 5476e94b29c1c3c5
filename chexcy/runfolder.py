"""A training run's folder: one run per folder, one process writing it at a time.

`chexcy train --checkpoint-dir R` writes R/last.npz, R/best.npz and R/log.jsonl. Two mistakes would mix
runs there silently: starting a new run into a folder that holds one (best.npz replaced, the log appended
to), and two runs writing the folder at once. `open_run_folder` prevents both:

- an advisory lock (the `filelock` library: flock(2) on R/train.lock) held for the whole run; a second
  process fails at once with a message naming the holder, whose pid, host, command and start time are
  written beside the lock (R/train.lock.json) when it is taken. The kernel drops the lock when its holder
  dies, even by SIGKILL, so a killed run never leaves the folder locked.
- a new run (no --resume) into a folder that holds a run's files refuses, unless told to overwrite, in
  which case those files are removed first (a fresh log, not an appended one).
"""
import datetime
import json
import os
import socket
import sys

import filelock

from chexcy.fileio import atomic_write_text

RUN_FILES = ("last.npz", "best.npz", "log.jsonl")
LOCK_NAME = "train.lock"
HOLDER_NAME = "train.lock.json"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (e.g. it holds a run and neither --resume nor --overwrite
    was given): a usage error."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock: a failure of this run, not a usage error."""


def run_files(folder):
    """The run files (RUN_FILES) present in `folder`, in RUN_FILES order."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]


def default_run_folder(base="runs", now=None):
    """A new folder name under `base` for a run given no --checkpoint-dir: base/YYYYmmdd-HHMMSS
    (with -2, -3, ... when that name is taken). Not created here."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    name, n = os.path.join(base, stamp), 1
    while os.path.exists(name):
        n += 1
        name = os.path.join(base, f"{stamp}-{n}")
    return name


def _command_line():
    """This process's command line as the user typed it (`python -m chexcy` shows as `chexcy`)."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":
        program = "chexcy"
    return " ".join([program, *sys.argv[1:]])


class RunLock:
    """The advisory lock of one run folder, held from `acquire` until `release` (or process exit)."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.holder_path = os.path.join(self.folder, HOLDER_NAME)
        self._lock = filelock.FileLock(self.path, timeout=0)
        self.created = False        # set by open_run_folder when it made the folder

    def acquire(self):
        """Take the lock or raise RunFolderError naming the folder and the process that holds it."""
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise RunFolderBusy(f"run folder {self.folder} is in use by another chexcy train "
                                 f"({self.describe_holder()}); wait for it to finish, or pass another "
                                 f"--checkpoint-dir") from None
        holder = dict(pid=os.getpid(), host=socket.gethostname(), command=_command_line(),
                      started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
        try:
            atomic_write_text(self.holder_path, json.dumps(holder, indent=1) + "\n")
        except BaseException:
            self._lock.release()
            raise
        return self

    def describe_holder(self):
        """'pid P on host H since T: COMMAND' from the holder file, or why it cannot be read."""
        try:
            with open(self.holder_path, encoding="utf-8") as f:
                h = json.load(f)
            return f"pid {h['pid']} on host {h['host']} since {h['started']}: {h['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder unknown: {self.holder_path} is missing or unreadable"

    def release(self):
        """Drop the lock. A folder this run created and left without run files (it failed before its first
        write) is removed again, so a failed start leaves nothing behind."""
        if self._lock.is_locked:
            try:
                os.unlink(self.holder_path)
            except OSError:
                pass
            self._lock.release()
            if self.created and os.listdir(self.folder) == [LOCK_NAME]:
                try:
                    os.unlink(self.path)
                    os.rmdir(self.folder)
                except OSError:
                    pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def open_run_folder(folder, resume=False, overwrite=False):
    """Create `folder` if needed, lock it and check that it fits the request. Returns the held RunLock.

    resume: the run continues the one in the folder (its files are expected, kept and appended to).
    overwrite: a new run replaces the folder's run; its RUN_FILES are removed once the lock is held.
    Otherwise a folder holding any of RUN_FILES is refused (RunFolderError naming it and its files).
    The checks happen under the lock, so no other run can slip in between them and the first write.
    """
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunFolderError(f"--checkpoint-dir {folder} is a file, not a folder")
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    lock = RunLock(folder).acquire()
    lock.created = created
    try:
        present = run_files(folder)
        if present and not resume:
            if not overwrite:
                raise RunFolderError(
                    f"run folder {folder} already holds a run ({', '.join(present)}); pass --resume to continue "
                    f"it, --overwrite to delete it and start over, or another --checkpoint-dir")
            for name in present:
                os.unlink(os.path.join(folder, name))
    except BaseException:
        lock.release()
        raise
    return lock
