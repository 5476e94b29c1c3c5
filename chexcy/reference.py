"""NumPy reference for every op: the plainest correct formulation, the tests' oracle.

Legend: N batch, C in-channels, F out-channels, G groups, H W input, OH OW output, KH KW kernel,
sh sw stride, ph pw padding, dil_h dil_w dilation. Gradients are d + the full name.

Every function here follows the definition of the op literally: it visits each output position,
gathers that position's window of inputs and applies the formula. Nothing is shared with the
vectorised fallback (chexcy._fallback) or the compiled kernels (chexcy._ops), so that agreement
between them means something. It is slow (a Python loop over output positions) and meant for the
small shapes of the test suite.

Same signatures as the other backends (see chexcy.ops for the public API and the checks): arguments
arrive validated, stride / padding / dilation / kernel_size as (h, w) tuples of ints and padding
symmetric. Unlike the compiled kernels, these functions work for float32 AND float64 (the gradient
checks run them in float64); results have the inputs' floating dtype.
"""
import numpy as np


def _out_size(size, kernel, stride, padding, dilation):
    # Same formula as chexcy.ops.conv_output_size, written out again on purpose: the oracle does not
    # import the code it checks.
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _taps(o, stride, padding, dilation, kernel):
    """Input coordinates (possibly in the padding: < 0 or >= size) of window `o`'s kernel taps."""
    return o * stride - padding + dilation * np.arange(kernel)


# ----------------------------------------------------------------------------------------------
# conv2d

def conv2d_forward(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=False,
                   weight_scale=None):
    """out[n, f, oh, ow] = bias[f] + sum over (c, i, j) of weight[f, c, i, j] * x_pad[n, g*Cg + c, taps].

    x (N, C, H, W), weight (F, C // groups, KH, KW), bias (F,) or None -> out (N, F, OH, OW); then
    out + residual (when given) and relu_forward of that (relu=True). weight_scale (F,): the weight times it
    first.
    """
    if weight_scale is not None:
        weight = weight * weight_scale[:, None, None, None]
    N, C, H, W = x.shape
    F, Cg, KH, KW = weight.shape
    (sh, sw), (ph, pw), (dil_h, dil_w) = stride, padding, dilation
    OH, OW = _out_size(H, KH, sh, ph, dil_h), _out_size(W, KW, sw, pw, dil_w)
    Fg = F // groups
    dtype = np.result_type(x, weight)
    x_pad = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype)
    x_pad[:, :, ph:ph + H, pw:pw + W] = x
    out = np.zeros((N, F, OH, OW), dtype)
    for g in range(groups):
        x_g = x_pad[:, g * Cg:(g + 1) * Cg]             # (N, Cg, H + 2ph, W + 2pw)
        w_g = weight[g * Fg:(g + 1) * Fg]               # (Fg, Cg, KH, KW)
        for oh in range(OH):
            rows = _taps(oh, sh, 0, dil_h, KH)          # in x_pad coordinates: no padding offset
            for ow in range(OW):
                cols = _taps(ow, sw, 0, dil_w, KW)
                window = x_g[:, :, rows[:, None], cols[None, :]]          # (N, Cg, KH, KW)
                out[:, g * Fg:(g + 1) * Fg, oh, ow] = np.einsum("nckl,fckl->nf", window, w_g)
    if bias is not None:
        out += bias[None, :, None, None]
    if relu:
        return relu_forward(out, True, residual)
    if residual is not None:
        out += residual
    return out


