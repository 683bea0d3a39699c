"""Conformal thresholds calibrated on unseen real data, and the exact tests that go with them.

The holdout (or unseen patients) plays "a new image that was never trained
on": a threshold set at a rank of their statistic bounds the rate at which a
new unseen image is flagged (exchangeability), so every rule that uses one
knows, and reports, its false-alarm rate.
"""
from __future__ import annotations

import math

import numpy as np


def holdout_threshold(distances: np.ndarray, quantile: float) -> tuple[float, int, str]:
    """Conformal threshold from unseen-image distances.

    Flagging ``d < tau`` with ``tau`` the ``k``-th smallest of ``n`` holdout
    distances, ``k = floor(quantile (n + 1))``, flags a new unseen image with
    probability at most ``k / (n + 1) <= quantile``.  With too few holdout
    images for that quantile, ``tau`` is the smallest distance (rate at most
    ``1 / (n + 1)``) and the note says so.
    """
    d = np.sort(np.asarray(distances, np.float64))
    n = len(d)
    k = int(math.floor(quantile * (n + 1)))
    if k >= 1:
        return float(d[k - 1]), k, f"{k}-th smallest of {n} holdout distances (false-alarm rate <= {k / (n + 1):.4f})"
    return float(d[0]), 1, (f"{n} holdout images cannot resolve a {quantile:g} quantile; using the smallest "
                            f"holdout distance (false-alarm rate <= {1 / (n + 1):.4f})")


def conformal_threshold(impostor: np.ndarray, rate: float) -> tuple[float, int, str]:
    """``(tau, k, note)``: flag ``score > tau``; a new identity exceeds it with probability ``<= k / (n + 1)``.

    ``impostor`` holds one best-match score per unseen identity: images of one
    patient are alike, so only identities are exchangeable with a new
    patient's image (with ``m`` images per patient, image-level ranks could
    understate the rate up to ``m``-fold).  The holdout rule of copy
    detection, on negated similarities.
    """
    n = len(impostor)
    neg_tau, k, _ = holdout_threshold(-np.asarray(impostor, np.float64), rate)
    if math.floor(rate * (n + 1)) >= 1:
        note = (f"{k}-th largest best match of {n} unseen identities, one image each "
                f"(false-match rate <= {k / (n + 1):.4f})")
    else:
        note = (f"{n} unseen identities cannot resolve a false-match rate of {rate:g} (that needs "
                f"{math.ceil(1 / rate) - 1}); using the largest of their best matches (false-match rate <= "
                f"{1 / (n + 1):.4f})")
    return -neg_tau, k, note


def excess_p_value(flagged: int, n: int, k: int, n_cal: int) -> float:
    """P(at least ``flagged`` of ``n`` unseen-patient images exceed the ``k``-th largest of ``n_cal``).

    Exchangeability makes the exceedance probability of that threshold
    Beta(k, n_cal + 1 - k), so the count is beta-binomial: an exact test that
    accounts for the calibration set's own sampling error.
    """
    from scipy.stats import betabinom

    if n == 0 or flagged == 0:
        return 1.0
    return float(betabinom.sf(flagged - 1, n, k, n_cal + 1 - k))
