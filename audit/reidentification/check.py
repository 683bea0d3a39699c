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
    the gallery minus the calibration patients and minus the probe images.
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

import numpy as np

from synthgate import __version__
from synthgate.imageset import ImageSet
from synthgate.privacy import hash_id
from synthgate.progress import progress_bar

from audit.core.base import Check, CheckResult, Control, Estimate, Finding
from audit.copy_detection.check import _rate, holdout_threshold
from audit.core.stats import bootstrap_ci, roc_auc, roc_points, summary

PRESETS = ("auto", "cpu", "gpu")
FAIL_ON = ("excess", "any")
NETWORK_KEYS = ("backbone", "image_size", "embedding_dim", "epochs", "batch_size", "views", "lr")
#: fewest identities that can train a metric (2) and be calibrated with a two-fold negative control (2)
MIN_IDENTITIES = 2


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Queries:
    """Images of one set matched against the gallery."""

    imageset: ImageSet
    indices: np.ndarray  # into ``imageset``
    ids: np.ndarray  # identity codes, shared with the gallery's
    self_index: np.ndarray  # the same image's gallery index, or -1 when it is not in the gallery

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def keys(self) -> list[str]:
        return [self.imageset.records[int(i)].key for i in self.indices]


@dataclass(frozen=True)
class Plan:
    """Who plays which role (see the module docstring)."""

    mode: str  # "patient" | "image"
    gallery_ids: np.ndarray
    gallery_patients: tuple[str | None, ...]  # salted hashes
    train: np.ndarray  # gallery indices the network trains on
    calibration: Queries
    probes: tuple[Queries, ...]
    source: str  # "holdout" | "split"
    notes: tuple[str, ...] = ()


@dataclass
class Embedded:
    emb: np.ndarray
    ids: np.ndarray
    self_index: np.ndarray

    @staticmethod
    def concat(parts: list["Embedded"]) -> "Embedded":
        return Embedded(np.concatenate([p.emb for p in parts]), np.concatenate([p.ids for p in parts]),
                        np.concatenate([p.self_index for p in parts]))


class NotEnoughData(Exception):
    """The inputs cannot train or calibrate a re-identification attack (the message says why)."""


def _codes(values: list[str]) -> dict[str, int]:
    return {v: i for i, v in enumerate(sorted(set(values)))}


def make_plan(real: ImageSet, holdout: ImageSet | None, params: dict, rng: np.random.Generator) -> Plan:
    """Assign identities and roles; raises :class:`NotEnoughData` with the reason when impossible."""
    notes: list[str] = []
    pids = real.patient_ids
    counts = Counter(p for p in pids if p is not None)
    if real.has_patients and len(counts) == 1:
        raise NotEnoughData(f"the real set holds a single patient ({len(real)} images): whom a synthetic image "
                            "resembles cannot be told apart from chance without other patients; re-identification "
                            f"needs at least {2 * MIN_IDENTITIES} patients (or {MIN_IDENTITIES} plus a holdout of "
                            "other patients)")
    if real.has_patients and sum(c >= 2 for c in counts.values()) >= MIN_IDENTITIES:
        mode = "patient"
    else:
        mode = "image"
        why = ("the real set has no patient IDs" if not counts
               else f"patient IDs are missing on {sum(p is None for p in pids)} of {len(real)} images"
               if not real.has_patients else "almost every patient has a single image")
        notes.append(f"image-level identity: {why}, so each training image is its own identity, learned under "
                     "augmentation; a flag means a synthetic image is recognisably one particular training image")
    hold_pids = holdout.patient_ids if holdout is not None else []
    if mode == "patient":
        code = _codes(list(counts) + [p for p in hold_pids if p is not None])
        gallery_ids = np.array([code[p] for p in pids])
    else:
        code = {}
        gallery_ids = np.arange(len(real))
    patients = tuple(hash_id(p) if p is not None else None for p in pids)

    calibration, probes, source = _calibration_from_holdout(real, holdout, mode, code, counts, notes)
    withheld = np.zeros(len(real), bool)
    if calibration is None:
        calibration = _calibration_split(real, gallery_ids, mode, float(params["calibration_fraction"]), rng, notes)
        source = "split"
        withheld[calibration.indices] = True
    if mode == "patient":
        own = _probes_from_real(gallery_ids, withheld, int(params["control_images"]), rng)
        if len(own):
            probes = (Queries(real, own, gallery_ids[own], own),) + probes
            withheld[own] = True
    train = np.flatnonzero(~withheld)
    if len(np.unique(gallery_ids[train])) < MIN_IDENTITIES:
        raise NotEnoughData(f"only {len(np.unique(gallery_ids[train]))} identity is left to train the "
                            "re-identification network after setting calibration images aside")
    return Plan(mode, gallery_ids, patients, train, calibration, probes, source, tuple(notes))


