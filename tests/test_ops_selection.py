"""Backend selection: CHEXCY_BACKEND, the automatic choice, the one fallback warning, use_backend.

The choice is made once per process, so the environment cases run in fresh subprocesses that import
the same chexcy as this process (see test_ops_validation.subprocess_env).
"""
import subprocess
import sys
import textwrap

import pytest

from chexcy import ops
from ops_cases import AVAILABLE_BACKENDS, COMPILED
from test_ops_validation import subprocess_env

# Makes the compiled module look absent, before chexcy.ops makes its first choice.
HIDE_COMPILED = textwrap.dedent("""
    import chexcy._native as native
    def _missing():
        raise ImportError("compiled kernels hidden by the test")
    native.load = _missing
""")


def run_python(tmp_path, code, **env):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                          env=subprocess_env(**env), capture_output=True, text=True, timeout=120)
    return proc


@pytest.mark.parametrize("name", AVAILABLE_BACKENDS)
def test_env_variable_chooses_the_backend(name, tmp_path):
    proc = run_python(tmp_path, """
        import warnings
        warnings.simplefilter("error")       # an explicit choice gives no warning
        import numpy as np, chexcy.ops as ops
        out = ops.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 2, 2), np.float32))
        print(ops.get_backend(), out.sum())
    """, CHEXCY_BACKEND=name)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [name, "16.0"]


def test_unknown_env_backend_is_a_clear_error(tmp_path):
    proc = run_python(tmp_path, """
        import chexcy.ops as ops
        try:
            ops.get_backend()
        except ValueError as exc:
            print("ValueError:", exc)
    """, CHEXCY_BACKEND="gpu")
    assert proc.returncode == 0, proc.stderr
    assert "ValueError: CHEXCY_BACKEND='gpu' is not a chexcy backend" in proc.stdout
    assert "cython, python, reference" in proc.stdout


def test_default_is_compiled_when_built_else_python(tmp_path):
    proc = run_python(tmp_path, """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import chexcy.ops as ops
            print(ops.get_backend(), len(caught))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == (["cython", "0"] if COMPILED else ["python", "1"])


def test_fallback_warns_exactly_once_with_build_instructions(tmp_path):
    proc = run_python(tmp_path, HIDE_COMPILED + textwrap.dedent("""
        import warnings
        import numpy as np
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import chexcy.ops as ops
            x, w = np.ones((1, 1, 4, 4), np.float32), np.ones((2, 1, 3, 3), np.float32)
            for _ in range(3):
                ops.conv2d_forward(x, w)
                ops.get_backend()
                ops.get_num_threads()
            print("BACKEND", ops.get_backend(), ops.available_backends())
        for w in caught:
            print("WARNING", w.category.__name__, w.message)
    """))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "BACKEND python ['python', 'reference']" in lines
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1, proc.stdout
    assert "RuntimeWarning" in warnings[0]
    assert "pip install ." in warnings[0] and "build_ext --inplace" in warnings[0]


def test_asking_for_cython_when_it_is_missing_fails_loudly(tmp_path):
    proc = run_python(tmp_path, HIDE_COMPILED + textwrap.dedent("""
        import chexcy.ops as ops
        for attempt in ("env", "set_backend"):
            try:
                ops.get_backend() if attempt == "env" else ops.set_backend("cython")
            except ImportError as exc:
                print(attempt, "ImportError", exc)
    """), CHEXCY_BACKEND="cython")
    assert proc.returncode == 0, proc.stderr
    assert "env ImportError compiled kernels hidden" in proc.stdout
    assert "set_backend ImportError compiled kernels hidden" in proc.stdout


def test_set_backend_and_use_backend_restore_even_on_error():
    start = ops.get_backend()
    other = "reference" if start != "reference" else "python"
    with ops.use_backend(other):
        assert ops.get_backend() == other
        with ops.use_backend(start):
            assert ops.get_backend() == start
        assert ops.get_backend() == other
    assert ops.get_backend() == start
    with pytest.raises(RuntimeError, match="inside"):
        with ops.use_backend(other):
            raise RuntimeError("inside")
    assert ops.get_backend() == start
    with pytest.raises(ValueError):
        with ops.use_backend("nonsense"):
            pass
    assert ops.get_backend() == start
    try:
        ops.set_backend(other)
        assert ops.get_backend() == other
    finally:
        ops.set_backend(start)


def test_available_backends_and_info():
    names = ops.available_backends()
    assert names[-2:] == ["python", "reference"]
    assert ("cython" in names) == COMPILED
    info = ops.info()
    assert info["backend"] == ops.get_backend()
    assert info["threads"] == ops.get_num_threads() >= 1
    assert info["available_backends"] == names
    assert isinstance(info["openmp"], bool)
    assert ("build_info" in info) == COMPILED


def test_conv_output_size_is_the_documented_formula():
    assert ops.conv_output_size(128, 3, 1, 1, 1) == 128
    assert ops.conv_output_size(128, 2, 2) == 64
    assert ops.conv_output_size(7, 3, 2, 1, 2) == 3          # (7 + 2 - 4 - 1) // 2 + 1
    assert ops.conv_output_size(4, 5) == 0                   # impossible geometry: the ops refuse it


def _fake_tree(folder, with_compiled):
    """A copy of chexcy's Python files in folder/chexcy (and, with_compiled, a compiled-module file name;
    only its presence is looked at, it is never imported)."""
    import os
    import shutil
    source = os.path.dirname(os.path.abspath(ops.__file__))
    shutil.copytree(source, folder / "chexcy", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    if with_compiled:
        (folder / "chexcy" / "_ops.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    return folder / "chexcy"


WHICH_ADVICE = """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import chexcy, chexcy.ops as ops
        print("BACKEND", ops.get_backend(), chexcy.__file__)
    for w in caught:
        print("WARNING", w.message)
"""


def test_fallback_in_a_clone_points_at_the_installed_copy(tmp_path):
    # `pip install .` put a built chexcy in site/; Python started in the clone imports ./chexcy, which has
    # no compiled module. Advising `pip install .` again would not help: say what does.
    clone, site = tmp_path / "clone", tmp_path / "site"
    clone.mkdir(), site.mkdir()
    (clone / "pyproject.toml").write_text("[project]\nname = 'chexcy'\n")
    _fake_tree(clone, with_compiled=False)
    installed = _fake_tree(site, with_compiled=True)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONSAFEPATH"}   # (CI sets it) the cwd is
    env["PYTHONPATH"] = str(site)                           # on sys.path here, as for a user in a clone
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(WHICH_ADVICE)], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"BACKEND python {clone / 'chexcy' / '__init__.py'}" in proc.stdout
    warning = " ".join(line for line in proc.stdout.splitlines() if line.startswith("WARNING"))
    assert f"source checkout {clone}" in warning and f"installed chexcy in {installed}" in warning, warning
    assert "another folder" in warning and "build_ext --inplace" in warning and "`chexcy` command" in warning
    assert "`pip install .` from the source tree" not in warning, "pip install . was done already"


def test_fallback_in_a_clone_without_an_install_says_build_in_place(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "setup.py").write_text("")
    _fake_tree(clone, with_compiled=False)
    from chexcy import _native
    advice = _native.build_advice(str(clone / "chexcy"), path=[str(clone), str(tmp_path / "nowhere")])
    assert f"source checkout {clone}" in advice and "build_ext --inplace" in advice
    # Not a checkout (an installed copy whose build failed): the general advice.
    assert "pip install ." in _native.build_advice(str(tmp_path / "site" / "chexcy"), path=[])
