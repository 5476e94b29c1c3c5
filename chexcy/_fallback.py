"""Pure-Python backend: vectorised NumPy, used when the compiled kernels (chexcy._ops) are not built.

Legend: N batch, C in-channels, F out-channels, G groups (Cg = C // G, Fg = F // G), H W input,
OH OW output, KH KW kernel, sh sw stride, ph pw padding, dil_h dil_w dilation, K = Cg * KH * KW.

How it is fast without a compiler:
- conv2d is im2col + matrix products in BLAS. `_im2col` copies, for each of the KH * KW kernel
  offsets, one strided slice of the padded input into a "columns" array, so that the conv becomes
  weight (G, Fg, K) @ columns: ONE product per group over the whole batch (channel-major columns,
  the result transposed to NCHW once), or, for thin products (small K), one per image and group
  (columns per image, the result already NCHW). Backward: dweight = dout @ columns.T and
  dcolumns = weight.T @ dout, with the same layouts.
- col2im (conv dx) is the reverse of im2col: KH * KW strided slice-additions into a zero padded dx.
- pooling visits the KH * KW offsets, each a strided view of the whole batch, keeping a running max
  (or sum); max-pool backward scatters with one np.add.at (repeated argmax indices add up).
Each Python loop runs over kernel offsets only, never over pixels, channels or the batch.

Same signatures and contract as chexcy.reference and chexcy._ops (arguments checked by chexcy.ops).
Works for float32 (what ops passes) and float64; results have the inputs' dtype.
"""
import numpy as np

from chexcy._args import output_hw


def _offset_slices(i, j, OH, OW, stride, dilation):
    """The strided (rows, cols) slices of a padded input that kernel offset (i, j) touches."""
    (sh, sw), (dil_h, dil_w) = stride, dilation
    return (slice(i * dil_h, i * dil_h + sh * (OH - 1) + 1, sh),
            slice(j * dil_w, j * dil_w + sw * (OW - 1) + 1, sw))


