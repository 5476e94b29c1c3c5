"""chexcy.memory: freed activation buffers stay mapped for the next step instead of going back to the OS.

The property is observed, not timed: after a 48 MB array is touched and freed, the process's resident
memory still holds it when reuse_freed_memory() has kept it in the heap (so the next step reuses those
pages without faulting them in and zeroing them again), and has dropped by it with glibc's defaults.
"""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the allocator tuning applies to glibc only")

PROBE = r"""
import numpy as np
from chexcy.memory import reuse_freed_memory, reusing_freed_memory
was = reusing_freed_memory()
applied = reuse_freed_memory()
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
before = rss_mb()
a = np.empty(12 << 20, np.float32)        # 48 MB: above glibc's largest default mmap threshold
a.fill(1.0)                               # touch every page
del a
print(applied, round(rss_mb() - before), was, reusing_freed_memory())
"""


def _probe(tuning, tmp_path):
    import chexcy
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(chexcy.__file__)))
    # The child imports the same chexcy as this test (installed, or the checkout under test).
    env = dict(os.environ, CHEXCY_MALLOC_TUNING=tuning, PYTHONSAFEPATH="1", PYTHONPATH=package_root)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, kept_mb, was, now = out.stdout.split()
    # reusing_freed_memory() reports the tuning (the compiled ops skip populating pages when it is on)
    assert was == "False" and now == applied, out.stdout
    return applied == "True", int(kept_mb)


def test_tuned_allocator_keeps_freed_arrays_mapped(tmp_path):
    applied, kept_mb = _probe("1", tmp_path)
    assert applied
    assert kept_mb >= 40, f"only {kept_mb} MB of a freed 48 MB array stayed mapped: it went back to the OS"


def test_opt_out_leaves_the_allocator_alone(tmp_path):
    applied, kept_mb = _probe("0", tmp_path)
    assert not applied
    assert kept_mb < 8, f"untuned, the freed 48 MB array should leave the process; {kept_mb} MB stayed"


def test_fit_applies_the_tuning(monkeypatch):
    import chexcy.train as train
    calls = []
    monkeypatch.setattr(train, "reuse_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(FileNotFoundError):
        train.fit("/nonexistent/prepared-folder", out=None)
    assert calls == [1]