def conv2d_backward(dout, x, weight, stride, padding, dilation, groups):
    """Gradients of conv2d_forward: each output position sends dout back along its window.

    dout (N, F, OH, OW), x (N, C, H, W), weight (F, C // groups, KH, KW)
    -> dx (N, C, H, W), dweight (F, C // groups, KH, KW), dbias (F,).
    """
    N, C, H, W = x.shape
    F, Cg, KH, KW = weight.shape
    (sh, sw), (ph, pw), (dil_h, dil_w) = stride, padding, dilation
    OH, OW = dout.shape[2], dout.shape[3]
    Fg = F // groups
    dtype = np.result_type(dout, x, weight)
    x_pad = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype)
    x_pad[:, :, ph:ph + H, pw:pw + W] = x
    dx_pad = np.zeros_like(x_pad)
    dweight = np.zeros(weight.shape, dtype)
    for g in range(groups):
        cs = slice(g * Cg, (g + 1) * Cg)
        fs = slice(g * Fg, (g + 1) * Fg)
        w_g = weight[fs]
        for oh in range(OH):
            rows = _taps(oh, sh, 0, dil_h, KH)
            for ow in range(OW):
                cols = _taps(ow, sw, 0, dil_w, KW)
                d = dout[:, fs, oh, ow]                                   # (N, Fg)
                window = x_pad[:, cs][:, :, rows[:, None], cols[None, :]]  # (N, Cg, KH, KW)
                dweight[fs] += np.einsum("nf,nckl->fckl", d, window)
                # The taps of one window are distinct positions (dilation >= 1), so the fancy-index
                # += below adds each contribution exactly once.
                dx_pad[:, cs, rows[:, None], cols[None, :]] += np.einsum("nf,fckl->nckl", d, w_g)
    dx = dx_pad[:, :, ph:ph + H, pw:pw + W].copy()
    dbias = dout.sum(axis=(0, 2, 3)).astype(dtype)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# pooling

def _valid(taps, size):
    """The taps that fall inside the input (not in the padding)."""
    return taps[(taps >= 0) & (taps < size)]


def max_pool2d_forward(x, kernel_size, stride, padding, dilation):
    """out[n, c, oh, ow] = max of x over the window's taps inside the input (padding is -inf).

    x (N, C, H, W) -> out (N, C, OH, OW), argmax int64 (N, C, OH, OW) holding h * W + w of the
    first maximum in row-major (kh, kw) scan order.
    """
    N, C, H, W = x.shape
    (KH, KW), (sh, sw), (ph, pw), (dil_h, dil_w) = kernel_size, stride, padding, dilation
    OH, OW = _out_size(H, KH, sh, ph, dil_h), _out_size(W, KW, sw, pw, dil_w)
    out = np.empty((N, C, OH, OW), x.dtype)
    argmax = np.empty((N, C, OH, OW), np.int64)
    for oh in range(OH):
        rows = _valid(_taps(oh, sh, ph, dil_h, KH), H)
        for ow in range(OW):
            cols = _valid(_taps(ow, sw, pw, dil_w, KW), W)
            # Padding taps can never be the maximum, so only the taps inside the input are looked at;
            # their row-major order is the window's scan order.
            flat = (rows[:, None] * W + cols[None, :]).ravel()           # (T,)
            values = x.reshape(N, C, H * W)[:, :, flat]                  # (N, C, T)
            first_max = np.argmax(values, axis=2)                         # first occurrence wins
            argmax[:, :, oh, ow] = flat[first_max]
            out[:, :, oh, ow] = np.take_along_axis(values, first_max[:, :, None], axis=2)[:, :, 0]
    return out, argmax


def max_pool2d(x, kernel_size, stride, padding, dilation):
    """max_pool2d_forward's out alone."""
    return max_pool2d_forward(x, kernel_size, stride, padding, dilation)[0]


def max_pool2d_backward(dout, argmax, x_shape):
    """dx[n, c].flat[argmax[n, c, oh, ow]] += dout[n, c, oh, ow]; dout, argmax (N, C, OH, OW) -> dx x_shape."""
    N, C, H, W = x_shape
    dx = np.zeros((N, C, H * W), dout.dtype)
    for n in range(N):
        for c in range(C):
            # np.add.at accumulates repeated indices (overlapping windows that share a maximum).
            np.add.at(dx[n, c], argmax[n, c].ravel(), dout[n, c].ravel())
    return dx.reshape(N, C, H, W)


def _avg_divisor(rows, cols, kernel_size, count_include_pad):
    return kernel_size[0] * kernel_size[1] if count_include_pad else rows.size * cols.size


