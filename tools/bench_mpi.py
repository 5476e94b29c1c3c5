"""Data-parallel training on MPI versus threads, on one machine: images/s and the cost of the Allreduce.

    python tools/bench_mpi.py [--arch simple] [--size 128] [--batch 32] [--steps 12] [--repeats 3]

Runs, side by side in one invocation (medians over --repeats runs of --steps timed steps each):
  A. 1 process x T threads (T = --threads, default 2), global batch B;
  B. K ranks x 1 thread under `mpiexec -n K` (K = --ranks, default 2), global batch B (B/K rows per rank),
     gradients averaged by chexcy.distributed (one Allreduce per step on one flat float32 buffer).
It prints images/s for both, the time per step spent in the gradient Allreduce (as measured inside the
training step, which includes waiting for the slower rank) and, separately, the pure cost of that
Allreduce (back-to-back calls after a barrier), with its size in bytes, then the projection to 8 and 32
ranks of docs/distributed.md. `--fit` repeats the comparison through `chexcy.train.fit` itself (the code
`chexcy train [--distributed]` runs: loader, logging, checkpoints) on a synthetic prepared set. `--json` adds one JSON line per
configuration. The workers are this file started with `--worker`; mpiexec is found next to this python
or on PATH. Each worker prints one JSON line on rank 0.

The model is the one `chexcy train --arch` builds (defaults: ref-cnn of DESIGN.md section 7 for
"simple"), SGD momentum 0.9, masked BCE on random data with ~40% missing labels.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def find_mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def worker(args):
    import numpy as np
    from chexcy import distributed, nn, ops, optim

    comm = distributed.init(args.distributed)
    ops.set_num_threads(args.threads)
    model = nn.build_model(args.arch)
    model.train()
    dp = distributed.DataParallel(model, comm)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 1, args.size, args.size)).astype(np.float32)
    y = (rng.random((args.batch, 14)) < 0.3).astype(np.float32)
    y[rng.random((args.batch, 14)) < 0.4] = np.nan
    rows = distributed.shard(np.arange(args.batch), comm)
    xs, ys = np.ascontiguousarray(x[rows]), y[rows]
    weight = distributed.present_labels(ys)

    def step():
        dp.begin_step(weight, n_global=args.batch)
        loss, dlogits = nn.bce_with_logits(model.forward(xs), ys)
        model.backward(dlogits)
        t0 = time.perf_counter()
        dp.end_step(loss, weight, rows=len(rows))
        t_ar = time.perf_counter() - t0
        opt.step()
        return t_ar

    for _ in range(args.warmup):
        step()
    comm.barrier()
    t0 = time.perf_counter()
    t_allreduce = sum(step() for _ in range(args.steps))
    elapsed = time.perf_counter() - t0
    # The Allreduce alone: ranks aligned by a barrier, then back-to-back calls on the same buffer.
    comm.barrier()
    t1 = time.perf_counter()
    n_pure = 50
    for _ in range(n_pure):
        comm.allreduce_sum_(dp.reducer.buffer)
    pure = (time.perf_counter() - t1) / n_pure
    if comm.is_root:
        print(json.dumps({
            "arch": args.arch, "ranks": comm.size, "threads_per_rank": args.threads,
            "backend": ops.get_backend(), "global_batch": args.batch, "size": args.size,
            "images_per_s": args.batch * args.steps / elapsed, "step_ms": 1e3 * elapsed / args.steps,
            "allreduce_ms_in_step": 1e3 * t_allreduce / args.steps, "allreduce_ms_pure": 1e3 * pure,
            "allreduce_bytes": dp.reducer.nbytes, "parameters": model.num_parameters(),
            "batchnorm_layers": sum(type(m).__name__.endswith("BatchNorm2d") for m in model.modules()),
            "batchnorm_channels": sum(m.num_features for m in model.modules()
                                      if type(m).__name__.endswith("BatchNorm2d"))}), flush=True)


def fit_worker(args):
    """One `chexcy train` run (chexcy.train.fit, 1 epoch) on the prepared folder args.fit_worker; rank 0 prints
    images/s from the step records of its log (time inside steps, loader waits excluded) and the epoch."""
    import tempfile
    from chexcy import distributed, ops
    from chexcy.train import fit, read_log

    comm = distributed.init(True) if args.distributed else None
    ckpt = tempfile.mkdtemp(prefix="bench-mpi-") if comm is None or comm.is_root else None
    if comm is not None:
        ckpt = comm.bcast_object(ckpt)
    t0 = time.perf_counter()
    fit(args.fit_worker, checkpoint_dir=ckpt, threads=args.threads, out=None, log_every=0, comm=comm,
        arch=args.arch, epochs=1, batch_size=args.batch, seed=0)
    wall = time.perf_counter() - t0
    if comm is None or comm.is_root:
        steps = [r for r in read_log(os.path.join(ckpt, "log.jsonl")) if r["event"] == "step"][args.warmup:]
        images, seconds = sum(r["images"] for r in steps), sum(r["seconds"] for r in steps)
        shutil.rmtree(ckpt, ignore_errors=True)
        print(json.dumps({"arch": args.arch, "ranks": 1 if comm is None else comm.size,
                          "threads_per_rank": args.threads, "backend": ops.get_backend(),
                          "images_per_s": images / seconds, "step_ms": 1e3 * seconds / len(steps),
                          "fit_wall_s": wall, "steps": len(steps)}), flush=True)


def run_fit_comparison(args):
    """Both configurations through chexcy.train.fit on a synthetic prepared set (made once, --fit-images)."""
    import tempfile
    from chexcy.data.prepare import prepare
    from chexcy.data.synth import make_synthetic
    tmp = tempfile.mkdtemp(prefix="bench-mpi-data-")
    try:
        csv = make_synthetic(tmp, n_train=args.fit_images, n_valid=8, seed=0)
        prepare(csv, os.path.join(tmp, "train"), size=args.size, workers=2, quiet=True)
        runs = {c: [] for c in ((1, args.threads), (args.ranks, 1))}
        for _ in range(args.repeats):
            for c in runs:
                runs[c].append(run_config(args, *c, fit_data=os.path.join(tmp, "train")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"through chexcy train (fit): {args.fit_images} synthetic images at {args.size}x{args.size}, batch "
          f"{args.batch}, 1 epoch, first {args.warmup} steps skipped, medians of {args.repeats}")
    for (ranks, threads), recs in runs.items():
        label = f"{ranks} process x {threads} thr" if ranks == 1 else f"{ranks} ranks x {threads} thr (MPI)"
        print(f"{label:<26}{statistics.median(r['images_per_s'] for r in recs):>10.1f} images/s"
              f"{statistics.median(r['step_ms'] for r in recs):>10.1f} ms/step"
              f"{statistics.median(r['fit_wall_s'] for r in recs):>9.1f} s whole fit")


def run_config(args, ranks, threads, fit_data=None):
    """One worker run (1 process, or `ranks` under mpiexec); returns its JSON record."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--arch", args.arch, "--size", str(args.size),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(threads)]
    if fit_data is not None:
        cmd += ["--fit-worker", fit_data]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    if ranks > 1:
        mpiexec = find_mpiexec()
        if mpiexec is None:
            sys.exit('bench_mpi: no mpiexec found (pip install mpi4py mpich)')
        cmd = [mpiexec, "-n", str(ranks)] + cmd + ["--distributed"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        sys.exit(f"bench_mpi: {' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="simple")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="global batch (all ranks together)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the single process")
    p.add_argument("--json", action="store_true")
    p.add_argument("--fit", action="store_true",
                   help="also compare both configurations end to end through chexcy.train.fit (loader included)")
    p.add_argument("--fit-images", type=int, default=480, help="synthetic training images for --fit")
    p.add_argument("--fit-worker", metavar="DATA", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return fit_worker(args) if args.fit_worker else worker(args)

    configs = [(1, args.threads), (args.ranks, 1)]
    runs = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:          # interleaved, so a noisy neighbour hurts both alike
            runs[c].append(run_config(args, *c))
    first = runs[configs[0]][0]
    print(f"bench_mpi: {args.arch} ({first['parameters']:,} parameters) at {args.size}x{args.size}, global batch "
          f"{args.batch}, backend {first['backend']}, {args.steps} steps x {args.repeats} repeats, medians")
    print(f"{'configuration':<26}{'images/s':>10}{'step ms':>10}{'allreduce ms':>14}{'(pure) ms':>11}"
          f"{'bytes/step':>12}")
    medians = {}
    for (ranks, threads), recs in runs.items():
        med = {k: statistics.median(r[k] for r in recs)
               for k in ("images_per_s", "step_ms", "allreduce_ms_in_step", "allreduce_ms_pure")}
        medians[(ranks, threads)] = med
        label = f"{ranks} process x {threads} thr" if ranks == 1 else f"{ranks} ranks x {threads} thr (MPI)"
        ar = "-" if ranks == 1 else f"{med['allreduce_ms_in_step']:.3f}"
        pure = "-" if ranks == 1 else f"{med['allreduce_ms_pure']:.3f}"
        nbytes = "-" if ranks == 1 else f"{recs[0]['allreduce_bytes']:,}"
        print(f"{label:<26}{med['images_per_s']:>10.1f}{med['step_ms']:>10.1f}{ar:>14}{pure:>11}{nbytes:>12}")
        if args.json:
            for r in recs:
                print(json.dumps(r))
    a, b = medians[configs[0]], medians[configs[1]]
    print(f"ratio MPI / threads: {b['images_per_s'] / a['images_per_s']:.2f}x images/s; Allreduce share of the "
          f"MPI step: {100 * b['allreduce_ms_in_step'] / b['step_ms']:.1f}% "
          f"(pure communication {100 * b['allreduce_ms_pure'] / b['step_ms']:.2f}%)")
    rec = runs[configs[1]][0]
    per_image_s = (b["step_ms"] - b["allreduce_ms_in_step"]) / 1e3 / (args.batch / args.ranks)
    project(rec["allreduce_bytes"], rec["batchnorm_layers"], per_image_s, args)
    if args.fit:
        run_fit_comparison(args)


def ring_allreduce_s(nbytes, ranks, bandwidth, latency):
    """Ring allreduce: 2(K-1) steps, each sending nbytes/K per rank -> 2(K-1)/K * nbytes on the wire per rank."""
    return 2 * (ranks - 1) * (latency + nbytes / ranks / bandwidth)


def small_allreduce_s(ranks, latency):
    """A few-kB allreduce (recursive doubling): ceil(log2 K) latency-bound exchanges."""
    return math.ceil(math.log2(ranks)) * latency if ranks > 1 else 0.0


def project(nbytes, bn_layers, per_image_s, args, bandwidth=1.25e9, latency=25e-6):
    """Predicted step time and efficiency at 8 and 32 ranks on a 10 Gb/s network (see docs/distributed.md).

    compute(b) = b * per_image_s (measured: one rank, one thread, this machine's core);
    comm(K) = ring allreduce of the gradient buffer + 2 small collectives per BatchNorm layer (synchronised
    BatchNorm2d: an allgather of per-plane statistics forward, an allreduce of 2C sums backward).
    Weak scaling: 32 images per rank (global batch 32 K). Strong scaling: global batch 256 (256 / K per rank).
    """
    print(f"projection (10 Gb/s = {bandwidth / 1e9:.2f} GB/s, {latency * 1e6:.0f} us per message, "
          f"{per_image_s * 1e3:.1f} ms compute per image per rank measured here, {nbytes:,} B gradient buffer, "
          f"{bn_layers} BatchNorm layers x 2 small collectives):")
    print(f"{'ranks':>6}{'wire MB/rank':>14}{'allreduce ms':>14}{'BN sync ms':>12}"
          f"{'weak: step ms':>15}{'eff':>7}{'img/s':>9}{'strong: step ms':>17}{'eff':>7}{'img/s':>9}")
    for k in (2, 8, 32):
        wire = 2 * (k - 1) / k * nbytes / 1e6
        ar = ring_allreduce_s(nbytes, k, bandwidth, latency)
        bn = 2 * bn_layers * small_allreduce_s(k, latency)
        cols = []
        for per_rank in (32, 256 / k):
            compute = per_rank * per_image_s
            step = compute + ar + bn
            cols.append((1e3 * step, compute / step, k * per_rank / step))
        (ws, we, wi), (ss, se, si) = cols
        print(f"{k:>6}{wire:>14.3f}{ar * 1e3:>14.3f}{bn * 1e3:>12.3f}{ws:>15.1f}{we:>7.1%}{wi:>9.0f}"
              f"{ss:>17.1f}{se:>7.1%}{si:>9.0f}")


if __name__ == "__main__":
    main()
