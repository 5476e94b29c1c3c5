"""Benchmark of the data pipeline: synth speed, prepare throughput and memory, loader throughput.

    python tools/bench_data.py [--n 2000] [--big 20000] [--repeats 3] [--work /tmp/chexcy-bench-data]

Measures, on this machine, medians over --repeats runs:
- `synth`: synthetic images written per second (2 worker processes);
- `prepare --size 128`: images per second with 1 and 2 workers (JPEGs already in the page cache, as on
  any second pass over a download; the first read from a cold disk is bounded by the disk instead);
- peak memory of `prepare` (all processes: the parent and its workers) for --n and --big images: the big
  CSV repeats the rows of the small one, so the work per image is identical and only N changes. Two
  figures: the sampled peak of the summed VmRSS of the process tree (every 5 ms) and the parent's
  VmHWM + the largest worker's maximum RSS (getrusage RUSAGE_CHILDREN);
- the loader: augmented 128x128 float32 batches per second (batch 64, 1 and 2 threads), no model.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def _tree(pid):
    """pid and all its descendants (Linux /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _cpu_seconds():
    """user + system CPU seconds of this process and of its waited-for children so far."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure_prepare_memory(csv, out, workers):
    """Run prepare in a child process; returns (seconds, sampled peak summed RSS MB, parent+worker HWM MB)."""
    script = (
        "import resource, sys\n"
        "from chexcy.data.prepare import prepare\n"
        f"prepare({csv!r}, {out!r}, size=128, workers={workers}, quiet=True, overwrite=True)\n"
        "self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(self_kb, child_kb)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                                      + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], sum(_status_kb(p, "VmRSS") for p in _tree(child.pid)))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        raise RuntimeError(f"prepare child failed with status {child.returncode}")
    self_kb, child_kb = (int(v) for v in stdout.split())
    return seconds, peak[0] / 1024, (self_kb + child_kb) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--big", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/chexcy-bench-data")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)

    import numpy as np
    import pandas as pd
    from chexcy.data import BatchLoader, PreparedDataset
    from chexcy.data.prepare import prepare
    from chexcy.data.synth import make_synthetic

    os.makedirs(args.work, exist_ok=True)
    rows = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    # -- synth -------------------------------------------------------------------------------------------
    synth_times = []
    for r in range(args.repeats):
        dl = os.path.join(args.work, f"synth{r}")
        shutil.rmtree(dl, ignore_errors=True)
        t0 = time.perf_counter()
        make_synthetic(dl, n_train=args.n, n_valid=1, seed=r, workers=2)
        synth_times.append(time.perf_counter() - t0)
        if r:
            shutil.rmtree(dl)
    t = statistics.median(synth_times)
    rows.append((f"synth {args.n} images (2 processes)", f"{(args.n + 1) / t:,.0f} img/s", f"{t:.1f} s"))
    csv = os.path.join(args.work, "synth0", "CheXpert-v1.0-small", "train.csv")

    # -- prepare throughput --------------------------------------------------------------------------------
    prepared = os.path.join(args.work, "prepared")
    for workers in (1, 2):
        times, decode_rates, cpu = [], [], []
        prepare(csv, prepared, size=128, workers=workers, quiet=True, overwrite=True)   # warm the page cache
        for _ in range(args.repeats):
            lines = []
            r0 = _cpu_seconds()
            t0 = time.perf_counter()
            prepare(csv, prepared, size=128, workers=workers, overwrite=True, log=lines.append)
            times.append(time.perf_counter() - t0)
            cpu.append(_cpu_seconds() - r0)       # parent + (joined) worker processes
            # prepare's own line: "prepare: decoded N images in X s (R img/s, W worker(s))"
            decoded = [ln for ln in lines if ln.startswith("prepare: decoded")][0]
            decode_rates.append(float(decoded.split("(")[1].split(" img/s")[0]))
        t = statistics.median(times)
        per_image = statistics.median(cpu) / args.n
        rows.append((f"prepare --size 128, {workers} worker(s), {args.n} images", f"{args.n / t:,.0f} img/s",
                     f"whole command {t:.2f} s; decoding phase alone {statistics.median(decode_rates):,.0f} img/s; "
                     f"CPU {per_image * 1e3:.2f} ms/img (all processes) = {workers / per_image:,.0f} img/s "
                     f"if {workers} core(s) were free"))

    # -- prepare memory, N vs 10 N -------------------------------------------------------------------------
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    big_csv = os.path.join(args.work, "synth0", "CheXpert-v1.0-small", "big.csv")
    reps = -(-args.big // len(df))
    pd.concat([df] * reps).head(args.big).to_csv(big_csv, index=False)
    memory = {}
    for label, source, n in (("small", csv, args.n), ("big", big_csv, args.big)):
        results = [measure_prepare_memory(source, os.path.join(args.work, f"mem-{label}"), 2)
                   for _ in range(args.repeats)]
        secs = statistics.median(r[0] for r in results)
        peak = statistics.median(r[1] for r in results)
        hwm = statistics.median(r[2] for r in results)
        memory[label] = (peak, hwm)
        rows.append((f"prepare peak memory, {n} images, 2 workers", f"{peak:,.0f} MB summed RSS",
                     f"parent+worker HWM {hwm:,.0f} MB; {n / secs:,.0f} img/s incl. start-up"))
        shutil.rmtree(os.path.join(args.work, f"mem-{label}"), ignore_errors=True)
    rows.append((f"memory growth {args.n} -> {args.big} images",
                 f"{memory['big'][0] - memory['small'][0]:+,.0f} MB summed RSS",
                 f"{memory['big'][1] - memory['small'][1]:+,.0f} MB HWM (target: within 50 MB)"))

    # -- loader --------------------------------------------------------------------------------------------
    ds = PreparedDataset(prepared)
    for workers in (1, 2):
        rates = []
        for epoch in range(args.repeats):
            loader = BatchLoader(ds, 64, seed=0, augment=True, workers=workers, prefetch=4)
            t0 = time.perf_counter()
            n = 0
            for batch in loader.batches(epoch):
                n += len(batch.index)
            rates.append(n / (time.perf_counter() - t0))
        rows.append((f"loader, augmented 128x128, batch 64, {workers} thread(s)",
                     f"{statistics.median(rates):,.0f} img/s", "no model: the feed rate alone"))
    plain = BatchLoader(ds, 64, seed=0, augment=False, workers=1)
    t0 = time.perf_counter()
    n = sum(len(b.index) for b in plain.batches(0))
    rows.append(("loader, no augmentation, batch 64, 1 thread", f"{n / (time.perf_counter() - t0):,.0f} img/s", ""))

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"chexcy data benchmark: {cpus} CPUs, numpy {np.__version__}, medians of {args.repeats} runs, "
          f"load average {load_before:.1f} before / {load:.1f} after (other jobs share the CPUs when > 0)")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>22}  {note}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
