"""DenseNet-121 (Huang et al. 2017) with torchvision's structure and parameter names: CheXpert's baseline.

Legend: N batch, C channels, H W height width, g growth rate (32), L layers in a block. NCHW float32.

    model = build_model("densenet121", in_channels=1, num_classes=14)
    model.state_dict()   # features.conv0.weight, features.denseblock1.denselayer1.norm1.weight, ...,
                         # features.transition1.conv.weight, features.norm5.running_var, classifier.bias

features: conv0 7x7/2 -> norm0 -> relu0 -> pool0 3x3/2 pad 1 -> denseblock1 -> transition1 -> ...
-> denseblock4 -> norm5, then ReLU, global average pool and `classifier`. Dense layer i of a block sees
the concatenation of the block's input and every earlier layer's g new channels:
norm1 -> relu -> conv1 1x1 (-> bn_size * g) -> norm2 -> relu2 -> conv2 3x3 (-> g). A transition halves
channels and resolution: norm -> relu -> 1x1 conv -> 2x2 average pool.

How a dense block keeps memory linear in its depth (torchvision's plain variant holds one copy of the
growing concatenation per layer, and its normalised copy, which is quadratic):
- One buffer per block and forward pass, B (N, C0 + L * g, H, W), the block's output. Layer i writes
  its g channels into B[:, c_i : c_i + g] and reads the prefix B[:, :c_i]: nothing is concatenated.
- norm1 of every layer normalises a prefix of B. Batch statistics are per channel, so channel k has the
  same mean and variance whichever layer normalises it: the block computes them once, when the channel
  is written, and each layer applies only its own scale and shift.
- The convs' inputs relu(norm1(prefix)) and relu(norm2(h)) are formed in two scratch buffers shared by
  the block's layers and are not kept: backward recomputes them from the prefix and from h, the 1x1
  conv's output that norm2 keeps anyway (torchvision's "memory efficient" idea, taken one step further).
So a block holds B, two scratch buffers, and per layer h: bn_size * g channels (128 for densenet121).

A transition runs its 2x2 average pool before its 1x1 conv. Both are linear and act on different axes
(the conv mixes channels per pixel, the pool averages pixels per channel; the conv has no bias), so
pool(conv(z)) = conv(pool(z)) exactly in arithmetic, and the conv does 4x less work on 4x less input.

When norm1 is not a plain BatchNorm2d (or one synchronised over ranks in distributed training, whose statistics span
every rank), the layer calls it as a module on a contiguous copy of the prefix and keeps its output.

Initialisation as torchvision's: convs He-normal on fan_in, BatchNorm 1 and 0, classifier weight
U(-1/sqrt(D), 1/sqrt(D)) and bias 0.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from chexcy.nn.fold import FoldedPairs, conv_bn_eval, foldable, run_chain
from chexcy.nn.init import default_generator
from chexcy.nn.layers import AvgPool2d, BatchNorm2d, Conv2d, MaxPool2d, ReLU, kernels
from chexcy.nn.module import Module, Sequential
from chexcy.nn.resnet import NUM_CLASSES, ImageNetStyleClassifier

_ONE = ((1, 1), (0, 0), (1, 1), 1)       # stride, padding, dilation, groups of a 1x1 conv, normalised


def _channel_stats(x, eps):
    """Batch mean and biased variance per channel of x (N, C, H, W), as BatchNorm's forward computes them."""
    ones, zeros = np.ones(x.shape[1], x.dtype), np.zeros(x.shape[1], x.dtype)
    _, mean, var = BatchNorm2d._batch_norm_ops(x.dtype).batch_norm2d_forward(x, ones, zeros, eps)
    return mean, var


_pool = {"threads": 0, "executor": None}


