"""Multi-label binary cross-entropy with logits, masked, with optional per-label positive weights.

For logit z, target y in [0, 1] and positive weight w (per label):
    l(z, y) = w * y * softplus(-z) + (1 - y) * softplus(z),      softplus(t) = log(1 + exp(t))
computed as softplus(t) = max(t, 0) + log1p(exp(-|t|)), which never overflows (exact at z = +-100 and far
beyond). The loss is the mean of l over the *present* labels (mask 1); masked labels (NaN targets, or mask 0)
contribute nothing, to the value or the gradient. With no present label the loss is 0 and the gradient 0.

    dl/dz = w * y * (sigmoid(z) - 1) + (1 - y) * sigmoid(z)

Shapes: logits (B, L) float32/float64, targets (B, L) (NaN = missing), mask (B, L) (1 = present) or None,
pos_weight (L,) or None. The arithmetic is done in float64 (the arrays are tiny) and the gradient returned
in the logits' dtype.
"""
import numpy as np


def softplus(t):
    """log(1 + exp(t)) elementwise without overflow. float64 in, float64 out."""
    return np.maximum(t, 0.0) + np.log1p(np.exp(-np.abs(t)))


def sigmoid(t):
    """1 / (1 + exp(-t)) elementwise without overflow warnings; same dtype as t (float)."""
    t = np.asarray(t)
    e = np.exp(-np.abs(t))
    return np.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(t.dtype if t.dtype.kind == "f" else np.float64)


def bce_with_logits(logits, targets, mask=None, pos_weight=None):
    """Masked mean BCE with logits. Returns (loss: float, dlogits: array like logits)."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"bce_with_logits: logits must be (B, L), got {logits.shape}")
    z = logits.astype(np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if y.shape != z.shape:
        raise ValueError(f"bce_with_logits: targets {y.shape} do not match logits {z.shape}")
    present = ~np.isnan(y)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != z.shape:
            raise ValueError(f"bce_with_logits: mask {mask.shape} does not match logits {z.shape}")
        present &= mask > 0
    y = np.where(present, y, 0.0)
    if ((y < 0) | (y > 1)).any():
        raise ValueError("bce_with_logits: present targets must lie in [0, 1] (apply the uncertainty policy "
                         "before the loss)")
    if pos_weight is None:
        w = 1.0
    else:
        w = np.asarray(pos_weight, dtype=np.float64)
        if w.shape != (z.shape[1],):
            raise ValueError(f"bce_with_logits: pos_weight must be ({z.shape[1]},), got {w.shape}")
    count = int(present.sum())
    if count == 0:
        return 0.0, np.zeros_like(logits)
    per_entry = w * y * softplus(-z) + (1.0 - y) * softplus(z)
    loss = float(per_entry[present].sum() / count)
    s = sigmoid(z)
    grad = (w * y * (s - 1.0) + (1.0 - y) * s) * present / count
    return loss, grad.astype(logits.dtype if logits.dtype.kind == "f" else np.float32)


class BCEWithLogitsLoss:
    """Callable form: `loss = criterion(logits, targets, mask)`, then `dlogits = criterion.backward()`."""

    def __init__(self, pos_weight=None):
        self.pos_weight = None if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
        self._grad = None

    def __call__(self, logits, targets, mask=None):
        return self.forward(logits, targets, mask)

    def forward(self, logits, targets, mask=None):
        loss, self._grad = bce_with_logits(logits, targets, mask, self.pos_weight)
        return loss

    def backward(self):
        if self._grad is None:
            raise RuntimeError("BCEWithLogitsLoss.backward called before forward")
        return self._grad
