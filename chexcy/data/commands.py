"""The data sub-commands of `chexcy`: `synth` and `prepare`. Heavy modules load only when a command runs."""
import os
import sys


def register(subparsers):
    """Add `synth` and `prepare` to the `chexcy` argument parser."""
    p = subparsers.add_parser(
        "synth", help="write a synthetic CheXpert-v1.0-small (real layout and CSV schema)",
        description="Write DIR/CheXpert-v1.0-small/{train.csv,valid.csv,train/,valid/} with chest-like "
                    "JPEGs that carry learnable evidence for the competition observations.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create CheXpert-v1.0-small/ in")
    p.add_argument("--n-train", type=int, default=2000, metavar="N", help="training images (default 2000)")
    p.add_argument("--n-valid", type=int, default=300, metavar="M", help="validation images (default 300)")
    p.add_argument("--seed", type=int, default=0, help="the output is a pure function of the seed (default 0)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="rendering processes (default: CPUs available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth)

    p = subparsers.add_parser(
        "prepare", help="CheXpert CSV + JPEGs -> training-ready arrays (resumable, bounded memory)",
        description="Read train.csv or valid.csv of CheXpert-v1.0-small (real or synthetic), select rows, "
                    "apply a label policy and write images.npy, labels.npy, meta.csv, skipped.csv and "
                    "manifest.json into --out. A killed run resumes when started again with the same "
                    "arguments. Filter values match the CSV case-insensitively.")
    p.add_argument("csv", metavar="CSV", help="train.csv or valid.csv")
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared folder")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="folder the CSV's Path column is relative to (default: the one holding CheXpert-v1.0-small/)")
    p.add_argument("--size", type=int, default=128, metavar="S", help="images become S x S (default 128)")
    p.add_argument("--sex", default=None, help="Male, Female, Unknown (comma-separated for several)")
    p.add_argument("--view", default="all", type=str.lower, choices=("frontal", "lateral", "all"),
                   help="keep frontal or lateral views only (default all)")
    p.add_argument("--projection", default=None, metavar="AP|PA|LL|RL", help="AP/PA value(s), comma-separated")
    p.add_argument("--age-min", type=float, default=None, metavar="AGE", help="keep ages >= this")
    p.add_argument("--age-max", type=float, default=None, metavar="AGE", help="keep ages <= this")
    p.add_argument("--unique-patients", action="store_true", help="keep each patient's first selected image")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="keep the first N rows after the filters")
    p.add_argument("--uncertain", default="ignore", type=str.lower, choices=("ignore", "zeros", "ones"),
                   help="-1 labels: ignore (mask), zeros or ones (default ignore)")
    p.add_argument("--uncertain-ones", default=None, metavar="LABELS", help="columns whose -1 becomes 1, e.g. Edema,Atelectasis")
    p.add_argument("--uncertain-zeros", default=None, metavar="LABELS", help="columns whose -1 becomes 0")
    p.add_argument("--uncertain-ignore", default=None, metavar="LABELS", help="columns whose -1 is masked")
    p.add_argument("--blank", default="ignore", type=str.lower, choices=("ignore", "zeros"),
                   help="blank labels: ignore (mask) or zeros (default ignore)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes (default: CPUs available)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--distributed", action="store_true",
                   help="decode over MPI ranks: `mpiexec -n K chexcy prepare ... --distributed` (needs mpi4py and mpich; "
                        "--out on a file system all ranks see; see docs/distributed.md)")
    p.set_defaults(func=run_prepare)


def _cpus():
    from chexcy.cpus import cores_available
    return cores_available()


def _bar(label, quiet):
    """progress(done, total) drawing a bar on stderr when it is a terminal, else None."""
    if quiet or not sys.stderr.isatty():
        return None

    def progress(done, total):
        if done == total or done % 50 == 0:
            frac = done / total
            sys.stderr.write(f"\r{label} [{'#' * int(30 * frac):<30s}] {done}/{total}")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return progress


def run_synth(args):
    import time
    from chexcy.data.synth import make_synthetic
    t0 = time.perf_counter()
    train_csv = make_synthetic(args.out, n_train=args.n_train, n_valid=args.n_valid, seed=args.seed,
                               workers=args.workers, progress=_bar("synth", args.quiet))
    if not args.quiet:
        print(f"synth: {args.n_train} train + {args.n_valid} valid images in {time.perf_counter() - t0:.1f} s; "
              f"CSVs: {train_csv} and {os.path.join(os.path.dirname(train_csv), 'valid.csv')}")
    return 0


def run_prepare(args):
    import contextlib
    from chexcy.data.prepare import prepare
    comm, guard, workers = None, contextlib.nullcontext(), args.workers if args.workers else min(_cpus(), 8)
    if args.distributed:      # MPI hook: ranks share the chunks; a failing rank aborts the whole job
        from chexcy import distributed
        comm = distributed.init(True)
        guard = distributed.abort_on_error(comm, "chexcy prepare")
        workers = args.workers or distributed.threads_per_rank(comm)
    with guard:
        prepare(args.csv, args.out, root=args.root, size=args.size, sex=args.sex, view=args.view,
                projection=args.projection, age_min=args.age_min, age_max=args.age_max,
                unique_patients=args.unique_patients, limit=args.limit, uncertain=args.uncertain,
                uncertain_ones=args.uncertain_ones, uncertain_zeros=args.uncertain_zeros,
                uncertain_ignore=args.uncertain_ignore, blank=args.blank,
                workers=workers, overwrite=args.overwrite,
                strict=args.strict, quiet=args.quiet, comm=comm)
    return 0
