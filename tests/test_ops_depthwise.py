"""The DEPTHWISE paths: groups = C = F convolutions at every stride up to 4, over phase planes
(DEPTHWISE, chexcy/_ops_depthwise.h) or, from 64 channels on small planes, with the channels in the
vector lanes (DEPTHWISE_LANES, chexcy/_ops_depthwise_lanes.h).

Each case runs forward, dx, dweight and dbias through check_conv_on_every_variant: compared with
chexcy.reference at 1 thread on every instruction-set variant built here, and bit for bit with that
result at 2 and 3 threads. The cases cover 3x3 and 5x5 kernels (and 1x1, 7x7, non-square), strides 1 to
4, padding 0 to 3 (wider than the kernel's reach too), dilation 1 and 2, odd and tiny planes (1x1, 2x2,
7x7), batch 1, and batches whose small planes the kernel stacks several at a time (B > 1 samples of one
channel in one flat loop) or not (B = 1), including a prime batch.
"""
import pytest

from chexcy import ops

from ops_cases import COMPILED, check_conv_on_every_variant

needs_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled module is not built (fallback-only run)")

DW = ("DEPTHWISE",) * 3

# x shape (N, C, H, W), (KH, KW), stride, padding, dilation; weight (C, 1, KH, KW), groups C
CASES = [
    ((8, 6, 7, 7), (3, 3), 1, 1, 1),            # mobilenet's 7x7 planes: 8 samples stacked per unit
    ((8, 5, 14, 14), (3, 3), 2, 1, 1),          # 14x14, stride 2 (even/odd phase planes)
    ((2, 4, 28, 28), (5, 5), 2, 2, 1),          # 5x5, stride 2
    ((1, 3, 11, 13), (3, 3), 1, 1, 1),          # batch 1, odd sizes
    ((1, 3, 13, 9), (5, 5), 1, 2, 1),           # 5x5 stride 1, odd sizes
    ((3, 2, 1, 1), (3, 3), 1, 1, 1),            # 1x1 planes: only the centre tap sees the input
    ((2, 3, 2, 2), (3, 3), 2, 1, 1),            # 2x2 planes, stride 2
    ((2, 3, 2, 2), (3, 3), 1, 1, 1),
    ((7, 3, 9, 10), (3, 3), 1, 0, 1),           # prime batch, no padding
    ((2, 3, 15, 12), (3, 3), 3, 1, 1),          # stride 3
    ((2, 3, 17, 16), (3, 3), 4, 2, 1),          # stride 4
    ((2, 3, 12, 11), (3, 3), 1, 2, 2),          # dilation 2, stride 1
    ((2, 3, 13, 14), (3, 3), 2, 2, 2),          # dilation 2, stride 2 (the odd phases get no tap)
    ((1, 2, 9, 10), (5, 5), 2, 0, 2),           # 5x5 dilated, no padding
    ((2, 3, 8, 9), (3, 3), 1, 3, 1),            # padding wider than the kernel's reach
    ((2, 3, 10, 9), (3, 3), 2, 3, 1),
    ((2, 3, 9, 11), (3, 5), (1, 2), (1, 2), 1),     # non-square kernel, stride and padding
    ((2, 3, 13, 10), (5, 3), (2, 1), (2, 0), (1, 2)),
    ((2, 3, 8, 8), (1, 1), 2, 0, 1),            # 1x1 depthwise (a per-channel scale), stride 2
    ((2, 3, 12, 12), (7, 7), 1, 3, 1),          # 7x7: CHEXCY_DWC_MAX_TAPS
    ((4, 2, 30, 30), (3, 3), 1, 1, 1),          # 4 planes of 32x32 padded: B = 4, exactly the stack limit
    ((5, 2, 40, 41), (3, 3), 1, 1, 1),          # planes too big to stack: B = 1
    ((2, 2, 1, 40), (3, 3), 1, 1, 1),           # one row
    ((2, 2, 40, 1), (3, 3), 2, 1, 1),           # one column
    ((2, 3, 6, 33), (3, 3), 2, 1, 1),           # stride 2 row splits: two whole vector blocks and a column
    ((1, 2, 5, 16), (5, 5), 2, 2, 1),           # stride 2, a row of exactly one AVX2 block
]


def _case_id(case):
    xs, k, s, p, d = case
    return f"x{'x'.join(map(str, xs))}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}"


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@needs_compiled
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_depthwise_takes_the_depthwise_path(case):
    xs, (KH, KW), s, p, d = case
    with ops.use_backend("cython"):
        plan = ops.conv2d_plan(xs, (xs[1], 1, KH, KW), stride=s, padding=p, dilation=d, groups=xs[1])
    assert plan == ops.ConvPlan(*DW), f"{_case_id(case)}: planned {plan}"


@needs_compiled
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_depthwise_matches_the_reference_on_every_variant_and_thread_count(case, rng):
    xs, (KH, KW), s, p, d = case
    check_conv_on_every_variant(rng, xs, (xs[1], 1, KH, KW), _pair(s), _pair(p), _pair(d), xs[1],
                                case=_case_id(case))


