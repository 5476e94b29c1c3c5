"""Optimisers and schedules: the update rules written out by hand, state round trips, schedule shapes."""
import math

import numpy as np
import pytest

from chexcy.nn import Parameter
from chexcy.optim import SGD, AdamW, build_optimizer, make_schedule


def params_and_grads(seed=0):
    rng = np.random.default_rng(seed)
    w = Parameter(rng.standard_normal((3, 4)))
    b = Parameter(rng.standard_normal(4), decay=False)
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in (w, b)] for _ in range(4)]
    return [w, b], grads


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_the_written_rule(nesterov):
    params, grads = params_and_grads()
    ref = [p.data.astype(np.float64) for p in params]
    bufs = [None, None]
    opt = SGD(params, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    for step, gs in enumerate(grads):
        lr = 0.1 / (step + 1)
        for p, g in zip(params, gs):
            p.grad = g
        opt.lr = lr
        opt.step()
        for i, (p, g) in enumerate(zip(params, gs)):
            g = g + (0.01 * ref[i] if p.decay else 0)
            bufs[i] = g if bufs[i] is None else 0.9 * bufs[i] + g
            ref[i] = ref[i] - lr * ((g + 0.9 * bufs[i]) if nesterov else bufs[i])
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.data, r, rtol=1e-5, atol=1e-6)
        assert p.data.dtype == np.float32


def test_adamw_matches_the_written_rule():
    params, grads = params_and_grads(1)
    ref = [p.data.astype(np.float64) for p in params]
    m = [np.zeros_like(r) for r in ref]
    v = [np.zeros_like(r) for r in ref]
    opt = AdamW(params, lr=0.01, weight_decay=0.05)
    for t, gs in enumerate(grads, start=1):
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        for i, (p, g) in enumerate(zip(params, gs)):
            if p.decay:
                ref[i] = ref[i] * (1 - 0.01 * 0.05)
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            ref[i] = ref[i] - 0.01 * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.data, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dict_round_trip_continues_identically(name):
    params_a, grads = params_and_grads(2)
    params_b = [Parameter(p.data.copy(), p.decay) for p in params_a]
    opt_a = build_optimizer(name, params_a, lr=0.1, momentum=0.9, weight_decay=0.01)
    for p, g in zip(params_a, grads[0]):
        p.grad = g
    opt_a.step()
    for pb, pa in zip(params_b, params_a):
        pb.data[...] = pa.data
    opt_b = build_optimizer(name, params_b, lr=0.05, momentum=0.9, weight_decay=0.01)
    opt_b.load_state_dict(opt_a.state_dict())
    opt_a.lr = 0.05
    for gs in grads[1:]:
        for pa, pb, g in zip(params_a, params_b, gs):
            pa.grad = pb.grad = g
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        assert np.array_equal(pa.data, pb.data)


def test_step_without_gradient_and_bad_settings():
    params, _ = params_and_grads()
    with pytest.raises(RuntimeError, match="no gradient"):
        SGD(params, lr=0.1).step()
    with pytest.raises(ValueError, match="nesterov"):
        SGD(params, nesterov=True)
    for bad in (0, -0.1, float("nan"), float("inf"), "0.1", None):
        with pytest.raises(ValueError, match="lr must be a positive number"):
            SGD(params, lr=bad)
    opt = AdamW(params)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        opt.lr = 0.0
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("rmsprop", params)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_pytorch_style_lr_zero_grad_and_step(name):
    """lr in the constructor, step() without arguments, zero_grad() forgets the gradients so that a step
    without a fresh backward is refused; a schedule drives opt.lr; the update equals the update rule."""
    params, grads = params_and_grads(3)
    twins = [Parameter(p.data.copy(), p.decay) for p in params]
    opt = build_optimizer(name, params, lr=0.2, momentum=0.9)
    rule = build_optimizer(name, twins, lr=0.2, momentum=0.9)
    assert opt.lr == 0.2
    schedule = make_schedule("cosine", 0.2, len(grads))
    for step, gs in enumerate(grads):
        opt.zero_grad()
        assert all(p.grad is None for p in params)
        with pytest.raises(RuntimeError, match="no gradient"):
            opt.step()
        for p, t, g in zip(params, twins, gs):
            p.grad, t.grad = g, g.copy()
        opt.lr = rule.lr = schedule(step)
        opt.step()
        rule._update(schedule(step))        # the rule with the rate passed explicitly
        rule.step_count += 1
    assert opt.step_count == len(grads) and opt.lr == schedule(len(grads) - 1)
    for p, t in zip(params, twins):
        assert np.array_equal(p.data, t.data)


def test_schedules():
    cos = make_schedule("cosine", 1.0, 100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    step = make_schedule("step", 1.0, 90, step_size=30, gamma=0.1)
    assert [step(0), step(29), step(30), step(89)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]
    warm = make_schedule("cosine", 1.0, 100, warmup_steps=10)
    assert warm(0) == pytest.approx(0.1) and warm(4) == pytest.approx(0.5) and warm(10) == cos(10)
    assert all(warm(s) <= warm(s + 1) for s in range(9))
    const = make_schedule("constant", 0.3, 10)
    assert all(const(s) == 0.3 for s in range(20))
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", 1.0, 10)
    with pytest.raises(ValueError, match="positive"):
        make_schedule("constant", -1.0, 10)
    assert math.isfinite(cos(1000))


@pytest.mark.parametrize("gamma", [0.0, -0.5, float("nan")])
def test_training_settings_refuse_a_step_decay_factor_that_is_not_positive(gamma):
    # Caught at the start of a run, not at the first decay (where the lr would become 0 or negative).
    from chexcy.train import TrainConfig
    with pytest.raises(ValueError, match="gamma="):
        TrainConfig(schedule="step", gamma=gamma).validate()
