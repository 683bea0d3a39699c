"""Real image patches for the membership-inference benchmark (``bench/mia_power.py``).

Fundus and microscopy pictures that ship inside scikit-image (``retina``,
``immunohistochemistry`` and ``cell``; the files inside the wheel, no
download), in grayscale: non-overlapping 64 x 64 crops, area-downsampled
to 32 x 32 (the ``tiny`` preset's resolution), shuffled by the seed and
split into ``members`` (the training set), ``holdout`` (unseen crops of
the same pictures) and ``unseen`` (the rest, up to as many as the members:
the negative run's stand-in members, never trained on).  Every crop is its own patient (``metadata.csv``), so the
patient-grouped designs reduce to image-level ones here.

    .venv/bin/python bench/mia_data.py --out /tmp/mia --members 128 --holdout 128
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PICTURES = ("retina", "immunohistochemistry", "cell")
CROP, SIZE = 64, 32


def picture(name: str) -> np.ndarray:
    """One bundled picture as grayscale float32 in [0, 1] (never downloaded)."""
    import skimage.data
    from skimage.color import rgb2gray

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    img = img.astype(np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1).astype(np.float32)


def patches(min_std: float = 0.02) -> list[tuple[str, np.ndarray]]:
    """Every non-overlapping 64 x 64 crop with some content, downsampled to 32 x 32."""
    out = []
    for name in PICTURES:
        img = picture(name)
        for y in range(0, img.shape[0] - CROP + 1, CROP):
            for x in range(0, img.shape[1] - CROP + 1, CROP):
                c = img[y:y + CROP, x:x + CROP].reshape(SIZE, 2, SIZE, 2).mean((1, 3))
                if c.std() >= min_std:
                    out.append((f"{name}", c))
    return out


def write_set(folder: Path, items: list[tuple[str, np.ndarray]], prefix: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_id", "source"])
        for i, (src, img) in enumerate(items):
            name = f"{prefix}{i:04d}.png"
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(folder / name)
            w.writerow([name, f"{prefix}{i:04d}", src])


def build(out: Path, members: int, holdout: int, seed: int) -> dict:
    items = patches()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    if members + holdout > len(items):
        raise SystemExit(f"only {len(items)} patches; asked for {members} + {holdout}")
    write_set(out / "members", [items[i] for i in order[:members]], "m")
    write_set(out / "holdout", [items[i] for i in order[members:members + holdout]], "h")
    # the rest: unseen patches of the same pictures, for the negative run (a model that never saw its "members")
    rest = order[members + holdout:members + holdout + members]
    write_set(out / "unseen", [items[i] for i in rest], "u")
    sources = {}
    for i in order[:members + holdout]:
        sources[items[i][0]] = sources.get(items[i][0], 0) + 1
    return {"patches_available": len(items), "members": members, "holdout": holdout, "unseen": len(rest),
            "sources": sources}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--members", type=int, default=128)
    ap.add_argument("--holdout", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(a.out, a.members, a.holdout, a.seed))


if __name__ == "__main__":
    main()
