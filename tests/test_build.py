"""The compiled build: what it reports, how a variant is chosen, thread control, every variant's kernels.

setup.py compiles chexcy/_ops.pyx once per instruction-set variant and chexcy._native picks one at
import. The op tests run on the chosen variant only; here every variant built on this machine (and
runnable by its CPU) is checked against the reference on shapes chosen to hit each tile edge: output
widths that are not a multiple of the tile, output channels left over after the last full channel
block, groups, the strided and the scatter paths. These tests need the compiled module; when it is
not built they fail with how to build it, unless CHEXCY_BACKEND=python says the fallback is intended.
"""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import chexcy
from chexcy import _native, cli, ops, reference

from ops_cases import assert_close, check_conv_on_every_variant, runnable_variants
from test_ops_validation import subprocess_env

EXPECT_FALLBACK_ONLY = os.environ.get("CHEXCY_BACKEND", "") in ("python", "reference") and \
    "cython" not in ops.available_backends()


def _compiled():
    try:
        return _native.load()
    except ImportError as exc:
        if EXPECT_FALLBACK_ONLY:
            pytest.skip("CHEXCY_BACKEND selects the fallback and the extension is not built")
        pytest.fail(f"the compiled module is not built: {exc}")


# -- what the build reports -----------------------------------------------------------------------

def test_build_info_reports_variant_flags_and_openmp():
    mod = _compiled()
    info = mod.build_info()
    for key in ("module", "variant", "isa", "cflags", "compiler", "openmp", "debug", "tiles"):
        assert key in info, f"build_info lacks {key!r}: {info}"
    assert info["module"] == mod.__name__
    assert "-O3" in info["cflags"] or info["debug"], info["cflags"]
    assert "fast-math" not in info["cflags"] and "Ofast" not in info["cflags"], info["cflags"]
    expect_openmp = os.environ.get("CHEXCY_NO_OPENMP", "") not in ("1", "true", "yes", "on")
    assert mod.openmp_enabled() is expect_openmp == info["openmp"], info
    assert ("-fopenmp" in info["cflags"]) == info["openmp"], info


def test_portable_variants_are_not_built_for_this_cpu_only():
    for name, mod in runnable_variants():
        flags = mod.build_info()["cflags"]
        if mod.build_info()["variant"] != "native":
            assert "-march=native" not in flags, f"{name}: a portable variant built with {flags}"


def test_load_picks_the_fastest_variant_the_cpu_runs():
    mod = _compiled()
    runnable = runnable_variants()
    if os.environ.get("CHEXCY_ISA"):
        assert mod.__name__ == _native.VARIANTS[os.environ["CHEXCY_ISA"].lower()][0]
    else:
        assert mod is runnable[0][1], f"loaded {mod.__name__}, runnable {[n for n, _ in runnable]}"


def test_supported_variants_follow_cpu_flags():
    v3 = set(_native.VARIANTS["avx2"][1])
    v4 = set(_native.VARIANTS["avx512"][1])
    assert _native.supported_variants(set()) == ["baseline"]
    assert _native.supported_variants({"avx2", "fma"}) == ["baseline"]  # v3 needs more than AVX2 + FMA
    assert _native.supported_variants(v3) == ["avx2", "baseline"]
    assert _native.supported_variants(v3 | {"avx512f"}) == ["avx2", "baseline"]
    assert _native.supported_variants(v4) == ["avx512", "avx2", "baseline"]


def test_cpu_flags_is_a_set_even_where_cpuinfo_is_missing(monkeypatch):
    assert isinstance(_native.cpu_flags(), set)

    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")
    monkeypatch.setattr("builtins.open", no_file)
    assert _native.cpu_flags() == set()


