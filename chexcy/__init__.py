"""chexcy: convolutional networks written by hand (Cython + OpenMP kernels) for CheXpert chest X-rays."""

__version__ = "0.1.0"


def manual_seed(seed):
    """Seed the generator that layers built without `rng` draw their initial weights from (see
    chexcy.seeding). Returns that np.random.Generator."""
    from chexcy.seeding import manual_seed as _seed    # here, so `import chexcy` stays light
    return _seed(seed)
