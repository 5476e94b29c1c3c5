"""`chexcy info`: which backend and build chexcy runs on, and what this CPU offers.

Prints the active backend, kernel threads, OpenMP on/off, the compiled variant (instruction set) and
its compiler flags, the variants built and the ones this CPU can run, and the CPU's vector features.
Everything is read defensively: a missing /proc/cpuinfo or an unbuilt extension prints "unknown" or
"not built" instead of failing.
"""
import importlib.util
import json
import platform

# CPU features worth knowing for the kernels (as /proc/cpuinfo names them).
_INTERESTING_FLAGS = ("sse2", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq",
                      "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def register(subparsers):
    parser = subparsers.add_parser(
        "info", help="show the backend, threads, OpenMP, build flags and CPU features",
        description="Show which backend and build chexcy runs on (backend, kernel threads, OpenMP, the "
                    "compiled variant and its compiler flags) and what this CPU offers.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)
    return parser


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def collect():
    """Everything `chexcy info` shows, as a dict of plain values."""
    from chexcy import _native, ops

    details = ops.info()
    flags = _native.cpu_flags()
    # Found, not imported: a variant for instructions this CPU lacks dies of SIGILL when it is loaded
    # (its module init is compiled for them too), so `chexcy info` on an AVX2 machine crashed here.
    built = [name for name in _native.PREFERENCE if importlib.util.find_spec(_native.VARIANTS[name][0]) is not None]
    build = details.get("build_info") or {}
    return {
        "backend": details.get("backend"),
        "threads": details.get("threads"),
        "openmp": details.get("openmp"),
        "available_backends": details.get("available_backends"),
        "variant": build.get("variant", "not built"),
        "module": build.get("module", "not built"),
        "isa": build.get("isa", "not built"),
        "cflags": build.get("cflags", "not built"),
        "compiler": build.get("compiler", "unknown"),
        "tiles": build.get("tiles"),
        "variants_built": built,
        "variants_cpu_supports": _native.supported_variants(flags) if flags else ["baseline"],
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "cpu_features": [f for f in _INTERESTING_FLAGS if f in flags] if flags else "unknown",
        "python": platform.python_version(),
        "numpy": details.get("numpy"),
    }


def run(args):
    data = collect()
    if getattr(args, "json", False):
        print(json.dumps(data, indent=1))
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value) or "-"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0
