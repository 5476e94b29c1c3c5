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
    return (f"another {holder.get('what', 'process')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}: {command})")


def read_holder(folder, holder_name=HOLDER_FILE):
    """The holder record of `folder`'s lock as a dict, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(folder, holder_name), encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _command_line():
    """This process's command line as the user typed it (`python -m chexcy` shows as `chexcy`)."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else os.path.basename(sys.executable)
    if program == "__main__.py":
        program = "chexcy"
    return " ".join([program, *sys.argv[1:]])


class FolderLock:
    """The advisory lock of the existing folder `folder`, held from `acquire` until `release` (or process exit).

    what: a few words naming the job, shown to whoever finds the folder busy (e.g. "chexcy prepare").
    lock_name, holder_name: the lock file and the holder record beside it (names of files in the folder).
    record_required: when the holder record cannot be written, give the lock back and raise (True), or
    hold the lock without a record (False: the record only explains a refusal).
    """

    def __init__(self, folder, what, lock_name=LOCK_FILE, holder_name=HOLDER_FILE, record_required=False):
        self.folder = os.path.abspath(os.fspath(folder))
        self.what = str(what)
        self.path = os.path.join(self.folder, lock_name)
        self.holder_path = os.path.join(self.folder, holder_name)
        self.record_required = record_required
        self.holder = None
        self._lock = None

    def acquire(self):
        """Take the lock; returns self (its `holder` record: what, pid, host, command, started).
        Raises FolderBusyError at once (never waits) when another job holds it, FolderLockError when the lock
        file cannot be created (e.g. a read-only folder), FileNotFoundError when the folder does not exist."""
        import filelock

        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"cannot lock {self.folder}: no such folder")
        lock = filelock.FileLock(self.path)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise FolderBusyError(self.folder, read_holder(self.folder, os.path.basename(self.holder_path))) from None
        except OSError as exc:
            raise FolderLockError(f"cannot lock {self.folder}: {exc.strerror or exc}") from None
        self._lock = lock
        self.holder = {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                       "command": _command_line(),
                       "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        try:
            atomic_write_text(self.holder_path, json.dumps(self.holder) + "\n")
        except BaseException as exc:
            if self.record_required or not isinstance(exc, OSError):
                self.release()
                raise
            # A stale record from an earlier holder must not be shown as this one.
            with contextlib.suppress(OSError):
                os.remove(self.holder_path)
        return self

    @property
    def is_locked(self):
        return self._lock is not None and self._lock.is_locked

    def release(self):
        """Remove the holder record and give the lock back (nothing when not held)."""
        if self.is_locked:
            with contextlib.suppress(OSError):
                os.remove(self.holder_path)
            self._lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@contextlib.contextmanager
def hold_folder_lock(folder, what):
    """Hold the advisory lock of the existing folder `folder` for the duration of the with-block
    (FolderLock, with its errors). Yields the holder record written for this process (dict: what, pid,
    host, command, started). The lock is released, and the holder record removed, when the block ends in
    any way."""
    with FolderLock(folder, what) as lock:
        yield lock.holder
