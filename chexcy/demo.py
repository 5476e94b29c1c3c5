"""`chexcy demo`: synthetic data -> prepare -> train -> evaluate, end to end, printing where everything goes.

The synthetic generator (chexcy.data.synth) draws chest-like pictures whose findings follow the CSV
labels, so a small CNN can learn them in a few minutes on a laptop. The defaults below were tuned on a
2-core machine to finish in one to three minutes with the compiled kernels and to reach a mean AUC of at least
0.85 over the 5 competition tasks on the synthetic validation set (see docs/training.md).
`--quick` is a seconds-long smoke test of the same pipeline (its AUCs mean nothing).
"""
import os
import sys
import time

from chexcy.cpus import cores_available

# Settings of the full demo and of --quick. Label policy: blanks ("not mentioned") read as negative, uncertain
# labels ignored except U-Ones for Atelectasis and Edema (the CheXpert paper's best choices for those two).
# With blanks masked, Atelectasis would have almost no negatives left (the CSV marks it 1 or -1 far more
# often than 0), so nothing could be learnt for it.
DEMO = dict(size=64, n_train=3000, n_valid=400, epochs=6,
            train=dict(arch="simple", width=16, depth=4, batch_size=32, optimizer="adamw", lr=3e-3,
                       weight_decay=1e-4, schedule="cosine", warmup=50))
QUICK = dict(size=32, n_train=96, n_valid=64, epochs=1,
             train=dict(arch="simple", width=4, depth=3, batch_size=16, optimizer="adamw", lr=3e-3))
POLICY = dict(uncertain="ignore", uncertain_ones="Atelectasis,Edema", blank="zeros")


def run_demo(out, quick=False, size=None, n_train=None, n_valid=None, epochs=None, seed=0, threads=None,
             workers=None, stream=sys.stdout):
    """Run the whole pipeline into folder `out`. Returns the evaluate result dict (see chexcy.evaluate)."""
    from chexcy import evaluate
    from chexcy.data.prepare import prepare
    from chexcy.data.synth import make_synthetic
    from chexcy.train import fit

    settings = QUICK if quick else DEMO
    size = size or settings["size"]
    n_train = n_train or settings["n_train"]
    n_valid = n_valid or settings["n_valid"]
    epochs = epochs or settings["epochs"]
    if workers is None:
        workers = min(4, cores_available())
    out = os.path.abspath(out)
    raw, prepared, run_dir = os.path.join(out, "synthetic"), os.path.join(out, "prepared"), os.path.join(out, "run")

    def say(text):
        print(text, file=stream, flush=True)

    t_start = time.perf_counter()
    base = os.path.join(raw, "CheXpert-v1.0-small")
    if os.path.exists(os.path.join(base, "valid.csv")):
        say(f"[1/4] synthetic CheXpert-v1.0-small already in {base}")
    else:
        say(f"[1/4] generating {n_train} + {n_valid} synthetic chest X-rays into {base}")
        make_synthetic(raw, n_train=n_train, n_valid=n_valid, seed=seed, workers=workers)
        say(f"      done in {time.perf_counter() - t_start:.1f} s")
    t = time.perf_counter()
    say(f"[2/4] preparing {size}x{size} arrays into {prepared}/train and {prepared}/valid")

    def quiet_log(*args, **kwargs):
        pass

    for split in ("train", "valid"):
        prepare(os.path.join(base, f"{split}.csv"), os.path.join(prepared, split), size=size, workers=workers,
                overwrite=True, quiet=True, log=quiet_log, **POLICY)
    say(f"      done in {time.perf_counter() - t:.1f} s")
    say(f"[3/4] training into {run_dir}")
    t = time.perf_counter()
    fit(os.path.join(prepared, "train"), os.path.join(prepared, "valid"), checkpoint_dir=run_dir, overwrite=True,
        epochs=epochs, seed=seed, threads=threads, log_every=0 if quick else 50, out=stream, **settings["train"])
    say(f"      training done in {time.perf_counter() - t:.1f} s")
    best = os.path.join(run_dir, "best.npz")
    say(f"[4/4] evaluating {best} on the synthetic validation set")
    result = evaluate.evaluate_checkpoint(best, os.path.join(prepared, "valid"), bootstrap=0 if quick else 200)
    say(evaluate.format_report(result))
    say("")
    say(f"demo finished in {time.perf_counter() - t_start:.0f} s. Everything is in {out}:")
    say(f"  synthetic download   {base}")
    say(f"  prepared arrays      {prepared}/train, {prepared}/valid")
    say(f"  checkpoints, log     {run_dir}/best.npz, last.npz, log.jsonl")
    for line in next_steps(out, best, prepared, base):
        say(line)
    return result


def next_steps(out, best, prepared, base, have_matplotlib=None):
    """The "next:" lines printed after the demo: commands to try on what it wrote. The --plot one says
    how to get matplotlib first when it is not installed (the demo itself does not need it)."""
    from chexcy.evaluate import MATPLOTLIB_INSTALL, MATPLOTLIB_INSTALL_FROM_CLONE
    if have_matplotlib is None:
        import importlib.util
        have_matplotlib = importlib.util.find_spec("matplotlib") is not None
    lines = ["next:"]
    if not have_matplotlib:
        lines.append(f"  {MATPLOTLIB_INSTALL}    # --plot below needs it (or {MATPLOTLIB_INSTALL_FROM_CLONE} "
                     f"in the chexcy folder)")
    lines.append(f"  chexcy evaluate --checkpoint {best} --data {prepared}/valid --bootstrap 1000 --plot {out}/plots")
    example = os.path.join(base, "valid")
    lines.append(f"  chexcy predict --checkpoint {best} {example} --heatmap {out}/heatmaps --observation Cardiomegaly")
    return lines


def run(args):
    run_demo(args.out, quick=args.quick, size=args.size, n_train=args.n_train, n_valid=args.n_valid,
             epochs=args.epochs, seed=args.seed, threads=args.threads, workers=args.workers)
    return 0
