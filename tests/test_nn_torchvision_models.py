"""resnet18/34/50 and densenet121: torchvision's parameter names and shapes, parameter counts, the layers
they are built from (against finite differences and against plain compositions of chexcy's layers),
whole small instances against finite differences, and the compiled backend against the reference.

The expected names below are written from torchvision's model definitions (torchvision/models/resnet.py
and densenet.py), not from chexcy's code: ResNet has conv1, bn1, layer1..4 of blocks (BasicBlock: conv1
bn1 conv2 bn2; Bottleneck: conv1 bn1 conv2 bn2 conv3 bn3 with 4x expansion), a `downsample` Sequential
(conv, BN) on a block whose stride or width changes, and fc; DenseNet has `features` (conv0, norm0,
denseblockB.denselayerL.{norm1, conv1, norm2, conv2}, transitionT.{norm, conv}, norm5) and
`classifier`. BatchNorm's num_batches_tracked is not kept by chexcy.
"""
import numpy as np
import pytest

from chexcy import nn, ops, reference
from ops_cases import central_differences
from test_nn_gradients import check_module, to_float64

# torchvision's published parameter counts with 3 input channels and 1000 classes.
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                          "densenet121": 7_978_856}


def torchvision_resnet_shapes(depth, in_channels, num_classes):
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
    bottleneck = depth >= 50
    shapes = {}

    def conv(name, out_c, in_c, k):
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)

    def bn(name, c):
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{field}"] = (c,)

    conv("conv1", 64, in_channels, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, count) in enumerate(zip([64, 128, 256, 512], blocks), start=1):
        for b in range(count):
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
                out = planes * 4
            else:
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                out = planes
            if stride != 1 or inplanes != out:
                conv(f"{p}.downsample.0", out, inplanes, 1), bn(f"{p}.downsample.1", out)
            inplanes = out
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, inplanes), (num_classes,)
    return shapes


def torchvision_densenet121_shapes(in_channels, num_classes):
    shapes = {"features.conv0.weight": (64, in_channels, 7, 7)}

    def bn(name, c):
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"features.{name}.{field}"] = (c,)

    bn("norm0", 64)
    channels = 64
    for b, layers in enumerate([6, 12, 24, 16], start=1):
        for i in range(layers):
            p = f"denseblock{b}.denselayer{i + 1}"
            c = channels + 32 * i
            bn(f"{p}.norm1", c)
            shapes[f"features.{p}.conv1.weight"] = (128, c, 1, 1)
            bn(f"{p}.norm2", 128)
            shapes[f"features.{p}.conv2.weight"] = (32, 128, 3, 3)
        channels += 32 * layers
        if b < 4:
            bn(f"transition{b}.norm", channels)
            shapes[f"features.transition{b}.conv.weight"] = (channels // 2, channels, 1, 1)
            channels //= 2
    bn("norm5", channels)
    shapes["classifier.weight"], shapes["classifier.bias"] = (num_classes, 1024), (num_classes,)
    return shapes


def expected_shapes(arch, in_channels, num_classes):
    if arch == "densenet121":
        return torchvision_densenet121_shapes(in_channels, num_classes)
    return torchvision_resnet_shapes(int(arch[len("resnet"):]), in_channels, num_classes)


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMETERS))
@pytest.mark.parametrize("in_channels,num_classes", [(1, 14), (3, 1000)])
def test_state_dict_names_and_shapes_are_torchvisions(arch, in_channels, num_classes):
    model = nn.build_model(arch, in_channels=in_channels, num_classes=num_classes)
    got = {name: value.shape for name, value in model.state_dict().items()}
    want = expected_shapes(arch, in_channels, num_classes)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    wrong = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert wrong == {}
    assert all(v.dtype == np.float32 for v in model.state_dict().values())


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMETERS))
def test_parameter_counts_are_torchvisions(arch):
    assert nn.build_model(arch, in_channels=3, num_classes=1000).num_parameters() == TORCHVISION_PARAMETERS[arch]


