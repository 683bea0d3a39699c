"""The ratio rule in the copy check: fitted on the training set and the holdout, deciding on synthetic images.

Images are compared at the *analysis size* (the shorter side area-downsampled
to ``analysis_size``, 64 by default; smaller images as they are), where
:class:`~audit.copy_detection.ratio_rule.CopyRatioRule` runs its two tests.
The real side computed here: every training image's features per test, the
holdout's ratios (exact below a proven screen), each test's conformal
threshold, the rule's false-alarm rate on the holdout estimated by two-fold
cross-fitting, and the radius of the within-set duplicate searches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audit.core.base import Estimate
from audit.core.shiftzoom import CopyLayout
from audit.core.stats import binomial_rate, summary
from synthgate.errors import UsageError
from synthgate.progress import progress_bar

from .ratio_rule import CopyRatioRule, RuleDecision, components
from .ratio_statistic import ConformalThreshold, ratio_threshold
from .reading import analysis_shape, query_chunks, set_loader, to_analysis
from .settings import CopyDetectionSettings

#: Fewest pooled blocks per side the ratio rule works with (below it an image has almost nothing to compare).
MIN_BLOCKS = 2


def ratio_geometry(height: int, width: int, s: CopyDetectionSettings) -> tuple[tuple[int, int], int]:
    """``((h, w), pooled)``: the analysis size and the blocks per side the images of this audit allow.

    The shift/zoom test compares the central region that every shift and zoom
    keeps inside the image; ``pooled`` is ``blocks`` or, on images too small
    for it, the central region's shorter side.  Refuses (``UsageError``)
    images that leave fewer than :data:`MIN_BLOCKS` pixels.
    """
    shape = analysis_shape(height, width, s.analysis_size)
    short = min(shape)
    for t in components(s.max_shift, s.zooms, s.inverted).values():
        try:
            _, ch, _, cw = CopyLayout(*shape, 1, pooled=1, transforms=t).central
        except ValueError:
            ch = cw = 0
        short = min(short, ch, cw)
    if short < MIN_BLOCKS:
        raise UsageError(f"copy_detection: images compared at {shape[0]}x{shape[1]} leave no usable central region "
                         f"for shifts of {s.max_shift} px and zooms up to {max(s.zooms)} (the ratio rule); lower "
                         f"copy_detection.max_shift or the zooms, or choose a Carlini rule (rule=absolute)")
    return shape, min(s.blocks, short)


@dataclass
class SetDecision:
    """The ratio rule's proven decision on every image of a set, and the exact evidence for the flagged ones."""

    flagged: np.ndarray
    tests: dict[str, dict[str, np.ndarray]]  # per test: flagged, ratio_low, nearest, d1, d1_exact
    evidence: dict[int, dict] = field(default_factory=dict)