def _calibration_from_holdout(real, holdout, mode, code, counts, notes):
    """``(calibration, probes, source)`` from the holdout set, or ``(None, (), "")`` when it cannot serve."""
    if holdout is None:
        return None, (), ""
    hold_pids = holdout.patient_ids
    if mode == "patient" and not holdout.has_patients:
        notes.append("the holdout has no patient IDs, so its patients cannot be shown to be unseen; it is not used "
                     "here, and the threshold is calibrated on a patient-disjoint split of the real set")
        return None, (), ""
    known = np.array([p is not None and p in counts for p in hold_pids], bool)
    probes: tuple[Queries, ...] = ()
    if known.any():
        shared = len({p for p, k in zip(hold_pids, known) if k})
        if mode == "patient":
            idx = np.flatnonzero(known)
            probes = (Queries(holdout, idx, np.array([code[hold_pids[i]] for i in idx]), np.full(len(idx), -1)),)
            notes.append(f"the holdout shares {shared} patient(s) with the training set ({int(known.sum())} images): "
                         "they are not unseen patients, so they serve as new images of training patients "
                         "(positive control), not for calibration")
        else:
            notes.append(f"the holdout shares {shared} patient(s) with the training set ({int(known.sum())} images); "
                         "those images are left out of calibration")
    unseen = np.flatnonzero(~known)
    if mode == "patient":
        ids = np.array([code[hold_pids[i]] for i in unseen], dtype=np.int64)
        if len(np.unique(ids)) < MIN_IDENTITIES:
            notes.append(f"the holdout has {len(np.unique(ids))} patient(s) not in the training set; calibrated on a "
                         "patient-disjoint split of the real set instead")
            return None, probes, ""
    else:
        ids = len(real) + unseen
        if len(unseen) < MIN_IDENTITIES:
            return None, probes, ""
        if not holdout.has_patients:
            notes.append("holdout images are taken to show people who are not in the training set (they carry no "
                         "patient IDs to check that)")
    return Queries(holdout, unseen, ids, np.full(len(unseen), -1)), probes, "holdout"


def _calibration_split(real, gallery_ids, mode, fraction, rng, notes) -> Queries:
    """A patient-disjoint (or image-disjoint) part of the real set, kept from network training."""
    identities = np.unique(gallery_ids)
    n_cal = max(MIN_IDENTITIES, int(round(fraction * len(identities))))
    if len(identities) - n_cal < MIN_IDENTITIES:
        what = "patients" if mode == "patient" else "images"
        raise NotEnoughData(f"the real set has {len(identities)} {what}: too few to split into a part that trains "
                            f"the network and a part that calibrates it (needs at least {2 * MIN_IDENTITIES}); "
                            "give a holdout set of other patients (--holdout)")
    chosen = rng.choice(identities, n_cal, replace=False)
    idx = np.flatnonzero(np.isin(gallery_ids, chosen))
    who = "patients" if mode == "patient" else "images"
    notes.append(f"no usable holdout: {n_cal} of {len(identities)} training {who} ({len(idx)} images) were set aside "
                 f"from network training to calibrate the threshold and check the network ({who[:-1]}-disjoint); "
                 "they stay in the gallery, and their own images are left out of their matches")
    return Queries(real, idx, gallery_ids[idx], idx)


