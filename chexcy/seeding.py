"""The one generator that layers built without `rng` draw their initial weights from (and Dropout its
masks until a model's set_random_state), seeded by `chexcy.manual_seed(n)`. A process starts as if after
`manual_seed(0)`, so scripts repeat from run to run; models built with a `seed` use their own generator.
"""
import numpy as np

_GENERATOR = np.random.default_rng(0)


def manual_seed(seed):
    """Re-seed the generator of layers built without `rng` (and of Dropout masks until a model's
    set_random_state). seed: a non-negative int. Returns the generator (np.random.Generator)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"manual_seed: seed must be a non-negative integer, got {seed!r}")
    # Re-seed in place: layers holding the generator (Dropout) keep drawing from the one stream.
    _GENERATOR.bit_generator.state = np.random.default_rng(int(seed)).bit_generator.state
    return _GENERATOR


def default_generator():
    """The module-level np.random.Generator that layers built without `rng` draw from."""
    return _GENERATOR
