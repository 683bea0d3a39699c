"""The ratio statistic of the copy rule, its noise correction and its conformal threshold.

See :mod:`audit.copy_detection.ratio_rule` for the rule that uses them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from audit.core.shiftzoom import CopyLayout

#: Distances below this are "no difference" for the ratio: about the RMS of 8-bit quantisation noise
#: (1 / 255 / sqrt(12)) after averaging over a pooled block of ~40 pixels.
RATIO_FLOOR = 2e-4


def noise_sigma(x) -> np.ndarray:
    """Standard deviation of white noise in each image ``(N, C, H, W)`` (Immerkaer 1996), channels averaged.

    ``sigma = sqrt(pi / 2) * mean |x * M| / 6`` with the 3 x 3 mask
    ``M = [[1, -2, 1], [-2, 4, -2], [1, -2, 1]]``, which cancels locally
    linear structure.  Texture and edges also contribute, so it is an upper
    estimate on detailed images.
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return np.zeros(n)
    m = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=torch.float64)
    out = np.empty(n)
    # a chunk of images at a time: float64 copies and the convolution's buffers of 10,000 queries at once
    # took 2.6 GB (bench/copy_scale.py at 10,000 x 100,000), more than the search itself
    step = max(1, (1 << 22) // max(c * h * w, 1))
    for s0 in range(0, n, step):
        xb = torch.as_tensor(x[s0:s0 + step], dtype=torch.float64)
        r = F.conv2d(xb.reshape(-1, 1, h, w), m[None, None].to(xb.device))
        s = math.sqrt(math.pi / 2) * r.abs().mean(dim=(1, 2, 3)) / 6.0
        out[s0:s0 + len(xb)] = s.reshape(len(xb), c).mean(1).cpu().numpy()
    return out


def noise_bias(layout: CopyLayout, sigma: np.ndarray) -> np.ndarray:
    """Expected squared-distance contribution of white noise ``sigma`` after ``phi``.

    A pooled value averages ``block_pixels`` pixels (variance ``sigma^2 /
    block_pixels``); removing a tile's mean keeps ``1 - 1 / n_tile`` of it.
    """
    th, tw = layout.tile
    return np.asarray(sigma, np.float64) ** 2 / layout.block_pixels * (1.0 - 1.0 / (th * tw))


def noise_margin(layout: CopyLayout) -> float:
    """Fraction of the noise energy below which a debiased distance counts as zero.

    A squared distance carrying noise energy ``b`` over ``dof`` pooled values
    fluctuates by about ``b sqrt(2 / dof)``; a difference smaller than about
    1.4 of those (``2 / sqrt(dof)``, 0.25 for an 8 x 8 image) is no evidence,
    so the debiased distance is floored there.  Without this floor a noisy but
    novel flat image (``d1^2`` and ``d2^2`` both about ``b``) gets a ratio near
    0; measured on real crops, this floor brought false alarms on novel crops
    with noise 0.05 from 1.5-2 % back to the clean-image level.
    """
    th, tw = layout.tile
    dof = layout.channels * layout.tiles * (th * tw - 1)
    return 2.0 / math.sqrt(max(dof, 1))


def ratio_statistic(d1, d2, bias=0.0, floor: float = RATIO_FLOOR, margin: float = 0.0) -> np.ndarray:
    """``sqrt(max(d1^2 - b, m b, f^2) / max(d2^2 - b, m b, f^2))`` with ``b = min(noise, d1^2)``.

    The nearest over the second-nearest distance with the query's own noise
    energy removed from both (:func:`noise_bias`), ``m`` the
    :func:`noise_margin` and ``f`` the quantisation floor.  The noise removed
    is capped at ``d1^2``: no more noise can be common to all distances than
    the smallest holds, and the texture that the noise estimate mistakes for
    noise on detailed images then cannot erase a copy's evidence.
    Non-decreasing in ``d1`` and non-increasing in ``d2`` (what
    :func:`decide_ratio` relies on; a property test checks it).
    """
    d1 = np.asarray(d1, np.float64)
    d2 = np.asarray(d2, np.float64)
    b = np.minimum(np.asarray(bias, np.float64), d1 ** 2)
    low = np.maximum(margin * b, floor ** 2)
    a = np.maximum(d1 ** 2 - b, low)
    c = np.maximum(d2 ** 2 - b, low)
    return np.sqrt(a / c)


def smallest_d1(d2, tau: float, bias, floor: float = RATIO_FLOOR, margin: float = 0.0,
                steps: int = 60) -> np.ndarray:
    """The smallest ``theta`` with ``ratio(theta, d2) >= tau`` (bisection; the ratio is non-decreasing in ``d1``).

    Since the ratio is also non-increasing in ``d2``, ``d1 >= theta`` and
    ``d2 <= d2_given`` prove ``ratio >= tau``.  Rounded up by a relative
    1e-9, so the returned value itself satisfies the inequality.
    """
    d2 = np.asarray(d2, np.float64)
    bias = np.broadcast_to(np.asarray(bias, np.float64), d2.shape)
    lo = np.zeros_like(d2)
    hi = d2.copy()  # ratio(d2, d2) = 1 >= tau
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        ok = ratio_statistic(mid, d2, bias, floor, margin) >= tau
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return np.minimum(hi * (1 + 1e-9), d2)


@dataclass(frozen=True)
class ConformalThreshold:
    """``flag when statistic < tau``; ``tau`` is the ``k``-th smallest of ``n`` holdout values.

    An image exchangeable with the holdout is flagged with probability at
    most ``k / (n + 1)`` (``level``); when ``n`` is too small for the asked
    ``alpha``, ``k = 1`` and ``level > alpha`` (``note`` says so).
    """

    tau: float
    k: int
    n: int
    alpha: float
    level: float
    note: str

    @property
    def resolved(self) -> bool:
        """Whether the holdout is large enough for the asked ``alpha`` (``level <= alpha``)."""
        return self.level <= self.alpha + 1e-12


def conformal_k(n: int, alpha: float) -> int:
    """The rank ``k = floor(alpha (n + 1))`` of the conformal threshold (at least 1)."""
    return max(1, math.floor(alpha * (n + 1)))


def ratio_threshold(values, alpha: float) -> ConformalThreshold:
    """The conformal threshold of holdout ratios ``values`` at level ``alpha`` (flag ``ratio < tau``)."""
    v = np.sort(np.asarray(values, np.float64))
    n = len(v)
    if n == 0:
        raise ValueError("a conformal threshold needs at least one holdout value")
    k = math.floor(alpha * (n + 1))
    if k >= 1:
        return ConformalThreshold(float(v[k - 1]), k, n, alpha, k / (n + 1),
                                  f"{k}-th smallest of {n} holdout values (false-alarm rate <= {k / (n + 1):.4f})")
    return ConformalThreshold(float(v[0]), 1, n, alpha, 1 / (n + 1),
                              f"{n} holdout images cannot resolve alpha {alpha:g}: smallest value used "
                              f"(false-alarm rate <= {1 / (n + 1):.4f}; >= {math.ceil(1 / alpha - 1)} needed)")
