#!/usr/bin/env python3
"""Benchmark chexcy's ops on the layer shapes of ref-cnn (DESIGN.md section 7), backend by backend.

For every op: the median time of --repeats runs after a warm-up (>= 3 calls and 0.1 s), and GFLOP/s
(convs, linear) or GB/s moved (pools: bytes read + written), for
    cython at 1 and 2 threads (or --threads), the python fallback, and torch.nn.functional as a peer
    when `import torch` works (its thread count set to match, for every thread count measured);
then ratios: cython / python, cython 2T / 1T, cython / torch (same thread count).

    python tools/bench_ops.py                       # 128x128, batch 32, all ops, all backends
    python tools/bench_ops.py --size 64 --repeats 7
    python tools/bench_ops.py --ops conv2,conv3 --backends cython --threads 2
    python tools/bench_ops.py --linear-shapes 32x128x14,256x1024x512,1024x4096x1000
    /tmp/torchenv/bin/python tools/bench_ops.py     # with torch as the peer column

Conv backward is timed as one call that returns dx, dweight and dbias, and counted as 2x the forward
FLOPs (dx and dweight each cost one forward; dbias is negligible); so is linear backward.
--linear-shapes replaces the ref-cnn layers by dense layers of the given N x in_features x out_features
(forward and backward of each), to compare the compiled matrix multiply with the fallback's BLAS. Results are noisy on a shared
machine: the medians are what to compare, and key figures are worth re-running.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chexcy import ops  # noqa: E402


def ref_cnn_layers(size, batch):
    """(name, kind, shapes, work) for every op of one ref-cnn training step at this input size."""
    layers = []
    s = size
    convs = [("conv1", 1, 16), ("conv2", 16, 32), ("conv3", 32, 64), ("conv4", 64, 128)]
    for i, (name, c, f) in enumerate(convs):
        flops = 2.0 * batch * f * s * s * c * 9
        layers.append((name + ".fwd", "conv_fwd", dict(x=(batch, c, s, s), w=(f, c, 3, 3)), flops))
        layers.append((name + ".bwd", "conv_bwd", dict(x=(batch, c, s, s), w=(f, c, 3, 3)), 2 * flops))
        if i < 3:
            pname = f"maxpool{i + 1}"
            n_in, n_out = batch * f * s * s, batch * f * (s // 2) * (s // 2)
            layers.append((pname + ".fwd", "maxpool_fwd", dict(x=(batch, f, s, s)), 4 * n_in + 12 * n_out))
            layers.append((pname + ".bwd", "maxpool_bwd", dict(x=(batch, f, s, s)), 12 * n_out + 4 * n_in))
            s //= 2
    n_in = batch * 128 * s * s
    layers.append(("gap.fwd", "gap_fwd", dict(x=(batch, 128, s, s)), 4 * n_in + 4 * batch * 128))
    layers.append(("gap.bwd", "gap_bwd", dict(x=(batch, 128, s, s)), 4 * n_in + 4 * batch * 128))
    lin = 2.0 * batch * 128 * 14
    layers.append(("linear.fwd", "linear_fwd", dict(x=(batch, 128), w=(14, 128)), lin))
    layers.append(("linear.bwd", "linear_bwd", dict(x=(batch, 128), w=(14, 128)), 2 * lin))
    return layers


def linear_layers(spec):
    """(name, kind, shapes, work) for forward and backward of every "NxKxO" dense layer in spec."""
    layers = []
    for item in (t for t in spec.split(",") if t):
        try:
            n, k, o = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--linear-shapes: expected NxKxO (e.g. 256x1024x512), got {item!r}") from None
        if min(n, k, o) < 1:
            raise ValueError(f"--linear-shapes: sizes must be >= 1, got {item!r}")
        flops = 2.0 * n * k * o
        layers.append((f"lin{item}.fwd", "linear_fwd", dict(x=(n, k), w=(o, k)), flops))
        layers.append((f"lin{item}.bwd", "linear_bwd", dict(x=(n, k), w=(o, k)), 2 * flops))
    return layers


def make_inputs(kind, shapes, rng):
    x = rng.standard_normal(shapes["x"]).astype(np.float32)
    d = {"x": x}
    if "w" in shapes:
        d["w"] = (rng.standard_normal(shapes["w"]) * 0.1).astype(np.float32)
        d["b"] = rng.standard_normal(shapes["w"][0]).astype(np.float32)
    if kind.startswith("conv"):
        d["dout"] = rng.standard_normal(ops.conv2d_forward(x, d["w"], d["b"], padding=1).shape).astype(np.float32)
    elif kind.startswith("maxpool"):
        out, d["argmax"] = ops.max_pool2d_forward(x, 2)
        d["dout"] = rng.standard_normal(out.shape).astype(np.float32)
    elif kind.startswith("gap"):
        d["dout"] = rng.standard_normal(x.shape[:2]).astype(np.float32)
    elif kind.startswith("linear"):
        d["dout"] = rng.standard_normal((x.shape[0], d["w"].shape[0])).astype(np.float32)
    return d


def chexcy_call(kind, d):
    """A zero-argument callable running the op through chexcy.ops (the active backend)."""
    x = d["x"]
    if kind == "conv_fwd":
        return lambda: ops.conv2d_forward(x, d["w"], d["b"], padding=1)
    if kind == "conv_bwd":
        return lambda: ops.conv2d_backward(d["dout"], x, d["w"], padding=1)
    if kind == "maxpool_fwd":
        return lambda: ops.max_pool2d_forward(x, 2)
    if kind == "maxpool_bwd":
        return lambda: ops.max_pool2d_backward(d["dout"], d["argmax"], x.shape)
    if kind == "gap_fwd":
        return lambda: ops.global_avg_pool2d_forward(x)
    if kind == "gap_bwd":
        return lambda: ops.global_avg_pool2d_backward(d["dout"], x.shape)
    if kind == "linear_fwd":
        return lambda: ops.linear_forward(x, d["w"], d["b"])
    if kind == "linear_bwd":
        return lambda: ops.linear_backward(d["dout"], x, d["w"])
    raise ValueError(kind)


def torch_call(torch, kind, d):
    """The same op in torch.nn.functional / aten (no autograd bookkeeping in the timed call)."""
    F = torch.nn.functional
    x, dout = torch.from_numpy(d["x"]), torch.from_numpy(d["dout"])
    if kind.startswith("conv") or kind.startswith("linear"):
        w, b = torch.from_numpy(d["w"]), torch.from_numpy(d["b"])
    if kind == "conv_fwd":
        return lambda: F.conv2d(x, w, b, padding=1)
    if kind == "conv_bwd":
        return lambda: torch.ops.aten.convolution_backward(
            dout, x, w, [w.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])
    if kind == "maxpool_fwd":
        return lambda: F.max_pool2d(x, 2, return_indices=True)
    if kind == "maxpool_bwd":
        _, idx = F.max_pool2d(x, 2, return_indices=True)
        return lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            dout, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    if kind == "gap_fwd":
        return lambda: x.mean(dim=(2, 3))
    if kind == "gap_bwd":
        hw = x.shape[2] * x.shape[3]
        return lambda: (dout / hw)[:, :, None, None].expand(x.shape).contiguous()
    if kind == "linear_fwd":
        return lambda: F.linear(x, w, b)
    if kind == "linear_bwd":
        return lambda: (dout @ w, dout.t() @ x, dout.sum(0))
    raise ValueError(kind)


STAT = {"median": statistics.median, "min": min}


WARMUP_CALLS, WARMUP_S = 3, 0.1


def median_time(fn, repeats, stat="median"):
    # Warm-up: at least 3 calls and 0.1 s. After a switch from 1 to 2 threads the first few 2-thread
    # calls ran 2-6x slower here (conv4 forward: 20, 11, 8, 3.6, 5.1, then 3.4-3.6 ms: the idle core
    # waking up, the new thread's first pages); with a single warm-up call they reached the median.
    t_end = time.perf_counter() + WARMUP_S
    for k in range(1000):
        fn()
        if k + 1 >= WARMUP_CALLS and time.perf_counter() >= t_end:
            break
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return STAT[stat](times)


SETTLE_S = 0.3


def settle():
    """Pause after a backend whose worker threads outlive its calls. OpenBLAS's workers (behind the
    fallback's matmul) keep spinning on the cores for about 0.1 s after a BLAS call: measured here, a
    2-thread conv4 forward timed within 0.05 s of the fallback's conv3 backward took 7.2-7.9 ms instead
    of 3.6-3.9 ms (one core's worth), and 0.1 s or more later it was back to normal. Without the pause
    whichever backend is timed next (the next layer's chexcy rows) pays for the previous one's threads."""
    time.sleep(SETTLE_S)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128, help="input height = width (128; 64 also common)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per op (median reported), >= 1")
    p.add_argument("--ops", default="", help="comma-separated name prefixes, e.g. conv2,maxpool")
    p.add_argument("--backends", default="cython,python,torch",
                   help="any of cython,python,torch (torch only if importable)")
    p.add_argument("--threads", default="1,2", help="thread counts for cython and torch")
    p.add_argument("--stat", choices=sorted(STAT), default="median",
                   help="median (default) or min of the timed runs; min shows the uncontended speed "
                        "when other jobs share the cores")
    p.add_argument("--linear-shapes", default="",
                   help="comma-separated NxKxO dense layers (x (N, K), weight (O, K)) to time instead of the "
                        "ref-cnn layers, e.g. 32x128x14,256x1024x512,1024x4096x1000")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--reuse-memory", action="store_true",
                   help="tune the allocator as `chexcy train` does (chexcy.memory.reuse_freed_memory): "
                        "every backend, torch included, then reuses freed outputs instead of page-faulting "
                        "fresh ones, which is what the ops see inside a training loop")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    threads = [int(t) for t in a.threads.split(",") if t]
    backends = [b for b in a.backends.split(",") if b]
    torch = None
    if "torch" in backends:
        try:
            import torch  # noqa: F811  (benchmark peer only; never a chexcy dependency)
        except ImportError:
            torch = None
    if "cython" in backends and "cython" not in ops.available_backends():
        p.error("the cython backend is not available (build it: python setup.py build_ext --inplace)")
    info = ops.info() if hasattr(ops, "info") else {}
    bi = info.get("build_info", {})
    if a.reuse_memory:
        from chexcy.memory import reuse_freed_memory
        reuse_freed_memory()
    try:
        layers = linear_layers(a.linear_shapes) if a.linear_shapes else ref_cnn_layers(a.size, a.batch)
    except ValueError as exc:
        p.error(str(exc))
    what = f"dense layers {a.linear_shapes}" if a.linear_shapes else \
        f"ref-cnn ops, batch {a.batch}, {a.size}x{a.size}"
    print(f"# {what}, {a.stat} of {a.repeats} after a warm-up of >= {WARMUP_CALLS} calls and {WARMUP_S} s"
          + ("; allocator tuned as in training (--reuse-memory)" if a.reuse_memory else ""))
    print(f"# chexcy cython: {bi.get('module', '?')} ({bi.get('variant', '?')}, {bi.get('cflags', '?')}); "
          f"numpy {np.__version__}" + (f"; torch {torch.__version__}" if torch else "; torch: not importable"))

    rng = np.random.default_rng(0)
    prefixes = [s for s in a.ops.split(",") if s]
    rows = []
    for name, kind, shapes, work in layers:
        if prefixes and not any(name.startswith(pre) for pre in prefixes):
            continue
        with ops.use_backend("python"):
            d = make_inputs(kind, shapes, rng)
        r = {"op": name, "work": work, "unit": "GB/s" if "pool" in kind or "gap" in kind else "GFLOP/s"}
        if "cython" in backends:
            with ops.use_backend("cython"):
                for t in threads:
                    ops.set_num_threads(t)
                    r[f"cython{t}"] = median_time(chexcy_call(kind, d), a.repeats, a.stat)
                ops.set_num_threads(None)
        if "python" in backends:
            with ops.use_backend("python"):
                r["python"] = median_time(chexcy_call(kind, d), a.repeats, a.stat)
            settle()
        if torch is not None:
            for t in threads:
                torch.set_num_threads(t)
                with torch.no_grad():
                    r[f"torch{t}"] = median_time(torch_call(torch, kind, d), a.repeats, a.stat)
            settle()
        rows.append(r)
        cols = ([f"cython{t}" for t in threads] if "cython" in backends else []) + \
            (["python"] if "python" in backends else []) + \
            ([f"torch{t}" for t in threads] if torch is not None else [])
        print_row(r, cols, threads, first=len(rows) == 1, width=max(13, 2 + max(len(t[0]) for t in layers)))
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(tmp, a.json)


def _rate(r, key):
    return r["work"] / r[key] / 1e9


def print_row(r, cols, threads, first, width=13):
    if first:
        head = f"{'op':<{width}}{'unit':>8}" + "".join(f"{c + ' ms':>12}{'rate':>8}" for c in cols)
        head += f"{'cy/py':>8}{'2T/1T':>7}{'cy/torch':>9}"
        print(head)
    line = f"{r['op']:<{width}}{r['unit']:>8}"
    for c in cols:
        line += (f"{r[c] * 1e3:>12.3f}{_rate(r, c):>8.1f}" if c in r else f"{'-':>12}{'-':>8}")
    tmax = f"cython{max(threads)}"
    tmin = f"cython{min(threads)}"
    cy_py = f"{r['python'] / r[tmax]:.1f}x" if "python" in r and tmax in r else "-"
    scale = f"{r[tmin] / r[tmax]:.2f}" if tmax in r and tmin in r and tmax != tmin else "-"
    cy_t = f"{r['torch' + tmax[6:]] / r[tmax]:.2f}x" if tmax in r and "torch" + tmax[6:] in r else "-"
    print(line + f"{cy_py:>8}{scale:>7}{cy_t:>9}", flush=True)


if __name__ == "__main__":
    main()