@pytest.mark.parametrize("isa, ok", [("baseline", True), ("bogus", False)])
def test_chexcy_isa_forces_or_refuses_a_variant(isa, ok, tmp_path):
    script = ("import chexcy._native as n\n"
              "try:\n    m = n.load(); print('LOADED', m.__name__)\n"
              "except ImportError as e:\n    print('REFUSED', e)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=subprocess_env(CHEXCY_ISA=isa), timeout=60)
    assert proc.returncode == 0, proc.stderr
    if ok:
        _compiled()
        assert proc.stdout.strip() == "LOADED chexcy._ops", proc.stdout
    else:
        assert proc.stdout.startswith("REFUSED") and "bogus" in proc.stdout, proc.stdout


def _kernel_sources():
    """Every file the compiled modules are built from: _ops.pyx and _blocks.pyx, the .pxd files they cimport
    from chexcy, and every header those declare or include (followed through the headers' #include "...")."""
    import re
    pkg = os.path.dirname(chexcy.__file__)
    todo, seen = ["_ops.pyx", "_blocks.pyx"], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        with open(os.path.join(pkg, name)) as fh:
            text = fh.read()
        todo += [m + ".pxd" for m in re.findall(r"^from chexcy\.(\w+) cimport", text, re.M)]
        todo += re.findall(r'^cdef extern from "([^"]+)"', text, re.M)
        todo += re.findall(r'^#include "([^"]+)"', text, re.M)
    return pkg, sorted(seen)


def test_every_kernel_source_ships_with_the_package():
    # setup.py compiles _ops.pyx (and its copies for the variants) against chexcy/: a header or .pxd missing
    # from pyproject.toml's package-data would build here and fail in an sdist or a wheel built from one.
    import fnmatch
    import tomllib
    pkg, sources = _kernel_sources()
    # the checkout's pyproject.toml (the tests run from the repository, chexcy may be installed elsewhere)
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as fh:
        setuptools_conf = tomllib.load(fh)["tool"]["setuptools"]
    shipped = setuptools_conf["package-data"]["chexcy"]
    dropped = setuptools_conf.get("exclude-package-data", {}).get("chexcy", [])
    assert {"_ops_kernels.pxd", "_blocks.pxd", "_ops_config.h", "_ops_pages.h"} <= set(sources), sources
    for name in sources:
        assert os.path.isfile(os.path.join(pkg, name)), f"{name} is named by the kernels but not in chexcy/"
        assert any(fnmatch.fnmatch(name, pat) for pat in shipped), f"{name} is not in package-data {shipped}"
        assert not any(fnmatch.fnmatch(name, pat) for pat in dropped), f"{name} is excluded by {dropped}"


def test_no_generated_c_next_to_the_sources():
    pkg = os.path.dirname(chexcy.__file__)
    leftovers = [f for f in os.listdir(pkg) if f.endswith((".c", ".html"))]
    assert leftovers == [], f"generated files in the package directory: {leftovers}"


def test_chexcy_info_command_prints_build_and_cpu(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == ops.get_backend()
    assert data["threads"] == ops.get_num_threads() >= 1
    if "cython" in ops.available_backends():
        mod = _native.load()
        assert data["module"] == mod.__name__ and data["cflags"] == mod.build_info()["cflags"]
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backend" in text and "cpu features" in text


def test_chexcy_info_loads_no_variant_besides_the_one_in_use(tmp_path):
    # Loading a variant built for instructions the CPU lacks kills the process (SIGILL in its module
    # init): `chexcy info` on an AVX2 machine died importing chexcy._ops_avx512 to see that it was built.
    script = ("import json, sys\n"
              "from chexcy import info, ops\n"
              "ops.info()\n"
              "before = set(sys.modules)\n"
              "data = info.collect()\n"
              "print(json.dumps([sorted(m for m in set(sys.modules) - before if m.startswith('chexcy._ops')),\n"
              "                  data['variants_built']]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    loaded, built = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == []
    if "cython" in ops.available_backends():
        assert _native.load().__name__ in [_native.VARIANTS[v][0] for v in built]


def elf_section_names(path):
    """Section names of an ELF64 little-endian shared object (the header fields the ELF spec defines)."""
    import struct
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not an ELF64 LE file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):                       # (name offset, file offset, size) of section header i
        base = shoff + i * shentsize
        return struct.unpack_from("<I", data, base)[0], *struct.unpack_from("<QQ", data, base + 0x18)

    _, str_off, str_size = section(shstrndx)
    names = data[str_off:str_off + str_size]
    return [names[name:names.index(b"\0", name)].decode() for name, _, _ in map(section, range(shnum))]


def test_release_modules_carry_no_debug_information():
    # Debug information was 80% of each module (a 4.7 MB wheel); release builds drop it (-g0, and the
    # linker strips the rest), CHEXCY_DEBUG=1 builds keep it.
    _compiled()
    variants = runnable_variants()
    if platform.system() != "Linux":
        pytest.skip("the modules are ELF files only on Linux")
    for name, mod in variants:
        sections = elf_section_names(mod.__file__)
        assert ".text" in sections and ".dynsym" in sections, f"{name}: section parser broken: {sections}"
        debug = [s for s in sections if s.startswith(".debug")]
        if mod.build_info()["debug"]:
            assert ".debug_info" in debug, f"{name}: a CHEXCY_DEBUG=1 build lost its debug information"
        else:
            assert not debug, (f"{name} ({mod.__file__}) carries debug sections {debug}; a stale build? "
                               f"rebuild with `python setup.py build_ext --inplace`")


# -- thread control of the compiled module --------------------------------------------------------

@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (10 ** 6, ValueError), (1.5, TypeError),
                                      ("2", TypeError), (True, TypeError), (None, TypeError)])
