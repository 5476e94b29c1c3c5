"""Sub-commands `train`, `evaluate`, `predict`, `export` and `demo` of the `chexcy` command.

Each handler imports its heavy modules only when it runs and returns an exit status. Bad input raises
ValueError/RuntimeError, which chexcy.cli turns into one clear line.
"""
import argparse
import sys

from chexcy.cpus import cores_available


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _nonneg_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _threads(text):
    """--threads: an int >= 1; more than the cores this process may use is allowed (a shared or a
    cgroup-limited machine may report fewer than will be free) but warned about, since extra OpenMP
    threads only take turns on the same cores and slow every kernel down."""
    value = _positive_int(text)
    cores = cores_available()
    if value > cores:
        print(f"chexcy: warning: --threads {value} is more than the {cores} core(s) this process may use; "
              f"the extra threads only slow the kernels down (use --threads {cores} or leave it out)",
              file=sys.stderr)
    return value


THREADS_HELP = "kernel threads (default: every core this process may use, {} here)"


def _pos_weight(text):
    if text == "auto":
        return text
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        from chexcy.data.schema import NUM_CLASSES
        raise argparse.ArgumentTypeError(f"expected 'auto', a number or {NUM_CLASSES} comma-separated numbers, "
                                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def register(subparsers):
    from chexcy.nn.models import ARCHITECTURES, BACKBONES   # numpy only: chexcy.nn loads no kernels on import
    from chexcy.data.schema import NUM_CLASSES
    from chexcy.optim import OPTIMIZERS, SCHEDULES
    # -- train -------------------------------------------------------------------------------------------
    p = subparsers.add_parser(
        "train", help="train a CNN on a prepared folder",
        description="Train a model on data written by `chexcy prepare`. The image size and the label policy "
                    "come from the prepared data. Every run setting defaults to the built-in value (shown "
                    "below); with --resume they default to the checkpoint's and may not change, except "
                    "--epochs.")
    p.add_argument("--data", required=True, help="prepared training folder")
    p.add_argument("--valid", help="prepared validation folder (loss and AUC after each epoch)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=list(ARCHITECTURES),
                   help="architecture (default simple); resnet18/34/50 and densenet121 are torchvision's "
                        "networks and ignore --width, --depth and --blocks")
    g.add_argument("--width", type=_positive_int, help="channels of the first stage, doubled per stage (default 16)")
    g.add_argument("--depth", type=_positive_int, help="number of stages (default 4; 16 x 4 = ref-cnn)")
    g.add_argument("--blocks", type=_positive_int, help="residual blocks per stage (resnet; default 1)")
    g.add_argument("--backbone", choices=BACKBONES, help="multiview trunk (default simple)")
    g.add_argument("--separate-trunks", dest="shared", action="store_const", const=False,
                   help="multiview: one trunk per view instead of a shared one")
    g.add_argument("--hidden", type=_positive_int, help="multiview fusion width (default 64)")
    g.add_argument("--dropout", type=float, help="dropout before the classifier (default 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, help="epochs (default 10)")
    g.add_argument("--batch-size", type=_positive_int, help="images per step (default 32)")
    g.add_argument("--lr", type=float, help="learning rate (default 0.01 for sgd, 0.001 for adamw)")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), help="default sgd")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--nesterov", action="store_const", const=True, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, help="L2 (sgd) / decoupled (adamw) weight decay (default 0)")
    g.add_argument("--schedule", choices=list(SCHEDULES), help="learning-rate schedule (default constant)")
    g.add_argument("--warmup", type=_nonneg_int, help="linear warm-up steps (default 0)")
    g.add_argument("--step-size", type=_positive_int, help="steps between decays for --schedule step")
    g.add_argument("--gamma", type=float, help="decay factor for --schedule step (default 0.1)")
    g.add_argument("--pos-weight", type=_pos_weight,
                   help="weight of positive labels in the loss: 'auto' (n_neg/n_pos per label, clipped to "
                        f"[1, 10]), a number, or {NUM_CLASSES} comma-separated numbers")
    g.add_argument("--augment", action="store_const", const=True, help="random augmentation of training images")
    g.add_argument("--seed", type=int, help="seed of weights, data order, augmentation and dropout (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint-dir", metavar="DIR",
                   help="folder for last.npz, best.npz and log.jsonl, one run per folder (default: a new "
                        "folder runs/YYYYmmdd-HHMMSS in the current folder)")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in DIR from CHECKPOINT (default: DIR/last.npz); the data, the "
                        "validation data and the settings must be the run's")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a DIR that holds one, deleting its last.npz, best.npz and log.jsonl")
    g.add_argument("--checkpoint-every", type=_nonneg_int, default=0, metavar="K",
                   help="also save last.npz every K steps (default: at the end of each epoch only)")
    g.add_argument("--log-every", type=_nonneg_int, default=20, metavar="N",
                   help="a progress line every N steps (default 20; 0: none)")
    g.add_argument("--threads", type=_threads, metavar="N", help=THREADS_HELP.format(cores_available()))
    g.add_argument("--workers", type=_positive_int, default=1, help="data loader workers (default 1)")
    g.add_argument("--init-from", metavar="FILE",
                   help="start from the weights in FILE (.safetensors, e.g. from torchvision, or a chexcy .npz "
                        "checkpoint); a 3-channel first conv and a classifier of another size are adapted, and "
                        "each adaptation is printed")
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI ranks: run as `mpiexec -n K chexcy train ... --distributed` "
                        "(needs mpi4py and mpich; see docs/distributed.md)")
    p.set_defaults(func=run_train)

    # -- evaluate ----------------------------------------------------------------------------------------
    p = subparsers.add_parser("evaluate", help="AUC per observation of a checkpoint on prepared data",
                              description="ROC AUC per observation (image level and study level = max over "
                                          "a study's views), the mean over the 5 competition tasks, optional "
                                          "bootstrap 95% intervals and plots.")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint file (e.g. RUN/best.npz)")
    p.add_argument("--data", required=True, metavar="DIR", help="prepared folder to score")
    p.add_argument("--bootstrap", type=_nonneg_int, default=0, metavar="N",
                   help="bootstrap resamples for 95%% CIs (default 0: no intervals; 1000 is usual)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--plot", metavar="DIR", help="write roc.png and training.png into DIR, an existing folder "
                                                 "or one to create in an existing parent (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON to FILE (its folder must exist)")
    p.add_argument("--min-count", type=_positive_int, default=None, metavar="N",
                   help="positives and negatives a label needs for an AUC (default 5)")
    p.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                   help="images scored at once (default 64; memory grows with it, results do not change)")
    p.add_argument("--threads", type=_threads, metavar="N", help=THREADS_HELP.format(cores_available()))
    p.set_defaults(func=run_evaluate)

    # -- predict -----------------------------------------------------------------------------------------
    p = subparsers.add_parser("predict", help="label chest X-ray images with a checkpoint",
                              description=f"{NUM_CLASSES} probabilities per image (JPEG, PNG or DICOM files, or "
                                          "folders of them; DICOM needs pydicom), preprocessed exactly as `chexcy "
                                          "prepare` does; optional Grad-CAM heat maps.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files (any extension Pillow reads, or DICOM) or folders, searched recursively "
                        "for .jpg/.jpeg/.png/.dcm/.dicom")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="a checkpoint written by `chexcy train` (e.g. RUN/best.npz)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help=f"output on stdout: an aligned table with short column names, CSV (path + the {NUM_CLASSES} "
                        "observations) or JSON (default table)")
    p.add_argument("--heatmap", metavar="DIR", help="write a Grad-CAM heat map PNG per image into DIR (with "
                                                    "--observation), named after its patient, study and view")
    p.add_argument("--observation", help="the observation the heat maps explain (e.g. 'Pleural Effusion')")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                   help="images scored at once (default 32; memory grows with it, results do not change)")
    p.add_argument("--threads", type=_threads, metavar="N", help=THREADS_HELP.format(cores_available()))
    p.set_defaults(func=run_predict)

    # -- export ------------------------------------------------------------------------------------------
    p = subparsers.add_parser("export", help="write a checkpoint's model as ONNX or its weights as safetensors",
                              description="Use a chexcy model elsewhere: --onnx writes an ONNX graph of standard "
                                          "operators (opset 17, dynamic batch axis; needs the onnx package) checked "
                                          "by onnx.checker; --safetensors writes the state dict.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file (e.g. RUN/best.npz)")
    p.add_argument("--onnx", metavar="FILE", help="write the model as ONNX to FILE")
    p.add_argument("--probabilities", action="store_true",
                   help="ONNX output: sigmoid probabilities instead of logits")
    p.add_argument("--safetensors", metavar="FILE", help="write the weights (state dict) to FILE")
    p.set_defaults(func=run_export)

    # -- demo --------------------------------------------------------------------------------------------
    p = subparsers.add_parser("demo", help="synthetic data -> prepare -> train -> evaluate, end to end",
                              description="Generate a synthetic CheXpert-like dataset, prepare it, train a "
                                          "model and evaluate it, printing where everything went.")
    p.add_argument("--out", default="chexcy-demo", metavar="DIR",
                   help="folder for everything the demo writes (default ./chexcy-demo)")
    p.add_argument("--quick", action="store_true", help="a tiny, fast run (smoke test; AUCs are meaningless)")
    from chexcy.demo import DEMO, QUICK          # (a light module: its heavy imports are inside run_demo)

    def both(key):
        return f"default {DEMO[key]}; --quick {QUICK[key]}"
    p.add_argument("--size", type=_positive_int, metavar="S", help=f"image size S x S ({both('size')})")
    p.add_argument("--n-train", type=_positive_int, metavar="N", help=f"synthetic training images ({both('n_train')})")
    p.add_argument("--n-valid", type=_positive_int, metavar="N",
                   help=f"synthetic validation images ({both('n_valid')})")
    p.add_argument("--epochs", type=_positive_int, metavar="N", help=f"training epochs ({both('epochs')})")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of training (default 0)")
    p.add_argument("--threads", type=_threads, metavar="N", help=THREADS_HELP.format(cores_available()))
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="processes for image generation and preparation (default: the cores, at most 4)")
    p.set_defaults(func=run_demo)


