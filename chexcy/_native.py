"""Finds the compiled kernels. The only module that imports them.

setup.py compiles chexcy/_ops.pyx once per instruction-set variant (see docs/performance.md):

    chexcy._ops_avx512   x86-64-v4: AVX-512 F/BW/CD/DQ/VL (+ everything below)
    chexcy._ops_avx2     x86-64-v3: AVX2, FMA, BMI1/2, F16C, MOVBE, LZCNT (+ SSE4.2, POPCNT ...)
    chexcy._ops          baseline x86-64 (or, with CHEXCY_NATIVE=1, a -march=native build)

`load()` returns the fastest variant whose instructions the running CPU has, read from
/proc/cpuinfo (Linux; elsewhere only the baseline is chosen). `CHEXCY_ISA=baseline|avx2|avx512`
forces a variant (ImportError if it is not built or the CPU lacks it), for benchmarks and tests.
"""
import importlib
import importlib.machinery
import os
import sys

# variant name -> (module, CPU flags it needs as /proc/cpuinfo spells them)
_V3_FLAGS = ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "sse4_1", "sse4_2",
             "ssse3", "popcnt")
VARIANTS = {
    "avx512": ("chexcy._ops_avx512", _V3_FLAGS + ("avx512f", "avx512bw", "avx512cd", "avx512dq",
                                                  "avx512vl")),
    "avx2": ("chexcy._ops_avx2", _V3_FLAGS),
    "baseline": ("chexcy._ops", ()),
}
PREFERENCE = ("avx512", "avx2", "baseline")

_BUILD_HINT = ("install with a C compiler (`pip install .`) or build in place "
               "(`python setup.py build_ext --inplace`)")
_loaded = {}


def _compiled_files(package_dir):
    """Names of compiled kernel modules (_ops*.so or the platform's equivalent) in a chexcy folder."""
    try:
        names = os.listdir(package_dir)
    except OSError:
        return []
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(n for n in names if n.startswith("_ops") and n.endswith(suffixes))


def build_advice(package_dir=None, path=None):
    """What to tell a user whose chexcy runs without compiled kernels (one or two sentences).

    The common trap: `pip install .` built and installed the kernels, but Python started in the clone's
    folder (or with it on PYTHONPATH) imports the source tree instead, which holds none; advising
    `pip install .` again would not help. That case is recognised by the imported chexcy sitting in a
    source checkout (setup.py or pyproject.toml beside it) with no compiled module, and the advice says
    where the installed copy is and how to reach it. package_dir (the imported chexcy folder) and path
    (sys.path) are parameters for tests.
    """
    package_dir = os.path.abspath(package_dir or os.path.dirname(__file__))
    checkout = os.path.dirname(package_dir)
    in_checkout = any(os.path.exists(os.path.join(checkout, f)) for f in ("setup.py", "pyproject.toml"))
    if not in_checkout or _compiled_files(package_dir):
        return ("Build them with a C compiler: `pip install .` from the source tree, or "
                "`python setup.py build_ext --inplace` in a development checkout.")
    installed = None
    for entry in sys.path if path is None else path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "chexcy")
        if os.path.realpath(candidate) != os.path.realpath(package_dir) and _compiled_files(candidate):
            installed = candidate
            break
    where = (f"Python imported chexcy from the source checkout {checkout} (the current folder or "
             f"PYTHONPATH comes first on sys.path), which holds no compiled kernels")
    if installed:
        return (f"{where}, instead of the installed chexcy in {installed}, which has them. Run Python from "
                f"another folder, use the `chexcy` command or `pytest` (not `python -m pytest`) from here, "
                f"or build the kernels in the checkout too: `python setup.py build_ext --inplace`.")
    return (f"{where}. Build them there with `python setup.py build_ext --inplace` (needs a C compiler), "
            f"or `pip install .` and run Python from another folder.")


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo as a set (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags") and ":" in line:
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_variants(flags=None):
    """Variant names this CPU can run, fastest first."""
    flags = cpu_flags() if flags is None else set(flags)
    return [v for v in PREFERENCE if all(f in flags for f in VARIANTS[v][1])]


def _import(variant):
    return importlib.import_module(VARIANTS[variant][0])


def load():
    """Return the compiled kernel module; ImportError (with how to build it) when it is absent."""
    if "module" in _loaded:
        return _loaded["module"]
    forced = os.environ.get("CHEXCY_ISA", "").strip().lower()
    if forced:
        if forced not in VARIANTS:
            raise ImportError(f"CHEXCY_ISA={forced!r}: expected one of {', '.join(PREFERENCE)}")
        if forced not in supported_variants():
            raise ImportError(f"CHEXCY_ISA={forced!r}: this CPU lacks the instructions it needs")
        try:
            module = _import(forced)
        except ImportError as exc:
            raise ImportError(f"CHEXCY_ISA={forced!r}: {VARIANTS[forced][0]} is not built; "
                              + _BUILD_HINT) from exc
        _loaded["module"] = module
        return module
    errors = []
    for variant in supported_variants():
        try:
            module = _import(variant)
        except ImportError as exc:  # variant not built here (e.g. a non-x86 build): try the next
            errors.append(exc)
            continue
        _loaded["module"] = module
        return module
    raise ImportError("chexcy's compiled kernels (chexcy._ops) are not built here. " + build_advice()) from (
        errors[-1] if errors else None)
