"""Carlini's tiled distance in the copy check: the exact nearest training image, the calibrated distance and the
holdout-quantile threshold (rules ``absolute``, ``calibrated``, ``holdout``).

The exact search is :class:`audit.core.tiled.ExactTiledSearch`; this module
holds what the check computes with it on the real side (training features,
the holdout's distances and threshold) and on the synthetic side.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from audit.core.base import Estimate
from audit.core.stats import binomial_rate, summary
from audit.core.thresholds import holdout_threshold
from audit.core.tiled import ExactTiledSearch, SearchStats, TiledMetric, TileLayout
from synthgate.progress import progress_bar

from .reading import query_chunks, stream_features
from .settings import CopyDetectionSettings


@dataclass
class TiledSide:
    """The real side of the tiled rules, computed once per audit."""

    metric: TiledMetric
    search: ExactTiledSearch
    k: int
    h_dist: np.ndarray | None = None
    h_cal: np.ndarray | None = None
    tau_h: float | None = None
    tau_note: str | None = None
    stats: SearchStats | None = None

    # ------------------------------------------------------------------ real side

    @staticmethod
    def _metric(ctx, s: CopyDetectionSettings) -> TiledMetric:
        geo = ctx.geometry
        return TiledMetric(TileLayout(geo.height, geo.width, geo.channels, grid=s.grid, pool=s.pool),
                           ctx.torch_device)

    @classmethod
    def fit(cls, ctx, s: CopyDetectionSettings, real_loader) -> TiledSide:
        """Index the training set; the holdout's exact nearest distances and the conformal threshold."""
        metric = cls._metric(ctx, s)
        feats = stream_features(ctx, ctx.real, metric.features, "training set", s.batch_size)
        side = cls(metric, ExactTiledSearch(metric, feats, real_loader, engine=s.engine), min(s.n_neighbors,
                                                                                            len(ctx.real)))
        if ctx.holdout is not None:
            _, h_d = side.search_set(ctx, s, ctx.holdout, "holdout")
            side.h_dist, side.h_cal = h_d[:, 0], side.calibrated(s, h_d)
            side.tau_h, _, side.tau_note = holdout_threshold(side.h_dist, s.holdout_quantile)
        side.stats = replace(side.search.stats)
        return side

    def state(self) -> dict:
        return {"features": self.search.rf.cpu().numpy(), "k": self.k, "h_dist": self.h_dist, "h_cal": self.h_cal,
                "tau_h": self.tau_h, "tau_note": self.tau_note, "stats": self.stats}

    @classmethod
    def from_state(cls, ctx, s: CopyDetectionSettings, real_loader, state: dict) -> TiledSide:
        import torch

        metric = cls._metric(ctx, s)
        search = ExactTiledSearch(metric, torch.from_numpy(state["features"]), real_loader, engine=s.engine)
        return cls(metric, search, state["k"], state["h_dist"], state["h_cal"], state["tau_h"], state["tau_note"],
                   state["stats"])

    # ------------------------------------------------------------------ searching

    def search_set(self, ctx, s: CopyDetectionSettings, imageset, what: str):
        """Nearest training images of every image in ``imageset``: the nearest proven exact, and the ``k``
        nearest exact wherever the calibrated decision (< 1) depends on them."""
        idx_all, dist_all = [], []
        for _, queries in progress_bar(query_chunks(ctx, imageset, s.query_chunk_mb, s.batch_size),
                                       desc=f"copy: search {what}", unit="chunk", enabled=ctx.progress):
            i, d = self.search_queries(s, queries)
            idx_all.append(i)
            dist_all.append(d)
        return np.concatenate(idx_all), np.concatenate(dist_all)

    def search_queries(self, s: CopyDetectionSettings, queries):
        nb = self.search.search(queries, k=self.k, exact_k=1)
        idx, dist = nb.indices.copy(), nb.distances.copy()
        # the mean over the evaluated k nearest is >= the true mean, the mean of the lower bounds <= it:
        # only where the two sides of that bracket disagree about "calibrated < 1" must the k nearest be proven
        cal = self.calibrated(s, dist)
        cal_hi = self.calibrated(s, np.concatenate([dist[:, :1], nb.lower()[:, 1:]], axis=1))
        unsure = np.nonzero((cal < 1.0) & (cal_hi >= 1.0))[0]
        if len(unsure):
            sure = self.search.search(queries[unsure], k=self.k, exact_k=self.k)
            idx[unsure], dist[unsure] = sure.indices, sure.distances
        return idx, dist

    @staticmethod
    def calibrated(s: CopyDetectionSettings, dist: np.ndarray) -> np.ndarray:
        """Carlini's calibrated distance: nearest / (alpha * mean of the n nearest, the nearest included)."""
        n = min(s.n_neighbors, dist.shape[1])
        mean = dist[:, :n].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cal = dist[:, 0] / (s.alpha * mean)
        return np.where(mean > 0, cal, 0.0)

    # ------------------------------------------------------------------ deciding

    def flags(self, s: CopyDetectionSettings, rules, dist: np.ndarray, cal: np.ndarray) -> np.ndarray:
        """Union of the named tiled rules' flags (``holdout`` only where a holdout threshold exists)."""
        out = np.zeros(len(dist), bool)
        if "absolute" in rules:
            out |= dist <= s.threshold
        if "calibrated" in rules:
            out |= cal < 1.0
        if "holdout" in rules and self.tau_h is not None:
            out |= dist < self.tau_h
        return out

    def thresholds(self, s: CopyDetectionSettings, rule: str) -> dict:
        out = {"threshold": s.threshold, "alpha": s.alpha, "n_neighbors": self.k, "grid": s.grid}
        if self.h_dist is not None:
            out.update({"holdout_quantile": s.holdout_quantile, "tau_holdout": self.tau_h,
                        "tau_holdout_note": self.tau_note})
        if rule == "holdout" and self.tau_h is not None:
            out["tau"] = self.tau_h
        elif rule == "any":
            out["tau"] = max(self.tau_h, s.threshold) if self.tau_h is not None else s.threshold
        elif rule == "absolute":
            out["tau"] = s.threshold
        return out

    def holdout_metrics(self, ctx, s: CopyDetectionSettings) -> dict:
        """How often each tiled rule flags unseen holdout images (the holdout rule's rate cross-fitted)."""
        h_dist = self.h_dist
        return {
            "nearest_distance": summary(h_dist),
            "false_alarms_absolute": binomial_rate(int((h_dist <= s.threshold).sum()), len(h_dist)),
            "false_alarms_calibrated": binomial_rate(int((self.h_cal < 1).sum()), len(h_dist)),
            "false_alarms_holdout_rule": self.cross_validated_far(ctx, s),
        }

    def cross_validated_far(self, ctx, s: CopyDetectionSettings) -> Estimate:
        """False-alarm rate of the holdout rule on unseen images, estimated by two-fold cross-fitting."""
        h_dist = self.h_dist
        n = len(h_dist)
        if n < 4:
            return Estimate(None, n=n, note="too few holdout images to estimate")
        perm = ctx.rng("copy_detection.far").permutation(n)
        halves = perm[: n // 2], perm[n // 2:]
        hits = total = 0
        for a, b in (halves, halves[::-1]):
            tau, _, _ = holdout_threshold(h_dist[a], s.holdout_quantile)
            hits += int((h_dist[b] < tau).sum())
            total += len(b)
        return binomial_rate(hits, total, note="two-fold: threshold from one half, rate on the other")

    def pair_distance(self, synth_loader, real_loader):
        """``(synthetic indices, real indices) -> tiled distances`` of those pairs (for the embedding evidence)."""
        import torch

        def pairs(si, ri):
            out = np.empty(len(si))
            for start in range(0, len(si), 256):
                a = torch.as_tensor(synth_loader(si[start:start + 256]))
                b = torch.as_tensor(real_loader(ri[start:start + 256]))
                out[start:start + 256] = self.metric.exact(a, b).cpu().numpy()
            return out

        return pairs
