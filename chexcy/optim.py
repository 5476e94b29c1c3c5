"""Optimisers (SGD with momentum/Nesterov/weight decay, AdamW) and learning-rate schedules.

Optimisers update `p.data` in place from `p.grad` for a list of Parameters (objects with .data, .grad
and .decay), in float32, with no per-step allocation of parameter-sized arrays beyond one scratch buffer.
As in PyTorch, the learning rate is given to the constructor and `step()` takes no argument:

    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        opt.zero_grad()                   # every p.grad = None
        model.backward(dlogits)           # SETS p.grad (chexcy does not accumulate; see chexcy.nn.module)
        opt.lr = lr_at(step)              # a schedule: set the attribute before the step
        opt.step()

Schedules (make_schedule) are pure functions of the global step, so a resumed run gets exactly the rates
of an uninterrupted one without any schedule state to save. `step()` refuses a parameter whose `.grad` is
None (no backward since `zero_grad()`), so a forgotten backward is an error, not a silent no-op.

SGD follows PyTorch's formulation (weight decay added to the gradient, L2 style):
    g = grad + wd * p;  buf = momentum * buf + g  (buf = g at the first step)
    p -= lr * (g + momentum * buf)  if nesterov else  lr * buf
AdamW (Loshchilov & Hutter), decoupled weight decay:
    p -= lr * wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
Weight decay applies only to parameters with `decay` True (conv/linear weights).
"""
import inspect
import math

import numpy as np