def _pad(x, padding, value=0.0):
    """x (N, C, H, W) surrounded by `padding` rows/columns of `value` (x itself when padding is 0)."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    N, C, H, W = x.shape
    x_pad = np.full((N, C, H + 2 * ph, W + 2 * pw), value, x.dtype)
    x_pad[:, :, ph:ph + H, pw:pw + W] = x
    return x_pad


# Below this many rows per column (K = Cg * KH * KW) the products are so thin that moving the
# batch-wide result back to NCHW costs as much as the product itself (conv1 of ref-cnn: K = 9, the
# per-image layout is ~1.6x faster); above it, one product per group over the whole batch is as fast or
# faster (and much faster when BLAS threads compete with other processes). Measured on ref-cnn shapes.
PER_IMAGE_BELOW_K = 32


def _im2col(x, kernel_hw, stride, padding, dilation, per_image):
    """The input under every kernel tap of every output position (zero in the padding).

    per_image: columns (N, C, KH, KW, OH, OW), viewed as (N, G, K, OH * OW): one product per image
    and group whose result already is NCHW.
    otherwise: channel-major columns (C, KH, KW, N, OH, OW), viewed as (G, K, N * OH * OW): one
    product per group for the whole batch, whose (F, N, OH, OW) result is transposed to NCHW once.
    Either way each of the KH * KW kernel offsets is ONE strided copy of the whole batch.
    """
    N, C, H, W = x.shape
    KH, KW = kernel_hw
    OH, OW = output_hw(H, W, kernel_hw, stride, padding, dilation)
    x_pad = _pad(x, padding)
    if per_image:
        columns = np.empty((N, C, KH, KW, OH, OW), x.dtype)
        for i in range(KH):
            for j in range(KW):
                rows, cols = _offset_slices(i, j, OH, OW, stride, dilation)
                columns[:, :, i, j] = x_pad[:, :, rows, cols]
    else:
        x_cm = x_pad.transpose(1, 0, 2, 3)                   # (C, N, H + 2ph, W + 2pw), a view
        columns = np.empty((C, KH, KW, N, OH, OW), x.dtype)
        for i in range(KH):
            for j in range(KW):
                rows, cols = _offset_slices(i, j, OH, OW, stride, dilation)
                columns[:, i, j] = x_cm[:, :, rows, cols]
    return columns


def conv2d_forward(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=False,
                   weight_scale=None):
    """x (N, C, H, W), weight (F, Cg, KH, KW), bias (F,) or None -> out (N, F, OH, OW), + residual (when
    given), then max(., 0) (relu); weight_scale (F,): the weight times it first."""
    if weight_scale is not None:
        weight = weight * weight_scale[:, None, None, None]
    N, C, H, W = x.shape
    F, Cg, KH, KW = weight.shape
    G, K = groups, Cg * KH * KW
    OH, OW = output_hw(H, W, (KH, KW), stride, padding, dilation)
    per_image = K < PER_IMAGE_BELOW_K
    columns = _im2col(x, (KH, KW), stride, padding, dilation, per_image)
    weight_matrix = weight.reshape(G, F // G, K)
    if per_image:
        out = np.matmul(weight_matrix, columns.reshape(N, G, K, OH * OW)).reshape(N, F, OH, OW)
    else:
        out_cm = np.matmul(weight_matrix, columns.reshape(G, K, N * OH * OW))  # (G, Fg, N * OH * OW)
        out = np.ascontiguousarray(out_cm.reshape(F, N, OH, OW).transpose(1, 0, 2, 3))
    if bias is not None:
        out += bias[None, :, None, None]
    if relu:
        return relu_forward(out, True, residual)
    if residual is not None:
        out += residual
    return out


def conv2d_backward(dout, x, weight, stride, padding, dilation, groups):
    """dout (N, F, OH, OW) -> dx (N, C, H, W), dweight (F, Cg, KH, KW), dbias (F,)."""
    N, C, H, W = x.shape
    F, Cg, KH, KW = weight.shape
    G, K = groups, Cg * KH * KW
    OH, OW = dout.shape[2], dout.shape[3]
    ph, pw = padding
    per_image = K < PER_IMAGE_BELOW_K
    dbias = dout.sum(axis=(0, 2, 3))
    weight_t = weight.reshape(G, F // G, K).transpose(0, 2, 1)            # (G, K, Fg)
    columns = _im2col(x, (KH, KW), stride, padding, dilation, per_image)

    # dweight = dout @ columns.T and dcolumns = weight.T @ dout (per group); then col2im adds every
    # tap of dcolumns back onto the input position it was copied from.
    if per_image:
        dout_g = dout.reshape(N, G, F // G, OH * OW)
        dweight = np.matmul(dout_g, columns.reshape(N, G, K, OH * OW).transpose(0, 1, 3, 2)).sum(axis=0)
        del columns
        dcolumns = np.matmul(weight_t, dout_g).reshape(N, C, KH, KW, OH, OW)
        dx_pad = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dcolumns.dtype)
        for i in range(KH):
            for j in range(KW):
                rows, cols = _offset_slices(i, j, OH, OW, stride, dilation)
                dx_pad[:, :, rows, cols] += dcolumns[:, :, i, j]
        dx = np.ascontiguousarray(dx_pad[:, :, ph:ph + H, pw:pw + W])
    else:
        dout_cm = np.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(G, F // G, N * OH * OW)
        dweight = np.matmul(dout_cm, columns.reshape(G, K, N * OH * OW).transpose(0, 2, 1))
        del columns
        dcolumns = np.matmul(weight_t, dout_cm).reshape(C, KH, KW, N, OH, OW)
        dx_cm = np.zeros((C, N, H + 2 * ph, W + 2 * pw), dcolumns.dtype)
        for i in range(KH):
            for j in range(KW):
                rows, cols = _offset_slices(i, j, OH, OW, stride, dilation)
                dx_cm[:, :, rows, cols] += dcolumns[:, i, j]
        dx = np.ascontiguousarray(dx_cm[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3))
    return dx, dweight.reshape(F, Cg, KH, KW), dbias


# ----------------------------------------------------------------------------------------------
# pooling

def _first_inside(size, kernel, stride, padding, dilation, out):
    """Per output index along one axis: the first kernel tap that lies inside the input."""
    taps = (np.arange(out) * stride - padding)[:, None] + dilation * np.arange(kernel)[None, :]
    return np.argmax((taps >= 0) & (taps < size), axis=1)


def max_pool2d_forward(x, kernel_size, stride, padding, dilation):
    """x (N, C, H, W) -> out (N, C, OH, OW), argmax int64 (N, C, OH, OW) = h * W + w of the first max."""
    N, C, H, W = x.shape
    KH, KW = kernel_size
    (sh, sw), (ph, pw), (dil_h, dil_w) = stride, padding, dilation
    OH, OW = output_hw(H, W, kernel_size, stride, padding, dilation)
    x_pad = _pad(x, padding, -np.inf)
    # Start from -inf with "the first tap inside the input" as the argmax and only take a tap that is
    # strictly greater (or NaN): padding (-inf) then never wins, ties keep the earliest tap in scan
    # order, and a window whose inputs are all -inf still points at a real input position.
    first_i = _first_inside(H, KH, sh, ph, dil_h, OH)
    first_j = _first_inside(W, KW, sw, pw, dil_w, OW)
    tap_dtype = np.int8 if KH * KW <= 127 else np.int32  # narrow: the masked writes below are memory-bound
    best = np.full((N, C, OH, OW), -np.inf, x.dtype)
    tap = np.empty((N, C, OH, OW), tap_dtype)
    tap[...] = (first_i[:, None] * KW + first_j[None, :]).astype(tap_dtype)
    take = np.empty((N, C, OH, OW), bool)
    best_is_number = np.empty((N, C, OH, OW), bool)
    for i in range(KH):
        for j in range(KW):
            rows, cols = _offset_slices(i, j, OH, OW, stride, dilation)
            window = x_pad[:, :, rows, cols]
            # take the tap when window > best or window is NaN, unless best already is NaN: NaN
            # propagates as in PyTorch, and argmax points at the first NaN.
            np.less_equal(window, best, out=take)
            np.logical_not(take, out=take)
            np.equal(best, best, out=best_is_number)
            np.logical_and(take, best_is_number, out=take)
            np.maximum(window, best, out=best)
            np.copyto(tap, i * KW + j, where=take)
    # Tap (i, j) of output (oh, ow) is input (oh * sh - ph + i * dil_h, ow * sw - pw + j * dil_w):
    # flat index = window_start[oh, ow] + tap_offset[tap].
    window_start = (np.arange(OH) * sh - ph)[:, None] * W + (np.arange(OW) * sw - pw)[None, :]
    tap_offset = (np.arange(KH) * dil_h * W)[:, None] + (np.arange(KW) * dil_w)[None, :]
    argmax = tap_offset.ravel().astype(np.int64)[tap]
    argmax += window_start
    return best, argmax


def max_pool2d(x, kernel_size, stride, padding, dilation):
    """max_pool2d_forward's out alone."""
    return max_pool2d_forward(x, kernel_size, stride, padding, dilation)[0]