def test_some_names_spelled_out():
    """A few keys written out in full, as a reader of torchvision's state dicts knows them."""
    r18, r50 = nn.build_model("resnet18").state_dict(), nn.build_model("resnet50").state_dict()
    d121 = nn.build_model("densenet121").state_dict()
    assert r18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert r18["layer2.0.downsample.1.running_mean"].shape == (128,)
    assert "layer1.0.downsample.0.weight" not in r18 and r18["fc.weight"].shape == (14, 512)
    assert r50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1) and r50["fc.weight"].shape == (14, 2048)
    assert r50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert d121["features.conv0.weight"].shape == (64, 1, 7, 7)
    assert d121["features.denseblock1.denselayer1.norm1.weight"].shape == (64,)
    assert d121["features.denseblock3.denselayer24.conv1.weight"].shape == (128, 992, 1, 1)
    assert d121["features.transition1.conv.weight"].shape == (128, 256, 1, 1)
    assert d121["features.norm5.running_var"].shape == (1024,) and d121["classifier.weight"].shape == (14, 1024)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_weights_move_both_ways_and_mismatches_are_named(arch):
    a, b = nn.build_model(arch, seed=1), nn.build_model(arch, seed=2)
    state = a.state_dict()
    b.load_state_dict(state)
    assert all(np.array_equal(v, b.state_dict()[k]) for k, v in state.items())
    first = next(iter(state))
    missing = {k: v for k, v in state.items() if k != first}
    with pytest.raises(ValueError, match=rf"missing \['{first}'\]"):
        b.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        b.load_state_dict({**state, "extra.weight": np.zeros(3, np.float32)})
    head = "fc.weight" if arch == "resnet18" else "classifier.weight"
    with pytest.raises(ValueError, match=rf"shape mismatch {head}: expected \(14, \d+\), got \(1000, \d+\)"):
        b.load_state_dict({**state, head: np.zeros((1000, state[head].shape[1]), np.float32)})
    with pytest.raises(ValueError, match="conv1.weight|conv0.weight"):
        nn.build_model(arch, in_channels=3).load_state_dict(state)


def test_initialisation_follows_torchvision():
    rng_std = lambda a: float(np.std(a))          # noqa: E731
    r50 = nn.build_model("resnet50", seed=3)
    w = r50.layer3[0].conv2.weight.data           # (256, 256, 3, 3): fan_out 2304
    assert abs(rng_std(w) / np.sqrt(2 / 2304) - 1) < 0.02
    w = r50.layer4[0].conv3.weight.data           # (2048, 512, 1, 1): fan_out 2048 (fan_in would be 512)
    assert abs(rng_std(w) / np.sqrt(2 / 2048) - 1) < 0.02
    d = nn.build_model("densenet121", seed=3)
    w = d.features.denseblock3.denselayer24.conv1.weight.data   # (128, 992, 1, 1): fan_in 992
    assert abs(rng_std(w) / np.sqrt(2 / 992) - 1) < 0.02
    for model, head in ((r50, r50.fc), (d, d.classifier)):
        bound = 1 / np.sqrt(head.in_features)
        assert np.abs(head.weight.data).max() <= bound and np.abs(head.weight.data).max() > 0.9 * bound
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(np.all(m.weight.data == 1) and np.all(m.bias.data == 0) for m in bns)
    assert np.all(d.classifier.bias.data == 0) and np.any(r50.fc.bias.data != 0)


def test_batchnorm_has_pytorchs_semantics_on_the_compiled_path():
    """Normalise with the biased batch variance; running var gets the unbiased one; momentum 0.1."""
    rng = np.random.default_rng(9)
    bn = nn.BatchNorm2d(3)
    bn.weight.data[:] = [1.0, 2.0, 0.5]
    bn.bias.data[:] = [0.0, -1.0, 3.0]
    x = (rng.standard_normal((4, 3, 5, 5)) * 2 + 1).astype(np.float32)
    y = bn.forward(x)
    mean, var_biased = x.mean(axis=(0, 2, 3), dtype=np.float64), x.var(axis=(0, 2, 3), dtype=np.float64)
    want = ((x - mean[:, None, None]) / np.sqrt(var_biased + 1e-5)[:, None, None] * bn.weight.data[:, None, None]
            + bn.bias.data[:, None, None])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var_biased * 100 / 99, rtol=1e-5)
    bn.forward(x)
    np.testing.assert_allclose(bn.running_mean, 0.19 * mean, rtol=1e-5)
    bn.eval()
    np.testing.assert_allclose(
        bn.forward(x), (x - bn.running_mean[:, None, None]) / np.sqrt(bn.running_var + 1e-5)[:, None, None]
        * bn.weight.data[:, None, None] + bn.bias.data[:, None, None], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The layers these networks are built from

def naive_dense_block(block):
    """The same function as `block`, written as torchvision writes it: concatenate, then norm1 relu conv1
    norm2 relu2 conv2 as plain modules, one concatenation per layer."""
    from chexcy.nn.module import Module

    class Naive(Module):
        def __init__(self):
            self.steps = [nn.Sequential(layer.norm1, nn.ReLU(), layer.conv1, layer.norm2, nn.ReLU(), layer.conv2)
                          for layer in block.layers]

        def forward(self, x):
            self.widths = [x.shape[1]]
            features = x
            for step in self.steps:
                features = np.concatenate([features, step.forward(features)], axis=1)
                self.widths.append(features.shape[1])
            return features

        def backward(self, dout):
            d = dout.copy()
            for step, c in zip(reversed(self.steps), reversed(self.widths[:-1])):
                d[:, :c] += step.backward(np.ascontiguousarray(d[:, c:c + block.growth_rate]))
            return d[:, :self.widths[0]]

    return Naive()


def small_block(rng):
    block = to_float64(nn.DenseBlock(3, 5, 2, 3, rng))
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):                  # away from the initial 1 / 0
            m.weight.data[:] = rng.uniform(0.5, 2, m.weight.shape)
            m.bias.data[:] = rng.standard_normal(m.bias.shape)
    return block


