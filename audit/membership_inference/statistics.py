"""ROC statistics of membership attacks and how the deciding attack is chosen (Carlini et al. 2022).

ROC AUC and TPR at low FPR with stratified (patient-cluster) bootstrap
intervals; a TPR at an FPR the number of non-members cannot resolve is
reported as not resolvable, with the count needed.  With k attacks the
simultaneous intervals are at ``alpha / k`` (Bonferroni), and the attack
that decides is chosen by :func:`strength` on one half of the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from audit.core.base import Estimate
from audit.core.stats import bootstrap_roc, percentile_ci, roc_auc, tpr_at_fpr

FPRS = (0.01, 0.001)
FPR_KEYS = {0.01: "tpr_at_1pct_fpr", 0.001: "tpr_at_0.1pct_fpr"}


@dataclass(frozen=True)
class RocMetrics:
    """AUC and TPR at low FPR of one attack on one sample, with the bootstrap behind them.

    ``ci`` are 95% percentile intervals; ``simultaneous`` intervals are at
    level ``1 - alpha / k`` (Bonferroni over the k attacks compared).
    """

    auc: float
    auc_ci: tuple[float, float]
    auc_simultaneous: tuple[float, float]
    tpr: dict  # fpr -> point (None when not resolvable)
    tpr_ci: dict  # fpr -> (lo, hi)
    tpr_simultaneous: dict
    tpr_zero_fp: float  # TPR at a threshold above every non-member
    n_members: int
    n_nonmembers: int

    def resolvable(self, fpr: float) -> bool:
        return self.n_nonmembers * fpr >= 1.0 - 1e-12

    def estimates(self) -> dict[str, Estimate]:
        n = self.n_members + self.n_nonmembers
        out = {"auc": Estimate(self.auc, self.auc_ci, n)}
        for fpr in self.tpr:
            if self.resolvable(fpr):
                coarse = self.n_nonmembers * fpr < 10
                note = (f"coarse: {self.n_nonmembers} non-members allow {int(self.n_nonmembers * fpr)} false "
                        f"positive(s); about {math.ceil(10 / fpr):,} give a stable estimate") if coarse else None
                out[FPR_KEYS[fpr]] = Estimate(self.tpr[fpr], self.tpr_ci[fpr], n, note)
            else:
                out[FPR_KEYS[fpr]] = Estimate(None, None, n, (
                    f"not resolvable: {self.n_nonmembers} non-members cannot resolve FPR {pct(fpr)} (needs at least "
                    f"{math.ceil(1 / fpr):,}, about {math.ceil(10 / fpr):,} for a stable estimate); TPR at zero "
                    f"false positives is {self.tpr_zero_fp:.3f}"))
        return out


@dataclass(frozen=True)
class Evidence:
    """What the decision rests on: every attack on the whole sample and the held-out measurement."""

    full: dict[str, RocMetrics]
    chosen: str  # the attack chosen on the selection half
    held: RocMetrics  # the chosen attack on the evaluation half
    confirmed: list[str]  # limits the chosen attack exceeds on held-out data (above chance)
    significant: dict[str, list[str]]  # limits exceeded by simultaneous lower bounds
    beyond: dict[str, list[str]]  # limits exceeded by whole-sample point estimates
    upper: dict[str, list[str]]  # limits exceeded by simultaneous upper bounds
    unresolved: list[float]  # FPRs the policy limits that the non-members cannot resolve


def roc_metrics(scores: np.ndarray, labels: np.ndarray, k: int = 1, alpha: float = 0.05, n_boot: int = 1000,
                rng: np.random.Generator | None = None, fprs=FPRS, groups=None) -> RocMetrics:
    """Point estimates, 95% and simultaneous (``alpha / k``) bootstrap intervals of one attack.

    ``groups`` (one per score, e.g. patients) makes the bootstrap resample
    whole groups, members and non-members separately.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    g = None if groups is None else np.asarray(groups, object)
    reps = bootstrap_roc(s[y], s[~y], fprs, n_boot=n_boot, rng=rng, pos_groups=None if g is None else g[y],
                         neg_groups=None if g is None else g[~y])
    level = alpha / max(k, 1)
    tpr, tpr_ci, tpr_sim = {}, {}, {}
    n0 = int((~y).sum())
    for fpr in fprs:
        tpr[fpr] = tpr_at_fpr(s, y, fpr) if n0 * fpr >= 1.0 - 1e-12 else None
        tpr_ci[fpr] = percentile_ci(reps[fpr], alpha)
        tpr_sim[fpr] = percentile_ci(reps[fpr], level)
    return RocMetrics(roc_auc(s, y), percentile_ci(reps["auc"], alpha), percentile_ci(reps["auc"], level),
                      tpr, tpr_ci, tpr_sim, tpr_at_fpr(s, y, 0.0), int(y.sum()), n0)


