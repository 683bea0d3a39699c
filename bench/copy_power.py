"""Benchmark: which copy rule catches near-copies (shifted and rescaled too) at almost no false alarms?

Data: real pictures that ship inside installed packages (scikit-image's
sample images -- retina, immunohistochemistry, cell, camera, astronaut,
coffee, brick, grass, gravel, moon, coins, hubble_deep_field, ... --,
scikit-learn's two sample photographs, matplotlib's grace_hopper and its MRI
slice), converted to grayscale in [0, 1].  Every picture is cut in two halves
(the split axis and which half trains are drawn by the seed):

* training  = 64 x 64 crops of one half (stride ``--train-stride``);
* novel     = 64 x 64 crops of the other half, in vertical strips that
  alternate between the *evaluated novel* set and the *holdout* set, so the
  two never share a pixel;
* copies    = training crops after one perturbation each (counted as
  copies: exact, Gaussian noise 0.01 and 0.05, brightness +0.04, contrast
  x0.9, JPEG 80, gamma 0.85, blur 0.8, shifts of 1, 2 and 3 px -- the source
  picture cropped at that offset --, rescales of up to 5 % -- the source
  region resampled --; reported separately and *not* required: noise 0.2 and
  the mirror image).

Every rule is scored on the same data: copies caught (overall and per
perturbation) and false alarms on the evaluated novel crops, each with an
exact (Clopper-Pearson) 95 % interval.  Thresholds that need a holdout are
set on the holdout crops only.

    OMP_NUM_THREADS=1 .venv/bin/python bench/copy_power.py --seeds 0,1,2 --out power.json
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 64
#: Perturbations that count as copies, and those reported but not required.
COUNTED = ("exact", "noise_0.01", "noise_0.05", "brightness", "contrast", "jpeg_80", "gamma_0.85", "blur_0.8",
           "shift_1", "shift_2", "shift_3", "rescale")
NOT_COUNTED = ("noise_0.2", "mirror")
PICTURES = ("retina", "immunohistochemistry", "cell", "camera", "astronaut", "coffee", "brick", "grass", "gravel",
            "moon", "coins", "hubble_deep_field", "clock", "page", "text", "chelsea", "rocket", "china", "flower",
            "grace_hopper", "mri")


# ------------------------------------------------------------------------------------------------ data


def load_picture(name: str) -> np.ndarray:
    """A bundled picture as a grayscale float array in [0, 1] (never downloaded)."""
    from skimage.color import rgb2gray

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    elif name in ("grace_hopper", "mri"):
        import matplotlib.cbook as cbook

        if name == "mri":
            raw = gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)).read()
            img = np.frombuffer(raw, ">u2").reshape(256, 256).astype(np.float64)
            return (img / img.max()).astype(np.float32)
        from PIL import Image

        img = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    img = img.astype(np.float64)
    if img.max() > 1.0:
        img = img / 255.0
    return img.astype(np.float32)


@dataclass
class Crop:
    picture: int
    y: int
    x: int


@dataclass
class Benchmark:
    pictures: list[np.ndarray]
    names: list[str]
    train: list[Crop]
    novel: list[Crop]
    holdout: list[Crop]
    copies: list[tuple[str, int, np.ndarray]]  # (perturbation, training index, image)

    def images(self, crops: list[Crop]) -> np.ndarray:
        return np.stack([self.pictures[c.picture][c.y:c.y + SIZE, c.x:c.x + SIZE] for c in crops])[:, None]


def _grid(lo: int, hi: int, stride: int) -> list[int]:
    """Crop origins in ``[lo, hi - SIZE]`` at ``stride``, centred in the span."""
    span = hi - lo - SIZE
    if span < 0:
        return []
    n = span // stride + 1
    off = lo + (span - (n - 1) * stride) // 2
    return [off + i * stride for i in range(n)]


def split_picture(shape, rng, margin: int, train_stride: int, novel_stride: int, strip: int):
    """Training, novel and holdout crop origins of one picture (see the module docstring)."""
    h, w = shape
    axis = 1 if w >= h else 0  # cut across the longer side
    if h == w:
        axis = int(rng.integers(2))
    n = (h, w)[axis]
    train_first = bool(rng.integers(2))
    halves = [(0, n // 2), (n // 2, n)]
    t_lo, t_hi = halves[0] if train_first else halves[1]
    v_lo, v_hi = halves[1] if train_first else halves[0]
    other = (w, h)[axis]

    def origins(lo, hi, stride, m):
        along = _grid(lo + m, hi - m, stride)
        across = _grid(m, other - m, stride)
        return [(a, b) if axis == 0 else (b, a) for a in along for b in across]

    train = origins(t_lo, t_hi, train_stride, margin)
    novel, holdout = [], []
    first_is_novel = bool(rng.integers(2))
    # strips across the cut: every crop lies inside one strip, strips alternate novel / holdout
    for k, lo in enumerate(range(v_lo, v_hi, strip)):
        hi = min(lo + strip, v_hi)
        crops = origins(lo, hi, novel_stride, 0)
        crops = [c for c in crops if (c[axis] >= v_lo + margin and c[axis] + SIZE <= v_hi - margin)]
        (novel if (k % 2 == 0) == first_is_novel else holdout).extend(crops)
    return train, novel, holdout


def perturb(kind: str, pic: np.ndarray, crop: Crop, rng: np.random.Generator) -> np.ndarray:
    """A perturbed copy of a training crop, made from the source picture where geometry changes."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    y, x = crop.y, crop.x
    base = pic[y:y + SIZE, x:x + SIZE].astype(np.float64)
    if kind == "exact":
        out = base
    elif kind.startswith("noise_"):
        out = base + rng.normal(0.0, float(kind.split("_")[1]), base.shape)
    elif kind == "brightness":
        out = base + 0.04
    elif kind == "contrast":
        out = (base - base.mean()) * 0.9 + base.mean()
    elif kind == "jpeg_80":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.round(np.clip(base, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=80)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64) / 255.0
    elif kind == "gamma_0.85":
        out = np.clip(base, 0, 1) ** 0.85
    elif kind == "blur_0.8":
        m = 4
        region = pic[max(0, y - m):y + SIZE + m, max(0, x - m):x + SIZE + m].astype(np.float64)
        out = gaussian_filter(region, 0.8, mode="nearest")[y - max(0, y - m):, x - max(0, x - m):][:SIZE, :SIZE]
    elif kind.startswith("shift_"):
        s = int(kind.split("_")[1])
        while True:  # an offset whose largest component is exactly s
            dy, dx = (int(v) for v in rng.integers(-s, s + 1, 2))
            if max(abs(dy), abs(dx)) == s:
                break
        out = pic[y + dy:y + dy + SIZE, x + dx:x + dx + SIZE].astype(np.float64)
    elif kind == "rescale":
        zoom = float(rng.uniform(0.95, 1.05))
        while abs(zoom - 1.0) < 0.01:
            zoom = float(rng.uniform(0.95, 1.05))
        c = (SIZE - 1) / 2
        g = c + (np.arange(SIZE) - c) / zoom  # the source region magnified by ``zoom``
        yy, xx = np.meshgrid(y + g, x + g, indexing="ij")
        out = map_coordinates(pic.astype(np.float64), [yy, xx], order=1, mode="nearest")
    elif kind == "mirror":
        out = base[:, ::-1]
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def build(seed: int, n_copies: int = 150, train_stride: int = 48, novel_stride: int = 32, strip: int = 128,
          margin: int = 6, max_train_per_picture: int = 150, max_novel_per_picture: int = 120,
          pictures=PICTURES) -> Benchmark:
    rng = np.random.default_rng(seed)
    pics = [load_picture(n) for n in pictures]
    train, novel, holdout = [], [], []
    for i, p in enumerate(pics):
        t, v, h = split_picture(p.shape, rng, margin, train_stride, novel_stride, strip)
        if len(t) > max_train_per_picture:
            t = [t[j] for j in sorted(rng.choice(len(t), max_train_per_picture, replace=False))]
        v = [v[j] for j in sorted(rng.choice(len(v), min(len(v), max_novel_per_picture), replace=False))]
        h = [h[j] for j in sorted(rng.choice(len(h), min(len(h), max_novel_per_picture), replace=False))]
        train += [Crop(i, a, b) for a, b in t]
        novel += [Crop(i, a, b) for a, b in v]
        holdout += [Crop(i, a, b) for a, b in h]
    copies = []
    for kind in COUNTED + NOT_COUNTED:
        for j in rng.choice(len(train), n_copies, replace=False):
            copies.append((kind, int(j), perturb(kind, pics[train[j].picture], train[j], rng)))
    return Benchmark(pics, list(pictures), train, novel, holdout, copies)