@pytest.mark.parametrize("training", [True, False])
def test_dense_block_equals_concatenating_layers(training):
    """The shared buffer, shared statistics and recomputed bottleneck input give exactly torchvision's
    concatenation: output, input gradient, every parameter gradient and the running statistics."""
    rng = np.random.default_rng(12)
    block = small_block(rng)
    x = rng.standard_normal((3, 5, 6, 7))
    dout = rng.standard_normal((3, 5 + 3 * 3, 6, 7))
    block.train(training)
    start = {n: b.copy() for n, b in block.named_buffers()}
    with nn.use_kernels(reference):
        out = block.forward(x)
        dx = block.backward(dout.copy())
        grads = {n: p.grad.copy() for n, p in block.named_parameters()}
        stats = {n: b.copy() for n, b in block.named_buffers()}
        for n, b in block.named_buffers():       # the naive version starts from the same statistics
            b[:] = start[n]
        naive = naive_dense_block(block)
        want_out = naive.forward(x)
        want_dx = naive.backward(dout.copy())
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-12)
    for n, p in block.named_parameters():
        np.testing.assert_allclose(grads[n], p.grad, rtol=1e-10, atol=1e-12, err_msg=n)
    for n, b in block.named_buffers():
        np.testing.assert_allclose(stats[n], b, rtol=1e-12, atol=1e-14, err_msg=n)
        assert training == (not np.array_equal(b, start[n])), n


def test_dense_block_on_chexcy_ops_equals_concatenating_layers():
    """The float32 path of training (chexcy.ops): norm1's backward reads the buffer's channel prefix in
    place and adds its dx straight into the block's gradient buffer. Same values as the concatenating
    version up to float32 rounding (the shared statistics are computed once, the bottleneck input
    recomputed); a dx written over the buffer instead of added, or added twice, is off by O(1)."""
    rng = np.random.default_rng(14)
    block = nn.DenseBlock(4, 9, 2, 5, rng)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data[:] = rng.uniform(0.5, 2, m.weight.shape)
            m.bias.data[:] = rng.standard_normal(m.bias.shape)
    x = rng.standard_normal((3, 9, 6, 7)).astype(np.float32)
    dout = rng.standard_normal((3, 9 + 4 * 5, 6, 7)).astype(np.float32)
    out = block.forward(x).copy()
    dx = block.backward(dout.copy())
    grads = {n: p.grad.copy() for n, p in block.named_parameters()}
    naive = naive_dense_block(block)
    np.testing.assert_allclose(out, naive.forward(x), rtol=1e-4, atol=1e-4)
    want_dx = naive.backward(dout.copy())
    scale = np.abs(want_dx).max()
    np.testing.assert_allclose(dx, want_dx, rtol=0, atol=2e-5 * scale)
    for n, p in block.named_parameters():
        np.testing.assert_allclose(grads[n], p.grad, rtol=0, atol=2e-5 * np.abs(p.grad).max(), err_msg=n)