def _forget_pool():
    _pool["threads"], _pool["executor"] = 0, None      # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _by_samples(fn, n):
    """Run fn(lo, hi) on sample ranges covering range(n), split between as many threads as the kernels
    use (chexcy.ops.get_num_threads). For the elementwise NumPy passes over a dense block's buffer, which
    are memory bound and release the GIL: one thread alone leaves the other core idle. Each element is
    computed by the same operations whatever the split, so results do not depend on the thread count."""
    from chexcy import ops
    threads = max(1, min(int(ops.get_num_threads()), n))
    if threads == 1 or n < 2:
        fn(0, n)
        return
    if _pool["threads"] < threads:
        if _pool["executor"] is not None:
            _pool["executor"].shutdown(wait=True)
        _pool["executor"] = ThreadPoolExecutor(threads - 1, thread_name_prefix="chexcy-dense")
        _pool["threads"] = threads
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool["executor"].submit(fn, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    fn(bounds[0], bounds[1])                            # this thread takes the first range
    for f in futures:
        f.result()


def _affine_relu(bn, x, mean, var, out):
    """out = relu(bn(x)) for BatchNorm2d `bn` normalising with statistics mean, var (C,); x, out (N, C, H, W).
    float32: one pass of the kernels' batch_norm2d_apply with its ReLU, reading x (a channel prefix of the
    block buffer) in place; other dtypes: NumPy passes split between threads."""
    dtype = out.dtype
    if dtype == np.float32 and x.dtype == np.float32:
        return kernels().batch_norm2d_apply(x, mean.astype(np.float64), var.astype(np.float64),
                                            bn.weight.data.astype(dtype, copy=False),
                                            bn.bias.data.astype(dtype, copy=False), bn.eps, relu=True, out=out)
    scale = bn.weight.data.astype(dtype, copy=False) / np.sqrt(var.astype(dtype, copy=False) + dtype.type(bn.eps))
    shift = bn.bias.data.astype(dtype, copy=False) - mean.astype(dtype, copy=False) * scale
    scale, shift = scale[:, None, None], shift[:, None, None]

    def rows(lo, hi):
        part = out[lo:hi]
        np.multiply(x[lo:hi], scale, out=part)
        part += shift
        np.maximum(part, 0, out=part)
    _by_samples(rows, x.shape[0])
    return out


def _add_into(target, values):
    """target += values, both (N, ...), split by samples between threads (target may be a strided view)."""
    def rows(lo, hi):
        target[lo:hi] += values[lo:hi]
    _by_samples(rows, target.shape[0])


class DenseLayer(Module):
    """One dense layer (norm1 relu conv1 norm2 relu2 conv2), run by its DenseBlock on a prefix of the
    block buffer: in_channels -> growth_rate new channels.

    Kept for backward: the block's buffer and statistics, and conv1's output h (N, bn_size * g, H, W)
    with norm2's batch statistics. Both ReLU outputs (the convs' inputs) are recomputed in backward from
    them, which costs an elementwise pass each and saves two activation-sized arrays per layer.
    """

    def __init__(self, in_channels, growth_rate, bn_size, rng):
        self.norm1 = BatchNorm2d(in_channels)
        self.conv1 = Conv2d(in_channels, bn_size * growth_rate, 1, bias=False, rng=rng)
        self.norm2 = BatchNorm2d(bn_size * growth_rate)
        self.relu2 = ReLU(inplace=True)
        self.conv2 = Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False, rng=rng)
        self.in_channels = in_channels
        self._kept = None            # norm1 -> relu output, module path only
        self._conv1_folded = False   # the last forward ran conv1 and norm2 as one conv (eval mode)

    def _shared_stats(self):
        """Whether the fast path applies: plain BatchNorm2d layers whose statistics span this process's
        batch only (a synchronised one's statistics span every rank, so it runs as a module)."""
        return all(type(n) is BatchNorm2d and not n.synchronised for n in (self.norm1, self.norm2))

    def _bottleneck_input(self, prefix, stats, out):
        """out = relu(norm1(prefix)) with the block's statistics (training) or the running ones (eval)."""
        norm = self.norm1
        mean, var = stats if norm.training else (norm.running_mean, norm.running_var)
        return _affine_relu(norm, prefix, mean, var, out)

    def _conv2_input(self, scratch2):
        """relu(norm2(h)) recomputed into scratch2 from what norm2 kept of its last forward."""
        h, mean, var = self.norm2.last_forward()
        return _affine_relu(self.norm2, h, mean, var, scratch2[:h.size].reshape(h.shape))

    def _conv2_args(self):
        c = self.conv2
        return c.stride, c.padding, c.dilation, c.groups

    def forward_into(self, buffer, c, stats, scratch, scratch2):
        """Compute this layer from buffer[:, :c] and return its (N, g, H, W) output.

        stats: (mean, var) of the buffer's first c channels in training (None in eval). scratch: a flat
        array of at least N * c * H * W elements, scratch2 one of N * bn_size * g * H * W: both may be
        overwritten (they hold the recomputable ReLU outputs).
        """
        N, _, H, W = buffer.shape
        prefix = buffer[:, :c]
        self._conv1_folded = False
        if not self._shared_stats():
            y = self.norm1.forward(np.ascontiguousarray(prefix))
            np.maximum(y, 0, out=y)
            self._kept = y
            h = kernels().conv2d_forward(y, self.conv1.weight.data, None, *_ONE)
            return self.conv2.forward(self.relu2.forward(self.norm2.forward(h)))
        y = self._bottleneck_input(prefix, stats, scratch[:N * c * H * W].reshape(N, c, H, W))
        if self.norm1.training:
            self.norm1.update_running_stats(stats[0], stats[1], N * H * W)
        self._conv1_folded = foldable(self.conv1, self.norm2)
        if self._conv1_folded:
            z = conv_bn_eval(self.conv1, self.norm2, y)   # eval: norm2 folded into conv1, h not kept
        else:
            h = kernels().conv2d_forward(y, self.conv1.weight.data, None, *_ONE)
            z = self.norm2.forward(h)                   # keeps h and the batch statistics
        kernels().relu_forward(z, True)                 # in place, on the kernels' threads
        return kernels().conv2d_forward(z, self.conv2.weight.data, None, *self._conv2_args())

    def backward_into(self, dnew, buffer, c, stats, scratch, scratch2, dprefix):
        """dnew (N, g, H, W), the gradient of this layer's output: adds the gradient of buffer[:, :c] to
        dprefix (N, c, H, W), a channel prefix of the block's gradient buffer.

        Sets .grad of the layer's parameters; recomputes both ReLU outputs into the scratch arrays.
        """
        N, _, H, W = buffer.shape
        prefix = buffer[:, :c]
        if self._conv1_folded:                          # the eval forward kept no h: compute it (and norm2's cache)
            y = self._bottleneck_input(prefix, stats, scratch[:N * c * H * W].reshape(N, c, H, W))
            self.norm2.forward(kernels().conv2d_forward(y, self.conv1.weight.data, None, *_ONE))
            self._conv1_folded = False
        if not self._shared_stats():
            dh = self.norm2.backward(self.relu2.backward(self.conv2.backward(dnew)))
            y, self._kept = self._kept, None
            dy, self.conv1.weight.grad, _ = kernels().conv2d_backward(dh, y, self.conv1.weight.data, *_ONE)
            np.multiply(dy, y > 0, out=dy)
            _add_into(dprefix, self.norm1.backward(dy))
            return
        z = self._conv2_input(scratch2)
        dz, self.conv2.weight.grad, _ = kernels().conv2d_backward(dnew, z, self.conv2.weight.data,
                                                                  *self._conv2_args())
        dh = self.norm2.backward(kernels().relu_backward(dz, z))
        y = self._bottleneck_input(prefix, stats, scratch[:N * c * H * W].reshape(N, c, H, W))
        dy, self.conv1.weight.grad, _ = kernels().conv2d_backward(dh, y, self.conv1.weight.data, *_ONE)
        dy = kernels().relu_backward(dy, y)
        norm = self.norm1
        if norm.training:
            bn = BatchNorm2d._batch_norm_ops(dy.dtype)
            weight = norm.weight.data.astype(dy.dtype, copy=False)
            from chexcy import ops
            if bn is ops:       # reads the prefix in place and adds dx into dprefix in the same pass
                _, norm.weight.grad, norm.bias.grad = ops.batch_norm2d_backward(
                    dy, prefix, stats[0], stats[1], weight, norm.eps, out=dprefix, accumulate=True)
                return
            dx, norm.weight.grad, norm.bias.grad = bn.batch_norm2d_backward(dy, prefix, stats[0], stats[1], weight,
                                                                           norm.eps)
            _add_into(dprefix, dx)
            return
        # Eval mode: norm1 is the affine map x * scale + shift with the running statistics.
        dtype = dy.dtype
        mean = norm.running_mean.astype(dtype)
        inv_std = 1 / np.sqrt(norm.running_var.astype(dtype) + dtype.type(norm.eps))
        norm.bias.grad = dy.sum(axis=(0, 2, 3))
        norm.weight.grad = np.einsum("nchw,nchw->c", dy, prefix - mean[:, None, None]) * inv_std
        dy *= (norm.weight.data.astype(dtype, copy=False) * inv_std)[:, None, None]
        _add_into(dprefix, dy)


