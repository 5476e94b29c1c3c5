"""Layers: each a forward and a backward built on `chexcy.ops` (the kernels) or plain NumPy.

Legend: N batch, C channels, H W height width, F output channels, D features. Activations are NCHW.

Layers call the kernels through `kernels()`, which is `chexcy.ops` (validation, float32, the chosen
backend). `use_kernels(chexcy.reference)` routes them straight to a backend module instead; the gradient
tests use it to run whole layers and models in float64 against finite differences (chexcy.ops converts to
float32 by contract, which would drown a finite-difference check in rounding). For that reason every
layer passes stride/padding/... to the kernels already normalised, as (h, w) tuples of ints.

Layers hold the cache of one forward pass. Backward returns the input gradient and sets `.grad`.
The NumPy layers (ReLU, Dropout, Flatten) preserve the dtype of their input, and so does BatchNorm2d
(training-mode kernels through `kernels()` for float32, NumPy for other dtypes: see its docstring).
"""
import contextlib
import math

import numpy as np

from chexcy.nn.init import default_generator, he_normal
from chexcy.nn.module import Module, Parameter, Sequential

_kernel_override = None


def kernels():
    """The module whose conv/pool/linear functions the layers call (chexcy.ops unless overridden)."""
    if _kernel_override is not None:
        return _kernel_override
    from chexcy import ops
    return ops


@contextlib.contextmanager
def use_kernels(module):
    """Within the block, layers call `module` (e.g. chexcy.reference) directly instead of chexcy.ops."""
    global _kernel_override
    previous, _kernel_override = _kernel_override, module
    try:
        yield module
    finally:
        _kernel_override = previous


def _pair(value, name):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _nonneg_pair(value, name, minimum=0):
    pair = _pair(value, name)
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