LAYER_CASES = [
    ("basic_identity", lambda r: nn.BasicBlock(3, 3, 1, rng=r), (2, 3, 5, 5)),
    ("basic_downsample", lambda r: nn.BasicBlock(2, 4, 2, rng=r), (2, 2, 7, 6)),
    ("bottleneck_identity", lambda r: nn.Bottleneck(8, 2, 1, rng=r), (2, 8, 4, 5)),
    ("bottleneck_downsample_stride2", lambda r: nn.Bottleneck(3, 2, 2, rng=r), (2, 3, 7, 7)),
    ("bottleneck_downsample_width", lambda r: nn.Bottleneck(4, 2, 1, rng=r), (2, 4, 4, 4)),
    ("dense_block", lambda r: nn.DenseBlock(3, 4, 2, 3, r), (2, 4, 5, 4)),
    ("transition", lambda r: nn.Transition(6, 3, r), (2, 6, 5, 6)),
    ("stem_maxpool_3x3_s2_p1", lambda r: nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 9, 8)),
    ("transition_avgpool_2x2", lambda r: nn.AvgPool2d(2, stride=2), (2, 3, 7, 6)),
]


@pytest.mark.parametrize("name,make,shape", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_backward_matches_finite_differences(name, make, shape):
    rng = np.random.default_rng(len(name))
    module = to_float64(make(rng))
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data[:] = rng.uniform(0.5, 2, m.weight.shape)
            m.bias.data[:] = rng.standard_normal(m.bias.shape)
    x = rng.standard_normal(shape)
    with nn.use_kernels(reference):
        check_module(module, (x,), rng)


@pytest.mark.parametrize("name,make,shape", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_eval_mode_backward_matches_finite_differences(name, make, shape):
    """Eval mode (running statistics) is what Grad-CAM differentiates through."""
    rng = np.random.default_rng(len(name) + 50)
    module = to_float64(make(rng))
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean[:] = rng.standard_normal(m.running_mean.shape)
            m.running_var[:] = rng.uniform(0.5, 2, m.running_var.shape)
            m.weight.data[:] = rng.uniform(0.5, 2, m.weight.shape)
    module.eval()
    x = rng.standard_normal(shape)
    with nn.use_kernels(reference):
        check_module(module, (x,), rng)


def test_transition_pools_before_its_conv_and_that_is_the_same_function():
    """conv1x1 then 2x2 average pool (torchvision's order) equals pool then conv, values and gradients,
    odd sizes included."""
    rng = np.random.default_rng(13)
    t = to_float64(nn.Transition(6, 3, rng))
    x = rng.standard_normal((2, 6, 7, 9))
    with nn.use_kernels(reference):
        out = t.forward(x)
        dout = rng.standard_normal(out.shape)
        dx = t.backward(dout.copy())
        dw = t.conv.weight.grad.copy()
        conv_first = nn.Sequential(t.norm, nn.ReLU(), nn.Conv2d(6, 3, 1, bias=False), nn.AvgPool2d(2))
        to_float64(conv_first)
        conv_first[2].weight.data = t.conv.weight.data
        t.norm.running_mean[:], t.norm.running_var[:] = 0, 1
        want = conv_first.forward(x)
        want_dx = conv_first.backward(dout.copy())
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(dw, conv_first[2].weight.grad, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------------
# Whole models, small instances

SMALL = {"resnet18": dict(width=2), "resnet34": dict(width=2), "resnet50": dict(width=2),
         "densenet121": dict(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2)}
SMALL_INPUT = (2, 1, 64, 64)


# A whole model has thousands of ReLU and max-pool kinks, and tiny-batch BatchNorm makes its function
# steep: a step of 1e-6 sometimes reaches across a kink (seen: a 1.4% error at 1e-6, 1e-9 at 1e-7). At
# 1e-7 float64 rounding of the quotient is ~1e-16 * |f| / 1e-7 ~ 1e-8 for |f| ~ 10.
MODEL_EPS = 1e-7
MODEL_TOL = dict(rtol=1e-5, atol=1e-6)


def sampled_gradient_check(model, x, rng, params_per_model=8, per_param=3, inputs=6):
    """Finite differences of sum(model(x) * dout) at a few input elements and at a few entries of a
    spread of parameters (first, last, and evenly between), float64 on the reference kernels."""
    out = model.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = model.backward(dout.copy())
    named = list(model.named_parameters())
    picks = sorted(set(np.linspace(0, len(named) - 1, params_per_model).astype(int)))
    analytic = {named[i][0]: named[i][1].grad.copy() for i in picks}

    def f():
        return float(np.sum(model.forward(x) * dout))

    idx = [tuple(rng.integers(0, s) for s in x.shape) for _ in range(inputs)]
    np.testing.assert_allclose([dx[i] for i in idx], central_differences(f, x, idx, eps=MODEL_EPS), **MODEL_TOL,
                               err_msg="input gradient")
    for i in picks:
        name, p = named[i]
        idx = [tuple(rng.integers(0, s) for s in p.shape) for _ in range(per_param)]
        np.testing.assert_allclose([analytic[name][j] for j in idx], central_differences(f, p.data, idx, eps=MODEL_EPS),
                                   **MODEL_TOL, err_msg=name)
    return [named[i][0] for i in picks]


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_small_model_backward_matches_finite_differences(arch):
    rng = np.random.default_rng(21)
    model = to_float64(nn.build_model(arch, **SMALL[arch]))
    x = rng.standard_normal(SMALL_INPUT)
    with nn.use_kernels(reference):
        checked = sampled_gradient_check(model, x, rng)
    assert len(checked) >= 6


def run_step(model, x, dlogits):
    logits = model.forward(x)
    dx = model.backward(dlogits.copy())
    return dict(logits=logits, dx=dx, **{n: p.grad.copy() for n, p in model.named_parameters()})


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_small_model_on_the_backend_matches_the_reference(arch):
    """What training runs (chexcy.ops, the backend under test, float32) on the same weights as the
    float64 oracle (the model in float64 on chexcy.reference): logits, input gradient, every parameter
    gradient. Through a stack of tiny-batch BatchNorms some gradients are sums that cancel to ~1e-2 of
    their terms, so float32 rounding alone moves them by up to a few percent (the float32 "reference"
    backend does the same); the backend must be no further from float64 than that float32 reference is
    (x 5: one float32 run's error is itself a draw; on an AMD EPYC, where OpenBLAS runs other kernels,
    the fallback's densenet121 norm0.weight read 4.7e-2 against the reference's 1.4e-2, both the
    rounding of a sum that cancels), or within 5e-4 of the tensor's scale (the compiled kernels, Winograd among them, sum in other
    orders: each op is held to ~1e-4 by the op tests, and a model chains some 50). A wrong gradient is
    off by O(1)."""
    rng = np.random.default_rng(22)
    model = nn.build_model(arch, **SMALL[arch])
    state = model.state_dict()
    x = rng.standard_normal(SMALL_INPUT).astype(np.float32)
    dlogits = rng.standard_normal((SMALL_INPUT[0], 14)).astype(np.float32)
    got = run_step(model, x, dlogits)
    model.load_state_dict(state)
    with ops.use_backend("reference"):
        ref32 = run_step(model, x, dlogits)
    exact = to_float64(nn.build_model(arch, **SMALL[arch]))
    exact.load_state_dict(state)
    with nn.use_kernels(reference):
        want = run_step(exact, x.astype(np.float64), dlogits.astype(np.float64))
    assert set(got) == set(want) and len(got) == len(model.parameters()) + 2
    for name, w in want.items():
        scale = np.abs(w).max()
        err, ref_err = np.abs(got[name] - w).max() / scale, np.abs(ref32[name] - w).max() / scale
        assert got[name].dtype == np.float32
        assert err <= max(5 * ref_err, 5e-4), f"{arch} {name}: relative error {err:.2e}, float32 reference {ref_err:.2e}"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])    # resnet34: resnet18's blocks
def test_full_size_models_train_step_shapes_and_grad_cam(arch):
    model = nn.build_model(arch)
    initial = model.state_dict()
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)   # 32 px: a 1x1 last map
    logits = model.forward(x)
    assert logits.shape == (2, 14) and logits.dtype == np.float32 and np.all(np.isfinite(logits))
    dx = model.backward(np.ones_like(logits))
    assert dx.shape == x.shape and dx.dtype == np.float32
    assert all(p.grad is not None and p.grad.shape == p.data.shape and p.grad.dtype == np.float32
               for p in model.parameters())
    model.eval()
    logits, feature_map = model.forward_cam(x)
    channels = 1024 if arch == "densenet121" else 2048 if arch == "resnet50" else 512
    assert feature_map.shape == (2, channels, 1, 1)
    assert model.backward_cam(np.ones_like(logits)).shape == feature_map.shape
    np.testing.assert_array_equal(model.predict_images(x), logits)
    assert model.arch == arch and model.input_kind == "image"
    again = nn.build_model(arch, **model.config).state_dict()      # the config rebuilds the same start
    assert all(np.array_equal(v, again[k]) for k, v in initial.items())


