"""``copy_detection``: is any synthetic image a (near-)copy of a training image?

Decision rules (setting ``rule``):

``ratio`` (the default with a holdout)
    nearest training image / nearest training image outside the nearest's
    group (its patient and near-duplicates) under a pooled, mean-removed
    distance, in two tests -- the image as it is, and the image shifted by up
    to ``max_shift`` pixels and zoomed by ``zooms`` -- each with a threshold
    calibrated on the holdout at ``false_alarm_rate / 2``
    (:mod:`audit.copy_detection.ratio_rule`); every decision proven exact;
``absolute``
    Carlini et al.'s tiled distance to the nearest training image <= ``threshold`` (0.15);
``calibrated``
    Carlini's calibrated distance < 1;
``holdout``
    tiled distance below the ``holdout_quantile`` quantile of how close unseen
    real images (the holdout) come to the training set;
``any``
    flag when any rule does (``ratio`` only with a holdout);
``auto`` (default)
    ``ratio`` when a holdout is given; without one the ratio's threshold
    cannot be calibrated, so ``auto`` falls back to ``absolute`` and the
    result says so (status at least ``warn``).  Under the default policy a
    holdout is always given: membership inference requires one.

Every run plants transformed training images among the queries -- never
written to any output -- and checks that the rule in force catches every one
(:mod:`audit.copy_detection.control`); if it does not, the status is
``error`` and the audit is invalid.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from audit.core.base import Check, CheckResult, Control, Finding
from audit.core.controls import INVERTED
from audit.core.controls import plant  # noqa: F401 - re-exported: tests and callers plant through the check
from audit.core.loading import SetLoader
from audit.core.stats import binomial_rate, summary
from audit.core.thresholds import holdout_threshold  # noqa: F401 - re-exported
from synthgate.privacy import hash_id

from .control import planted_control
from .duplicates import shiftzoom_duplicates, tiled_duplicates
from .ratio_side import RatioSide, SetDecision, ratio_geometry
from .settings import TILED_RULES, CopyDetectionSettings
from .tiled_side import TiledSide

#: Changes whenever a stored fitted state would decide differently (2: the grouped second distance).
STATE_DEFINITION = 2

NO_HOLDOUT = ("no holdout set was given, so the ratio rule's threshold cannot be calibrated: rule 'auto' fell back "
              "to 'absolute' (Carlini's fixed threshold), whose false-alarm rate on unseen images is unknown and which "
              "misses shifted or rescaled copies; give --holdout for the calibrated ratio rule")


@dataclass
class CopyFit:
    """The real side of copy detection, computed once per audit and reused by every scoring round."""

    rule: str
    rule_note: str | None
    real_loader: SetLoader
    tiled: TiledSide | None = None
    ratio: RatioSide | None = None
    control: Control | None = None
    training_duplicates: dict[str, Any] | None = None

    def tiled_rules(self) -> tuple[str, ...]:
        return TILED_RULES if self.rule == "any" else ((self.rule,) if self.rule in TILED_RULES else ())


class CopyDetection(Check):
    name = "copy_detection"
    requires = ("real",)
    per_image = True
    method = ("With a holdout: the ratio of each synthetic image's distance to its nearest training image over its "
              "distance to the nearest training image of another group (another patient, not a near-duplicate), "
              "under a pooled (8 x 8 blocks), mean-removed distance, both as the "
              "image is and minimised over shifts of up to 3 px and zooms of +-5 %; thresholds calibrated on unseen "
              "holdout images at a stated false-alarm rate; every decision proven by an exact search. Without one: "
              "Carlini's tiled normalised L2 distance with its fixed threshold. Planted near-copies (shifted and "
              "rescaled ones included) as a positive control.")
    references = (
        "Carlini et al. 2023, Extracting Training Data from Diffusion Models (USENIX Security), arXiv:2301.13188",
        "MediSyn: text-guided diffusion for medical images (patch distance <= 0.15 as potential copy)",
        "Lowe 2004, Distinctive image features from scale-invariant keypoints (IJCV): the ratio test",
        "Douze et al. 2021, The 2021 Image Similarity Dataset and Challenge (DISC21), arXiv:2106.09672",
        "Pizzi et al. 2022, A Self-Supervised Descriptor for Image Copy Detection (SSCD), CVPR",
        "Angelopoulos & Bates 2021, A Gentle Introduction to Conformal Prediction, arXiv:2107.07511",
    )
    limitations = (
        "A pixel-space rule catches copies and near-copies: exact, noisy, brightness/contrast/gamma-changed, "
        "JPEG-compressed, blurred, shifted by up to max_shift pixels and rescaled within the zooms (at the analysis "
        "size). It does not catch mirror images, large crops, rotations or anatomy copied in content but not in "
        "pixels (re-identification covers the latter).",
        "The ratio rule cannot tell a copy of a near-constant training image from a novel near-constant image (no "
        "pixel rule can). Its second distance looks past the nearest training image's group (its patient and its "
        "near-duplicates within the duplicate radius), so a copy of a training image that has a sibling is still "
        "caught; a sibling farther than the radius and not known to be the same patient still counts as another "
        "image.",
        "Images are compared at the analysis size (shorter side 64 by default): detail finer than that does not "
        "count, and shifts are in analysis pixels.",
        "The false-alarm rate is known only when the holdout resolves it (at least 2 / false_alarm_rate - 1 "
        "images); with fewer, each test's threshold is the smallest holdout ratio and the rate is bounded by "
        "2 / (n + 1), as the result states.",
        "Carlini's fixed 0.15 was set on natural 512 x 512 images; on smooth, small medical images unseen "
        "images can fall below it.",
    )

    Settings = CopyDetectionSettings

    # ------------------------------------------------------------------ rules

    def _resolve(self, ctx) -> tuple[str, str | None]:
        rule = self.settings.rule
        if rule != "auto":
            return rule, None
        return ("ratio", None) if ctx.holdout is not None else ("absolute", NO_HOLDOUT)

    @staticmethod
    def _sides(rule: str, has_holdout: bool) -> tuple[bool, bool]:
        """Whether the rule needs the tiled side, the ratio side."""
        return rule in TILED_RULES or rule == "any", rule == "ratio" or (rule == "any" and has_holdout)

    def preflight(self, ctx) -> None:
        from synthgate.errors import UsageError

        geo, s = ctx.geometry, self.settings
        tiled, ratio = self._sides(self._resolve(ctx)[0], ctx.holdout is not None)
        if tiled and s.grid > min(geo.height, geo.width):
            raise UsageError(f"copy_detection: grid {s.grid} needs images of at least {s.grid}x{s.grid} pixels, but "
                             f"the audit compares them at {geo.height}x{geo.width}; set copy_detection.grid to at "
                             f"most {min(geo.height, geo.width)}")
        if ratio:
            ratio_geometry(geo.height, geo.width, s)
            if len(ctx.real) < 2:
                raise UsageError("copy_detection: the ratio rule compares each image's nearest training image with "
                                 f"the second-nearest, but the training set holds {len(ctx.real)} image; give more, "
                                 "or set copy_detection.rule=absolute")

    # ---------------------------------------------------------------------- fit

    def fit(self, ctx) -> CopyFit:
        """The real side: training features, holdout calibration, training duplicates, the planted-copy control."""
        s = self.settings
        rule, note = self._resolve(ctx)
        fit = CopyFit(rule, note, SetLoader(ctx.real, ctx.geometry))
        if rule in ("ratio", "holdout") and ctx.holdout is None:
            return fit
        use_tiled, use_ratio = self._sides(rule, ctx.holdout is not None)
        if use_tiled:
            fit.tiled = TiledSide.fit(ctx, s, fit.real_loader)
        if use_ratio:
            fit.ratio = RatioSide.fit(ctx, s)
        if s.training_duplicates and len(ctx.real) > 1:
            fit.training_duplicates = self._duplicates(ctx, fit, ctx.real, "training")
        fit.control = self._control(ctx, fit)
        if fit.tiled is not None:
            fit.tiled.stats = replace(fit.tiled.search.stats)  # what the real side cost
        return fit

    def fit_state(self, fit: CopyFit) -> dict:
        """What the real side cost to compute, without live objects: features, holdout calibration, controls."""
        return {"definition": STATE_DEFINITION, "rule": fit.rule, "rule_note": fit.rule_note, "control": fit.control,
                "training_duplicates": fit.training_duplicates,
                "tiled": None if fit.tiled is None else fit.tiled.state(),
                "ratio": None if fit.ratio is None else fit.ratio.state()}

    def from_state(self, ctx, state: dict) -> CopyFit:
        s = self.settings
        if state.get("definition") != STATE_DEFINITION:  # stored under an earlier definition of the rule: refit
            return self.fit(ctx)
        fit = CopyFit(state["rule"], state["rule_note"], SetLoader(ctx.real, ctx.geometry), control=state["control"],
                      training_duplicates=state["training_duplicates"])
        if state["tiled"] is not None:
            fit.tiled = TiledSide.from_state(ctx, s, fit.real_loader, state["tiled"])
        if state["ratio"] is not None:
            fit.ratio = RatioSide.from_state(ctx, s, state["ratio"])
        return fit

    # -------------------------------------------------------------------- score

    def score(self, ctx, fit: CopyFit) -> CheckResult:
        s = self.settings
        synth, real, hold = ctx.synthetic, ctx.real, ctx.holdout
        rule = fit.rule
        if rule in ("ratio", "holdout") and hold is None:
            return self.result("skipped", f"rule '{rule}' needs a holdout set (--holdout) to calibrate its "
                                          "threshold; none was given")
        flagged = np.zeros(len(synth), bool)
        tiled = ratio = None
        if fit.tiled is not None:
            fit.tiled.search.stats = replace(fit.tiled.stats)
            t_idx, t_dist = fit.tiled.search_set(ctx, s, synth, "synthetic")
            t_cal = fit.tiled.calibrated(s, t_dist)
            t_flag = fit.tiled.flags(s, fit.tiled_rules(), t_dist[:, 0], t_cal)
            tiled = (t_idx[:, 0], t_dist[:, 0], t_cal, t_flag)
            flagged |= t_flag
        if fit.ratio is not None:
            for search in fit.ratio.rule.searches_.values():
                search.stats = type(search.stats)(references=search.n_refs, groups=len(search.groups))
            ratio = fit.ratio.decide_set(ctx, s, synth, "synthetic")
            flagged |= ratio.flagged

        embedding = self._embedding(ctx, fit, tiled, ratio, flagged) if s.embedding_weights else None
        findings, rows, per_patient = self._findings(ctx, fit, tiled, ratio, flagged)
        if embedding is not None:
            for row, j in zip(rows, embedding.pop("nearest")):
                row["embedding_nearest"] = real.records[int(j)].key
        self._write_csv(ctx, rows)

        metrics: dict[str, Any] = {
            "n_synthetic": len(synth), "n_real": len(real), "n_holdout": 0 if hold is None else len(hold),
            "n_flagged": int(flagged.sum()), "flagged_fraction": binomial_rate(int(flagged.sum()), len(synth)),
            "rule": rule,
        }
        thresholds: dict[str, Any] = {"rule": rule}
        warnings: list[str] = [fit.rule_note] if fit.rule_note else []
        doubts: list[str] = []  # what keeps a pass from being evidence (the check is then inconclusive)
        holdout: dict[str, Any] = {}
        if tiled is not None:
            metrics.update({"nearest_distance": summary(tiled[1]), "calibrated_distance": summary(tiled[2]),
                            "absolute_rule_flags": int((tiled[1] <= s.threshold).sum()),
                            "calibrated_rule_flags": int((tiled[2] < 1).sum()),
                            "search": fit.tiled.search.stats.to_dict()})
            thresholds.update(fit.tiled.thresholds(s, rule))
            if fit.tiled.h_dist is not None:
                holdout.update(fit.tiled.holdout_metrics(ctx, s))
                far_abs = holdout["false_alarms_absolute"]
                if rule in ("absolute", "any") and far_abs.value is not None and far_abs.value > 0.05:
                    warnings.append(f"the fixed threshold {s.threshold} flags {round(far_abs.value * far_abs.n)} of "
                                    f"{far_abs.n} unseen holdout images; its flags here are not evidence of copying "
                                    "(consider rule 'ratio')")
        if ratio is not None:
            side = fit.ratio
            metrics["ratio"] = side.metrics(s, ratio) | {f"search_{n}": sr.stats.to_dict()
                                                         for n, sr in side.rule.searches_.items()}
            thresholds.update(side.thresholds(s))
            holdout["false_alarms_ratio_rule"] = side.far
            if side.note:
                warnings.append(side.note)
            for name, t in side.rule.thresholds_.items():
                if t.tau < s.min_ratio_threshold:
                    doubts.append(f"the ratio rule's {name} threshold is {t.tau:.3g} (< {s.min_ratio_threshold:g}): "
                                  "some holdout images are nearly copies of training images (a holdout that overlaps "
                                  "the training data, or holds synthetic images?), so only the closest copies can be "
                                  "caught and a pass would not be evidence; give a holdout of unseen real images")
        if holdout:
            metrics["holdout"] = holdout
        metrics["geometry"] = {"height": ctx.geometry.height, "width": ctx.geometry.width,
                               "channels": ctx.geometry.channels, "notes": list(ctx.geometry.notes)}
        metrics["most_copied_patients"] = per_patient[:10]
        if tiled is None:
            metrics["most_copied_patients_note"] = ("nearest training image as found by the ratio rule's search: "
                                                    "proven for flagged images, the best found for the others")

        dup: dict = {}
        if s.synthetic_duplicates and len(synth) > 1:
            dup["synthetic"] = self._duplicates(ctx, fit, synth, "synthetic")
            if dup["synthetic"]["largest_group"] >= 10:
                warnings.append(f"{dup['synthetic']['largest_group']} synthetic images are near-duplicates of each "
                                "other (Carlini's clique signal of memorisation or mode collapse)")
        if fit.training_duplicates is not None:
            dup["training"] = dict(fit.training_duplicates)
            if dup["training"].get("pairs_across_patients", 0):
                warnings.append(f"{dup['training']['pairs_across_patients']} near-duplicate training pairs belong "
                                "to different patients (a curation problem that makes memorisation likelier)")
        examples = {k: v.pop("_examples") for k, v in dup.items()}
        for v in dup.values():
            v.pop("_pairs", None)
            v.pop("_queried", None)
        metrics["duplicates"] = dup
        if embedding is not None:
            metrics["embedding"] = embedding
        data = {"histograms": self._histograms(fit, tiled, ratio, thresholds), "duplicate_examples": examples}
        status, reason = self._verdict(fit, flagged, warnings, len(synth), doubts)
        return self.result(status, reason, metrics=metrics, thresholds=thresholds, flagged=tuple(findings),
                           controls=(fit.control,), data=data,
                           per_image={"matched_real": _matched(tiled, ratio, len(synth)), "flagged": flagged})

    def _verdict(self, fit: CopyFit, flagged: np.ndarray, warnings: list[str], n: int,
                 doubts: list[str] = ()) -> tuple[str, str]:
        """``doubts`` (a calibration that cannot vouch for a pass) make an unflagged set ``inconclusive``, never
        a flagged one: a doubt may block a pass but never excuse a copy."""
        control = fit.control
        warnings = [*doubts, *warnings]
        if not control.passed:
            status, reason = "error", f"positive control failed: {control.detail}; the audit is invalid"
        elif flagged.any():
            status = "fail"
            reason = f"{int(flagged.sum())} of {n} synthetic images are near-copies of training images under rule " \
                     f"'{fit.rule}'"
        elif doubts:
            status, reason = "inconclusive", "; ".join(warnings)
        elif warnings:
            status, reason = "warn", "; ".join(warnings)
        else:
            status = "pass"
            reason = f"no synthetic image is a near-copy of a training image under rule '{fit.rule}'"
        if fit.ratio is not None and status in ("pass", "fail"):
            bound = min(1.0, sum(t.level for t in fit.ratio.rule.thresholds_.values()))
            reason += f" (false-alarm rate on unseen images <= {bound:.3g}"
            if not fit.ratio.resolved():
                reason += f": the holdout's {len(fit.ratio.rule.holdout_['identity'].ratio)} images cannot resolve " \
                          f"{self.settings.false_alarm_rate:g}"
            reason += ")"
        if warnings and status in ("fail", "error"):
            reason += "; also: " + "; ".join(warnings)
        return status, reason

    # -------------------------------------------------------------- pieces

    def _duplicates(self, ctx, fit: CopyFit, imageset, what: str) -> dict:
        s = self.settings
        patients = what == "training" and imageset.has_patients
        if fit.ratio is not None:
            if what == "training":  # every pair, found when the rule grouped the training set
                return shiftzoom_duplicates(ctx, s, fit.ratio, imageset, what, patients, pairs=fit.ratio.rule.pairs_)
            return shiftzoom_duplicates(ctx, s, fit.ratio, imageset, what, patients)
        tau = float(fit.tiled.thresholds(s, fit.rule).get("tau", s.threshold))
        return tiled_duplicates(ctx, s, fit.tiled.metric, imageset, tau, what, patients)

    def _control(self, ctx, fit: CopyFit) -> Control:
        s = self.settings
        side, tiled, rules = fit.ratio, fit.tiled, fit.tiled_rules()

        def tiled_catch(planted):
            idx, dist = tiled.search_queries(s, planted)
            return tiled.flags(s, rules, dist[:, 0], tiled.calibrated(s, dist)), idx[:, 0], dist[:, 0]

        if side is None:
            def catch(planted, sources):
                caught, nearest, dist = tiled_catch(planted)
                return caught, nearest, [f"distance {d:.4f}" for d in dist]

            return planted_control(ctx, s.control_copies, fit.real_loader, catch, shift_tolerant=False)

        def catch(planted, sources):
            x = side.prepare(planted)
            caught = side.decide(x).flagged.copy()
            if tiled is not None:
                caught |= tiled_catch(planted)[0]
            exact = {name: side.rule.nearest_two(x, name) for name in side.rule.searches_}
            nearest = exact[side.main][0][:, 0]
            scores = ["; ".join(f"{name} ratio {r[2][i]:.3f} (threshold {side.rule.thresholds_[name].tau:.3f})"
                                for name, r in exact.items()) for i in range(len(x))]
            return caught, nearest, scores

        duplicated = {i for p in side.rule.pairs_ for i in p}
        return planted_control(ctx, s.control_copies, fit.real_loader, catch, shift_tolerant=True,
                               content=side.rule.reference_content(), min_content=s.control_min_content,
                               duplicated=duplicated, extra=(INVERTED,) if s.inverted else ())

    def _findings(self, ctx, fit: CopyFit, tiled, ratio: SetDecision | None, flagged):
        synth, real = ctx.synthetic, ctx.real
        findings, rows = [], []
        patients, flagged_by_patient = Counter(), Counter()
        main = fit.ratio.main if fit.ratio is not None else None
        for i, rec in enumerate(synth.records):
            ev = ratio.evidence.get(i) if ratio is not None else None
            if tiled is not None:
                j = int(tiled[0][i])
            elif ev is not None:
                j = ev["real_index"]
            else:
                j = int(ratio.tests[main]["nearest"][i])
            r = real.records[j]
            pid = hash_id(r.patient_id) if r.patient_id else ""
            if pid:
                patients[pid] += 1
                flagged_by_patient[pid] += int(flagged[i])
            row = {"synthetic": rec.key, "nearest_real": r.key, "flagged": int(bool(flagged[i])),
                   "nearest_patient": pid}
            if tiled is not None:
                row |= {"distance": f"{tiled[1][i]:.6f}", "calibrated": f"{tiled[2][i]:.6f}"}
            if ratio is not None:
                row |= self._ratio_columns(fit, ratio, i, ev, tiled is None)
            rows.append(row)
            if flagged[i]:
                findings.append(self._finding(fit, rec.key, ev, tiled, i, real, pid))
        per_patient = [{"patient": p, "nearest_of": c, "flagged": flagged_by_patient.get(p, 0)}
                       for p, c in sorted(patients.items(), key=lambda kv: (-flagged_by_patient.get(kv[0], 0), -kv[1],
                                                                             kv[0]))]
        return findings, rows, per_patient

    @staticmethod
    def _ratio_columns(fit: CopyFit, ratio: SetDecision, i: int, ev: dict | None, primary: bool) -> dict:
        out = {}
        main = fit.ratio.main
        if primary:  # the ratio rule alone: its nearest is the row's nearest (proven where flagged)
            t = ratio.tests[main]
            exact = ev is not None or bool(t["d1_exact"][i])
            out["distance"] = f"{ev['distance'] if ev else t['d1'][i]:.6f}"
            out["nearest_exact"] = int(exact)
        for name, t in ratio.tests.items():
            if ev is not None:
                out[f"ratio_{name}"] = f"{ev['ratios'][name]:.6f}"
            else:  # proven lower bound: the exact ratio is at least this, so at least the threshold
                out[f"ratio_{name}"] = f">={t['ratio_low'][i]:.6f}"
        if ev is not None:
            out["ratio_test"] = ev["test"]
        return out

    def _finding(self, fit: CopyFit, key: str, ev: dict | None, tiled, i: int, real, pid: str) -> Finding:
        s = self.settings
        why, evidence = [], {"patient": pid or None, "rule": fit.rule}
        if ev is not None:
            r = real.records[ev["real_index"]]
            tr = ev["transform"]
            h, w = fit.ratio.shape
            moved = (tr["dy"], tr["dx"]) != (0, 0) or tr["zoom"] != 1.0
            how = (f"matched after a shift of ({tr['dy']}, {tr['dx']}) px and zoom {tr['zoom']:g} at {h}x{w}"
                   if moved else f"matched as it is at {h}x{w}")
            if tr.get("inverted"):
                how = f"matched with its intensities inverted at {h}x{w}"
            why.append(f"{ev['test']} ratio {ev['ratio']:.3f} < threshold {ev['threshold']:.3f}: distance "
                       f"{ev['distance']:.4f} to training image {r.key}, {ev['second_distance']:.4f} to the nearest "
                       f"training image outside its group (its patient and near-duplicates); {how}")
            evidence |= {"real": r.key, "distance": round(ev["distance"], 6),
                         "second_distance": round(ev["second_distance"], 6), "ratio": round(ev["ratio"], 6),
                         "threshold": round(ev["threshold"], 6), "test": ev["test"], "flagged_by": ev["flagged_by"],
                         "ratios": {k: round(v, 6) for k, v in ev["ratios"].items()}, "transform": tr,
                         "analysis_size": [h, w]}
        if tiled is not None:
            r = real.records[int(tiled[0][i])]
            d, c = float(tiled[1][i]), float(tiled[2][i])
            if tiled[3][i]:
                rule = {"absolute": f"<= threshold {s.threshold}", "calibrated": "calibrated distance < 1",
                        "holdout": f"< holdout-calibrated threshold {fit.tiled.tau_h or 0:.4f}",
                        "any": "flagged by at least one tiled rule"}[fit.rule]
                why.append(f"tiled distance {d:.4f} to training image {r.key} ({rule}); calibrated {c:.3f}")
            evidence.setdefault("real", r.key)
            tiled_ev = {"distance": round(d, 6), "calibrated": round(c, 6)}
            evidence |= tiled_ev if ev is None else {"tiled_" + k: v for k, v in tiled_ev.items()}
        return Finding(key, "; ".join(why), evidence)

    def _embedding(self, ctx, fit: CopyFit, tiled, ratio: SetDecision | None, flagged) -> dict:
        """Embedding retrieval as extra evidence, never as a replacement for the exact search."""
        from audit.core.embeddings import embedding_agreement

        if tiled is not None:
            pair = fit.tiled.pair_distance(SetLoader(ctx.synthetic, ctx.geometry), fit.real_loader)
            emb = embedding_agreement(ctx, self.settings.embedding_weights, tiled[0], flagged, pair)
            emb_dist = emb.pop("embedding_pair_distance")
            emb_flag = fit.tiled.flags(self.settings, fit.tiled_rules(), emb_dist, np.full(len(emb_dist), np.inf))
            emb["flagged_missed_by_embedding"] = int((flagged & ~emb_flag).sum())
            emb["note"] = ("how often the embedding's nearest training image is the true nearest under the tiled "
                           "distance, and how many flagged copies a search that trusted the embedding would have "
                           "missed")
            return emb
        nearest = ratio.tests[fit.ratio.main]["nearest"].copy()
        for i, ev in ratio.evidence.items():
            nearest[i] = ev["real_index"]
        emb = embedding_agreement(ctx, self.settings.embedding_weights, nearest, flagged,
                                  lambda si, ri: np.zeros(len(si)))
        emb.pop("embedding_pair_distance")
        emb["flagged_missed_by_embedding"] = int((flagged & (emb["nearest"] != nearest)).sum())
        emb["note"] = ("how often the embedding's nearest training image is the one the exact ratio search found "
                       "(proven for flagged images), and how many flagged copies would have been compared with "
                       "another training image by a search that trusted the embedding")
        return emb

    def _write_csv(self, ctx, rows) -> None:
        path = ctx.artifact("copy_detection.csv")
        if path is None:
            return
        columns = list(dict.fromkeys(c for row in rows for c in row))
        first = ["synthetic", "nearest_real", "distance", "nearest_exact", "calibrated"]
        columns = [c for c in first if c in columns] + [c for c in columns if c not in first]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n", restval="")
            writer.writeheader()
            writer.writerows(rows)

    @staticmethod
    def _histograms(fit: CopyFit, tiled, ratio: SetDecision | None, thresholds: dict) -> dict:
        out = {}
        if ratio is not None:
            side = fit.ratio
            bins = np.linspace(0.0, 1.5, 31)
            clip = 1.5 - 1e-9
            out["ratio rule: ratio / threshold (smallest over tests)"] = {
                "edges": bins.round(6).tolist(),
                "holdout": np.histogram(np.minimum(side.normalised(), clip), bins)[0].tolist(),
                "synthetic": np.histogram(np.minimum(side.normalised(ratio), clip), bins)[0].tolist(),
                "lines": {"threshold": 1.0},
                "xlabel": "ratio / threshold (< 1 flagged; values >= 1 are proven lower bounds, not computed)",
            }
        if tiled is not None:
            values = [tiled[1]] + ([fit.tiled.h_dist] if fit.tiled.h_dist is not None else [])
            hi = max(max(float(np.max(v)) for v in values), float(thresholds.get("threshold", 0.15))) * 1.05 or 1.0
            bins = np.linspace(0.0, hi, 41)
            spec = {"edges": bins.round(6).tolist(), "synthetic": np.histogram(tiled[1], bins)[0].tolist()}
            if fit.tiled.h_dist is not None:
                spec["holdout"] = np.histogram(fit.tiled.h_dist, bins)[0].tolist()
            spec["lines"] = {k: thresholds[k] for k in ("threshold", "tau") if thresholds.get(k) is not None}
            out["tiled distance to the nearest training image"] = spec
        return next(iter(out.values())) if len(out) == 1 else out


def _matched(tiled, ratio, n: int) -> np.ndarray:
    """Each synthetic image's nearest training image (the one a flag names; else the best found), for subgroups."""
    if tiled is not None:
        return np.asarray(tiled[0], int)
    out = np.full(n, -1, int)
    for test in ratio.tests.values():
        nearest = np.asarray(test["nearest"], int)
        out = np.where(out < 0, nearest, out)
        out = np.where(np.asarray(test["flagged"], bool), nearest, out)
    return out
