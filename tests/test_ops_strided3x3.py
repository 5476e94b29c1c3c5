"""The IM2COL_GEMM path's kernels (chexcy/_ops_conv_gemm.h): the forward on phase planes and the dweight
product in chunks of K strips, against the reference on every instruction-set variant built here, at 1,
2 and 3 threads (bitwise identical results).

The forward on phase planes (_im2col_forward_phase) runs for any stride, padding and dilation, so it is
checked directly on shapes the planner sends elsewhere too (stride 1 with dilation, unequal strides,
padding wider than the kernel's reach); conv2d_forward's IM2COL_GEMM rows must be exactly its result.
dx is gathered phase by phase (_im2col_dx_phase) from 16 input channels per group and 100 output
positions, else scattered by col2im (_im2col_dx_col2im); both are checked on every shape above.
The forward runs on phase planes from K = 64 (GEMM_PHASE_MIN_K), below it gathers B.
The dweight chunks hold GEMM_DW_STRIPS (12) strips of GEMM_NR columns of K = Cg KH KW: K = 378 and
387 sit just below and above one chunk on AVX-512 (GEMM_NR 32), 189 / 198 on AVX2 (16).
"""
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from chexcy import reference

from ops_cases import COMPILED, assert_close, check_conv_on_every_variant, runnable_variants

needs_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled module is not built (fallback-only run)")

# x shape, (F, KH, KW), stride, padding, dilation, groups
PHASE_CASES = [
    ((2, 3, 23, 21), (10, 3, 3), 2, 1, 1, 1),        # odd sizes, a partial register tile of rows
    ((1, 5, 17, 16), (9, 3, 3), 3, 2, 1, 1),         # stride 3, padding 2, batch 1
    ((2, 8, 15, 13), (16, 5, 5), 2, 0, 2, 1),        # padding 0, dilation 2
    ((2, 12, 19, 18), (16, 3, 3), 2, 2, 2, 1),       # dilated and strided
    ((2, 8, 12, 9), (16, 3, 3), 2, 1, 1, 2),         # groups 2
    ((2, 4, 31, 29), (24, 7, 7), 2, 3, 1, 1),        # a stem
    ((1, 16, 9, 10), (12, 3, 3), 1, 2, 2, 1),        # stride 1, dilated: one phase plane
    ((2, 6, 9, 14), (13, 3, 2), (2, 1), (1, 0), (1, 2), 1),     # unequal strides, paddings, dilations
    ((1, 4, 11, 8), (8, 3, 3), (1, 3), 2, 1, 1),
    ((1, 3, 3, 3), (8, 3, 3), 2, 0, 1, 1),          # one output: most of the strip is dropped columns
    ((1, 2, 6, 5), (8, 2, 2), 2, 3, 1, 1),           # padding wider than the kernel: windows of zeros
    ((2, 30, 13, 11), (40, 3, 3), 2, 1, 1, 1),       # K = 270: two K blocks
]


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


