"""The training loop: `fit(...)` for notebooks and `chexcy train` alike.

Data flows one way: prepared arrays -> loader -> model (chexcy.ops) -> masked BCE -> optimiser ->
checkpoint / metrics. `fit` = start_or_resume, then per epoch train_epoch and end_epoch (validate, pick
the best, checkpoint, report). One path for one process and K MPI ranks: the model is driven through a
replica (chexcy.parallel.DataParallel) over a communicator (chexcy.comm; LocalComm for one process, whose
collectives return their input). One step:

    model.set_random_state(rng(seed, epoch, step))      dropout masks reproducible across resume
    replica.begin_batch(batch, step)                    this rank's loss weight, the global batch's rows
    logits = model.forward_batch(batch)                 (B, 14) float32
    loss, dlogits = bce_with_logits(logits, labels, mask, pos_weight)
    model.backward(dlogits)                             sets every p.grad
    totals = replica.end_batch(loss, stop)              gradients, loss and stop request of all ranks
    optimizer.lr = lr_at(global_step)                   lr a pure function of the step
    optimizer.step()

Exact resume: the loader's order and augmentation depend only on (seed, epoch, row), dropout on
(seed, epoch, step), the learning rate on the global step, and a checkpoint stores parameters, buffers,
optimiser moments and the position (epoch, step in epoch, global step). Continuing from it therefore
replays the same floating-point operations as an uninterrupted run (same backend and thread count; the
compiled kernels are bitwise identical for any thread count anyway).

Files in the checkpoint folder: last.npz (latest state), best.npz (best validation mean AUC over the 5
competition tasks, or lowest validation loss when that is undefined, or lowest training loss without
validation data), log.jsonl (one JSON object per line: start, step, epoch, resume, interrupted,
diverged, end events), and while a run holds the folder train.lock + train.lock.json (chexcy.runfolder:
one run per folder, one process at a time).

A run is one thing from start to end: its checkpoints record the identity of the prepared data it trains
and validates on (DATA_IDENTITY_FIELDS of the manifest) and its settings; --resume refuses other data,
another validation set or other settings, and ranks of one MPI job must agree on all of them.
A checkpoint is written only when every parameter, buffer and optimiser moment is finite and no weight
has blown up (PARAM_LIMIT), so the last.npz a diverged run leaves is a state worth resuming.
"""
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time

import numpy as np

from chexcy import metrics, ops
from chexcy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from chexcy.comm import LocalComm
from chexcy.data.dataset import open_dataset
from chexcy.data.loader import make_loader
from chexcy.data.prepare import policy_text
from chexcy.data.schema import COMPETITION_TASKS, LABELS, NUM_CLASSES
from chexcy.parallel import DataParallel, StopRequest, check_ranks_agree, raise_on_every_rank
from chexcy.fileio import DamagedFileError, DiskFullError
from chexcy.memory import reuse_freed_memory
from chexcy.nn import ARCHITECTURES, bce_with_logits, build_model
from chexcy.nn.models import TORCHVISION_ARCHITECTURES
from chexcy.optim import OPTIMIZERS, SCHEDULES, build_optimizer, make_schedule
from chexcy.runlog import JsonLog, read_log  # noqa: F401  (read_log: chexcy.train.read_log for callers)
from chexcy.scoring import predict_dataset


class TrainingDiverged(RuntimeError):
    """The loss (or its gradient) became NaN, infinite or absurdly large, or the weights blew up."""


# Divergence limits. A mean BCE above LOSS_LIMIT means logits in the thousands: no model that learns gets
# there, but one whose weights are exploding passes it steps before the loss turns inf/NaN. A parameter
# above PARAM_LIMIT in magnitude is the same story told by the weights (healthy CNN weights are O(1);
# a checkpoint with weights near 1e28 diverges again at once when resumed).
LOSS_LIMIT = 1e4
PARAM_LIMIT = 1e6

# The manifest fields (chexcy prepare) that decide what a prepared folder's arrays hold: the source CSV's
# content, the row filters, the label policy, the image size and the number of images. Two folders equal on
# these hold the same training data, wherever they are; a run must keep training on the same data.
DATA_IDENTITY_FIELDS = ("source_sha256", "filters", "policy", "size", "count")


