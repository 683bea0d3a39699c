"""Near-duplicates inside one set: Carlini's clique signal (synthetic) and a curation problem (training).

Two images are near-duplicates when their distance is at most a stated
radius: under the tiled rules, Carlini's tiled distance and the rule's
threshold; under the ratio rule, the shift/zoom distance and the radius
:class:`~audit.copy_detection.ratio_side.RatioSide` calibrated on the
holdout (the ``false_alarm_rate`` quantile of unseen images' nearest
training distances: a pair is closer than all but that share of unseen real
images come to any training image).  Both searches are exact radius
searches that leave each image itself out.
"""
from __future__ import annotations

import numpy as np

from audit.core.loading import SetLoader
from audit.core.shiftzoom_search import ExactCopySearch
from audit.core.stats import summary
from audit.core.tiled import ExactTiledSearch
from synthgate.imageset import ImageSet

from .reading import set_loader, stream_features
from .settings import CopyDetectionSettings


def components(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected groups of images joined by near-duplicate pairs, largest first."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in list(parent):
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=len, reverse=True)


def _queries(ctx, s: CopyDetectionSettings, n: int, what: str) -> tuple[list[int], bool]:
    limit = s.max_duplicate_queries
    if n <= limit:
        return list(range(n)), False
    return sorted(ctx.rng(f"copy_detection.dup.{what}").choice(n, size=limit, replace=False).tolist()), True


def _summary(imageset: ImageSet, pairs, queries, sampled: bool, radius: float, distance: str,
             patients: bool) -> dict:
    groups = components(pairs)
    out = {
        "threshold": radius, "distance": distance, "queries": len(queries), "sampled": sampled, "pairs": len(pairs),
        "images_in_pairs": len({i for p in pairs for i in p}),
        "largest_group": len(groups[0]) if groups else 0,
    }
    # example pairs name files: training file names can carry identifiers, so they go to ``data``
    # (audit.json, internal report), never into metrics that the shareable report prints
    out["_examples"] = [[imageset.records[a].key, imageset.records[b].key] for a, b in pairs[:10]]
    if patients:
        same = sum(1 for a, b in pairs if imageset.records[a].patient_id == imageset.records[b].patient_id)
        out["pairs_same_patient"] = same
        out["pairs_across_patients"] = len(pairs) - same
    out["_pairs"] = pairs  # for the control's choice of sources; never reported
    out["_queried"] = queries if sampled else None
    return out


def tiled_duplicates(ctx, s: CopyDetectionSettings, metric, imageset: ImageSet, tau: float, what: str,
                     patients: bool) -> dict:
    """Near-duplicate pairs (tiled distance <= ``tau``) inside one set."""
    loader = SetLoader(imageset, ctx.geometry)
    search = ExactTiledSearch(metric, stream_features(ctx, imageset, metric.features, what, s.batch_size), loader)
    n = len(imageset)
    queries, sampled = _queries(ctx, s, n, what)
    idx, dist = [], []
    for start in range(0, len(queries), 1024):
        q = queries[start:start + 1024]
        # enough neighbours that a clique of Carlini's size (10) is joined in full
        i, d = search.search(loader(q), k=min(16, n - 1), exclude=q, exact_k=1, radius=tau)
        idx.append(i)
        dist.append(d)
    idx, dist = np.concatenate(idx), np.concatenate(dist)
    pairs = sorted({tuple(sorted((q, int(idx[j, m])))) for j, q in enumerate(queries)
                    for m in range(idx.shape[1]) if dist[j, m] <= tau})
    out = _summary(imageset, pairs, queries, sampled, tau, "tiled", patients)
    out["nearest_distance"] = summary(dist[:, 0])
    return out


def shiftzoom_duplicates(ctx, s: CopyDetectionSettings, side, imageset: ImageSet, what: str, patients: bool,
                         search: ExactCopySearch | None = None, pairs: list[tuple[int, int]] | None = None) -> dict:
    """Near-duplicate pairs (shift/zoom distance <= the ratio rule's duplicate radius) inside one set.

    ``search`` is the set's own index when one exists (the training set's);
    else the set is indexed here.  Every pair within the radius is found
    (:meth:`ExactCopySearch.within`, each image excluding itself).  ``pairs``
    already found over the whole set (the training set's, which the ratio
    rule groups by) are summarised as they are.
    """
    name = side.main
    radius = float(side.radius.tau)
    if pairs is not None:
        n = len(imageset)
        return _summary(imageset, list(pairs), list(range(n)), False, radius, f"shift/zoom ({name})", patients)
    metric = side.rule.metrics[name]
    n, load = set_loader(ctx, imageset, side.shape, s.batch_size)
    if search is None:
        import torch

        feats = [metric.features(load(np.arange(a, min(a + 1024, n)))) for a in range(0, n, 1024)]
        search = ExactCopySearch(metric, torch.cat(feats), shift_group=side.rule.shift_group)
    queries, sampled = _queries(ctx, s, n, what)
    pairs = set()
    for start in range(0, len(queries), 1024):
        q = queries[start:start + 1024]
        for qi, kn in zip(q, search.within(load(q), radius=radius, exclude=q)):
            pairs.update(tuple(sorted((qi, j))) for j, d in kn.as_dict().items() if d <= radius)
    return _summary(imageset, sorted(pairs), queries, sampled, radius, f"shift/zoom ({name})", patients)
