"""The deep networks' step without needless work between layers: eval mode folds each BatchNorm into the conv
before it (same values, backward still exact), a dense block's NumPy passes split by samples between threads
(same bits for any thread count), SGD's update without parameter-sized temporaries (same bits as the
written rule)."""
import threading
import tracemalloc

import numpy as np
import pytest

from chexcy import nn, ops
from chexcy.nn import densenet, fold
from chexcy.optim import SGD

SMALL = {"resnet18": dict(width=4), "resnet50": dict(width=4),
         "densenet121": dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2)}


def small_model(arch, seed=0):
    model = nn.build_model(arch, seed=seed, **SMALL[arch])
    rng = np.random.default_rng(seed + 1)
    for m in model.modules():               # statistics and affine maps far from the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean[:] = rng.standard_normal(m.num_features)
            m.running_var[:] = rng.uniform(0.5, 2, m.num_features)
            m.weight.data[:] = rng.uniform(0.5, 2, m.num_features)
            m.bias.data[:] = rng.standard_normal(m.num_features)
    return model


@pytest.fixture
def no_folding(monkeypatch):
    """A context in which no pair is folded: the layers run one by one, as before folding existed."""
    def disable():
        monkeypatch.setattr(fold, "foldable", lambda conv, norm: False)
        monkeypatch.setattr(densenet, "foldable", lambda conv, norm: False)
    return disable


def count_bn_forwards(monkeypatch):
    calls = []
    original = nn.BatchNorm2d.forward

    def counted(self, x):
        calls.append(self)
        return original(self, x)
    monkeypatch.setattr(nn.BatchNorm2d, "forward", counted)
    return calls


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
def test_eval_forward_folds_batchnorm_into_the_conv_before_it(arch, monkeypatch, no_folding):
    model = small_model(arch).eval()
    x = np.random.default_rng(2).standard_normal((2, 1, 40, 40)).astype(np.float32)
    calls = count_bn_forwards(monkeypatch)
    folded = model.forward(x)
    if arch.startswith("resnet"):
        assert calls == []                  # every BatchNorm follows a conv
    else:                                   # left: the transitions' and norm5 (after a block, not a conv)
        f = model.features
        assert set(map(id, calls)) == {id(f.transition1.norm), id(f.norm5)}
    no_folding()
    plain = model.forward(x)
    np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
def test_backward_after_a_folded_eval_forward_matches_the_unfolded_one(arch, no_folding):
    x = np.random.default_rng(3).standard_normal((2, 1, 40, 40)).astype(np.float32)
    results = []
    for fold_on in (True, False):
        if not fold_on:
            no_folding()
        model = small_model(arch).eval()
        logits = model.forward(x)
        dx = model.backward(np.ones_like(logits))
        results.append((dx, [p.grad.copy() for p in model.parameters()]))
    (dx_a, g_a), (dx_b, g_b) = results
    # The same up to the rounding of the folded forward (which the layers' inputs carry): the caches are
    # restored, not left stale or missing (finite differences: test_nn_torchvision_models' eval-mode test)
    for a, b in zip([dx_a] + g_a, [dx_b] + g_b):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_a_training_forward_after_an_eval_one_forgets_the_folded_pairs():
    model = small_model("resnet18")
    x = np.random.default_rng(4).standard_normal((2, 1, 32, 32)).astype(np.float32)
    model.eval().forward(x)
    model.train()
    logits = model.forward(x)
    running = [m.running_mean.copy() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.backward(np.ones_like(logits))           # must not rerun any pair (it would move running stats)
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(np.array_equal(a, b) for a, b in zip(running, after))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_by_samples_covers_every_sample_once_on_the_kernels_threads(n, threads):
    previous = ops.get_num_threads()
    ops.set_num_threads(threads)
    try:
        seen, idents = np.zeros(n, int), set()

        def fn(lo, hi):
            seen[lo:hi] += 1
            idents.add(threading.get_ident())
        densenet._by_samples(fn, n)
    finally:
        ops.set_num_threads(previous)
    assert seen.tolist() == [1] * n
    # this thread takes the first range, a pool thread the others (one pool thread may take two)
    assert len(idents) == 1 if min(n, threads) == 1 else len(idents) >= 2


def densenet_step(threads):
    previous = ops.get_num_threads()
    ops.set_num_threads(threads)
    try:
        model = small_model("densenet121")
        x = np.random.default_rng(5).standard_normal((3, 1, 36, 36)).astype(np.float32)
        logits = model.forward(x)
        dx = model.backward(np.linspace(-1, 1, logits.size, dtype=np.float32).reshape(logits.shape))
        return [logits, dx] + [p.grad for p in model.parameters()]
    finally:
        ops.set_num_threads(previous)


def test_densenet_step_is_bitwise_the_same_for_any_thread_count():
    one, two, three = densenet_step(1), densenet_step(2), densenet_step(3)
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(one, two, three))


def sgd_params(seed=0):
    rng = np.random.default_rng(seed)
    params = [nn.Parameter(rng.standard_normal((64, 32, 3, 3))), nn.Parameter(rng.standard_normal(64), decay=False)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgd_step_is_bitwise_the_written_float32_rule(nesterov, weight_decay):
    params, grads = sgd_params()
    data = [p.data.copy() for p in params]
    bufs = [None, None]
    opt = SGD(params, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    lr, m, wd = np.float32(0.1), np.float32(0.9), np.float32(weight_decay)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        for i, (p, g) in enumerate(zip(params, gs)):
            if weight_decay and p.decay:
                g = g + wd * data[i]
            bufs[i] = g.copy() if bufs[i] is None else m * bufs[i] + g
            data[i] = data[i] - lr * ((g + m * bufs[i]) if nesterov else bufs[i])
    assert all(np.array_equal(p.data, d) for p, d in zip(params, data))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_allocates_no_parameter_sized_temporary(nesterov):
    params, grads = sgd_params()
    opt = SGD(params, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()                               # the first step creates the momentum buffers and the scratch
    for p, g in zip(params, grads[1]):
        p.grad = g
    tracemalloc.start()
    try:
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < params[0].data.nbytes // 4
