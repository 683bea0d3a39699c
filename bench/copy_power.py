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
  region resampled --; reported separately and *not* required: noise 0.2,
  the mirror image and the inverted image).

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
import itertools
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
NOT_COUNTED = ("noise_0.2", "mirror", "inverted")
#: Bins of a source's content (RMS of its 8 x 8-pooled image, mean removed; 0.004 is one 8-bit grey level).
CONTENT_BINS = (0.0, 0.002, 0.01, 0.02, 0.05, float("inf"))
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
        from matplotlib import cbook

        if name == "mri":
            with gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)) as fh:
                raw = fh.read()
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
    elif kind == "inverted":  # a copy exported without its MONOCHROME1 inversion
        out = 1.0 - base
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def build(seed: int, n_copies: int = 150, train_stride: int = 48, novel_stride: int = 32, strip: int = 128,
          margin: int = 6, max_train_per_picture: int = 150, max_novel_per_picture: int = 120,
          pictures=PICTURES, duplicates: float = 0.0) -> Benchmark:
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
    if duplicates > 0:  # a share of the training crops stored twice (the same image filed twice), drawn first
        dup = sorted(rng.choice(len(train), round(duplicates * len(train)), replace=False).tolist())
        train += [train[j] for j in dup]
    copies = []
    for kind in COUNTED + NOT_COUNTED:
        for j in rng.choice(len(train), n_copies, replace=False):
            copies.append((kind, int(j), perturb(kind, pics[train[j].picture], train[j], rng)))
    return Benchmark(pics, list(pictures), train, novel, holdout, copies)


# ----------------------------------------------------------------------------------------------- rules


def tiled_matrix(q: np.ndarray, r: np.ndarray, grid: int = 4, pool: int = 1, remove_mean: bool = False,
                 chunk: int = 512) -> np.ndarray:
    """Carlini's tiled distance (RMS per tile, max over tiles) of every pair, float64 matrix products.

    ``pool > 1`` averages ``pool x pool`` pixel blocks first; ``remove_mean``
    subtracts each tile's mean (the evaluator's "simple variant").
    """
    import torch

    def tiles(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        if pool > 1:
            x = torch.nn.functional.avg_pool2d(x, pool)
        n, c, h, w = x.shape
        th, tw = h // grid, w // grid
        t = x.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c * th * tw)
        if remove_mean:
            t = t - t.mean(-1, keepdim=True)
        return t / math.sqrt(c * th * tw)

    rf = tiles(r)
    rn = (rf * rf).sum(-1)
    out = np.empty((len(q), len(r)))
    for s in range(0, len(q), chunk):
        qf = tiles(q[s:s + chunk])
        qn = (qf * qf).sum(-1)
        worst = None
        for t in range(rf.shape[1]):
            d = torch.addmm(rn[:, t][None], qf[:, t], rf[:, t].T, alpha=-2.0) + qn[:, t][:, None]
            worst = d if worst is None else torch.maximum(worst, d)
        out[s:s + chunk] = worst.clamp_min(0).sqrt().numpy()
    return out


def conformal(values: np.ndarray, alpha: float) -> float:
    """``k``-th smallest holdout value, ``k = floor(alpha (n + 1))`` (at least 1): flag ``statistic < tau``."""
    v = np.sort(values)
    return float(v[max(1, math.floor(alpha * (len(v) + 1))) - 1])


def ratio(d: np.ndarray) -> np.ndarray:
    s = np.sort(d, 1)
    return np.where(s[:, 1] > 0, s[:, 0] / np.maximum(s[:, 1], 1e-300), 1.0)


