"""Writing files so that a crash, a kill or a full disk never leaves a half-written one, and the one error
type every reader raises when a file chexcy wrote earlier is damaged.

Every writer in chexcy goes through `atomic_write`: the content goes to a temporary file beside the
target, is flushed and fsync'ed, renamed over the target (os.replace, atomic on POSIX), and the folder is
fsync'ed so the rename itself survives a power cut. On any error the temporary file is removed; on a
full disk (ENOSPC, EDQUOT) the error says so in words and that the previous file is intact.

The new file gets the permissions an ordinary `open(path, "w")` would give (0666 less the umask), not
mkstemp's 0600, so a run folder shared with a group stays readable by it.
"""
import errno
import os
import tempfile

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing a file; the previous version of that file is intact."""


class DamagedFileError(ValueError):
    """A file chexcy reads (prepared data, checkpoint, run log) is missing a part, truncated or malformed.

    `path` is the file, `problem` what is wrong with it; str() gives both, so a command line can print it
    as it is.
    """

    def __init__(self, path, problem):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder):
    """fsync a folder so that renames into it are durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, writer, mode="wb", encoding=None, newline=None):
    """Write `path` atomically: writer(file) fills a temporary file beside it, which then replaces `path`.

    mode: "wb" (binary) or "w" (text, with `encoding` and `newline` as for open()). The folder must exist
    (a missing folder is the caller's mistake to report, not something to create silently).
    Raises DiskFullError naming `path` when the disk fills up; the previous `path`, if any, is untouched
    and no temporary file is left behind. Returns `path`.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"folder {folder} does not exist (writing {path})")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise DiskFullError(exc.errno, f"disk full while writing {path}; the previous {os.path.basename(path)}"
                                f" is intact (free some space and run the command again)") from None
        raise
    fsync_dir(folder)
    return path


def atomic_write_text(path, text, encoding="utf-8"):
    """Write the str `text` to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: f.write(text), mode="w", encoding=encoding, newline="")


def atomic_write_bytes(path, data):
    """Write the bytes `data` to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: f.write(data), mode="wb")


def is_disk_full(exc):
    """True when the exception `exc` is an OSError meaning the disk or the quota is full (ENOSPC, EDQUOT),
    for writers that cannot go through atomic_write (data written in place, appended records)."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE
