"""chexcy.ops: conv2d, pooling, dense layers and batch norm, forward and backward, for NumPy arrays.

The public op API of chexcy and the ONE place where a backend is chosen. Every function checks and
normalises its arguments once, then calls the same-named function of the active backend:

    "cython"     chexcy._ops, the compiled Cython + OpenMP kernels (the default when built);
    "python"     chexcy._fallback, vectorised NumPy (used when the extension is not built);
    "reference"  chexcy.reference, the plain NumPy oracle of the tests (slow).

Conventions follow PyTorch: activations NCHW, conv weight (F, C // groups, KH, KW), linear weight
(out_features, in_features) with out = x @ weight.T + bias, ``stride=None`` for pools meaning the
kernel size, max pool padding with -inf, argmax the flat index h * W + w into each (n, c) input plane.
Output size: OH = (H + 2 * ph - dil_h * (KH - 1) - 1) // sh + 1 (see ``conv_output_size``).

Input conversion: arrays may be any real floating dtype and any memory layout. Anything that is not
C-contiguous float32 is converted ONCE, on entry, to a C-contiguous float32 copy (so float64 input gives
float32 results: the kernels compute in float32). Integer, bool, complex and object arrays raise
TypeError rather than being silently cast. Shape errors raise ValueError naming the function, the
argument and the shapes. Values are not scanned (a NaN in x is not an error: scanning would cost as
much as a pooling pass); the only value check is argmax's range, because a bad index there would make
a compiled kernel write outside its array.

Backward functions return fresh arrays, never write into their inputs, and return dbias even when the
forward pass had no bias.

Choosing the backend: the environment variable CHEXCY_BACKEND ("cython", "python", "reference"), else
"cython" when the compiled module loads, else "python" with one RuntimeWarning saying how to build it.
At run time: ``set_backend(name)``, ``with use_backend(name): ...``, ``get_backend()``,
``available_backends()``. Threads of the compiled kernels: ``set_num_threads(n)``/``get_num_threads()``;
by default the kernels use as many threads as OpenMP would (OMP_NUM_THREADS, threadpoolctl limits and
the CPUs this process may run on are honoured).
"""
import collections
import contextlib
import functools
import importlib
import os
import threading
import warnings

import numpy as np

from chexcy import _native
from chexcy._args import conv_output_size, output_hw
from chexcy.cpus import cores_available

__all__ = [
    "conv2d_forward", "conv2d_backward", "max_pool2d_forward", "max_pool2d_backward",
    "avg_pool2d_forward", "avg_pool2d_backward", "global_avg_pool2d_forward",
    "global_avg_pool2d_backward", "linear_forward", "linear_backward",
    "batch_norm2d_forward", "batch_norm2d_backward", "relu_forward", "relu_backward",
    "conv2d", "max_pool2d", "avg_pool2d", "linear", "conv2d_plan", "ConvPlan",
    "get_backend", "set_backend", "use_backend", "available_backends",
    "get_num_threads", "set_num_threads", "info", "conv_output_size",
]

BACKENDS = ("cython", "python", "reference")
ENV_BACKEND = "CHEXCY_BACKEND"

# The compiled kernels index with C ints; every size and geometry value must fit in one (with room
# for H + 2 * padding).
_INT_LIMIT = 2 ** 31 - 1
_FLOAT32 = np.dtype(np.float32)


# ----------------------------------------------------------------------------------------------
# Backends

_lock = threading.Lock()
_state = {"name": None, "module": None}


def _load_backend(name):
    """The module implementing backend `name`; ValueError for an unknown name, ImportError if not built."""
    if name == "cython":
        return _native.load()
    if name == "python":
        return importlib.import_module("chexcy._fallback")
    if name == "reference":
        return importlib.import_module("chexcy.reference")
    raise ValueError(f"unknown chexcy backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _resolve_default():
    """The first choice of backend: CHEXCY_BACKEND, else cython, else python with one warning."""
    requested = os.environ.get(ENV_BACKEND, "").strip()
    if requested:
        if requested not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={requested!r} is not a chexcy backend; "
                             f"choose one of {', '.join(BACKENDS)}")
        return requested, _load_backend(requested)
    try:
        return "cython", _native.load()
    except ImportError as exc:
        reason = exc.__cause__ or exc  # the underlying import error, not _native's own advice
        warnings.warn(
            f"chexcy is using its slow pure-Python fallback: the compiled kernels did not load "
            f"({reason}). {_native.build_advice()} "
            f"Set {ENV_BACKEND}=python to choose the fallback explicitly and silence this warning.",
            RuntimeWarning, stacklevel=4)
        return "python", _load_backend("python")


def _backend():
    module = _state["module"]
    if module is None:
        with _lock:
            if _state["module"] is None:
                _state["name"], _state["module"] = _resolve_default()
            module = _state["module"]
    return module


def get_backend():
    """Name of the active backend: "cython", "python" or "reference"."""
    _backend()
    return _state["name"]


def set_backend(name):
    """Make `name` ("cython", "python" or "reference") the active backend for all later calls.

    ValueError for an unknown name; ImportError when "cython" is asked for but not built.
    """
    module = _load_backend(name)
    with _lock:
        _state["name"], _state["module"] = name, module


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the block on backend `name`, then restore the previous one (even on error)."""
    # The previous state is restored as it was, even "not chosen yet" (so a bad CHEXCY_BACKEND
    # does not stop a block that names its backend explicitly).
    previous = (_state["name"], _state["module"])
    set_backend(name)
    try:
        yield _state["module"]
    finally:
        with _lock:
            _state["name"], _state["module"] = previous


def available_backends():
    """Names of the backends that can run here, fastest first (the compiled one only when built)."""
    return [name for name in BACKENDS if name != "cython" or _compiled_or_none() is not None]


_compiled = {}


def _compiled_or_none():
    """The compiled module, or None when it is not built (looked up once: a failed import is slow)."""
    if "module" not in _compiled:
        try:
            _compiled["module"] = _native.load()
        except ImportError:
            _compiled["module"] = None
    return _compiled["module"]


# ----------------------------------------------------------------------------------------------
# Threads

_threads = {"n": None}  # set_num_threads value when the compiled module is absent (None = default)


def _default_num_threads():
    """Threads OpenMP would start: OMP_NUM_THREADS when set, else the CPUs this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return cores_available()


