"""Model weights in and out through safetensors: `chexcy export --safetensors` and `chexcy train --init-from`.

A safetensors file is a JSON header plus raw little-endian arrays: no pickle, so reading one never runs
code, and PyTorch writes the same format (`safetensors.torch.save_file(model.state_dict(), path)`).
chexcy writes its state dict under its own names (parameters and BatchNorm running statistics, float32)
with the architecture, its config and the label names in the file's string metadata.
bfloat16 arrays (common in PyTorch files; NumPy has no such type) are widened to float32, exactly.

Loading into a model (`init_from`) requires the names and shapes of the model's state dict, with three
explicit adaptations, each reported in the returned notes:
- first conv, 3 -> 1 input channels: a conv that takes the image (its in_channels is the model's, groups 1)
  whose weight arrives as (F, 3, KH, KW) for a (F, 1, KH, KW) slot gets the sum over the 3 input channels,
  which is exactly what the 3-channel conv computes on a grayscale image repeated to RGB;
- classifier of another size: the model's last Linear, arriving with another number of outputs (e.g.
  ImageNet's 1000) but the right number of inputs, keeps its fresh initialisation (from the run's seed);
- `*.num_batches_tracked` counters (PyTorch BatchNorm bookkeeping; chexcy uses a fixed momentum) are ignored.
Any other missing, extra or mis-shaped entry is an error that names it.
"""
import json
import os
from collections import OrderedDict

import numpy as np

from chexcy.fileio import DamagedFileError
from chexcy.nn.layers import Conv2d, Linear

SUFFIX = ".safetensors"
_IGNORED_SUFFIX = ".num_batches_tracked"


def _import_safetensors():
    try:
        import safetensors.numpy
    except ImportError:      # a runtime dependency; only a broken install gets here
        raise RuntimeError("safetensors is not installed: pip install safetensors") from None
    return safetensors.numpy


def save_safetensors(checkpoint, path):
    """Write the state dict of `checkpoint` (a path or Checkpoint) to `path` (safetensors). Returns the dict."""
    from chexcy.checkpoint import Checkpoint, load_checkpoint
    from chexcy.data.schema import LABELS
    from chexcy.fileio import atomic_write_bytes
    st = _import_safetensors()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = ckpt.build_model()          # validates that the weights fit their architecture
    state = OrderedDict((name, np.ascontiguousarray(value, dtype=np.float32))
                        for name, value in model.state_dict().items())
    metadata = {"format": "chexcy-state-dict", "arch": model.arch,
                "model_config": json.dumps(model.config, sort_keys=True),
                "image_size": str(ckpt.image_size), "labels": json.dumps(list(LABELS))}
    atomic_write_bytes(path, st.save(dict(state), metadata=metadata))
    return state