# DEPTHWISE_LANES (chexcy/_ops_depthwise_lanes.h): from DWL_MIN_C = 64 channels on planes of at most
# DWL_MAX_HW = 1024 pixels when strided, DWL_MAX_HW_S1 = 144 at stride 1. Channel counts that leave a last block of 3 lanes (67: 4 x 16 + 3, 8 x 8 + 3,
# 16 x 4 + 3) or 8 (72 on AVX-512), the plane sizes at the threshold, odd planes, every stride up to 4.
LANES = ("DEPTHWISE_LANES",) * 3
LANE_CASES = [
    ((2, 67, 7, 7), (3, 3), 1, 1, 1),           # mobilenet's 7x7, a last block of 3 channels
    ((1, 64, 14, 14), (3, 3), 2, 1, 1),         # stride 2 at 14x14, batch 1
    ((2, 72, 9, 11), (5, 5), 2, 2, 1),          # 5x5, odd sizes
    ((3, 64, 12, 12), (3, 3), 1, 2, 2),         # dilation 2
    ((2, 66, 5, 6), (3, 5), (1, 2), (1, 2), 1),     # non-square kernel, stride and padding
    ((1, 64, 32, 32), (3, 3), 2, 1, 1),         # 1024 pixels: the largest plane it takes (strided)
    ((1, 64, 12, 12), (3, 3), 1, 1, 1),         # 144 pixels: the largest at stride 1
    ((2, 64, 1, 1), (3, 3), 1, 1, 1),           # 1x1 planes
    ((2, 65, 8, 9), (3, 3), 1, 3, 1),           # padding wider than the kernel's reach
    ((1, 64, 12, 12), (7, 7), 1, 3, 1),         # 7x7: CHEXCY_DWC_MAX_TAPS
    ((2, 64, 15, 12), (3, 3), 3, 1, 1),         # stride 3
    ((1, 64, 17, 16), (3, 3), 4, 2, 1),         # stride 4
    ((2, 64, 9, 10), (1, 1), 2, 0, 1),          # 1x1 (a per-channel scale), stride 2
]


@needs_compiled
@pytest.mark.parametrize("case", LANE_CASES, ids=_case_id)
def test_lanes_cases_take_the_lanes_path_and_match_the_reference(case, rng):
    xs, (KH, KW), s, p, d = case
    with ops.use_backend("cython"):
        plan = ops.conv2d_plan(xs, (xs[1], 1, KH, KW), stride=s, padding=p, dilation=d, groups=xs[1])
    assert plan == ops.ConvPlan(*LANES), f"{_case_id(case)}: planned {plan}"
    check_conv_on_every_variant(rng, xs, (xs[1], 1, KH, KW), _pair(s), _pair(p), _pair(d), xs[1],
                                case=_case_id(case))


@needs_compiled
@pytest.mark.parametrize("xs, stride, want", [
    ((2, 64, 32, 32), 2, LANES), ((2, 64, 33, 31), 2, LANES), ((2, 64, 31, 34), 2, DW),  # 1024, 1023, 1054 px
    ((2, 64, 12, 12), 1, LANES), ((2, 64, 13, 11), 1, LANES), ((2, 64, 12, 13), 1, DW),  # 144, 143, 156 px
    ((2, 64, 14, 14), (1, 2), LANES),                                   # strided in one direction
    ((2, 63, 7, 7), 1, DW), ((2, 64, 7, 7), 1, LANES),                  # channels
])
def test_lanes_thresholds(xs, stride, want):
    with ops.use_backend("cython"):
        plan = ops.conv2d_plan(xs, (xs[1], 1, 3, 3), stride=stride, padding=1, groups=xs[1])
    assert plan == ops.ConvPlan(*want), f"{xs}: planned {plan}"


# Convolutions the DEPTHWISE path does not take (and the general paths must get right).
OTHER_CASES = [
    # a depthwise multiplier (F = 2 C: two output channels per group)
    (((2, 4, 9, 7), (8, 3, 3), 1, 1, 1, 4), ("DIRECT", "DIRECT", "LANE_SUM")),
    (((2, 4, 9, 7), (8, 3, 3), 2, 1, 1, 4), ("STRIDE1_SUBSAMPLED>DIRECT", "SPREAD>DIRECT", "SPREAD>LANE_SUM")),
    # one channel at stride 1 is an ordinary convolution
    (((2, 1, 12, 13), (1, 3, 3), 1, 1, 1, 1), ("DIRECT", "FIRST_LAYER", "FIRST_LAYER")),
    # more than CHEXCY_DWC_MAX_TAPS taps, and strides above CHEXCY_DWC_MAX_STRIDE
    (((1, 3, 12, 12), (3, 9, 9), 1, 4, 1, 3), ("DIRECT", "DIRECT", "LANE_SUM")),
    # (whose backward spreads dout onto the stride-1 grid, which is DEPTHWISE again)
    (((1, 3, 16, 17), (3, 3, 3), 5, 1, 1, 3), ("PLAIN", "SPREAD>DEPTHWISE", "SPREAD>DEPTHWISE")),
]


def _other_id(item):
    (xs, (F, KH, KW), s, p, d, g), _ = item
    return f"x{'x'.join(map(str, xs))}-w{F}x{KH}x{KW}-s{s}-p{p}-d{d}-g{g}"


@needs_compiled
@pytest.mark.parametrize("item", OTHER_CASES, ids=_other_id)
def test_not_depthwise_takes_the_general_paths_and_matches_the_reference(item, rng):
    (xs, (F, KH, KW), s, p, d, g), want = item
    with ops.use_backend("cython"):
        plan = ops.conv2d_plan(xs, (F, xs[1] // g, KH, KW), stride=s, padding=p, dilation=d, groups=g)
    assert plan == ops.ConvPlan(*want), f"{_other_id(item)}: planned {plan}, expected {want}"
    check_conv_on_every_variant(rng, xs, (F, xs[1] // g, KH, KW), _pair(s), _pair(p), _pair(d), g,
                                case=_other_id(item))
