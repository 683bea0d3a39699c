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
  ``alpha / k``) lower bound exceeds a limit on the whole sample;
- *passes* only when every attack's point estimate is within the limits on
  the whole sample (the optimistic maximum, so the pass is conservative),
  or, with ``judge: interval``, every simultaneous upper bound is;
- is *inconclusive* in between (an attack beyond a limit that the held-out
  half does not confirm), when the policy's metric cannot be resolved with
  this many non-members, or when a negative control fails.

Controls: planted near-copies of half the members in an in-memory copy of
the synthetic set must make the pixel DCR attack fail the policy (scenario 1);
a tiny model overfit on a handful of real images must be caught by every
model-attack family (scenario 2); two halves of the unseen images must look
alike to every attack (null control); and an attack with no access to the
synthetic data or the model must not separate members from non-members
(holdout exchangeability: otherwise the holdout is not from the training
population and every attack's AUC mixes leakage with that shift).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthgate.errors import InputError
from synthgate.imageset import Geometry, ImageSet
from synthgate.privacy import hash_id
from synthgate.progress import progress_bar

from .base import Check, CheckResult, Control, Estimate
from .stats import bootstrap_roc, percentile_ci, roc_auc, roc_points, tpr_at_fpr

SYNTHETIC_ATTACKS = ("dcr_pixel", "dcr_embedding", "domias")
MODEL_ATTACKS = ("loss", "pia", "secmi")
FPRS = (0.01, 0.001)
FPR_KEYS = {0.01: "tpr_at_1pct_fpr", 0.001: "tpr_at_0.1pct_fpr"}
JUDGE = ("point", "interval")


# ------------------------------------------------------------------ values


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
                    f"not resolvable: {self.n_nonmembers} non-members cannot resolve FPR {_pct(fpr)} (needs at least "
                    f"{math.ceil(1 / fpr):,}, about {math.ceil(10 / fpr):,} for a stable estimate); TPR at zero "
                    f"false positives is {self.tpr_zero_fp:.3f}"))
        return out


@dataclass(frozen=True)
class Sample:
    """The balanced, seeded evaluation sample and its splits (members first, then non-members)."""

    members: np.ndarray  # indices into the real set
    nonmembers: np.ndarray  # indices into the holdout
    fold: np.ndarray  # (2n,) DOMIAS cross-fitting fold of each evaluated image
    select: np.ndarray  # (2n,) True: in the half that chooses the deciding attack
    null_a: np.ndarray  # (2n,) non-members playing "members" in the null control
    null_b: np.ndarray  # (2n,) the other non-members
    holdout_fold: np.ndarray  # fold of every holdout image (its patient's)
    groups: np.ndarray  # (2n,) patient (or image) of each evaluated image: the bootstrap resamples these

    @property
    def labels(self) -> np.ndarray:
        return np.r_[np.ones(len(self.members), np.int8), np.zeros(len(self.nonmembers), np.int8)]

    @property
    def n(self) -> int:
        return len(self.members)


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


# ------------------------------------------------------------------ statistics


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
            name, lo, chance = f"TPR at {_pct(key)} FPR", m.tpr_ci[key][0], key
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