def test_set_num_threads_rejects_bad_values(bad, exc):
    mod = _compiled()
    with pytest.raises(exc, match="set_num_threads"):
        mod.set_num_threads(bad)


def test_set_num_threads_sets_and_zero_restores_the_default():
    mod = _compiled()
    before = mod.get_num_threads()
    try:
        mod.set_num_threads(3)
        assert mod.get_num_threads() == (3 if mod.openmp_enabled() else 1)
        mod.set_num_threads(np.int64(1))
        assert mod.get_num_threads() == 1
        mod.set_num_threads(0)
        assert mod.get_num_threads() == before
    finally:
        mod.set_num_threads(0)
        ops.set_num_threads(None)


# -- every variant's kernels against the reference -------------------------------------------------

# (N, C, H, W), (F, KH, KW), stride, padding, dilation, groups. Channel counts 1, 5, 17, 20 leave
# channels over after full blocks of 4 and of 16; widths 5, 19, 33 leave partial tiles of 8/16/32.
VARIANT_CONV_CASES = [
    ((2, 3, 9, 19), (5, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 16, 7, 33), (17, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 1, 12, 12), (20, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 6, 11, 5), (4, 3, 2), (1, 1), (2, 1), (2, 1), 2),
    ((2, 4, 10, 13), (8, 5, 5), (1, 1), (2, 2), (1, 1), 4),
    ((1, 3, 13, 17), (6, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((1, 2, 9, 9), (3, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((1, 2, 6, 7), (3, 2, 2), (1, 1), (2, 2), (1, 1), 1),   # padding beyond the kernel: dx scatter path
]


@pytest.mark.parametrize("case", VARIANT_CONV_CASES, ids=lambda c: f"x{c[0]}-w{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}-g{c[5]}")
def test_every_variant_conv_matches_reference_and_is_thread_invariant(case, rng):
    _compiled()
    xs, (F, KH, KW), stride, padding, dilation, groups = case
    check_conv_on_every_variant(rng, xs, (F, xs[1] // groups, KH, KW), stride, padding, dilation, groups)


def test_every_variant_pools_match_reference(rng):
    _compiled()
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)
    x[0, 0, 0, :2] = np.nan                       # NaN wins, first NaN
    x[1, 1, 2:4, 2:4] = 1.0                       # ties: first in scan order
    want_o, want_a = reference.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1))
    want_g = reference.global_avg_pool2d_forward(x[1:])
    for name, mod in runnable_variants():
        o, a = mod.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1))
        np.testing.assert_array_equal(o, want_o, err_msg=f"variant {name}")
        np.testing.assert_array_equal(a, want_a, err_msg=f"variant {name}")
        assert_close(mod.global_avg_pool2d_forward(x[1:]), want_g, "global_avg_pool2d",
                     err_msg=f"variant {name}")