class Conv2d(Module):
    """2-D convolution (cross-correlation, like PyTorch). x (N, C, H, W) -> (N, F, OH, OW).

    weight (F, C // groups, KH, KW) He-normal initialised; bias (F,) zeros (or None with bias=False).
    padding: int, (h, w), "valid" or "same" (stride 1).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, rng=None):
        if in_channels < 1 or out_channels < 1 or groups < 1:
            raise ValueError(f"Conv2d: channels and groups must be >= 1, got in={in_channels}, "
                             f"out={out_channels}, groups={groups}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = _nonneg_pair(kernel_size, "kernel_size", 1)
        self.stride = _nonneg_pair(stride, "stride", 1)
        self.dilation = _nonneg_pair(dilation, "dilation", 1)
        self.padding = self._resolve_padding(padding)
        kh, kw = self.kernel_size
        fan_in = (in_channels // groups) * kh * kw
        rng = rng if rng is not None else default_generator()
        self.weight = Parameter(he_normal((out_channels, in_channels // groups, kh, kw), fan_in, rng))
        self.bias = Parameter(np.zeros(out_channels, np.float32), decay=False) if bias else None
        self._x = None

    def _resolve_padding(self, padding):
        if isinstance(padding, str):
            if padding == "valid":
                return (0, 0)
            if padding == "same":
                if self.stride != (1, 1):
                    raise ValueError(f"Conv2d: padding='same' needs stride 1, got stride={self.stride}")
                totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
                if all(t % 2 == 0 for t in totals):
                    return (totals[0] // 2, totals[1] // 2)
                return "same"     # odd total padding: chexcy.ops pads the extra row/column itself
            raise ValueError(f"Conv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        return _nonneg_pair(padding, "padding")

    def forward(self, x):
        self._x = x
        return kernels().conv2d_forward(x, self.weight.data, None if self.bias is None else self.bias.data,
                                        self.stride, self.padding, self.dilation, self.groups)

    def backward(self, dout):
        dx, dweight, dbias = kernels().conv2d_backward(dout, self._x, self.weight.data, self.stride,
                                                       self.padding, self.dilation, self.groups)
        self.weight.grad = dweight
        if self.bias is not None:
            self.bias.grad = dbias
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride},"
                f" padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


class MaxPool2d(Module):
    """Max pooling (padding counts as -inf; stride None = kernel_size). x (N, C, H, W) -> (N, C, OH, OW).

    In eval mode the forward forms no argmax (chexcy.ops.max_pool2d) and keeps x instead; a backward after
    it (Grad-CAM, gradient checks) first finds the argmax from x."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        self.kernel_size = _nonneg_pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _nonneg_pair(stride, "stride", 1)
        self.padding = _nonneg_pair(padding, "padding")
        self.dilation = _nonneg_pair(dilation, "dilation", 1)
        self._argmax = self._x_shape = self._x = None

    def _args(self):
        return self.kernel_size, self.stride, self.padding, self.dilation

    def forward(self, x):
        self._x_shape = tuple(int(s) for s in x.shape)
        if not self.training:
            self._argmax, self._x = None, x
            return kernels().max_pool2d(x, *self._args())
        self._x = None
        out, self._argmax = kernels().max_pool2d_forward(x, *self._args())
        return out

    def backward(self, dout):
        if self._argmax is None and self._x is not None:
            self._argmax = kernels().max_pool2d_forward(self._x, *self._args())[1]
            self._x = None
        return kernels().max_pool2d_backward(dout, self._argmax, self._x_shape)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    """Average pooling. x (N, C, H, W) -> (N, C, OH, OW)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        self.kernel_size = _nonneg_pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _nonneg_pair(stride, "stride", 1)
        self.padding = _nonneg_pair(padding, "padding")
        self.count_include_pad = bool(count_include_pad)
        self._x_shape = None

    def forward(self, x):
        self._x_shape = tuple(int(s) for s in x.shape)
        return kernels().avg_pool2d_forward(x, self.kernel_size, self.stride, self.padding,
                                            self.count_include_pad)

    def backward(self, dout):
        return kernels().avg_pool2d_backward(dout, self._x_shape, self.kernel_size, self.stride, self.padding,
                                             self.count_include_pad)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool2d(Module):
    """Mean over H and W. x (N, C, H, W) -> (N, C)."""

    def forward(self, x):
        self._x_shape = tuple(int(s) for s in x.shape)
        return kernels().global_avg_pool2d_forward(x)

    def backward(self, dout):
        return kernels().global_avg_pool2d_backward(dout, self._x_shape)


class Linear(Module):
    """y = x @ W.T + b. x (N, in_features) -> (N, out_features); weight (out, in) He-normal, bias zeros."""

    def __init__(self, in_features, out_features, bias=True, rng=None, gain=math.sqrt(2.0)):
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear: features must be >= 1, got in={in_features}, out={out_features}")
        rng = rng if rng is not None else default_generator()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(he_normal((out_features, in_features), in_features, rng, gain=gain))
        self.bias = Parameter(np.zeros(out_features, np.float32), decay=False) if bias else None
        self._x = None

    def forward(self, x):
        self._x = x
        return kernels().linear_forward(x, self.weight.data, None if self.bias is None else self.bias.data)

    def backward(self, dout):
        dx, dweight, dbias = kernels().linear_backward(dout, self._x, self.weight.data)
        self.weight.grad = dweight
        if self.bias is not None:
            self.bias.grad = dbias
        return dx

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class ReLU(Module):
    """max(x, 0), any shape. inplace=True overwrites x (use only on a fresh array no one else keeps).

    Both passes are chexcy.ops.relu_forward / relu_backward (or the kernels() override's): one pass over
    memory each, on every thread.
    """

    def __init__(self, inplace=False):
        self.inplace = bool(inplace)
        self._out = None

    def forward(self, x, residual=None):
        """max(x, 0); with residual (x's shape), max(x + residual, 0): a residual block's sum and its ReLU
        in one pass where the kernels take both arrays as they are."""
        compiled_ok = (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
                       and x.flags.writeable)
        if residual is not None:
            if compiled_ok and isinstance(residual, np.ndarray) and residual.dtype == np.float32 \
                    and residual.shape == x.shape and not np.may_share_memory(residual, x):
                self._out = kernels().relu_forward(x, self.inplace, residual=residual)
                return self._out
            x = np.add(x, residual, out=x) if self.inplace and compiled_ok else x + residual
        if self.inplace and not compiled_ok:
            out = np.maximum(x, 0, out=x)        # in place on an array the compiled op cannot take
        else:
            out = kernels().relu_forward(x, self.inplace)
        self._out = out
        return out

    def backward(self, dout):
        # The derivative at exactly 0 is taken as 0 (PyTorch's choice).
        return kernels().relu_backward(dout, self._out)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class Flatten(Module):
    """(N, ...) -> (N, prod(...)); backward restores the shape."""

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self._shape)


class Dropout(Module):
    """Inverted dropout: in training zero each element with probability p and scale the rest by 1/(1-p).

    Randomness comes from `self.rng` (np.random.Generator; at first the module-level generator that
    `chexcy.manual_seed` seeds), which the training loop replaces every step with one derived from
    (seed, epoch, step), so masks are reproducible across a resume. Identity in eval.

    Over a global batch: with `comm` (a chexcy.comm communicator of K > 1 ranks) and `global_rows` (the rows
    of the global batch, set each step by chexcy.parallel), this rank's input holds its contiguous part of
    the global batch (chexcy.comm.shard_bounds); the layer draws the mask of the whole global batch from
    `rng` and keeps its rows, so the masks equal one process's on the whole batch. The mask of the global
    batch costs little: dropout sits on small feature vectors.
    """

    def __init__(self, p=0.5, comm=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = default_generator()
        self.comm = comm
        self.global_rows = None
        self._mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if self.comm is not None and self.comm.size > 1 and self.global_rows is not None:
            from chexcy.comm import shard_bounds
            lo, hi = shard_bounds(int(self.global_rows), self.comm.rank, self.comm.size)
            if hi - lo != x.shape[0]:
                raise ValueError(f"Dropout: this rank holds {x.shape[0]} rows but its shard of a global batch of "
                                 f"{self.global_rows} is {hi - lo}")
            keep = self.rng.random((int(self.global_rows),) + x.shape[1:], dtype=np.float32)[lo:hi] >= self.p
        else:
            keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
        self._mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, dout):
        return dout if self._mask is None else dout * self._mask

    def extra_repr(self):
        return f"p={self.p}"


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel. x (N, C, H, W) -> same shape.

    Training uses the batch mean and biased variance and updates running estimates
    (running = (1 - momentum) * running + momentum * batch, with the unbiased variance, as PyTorch does);
    eval uses the running estimates. weight (C,) ones, bias (C,) zeros; buffers running_mean/var (C,).

    Training forward and backward are the ops `batch_norm2d_forward` / `batch_norm2d_backward` (compiled
    kernels under chexcy.ops). The layer keeps the input x and the batch mean and var (not a normalised
    copy of x): backward recomputes xhat from them. float32 input goes through `kernels()`; other float
    input under the default kernels (chexcy.ops, which computes in float32) runs the same formulas in
    NumPy (chexcy._fallback) so the layer keeps its input's dtype, like the other NumPy-backed layers.

    comm (a chexcy.comm communicator, or None): with more than one rank, training uses the statistics of
    the global batch whose rows the ranks hold (synchronised batch norm, PyTorch's SyncBatchNorm):
    forward gathers every rank's per-plane statistics (ops.batch_norm2d_plane_stats, one allgather) and
    combines them in batch order (ops.batch_norm2d_combine_stats), so mean, var, the output and the
    running statistics equal one process's on the whole batch; backward sums the per-channel gradient
    sums over ranks (one Allreduce of 2C numbers). Both halves run the backend's kernels. `loss_weight`
    (this rank's number of loss terms, set each step by chexcy.parallel) converts this rank's gradient,
    the gradient of its own mean loss, into its share of the global mean's: dx uses
    sum_r(w_r * sums_r) / w_r. dweight and dbias stay this rank's sums; the gradient Allreduce weights them.
    """
    _buffers = ("running_mean", "running_var")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, comm=None):
        if num_features < 1:
            raise ValueError(f"BatchNorm2d: num_features must be >= 1, got {num_features}")
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.comm = comm
        self.loss_weight = 1.0
        self.weight = Parameter(np.ones(num_features, np.float32), decay=False)
        self.bias = Parameter(np.zeros(num_features, np.float32), decay=False)
        self.running_mean = np.zeros(num_features, np.float32)
        self.running_var = np.ones(num_features, np.float32)
        self._train_cache = None                # (x, batch mean, batch var) of a training forward
        self._eval_cache = None                 # (x, inv_std) of an eval forward

    @staticmethod
    def _batch_norm_ops(dtype):
        """The module whose batch_norm2d_* functions run for input of `dtype` (see the class doc)."""
        module = kernels()
        from chexcy import ops
        if module is ops and dtype != np.float32:
            from chexcy import _fallback
            return _fallback
        return module

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d: expected (N, {self.num_features}, H, W), got {x.shape}")
        dtype = x.dtype
        gamma = self.weight.data.astype(dtype, copy=False)
        beta = self.bias.data.astype(dtype, copy=False)
        if not self.training:
            inv_std = (1.0 / np.sqrt(self.running_var.astype(dtype) + dtype.type(self.eps)))[:, None, None]
            scale = gamma[:, None, None] * inv_std
            self._train_cache, self._eval_cache = None, (x, inv_std)
            out = np.multiply(x, scale)                 # one activation-sized array, shifted in place
            out += beta[:, None, None] - self.running_mean.astype(dtype)[:, None, None] * scale
            return out
        if self.synchronised:
            return self._forward_global_batch(x, gamma, beta)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if count < 2:
            raise ValueError(f"BatchNorm2d: training needs more than one value per channel, got input {x.shape}")
        out, mean, var = self._batch_norm_ops(dtype).batch_norm2d_forward(x, gamma, beta, self.eps)
        self._train_cache, self._eval_cache = (x, mean, var), None
        self.update_running_stats(mean, var, count)
        return out

    def last_forward(self):
        """(x, mean, var) of the last forward: its input and the per-channel statistics it normalised with
        (the batch's in training, the running ones in eval), so a caller can recompute its output."""
        if self._train_cache is not None:
            return self._train_cache
        return self._eval_cache[0], self.running_mean, self.running_var

    @property
    def synchronised(self):
        """True when training statistics span the ranks of `comm` (more than one)."""
        return self.comm is not None and self.comm.size > 1

    def _forward_global_batch(self, x, gamma, beta):
        """Training forward with the statistics of the batch over all ranks (see the class doc)."""
        from chexcy import ops
        module = self._batch_norm_ops(x.dtype)
        plane_sum, plane_m2 = module.batch_norm2d_plane_stats(x)
        parts = self.comm.allgather_object((plane_sum, plane_m2))     # rank order = batch order
        plane_sum = np.concatenate([p[0] for p in parts], axis=1)
        plane_m2 = np.concatenate([p[1] for p in parts], axis=1)
        count = plane_sum.shape[1] * x.shape[2] * x.shape[3]
        if count < 2:
            raise ValueError(f"BatchNorm2d: training needs more than one value per channel over all ranks, got "
                             f"{count} (local input {x.shape})")
        mean64, var64 = ops.batch_norm2d_combine_stats(plane_sum, plane_m2, x.shape[2] * x.shape[3])
        out = module.batch_norm2d_apply(x, mean64, var64, gamma, beta, self.eps)
        mean, var = mean64.astype(x.dtype), var64.astype(x.dtype)
        self._train_cache, self._eval_cache = (x, mean, var), None
        self._global_count = count
        self.update_running_stats(mean, var, count)
        return out

    def _backward_global_batch(self, dout, x, mean, var, gamma):
        module = self._batch_norm_ops(dout.dtype)
        plane_g, plane_gx = module.batch_norm2d_plane_grad_sums(dout, x, mean)
        C = self.num_features
        local = np.zeros((2, C))
        for n in range(plane_g.shape[1]):         # in plane order, as the fused kernel sums
            local[0] += plane_g[:, n]
            local[1] += plane_gx[:, n]
        s = 1.0 / np.sqrt(var.astype(np.float64) + self.eps)
        self.bias.grad = local[0].astype(dout.dtype)
        self.weight.grad = (local[1] * s).astype(dout.dtype)
        w = float(self.loss_weight)
        sums = np.ascontiguousarray(local * w)
        self.comm.allreduce_sum_(sums)
        if w <= 0:                                 # this rank's loss has no terms: it adds nothing
            return np.zeros_like(dout)
        return module.batch_norm2d_backward_apply(dout, x, mean, var, gamma, sums[0] / w, sums[1] / w,
                                                  float(self._global_count), self.eps)

    def update_running_stats(self, mean, var, count):
        """running = (1 - momentum) * running + momentum * batch, var made unbiased (* count / (count - 1)).

        mean, var (C,): a batch's per-channel mean and biased variance over `count` values per channel.
        """
        m = self.momentum
        self.running_mean *= (1 - m)
        self.running_mean += (m * mean).astype(self.running_mean.dtype)
        self.running_var *= (1 - m)
        self.running_var += (m * var * count / (count - 1)).astype(self.running_var.dtype)

    def backward(self, dout):
        if self._train_cache is None:
            # After an eval-mode forward the layer is the affine map gamma * (x - running_mean) * inv_std + beta.
            x, inv_std = self._eval_cache
            centred = (x - self.running_mean.astype(dout.dtype)[:, None, None]) * inv_std
            self.weight.grad = np.einsum("nchw,nchw->c", dout, centred)
            self.bias.grad = dout.sum(axis=(0, 2, 3))
            return dout * (self.weight.data.astype(dout.dtype, copy=False)[:, None, None] * inv_std)
        x, mean, var = self._train_cache
        gamma = self.weight.data.astype(dout.dtype, copy=False)
        if self.synchronised:
            return self._backward_global_batch(dout, x, mean, var, gamma)
        dx, self.weight.grad, self.bias.grad = self._batch_norm_ops(dout.dtype).batch_norm2d_backward(
            dout, x, mean, var, gamma, self.eps)
        return dx

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ResidualBlock(Module):
    """Basic residual block: conv3x3(stride) BN ReLU conv3x3 BN, plus a shortcut, then ReLU.

    The shortcut is the identity when shapes agree, else conv1x1(stride) + BN. x (N, C, H, W) ->
    (N, F, H', W') with H' = ceil(H / stride).
    """

    def __init__(self, in_channels, out_channels, stride=1, rng=None):
        rng = rng if rng is not None else default_generator()
        self.branch = Sequential(
            Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, rng=rng),
            BatchNorm2d(out_channels),
            ReLU(inplace=True),
            Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False, rng=rng),
            BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Sequential(
                Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, rng=rng),
                BatchNorm2d(out_channels))
        else:
            self.shortcut = None
        self.relu = ReLU(inplace=True)

    def forward(self, x):
        out = self.branch.forward(x)
        out += x if self.shortcut is None else self.shortcut.forward(x)
        return self.relu.forward(out)

    def backward(self, dout):
        d = self.relu.backward(dout)
        # The add fans the gradient out unchanged to both paths; the branch may scribble on its input
        # gradient (ReLU backward works in place), so the shortcut gets its own copy first.
        d_short = d.copy()
        dx = self.branch.backward(d)
        dx += d_short if self.shortcut is None else self.shortcut.backward(d_short)
        return dx

