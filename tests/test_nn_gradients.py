"""Every layer's backward (and whole models') against central finite differences.

How the checks stay rigorous: chexcy.ops converts every input to float32 by contract, and float32
finite differences cannot tell a right gradient from a slightly wrong one (the rounding of a difference
quotient is ~1e-3 relative). So the gradient checks run the layers in float64 with
`chexcy.nn.use_kernels(chexcy.reference)`, which routes the layers' conv/pool/linear calls straight to the
NumPy reference backend (which works unchanged in float64), and compare with central differences at
eps = 1e-6 with tight tolerances (rtol 1e-6, atol 1e-8: a central difference in float64 is accurate to
~eps**2 * f''' + 1e-16 / eps ~ 1e-10). The NumPy layers (ReLU, BatchNorm, Dropout, Flatten, the loss) are
dtype-preserving, so the same check covers them.

A second set of tests then runs each layer through chexcy.ops (the backend under test, float32) and
requires it to match the float64 reference-routed result within float32 tolerances (rtol 1e-4,
atol 1e-5 on unit-scale data), so the float64 proof carries over to what training actually executes.

Inputs are chosen so no point sits on a kink: random normal values (no ties for max pooling, no value
within eps of ReLU's 0 with overwhelming probability; the seeds are fixed).
"""
import zlib

import numpy as np
import pytest

from chexcy import nn, ops, reference
from ops_cases import central_differences

EPS = 1e-6
TOL64 = dict(rtol=1e-6, atol=1e-8)
TOL32 = dict(rtol=1e-4, atol=1e-5)


def to_float64(module):
    for p in module.parameters():
        p.data = p.data.astype(np.float64)
    for m in module.modules():
        for name in m._buffers:
            setattr(m, name, getattr(m, name).astype(np.float64))
    return module


def numeric_grad(f, array, indices):
    """Central differences of scalar f() with respect to array[idx] for idx in indices."""
    return central_differences(f, array, indices, eps=EPS)


def sample_indices(shape, rng, limit=40):
    """All indices of small arrays; a random `limit` of bigger ones."""
    all_idx = list(np.ndindex(*shape))
    if len(all_idx) <= limit:
        return all_idx
    return [all_idx[i] for i in rng.choice(len(all_idx), limit, replace=False)]


def check_module(module, inputs, rng, forward=None, reset=None):
    """Compare module.backward with finite differences of sum(forward(*inputs) * dout), float64."""
    forward = forward or module.forward
    reset = reset or (lambda: None)
    reset()
    out = forward(*inputs)
    dout = rng.standard_normal(out.shape)

    def f():
        reset()
        return float(np.sum(forward(*inputs) * dout))

    reset()
    forward(*inputs)
    grads = module.backward(dout.copy())
    grads = grads if isinstance(grads, tuple) else (grads,)
    for k, (x, dx) in enumerate(zip(inputs, grads)):
        if dx is None:
            continue
        idx = sample_indices(x.shape, rng)
        np.testing.assert_allclose([dx[i] for i in idx], numeric_grad(f, x, idx), **TOL64,
                                   err_msg=f"{type(module).__name__}: input {k} gradient")
    analytic = {name: p.grad.copy() for name, p in module.named_parameters()}
    for name, p in module.named_parameters():
        idx = sample_indices(p.data.shape, rng, limit=12)
        np.testing.assert_allclose([analytic[name][i] for i in idx], numeric_grad(f, p.data, idx), **TOL64,
                                   err_msg=f"{type(module).__name__}: parameter {name} gradient")


def layer_cases():
    r = np.random.default_rng(100)
    return [
        ("conv", lambda: nn.Conv2d(3, 4, 3, padding=1, rng=r), (2, 3, 6, 5)),
        ("conv_stride_dil_groups", lambda: nn.Conv2d(4, 6, (3, 2), stride=2, padding=(2, 1), dilation=(2, 1),
                                                     groups=2, rng=r), (2, 4, 7, 6)),
        ("conv_same_nobias", lambda: nn.Conv2d(2, 3, 5, padding="same", bias=False, rng=r), (1, 2, 6, 6)),
        ("maxpool", lambda: nn.MaxPool2d(2), (2, 3, 6, 6)),
        ("maxpool_pad_stride", lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 2, 7, 5)),
        ("avgpool", lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 2, 7, 6)),
        ("avgpool_exclude_pad", lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
         (1, 2, 5, 6)),
        ("gap", lambda: nn.GlobalAvgPool2d(), (3, 4, 5, 3)),
        ("linear", lambda: nn.Linear(7, 5, rng=r), (4, 7)),
        ("relu", lambda: nn.ReLU(), (2, 3, 4, 4)),
        ("flatten", lambda: nn.Flatten(), (2, 3, 2, 2)),
        ("batchnorm", lambda: nn.BatchNorm2d(3), (4, 3, 3, 2)),
        ("residual_identity", lambda: nn.ResidualBlock(3, 3, rng=r), (2, 3, 5, 5)),
        ("residual_projection", lambda: nn.ResidualBlock(2, 4, stride=2, rng=r), (2, 2, 6, 5)),
        ("sequential", lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, rng=r), nn.ReLU(inplace=True),
                                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 2, rng=r)),
         (2, 1, 4, 4)),
    ]


CASES = layer_cases()


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_layer_backward_matches_finite_differences_float64(name, make, shape):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    module = to_float64(make())
    if name == "batchnorm":
        # Non-trivial scale and shift so their gradients are exercised away from the init values.
        module.weight.data[:] = rng.uniform(0.5, 2, module.weight.shape)
        module.bias.data[:] = rng.standard_normal(module.bias.shape)
    x = rng.standard_normal(shape)
    with nn.use_kernels(reference):
        check_module(module, (x,), rng)


