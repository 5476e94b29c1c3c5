"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs alone, in a fresh temporary folder, in a new interpreter (the chexcy under test: the
same environment as this process). A block that needs a real data set or MPI is preceded in the
markdown by a line `<!-- not-run: reason -->`; those are counted and must stay a handful.
"""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
MAX_NOT_RUN = 5

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*$")


def blocks_of(text):
    """[(line of the fence, code, reason not to run or None)] of the python blocks in markdown `text`."""
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = [s for s in text[:match.start()].splitlines() if s.strip()]
        marker = _NOT_RUN.search(before[-1]) if before else None
        blocks.append((line, match.group(1), marker.group(1) if marker else None))
    return blocks


def python_blocks():
    """[(file name, line of the fence, code, reason not to run or None)] over DOCS."""
    return [(path.name, *block) for path in DOCS for block in blocks_of(path.read_text(encoding="utf-8"))]


BLOCKS = python_blocks()
TO_RUN = [b for b in BLOCKS if b[3] is None]


def test_the_docs_have_python_examples():
    assert len(TO_RUN) >= 3, [b[:2] for b in BLOCKS]


def test_blocks_marked_not_run_are_few_and_say_why():
    not_run = [(name, line, reason) for name, line, _, reason in BLOCKS if reason is not None]
    print(f"{len(not_run)} of {len(BLOCKS)} python blocks not run:", *not_run, sep="\n  ")
    assert len(not_run) <= MAX_NOT_RUN, not_run
    assert all(reason.strip() for _, _, reason in not_run), not_run


def test_a_marker_stops_only_the_block_it_precedes():
    text = "a\n\n<!-- not-run: needs MPI -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert blocks_of(text) == [(4, "x = 1\n", "needs MPI"), (8, "y = 2\n", None)]


@pytest.mark.slow
@pytest.mark.parametrize("name, line, code", [b[:3] for b in TO_RUN], ids=[f"{b[0]}:{b[1]}" for b in TO_RUN])
def test_block_runs(name, line, code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{name} line {line}: the example fails\n{code}\n--- stderr:\n{done.stderr}"
