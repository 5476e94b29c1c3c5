"""Evaluation-mode shortcuts shared by the deep networks: a convolution and the BatchNorm after it as one
convolution, with no activation-sized pass of NumPy left for the BatchNorm.

In eval mode BatchNorm2d is the per-channel affine map y = h * s + t with s = gamma / sqrt(running_var +
eps) and t = beta - running_mean * s. After a convolution h = conv(x, W) + b this is conv(x, W * s) + (b * s
+ t): the scale goes into the (small) weight, the shift into the bias that the conv kernel adds while it
writes its output. The result equals the two layers' up to float rounding (a few ulp).

Nothing is kept for backward (forward-only evaluation is what eval mode is for). Backward through an
eval-mode network still works (Grad-CAM, the gradient checks): `FoldedPairs.restore()` reruns the two layers
unfolded from the kept input, which sets their usual caches, before the backward that needs them.
"""
import numpy as np

from chexcy.nn.layers import BatchNorm2d, Conv2d, ReLU, kernels


def foldable(conv, norm):
    """True when `norm` (eval mode) can be folded into the convolution `conv` before it."""
    return type(conv) is Conv2d and type(norm) is BatchNorm2d and not norm.training


def conv_bn_eval(conv, norm, x, relu=None, residual=None):
    """norm(conv(x)) for eval-mode BatchNorm2d `norm`, plus `residual` (an array of the output's shape) when
    given, then the ReLU module `relu` when given, x (N, C, H, W) -> (N, F, OH, OW) in x's dtype; the
    result is kept as the ReLU's output (what its backward reads).

    One convolution: the BatchNorm's scale goes to chexcy.ops.conv2d_forward as weight_scale (the kernels
    multiply the weight by it as they pack it: no scaled copy of the weight, which in NumPy had cost
    resnet50 18-20 ms a forward at batch 16, and had made a BatchNorm pass over the output the cheaper way
    where a weight outnumbers its output), the folded bias (F,) is formed anew on each call, so both always
    follow the current parameters, and the sum and ReLU go into the same call (its residual and relu)."""
    dtype = x.dtype
    w = conv.weight.data.astype(dtype, copy=False)
    scale = norm.weight.data.astype(dtype) / np.sqrt(norm.running_var.astype(dtype) + dtype.type(norm.eps))
    shift = norm.bias.data.astype(dtype) - norm.running_mean.astype(dtype) * scale
    if conv.bias is not None:
        shift += conv.bias.data.astype(dtype) * scale
    y = kernels().conv2d_forward(x, w, shift, conv.stride, conv.padding, conv.dilation, conv.groups,
                                 residual=residual, relu=relu is not None, weight_scale=scale)
    if relu is not None:
        relu._out = y
    return y


class FoldedPairs:
    """The (conv, norm) pairs a module's last eval forward ran folded, with their inputs, so that a backward
    can first restore the caches folding skipped. A training forward calls `clear()`."""

    def __init__(self):
        self._pairs = []

    def clear(self):
        self._pairs = []

    def run(self, conv, norm, x, relu=None, residual=None):
        """conv_bn_eval(conv, norm, x, relu, residual), remembering x for `restore`."""
        self._pairs.append((conv, norm, x))
        return conv_bn_eval(conv, norm, x, relu, residual)

    def restore(self):
        """Run every folded pair unfolded (its BatchNorm in eval mode, whatever the mode is now), so their
        backward finds the caches of the forward they stand for."""
        for conv, norm, x in self._pairs:
            training, norm.training = norm.training, False
            try:
                norm.forward(conv.forward(x))
            finally:
                norm.training = training
        self._pairs = []


def run_chain(layers, x, folded, residual=None, relu=None):
    """Apply `layers` in order to x, then add `residual` (when given) and apply the ReLU module `relu` (when
    given). In eval mode a Conv2d followed by a plain BatchNorm2d runs as one folded convolution (recorded
    in `folded`, a FoldedPairs), with a ReLU right after it handed to the same call, and a pair that ends
    the chain takes the residual and `relu` too. A training forward runs the layers one by one."""
    i, n = 0, len(layers)
    while i < n:
        layer = layers[i]
        if i + 1 < n and foldable(layer, layers[i + 1]):
            if i + 2 == n and (residual is not None or relu is not None):
                return folded.run(layer, layers[i + 1], x, relu, residual)
            after = layers[i + 2] if i + 2 < n and type(layers[i + 2]) is ReLU else None
            x = folded.run(layer, layers[i + 1], x, after)
            i += 2 if after is None else 3
        else:
            x = layer.forward(x)
            i += 1
    if relu is not None:
        return relu.forward(x, residual=residual)
    return x if residual is None else x + residual
