"""Statistics every check reports with: rates with exact intervals, bootstrap CIs, ROC summaries."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided ``1 - alpha`` interval for a binomial proportion ``k / n`` (Clopper & Pearson 1934).

    scipy's ``binomtest(k, n).proportion_ci(method="exact")``; ``(0, 1)`` when
    ``n`` is 0.  It agrees with the beta-quantile form this function used
    before to 5e-13 (``tests/test_stats.py``); at about 3 ms an interval it
    is 30-50x slower than that form, which does not matter for the handful
    of rates a check reports (``bench/field_libraries.py --only stats``).
    """
    from scipy.stats import binomtest

    if n <= 0:
        return (0.0, 1.0)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method="exact")
    return float(ci.low), float(ci.high)


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
    one table); otherwise each sample is resampled on its own.  The
    resampling is ``scipy.stats.bootstrap(method="percentile")``; the
    interval is :func:`percentile_ci` of its bootstrap distribution, so that
    resamples on which the statistic is undefined (NaN, or ``None``) are
    dropped, where scipy's own interval would be NaN.  The draws are the
    ones the former loop made from the same ``rng``; scipy adds about 20 us
    per resample, a few times a trivial statistic's cost and nothing beside
    the statistics callers pass.
    """
    def stat(*draw):
        v = statistic(*draw)
        return np.nan if v is None else v

    return percentile_ci(_scipy_bootstrap(stat, [np.asarray(s) for s in samples], n_boot, rng, paired), alpha)


def _scipy_bootstrap(statistic: Callable, samples: list[np.ndarray], n_boot: int, rng: np.random.Generator | None,
                     paired: bool = True) -> np.ndarray:
    """``scipy.stats.bootstrap``'s distribution of ``statistic`` (not vectorized): ``(..., n_boot)``.

    Samples of fewer than 2 items (which scipy refuses) have one resample,
    themselves.  ``batch`` only bounds memory (``n_boot x n`` indices at
    once); it does not change the draws.
    """
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap

    rng = rng or np.random.default_rng(0)
    if min(len(s) for s in samples) < 2:
        return np.stack([np.asarray(statistic(*samples), np.float64)] * n_boot, axis=-1)
    batch = max(1, min(n_boot, (1 << 22) // max(len(s) for s in samples)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)  # NaN draws: our percentile_ci drops them
        res = bootstrap(tuple(samples), statistic, n_resamples=n_boot, batch=batch, vectorized=False,
                        paired=paired, method="percentile", rng=rng)
    return np.asarray(res.bootstrap_distribution, np.float64)


def percentile_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of bootstrap ``values`` (NaN draws, where a statistic was undefined, are dropped)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_draws(statistics: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int = 2000,
                    rng: np.random.Generator | None = None, groups: Sequence | None = None) -> np.ndarray:
    """Evaluate a vector of statistics on ``n_boot`` paired resamples of ``n`` rows.

    ``statistics(idx)`` gets the resampled row indices and returns a 1-D
    array; every statistic sees the *same* indices in a draw, so differences
    between them (two classifiers scored on the same test images) are
    paired.  With ``groups`` (one key per row, e.g. the patient), whole
    groups are resampled (cluster bootstrap): rows of one patient are not
    independent, and resampling them one by one gives intervals that are
    too narrow.  Returns ``(n_boot, m)``; use :func:`percentile_ci` per column.

    The resampling is ``scipy.stats.bootstrap`` over row (or group) indices;
    the statistics map resampled groups back to their rows.
    """
    if groups is None:
        return np.moveaxis(_scipy_bootstrap(statistics, [np.arange(n)], n_boot, rng), -1, 0)
    keys = np.asarray(groups)
    if len(keys) != n:
        raise ValueError(f"groups has {len(keys)} entries for {n} rows")
    _, inverse = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]

    def by_group(pick):
        return statistics(np.concatenate([members[g] for g in pick]))

    return np.moveaxis(_scipy_bootstrap(by_group, [np.arange(len(members))], n_boot, rng), -1, 0)


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); reject where ``q <= alpha`` controls the FDR at ``alpha``.

    Notes
    -----
    Benjamini & Hochberg 1995: with sorted p-values ``p_(1) <= ... <= p_(m)``,
    ``q_(i) = min_{j >= i} min(1, m p_(j) / j)``.  NaN p-values (tests not
    run) stay NaN and do not count towards ``m``.
    """
    p = np.asarray(pvalues, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv, kind="stable")
    scaled = pv[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    adjusted = np.empty(m)
    adjusted[order] = q
    out[ok] = adjusted
    return out


def compare_samples(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict:
    """Two-sided test of two independent samples, chosen the way the seed studies chose it.

    Shapiro-Wilk on each sample (needs at least 3 values); when neither
    rejects normality at ``alpha``, Welch's t-test, else the Mann-Whitney U
    test.  Returns the test used, its statistic and p-value, the Shapiro
    p-values, the sample sizes and means, and -- because a rank test on tiny
    samples cannot reach small p-values at all -- the smallest two-sided
    p-value the Mann-Whitney test could give at these sizes.

    Notes
    -----
    Hosseini & Serag 2025 (DDPM + Swin transformer, Front. Artif. Intell.):
    t-test or Mann-Whitney by Shapiro-Wilk, FDR-corrected, p < 0.05.  Welch's
    form is used because nothing makes the two variances equal.
    """
    import math
    import warnings

    from scipy import stats

    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    out: dict = {"n": [int(x.size), int(y.size)],
                 "mean": [float(x.mean()) if x.size else None, float(y.mean()) if y.size else None]}
    if x.size < 3 or y.size < 3:
        return {**out, "test": None, "statistic": None, "p": None,
                "note": "not run: each sample needs at least 3 values for Shapiro-Wilk"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant samples and N > 5000 only warn; the p-values are still defined
        shapiro = [_shapiro_p(v) for v in (x, y)]
        normal = all(p is not None and p > alpha for p in shapiro)
        if normal:
            res = stats.ttest_ind(x, y, equal_var=False)
            test = "welch_t"
        else:
            res = stats.mannwhitneyu(x, y, alternative="two-sided")
            test = "mann_whitney_u"
    p = float(res.pvalue)
    return {**out, "test": test, "statistic": float(res.statistic), "p": p if math.isfinite(p) else None,
            "shapiro_p": shapiro,
            "min_attainable_p_mann_whitney": 2.0 / math.comb(x.size + y.size, x.size)}


def _shapiro_p(v: np.ndarray) -> float | None:
    from scipy import stats

    if np.ptp(v) == 0:
        return None  # a constant sample is not normal in any useful sense
    return float(stats.shapiro(v).pvalue)


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


#: The classification metrics :func:`classification_metrics` returns, in report order.
CLASSIFICATION_METRICS = ("auc", "f1", "precision", "recall", "accuracy")


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC, F1, precision, recall and accuracy of class probabilities against true labels.

    ``probs`` is ``(n, K)``; ``labels`` integers in ``[0, K)``.  Averages are
    macro over the classes present in ``labels`` (a class never seen in the
    test set has no recall to average); AUC is one-vs-rest per class, so for
    two classes it is the ordinary ROC AUC.  Predictions are the arg-max
    class.  Returns an array in :data:`CLASSIFICATION_METRICS` order; a
    metric that is undefined on this sample (AUC with one class) is NaN.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    k = p.shape[1]
    pred = p.argmax(1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)  # rows: truth, columns: prediction
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = tp / support
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    if k == 2:
        auc = roc_auc(p[:, 1], y == 1)
    else:
        aucs = [roc_auc(p[:, c], y == c) for c in np.flatnonzero(present)]
        aucs = [a for a in aucs if np.isfinite(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    return np.array([auc, f1[present].mean(), precision[present].mean(), recall[present].mean(),
                     float(np.mean(pred == y))])


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

    Kept rather than ``scipy.stats.bootstrap``, which can express the same
    design (two unpaired samples of group indices) but evaluates the
    statistic resample by resample: measured 6.7x slower at 2,000 members
    and 2,000 non-members in groups of 4, 1,000 resamples, AUC and two TPRs
    (0.4 s against 2.9 s on one CPU thread; ``bench/field_libraries.py
    --only stats``), and membership inference runs this for every attack on
    the whole sample and on each half.  The draws differ (multinomial
    weights, not indices), so the intervals agree with scipy's up to Monte
    Carlo error only.

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


def binomial_rate(hits: int, n: int, note: str | None = None):
    """A binomial rate ``hits / n`` as an :class:`~audit.core.base.Estimate` with its exact interval."""
    from .base import Estimate

    if n == 0:
        return Estimate(None, n=0, note="no samples")
    lo, hi = clopper_pearson(hits, n)
    return Estimate(hits / n, (lo, hi), n, note)
