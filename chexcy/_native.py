"""Finds the compiled kernels (chexcy._ops). The only module that imports them."""


def load():
    """Return the compiled kernel module; ImportError (with how to build it) when it is absent."""
    try:
        from chexcy import _ops
    except ImportError as exc:
        raise ImportError(
            "chexcy's compiled kernels (chexcy._ops) are not built; install with a C compiler "
            "(`pip install .`) or build in place (`python setup.py build_ext --inplace`)") from exc
    return _ops
