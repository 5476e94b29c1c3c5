"""The bookkeeping every layer shares: parameters, buffers, train/eval mode, state dicts.

A `Module` computes `forward(x)` and, from the gradient of the loss with respect to its output,
`backward(dout)`, which returns the gradient with respect to its input and *sets* (never accumulates)
`.grad` of each of its parameters. So a module holds the cache of exactly one forward pass: a trunk shared
by two inputs is run once on their concatenation (see MultiViewNet), never twice.
This differs from PyTorch, where backward adds into .grad: to accumulate over batches, sum the .grad
arrays yourself. `zero_grad()` (here or on an optimiser) sets .grad to None, and an optimiser's `step()`
refuses a parameter whose .grad is None, so a step always uses the gradient of the latest backward.

Parameters are found by walking attributes: a `Parameter`, a `Module` or a list/tuple of Modules.
Buffers (e.g. BatchNorm running statistics) are arrays named in ``self._buffers`` (a tuple of names).
"""
from collections import OrderedDict

import numpy as np


class Parameter:
    """A trainable array. data: float32 ndarray; grad: same shape (None before the first backward).

    decay: whether weight decay applies (True for conv/linear weights; False for biases and BatchNorm
    scales/shifts, which decay would only pull towards an arbitrary value).
    """
    __slots__ = ("data", "grad", "decay")

    def __init__(self, data, decay=True):
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.grad = None
        self.decay = bool(decay)

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, decay={self.decay})"


class Module:
    """Base class: subclasses implement forward/backward and keep arrays they need in attributes."""
    _buffers = ()
    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, x):   # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout):   # pragma: no cover - abstract
        raise NotImplementedError

    # -- tree walking ------------------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, child in enumerate(value):
                    yield f"{name}.{i}", child

    def modules(self):
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        """Each trainable Parameter once (objects with .data and .grad), in a fixed order."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for name in self._buffers:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

    # -- modes ------------------------------------------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def set_random_state(self, rng):
        """Give every random layer (Dropout) the generator `rng` (np.random.Generator) for the next step.

        The training loop derives it from (seed, epoch, step) so randomness survives a resume exactly.
        """
        for m in self.modules():
            if hasattr(m, "rng"):
                m.rng = rng
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def num_parameters(self):
        return int(sum(p.data.size for p in self.parameters()))

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self):
        """OrderedDict name -> ndarray copy, parameters then buffers (names like 'trunk.0.weight')."""
        state = OrderedDict((n, p.data.copy()) for n, p in self.named_parameters())
        state.update((n, np.array(b, copy=True)) for n, b in self.named_buffers())
        return state

    def load_state_dict(self, state):
        """Copy arrays from `state` (name -> array) into this module. Names and shapes must match exactly."""
        targets = OrderedDict((n, p.data) for n, p in self.named_parameters())
        targets.update(self.named_buffers())
        missing = [n for n in targets if n not in state]
        unexpected = [n for n in state if n not in targets]
        wrong = [f"{n}: expected {targets[n].shape}, got {np.shape(state[n])}"
                 for n in targets if n in state and np.shape(state[n]) != targets[n].shape]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            if wrong:
                parts.append("shape mismatch " + "; ".join(wrong[:5]))
            raise ValueError(f"load_state_dict: state does not fit {type(self).__name__}: " + ", ".join(parts))
        for name, target in targets.items():
            np.copyto(target, np.asarray(state[name]), casting="same_kind")
        return self

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        inner = "\n".join(f"  ({n}): " + repr(c).replace("\n", "\n  ") for n, c in children)
        return f"{type(self).__name__}({self.extra_repr()}\n{inner}\n)"


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse.

    Children are named "0", "1", ... (``Sequential(a, b)`` or ``Sequential([a, b])``), or by the keys of a
    dict (``Sequential({"conv0": conv, "norm0": bn})``, PyTorch's OrderedDict form), which is how
    torchvision's DenseNet names its `features`.
    """

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], dict):
            names, layers = [str(k) for k in layers[0]], tuple(layers[0].values())
        else:
            if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
                layers = tuple(layers[0])
            names = [str(i) for i in range(len(layers))]
        for name, layer in zip(names, layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {name} is {type(layer).__name__}, not a Module")
        self.layers = list(layers)
        self.names = names

    def named_children(self):
        yield from zip(self.names, self.layers)

    def __getattr__(self, name):
        # Only reached when ordinary lookup fails: a child by its name (model.features.conv0, as in torch).
        names = self.__dict__.get("names", ())
        if name in names:
            return self.__dict__["layers"][names.index(name)]
        raise AttributeError(f"{type(self).__name__} has no attribute or child named {name!r}")

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout):
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout
