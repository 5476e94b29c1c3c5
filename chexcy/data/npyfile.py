"""The one reader of `.npy` headers in chexcy: `chexcy prepare` needs the data offset to write rows in place,
`PreparedDataset` needs it (and the dtype and shape) to check a prepared folder and to read rows.

A .npy file is the magic string, a format version, a header (a Python dict literal: dtype, fortran order,
shape) padded so the data starts at an aligned offset, then the raw array data. Versions 1.0, 2.0 and 3.0
differ only in the width of the header-length field and, for 3.0, the header's text encoding.
"""
import collections
import math
import os

import numpy as np

from chexcy.fileio import DamagedFileError

NpyHeader = collections.namedtuple("NpyHeader", "dtype shape fortran_order offset")
NpyHeader.__doc__ = """The header of a .npy file: dtype (numpy.dtype), shape (tuple of int), fortran_order
(bool), offset (int: byte position of the array data in the file)."""


def read_npy_header(path, check_size=True):
    """Read the header of the .npy file `path`; returns an NpyHeader.

    check_size: also require the file to hold all the data the header declares (a truncated file fails).
    Raises DamagedFileError(path, problem) for: an empty file, a file that is not .npy, an unsupported
    format version, a damaged header, and (check_size) fewer data bytes than the header declares; also
    when the file cannot be opened (e.g. permission denied). FileNotFoundError when `path` does not exist.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DamagedFileError(path, f"cannot be read ({exc.strerror})") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size == 0:
            raise DamagedFileError(path, "empty file (0 bytes)")
        try:
            version = np.lib.format.read_magic(f)
        except ValueError:
            raise DamagedFileError(path, "not a .npy file (it does not start with the NumPy magic string)") from None
        try:
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                # 3.0 differs only in the header's text encoding (UTF-8), which plain ASCII headers share.
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DamagedFileError(path, f"unsupported .npy format version {version[0]}.{version[1]}")
        except (ValueError, SyntaxError, TypeError) as exc:
            if isinstance(exc, DamagedFileError):
                raise
            raise DamagedFileError(path, f"damaged .npy header ({exc})") from None
        offset = f.tell()
    if check_size:
        needed = math.prod(shape) * dtype.itemsize
        if file_size - offset < needed:
            raise DamagedFileError(path, f"truncated: {file_size - offset} bytes of data where its header's "
                                         f"{dtype} {tuple(shape)} needs {needed}")
    return NpyHeader(dtype, tuple(shape), bool(fortran_order), offset)
