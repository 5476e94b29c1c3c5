"""chexcy: convolutional networks written by hand (Cython + OpenMP kernels) for CheXpert chest X-rays."""

__version__ = "0.1.0"
