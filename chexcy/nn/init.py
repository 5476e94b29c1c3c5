"""Weight initialisation, and the generator layers draw from when built without `rng`.

He/Kaiming normal (He et al. 2015): weights ~ N(0, gain**2 / fan_in) with gain sqrt(2) for ReLU networks,
which keeps the variance of activations roughly constant from layer to layer at the start of training.

A layer built without `rng` (e.g. `Conv2d(16, 16, 3)`) draws from one module-level generator, so two such
layers start with different weights; `chexcy.manual_seed(n)` re-seeds it (a process starts as if after
`manual_seed(0)`). Models built from a config with a `seed` use their own generator and ignore it.
"""
import math

import numpy as np

from chexcy.seeding import default_generator, manual_seed  # noqa: F401  (chexcy.nn.init's API)


def he_normal(shape, fan_in, rng, gain=math.sqrt(2.0)):
    """float32 array of `shape` drawn from N(0, (gain / sqrt(fan_in))**2) with generator `rng`."""
    if fan_in < 1:
        raise ValueError(f"he_normal: fan_in must be >= 1, got {fan_in}")
    std = gain / math.sqrt(fan_in)
    return (rng.standard_normal(shape) * std).astype(np.float32)


def uniform_fan_in(shape, fan_in, rng):
    """float32 array of `shape` drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for a
    Linear layer's weight and bias (kaiming_uniform with a = sqrt(5) works out to this bound)."""
    if fan_in < 1:
        raise ValueError(f"uniform_fan_in: fan_in must be >= 1, got {fan_in}")
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)
