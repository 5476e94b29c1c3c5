"""conv2d with inf and NaN in x, dout or weight: the contract of docs/performance.md ("Non-finite values").

Every backend, against the reference (which computes the textbook sums, so IEEE arithmetic decides):
  * wherever the reference gives NaN, the backend gives NaN;
  * wherever the reference gives +-inf, the backend gives the same inf or NaN, never a finite number;
  * wherever the backend gives +-inf, the reference gives that same inf;
  * finite inputs give finite outputs.
The python fallback propagates exactly like the reference (same NaN and inf positions). The compiled
backend may turn an inf into NaN and may spread a non-finite value further than the reference (a
Winograd tile, all 9 dweight taps, a whole dx plane for a non-finite weight, x values a stride skips),
so for it only the four rules above hold. The cases below take each of its paths: Winograd forward,
dx and dweight (3x3, stride 1 and 2, from 16 in / 24 out and 32 in / 24 out channels), the direct and
lane-sum kernels (8 channels), the channel-blocked dweight (64 channels, 1x1 and 5x5) and the first
layer's path (one input channel), and dilated convs on Winograd through their phase planes; the bad
value sits in a corner, on an edge and inside.
"""
import numpy as np
import pytest

from chexcy import ops, reference
from ops_cases import BACKENDS

# (N, C, F, H, KH, stride, padding, path the compiled backend takes[, dilation])
CASES = [
    (2, 16, 24, 10, 3, 1, 1, "winograd forward, direct dx and dweight"),
    (2, 32, 24, 10, 3, 1, 0, "winograd forward and dweight"),
    (2, 32, 24, 11, 3, 1, 1, "winograd forward and dweight, odd plane"),
    (2, 24, 16, 10, 3, 1, 1, "winograd dx"),
    (2, 32, 24, 11, 3, 2, 1, "stride 2 through the winograd stride-1 kernels"),
    (2, 8, 8, 10, 3, 1, 1, "direct forward and dx, lane-sum dweight"),
    (2, 8, 8, 11, 3, 2, 0, "stride 2 through the direct kernels"),
    (1, 64, 16, 9, 1, 1, 0, "1x1, channel-blocked dweight"),
    (1, 64, 16, 9, 5, 1, 2, "5x5, channel-blocked dweight"),
    (2, 1, 8, 12, 3, 1, 1, "one input channel (a first layer)"),
    (2, 96, 96, 15, 3, 1, 2, "dilation 2: winograd forward on the phase planes (UNDILATED)", 2),
    (1, 96, 100, 20, 3, 1, 3, "dilation 3: winograd forward on the phase planes (UNDILATED)", 3),
]
WHERE = ("x", "dout", "weight")
# (value, where it sits): NaN and inf at a border, where padding makes the reference's reach smallest
# (a corner NaN of x reaches 4 of the 9 dweight taps there), and inside.
PLANTS = ((np.nan, "corner"), (np.nan, "edge"), (np.inf, "corner"), (np.inf, "inside"), (-np.inf, "edge"))


def case_id(case):
    N, C, F, H, K, s, p, _, *d = case
    return f"N{N}C{C}F{F}H{H}k{K}s{s}p{p}" + (f"d{d[0]}" if d else "")


def make_inputs(rng, case):
    N, C, F, H, K, s, p, _, *d = case
    OH = (H + 2 * p - (d[0] if d else 1) * (K - 1) - 1) // s + 1
    x = rng.standard_normal((N, C, H, H)).astype(np.float32)
    weight = rng.standard_normal((F, C, K, K)).astype(np.float32)
    dout = rng.standard_normal((N, F, OH, OH)).astype(np.float32)
    return {"x": x, "weight": weight, "dout": dout}


def plant(array, spot, value):
    """Put `value` at one place of array (n 0, channel 1 or 0, a corner, an edge, or inside)."""
    S = array.shape[-1]
    i, j = {"corner": (0, 0), "edge": (0, S // 2 + 1), "inside": (S // 2 + 1, S // 2)}[spot]
    array[0, min(1, array.shape[1] - 1), min(i, S - 1), min(j, S - 1)] = value


def run(backend, arrays, s, p, d=1):
    x, weight, dout = arrays["x"], arrays["weight"], arrays["dout"]
    with np.errstate(invalid="ignore", over="ignore"):
        want = (reference.conv2d_forward(x, weight, None, (s, s), (p, p), (d, d), 1),
                *reference.conv2d_backward(dout, x, weight, (s, s), (p, p), (d, d), 1))
        with ops.use_backend(backend):
            got = (ops.conv2d_forward(x, weight, None, stride=s, padding=p, dilation=d),
                   *ops.conv2d_backward(dout, x, weight, stride=s, padding=p, dilation=d))
    return got, want


def check_contract(backend, got, want, what):
    for name, g, w in zip(("out", "dx", "dweight", "dbias"), got, want):
        label = f"{backend} {name} ({what})"
        assert not np.any(np.isnan(w) & ~np.isnan(g)), f"{label}: the reference has NaN where this has a number"
        assert not np.any(~np.isfinite(w) & np.isfinite(g)), f"{label}: finite where the reference is inf/NaN"
        inf = np.isinf(g)
        assert np.array_equal(g[inf], w[inf]), f"{label}: an inf where the reference has another value"
        if backend == "python":              # the fallback propagates exactly like the reference
            assert np.array_equal(np.isnan(g), np.isnan(w)) and np.array_equal(np.isinf(g), np.isinf(w)), \
                f"{label}: NaN/inf positions differ from the reference's"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nonfinite_inputs_follow_the_documented_contract(backend, where, case, rng):
    N, C, F, H, K, s, p, path, *d = case
    base = make_inputs(rng, case)
    for value, spot in PLANTS:
        arrays = {k: v.copy() for k, v in base.items()}
        plant(arrays[where], spot, value)
        got, want = run(backend, arrays, s, p, *d)
        check_contract(backend, got, want, f"{case_id(case)} [{path}], {value} in {where} at the {spot}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_finite_inputs_give_finite_outputs(backend, case, rng):
    N, C, F, H, K, s, p, path, *d = case
    arrays = make_inputs(rng, case)
    for k in arrays:
        arrays[k] *= 1e3                     # large, yet far from float32's overflow in these sums
    got, _ = run(backend, arrays, s, p, *d)
    for name, g in zip(("out", "dx", "dweight", "dbias"), got):
        assert np.all(np.isfinite(g)), f"{backend} {name} {case_id(case)} [{path}]: non-finite from finite input"


@pytest.mark.skipif("cython" not in ops.available_backends(), reason="the compiled module is not built")
def test_the_dilated_cases_take_the_path_they_are_here_for():
    """The dilated cases above are there for UNDILATED (dilated 3x3 forward on Winograd through phase
    planes); if its limits move, they must move with them."""
    for N, C, F, H, K, s, p, path, *d in CASES:
        if d:
            with ops.use_backend("cython"):
                plan = ops.conv2d_plan((N, C, H, H), (F, C, K, K), stride=s, padding=p, dilation=d[0])
            assert plan.forward == "UNDILATED>WINOGRAD", f"{path}: planned {plan}"