def get_num_threads():
    """Threads the compiled kernels use per call (what set_num_threads set, else OpenMP's default)."""
    compiled = _compiled_or_none()
    if compiled is not None:
        n = int(compiled.get_num_threads())
        if n >= 1:
            return n
        return _default_num_threads()
    return _threads["n"] or _default_num_threads()


def set_num_threads(n):
    """Use `n` threads (an int >= 1) in the compiled kernels; ``None`` returns to OpenMP's default.

    Results do not depend on the thread count (each thread owns its outputs). The python and
    reference backends are single-threaded apart from NumPy's BLAS, which this does not change.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"set_num_threads: n must be an int >= 1 (or None for the default), got {n!r}")
    value = None if n is None else int(n)
    compiled = _compiled_or_none()
    if compiled is not None:
        compiled.set_num_threads(0 if value is None else value)
    _threads["n"] = value


def info():
    """What `chexcy info` prints: backend, threads, OpenMP, available backends and the build details."""
    compiled = _compiled_or_none()
    result = {
        "backend": get_backend(),
        "threads": get_num_threads(),
        "openmp": bool(compiled.openmp_enabled()) if compiled is not None else False,
        "available_backends": available_backends(),
        "numpy": np.__version__,
    }
    if compiled is not None:
        result["build_info"] = dict(compiled.build_info())
    return result


# ----------------------------------------------------------------------------------------------
# Argument normalisers (one source of truth for the geometry)

def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _pair(value, fn, name, minimum=1):
    """(h, w) tuple of Python ints from an int or a pair; ValueError when an entry is < minimum."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value!r}")
    if pair[0] > _INT_LIMIT or pair[1] > _INT_LIMIT:
        raise ValueError(f"{fn}: {name}={value!r} is too large (limit {_INT_LIMIT})")
    return pair