@pytest.mark.parametrize("backbone", ["resnet18", "densenet121"])
def test_multiview_takes_them_as_its_trunk(backbone):
    model = nn.build_model("multiview", backbone=backbone, hidden=8)
    keys = model.state_dict()
    first = "frontal_trunk.conv1.weight" if backbone == "resnet18" else "frontal_trunk.features.conv0.weight"
    assert keys[first].shape == (64, 1, 7, 7)
    assert model.width == (512 if backbone == "resnet18" else 1024)
    rng = np.random.default_rng(1)
    frontal, lateral = (rng.standard_normal((3, 1, 64, 64)).astype(np.float32) for _ in range(2))
    logits = model.forward(frontal, lateral, np.array([1, 1, 0.0]), np.array([1, 0, 1.0]), rng.random((3, 2)))
    assert logits.shape == (3, 14)
    df, dl = model.backward(np.ones_like(logits))
    assert df.shape == frontal.shape and np.all(df[2] == 0) and np.all(dl[1] == 0)


def test_registry_and_bad_configuration():
    assert {"resnet18", "resnet34", "resnet50", "densenet121"} <= set(nn.ARCHITECTURES)
    with pytest.raises(ValueError, match="in_channels"):
        nn.build_model("resnet18", in_channels=0)
    with pytest.raises(ValueError, match="num_classes"):
        nn.build_model("densenet121", num_classes=0)
    with pytest.raises(ValueError, match="backbone"):
        nn.build_model("multiview", backbone="vgg16")