def run_train(args):
    import signal
    import sys

    import dataclasses

    from chexcy.train import TrainConfig, fit
    # Every TrainConfig field is an option of the same name (the parser's dest); unset ones keep the default.
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if getattr(args, f.name) is not None}
    if args.resume and not args.checkpoint_dir and args.resume is True:
        raise ValueError("--resume without a path needs --checkpoint-dir")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite deletes it: pass one of them")
    comm = None
    if args.distributed:        # MPI hook: one failing rank aborts the job instead of leaving the others hung
        from chexcy import distributed
        comm = distributed.init(True)
    if not args.checkpoint_dir and not args.resume:
        # Never train a model only to drop it: without a folder the run goes to a new one, said up front.
        from chexcy.runfolder import default_run_folder
        args.checkpoint_dir = default_run_folder() if comm is None else comm.bcast_object(
            default_run_folder() if comm.is_root else None)
        if comm is None or comm.is_root:
            print(f"no --checkpoint-dir given: this run goes to {args.checkpoint_dir}", flush=True)
    run = dict(checkpoint_dir=args.checkpoint_dir, resume=args.resume, overwrite=args.overwrite,
               log_every=args.log_every, checkpoint_every=args.checkpoint_every, workers=args.workers,
               init_from=args.init_from, out=sys.stdout, **settings)
    if comm is not None:
        threads = args.threads or distributed.threads_per_rank(comm)
        with distributed.abort_on_error(comm, "chexcy train"):
            result = fit(args.data, args.valid, threads=threads, comm=comm, **run)
    else:
        result = fit(args.data, args.valid, threads=args.threads, **run)
    if result.status == "interrupted":
        # Conventional shell status for "ended by signal N": 128 + N (130 for SIGINT, 143 for SIGTERM).
        return 128 + int(getattr(result, "signal", signal.SIGINT))
    return 0


def run_evaluate(args):
    from chexcy import evaluate, metrics
    if args.min_count is None:
        args.min_count = metrics.MIN_CLASS_COUNT
    return evaluate.run(args)


def run_predict(args):
    from chexcy import predict
    return predict.run(args)


def run_export(args):
    import sys

    from chexcy.checkpoint import load_checkpoint
    if not (args.onnx or args.safetensors):
        raise ValueError("nothing to do: give --onnx FILE and/or --safetensors FILE")
    if args.probabilities and not args.onnx:
        raise ValueError("--probabilities only applies with --onnx FILE")
    ckpt = load_checkpoint(args.checkpoint)
    if args.onnx:
        from chexcy.onnx_export import OPSET, export_onnx
        export_onnx(ckpt, args.onnx, probabilities=args.probabilities)
        print(f"wrote {args.onnx} (ONNX opset {OPSET}, output "
              f"{'probabilities' if args.probabilities else 'logits'})", file=sys.stderr)
    if args.safetensors:
        from chexcy.weights import save_safetensors
        state = save_safetensors(ckpt, args.safetensors)
        print(f"wrote {args.safetensors} ({len(state)} arrays)", file=sys.stderr)
    return 0


def run_demo(args):
    from chexcy import demo
    return demo.run(args)