# Short names for the progress lines (STYLE.md shows "Atel 0.81  Card 0.84 ...").
SHORT_NAMES = {
    "No Finding": "NoFi", "Enlarged Cardiomediastinum": "EnCM", "Cardiomegaly": "Card", "Lung Opacity": "LOpa",
    "Lung Lesion": "LLes", "Edema": "Edem", "Consolidation": "Cons", "Pneumonia": "Pnia", "Atelectasis": "Atel",
    "Pneumothorax": "Ptx", "Pleural Effusion": "PlEf", "Pleural Other": "PlOt", "Fracture": "Frac",
    "Support Devices": "SuDe",
}


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run's arithmetic. Stored in every checkpoint; a resume must not change it
    (only `epochs` may grow). lr None means 0.01 for SGD and 0.001 for AdamW."""
    arch: str = "simple"           # a key of chexcy.nn.ARCHITECTURES
    width: int = 16                # simple/resnet: channels of the first stage; stage i has width * 2**i
    depth: int = 4                 # simple/resnet: number of stages
    blocks: int = 1                # residual blocks per stage (resnet, multiview with backbone resnet)
    backbone: str = "simple"       # multiview trunk: simple, resnet, resnet18/34/50 or densenet121
    shared: bool = True            # multiview: one trunk for both views
    hidden: int = 64               # multiview fusion width
    dropout: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    lr: float = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: int = 0                # warm-up steps
    step_size: int = None          # steps between decays for schedule "step" (default a third of the run)
    gamma: float = 0.1
    seed: int = 0                  # weights, data order, augmentation, dropout: all derived from it
    augment: bool = False
    pos_weight: object = None      # None, "auto" (n_neg / n_pos per label, clipped to [1, 10]), a number or a list

    def resolved(self):
        cfg = dataclasses.replace(self)
        if cfg.lr is None:
            cfg.lr = 0.001 if cfg.optimizer == "adamw" else 0.01
        return cfg

    def model_config(self):
        if self.arch in TORCHVISION_ARCHITECTURES:       # torchvision's structures: no width, depth or blocks
            return dict(dropout=self.dropout, seed=self.seed)
        widths = [self.width * 2 ** i for i in range(self.depth)]
        config = dict(widths=widths, dropout=self.dropout, seed=self.seed)
        if self.arch == "resnet":
            config["blocks"] = self.blocks
        if self.arch == "multiview":
            config.update(backbone=self.backbone, blocks=self.blocks, shared=self.shared, hidden=self.hidden)
        return config

    def validate(self):
        checks = [("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1), ("width", self.width >= 1),
                  ("depth", self.depth >= 1), ("lr", self.lr is None or (self.lr > 0 and math.isfinite(self.lr))),
                  ("momentum", 0 <= self.momentum < 1), ("weight_decay", self.weight_decay >= 0),
                  ("warmup", self.warmup >= 0), ("dropout", 0 <= self.dropout < 1),
                  ("gamma", self.gamma > 0 and math.isfinite(self.gamma))]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError("bad training settings: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        return self


# Settings that may differ on --resume without changing the run's arithmetic.
RUN_SETTINGS = ("epochs",)


def data_identity(dataset):
    """What makes a prepared folder's data what they are (DATA_IDENTITY_FIELDS of its manifest), as a
    JSON-able dict; None for no dataset. The folder's path is left out on purpose: a copied or moved folder
    is the same data."""
    if dataset is None:
        return None
    manifest = getattr(dataset, "manifest", None) or {}
    identity = {name: manifest.get(name) for name in DATA_IDENTITY_FIELDS}
    identity["count"] = int(len(dataset))
    return identity


def fingerprint(identity):
    """A short hash of a JSON-able value (e.g. data_identity), for logs and cross-rank comparison."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_differences(saved, current, name=""):
    """Lines 'name.key: A in the run, B now' for every leaf where two JSON-like values differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(set(saved) | set(current), key=str):
            lines += describe_differences(saved.get(key), current.get(key), f"{name}.{key}" if name else str(key))
        return lines
    return [] if saved == current else [f"{name}: {saved!r} in the run, {current!r} now"]


@dataclasses.dataclass
class FitResult:
    model: object
    status: str                    # "completed" or "interrupted"
    global_step: int
    history: list                  # one dict per epoch finished in this call
    checkpoint_dir: str = None
    config: TrainConfig = None
    signal: int = None             # the signal that interrupted the run

    @property
    def last_checkpoint(self):
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, "last.npz")

    @property
    def best_checkpoint(self):
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, "best.npz")


def _nan_to_none(values):
    return [None if (v is None or math.isnan(v)) else float(v) for v in values]


def _differences_text(saved, current, most=4):
    lines = describe_differences(saved, current)
    return "; ".join(lines[:most]) + (f"; and {len(lines) - most} more" if len(lines) > most else "")


def _check_same_data(ckpt, resume, train_set, valid_set):
    """--resume must train on the data the run started on, and validate on the same set: the validation set
    decides which checkpoint is best.npz, so changing or dropping it would change what "best" means."""
    saved = ckpt.config.get("data_identity")
    if saved is not None and describe_differences(saved, data_identity(train_set)):
        raise ValueError(f"--data {getattr(train_set, 'path', '')} is not the prepared data the run in {resume} "
                         f"trained on ({_differences_text(saved, data_identity(train_set))}); resume with the "
                         f"run's data ({ckpt.config.get('data')}), or start a new run")
    if "valid_identity" not in ckpt.config:
        return          # written before checkpoints recorded the validation set: nothing to compare with
    saved, current = ckpt.config["valid_identity"], data_identity(valid_set)
    if saved is None and current is not None:
        raise ValueError(f"the run in {resume} was started without --valid (its best.npz is the lowest training "
                         f"loss); resume it without --valid, or start a new run to validate")
    if saved is not None and current is None:
        raise ValueError(f"the run in {resume} validates on {ckpt.config.get('valid')} ({saved['count']} images), "
                         f"which picks best.npz; pass --valid {ckpt.config.get('valid')} to resume it")
    if saved is not None and describe_differences(saved, current):
        raise ValueError(f"--valid {getattr(valid_set, 'path', '')} is not the validation data of the run in "
                         f"{resume} ({_differences_text(saved, current)}); pass --valid {ckpt.config.get('valid')}")


def _format_duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def resolve_pos_weight(spec, labels, n_labels):
    """pos_weight spec -> float64 (L,) or None. "auto": n_neg / n_pos per label over present labels,
    clipped to [1, 10] (a rare positive counts more, but never so much that one image dominates)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"pos_weight must be 'auto', a number or {n_labels} numbers, got {spec!r}")
        labels = np.asarray(labels, dtype=np.float64)
        n_pos = np.nansum(labels, axis=0)
        n_neg = np.sum(~np.isnan(labels), axis=0) - n_pos
        return np.clip(np.where(n_pos > 0, n_neg / np.maximum(n_pos, 1), 1.0), 1.0, 10.0)
    weights = np.broadcast_to(np.asarray(spec, dtype=np.float64), (n_labels,)).copy()
    if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"pos_weight must be positive and finite, got {weights.tolist()}")
    return weights


