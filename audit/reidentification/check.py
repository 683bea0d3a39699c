"""``reidentification``: can a synthetic image be linked back to a training patient?

A synthetic image need not copy pixels to leak identity: radiographs carry
biometric signatures.  This check plays the attacker.  It trains a patient
re-identification network on the real training images (:mod:`audit.reid_network`:
a torchvision CNN with a metric-learning head, pytorch-metric-learning's
multi-similarity loss, the augmentations an attacker would use), proves on
patients it never saw that it can re-identify real patients, calibrates a
match threshold on real images of *unseen* patients at a fixed false-match
rate, and then scores every synthetic image against every training image.

Roles of the real images
------------------------
gallery
    every real training image: what synthetic images are matched against.
network training
    the gallery minus the calibration patients and minus the probe images,
    plus any attacker data (public images with patient IDs,
    ``--attacker-data``); minus the validation identities.
validation
    a patient-disjoint share of the attacker data's patients (else of the
    real training patients): it decides when training stops, nothing else.
calibration (unseen patients)
    the holdout set's patients when it has patient IDs (holdout images of
    patients who are also in the training set are not unseen: they become
    probes), else a patient-disjoint ``calibration_fraction`` of the real
    set's patients, whose own images are then left out of their matches.
    Used for the verification metrics (AUC, mAP@R, P@1), the threshold and
    the negative control; never for training.
probes
    one withheld image of up to ``control_images`` training patients (plus
    holdout images of training patients): new images of patients in the
    gallery, the situation a leaking generator creates.

Threshold
---------
For an image ``x`` let ``m(x)`` be its best cosine similarity to a gallery
image of *another* identity.  A synthetic image is flagged when its best
similarity to the gallery exceeds ``tau``, the ``k``-th largest ``m`` over one
randomly chosen image of each of the ``n`` unseen patients, ``k = floor(rate
(n + 1))`` -- a conformal threshold: an image of a new patient is flagged with
probability at most ``k / (n + 1) <= false_match_rate``.  Patients, not
images, are exchangeable (one patient's images are alike), hence one image
each.  EchoNet-Synthetic takes a percentile of real held-out best matches;
here the calibration statistic is the very statistic a synthetic image is
judged by, against the same gallery.  Under that null the number of flagged
images among ``N`` follows a beta-binomial law, which gives the exact p-value
of "more flags than chance", calibration error included.

Controls
--------
positive
    augmented training images, and probes (new images of training patients),
    must be re-identified (score above ``tau`` *and* the right patient) at a
    rate of at least ``min_reid_rate``;
negative
    calibration images, cross-fitted (threshold from one half of the unseen
    patients, flag rate on the other half), must not be flagged
    significantly more often than the false-match rate.

When the real set has no patient IDs (or every patient has one image), each
training image is its own identity, learned under augmentation, and the
result says so: a flag then means a synthetic image is recognisably one
particular training image.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from synthgate import __version__
from synthgate.imageset import ImageSet
from synthgate.progress import progress_bar

from audit.core.base import Check, CheckResult, Control, Estimate, Finding
from audit.core.stats import binomial_rate, roc_points, summary
from audit.core.thresholds import conformal_threshold, excess_p_value

from .metrics import best_match, has_genuine, one_per_identity, pair_auc, retrieval_metrics, verification_pairs
from .plan import Embedded, NotEnoughData, Plan, Queries, TrainingData, make_plan, training_data
from .settings import ReidentificationSettings

NETWORK_KEYS = ("backbone", "image_size", "embedding_dim", "epochs", "batch_size", "views", "lr", "patience",
                "min_delta", "step_budget_per_image", "min_step_budget", "time_budget_per_image", "min_time_budget")


@dataclass(frozen=True)
class ReidFit:
    """The real side of the attack: who plays which role, the trained network, its calibration and controls.

    ``not_enough`` holds the reason when the real data cannot train or
    calibrate an attacker (then the check is inconclusive).
    """

    not_enough: str | None = None
    plan: Plan | None = None
    cfg: Any = None
    model: Any = None
    network: dict | None = None
    emb: dict | None = None
    impostor: np.ndarray | None = None
    tau: float = float("nan")
    k: int = 1
    n_cal: int = 0
    tau_note: str = ""
    verification: dict | None = None
    roc: dict | None = None
    genuine: np.ndarray | None = None
    controls: tuple[Control, ...] = ()
    probe_scores: np.ndarray | None = None


class Reidentification(Check):
    name = "reidentification"
    requires = ("real",)
    per_image = True
    method = ("A patient re-identification network (torchvision CNN + metric-learning embedding, trained on the real "
              "training images with the attacker's augmentations) scores every synthetic image against every "
              "training image; a synthetic image is flagged when its best match exceeds a threshold calibrated on "
              "real images of unseen patients at a fixed false-match rate. The network must first re-identify real "
              "held-out patients (verification AUC, mAP@R, P@1) or the check is inconclusive.")
    references = (
        "Packhaeuser et al. 2022, Deep learning-based patient re-identification is able to exploit the biometric "
        "nature of medical chest X-ray data, Scientific Reports 12:14851",
        "Packhaeuser et al. 2023, Generation of anonymous chest radiographs using latent diffusion models for "
        "training thoracic abnormality classification systems (ISBI)",
        "Reynaud et al. 2024, EchoNet-Synthetic: privacy-preserving video generation for safe medical data sharing "
        "(MICCAI): re-identification filter calibrated on real held-out data",
        "Wang et al. 2019, Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning (CVPR); "
        "Musgrave et al. 2020, pytorch-metric-learning",
    )
    limitations = (
        "The attacker is only as strong as its network: a pass says that this network, which re-identifies real "
        "held-out patients at the reported rates, links no more synthetic images to training patients than chance. "
        "A stronger attacker (more data, pretrained weights, the gpu preset) may link more; public data of the same "
        "modality (--attacker-data) makes this one stronger.",
        "The threshold is calibrated on real images; synthetic images that differ systematically from real ones "
        "(smoother, other contrast) may score lower against everyone, which makes the check less sensitive.",
        "Without patient IDs identity is learned per image (image-level fallback): that detects a synthetic image "
        "that is recognisably one training image, not a new image of the same patient.",
        "Network training holds the training images in memory at the network's input size (8-bit).",
    )

    Settings = ReidentificationSettings

    # ------------------------------------------------------------------ fit

    def fit(self, ctx) -> "ReidFit":
        """Train (or load) the attacker, embed the real images, calibrate the threshold, run the controls."""
        s = self.settings
        try:
            plan = make_plan(ctx.real, ctx.holdout, s.calibration_fraction, s.control_images,
                             ctx.rng("reidentification.split"))
        except NotEnoughData as exc:
            return ReidFit(not_enough=str(exc))
        cfg, preset = self._config(ctx)
        model, network = self._network(ctx, plan, cfg, preset)
        trained = np.concatenate([p.indices for p in self._training_data(ctx, plan, cfg).train if p.role == "real"])
        emb = self._embed_real(ctx, model, cfg, plan, np.sort(trained))
        cal = emb["calibration"]
        impostor, _ = best_match(cal.emb, emb["gallery"], q_ids=cal.ids, g_ids=plan.gallery_ids, relation="other")
        pick = one_per_identity(cal.ids, ctx.rng("reidentification.calibration"))
        tau, k, tau_note = conformal_threshold(impostor[pick], s.false_match_rate)
        verification, roc, genuine = self._verification(ctx, plan, emb)
        controls = [self._negative_control(ctx, impostor, cal.ids, s.false_match_rate)]
        positive, probe_scores = self._positive_controls(plan, emb, tau)
        return ReidFit(plan=plan, cfg=cfg, model=model, network=network, emb=emb, impostor=impostor, tau=tau,
                       k=max(k, 1), n_cal=len(pick), tau_note=tau_note, verification=verification, roc=roc,
                       genuine=genuine, controls=tuple(controls + positive), probe_scores=probe_scores)

    def fit_state(self, fit: "ReidFit") -> "ReidFit":
        """The fit without the network itself (the network cache keeps that, keyed by the same data)."""
        return replace(fit, model=None)

    def from_state(self, ctx, state: "ReidFit") -> "ReidFit":
        if state.not_enough is not None:
            return state
        preset = state.network.get("preset", "cpu")
        model, network = self._network(ctx, state.plan, state.cfg, preset)
        return replace(state, model=model, network={**state.network, "cached": network["cached"]})

    # ---------------------------------------------------------------- score

    def score(self, ctx, fit: "ReidFit") -> CheckResult:
        s = self.settings
        if fit.not_enough is not None:
            return self.result("inconclusive", f"cannot re-identify: {fit.not_enough}",
                               metrics={"n_synthetic": len(ctx.synthetic), "n_real": len(ctx.real)})
        plan, emb, tau = fit.plan, fit.emb, fit.tau
        bound = fit.k / (fit.n_cal + 1)
        synthetic = embed_set(ctx, fit.model, fit.cfg, ctx.synthetic, np.arange(len(ctx.synthetic)),
                              s.embed_batch_size, "synthetic")
        s_score, s_idx = best_match(synthetic, emb["gallery"])
        flagged = s_score > tau
        n_flag, n_syn = int(flagged.sum()), len(s_score)
        p_excess = excess_p_value(n_flag, n_syn, fit.k, fit.n_cal)
        findings, rows, per_patient = self._findings(ctx, plan, s_score, s_idx, flagged, tau)
        self._write_csv(ctx, rows)
        cal = emb["calibration"]
        metrics = {
            "identity": plan.mode, "notes": list(plan.notes),
            "n_synthetic": n_syn, "n_real": len(ctx.real),
            "n_real_patients": ctx.real.n_patients if plan.mode == "patient" else None,
            "calibration": {"source": plan.source, "images": len(cal.ids), "identities": int(len(np.unique(cal.ids)))},
            "network": fit.network,
            "verification": fit.verification,
            "n_flagged": n_flag,
            "reidentified_fraction": binomial_rate(n_flag, n_syn),
            "expected_by_chance": round(n_syn * bound, 3),
            "excess_p_value": p_excess,
            "best_match_score": summary(s_score),
            "synthetic_retrieval": self._synthetic_retrieval(ctx, plan, emb, synthetic),
            "patients_flagged": sum(1 for r in per_patient if r["flagged"]),
            "patients_most_matched": per_patient[:20],
            "geometry": {"height": ctx.geometry.height, "width": ctx.geometry.width,
                         "channels": ctx.geometry.channels},
        }
        thresholds = {"false_match_rate": s.false_match_rate, "guaranteed_false_match_rate": bound, "tau": tau,
                      "tau_note": fit.tau_note, "k": fit.k, "n_calibration_identities": fit.n_cal,
                      "fail_on": s.fail_on, "significance": s.significance,
                      "min_auc": s.min_auc, "min_reid_rate": s.min_reid_rate}
        data = {"histograms": _histograms(s_score, fit.impostor, fit.genuine, fit.probe_scores, tau), "roc": fit.roc}
        status, reason = self._decide(plan, fit.verification, fit.controls, n_flag, n_syn, p_excess, tau, bound)
        return self.result(status, reason, metrics=metrics, thresholds=thresholds, flagged=tuple(findings),
                           controls=fit.controls, data=data,
                           per_image={"matched_real": np.asarray(s_idx, int), "flagged": np.asarray(flagged, bool)})

    # ------------------------------------------------------------ network

    def _config(self, ctx):
        from audit.reidentification.network import resolve_config

        preset = self.settings.preset
        if preset == "auto":
            preset = "gpu" if ctx.torch_device.type == "cuda" else "cpu"
        overrides = {k: getattr(self.settings, k) for k in NETWORK_KEYS}
        overrides["backbone_weights"] = self.settings.backbone_weights
        return resolve_config(preset, overrides), preset

    def _training_data(self, ctx, plan: Plan, cfg) -> TrainingData:
        s = self.settings
        return training_data(plan, ctx.real, tuple(ctx.attacker), validate=cfg.patience > 0,
                             fraction=s.validation_fraction, max_identities=s.max_validation_identities,
                             rng=ctx.rng("reidentification.validation"))

    def _cache_key(self, ctx, plan: Plan, cfg, data: TrainingData) -> str:
        real = ctx.real
        geo = ctx.geometry

        def listing(which: str) -> str:
            ranks = np.unique(data.identities(which), return_inverse=True)[1]
            return hashlib.sha256("\n".join(f"{k}\t{int(r)}" for k, r in zip(data.keys(which), ranks))
                                  .encode()).hexdigest()

        blob = json.dumps({
            "synthgate": __version__, "real": real.digest, "mode": plan.mode, "seed": ctx.seed,
            "geometry": [geo.height, geo.width, geo.channels],
            "config": {k: v for k, v in cfg.to_dict().items() if k != "backbone_weights"},
            "attacker": [a.digest for a in ctx.attacker],
            "train": listing("train"), "validation": listing("validation"),
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _network(self, ctx, plan: Plan, cfg, preset: str):
        """The trained network from the cache (keyed by training data and settings), or trained now."""
        from audit.reidentification.network import load_network, save_network, train_network

        data = self._training_data(ctx, plan, cfg)
        key = self._cache_key(ctx, plan, cfg, data)
        folder = ctx.model_cache("reidentification", key[:32])
        settings = {k: v for k, v in cfg.to_dict().items() if k != "backbone_weights"}  # no local paths in outputs
        info = {"preset": preset, **settings, "backbone_weights": "local file" if cfg.backbone_weights else None,
                "cache_key": key[:16], "attacker_data": _attacker_summary(ctx, data),
                "validation_source": data.validation_source}
        loaded = load_network(folder, cfg, ctx.torch_device)
        if loaded is not None:
            model, meta = loaded
            return model, {**info, "cached": True, "training": meta.get("training", {})}

        def stack(which: str):
            import torch

            parts = getattr(data, which)
            if not parts:
                return None
            images = torch.cat([prepare_set(ctx, p.imageset, p.indices, cfg) for p in parts])
            return images, np.unique(data.identities(which), return_inverse=True)[1]

        images, ranks = stack("train")
        model, history = train_network(images, ranks, cfg, ctx.torch_device,
                                       ctx.torch_generator("reidentification.train"),
                                       ctx.rng("reidentification.batches"), progress=ctx.progress,
                                       validation=stack("validation"))
        history["validation_source"] = data.validation_source
        if folder is not None:
            save_network(folder, model, {"config": cfg.to_dict(), "training": history, "mode": plan.mode,
                                         "synthgate": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return model, {**info, "cached": False, "training": history}

    # ---------------------------------------------------------- embeddings

    def _embed_real(self, ctx, model, cfg, plan: Plan, trained: np.ndarray) -> dict:
        """Embeddings of every real image the attack uses: gallery, calibration, probes and control views.

        The augmented-image control draws from ``trained``, the real images
        the network trained on (not those of validation identities).
        """
        bs = self.settings.embed_batch_size
        gallery = embed_set(ctx, model, cfg, ctx.real, np.arange(len(ctx.real)), bs, "training set")

        def queries(q: Queries, what: str) -> Embedded:
            # images of the real set are embedded already, in the gallery
            if q.imageset is ctx.real:
                return Embedded(gallery[q.indices], q.ids, q.self_index)
            e = embed_set(ctx, model, cfg, q.imageset, q.indices, bs, what)
            return Embedded(e, q.ids, q.self_index)

        out = {"gallery": gallery, "calibration": queries(plan.calibration, "calibration")}
        if plan.probes:
            out["probes"] = Embedded.concat([queries(q, "probes") for q in plan.probes])
        n = min(self.settings.control_images, len(trained))
        src = np.sort(ctx.rng("reidentification.control").choice(trained, n, replace=False))
        out["augmented"] = Embedded(embed_set(ctx, model, cfg, ctx.real, src, bs, "control", augmented=True,
                                              generator=ctx.torch_generator("reidentification.control")),
                                    plan.gallery_ids[src], src)
        cal = plan.calibration
        if plan.mode == "image" or not has_genuine(cal.ids):
            out["views"] = embed_set(ctx, model, cfg, cal.imageset, cal.indices, bs, "views", augmented=True,
                                     generator=ctx.torch_generator("reidentification.views"))
        return out

    # -------------------------------------------------------- verification

    def _verification(self, ctx, plan: Plan, emb: dict):
        """AUC, mAP@R and P@1 on the calibration (unseen) identities; ``(metrics, roc, genuine best scores)``."""
        s = self.settings
        cal = emb["calibration"]
        rng = ctx.rng("reidentification.verification")
        n_boot = s.n_boot
        if "views" in emb:  # genuine pairs: an image and an augmented view of it
            views = emb["views"]
            i, j = verification_pairs(cal.ids, True, s.max_pairs, rng)
            scores = np.einsum("nd,nd->n", views[i], cal.emb[j])
            genuine_pairs = cal.ids[i] == cal.ids[j]
            retrieval = retrieval_metrics(views, cal.ids, cal.emb, cal.ids, n_boot, rng)
            genuine = np.einsum("nd,nd->n", views, cal.emb)
            pairs = "an unseen image and an augmented view of it (no held-out patient has two images)"
            if plan.mode == "image":
                pairs = "an unseen image and an augmented view of it (image-level identity)"
        else:
            i, j = verification_pairs(cal.ids, False, s.max_pairs, rng)
            scores = np.einsum("nd,nd->n", cal.emb[i], cal.emb[j])
            genuine_pairs = cal.ids[i] == cal.ids[j]
            retrieval = retrieval_metrics(cal.emb, cal.ids, n_boot=n_boot, rng=rng)
            genuine, _ = best_match(cal.emb, cal.emb, q_ids=cal.ids, g_ids=cal.ids,
                                    q_self=np.arange(len(cal.ids)), relation="same")
            genuine = genuine[np.isfinite(genuine)]
            pairs = "two images of one unseen patient vs images of two unseen patients"
        auc, ci = pair_auc(scores, genuine_pairs, cal.ids[i], cal.ids[j], n_boot, rng)
        metrics = {
            "auc": Estimate(auc, ci, int(len(scores)), "identity-cluster bootstrap"),
            "map_at_r": retrieval["map_at_r"], "precision_at_1": retrieval["precision_at_1"],
            "genuine_pairs": int(genuine_pairs.sum()), "impostor_pairs": int((~genuine_pairs).sum()),
            "pairs": pairs, "identities": int(len(np.unique(cal.ids))),
        }
        return metrics, roc_points(scores, genuine_pairs), genuine

    # ------------------------------------------------------------ controls

    def _negative_control(self, ctx, impostor: np.ndarray, ids: np.ndarray, rate: float) -> Control:
        """Cross-fitted false matches on unseen identities: threshold from one half, flags on the other.

        Pass/fail is the exact beta-binomial test on one image per identity
        (the unit the threshold's guarantee is about); the flag rate over every
        image of the other half is reported alongside.
        """
        rng = ctx.rng("reidentification.negative")
        perm = rng.permutation(np.unique(ids))
        fold_a = np.isin(ids, perm[: len(perm) // 2])
        hits = total = id_hits = id_total = 0
        p_values, bounds = [], []
        for a, b in ((fold_a, ~fold_a), (~fold_a, fold_a)):
            ia, ib = np.flatnonzero(a), np.flatnonzero(b)
            pa, pb = ia[one_per_identity(ids[ia], rng)], ib[one_per_identity(ids[ib], rng)]
            tau, k, _ = conformal_threshold(impostor[pa], rate)
            h = int((impostor[pb] > tau).sum())
            p_values.append(excess_p_value(h, len(pb), max(k, 1), len(pa)))
            bounds.append(max(k, 1) / (len(pa) + 1))
            id_hits, id_total = id_hits + h, id_total + len(pb)
            hits, total = hits + int((impostor[ib] > tau).sum()), total + len(ib)
        passed = min(p_values) >= self.settings.significance / 2
        verdict = ("consistent with the false-match rate" if passed else
                   f"significantly more than the false-match rate (p = {min(p_values):.2g}): the threshold does not "
                   "hold on unseen patients")
        detail = (f"one image per unseen patient: {id_hits} of {id_total} matched a training patient above a "
                  f"threshold calibrated on the other half of the unseen patients (guaranteed <= "
                  f"{100 * float(np.mean(bounds)):.2g}%, target {100 * rate:g}%): {verdict}; all their images: {hits} "
                  f"of {total} ({100 * hits / max(total, 1):.1f}%, which moves by whole patients: images of one "
                  "patient are alike)")
        return Control("unseen patients (cross-fitted)", "negative", passed, detail,
                       {"flagged_images": binomial_rate(hits, total, note="two-fold by identity"),
                        "flagged_identities": binomial_rate(id_hits, id_total, note="one image per identity"),
                        "guaranteed_rate": float(np.mean(bounds)), "p_values": p_values})

    def _positive_controls(self, plan: Plan, emb: dict, tau: float) -> tuple[list[Control], np.ndarray | None]:
        """Augmented training images, and new images of training patients (probes) when there are any."""
        need = self.settings.min_reid_rate
        out, probe_scores = [], None
        aug = emb["augmented"]
        score, idx = best_match(aug.emb, emb["gallery"])
        hit = (score > tau) & (plan.gallery_ids[idx] == aug.ids)
        what = "patient" if plan.mode == "patient" else "source image"
        out.append(_positive("augmented training images", hit, score, need,
                             f"augmented training images (pose, exposure, noise) matched to their {what}"))
        if "probes" in emb:
            pr = emb["probes"]
            score, idx = best_match(pr.emb, emb["gallery"], q_self=pr.self_index)
            hit = (score > tau) & (plan.gallery_ids[np.maximum(idx, 0)] == pr.ids) & (idx >= 0)
            probe_scores = score[np.isfinite(score)]
            control = _positive("new images of training patients", hit, score, need,
                                "images of training patients that the network never saw, matched to their patient")
            ref = np.setdiff1d(np.arange(len(plan.gallery_ids)), pr.self_index[pr.self_index >= 0])
            retrieval = retrieval_metrics(pr.emb, pr.ids, emb["gallery"][ref], plan.gallery_ids[ref], n_boot=0)
            out.append(replace(control, metrics={**control.metrics, **retrieval}))
        return out, probe_scores

    # ----------------------------------------------------------- synthetic

    def _synthetic_retrieval(self, ctx, plan: Plan, emb: dict, synthetic: np.ndarray) -> dict:
        """mAP@R / P@1 of synthetic queries against training patients, when synthetic images name a patient.

        A synthetic image has no patient unless its generator was conditioned
        on one (or the set is a test set built from known patients): only
        then is there a right answer to retrieve.  Otherwise the fraction
        re-identified is the measure.
        """
        synth = ctx.synthetic
        if plan.mode != "patient":
            return {"value": None, "note": "image-level identity: synthetic images have no patient to retrieve"}
        real_ids = {p: int(c) for p, c in zip(ctx.real.patient_ids, plan.gallery_ids)}
        known = [i for i, r in enumerate(synth.records) if r.patient_id in real_ids]
        if not known:
            return {"value": None, "note": "synthetic images carry no patient IDs of training patients, so there is "
                                           "no right answer to retrieve; the fraction re-identified is the measure"}
        q_ids = np.array([real_ids[synth.records[i].patient_id] for i in known])
        res = retrieval_metrics(synthetic[known], q_ids, emb["gallery"], plan.gallery_ids,
                                self.settings.n_boot, ctx.rng("reidentification.synthetic_retrieval"))
        return {**res, "queries": len(known), "note": "synthetic images whose patient_id names a training patient"}

    def _findings(self, ctx, plan: Plan, score, idx, flagged, tau):
        findings, rows = [], []
        nearest, flags = Counter(), Counter()
        real = ctx.real
        for i, rec in enumerate(ctx.synthetic.records):
            j = int(idx[i])
            pid = plan.gallery_patients[j]
            who = pid or real.records[j].key
            nearest[who] += 1
            flags[who] += int(flagged[i])
            rows.append({"synthetic": rec.key, "score": f"{score[i]:.6f}", "nearest_real": real.records[j].key,
                         "nearest_patient": pid or "", "flagged": int(bool(flagged[i]))})
            if flagged[i]:
                target = f"training patient {pid}" if pid else f"training image {real.records[j].key}"
                findings.append(Finding(rec.key, f"re-identified as {target}: similarity {score[i]:.4f} to "
                                                 f"{real.records[j].key} > threshold {tau:.4f}",
                                        {"patient": pid, "score": round(float(score[i]), 6),
                                         "real": real.records[j].key, "threshold": round(float(tau), 6)}))
        per = [{"patient" if w.startswith("pt-") else "image": w, "flagged": flags[w], "best_match_of": c}
               for w, c in sorted(nearest.items(), key=lambda kv: (-flags[kv[0]], -kv[1], kv[0]))]
        return findings, rows, per

    def _write_csv(self, ctx, rows) -> None:
        path = ctx.artifact("reidentification.csv")
        if path is None:
            return
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["synthetic", "score", "nearest_real", "nearest_patient", "flagged"],
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    # --------------------------------------------------------------- decide

    def _decide(self, plan, verification, controls, n_flag, n_syn, p_excess, tau, bound) -> tuple[str, str]:
        s = self.settings
        level = s.significance
        negative = [c for c in controls if c.kind == "negative"]
        weak = [c for c in controls if c.kind == "positive" and not c.passed]
        auc = verification["auc"].value
        tail = f" ({plan.notes[0]})" if plan.mode == "image" else ""
        excess = p_excess < level
        if not all(c.passed for c in negative):
            return "inconclusive", f"the threshold does not hold its false-match rate on unseen patients: " \
                                   f"{negative[0].detail}{tail}"
        if (s.fail_on == "any" and n_flag) or excess:
            why = (f"more than the {n_syn * bound:.1f} expected by chance (p = {p_excess:.2g})"
                   if excess else "fail_on = any")
            return "fail", f"{n_flag} of {n_syn} synthetic images are re-identified as training " \
                           f"{'patients' if plan.mode == 'patient' else 'images'} (similarity > {tau:.4f}), {why}{tail}"
        auc_ok = auc is not None and np.isfinite(auc) and auc >= s.min_auc
        if not auc_ok or weak:
            problems = [] if auc_ok else [f"verification AUC {auc:.3f} < {s.min_auc}" if auc is not None
                                          and np.isfinite(auc) else "no verification AUC"]
            problems += [f"{c.name}: {c.detail}" for c in weak]
            return "inconclusive", ("the re-identification network cannot re-identify real patients well enough to "
                                    "vouch for anything (" + "; ".join(problems)
                                    + "); a blind attacker proves nothing" + tail)
        if n_flag:
            return "warn", (f"{n_flag} of {n_syn} synthetic images match a training "
                            f"{'patient' if plan.mode == 'patient' else 'image'} above the threshold, no more than "
                            f"the false-match rate explains (p = {p_excess:.2g}); they are listed for review{tail}")
        return "pass", (f"no synthetic image is re-identified as a training "
                        f"{'patient' if plan.mode == 'patient' else 'image'} (threshold {tau:.4f}, false-match rate "
                        f"<= {100 * bound:.2g}%; verification AUC {auc:.3f}){tail}")


# -------------------------------------------------------------- helpers


def prepare_set(ctx, imageset: ImageSet, indices, cfg, batch_size: int = 256):
    """Images of ``imageset`` at ``indices`` in the network's input form (uint8 tensor)."""
    import torch

    from audit.reidentification.network import prepare

    parts = [prepare(b, cfg) for _, b in ctx.batches(imageset, batch_size, list(map(int, indices)))]
    if not parts:
        return torch.zeros((0, ctx.geometry.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    return torch.cat(parts)


def embed_set(ctx, model, cfg, imageset: ImageSet, indices, batch_size: int, what: str, augmented: bool = False,
              generator=None) -> np.ndarray:
    """L2-normalised embeddings of ``imageset`` at ``indices``, streamed."""
    from audit.reidentification.network import embed, prepare

    indices = list(map(int, indices))
    out = [embed(model, prepare(b, cfg), ctx.torch_device, batch_size, generator, augmented)
           for _, b in progress_bar(ctx.batches(imageset, batch_size, indices), desc=f"reid: embed {what}",
                                    unit="batch", enabled=ctx.progress, total=math.ceil(len(indices) / batch_size))]
    return np.concatenate(out) if out else np.zeros((0, cfg.embedding_dim), np.float32)


def _attacker_summary(ctx, data: TrainingData) -> dict | None:
    """What the attacker data added: counts and a digest, never its patient IDs or file names."""
    if not ctx.attacker:
        return None
    return {**data.attacker, "sha256": attacker_digest(ctx.attacker),
            "training_images": int(sum(len(p.indices) for p in data.train if p.role == "attacker")),
            "validation_images": int(sum(len(p.indices) for p in data.validation if p.role == "attacker"))}


def attacker_digest(sets) -> str | None:
    """One SHA-256 over the attacker sets' digests, in the order given (``None`` without attacker data)."""
    if not sets:
        return None
    return hashlib.sha256("\n".join(s.digest for s in sets).encode()).hexdigest()


def _positive(name: str, hit: np.ndarray, score: np.ndarray, need: float, what: str) -> Control:
    n, k = len(hit), int(hit.sum())
    rate = binomial_rate(k, n)
    passed = n > 0 and k / n >= need
    detail = (f"{k} of {n} {what} above the threshold ({100 * k / max(n, 1):.1f}%; needs >= {100 * need:g}%)")
    return Control(name, "positive", passed, detail,
                   {"reidentified": rate, "score": summary(score[np.isfinite(score)])})


def _histograms(synthetic, impostor, genuine, probes, tau) -> dict:
    parts = {"synthetic": synthetic, "impostor": impostor, "genuine": genuine, "probe": probes}
    parts = {k: np.asarray(v, np.float64) for k, v in parts.items() if v is not None and len(v)}
    lo = min(min(float(v.min()) for v in parts.values()), tau)
    hi = max(max(float(v.max()) for v in parts.values()), tau)
    edges = np.linspace(lo - 1e-6, hi + 1e-6, 41)
    out = {"edges": edges.round(6).tolist(), **{k: np.histogram(v, edges)[0].tolist() for k, v in parts.items()}}
    out["lines"] = {"tau": tau}
    out["note"] = ("best-match cosine similarity: synthetic images vs the training set; impostor = unseen patients' "
                   "best match to other patients (calibration); genuine = unseen patients' best match to their own "
                   "other images; probe = new images of training patients")
    return out
