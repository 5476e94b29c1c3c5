"""THE preprocessing of one image file and THE pixel normalisation. `chexcy prepare`, the loader and
prediction all go through these two functions, so training and inference see identical pixels.

Preprocessing (`load_image`): decode (JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale when
that still leaves at least `size` pixels on each side), convert to 8-bit grayscale, take the centred
square whose side is the shorter image side, and resize it to size x size with a box (area-average)
filter. Equivalent to "shorter side to S, then centre crop", done in one resampling step.

Pixel modes: "L" is used as is; colour ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA") is converted to luma
with Pillow's ITU-R 601-2 rule (L = 0.299 R + 0.587 G + 0.114 B); 1-bit ("1") maps to 0/255; 16-bit
grayscale ("I;16*" and "I" holding 0..65535) is scaled to 8 bits as round(v / 257). Anything else (float
images, multi-frame oddities) is refused with a reason.

DICOM files (a .dcm/.dicom name, or the DICM signature in a file Pillow does not recognise) are turned into
the 8-bit picture a viewer shows by `chexcy.data.dicom.read_dicom` (needs pydicom), then take the same
crop and resize.
"""
import errno
import os
import stat

import numpy as np

from chexcy.data.errors import ImageReadError  # noqa: F401  (raised here, and part of this module's API)

# Normalisation: fixed constants, not dataset statistics, so any image anywhere maps the same way.
# (x - 128) / 64 maps uint8 0..255 to about -2.0..+1.98, roughly zero-mean and unit-scale for chest films.
PIXEL_MEAN = 128.0
PIXEL_STD = 64.0

_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LA", "La", "LAB", "HSV")

# Why a path cannot be opened, in the words skipped.csv records (other errors: "cannot open (<strerror>)").
_OPEN_ERRORS = {
    errno.ENOENT: "missing file",
    errno.ELOOP: "symlink loop",
    errno.ENOTDIR: "a parent of the path is not a folder",
    errno.EISDIR: "is a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "path too long",
}


def normalize(images):
    """Pixel values (uint8, or float in 0..255 such as augmented pixels; any shape) -> float32
    (x - PIXEL_MEAN) / PIXEL_STD, a new array of the same shape."""
    out = np.array(images, dtype=np.float32, copy=True)
    out -= PIXEL_MEAN
    out *= 1.0 / PIXEL_STD
    return out


def _to_gray8(img, path):
    """Pillow image of any supported mode -> mode "L" image (see module docstring for the rules)."""
    from PIL import Image
    mode = img.mode
    if mode == "L":
        return img
    if mode in _COLOUR_MODES or mode == "1":
        return img.convert("L")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img, dtype=np.float64)
        if mode == "I" and (a.min() < 0 or a.max() > 65535):
            raise ImageReadError(path, f"unsupported pixel values for mode {mode} (outside 0..65535)")
        return Image.fromarray(np.rint(a / 257.0).astype(np.uint8), mode="L")
    raise ImageReadError(path, f"unsupported pixel mode {mode}")


def _square(gray, size):
    """Mode "L" Pillow image -> uint8 (1, size, size): the centred square of side min(w, h), box-resized."""
    from PIL import Image
    w, h = gray.size
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    out = gray.resize((size, size), Image.BOX, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8).reshape(1, size, size)


def load_image(path, size):
    """Read one image file and return uint8 (1, size, size).

    Raises ImageReadError (a ValueError) with the reason for: a path that cannot be opened (missing file,
    symlink loop, a parent that is not a folder, a directory, permission denied, path too long, ...), a
    file that is not a regular file (e.g. a FIFO), a 0-byte file, a read error, a file that is not an image,
    a truncated or corrupt image, an unsupported pixel mode, a DICOM file chexcy cannot use (see
    chexcy.data.dicom); chexcy.data.dicom.DicomSupportMissing (a RuntimeError) for any DICOM file
    when pydicom is not installed.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"load_image: size must be >= 1, got {size}")
    path = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below); no effect on files.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageReadError(path, _OPEN_ERRORS.get(exc.errno, f"cannot open ({exc.strerror})")) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):     # a directory opens too (O_RDONLY), but cannot be read
            raise ImageReadError(path, "is a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file")
        if info.st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        from chexcy.data import dicom
        if path.lower().endswith(dicom.DICOM_EXTENSIONS):
            return _square(dicom.read_dicom_image(f, path), size)
        return _decode(f, path, size)


def _decode(f, path, size):
    """Decode the open image file `f` (of `path`) -> uint8 (1, size, size); see load_image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(f) as img:
            if img.mode in ("L", "RGB", "CMYK", "YCbCr") and img.format == "JPEG":
                # Decode at a reduced DCT scale when the result still covers size x size.
                img.draft("L", (size, size))
            img.load()
            return _square(_to_gray8(img, path), size)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        from chexcy.data import dicom
        if dicom.is_dicom_file(f):
            return _square(dicom.read_dicom_image(f, path), size)
        raise ImageReadError(path, "not an image (unrecognised file format)") from None
    except OSError as exc:
        if exc.errno is not None:              # the system failed to read the file (EIO, ...), not Pillow
            raise ImageReadError(path, f"read error ({exc.strerror})") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(path, f"truncated or corrupt image ({reason})") from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(path, f"truncated or corrupt image ({reason})") from None
