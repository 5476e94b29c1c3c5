"""Argument helpers shared by the op front end (chexcy.ops) and the NumPy fallback: one home for the
geometry formulas. (chexcy.reference keeps its own copy of the output-size formula on purpose: the oracle
does not share code with what it checks.)"""


def conv_output_size(size, kernel, stride=1, padding=0, dilation=1):
    """Output length along one axis: (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1.

    Used for conv and both pools (avg pool has dilation 1). It may be <= 0 for impossible geometry;
    the ops reject that.
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_hw(H, W, kernel_hw, stride, padding, dilation):
    """(OH, OW) of a window op over an H x W input; every geometry argument an (h, w) pair of ints."""
    return (conv_output_size(H, kernel_hw[0], stride[0], padding[0], dilation[0]),
            conv_output_size(W, kernel_hw[1], stride[1], padding[1], dilation[1]))
