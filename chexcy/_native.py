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
import os

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
    raise ImportError("chexcy's compiled kernels (chexcy._ops) are not built; " + _BUILD_HINT) from (
        errors[-1] if errors else None)