def max_pool2d_backward(dout, argmax, x_shape):
    """dout, argmax (N, C, OH, OW) -> dx (N, C, H, W): each dout added at its argmax position."""
    N, C, H, W = x_shape
    plane_start = (np.arange(N * C, dtype=np.int64) * (H * W)).reshape(N, C, 1, 1)
    dx = np.zeros(N * C * H * W, dout.dtype)
    # np.add.at sums repeated indices (overlapping windows that share a maximum). Since NumPy 1.25
    # (chexcy needs >= 1.26) it is a fast unbuffered loop: ~5x faster than np.bincount here.
    np.add.at(dx, (argmax + plane_start).ravel(), dout.ravel())
    return dx.reshape(N, C, H, W)


def _avg_divisor(x_hw, kernel_size, stride, padding, out_hw, count_include_pad, dtype):
    """KH * KW, or per output position (OH, OW) the number of window taps inside the input."""
    KH, KW = kernel_size
    if count_include_pad:
        return dtype.type(KH * KW)
    counts = []
    for size, k, s, p, o in zip(x_hw, kernel_size, stride, padding, out_hw):
        start = np.arange(o) * s - p
        counts.append(np.minimum(start + k, size) - np.maximum(start, 0))
    return (counts[0][:, None] * counts[1][None, :]).astype(dtype)


def avg_pool2d_forward(x, kernel_size, stride, padding, count_include_pad):
    """x (N, C, H, W) -> out (N, C, OH, OW): window sums over the divisor."""
    N, C, H, W = x.shape
    KH, KW = kernel_size
    OH, OW = output_hw(H, W, kernel_size, stride, padding, (1, 1))
    x_pad = _pad(x, padding)
    total = np.zeros((N, C, OH, OW), x.dtype)
    for i in range(KH):
        for j in range(KW):
            rows, cols = _offset_slices(i, j, OH, OW, stride, (1, 1))
            total += x_pad[:, :, rows, cols]
    total /= _avg_divisor((H, W), kernel_size, stride, padding, (OH, OW), count_include_pad, x.dtype)
    return total