def test_dense_layers_with_synchronised_batchnorm_take_the_module_path_and_agree(monkeypatch):
    """Under distributed training every BatchNorm2d gets a communicator of several ranks (statistics over
    the global batch); a dense layer then runs its norms as modules instead of sharing the block's
    statistics. On one process both paths are the same function."""
    class TwoRanks:      # only its size is read by _shared_stats
        size = 2

    layer = nn.build_model("densenet121", **SMALL["densenet121"]).features.denseblock1.denselayer1
    assert layer._shared_stats()
    layer.norm1.comm = TwoRanks()
    assert not layer._shared_stats()

    rng = np.random.default_rng(31)
    plain = to_float64(nn.build_model("densenet121", **SMALL["densenet121"]))
    modules = to_float64(nn.build_model("densenet121", **SMALL["densenet121"]))
    x = rng.standard_normal(SMALL_INPUT)
    dlogits = rng.standard_normal((SMALL_INPUT[0], 14))
    with nn.use_kernels(reference):
        a = run_step(plain, x, dlogits)
        monkeypatch.setattr(type(layer), "_shared_stats", lambda self: False)
        b = run_step(modules, x, dlogits)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-8, atol=1e-10 * np.abs(a[name]).max(), err_msg=name)
    for (name, p), (_, q) in zip(plain.named_buffers(), modules.named_buffers()):
        np.testing.assert_allclose(q, p, rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_stem_pools_before_its_relu_and_that_is_the_same_function(arch):
    """conv bn relu maxpool(3, 2, pad 1) (torchvision's order) and conv bn maxpool relu (chexcy's) give
    bitwise equal outputs, input gradients and weight gradients, ties and all-negative windows included."""
    rng = np.random.default_rng(5)
    model = nn.build_model(arch, width=4) if arch == "resnet18" else nn.build_model(arch, **SMALL[arch])
    if arch == "resnet18":
        chexcy_order = [model.conv1, model.bn1, model.maxpool, model.relu]
    else:
        f = model.features
        chexcy_order = [f.conv0, f.norm0, f.pool0, f.relu0]
        assert f.names[:4] == ["conv0", "norm0", "pool0", "relu0"]
    assert isinstance(chexcy_order[2], nn.MaxPool2d) and chexcy_order[2].padding == (1, 1)
    torch_order = nn.Sequential(chexcy_order[0], chexcy_order[1], nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    ours = nn.Sequential(*chexcy_order)
    x = np.round(rng.standard_normal((2, 1, 21, 19)), 1).astype(np.float32)     # rounding makes ties
    a = ours.forward(x)
    da = ours.backward(np.ones_like(a))
    grads = [p.grad.copy() for p in ours.parameters()]
    b = torch_order.forward(x)
    db = torch_order.backward(np.ones_like(b))
    assert np.array_equal(a, b) and np.array_equal(da, db)
    assert all(np.array_equal(g, p.grad) for g, p in zip(grads, torch_order.parameters()))