def _conv_padding(padding, stride, dilation, kernel_hw, fn="conv2d"):
    """Resolve conv padding to (symmetric (ph, pw), extra (bottom, right)).

    "valid" is 0. "same" (stride 1 only) keeps H and W: the total padding along an axis is
    dil * (K - 1); when it is odd the extra row/column goes at the bottom/right (as PyTorch does), and
    since the kernels take symmetric padding only, ops pads x explicitly by that extra amount.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{fn}: padding='same' needs stride 1, got stride={stride}")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel_hw)]
            return (totals[0] // 2, totals[1] // 2), (totals[0] % 2, totals[1] % 2)
        raise ValueError(f"{fn}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    return _pair(padding, fn, "padding", minimum=0), (0, 0)


def _float_array(value, fn, name):
    """C-contiguous float32 view or (once) converted copy; TypeError for non-float data."""
    if type(value) is np.ndarray and value.dtype is _FLOAT32:
        flags = value.flags
        if flags.c_contiguous and flags.aligned:
            return value  # the hot path: nothing to do
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{fn}: {name} must be a real floating-point array, got dtype {array.dtype} "
                        f"(shape {array.shape}); convert it explicitly, e.g. {name}.astype(np.float32)")
    return np.require(array, np.float32, ["C_CONTIGUOUS", "ALIGNED"])


def _check_ndim(array, ndim, fn, name, layout):
    if array.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D {layout}, got shape {array.shape}")


def _check_nonempty(shape, fn, name, layout):
    if any(s == 0 for s in shape):
        raise ValueError(f"{fn}: {name} has an empty dimension: shape {shape} {layout} "
                         f"(empty batches and zero channels are not supported)")
    if any(s > _INT_LIMIT for s in shape):
        raise ValueError(f"{fn}: {name} shape {shape} has a dimension larger than {_INT_LIMIT}")


def _x_shape(x_shape, fn):
    """x_shape as a tuple of 4 positive Python ints."""
    if type(x_shape) is tuple and len(x_shape) == 4:    # the usual case, checked cheaply (~0.3 us)
        n, c, h, w = x_shape
        if type(n) is int and type(c) is int and type(h) is int and type(w) is int \
                and 0 < n <= _INT_LIMIT and 0 < c <= _INT_LIMIT and 0 < h <= _INT_LIMIT and 0 < w <= _INT_LIMIT:
            return x_shape
    if not isinstance(x_shape, (tuple, list)) or len(x_shape) != 4 or not all(_is_int(s) for s in x_shape):
        raise ValueError(f"{fn}: x_shape must be a tuple of 4 ints (N, C, H, W), got {x_shape!r}")
    shape = tuple(int(s) for s in x_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"{fn}: x_shape must have every dimension >= 1, got {shape}")
    if any(s > _INT_LIMIT for s in shape):
        raise ValueError(f"{fn}: x_shape {shape} has a dimension larger than {_INT_LIMIT}")
    return shape


def _output_hw(fn, x_shape, kernel_hw, stride, padding, dilation, what):
    """(OH, OW) for the geometry; ValueError when the (dilated) kernel is larger than the padded input."""
    H, W = x_shape[2], x_shape[3]
    for axis, size, k, _s, p, d in (("H", H, kernel_hw[0], stride[0], padding[0], dilation[0]),
                                   ("W", W, kernel_hw[1], stride[1], padding[1], dilation[1])):
        if size + 2 * p > _INT_LIMIT:
            raise ValueError(f"{fn}: padded {axis}={size + 2 * p} is too large (limit {_INT_LIMIT})")
        effective = d * (k - 1) + 1
        if effective > size + 2 * p:
            raise ValueError(
                f"{fn}: {what} {(kernel_hw)} with dilation {dilation} spans {effective} along {axis} but "
                f"the padded input has only {size + 2 * p} (x {tuple(x_shape)}, padding {padding}): "
                f"the output would be empty")
    return output_hw(H, W, kernel_hw, stride, padding, dilation)


def _check_pool_padding(fn, kernel_hw, padding):
    # PyTorch's rule: padding at most half the kernel, so that no window lies (nearly) all in padding.
    if padding[0] > kernel_hw[0] // 2 or padding[1] > kernel_hw[1] // 2:
        raise ValueError(f"{fn}: padding {padding} must be at most half of kernel_size {kernel_hw}")


@functools.lru_cache(maxsize=1024)
def _some_window_all_padding(size, kernel, stride, padding, dilation, out):
    """True when one of the `out` windows along this axis has every tap in the padding.

    Possible for max pool only with dilation > 1 (e.g. kernel 2, padding 1, dilation 5 on size 4: the
    taps -1 and 4 both miss). Such a window would have no maximum, and no valid argmax to return.
    """
    starts = np.arange(out) * stride - padding
    taps = starts[:, None] + dilation * np.arange(kernel)[None, :]
    inside = (taps >= 0) & (taps < size)
    return not bool(inside.any(axis=1).all())


def _pool_args(fn, x_shape, kernel_size, stride, padding, dilation=1):
    kernel_hw = _pair(kernel_size, fn, "kernel_size")
    stride_hw = kernel_hw if stride is None else _pair(stride, fn, "stride")
    padding_hw = _pair(padding, fn, "padding", minimum=0)
    dilation_hw = _pair(dilation, fn, "dilation")
    _check_pool_padding(fn, kernel_hw, padding_hw)
    out_hw = _output_hw(fn, x_shape, kernel_hw, stride_hw, padding_hw, dilation_hw, "kernel_size")
    if dilation_hw != (1, 1) and any(
            _some_window_all_padding(size, k, s, p, d, o) for size, k, s, p, d, o in zip(
                x_shape[2:], kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw)):
        raise ValueError(f"{fn}: with kernel_size {kernel_hw}, dilation {dilation_hw} and padding "
                         f"{padding_hw}, some window of x {tuple(x_shape)} lies entirely in the "
                         f"padding; reduce padding or dilation")
    return kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw


def _check_groups(groups, fn):
    if not _is_int(groups):
        raise TypeError(f"{fn}: groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"{fn}: groups must be >= 1, got {groups}")
    return int(groups)


def _exact(value):
    """True for an int, a str or a pair of ints, each of exactly that type (not bool, float or NumPy)."""
    kind = type(value)
    return kind is int or kind is str or (kind is tuple and len(value) == 2 and type(value[0]) is int
                                          and type(value[1]) is int)


# _conv_args' results for arguments of exact types (_exact), by fn, shapes and geometry. A training step
# calls the conv entry points a few hundred times on the same few dozen geometries, right after kernels
# that have pushed the interpreter's data out of the caches: measured there (after a 1x1 conv's
# backward), the checks took 32 us a call against 7 warm, on one thread while the others waited, and
# the lookup takes 9 (1 warm). A bool, float or NumPy integer is never looked up (it equals an int and
# hashes like one): it is checked, and rejected or accepted, every time.
_CONV_ARGS = {}
_CONV_ARGS_MAX = 4096


def _conv_args(fn, x, weight, stride, padding, dilation, groups):
    """Validate the conv inputs; returns the normalised geometry and the output shape."""
    if type(groups) is int and _exact(stride) and _exact(padding) and _exact(dilation):
        key = (fn, x.shape, weight.shape, stride, padding, dilation, groups)
        got = _CONV_ARGS.get(key)
        if got is None:
            got = _check_conv_args(fn, x, weight, stride, padding, dilation, groups)
            if len(_CONV_ARGS) >= _CONV_ARGS_MAX:
                _CONV_ARGS.clear()
            _CONV_ARGS[key] = got
        return got
    return _check_conv_args(fn, x, weight, stride, padding, dilation, groups)


def _check_conv_args(fn, x, weight, stride, padding, dilation, groups):
    """The checks behind _conv_args."""
    _check_ndim(x, 4, fn, "x", "(N, C, H, W)")
    _check_ndim(weight, 4, fn, "weight", "(F, C // groups, KH, KW)")
    _check_nonempty(x.shape, fn, "x", "(N, C, H, W)")
    _check_nonempty(weight.shape, fn, "weight", "(F, C // groups, KH, KW)")
    groups = _check_groups(groups, fn)
    N, C, H, W = x.shape
    F, Cg, KH, KW = weight.shape
    # weight (F, C // groups, ...): matching C here also makes groups divide C.
    if Cg * groups != C:
        raise ValueError(f"{fn}: x has C={C} but weight expects C={Cg * groups} "
                         f"(x {x.shape}, weight {weight.shape}, groups={groups})")
    if F % groups:
        raise ValueError(f"{fn}: groups={groups} must divide the output channels F={F} "
                         f"(x {x.shape}, weight {weight.shape})")
    stride_hw = _pair(stride, fn, "stride")
    dilation_hw = _pair(dilation, fn, "dilation")
    padding_hw, extra = _conv_padding(padding, stride_hw, dilation_hw, (KH, KW), fn)
    padded_shape = (N, C, H + extra[0], W + extra[1])
    out_hw = _output_hw(fn, padded_shape, (KH, KW), stride_hw, padding_hw, dilation_hw,
                        "kernel (KH, KW) =")
    return stride_hw, padding_hw, dilation_hw, extra, (N, F) + out_hw


def _pad_extra(x, extra):
    """x with `extra` (bottom, right) zero rows/columns: the odd half of padding='same'."""
    N, C, H, W = x.shape
    padded = np.zeros((N, C, H + extra[0], W + extra[1]), np.float32)
    padded[:, :, :H, :W] = x
    return padded


# ----------------------------------------------------------------------------------------------
# conv2d

def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, residual=None,
                   relu=False, weight_scale=None):
    """2-D convolution (cross-correlation, as PyTorch), forward.

    x (N, C, H, W), weight (F, C // groups, KH, KW), bias (F,) or None; stride, dilation: int or
    (h, w); padding: int, (h, w), "valid" or "same" (stride 1). Returns out (N, F, OH, OW) float32.
    Inputs that are not C-contiguous float32 are converted once.

    residual (an array of out's shape) is added to the result, and relu=True then takes max(., 0) (a NaN
    stays NaN): out = relu(conv(x) + bias + residual), a conv with its ReLU or the end of a residual block,
    with the same values as relu_forward(conv2d_forward(...), residual=residual). On the POINTWISE_GEMM path
    the sum and the ReLU, on WINOGRAD the ReLU, are applied as the kernel stores its output, with no pass
    over it after.

    weight_scale (F,): convolve with weight * weight_scale[:, None, None, None] (a BatchNorm folded into
    the conv before it, as eval-mode networks do), bit for bit that product, scaled as the compiled kernels
    pack the weight rather than in a scaled copy of it.
    """
    fn = "conv2d"
    x = _float_array(x, fn, "x")
    weight = _float_array(weight, fn, "weight")
    stride_hw, padding_hw, dilation_hw, extra, out_shape = _conv_args(fn, x, weight, stride, padding,
                                                                      dilation, groups)
    if bias is not None:
        bias = _float_array(bias, fn, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (one per output channel "
                             f"of weight {weight.shape}), got {bias.shape}")
    if residual is not None:
        residual = _float_array(residual, fn, "residual")
        if residual.shape != out_shape:
            raise ValueError(f"{fn}: residual must have the output's shape {out_shape}, got {residual.shape} "
                             f"(x {x.shape}, weight {weight.shape})")
    if relu not in (True, False):
        raise ValueError(f"{fn}: relu must be True or False, got {relu!r}")
    if weight_scale is not None:
        weight_scale = _float_array(weight_scale, fn, "weight_scale")
        if weight_scale.shape != (weight.shape[0],):
            raise ValueError(f"{fn}: weight_scale must have shape ({weight.shape[0]},) (one per output "
                             f"channel of weight {weight.shape}), got {weight_scale.shape}")
    if extra != (0, 0):
        x = _pad_extra(x, extra)
    return _backend().conv2d_forward(x, weight, bias, stride_hw, padding_hw, dilation_hw, int(groups),
                                     residual, bool(relu), weight_scale)


def conv2d_backward(dout, x, weight, stride=1, padding=0, dilation=1, groups=1):
    """Gradients of conv2d_forward with respect to x, weight and bias.

    dout (N, F, OH, OW), x (N, C, H, W), weight (F, C // groups, KH, KW) and the forward's geometry
    -> (dx (N, C, H, W), dweight (F, C // groups, KH, KW), dbias (F,)), fresh float32 arrays; dbias is
    returned whether or not the forward pass had a bias.
    """
    fn = "conv2d_backward"
    dout = _float_array(dout, fn, "dout")
    x = _float_array(x, fn, "x")
    weight = _float_array(weight, fn, "weight")
    stride_hw, padding_hw, dilation_hw, extra, out_shape = _conv_args(fn, x, weight, stride, padding,
                                                                      dilation, groups)
    if dout.shape != out_shape:
        raise ValueError(f"{fn}: dout must have the forward output's shape {out_shape}, got "
                         f"{dout.shape} (x {x.shape}, weight {weight.shape}, stride {stride_hw}, "
                         f"padding {padding!r}, dilation {dilation_hw}, groups={groups})")
    H, W = x.shape[2], x.shape[3]
    if extra != (0, 0):
        x = _pad_extra(x, extra)
    dx, dweight, dbias = _backend().conv2d_backward(dout, x, weight, stride_hw, padding_hw,
                                                    dilation_hw, int(groups))
    if extra != (0, 0):
        dx = np.ascontiguousarray(dx[:, :, :H, :W])
    return dx, dweight, dbias


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, residual=None, relu=False,
           weight_scale=None):
    """Forward-only convenience: the same as conv2d_forward."""
    return conv2d_forward(x, weight, bias, stride, padding, dilation, groups, residual=residual, relu=relu,
                          weight_scale=weight_scale)


ConvPlan = collections.namedtuple("ConvPlan", "forward dx dweight")

# What the backends without a planner do, whatever the shape.
_FIXED_PLANS = {"python": ConvPlan("IM2COL_BLAS", "IM2COL_BLAS", "IM2COL_BLAS"),
                "reference": ConvPlan("REFERENCE", "REFERENCE", "REFERENCE")}


def conv2d_plan(x_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """Which kernel path the active backend takes for a convolution of these shapes.

    x_shape (N, C, H, W), weight_shape (F, C // groups, KH, KW) and the geometry, as conv2d_forward.
    Returns ConvPlan(forward, dx, dweight) of path names. On the compiled backend they are those of the
    planner in chexcy/_ops.pyx (DEPTHWISE, DEPTHWISE_LANES, WINOGRAD, POINTWISE_GEMM, IM2COL_GEMM, FIRST_LAYER, DIRECT,
    CHANNEL_BLOCKED, LANE_SUM, PLAIN; "A>B" for a reduction A to another problem that takes path B, e.g.
    UNDILATED>WINOGRAD, see docs/performance.md); the python backend always answers IM2COL_BLAS, the
    reference REFERENCE.
    """
    fn = "conv2d_plan"
    shapes = []
    for name, shape in (("x_shape", x_shape), ("weight_shape", weight_shape)):
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise TypeError(f"{fn}: {name} must be a sequence of 4 ints, got {shape!r}") from None
        if any(d < 0 for d in dims):
            raise ValueError(f"{fn}: {name} must not have negative sizes, got {dims}")
        shapes.append(np.broadcast_to(np.float32(0), dims))    # shape only: no memory
    x, weight = shapes
    stride_hw, padding_hw, dilation_hw, extra, _ = _conv_args(fn, x, weight, stride, padding, dilation,
                                                              groups)
    name = get_backend()
    if name in _FIXED_PLANS:
        return _FIXED_PLANS[name]
    padded = (x.shape[0], x.shape[1], x.shape[2] + extra[0], x.shape[3] + extra[1])
    return ConvPlan(*_backend().conv_plan(padded, weight.shape, stride_hw, padding_hw, dilation_hw,
                                          int(groups)))


# ----------------------------------------------------------------------------------------------
# pooling

def max_pool2d_forward(x, kernel_size, stride=None, padding=0, dilation=1):
    """2-D max pooling. x (N, C, H, W) -> (out (N, C, OH, OW) float32, argmax int64 (N, C, OH, OW)).

    kernel_size, stride (None = kernel_size), padding (<= half the kernel; pads with -inf), dilation:
    int or (h, w). argmax[n, c, oh, ow] = h * W + w of the window's first maximum (row-major scan),
    the input for max_pool2d_backward.
    """
    return _backend().max_pool2d_forward(*_max_pool_args(x, kernel_size, stride, padding, dilation))


def _max_pool_args(x, kernel_size, stride, padding, dilation):
    """max_pool2d's inputs checked: (x as C-contiguous float32, kernel, stride, padding, dilation pairs)."""
    fn = "max_pool2d"
    x = _float_array(x, fn, "x")
    _check_ndim(x, 4, fn, "x", "(N, C, H, W)")
    _check_nonempty(x.shape, fn, "x", "(N, C, H, W)")
    kernel_hw, stride_hw, padding_hw, dilation_hw, _ = _pool_args(fn, x.shape, kernel_size, stride,
                                                                  padding, dilation)
    return x, kernel_hw, stride_hw, padding_hw, dilation_hw


def max_pool2d_backward(dout, argmax, x_shape):
    """Gradient of max pooling: dout (N, C, OH, OW), argmax from max_pool2d_forward, x_shape
    (N, C, H, W) -> dx (N, C, H, W) float32, with each dout added at its argmax position.

    argmax must be an integer array shaped like dout with values in [0, H * W); it is scanned for that
    (a bad index would make a compiled kernel write out of bounds).
    """
    fn = "max_pool2d_backward"
    dout = _float_array(dout, fn, "dout")
    x_shape = _x_shape(x_shape, fn)
    _check_ndim(dout, 4, fn, "dout", "(N, C, OH, OW)")
    _check_nonempty(dout.shape, fn, "dout", "(N, C, OH, OW)")
    if dout.shape[:2] != x_shape[:2]:
        raise ValueError(f"{fn}: dout {dout.shape} and x_shape {x_shape} disagree on (N, C)")
    if not isinstance(argmax, np.ndarray):
        argmax = np.asarray(argmax)
    if argmax.dtype.kind not in "iu":
        raise TypeError(f"{fn}: argmax must be an integer array (the argmax of max_pool2d_forward), "
                        f"got dtype {argmax.dtype}")
    if argmax.shape != dout.shape:
        raise ValueError(f"{fn}: argmax must have dout's shape {dout.shape}, got {argmax.shape}")
    argmax = np.require(argmax, np.int64, ["C_CONTIGUOUS", "ALIGNED"])
    backend = _backend()
    if getattr(backend, "checks_argmax_range", False):
        # The compiled kernel checks every index in the pass that reads it (a separate min/max scan
        # here cost about as much as the whole kernel).
        try:
            return backend.max_pool2d_backward(dout, argmax, x_shape)
        except IndexError:
            _check_argmax_range(argmax, x_shape, fn)
            raise
    _check_argmax_range(argmax, x_shape, fn)
    return backend.max_pool2d_backward(dout, argmax, x_shape)


def _check_argmax_range(argmax, x_shape, fn):
    plane = x_shape[2] * x_shape[3]
    low, high = int(argmax.min()), int(argmax.max())
    if low < 0 or high >= plane:
        raise ValueError(f"{fn}: argmax values must lie in [0, H * W = {plane}) for x_shape {x_shape}, "
                         f"got values in [{low}, {high}]")


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1):
    """Forward-only: max_pool2d_forward's out, computed without forming the argmax (an evaluation pass)."""
    return _backend().max_pool2d(*_max_pool_args(x, kernel_size, stride, padding, dilation))


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """2-D average pooling. x (N, C, H, W) -> out (N, C, OH, OW) float32.

    kernel_size, stride (None = kernel_size), padding (<= half the kernel; zeros): int or (h, w).
    count_include_pad: divide by KH * KW (True) or by the number of taps inside the input (False).
    """
    fn = "avg_pool2d"
    x = _float_array(x, fn, "x")
    _check_ndim(x, 4, fn, "x", "(N, C, H, W)")
    _check_nonempty(x.shape, fn, "x", "(N, C, H, W)")
    kernel_hw, stride_hw, padding_hw, _, _ = _pool_args(fn, x.shape, kernel_size, stride, padding)
    return _backend().avg_pool2d_forward(x, kernel_hw, stride_hw, padding_hw, bool(count_include_pad))


def avg_pool2d_backward(dout, x_shape, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Gradient of average pooling: dout (N, C, OH, OW) and the forward's arguments -> dx x_shape float32."""
    fn = "avg_pool2d_backward"
    dout = _float_array(dout, fn, "dout")
    x_shape = _x_shape(x_shape, fn)
    kernel_hw, stride_hw, padding_hw, _, out_hw = _pool_args(fn, x_shape, kernel_size, stride, padding)
    if dout.shape != x_shape[:2] + out_hw:
        raise ValueError(f"{fn}: dout must have the forward output's shape {x_shape[:2] + out_hw} "
                         f"for x_shape {x_shape}, got {dout.shape}")
    return _backend().avg_pool2d_backward(dout, x_shape, kernel_hw, stride_hw, padding_hw,
                                          bool(count_include_pad))


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Forward-only convenience: the same as avg_pool2d_forward."""
    return avg_pool2d_forward(x, kernel_size, stride, padding, count_include_pad)


def global_avg_pool2d_forward(x):
    """Mean over each (n, c) plane: x (N, C, H, W) -> out (N, C) float32."""
    fn = "global_avg_pool2d"
    x = _float_array(x, fn, "x")
    _check_ndim(x, 4, fn, "x", "(N, C, H, W)")
    _check_nonempty(x.shape, fn, "x", "(N, C, H, W)")
    return _backend().global_avg_pool2d_forward(x)


def global_avg_pool2d_backward(dout, x_shape):
    """Gradient of the global average pool: dout (N, C) -> dx x_shape (N, C, H, W) float32."""
    fn = "global_avg_pool2d_backward"
    dout = _float_array(dout, fn, "dout")
    x_shape = _x_shape(x_shape, fn)
    if dout.shape != x_shape[:2]:
        raise ValueError(f"{fn}: dout must have shape (N, C) = {x_shape[:2]} for x_shape {x_shape}, "
                         f"got {dout.shape}")
    return _backend().global_avg_pool2d_backward(dout, x_shape)


# ----------------------------------------------------------------------------------------------
# linear

def _linear_args(fn, x, weight):
    _check_ndim(x, 2, fn, "x", "(N, in_features)")
    _check_ndim(weight, 2, fn, "weight", "(out_features, in_features)")
    _check_nonempty(x.shape, fn, "x", "(N, in_features)")
    _check_nonempty(weight.shape, fn, "weight", "(out_features, in_features)")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{fn}: x has in_features={x.shape[1]} but weight expects "
                         f"{weight.shape[1]} (x {x.shape}, weight {weight.shape})")


def linear_forward(x, weight, bias=None):
    """Dense layer: x (N, in), weight (out, in), bias (out,) or None -> x @ weight.T + bias (N, out) float32."""
    fn = "linear"
    x = _float_array(x, fn, "x")
    weight = _float_array(weight, fn, "weight")
    _linear_args(fn, x, weight)
    if bias is not None:
        bias = _float_array(bias, fn, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (out_features of "
                             f"weight {weight.shape}), got {bias.shape}")
    return _backend().linear_forward(x, weight, bias)


def linear_backward(dout, x, weight):
    """dout (N, out), x (N, in), weight (out, in) -> (dx (N, in), dweight (out, in), dbias (out,)), float32."""
    fn = "linear_backward"
    dout = _float_array(dout, fn, "dout")
    x = _float_array(x, fn, "x")
    weight = _float_array(weight, fn, "weight")
    _linear_args(fn, x, weight)
    if dout.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"{fn}: dout must have shape (N, out_features) = {(x.shape[0], weight.shape[0])}"
                         f" (x {x.shape}, weight {weight.shape}), got {dout.shape}")
    return _backend().linear_backward(dout, x, weight)


def linear(x, weight, bias=None):
    """Forward-only convenience: the same as linear_forward."""
    return linear_forward(x, weight, bias)


# ----------------------------------------------------------------------------------------------
# batch norm (training mode)

def _bn_channel_vector(value, C, fn, name, x_shape, default):
    """(C,) float32 per-channel vector; `default` (1 or 0) everywhere when value is None."""
    if value is None:
        return np.full(C, default, np.float32)
    value = _float_array(value, fn, name)
    if value.shape != (C,):
        raise ValueError(f"{fn}: {name} must have shape ({C},) (one value per channel of x {x_shape}), "
                         f"got {value.shape}")
    return value


def _bn_eps(eps, fn):
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: eps must be a real number, got {eps!r}")
    eps = float(eps)
    if not (eps > 0 and np.isfinite(eps)):
        raise ValueError(f"{fn}: eps must be a finite number > 0, got {eps!r}")
    return eps


def _bn_x(x, fn, name="x", planes=False):
    """x checked for batch norm: C-contiguous float32, or with planes=True any float32 array whose
    (C, H, W) planes are contiguous (a channel prefix of a larger array, read in place)."""
    if not (planes and _planes_contiguous(x)):
        x = _float_array(x, fn, name)
    _check_ndim(x, 4, fn, name, "(N, C, H, W)")
    _check_nonempty(x.shape, fn, name, "(N, C, H, W)")
    N, C, H, W = x.shape
    if N * H * W < 2:
        raise ValueError(f"{fn}: batch statistics need more than one value per channel: {name} {x.shape} "
                         f"has N * H * W = {N * H * W}")
    return x


def batch_norm2d_forward(x, weight, bias, eps=1e-5):
    """Batch normalisation in training mode (as PyTorch's F.batch_norm with training=True).

    x (N, C, H, W); weight, bias (C,) or None (ones / zeros); eps > 0. Per channel c, over the
    M = N * H * W values of x[:, c]: mean[c] and the biased variance var[c] = mean((x - mean)^2), and
        out = (x - mean) / sqrt(var + eps) * weight + bias.
    Returns (out (N, C, H, W), mean (C,), var (C,)), float32; mean and var are what a layer needs to
    update its running statistics (PyTorch's running_var uses var * M / (M - 1)) and to call
    batch_norm2d_backward. N * H * W must be at least 2. Statistics are accumulated in float64.
    """
    fn = "batch_norm2d"
    x = _bn_x(x, fn)
    C = x.shape[1]
    weight = _bn_channel_vector(weight, C, fn, "weight", x.shape, 1.0)
    bias = _bn_channel_vector(bias, C, fn, "bias", x.shape, 0.0)
    return _backend().batch_norm2d_forward(x, weight, bias, _bn_eps(eps, fn))


def batch_norm2d_backward(dout, x, mean, var, weight, eps=1e-5, *, out=None, accumulate=False):
    """Gradients of batch_norm2d_forward with respect to x, weight and bias.

    dout and x (N, C, H, W); mean, var (C,) as returned by the forward pass; weight (C,) or None;
    the forward's eps. xhat = (x - mean) / sqrt(var + eps) is recomputed from x (so a layer keeps x,
    not a second activation-sized array). Returns float32 (dx (N, C, H, W),
    dweight (C,) = sum(dout * xhat), dbias (C,) = sum(dout)), sums over (N, H, W); dx is the full
    batch-statistics gradient: weight / sqrt(var + eps) * (dout - mean(dout) - xhat * mean(dout * xhat)).

    x (and dout) are read in place when their (C, H, W) planes are contiguous float32: a channel
    prefix buf[:, :c] of a larger C-contiguous array is, and is not copied. dx is a fresh array, or
    with out (a writeable float32 array of x's shape with contiguous (C, H, W) planes, such as a
    prefix of a gradient buffer; overlapping neither dout nor x) is written into out, or added to it
    with accumulate=True (out += dx, dx rounded to float32 first: the sum of adding a fresh dx, up
    to a float32 rounding of dx's terms where a build contracts them into FMAs differently), and out
    is returned as dx.
    """
    fn = "batch_norm2d_backward"
    dout = dout if _planes_contiguous(dout) else _float_array(dout, fn, "dout")
    x = _bn_x(x, fn, planes=True)
    if dout.shape != x.shape:
        raise ValueError(f"{fn}: dout must have x's shape {x.shape}, got {dout.shape}")
    C = x.shape[1]
    for name, value in (("mean", mean), ("var", var)):
        if value is None:
            raise TypeError(f"{fn}: {name} must be the ({C},) array returned by batch_norm2d_forward, got None")
    mean = _bn_channel_vector(mean, C, fn, "mean", x.shape, 0.0)
    var = _bn_channel_vector(var, C, fn, "var", x.shape, 0.0)
    weight = _bn_channel_vector(weight, C, fn, "weight", x.shape, 1.0)
    eps = _bn_eps(eps, fn)
    if out is None:
        if accumulate:
            raise ValueError(f"{fn}: accumulate=True adds dx into out, but out is None")
        return _bn_backward(dout, x, mean, var, weight, eps)
    if not _planes_contiguous(out):
        raise ValueError(f"{fn}: out must be a float32 ndarray with contiguous (C, H, W) planes (C-contiguous, "
                         f"or a channel prefix of such an array), got {type(out).__name__} "
                         f"{getattr(out, 'dtype', '')} strides {getattr(out, 'strides', '')}".rstrip())
    if out.shape != x.shape:
        raise ValueError(f"{fn}: out has shape {out.shape}, x {x.shape}: they must match")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: out {out.shape} is read-only")
    for name, value in (("dout", dout), ("x", x)):
        if np.may_share_memory(out, value):
            raise ValueError(f"{fn}: out overlaps {name}; dx needs an array of its own")
    return _bn_backward(dout, x, mean, var, weight, eps, out, bool(accumulate))


def _bn_backward(dout, x, mean, var, weight, eps, out=None, accumulate=False):
    """batch_norm2d_backward on the active backend, its arguments checked. The compiled kernels read
    channel prefixes in place and write or add dx in their own pass; the NumPy backends get contiguous
    copies, as before (einsum sums a strided view in another order, and a float32 sum can lose more
    there), and their fresh dx is written or added here."""
    backend = _backend()
    if _state["name"] == "cython":
        return backend.batch_norm2d_backward(dout, x, mean, var, weight, eps, out, accumulate)
    dx, dweight, dbias = backend.batch_norm2d_backward(np.ascontiguousarray(dout), np.ascontiguousarray(x), mean,
                                                       var, weight, eps)
    if out is None:
        return dx, dweight, dbias
    if accumulate:
        out += dx
    else:
        out[...] = dx
    return out, dweight, dbias


# ----------------------------------------------------------------------------------------------
# relu

def relu_forward(x, inplace=False, residual=None):
    """The rectifier max(x, 0) (as PyTorch's F.relu; a NaN stays NaN), x of any shape.

    Returns a fresh float32 array, or with inplace=True writes into x and returns it; in place needs x
    to be a writeable C-contiguous float32 array (ValueError otherwise: a converted copy would leave
    the caller's array unchanged). With residual (an array of x's shape), max(x + residual, 0): a
    residual block's sum and its ReLU in one pass over memory.
    """
    fn = "relu"
    if inplace:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"{fn}: inplace=True needs a C-contiguous float32 ndarray, got "
                             f"{type(x).__name__} {getattr(x, 'dtype', '')}".rstrip())
        if not x.flags.writeable:
            raise ValueError(f"{fn}: inplace=True but x {x.shape} is read-only")
    else:
        x = _float_array(x, fn, "x")
    if residual is not None:
        residual = _float_array(residual, fn, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual has shape {residual.shape}, x {x.shape}: they must match")
        if inplace and residual is not x and np.may_share_memory(residual, x):
            raise ValueError(f"{fn}: residual overlaps x, which inplace=True overwrites")
        return _backend().relu_forward(x, bool(inplace), residual)
    return _backend().relu_forward(x, bool(inplace))


def relu_backward(dout, y):
    """Gradient of relu_forward: dout where y > 0, else 0 (the derivative at 0 taken as 0, as PyTorch).

    dout and y (the forward's output, or its input: the sign is the same) of one shape; returns a fresh
    float32 array.
    """
    fn = "relu_backward"
    dout = _float_array(dout, fn, "dout")
    y = _float_array(y, fn, "y")
    if dout.shape != y.shape:
        raise ValueError(f"{fn}: dout {dout.shape} and y {y.shape} must have the same shape")
    return _backend().relu_backward(dout, y)


# batch norm in two halves (statistics, then the elementwise map): for a batch spread over ranks,
# whose statistics every rank combines from all ranks' planes (chexcy.nn.BatchNorm2d with a communicator).
# Planes combined in batch order give batch_norm2d_forward/backward's results (bit for bit on the
# compiled backend, whose fused kernels use the same plane kernels and arithmetic).

def _bn_plane_x(x, fn, name="x"):
    x = _float_array(x, fn, name)
    _check_ndim(x, 4, fn, name, "(N, C, H, W)")
    _check_nonempty(x.shape, fn, name, "(N, C, H, W)")
    return x


def _bn_stats_vector(value, C, fn, name, x_shape):
    """(C,) float64 channel statistic (mean, var or a sum) for the second halves."""
    if value is None:
        raise TypeError(f"{fn}: {name} must be a ({C},) array, got None")
    value = np.ascontiguousarray(value, dtype=np.float64)
    if value.shape != (C,):
        raise ValueError(f"{fn}: {name} must have shape ({C},) (one value per channel of x {x_shape}), "
                         f"got {value.shape}")
    return value


def batch_norm2d_plane_stats(x):
    """Per-plane statistics of x (N, C, H, W): (plane_sum (C, N), plane_m2 (C, N)), float64, the sum of
    each (sample, channel) plane and the sum of squared deviations from that plane's own mean.
    Any N >= 1 (a rank may hold one row); combine with batch_norm2d_combine_stats."""
    x = _bn_plane_x(x, "batch_norm2d_plane_stats")
    return _backend().batch_norm2d_plane_stats(x)


def batch_norm2d_combine_stats(plane_sum, plane_m2, plane_size):
    """Channel mean and biased variance, float64 (C,), from per-plane statistics (C, N) of planes of
    `plane_size` (H * W) values: mean = sum / M and var = sum_n (m2_n + HW * (mean_n - mean)^2) / M, with
    M = N * HW, accumulated in plane order n = 0, 1, ... as the compiled kernels do (so the result does
    not depend on how the batch was split). Raises ValueError when M < 2."""
    plane_sum = np.asarray(plane_sum, dtype=np.float64)
    plane_m2 = np.asarray(plane_m2, dtype=np.float64)
    if plane_sum.ndim != 2 or plane_sum.shape != plane_m2.shape:
        raise ValueError(f"batch_norm2d_combine_stats: plane_sum and plane_m2 must be (C, N) arrays of one shape, "
                         f"got {plane_sum.shape} and {plane_m2.shape}")
    C, N = plane_sum.shape
    hw = float(plane_size)
    M = N * hw
    if M < 2:
        raise ValueError(f"batch_norm2d_combine_stats: batch statistics need more than one value per channel, "
                         f"got {N} plane(s) of {plane_size}")
    total = np.zeros(C)
    for n in range(N):
        total += plane_sum[:, n]
    mean = total / M
    q = np.zeros(C)
    for n in range(N):
        d = plane_sum[:, n] / hw - mean
        q += plane_m2[:, n] + hw * d * d
    return mean, q / M


def _planes_contiguous(x):
    """Whether x (N, C, H, W) float32 has contiguous (C, H, W) planes, its samples any (positive) distance
    apart: a channel prefix x[:, :c] of a larger C-contiguous array is. As in NumPy's C-contiguity, the
    stride of a dimension of size 1 does not matter."""
    if type(x) is not np.ndarray or x.dtype != np.float32 or x.ndim != 4 or not x.flags.aligned:
        return False
    if x.flags.c_contiguous:
        return True
    N, C, H, W = x.shape
    s0, s1, s2, s3 = x.strides
    return (W == 1 or s3 == 4) and (H == 1 or s2 == 4 * W) and (C == 1 or s1 == 4 * H * W) \
        and (N == 1 or (s0 >= 4 * C * H * W and s0 % 4 == 0))


def batch_norm2d_apply(x, mean, var, weight, bias, eps=1e-5, relu=False, out=None):
    """out = (x - mean) / sqrt(var + eps) * weight + bias with given channel statistics, then max(., 0)
    when relu=True (one pass over memory: batch norm and the ReLU after it).

    x (N, C, H, W), read in place when its (C, H, W) planes are contiguous float32 (a channel prefix
    x[:, :c] of a larger array is: no copy); mean, var (C,) (float64, as batch_norm2d_combine_stats
    returns); weight, bias (C,) or None. Returns a fresh float32 (N, C, H, W) array, or writes into out
    (a writeable C-contiguous float32 array of x's shape, x itself allowed) and returns it."""
    fn = "batch_norm2d_apply"
    if not _planes_contiguous(x):
        x = _bn_plane_x(x, fn)
    _check_nonempty(x.shape, fn, "x", "(N, C, H, W)")
    C = x.shape[1]
    mean = _bn_stats_vector(mean, C, fn, "mean", x.shape)
    var = _bn_stats_vector(var, C, fn, "var", x.shape)
    weight = _bn_channel_vector(weight, C, fn, "weight", x.shape, 1.0)
    bias = _bn_channel_vector(bias, C, fn, "bias", x.shape, 0.0)
    if out is not None:
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous):
            raise ValueError(f"{fn}: out must be a C-contiguous float32 ndarray, got {type(out).__name__} "
                             f"{getattr(out, 'dtype', '')}".rstrip())
        if out.shape != x.shape:
            raise ValueError(f"{fn}: out has shape {out.shape}, x {x.shape}: they must match")
        if not out.flags.writeable:
            raise ValueError(f"{fn}: out {out.shape} is read-only")
        if out is not x and np.may_share_memory(out, x) and not (
                out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                and out.strides == x.strides):
            raise ValueError(f"{fn}: out overlaps x without being x itself")
    return _backend().batch_norm2d_apply(x, mean, var, weight, bias, _bn_eps(eps, fn), bool(relu), out)


def batch_norm2d_plane_grad_sums(dout, x, mean):
    """Per-plane sums for batch norm's backward: (plane_g (C, N), plane_gx (C, N)), float64, each plane's
    sum(dout) and sum(dout * (x - mean)). dout, x (N, C, H, W); mean (C,) as the forward used (float32)."""
    fn = "batch_norm2d_plane_grad_sums"
    dout = _bn_plane_x(dout, fn, "dout")
    x = _bn_plane_x(x, fn)
    if dout.shape != x.shape:
        raise ValueError(f"{fn}: dout must have x's shape {x.shape}, got {dout.shape}")
    mean = _bn_channel_vector(_bn_stats_vector(mean, x.shape[1], fn, "mean", x.shape), x.shape[1], fn, "mean",
                              x.shape, 0.0)
    return _backend().batch_norm2d_plane_grad_sums(dout, x, mean)


def batch_norm2d_backward_apply(dout, x, mean, var, weight, sum_g, sum_gx, count, eps=1e-5):
    """dx of batch norm given the channel sums over the whole batch: sum_g = sum(dout), sum_gx =
    sum(dout * (x - mean)) (float64 (C,)) over `count` values per channel:
        dx = weight / sqrt(var + eps) * (dout - sum_g / count - (x - mean) * sum_gx / (count * (var + eps))).
    dout, x (N, C, H, W); mean, var (C,) as the forward returned (float32); weight (C,) or None.
    Returns float32 dx (N, C, H, W)."""
    fn = "batch_norm2d_backward_apply"
    dout = _bn_plane_x(dout, fn, "dout")
    x = _bn_plane_x(x, fn)
    if dout.shape != x.shape:
        raise ValueError(f"{fn}: dout must have x's shape {x.shape}, got {dout.shape}")
    C = x.shape[1]
    mean32, var32 = (_bn_channel_vector(_bn_stats_vector(v, C, fn, n, x.shape), C, fn, n, x.shape, 0.0)
                     for n, v in (("mean", mean), ("var", var)))
    weight = _bn_channel_vector(weight, C, fn, "weight", x.shape, 1.0)
    sum_g = _bn_stats_vector(sum_g, C, fn, "sum_g", x.shape)
    sum_gx = _bn_stats_vector(sum_gx, C, fn, "sum_gx", x.shape)
    if not count >= 2:
        raise ValueError(f"{fn}: count must be >= 2 values per channel, got {count!r}")
    return _backend().batch_norm2d_backward_apply(dout, x, mean32, var32, weight, sum_g, sum_gx, float(count),
                                                  _bn_eps(eps, fn))