def batch_size_of(batch):
    return int(len(batch.labels))


def step_rng(seed, epoch, step):
    """The generator for a step's dropout masks: a pure function of (seed, epoch, step)."""
    return np.random.default_rng([int(seed), int(epoch), int(step), 0xD80])


def _check_image_size(dataset, size, what):
    if int(dataset.size) != int(size):
        raise ValueError(f"{what} holds {dataset.size}x{dataset.size} images but the model was trained on "
                         f"{size}x{size}; prepare the data with --size {size}")


def fit(data, valid=None, *, checkpoint_dir=None, resume=False, overwrite=False, log_every=20, checkpoint_every=0,
        threads=None, workers=1, out=sys.stdout, handle_signals=True, comm=None, init_from=None, **settings):
    """Train a model on a prepared folder. Returns a FitResult.

    data, valid: prepared folders (paths) or chexcy.data.PreparedDataset objects; valid optional.
    checkpoint_dir: where last.npz, best.npz and log.jsonl go (None: keep nothing on disk; the trained model
      is in the result). The folder is locked for the whole call (RunFolderBusy if another process holds
      it) and must not hold a run unless `resume` or `overwrite` is given (RunFolderError).
    resume: True to continue from checkpoint_dir/last.npz, or a checkpoint path. Settings given together
      with resume must equal the checkpoint's (except `epochs`, which may extend the run), and the data and
      validation data must be the ones the run was started on (data_identity).
    overwrite: start a new run in a folder that holds one, deleting its last.npz, best.npz and log.jsonl.
    log_every: a progress line every N steps (0: none); checkpoint_every: also save last.npz every N steps.
    threads: kernel threads (chexcy.ops.set_num_threads); workers: loader workers.
    out: where progress goes (None: silent). settings: fields of TrainConfig (arch, epochs, lr, ...).
    comm: a chexcy.comm communicator for data-parallel training under mpiexec (chexcy.distributed.init(True));
      None: one process. See docs/distributed.md.
    init_from: start a new run from the weights in this .safetensors or .npz file (chexcy.weights.init_from:
      adaptations are printed); not with resume.
    Raises TrainingDiverged when the loss becomes NaN/inf/huge or the weights blow up (naming the step;
    last.npz stays the last good state), CheckpointError/ValueError for a checkpoint that does not fit the
    data or the settings, DiskFullError (naming the file) when the disk fills up.
    """
    unknown = set(settings) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"fit: unknown settings {sorted(unknown)}")
    if init_from is not None and resume:
        raise ValueError("--init-from starts a new run and --resume continues one: give only one of them")
    if resume and overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite deletes it: pass one of them")
    if resume is True:
        if checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint folder (--checkpoint-dir) or a checkpoint path")
        resume = os.path.join(checkpoint_dir, "last.npz")
    elif resume and checkpoint_dir is None:
        checkpoint_dir = os.path.dirname(os.path.abspath(resume))
    comm = LocalComm() if comm is None else comm
    lock = _open_run_folder(checkpoint_dir, bool(resume), overwrite, comm) if checkpoint_dir else None
    try:
        run = start_or_resume(data, valid, checkpoint_dir=checkpoint_dir, resume=resume, log_every=log_every,
                              checkpoint_every=checkpoint_every, threads=threads, workers=workers, out=out,
                              comm=comm, init_from=init_from, settings=settings)
        if isinstance(run, FitResult):          # a finished run asked for no more epochs
            return run
        with StopRequest(comm, enabled=handle_signals or comm.size > 1) as stop:
            try:
                while run.epoch < run.cfg.epochs:
                    if not train_epoch(run, stop):
                        return _stopped(run, stop, in_epoch=True)
                    end_epoch(run)
                    if stop.decide() is not None and run.epoch < run.cfg.epochs:
                        return _stopped(run, stop, in_epoch=False)
                run.log.write("end", global_step=run.global_step, best=run.best)
                if run.checkpoint_dir:
                    run.emit(f"checkpoints: {os.path.join(run.checkpoint_dir, 'last.npz')}, "
                             f"{os.path.join(run.checkpoint_dir, 'best.npz')} | log: "
                             f"{os.path.join(run.checkpoint_dir, 'log.jsonl')}")
                return FitResult(run.model, "completed", run.global_step, run.history, run.checkpoint_dir, run.cfg)
            except DiskFullError as exc:
                last = os.path.join(run.checkpoint_dir, "last.npz")
                then = ("continue the run with --resume" if os.path.exists(last) else
                        "start it again with --overwrite")
                raise DiskFullError(exc.errno, f"{exc.strerror}; free some space, then {then}") from None
            finally:
                run.log.close()
    finally:
        if lock is not None:
            lock.release()