def baseline_flags(q: np.ndarray, h: np.ndarray, r: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    """Every baseline rule's flags on queries ``q``, thresholds set on holdout ``h`` where a rule needs one."""
    raw_q, raw_h = tiled_matrix(q, r), tiled_matrix(h, r)
    d1q, d1h = raw_q.min(1), raw_h.min(1)
    n50 = np.sort(raw_q, 1)[:, :50]
    cal = np.where(n50.mean(1) > 0, d1q / (0.5 * n50.mean(1)), 0.0)
    sq, sh = tiled_matrix(q, r, pool=4, remove_mean=True), tiled_matrix(h, r, pool=4, remove_mean=True)
    rq, rh = ratio(sq), ratio(sh)
    tau_default = conformal(d1h, 0.01)
    tau_simple = conformal(rh, 0.005)
    return {
        "synthgate default (holdout 1% of raw tiled d1)": (d1q < tau_default, f"tau={tau_default:.4g}"),
        "Carlini fixed 0.15": (d1q <= 0.15, "tau=0.15"),
        "Carlini calibrated (alpha 0.5, 50 nearest)": (cal < 1.0, "calibrated < 1"),
        "simple variant (pool 4, tile mean removed, ratio < 0.5)": (rq < 0.5, "tau=0.5"),
        "simple variant, holdout tau (alpha 0.005)": (rq < tau_simple, f"tau={tau_simple:.4g}"),
    }


NEW_DEFAULT = "new default: ratio rule (audit.copy_detection, default settings)"
PLAIN_RATIO = "ratio rule, plain second-nearest (the default before the grouped second distance)"
#: Variants tried to close the gap to 99 % and not adopted (``--ablations``; see the README's copy-detection section).
MARGIN_06 = "ratio rule, noise margin x 0.6 (not adopted)"
FINE_UNION = "ratio rule + a third test on 2 x 2 blocks, alpha / 3 each (not adopted)"


def _scaled_margin_rule():
    from audit.copy_detection.ratio_rule import CopyRatioRule

    class ScaledMarginRule(CopyRatioRule):
        """The check's rule with its noise margin (:func:`noise_margin`) scaled: how much power the margin costs."""

        def __init__(self, *args, margin_scale: float = 1.0, **kw):
            super().__init__(*args, **kw)
            self.margin_scale = margin_scale

        def margin(self, name: str) -> float:
            return self.margin_scale * super().margin(name)

    return ScaledMarginRule


def fine_flags(q: np.ndarray, h: np.ndarray, r: np.ndarray, level: float) -> np.ndarray:
    """A third ratio test, by brute force: whole image on 2 x 2 blocks (32 x 32 values), mean removed, debiased
    and floored as the check's tests are (second distance: the plain second-nearest), threshold the conformal
    ``level`` quantile of the holdout's ratios.

    Fine blocks keep the texture (sensor noise, JPEG grain) that tells a near-flat training crop from its
    neighbours, which 8 x 8 blocks average away.
    """
    import torch

    from audit.copy_detection.ratio_statistic import noise_sigma, ratio_statistic

    pool = 2
    dof = (SIZE // pool) ** 2 - 1
    floor = 1 / 255 / math.sqrt(12) / pool  # 8-bit quantisation noise averaged over a block, as RATIO_FLOOR

    def feats(x):
        f = torch.nn.functional.avg_pool2d(torch.as_tensor(x, dtype=torch.float64), pool).flatten(1)
        f = f - f.mean(1, keepdim=True)
        return f / math.sqrt(f.shape[1])

    rf = feats(r)
    rn = (rf * rf).sum(1)

    def stat(x):
        out = np.empty(len(x))
        for s in range(0, len(x), 1024):
            qf = feats(x[s:s + 1024])
            d = ((qf * qf).sum(1)[:, None] + rn[None] - 2 * qf @ rf.T).clamp_min(0).sqrt().numpy()
            two = np.sort(d, 1)[:, :2]
            bias = noise_sigma(x[s:s + 1024]) ** 2 / pool ** 2 * (1 - 1 / (dof + 1))
            out[s:s + 1024] = ratio_statistic(two[:, 0], two[:, 1], bias, floor, 2 / math.sqrt(dof))
        return out

    return stat(q) < conformal(stat(h), level)


def ceiling(copies: list, novel: np.ndarray, alpha: float = 0.005) -> np.ndarray:
    """Copies that no rule with false alarms <= ``alpha`` on these novel crops can catch.

    A rule decides on the image alone, so a copy pixel-identical to an image that makes up more than ``alpha``
    of the novel crops (the constant black background around the retina, in every half of the picture) is
    flagged only together with all of them.
    """
    from collections import Counter

    seen = Counter(x.tobytes() for x in np.ascontiguousarray(novel))
    return np.array([seen.get(np.ascontiguousarray(c[2][None]).tobytes(), 0) > alpha * len(novel) for c in copies])


def our_flags(q: np.ndarray, h: np.ndarray, r: np.ndarray, stats: dict, ablations: bool = False
              ) -> dict[str, tuple[np.ndarray, str]]:
    """The check's ratio rule at its default settings (and, with ``ablations``, variants), decisions proven exact.

    The rule is built exactly as :class:`audit.copy_detection.ratio_side.RatioSide`
    builds it from :class:`~audit.copy_detection.settings.CopyDetectionSettings`:
    same tests, shifts, zooms, blocks and false-alarm rate (the crops are
    already at the 64 x 64 analysis size), and the second distance grouped as
    the check groups a training set without patient IDs (near-duplicates
    within the duplicate radius).  ``PLAIN_RATIO`` is the same rule with the
    plain second-nearest, the definition before the grouping.
    """
    from audit.copy_detection.ratio_rule import CopyRatioRule, components
    from audit.copy_detection.ratio_side import ratio_geometry
    from audit.copy_detection.settings import CopyDetectionSettings

    s = CopyDetectionSettings()
    shape, pooled = ratio_geometry(SIZE, SIZE, s)
    base = {"alpha": s.false_alarm_rate, "components": components(s.max_shift, s.zooms, s.inverted),
            "pooled": pooled}
    specs = {NEW_DEFAULT: {}, PLAIN_RATIO: {"grouped": False}}
    if ablations:
        specs |= {
            "ratio rule, alpha 0.01": {"alpha": 0.01},
            "ratio rule, shift/zoom test only": {"components": {"shift_zoom": base["components"]["shift_zoom"]}},
            "ratio rule, identity test only": {"components": {"identity": base["components"]["identity"]}},
            "ratio rule, not debiased": {"debias": False},
            "ratio rule, pooled 12 x 12": {"pooled": 12},
        }
    if ablations:
        specs |= {MARGIN_06: {"margin_scale": 0.6}, FINE_UNION: {"fine": True}}
    out = {}
    for name, kw in specs.items():
        t0 = time.perf_counter()
        kw = dict(kw)
        grouped = kw.pop("grouped", True)
        fine = kw.pop("fine", False)
        scale = kw.pop("margin_scale", 1.0)
        # the check's own class for every row but the margin ablation
        rule = (CopyRatioRule(*shape, 1, **(base | kw)) if scale == 1.0 else
                _scaled_margin_rule()(*shape, 1, margin_scale=scale, **(base | kw))).fit(r, h, grouped=grouped)
        dec = rule.decide(q)
        if fine:  # the default rule's flags, or a third test on 2 x 2 blocks (brute force here)
            dec = type(dec)(dec.flagged | fine_flags(q, h, r, rule.alpha / 3), dec.components, dec.thresholds,
                            dec.alpha)
        taus = ", ".join(f"{k}: tau={v.tau:.3g} (k={v.k}/{v.n})" for k, v in rule.thresholds_.items())
        out[name] = (dec.flagged, taus)
        groups = None if rule.labels_ is None else {
            "pairs": len(rule.pairs_), "groups": int(rule.labels_.max()) + 1,
            "largest": int(np.bincount(rule.labels_).max()), "radius": rule.radius_.tau}
        stats[name] = {"seconds": round(time.perf_counter() - t0, 2), "training_groups": groups,
                       "search": {k: sr.stats.to_dict() for k, sr in rule.searches_.items()},
                       "thresholds": {k: vars(v) for k, v in rule.thresholds_.items()}}
    return out


# ------------------------------------------------------------------------------------------ evaluation


def interval(k: int, n: int) -> list[float]:
    from scipy.stats import binomtest

    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [round(ci.low, 4), round(ci.high, 4)]


def rate(flags: np.ndarray) -> dict:
    k, n = int(flags.sum()), len(flags)
    return {"k": k, "n": n, "rate": round(k / n, 4) if n else None, "ci95": interval(k, n)}


def content(images: np.ndarray) -> np.ndarray:
    """RMS of the 8 x 8-pooled image after removing its mean: how much there is to recognise."""
    n = len(images)
    p = images.reshape(n, 8, SIZE // 8, 8, SIZE // 8).mean((2, 4))
    return np.sqrt(((p - p.mean((1, 2), keepdims=True)) ** 2).mean((1, 2)))


def run_seed(seed: int, n_copies: int, informative: float, ablations: bool = False, duplicates: float = 0.0) -> dict:
    t0 = time.perf_counter()
    b = build(seed, n_copies=n_copies, duplicates=duplicates)
    r = b.images(b.train)
    h = b.images(b.holdout)
    novel = b.images(b.novel)
    rng = np.random.default_rng(seed + 1000)
    noisy_novel = np.clip(novel + rng.normal(0, 0.05, novel.shape), 0, 1).astype(np.float32)
    from scipy.ndimage import gaussian_filter

    blurred_novel = np.stack([gaussian_filter(x[0], 0.8, mode="nearest")[None] for x in novel]).astype(np.float32)
    copies = np.stack([c[2] for c in b.copies])[:, None]
    kinds = np.array([c[0] for c in b.copies])
    src = np.array([c[1] for c in b.copies])
    q = np.concatenate([copies, novel, noisy_novel, blurred_novel])
    nc, nn = len(copies), len(novel)
    built = time.perf_counter() - t0

    stats: dict = {}
    flags = baseline_flags(q, h, r) | our_flags(q, h, r, stats, ablations)
    src_content = content(r[:, 0])[src]
    counted = np.isin(kinds, COUNTED)
    unreachable = ceiling(b.copies, novel)
    flat_novel = float(np.mean([x.max() == x.min() for x in novel]))
    # a rule that ignores a constant image's grey level (as tolerating brightness +0.04 requires) flags a constant
    # copy only together with every constant novel crop
    constant = np.array([c[2].max() == c[2].min() for c in b.copies]) & (flat_novel > 0.005)
    # sources stored twice in the training set: the case the grouped second distance is for
    seen: dict[tuple, int] = {}
    for c in b.train:
        seen[(c.picture, c.y, c.x)] = seen.get((c.picture, c.y, c.x), 0) + 1
    twice = np.array([seen[(b.train[j].picture, b.train[j].y, b.train[j].x)] > 1 for j in src])
    rows = {}
    for name, (f, how) in flags.items():
        fc = f[:nc]
        rows[name] = {
            "threshold": how,
            "caught_counted": rate(fc[counted]),
            "caught_counted_informative": rate(fc[counted & (src_content >= informative)]),
            "caught_counted_source_twice": rate(fc[counted & twice & (src_content >= informative)]),
            "caught_by_source_content": {f"[{lo:g}, {hi:g})": rate(fc[counted & (src_content >= lo) & (src_content < hi)])
                                         for lo, hi in itertools.pairwise(CONTENT_BINS)},
            "per_perturbation": {k: rate(fc[kinds == k]) for k in COUNTED + NOT_COUNTED},
            "false_alarms_novel": rate(f[nc:nc + nn]),
            "false_alarms_novel_noise_0.05": rate(f[nc + nn:nc + 2 * nn]),
            "false_alarms_novel_blur_0.8": rate(f[nc + 2 * nn:]),
        }
    return {"seed": seed, "train": len(r), "novel": nn, "holdout": len(h), "copies_per_perturbation": n_copies,
            "informative_threshold": informative, "training_duplicates": duplicates,
            "uninformative_sources": round(float((src_content[counted] < informative).mean()), 4),
            "ceiling": rate(~unreachable[counted]),
            "constant_novel": round(flat_novel, 4),
            "ceiling_brightness_invariant": rate(~(unreachable | constant)[counted]),
            "build_s": round(built, 1), "rules": rows, "our_rule_stats": stats}


def fmt(r: dict) -> str:
    if r["rate"] is None:
        return "-"
    return f"{r['rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def markdown(res: dict) -> str:
    lines = [(f"### seed {res['seed']}: {res['train']} training, {res['novel']} novel, {res['holdout']} holdout crops, "
             f"{res['copies_per_perturbation']} copies per perturbation "
             f"({100 * res['uninformative_sources']:.1f}% of counted copies have a near-constant source, "
             f"content < {res['informative_threshold']}; no rule with false alarms <= 0.5% on these novel crops "
             f"can catch more than {res['ceiling']['rate']:.4f} of them: the rest are pixel-identical to more than "
             f"0.5% of the novel crops; {100 * res['constant_novel']:.1f}% of the novel crops are constant, and a rule "
             f"that ignores a constant image's grey level, as tolerating brightness +0.04 requires, can catch at most "
             f"{res['ceiling_brightness_invariant']['rate']:.4f})"), "",
             ("| rule | threshold | caught (counted) | caught (informative sources) | caught (informative, source "
              "stored twice) | false alarms, novel | FA novel + noise 0.05 | FA novel + blur 0.8 |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["rules"].items():
        lines.append(f"| {name} | {r['threshold']} | {fmt(r['caught_counted'])} | "
                     f"{fmt(r['caught_counted_informative'])} | {fmt(r['caught_counted_source_twice'])} | "
                     f"{fmt(r['false_alarms_novel'])} | "
                     f"{fmt(r['false_alarms_novel_noise_0.05'])} | {fmt(r['false_alarms_novel_blur_0.8'])} |")
    bins = list(next(iter(res["rules"].values()))["caught_by_source_content"])
    first = next(iter(res["rules"].values()))["caught_by_source_content"]
    lines += ["", "| rule (caught by source content) | " + " | ".join(f"{b} (n={first[b]['n']})" for b in bins) + " |",
              "|---|" + "---|" * len(bins)]
    for name, r in res["rules"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['caught_by_source_content'][b]['rate']:.3f}" for b in bins) + " |")
    kinds = COUNTED + NOT_COUNTED
    lines += ["", "| rule | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, r in res["rules"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_perturbation'][k]['rate']:.2f}" for k in kinds) + " |")
    return "\n".join(lines)


def pooled(results: list[dict]) -> dict:
    """Every rule's counts summed over seeds (each seed a different split and draw), with exact intervals."""
    out: dict = {}
    for name in results[0]["rules"]:
        rows = [res["rules"][name] for res in results]

        def total(get, rows=rows):
            k = sum(get(r)["k"] for r in rows)
            n = sum(get(r)["n"] for r in rows)
            return {"k": k, "n": n, "rate": round(k / n, 4) if n else None, "ci95": interval(k, n)}

        out[name] = {key: total(lambda r, key=key: r[key]) for key in
                     ("caught_counted", "caught_counted_informative", "caught_counted_source_twice",
                      "false_alarms_novel",
                      "false_alarms_novel_noise_0.05", "false_alarms_novel_blur_0.8")}
        out[name]["per_perturbation"] = {k: total(lambda r, k=k: r["per_perturbation"][k])
                                         for k in COUNTED + NOT_COUNTED}
    return out


def pooled_markdown(table: dict, seeds: list[int], results: list[dict]) -> str:
    k = sum(r["ceiling"]["k"] for r in results)
    n = sum(r["ceiling"]["n"] for r in results)
    kb = sum(r["ceiling_brightness_invariant"]["k"] for r in results)
    lines = [f"### pooled over seeds {', '.join(map(str, seeds))}", "",
             f"Ceiling: no rule with false alarms <= 0.5% on each seed's novel crops can catch more than {k} of {n} "
             f"counted copies ({k / n:.4f}); the others are pixel-identical to more than 0.5% of that seed's novel "
             f"crops. A rule that ignores a constant image's grey level (as tolerating brightness +0.04 requires) "
             f"can catch at most {kb} of {n} ({kb / n:.4f}): every constant copy looks like the constant novel crops.",
             "",
             "| rule | caught (counted) | caught (informative sources) | caught (informative, source stored twice) | "
             "false alarms, novel | FA novel + noise 0.05 | FA novel + blur 0.8 |", "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {fmt(r['caught_counted'])} | {fmt(r['caught_counted_informative'])} | "
                     f"{fmt(r['caught_counted_source_twice'])} | "
                     f"{fmt(r['false_alarms_novel'])} | {fmt(r['false_alarms_novel_noise_0.05'])} | "
                     f"{fmt(r['false_alarms_novel_blur_0.8'])} |")
    kinds = COUNTED + NOT_COUNTED
    lines += ["", "| rule | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_perturbation'][k]['rate']:.3f}" for k in kinds) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (each a different split and copy draw)")
    ap.add_argument("--copies", type=int, default=150, help="copies per perturbation")
    ap.add_argument("--informative", type=float, default=0.002,
                    help="content (RMS of the 8x8-pooled source, mean removed) below which a source is near-constant")
    ap.add_argument("--ablations", action="store_true", help="also score variants of the ratio rule")
    ap.add_argument("--duplicates", type=float, default=0.0,
                    help="share of training crops stored twice (copies of them test the grouped second distance)")
    ap.add_argument("--out", help="write the JSON results here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        res = run_seed(seed, args.copies, args.informative, args.ablations, args.duplicates)
        results.append(res)
        print(markdown(res) + "\n", flush=True)
    table = pooled(results)
    print(pooled_markdown(table, [r["seed"] for r in results], results), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": results, "pooled": table}, indent=1))


if __name__ == "__main__":
    main()