class Optimizer:
    """Common state handling: `state_dict()` -> dict of name -> ndarray or number; `load_state_dict`."""
    name = "optimizer"

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        self.lr = lr
        self.step_count = 0

    @property
    def lr(self):
        """The learning rate the next `step()` uses (a positive float; set it to follow a schedule)."""
        return self._lr

    @lr.setter
    def lr(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be a positive number, got {value!r}")
        self._lr = float(value)

    def zero_grad(self):
        """Forget every parameter's gradient (p.grad = None), as PyTorch's zero_grad(set_to_none=True)."""
        for p in self.params:
            p.grad = None

    def step(self):
        """One update of every parameter from its .grad with learning rate `self.lr`."""
        self._update(self._lr)
        self.step_count += 1

    def _slots(self):
        """Names of the per-parameter state arrays (e.g. ('momentum',))."""
        return ()

    def state_dict(self):
        state = {"step_count": self.step_count}
        for slot in self._slots():
            for i, buf in enumerate(getattr(self, slot)):
                if buf is not None:
                    state[f"{slot}.{i}"] = buf.copy()
        return state

    def load_state_dict(self, state):
        self.step_count = int(state["step_count"])
        for slot in self._slots():
            bufs = getattr(self, slot)
            for i, p in enumerate(self.params):
                key = f"{slot}.{i}"
                if key in state:
                    value = np.asarray(state[key])
                    if value.shape != p.data.shape:
                        raise ValueError(f"{type(self).__name__}.load_state_dict: {key} has shape {value.shape}, "
                                         f"parameter {i} has {p.data.shape}")
                    bufs[i] = value.astype(p.data.dtype, copy=True)
                else:
                    bufs[i] = None
        return self

    def _grads(self):
        for i, p in enumerate(self.params):
            if p.grad is None:
                raise RuntimeError(f"{type(self).__name__}.step: parameter {i} {p.data.shape} has no gradient "
                                   "(run backward first)")
            yield i, p, p.grad


class SGD(Optimizer):
    name = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.buffers = [None] * len(self.params)
        self._scratch_buffers = {}

    def _slots(self):
        return ("buffers",)

    def _scratch(self, like, k):
        """Scratch array k (0 or 1) shaped like `like`, a view of a flat buffer kept across steps: the
        update touches every parameter every step, and a fresh temporary per parameter costs an allocation
        (page faults for the large ones) on top of the arithmetic."""
        key = (k, like.dtype)
        flat = self._scratch_buffers.get(key)
        if flat is None or flat.size < like.size:
            flat = self._scratch_buffers[key] = np.empty(max(q.data.size for q in self.params), like.dtype)
        return flat[:like.size].reshape(like.shape)

    def _update(self, lr):
        # The same float32 operations in the same order as g = grad + wd * p; buf = m * buf + g;
        # p -= lr * buf (or lr * (g + m * buf)), with every temporary in a reused scratch array.
        lr, m, wd = np.float32(lr), np.float32(self.momentum), np.float32(self.weight_decay)
        for i, p, grad in self._grads():
            g = grad
            if self.weight_decay and p.decay:
                g = np.multiply(p.data, wd, out=self._scratch(p.data, 0))
                g += grad
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = np.array(g, dtype=p.data.dtype, copy=True)
                else:
                    buf *= m
                    buf += g
                if self.nesterov:
                    ahead = np.multiply(buf, m, out=self._scratch(p.data, 1))
                    ahead += g
                    g = ahead
                else:
                    g = buf
            p.data -= np.multiply(g, lr, out=self._scratch(p.data, 1))   # in place when g is scratch 1


class AdamW(Optimizer):
    name = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or eps <= 0 or weight_decay < 0:
            raise ValueError(f"AdamW: need 0 <= betas < 1, eps > 0, weight_decay >= 0; got {betas}, {eps}, "
                             f"{weight_decay}")
        self.beta1, self.beta2, self.eps, self.weight_decay = float(b1), float(b2), float(eps), float(weight_decay)
        self.exp_avg = [None] * len(self.params)
        self.exp_avg_sq = [None] * len(self.params)

    def _slots(self):
        return ("exp_avg", "exp_avg_sq")

    def _update(self, lr):
        t = self.step_count + 1
        bias1 = 1.0 - self.beta1 ** t
        bias2 = 1.0 - self.beta2 ** t
        for i, p, g in self._grads():
            if self.exp_avg[i] is None:
                self.exp_avg[i] = np.zeros_like(p.data)
                self.exp_avg_sq[i] = np.zeros_like(p.data)
            m, v = self.exp_avg[i], self.exp_avg_sq[i]
            if self.weight_decay and p.decay:
                p.data *= np.float32(1.0 - lr * self.weight_decay)
            m *= np.float32(self.beta1)
            m += np.float32(1.0 - self.beta1) * g
            v *= np.float32(self.beta2)
            v += np.float32(1.0 - self.beta2) * (g * g)
            denom = np.sqrt(v)
            denom *= np.float32(1.0 / math.sqrt(bias2))
            denom += np.float32(self.eps)
            p.data -= np.float32(lr / bias1) * (m / denom)


OPTIMIZERS = {"sgd": SGD, "adamw": AdamW}


def build_optimizer(name, params, lr=1e-3, momentum=0.9, nesterov=False, weight_decay=0.0, betas=(0.9, 0.999)):
    """The optimiser called `name` (a key of OPTIMIZERS) over `params`, starting at learning rate `lr`,
    given the options its class takes."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    options = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas)
    accepted = inspect.signature(cls).parameters
    return cls(params, lr=lr, **{key: value for key, value in options.items() if key in accepted})


# -- schedules: lr as a pure function of the global step (0-based) ---------------------------------------
SCHEDULES = ("constant", "step", "cosine")


def make_schedule(name, base_lr, total_steps, warmup_steps=0, step_size=None, gamma=0.1, min_lr=0.0):
    """A function global_step -> lr.

    constant: base_lr.  step: base_lr * gamma ** (step // step_size) (step_size in steps; default a third
    of the run).  cosine: from base_lr down to min_lr over total_steps (half a cosine period).
    warmup_steps > 0: a linear ramp from base_lr / warmup_steps up to base_lr over the first warmup_steps
    steps, after which the schedule runs on (counted from step 0, so warm-up replaces its start).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {list(SCHEDULES)}")
    if base_lr <= 0 or not math.isfinite(base_lr):
        raise ValueError(f"learning rate must be a positive number, got {base_lr}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"schedule: need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, "
                         f"{warmup_steps}")
    if step_size is None:
        step_size = max(1, total_steps // 3)
    if step_size < 1:
        raise ValueError(f"schedule: step_size must be >= 1, got {step_size}")

    def lr_at(step):
        if name == "constant":
            lr = base_lr
        elif name == "step":
            lr = base_lr * gamma ** (step // step_size)
        else:
            progress = min(step, total_steps) / total_steps
            lr = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
        if step < warmup_steps:
            lr = min(lr, base_lr * (step + 1) / warmup_steps)
        return lr

    return lr_at
