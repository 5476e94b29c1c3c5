"""Threads: set/get, the default, and bitwise-identical results for 1 and 2 threads (compiled backend).

The compiled kernels split work so that each thread owns its outputs (forward over (n, f) planes, dx
over (n, c) planes, dweight over f): the result must not change by a single bit with the thread count.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from chexcy import ops
from ops_cases import COMPILED, randn
from test_ops_validation import subprocess_env

needs_compiled = pytest.mark.skipif(
    not COMPILED, reason="the compiled backend (chexcy._ops) is not built here; build it with "
                         "`python setup.py build_ext --inplace` or `pip install .`")


# A compiled module built without OpenMP (CHEXCY_NO_OPENMP=1) always runs on exactly one thread.
SERIAL_BUILD = COMPILED and not ops.info()["openmp"]


@pytest.fixture
def restore_threads():
    yield
    ops.set_num_threads(None)


def test_set_and_get_num_threads(restore_threads):
    for n in (1, 3, 2):
        ops.set_num_threads(n)
        assert ops.get_num_threads() == (1 if SERIAL_BUILD else n)
    ops.set_num_threads(np.int64(1))
    assert ops.get_num_threads() == 1
    ops.set_num_threads(None)
    assert ops.get_num_threads() >= 1


def test_default_threads_follow_omp_num_threads(tmp_path):
    code = "import chexcy.ops as ops; print(ops.get_num_threads())"
    for value in ("1", "3"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              env=subprocess_env(OMP_NUM_THREADS=value, CHEXCY_BACKEND="python"),
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == ("1" if SERIAL_BUILD else value)
    env = subprocess_env(CHEXCY_BACKEND="python")
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == (1 if SERIAL_BUILD else len(os.sched_getaffinity(0)))


def _run_all_ops(rng):
    """Every threaded op at a moderate shape, with awkward sizes (odd, not a multiple of 2 threads)."""
    x = randn(rng, (4, 8, 33, 37))
    w, b = randn(rng, (20, 4, 3, 3)), randn(rng, (20,))
    results = []
    for conv in (dict(stride=1, padding=1, groups=2), dict(stride=2, padding=2, dilation=2, groups=1,
                                                           weight=randn(rng, (10, 8, 5, 3))),
                 dict(stride=1, padding="same", groups=8, weight=randn(rng, (16, 1, 4, 4)))):
        weight = conv.pop("weight", w)
        bias = b if weight.shape[0] == 20 else None
        out = ops.conv2d_forward(x, weight, bias, **conv)
        dout = randn(np.random.default_rng(1), out.shape)
        results += [out, *ops.conv2d_backward(dout, x, weight, **conv)]
    out, argmax = ops.max_pool2d_forward(x, 3, 2, 1)
    results += [out, argmax, ops.max_pool2d_backward(out, argmax, x.shape)]
    out = ops.avg_pool2d_forward(x, 3, 2, 1, False)
    results += [out, ops.avg_pool2d_backward(out, x.shape, 3, 2, 1, False)]
    out = ops.global_avg_pool2d_forward(x)
    results += [out, ops.global_avg_pool2d_backward(out, x.shape)]
    xl, wl = x.reshape(4, -1), randn(rng, (7, 8 * 33 * 37))
    out = ops.linear_forward(xl, wl)
    results += [out, *ops.linear_backward(out, xl, wl)]
    xl, wl = randn(rng, (433, 300)), randn(rng, (37, 300))    # GEMM tasks of several row blocks
    out = ops.linear_forward(xl, wl)
    results += [out, *ops.linear_backward(out, xl, wl)]
    xl, wl = randn(rng, (61, 300)), randn(rng, (14, 300))     # dot products over blocks of rows
    out = ops.linear_forward(xl, wl)
    results += [out, *ops.linear_backward(out, xl, wl)]
    return results


@needs_compiled
def test_one_and_two_threads_give_bitwise_identical_results(restore_threads):
    by_threads = {}
    with ops.use_backend("cython"):
        for n in (1, 2, 1):
            ops.set_num_threads(n)
            by_threads.setdefault(n, []).append(_run_all_ops(np.random.default_rng(5)))
    one, two, one_again = by_threads[1][0], by_threads[2][0], by_threads[1][1]
    for k, (a, b, c) in enumerate(zip(one, two, one_again)):
        assert_array_equal(a, c, err_msg=f"result {k}: two runs on 1 thread differ")
        assert np.array_equal(a, b), (f"result {k}: 1 and 2 threads differ, max abs diff "
                                      f"{np.max(np.abs(a.astype(np.float64) - b)):.3g}")


@needs_compiled
def test_threadpoolctl_limit_gives_the_same_results(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with ops.use_backend("cython"):
        free = _run_all_ops(np.random.default_rng(5))
        with threadpoolctl.threadpool_limits(1, user_api="openmp"):
            limited = _run_all_ops(np.random.default_rng(5))
    for k, (a, b) in enumerate(zip(free, limited)):
        assert np.array_equal(a, b), f"result {k} changed under threadpool_limits(1)"


@needs_compiled
@pytest.mark.parametrize("shape", [(3, 5, 67, 71), (1, 1, 300, 301), (2, 64, 16, 16), (5, 7, 1, 3),
                                   (2, 4, 1024, 1024)], ids=str)          # the last: 32 MB, a block
def test_global_avg_pool_backward_fills_every_threads_share(restore_threads, shape):
    """The backward fill gives each thread one contiguous share of the flat output, cut on cache lines
    and across plane boundaries (one large plane is split too), with at least 16384 floats per share.
    Every call gets a new dout, so a share left unwritten would show the previous call's values."""
    rng = np.random.default_rng(7)
    with ops.use_backend("cython"):
        for threads in (1, 2, 3, 4, 1):
            ops.set_num_threads(threads)
            dout = randn(rng, shape[:2])
            want = (dout * np.float32(1.0 / (shape[2] * shape[3])))[:, :, None, None]
            assert_array_equal(ops.global_avg_pool2d_backward(dout, shape), np.broadcast_to(want, shape),
                               err_msg=f"global_avg_pool2d_backward {shape}, {threads} threads")