def test_batchnorm_running_stats_and_eval_mode():
    rng = np.random.default_rng(5)
    bn = to_float64(nn.BatchNorm2d(2, momentum=0.5))
    x = rng.standard_normal((8, 2, 4, 4)) * 3 + 1
    bn.forward(x)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.running_mean, 0.5 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.5 + 0.5 * var, rtol=1e-12)
    bn.eval()
    y = bn.forward(x)
    np.testing.assert_allclose(y, (x - bn.running_mean[:, None, None]) / np.sqrt(bn.running_var + 1e-5)[:, None, None],
                               rtol=1e-12)
    # Eval mode is an affine map; its backward (used by Grad-CAM through BN models) is checked too.
    bn.weight.data[:] = [0.7, 1.9]
    check_module(bn, (x,), rng)


def test_dropout_gradient_with_a_fixed_mask_and_eval_identity():
    rng = np.random.default_rng(6)
    drop = nn.Dropout(0.4)
    x = rng.standard_normal((5, 8))
    check_module(drop, (x,), rng, reset=lambda: drop.set_random_state(np.random.default_rng(11)))
    drop.set_random_state(np.random.default_rng(11))
    y = drop.forward(x)
    kept = y != 0
    assert 0.3 < 1 - kept.mean() < 0.6
    np.testing.assert_allclose(y[kept], x[kept] / 0.6)
    drop.eval()
    assert drop.forward(x) is x


MODEL_CASES = [
    ("simple", dict(widths=[3, 4]), (2, 1, 8, 8)),
    ("simple_dropout", dict(widths=[2, 3, 4], dropout=0.3), (2, 1, 8, 8)),
    ("resnet", dict(widths=[3, 4], blocks=1), (3, 1, 8, 8)),
]


@pytest.mark.parametrize("name,config,shape", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_backward_matches_finite_differences_float64(name, config, shape):
    rng = np.random.default_rng(7)
    model = to_float64(nn.build_model(name.split("_")[0], **config))
    x = rng.standard_normal(shape)
    with nn.use_kernels(reference):
        check_module(model, (x,), rng, reset=lambda: model.set_random_state(np.random.default_rng(3)))


@pytest.mark.parametrize("shared", [True, False])
def test_multiview_backward_matches_finite_differences_float64(shared):
    rng = np.random.default_rng(8)
    model = to_float64(nn.build_model("multiview", widths=[2, 3], shared=shared, hidden=5, dropout=0.25))
    frontal = rng.standard_normal((4, 1, 6, 6))
    lateral = rng.standard_normal((4, 1, 6, 6))
    has_f = np.array([1, 1, 0, 1.0])
    has_l = np.array([1, 0, 1, 0.0])
    frontal[2] = 0
    lateral[[1, 3]] = 0
    tab = rng.random((4, 2))
    with nn.use_kernels(reference):
        check_module(model, (frontal, lateral), rng,
                     forward=lambda f, lat: model.forward(f, lat, has_f, has_l, tab),
                     reset=lambda: model.set_random_state(np.random.default_rng(3)))
    # A missing view's image does not matter at all.
    model.set_random_state(np.random.default_rng(3))
    with nn.use_kernels(reference):
        a = model.forward(frontal, lateral, has_f, has_l, tab)
        lateral[1] = 99.0
        model.set_random_state(np.random.default_rng(3))
        b = model.forward(frontal, lateral, has_f, has_l, tab)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_layer_on_ops_float32_matches_reference_float64(name, make, shape):
    """What training runs (chexcy.ops, current backend, float32) equals the float64 oracle's numbers."""
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    module32 = make()
    # Same parameters in both precisions: copy the float32 module's state into a float64 twin.
    module64 = to_float64(make())
    module64.load_state_dict(module32.state_dict())
    x = rng.standard_normal(shape)
    out32 = module32.forward(x.astype(np.float32))
    with nn.use_kernels(reference):
        out64 = module64.forward(x)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, **TOL32, err_msg=f"{name} forward on {ops.get_backend()}")
    dout = rng.standard_normal(out64.shape)
    dx32 = module32.backward(dout.astype(np.float32))
    with nn.use_kernels(reference):
        dx64 = module64.backward(dout.copy())
    np.testing.assert_allclose(dx32, dx64, **TOL32, err_msg=f"{name} dx on {ops.get_backend()}")
    for (pname, p32), (_, p64) in zip(module32.named_parameters(), module64.named_parameters()):
        assert p32.grad.dtype == np.float32, pname
        np.testing.assert_allclose(p32.grad, p64.grad, rtol=1e-4, atol=1e-4,
                                   err_msg=f"{name} {pname} grad on {ops.get_backend()}")


def test_state_dict_round_trip_and_mismatch_errors():
    a = nn.build_model("resnet", widths=[2, 3], seed=1)
    b = nn.build_model("resnet", widths=[2, 3], seed=2)
    a.trunk.layers[1].running_mean[:] = 3.0
    b.load_state_dict(a.state_dict())
    for (na, va), (nb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and np.array_equal(va, vb)
    with pytest.raises(ValueError, match="shape mismatch"):
        nn.build_model("resnet", widths=[2, 4]).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing"):
        nn.build_model("resnet", widths=[2, 3, 4]).load_state_dict(a.state_dict())


def test_train_eval_flags_reach_every_layer():
    m = nn.build_model("resnet", widths=[2, 3], dropout=0.5)
    m.eval()
    assert not any(x.training for x in m.modules())
    m.train()
    assert all(x.training for x in m.modules())
