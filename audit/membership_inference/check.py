"""``membership_inference``: can an attacker tell who was in the training set?

Members are training images (the real set), non-members are holdout images
(real, same population, never trained on).  A balanced, seeded sample of
each is attacked in two release scenarios:

1. only the synthetic images are released -- distance to the closest
   synthetic image in pixel space (``dcr_pixel``, exact) and in a feature
   space (``dcr_embedding``), and DOMIAS' density ratio ``p_synthetic /
   p_reference`` (``domias``).  "The DCR Delusion" (2025) shows distance
   tests alone under-state risk, so the strongest attack decides;
2. the model is released (``--model``) -- Carlini et al.'s loss at chosen
   timesteps (``loss_tN``), PIA (``pia_tN``) and SecMI (``secmi_tN``).  PIA
   and SecMI also run in the reverse direction (``*_rev``): on small
   overfit models their statistic separates members the other way round
   (measured on this project's control models), and an attacker who
   calibrates on a shadow model would use whichever direction works.

Reference data for DOMIAS.  The holdout is split in two folds by patient
(every image its own group when there are no patient IDs); a member or
non-member of fold k is scored against the reference density of the *other*
fold.  So no image is ever scored against a reference that contains it or
another image of its patient, and every holdout image serves both as a
non-member and as reference (cross-fitting).

Statistics (Carlini et al. 2022, "first principles"): ROC AUC and TPR at 1%
and 0.1% FPR with stratified bootstrap intervals; a TPR at an FPR that the
number of non-members cannot resolve (fewer than ``1 / fpr``) is reported as
not resolvable, with the count needed.

Deciding with k attacks (multiple comparisons).  The best of k attacks on
the same data is optimistic.  The check therefore

- *fails* only on evidence that survives the selection: the attack chosen on
  a random half of the data (by how far it goes beyond the limits) exceeds a
  limit on the other half, or some attack's simultaneous (Bonferroni,
  ``alpha / k``) lower bound exceeds a limit on the whole sample.  Such
  evidence fails the check whatever the controls say: controls are
  asymmetric, they may block a pass but never excuse a leak;
- *passes* only when every attack's point estimate is within the limits on
  the whole sample (the optimistic maximum, so the pass is conservative),
  or, with ``judge: interval``, every simultaneous upper bound is -- and
  only when the positive controls caught their planted leaks, the negative
  control holds and the null control shows the sample can resolve a leak at
  the AUC limit;
- is *inconclusive* in between (an attack beyond a limit that the held-out
  half does not confirm), when the sample cannot resolve the limits (the
  null control; or a TPR limit at an FPR the non-members cannot resolve
  with no AUC limit to decide on -- with one, the AUC decides and the
  result says what the low-FPR figure would need), or when a negative
  control fails.

Controls: planted near-copies of half the members in an in-memory copy of
the synthetic set must make the pixel DCR attack fail the policy (scenario 1);
a tiny model overfit on a handful of real images must be caught by the model
attacks (scenario 2; at least one family -- a family that cannot is reported
as not validated); chance, measured by relabelling whole patients member /
non-member at random, must stay below the AUC limit (null control: valid for
patient-grouped data, and "cannot resolve" when the sample is too small);
and an attack with no access to the
synthetic data or the model must not separate members from non-members
(holdout exchangeability: otherwise the holdout is not from the training
population and every attack's AUC mixes leakage with that shift).
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthgate.errors import InputError
from synthgate.imageset import Geometry, ImageSet
from synthgate.privacy import hash_id
from synthgate.progress import progress_bar

from audit.core.base import Check, CheckResult, Control, Estimate
from audit.core.stats import roc_points

from .controls import exchangeability_control, model_control, null_control, planted_control
from .design import Sample, make_sample, shared_patients
from .settings import MembershipInferenceSettings
from .statistics import FPRS, Evidence, exceeded, pct, roc_metrics, score_histogram, strength


@dataclass
class AttackRun:
    """Scores of every attack that ran, what did not run and why, and numbers for the report."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)
    scenario: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, scenario: int, scores: np.ndarray) -> None:
        self.scores[name] = np.asarray(scores, np.float64)
        self.scenario[name] = scenario