class DenseBlock(Module):
    """L dense layers sharing one buffer. x (N, C0, H, W) -> (N, C0 + L * growth_rate, H, W): x followed
    by each layer's new channels in order (the concatenation torchvision builds). Children are named
    denselayer1 .. denselayerL, as torchvision's."""

    def __init__(self, num_layers, in_channels, bn_size, growth_rate, rng):
        self.layers = [DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, rng)
                       for i in range(num_layers)]
        self.in_channels, self.growth_rate = int(in_channels), int(growth_rate)
        self.out_channels = self.in_channels + num_layers * self.growth_rate
        self._cache = None

    def named_children(self):
        for i, layer in enumerate(self.layers):
            yield f"denselayer{i + 1}", layer

    def __getattr__(self, name):
        # Only reached when ordinary lookup fails: block.denselayer3 is self.layers[2], as in torch.
        layers = self.__dict__.get("layers", ())
        if name.startswith("denselayer") and name[len("denselayer"):].isdigit():
            i = int(name[len("denselayer"):])
            if 1 <= i <= len(layers):
                return layers[i - 1]
        raise AttributeError(f"{type(self).__name__} has no attribute or child named {name!r}")

    def forward(self, x):
        N, C0, H, W = x.shape
        if C0 != self.in_channels:
            raise ValueError(f"DenseBlock: expected (N, {self.in_channels}, H, W), got {x.shape}")
        g = self.growth_rate
        buffer = np.empty((N, self.out_channels, H, W), x.dtype)
        buffer[:, :C0] = x
        scratch = np.empty(N * (self.out_channels - g) * H * W, x.dtype)
        scratch2 = np.empty(N * self.layers[0].norm2.num_features * H * W, x.dtype)
        mean = var = None
        if self.training:
            eps = self.layers[0].norm1.eps
            mean, var = np.empty(self.out_channels, x.dtype), np.empty(self.out_channels, x.dtype)
            mean[:C0], var[:C0] = _channel_stats(x, eps)       # x, not its strided copy in the buffer
        for i, layer in enumerate(self.layers):
            c = C0 + i * g
            stats = (mean[:c], var[:c]) if self.training else None
            new = layer.forward_into(buffer, c, stats, scratch, scratch2)
            buffer[:, c:c + g] = new
            if self.training:
                mean[c:c + g], var[c:c + g] = _channel_stats(new, eps)
        self._cache = (buffer, mean, var, scratch, scratch2)
        return buffer

    def backward(self, dout):
        """dout (N, C0 + L * g, H, W) -> dx (N, C0, H, W). Accumulates into dout when it is writeable."""
        buffer, mean, var, scratch, scratch2 = self._cache
        dbuf = dout if dout.flags.writeable and dout.flags.c_contiguous else dout.copy()
        g = self.growth_rate
        for i in reversed(range(len(self.layers))):
            c = self.in_channels + i * g
            stats = (mean[:c], var[:c]) if mean is not None else None
            dnew = np.ascontiguousarray(dbuf[:, c:c + g])
            self.layers[i].backward_into(dnew, buffer, c, stats, scratch, scratch2, dbuf[:, :c])
        self._cache = None
        return np.ascontiguousarray(dbuf[:, :self.in_channels])


