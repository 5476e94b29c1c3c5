"""Models: ref-cnn's exact structure, shapes for several image sizes, the multi-view model's handling of
missing views, the registry, initialisation statistics, train/eval behaviour."""
import numpy as np
import pytest

from chexcy import nn


def test_simple_default_is_ref_cnn():
    model = nn.build_model("simple")
    kinds = [type(m).__name__ for m in model.trunk.layers]
    # conv ReLU maxpool, with each ReLU moved after its pool (the same function: see the next test).
    assert kinds == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU",
                     "Conv2d", "ReLU"]
    convs = [m for m in model.trunk.layers if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 16, (3, 3), (1, 1)), (16, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))]
    linear = model.head.layers[-1]
    assert (linear.in_features, linear.out_features) == (128, 14)
    # 160 + 4,640 + 18,496 + 73,856 conv parameters, 1,806 linear.
    assert model.num_parameters() == 98958


def test_pool_then_relu_equals_relu_then_pool_with_gradients():
    """The trunk's order (conv, pool, ReLU) gives exactly ref-cnn's conv, ReLU, pool: outputs, input
    gradients and weight gradients are bitwise equal, ties and all-negative windows included."""
    rng = np.random.default_rng(4)
    model = nn.build_model("simple", widths=[4, 8, 8])
    pool_first = model.trunk.layers
    relu_first = []
    for layer in pool_first:
        if isinstance(layer, nn.ReLU) and relu_first and isinstance(relu_first[-1], nn.MaxPool2d):
            relu_first.insert(len(relu_first) - 1, nn.ReLU())
        else:
            relu_first.append(layer if not isinstance(layer, nn.ReLU) else nn.ReLU())
    assert [type(m).__name__ for m in relu_first][:3] == ["Conv2d", "ReLU", "MaxPool2d"]
    x = np.round(rng.standard_normal((3, 1, 17, 17)), 1).astype(np.float32)    # rounding makes ties
    a = model.trunk.forward(x.copy())
    da = model.trunk.backward(np.ones_like(a))
    grads_a = [p.grad.copy() for p in model.parameters() if p.grad is not None]
    reference = nn.Sequential(relu_first)
    b = reference.forward(x.copy())
    db = reference.backward(np.ones_like(b))
    grads_b = [p.grad.copy() for p in model.parameters() if p.grad is not None]
    assert np.array_equal(a, b) and np.array_equal(da, db)
    assert all(np.array_equal(ga, gb) for ga, gb in zip(grads_a, grads_b))


def test_max_pool_in_eval_mode_forms_no_argmax_until_a_backward_asks():
    """Eval mode pools values only (chexcy.ops.max_pool2d); a backward after it (Grad-CAM) finds the argmax
    from the kept input: the same output and input gradient as a training-mode pool, ties and NaN included."""
    rng = np.random.default_rng(6)
    x = np.round(rng.standard_normal((2, 3, 15, 17)), 1).astype(np.float32)
    x[0, 1, 3, 4] = np.nan
    dout = rng.standard_normal((2, 3, 8, 9)).astype(np.float32)
    train_pool, eval_pool = nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1).eval()
    want = train_pool.forward(x)
    got = eval_pool.forward(x)
    assert eval_pool._argmax is None
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(eval_pool.backward(dout), train_pool.backward(dout))
    eval_pool.train()
    eval_pool.forward(x)                  # a training forward keeps the argmax and lets go of x
    assert eval_pool._x is None and eval_pool._argmax is not None


@pytest.mark.parametrize("arch", ["simple", "resnet"])
@pytest.mark.parametrize("size", [16, 30, 33])
def test_image_models_give_14_logits_for_any_size(arch, size):
    model = nn.build_model(arch, widths=[4, 8, 8])
    x = np.random.default_rng(0).standard_normal((3, 1, size, size)).astype(np.float32)
    logits = model.forward(x)
    assert logits.shape == (3, 14) and logits.dtype == np.float32 and np.all(np.isfinite(logits))
    dx = model.backward(np.ones_like(logits))
    assert dx.shape == x.shape
    assert all(p.grad is not None and p.grad.shape == p.data.shape for p in model.parameters())


