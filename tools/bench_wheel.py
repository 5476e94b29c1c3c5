#!/usr/bin/env python3
"""Compare chexcy's portable wheel with a native local build on ref-cnn's four conv layers.

Two "sides" each name the Python that runs them and, optionally, a directory put first on
PYTHONPATH (a source tree built in place):
    wheel   an interpreter with the wheel installed (its dispatcher picks _ops_avx512/_avx2/_ops)
    native  a source tree built with CHEXCY_NATIVE=1 (one module, -march=native)

For conv1..conv4 of ref-cnn (conv_i has input side size/2^i, as in tools/bench_ops.py) the script
times ops.conv2d_forward and ops.conv2d_backward on ONE thread, in CPU time (time.process_time),
median of --repeats runs after one warm-up, each side in its own subprocess. The sides run
interleaved (wheel, native, wheel, native, ...) for --rounds rounds, so a change in the machine's
load hits both; the table gives every round's GFLOP/s and the median over rounds of wheel/native.
CPU time on one thread is what is comparable on a shared machine: wall-clock medians there swing
with the other jobs, CPU time much less (it still grows a little when caches and memory bandwidth
are shared).

    tools/build_wheel.sh
    python3 -m venv /tmp/wheelvenv && /tmp/wheelvenv/bin/pip install dist/chexcy-*.whl
    mkdir /tmp/native-src && git archive HEAD | tar -x -C /tmp/native-src
    (cd /tmp/native-src && CHEXCY_NATIVE=1 python setup.py build_ext --inplace)
    cd /tmp && python /work/main/tools/bench_wheel.py \\
        --wheel-python /tmp/wheelvenv/bin/python --native-path /tmp/native-src
    ... --rounds 5 --repeats 11 --size 64        # more runs, a smaller input
    ... --wheel-isa avx2                         # force the wheel's AVX2 variant (CHEXCY_ISA)

Run it from outside the source tree: a side without a path must import the installed chexcy, not
a checkout in the current directory. The script exits with an error when a side does not load the
compiled backend, when its thread count is not 1, or when both sides import the same chexcy.
Backward (dx, dweight and dbias in one call) is counted as 2x the forward FLOPs, as in bench_ops.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORKER_FLAG = "--_worker"


def conv_layers(size, batch):
    """(label, x shape, weight shape, forward FLOPs) of ref-cnn's convs: the shapes of
    tools/bench_ops.py ref_cnn_layers (3x3, padding 1, each conv after a 2x2 max-pool)."""
    layers = []
    s = size
    for c, f in ((1, 16), (16, 32), (32, 64), (64, 128)):
        layers.append((f"{c}->{f} {s}px", (batch, c, s, s), (f, c, 3, 3), 2.0 * batch * f * s * s * c * 9))
        s //= 2
    return layers


# ------------------------------------------------------------------------------------------------
# Worker: runs inside one side's interpreter, prints one JSON line

def worker(spec):
    """Time every layer once per side; a dict with the side's build info and median CPU seconds."""
    import numpy as np

    import chexcy
    from chexcy import ops

    info = ops.info()
    out = {"chexcy_file": os.path.abspath(chexcy.__file__), "python": sys.executable,
           "numpy": np.__version__, "backend": info["backend"], "build_info": info.get("build_info")}
    if info["backend"] != "cython" or not info.get("build_info"):
        out["error"] = (f"the compiled backend is not loaded (backend {info['backend']!r}, "
                        f"available {info['available_backends']}, chexcy from {out['chexcy_file']})")
        return out
    ops.set_num_threads(1)
    out["threads"] = ops.get_num_threads()
    if out["threads"] != 1:
        out["error"] = f"set_num_threads(1) left {out['threads']} threads"
        return out
    rng = np.random.default_rng(0)
    times = {}
    for label, xs, ws, _ in conv_layers(spec["size"], spec["batch"]):
        x = rng.standard_normal(xs).astype(np.float32)
        w = (rng.standard_normal(ws) * 0.1).astype(np.float32)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        dout = rng.standard_normal(ops.conv2d_forward(x, w, b, padding=1).shape).astype(np.float32)
        calls = {"fwd": lambda x=x, w=w, b=b: ops.conv2d_forward(x, w, b, padding=1),
                 "bwd": lambda dout=dout, x=x, w=w: ops.conv2d_backward(dout, x, w, padding=1)}
        for kind, fn in calls.items():
            fn()  # warm-up: first-touch page faults, allocator growth
            runs = []
            for _ in range(spec["repeats"]):
                t0 = time.process_time()
                fn()
                runs.append(time.process_time() - t0)
            times[f"{label} {kind}"] = statistics.median(runs)
    out["times"] = times
    return out


# ------------------------------------------------------------------------------------------------
# Driver