def avg_pool2d_backward(dout, x_shape, kernel_size, stride, padding, count_include_pad):
    """dout (N, C, OH, OW) -> dx x_shape: dout / divisor spread over each window."""
    N, C, H, W = x_shape
    KH, KW = kernel_size
    ph, pw = padding
    OH, OW = dout.shape[2], dout.shape[3]
    share = dout / _avg_divisor((H, W), kernel_size, stride, padding, (OH, OW), count_include_pad,
                                dout.dtype)
    dx_pad = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dout.dtype)
    for i in range(KH):
        for j in range(KW):
            rows, cols = _offset_slices(i, j, OH, OW, stride, (1, 1))
            dx_pad[:, :, rows, cols] += share
    return dx_pad if (ph, pw) == (0, 0) else np.ascontiguousarray(dx_pad[:, :, ph:ph + H, pw:pw + W])


def global_avg_pool2d_forward(x):
    """x (N, C, H, W) -> out (N, C): the mean of each plane."""
    N, C, H, W = x.shape
    return x.reshape(N, C, H * W).mean(axis=2)


def global_avg_pool2d_backward(dout, x_shape):
    """dout (N, C) -> dx x_shape: dout / (H * W) everywhere in the plane."""
    N, C, H, W = x_shape
    dx = np.empty((N, C, H, W), dout.dtype)
    dx[...] = (dout / dout.dtype.type(H * W))[:, :, None, None]
    return dx


# ----------------------------------------------------------------------------------------------
# relu

def relu_forward(x, inplace, residual=None):
    """x (any shape) -> max(x, 0) (NaN stays NaN), into x itself when inplace; max(x + residual, 0)
    with residual."""
    if residual is not None:
        x = np.add(x, residual, out=x if inplace else None)
        inplace = True
    return np.maximum(x, 0, out=x if inplace else None)


