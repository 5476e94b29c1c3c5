"""Shared pytest set-up for chexcy.

- Guard: when CHEXCY_EXPECT_BACKEND is set (CI does), the run stops at once, with a failing exit code,
  unless chexcy.ops chose that backend. Without it, running pytest from a checkout whose compiled module
  is missing would silently test the fallback twice.
- The header names the backend, the threads and the chexcy that was imported (source tree or
  site-packages).
- Fixtures: `rng` (a seeded generator: every run sees the same data), `backend` (each backend under
  test, see tests/ops_cases.py, made active for the test).
"""
import os

import numpy as np
import pytest

import chexcy
from chexcy import ops

from ops_cases import BACKENDS

SEED = 20261125


def pytest_report_header(config):
    return [f"chexcy: backend {ops.get_backend()}, threads {ops.get_num_threads()}, "
            f"available {ops.available_backends()}, backends under test {BACKENDS}, "
            f"from {chexcy.__file__}"]


def pytest_sessionstart(session):
    expected = os.environ.get("CHEXCY_EXPECT_BACKEND", "").strip()
    if expected and ops.get_backend() != expected:
        pytest.exit(f"CHEXCY_EXPECT_BACKEND={expected} but chexcy.ops chose backend "
                    f"{ops.get_backend()!r} (chexcy imported from {chexcy.__file__}; available: "
                    f"{ops.available_backends()}). Build or install the compiled module, or run "
                    f"pytest against the installed package.", returncode=3)


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend under test in turn, active for the duration of the test."""
    with ops.use_backend(request.param):
        yield request.param