def side_env(path, isa):
    """The environment of one side: only its own PYTHONPATH, one OpenMP/BLAS thread, no backend or
    ISA override left over from the caller's shell (unless --*-isa asks for one)."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "CHEXCY_BACKEND", "CHEXCY_ISA"):
        env.pop(key, None)
    if path:
        env["PYTHONPATH"] = os.path.abspath(path)
    if isa:
        env["CHEXCY_ISA"] = isa
    env["OMP_NUM_THREADS"] = "1"
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


def run_side(name, python, path, isa, spec, cwd):
    cmd = [python, os.path.abspath(__file__), WORKER_FLAG, json.dumps(spec)]
    proc = subprocess.run(cmd, env=side_env(path, isa), cwd=cwd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.exit(f"bench_wheel: the {name} side failed ({' '.join(cmd[:2])}, PYTHONPATH={path or '-'}):\n"
                 + proc.stderr.strip())
    result = json.loads(lines[-1])
    if "error" in result:
        sys.exit(f"bench_wheel: {name} side ({python}, PYTHONPATH={path or '-'}): {result['error']}")
    return result


def describe(name, r):
    bi = r["build_info"]
    tiles = bi.get("tiles", {})
    return (f"# {name:<6} {bi.get('module', '?')} ({bi.get('variant', '?')}, {bi.get('cflags', '?')}); "
            f"tiles {tiles}; from {r['chexcy_file']}; numpy {r['numpy']}")


def main(argv=None):
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wheel-python", default=sys.executable, help="interpreter with the wheel installed")
    p.add_argument("--wheel-path", help="directory put on PYTHONPATH for the wheel side (default: none)")
    p.add_argument("--wheel-isa", choices=("baseline", "avx2", "avx512"),
                   help="force the wheel's variant through CHEXCY_ISA (default: its own choice)")
    p.add_argument("--native-python", default=sys.executable, help="interpreter of the native side")
    p.add_argument("--native-path", help="source tree built with CHEXCY_NATIVE=1 (put on PYTHONPATH)")
    p.add_argument("--size", type=int, default=128, help="input height = width of conv1 (128)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="timed runs per op and side per round (>= 7)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved wheel/native rounds (>= 1)")
    p.add_argument("--target", type=float, default=0.85,
                   help="wheel/native ratio the wheel must reach on every row (0.85 = within 15%%)")
    p.add_argument("--json", help="also write the raw results to this file")
    a = p.parse_args(argv)
    if a.repeats < 7:
        p.error("--repeats must be >= 7")
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if a.size < 8 or a.size % 8 or a.batch < 1:
        p.error(f"--size must be a multiple of 8 (conv4 sees size/8), --batch >= 1; got {a.size}, {a.batch}")
    for opt in ("wheel_path", "native_path"):
        path = getattr(a, opt)
        if path and not os.path.isdir(os.path.join(path, "chexcy")):
            p.error(f"--{opt.replace('_', '-')} {path}: no chexcy/ package in it")

    spec = {"size": a.size, "batch": a.batch, "repeats": a.repeats}
    sides = {"wheel": (a.wheel_python, a.wheel_path, a.wheel_isa),
             "native": (a.native_python, a.native_path, None)}
    rounds = {"wheel": [], "native": []}
    with tempfile.TemporaryDirectory(prefix="chexcy-bench-wheel-") as cwd:  # no checkout to shadow
        for i in range(a.rounds):
            for name in ("wheel", "native"):
                rounds[name].append(run_side(name, *sides[name], spec, cwd))
            if rounds["wheel"][0]["chexcy_file"] == rounds["native"][0]["chexcy_file"]:
                sys.exit(f"bench_wheel: both sides import {rounds['wheel'][0]['chexcy_file']}; "
                         "give --wheel-python and --native-path (or --*-python) that differ")
            print(f"# round {i + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    first = {name: rounds[name][0] for name in rounds}

    layers = conv_layers(a.size, a.batch)
    rows = []
    for label, _, _, flops in layers:
        for kind, work in (("fwd", flops), ("bwd", 2 * flops)):
            key = f"{label} {kind}"
            rate = {n: [work / r["times"][key] / 1e9 for r in rounds[n]] for n in rounds}
            ratios = [w / n for w, n in zip(rate["wheel"], rate["native"])]
            rows.append({"row": key, "native": rate["native"], "wheel": rate["wheel"], "ratios": ratios,
                         "ratio": statistics.median(ratios)})

    print(f"# chexcy portable wheel vs native build: ref-cnn convs, batch {a.batch}, {a.size}x{a.size}, "
          f"1 thread, CPU time")
    print(f"# median of {a.repeats} runs after 1 warm-up per side and round; {a.rounds} interleaved rounds "
          f"(wheel, native, ...); GFLOP/s; backward = dx + dweight + dbias, counted as 2x forward")
    print(describe("native", first["native"]))
    print(describe("wheel", first["wheel"]))
    w = max(5 * a.rounds + 2, len("native GFLOP/s") + 2)
    print(f"{'layer':<18}{'native GFLOP/s':>{w}}{'wheel GFLOP/s':>{w}}{'wheel/native':>14}  (per round)")
    for r in rows:
        nat = "".join(f"{v:5.0f}" for v in r["native"])
        whl = "".join(f"{v:5.0f}" for v in r["wheel"])
        per = " ".join(f"{v:.2f}" for v in r["ratios"])
        print(f"{r['row']:<18}{nat:>{w}}{whl:>{w}}{r['ratio']:>14.2f}  ({per})")
    worst = min(rows, key=lambda r: r["ratio"])
    geo = statistics.geometric_mean([r["ratio"] for r in rows])
    verdict = "met" if worst["ratio"] >= a.target else "NOT met"
    print(f"# wheel/native: geometric mean {geo:.2f}, lowest {worst['ratio']:.2f} ({worst['row']}); "
          f"target >= {a.target:.2f} on every row: {verdict}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"args": vars(a), "rows": rows, "sides": rounds}, fh, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
