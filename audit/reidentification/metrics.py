"""Re-identification metrics: best matches, verification AUC over pairs, retrieval (mAP@R, P@1).

Packhäuser et al. 2022 report verification AUC and retrieval mAP@R / P@1 for
patient re-identification from chest X-rays; these are computed the same way
here, with identity-cluster bootstrap intervals.
"""
from __future__ import annotations

import numpy as np

import math
from collections import Counter

from audit.core.base import Estimate
from audit.core.stats import bootstrap_ci, roc_auc


def best_match(q: np.ndarray, g: np.ndarray, *, q_ids=None, g_ids=None, q_self=None, relation: str = "any",
               device="cpu", chunk_elements: int = 1 << 25) -> tuple[np.ndarray, np.ndarray]:
    """Exact best gallery match of every query by cosine similarity (embeddings are L2-normalised).

    ``relation``: ``any`` gallery image, only those of ``other`` identities
    than the query's, or only those of the ``same`` identity; ``q_self``
    (gallery index per query, -1 for none) excludes the query image itself.
    Returns ``(score, index)``, ``-inf`` / ``-1`` where nothing is admissible.

    An exact inner-product search in torch (one matrix product per chunk of
    queries): faiss's ``IndexFlatIP`` would give the same answers, but the
    BLAS bundled with faiss-cpu runs slowly on these CPUs (STACK-NOTES).
    """
    import torch

    gt = torch.as_tensor(g, device=device)
    gid = torch.as_tensor(g_ids, device=device) if g_ids is not None else None
    rows = max(1, chunk_elements // max(1, len(g)))
    scores, index = np.full(len(q), -np.inf), np.full(len(q), -1, np.int64)
    if len(g) == 0:
        return scores, index
    for s in range(0, len(q), rows):
        sim = torch.as_tensor(q[s:s + rows], device=device) @ gt.T
        if relation != "any":
            same = torch.as_tensor(q_ids[s:s + rows], device=device)[:, None] == gid[None, :]
            sim = sim.masked_fill(same if relation == "other" else ~same, -math.inf)
        if q_self is not None:
            own = torch.as_tensor(q_self[s:s + rows], device=device)
            rows_with = torch.nonzero(own >= 0).flatten()
            sim[rows_with, own[rows_with]] = -math.inf
        best, arg = sim.max(dim=1)
        scores[s:s + rows] = best.double().cpu().numpy()
        index[s:s + rows] = np.where(np.isfinite(scores[s:s + rows]), arg.cpu().numpy(), -1)
    return scores, index


def one_per_identity(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Index of one randomly chosen image per identity (ordered by identity)."""
    perm = rng.permutation(len(ids))
    _, first = np.unique(np.asarray(ids)[perm], return_index=True)
    return perm[first].astype(np.int64)


def verification_pairs(ids: np.ndarray, cross: bool, max_pairs: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` for verification: within one set (``i < j``) or across two aligned sets (``cross``).

    Every genuine pair is kept; impostor pairs are sampled down to ``max_pairs``.
    """
    n = len(ids)
    total = n * n if cross else n * (n - 1) // 2
    if total <= max_pairs:
        if cross:
            i, j = np.divmod(np.arange(n * n), n)
        else:
            i, j = np.triu_indices(n, 1)
        return i, j
    order = np.argsort(ids, kind="stable")
    starts = np.flatnonzero(np.r_[True, ids[order][1:] != ids[order][:-1]])
    gi, gj = [], []
    for group in np.split(order, starts[1:]):
        a, b = np.meshgrid(group, group, indexing="ij") if cross else np.triu_indices(len(group), 1)
        gi.append(a.ravel() if cross else group[a])
        gj.append(b.ravel() if cross else group[b])
    gi, gj = np.concatenate(gi), np.concatenate(gj)
    ri, rj = rng.integers(0, n, max_pairs), rng.integers(0, n, max_pairs)
    keep = ids[ri] != ids[rj]
    return np.concatenate([gi, ri[keep]]), np.concatenate([gj, rj[keep]])


def pair_auc(scores: np.ndarray, genuine: np.ndarray, ca: np.ndarray, cb: np.ndarray, n_boot: int, rng):
    """Verification AUC with a bootstrap CI that resamples identities, not pairs.

    Pairs share images and images share patients, so pairs are not
    independent; resampling patients (a cluster bootstrap) keeps that
    dependence.  A patient drawn ``w`` times weighs ``w`` on its genuine
    pairs and ``w_a w_b`` on impostor pairs; pairs between two copies of one
    patient are never formed.  (Packhaeuser et al. resample pairs.)
    """
    genuine = genuine.astype(bool)
    auc = roc_auc(scores, genuine)
    if n_boot <= 0 or not genuine.any() or genuine.all():
        return auc, None
    clusters, inverse = np.unique(np.concatenate([ca, cb]), return_inverse=True)
    ca, cb = inverse[:len(ca)], inverse[len(ca):]
    pos_s, pos_c = scores[genuine], ca[genuine]
    order = np.argsort(scores[~genuine], kind="stable")
    neg_s, neg_a, neg_b = scores[~genuine][order], ca[~genuine][order], cb[~genuine][order]
    lo, hi = np.searchsorted(neg_s, pos_s, "left"), np.searchsorted(neg_s, pos_s, "right")

    def statistic(draw):
        w = np.bincount(draw, minlength=len(clusters)).astype(np.float64)
        wp, cw = w[pos_c], np.concatenate([[0.0], np.cumsum(w[neg_a] * w[neg_b])])
        den = wp.sum() * cw[-1]
        return float((wp * (cw[lo] + 0.5 * (cw[hi] - cw[lo]))).sum() / den) if den > 0 else float("nan")

    return auc, bootstrap_ci(statistic, np.arange(len(clusters)), n_boot=n_boot, rng=rng)


def retrieval_metrics(query: np.ndarray, query_ids: np.ndarray, reference: np.ndarray | None = None,
                      reference_ids: np.ndarray | None = None, n_boot: int = 1000, rng=None) -> dict:
    """mAP@R and precision@1 (pytorch-metric-learning's ``AccuracyCalculator``) with identity-bootstrap CIs.

    Without ``reference`` the queries are their own reference, each query's
    own embedding excluded (Packhaeuser et al.'s protocol).  Cosine
    similarity on the normalised embeddings (the default ``LpDistance``
    would normalise them anyway; this makes it explicit).  Per-identity
    averages (``return_per_class``) weighted by their query counts give the
    overall mean over queries; the CI resamples identities.
    """
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    same_source = reference is None
    ref_ids = query_ids if same_source else reference_ids
    ref_counts = Counter(np.asarray(ref_ids).tolist())
    labels = sorted(p for p in set(np.asarray(query_ids).tolist()) if ref_counts.get(p, 0) > int(same_source))
    if not labels:
        return {"map_at_r": Estimate(None, n=0, note="no query has another image of its identity to find"),
                "precision_at_1": Estimate(None, n=0)}
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), k="max_bin_count",
                              knn_func=CustomKNN(CosineSimilarity(), batch_size=1024), return_per_class=True,
                              device=torch.device("cpu"))
    q_ids = torch.as_tensor(np.asarray(query_ids), dtype=torch.float64)
    if same_source:
        res = calc.get_accuracy(torch.as_tensor(query), q_ids)
    else:
        res = calc.get_accuracy(torch.as_tensor(query), q_ids, torch.as_tensor(reference),
                                torch.as_tensor(np.asarray(reference_ids), dtype=torch.float64))
    values, counts = np.unique(np.asarray(query_ids), return_counts=True)
    n_q = counts[np.isin(values, labels)].astype(np.float64)  # both in sorted label order
    out = {}
    for name, key in (("map_at_r", "mean_average_precision_at_r"), ("precision_at_1", "precision_at_1")):
        per = np.asarray(res[key], np.float64)
        value = float((per * n_q).sum() / n_q.sum())
        ci = None
        if n_boot > 0 and len(labels) > 1:
            def statistic(draw, per=per):
                w = np.bincount(draw, minlength=len(labels)) * n_q
                return float((per * w).sum() / w.sum())

            ci = bootstrap_ci(statistic, np.arange(len(labels)), n_boot=n_boot, rng=rng)
        out[name] = Estimate(value, ci, int(n_q.sum()))
    return out


def has_genuine(ids: np.ndarray) -> bool:
    return bool((np.unique(ids, return_counts=True)[1] >= 2).any())