def _open_run_folder(folder, resume, overwrite, comm):
    """Lock the run folder and check it fits the request (chexcy.runfolder.open_run_folder). Returns the lock.

    Under MPI only rank 0 writes, so only rank 0 locks; its outcome is broadcast, so that when it fails
    every rank raises the same error instead of the others waiting for rank 0 in their first collective."""
    from chexcy.runfolder import open_run_folder
    lock, problem = None, None
    if comm is None or comm.is_root:
        try:
            lock = open_run_folder(folder, resume=resume, overwrite=overwrite)
        except (RuntimeError, OSError) as exc:
            problem = exc
    if comm is not None and comm.size > 1:
        problem = comm.bcast_object(problem)
        if problem is not None:
            raise raise_on_every_rank(problem)
    if problem is not None:
        raise problem
    return lock


class _Run:
    """One training run while `fit` drives it: what start_or_resume builds and the steps advance.

    cfg TrainConfig; model; optimizer; replica (chexcy.distributed.DataParallel over `comm`: the rank's rows
    of each global batch, one gradient Allreduce per step; free on one process); loader; lr_at; pos_weight;
    train_set, valid_set; log (chexcy.runlog.JsonLog, inactive off rank 0); emit(text, end) prints on rank 0.
    Position: epoch, step_in_epoch, global_step, loss_sum, loss_count (running training loss of the epoch),
    best (dict metric/score/epoch or None); history: one record per epoch finished in this call.
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)
        self.history = []
        self.window = _ProgressWindow()

    def diverged(self, problem, where):
        """TrainingDiverged naming the problem, the step, the last good checkpoint and what to change."""
        last = os.path.join(self.checkpoint_dir, "last.npz") if self.checkpoint_dir else None
        kept = ""
        if last and os.path.exists(last):
            try:
                good = f"global step {load_checkpoint(last).config['position']['global_step']}, finite weights"
            except (DamagedFileError, KeyError) as exc:
                good = f"unreadable: {exc}"
            kept = (f"; the last good state is {last} ({good}): evaluate or predict with it, but resuming it "
                    f"replays the same steps and diverges again")
        lr = self.cfg.lr
        return TrainingDiverged(f"{problem} at {where}: training diverged{kept}; lower the learning rate: start "
                                f"over (--overwrite) with --lr {lr / 10:g} (this run: {lr:g}), or add --warmup")

    def check_state(self, where):
        """Refuse to go on (and to checkpoint) from weights or optimiser moments that are not finite or have
        blown up: such a last.npz would diverge again the moment it is resumed."""
        for name, p in self.model.named_parameters():
            if not np.all(np.isfinite(p.data)):
                raise self.diverged(f"parameter {name} is not finite", where)
            peak = float(np.max(np.abs(p.data))) if p.data.size else 0.0
            if peak > PARAM_LIMIT:
                raise self.diverged(f"parameter {name} reached {peak:.3g} (limit {PARAM_LIMIT:g})", where)
        for name, value in self.model.named_buffers():
            if not np.all(np.isfinite(value)):
                raise self.diverged(f"buffer {name} is not finite", where)
        for key, value in self.optimizer.state_dict().items():
            if isinstance(value, np.ndarray) and not np.all(np.isfinite(value)):
                raise self.diverged(f"optimiser state {key} is not finite", where)

    def save(self, kind, epoch, step):
        """Check the state (every rank), then write checkpoint_dir/KIND.npz (rank 0). Returns its path or None."""
        self.check_state(f"global step {self.global_step} (before writing {kind}.npz)")
        if not self.checkpoint_dir:
            return None
        train_set, valid_set = self.train_set, self.valid_set
        doc = dict(train=dataclasses.asdict(self.cfg), image_size=int(train_set.size), label_names=list(LABELS),
                   policy=self.policy, steps_per_epoch=self.steps_per_epoch, best=self.best,
                   position=dict(epoch=epoch, step_in_epoch=step, global_step=self.global_step,
                                 epoch_loss_sum=self.loss_sum, epoch_loss_count=self.loss_count),
                   data=str(getattr(train_set, "path", self.data)), data_identity=self.train_identity,
                   data_fingerprint=fingerprint(self.train_identity),
                   valid=None if valid_set is None else str(getattr(valid_set, "path", self.valid)),
                   valid_identity=data_identity(valid_set), ranks=self.comm.size)
        target = os.path.join(self.checkpoint_dir, f"{kind}.npz")
        existed = os.path.exists(target)
        try:
            path = save_checkpoint(target, self.model, self.optimizer, doc)
        except DiskFullError as exc:
            raise DiskFullError(exc.errno, f"disk full while writing {target}; " + (
                f"the previous {kind}.npz is intact" if existed else f"no {kind}.npz was written")) from None
        self.log.write("checkpoint", kind=kind, epoch=epoch, step_in_epoch=step, global_step=self.global_step,
                       path=path)
        return path


class _ProgressWindow:
    """Steps since the last progress line (loss, images, seconds), and the recent step times for the ETA."""

    def __init__(self):
        self.reset()
        self.recent = []

    def reset(self):
        self.loss, self.images, self.seconds, self.steps = 0.0, 0, 0.0, 0

    def add(self, loss, images, seconds):
        self.loss += loss
        self.images += images
        self.seconds += seconds
        self.steps += 1
        self.recent = (self.recent + [seconds])[-50:]


def _resume_config(ckpt, resume, settings, train_set, valid_set, data):
    """The TrainConfig of the run in checkpoint `ckpt`, with the settings a resume may change applied;
    ValueError when the other settings, the data or the validation data differ from the run's."""
    if "train" not in ckpt.config:
        raise CheckpointError(resume, "a checkpoint without training state (not written by chexcy train); "
                                      "cannot resume from it")
    cfg = TrainConfig(**ckpt.config["train"])
    for name, value in settings.items():
        if name in RUN_SETTINGS:
            setattr(cfg, name, value)
        elif value != getattr(cfg, name):
            raise ValueError(f"--resume continues the saved run: {name}={value!r} differs from the "
                             f"checkpoint's {getattr(cfg, name)!r} (drop the option or start a new run)")
    _check_image_size(train_set, ckpt.image_size, f"--data {getattr(train_set, 'path', data)}")
    _check_same_data(ckpt, resume, train_set, valid_set)
    reached = ckpt.config["position"]["epoch"]
    if cfg.epochs < reached:
        raise ValueError(f"--epochs {cfg.epochs}: the run in {resume} is already at epoch {reached}; pass "
                         f"--epochs N with N > {reached} to train it longer")
    return cfg