def group_split(groups: list, rng: np.random.Generator) -> np.ndarray:
    """Split items into two halves of (nearly) equal size without splitting a group; True = first half."""
    order: dict = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    keys = list(order)
    out = np.zeros(len(groups), bool)
    size = [0, 0]
    shuffled = rng.permutation(len(keys))
    # largest groups first (random order among equals), each to the smaller half: balanced halves
    for j in sorted(shuffled, key=lambda j: -len(order[keys[j]])):
        part = 0 if size[0] <= size[1] else 1
        idx = order[keys[j]]
        out[idx] = part == 0
        size[part] += len(idx)
    return out


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

    @classmethod
    def default_params(cls) -> dict:
        return {
            "max_auc": 0.6, "max_tpr_at_1pct_fpr": 0.05, "max_tpr_at_0_1pct_fpr": None, "judge": "point",
            "n_samples": 1000, "n_boot": 1000, "alpha": 0.05, "control_alpha": 0.01,
            "synthetic_attacks": list(SYNTHETIC_ATTACKS), "model_attacks": list(MODEL_ATTACKS),
            "run_model_attacks": True, "dcr_grid": 1, "embedding_weights": None, "density_dims": 5,
            "timesteps": [50, 100, 200, 300], "noise_draws": 4, "pia_timesteps": [100, 200], "pia_p": 4,
            "secmi_t": 100, "secmi_k": 10, "resize_for_model": False, "batch_size": 64, "query_chunk_mb": 256,
            "model_batch_rows": "auto",
            "control_fraction": 0.5, "control_model": True, "control_model_images": 8,
            "control_model_nonmembers": 56, "control_model_resolution": 16, "control_model_steps": 150,
        }

    def __init__(self, **params):
        super().__init__(**params)
        try:
            self._validate()
        except (TypeError, ValueError) as exc:
            if str(exc).startswith("membership_inference:"):
                raise ValueError(str(exc)) from exc
            raise ValueError(f"membership_inference: a setting has the wrong type ({exc})") from exc

    def _validate(self) -> None:
        p = self.params
        for key in ("synthetic_attacks", "model_attacks", "timesteps", "pia_timesteps"):
            if not isinstance(p[key], (list, tuple)):
                raise ValueError(f"membership_inference: {key} must be a list, e.g. [{p[key]}]")
        for key in ("max_auc",):
            if p[key] is not None and not 0.5 <= float(p[key]) < 1:
                raise ValueError(f"membership_inference: {key} must be in [0.5, 1) or null")
        for key in ("max_tpr_at_1pct_fpr", "max_tpr_at_0_1pct_fpr"):
            if p[key] is not None and not 0 <= float(p[key]) < 1:
                raise ValueError(f"membership_inference: {key} must be in [0, 1) or null")
        if p["judge"] not in JUDGE:
            raise ValueError(f"membership_inference: judge {p['judge']!r} must be one of {', '.join(JUDGE)}")
        for key, allowed in (("synthetic_attacks", SYNTHETIC_ATTACKS), ("model_attacks", MODEL_ATTACKS)):
            bad = [a for a in p[key] if a not in allowed]
            if bad:
                raise ValueError(f"membership_inference: {key} {bad[0]!r} must be one of {', '.join(allowed)}")
        if p["model_batch_rows"] != "auto" and int(p["model_batch_rows"]) < 1:
            raise ValueError("membership_inference: model_batch_rows must be 'auto' or a positive number")
        if int(p["n_samples"]) < 4 or int(p["n_boot"]) < 100:
            raise ValueError("membership_inference: n_samples must be >= 4 and n_boot >= 100")
        if not 0 < float(p["alpha"]) < 0.5 or not 0 < float(p["control_alpha"]) < 0.5:
            raise ValueError("membership_inference: alpha and control_alpha must be in (0, 0.5)")
        if not 0 < float(p["control_fraction"]) <= 1:
            raise ValueError("membership_inference: control_fraction must be in (0, 1]")
        if int(p["noise_draws"]) < 1 or int(p["secmi_k"]) < 1 or int(p["secmi_t"]) <= int(p["secmi_k"]):
            raise ValueError("membership_inference: noise_draws and secmi_k must be >= 1, secmi_t > secmi_k")
        if any(int(t) < 0 for t in p["timesteps"]) or any(int(t) < 1 for t in p["pia_timesteps"]):
            raise ValueError("membership_inference: timesteps must be >= 0 and pia_timesteps >= 1")

    @property
    def limits(self) -> dict:
        p = self.params
        return {"auc": p["max_auc"], 0.01: p["max_tpr_at_1pct_fpr"], 0.001: p["max_tpr_at_0_1pct_fpr"]}

    # ---------------------------------------------------------------- sample

    def _sample(self, ctx) -> Sample:
        real, hold = ctx.real, ctx.holdout
        rng = ctx.rng("membership_inference.sample")
        n = min(int(self.params["n_samples"]), len(real), len(hold))
        hold_groups = _groups(hold)
        holdout_fold = (~group_split(hold_groups, rng)).astype(np.int8)
        nonmembers = np.sort(rng.choice(len(hold), size=n, replace=False))
        members = np.sort(rng.choice(len(real), size=n, replace=False))
        nm_fold = holdout_fold[nonmembers]
        m_fold = rng.permutation(np.sort(nm_fold))  # the same fold sizes for members
        real_groups = _groups(real)
        m_select = group_split([real_groups[i] for i in members], rng)
        nm_select = group_split([hold_groups[i] for i in nonmembers], rng)
        null_a = np.zeros(2 * n, bool)
        for f in (0, 1):  # each null half takes half of each fold, so fold effects cancel
            where = np.nonzero(nm_fold == f)[0]
            half = group_split([hold_groups[nonmembers[i]] for i in where], rng)
            null_a[n + where[half]] = True
        null_b = np.r_[np.zeros(n, bool), np.ones(n, bool)] & ~null_a
        groups = np.array([f"m:{real_groups[i]}" for i in members] + [f"h:{hold_groups[i]}" for i in nonmembers],
                          object)
        return Sample(members, nonmembers, np.r_[m_fold, nm_fold], np.r_[m_select, nm_select], null_a, null_b,
                      holdout_fold, groups)

    # ---------------------------------------------------------------- scenario 1

    def _encoder(self, ctx):
        if self.params["embedding_weights"]:
            from .embeddings import ImageEncoder

            enc = ImageEncoder(self.params["embedding_weights"], ctx.torch_device)
            enc.name = f"open_clip:{enc.name}"
            return enc
        from .mia_attacks import RandomConvFeatures

        return RandomConvFeatures(ctx.geometry.channels, ctx.torch_generator("membership_inference.embedding"),
                                  ctx.torch_device)

    def _stream(self, ctx, imageset: ImageSet, indices, what: str):
        bs = int(self.params["batch_size"])
        idx = list(range(len(imageset))) if indices is None else [int(i) for i in indices]
        return progress_bar(ctx.batches(imageset, bs, idx), desc=f"membership: {what}", unit="batch",
                            enabled=ctx.progress, total=math.ceil(len(idx) / bs))

    def _planted(self, ctx, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Near-copies of a random ``control_fraction`` of the members (in memory only) and which members."""
        from .copy_detection import TRANSFORMS, SetLoader, plant

        rng = ctx.rng("membership_inference.plant")
        k = max(1, int(round(float(self.params["control_fraction"]) * sample.n)))
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
        size = max(1, int(self.params["query_chunk_mb"]) * (1 << 20) // per)
        items = [(ctx.real, int(i)) for i in sample.members] + [(ctx.holdout, int(i)) for i in sample.nonmembers]
        bs = int(self.params["batch_size"])
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
        from .copy_detection import SetLoader
        from .mia_attacks import nearest_rms
        from .tiled import ExactTiledSearch, TiledMetric, TileLayout

        p, geo, dev = self.params, ctx.geometry, ctx.torch_device
        grid = int(p["dcr_grid"])
        bs = int(p["batch_size"])
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
        from .mia_attacks import nearest_distance, pca_basis

        p = self.params
        attacks = list(p["synthetic_attacks"])
        encoder = self._encoder(ctx)
        # embeddings are needed even without embedding attacks: the exchangeability control uses them
        s_emb = np.concatenate([encoder(b) for _, b in self._stream(ctx, ctx.synthetic, None, "synthetic")])
        p_emb = encoder(planted)
        # every holdout image is embedded once: non-members are among them, and each fold is the other's reference
        h_emb = np.concatenate([encoder(b) for _, b in self._stream(ctx, ctx.holdout, None, "holdout")])
        refs = [h_emb[sample.holdout_fold == f] for f in (0, 1)]
        d_pix, d_plant, m_emb = self._pixel_dcr(ctx, sample, planted, encoder)
        d_pix_planted = np.minimum(d_pix, d_plant)
        q_emb = np.concatenate([*m_emb, h_emb[sample.nonmembers]])
        d_emb = nearest_distance(q_emb, s_emb)
        d_emb_planted = np.minimum(d_emb, nearest_distance(q_emb, p_emb))

        planted_scores = {"dcr_pixel": -d_pix_planted, "dcr_embedding": -d_emb_planted}
        if "dcr_pixel" in attacks:
            run.add("dcr_pixel", 1, -d_pix)
        if "dcr_embedding" in attacks:
            run.add("dcr_embedding", 1, -d_emb)
        if "domias" in attacks:
            try:
                basis = pca_basis(s_emb, int(p["density_dims"]))  # one projection, fitted on what is released
                run.add("domias", 1, self._domias(q_emb, s_emb, refs, sample.fold, basis))
                planted_scores["domias"] = self._domias(q_emb, np.concatenate([s_emb, p_emb]), refs, sample.fold, basis)
            except ValueError as exc:
                run.skipped["domias"] = str(exc)
        # an attack that sees neither the synthetic data nor the model: distance to the (other-fold) reference
        exch = np.empty(len(q_emb))
        for f in (0, 1):
            rows = sample.fold == f
            exch[rows] = -nearest_distance(q_emb[rows], refs[1 - f]) if len(refs[1 - f]) else 0.0
        run.info["scenario_1"] = {
            "n_synthetic": len(ctx.synthetic), "embedding": encoder.name, "dcr_grid": int(p["dcr_grid"]),
            "density_dims": int(p["density_dims"]), "reference_per_fold": [len(r) for r in refs],
        }
        run.info["exchangeability_scores"] = exch
        return planted_scores

    def _domias(self, q_emb, s_emb, refs, fold, basis) -> np.ndarray:
        """DOMIAS, cross-fitted: images of fold f are scored against the reference density of the other fold."""
        from .mia_attacks import density_ratio_scores

        out = np.empty(len(q_emb))
        for f in (0, 1):
            rows = fold == f
            if rows.any():
                out[rows] = density_ratio_scores(q_emb[rows], s_emb, refs[1 - f], basis=basis)
        return out

    # ---------------------------------------------------------------- scenario 2

    def _model_geometry(self, ctx) -> Geometry | None:
        """Check up front (cheap) that the model can be attacked with these images; ``None`` when not run."""
        if ctx.model is None or not self.params["run_model_attacks"] or not self.params["model_attacks"]:
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
        if self.params["resize_for_model"]:
            return geo
        for set_ in (ctx.real, ctx.holdout):
            bad = next((r for r in set_.records if (r.height, r.width, r.channels) != (res, res, chans)), None)
            if bad is not None:
                raise InputError(
                    f"the model was trained on {chans}x{res}x{res} images but {set_.root.name}/{bad.key} is "
                    f"{bad.channels}x{bad.height}x{bad.width}; the model attacks need the images as the model saw them "
                    "(set membership_inference.resize_for_model=true if its trainer resized them this way)", ctx.model)
        return geo

    def _check_timesteps(self, model) -> None:
        p, total = self.params, model.num_train_timesteps
        wanted = [int(t) for t in p["timesteps"]] + [int(t) for t in p["pia_timesteps"]] + [int(p["secmi_t"])]
        bad = [t for t in wanted if t >= total]
        if bad:
            raise InputError(f"timestep {bad[0]} is outside the model's {total}-step schedule "
                             "(membership_inference.timesteps, pia_timesteps, secmi_t)", model.path)

    def _model_scores(self, ctx, model, images: list[tuple[ImageSet, np.ndarray]], geo: Geometry, what: str,
                      purpose: str) -> dict[str, np.ndarray]:
        """Run the model attacks on images from ``(set, indices)`` pairs; returns ``{attack: scores}``."""
        from .mia_attacks import auto_batch_rows

        p = self.params
        bs = int(p["batch_size"])
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
                rows = (auto_batch_rows(x0.device, x0[0].numel()) if p["model_batch_rows"] == "auto"
                        else int(p["model_batch_rows"]))
                for name, scores in self._attack_batch(model, x0, cl, gen, rows).items():
                    parts.setdefault(name, []).append(scores)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _attack_batch(self, model, x0, cl, gen, rows) -> dict[str, np.ndarray]:
        from .mia_attacks import loss_scores, pia_scores, secmi_scores

        p, out = self.params, {}
        if "loss" in p["model_attacks"]:
            ts = [int(t) for t in p["timesteps"]]
            s = loss_scores(model, x0, cl, ts, int(p["noise_draws"]), gen, rows)
            out.update({f"loss_t{t}": s[:, j] for j, t in enumerate(ts)})
        if "pia" in p["model_attacks"]:
            ts = [int(t) for t in p["pia_timesteps"]]
            s = pia_scores(model, x0, cl, ts, float(p["pia_p"]), rows)
            for j, t in enumerate(ts):
                out[f"pia_t{t}"], out[f"pia_t{t}_rev"] = s[:, j], -s[:, j]
        if "secmi" in p["model_attacks"]:
            s = secmi_scores(model, x0, cl, int(p["secmi_t"]), int(p["secmi_k"]), rows)
            out[f"secmi_t{int(p['secmi_t'])}"], out[f"secmi_t{int(p['secmi_t'])}_rev"] = s, -s
        return out

    def _scenario2(self, ctx, sample: Sample, run: AttackRun, geo: Geometry):
        from generators.loading import load_model

        model = load_model(ctx.model, ctx.torch_device)
        self._check_timesteps(model)
        scores = self._model_scores(ctx, model, [(ctx.real, sample.members), (ctx.holdout, sample.nonmembers)], geo,
                                    "model attacks", "model")
        for name, s in scores.items():
            run.add(name, 2, s)
        run.info["scenario_2"] = {
            "model": str(ctx.model), "resolution": model.resolution, "image_channels": model.image_channels,
            "latent": model.latent, "num_train_timesteps": model.num_train_timesteps,
            "prediction_type": model.prediction_type, "conditional": model.labels is not None,
            "forward_passes_per_image": self._passes_per_image(),
        }
        return model

    def _passes_per_image(self) -> dict:
        p, out = self.params, {}
        if "loss" in p["model_attacks"]:
            out["loss"] = len(p["timesteps"]) * int(p["noise_draws"])
        if "pia" in p["model_attacks"]:
            out["pia"] = 1 + len(p["pia_timesteps"])
        if "secmi" in p["model_attacks"]:
            out["secmi"] = int(p["secmi_t"]) // int(p["secmi_k"]) + 1
        return out

    # ---------------------------------------------------------------- controls

    def _detected(self, m: RocMetrics) -> bool:
        """A control leak is caught when the policy would fail it, on evidence above chance."""
        return bool(exceeded(m, self.limits, above_chance=True))

    def _planted_control(self, ctx, sample: Sample, planted_scores: dict, chosen: np.ndarray) -> Control:
        y = sample.labels
        n_boot = int(self.params["n_boot"])
        res = {name: roc_metrics(s, y, n_boot=n_boot, rng=ctx.rng(f"membership_inference.planted.{name}"),
                                 groups=sample.groups) for name, s in planted_scores.items()}
        m = res["dcr_pixel"]
        ok = self._detected(m)
        detail = (f"near-copies of {len(chosen)} of {sample.n} members planted in a copy of the synthetic set "
                  f"(never written): pixel DCR AUC {m.auc:.3f} [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}]"
                  + (f", TPR at 1% FPR {m.tpr[0.01]:.3f}" if m.tpr.get(0.01) is not None else "")
                  + ("; the policy would fail this leak" if ok else "; NOT caught: the attack or the limits cannot "
                     "detect even this leak"))
        return Control("planted near-copies (synthetic-set attacks)", "positive", ok, detail,
                       {k: {kk: v.to_dict() for kk, v in r.estimates().items()} for k, r in res.items()})

    def _model_control(self, ctx, model) -> Control:
        """Overfit a tiny model on a few real images and require every model-attack family to catch them.

        Its non-members are other real images and holdout images (both unseen
        by the control model).  It copies the audited model's noise schedule,
        prediction type and conditioning, at a small resolution.
        """
        from .mia_control import control_model

        p = self.params
        real, hold = ctx.real, ctx.holdout
        m = min(int(p["control_model_images"]), len(real) // 2)
        if m < 2:
            return Control("overfit model (model attacks)", "positive", False,
                           f"the training set has {len(real)} images; the model control needs at least 4")
        rng = ctx.rng("membership_inference.model_control")
        order = rng.permutation(len(real))
        members = np.sort(order[:m])
        pool = [(0, int(i)) for i in order[m:]] + [(1, int(j)) for j in range(len(hold))]
        take = [pool[i] for i in np.sort(rng.permutation(len(pool))[: int(p["control_model_nonmembers"])])]
        nonmembers = [(real, np.array([i for s_, i in take if s_ == 0], int)),
                      (hold, np.array([i for s_, i in take if s_ == 1], int))]
        side = min(int(p["control_model_resolution"]), model.resolution)
        cgeo = Geometry(side, side, model.image_channels)
        images = np.concatenate([b for _, b in real.iter_batches(64, cgeo, [int(i) for i in members])])
        labels = [real.records[int(i)].label for i in members] if model.labels is not None else None
        classes = sorted({r.label for r in real.records} | {r.label for r in hold.records}) if labels else None
        wanted = [int(t) for t in p["timesteps"]] + [int(t) for t in p["pia_timesteps"]] + [int(p["secmi_t"])]
        settings = {"steps": int(p["control_model_steps"]), "seed": int(rng.integers(0, 2**31)), "lr": 3e-3,
                    "batch": 16, "widths": [8, 16], "max_timestep": min(model.num_train_timesteps - 1,
                                                                         max(wanted) * 3 // 2)}
        cache = ctx.model_cache("membership_inference_control")
        cmodel, cached = control_model(images, labels, classes, model.scheduler.config, settings, ctx.torch_device,
                                       cache)
        scores = self._model_scores(ctx, cmodel, [(real, members), *[nm for nm in nonmembers if len(nm[1])]], cgeo,
                                    "model control", "model_control")
        n_non = len(take)
        y = np.r_[np.ones(m), np.zeros(n_non)]
        rg, hg = _groups(real), _groups(hold)
        groups = ([f"r:{rg[i]}" for i in members] + [f"r:{rg[i]}" for i in nonmembers[0][1]]
                  + [f"h:{hg[i]}" for i in nonmembers[1][1]])
        res = {name: roc_metrics(s, y, n_boot=int(p["n_boot"]), groups=groups,
                                 rng=ctx.rng(f"membership_inference.model_control.{name}")) for name, s in scores.items()}
        families, caught = {}, []
        for fam in p["model_attacks"]:
            best = max((n for n in res if n.startswith(fam + "_")), key=lambda n: (res[n].auc, n))
            families[fam] = best
            if self._detected(res[best]):
                caught.append(fam)
        ok = len(caught) == len(families)
        parts = [f"{fam}: {best} AUC {res[best].auc:.3f} [{res[best].auc_ci[0]:.3f}, {res[best].auc_ci[1]:.3f}]"
                 + ("" if fam in caught else " NOT caught") for fam, best in families.items()]
        detail = (f"tiny model overfit on {m} real images at {side}x{side} ({'cached' if cached else 'trained now'}; "
                  f"never written to the outputs), {n_non} unseen real images as non-members: " + "; ".join(parts))
        return Control("overfit model (model attacks)", "positive", ok, detail,
                       {"members": m, "nonmembers": n_non, "resolution": side, "best": families,
                        "attacks": {k: {kk: v.to_dict() for kk, v in r.estimates().items()} for k, r in res.items()}})

    def _null_control(self, ctx, sample: Sample, run: AttackRun) -> Control:
        """Two halves of the unseen images as "members" and "non-members": every attack must sit at chance."""
        base = [n for n in run.scores if not n.endswith("_rev")]  # a reversed attack has the mirrored AUC
        level = float(self.params["control_alpha"])
        y = np.r_[np.ones(int(sample.null_a.sum())), np.zeros(int(sample.null_b.sum()))]
        off, table = [], {}
        for name in base:
            s = run.scores[name]
            m = roc_metrics(np.r_[s[sample.null_a], s[sample.null_b]], y, k=len(base), alpha=level,
                            n_boot=int(self.params["n_boot"]), rng=ctx.rng(f"membership_inference.null.{name}"),
                            groups=np.r_[sample.groups[sample.null_a], sample.groups[sample.null_b]])
            lo, hi = m.auc_simultaneous
            table[name] = {"auc": round(m.auc, 4), "interval": [round(lo, 4), round(hi, 4)]}
            if not lo <= 0.5 <= hi:
                off.append(f"{name} AUC {m.auc:.3f} [{lo:.3f}, {hi:.3f}]")
        detail = (f"{int(sample.null_a.sum())} vs {int(sample.null_b.sum())} unseen images; every attack's "
                  f"{1 - level / max(len(base), 1):.2%} simultaneous interval "
                  + ("contains 0.5" if not off else f"must contain 0.5 but: {'; '.join(off)}"))
        return Control("null: unseen vs unseen", "null", not off, detail, {"attacks": table})

    def _exchangeability_control(self, ctx, sample: Sample, run: AttackRun) -> Control:
        s = run.info.pop("exchangeability_scores")
        level = float(self.params["control_alpha"])
        m = roc_metrics(s, sample.labels, alpha=level, n_boot=int(self.params["n_boot"]),
                        rng=ctx.rng("membership_inference.exchangeability"), groups=sample.groups)
        ok = m.auc_ci[0] <= 0.5 <= m.auc_ci[1]
        detail = (f"distance to the other fold's holdout images, which needs neither the synthetic set nor the model: "
                  f"AUC {m.auc:.3f}, {1 - level:.0%} interval [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}]"
                  + ("" if ok else "; the holdout does not look like the training set, so every attack's result "
                     "mixes membership with that difference"))
        return Control("holdout exchangeability", "negative", ok, detail, {"auc": Estimate(m.auc, m.auc_ci,
                                                                                           2 * sample.n).to_dict()})

    # ---------------------------------------------------------------- run

    def run(self, ctx) -> CheckResult:
        p = self.params
        model_geo = self._model_geometry(ctx)  # bad model inputs fail now, before any work
        sample = self._sample(ctx)
        if sample.n < 4:
            return self.result("inconclusive", f"only {sample.n} member/non-member pairs can be drawn (training set "
                               f"{len(ctx.real)}, holdout {len(ctx.holdout)} images); at least 4 are needed")
        run = AttackRun()
        controls: list[Control] = []
        planted, chosen = self._planted(ctx, sample)
        planted_scores = self._scenario1(ctx, sample, run, planted)
        del planted
        controls.append(self._planted_control(ctx, sample, planted_scores, chosen))
        if model_geo is not None:
            model = self._scenario2(ctx, sample, run, model_geo)
            if p["control_model"]:
                controls.append(self._model_control(ctx, model))
        controls.append(self._null_control(ctx, sample, run))
        controls.append(self._exchangeability_control(ctx, sample, run))
        return self._decide(ctx, sample, run, controls)

    def _scenario2_note(self, ctx) -> str:
        if ctx.model is None:
            return "scenario 2 (model released) was not run: no model was given (--model)"
        if not self.params["run_model_attacks"] or not self.params["model_attacks"]:
            return "scenario 2 (model released) was not run: model attacks are switched off by the policy"
        return ""

    def _evaluate(self, ctx, sample: Sample, run: AttackRun) -> "Evidence":
        """Every attack on the whole sample, and the attack chosen on one half measured on the other."""
        p, limits, y = self.params, self.limits, sample.labels
        names = list(run.scores)
        k = len(names)
        n_boot, alpha = int(p["n_boot"]), float(p["alpha"])
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
        failed_neg = [c for c in controls if c.kind in ("null", "negative") and not c.passed]
        if failed_pos:
            return "error", "positive control failed: " + "; ".join(c.detail for c in failed_pos) + "; the audit is invalid"
        if failed_neg:
            return "inconclusive", "a negative control failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed_neg)
        if ev.confirmed or ev.significant:
            why = [f"{ev.chosen} (chosen on one half) on the held-out half: {', '.join(ev.confirmed)}"] if ev.confirmed else []
            sig = list(ev.significant.items())
            why += [f"{n}: simultaneous lower bound {', '.join(w)}" for n, w in sig[:3]]
            why += [f"and {len(sig) - 3} more attack(s)"] if len(sig) > 3 else []
            return "fail", "an attacker can tell training images from unseen ones: " + "; ".join(why)
        if ev.unresolved:
            f = ev.unresolved[0]
            return "inconclusive", (f"{sample.n} non-members cannot resolve TPR at {_pct(f)} FPR, which the policy "
                                    f"limits; give a holdout of at least {math.ceil(1 / f):,} images")
        if ev.beyond:
            n, w = next(iter(ev.beyond.items()))
            return "inconclusive", (f"{n} reaches {', '.join(w)} on the whole sample, but as the best of {k} attacks "
                                    "this is not confirmed on held-out data; more samples would decide")
        if model_ran and not self.params["control_model"]:
            return "inconclusive", ("no attack beats the limits, but the model-attack control is switched off "
                                    "(control_model), so nothing shows the model attacks could have caught a leak")
        if self.params["judge"] == "interval" and ev.upper:
            n, w = next(iter(ev.upper.items()))
            return "inconclusive", (f"every attack is within the limits, but {n}'s simultaneous upper bound is not "
                                    f"({', '.join(w)}); more samples would decide")
        best = max(ev.full, key=lambda n: ev.full[n].auc)
        reason = (f"no attack beats the limits: strongest AUC {ev.full[best].auc:.3f} ({best}) over {k} attack(s) "
                  f"on {sample.n} members vs {sample.n} non-members")
        if shared:
            return "warn", (reason + f"; but {shared} patient(s) have images in both the training set and the "
                            "holdout, which makes non-members look like members and understates the risk")
        return "pass", reason

    def _decide(self, ctx, sample: Sample, run: AttackRun, controls: list[Control]) -> CheckResult:
        p, y = self.params, sample.labels
        names = list(run.scores)
        note2 = self._scenario2_note(ctx)
        if not names:
            why = "; ".join(f"{n}: {w}" for n, w in run.skipped.items()) or "every attack is switched off"
            return self.result("inconclusive", f"no attack could run ({why}); {note2}".rstrip("; "),
                               controls=tuple(controls))
        ev = self._evaluate(ctx, sample, run)
        shared = _shared_patients(ctx.real, ctx.holdout)
        status, reason = self._status(ev, controls, sample, any(v == 2 for v in run.scenario.values()), shared)
        if note2:
            reason += f"; {note2}"
        k, alpha = len(names), float(p["alpha"])
        thresholds = {"max_auc": p["max_auc"], "max_tpr_at_1pct_fpr": p["max_tpr_at_1pct_fpr"],
                      "max_tpr_at_0_1pct_fpr": p["max_tpr_at_0_1pct_fpr"], "judge": p["judge"],
                      "alpha": alpha, "simultaneous_alpha": alpha / k, "control_alpha": float(p["control_alpha"])}
        data = {"roc": {n: roc_points(run.scores[n], y) for n in names},
                "histograms": {f"membership_inference: {ev.chosen} scores": _histogram(run.scores[ev.chosen], y)},
                "table": self._table(ev.full, ev.chosen)}
        self._write_csv(ctx, sample, run)
        return self.result(status, reason, metrics=self._metrics(sample, run, ev, shared), thresholds=thresholds,
                           controls=tuple(controls), data=data)

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
                         f"significance are simultaneous at {float(self.params['alpha']) / k:.4f} per attack"),
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


def _groups(imageset: ImageSet) -> list:
    return [r.patient_id if r.patient_id else f"image:{i}" for i, r in enumerate(imageset.records)]


def _shared_patients(real: ImageSet, hold: ImageSet) -> int:
    a = {r.patient_id for r in real.records if r.patient_id}
    b = {r.patient_id for r in hold.records if r.patient_id}
    return len(a & b)


def _histogram(scores: np.ndarray, labels: np.ndarray) -> dict:
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    lo, hi = float(np.min(s)), float(np.max(s))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    return {"edges": edges.round(6).tolist(), "members": np.histogram(s[y], edges)[0].tolist(),
            "non-members": np.histogram(s[~y], edges)[0].tolist(), "xlabel": "score (higher = more likely member)"}


def _pct(fpr: float) -> str:
    return f"{fpr * 100:g}%"