def _probes_from_real(gallery_ids, withheld, limit, rng) -> np.ndarray:
    """One image each of up to ``limit`` training patients who keep at least one other training image."""
    free = ~withheld
    counts = Counter(gallery_ids[free].tolist())
    eligible = sorted(p for p, c in counts.items() if c >= 2)
    if not eligible or limit <= 0:
        return np.zeros(0, np.int64)
    chosen = rng.choice(eligible, min(limit, len(eligible)), replace=False)
    return np.sort([int(rng.choice(np.flatnonzero(free & (gallery_ids == p)))) for p in chosen]).astype(np.int64)


# ------------------------------------------------------------ matching


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


def conformal_threshold(impostor: np.ndarray, rate: float) -> tuple[float, int, str]:
    """``(tau, k, note)``: flag ``score > tau``; a new identity exceeds it with probability ``<= k / (n + 1)``.

    ``impostor`` holds one best-match score per unseen identity: images of one
    patient are alike, so only identities are exchangeable with a new
    patient's image (with ``m`` images per patient, image-level ranks could
    understate the rate up to ``m``-fold).  The holdout rule of copy
    detection, on negated similarities.
    """
    n = len(impostor)
    neg_tau, k, _ = holdout_threshold(-np.asarray(impostor, np.float64), rate)
    if math.floor(rate * (n + 1)) >= 1:
        note = (f"{k}-th largest best match of {n} unseen identities, one image each "
                f"(false-match rate <= {k / (n + 1):.4f})")
    else:
        note = (f"{n} unseen identities cannot resolve a false-match rate of {rate:g} (that needs "
                f"{math.ceil(1 / rate) - 1}); using the largest of their best matches (false-match rate <= "
                f"{1 / (n + 1):.4f})")
    return -neg_tau, k, note


def excess_p_value(flagged: int, n: int, k: int, n_cal: int) -> float:
    """P(at least ``flagged`` of ``n`` unseen-patient images exceed the ``k``-th largest of ``n_cal``).

    Exchangeability makes the exceedance probability of that threshold
    Beta(k, n_cal + 1 - k), so the count is beta-binomial: an exact test that
    accounts for the calibration set's own sampling error.
    """
    from scipy.stats import betabinom

    if n == 0 or flagged == 0:
        return 1.0
    return float(betabinom.sf(flagged - 1, n, k, n_cal + 1 - k))


# --------------------------------------------------------- verification


def _pairs(ids: np.ndarray, cross: bool, max_pairs: int, rng) -> tuple[np.ndarray, np.ndarray]:
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


