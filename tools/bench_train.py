#!/usr/bin/env python3
"""Training speed and memory of ref-cnn (DESIGN.md section 7), side by side in one run.

    python tools/bench_train.py                       # 128x128, batch 32, 2 threads: cython vs python
    python tools/bench_train.py --torch-python /tmp/torchenv/bin/python   # + torch NCHW / channels_last
    python tools/bench_train.py --rss                 # + peak RSS training on 20,000 prepared images
    python tools/bench_train.py --profile             # + time per layer (cython backend)

Speed: one training step = forward, masked BCE, backward, SGD momentum 0.9 update, exactly the code
`chexcy train` runs (model.forward / bce_with_logits / model.backward / optimizer.step) on random
images already in memory, so the figure is the compute of a step. Each backend warms up, then the median
of the timed steps gives images/s and GFLOP/s (training FLOPs = 3 x forward multiply-adds x 2). torch runs
in this interpreter when `import torch` works, else in `--torch-python` (a subprocess), else it is skipped.

Memory: `--rss` writes a prepared folder of 20,000 random 128x128 images (about 330 MB on disk), then
trains ref-cnn on it with `chexcy.train.fit` (the real loader, memory-mapped images) in a child process for
`--rss-steps` steps, sampling /proc/self/status. It reports the peak RSS (VmHWM) and its parts: anonymous
memory (the process's own arrays) and file-backed pages (the memory map of images.npy, clean page cache
the kernel can drop at any time).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))         # run from a checkout without installing


def ref_cnn_flops(size, widths=(16, 32, 64, 128), classes=14):
    """Multiply-adds x 2 of one ref-cnn forward pass on a size x size image (convs and the linear layer)."""
    flops, side, prev = 0, size, 1
    for i, w in enumerate(widths):
        flops += 2 * side * side * w * prev * 9
        prev = w
        if i < len(widths) - 1:
            side //= 2
    return flops + 2 * prev * classes


def bench_chexcy(backend, size, batch, steps, warmup, threads, profile=False):
    from chexcy import nn, ops
    from chexcy.memory import reuse_freed_memory
    from chexcy.optim import SGD
    ops.set_backend(backend)
    if threads:
        ops.set_num_threads(threads)
    reuse_freed_memory()                            # as chexcy.train.fit does
    rng = np.random.default_rng(0)
    model = nn.build_model("simple", widths=[16, 32, 64, 128])
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = rng.standard_normal((batch, 1, size, size)).astype(np.float32)
    y = (rng.random((batch, 14)) < 0.3).astype(np.float32)
    times = []
    layer_times = {}
    if profile:
        _instrument(model, layer_times)
    for i in range(warmup + steps):
        if i == warmup:
            layer_times.clear()
        t0 = time.perf_counter()
        logits = model.forward(x)
        loss, dlogits = nn.bce_with_logits(logits, y)
        model.backward(dlogits)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[warmup:], layer_times


def _instrument(model, table):
    """Wrap every leaf layer's forward/backward with a timer accumulating into table[(name, phase)]."""
    for name, module in _leaves(model):
        for phase in ("forward", "backward"):
            original = getattr(module, phase)

            def timed(*args, _orig=original, _key=(name, phase), **kwargs):
                t0 = time.perf_counter()
                out = _orig(*args, **kwargs)
                table[_key] = table.get(_key, 0.0) + time.perf_counter() - t0
                return out
            setattr(module, phase, timed)


def _leaves(module, prefix=""):
    children = list(module.named_children())
    if not children:
        yield prefix.rstrip(".") + f" {type(module).__name__}", module
    for name, child in children:
        yield from _leaves(child, f"{prefix}{name}.")


TORCH_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    size, batch, steps, warmup, threads = map(int, sys.argv[1:6])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    results = {}
    for layout in ("nchw", "channels_last"):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 14))
        x = torch.randn(batch, 1, size, size)
        y = (torch.rand(batch, 14) < 0.3).float()
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        results[layout] = times[warmup:]
    results["version"] = torch.__version__
    print(json.dumps(results))
""")


def bench_torch(python, size, batch, steps, warmup, threads):
    """Step times of torch in NCHW and channels_last, or None when torch is unavailable."""
    args = [str(size), str(batch), str(steps), str(warmup), str(threads)]
    try:
        import torch  # noqa: F401
        python = sys.executable
    except ImportError:
        if not python:
            return None
    done = subprocess.run([python, "-c", TORCH_SCRIPT, *args], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"torch benchmark failed ({python}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


# -- memory ---------------------------------------------------------------------------------------------
def write_prepared(folder, n, size, seed=0):
    """A prepared folder of n random images in the format chexcy.data.PreparedDataset reads."""
    import pandas as pd

    from chexcy.data import LABELS
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(os.path.join(folder, "images.npy"), mode="w+", dtype=np.uint8,
                                       shape=(n, 1, size, size))
    for start in range(0, n, 1000):                  # bounded memory while writing
        stop = min(n, start + 1000)
        images[start:stop] = rng.integers(0, 256, (stop - start, 1, size, size), dtype=np.uint8)
    images.flush()
    del images
    labels = rng.choice(np.array([0.0, 1.0, np.nan], np.float32), size=(n, len(LABELS)))
    np.save(os.path.join(folder, "labels.npy"), labels)
    meta = pd.DataFrame({"path": [f"bench/patient{i:05d}/study1/view1_frontal.jpg" for i in range(n)],
                         "csv_row": np.arange(n), "patient": [f"patient{i:05d}" for i in range(n)],
                         "study": "study1", "view": "Frontal", "ap_pa": "AP", "sex": "Male", "age": 50})
    meta.to_csv(os.path.join(folder, "meta.csv"), index=False)
    manifest = {"format_version": 1, "size": size, "count": n, "label_names": list(LABELS),
                "policy": {"uncertain": {name: "ignore" for name in LABELS}, "blank": "ignore"}}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)


RSS_CHILD = textwrap.dedent("""
    import json, sys, threading, time
    folder, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    stop = False
    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out
    def sample():
        while not stop:
            s = status()
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.01)
    threading.Thread(target=sample, daemon=True).start()
    import numpy as np
    from chexcy import nn, ops
    from chexcy.data import BatchLoader, PreparedDataset
    from chexcy.memory import reuse_freed_memory
    from chexcy.optim import SGD
    ops.set_num_threads(threads)
    reuse_freed_memory()                            # as chexcy.train.fit does
    ds = PreparedDataset(folder)                    # images memory-mapped
    model = nn.build_model("simple", widths=[16, 32, 64, 128])
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = BatchLoader(ds, 32, shuffle=True, seed=0)
    t0 = time.perf_counter()
    # The step of chexcy.train.fit, on shuffled batches read from the memory map by the real loader.
    for step, batch in enumerate(loader.batches(0)):
        if step == steps:
            break
        logits = model.forward(batch.images)
        loss, dlogits = nn.bce_with_logits(logits, batch.labels, batch.mask)
        model.backward(dlogits)
        opt.step()
    seconds = time.perf_counter() - t0
    stop = True
    final = status()
    print(json.dumps({"peak_anon_kb": peak["RssAnon"], "peak_file_kb": peak["RssFile"],
                      "peak_rss_kb": final["VmHWM"], "seconds": seconds, "n": len(ds)}))
