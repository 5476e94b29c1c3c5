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
    /work/venv-bench/bin/python tools/bench_ops.py --suite nets   # resnet/densenet/mobilenet layers vs torch
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
    p.add_argument("--suite", choices=("ref-cnn", "nets"), default="ref-cnn",
                   help="ref-cnn (default): its layers per backend; nets: every distinct layer of resnet18/50, "
                        "densenet121 and mobilenet_v2 at 224 (plus stems, dense layers) against torch")
    p.add_argument("--baseline", default="",
                   help="--suite nets: also time this compiled module (e.g. an earlier build's "
                        "chexcy/_ops_avx512*.so) round-robin with the current one, as columns base fb, t/b fb, b/c")
    p.add_argument("--min-time", type=float, default=0.1,
                   help="--suite nets: each timed block runs past --repeats calls until it spans this many "
                        "seconds (0.1), so that a short layer's median covers more than one time slice of "
                        "whatever else runs on the cores")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--reuse-memory", action="store_true",
                   help="tune the allocator as `chexcy train` does (chexcy.memory.reuse_freed_memory): "
                        "every backend, torch included, then reuses freed outputs instead of page-faulting "
                        "fresh ones, which is what the ops see inside a training loop")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.min_time < 0:
        p.error("--min-time must be >= 0")
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
    if a.suite == "nets":
        if a.batch == 32 and "--batch" not in (argv or sys.argv):
            a.batch = 8
        print(f"# chexcy cython: {bi.get('module', '?')} ({bi.get('variant', '?')}); numpy {np.__version__}"
              + (f"; torch {torch.__version__}" if torch else "; torch: not importable"))
        run_nets(a, torch)
        return
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


# ------------------------------------------------------------------------------------------------
# --suite nets: every distinct layer of the networks people train (DESIGN.md section 7)
# ------------------------------------------------------------------------------------------------

def _conv(rows, c, f, s, k, stride=1, pad=None, dil=1, groups=1, n=8):
    pad = dil * (k - 1) // 2 if pad is None else pad
    rows.add(("conv", n, c, s, f, k, stride, pad, dil, groups))