# ------------------------------------------------------------------ the check


class MembershipInference(Check):
    name = "membership_inference"
    requires = ("real", "holdout")
    per_image = False
    method = ("Balanced, seeded samples of training images (members) and holdout images (non-members). Scenario 1, "
              "synthetic images released: distance to the closest synthetic image in pixel space (exact) and in a "
              "feature space, and DOMIAS' density ratio against a patient-disjoint, cross-fitted reference. "
              "Scenario 2, model released: loss at chosen timesteps, PIA and SecMI. ROC AUC and TPR at 1% / 0.1% "
              "FPR with stratified bootstrap intervals; the deciding attack is chosen on one half of the data and "
              "measured on the other, and simultaneous (Bonferroni) intervals cover the comparison of k attacks.")
    references = (
        "Carlini et al. 2022, Membership Inference Attacks From First Principles (IEEE S&P): TPR at low FPR, "
        "log-log ROC",
        "Carlini et al. 2023, Extracting Training Data from Diffusion Models (USENIX Security): loss-threshold "
        "attack on diffusion models",
        "Kong et al. 2024, An Efficient Membership Inference Attack for the Diffusion Model by Proximal "
        "Initialization (PIA, ICLR)",
        "Duan et al. 2023, Are Diffusion Models Vulnerable to Membership Inference Attacks? (SecMI, ICML)",
        "van Breugel et al. 2023, Membership Inference Attacks against Synthetic Data through Overfitting "
        "Detection (DOMIAS, AISTATS)",
        "The DCR Delusion (2025): distance-to-closest-record tests under-state membership risk",
    )
    limitations = (
        "An attack that fails here bounds only these attacks: stronger ones (LiRA with shadow models, attacks with "
        "more queries) may do better, so a pass is evidence, not proof, of privacy.",
        "Non-members must come from the training population; the holdout-exchangeability control detects a shift "
        "it can see, not every shift.",
        "Membership is measured per image; several images of one patient can leak a patient that no single image "
        "gives away (re-identification covers patients).",
        "The model-attack control is a tiny pixel-space model at a small resolution; it validates the attack code, "
        "not the sensitivity to the audited model's size, resolution or VAE.",
    )

    Settings = MembershipInferenceSettings

    @property
    def limits(self) -> dict:
        s = self.settings
        return {"auc": s.max_auc, 0.01: s.max_tpr_at_1pct_fpr, 0.001: s.max_tpr_at_0_1pct_fpr}


    # ---------------------------------------------------------------- scenario 1

    def _encoder(self, ctx):
        if self.settings.embedding_weights:
            from audit.core.embeddings import ImageEncoder

            enc = ImageEncoder(self.settings.embedding_weights, ctx.torch_device)
            enc.name = f"open_clip:{enc.name}"
            return enc
        from .synthetic_attacks import RandomConvFeatures

        return RandomConvFeatures(ctx.geometry.channels, ctx.torch_generator("membership_inference.embedding"),
                                  ctx.torch_device)

    def _stream(self, ctx, imageset: ImageSet, indices, what: str):
        bs = self.settings.batch_size
        idx = list(range(len(imageset))) if indices is None else [int(i) for i in indices]
        return progress_bar(ctx.batches(imageset, bs, idx), desc=f"membership: {what}", unit="batch",
                            enabled=ctx.progress, total=math.ceil(len(idx) / bs))

    def _planted(self, ctx, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Near-copies of a random ``control_fraction`` of the members (in memory only) and which members."""
        from audit.core.controls import TRANSFORMS, plant
        from audit.core.loading import SetLoader

        rng = ctx.rng("membership_inference.plant")
        k = max(1, int(round(self.settings.control_fraction * sample.n)))
        chosen = np.sort(rng.choice(sample.n, size=k, replace=False))
        loader = SetLoader(ctx.real, ctx.geometry)
        kinds = [t for t in TRANSFORMS if t != "exact"]  # an exact copy would be too easy a control
        planted = np.stack([plant(loader.one(int(sample.members[i])), kinds[j % len(kinds)], rng)
                            for j, i in enumerate(chosen)])
        return planted, chosen

    def _eval_chunks(self, ctx, sample: Sample):
        """The evaluated images (members, then non-members) in chunks of at most ``query_chunk_mb``."""
        geo = ctx.geometry
        per = geo.height * geo.width * geo.channels * 4
        size = max(1, self.settings.query_chunk_mb * (1 << 20) // per)
        items = [(ctx.real, int(i)) for i in sample.members] + [(ctx.holdout, int(i)) for i in sample.nonmembers]
        bs = self.settings.batch_size
        for start in progress_bar(range(0, len(items), size), desc="membership: evaluated images", unit="chunk",
                                  enabled=ctx.progress):
            chunk = items[start:start + size]
            parts = []
            for set_ in (ctx.real, ctx.holdout):
                idx = [i for s_, i in chunk if s_ is set_]
                parts += [b for _, b in ctx.batches(set_, bs, idx)] if idx else []
            yield start, np.concatenate(parts)

    def _pixel_dcr(self, ctx, sample: Sample, planted: np.ndarray, encoder):
        """Distance of every evaluated image to its closest synthetic image and to the closest planted copy,
        and the members' embeddings (computed while their pixels are loaded)."""
        from audit.core.loading import SetLoader
        from .synthetic_attacks import nearest_rms
        from audit.core.tiled import ExactTiledSearch, TiledMetric, TileLayout

        s, geo, dev = self.settings, ctx.geometry, ctx.torch_device
        grid = s.dcr_grid
        bs = s.batch_size
        if grid > 1:  # Carlini's tiled metric: the exact pruned search of copy_detection
            metric = TiledMetric(TileLayout(geo.height, geo.width, geo.channels, grid=grid), dev)
            import torch

            feats = torch.cat([metric.features(b) for _, b in self._stream(ctx, ctx.synthetic, None, "synthetic")])
            search = ExactTiledSearch(metric, feats, SetLoader(ctx.synthetic, geo))
            plant_search = ExactTiledSearch(metric, metric.features(planted), lambda idx: planted[idx])

            def to_synthetic(x):
                return search.search(x, k=1).distances[:, 0]

            def to_planted(x):
                return plant_search.search(x, k=1).distances[:, 0]
        else:
            def to_synthetic(x):
                return nearest_rms(x, (b for _, b in ctx.batches(ctx.synthetic, max(bs, 256))), dev)

            def to_planted(x):
                return nearest_rms(x, [planted], dev)

        d_syn, d_plant, m_emb = [], [], []
        for start, x in self._eval_chunks(ctx, sample):
            d_syn.append(to_synthetic(x))
            d_plant.append(to_planted(x))
            members = x[: max(0, min(len(x), sample.n - start))]
            m_emb += [encoder(members[s:s + bs]) for s in range(0, len(members), bs)]
        return np.concatenate(d_syn), np.concatenate(d_plant), m_emb

    def _scenario1(self, ctx, sample: Sample, run: AttackRun, planted: np.ndarray) -> dict:
        """Scores of the synthetic-set attacks, on the real synthetic set and with the planted copies added."""
        from .registry import create_attacks
        from .synthetic_attacks import EmbeddingDCR, PixelDCR, SyntheticView, nearest_distance

        s = self.settings
        encoder = self._encoder(ctx)
        # embeddings are needed even without embedding attacks: the exchangeability control uses them
        s_emb = np.concatenate([encoder(b) for _, b in self._stream(ctx, ctx.synthetic, None, "synthetic")])
        p_emb = encoder(planted)
        # every holdout image is embedded once: non-members are among them, and each fold is the other's reference
        h_emb = np.concatenate([encoder(b) for _, b in self._stream(ctx, ctx.holdout, None, "holdout")])
        refs = (h_emb[sample.holdout_fold == 0], h_emb[sample.holdout_fold == 1])
        d_pix, d_plant, m_emb = self._pixel_dcr(ctx, sample, planted, encoder)
        q_emb = np.concatenate([*m_emb, h_emb[sample.nonmembers]])
        view = SyntheticView(q_emb, s_emb, p_emb, refs, sample.fold, d_pix, d_plant)
        # the planted-copy control always measures the two distance attacks
        planted_scores = {**PixelDCR(s).planted_scores(view), **EmbeddingDCR(s).planted_scores(view)}
        for attack in create_attacks(s.synthetic_attacks, s, scenario=1):
            try:
                scores, planted_ = attack.scores(view), attack.planted_scores(view)
            except ValueError as exc:
                run.skipped[attack.name] = str(exc)
                continue
            for name, sc in scores.items():
                run.add(name, 1, sc)
            planted_scores.update(planted_)
        # an attack that sees neither the synthetic data nor the model: distance to the (other-fold) reference
        exch = np.empty(len(q_emb))
        for f in (0, 1):
            rows = sample.fold == f
            exch[rows] = -nearest_distance(q_emb[rows], refs[1 - f]) if len(refs[1 - f]) else 0.0
        run.info["scenario_1"] = {
            "n_synthetic": len(ctx.synthetic), "embedding": encoder.name, "dcr_grid": s.dcr_grid,
            "density_dims": s.density_dims, "reference_per_fold": [len(r) for r in refs],
        }
        run.info["exchangeability_scores"] = exch
        return planted_scores

    # ---------------------------------------------------------------- scenario 2

    def _model_geometry(self, ctx) -> Geometry | None:
        """Check up front (cheap) that the model can be attacked with these images; ``None`` when not run."""
        if ctx.model is None or not self.settings.run_model_attacks or not self.settings.model_attacks:
            return None
        from generators.loading import read_info

        info = read_info(ctx.model)
        res, chans = int(info["resolution"]), int(info["image_channels"])
        geo = Geometry(res, res, chans)
        if (info.get("conditioning") or {}).get("type") == "class":
            for set_ in (ctx.real, ctx.holdout):
                if not set_.has_labels:
                    raise InputError("the model is class-conditional but images of this set have no label "
                                     "(metadata.csv label or class folders); the model attacks need each image's label",
                                     set_.root)
        if (info.get("conditioning") or {}).get("type") == "attributes":
            names = [c["name"] for c in info["conditioning"]["columns"]]
            for set_ in (ctx.real, ctx.holdout):
                for r in set_.records:
                    values = r.values()
                    gap = next((n for n in names if not values.get(n)), None)
                    if gap is not None:
                        raise InputError(f"the model is conditioned on {', '.join(names)} but {r.key} has no "
                                         f"{gap!r} in metadata.csv; the model attacks need each image's attributes",
                                         set_.root)
        if self._preprocessing(ctx, info, res) is not None:
            return geo
        for set_ in (ctx.real, ctx.holdout):
            bad = next((r for r in set_.records if (r.height, r.width, r.channels) != (res, res, chans)), None)
            if bad is not None:
                raise InputError(
                    f"the model was trained on {chans}x{res}x{res} images but {set_.root.name}/{bad.key} is "
                    f"{bad.channels}x{bad.height}x{bad.width}, and the model's record (synthgate.json training_set."
                    "resized) does not say its trainer resized images; the model attacks need the images as the "
                    "model saw them (set membership_inference.resize_for_model=true if its trainer resized them "
                    "with an antialiased bilinear resize)", ctx.model)
        return geo

    def _preprocessing(self, ctx, info: dict, res: int) -> str | None:
        """How the audited images are brought to the model's input, when that differs from "as they are".

        synthgate's trainer records in ``synthgate.json`` (``training_set.resized``) that it resized the training
        images, with the antialiased bilinear resize the audit uses too: then the attacks apply the same by
        default.  ``resize_for_model`` asserts it for a model without that record.
        """
        sizes = {(r.height, r.width) for set_ in (ctx.real, ctx.holdout) for r in set_.records}
        if sizes <= {(res, res)}:
            return None
        recorded = (info.get("training_set") or {}).get("resized")
        if recorded:
            return (f"images resized to {res}x{res} (antialiased bilinear) as the model's trainer recorded "
                    f"({'; '.join(recorded)})")
        if self.settings.resize_for_model:
            return f"images resized to {res}x{res} (antialiased bilinear): resize_for_model set by the policy"
        return None

    def _model_attacks(self):
        from .registry import create_attacks

        return create_attacks(self.settings.model_attacks, self.settings, scenario=2)

    def _check_timesteps(self, model) -> None:
        total = model.num_train_timesteps
        for attack in self._model_attacks():
            bad = [t for t in attack.timesteps() if t >= total]
            if bad:
                raise InputError(f"timestep {bad[0]} is outside the model's {total}-step schedule "
                                 f"(membership_inference.{attack.timestep_setting}, attack {attack.name!r})",
                                 model.path)

    def _model_scores(self, ctx, model, images: list[tuple[ImageSet, np.ndarray]], geo: Geometry, what: str,
                      purpose: str, clock: dict | None = None) -> dict[str, np.ndarray]:
        """Run the model attacks on images from ``(set, indices)`` pairs; returns ``{attack: scores}``."""
        from .model_attacks import auto_batch_rows

        s = self.settings
        bs = s.batch_size
        gen = ctx.torch_generator(f"membership_inference.{purpose}.noise")
        parts: dict[str, list] = {}
        for set_, idx in images:
            labels = [set_.records[int(i)].label for i in idx]
            if model.labels is not None and any(v is None for v in labels):
                raise InputError("the model is class-conditional but some images of this set have no label "
                                 "(metadata.csv label or class folders)", set_.root)
            for chunk, batch in progress_bar(set_.iter_batches(bs, geo, [int(i) for i in idx]),
                                             desc=f"membership: {what}", unit="batch", enabled=ctx.progress,
                                             total=math.ceil(len(idx) / bs)):
                x0 = model.to_model_space(batch)
                cl = model.condition_records([set_.records[i] for i in chunk])
                rows = (auto_batch_rows(x0.device, x0[0].numel()) if s.model_batch_rows == "auto"
                        else s.model_batch_rows)
                for name, scores in self._attack_batch(model, x0, cl, gen, rows, clock).items():
                    parts.setdefault(name, []).append(scores)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _attack_batch(self, model, x0, cl, gen, rows, clock: dict | None = None) -> dict[str, np.ndarray]:
        """Every selected attack on one batch; ``clock`` (attack -> seconds) accumulates their wall time."""
        out: dict[str, np.ndarray] = {}
        for attack in self._model_attacks():
            start = time.perf_counter()
            out.update(attack.batch_scores(model, x0, cl, gen, rows))
            if clock is not None:
                clock[attack.name] = clock.get(attack.name, 0.0) + time.perf_counter() - start
        return out

    def _scenario2(self, ctx, sample: Sample, run: AttackRun, geo: Geometry):
        from generators.loading import load_model, read_info

        model = load_model(ctx.model, ctx.torch_device)
        self._check_timesteps(model)
        clock: dict[str, float] = {}
        scores = self._model_scores(ctx, model, [(ctx.real, sample.members), (ctx.holdout, sample.nonmembers)], geo,
                                    "model attacks", "model", clock)
        for name, s in scores.items():
            run.add(name, 2, s)
        run.info["scenario_2"] = {
            "model": str(ctx.model), "resolution": model.resolution, "image_channels": model.image_channels,
            "latent": model.latent, "num_train_timesteps": model.num_train_timesteps,
            "prediction_type": model.prediction_type, "conditional": model.labels is not None,
            "forward_passes_per_image": self._passes_per_image(),
            "seconds": {"per_image": {k: round(v / max(2 * sample.n, 1), 6) for k, v in clock.items()},
                        "note": "wall time of each attack per evaluated image on this machine"},
            "preprocessing": (self._preprocessing(ctx, read_info(ctx.model), model.resolution)
                              or "images as they are (the model's input size)"),
        }
        return model

    def _passes_per_image(self) -> dict:
        return {a.name: a.passes_per_image() for a in self._model_attacks()}

    # ---------------------------------------------------------------- controls

    # ---------------------------------------------------------------- run

    def preflight(self, ctx) -> None:
        self._model_geometry(ctx)  # bad model inputs fail now, before any check does work

    def score(self, ctx, fitted) -> CheckResult:
        """Set-level: runs once on the final synthetic set, so nothing is fitted ahead (``fitted`` is ``None``)."""
        s = self.settings
        model_geo = self._model_geometry(ctx)
        sample = make_sample(ctx.real, ctx.holdout, self.settings.n_samples, ctx.rng("membership_inference.sample"))
        if sample.n < 4:
            return self.result("inconclusive", f"only {sample.n} member/non-member pairs can be drawn (training set "
                               f"{len(ctx.real)}, holdout {len(ctx.holdout)} images); at least 4 are needed")
        run = AttackRun()
        controls: list[Control] = []
        planted, chosen = self._planted(ctx, sample)
        planted_scores = self._scenario1(ctx, sample, run, planted)
        del planted
        controls.append(planted_control(ctx, self.settings, self.limits, sample, planted_scores, chosen))
        if model_geo is not None:
            model = self._scenario2(ctx, sample, run, model_geo)
            if s.control_model:
                controls.append(model_control(ctx, self.settings, self.limits, model, self._model_scores))
        controls.append(null_control(ctx, self.settings, self.limits, sample, run.scores))
        controls.append(exchangeability_control(ctx, self.settings, sample, run.info.pop("exchangeability_scores")))
        return self._decide(ctx, sample, run, controls)

    def _scenario2_note(self, ctx) -> str:
        if ctx.model is None:
            return "scenario 2 (model released) was not run: no model was given (--model)"
        if not self.settings.run_model_attacks or not self.settings.model_attacks:
            return "scenario 2 (model released) was not run: model attacks are switched off by the policy"
        return ""

    def _evaluate(self, ctx, sample: Sample, run: AttackRun) -> "Evidence":
        """Every attack on the whole sample, and the attack chosen on one half measured on the other."""
        s, limits, y = self.settings, self.limits, sample.labels
        names = list(run.scores)
        k = len(names)
        n_boot, alpha = s.n_boot, s.alpha
        full = {n: roc_metrics(run.scores[n], y, k=k, alpha=alpha, n_boot=n_boot, groups=sample.groups,
                               rng=ctx.rng(f"membership_inference.full.{n}")) for n in names}
        sel, ev = sample.select, ~sample.select
        chosen = max(names, key=lambda n: (strength(run.scores[n][sel], y[sel], limits), -names.index(n)))
        held = roc_metrics(run.scores[chosen][ev], y[ev], n_boot=n_boot, alpha=alpha, groups=sample.groups[ev],
                           rng=ctx.rng("membership_inference.heldout"))
        return Evidence(
            full=full, chosen=chosen, held=held,
            confirmed=exceeded(held, limits, above_chance=True),
            significant={n: w for n, m in full.items() if (w := exceeded(m, limits, "lower"))},
            beyond={n: w for n, m in full.items() if (w := exceeded(m, limits))},
            upper={n: w for n, m in full.items() if (w := exceeded(m, limits, "upper"))},
            unresolved=[f for f in FPRS if limits.get(f) is not None and sample.n * f < 1.0 - 1e-12],
        )

    def _status(self, ev: "Evidence", controls: list[Control], sample: Sample, model_ran: bool,
                shared: int) -> tuple[str, str]:
        """The decision rules of the module docstring, in order of precedence."""
        k = len(ev.full)
        failed_pos = [c for c in controls if c.kind == "positive" and not c.passed]
        failed_neg = [c for c in controls if c.kind == "negative" and not c.passed]
        unresolved_null = [c for c in controls if c.kind == "null" and not c.passed]
        if ev.confirmed or ev.significant:
            # a control may block a pass but never excuse a leak: replicated, significant evidence fails
            why = [f"{ev.chosen} (chosen on one half) on the held-out half: {', '.join(ev.confirmed)}"] if ev.confirmed else []
            sig = list(ev.significant.items())
            why += [f"{n}: simultaneous lower bound {', '.join(w)}" for n, w in sig[:3]]
            why += [f"and {len(sig) - 3} more attack(s)"] if len(sig) > 3 else []
            reason = "an attacker can tell training images from unseen ones: " + "; ".join(why)
            also = [f"{c.name}: {c.detail}" for c in failed_neg + failed_pos]
            if also:
                reason += ("; a control also failed, which cannot excuse the leak (" + "; ".join(also) + ")")
            return "fail", reason
        # too small a sample first: a positive control then fails for the same reason, and more data is the fix
        also = "".join(f"; {c.name}: {c.detail}" for c in failed_pos)
        if ev.unresolved and self.limits.get("auc") is None:
            f = ev.unresolved[0]
            return "inconclusive", (f"{sample.n} non-members cannot resolve TPR at {pct(f)} FPR, which the policy "
                                    f"limits, and no AUC limit is set; give a holdout of at least "
                                    f"{math.ceil(1 / f):,} images" + also)
        if unresolved_null:
            return "inconclusive", ("no attack beats the limits, but this sample cannot resolve a leak at the "
                                    f"limit ({unresolved_null[0].name}): {unresolved_null[0].detail}" + also)
        if failed_pos:
            return "error", "positive control failed: " + "; ".join(c.detail for c in failed_pos) + "; the audit is invalid"
        if failed_neg:
            return "inconclusive", "a negative control failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed_neg)
        if ev.beyond:
            n, w = next(iter(ev.beyond.items()))
            return "inconclusive", (f"{n} reaches {', '.join(w)} on the whole sample, but as the best of {k} attacks "
                                    "this is not confirmed on held-out data; more samples would decide")
        if model_ran and not self.settings.control_model:
            return "inconclusive", ("no attack beats the limits, but the model-attack control is switched off "
                                    "(control_model), so nothing shows the model attacks could have caught a leak")
        if self.settings.judge == "interval" and ev.upper:
            n, w = next(iter(ev.upper.items()))
            return "inconclusive", (f"every attack is within the limits, but {n}'s simultaneous upper bound is not "
                                    f"({', '.join(w)}); more samples would decide")
        best = max(ev.full, key=lambda n: ev.full[n].auc)
        reason = (f"no attack beats the limits: strongest AUC {ev.full[best].auc:.3f} ({best}) over {k} attack(s) "
                  f"on {sample.n} members vs {sample.n} non-members")
        if ev.unresolved:
            f = ev.unresolved[0]
            reason += (f"; decided on the AUC: {sample.n} non-members cannot resolve TPR at {pct(f)} FPR (that needs "
                       f"at least {math.ceil(1 / f):,}, about {math.ceil(10 / f):,} for a stable figure)")
        if shared:
            return "warn", (reason + f"; but {shared} patient(s) have images in both the training set and the "
                            "holdout, which makes non-members look like members and understates the risk")
        return "pass", reason

    def _decide(self, ctx, sample: Sample, run: AttackRun, controls: list[Control]) -> CheckResult:
        s, y = self.settings, sample.labels
        names = list(run.scores)
        note2 = self._scenario2_note(ctx)
        if not names:
            why = "; ".join(f"{n}: {w}" for n, w in run.skipped.items()) or "every attack is switched off"
            return self.result("inconclusive", f"no attack could run ({why}); {note2}".rstrip("; "),
                               controls=tuple(controls))
        ev = self._evaluate(ctx, sample, run)
        shared = shared_patients(ctx.real, ctx.holdout)
        status, reason = self._status(ev, controls, sample, any(v == 2 for v in run.scenario.values()), shared)
        if note2:
            reason += f"; {note2}"
        k, alpha = len(names), s.alpha
        thresholds = {"max_auc": s.max_auc, "max_tpr_at_1pct_fpr": s.max_tpr_at_1pct_fpr,
                      "max_tpr_at_0_1pct_fpr": s.max_tpr_at_0_1pct_fpr, "judge": s.judge,
                      "alpha": alpha, "simultaneous_alpha": alpha / k, "control_alpha": s.control_alpha}
        data = {"roc": {n: roc_points(run.scores[n], y) for n in names},
                "histograms": {f"membership_inference: {ev.chosen} scores": score_histogram(run.scores[ev.chosen], y)},
                "table": self._table(ev.full, ev.chosen)}
        self._write_csv(ctx, sample, run)
        return self.result(status, reason, metrics=self._metrics(sample, run, ev, shared), thresholds=thresholds,
                           controls=tuple(controls), data=data,
                           per_image={"members": sample.members, "nonmembers": sample.nonmembers,
                                      "scores": run.scores[ev.chosen], "attack": ev.chosen})

    # ---------------------------------------------------------------- outputs

    def _metrics(self, sample: Sample, run: AttackRun, ev: "Evidence", shared: int) -> dict:
        k, held = len(ev.full), ev.held
        attacks = {}
        for n, m in ev.full.items():
            entry: dict[str, Any] = {"scenario": run.scenario[n], **m.estimates()}
            entry["beats_chance"] = m.auc_ci[0] > 0.5
            if m.auc_ci[1] < 0.5:
                entry["note"] = "separates members in the other direction (its *_rev twin, if any, is the attack)"
            attacks[n] = entry
        out = {
            "n_members": sample.n, "n_nonmembers": sample.n, "n_attacks": k,
            "decision": {
                "chosen_attack": ev.chosen, "chosen_on": f"{int(sample.select.sum())} images (selection half)",
                "held_out": {kk: v.to_dict() for kk, v in held.estimates().items()},
                "held_out_n": {"members": held.n_members, "nonmembers": held.n_nonmembers},
                "significant_after_bonferroni": sorted(ev.significant),
                "beyond_limits_on_whole_sample": sorted(ev.beyond),
                "note": (f"the maximum over {k} attacks on one sample is optimistic; the deciding attack is chosen "
                         "on one half and measured on the other, and the whole-sample intervals used for "
                         f"significance are simultaneous at {self.settings.alpha / k:.4f} per attack"),
            },
            "attacks": attacks,
            "not_run": dict(run.skipped),
            "shared_patients": shared,
        }
        out.update({k2: v for k2, v in run.info.items()})
        return out

    def _table(self, full: dict, chosen: str) -> dict:
        rows = []
        for n, m in full.items():
            est = m.estimates()

            def cell(e: Estimate):
                if e.value is None:
                    return "not resolvable"
                return f"{e.value:.3f} [{e.ci[0]:.3f}, {e.ci[1]:.3f}]"

            rows.append([n + (" (decides)" if n == chosen else ""), cell(est["auc"]), cell(est["tpr_at_1pct_fpr"]),
                         cell(est["tpr_at_0.1pct_fpr"]), "yes" if m.auc_ci[0] > 0.5 else "no"])
        return {"title": "Attacks (whole sample, 95% intervals)",
                "columns": ["attack", "AUC", "TPR at 1% FPR", "TPR at 0.1% FPR", "beats chance"], "rows": rows}

    def _write_csv(self, ctx, sample: Sample, run: AttackRun) -> None:
        """Per-image scores: members are training images, so only their keys (internal), never pixels."""
        path = ctx.artifact("membership_inference.csv")
        if path is None:
            return
        names = list(run.scores)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["role", "image", "patient", "fold", "half", *names])
            for j in range(2 * sample.n):
                member = j < sample.n
                rec = (ctx.real if member else ctx.holdout).records[int(
                    sample.members[j] if member else sample.nonmembers[j - sample.n])]
                w.writerow(["member" if member else "non-member", rec.key,
                            hash_id(rec.patient_id) if rec.patient_id else "", int(sample.fold[j]),
                            "selection" if sample.select[j] else "evaluation",
                            *[f"{run.scores[n][j]:.6g}" for n in names]])


