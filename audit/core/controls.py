"""Planted leaks for positive controls: near-copies of real images made by known transforms.

Every detector proves it can fail by catching such plants (DESIGN.md, "Positive
control").  The plants live in memory only and are never written to an output.
"""
from __future__ import annotations

import io

import numpy as np

TRANSFORMS = ("exact", "noise", "brightness_contrast", "jpeg", "blur")


def plant(x: np.ndarray, transform: str, rng: np.random.Generator) -> np.ndarray:
    """A near-copy of ``x`` (``(C, H, W)`` in [0, 1]) made by ``transform``."""
    if transform == "exact":
        y = x.copy()
    elif transform == "noise":
        y = x + rng.normal(0.0, 0.02, x.shape)
    elif transform == "brightness_contrast":
        y = (x - 0.5) * 1.05 + 0.5 + 0.03
    elif transform == "jpeg":
        from PIL import Image

        chans = []
        for c in x:
            buf = io.BytesIO()
            Image.fromarray(np.round(np.clip(c, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=75)
            chans.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0)
        y = np.stack(chans)
    elif transform == "blur":
        from scipy.ndimage import gaussian_filter

        y = np.stack([gaussian_filter(c, 0.8, mode="nearest") for c in x])
    else:
        raise ValueError(f"transform {transform!r} must be one of {', '.join(TRANSFORMS)}")
    return np.clip(y, 0.0, 1.0).astype(np.float32)
