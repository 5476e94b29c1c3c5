"""DICOM radiographs -> the 8-bit grayscale picture a radiology viewer shows, for `load_image`.

Reading needs pydicom (optional extra `chexcy[dicom]`); compressed transfer syntaxes need the decoder
package pydicom names for them (JPEG baseline and JPEG 2000 decode through Pillow, RLE and deflate through
pydicom itself; JPEG lossless and JPEG-LS need pylibjpeg-libjpeg, pyjpegls or gdcm).

The pixel pipeline of DICOM PS3.3 C.11 (the "grayscale standard display" order), one image:
1. decode the stored values (pydicom's `pixel_array`);
2. Modality LUT: rescale slope/intercept (or a Modality LUT Sequence), pydicom's `apply_modality_lut`;
3. VOI (the contrast window), the first one the file offers:
   - a VOI LUT Sequence (its first LUT, via pydicom's `apply_voi`), output scaled from the LUT's bit depth
     to 0..255;
   - else Window Center / Window Width (the first pair when several are given), mapped straight to 0..255
     with the VOI LUT Function: LINEAR (the default), LINEAR_EXACT or SIGMOID, formulas of C.11.2.1.2;
   - else, with no window in the file: 8-bit data already in 0..255 is kept as it is; anything else
     (12/16-bit, signed, rescaled) is stretched from the image's own minimum to its maximum (min-max, the
     usual default of viewers without a preset; a constant image becomes 0);
4. MONOCHROME1 (low values bright) is inverted, 255 - v, so that bone is bright as in CheXpert's JPEGs;
5. rounding to the nearest integer (halves up: floor(v + 0.5)), uint8.
Colour files (RGB, YBR) are converted to luma with Pillow's rule, like colour JPEGs.

Refused, each with an ImageReadError that `chexcy prepare` lists in skipped.csv: not a DICOM file, no
pixel data (e.g. a report or a presentation state), more than one frame (a multi-frame object is a series
or a tomosynthesis stack, not a radiograph, and picking one frame silently could score the wrong picture),
a compressed transfer syntax without an installed decoder (the reason names the syntax and the packages
that decode it), pixel data that fails to decode, an unsupported photometric interpretation.
"""
import os

import numpy as np

from chexcy.data.errors import ImageReadError

DICOM_EXTENSIONS = (".dcm", ".dicom")


class DicomSupportMissing(RuntimeError):
    """pydicom is not installed: no DICOM file can be read, so this stops the command instead of skipping."""


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise DicomSupportMissing("reading DICOM files needs pydicom: pip install pydicom "
                                  "(or pip install '.[dicom]' in a chexcy clone)") from None
    return pydicom


def is_dicom_file(f):
    """True when the open binary file `f` is a DICOM Part 10 file ('DICM' after the 128-byte preamble);
    leaves `f` at its start."""
    try:
        f.seek(0)
        head = f.read(132)
        f.seek(0)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def window_to_8bit(values, center, width, function="LINEAR"):
    """DICOM PS3.3 C.11.2.1.2: values (float64 array) through the window (center, width) -> float64 0..255."""
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for SIGMOID, got {width}")
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, got {width}")
        return np.clip(((values - center) / width + 0.5) * 255.0, 0.0, 255.0)
    if function != "LINEAR":
        raise ValueError(f"unsupported VOI LUT Function {function!r} (LINEAR, LINEAR_EXACT or SIGMOID)")
    if width < 1:
        raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
    if width == 1:          # the formula's (width - 1) is 0: a threshold at center - 0.5
        return np.where(values > center - 0.5, 255.0, 0.0)
    return np.clip(((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0, 0.0, 255.0)


def _first(value):
    """The first of a multi-valued DICOM element (or the value itself)."""
    from pydicom.multival import MultiValue
    return value[0] if isinstance(value, (MultiValue, list, tuple)) else value


def _voi_to_8bit(values, ds, path):
    """Modality-LUT output (float64) -> float64 0..255 following step 3 of the module docstring."""
    from pydicom.pixels import processing
    if ds.get("VOILUTSequence"):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        try:
            lut = processing.apply_voi(np.rint(values).astype(np.int64), ds, index=0)
        except (NotImplementedError, ValueError, AttributeError, IndexError) as exc:
            raise ImageReadError(path, f"unusable VOI LUT ({exc})") from None
        return lut.astype(np.float64) * (255.0 / (2 ** depth - 1))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        try:
            return window_to_8bit(values, float(_first(ds.WindowCenter)), float(_first(ds.WindowWidth)), function)
        except ValueError as exc:
            raise ImageReadError(path, f"unusable window ({exc})") from None
    bits = int(ds.get("BitsStored", 16))
    if bits <= 8 and values.min() >= 0 and values.max() <= 255 and np.all(values == np.rint(values)):
        return values
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _check_decoder(ds, path):
    """A compressed transfer syntax needs a decoder plug-in; say which package provides one when none does."""
    from pydicom.pixels import get_decoder
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageReadError(path, f"transfer syntax {syntax.name} ({syntax}) cannot be decoded by pydicom") from None
    if not decoder.is_available:
        # pydicom words each plug-in as "<plug-in> - requires <packages>"; the packages are what to install.
        options = [text.split(" - requires ", 1)[-1] for text in decoder.missing_dependencies]
        packages = ", or ".join(options) or "a pydicom decoder plug-in"
        raise ImageReadError(path, f"pixel data compressed as {syntax.name} ({syntax}) and no decoder for it is "
                                   f"installed: install {packages}")


def read_dicom_image(f, path):
    """read_dicom on the open binary file `f` (of `path`) -> mode "L" Pillow image."""
    from PIL import Image
    return Image.fromarray(read_dicom(path, f), mode="L")


def read_dicom(path, f=None):
    """One DICOM file -> uint8 (rows, columns), the picture as displayed (module docstring).

    f: the file already open in binary mode (read from its start), else `path` is opened. Raises
    ImageReadError (with the reason) for files chexcy cannot use, DicomSupportMissing when pydicom itself is
    not installed.
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut
    path = os.fspath(path)
    try:
        if f is not None:
            f.seek(0)
        ds = pydicom.dcmread(path if f is None else f)
    except InvalidDicomError:
        raise ImageReadError(path, "not a DICOM file (no DICOM file meta header with the 'DICM' signature)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ImageReadError(path, f"truncated or corrupt DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        kind = "float pixel data, not supported" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) \
            else "e.g. a report or a presentation state"
        raise ImageReadError(path, f"DICOM file without pixel data ({kind})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames); chexcy reads single-frame radiographs")
    _check_decoder(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        pixels = ds.pixel_array
    except Exception as exc:        # decoders raise anything from ValueError to their own error types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(path, f"pixel data cannot be decoded ({reason})") from None
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim != 2:
            raise ImageReadError(path, f"unexpected pixel array shape {pixels.shape} for {photometric}")
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        gray = _voi_to_8bit(values, ds, path)
        if photometric == "MONOCHROME1":
            gray = 255.0 - gray
        return np.clip(np.floor(gray + 0.5), 0, 255).astype(np.uint8)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT") and pixels.ndim == 3 \
            and pixels.dtype == np.uint8:
        from PIL import Image          # pydicom hands colour pixels over as RGB
        return np.asarray(Image.fromarray(pixels, mode="RGB").convert("L"), dtype=np.uint8)
    raise ImageReadError(path, f"unsupported photometric interpretation {photometric or '(none)'} "
                               f"with pixel array {pixels.dtype} {pixels.shape}")
