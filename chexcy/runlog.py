"""The run log: log.jsonl in a run folder, one JSON object per line (start, step, epoch, checkpoint,
resume, interrupted, diverged, end events), written so that a killed run keeps every finished line."""
import json
import os
import time

import numpy as np

from chexcy.fileio import DiskFullError, is_disk_full


class JsonLog:
    """Append-only JSON-lines log; each record goes to the file with one write(2) at once (a killed run keeps
    every line). A full disk raises DiskFullError naming the file; the records already in it stay intact."""

    def __init__(self, path):
        self.path = path
        self._fd = None
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            # A crash can cut the last line short; the next record must start on a line of its own.
            if os.fstat(self._fd).st_size > 0:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        self._append(b"\n")

    def _append(self, data):
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(exc.errno, f"disk full while writing {self.path}; the records already in "
                                               f"it are intact") from None
            raise

    def write(self, event, **fields):
        if self._fd is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._append((json.dumps(record, default=_json_default) + "\n").encode("utf-8"))

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_log(path):
    """Records of a log.jsonl; for step records seen twice (a resumed run replays the steps after its
    checkpoint) the later one wins. Returns a list of dicts in file order."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue          # a line torn by a crash
    return records
