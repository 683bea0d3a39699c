"""``copy_detection``: is any synthetic image a (near-)copy of a training image?

Method: Carlini et al. 2023's tiled normalised L2 distance (grid of tiles,
RMS difference per tile, maximum over tiles; 0.15 on MediSyn's 512 x 512
images), found *exactly* for every synthetic image by :mod:`audit.tiled`
(no embedding can hide the true nearest training image), plus Carlini's
calibrated distance (nearest distance over ``alpha`` times the mean distance
to the ``n`` nearest).

Decision rules (setting ``rule``):

``absolute``
    flag when the nearest distance is <= ``threshold`` (0.15);
``calibrated``
    flag when the calibrated distance is < 1;
``holdout``
    flag when a synthetic image is closer to the training set than the
    ``holdout_quantile`` quantile of how close *unseen real* images
    (the holdout set) come to it -- a threshold calibrated on this data, with
    a known false-alarm rate on novel images;
``any``
    flag when any applicable rule does;
``auto`` (default)
    ``holdout`` when a holdout set is given, else ``absolute``.

Every run plants transformed training images (exact, noise, brightness and
contrast, JPEG, blur) among the queries -- never written to any output --
and checks that the rule in force catches every one; if it does not, the
check's status is ``error`` and the audit is invalid.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from synthgate.imageset import ImageSet
from synthgate.privacy import hash_id
from synthgate.progress import progress_bar

from audit.core.base import Check, CheckResult, Control, Estimate, Finding
from audit.core.controls import TRANSFORMS, plant
from audit.core.loading import SetLoader
from audit.core.stats import binomial_rate, summary
from audit.core.thresholds import holdout_threshold

from .settings import CopyDetectionSettings
from audit.core.tiled import ExactTiledSearch, SearchStats, TiledMetric, TileLayout


@dataclass
class CopyFit:
    """The real side of copy detection, computed once per audit and reused by every scoring round."""

    metric: TiledMetric
    search: ExactTiledSearch
    real_loader: SetLoader
    k: int
    rule: str
    h_dist: np.ndarray | None
    h_cal: np.ndarray | None
    tau_h: float | None
    tau_note: str | None
    control: Control | None = None
    training_duplicates: dict[str, Any] | None = None
    stats: SearchStats | None = None

    def flag_fn(self, threshold: float):
        """The decision rule in force: ``flag(nearest distance, calibrated distance) -> bool array``."""
        tau_h = self.tau_h

        def absolute(d, c):
            return d <= threshold

        def calibrated(d, c):
            return c < 1.0

        def holdout(d, c):
            return d < tau_h

        if self.rule == "any":
            active = [absolute, calibrated] + ([holdout] if tau_h is not None else [])
            return lambda d, c: np.logical_or.reduce([f(d, c) for f in active])
        return {"absolute": absolute, "calibrated": calibrated, "holdout": holdout}[self.rule]

    def thresholds(self, s: CopyDetectionSettings) -> dict:
        out = {"rule": self.rule, "threshold": s.threshold, "alpha": s.alpha, "n_neighbors": self.k, "grid": s.grid}
        if self.h_dist is not None:
            out.update({"holdout_quantile": s.holdout_quantile, "tau_holdout": self.tau_h,
                        "tau_holdout_note": self.tau_note})
        if self.rule in ("holdout", "any") and self.tau_h is not None:
            out["tau"] = self.tau_h if self.rule == "holdout" else max(self.tau_h, s.threshold)
        elif self.rule == "absolute":
            out["tau"] = s.threshold
        return out

def _components(pairs: list[tuple[int, int]]) -> list[list[int]]:
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


class CopyDetection(Check):
    name = "copy_detection"
    requires = ("real",)
    per_image = True
    method = ("Exact nearest training image under Carlini's tiled normalised L2 distance (RMS difference per tile "
              "of a grid, maximum over tiles), with Carlini's calibrated distance; decision by the policy's rule; "
              "planted near-copies as a positive control.")
    references = (
        "Carlini et al. 2023, Extracting Training Data from Diffusion Models (USENIX Security), arXiv:2301.13188",
        "MediSyn: text-guided diffusion for medical images (patch distance <= 0.15 as potential copy)",
    )
    limitations = (
        "A pixel-space distance catches copies and near-copies; it does not catch a training image reproduced "
        "after a large shift, flip, crop or rescale, nor anatomy that is copied in content but not in pixels "
        "(re-identification covers the latter).",
        "The fixed 0.15 threshold was set on natural 512x512 images; on smooth, small medical images unseen "
        "images can fall below it. The holdout rule calibrates the threshold on this data instead.",
        "The calibrated distance assumes the training set is dense around each synthetic image; in sparse "
        "regions it is less informative.",
    )

    Settings = CopyDetectionSettings

    # ------------------------------------------------------------------ helpers

    def _features(self, ctx, metric, imageset: ImageSet, what: str):
        import torch

        bs = self.settings.batch_size
        feats = []
        for _, batch in progress_bar(ctx.batches(imageset, bs), desc=f"copy: index {what}", unit="batch",
                                     enabled=ctx.progress, total=math.ceil(len(imageset) / bs)):
            feats.append(metric.features(batch))
        return torch.cat(feats)

    def _query_chunks(self, ctx, imageset: ImageSet):
        geo = ctx.geometry
        per = geo.height * geo.width * geo.channels * 4
        size = max(1, self.settings.query_chunk_mb * (1 << 20) // per)
        order = list(range(len(imageset)))
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            yield idx, np.concatenate([b for _, b in ctx.batches(imageset, self.settings.batch_size, idx)])

    def _search_set(self, ctx, search, imageset, k, what):
        """Nearest training images of every image in ``imageset``: the nearest proven exact, and the
        ``k`` nearest exact wherever the calibrated decision (< 1) depends on them."""
        idx_all, dist_all = [], []
        for idx, queries in progress_bar(self._query_chunks(ctx, imageset), desc=f"copy: search {what}",
                                         unit="chunk", enabled=ctx.progress):
            i, d = self._search(search, queries, k)
            idx_all.append(i)
            dist_all.append(d)
        return np.concatenate(idx_all), np.concatenate(dist_all)

    def _search(self, search, queries, k):
        nb = search.search(queries, k=k, exact_k=1)
        idx, dist = nb.indices.copy(), nb.distances.copy()
        # the mean over the evaluated k nearest is >= the true mean, the mean of the lower bounds <= it:
        # only where the two sides of that bracket disagree about "calibrated < 1" must the k nearest be proven
        cal = self._calibrated(dist)
        cal_hi = self._calibrated(np.concatenate([dist[:, :1], nb.lower()[:, 1:]], axis=1))
        unsure = np.nonzero((cal < 1.0) & (cal_hi >= 1.0))[0]
        if len(unsure):
            sure = search.search(queries[unsure], k=k, exact_k=k)
            idx[unsure], dist[unsure] = sure.indices, sure.distances
        return idx, dist

    def _calibrated(self, dist: np.ndarray) -> np.ndarray:
        """Carlini's calibrated distance: nearest / (alpha * mean of the n nearest, the nearest included)."""
        n = min(self.settings.n_neighbors, dist.shape[1])
        mean = dist[:, :n].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cal = dist[:, 0] / (self.settings.alpha * mean)
        return np.where(mean > 0, cal, 0.0)

    def preflight(self, ctx) -> None:
        geo = ctx.geometry
        if self.settings.grid > min(geo.height, geo.width):
            from synthgate.errors import UsageError

            raise UsageError(f"copy_detection: grid {self.settings.grid} needs images of at least "
                             f"{self.settings.grid}x{self.settings.grid} pixels, but the audit compares them at "
                             f"{geo.height}x{geo.width}; set copy_detection.grid to at most {min(geo.height, geo.width)}")

    # ---------------------------------------------------------------------- fit

    def fit(self, ctx) -> "CopyFit":
        """Everything about the real side: the training index, the holdout's distances and threshold, the
        planted-copy control and the training set's own near-duplicates."""
        s = self.settings
        real, hold = ctx.real, ctx.holdout
        geo = ctx.geometry
        layout = TileLayout(geo.height, geo.width, geo.channels, grid=s.grid, pool=s.pool)
        metric = TiledMetric(layout, ctx.torch_device)
        real_loader = SetLoader(real, geo)
        search = ExactTiledSearch(metric, self._features(ctx, metric, real, "training set"), real_loader,
                                  engine=s.engine)
        k = min(s.n_neighbors, len(real))
        h_dist = h_cal = None
        if hold is not None:
            _, h_d = self._search_set(ctx, search, hold, k, "holdout")
            h_dist, h_cal = h_d[:, 0], self._calibrated(h_d)
        rule = s.rule if s.rule != "auto" else ("holdout" if hold is not None else "absolute")
        tau_h = tau_note = None
        if h_dist is not None:
            tau_h, _, tau_note = holdout_threshold(h_dist, s.holdout_quantile)
        fit = CopyFit(metric=metric, search=search, real_loader=real_loader, k=k, rule=rule, h_dist=h_dist,
                      h_cal=h_cal, tau_h=tau_h, tau_note=tau_note)
        if rule == "holdout" and hold is None:
            return fit
        fit.control = self._control(ctx, search, real_loader, k, fit.flag_fn(s.threshold))
        thresholds = fit.thresholds(s)
        if s.training_duplicates and len(real) > 1:
            fit.training_duplicates = self._duplicates(ctx, metric, real, thresholds.get("tau", s.threshold),
                                                       "training", patients=real.has_patients)
        fit.stats = replace(search.stats)  # what the real side cost; each scoring adds its own queries
        return fit

    def fit_state(self, fit: "CopyFit") -> dict:
        """What the real side cost to compute, without live objects: training features, holdout, controls."""
        return {"features": fit.search.rf.cpu().numpy(), "k": fit.k, "rule": fit.rule, "h_dist": fit.h_dist,
                "h_cal": fit.h_cal, "tau_h": fit.tau_h, "tau_note": fit.tau_note, "control": fit.control,
                "training_duplicates": fit.training_duplicates, "stats": fit.stats}

    def from_state(self, ctx, state: dict) -> "CopyFit":
        import torch

        s, geo = self.settings, ctx.geometry
        metric = TiledMetric(TileLayout(geo.height, geo.width, geo.channels, grid=s.grid, pool=s.pool),
                             ctx.torch_device)
        real_loader = SetLoader(ctx.real, geo)
        search = ExactTiledSearch(metric, torch.from_numpy(state["features"]), real_loader, engine=s.engine)
        return CopyFit(metric=metric, search=search, real_loader=real_loader, k=state["k"], rule=state["rule"],
                       h_dist=state["h_dist"], h_cal=state["h_cal"], tau_h=state["tau_h"],
                       tau_note=state["tau_note"], control=state["control"],
                       training_duplicates=state["training_duplicates"], stats=state["stats"])

    # -------------------------------------------------------------------- score

    def score(self, ctx, fit: "CopyFit") -> CheckResult:
        s = self.settings
        real, synth, hold = ctx.real, ctx.synthetic, ctx.holdout
        geo = ctx.geometry
        rule, tau_h, h_dist, h_cal = fit.rule, fit.tau_h, fit.h_dist, fit.h_cal
        if rule == "holdout" and hold is None:
            return self.result("skipped", "rule 'holdout' needs a holdout set (--holdout); none was given")
        search = fit.search
        search.stats = replace(fit.stats)
        s_idx, s_dist = self._search_set(ctx, search, synth, fit.k, "synthetic")
        s_cal = self._calibrated(s_dist)
        flag_fn = fit.flag_fn(s.threshold)
        flagged_mask = flag_fn(s_dist[:, 0], s_cal)
        control = fit.control

        embedding = None
        if s.embedding_weights:
            embedding = self._embedding(ctx, fit.metric, fit.real_loader, s_idx[:, 0], flagged_mask, flag_fn)
        findings, rows, per_patient = self._findings(synth, real, s_idx, s_dist, s_cal, flagged_mask, rule, tau_h)
        if embedding is not None:
            for row, j in zip(rows, embedding.pop("nearest")):
                row["embedding_nearest"] = real.records[int(j)].key
        self._write_csv(ctx, rows)

        metrics = {
            "n_synthetic": len(synth), "n_real": len(real), "n_holdout": 0 if hold is None else len(hold),
            "n_flagged": int(flagged_mask.sum()),
            "flagged_fraction": binomial_rate(int(flagged_mask.sum()), len(synth)),
            "nearest_distance": summary(s_dist[:, 0]),
            "calibrated_distance": summary(s_cal),
            "absolute_rule_flags": int((s_dist[:, 0] <= s.threshold).sum()),
            "calibrated_rule_flags": int((s_cal < 1).sum()),
            "search": search.stats.to_dict(),
            "geometry": {"height": geo.height, "width": geo.width, "channels": geo.channels, "notes": list(geo.notes)},
            "most_copied_patients": per_patient[:10],
        }
        thresholds = fit.thresholds(s)
        warnings: list[str] = []
        if h_dist is not None:
            far_abs = int((h_dist <= s.threshold).sum())
            metrics["holdout"] = {
                "nearest_distance": summary(h_dist),
                "false_alarms_absolute": binomial_rate(far_abs, len(h_dist)),
                "false_alarms_calibrated": binomial_rate(int((h_cal < 1).sum()), len(h_dist)),
                "false_alarms_holdout_rule": self._cross_validated_far(h_dist, ctx),
            }
            if rule != "holdout" and far_abs / len(h_dist) > 0.05 and rule in ("absolute", "any"):
                warnings.append(f"the fixed threshold {s.threshold} flags {far_abs} of {len(h_dist)} unseen "
                                f"holdout images; its flags here are not evidence of copying (consider rule 'holdout')")

        dup: dict = {}
        dup_tau = float(thresholds.get("tau", s.threshold))
        if s.synthetic_duplicates and len(synth) > 1:
            dup["synthetic"] = self._duplicates(ctx, fit.metric, synth, dup_tau, "synthetic", patients=False)
            if dup["synthetic"]["largest_group"] >= 10:
                warnings.append(f"{dup['synthetic']['largest_group']} synthetic images are near-duplicates of each "
                                "other (Carlini's clique signal of memorisation or mode collapse)")
        if fit.training_duplicates is not None:
            dup["training"] = dict(fit.training_duplicates)
            if dup["training"].get("pairs_across_patients", 0):
                warnings.append(f"{dup['training']['pairs_across_patients']} near-duplicate training pairs belong "
                                "to different patients (a curation problem that makes memorisation likelier)")
        data = {"histograms": _histograms(s_dist[:, 0], h_dist, thresholds),
                "duplicate_examples": {k: v.pop("_examples") for k, v in dup.items()}}
        metrics["duplicates"] = dup
        if embedding is not None:
            metrics["embedding"] = embedding

        if not control.passed:
            status, reason = "error", f"positive control failed: {control.detail}; the audit is invalid"
        elif flagged_mask.any():
            status = "fail"
            reason = (f"{int(flagged_mask.sum())} of {len(synth)} synthetic images are near-copies of training images "
                      f"under rule '{rule}'")
        elif warnings:
            status, reason = "warn", "; ".join(warnings)
        else:
            status = "pass"
            reason = f"no synthetic image is a near-copy of a training image under rule '{rule}'"
        if warnings and status in ("fail", "error"):
            reason += "; also: " + "; ".join(warnings)
        return self.result(status, reason, metrics=metrics, thresholds=thresholds, flagged=tuple(findings),
                           controls=(control,), data=data)

    # -------------------------------------------------------------- pieces

    def _control(self, ctx, search, real_loader, k, flag_fn) -> Control:
        n = self.settings.control_copies
        if n <= 0:
            return Control("planted near-copies", "positive", False, "control disabled (control_copies = 0)")
        rng = ctx.rng("copy_detection.control")
        sources = rng.choice(len(ctx.real), size=min(n, len(ctx.real)), replace=False)
        transforms = [TRANSFORMS[i % len(TRANSFORMS)] for i in range(len(sources))]
        planted = np.stack([plant(real_loader.one(int(s)), t, rng) for s, t in zip(sources, transforms)])
        idx, dist = self._search(search, planted, k)
        caught = flag_fn(dist[:, 0], self._calibrated(dist))
        found_source = idx[:, 0] == sources
        missed = [f"{t} (distance {d:.4f})" for t, d, c in zip(transforms, dist[:, 0], caught) if not c]
        by_transform = {t: {"caught": int(sum(c for tt, c in zip(transforms, caught) if tt == t)),
                            "planted": transforms.count(t)} for t in dict.fromkeys(transforms)}
        detail = (f"caught {int(caught.sum())} of {len(caught)} planted near-copies"
                  + (f"; missed {', '.join(missed)}" if missed else "")
                  + f"; nearest training image was the source for {int(found_source.sum())} of {len(caught)}")
        return Control("planted near-copies", "positive", bool(caught.all()), detail,
                       {"planted": len(caught), "caught": int(caught.sum()), "by_transform": by_transform,
                        "distances": [round(float(d), 6) for d in dist[:, 0]]})

    def _findings(self, synth, real, s_idx, s_dist, s_cal, flagged, rule, tau_h):
        findings, rows = [], []
        patients = Counter()
        flagged_by_patient = Counter()
        for i, rec in enumerate(synth.records):
            r = real.records[int(s_idx[i, 0])]
            pid = hash_id(r.patient_id) if r.patient_id else ""
            if pid:
                patients[pid] += 1
                if flagged[i]:
                    flagged_by_patient[pid] += 1
            rows.append({"synthetic": rec.key, "nearest_real": r.key, "distance": f"{s_dist[i, 0]:.6f}",
                         "calibrated": f"{s_cal[i]:.6f}", "flagged": int(bool(flagged[i])), "nearest_patient": pid})
            if flagged[i]:
                why = {"absolute": f"<= threshold {self.settings.threshold}",
                       "calibrated": "calibrated distance < 1",
                       "holdout": f"< holdout-calibrated threshold {tau_h:.4f}" if tau_h is not None else "",
                       "any": "flagged by at least one rule"}[rule]
                findings.append(Finding(
                    rec.key,
                    f"tiled distance {s_dist[i, 0]:.4f} to training image {r.key} ({why}); calibrated {s_cal[i]:.3f}",
                    {"real": r.key, "distance": round(float(s_dist[i, 0]), 6), "calibrated": round(float(s_cal[i]), 6),
                     "patient": pid or None, "rule": rule},
                ))
        per_patient = [{"patient": p, "nearest_of": c, "flagged": flagged_by_patient.get(p, 0)}
                       for p, c in sorted(patients.items(), key=lambda kv: (-flagged_by_patient.get(kv[0], 0), -kv[1], kv[0]))]
        return findings, rows, per_patient

    def _embedding(self, ctx, metric, real_loader, exact_nearest, flagged, flag_fn) -> dict:
        """Embedding retrieval as extra evidence, never as a replacement for the exact search."""
        import torch

        from audit.core.embeddings import embedding_agreement

        synth_loader = SetLoader(ctx.synthetic, ctx.geometry)

        def pair_distance(si, ri):
            out = np.empty(len(si))
            for s in range(0, len(si), 256):
                a = torch.as_tensor(synth_loader(si[s:s + 256]))
                b = torch.as_tensor(real_loader(ri[s:s + 256]))
                out[s:s + 256] = metric.exact(a, b).cpu().numpy()
            return out

        emb = embedding_agreement(ctx, self.settings.embedding_weights, exact_nearest, flagged, pair_distance)
        emb_dist = emb.pop("embedding_pair_distance")
        emb_flag = flag_fn(emb_dist, np.full(len(emb_dist), np.inf))
        emb["flagged_missed_by_embedding"] = int((flagged & ~emb_flag).sum())
        emb["note"] = ("how often the embedding's nearest training image is the true nearest under the tiled "
                       "distance, and how many flagged copies a search that trusted the embedding would have missed")
        return emb

    def _write_csv(self, ctx, rows) -> None:
        path = ctx.artifact("copy_detection.csv")
        if path is None:
            return
        columns = ["synthetic", "nearest_real", "distance", "calibrated", "flagged", "nearest_patient"]
        if rows and "embedding_nearest" in rows[0]:
            columns.append("embedding_nearest")
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    def _cross_validated_far(self, h_dist: np.ndarray, ctx) -> Estimate:
        """False-alarm rate of the holdout rule on unseen images, estimated by two-fold cross-fitting."""
        n = len(h_dist)
        if n < 4:
            return Estimate(None, n=n, note="too few holdout images to estimate")
        perm = ctx.rng("copy_detection.far").permutation(n)
        halves = perm[: n // 2], perm[n // 2:]
        hits = total = 0
        for a, b in (halves, halves[::-1]):
            tau, _, _ = holdout_threshold(h_dist[a], self.settings.holdout_quantile)
            hits += int((h_dist[b] < tau).sum())
            total += len(b)
        return binomial_rate(hits, total, note="two-fold: threshold from one half, rate on the other")

    def _duplicates(self, ctx, metric, imageset: ImageSet, tau: float, what: str, patients: bool) -> dict:
        """Near-duplicate pairs (tiled distance <= ``tau``) inside one set."""
        loader = SetLoader(imageset, ctx.geometry)
        search = ExactTiledSearch(metric, self._features(ctx, metric, imageset, what), loader)
        n = len(imageset)
        queries = list(range(n))
        limit = self.settings.max_duplicate_queries
        sampled = n > limit
        if sampled:
            queries = sorted(ctx.rng(f"copy_detection.dup.{what}").choice(n, size=limit, replace=False).tolist())
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
        groups = _components(pairs)
        out = {
            "threshold": tau, "queries": len(queries), "sampled": sampled, "pairs": len(pairs),
            "images_in_pairs": len({i for p in pairs for i in p}),
            "largest_group": len(groups[0]) if groups else 0,
            "nearest_distance": summary(dist[:, 0]),
        }
        # example pairs name files: training file names can carry identifiers, so they go to ``data``
        # (audit.json, internal report), never into metrics that the shareable report prints
        out["_examples"] = [[imageset.records[a].key, imageset.records[b].key] for a, b in pairs[:10]]
        if patients:
            same = sum(1 for a, b in pairs if imageset.records[a].patient_id == imageset.records[b].patient_id)
            out["pairs_same_patient"] = same
            out["pairs_across_patients"] = len(pairs) - same
        return out


def _histograms(synthetic: np.ndarray, holdout: np.ndarray | None, thresholds: dict) -> dict:
    values = [synthetic] + ([holdout] if holdout is not None else [])
    hi = max(float(np.max(v)) for v in values)
    hi = max(hi, float(thresholds.get("threshold", 0.15))) * 1.05 or 1.0
    bins = np.linspace(0.0, hi, 41)
    out = {"edges": bins.round(6).tolist(), "synthetic": np.histogram(synthetic, bins)[0].tolist()}
    if holdout is not None:
        out["holdout"] = np.histogram(holdout, bins)[0].tolist()
    out["lines"] = {k: thresholds[k] for k in ("threshold", "tau") if thresholds.get(k) is not None}
    return out
