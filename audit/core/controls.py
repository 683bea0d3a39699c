"""Planted leaks for positive controls: near-copies of real images made by known transforms.

Every detector proves it can fail by catching such plants (DESIGN.md, "Positive
control").  The plants live in memory only and are never written to an output.

Two sets of transforms:

:data:`TRANSFORMS`
    pixel-aligned near-copies (exact, noise sigma 0.02, brightness/contrast,
    JPEG 75, blur 0.8): what a pixel-aligned rule (Carlini's tiled distance)
    and membership inference's planted members use;
:data:`COPY_TRANSFORMS`
    every perturbation the copy audit counts as a copy (issue "audit power"):
    exact; Gaussian noise sigma 0.01 and 0.05; brightness +0.04; contrast
    x 0.9; JPEG quality 80; gamma 0.85; blur sigma 0.8; translation by 1, 2
    and 3 pixels; rescaling by 1-5 %.  Not counted as copies, and never
    planted: noise sigma 0.2, mirror images.

Geometric plants are made from the image alone: a translation fills the
uncovered border by repeating the edge row or column, a rescale about the
centre reads beyond the border the same way (bilinear interpolation).
"""
from __future__ import annotations

import io

import numpy as np

TRANSFORMS = ("exact", "noise", "brightness_contrast", "jpeg", "blur")
COPY_TRANSFORMS = ("exact", "noise_0.01", "noise_0.05", "brightness", "contrast", "jpeg_80", "gamma_0.85",
                   "blur_0.8", "shift_1", "shift_2", "shift_3", "rescale")
#: Planted as well when the ratio rule's ``inverted`` test is on.
INVERTED = "inverted"
ALL_TRANSFORMS = tuple(dict.fromkeys(TRANSFORMS + COPY_TRANSFORMS + (INVERTED,)))


def _jpeg(x: np.ndarray, quality: int, joint_rgb: bool) -> np.ndarray:
    """JPEG round trip of ``(C, H, W)``: channel by channel, or RGB as one colour image when ``joint_rgb``."""
    from PIL import Image

    def roundtrip(a: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0

    if joint_rgb and x.shape[0] == 3:
        return roundtrip(x.transpose(1, 2, 0)).transpose(2, 0, 1)
    return np.stack([roundtrip(c) for c in x])


def _shift(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Translate by ``(dy, dx)`` with ``max(|dy|, |dx|) == size`` (drawn), the uncovered border edge-filled."""
    while True:
        dy, dx = (int(v) for v in rng.integers(-size, size + 1, 2))
        if max(abs(dy), abs(dx)) == size:
            break
    _, h, w = x.shape
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return x[:, rows][:, :, cols]


def _rescale(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnify about the centre by a zoom drawn in [0.95, 1.05] with ``|zoom - 1| >= 0.01`` (bilinear)."""
    from scipy.ndimage import map_coordinates

    zoom = float(rng.uniform(0.95, 1.05))
    while abs(zoom - 1.0) < 0.01:
        zoom = float(rng.uniform(0.95, 1.05))
    _, h, w = x.shape
    gy = (h - 1) / 2 + (np.arange(h) - (h - 1) / 2) / zoom
    gx = (w - 1) / 2 + (np.arange(w) - (w - 1) / 2) / zoom
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    return np.stack([map_coordinates(c.astype(np.float64), [yy, xx], order=1, mode="nearest") for c in x])


def plant(x: np.ndarray, transform: str, rng: np.random.Generator) -> np.ndarray:
    """A near-copy of ``x`` (``(C, H, W)`` in [0, 1]) made by ``transform`` (one of :data:`ALL_TRANSFORMS`)."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(x)
    if transform == "exact":
        y = x.copy()
    elif transform == "noise":
        y = x + rng.normal(0.0, 0.02, x.shape)
    elif transform in ("noise_0.01", "noise_0.05"):
        y = x + rng.normal(0.0, float(transform.split("_")[1]), x.shape)
    elif transform == "brightness_contrast":
        y = (x - 0.5) * 1.05 + 0.5 + 0.03
    elif transform == "brightness":
        y = x + 0.04
    elif transform == "contrast":
        mean = x.mean(axis=(1, 2), keepdims=True)
        y = (x - mean) * 0.9 + mean
    elif transform == "jpeg":
        y = _jpeg(x, 75, joint_rgb=False)  # as membership inference has always planted it
    elif transform == "jpeg_80":
        y = _jpeg(x, 80, joint_rgb=True)
    elif transform == "gamma_0.85":
        y = np.clip(x, 0.0, 1.0) ** 0.85
    elif transform in ("blur", "blur_0.8"):
        y = np.stack([gaussian_filter(c, 0.8, mode="nearest") for c in x])
    elif transform.startswith("shift_") and transform in COPY_TRANSFORMS:
        y = _shift(x, int(transform.split("_")[1]), rng)
    elif transform == "rescale":
        y = _rescale(x, rng)
    elif transform == INVERTED:
        y = 1.0 - x
    else:
        raise ValueError(f"transform {transform!r} must be one of {', '.join(ALL_TRANSFORMS)}")
    return np.clip(y, 0.0, 1.0).astype(np.float32)
