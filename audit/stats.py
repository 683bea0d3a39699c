"""Statistics every check reports with: rates with exact intervals, bootstrap CIs, ROC summaries."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided ``1 - alpha`` interval for a binomial proportion ``k / n``."""
    from scipy.stats import beta

    if n <= 0:
        return (0.0, 1.0)
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def summary(x: Sequence[float]) -> dict:
    """Distribution summary of a sample (JSON-ready)."""
    a = np.asarray(x, np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"n": 0}
    q = np.quantile(a, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(a.size), "min": float(a.min()), "p01": float(q[0]), "p05": float(q[1]), "p25": float(q[2]),
            "median": float(q[3]), "p75": float(q[4]), "p95": float(q[5]), "max": float(a.max()),
            "mean": float(a.mean())}


def bootstrap_ci(statistic: Callable[..., float], *samples: np.ndarray, n_boot: int = 2000, alpha: float = 0.05,
                 rng: np.random.Generator | None = None, paired: bool = True) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*samples)``.

    ``paired``: resample the same indices in every sample (they are rows of
    one table); otherwise each sample is resampled on its own.  Resamples on
    which the statistic is undefined (NaN) are dropped.
    """
    rng = rng or np.random.default_rng(0)
    samples = [np.asarray(s) for s in samples]
    values = []
    for _ in range(n_boot):
        if paired:
            idx = rng.integers(0, len(samples[0]), len(samples[0]))
            draw = [s[idx] for s in samples]
        else:
            draw = [s[rng.integers(0, len(s), len(s))] for s in samples]
        v = statistic(*draw)
        if v is not None and np.isfinite(v):
            values.append(v)
    if not values:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC with ties counted half (Mann-Whitney U); ``labels`` 1 = positive."""
    from scipy.stats import rankdata

    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Largest true-positive rate at a threshold whose false-positive rate is <= ``fpr``.

    Higher scores mean "positive".  A threshold is only counted when the
    negatives above it are at most ``fpr`` of all negatives, so with fewer
    than ``1 / fpr`` negatives the only admissible threshold admits none.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    neg, pos = np.sort(s[~y])[::-1], s[y]
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allowed = int(np.floor(fpr * len(neg) + 1e-12))  # negatives allowed strictly above the threshold
    # threshold just above the (allowed+1)-th highest negative
    thr = neg[allowed] if allowed < len(neg) else -np.inf
    return float(np.mean(pos > thr))


def roc_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 200) -> dict:
    """A down-sampled ROC curve for plotting: ``{"fpr": [...], "tpr": [...]}``."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(int)
    if y.min() == y.max():
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(y, np.asarray(scores, np.float64))
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()}


def bootstrap_roc(pos: np.ndarray, neg: np.ndarray, fprs: Sequence[float] = (), n_boot: int = 1000,
                  rng: np.random.Generator | None = None, pos_groups: Sequence | None = None,
                  neg_groups: Sequence | None = None) -> dict:
    """Stratified bootstrap replicates of ROC AUC and of TPR at each FPR in ``fprs``.

    Positives and negatives are resampled separately, as a membership-inference
    evaluation with a fixed number of members and non-members demands.  With
    ``pos_groups`` / ``neg_groups`` (e.g. patient IDs, one per score) whole
    groups are resampled (a cluster bootstrap): images of one patient are not
    independent, and resampling them one by one gives intervals that are too
    narrow.  All replicates are computed at once from multinomial resampling
    weights on the sorted scores, in ``O(n_boot (n_pos + n_neg))`` after
    sorting, instead of re-ranking every resample; each replicate equals
    :func:`roc_auc` / :func:`tpr_at_fpr` on the resampled scores (ties count
    half in the AUC; a TPR threshold admits at most ``floor(fpr * n_neg)``
    negatives strictly above it, ``n_neg`` counted in the resample).

    Returns ``{"auc": (n_boot,), fpr: (n_boot,) ...}`` arrays.
    """
    rng = rng or np.random.default_rng(0)
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("bootstrap_roc needs at least one positive and one negative score")
    op, on = np.argsort(pos, kind="stable"), np.argsort(neg, kind="stable")
    pos, neg = pos[op], neg[on]
    wp = _resample_weights(len(pos), None if pos_groups is None else np.asarray(pos_groups, object)[op], n_boot, rng)
    wn = _resample_weights(len(neg), None if neg_groups is None else np.asarray(neg_groups, object)[on], n_boot, rng)
    tot_p, tot_n = wp.sum(axis=1), wn.sum(axis=1)
    zero = np.zeros((n_boot, 1), np.int64)
    cum_n = np.concatenate([zero, np.cumsum(wn, axis=1)], axis=1)  # weight of neg[:j]
    below = np.searchsorted(neg, pos, "left")
    upto = np.searchsorted(neg, pos, "right")
    beaten = cum_n[:, below] + 0.5 * (cum_n[:, upto] - cum_n[:, below])  # (B, n_pos)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"auc": (wp * beaten).sum(axis=1) / (tot_p * tot_n)}
    cum_p = np.concatenate([zero, np.cumsum(wp, axis=1)], axis=1)
    desc = neg[::-1]
    cum_desc = np.cumsum(wn[:, ::-1], axis=1)
    rows = np.arange(n_boot)
    for fpr in fprs:
        allowed = np.floor(fpr * tot_n + 1e-12)  # negatives allowed strictly above the threshold
        beyond = cum_desc > allowed[:, None]
        first = np.argmax(beyond, axis=1)  # the (allowed+1)-th highest negative, with multiplicity
        thr = np.where(beyond.any(axis=1), desc[first], -np.inf)
        at_or_below = cum_p[rows, np.searchsorted(pos, thr, "right")]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[fpr] = (tot_p - at_or_below) / tot_p
    return out


def _resample_weights(n: int, groups, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` bootstrap multiplicities: per item, or per group when ``groups`` are given."""
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    _, first, index = np.unique(groups.astype(str), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # groups numbered in order of appearance
    k = len(first)
    return rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)[:, rank[index]]


def percentile_interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap replicates (undefined replicates dropped)."""
    r = np.asarray(replicates, np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(r, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