# ------------------------------------------------------------ the check


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
        "A stronger attacker (more data, pretrained weights, the gpu preset) may link more.",
        "The threshold is calibrated on real images; synthetic images that differ systematically from real ones "
        "(smoother, other contrast) may score lower against everyone, which makes the check less sensitive.",
        "Without patient IDs identity is learned per image (image-level fallback): that detects a synthetic image "
        "that is recognisably one training image, not a new image of the same patient.",
        "Network training holds the training images in memory at the network's input size (8-bit).",
    )

    @classmethod
    def default_params(cls) -> dict:
        return {
            "preset": "auto", **{k: None for k in NETWORK_KEYS}, "backbone_weights": None,
            "false_match_rate": 0.01, "calibration_fraction": 0.2, "control_images": 100,
            "min_auc": 0.8, "min_reid_rate": 0.5, "fail_on": "excess", "significance": 0.05,
            "n_boot": 1000, "max_pairs": 200_000, "embed_batch_size": 256,
        }

    def __init__(self, **params):
        super().__init__(**params)
        p = self.params
        if p["preset"] not in PRESETS:
            raise ValueError(f"reidentification: preset {p['preset']!r} must be one of {', '.join(PRESETS)}")
        if p["fail_on"] not in FAIL_ON:
            raise ValueError(f"reidentification: fail_on {p['fail_on']!r} must be one of {', '.join(FAIL_ON)}")
        if not 0 < float(p["false_match_rate"]) < 0.5:
            raise ValueError("reidentification: false_match_rate must be in (0, 0.5)")
        if not 0 < float(p["calibration_fraction"]) < 1:
            raise ValueError("reidentification: calibration_fraction must be in (0, 1)")
        if not 0 <= float(p["min_reid_rate"]) <= 1 or not 0 <= float(p["min_auc"]) <= 1:
            raise ValueError("reidentification: min_reid_rate and min_auc must be in [0, 1]")
        if not 0 < float(p["significance"]) < 1:
            raise ValueError("reidentification: significance must be in (0, 1)")
        if int(p["control_images"]) < 1 or int(p["n_boot"]) < 0 or int(p["max_pairs"]) < 1:
            raise ValueError("reidentification: control_images and max_pairs must be >= 1, n_boot >= 0")

    # ------------------------------------------------------------------ run

    def run(self, ctx) -> CheckResult:
        p = self.params
        try:
            plan = make_plan(ctx.real, ctx.holdout, p, ctx.rng("reidentification.split"))
        except NotEnoughData as exc:
            return self.result("inconclusive", f"cannot re-identify: {exc}",
                               metrics={"n_synthetic": len(ctx.synthetic), "n_real": len(ctx.real)})
        cfg, preset = self._config(ctx)
        model, network = self._network(ctx, plan, cfg, preset)
        emb = self._embed_all(ctx, model, cfg, plan)
        rate = float(p["false_match_rate"])

        cal = emb["calibration"]
        impostor, _ = best_match(cal.emb, emb["gallery"], q_ids=cal.ids, g_ids=plan.gallery_ids, relation="other")
        pick = one_per_identity(cal.ids, ctx.rng("reidentification.calibration"))
        tau, k, tau_note = conformal_threshold(impostor[pick], rate)
        k_eff, n_cal = max(k, 1), len(pick)
        bound = k_eff / (n_cal + 1)
        verification, roc, genuine = self._verification(ctx, plan, emb)
        controls = [self._negative_control(ctx, impostor, cal.ids, rate)]
        positive, probe_scores = self._positive_controls(plan, emb, tau)
        controls += positive

        s_score, s_idx = best_match(emb["synthetic"], emb["gallery"])
        flagged = s_score > tau
        n_flag, n_syn = int(flagged.sum()), len(s_score)
        p_excess = excess_p_value(n_flag, n_syn, k_eff, n_cal)
        findings, rows, per_patient = self._findings(ctx, plan, s_score, s_idx, flagged, tau)
        self._write_csv(ctx, rows)

        metrics = {
            "identity": plan.mode, "notes": list(plan.notes),
            "n_synthetic": n_syn, "n_real": len(ctx.real),
            "n_real_patients": ctx.real.n_patients if plan.mode == "patient" else None,
            "calibration": {"source": plan.source, "images": len(cal.ids), "identities": int(len(np.unique(cal.ids)))},
            "network": network,
            "verification": verification,
            "n_flagged": n_flag,
            "reidentified_fraction": _rate(n_flag, n_syn),
            "expected_by_chance": round(n_syn * bound, 3),
            "excess_p_value": p_excess,
            "best_match_score": summary(s_score),
            "synthetic_retrieval": self._synthetic_retrieval(ctx, plan, emb),
            "patients_flagged": sum(1 for r in per_patient if r["flagged"]),
            "patients_most_matched": per_patient[:20],
            "geometry": {"height": ctx.geometry.height, "width": ctx.geometry.width,
                         "channels": ctx.geometry.channels},
        }
        thresholds = {"false_match_rate": rate, "guaranteed_false_match_rate": bound, "tau": tau,
                      "tau_note": tau_note, "k": k_eff, "n_calibration_identities": n_cal, "fail_on": p["fail_on"],
                      "significance": float(p["significance"]),
                      "min_auc": float(p["min_auc"]), "min_reid_rate": float(p["min_reid_rate"])}
        data = {"histograms": _histograms(s_score, impostor, genuine, probe_scores, tau), "roc": roc}
        status, reason = self._decide(plan, verification, controls, n_flag, n_syn, p_excess, tau, bound)
        return self.result(status, reason, metrics=metrics, thresholds=thresholds, flagged=tuple(findings),
                           controls=tuple(controls), data=data)

    # ------------------------------------------------------------ network

    def _config(self, ctx):
        from audit.reidentification.network import resolve_config

        preset = self.params["preset"]
        if preset == "auto":
            preset = "gpu" if ctx.torch_device.type == "cuda" else "cpu"
        overrides = {k: self.params[k] for k in NETWORK_KEYS}
        overrides["backbone_weights"] = self.params["backbone_weights"]
        return resolve_config(preset, overrides), preset

    def _cache_key(self, ctx, plan: Plan, cfg) -> str:
        real = ctx.real
        ranks = np.unique(plan.gallery_ids[plan.train], return_inverse=True)[1]
        geo = ctx.geometry
        blob = json.dumps({
            "synthgate": __version__, "real": real.digest, "mode": plan.mode, "seed": ctx.seed,
            "geometry": [geo.height, geo.width, geo.channels],
            "config": {k: v for k, v in cfg.to_dict().items() if k != "backbone_weights"},
            "train": hashlib.sha256("\n".join(f"{real.records[int(i)].key}\t{int(r)}" for i, r in
                                              zip(plan.train, ranks)).encode()).hexdigest(),
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _network(self, ctx, plan: Plan, cfg, preset: str):
        """The trained network from the cache (keyed by training data and settings), or trained now."""
        from audit.reidentification.network import load_network, save_network, train_network

        key = self._cache_key(ctx, plan, cfg)
        folder = ctx.model_cache("reidentification", key[:32])
        settings = {k: v for k, v in cfg.to_dict().items() if k != "backbone_weights"}  # no local paths in outputs
        info = {"preset": preset, **settings, "backbone_weights": "local file" if cfg.backbone_weights else None,
                "cache_key": key[:16]}
        loaded = load_network(folder, cfg, ctx.torch_device)
        if loaded is not None:
            model, meta = loaded
            return model, {**info, "cached": True, "training": meta.get("training", {})}
        images = prepare_set(ctx, ctx.real, plan.train, cfg)
        ranks = np.unique(plan.gallery_ids[plan.train], return_inverse=True)[1]
        model, history = train_network(images, ranks, cfg, ctx.torch_device,
                                       ctx.torch_generator("reidentification.train"),
                                       ctx.rng("reidentification.batches"), progress=ctx.progress)
        if folder is not None:
            save_network(folder, model, {"config": cfg.to_dict(), "training": history, "mode": plan.mode,
                                         "synthgate": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return model, {**info, "cached": False, "training": history}

    # ---------------------------------------------------------- embeddings

    def _embed_all(self, ctx, model, cfg, plan: Plan) -> dict:
        bs = int(self.params["embed_batch_size"])
        gallery = embed_set(ctx, model, cfg, ctx.real, np.arange(len(ctx.real)), bs, "training set")

        def queries(q: Queries, what: str) -> Embedded:
            # images of the real set are embedded already, in the gallery
            if q.imageset is ctx.real:
                return Embedded(gallery[q.indices], q.ids, q.self_index)
            e = embed_set(ctx, model, cfg, q.imageset, q.indices, bs, what)
            return Embedded(e, q.ids, q.self_index)

        out = {"gallery": gallery, "calibration": queries(plan.calibration, "calibration"),
               "synthetic": embed_set(ctx, model, cfg, ctx.synthetic, np.arange(len(ctx.synthetic)), bs, "synthetic")}
        if plan.probes:
            out["probes"] = Embedded.concat([queries(q, "probes") for q in plan.probes])
        n = min(int(self.params["control_images"]), len(plan.train))
        src = np.sort(ctx.rng("reidentification.control").choice(plan.train, n, replace=False))
        out["augmented"] = Embedded(embed_set(ctx, model, cfg, ctx.real, src, bs, "control", augmented=True,
                                              generator=ctx.torch_generator("reidentification.control")),
                                    plan.gallery_ids[src], src)
        cal = plan.calibration
        if plan.mode == "image" or not _has_genuine(cal.ids):
            out["views"] = embed_set(ctx, model, cfg, cal.imageset, cal.indices, bs, "views", augmented=True,
                                     generator=ctx.torch_generator("reidentification.views"))
        return out

    # -------------------------------------------------------- verification

    def _verification(self, ctx, plan: Plan, emb: dict):
        """AUC, mAP@R and P@1 on the calibration (unseen) identities; ``(metrics, roc, genuine best scores)``."""
        p = self.params
        cal = emb["calibration"]
        rng = ctx.rng("reidentification.verification")
        n_boot = int(p["n_boot"])
        if "views" in emb:  # genuine pairs: an image and an augmented view of it
            views = emb["views"]
            i, j = _pairs(cal.ids, True, int(p["max_pairs"]), rng)
            scores = np.einsum("nd,nd->n", views[i], cal.emb[j])
            genuine_pairs = cal.ids[i] == cal.ids[j]
            retrieval = retrieval_metrics(views, cal.ids, cal.emb, cal.ids, n_boot, rng)
            genuine = np.einsum("nd,nd->n", views, cal.emb)
            pairs = "an unseen image and an augmented view of it (no held-out patient has two images)"
            if plan.mode == "image":
                pairs = "an unseen image and an augmented view of it (image-level identity)"
        else:
            i, j = _pairs(cal.ids, False, int(p["max_pairs"]), rng)
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
        passed = min(p_values) >= float(self.params["significance"]) / 2
        verdict = ("consistent with the false-match rate" if passed else
                   f"significantly more than the false-match rate (p = {min(p_values):.2g}): the threshold does not "
                   "hold on unseen patients")
        detail = (f"one image per unseen patient: {id_hits} of {id_total} matched a training patient above a "
                  f"threshold calibrated on the other half of the unseen patients (guaranteed <= "
                  f"{100 * float(np.mean(bounds)):.2g}%, target {100 * rate:g}%): {verdict}; all their images: {hits} "
                  f"of {total} ({100 * hits / max(total, 1):.1f}%, which moves by whole patients: images of one "
                  "patient are alike)")
        return Control("unseen patients (cross-fitted)", "negative", passed, detail,
                       {"flagged_images": _rate(hits, total, note="two-fold by identity"),
                        "flagged_identities": _rate(id_hits, id_total, note="one image per identity"),
                        "guaranteed_rate": float(np.mean(bounds)), "p_values": p_values})

    def _positive_controls(self, plan: Plan, emb: dict, tau: float) -> tuple[list[Control], np.ndarray | None]:
        """Augmented training images, and new images of training patients (probes) when there are any."""
        need = float(self.params["min_reid_rate"])
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

    def _synthetic_retrieval(self, ctx, plan: Plan, emb: dict) -> dict:
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
        res = retrieval_metrics(emb["synthetic"][known], q_ids, emb["gallery"], plan.gallery_ids,
                                int(self.params["n_boot"]), ctx.rng("reidentification.synthetic_retrieval"))
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
        p = self.params
        level = float(p["significance"])
        negative = [c for c in controls if c.kind == "negative"]
        weak = [c for c in controls if c.kind == "positive" and not c.passed]
        auc = verification["auc"].value
        tail = f" ({plan.notes[0]})" if plan.mode == "image" else ""
        excess = p_excess < level
        if not all(c.passed for c in negative):
            return "inconclusive", f"the threshold does not hold its false-match rate on unseen patients: " \
                                   f"{negative[0].detail}{tail}"
        if (p["fail_on"] == "any" and n_flag) or excess:
            why = (f"more than the {n_syn * bound:.1f} expected by chance (p = {p_excess:.2g})"
                   if excess else "fail_on = any")
            return "fail", f"{n_flag} of {n_syn} synthetic images are re-identified as training " \
                           f"{'patients' if plan.mode == 'patient' else 'images'} (similarity > {tau:.4f}), {why}{tail}"
        auc_ok = auc is not None and np.isfinite(auc) and auc >= float(p["min_auc"])
        if not auc_ok or weak:
            problems = [] if auc_ok else [f"verification AUC {auc:.3f} < {p['min_auc']}" if auc is not None
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


def _has_genuine(ids: np.ndarray) -> bool:
    return bool((np.unique(ids, return_counts=True)[1] >= 2).any())


def _positive(name: str, hit: np.ndarray, score: np.ndarray, need: float, what: str) -> Control:
    n, k = len(hit), int(hit.sum())
    rate = _rate(k, n)
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
