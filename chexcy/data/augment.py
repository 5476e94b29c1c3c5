"""Augmentation for chest films: small shift, scale and rotation, brightness and contrast. Never a flip.

A horizontal flip would put the heart on the wrong side and teach the model anatomy that does not exist;
a vertical flip is as wrong. Every random number of image `row` in epoch `epoch` is a pure function of
(seed, epoch, row, k) through a counter-based hash (splitmix64), so an image is augmented the same way
whatever batch it lands in, in whatever order, on whatever worker: resuming mid-epoch reproduces the
remaining batches exactly.
"""
import math
from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x):
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hashed_uniform(seed, epoch, rows, k):
    """float64 (B,) uniforms in [0, 1): one per row, a pure function of (seed, epoch, row, k)."""
    rows = np.asarray(rows, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)) ^ np.uint64(int(epoch) & 0xFFFFFFFF))
        x = _splitmix64(_splitmix64(key ^ rows) + np.uint64(int(k)))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class ChestAugment:
    """Random affine (about the image centre) then brightness/contrast, per image.

    max_shift: fraction of the side; scale: (low, high) zoom factors; max_rotation: degrees;
    brightness: shift as a fraction of 255; contrast: (low, high) gain about mid-grey 128.
    """
    max_shift: float = 0.06
    scale: tuple = (0.9, 1.1)
    max_rotation: float = 10.0
    brightness: float = 0.08
    contrast: tuple = (0.85, 1.15)

    def params(self, seed, epoch, rows):
        """Per-row parameters, each float64 (B,): shift_x, shift_y (fractions), scale, angle (degrees),
        brightness (pixel units), contrast."""
        u = [hashed_uniform(seed, epoch, rows, k) for k in range(6)]
        lo, hi = self.scale
        clo, chi = self.contrast
        return {
            "shift_x": (2 * u[0] - 1) * self.max_shift,
            "shift_y": (2 * u[1] - 1) * self.max_shift,
            "scale": lo + (hi - lo) * u[2],
            "angle": (2 * u[3] - 1) * self.max_rotation,
            "brightness": (2 * u[4] - 1) * self.brightness * 255.0,
            "contrast": clo + (chi - clo) * u[5],
        }

    def apply(self, images, params):
        """uint8 (B, 1, S, S) -> float32 (B, 1, S, S) pixel values in [0, 255] (not yet normalised).

        The geometry is one bilinear affine resampling per image with Pillow (which releases the GIL, so
        loader threads overlap); pixels from outside the image are 0 (film background).
        """
        from PIL import Image
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 1 or images.dtype != np.uint8:
            raise ValueError(f"ChestAugment.apply: expected uint8 (B, 1, S, S), got {images.dtype} {images.shape}")
        b, _, h, w = images.shape
        out = np.empty((b, 1, h, w), dtype=np.float32)
        cx, cy = w / 2.0, h / 2.0
        for i in range(b):
            s = float(params["scale"][i])
            a = math.radians(float(params["angle"][i]))
            tx, ty = float(params["shift_x"][i]) * w, float(params["shift_y"][i]) * h
            cos, sin = math.cos(a) / s, math.sin(a) / s
            # Output pixel p maps to input R(-a) (p - c - t) / s + c (the inverse of scale-rotate-shift).
            coeffs = (cos, sin, cx - cos * (cx + tx) - sin * (cy + ty),
                      -sin, cos, cy + sin * (cx + tx) - cos * (cy + ty))
            img = Image.fromarray(images[i, 0])
            moved = img.transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)
            out[i, 0] = np.asarray(moved, dtype=np.uint8)
        gain = params["contrast"].astype(np.float32)[:, None, None, None]
        bias = params["brightness"].astype(np.float32)[:, None, None, None]
        out -= 128.0
        out *= gain
        out += 128.0 + bias
        np.clip(out, 0.0, 255.0, out=out)
        return out