def relu_backward(dout, y):
    """dout, y (the same shape) -> dout where y > 0, else 0."""
    return np.where(y > 0, dout, np.float32(0)).astype(dout.dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# linear

def linear_forward(x, weight, bias):
    """x (N, I), weight (O, I), bias (O,) or None -> out (N, O) = x @ weight.T + bias."""
    out = x @ weight.T
    if bias is not None:
        out += bias
    return out


def linear_backward(dout, x, weight):
    """dout (N, O) -> dx (N, I) = dout @ weight, dweight (O, I) = dout.T @ x, dbias (O,)."""
    return dout @ weight, dout.T @ x, dout.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# batch norm (training mode)

def _bn_planes(a):
    """(N, C, H, W) -> (N, C, H * W) view: every reduction below runs along the contiguous axis."""
    N, C, H, W = a.shape
    return a.reshape(N, C, H * W)


def batch_norm2d_forward(x, weight, bias, eps):
    """x (N, C, H, W), weight, bias (C,) -> (out (N, C, H, W), mean (C,), biased var (C,)).

    Sums per plane in float64, then over the batch. The variance is two-pass about the mean rounded to
    x's dtype (m'), corrected exactly: mean((x - m)^2) = mean((x - m')^2) - (m - m')^2. The centred
    array is the only activation-sized temporary and becomes the output.

    The squares are summed per plane in x's dtype (a fast dot product), which overflows float32 once
    |x - m| reaches about 1e19; only the channels where that happened are summed again in float64, so
    ordinary data pays one (C,) finiteness check.
    """
    N, C, H, W = x.shape
    M = N * H * W
    planes = _bn_planes(x)
    mean = planes.sum(axis=2, dtype=np.float64).sum(axis=0) / M
    mean_x = mean.astype(x.dtype)
    centred = planes - mean_x[:, None]
    m2 = np.einsum("ncl,ncl->nc", centred, centred).sum(axis=0, dtype=np.float64)
    overflowed = np.flatnonzero(~np.isfinite(m2))
    for c in overflowed:                         # NaN/inf in x also lands here and stays non-finite
        plane = centred[:, c].astype(np.float64)
        m2[c] = np.einsum("nl,nl->", plane, plane)
    shift = mean - mean_x.astype(np.float64)
    var = np.maximum(m2 / M - shift * shift, 0.0)
    a = weight.astype(np.float64) / np.sqrt(var + eps)
    b = bias.astype(np.float64) - shift * a          # the rounding of the mean, folded into the shift
    centred *= a.astype(x.dtype)[:, None]
    centred += b.astype(x.dtype)[:, None]
    return centred.reshape(N, C, H, W), mean_x, var.astype(x.dtype)


def batch_norm2d_backward(dout, x, mean, var, weight, eps):
    """dout, x (N, C, H, W), mean, var, weight (C,) -> (dx, dweight (C,), dbias (C,)).

    dx = a * dout + (x - mean) * b + c with per-channel a = weight * s, b = -weight * s^3 * Sgx / M,
    c = -weight * s * Sg / M (s = 1 / sqrt(var + eps), Sg = sum(dout), Sgx = sum(dout * (x - mean))).
    """
    N, C, H, W = x.shape
    M = N * H * W
    g = _bn_planes(dout)
    centred = _bn_planes(x) - mean[:, None]
    sg = g.sum(axis=2, dtype=np.float64).sum(axis=0)
    sgx = np.einsum("ncl,ncl->nc", g, centred).sum(axis=0, dtype=np.float64)
    s = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    w = weight.astype(np.float64)
    dtype = dout.dtype
    dx = g * (w * s).astype(dtype)[:, None]
    centred *= (-w * s ** 3 * sgx / M).astype(dtype)[:, None]
    dx += centred
    dx += (-w * s * sg / M).astype(dtype)[:, None]
    return dx.reshape(N, C, H, W), (sgx * s).astype(dtype), sg.astype(dtype)


# ----------------------------------------------------------------------------------------------
# batch norm in two halves (chexcy.ops.batch_norm2d_plane_stats ...)

def batch_norm2d_plane_stats(x):
    """x (N, C, H, W) -> (plane_sum (C, N), plane_m2 (C, N)) float64, m2 about each plane's own mean."""
    planes = _bn_planes(x)
    HW = planes.shape[2]
    plane_sum = planes.sum(axis=2, dtype=np.float64)
    with np.errstate(invalid="ignore"):     # inf - inf in a plane holding inf: NaN statistics, as compiled
        centred = planes - (plane_sum / HW).astype(x.dtype)[:, :, None]
        shift = plane_sum / HW - (plane_sum / HW).astype(x.dtype).astype(np.float64)
    m2 = np.einsum("ncl,ncl->nc", centred, centred).astype(np.float64)
    m2 = np.maximum(m2 - HW * shift * shift, 0.0)        # deviations from the exact plane mean
    return np.ascontiguousarray(plane_sum.T), np.ascontiguousarray(m2.T)


def batch_norm2d_apply(x, mean, var, weight, bias, eps, relu=False, out=None):
    """x (N, C, H, W), float64 mean, var (C,), weight, bias (C,) -> out, x's dtype (max(., 0) when relu),
    fresh or written into out."""
    mean_x = mean.astype(x.dtype)
    a = weight.astype(np.float64) / np.sqrt(var + eps)
    b = bias.astype(np.float64) - (mean - mean_x.astype(np.float64)) * a
    if out is None:
        out = np.empty(x.shape, x.dtype)
    np.subtract(x, mean_x[:, None, None], out=out)
    out *= a.astype(x.dtype)[:, None, None]
    out += b.astype(x.dtype)[:, None, None]
    if relu:
        np.maximum(out, 0, out=out)
    return out


def batch_norm2d_plane_grad_sums(dout, x, mean):
    """-> (plane_g (C, N), plane_gx (C, N)) float64: per plane sum(dout) and sum(dout * (x - mean))."""
    g = _bn_planes(dout)
    centred = _bn_planes(x) - mean.astype(x.dtype)[:, None]
    plane_g = g.sum(axis=2, dtype=np.float64)
    plane_gx = np.einsum("ncl,ncl->nc", g, centred).astype(np.float64)
    return np.ascontiguousarray(plane_g.T), np.ascontiguousarray(plane_gx.T)


def batch_norm2d_backward_apply(dout, x, mean, var, weight, sum_g, sum_gx, count, eps):
    """dx = a * dout + (x - mean) * b + c from channel sums over `count` values (see batch_norm2d_backward)."""
    s = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    w = weight.astype(np.float64)
    dtype = dout.dtype
    dx = _bn_planes(dout) * (w * s).astype(dtype)[:, None]
    centred = _bn_planes(x) - mean.astype(dtype)[:, None]
    centred *= (-w * s ** 3 * sum_gx / count).astype(dtype)[:, None]
    dx += centred
    dx += (-w * s * sum_g / count).astype(dtype)[:, None]
    return dx.reshape(x.shape)