def exceeded(m: RocMetrics, limits: dict, side: str = "point", above_chance: bool = False) -> list[str]:
    """Which limits ``m`` goes beyond: by its point estimates, or its simultaneous lower/upper bounds.

    ``above_chance``: a point estimate only counts when that metric's 95%
    interval also lies above chance (0.5 for the AUC, the FPR itself for a
    TPR), so a small sample's noise is not read as a leak.
    """
    out = []
    for key, limit in limits.items():
        if limit is None:
            continue
        if key == "auc":
            value = {"point": m.auc, "lower": m.auc_simultaneous[0], "upper": m.auc_simultaneous[1]}[side]
            name, lo, chance = "AUC", m.auc_ci[0], 0.5
        else:
            if not m.resolvable(key):
                continue
            value = {"point": m.tpr[key], "lower": m.tpr_simultaneous[key][0], "upper": m.tpr_simultaneous[key][1]}[side]
            name, lo, chance = f"TPR at {pct(key)} FPR", m.tpr_ci[key][0], key
        if value > limit and (not above_chance or lo > chance):
            out.append(f"{name} {value:.3f} > {limit:g}")
    return out


def strength(scores: np.ndarray, labels: np.ndarray, limits: dict, min_false_positives: int = 5) -> float:
    """How far an attack goes toward the policy's limits (1 = at a limit): the selection criterion.

    A TPR at low FPR counts only where the sample allows at least
    ``min_false_positives`` false positives at that FPR: read off one or two
    non-members it is noise, and ranking attacks by noise picks the wrong one.
    """
    y = np.asarray(labels).astype(bool)
    n0 = int((~y).sum())
    ratios = []
    if limits.get("auc") is not None:
        ratios.append((roc_auc(scores, y) - 0.5) / max(limits["auc"] - 0.5, 1e-9))
    for fpr in FPRS:
        if limits.get(fpr) is not None and n0 * fpr >= min_false_positives:
            ratios.append(tpr_at_fpr(scores, y, fpr) / max(limits[fpr], 1e-9))
    return max(ratios) if ratios else roc_auc(scores, y)


def score_histogram(scores: np.ndarray, labels: np.ndarray) -> dict:
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    lo, hi = float(np.min(s)), float(np.max(s))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    return {"edges": edges.round(6).tolist(), "members": np.histogram(s[y], edges)[0].tolist(),
            "non-members": np.histogram(s[~y], edges)[0].tolist(), "xlabel": "score (higher = more likely member)"}


def pct(fpr: float) -> str:
    return f"{fpr * 100:g}%"


def relabelled_max_auc(scores: dict[str, np.ndarray], labels: np.ndarray, groups, n_perm: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, int, bool]:
    """The strongest attack's AUC when whole patients are relabelled member / non-member at random.

    Under "no membership signal" the patients (``groups``; an image is its
    own group without patient IDs) are exchangeable between the two roles, so
    every relabelling that keeps the number of member patients is equally
    likely; the maximum over the k attacks makes it the null of the *best*
    attack, selection included.  Images of one patient move together, which
    is what makes it valid for patient-grouped data (a bootstrap over a
    handful of patients is not).  Returns the null draws, the number of
    distinct relabellings and whether all of them were enumerated (exact)
    rather than sampled (``n_perm`` draws).
    """
    from itertools import combinations

    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool)
    _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = int(inv.max()) + 1
    k_member = len(np.unique(inv[y]))
    size = np.bincount(inv, minlength=n_groups).astype(np.float64)
    rank_sums = np.stack([np.bincount(inv, weights=rankdata(np.asarray(s, np.float64)), minlength=n_groups)
                          for s in scores.values()])  # (attacks, groups)
    n_all = len(y)
    distinct = math.comb(n_groups, k_member)
    if distinct <= n_perm:
        picks = np.zeros((distinct, n_groups))
        for row, chosen in enumerate(combinations(range(n_groups), k_member)):
            picks[row, list(chosen)] = 1.0
    else:
        order = np.argsort(rng.random((n_perm, n_groups)), axis=1)[:, :k_member]
        picks = np.zeros((n_perm, n_groups))
        np.put_along_axis(picks, order, 1.0, axis=1)
    n1 = picks @ size
    n0 = n_all - n1
    ok = (n1 > 0) & (n0 > 0)
    auc = (picks @ rank_sums.T - (n1 * (n1 + 1) / 2)[:, None]) / np.where(ok, n1 * n0, 1.0)[:, None]
    return auc.max(axis=1)[ok], distinct, distinct <= n_perm