def avg_pool2d_forward(x, kernel_size, stride, padding, count_include_pad):
    """out = sum of the window's taps inside the input / divisor, where the divisor is KH * KW when
    count_include_pad (zero padding counts) and the number of taps inside the input otherwise.

    x (N, C, H, W) -> out (N, C, OH, OW).
    """
    N, C, H, W = x.shape
    (KH, KW), (sh, sw), (ph, pw) = kernel_size, stride, padding
    OH, OW = _out_size(H, KH, sh, ph, 1), _out_size(W, KW, sw, pw, 1)
    out = np.empty((N, C, OH, OW), x.dtype)
    for oh in range(OH):
        rows = _valid(_taps(oh, sh, ph, 1, KH), H)
        for ow in range(OW):
            cols = _valid(_taps(ow, sw, pw, 1, KW), W)
            total = x[:, :, rows[:, None], cols[None, :]].sum(axis=(2, 3))
            out[:, :, oh, ow] = total / _avg_divisor(rows, cols, kernel_size, count_include_pad)
    return out


def avg_pool2d_backward(dout, x_shape, kernel_size, stride, padding, count_include_pad):
    """Each output position spreads dout / divisor over its window's taps inside the input.

    dout (N, C, OH, OW) -> dx x_shape (N, C, H, W).
    """
    N, C, H, W = x_shape
    (KH, KW), (sh, sw), (ph, pw) = kernel_size, stride, padding
    OH, OW = dout.shape[2], dout.shape[3]
    dx = np.zeros((N, C, H, W), dout.dtype)
    for oh in range(OH):
        rows = _valid(_taps(oh, sh, ph, 1, KH), H)
        for ow in range(OW):
            cols = _valid(_taps(ow, sw, pw, 1, KW), W)
            share = dout[:, :, oh, ow] / _avg_divisor(rows, cols, kernel_size, count_include_pad)
            dx[:, :, rows[:, None], cols[None, :]] += share[:, :, None, None]
    return dx


def global_avg_pool2d_forward(x):
    """out[n, c] = mean of x[n, c] over (H, W); x (N, C, H, W) -> out (N, C)."""
    N, C, H, W = x.shape
    return x.reshape(N, C, H * W).sum(axis=2) / (H * W)


def global_avg_pool2d_backward(dout, x_shape):
    """Every input position receives dout[n, c] / (H * W); dout (N, C) -> dx x_shape (N, C, H, W)."""
    N, C, H, W = x_shape
    dx = np.empty((N, C, H, W), dout.dtype)
    dx[...] = (dout / (H * W))[:, :, None, None]
    return dx


# ----------------------------------------------------------------------------------------------
# relu

def relu_forward(x, inplace, residual=None):
    """out = s where s >= 0 (or s is NaN), else 0, for s = x (+ residual); written into x when inplace."""
    s = x if residual is None else x + residual
    out = x if inplace else s.copy()
    out[...] = s
    out[s < 0] = 0
    return out


def relu_backward(dout, y):
    """dx = dout where the output y is positive, else 0 (the derivative at 0 taken as 0, as PyTorch)."""
    dx = np.zeros_like(dout)
    dx[y > 0] = dout[y > 0]
    return dx


# ----------------------------------------------------------------------------------------------
# linear

def linear_forward(x, weight, bias):
    """out[n, o] = sum_i x[n, i] * weight[o, i] + bias[o]; x (N, I), weight (O, I), bias (O,) or None."""
    out = np.einsum("ni,oi->no", x, weight)
    if bias is not None:
        out = out + bias[None, :]
    return out


def linear_backward(dout, x, weight):
    """dout (N, O) -> dx (N, I), dweight (O, I), dbias (O,)."""
    dx = np.einsum("no,oi->ni", dout, weight)
    dweight = np.einsum("no,ni->oi", dout, x)
    dbias = dout.sum(axis=0)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# batch norm (training mode)

def batch_norm2d_forward(x, weight, bias, eps):
    """Per channel c over (N, H, W): mean, biased var = mean((x - mean)^2), then
    out = (x - mean) / sqrt(var + eps) * weight + bias.

    x (N, C, H, W), weight (C,), bias (C,) -> (out (N, C, H, W), mean (C,), var (C,)), computed in
    float64 and returned in the inputs' floating dtype.
    """
    dtype = np.result_type(x, weight, bias)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    var = ((x64 - mean[:, None, None]) ** 2).mean(axis=(0, 2, 3))
    xhat = (x64 - mean[:, None, None]) / np.sqrt(var + eps)[:, None, None]
    out = xhat * weight.astype(np.float64)[:, None, None] + bias.astype(np.float64)[:, None, None]
    return out.astype(dtype), mean.astype(dtype), var.astype(dtype)