def test_depth_and_width_are_configurable():
    model = nn.build_model("resnet", widths=[4, 8, 16], blocks=2)
    assert sum(isinstance(m, nn.ResidualBlock) for m in model.modules()) == 6
    assert model.head.layers[-1].in_features == 16


@pytest.mark.parametrize("shared", [True, False])
def test_multiview_missing_views(shared):
    rng = np.random.default_rng(1)
    model = nn.build_model("multiview", widths=[4, 8], shared=shared, hidden=8)
    frontal = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
    lateral = np.zeros_like(frontal)
    tab = rng.random((4, 2)).astype(np.float32)
    logits = model.forward(frontal, lateral, np.ones(4), np.zeros(4), tab)   # no lateral in the whole batch
    assert logits.shape == (4, 14)
    model.backward(np.ones_like(logits))
    if not shared:
        assert all(np.all(p.grad == 0) for p in model.lateral_trunk.parameters())
    assert any(np.any(p.grad != 0) for p in model.frontal_trunk.parameters())
    # Age and sex reach the output.
    other = model.forward(frontal, lateral, np.ones(4), np.zeros(4), tab + 0.5)
    assert not np.allclose(other, logits)
    # Only-lateral studies work too.
    assert model.forward(lateral, frontal, np.zeros(4), np.ones(4), tab).shape == (4, 14)


def test_multiview_shared_trunk_has_half_the_trunk_parameters():
    shared = nn.build_model("multiview", widths=[4, 8], shared=True)
    separate = nn.build_model("multiview", widths=[4, 8], shared=False)
    trunk = sum(p.data.size for p in shared.frontal_trunk.parameters())
    assert separate.num_parameters() - shared.num_parameters() == trunk


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        nn.build_model("vgg")
    with pytest.raises(TypeError, match="bad configuration"):
        nn.build_model("simple", blocks=3)
    with pytest.raises(ValueError, match="widths"):
        nn.build_model("simple", widths=[])
    assert set(nn.ARCHITECTURES) == {"simple", "resnet", "multiview", "resnet18", "resnet34", "resnet50", "densenet121"}


def test_he_initialisation_scale():
    conv = nn.Conv2d(64, 128, 3, rng=np.random.default_rng(0))
    assert conv.weight.data.std() == pytest.approx(np.sqrt(2 / (64 * 9)), rel=0.03)
    assert np.all(conv.bias.data == 0) and conv.weight.decay and not conv.bias.decay


def test_same_seed_same_model_and_dropout_reproducible_from_its_generator():
    a, b = nn.build_model("simple", widths=[4, 8], dropout=0.5, seed=3), nn.build_model("simple", widths=[4, 8],
                                                                                          dropout=0.5, seed=3)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(pa.data, pb.data)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    a.set_random_state(np.random.default_rng(9))
    b.set_random_state(np.random.default_rng(9))
    assert np.array_equal(a.forward(x), b.forward(x))
    a.set_random_state(np.random.default_rng(10))
    assert not np.array_equal(a.forward(x), b.forward(x))
    a.eval()
    b.eval()
    assert np.array_equal(a.forward(x), b.forward(x))


def test_conv_rejects_bad_configuration_with_names():
    with pytest.raises(ValueError, match="groups=3 must divide"):
        nn.Conv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        nn.Conv2d(1, 2, 3, stride=2, padding="same")
    with pytest.raises(TypeError, match="kernel_size"):
        nn.Conv2d(1, 2, 2.5)
    with pytest.raises(ValueError, match="BatchNorm2d: expected"):
        nn.BatchNorm2d(3).forward(np.zeros((2, 4, 3, 3), np.float32))