def nets_layers(batch=8):
    """Every distinct conv, pool and batch-norm layer of torchvision's resnet18, resnet50, densenet121
    and mobilenet_v2 at 224x224 (3 input channels), the stem with 1 input channel and at 320, a
    dilated 3x3, and large dense layers. Returns (name, spec) pairs in a fixed order."""
    rows = set()
    bns = set()
    pools = set()
    for cin in (1, 3):
        for s in (224, 320):
            _conv(rows, cin, 64, s, 7, 2, 3, n=batch)
    bns.add((batch, 64, 112))
    pools.add(("max", batch, 64, 112, 3, 2, 1))
    # resnet18: basic blocks
    c, s = 64, 56
    for f, first_stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        if first_stride == 2:
            _conv(rows, c, f, s, 3, 2, n=batch)
            _conv(rows, c, f, s, 1, 2, 0, n=batch)
            s //= 2
        _conv(rows, f if first_stride == 2 else c, f, s, 3, n=batch)
        _conv(rows, f, f, s, 3, n=batch)
        bns.add((batch, f, s))
        c = f
    # resnet50: bottlenecks (stride on the 3x3, as torchvision)
    c, s = 64, 56
    for w, blocks, first_stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        out = 4 * w
        for b in range(blocks):
            stride = first_stride if b == 0 else 1
            _conv(rows, c, w, s, 1, n=batch)
            bns.add((batch, w, s))
            _conv(rows, w, w, s, 3, stride, n=batch)
            so = s // stride
            bns.add((batch, w, so))
            _conv(rows, w, out, so, 1, n=batch)
            bns.add((batch, out, so))
            if b == 0:
                _conv(rows, c, out, s, 1, stride, 0, n=batch)
            c, s = out, so
    # densenet121: growth 32, bn_size 4, blocks (6, 12, 24, 16), transitions halve channels + 2x2 avg pool
    c, s = 64, 56
    for bi, layers in enumerate((6, 12, 24, 16)):
        for _ in range(layers):
            bns.add((batch, c, s))
            _conv(rows, c, 128, s, 1, n=batch)
            bns.add((batch, 128, s))
            _conv(rows, 128, 32, s, 3, n=batch)
            c += 32
        bns.add((batch, c, s))
        if bi < 3:
            _conv(rows, c, c // 2, s, 1, n=batch)
            pools.add(("avg", batch, c // 2, s, 2, 2, 0))
            c //= 2
            s //= 2
    # mobilenet_v2: inverted residuals (expand 1x1, depthwise 3x3, project 1x1)
    _conv(rows, 3, 32, 224, 3, 2, 1, n=batch)
    c, s = 32, 112
    for t, f, reps, first_stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for r in range(reps):
            stride = first_stride if r == 0 else 1
            hidden = c * t
            if t != 1:
                _conv(rows, c, hidden, s, 1, n=batch)
            _conv(rows, hidden, hidden, s, 3, stride, groups=hidden, n=batch)
            s //= stride
            _conv(rows, hidden, f, s, 1, n=batch)
            c = f
    _conv(rows, 320, 1280, 7, 1, n=batch)
    # a dilated 3x3 (DeepLab-style) and a 5x5 depthwise (the layer families)
    _conv(rows, 64, 64, 28, 3, 1, dil=2, n=batch)
    _conv(rows, 96, 96, 56, 5, 2, 2, groups=96, n=batch)
    out = []
    for spec in sorted(rows, key=lambda r: (r[9] > 1, r[5], -r[3], r[2], r[4], r[6], r[8])):
        _, n, c, s, f, k, stride, pad, dil, groups = spec
        name = f"conv{k}x{k}" + (f"s{stride}" if stride > 1 else "") + (f"d{dil}" if dil > 1 else "") + \
            ("dw" if groups > 1 else "") + f" {c}>{f}@{s}"
        out.append((name, spec))
    for spec in sorted(pools):
        kind, n, c, s, k, stride, pad = spec
        out.append((f"{kind}pool{k}s{stride}p{pad} {c}@{s}", ("pool",) + spec))
    for spec in sorted(bns, key=lambda b: (-b[2], b[1])):
        out.append((f"bn {spec[1]}@{spec[2]}", ("bn",) + spec))
    for spec in ((batch, 64, 112), (batch, 256, 56), (batch, 512, 28)):
        out.append((f"relu {spec[1]}@{spec[2]}", ("relu",) + spec))
    for n, k, o in ((8, 512, 1000), (8, 2048, 1000), (512, 4096, 1000)):
        out.append((f"linear {n}x{k}>{o}", ("linear", n, k, o)))
    return out


def _nets_row(spec, rng, torch):
    """Callables and work for one row: dict with fwd, fb (forward + backward), torch_fwd / torch_fb (both
    layouts: the faster one is taken), np_ref (the matching NumPy matmul or np.copyto), work_fwd, work_fb,
    unit."""
    kind = spec[0]
    r = {}
    if kind == "conv":
        _, n, c, s, f, k, stride, pad, dil, groups = spec
        x = rng.standard_normal((n, c, s, s)).astype(np.float32)
        w = (rng.standard_normal((f, c // groups, k, k)) * 0.1).astype(np.float32)
        b = rng.standard_normal(f).astype(np.float32)
        y = ops.conv2d_forward(x, w, b, stride, pad, dil, groups)
        dout = rng.standard_normal(y.shape).astype(np.float32)
        args = (stride, pad, dil, groups)
        r["fwd"] = lambda: ops.conv2d_forward(x, w, b, *args)
        r["fb"] = lambda: (ops.conv2d_forward(x, w, b, *args), ops.conv2d_backward(dout, x, w, *args))
        flops = 2.0 * y.size * (c // groups) * k * k
        if groups > 1:      # depthwise: memory-bound, GB/s of x read + out written (fwd), 3 more for bwd
            r["unit"] = "GB/s"
            r["work_fwd"] = 4.0 * (x.size + y.size)
            r["work_fb"] = 4.0 * (2 * x.size + 2 * y.size + x.size + y.size)
        else:
            r["unit"] = "GFLOP/s"
            r["work_fwd"], r["work_fb"] = flops, 3 * flops
        r["mflop"] = flops / 1e6
        if k == 1 and groups == 1:      # the same product in NumPy: (F, C) @ (C, OH*OW) per sample
            wm = w.reshape(f, c)
            if stride == 1:
                xs = x.reshape(n, c, -1)
                r["np_ref"] = lambda: np.matmul(wm, xs)
            else:   # the sampled pixels' copy is part of NumPy's job, as it is of chexcy's
                r["np_ref"] = lambda: np.matmul(wm, x[:, :, ::stride, ::stride].reshape(n, c, -1))
        elif groups > 1:
            src, dst = np.empty_like(x), np.empty_like(x)
            src2, dst2 = np.empty_like(y), np.empty_like(y)
            r["np_ref"] = lambda: (np.copyto(dst, src), np.copyto(dst2, src2))
        if torch is not None:
            def tcalls(layout):
                tx, tw, tb, td = (torch.from_numpy(a) for a in (x, w, b, dout))
                if layout:
                    tx, tw, td = (t.contiguous(memory_format=torch.channels_last) for t in (tx, tw, td))
                F = torch.nn.functional
                fwd = lambda: F.conv2d(tx, tw, tb, stride, pad, dil, groups)  # noqa: E731
                bwd = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
                    td, tx, tw, [f], [stride] * 2, [pad] * 2, [dil] * 2, False, [0, 0], groups, [True] * 3)
                return fwd, lambda: (fwd(), bwd())
            r["torch"] = [tcalls(False), tcalls(True)]
    elif kind == "pool":
        _, pk, n, c, s, k, stride, pad = spec
        x = rng.standard_normal((n, c, s, s)).astype(np.float32)
        if pk == "max":
            y, am = ops.max_pool2d_forward(x, k, stride, pad)
            dout = rng.standard_normal(y.shape).astype(np.float32)
            r["fwd"] = lambda: ops.max_pool2d_forward(x, k, stride, pad)
            r["fb"] = lambda: (ops.max_pool2d_forward(x, k, stride, pad), ops.max_pool2d_backward(dout, am, x.shape))
            idx_bytes = 8
        else:
            y = ops.avg_pool2d_forward(x, k, stride, pad)
            dout = rng.standard_normal(y.shape).astype(np.float32)
            r["fwd"] = lambda: ops.avg_pool2d_forward(x, k, stride, pad)
            r["fb"] = lambda: (ops.avg_pool2d_forward(x, k, stride, pad),
                               ops.avg_pool2d_backward(dout, x.shape, k, stride, pad))
            idx_bytes = 0
        r["unit"] = "GB/s"
        r["work_fwd"] = 4.0 * x.size + (4 + idx_bytes) * y.size
        r["work_fb"] = r["work_fwd"] + (4 + idx_bytes) * y.size + 4.0 * x.size
        src, dst = np.empty_like(x), np.empty_like(x)
        src2, dst2 = np.empty_like(y), np.empty_like(y)
        r["np_ref"] = lambda: (np.copyto(dst, src), np.copyto(dst2, src2), np.copyto(dst, src))
        if torch is not None:
            def tcalls(layout):
                tx, td = torch.from_numpy(x), torch.from_numpy(dout)
                if layout:
                    tx, td = (t.contiguous(memory_format=torch.channels_last) for t in (tx, td))
                F = torch.nn.functional
                if pk == "max":
                    _, idx = F.max_pool2d(tx, k, stride, pad, return_indices=True)
                    fwd = lambda: F.max_pool2d(tx, k, stride, pad, return_indices=True)  # noqa: E731
                    bwd = lambda: torch.ops.aten.max_pool2d_with_indices_backward(  # noqa: E731
                        td, tx, [k, k], [stride] * 2, [pad] * 2, [1, 1], False, idx)
                else:
                    fwd = lambda: F.avg_pool2d(tx, k, stride, pad)  # noqa: E731
                    bwd = lambda: torch.ops.aten.avg_pool2d_backward(  # noqa: E731
                        td, tx, [k, k], [stride] * 2, [pad] * 2, False, True, None)
                return fwd, lambda: (fwd(), bwd())
            r["torch"] = [tcalls(False), tcalls(True)]
    elif kind == "bn":
        _, n, c, s = spec
        x = rng.standard_normal((n, c, s, s)).astype(np.float32)
        g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        dout = rng.standard_normal(x.shape).astype(np.float32)
        _, mean, var = ops.batch_norm2d_forward(x, g, b)
        r["fwd"] = lambda: ops.batch_norm2d_forward(x, g, b)
        r["fb"] = lambda: (ops.batch_norm2d_forward(x, g, b), ops.batch_norm2d_backward(dout, x, mean, var, g))
        r["unit"] = "GB/s"
        r["work_fwd"] = 4.0 * 3 * x.size                    # x twice (stats, apply) + out
        r["work_fb"] = r["work_fwd"] + 4.0 * 5 * x.size     # dout, x twice each + dx
        src, dst = np.empty_like(x), np.empty_like(x)
        r["np_ref"] = lambda: np.copyto(dst, src)
        r["np_scale"] = 1.5        # copyto moves 2 x.size; the forward moves 3 x.size
        if torch is not None:
            def tcalls(layout):
                tx, td = torch.from_numpy(x), torch.from_numpy(dout)
                tg, tb = torch.from_numpy(g), torch.from_numpy(b)
                if layout:
                    tx, td = (t.contiguous(memory_format=torch.channels_last) for t in (tx, td))
                fwd = lambda: torch.ops.aten.native_batch_norm(tx, tg, tb, None, None, True, 0.1, 1e-5)  # noqa: E731
                _, sm, si = fwd()
                bwd = lambda: torch.ops.aten.native_batch_norm_backward(  # noqa: E731
                    td, tx, tg, None, None, sm, si, True, 1e-5, [True] * 3)
                return fwd, lambda: (fwd(), bwd())
            r["torch"] = [tcalls(False), tcalls(True)]
    elif kind == "relu":
        _, n, c, s = spec
        x = rng.standard_normal((n, c, s, s)).astype(np.float32)
        dout = rng.standard_normal(x.shape).astype(np.float32)
        y_np = np.maximum(x, 0)
        # what the ReLU layer did before the compiled op (NumPy)
        r["fb_numpy"] = lambda: (np.maximum(x, 0), dout * (y_np > 0))
        if hasattr(ops, "relu_forward"):
            y = ops.relu_forward(x)
            r["fwd"] = lambda: ops.relu_forward(x)
            r["fb"] = lambda: (ops.relu_forward(x), ops.relu_backward(dout, y))
        else:
            r["fwd"] = lambda: np.maximum(x, 0)
            r["fb"] = r["fb_numpy"]
        r["unit"] = "GB/s"
        r["work_fwd"] = 8.0 * x.size
        r["work_fb"] = r["work_fwd"] + 12.0 * x.size
        src, dst = np.empty_like(x), np.empty_like(x)
        r["np_ref"] = lambda: np.copyto(dst, src)
        if torch is not None:
            def tcalls(layout):
                tx, td = torch.from_numpy(x), torch.from_numpy(dout)
                if layout:
                    tx, td = (t.contiguous(memory_format=torch.channels_last) for t in (tx, td))
                fwd = lambda: torch.relu(tx)  # noqa: E731
                ty = fwd()
                bwd = lambda: torch.ops.aten.threshold_backward(td, ty, 0)  # noqa: E731
                return fwd, lambda: (fwd(), bwd())
            r["torch"] = [tcalls(False), tcalls(True)]
    elif kind == "linear":
        _, n, k, o = spec
        x = rng.standard_normal((n, k)).astype(np.float32)
        w = (rng.standard_normal((o, k)) * 0.1).astype(np.float32)
        b = rng.standard_normal(o).astype(np.float32)
        dout = rng.standard_normal((n, o)).astype(np.float32)
        r["fwd"] = lambda: ops.linear_forward(x, w, b)
        r["fb"] = lambda: (ops.linear_forward(x, w, b), ops.linear_backward(dout, x, w))
        r["unit"] = "GFLOP/s"
        r["work_fwd"] = 2.0 * n * k * o
        r["work_fb"] = 3 * r["work_fwd"]
        r["mflop"] = r["work_fwd"] / 1e6
        wt = np.ascontiguousarray(w.T)
        r["np_ref"] = lambda: x @ wt
        if torch is not None:
            tx, tw, tb, td = (torch.from_numpy(a) for a in (x, w, b, dout))
            fwd = lambda: torch.nn.functional.linear(tx, tw, tb)  # noqa: E731
            r["torch"] = [(fwd, lambda: (fwd(), td @ tw, td.t() @ tx, td.sum(0)))]
    return r


def interleaved_times(fns, repeats, stat="median", min_time=0.0):
    """Time several zero-argument callables round-robin (one call of each per round, after a warm-up
    of each), so that all of them see the same moments of a busy machine; {name: median seconds}.
    Rounds go on past `repeats` until the timed calls span `min_time` seconds: with 7 rounds a
    0.1 ms layer's median covered about 2 ms, short enough for one time slice of another process on
    a core to land on every sample (batch norm 512 at 7x7, 2 threads: 0.195 ms in a run, 0.110 alone)."""
    for fn in fns.values():
        t_end = time.perf_counter() + WARMUP_S
        for k in range(1000):
            fn()
            if k + 1 >= WARMUP_CALLS and time.perf_counter() >= t_end:
                break
    times = {name: [] for name in fns}
    t_end = time.perf_counter() + min_time
    rounds = 0
    while rounds < repeats or time.perf_counter() < t_end:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: STAT[stat](t) for name, t in times.items()}


SCALING_ROUNDS = 4


def scaling_times(fn, threads, repeats, stat="median", min_time=0.0):
    """{1: s, threads: s}: fn timed at 1 thread and at `threads`, in SCALING_ROUNDS alternating blocks of
    `repeats` calls or more, until a block spans min_time / SCALING_ROUNDS seconds (each block after
    WARMUP_CALLS calls at the new thread count), the stat of each count's calls. Both counts see the
    same stretches of a busy machine: timed minutes apart, as the 2-thread time was before, a
    sub-millisecond layer's ratio moved by 0.4 between runs (1x1 704 -> 128 at 7x7, 1.40 and 1.82
    fwd+bwd), wider than the difference the ratio is there to show."""
    times = {1: [], threads: []}
    for _ in range(SCALING_ROUNDS):
        for t in (threads, 1):
            ops.set_num_threads(t)
            for _ in range(WARMUP_CALLS):
                fn()
            t_end = time.perf_counter() + min_time / SCALING_ROUNDS
            k = 0
            while k < repeats or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                fn()
                times[t].append(time.perf_counter() - t0)
                k += 1
    ops.set_num_threads(None)
    return {t: STAT[stat](v) for t, v in times.items()}


def _load_baseline(path):
    """A compiled kernel module from another build (e.g. an earlier commit's chexcy/_ops_avx512*.so),
    loaded under a private package name so that it can sit beside this tree's module."""
    import importlib.util
    ops.available_backends()    # this tree's module first: the other build registers the same module name
    saved = {k: v for k, v in sys.modules.items() if k.startswith("chexcy._ops")}
    base = os.path.basename(path).split(".")[0]
    spec = importlib.util.spec_from_file_location("chexcy_baseline." + base, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules.update(saved)
    return mod


def _on_module(mod, fn):
    """fn run with `mod` as the active compiled backend of chexcy.ops (its checks, then mod's kernels)."""
    def call():
        prev = ops._state["module"]
        ops._state["module"] = mod
        try:
            return fn()
        finally:
            ops._state["module"] = prev
    return call


def run_nets(a, torch):
    """The --suite nets table: chexcy (2 threads; round-robin with --baseline's module) against torch's
    faster layout (2 threads, its two layouts round-robin) in this process, each library timed on its
    own with a pause between, medians; the NumPy column is matmul on the same product (1x1 convs, dense;
    for a strided 1x1 conv on x[:, :, ::s, ::s], whose reshape copies the sampled pixels as chexcy's
    forward does) or np.copyto on the same bytes (memory-bound rows), as a percentage of chexcy's forward
    speed."""
    rng = np.random.default_rng(0)
    prefixes = [s for s in a.ops.split(",") if s]
    layers = [(nm, sp) for nm, sp in nets_layers(a.batch) if not prefixes or any(nm.startswith(p) for p in prefixes)]
    t2 = max(int(t) for t in a.threads.split(",") if t)
    base = _load_baseline(a.baseline) if a.baseline else None
    print(f"# --suite nets: {len(layers)} layers, batch {a.batch}; chexcy at {t2} threads, torch at {t2} threads "
          f"in its faster layout (NCHW or channels_last); {a.stat} of >= {a.repeats} calls over >= {a.min_time} s, "
          f"each library timed round-robin on its own; conv rows >= 50 MFLOP: fb at 1 and {t2} threads in "
          f"{SCALING_ROUNDS} alternating blocks of >= {a.repeats} calls over >= {a.min_time / SCALING_ROUNDS:g} s "
          f"for 2T/1T" + (f"; baseline module {a.baseline}" if base else ""))
    head = (f"{'layer':<26}{'unit':>8}{'fwd ms':>9}{'rate':>7}{'fb ms':>9}{'rate':>7}{'1T fb':>8}"
            f"{'2T/1T':>6}{'torch fwd':>10}{'fb':>9}{'lay':>4}{'t/c fwd':>8}{'t/c fb':>7}{'np %':>6}")
    if base:
        head += f"{'base fb':>9}{'t/b fb':>7}{'b/c':>6}"
    print(head)
    ratios, base_ratios, rows = [], [], []
    if torch is not None:
        torch.set_num_threads(t2)
    if base:
        base.set_num_threads(t2)
    for name, spec in layers:
        with ops.use_backend("cython"):
            r = _nets_row(spec, rng, torch)
            row = {"layer": name, "unit": r["unit"]}
            ops.set_num_threads(t2)
            fns = {"fwd": r["fwd"], "fb": r["fb"]}
            if base:
                if spec[0] == "relu" and not hasattr(base, "relu_forward"):
                    fns["base_fb"] = r["fb_numpy"]
                else:
                    fns["base_fb"] = _on_module(base, r["fb"])
            got = interleaved_times(fns, a.repeats, a.stat, a.min_time)
            # torch in its own round-robin, after a pause: chexcy's and torch's OpenMP runtimes are two
            # thread pools whose workers keep spinning after a call (see settle()), so that inside one
            # round-robin each library's calls ran with the other's spinners on a core (measured here,
            # 512>128@7, 2 threads: chexcy fwd 0.315 ms after a torch call, 0.226 ms alone; torch
            # likewise after chexcy's); a user's process runs one of them.
            tfns = {}
            for li, (tf, tfb) in enumerate(r.get("torch", [])):
                tfns[f"torch_fwd{li}"], tfns[f"torch_fb{li}"] = tf, tfb
            if tfns:
                settle()
                with torch.no_grad():
                    got.update(interleaved_times(tfns, a.repeats, a.stat, a.min_time))
                settle()
            row.update({k: v for k, v in got.items() if not k.startswith("torch")})
            if "np_ref" in r:
                # Timed on its own, then a pause: NumPy's matmul wakes OpenBLAS's workers, which keep
                # spinning on the cores for about 0.1 s (see settle()); inside the round-robin they
                # took a core from whichever call came next (a 1.2 ms conv fwd+bwd measured 5.4 ms).
                row["np"] = interleaved_times({"np": r["np_ref"]}, a.repeats, a.stat, a.min_time)["np"]
                settle()
            if "np" in row:
                row["np"] *= r.get("np_scale", 1.0)
            layouts = [li for li in range(len(r.get("torch", [])))]
            if layouts:
                li = min(layouts, key=lambda i: got[f"torch_fb{i}"])
                row["torch_fb"], row["torch_fwd"], row["layout"] = got[f"torch_fb{li}"], got[f"torch_fwd{li}"], li
            ops.set_num_threads(None)
            if r.get("mflop", 0) >= 50 and spec[0] == "conv":
                sc = scaling_times(r["fb"], t2, a.repeats, a.stat, a.min_time)
                row["fb1"], row["fb2"] = sc[1], sc[t2]
        rate = lambda w, t: w / t / 1e9  # noqa: E731
        line = (f"{name:<26}{r['unit']:>8}{row['fwd'] * 1e3:>9.3f}{rate(r['work_fwd'], row['fwd']):>7.1f}"
                f"{row['fb'] * 1e3:>9.3f}{rate(r['work_fb'], row['fb']):>7.1f}")
        line += (f"{row['fb1'] * 1e3:>8.2f}{row['fb1'] / row['fb2']:>6.2f}" if "fb1" in row else f"{'-':>8}{'-':>6}")
        if "torch_fb" in row:
            ratio = row["torch_fb"] / row["fb"]
            ratios.append(ratio)
            line += (f"{row['torch_fwd'] * 1e3:>10.3f}{row['torch_fb'] * 1e3:>9.3f}"
                     f"{('cl' if row['layout'] else 'nc'):>4}{row['torch_fwd'] / row['fwd']:>8.2f}{ratio:>7.2f}")
        else:
            line += f"{'-':>10}{'-':>9}{'-':>4}{'-':>8}{'-':>7}"
        line += f"{100 * row['np'] / row['fwd']:>6.0f}" if "np" in row else f"{'-':>6}"
        if base:
            line += f"{row['base_fb'] * 1e3:>9.3f}"
            if "torch_fb" in row:
                base_ratios.append(row["torch_fb"] / row["base_fb"])
                line += f"{base_ratios[-1]:>7.2f}"
            else:
                line += f"{'-':>7}"
            line += f"{row['base_fb'] / row['fb']:>6.2f}"
        print(line, flush=True)
        rows.append(row)
    if ratios:
        gm = float(np.exp(np.mean(np.log(ratios))))
        print(f"# geometric mean of torch / chexcy (fwd+bwd) over {len(ratios)} rows: {gm:.2f}; "
              f"rows below 0.7: {sum(q < 0.7 for q in ratios)}; lowest {min(ratios):.2f}")
    if base_ratios:
        gm = float(np.exp(np.mean(np.log(base_ratios))))
        print(f"# the same for the baseline module: {gm:.2f}; rows below 0.7: {sum(q < 0.7 for q in base_ratios)}; "
              f"lowest {min(base_ratios):.2f}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(tmp, a.json)

if __name__ == "__main__":
    main()