@dataclass
class RatioSide:
    """The ratio rule's real side, computed once per audit."""

    rule: CopyRatioRule
    shape: tuple[int, int]
    pooled: int
    far: Estimate
    radius: ConformalThreshold
    stats: dict
    note: str | None = None  # why the training set could not be grouped

    @property
    def main(self) -> str:
        """The test whose distance the duplicate searches use (shift/zoom when there is one)."""
        return self.rule.main

    def groups(self) -> dict:
        """How the training set was grouped for the second distance (counts only: nothing that names an image)."""
        labels = self.rule.labels_
        if labels is None:
            return {"groups": None, "near_duplicate_pairs": len(self.rule.pairs_), "note": self.note}
        sizes = np.bincount(labels)
        return {"groups": int(len(sizes)), "images_in_groups_of_2_or_more": int((sizes[labels] >= 2).sum()),
                "largest_group": int(sizes.max()), "near_duplicate_pairs": len(self.rule.pairs_),
                "note": "the second distance is to the nearest training image outside the nearest's group (its "
                        "patient, joined with its near-duplicates within the duplicate radius)"}

    # ------------------------------------------------------------------ real side

    @staticmethod
    def _rule(ctx, s: CopyDetectionSettings, shape, pooled) -> CopyRatioRule:
        geo = ctx.geometry
        comps = components(s.max_shift, s.zooms, s.inverted)
        per_image = geo.channels * shape[0] * shape[1] * 4 + max(len(t.orbit_items()) for t in comps.values()) * 4 * (
            geo.channels * pooled * pooled * max(shape) // min(shape))
        chunk = int(min(4096, max(16, s.query_chunk_mb * (1 << 20) // per_image)))
        return CopyRatioRule(shape[0], shape[1], geo.channels, alpha=s.false_alarm_rate, components=comps,
                             pooled=pooled, device=ctx.torch_device, chunk=chunk)

    @classmethod
    def fit(cls, ctx, s: CopyDetectionSettings) -> RatioSide:
        """Index the training set, calibrate both tests on the holdout, cross-fit the false-alarm rate."""
        geo = ctx.geometry
        shape, pooled = ratio_geometry(geo.height, geo.width, s)
        rule = cls._rule(ctx, s, shape, pooled)
        real = set_loader(ctx, ctx.real, shape, s.batch_size)
        hold = set_loader(ctx, ctx.holdout, shape, s.batch_size)
        pairs = None
        if ctx.cluster is not None:  # decoding, features and every training-set search on the cluster's workers
            from .cluster import duplicate_pairs_on_cluster, index_on_cluster, shard_searches

            shard_searches(ctx, index_on_cluster(ctx, rule, ctx.real, shape, s.batch_size))
            pairs = duplicate_pairs_on_cluster(ctx, rule, ctx.real, shape, s.batch_size)
        else:
            rule.index(real)
        patients = [r.patient_id or "" for r in ctx.real.records] if ctx.real.has_patients else None
        rule.group(real, hold, patients, pairs=pairs)
        note = None
        if int(rule.labels_.max()) == 0:
            rule.labels_ = None
            note = (f"the {len(ctx.real)} training images form one group (one patient, or near-duplicates of each "
                    "other), so there is no other group to compare with: the ratio rule fell back to the plain "
                    "second-nearest training image, and a copy of an image that has a near-duplicate can be missed")
        n = len(ctx.holdout)
        perm = ctx.rng("copy_detection.far").permutation(n)
        halves = (perm[: n // 2], perm[n // 2:]) if n >= 4 else None
        rule.calibrate(hold, subsets=None if halves is None else [np.arange(n), *halves])
        stats = {name: search.stats.to_dict() for name, search in rule.searches_.items()}
        return cls(rule, shape, pooled, _cross_fitted(rule, halves, n), rule.radius_, stats, note)

    def state(self) -> dict:
        return {"rule": self.rule.state(), "shape": self.shape, "pooled": self.pooled, "far": self.far,
                "radius": self.radius, "stats": self.stats, "note": self.note}

    @classmethod
    def from_state(cls, ctx, s: CopyDetectionSettings, state: dict) -> RatioSide:
        rule = cls._rule(ctx, s, tuple(state["shape"]), state["pooled"]).restore(state["rule"])
        if ctx.cluster is not None:
            from .cluster import shard_searches

            shard_searches(ctx, rule)
        return cls(rule, tuple(state["shape"]), state["pooled"], state["far"], state["radius"], state["stats"],
                   state["note"])

    # ------------------------------------------------------------------ deciding

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Images at the audit geometry -> the analysis size."""
        return to_analysis(x, self.shape)

    def decide(self, x: np.ndarray) -> RuleDecision:
        """The proven decision on analysis-size images."""
        return self.rule.decide(x)

    def decide_set(self, ctx, s: CopyDetectionSettings, imageset, what: str) -> SetDecision:
        """Decide every image of ``imageset`` (streamed in chunks) and collect the flagged ones' evidence."""
        n = len(imageset)
        names = list(self.rule.searches_)
        tests = {name: {"flagged": np.zeros(n, bool), "ratio_low": np.zeros(n), "nearest": np.zeros(n, np.int64),
                        "d1": np.zeros(n), "d1_exact": np.zeros(n, bool)} for name in names}
        flagged = np.zeros(n, bool)
        evidence: dict[int, dict] = {}
        for idx, x in progress_bar(query_chunks(ctx, imageset, s.query_chunk_mb, s.batch_size),
                                   desc=f"copy: decide {what}", unit="chunk", enabled=ctx.progress):
            x = self.prepare(x)
            dec = self.decide(x)
            flagged[idx] = dec.flagged
            for name, d in dec.components.items():
                t = tests[name]
                t["flagged"][idx], t["ratio_low"][idx], t["nearest"][idx] = d.flagged, d.ratio_low, d.nearest
                t["d1"][idx], t["d1_exact"][idx] = d.d1, d.d1_exact
            hit = np.nonzero(dec.flagged)[0]
            if len(hit):
                for j, ev in zip(hit, self.evidence(x[hit])):
                    evidence[int(idx[j])] = ev
        return SetDecision(flagged, tests, evidence)

    def evidence(self, x: np.ndarray) -> list[dict]:
        """For flagged images: every test's exact nearest, nearest outside its group, and ratio, the test that
        flags most clearly (smallest ratio over its threshold), and the shift and zoom that matched its nearest
        training image."""
        per_test = {name: self.rule.nearest_two(x, name) for name in self.rule.searches_}
        out = []
        for i in range(len(x)):
            ratios = {name: float(r[2][i]) for name, r in per_test.items()}
            taus = {name: self.rule.thresholds_[name].tau for name in ratios}
            test = min(ratios, key=lambda name: ratios[name] / max(taus[name], 1e-12))
            idx, dist, _ = per_test[test]
            (zoom, dy, dx, inverted), _ = self.rule.matched(x[i], int(idx[i, 0]), test)
            out.append({"test": test, "real_index": int(idx[i, 0]), "distance": float(dist[i, 0]),
                        "second_index": int(idx[i, 1]), "second_distance": float(dist[i, 1]),
                        "ratio": ratios[test], "threshold": taus[test],
                        "ratios": ratios, "flagged_by": sorted(n for n in ratios if ratios[n] < taus[n]),
                        "transform": {"zoom": zoom, "dy": dy, "dx": dx, "inverted": inverted}})
        return out

    # ------------------------------------------------------------------ reporting

    def thresholds(self, s: CopyDetectionSettings) -> dict:
        out = {"false_alarm_rate": s.false_alarm_rate, "level_per_test": self.rule.level,
               "duplicate_radius": self.radius.tau}
        for name, t in self.rule.thresholds_.items():
            out[f"tau_{name}"] = t.tau
            out[f"tau_{name}_note"] = t.note
        return out

    def resolved(self) -> bool:
        return all(t.resolved for t in self.rule.thresholds_.values())

    def metrics(self, s: CopyDetectionSettings, decision: SetDecision | None = None) -> dict:
        """The rule's thresholds, its cross-fitted false-alarm rate on the holdout, its geometry and search cost.

        Keyed by quantity, then by test (``identity``, ``shift_zoom``), so the
        report prints one row per test and quantity.
        """
        th, h = self.rule.thresholds_, self.rule.holdout_
        out = {
            "false_alarm_rate": s.false_alarm_rate,
            "false_alarm_bound": round(min(1.0, sum(t.level for t in th.values())), 6),
            "holdout_false_alarms": self.far,
            "threshold": {n: t.tau for n, t in th.items()},
            "threshold_note": {n: t.note for n, t in th.items()},
            "holdout_ratio_below_screen": {n: summary(v.ratio[v.exact]) for n, v in h.items()},
            "transforms": {n: _describe(self.rule.layouts[n]) for n in th},
            "analysis": {"height": self.shape[0], "width": self.shape[1], "pooled": self.pooled,
                         "block_pixels": round(self.rule.layouts[self.main].block_pixels, 3)},
            "duplicate_radius": {"value": self.radius.tau, "note": "nearest-training distance of the holdout, "
                                 + self.radius.note},
            "training_groups": self.groups(),
        }
        if decision is not None:
            out["flagged_by_test"] = {n: int(t["flagged"].sum()) for n, t in decision.tests.items()}
        out |= {f"search_fit_{n}": st for n, st in self.stats.items()}
        return out

    def normalised(self, decision: SetDecision | None = None) -> np.ndarray:
        """Per image, the smallest ratio over its threshold across tests (< 1: flagged; lower bounds where
        only a bound is known); with no ``decision``, the holdout's."""
        vals = []
        for name, t in self.rule.thresholds_.items():
            r = self.rule.holdout_[name].ratio if decision is None else decision.tests[name]["ratio_low"]
            vals.append(r / max(t.tau, 1e-12))
        return np.min(vals, axis=0)


def _describe(layout) -> str:
    tr = layout.transforms
    _, h, _, w = layout.central
    if tr.max_shift == 0 and set(tr.scales) == {1.0}:
        return f"the image as it is{' and with its intensities inverted' if tr.invert else ''} ({h}x{w})"
    return (f"shifts up to {tr.max_shift} px and zooms {', '.join(f'{z:g}' for z in tr.scales)} of the central "
            f"{h}x{w} region ({len(tr.items())} transforms)")


def _cross_fitted(rule: CopyRatioRule, halves, n: int) -> Estimate:
    """The rule's false-alarm rate on unseen images: each test's threshold from one half of the holdout, the
    union's flags counted on the other half, and the other way round.

    Exact: :meth:`CopyRatioRule.calibrate` widened its screen until each
    half holds its own ``k`` exact ratios, so each half's threshold is below
    the screen, and every ratio below the screen is exact.
    """
    if halves is None:
        return Estimate(None, n=n, note="too few holdout images to estimate")
    hits = total = 0
    for a, b in (halves, halves[::-1]):
        flag_b = np.zeros(len(b), bool)
        for h in rule.holdout_.values():
            flag_b |= h.ratio[b] < ratio_threshold(h.ratio[a], rule.level).tau
        hits += int(flag_b.sum())
        total += len(b)
    return binomial_rate(hits, total, note="two-fold: thresholds from one half, rate on the other (a rule "
                                          "calibrated on half the holdout: its rate bounds the full rule's)")
