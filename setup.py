"""Build chexcy's compiled kernels (chexcy._ops and its instruction-set variants).

Everything else about the package lives in pyproject.toml. What this file decides:

* `chexcy/_ops.pyx` is compiled once per instruction-set variant, each as its own module:
      chexcy._ops          baseline x86-64 (SSE2), runs on every x86-64 CPU (the only one elsewhere)
      chexcy._ops_avx2     -march=x86-64-v3 (AVX2 + FMA)
      chexcy._ops_avx512   -march=x86-64-v4 (AVX-512), 512-bit vectors preferred
  chexcy._native picks the best variant the running CPU supports, so a portable wheel gets vector speed
  without -march=native. A variant the compiler cannot target is skipped (with a message).
* `chexcy/_blocks.pyx` (the allocator of the kernels' outputs: 64-byte alignment, the block cache of large
  arrays) has no arithmetic, so it is built once, without instruction-set flags; every variant cimports it
  and shares its one cache.
* Flags: -O3 (never fast-math), OpenMP when a try-compile shows the compiler supports it. The modules
  compile in parallel, one per core (`build_ext -j N` sets another count).
* Environment switches:
      CHEXCY_NO_OPENMP=1   build without OpenMP (kernels run on one thread)
      CHEXCY_DEBUG=1       bounds checks back on (and -O1 -g), for chasing a kernel bug
      CHEXCY_NATIVE=1      local build only: one module compiled with -march=native, no variants
                           (never for a wheel that leaves this machine)
* Release builds carry no debug information (-g0 after Python's own -g, and the linker strips what
  is left): it was 80% of each module's 3.7 MB. The symbol table stays, so profilers still name
  the kernels. CHEXCY_DEBUG=1 keeps the debug information.
* No working compiler (or no Cython): the package still installs, pure Python, and says so loudly;
  chexcy.ops then runs on its NumPy fallback.
* The generated C goes to build/cython (never into the package or the wheel), and every build deletes
  the module it is about to produce first, so a failed compile cannot leave an old .so to be installed.
"""
import glob
import os
import platform
import shutil
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join(HERE, "chexcy")
CYTHON_BUILD_DIR = os.path.join("build", "cython")
# What the kernels are compiled from besides the .pyx: the headers (one per job, docs/kernels.md) and the
# .pxd of their declarations. A change to any of them rebuilds every variant.
KERNEL_SOURCES = sorted(glob.glob(os.path.join("chexcy", "_ops*.h")) + glob.glob(os.path.join("chexcy", "_ops*.pxd"))
                        + [os.path.join("chexcy", "_ops.pyx"), os.path.join("chexcy", "_blocks.pxd")])


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_x86_64():
    return platform.machine().lower() in ("x86_64", "amd64")


def _variants():
    """(module name, extra compile flags, variant label) for every module to build."""
    if _flag("CHEXCY_NATIVE"):
        return [("chexcy._ops", ["-march=native"], "native")]
    if not _is_x86_64():
        return [("chexcy._ops", [], "baseline")]
    return [
        ("chexcy._ops", [], "baseline"),
        ("chexcy._ops_avx2", ["-march=x86-64-v3"], "x86-64-v3"),
        ("chexcy._ops_avx512", ["-march=x86-64-v4", "-mprefer-vector-width=512"], "x86-64-v4"),
    ]


def _loud(message):
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\n{message}\n{bar}\n\n")