def start_or_resume(data, valid, *, checkpoint_dir, resume, log_every, checkpoint_every, threads, workers, out,
                    comm, settings, init_from=None):
    """Open the data, build (or load from `resume`) the model, optimiser, loader and replica, and announce
    the run. Returns a _Run positioned where training goes on, or a FitResult when a resumed run has
    already finished its epochs. Arguments as `fit`'s; comm a communicator (LocalComm for one process)."""
    if threads is not None:
        ops.set_num_threads(int(threads))
    reuse_freed_memory()
    train_set, valid_set = open_dataset(data, "--data"), open_dataset(valid, "--valid")
    emit = (lambda text="", end="\n": (print(text, end=end, file=out, flush=True))) if out is not None else \
        (lambda text="", end="\n": None)
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        cfg = _resume_config(ckpt, resume, settings, train_set, valid_set, data)
        reached = ckpt.config["position"]["epoch"]
        if cfg.epochs == reached:
            if comm.is_root:
                emit(f"the run in {resume} has finished its {reached} epochs: nothing to train (pass --epochs N "
                     f"with N > {reached} to train it longer)")
            return FitResult(ckpt.build_model(), "completed", ckpt.config["position"]["global_step"], [],
                             checkpoint_dir, cfg)
    else:
        cfg = TrainConfig(**settings).resolved()
    cfg.validate()
    if valid_set is not None:
        _check_image_size(valid_set, train_set.size, f"--valid {valid}")
    # Every rank must train the same run on the same data, or they hang or mix (one rank: nothing to compare).
    position = None if ckpt is None else ckpt.config["position"]
    check_ranks_agree(comm, {
        "--data": f"{len(train_set)} images, fingerprint {fingerprint(data_identity(train_set))}",
        "--valid": None if valid_set is None else
        f"{len(valid_set)} images, fingerprint {fingerprint(data_identity(valid_set))}",
        "settings": dataclasses.asdict(cfg),
        "resumed from": None if position is None else (str(resume), position["global_step"]),
        "--init-from": None if init_from is None else str(init_from),
    })

    model = build_model(cfg.arch, **cfg.model_config())
    if init_from is not None:
        from chexcy.weights import init_from as load_initial_weights
        notes = load_initial_weights(model, init_from)
        if comm.is_root:
            emit(f"--init-from {init_from}: weights loaded" + (", adapted:" if notes else " as they are"))
            for note in notes:
                emit(f"--init-from {init_from}: {note}")
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    loader = make_loader(model, train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment,
                         workers=workers)
    replica = DataParallel(model, comm)     # each rank its rows of every batch, one Allreduce per step
    replica.attach(loader)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(f"--data {data}: no batches (empty dataset?)")
    total_steps = cfg.epochs * steps_per_epoch
    run = _Run(cfg=cfg, model=model, optimizer=optimizer, loader=loader, replica=replica, comm=comm,
               train_set=train_set, valid_set=valid_set, data=data, valid=valid, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, lr_at=make_schedule(cfg.schedule, cfg.lr, total_steps,
                                                            warmup_steps=cfg.warmup, step_size=cfg.step_size,
                                                            gamma=cfg.gamma),
               pos_weight=resolve_pos_weight(cfg.pos_weight, train_set.labels, NUM_CLASSES),
               policy=describe_policy(train_set), train_identity=data_identity(train_set),
               epoch=0, step_in_epoch=0, global_step=0, best=None, loss_sum=0.0, loss_count=0,
               log_every=log_every, checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, emit=emit,
               is_tty=out is not None and hasattr(out, "isatty") and out.isatty())
    if ckpt is not None:
        _load_position(run, ckpt, resume)
    if not comm.is_root:                # rank 0 alone prints, logs and saves
        run.checkpoint_dir, run.is_tty, run.emit = None, False, (lambda text="", end="\n": None)
    if ckpt is not None and ckpt.config.get("ranks", 1) != comm.size:
        run.emit(f"note: {resume} was written by {ckpt.config.get('ranks', 1)} rank(s), this run has {comm.size}: "
                 "the same global batches, order and learning rates, so training continues, but the losses equal "
                 "an uninterrupted run's to float32 rounding, not bit for bit (docs/distributed.md)")
    run.log = JsonLog(os.path.join(run.checkpoint_dir, "log.jsonl") if run.checkpoint_dir else None)
    run.backend = (f"{ops.get_backend()} x{ops.get_num_threads()}"
                   + ("" if comm.size == 1 and not comm.is_mpi else f" x {comm.size} ranks"))
    _announce(run, ckpt, resume)
    return run