@needs_compiled
@pytest.mark.parametrize("F, H, W, KW", [(16, 33, 37, 3), (7, 20, 45, 5)])
def test_first_layer_backward_is_bitwise_identical_for_1_2_and_3_threads(restore_threads, F, H, W, KW):
    """One input channel and 3 kernel rows take the per-sample backward, whose dbias sums are taken while
    each sample's dout is copied into the padded buffer; samples are then added in order."""
    rng = np.random.default_rng(13)
    x, w = randn(rng, (5, 1, H, W)), randn(rng, (F, 1, 3, KW))
    dout = randn(rng, (5, F, H, W - KW + 3))
    runs = {}
    with ops.use_backend("cython"):
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            runs[threads] = ops.conv2d_backward(dout, x, w, padding=1)
    for threads in (2, 3):
        for name, a, c in zip(("dx", "dweight", "dbias"), runs[1], runs[threads]):
            assert np.array_equal(a, c), f"first-layer {name}: 1 and {threads} threads differ"


@needs_compiled
@pytest.mark.parametrize("n, k, o", [(150, 300, 70), (300, 37, 290), (13, 1100, 33)])
def test_linear_is_bitwise_identical_for_1_2_and_3_threads(restore_threads, n, k, o):
    """Shapes that split each of the three products into several tasks (row blocks of at most 144 rows,
    ranges of column strips) with edge tiles and more than one K block of 256: every output element
    must still come out bitwise the same whichever thread computed it."""
    rng = np.random.default_rng(11)
    x, w, b, dout = randn(rng, (n, k)), randn(rng, (o, k)), randn(rng, (o,)), randn(rng, (n, o))
    runs = {}
    with ops.use_backend("cython"):
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            runs[threads] = [ops.linear_forward(x, w, b), *ops.linear_backward(dout, x, w)]
    for threads in (2, 3):
        for name, a, c in zip(("out", "dx", "dweight", "dbias"), runs[1], runs[threads]):
            assert np.array_equal(a, c), (f"linear {name} ({n}, {k}, {o}): 1 and {threads} threads differ, max "
                                          f"abs diff {np.max(np.abs(a.astype(np.float64) - c)):.3g}")


@needs_compiled
@pytest.mark.parametrize("groups, C, F, W", [(1, 64, 26, 13), (2, 140, 38, 9)])
def test_channel_blocked_dweight_is_bitwise_identical_for_1_2_and_3_threads(restore_threads, groups, C, F, W):
    """Wide layers' dweight (here dilated, so not Winograd) is cut into (group, block of output
    channels, kernel tap) units shared out in equal ranges, which start mid-block for 2 and 3 threads
    (and a block's dbias belongs to the owner of its tap 0): every element must come out bitwise the
    same whichever thread computed it."""
    rng = np.random.default_rng(12)
    x, w = randn(rng, (3, C, 11, W)), randn(rng, (F, C // groups, 3, 3))
    dout = randn(rng, (3, F, 11, W))
    runs = {}
    with ops.use_backend("cython"):
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            runs[threads] = ops.conv2d_backward(dout, x, w, stride=1, padding=2, dilation=2, groups=groups)
    for threads in (2, 3):
        for name, a, c in zip(("dx", "dweight", "dbias"), runs[1], runs[threads]):
            assert np.array_equal(a, c), (f"conv {name}: 1 and {threads} threads differ, max abs diff "
                                          f"{np.max(np.abs(a.astype(np.float64) - c)):.3g}")


@needs_compiled
@pytest.mark.parametrize("C, H, W, F", [(32, 180, 6, 26), (40, 21, 35, 24), (32, 14, 14, 26)])
def test_winograd_conv_is_bitwise_identical_for_1_2_and_3_threads(restore_threads, C, H, W, F):
    """3x3 stride-1 convs from 32 / 24 channels are Winograd units (sample, block of tile rows), several
    per sample in the first shape, 2 + 1 samples a unit in the last; dweight's units go into partial sums
    fixed by the shape: forward and backward must not depend on the thread count."""
    rng = np.random.default_rng(13)
    x, w, b = randn(rng, (3, C, H, W)), randn(rng, (F, C, 3, 3)), randn(rng, (F,))
    dout = randn(rng, (3, F, H, W))
    runs = {}
    with ops.use_backend("cython"):
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            runs[threads] = [ops.conv2d_forward(x, w, b, stride=1, padding=1),
                             *ops.conv2d_backward(dout, x, w, stride=1, padding=1)]
    for threads in (2, 3):
        for name, a, c in zip(("out", "dx", "dweight", "dbias"), runs[1], runs[threads]):
            assert np.array_equal(a, c), (f"conv {name}: 1 and {threads} threads differ, max abs diff "
                                          f"{np.max(np.abs(a.astype(np.float64) - c)):.3g}")