@needs_compiled
@pytest.mark.parametrize("case", PHASE_CASES, ids=str)
def test_forward_on_phase_planes_matches_reference_on_every_variant_and_thread_count(case, rng):
    x_shape, (f, kh, kw), stride, padding, dilation, groups = case
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((f, x_shape[1] // groups, kh, kw)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    want = reference.conv2d_forward(x, w, b, *args)
    for name, mod in runnable_variants():
        got = {}
        try:
            for threads in (1, 2, 3):
                mod.set_num_threads(threads)
                got[threads] = mod._im2col_forward_phase(x, w, b, *args)
        finally:
            mod.set_num_threads(0)
        assert got[1].shape == want.shape
        assert_close(got[1], want, "conv2d", err_msg=f"variant {name} {case}")
        for threads in (2, 3):
            assert_array_equal(got[threads], got[1], err_msg=f"variant {name} {case}: {threads} threads differ")


@needs_compiled
@pytest.mark.parametrize("case", [c for c in PHASE_CASES if c[0] not in ((1, 16, 9, 10), (1, 2, 6, 5))], ids=str)
def test_im2col_gemm_forward_is_the_phase_plane_product(case, rng):
    """Below GEMM_PHASE_MIN_K (64) the path gathers B instead (_gemm_conv): the same sums, bitwise.
    (The two cases left out go to DIRECT and STRIDE1_SUBSAMPLED>DIRECT.)"""
    x_shape, (f, kh, kw), stride, padding, dilation, groups = case
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((f, x_shape[1] // groups, kh, kw)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    for name, mod in runnable_variants():
        assert mod.conv_plan(x_shape, w.shape, *args)[0] == "IM2COL_GEMM"
        assert_array_equal(mod.conv2d_forward(x, w, b, *args), mod._im2col_forward_phase(x, w, b, *args),
                           err_msg=f"variant {name} {case}")


# x shape, (F, KH, KW), stride, padding, dilation, groups: every one IM2COL_GEMM
CHUNK_CASES = [
    ((2, 42, 9, 9), (12, 3, 3), 2, 1, 1, 1),         # K = 378: one chunk of 12 strips of 32
    ((2, 43, 9, 9), (12, 3, 3), 2, 1, 1, 1),         # K = 387: a second chunk of one strip
    ((1, 21, 10, 9), (20, 3, 3), 2, 1, 1, 1),        # K = 189 / 198: around one chunk of 12 strips of 16
    ((3, 22, 10, 9), (20, 3, 3), 2, 1, 1, 1),
    ((2, 90, 7, 8), (26, 3, 3), 2, 1, 1, 2),         # groups 2, K = 405 per group
    ((1, 60, 12, 11), (9, 3, 3), 3, 2, 1, 1),        # stride 3, batch 1, K = 540
]


@needs_compiled
@pytest.mark.parametrize("case", CHUNK_CASES, ids=str)
def test_dweight_chunks_of_strips_match_reference_on_every_variant_and_thread_count(case, rng):
    x_shape, (f, kh, kw), stride, padding, dilation, groups = case
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    for _name, mod in runnable_variants():
        assert mod.conv_plan(x_shape, (f, x_shape[1] // groups, kh, kw), *args) == \
            ("IM2COL_GEMM", "IM2COL_GEMM", "IM2COL_GEMM")
    check_conv_on_every_variant(rng, x_shape, (f, x_shape[1] // groups, kh, kw), *args, case=str(case))


@needs_compiled
@pytest.mark.parametrize("case", PHASE_CASES + [((2, 4, 9, 9), (6, 1, 1), 2, 0, 1, 1)], ids=str)
@pytest.mark.parametrize("kind", ["phase", "col2im"])
def test_dx_by_phases_and_by_col2im_match_reference_on_every_variant_and_thread_count(case, kind, rng):
    """Both dx kernels of the path on any shape (a 1x1 stride-2 kernel leaves three phases without taps)."""
    x_shape, (f, kh, kw), stride, padding, dilation, groups = case
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((f, x_shape[1] // groups, kh, kw)).astype(np.float32)
    dout = rng.standard_normal(reference.conv2d_forward(x, w, None, *args).shape).astype(np.float32)
    want = reference.conv2d_backward(dout, x, w, *args)[0]
    for name, mod in runnable_variants():
        run = mod._im2col_dx_phase if kind == "phase" else mod._im2col_dx_col2im
        got = {}
        try:
            for threads in (1, 2, 3):
                mod.set_num_threads(threads)
                got[threads] = run(dout, w, x_shape, *args)
        finally:
            mod.set_num_threads(0)
        assert_close(got[1], want, "conv2d_backward", err_msg=f"variant {name} {case}")
        for threads in (2, 3):
            assert_array_equal(got[threads], got[1], err_msg=f"variant {name} {case}: {threads} threads differ")


# around GEMM_PHASE_MIN_K (64): K = 63 gathers B, K = 64 copies it from phase planes
@needs_compiled
@pytest.mark.parametrize("case", [((2, 7, 13, 12), (10, 3, 3), 2, 1, 1, 1), ((2, 16, 13, 12), (10, 2, 2), 2, 1, 1, 1),
                                  ((1, 4, 17, 15), (9, 4, 4), 3, 2, 1, 1)], ids=str)
def test_im2col_gemm_around_the_phase_plane_threshold_matches_reference(case, rng):
    x_shape, (f, kh, kw), stride, padding, dilation, groups = case
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    for _name, mod in runnable_variants():
        assert mod.conv_plan(x_shape, (f, x_shape[1] // groups, kh, kw), *args)[0] == "IM2COL_GEMM"
    check_conv_on_every_variant(rng, x_shape, (f, x_shape[1] // groups, kh, kw), *args, case=str(case))


# around GEMM_DX_PHASE_MIN_CG (16 input channels per group) and GEMM_DX_PHASE_MIN_P (100 output positions)
DX_CHOICE_CASES = [
    (((1, 15, 20, 20), (9, 3, 3), 2, 1, 1, 1), "col2im"),      # 15 channels, 10x10 outputs
    (((1, 16, 20, 20), (9, 3, 3), 2, 1, 1, 1), "phase"),       # 16 channels, 10x10 outputs
    (((2, 16, 18, 21), (9, 3, 3), 2, 1, 1, 1), "col2im"),      # 9x11 = 99 outputs
    (((2, 32, 20, 20), (18, 3, 3), 2, 1, 1, 2), "phase"),      # groups 2 of 16 channels, 10x10 = 100 outputs
]


@needs_compiled
@pytest.mark.parametrize("case,kind", DX_CHOICE_CASES, ids=str)
def test_im2col_gemm_dx_takes_the_kernel_of_its_thresholds(case, kind, rng):
    x_shape, (f, kh, kw), stride, padding, dilation, groups = case
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((f, x_shape[1] // groups, kh, kw)).astype(np.float32)
    dout = rng.standard_normal(reference.conv2d_forward(x, w, None, *args).shape).astype(np.float32)
    for name, mod in runnable_variants():
        assert mod.conv_plan(x_shape, w.shape, *args)[1] == "IM2COL_GEMM"
        run = mod._im2col_dx_phase if kind == "phase" else mod._im2col_dx_col2im
        assert_array_equal(mod.conv2d_backward(dout, x, w, *args)[0], run(dout, w, x_shape, *args),
                           err_msg=f"variant {name} {case}")
    check_conv_on_every_variant(rng, x_shape, w.shape, *args, case=str(case))