def _load_position(run, ckpt, resume):
    """Weights, optimiser moments and position from checkpoint `ckpt` into `run`."""
    try:
        run.model.load_state_dict(ckpt.model_state)
        run.optimizer.load_state_dict(ckpt.optim_state)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(resume, f"weights do not fit the checkpoint's own configuration: {exc}") from None
    position = ckpt.config["position"]
    run.epoch, run.step_in_epoch = position["epoch"], position["step_in_epoch"]
    run.global_step = position["global_step"]
    run.loss_sum, run.loss_count = position.get("epoch_loss_sum", 0.0), position.get("epoch_loss_count", 0)
    run.best = ckpt.config.get("best")
    if ckpt.config.get("steps_per_epoch") not in (None, run.steps_per_epoch):
        raise ValueError(f"--data {run.data}: the run in {resume} was trained with {ckpt.config['steps_per_epoch']} "
                         f"steps per epoch, these data give {run.steps_per_epoch}: not the same prepared data")


def _announce(run, ckpt, resume):
    """The start (or resume) record of the log and the run's first lines."""
    cfg, train_set, valid_set = run.cfg, run.train_set, run.valid_set
    if ckpt is not None:
        run.emit(f"resuming {resume}: epoch {run.epoch + 1}, step {run.step_in_epoch}/{run.steps_per_epoch}, "
                 f"global step {run.global_step}")
        run.log.write("resume", checkpoint=str(resume), epoch=run.epoch, step_in_epoch=run.step_in_epoch,
                      global_step=run.global_step)
    else:
        run.log.write("start", config=dataclasses.asdict(cfg), model=run.model.config,
                      image_size=int(train_set.size), n_train=len(train_set),
                      n_valid=None if valid_set is None else len(valid_set), policy=run.policy,
                      backend=run.backend, steps_per_epoch=run.steps_per_epoch)
    model_desc = f"{cfg.arch} ({run.model.num_parameters():,} parameters)"
    run.emit(f"train {model_desc} on {len(train_set):,} images {train_set.size}x{train_set.size}"
             f"{'' if valid_set is None else f', valid {len(valid_set):,}'} | {cfg.optimizer} lr {cfg.lr:g} "
             f"{cfg.schedule} | batch {cfg.batch_size} | {cfg.epochs} epochs x {run.steps_per_epoch} steps | "
             f"{run.backend}")
    run.emit(f"labels: {run.policy}")