def batch_norm2d_backward(dout, x, mean, var, weight, eps):
    """Gradients of batch_norm2d_forward, mean and var being functions of x (M = N * H * W):
    xhat = (x - mean) / sqrt(var + eps), dbias = sum(dout), dweight = sum(dout * xhat) and
    dx = weight / sqrt(var + eps) * (dout - sum(dout) / M - xhat * sum(dout * xhat) / M).

    dout, x (N, C, H, W), mean, var, weight (C,) -> (dx, dweight (C,), dbias (C,)); float64 inside.
    """
    dtype = np.result_type(dout, x, weight)
    M = x.shape[0] * x.shape[2] * x.shape[3]
    dout64 = dout.astype(np.float64)
    inv_std = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    xhat = (x.astype(np.float64) - mean.astype(np.float64)[:, None, None]) * inv_std[:, None, None]
    dbias = dout64.sum(axis=(0, 2, 3))
    dweight = (dout64 * xhat).sum(axis=(0, 2, 3))
    dx = (weight.astype(np.float64) * inv_std)[:, None, None] * (
        dout64 - (dbias / M)[:, None, None] - xhat * (dweight / M)[:, None, None])
    return dx.astype(dtype), dweight.astype(dtype), dbias.astype(dtype)


# ----------------------------------------------------------------------------------------------
# batch norm in two halves (statistics, then the elementwise map)

def batch_norm2d_plane_stats(x):
    """x (N, C, H, W) -> (plane_sum (C, N), plane_m2 (C, N)) float64: each plane's sum and sum of squared
    deviations from its own mean."""
    x64 = x.astype(np.float64)
    plane_sum = x64.sum(axis=(2, 3))
    plane_mean = x64.mean(axis=(2, 3))
    plane_m2 = ((x64 - plane_mean[:, :, None, None]) ** 2).sum(axis=(2, 3))
    return plane_sum.T.copy(), plane_m2.T.copy()


def batch_norm2d_apply(x, mean, var, weight, bias, eps, relu=False, out=None):
    """out = (x - mean) / sqrt(var + eps) * weight + bias (then max(., 0) when relu), in float64,
    returned in x's dtype (or written into out)."""
    xhat = (x.astype(np.float64) - mean[:, None, None]) / np.sqrt(var + eps)[:, None, None]
    y = xhat * weight.astype(np.float64)[:, None, None] + bias.astype(np.float64)[:, None, None]
    if relu:
        y = np.maximum(y, 0)
    if out is None:
        return y.astype(x.dtype)
    out[...] = y
    return out


def batch_norm2d_plane_grad_sums(dout, x, mean):
    """-> (plane_g (C, N), plane_gx (C, N)) float64: per plane sum(dout) and sum(dout * (x - mean))."""
    dout64 = dout.astype(np.float64)
    centred = x.astype(np.float64) - mean.astype(np.float64)[:, None, None]
    return dout64.sum(axis=(2, 3)).T.copy(), (dout64 * centred).sum(axis=(2, 3)).T.copy()


def batch_norm2d_backward_apply(dout, x, mean, var, weight, sum_g, sum_gx, count, eps):
    """dx = weight / sqrt(var + eps) * (dout - sum_g / count - xhat * sum(dout * xhat) / count), where
    sum(dout * xhat) = sum_gx / sqrt(var + eps); float64 inside, returned in dout's dtype."""
    inv_std = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    xhat = (x.astype(np.float64) - mean.astype(np.float64)[:, None, None]) * inv_std[:, None, None]
    dx = (weight.astype(np.float64) * inv_std)[:, None, None] * (
        dout.astype(np.float64) - (sum_g / count)[:, None, None] - xhat * (sum_gx * inv_std / count)[:, None, None])
    return dx.astype(dout.dtype)