def read_weights(path):
    """name -> ndarray from a .safetensors file or a chexcy .npz checkpoint (its model state)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist" +
                                (" (it is a folder)" if os.path.isdir(path) else ""))
    if path.endswith(".npz"):
        from chexcy.checkpoint import load_checkpoint
        return OrderedDict(load_checkpoint(path).model_state)
    if not path.endswith(SUFFIX):
        raise ValueError(f"weights file {path}: expected a .safetensors file or a chexcy .npz checkpoint")
    st = _import_safetensors()
    try:
        state = _load_with_bfloat16(path) or st.load_file(path)
    except DamagedFileError:
        raise
    except Exception as exc:        # safetensors raises its own SafetensorError (and TypeError for dtypes)
        raise DamagedFileError(path, f"not a readable safetensors file ({exc})") from None
    return OrderedDict(sorted(state.items()))


def _load_with_bfloat16(path):
    """name -> float32 array for a safetensors file holding bfloat16 arrays (as PyTorch checkpoints often
    do), None when it holds none. NumPy has no bfloat16, so those arrays are read here: a bfloat16 is the
    upper 16 bits of a float32, so widening is exact. The others go through safetensors."""
    from safetensors import safe_open
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < size <= 100_000_000:
            return None                     # safetensors itself reports what is wrong
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        bf16 = {name for name, entry in header.items() if isinstance(entry, dict) and entry.get("dtype") == "BF16"}
        if not bf16:
            return None
        state = {}
        for name in sorted(bf16):
            start, end = header[name]["data_offsets"]
            shape = tuple(header[name]["shape"])
            if end - start != 2 * int(np.prod(shape)):
                raise DamagedFileError(path, f"{name}: {end - start} bytes for a bfloat16 array of shape {shape}")
            f.seek(8 + size + start)
            bits = np.frombuffer(f.read(end - start), dtype="<u2")
            if bits.size * 2 != end - start:
                raise DamagedFileError(path, f"{name}: the file ends inside this array (truncated)")
            state[name] = (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    with safe_open(path, "np") as sf:
        for name in sf.keys():
            if name not in bf16:
                state[name] = sf.get_tensor(name)
    return state


def _named_modules(module, prefix=""):
    yield prefix, module
    for name, child in module.named_children():
        yield from _named_modules(child, f"{prefix}{name}.")


def _describe(names, limit=6):
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def adapt_state_dict(model, state):
    """Fit `state` (name -> array) to `model`'s state dict. Returns (OrderedDict for load_state_dict,
    notes: list of str describing every adaptation). Raises ValueError naming every entry that does not fit."""
    targets = model.state_dict()                    # copies: fresh values for anything re-initialised
    in_channels = int(model.config.get("in_channels", 1))
    modules = list(_named_modules(model))
    input_convs = {prefix + "weight" for prefix, m in modules
                   if isinstance(m, Conv2d) and m.in_channels == in_channels and m.groups == 1}
    linears = [(prefix, m) for prefix, m in modules if isinstance(m, Linear)]
    classifier = linears[-1][0] if linears else None
    notes, adapted, problems, reinit = [], OrderedDict(), [], []

    ignored = [name for name in state if name.endswith(_IGNORED_SUFFIX) and name not in targets]
    if ignored:
        notes.append(f"ignored {len(ignored)} BatchNorm num_batches_tracked counter(s) (not used by chexcy)")
    extra = [name for name in state if name not in targets and name not in ignored]
    missing = [name for name in targets if name not in state]
    if extra:
        problems.append(f"unexpected entries {_describe(extra)}")
    if missing:
        problems.append(f"missing entries {_describe(missing)}")
    for name, target in targets.items():
        if name not in state:
            continue
        value = np.asarray(state[name])
        if value.dtype.kind != "f":
            problems.append(f"{name} has dtype {value.dtype}, expected floating point")
            continue
        if value.shape == target.shape:
            adapted[name] = value.astype(np.float32, copy=False)
        elif (name in input_convs and value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1
              and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]):
            adapted[name] = value.astype(np.float32).sum(axis=1, keepdims=True)
            notes.append(f"{name}: 3-channel first conv {value.shape} summed over its input channels -> "
                         f"{target.shape} (same output on a grayscale image as the RGB conv on it repeated 3x)")
        elif (classifier is not None and name in (classifier + "weight", classifier + "bias")
              and value.shape[0] != target.shape[0] and value.shape[1:] == target.shape[1:]):
            adapted[name] = target
            reinit.append((name, value.shape))
        else:
            problems.append(f"{name} has shape {value.shape}, expected {target.shape}")
    if problems:
        raise ValueError("weights do not fit the model: " + "; ".join(problems))
    if reinit:
        notes.append(f"classifier {' and '.join(f'{n} {s}' for n, s in reinit)} re-initialised for "
                     f"{targets[reinit[0][0]].shape[0]} outputs")
    return adapted, notes


def init_from(model, path):
    """Load weights from `path` (.safetensors or chexcy .npz) into `model`, adapting as the module docstring
    says. Returns the list of adaptation notes (empty when the file fit as it was)."""
    state = read_weights(path)
    try:
        adapted, notes = adapt_state_dict(model, state)
    except ValueError as exc:
        raise ValueError(f"--init-from {path}: {exc}") from None
    model.load_state_dict(adapted)
    return notes