def train_epoch(run, stop):
    """Train from run's position to the end of its epoch, or until a stop request all ranks share.
    Returns True when the epoch's last step is done, False when stopped before it (run.step_in_epoch is
    then the next step to train). Raises TrainingDiverged on a non-finite or huge loss."""
    cfg, model, replica = run.cfg, run.model, run.replica
    model.train()
    run.epoch_start = time.perf_counter()
    for step, batch in enumerate(run.loader.batches(run.epoch, start=run.step_in_epoch), start=run.step_in_epoch):
        t0 = time.perf_counter()
        model.set_random_state(step_rng(cfg.seed, run.epoch, step))
        replica.begin_batch(batch, step)
        logits = model.forward_batch(batch)
        loss, dlogits = bce_with_logits(logits, batch.labels, batch.mask, run.pos_weight)
        if not (math.isfinite(loss) and loss <= LOSS_LIMIT) or not np.all(np.isfinite(dlogits)):
            where = f"epoch {run.epoch + 1}, step {step + 1}/{run.steps_per_epoch} (global step {run.global_step + 1})"
            run.log.write("diverged", epoch=run.epoch, step=step, global_step=run.global_step + 1, loss=loss)
            limit = f" (limit {LOSS_LIMIT:g})" if math.isfinite(loss) else ""
            raise run.diverged(f"loss is {loss:.4g}{limit}", where)
        model.backward(dlogits)
        totals = replica.end_batch(loss, stop=stop.seen is not None)  # averaged gradients, global loss, stop
        stop.decide(totals.stop)
        lr = run.optimizer.lr = run.lr_at(run.global_step)
        run.optimizer.step()
        run.global_step += 1
        run.loss_sum += totals.loss
        run.loss_count += 1
        run.step_in_epoch = step + 1
        dt = time.perf_counter() - t0
        run.log.write("step", epoch=run.epoch, step=step, global_step=run.global_step, loss=totals.loss, lr=lr,
                      images=totals.rows, seconds=round(dt, 5))
        run.window.add(totals.loss, totals.rows, dt)
        if run.log_every and (run.global_step % run.log_every == 0 or step + 1 == run.steps_per_epoch):
            _progress_line(run, step, lr)
        if stop.signal is not None:
            break
        if run.checkpoint_every and run.global_step % run.checkpoint_every == 0 and step + 1 < run.steps_per_epoch:
            run.save("last", run.epoch, step + 1)
    if run.is_tty and run.step_in_epoch == run.steps_per_epoch:
        run.emit()
    return run.step_in_epoch == run.steps_per_epoch


