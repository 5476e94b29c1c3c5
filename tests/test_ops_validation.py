"""Malformed input: the right exception with a message naming the function, argument and shapes.

Every bad call is checked in this process (validation happens in chexcy.ops before any backend
runs) and then, all together, in a fresh subprocess per backend: if a malformed input slipped past
the checks into a compiled kernel (which runs without bounds checks) and crashed the interpreter,
that would show up there as a non-zero return code instead of killing pytest.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import chexcy
from chexcy import ops
from ops_cases import AVAILABLE_BACKENDS

f32 = np.float32
X = np.zeros((2, 3, 8, 8), f32)
W = np.zeros((4, 3, 3, 3), f32)
DOUT = np.zeros((2, 4, 6, 6), f32)                 # conv2d_forward(X, W).shape
BN_C3 = np.ones(3, f32)
POOL_OUT, ARGMAX = ops.max_pool2d_forward(np.arange(2 * 3 * 8 * 8, dtype=f32).reshape(2, 3, 8, 8), 2)


def bad_argmax(value):
    argmax = ARGMAX.copy()
    argmax[1, 2, 3, 3] = value
    return argmax


# (id, call, exception type, fragments the message must contain)
BAD_CALLS = [
    # conv2d: shapes
    ("conv-x-3d", lambda: ops.conv2d_forward(X[0], W), ValueError, ["conv2d:", "x must be 4-D", "(3, 8, 8)"]),
    ("conv-weight-2d", lambda: ops.conv2d_forward(X, W[0, 0]), ValueError, ["weight must be 4-D", "(3, 3)"]),
    ("conv-channels", lambda: ops.conv2d_forward(X, np.zeros((8, 2, 3, 3), f32), groups=2), ValueError,
     ["conv2d: x has C=3 but weight expects C=4 (x (2, 3, 8, 8), weight (8, 2, 3, 3), groups=2)"]),
    ("conv-channels-no-groups", lambda: ops.conv2d_forward(X, np.zeros((4, 2, 3, 3), f32)), ValueError,
     ["x has C=3", "expects C=2"]),
    ("conv-groups-zero", lambda: ops.conv2d_forward(X, W, groups=0), ValueError, ["groups must be >= 1"]),
    ("conv-groups-negative", lambda: ops.conv2d_forward(X, W, groups=-3), ValueError, ["groups must be >= 1"]),
    ("conv-groups-float", lambda: ops.conv2d_forward(X, W, groups=1.0), TypeError, ["groups must be an int"]),
    ("conv-groups-not-dividing-F", lambda: ops.conv2d_forward(np.zeros((1, 4, 5, 5), f32),
                                                              np.zeros((3, 2, 3, 3), f32), groups=2),
     ValueError, ["groups=2 must divide", "F=3"]),
    ("conv-kernel-too-large", lambda: ops.conv2d_forward(np.zeros((1, 1, 4, 4), f32), np.zeros((1, 1, 5, 5), f32)),
     ValueError, ["conv2d:", "output would be empty", "(1, 1, 4, 4)"]),
    ("conv-dilated-kernel-too-large", lambda: ops.conv2d_forward(X, W, dilation=4), ValueError,
     ["spans 9", "padded input has only 8"]),
    ("conv-stride-zero", lambda: ops.conv2d_forward(X, W, stride=0), ValueError, ["stride must be >= 1"]),
    ("conv-stride-negative", lambda: ops.conv2d_forward(X, W, stride=(1, -2)), ValueError, ["stride must be >= 1"]),
    ("conv-stride-float", lambda: ops.conv2d_forward(X, W, stride=1.5), TypeError, ["stride must be an int"]),
    ("conv-stride-triple", lambda: ops.conv2d_forward(X, W, stride=(1, 1, 1)), TypeError, ["stride"]),
    ("conv-stride-huge", lambda: ops.conv2d_forward(X, W, stride=2 ** 40), ValueError, ["stride", "too large"]),
    ("conv-dilation-zero", lambda: ops.conv2d_forward(X, W, dilation=0), ValueError, ["dilation must be >= 1"]),
    ("conv-padding-negative", lambda: ops.conv2d_forward(X, W, padding=-1), ValueError, ["padding must be >= 0"]),
    ("conv-padding-huge", lambda: ops.conv2d_forward(X, W, padding=2 ** 30), ValueError, ["too large"]),
    ("conv-padding-word", lambda: ops.conv2d_forward(X, W, padding="full"), ValueError, ["'valid' or 'same'"]),
    ("conv-same-stride-2", lambda: ops.conv2d_forward(X, W, stride=2, padding="same"), ValueError,
     ["padding='same' needs stride 1"]),
    ("conv-bias-length", lambda: ops.conv2d_forward(X, W, np.zeros(5, f32)), ValueError,
     ["bias must have shape (4,)", "(5,)"]),
    ("conv-bias-2d", lambda: ops.conv2d_forward(X, W, np.zeros((4, 1), f32)), ValueError, ["bias must have shape"]),
    ("conv-empty-batch", lambda: ops.conv2d_forward(np.zeros((0, 3, 8, 8), f32), W), ValueError,
     ["x has an empty dimension", "(0, 3, 8, 8)"]),
    ("conv-zero-channels", lambda: ops.conv2d_forward(np.zeros((2, 0, 8, 8), f32), np.zeros((4, 0, 3, 3), f32)),
     ValueError, ["empty dimension"]),
    ("conv-zero-filters", lambda: ops.conv2d_forward(X, np.zeros((0, 3, 3, 3), f32)), ValueError,
     ["weight has an empty dimension"]),
    # conv2d: dtypes
    ("conv-int-x", lambda: ops.conv2d_forward(X.astype(np.int32), W), TypeError,
     ["conv2d: x must be a real floating-point array", "int32"]),
    ("conv-bool-weight", lambda: ops.conv2d_forward(X, W.astype(bool)), TypeError, ["weight", "bool"]),
    ("conv-complex-x", lambda: ops.conv2d_forward(X.astype(np.complex64), W), TypeError, ["complex64"]),
    ("conv-object-x", lambda: ops.conv2d_forward(X.astype(object), W), TypeError, ["object"]),
    ("conv-int-bias", lambda: ops.conv2d_forward(X, W, np.zeros(4, np.int64)), TypeError, ["bias", "int64"]),
    # conv2d_backward
    ("conv-bwd-dout-shape", lambda: ops.conv2d_backward(np.zeros((2, 4, 5, 6), f32), X, W), ValueError,
     ["conv2d_backward: dout must have the forward output's shape (2, 4, 6, 6)", "(2, 4, 5, 6)"]),
    ("conv-bwd-dout-3d", lambda: ops.conv2d_backward(DOUT[0], X, W), ValueError, ["dout"]),
    ("conv-bwd-channels", lambda: ops.conv2d_backward(DOUT, X[:, :2], W), ValueError, ["x has C=2"]),
    ("conv-bwd-int-dout", lambda: ops.conv2d_backward(DOUT.astype(np.int16), X, W), TypeError, ["dout", "int16"]),
    # max pool
    ("maxpool-x-2d", lambda: ops.max_pool2d_forward(X[0, 0], 2), ValueError, ["max_pool2d: x must be 4-D"]),
    ("maxpool-padding-over-half", lambda: ops.max_pool2d_forward(X, 2, padding=2), ValueError,
     ["padding (2, 2) must be at most half of kernel_size (2, 2)"]),
    ("maxpool-kernel-zero", lambda: ops.max_pool2d_forward(X, 0), ValueError, ["kernel_size must be >= 1"]),
    ("maxpool-kernel-too-large", lambda: ops.max_pool2d_forward(X, 9), ValueError, ["output would be empty"]),
    ("maxpool-stride-zero", lambda: ops.max_pool2d_forward(X, 2, stride=0), ValueError, ["stride must be >= 1"]),
    ("maxpool-dilation-zero", lambda: ops.max_pool2d_forward(X, 2, dilation=0), ValueError, ["dilation"]),
    ("maxpool-window-all-padding", lambda: ops.max_pool2d_forward(np.zeros((1, 1, 4, 4), f32), 2, 1, 1, 5),
     ValueError, ["entirely in the padding"]),
    ("maxpool-empty-batch", lambda: ops.max_pool2d_forward(np.zeros((0, 3, 8, 8), f32), 2), ValueError,
     ["empty dimension"]),
    ("maxpool-int-x", lambda: ops.max_pool2d_forward(X.astype(np.uint8), 2), TypeError, ["uint8"]),
    # max pool backward: argmax is trusted as an index by the kernels
    ("maxpool-bwd-argmax-too-big", lambda: ops.max_pool2d_backward(POOL_OUT, bad_argmax(64), X.shape),
     ValueError, ["argmax values must lie in [0, H * W = 64)", "64]"]),
    ("maxpool-bwd-argmax-huge", lambda: ops.max_pool2d_backward(POOL_OUT, bad_argmax(2 ** 40), X.shape),
     ValueError, ["argmax values must lie in"]),
    ("maxpool-bwd-argmax-negative", lambda: ops.max_pool2d_backward(POOL_OUT, bad_argmax(-1), X.shape),
     ValueError, ["[-1,"]),
    ("maxpool-bwd-argmax-float", lambda: ops.max_pool2d_backward(POOL_OUT, ARGMAX.astype(f32), X.shape),
     TypeError, ["argmax must be an integer array", "float32"]),
    ("maxpool-bwd-argmax-bool", lambda: ops.max_pool2d_backward(POOL_OUT, ARGMAX > 0, X.shape),
     TypeError, ["argmax must be an integer array"]),
    ("maxpool-bwd-argmax-shape", lambda: ops.max_pool2d_backward(POOL_OUT, ARGMAX[:, :, :3], X.shape),
     ValueError, ["argmax must have dout's shape (2, 3, 4, 4)", "(2, 3, 3, 4)"]),
    ("maxpool-bwd-x-shape-short", lambda: ops.max_pool2d_backward(POOL_OUT, ARGMAX, (2, 3, 8)), ValueError,
     ["x_shape must be a tuple of 4 ints"]),
    ("maxpool-bwd-x-shape-zero", lambda: ops.max_pool2d_backward(POOL_OUT, ARGMAX, (2, 3, 0, 8)), ValueError,
     ["x_shape must have every dimension >= 1"]),
    ("maxpool-bwd-x-shape-batch", lambda: ops.max_pool2d_backward(POOL_OUT, ARGMAX, (3, 3, 8, 8)), ValueError,
     ["disagree on (N, C)"]),
    ("maxpool-bwd-x-shape-smaller-plane", lambda: ops.max_pool2d_backward(POOL_OUT, ARGMAX, (2, 3, 4, 4)),
     ValueError, ["[0, H * W = 16)"]),
    # avg pool
    ("avgpool-padding-over-half", lambda: ops.avg_pool2d_forward(X, 3, padding=2), ValueError, ["at most half"]),
    ("avgpool-kernel-too-large", lambda: ops.avg_pool2d_forward(X, (9, 2)), ValueError, ["output would be empty"]),
    ("avgpool-x-5d", lambda: ops.avg_pool2d_forward(X[None], 2), ValueError, ["avg_pool2d: x must be 4-D"]),
    ("avgpool-bwd-dout-shape", lambda: ops.avg_pool2d_backward(np.zeros((2, 3, 4, 5), f32), X.shape, 2),
     ValueError, ["avg_pool2d_backward: dout must have the forward output's shape (2, 3, 4, 4)"]),
    ("avgpool-bwd-x-shape-float", lambda: ops.avg_pool2d_backward(np.zeros((2, 3, 4, 4), f32), (2, 3, 8.0, 8), 2),
     ValueError, ["x_shape must be a tuple of 4 ints"]),
    # global average pool
    ("gap-x-3d", lambda: ops.global_avg_pool2d_forward(X[0]), ValueError, ["global_avg_pool2d: x must be 4-D"]),
    ("gap-bwd-dout-shape", lambda: ops.global_avg_pool2d_backward(np.zeros((2, 4), f32), X.shape), ValueError,
     ["dout must have shape (N, C) = (2, 3)", "(2, 4)"]),
    ("gap-empty", lambda: ops.global_avg_pool2d_forward(np.zeros((2, 3, 0, 4), f32)), ValueError, ["empty"]),
    # linear
    ("linear-x-1d", lambda: ops.linear_forward(np.zeros(5, f32), np.zeros((3, 5), f32)), ValueError,
     ["linear: x must be 2-D"]),
    ("linear-features", lambda: ops.linear_forward(np.zeros((2, 5), f32), np.zeros((3, 4), f32)), ValueError,
     ["x has in_features=5 but weight expects 4", "(2, 5)", "(3, 4)"]),
    ("linear-bias", lambda: ops.linear_forward(np.zeros((2, 5), f32), np.zeros((3, 5), f32), np.zeros(5, f32)),
     ValueError, ["bias must have shape (3,)"]),
    ("linear-empty-batch", lambda: ops.linear_forward(np.zeros((0, 5), f32), np.zeros((3, 5), f32)), ValueError,
     ["empty dimension"]),
    ("linear-bwd-dout", lambda: ops.linear_backward(np.zeros((2, 4), f32), np.zeros((2, 5), f32),
                                                    np.zeros((3, 5), f32)),
     ValueError, ["linear_backward: dout must have shape (N, out_features) = (2, 3)"]),
    ("linear-int-weight", lambda: ops.linear_forward(np.zeros((2, 5), f32), np.zeros((3, 5), int)), TypeError,
     ["weight must be a real floating-point array"]),
    # threads and backends
    ("threads-zero", lambda: ops.set_num_threads(0), ValueError, ["n must be an int >= 1"]),
    ("threads-negative", lambda: ops.set_num_threads(-2), ValueError, ["n must be an int >= 1"]),
    ("threads-float", lambda: ops.set_num_threads(1.5), ValueError, ["n must be an int >= 1"]),
    ("threads-bool", lambda: ops.set_num_threads(True), ValueError, ["n must be an int >= 1"]),
    ("backend-unknown", lambda: ops.set_backend("torch"), ValueError, ["unknown chexcy backend 'torch'", "cython"]),
    # batch norm (X has C = 3; BN_C3 is a (3,) weight/bias/mean/var)
    ("bn-x-3d", lambda: ops.batch_norm2d_forward(X[0], BN_C3, BN_C3), ValueError,
     ["batch_norm2d: x must be 4-D", "(3, 8, 8)"]),
    ("bn-weight-length", lambda: ops.batch_norm2d_forward(X, np.ones(4, f32), BN_C3), ValueError,
     ["batch_norm2d: weight must have shape (3,)", "(2, 3, 8, 8)", "got (4,)"]),
    ("bn-bias-2d", lambda: ops.batch_norm2d_forward(X, BN_C3, np.zeros((3, 1), f32)), ValueError,
     ["bias must have shape (3,)", "got (3, 1)"]),
    ("bn-eps-zero", lambda: ops.batch_norm2d_forward(X, BN_C3, BN_C3, eps=0), ValueError, ["eps must be", "> 0"]),
    ("bn-eps-negative", lambda: ops.batch_norm2d_forward(X, BN_C3, BN_C3, eps=-1e-5), ValueError, ["eps must be"]),
    ("bn-eps-nan", lambda: ops.batch_norm2d_forward(X, BN_C3, BN_C3, eps=float("nan")), ValueError, ["eps must be"]),
    ("bn-eps-string", lambda: ops.batch_norm2d_forward(X, BN_C3, BN_C3, eps="1e-5"), TypeError,
     ["eps must be a real number"]),
    ("bn-int-x", lambda: ops.batch_norm2d_forward(np.zeros((2, 3, 4, 4), int), BN_C3, BN_C3), TypeError,
     ["batch_norm2d: x must be a real floating-point array"]),
    ("bn-one-value-per-channel", lambda: ops.batch_norm2d_forward(np.zeros((1, 3, 1, 1), f32), BN_C3, BN_C3),
     ValueError, ["more than one value per channel", "(1, 3, 1, 1)", "N * H * W = 1"]),
    ("bn-empty", lambda: ops.batch_norm2d_forward(np.zeros((0, 3, 4, 4), f32), BN_C3, BN_C3), ValueError,
     ["empty dimension"]),
    ("bn-bwd-dout-shape", lambda: ops.batch_norm2d_backward(X[:, :, :4], X, BN_C3, BN_C3, BN_C3), ValueError,
     ["batch_norm2d_backward: dout must have x's shape (2, 3, 8, 8)", "(2, 3, 4, 8)"]),
    ("bn-bwd-mean-length", lambda: ops.batch_norm2d_backward(X, X, np.zeros(2, f32), BN_C3, BN_C3), ValueError,
     ["mean must have shape (3,)", "got (2,)"]),
    ("bn-bwd-var-none", lambda: ops.batch_norm2d_backward(X, X, BN_C3, None, BN_C3), TypeError,
     ["var must be the (3,) array returned by batch_norm2d_forward"]),
    ("bn-bwd-weight-length", lambda: ops.batch_norm2d_backward(X, X, BN_C3, BN_C3, np.ones(5, f32)), ValueError,
     ["batch_norm2d_backward: weight must have shape (3,)"]),
    ("bn-bwd-int-dout", lambda: ops.batch_norm2d_backward(X.astype(int), X, BN_C3, BN_C3, BN_C3), TypeError,
     ["dout must be a real floating-point array"]),
    ("bn-bwd-eps-zero", lambda: ops.batch_norm2d_backward(X, X, BN_C3, BN_C3, BN_C3, eps=0.0), ValueError,
     ["eps must be"]),
    ("bn-bwd-one-value", lambda: ops.batch_norm2d_backward(np.zeros((1, 3, 1, 1), f32), np.zeros((1, 3, 1, 1), f32),
                                                           BN_C3, BN_C3, BN_C3),
     ValueError, ["batch_norm2d_backward: batch statistics need more than one value per channel"]),
]


@pytest.mark.parametrize("name, call, exc_type, fragments", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_a_clear_error(name, call, exc_type, fragments):
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{name}: expected {fragment!r} in the message {message!r}"


# Legal but extreme calls that must run (and match the reference) rather than crash or be refused.
EXTREME_CALLS = [
    ("conv-stride-int-max", lambda: ops.conv2d_forward(X, W, stride=2 ** 31 - 1)),      # output 1x1
    ("conv-kernel-equals-input", lambda: ops.conv2d_forward(X, np.ones((4, 3, 8, 8), f32))),
    ("conv-same-huge-dilation", lambda: ops.conv2d_forward(X, W, padding="same", dilation=20)),
    ("maxpool-stride-int-max", lambda: ops.max_pool2d_forward(X, 3, stride=2 ** 31 - 1)),
    ("maxpool-argmax-last-index", lambda: ops.max_pool2d_backward(POOL_OUT, bad_argmax(63), X.shape)),
    ("maxpool-argmax-int32", lambda: ops.max_pool2d_backward(POOL_OUT, ARGMAX.astype(np.int32), X.shape)),
    ("avgpool-1x1-stride-big", lambda: ops.avg_pool2d_forward(X, 1, stride=1000)),
    ("gap-1x1", lambda: ops.global_avg_pool2d_forward(X[:, :, :1, :1])),
    ("bn-two-values-per-channel", lambda: ops.batch_norm2d_forward(X[:1, :, :1, :2] + 1, BN_C3, BN_C3)),
    ("bn-batch-of-1x1-planes", lambda: ops.batch_norm2d_backward(X[:, :, :1, :1] + 1, X[:, :, :1, :1] * 2,
                                                                 BN_C3, BN_C3, BN_C3)),
    ("bn-constant-channels-var-0", lambda: ops.batch_norm2d_forward(X + 5, BN_C3, BN_C3, eps=1e-30)),
]


@pytest.mark.parametrize("name, call", EXTREME_CALLS, ids=[c[0] for c in EXTREME_CALLS])
def test_extreme_but_legal_calls_match_the_reference(name, call, backend):
    got = call()
    with ops.use_backend("reference"):
        want = call()
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


SUBPROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import chexcy.ops as ops
    ops.set_backend(sys.argv[1])
    import test_ops_validation as t
    for name, call, exc_type, fragments in t.BAD_CALLS:
        try:
            call()
        except exc_type as exc:
            missing = [f for f in fragments if f not in str(exc)]
            print("BAD-MESSAGE" if missing else "OK", name, flush=True)
        else:
            print("NO-ERROR", name, flush=True)
    for name, call in t.EXTREME_CALLS:
        call()
        print("RAN", name, flush=True)
    print("BACKEND", ops.get_backend(), flush=True)
""")