class Transition(Module):
    """norm -> relu -> 1x1 conv (C -> C_out) -> 2x2 average pool, computed as norm relu pool conv (the
    same function: see the module docstring). x (N, C, H, W) -> (N, C_out, H // 2, W // 2)."""

    def __init__(self, in_channels, out_channels, rng):
        self.norm = BatchNorm2d(in_channels)
        self.relu = ReLU(inplace=True)
        self.conv = Conv2d(in_channels, out_channels, 1, bias=False, rng=rng)
        self.pool = AvgPool2d(2, stride=2)

    def forward(self, x):
        return self.conv.forward(self.pool.forward(self.relu.forward(self.norm.forward(x))))

    def backward(self, dout):
        return self.norm.backward(self.relu.backward(self.pool.backward(self.conv.backward(dout))))


class DenseNetFeatures(Module):
    """`features` (conv0 ... norm5) and the ReLU after it: x (N, C, H, W) -> last feature map
    (N, out_channels, ~H/32, ~W/32), out_channels 1024 for densenet121. The trunk `multiview` uses for
    backbone "densenet121"."""

    def __init__(self, in_channels=1, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                 bn_size=4, rng=None):
        if int(in_channels) < 1:
            raise ValueError(f"densenet: in_channels must be >= 1, got {in_channels!r}")
        rng = rng if rng is not None else default_generator()
        parts = {"conv0": Conv2d(int(in_channels), num_init_features, 7, stride=2, padding=3, bias=False,
                                 rng=rng),
                 "norm0": BatchNorm2d(num_init_features),
                 # pool0 before relu0: the same function (see ResNetFeatures._stages) on a 4x smaller map
                 "pool0": MaxPool2d(3, stride=2, padding=1), "relu0": ReLU(inplace=True)}
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, bn_size, growth_rate, rng)
            parts[f"denseblock{i + 1}"] = block
            channels = block.out_channels
            if i != len(block_config) - 1:
                parts[f"transition{i + 1}"] = Transition(channels, channels // 2, rng)
                channels //= 2
        parts["norm5"] = BatchNorm2d(channels)
        self.features = Sequential(parts)
        self.relu = ReLU(inplace=True)
        self.out_channels = channels
        self._folded = FoldedPairs()

    def forward(self, x):
        self._folded.clear()                            # eval: conv0 and norm0 as one conv (chexcy.nn.fold)
        return self.relu.forward(run_chain(self.features.layers, x, self._folded))

    def backward(self, dout):
        self._folded.restore()
        return self.features.backward(self.relu.backward(dout))


class DenseNet(ImageNetStyleClassifier, DenseNetFeatures):
    """DenseNet with torchvision's names: x (N, in_channels, S, S) -> logits (N, num_classes).

    The defaults are densenet121; growth_rate, block_config, num_init_features and bn_size are
    torchvision's DenseNet arguments (small values give the small instances the tests check).
    dropout > 0 puts a Dropout before the classifier (no parameters, so the names stay torchvision's).
    """
    arch = "densenet121"
    _features = DenseNetFeatures
    _head_name = "classifier"

    def __init__(self, in_channels=1, num_classes=NUM_CLASSES, dropout=0.0, seed=0, growth_rate=32,
                 block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4):
        block_config = [int(b) for b in block_config]
        if not block_config or min(block_config) < 1:
            raise ValueError(f"densenet: block_config must list positive layer counts, got {block_config}")
        self.config = dict(in_channels=int(in_channels), num_classes=int(num_classes), dropout=float(dropout),
                           seed=int(seed), growth_rate=int(growth_rate), block_config=block_config,
                           num_init_features=int(num_init_features), bn_size=int(bn_size))
        rng = np.random.default_rng(seed)
        DenseNetFeatures.__init__(self, in_channels, int(growth_rate), block_config, int(num_init_features),
                                  int(bn_size), rng)
        self._attach_head(self.out_channels, num_classes, float(dropout), rng, bias_init="zeros")