def _progress_line(run, step, lr):
    w = run.window
    eta = float(np.median(w.recent)) * (run.total_steps - run.global_step)
    line = (f"epoch {run.epoch + 1} step {step + 1:>{len(str(run.steps_per_epoch))}}/{run.steps_per_epoch}"
            f" | loss {w.loss / w.steps:.4f} | lr {lr:.1e} | {1000 * w.seconds / w.steps:.0f} ms"
            f" | {w.images / max(w.seconds, 1e-9):.1f} img/s | ETA {_format_duration(eta)} | {run.backend}")
    run.emit(("\r" + line.ljust(110)) if run.is_tty else line, end="" if run.is_tty else "\n")
    w.reset()


def end_epoch(run):
    """End of an epoch: validate (over all ranks), pick the best, write last.npz (and best.npz), log, report."""
    cfg = run.cfg
    train_loss = run.loss_sum / max(run.loss_count, 1)
    record = dict(epoch=run.epoch + 1, global_step=run.global_step, train_loss=train_loss,
                  seconds=round(time.perf_counter() - run.epoch_start, 3))
    line = f"epoch {run.epoch + 1} | train loss {train_loss:.4f}"
    others = None
    if run.valid_set is not None:
        pred = predict_dataset(run.model, run.valid_set, batch_size=max(cfg.batch_size, 64),
                               pos_weight=run.pos_weight, comm=run.comm)
        aucs = metrics.per_label_auc(pred.labels, pred.probs)
        mean5 = metrics.mean_auc(aucs, LABELS, COMPETITION_TASKS)
        record.update(valid_loss=pred.loss, auc=dict(zip(LABELS, _nan_to_none(aucs))),
                      mean_auc=None if math.isnan(mean5) else mean5)
        tasks = "  ".join(f"{SHORT_NAMES.get(t, t[:4])} {metrics.format_auc(aucs[LABELS.index(t)], 4)}"
                          for t in COMPETITION_TASKS)
        line += f" | valid loss {pred.loss:.4f} | AUC  {tasks} | mean(5) {metrics.format_auc(mean5)}"
        others = "  ".join(f"{SHORT_NAMES.get(n, n[:4])} {metrics.format_auc(aucs[i], 4)}"
                           for i, n in enumerate(LABELS) if n not in COMPETITION_TASKS)
        score = mean5 if not math.isnan(mean5) else -pred.loss
        score_name = "mean_auc" if not math.isnan(mean5) else "-valid_loss"
    else:
        score, score_name = -train_loss, "-train_loss"
    run.epoch += 1
    run.step_in_epoch = 0
    run.loss_sum, run.loss_count = 0.0, 0
    improved = run.best is None or run.best["metric"] != score_name or score > run.best["score"]
    if improved:
        run.best = dict(metric=score_name, score=score, epoch=run.epoch)
    saved = [kind for kind in (("last", "best") if improved else ("last",)) if run.save(kind, run.epoch, 0)]
    line += f" | {record['seconds']:.1f} s" + (f" | ckpt saved ({', '.join(saved)})" if saved else "")
    record["best"] = improved
    run.log.write("epoch", **record)
    run.history.append(record)
    run.emit(line)
    if others:
        run.emit(f"        other AUC  {others}")


def _stopped(run, stop, in_epoch):
    """Record a shared stop request (within an epoch: save last.npz first) and return the FitResult."""
    name = signal.Signals(stop.signal).name
    if in_epoch:
        path = run.save("last", run.epoch, run.step_in_epoch)
        run.log.write("interrupted", signal=name, epoch=run.epoch, step_in_epoch=run.step_in_epoch,
                      global_step=run.global_step)
        if run.is_tty:
            run.emit()
        run.emit(f"{name}: stopped after global step {run.global_step}"
                 + (f"; saved {path}; continue with --resume" if path else ""))
    else:
        run.log.write("interrupted", signal=name, epoch=run.epoch, step_in_epoch=0, global_step=run.global_step)
        run.emit(f"{name}: stopped after epoch {run.epoch}"
                 + ("; saved last.npz; continue with --resume" if run.checkpoint_dir else ""))
    return FitResult(run.model, "interrupted", run.global_step, run.history, run.checkpoint_dir, run.cfg,
                     stop.signal)


def describe_policy(dataset):
    """One line stating how the prepared data's labels were made (uncertain / blank handling)."""
    return policy_text(getattr(dataset, "manifest", {}) or {})