def subprocess_env(**extra):
    """Environment for a child python that imports the same chexcy as this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXCY_")}
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(chexcy.__file__)))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([package_root, tests_dir])
    env.update(extra)
    return env


@pytest.mark.parametrize("backend_name", AVAILABLE_BACKENDS)
def test_malformed_inputs_never_crash_the_interpreter(backend_name, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS_SCRIPT, backend_name], cwd=tmp_path,
                          env=subprocess_env(CHEXCY_BACKEND=backend_name), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (f"subprocess on backend {backend_name} died with return code "
                                  f"{proc.returncode} (negative = killed by that signal)\n"
                                  f"stdout tail:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    for name, *_ in BAD_CALLS:
        assert f"OK {name}" in lines, f"{backend_name}: {name} did not raise the expected error:\n{proc.stdout}"
    for name, _ in EXTREME_CALLS:
        assert f"RAN {name}" in lines, f"{backend_name}: {name} did not run:\n{proc.stdout}"
    assert f"BACKEND {backend_name}" in lines


# Geometry values that equal valid ints (and hash like them) but are not ints: each must be judged on
# its own type, also right after the equal geometry of plain ints was validated (and remembered).
EQUAL_BUT_NOT_INT = [
    ("stride-bool", dict(stride=True), dict(stride=1), "stride"),
    ("stride-pair-bool", dict(stride=(True, 1)), dict(stride=(1, 1)), "stride"),
    ("padding-pair-float", dict(padding=(0.0, 0)), dict(padding=(0, 0)), "padding"),
    ("dilation-float", dict(dilation=1.0), dict(dilation=1), "dilation"),
    ("groups-bool", dict(groups=True), dict(groups=1), "groups"),
]


@pytest.mark.parametrize("name, geometry, ints, fragment", EQUAL_BUT_NOT_INT, ids=[c[0] for c in EQUAL_BUT_NOT_INT])
def test_conv_geometry_checks_do_not_depend_on_earlier_calls(name, geometry, ints, fragment):
    for _ in range(2):
        ops.conv2d_forward(X, W, **ints)
        ops.conv2d_backward(DOUT, X, W, **ints)
        with pytest.raises(TypeError, match=fragment):
            ops.conv2d_forward(X, W, **geometry)
        with pytest.raises(TypeError, match=fragment):
            ops.conv2d_backward(DOUT, X, W, **geometry)
    # NumPy integers are ints: accepted, with the plain ints' result
    np.testing.assert_array_equal(ops.conv2d_forward(X + 1, W + 1, stride=(np.int64(2), 2), groups=np.int32(1)),
                                  ops.conv2d_forward(X + 1, W + 1, stride=(2, 2), groups=1))
