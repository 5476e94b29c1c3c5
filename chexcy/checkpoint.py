"""Checkpoints: one .npz file holding everything needed to rebuild a model or resume its training.

Layout (a NumPy .npz, i.e. a zip of .npy arrays; no pickles, so loading a file never runs code):
    config.json      uint8 bytes of a JSON document: format version, chexcy version, arch and model config,
                     training hyper-parameters, image size, label names and policy, position (epoch,
                     step_in_epoch, global_step), seeds, best metric so far
    model/<name>     every parameter and buffer (e.g. model/trunk.0.weight, model/trunk.1.running_mean)
    optim/<key>      optimiser state arrays (momentum buffers, Adam moments); optim step count is in the JSON

Randomness needs no generator snapshot: every random draw of a run (data order, augmentation, dropout)
is derived from (seed, epoch, step) and the weights from the seed, so the JSON's seeds and position are the
complete random state.

Writes go through chexcy.fileio.atomic_write (temporary file, fsync, rename, fsync of the folder), so a
crash at any moment leaves either the old or the new checkpoint, never a torn one, and a full disk says so
in words. Reads never unpickle: a file that is not a chexcy checkpoint raises CheckpointError (a
chexcy.fileio.DamagedFileError) naming the file and what is wrong with it.
"""
import io
import json
import os
import zipfile
from collections import OrderedDict

import numpy as np

from chexcy.fileio import DamagedFileError, atomic_write

FORMAT = "chexcy-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(DamagedFileError):
    """A checkpoint file that is missing, corrupt, of another format, or does not fit the request.

    CheckpointError(path, problem): str() is "PATH: problem", one line a command line prints as it is."""

# The first bytes of a zip archive (an .npz) and of a bare .npy: anything else is not a checkpoint, and is
# refused before NumPy would try to read it as a pickle.
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


class Checkpoint:
    """A loaded checkpoint: `config` (dict), `model_state` (OrderedDict name -> array),
    `optim_state` (dict key -> array or number), `path`."""

    def __init__(self, config, model_state, optim_state, path=None):
        self.config, self.model_state, self.optim_state, self.path = config, model_state, optim_state, path

    @property
    def image_size(self):
        return int(self.config["image_size"])

    def build_model(self):
        """The model this checkpoint describes, with its weights and buffers loaded, in eval mode."""
        from chexcy.nn import build_model
        model = build_model(self.config["arch"], **self.config["model"])
        try:
            model.load_state_dict(self.model_state)
        except ValueError as exc:
            raise CheckpointError(self.path, f"weights do not fit its own architecture: {exc}") from None
        return model.eval()


def save_checkpoint(path, model, optimizer=None, config=None):
    """Write model (parameters, buffers), optimiser state and `config` (JSON-able dict) to `path` atomically.

    The model's arch and config are added to the JSON under "arch" and "model". Returns `path`.
    """
    doc = dict(config or {})
    doc.update(format=FORMAT, format_version=FORMAT_VERSION, arch=model.arch, model=model.config)
    from chexcy import __version__
    doc.setdefault("chexcy_version", __version__)
    arrays = OrderedDict()
    for name, value in model.state_dict().items():
        arrays["model/" + name] = value
    if optimizer is not None:
        optim_state = optimizer.state_dict()
        doc["optimizer_state"] = {"name": optimizer.name, "step_count": int(optim_state.pop("step_count"))}
        for key, value in optim_state.items():
            arrays["optim/" + key] = value
    arrays["config.json"] = np.frombuffer(json.dumps(doc, sort_keys=True).encode("utf-8"), dtype=np.uint8)

    def write(f):
        # Serialise to memory first: np.savez seeks, and a BytesIO keeps the file write a single pass.
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        f.write(buffer.getbuffer())

    return atomic_write(path, write)


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint.

    Raises CheckpointError (a chexcy.fileio.DamagedFileError) naming the file and what is wrong when it is
    missing, a folder, not a chexcy checkpoint, truncated or of another format version. Never unpickles.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "checkpoint file does not exist")
    if os.path.isdir(path):
        raise CheckpointError(path, f"a folder, not a checkpoint file; pass the file (e.g. "
                                    f"{os.path.join(path, 'last.npz')})")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from None
    if not magic:
        raise CheckpointError(path, "empty file (0 bytes), not a chexcy checkpoint")
    if magic.startswith(_NPY_MAGIC):
        raise CheckpointError(path, "a single NumPy array (.npy), not a chexcy checkpoint (.npz)")
    if not magic.startswith(_ZIP_MAGIC):
        raise CheckpointError(path, "not a chexcy checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise CheckpointError(path, f"corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from None
    if "config.json" not in files:
        raise CheckpointError(path, "not a chexcy checkpoint (an .npz archive without config.json)")
    try:
        config = json.loads(files.pop("config.json").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"config.json inside the checkpoint is corrupt ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(path, f"not a chexcy checkpoint (format {found!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"checkpoint format version {config.get('format_version')}; this chexcy reads "
                                    f"version {FORMAT_VERSION}")
    for key in ("arch", "model", "image_size"):
        if key not in config:
            raise CheckpointError(path, f"config.json inside the checkpoint lacks {key!r}")
    model_state = OrderedDict((k[len("model/"):], v) for k, v in files.items() if k.startswith("model/"))
    optim_state = {k[len("optim/"):]: v for k, v in files.items() if k.startswith("optim/")}
    if "optimizer_state" in config:
        optim_state["step_count"] = config["optimizer_state"]["step_count"]
    return Checkpoint(config, model_state, optim_state, path)
