"""One job at a time in a folder: an advisory lock that names its holder.

    with hold_folder_lock(out, "chexcy prepare"):
        ...                      # this process alone writes `out` until the block ends

The lock is an OS file lock (flock, through the `filelock` library) on ``FOLDER/.chexcy.lock``, so the
kernel releases it when the holder ends in any way, SIGKILL and power cut included: there are no stale
locks to clean up. Beside it, ``FOLDER/.chexcy.lock.json`` records who holds it (what, pid, host, command,
start time in UTC); a second job that finds the folder locked fails at once with a FolderBusyError whose
message names the folder and that holder. The lock is advisory (only processes that ask for it are kept
out) and not reentrant: taking it twice, even in one process, fails as if another job held it.

Both files stay in the folder after the lock is released (the holder record is removed); removing a lock
file while another process may be opening it would let two jobs hold "the" lock at once.
"""
import contextlib
import datetime
import json
import os
import socket
import sys

from chexcy.fileio import atomic_write_text

LOCK_FILE = ".chexcy.lock"
HOLDER_FILE = ".chexcy.lock.json"
LOCK_FILES = (LOCK_FILE, HOLDER_FILE)


class FolderLockError(RuntimeError):
    """The folder could not be locked (it cannot hold a lock file, or another job holds the lock)."""


class FolderBusyError(FolderLockError):
    """Another job holds the folder's lock. `folder`: the folder; `holder`: the holder's record (a dict
    with what, pid, host, command, started) or None when it has not written one yet."""

    def __init__(self, folder, holder):
        self.folder = folder
        self.holder = holder
        super().__init__(f"{folder} is in use by {describe_holder(holder)}; wait for it to finish "
                         "or use another folder")


def describe_holder(holder):
    """A holder record (see FolderBusyError) -> one line of words."""
    if not isinstance(holder, dict):
        return "another process (it has not recorded who it is)"
    command = str(holder.get("command", "?"))
    if len(command) > 160:
        command = command[:157] + "..."
    return (f"another {holder.get('what', 'process')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}: {command})")


def read_holder(folder):
    """The holder record of `folder`'s lock as a dict, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(folder, HOLDER_FILE), encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def hold_folder_lock(folder, what):
    """Hold the advisory lock of the existing folder `folder` for the duration of the with-block.

    what: a few words naming the job, shown to whoever finds the folder busy (e.g. "chexcy prepare").
    Yields the holder record written for this process (dict: what, pid, host, command, started).
    Raises FolderBusyError at once (never waits) when another job holds the lock, FolderLockError when
    the lock file cannot be created (e.g. a read-only folder), FileNotFoundError when `folder` does not
    exist. The lock is released, and the holder record removed, when the block ends in any way.
    """
    import filelock

    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot lock {folder}: no such folder")
    lock = filelock.FileLock(os.path.join(folder, LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise FolderBusyError(folder, read_holder(folder)) from None
    except OSError as exc:
        raise FolderLockError(f"cannot lock {folder}: {exc.strerror or exc}") from None
    holder_path = os.path.join(folder, HOLDER_FILE)
    holder = {"what": str(what), "pid": os.getpid(), "host": socket.gethostname(),
              "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else sys.executable,
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    try:
        try:
            atomic_write_text(holder_path, json.dumps(holder) + "\n")
        except OSError:
            # The record only explains a refusal; the lock itself holds without it. A stale record from an
            # earlier holder must not be shown as this one, though.
            with contextlib.suppress(OSError):
                os.remove(holder_path)
        yield holder
    finally:
        with contextlib.suppress(OSError):
            os.remove(holder_path)
        lock.release()
