"""PyTorch habits in chexcy.nn: default initialisation from one seeded generator, `backward` that *sets*
.grad (the documented difference from PyTorch), and seeded models that stay deterministic."""
import numpy as np
import pytest

import chexcy
from chexcy import nn


def test_layers_without_rng_start_different_and_manual_seed_repeats_them():
    chexcy.manual_seed(7)
    a, b = nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3)
    fc = nn.Linear(8, 4)
    assert not np.array_equal(a.weight.data, b.weight.data)
    chexcy.manual_seed(7)
    a2, b2 = nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3)
    fc2 = nn.Linear(8, 4)
    for x, y in ((a, a2), (b, b2), (fc, fc2)):
        assert np.array_equal(x.weight.data, y.weight.data)
    chexcy.manual_seed(8)
    assert not np.array_equal(nn.Conv2d(16, 16, 3).weight.data, a.weight.data)


def test_an_explicit_rng_is_used_as_given():
    w1 = nn.Conv2d(4, 4, 3, rng=np.random.default_rng(5)).weight.data
    chexcy.manual_seed(123)
    w2 = nn.Conv2d(4, 4, 3, rng=np.random.default_rng(5)).weight.data
    assert np.array_equal(w1, w2)


@pytest.mark.parametrize("arch, config", [("simple", dict(widths=[4, 8])),
                                          ("resnet", dict(widths=[4, 8], blocks=1))])
def test_models_built_with_a_seed_ignore_the_global_generator(arch, config):
    chexcy.manual_seed(1)
    first = nn.build_model(arch, seed=3, **config).state_dict()
    chexcy.manual_seed(2)
    nn.Conv2d(3, 3, 3)                       # and whatever was drawn before
    second = nn.build_model(arch, seed=3, **config).state_dict()
    assert list(first) == list(second)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    other = nn.build_model(arch, seed=4, **config).state_dict()
    assert not all(np.array_equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_manual_seed_refuses_what_is_not_a_seed(bad):
    with pytest.raises(ValueError, match="manual_seed: seed must be a non-negative integer"):
        chexcy.manual_seed(bad)


def test_backward_sets_grad_rather_than_accumulating():
    """chexcy's documented difference from PyTorch: a second backward replaces .grad."""
    rng = np.random.default_rng(0)
    layer = nn.Linear(5, 3, rng=rng)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    d1, d2 = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(2))
    layer.forward(x)
    layer.backward(d1)
    layer.forward(x)
    layer.backward(d2)
    np.testing.assert_allclose(layer.weight.grad, d2.T @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias.grad, d2.sum(axis=0), rtol=1e-5, atol=1e-6)