class BuildKernels(build_ext):
    """build_ext that try-compiles for OpenMP and ISA flags and survives a missing compiler."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:   # the modules are independent compiles of a minute or more: one per core
            self.parallel = os.cpu_count() or 1

    def run(self):
        self._inplace_requested = bool(self.inplace)  # setuptools clears self.inplace while building
        try:
            self._probe_compiler()
        except Exception as exc:  # no compiler at all: install pure Python
            self._give_up(exc)
            return
        super().run()

    def _give_up(self, exc):
        _loud("chexcy: the compiled kernels (chexcy._ops) could NOT be built:\n"
              f"  {type(exc).__name__}: {exc}\n"
              "chexcy will install and run on its pure-Python/NumPy fallback, which is much slower.\n"
              "To get the compiled kernels: install a C compiler (e.g. `apt install build-essential`)\n"
              "and Python headers (python3-dev), then reinstall chexcy (`pip install .`).")
        self.extensions = []

    # -- try-compiles ------------------------------------------------------------------------------
    def _try_compile(self, code, compile_args=(), link_args=()):
        """True if `code` compiles and links with these flags."""
        cc = self._probe_cc
        tmp = tempfile.mkdtemp(prefix="chexcy-probe-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as fh:
                fh.write(code)
            objs = cc.compile([src], output_dir=tmp, extra_postargs=list(compile_args))
            cc.link_executable(objs, "probe", output_dir=tmp, extra_postargs=list(link_args))
            return True
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _probe_compiler(self):
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler
        self._probe_cc = new_compiler(compiler=self.compiler)  # (keyword set varies across setuptools)
        customize_compiler(self._probe_cc)
        if not self._try_compile("int main(void) { return 0; }\n"):
            raise RuntimeError("no working C compiler (a trivial C program did not compile and link)")
        self.openmp_flags = []
        if _flag("CHEXCY_NO_OPENMP"):
            print("chexcy: OpenMP disabled by CHEXCY_NO_OPENMP=1")
        elif self._try_compile("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n",
                               ["-fopenmp"], ["-fopenmp"]):
            self.openmp_flags = ["-fopenmp"]
        else:
            _loud("chexcy: the C compiler does not support OpenMP: building single-threaded kernels.")
        print(f"chexcy: OpenMP {'on' if self.openmp_flags else 'off'}")

    def build_extensions(self):
        kept = []
        for ext in self.extensions:
            isa_flags = ext.chexcy_isa_flags
            if isa_flags and not self._try_compile("int main(void) { return 0; }\n", isa_flags):
                print(f"chexcy: skipping {ext.name}: the compiler does not accept {' '.join(isa_flags)}")
                continue
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()

    def build_extension(self, ext):
        # A stale module from an earlier build must never survive a failed compile.
        targets = [self.get_ext_fullpath(ext.name)]
        if getattr(self, "_inplace_requested", False):
            targets.append(os.path.join(PKG, os.path.basename(targets[0])))
        for target in targets:
            if os.path.exists(target):
                os.remove(target)
        ext.extra_compile_args = ext.extra_compile_args + self.openmp_flags
        ext.extra_link_args = ext.extra_link_args + self.openmp_flags
        flags = " ".join(ext.extra_compile_args)
        ext.define_macros = ext.define_macros + [("CHEXCY_CFLAGS", f'"{flags}"')]
        try:
            super().build_extension(ext)
        except Exception as exc:
            if ext.name in ("chexcy._ops", "chexcy._blocks"):     # every variant needs both
                self._give_up(exc)
            else:
                print(f"chexcy: variant {ext.name} failed to build ({exc}); the baseline module remains")


def _extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        _loud("chexcy: Cython is not installed, so the compiled kernels cannot be built.\n"
              "Install Cython>=3 and reinstall chexcy (pip does this automatically for `pip install .`).")
        return []
    debug = _flag("CHEXCY_DEBUG")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    base_flags = ["-O1", "-g"] if debug else ["-O3", "-g0"]
    link_flags = [] if debug else ["-Wl,--strip-debug"]
    # Each variant is the same source under another module name: Cython names the module after the
    # .pyx file, so variants are compiled from copies placed in build/cython/variants.
    variant_dir = os.path.join("build", "cython", "variants", "chexcy")
    os.makedirs(variant_dir, exist_ok=True)
    blocks = Extension(
        "chexcy._blocks", [os.path.join("chexcy", "_blocks.pyx")],
        include_dirs=[PKG],
        depends=[os.path.join("chexcy", "_blocks.pxd"), os.path.join("chexcy", "_ops_pages.h")],
        define_macros=[("CHEXCY_DEBUG", "1")] if debug else [],
        extra_compile_args=list(base_flags),
        extra_link_args=list(link_flags),
    )
    exts = [blocks]
    for name, isa_flags, label in _variants():
        short = name.rsplit(".", 1)[1]
        if short == "_ops":
            source = os.path.join("chexcy", "_ops.pyx")
        else:
            source = os.path.join(variant_dir, short + ".pyx")
            shutil.copyfile(os.path.join(PKG, "_ops.pyx"), source)
        ext = Extension(
            name, [source],
            include_dirs=[PKG],
            depends=KERNEL_SOURCES,
            define_macros=[("CHEXCY_VARIANT", f'"{label}"')] + ([("CHEXCY_DEBUG", "1")] if debug else []),
            extra_compile_args=base_flags + isa_flags,
            extra_link_args=link_flags,
        )
        ext.chexcy_isa_flags = isa_flags
        exts.append(ext)
    # include_path: `from chexcy._ops_kernels cimport *` must find chexcy/_ops_kernels.pxd from the variants'
    # copies in build/cython/variants too, and under pip's isolated build, which does not put this folder on
    # sys.path. The headers it names are found through include_dirs.
    out = cythonize(exts, compiler_directives=directives, build_dir=CYTHON_BUILD_DIR, quiet=True,
                    force=True, include_path=[HERE])
    isa_flags = {name: flags for name, flags, _ in _variants()}
    for ext in out:
        ext.chexcy_isa_flags = isa_flags.get(ext.name, [])
    return out


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildKernels})