""")


def bench_rss(n, size, steps, threads, keep=None):
    folder = keep or tempfile.mkdtemp(prefix="chexcy-bench-rss-")
    if not os.path.exists(os.path.join(folder, "manifest.json")):
        print(f"writing {n:,} random {size}x{size} images to {folder} ...", flush=True)
        write_prepared(folder, n, size)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, folder, str(steps), str(threads)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"RSS child failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if keep is None:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per backend (python: a third)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default="cython,python")
    parser.add_argument("--torch-python", help="an interpreter with torch, when this one has none")
    parser.add_argument("--profile", action="store_true", help="time per layer for the first backend")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS on 20,000 prepared images")
    parser.add_argument("--rss-images", type=int, default=20000)
    parser.add_argument("--rss-steps", type=int, default=100)
    parser.add_argument("--rss-folder", help="reuse/keep the prepared folder for --rss here")
    args = parser.parse_args()

    from chexcy import ops
    flops_step = 3 * ref_cnn_flops(args.size) * args.batch
    print(f"ref-cnn training step: {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, "
          f"{flops_step / args.batch / 1e9:.3f} GFLOP per image; median of timed steps after {args.warmup} warm-up")
    if hasattr(os, "getloadavg"):
        # On a shared machine the figures mean little without this: an OpenMP region waits for its slowest
        # thread, and a descheduled thread costs milliseconds per region.
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    rows = []
    layer_tables = {}
    for i, backend in enumerate(args.backends.split(",")):
        if backend not in ops.available_backends():
            print(f"  {backend}: not available")
            continue
        steps = args.steps if backend == "cython" else max(3, args.steps // 3)
        times, layers = bench_chexcy(backend, args.size, args.batch, steps, args.warmup, args.threads,
                                     profile=args.profile and i == 0)
        if layers:
            layer_tables[backend] = (layers, steps)
        rows.append((f"chexcy {backend}", times))
    torch_times = bench_torch(args.torch_python, args.size, args.batch, args.steps, args.warmup, args.threads)
    if torch_times:
        rows.append((f"torch {torch_times['version']} NCHW", torch_times["nchw"]))
        rows.append((f"torch {torch_times['version']} channels_last", torch_times["channels_last"]))
    else:
        print("  torch: not installed here (pass --torch-python PATH to include it)")
    base = None
    print(f"{'':34s} {'ms/step':>9s} {'images/s':>9s} {'GFLOP/s':>8s} {'vs python':>9s}")
    medians = {name: statistics.median(t) for name, t in rows}
    base = medians.get("chexcy python")
    for name, _ in rows:
        m = medians[name]
        ratio = f"{base / m:8.2f}x" if base else "      n/a"
        print(f"  {name:32s} {1000 * m:9.1f} {args.batch / m:9.1f} {flops_step / m / 1e9:8.1f} {ratio}")
    cy = medians.get("chexcy cython")
    if cy and torch_times:
        best_torch = min(statistics.median(torch_times[k]) for k in ("nchw", "channels_last"))
        print(f"  cython vs torch's fastest layout: {best_torch / cy:.2f}x the images/s")
    if hasattr(os, "getloadavg"):
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for backend, (layers, steps) in layer_tables.items():
        print(f"\nper layer, {backend} backend (ms per step, mean of {steps} steps):")
        for (name, phase), seconds in sorted(layers.items(), key=lambda kv: -kv[1]):
            print(f"  {name:40s} {phase:8s} {1000 * seconds / steps:8.2f}")
    if args.rss:
        r = bench_rss(args.rss_images, args.size, args.rss_steps, args.threads, args.rss_folder)
        print(f"\npeak RSS training ref-cnn {args.size}x{args.size} batch 32 on {r['n']:,} prepared images "
              f"({args.rss_steps} steps, {r['seconds']:.0f} s): {r['peak_rss_kb'] / 1024:.0f} MB "
              f"(VmHWM); sampled peaks: anonymous {r['peak_anon_kb'] / 1024:.0f} MB, "
              f"file-backed (memory-mapped images) {r['peak_file_kb'] / 1024:.0f} MB")


if __name__ == "__main__":
    main()
