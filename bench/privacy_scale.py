"""Benchmark: re-identification and membership inference at 1,000 x 10,000 and 10,000 x 100,000.

Each point (synthetic x real) runs in its own process on one torch thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) so its peak memory is
its own:

* images: 256 x 256 8-bit phantom-like arrays generated in memory with
  ``bench/copy_scale.py``'s :func:`phantoms` -- no files.  Real and holdout
  images come 4 to a patient (one anatomy per patient, each view shifted by
  up to 8 px, with its own contrast, brightness and noise); the holdout is
  ``--holdout-fraction`` (10 %) of the real set's size, of other patients;
  synthetic images are independent phantoms without patient IDs;
* the sets reach the checks as :class:`ArraySet`, an ``ImageSet`` whose
  stored pixels are those arrays: everything above the file decoder (the
  per-image ``load`` / ``iter_batches`` path, the audit context, the checks'
  own ``fit`` / ``score``) is the code a real audit runs; PNG decoding is
  not (``bench/copy_scale.py`` measures it: 2.25 ms per image serially);
* re-identification: ``Reidentification.fit`` then ``.score`` with default
  settings, every stage timed by wrapping the module functions the check
  calls (plan, preparing the training images, network training, embedding
  per set, each nearest-neighbour search, verification metrics, controls).
  Network training is the one stage shortened: the check's own
  ``train_network`` runs on a random subset of the training identities
  sized for ``--train-steps`` steps and one epoch (its ``epochs`` cap), and
  the default budget (0.5 steps per training image, at least 200, whole
  epochs, at most 100 epochs) is reported with its time **extrapolated**
  from the measured seconds per step and per validation pass.  The
  synthetic search (synthetic embeddings against every real one) is then
  compared with faiss ``IndexFlatIP`` and ``IndexFlatL2`` (one thread) on the
  same arrays: seconds, ratio, identical neighbours;
* membership inference: ``MembershipInference.score`` with default settings
  (``n_samples`` 1,000 members and 1,000 non-members; the three scenario-1
  attacks; no model, so no scenario 2), every stage and attack timed the
  same way, and the 95 % interval widths it reports;
* peak RSS (``ru_maxrss``) after generating the images and at the end.

    OMP_NUM_THREADS=1 .venv/bin/python bench/privacy_scale.py     # writes bench/results/privacy_scale.{md,json}
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from copy_scale import INPUT, phantoms

POINTS = ((1000, 10000), (10000, 100000))
#: training steps left out of the seconds-per-step figure (building the network, first allocations)
WARM_STEPS = 3

# ------------------------------------------------------------------------------------------------ data


def patient_phantoms(n: int, per_patient: int, seed: int, batch: int = 500) -> tuple[np.ndarray, list[str]]:
    """``(n, 256, 256)`` uint8 images, ``per_patient`` views of each patient's anatomy, and the patient IDs.

    A patient is one :func:`phantoms` image; each view is it shifted by up
    to 8 px, with contrast 0.9-1.1, brightness +-0.03 and fine noise cut
    from a noise field at a random offset (as :func:`phantoms` does).
    """
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    field = 0.01 * torch.randn((2 * INPUT, 2 * INPUT), generator=g)
    n_pat = math.ceil(n / per_patient)
    out = np.empty((n, INPUT, INPUT), np.uint8)
    pids: list[str] = []
    for c, s in enumerate(range(0, n_pat, batch)):
        b = min(batch, n_pat - s)
        base = torch.from_numpy(phantoms(b, seed * 100_003 + c, batch)).float() / 255.0
        for v in range(per_patient):
            k = sum((s + i) * per_patient + v < n for i in range(b))  # the last chunk may stop short
            if not k:
                continue
            shifts = torch.randint(-8, 9, (k, 2), generator=g).tolist()
            x = torch.stack([torch.roll(base[i], (dy, dx), (0, 1)) for i, (dy, dx) in enumerate(shifts)])
            contrast = 0.9 + 0.2 * torch.rand((k, 1, 1), generator=g)
            bright = -0.03 + 0.06 * torch.rand((k, 1, 1), generator=g)
            off = torch.randint(0, INPUT, (k, 2), generator=g).tolist()
            x.sub_(0.5).mul_(contrast).add_(bright + 0.5)
            for j, (y, xx) in enumerate(off):  # in place: no stacked noise array
                x[j].add_(field[y:y + INPUT, xx:xx + INPUT])
            first = s * per_patient + v
            out[first:first + per_patient * k:per_patient] = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8).numpy()
    for p in range(n_pat):
        pids += [f"{seed}-p{p:06d}"] * per_patient
    return out, pids[:n]


def make_arrayset(name: str, pixels: np.ndarray, patient_ids: list[str] | None):
    """An :class:`~synthgate.imageset.ImageSet` whose stored pixels are ``pixels`` (uint8 ``(N, H, W)``)."""
    from synthgate.imageset import ImageRecord, ImageSet

    class ArraySet(ImageSet):
        def __init__(self):  # no folder to scan: the records describe the arrays
            self.root = Path(f"/in-memory/{name}")
            self.skip_unreadable, self.max_pixels, self.extra_columns = False, None, ()
            self.cache, self._last, self._link_skips, self.skipped = None, None, [], []
            self._metadata_sha, self._metadata_columns = None, ["path"] + (["patient_id"] if patient_ids else [])
            self.label_source = "none"
            self.patient_source = "metadata.csv" if patient_ids else "none"
            self.pixels = pixels
            h, w = pixels.shape[1:]
            self.records = [ImageRecord(key=f"{i:06d}.png", path=f"{i:06d}.png", frame=0, n_frames=1, format="png",
                                        sha256=hashlib.sha256(f"{name}:{i}".encode()).hexdigest(), height=h,
                                        width=w, channels=1, bit_depth=8, source_mode="L",
                                        patient_id=patient_ids[i] if patient_ids else None)
                            for i in range(len(pixels))]
            self.digest = self._digest()

        def _stored(self, record):  # what the decoder (or the decode cache) would return: (frames, H, W, C)
            return self.pixels[int(record.path[:6])][None, :, :, None]

        def iter_batches(self, *a, **kw):  # the base class's loading, its time counted per set
            gen = ImageSet.iter_batches(self, *a, **kw)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(gen)
                except StopIteration:
                    CLOCK.add(f"load {name}", time.perf_counter() - t0)
                    return
                CLOCK.add(f"load {name}", time.perf_counter() - t0)
                yield item

    return ArraySet()


# ------------------------------------------------------------------------------------------ instrumentation


class Clock:
    """Seconds and calls per label, accumulated by the wrappers below."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.info: dict[str, list] = defaultdict(list)

    def add(self, label: str, dt: float) -> None:
        self.seconds[label] += dt
        self.calls[label] += 1

    @contextlib.contextmanager
    def stage(self, label: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(label, time.perf_counter() - t0)


CLOCK = Clock()
ORIGINAL: dict = {}


def wrap(obj, attr: str, label, keep=None):
    """Replace ``obj.attr`` by a timed call; ``label`` is a string or a function of the call's arguments."""
    fn = getattr(obj, attr)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        dt = time.perf_counter() - t0
        name = label(*a, **kw) if callable(label) else label
        CLOCK.add(name, dt)
        if keep is not None:
            keep(name, a, kw, out, dt)
        return out

    setattr(obj, attr, timed)
    return fn


def rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


# ----------------------------------------------------------------------------------------- re-identification


def reid_point(ctx, clock: Clock, train_steps: int, seed: int) -> dict:
    """The re-identification check's fit and score with its stages timed; training shortened (see module doc)."""
    import torch

    import audit.reidentification.check as rc
    import audit.reidentification.network as rn
    from audit.reidentification.check import Reidentification

    phase = {"now": "fit"}
    kept: dict = {}
    full_train: dict = {}

    wrap(rc, "make_plan", "reid: plan (roles)")
    wrap(rc, "prepare_set", "reid: prepare network inputs (train + validation)")

    def embed_label(ctx_, model, cfg, imageset, indices, bs, what, *a, **kw):
        return f"reid: embed {what}"

    def keep_embed(name, a, kw, out, dt):
        clock.info[name].append(len(out))
        if name == "reid: embed synthetic":
            kept["synthetic"] = out

    wrap(rc, "embed_set", embed_label, keep_embed)

    def search_label(q, g, *a, relation="any", **kw):
        if phase["now"] == "score":
            return "reid: search synthetic x real"
        return f"reid: search (fit, relation={relation})"

    def keep_search(name, a, kw, out, dt):
        clock.info[name].append([len(a[0]), len(a[1])])
        if name == "reid: search synthetic x real":
            kept["gallery"], kept["score"], kept["index"], kept["ours_s"] = a[1], out[0], out[1], dt

    wrap(rc, "best_match", search_label, keep_search)
    wrap(rc, "retrieval_metrics", "reid: retrieval metrics (mAP@R, P@1)")
    wrap(rc, "pair_auc", "reid: verification AUC + bootstrap")
    wrap(rc, "verification_pairs", "reid: verification pairs")
    wrap(rc.Reidentification, "_findings", "reid: findings + per-patient table")
    wrap(rn, "validation_scores", "reid: train: validation passes")

    real_batches = rn.IdentityBatches

    class TimedBatches(real_batches):
        def __init__(self, *a, **kw):
            t0 = time.perf_counter()
            super().__init__(*a, **kw)
            clock.add("reid: train: batch sampler set-up", time.perf_counter() - t0)

    rn.IdentityBatches = TimedBatches
    real_train = rn.train_network
    real_forward = rn.forward
    ticks: list[float] = []

    def ticking_forward(model, *a, **kw):  # one call per training step: the gaps between them are steps
        if model.training:
            ticks.append(time.perf_counter())
        return real_forward(model, *a, **kw)

    rn.forward = ticking_forward

    def shortened_train(images_u8, identities, cfg, device, generator, rng, progress=None, validation=None):
        """The default budget for the whole training set, then the check's trainer on a subset for one epoch."""
        n = len(identities)
        early = validation is not None and cfg.patience > 0 and len(np.unique(validation[1])) >= 2
        spe = max(rn.MIN_EPOCH_STEPS if early else 1, math.ceil(n / cfg.batch_size))  # as train_network does
        budget = cfg.step_budget(n)
        epochs = cfg.epochs if budget is None else min(cfg.epochs, max(1, math.ceil(budget / spe)))
        # the sampler's set-up on the whole set (the one part of a step's cost that depends on n)
        t0 = time.perf_counter()
        real_batches(identities, cfg.identities_per_batch, cfg.views, np.random.default_rng(seed))
        setup_full = time.perf_counter() - t0
        ids = np.unique(identities)
        if train_steps <= 0:  # the default training, whole
            t0 = time.perf_counter()
            model, hist = real_train(images_u8, identities, cfg, device, generator, rng, progress, validation)
            full_train.update({
                "training_images": int(n), "training_identities": len(ids), "batch_size": cfg.batch_size,
                "default_step_budget": budget, "steps_per_epoch": spe, "default_epochs": epochs,
                "default_steps": epochs * spe, "max_epochs": cfg.epochs, "full": True,
                "measured_steps": hist["steps"], "measured_s": round(time.perf_counter() - t0, 2),
                "epochs_run": hist["epochs_run"], "best_epoch": hist.get("best_epoch"), "stopped": hist["stopped"],
                "validation_s": round(clock.seconds.get("reid: train: validation passes", 0.0), 2),
                "sampler_setup_full_s": round(setup_full, 3)})
            return model, hist
        order = np.random.default_rng(seed).permutation(ids)
        counts = np.bincount(identities)
        take = np.cumsum(counts[order]) <= train_steps * cfg.batch_size
        chosen = np.isin(identities, order[take])
        sub = np.flatnonzero(chosen)
        t0 = time.perf_counter()
        model, hist = real_train(images_u8[torch.as_tensor(sub)], np.unique(identities[sub], return_inverse=True)[1],
                                 replace(cfg, epochs=1), device, generator, rng, progress, validation)
        wall = time.perf_counter() - t0
        val_s = clock.seconds.get("reid: train: validation passes", 0.0)
        # steady state: the gaps between training steps after the first WARM_STEPS (set-up, first allocations)
        gaps = np.diff(ticks[WARM_STEPS:])
        per_step = float(gaps.mean()) if len(gaps) else (wall - val_s) / max(hist["steps"], 1)
        full_train.update({
            "training_images": int(n), "training_identities": len(ids), "batch_size": cfg.batch_size,
            "default_step_budget": budget, "steps_per_epoch": spe, "default_epochs": epochs,
            "default_steps": epochs * spe, "max_epochs": cfg.epochs,
            "measured_images": len(sub), "measured_steps": hist["steps"], "measured_s": round(wall, 2),
            "validation_passes": len(hist.get("validation_auc_per_epoch", [])),
            "validation_s": round(val_s, 2), "validation_images": hist.get("validation_images"),
            "s_per_step": round(per_step, 4), "s_per_step_median": round(float(np.median(gaps)), 4) if len(gaps) else None,
            "s_per_step_incl_warmup": round((wall - val_s) / max(hist["steps"], 1), 4),
            "sampler_setup_full_s": round(setup_full, 3),
            "extrapolated_default_s": round(epochs * spe * per_step
                                            + epochs * val_s / max(len(hist.get("validation_auc_per_epoch", [])), 1)
                                            + setup_full, 1),
        })
        return model, hist

    rn.train_network = shortened_train
    check = Reidentification()
    with clock.stage("reid: fit (total)"):
        fit = check.fit(ctx)
    phase["now"] = "score"
    with clock.stage("reid: score (total)"):
        result = check.score(ctx, fit)
    rn.train_network, rn.IdentityBatches, rn.forward = real_train, real_batches, real_forward

    out = {"status": result.status, "reason": result.reason[:300], "training": full_train,
           "network": {k: fit.network.get(k) for k in ("preset", "backbone", "image_size", "batch_size")},
           "calibration": result.metrics.get("calibration"), "n_flagged": result.metrics.get("n_flagged"),
           "verification_auc": result.metrics["verification"]["auc"].to_dict()}
    out["baseline"] = faiss_baseline(kept["synthetic"], kept["gallery"], kept["score"], kept["index"], kept["ours_s"])
    return out


def faiss_baseline(q: np.ndarray, g: np.ndarray, score: np.ndarray, index: np.ndarray, ours_s: float) -> dict:
    """faiss IndexFlatIP / IndexFlatL2 on the check's own synthetic and real embeddings, same run, one thread."""
    import faiss

    from audit.reidentification.metrics import best_match

    faiss.omp_set_num_threads(1)
    q32, g32 = np.ascontiguousarray(q, np.float32), np.ascontiguousarray(g, np.float32)
    t0 = time.perf_counter()
    best_match(q32, g32)
    ours_again = time.perf_counter() - t0
    res = {"queries": len(q), "references": len(g), "dim": int(g.shape[1]), "ours_s": round(ours_s, 3),
           "ours_again_s": round(ours_again, 3)}
    for kind in ("IndexFlatIP", "IndexFlatL2"):
        t0 = time.perf_counter()
        ix = getattr(faiss, kind)(g32.shape[1])
        ix.add(g32)
        dist, nn = ix.search(q32, 1)
        dt = time.perf_counter() - t0
        nn = nn[:, 0]
        # on unit vectors the nearest by L2 is the largest inner product; ties may name another image
        sim = dist[:, 0] if kind == "IndexFlatIP" else 1 - dist[:, 0] / 2
        same = nn == index
        tie = ~same & np.isclose(sim, score, rtol=0, atol=1e-5)
        res[kind] = {"s": round(dt, 3), "ours_over_faiss": round(ours_s / dt, 3), "same_neighbour": int(same.sum()),
                     "other_neighbour_tied": int(tie.sum()), "differ": int((~same & ~tie).sum()),
                     "max_abs_score_diff": float(np.abs(sim - score).max())}
    return res


# ---------------------------------------------------------------------------------------- membership inference


def nearest_rms_before(queries, ref_batches, device="cpu", block: int = 256):
    """``nearest_rms`` as it was before this benchmark: the winners' float64 recomputation on whole blocks."""
    import torch

    q = torch.as_tensor(np.asarray(queries, np.float32), device=device).flatten(1)
    best = torch.full((q.shape[0],), float("inf"), dtype=torch.float64, device=device)
    for batch in ref_batches:
        r = torch.as_tensor(np.asarray(batch, np.float32), device=device).flatten(1)
        rn = (r.double() ** 2).sum(1).float()
        for s in range(0, q.shape[0], block):
            qb = q[s:s + block]
            j = torch.addmm(rn[None, :], qb, r.T, alpha=-2.0).argmin(1)
            exact = (qb.double() - r[j].double()).square().sum(1)
            best[s:s + block] = torch.minimum(best[s:s + block], exact)
    return (best / q.shape[1]).sqrt().cpu().numpy()


def rms_before_after(ctx, n_queries: int, n_refs: int) -> dict:
    """The pixel-DCR search before and after the row-block recomputation, same data, same process, twice each."""
    nearest_rms = ORIGINAL["nearest_rms"]  # not the timed wrapper

    from synthgate.imageset import ImageSet

    load = ImageSet.iter_batches  # not the timed loader: this is not part of the check's stages
    q = next(load(ctx.real, n_queries, ctx.geometry))[1]
    refs = [b for _, b in load(ctx.synthetic, 256, ctx.geometry, list(range(min(n_refs, len(ctx.synthetic)))))]
    times = {"before": [], "after": []}
    out = {}
    for _ in range(2):
        for name, fn in (("before", nearest_rms_before), ("after", nearest_rms)):
            t0 = time.perf_counter()
            out[name] = fn(q, iter(refs))
            times[name].append(time.perf_counter() - t0)
    before, after = min(times["before"]), min(times["after"])
    return {"queries": len(q), "references": int(sum(len(b) for b in refs)), "before_s": round(before, 3),
            "after_s": round(after, 3), "speedup": round(before / after, 2),
            "identical": bool(np.array_equal(out["before"], out["after"]))}


def mia_point(ctx, clock: Clock) -> dict:
    import audit.membership_inference.check as mc
    import audit.membership_inference.synthetic_attacks as sa
    from audit.membership_inference.check import MembershipInference

    wrap(mc, "make_sample", "mia: design (sample, folds, halves)")
    wrap(mc.MembershipInference, "_planted", "mia: planted near-copies (control)")
    wrap(mc.MembershipInference, "_pixel_dcr", "mia: pixel DCR pass (incl. member embeddings)")
    ORIGINAL["nearest_rms"] = wrap(sa, "nearest_rms", lambda q, refs, *a, **kw: "mia: pixel distances (nearest_rms)")
    wrap(sa.RandomConvFeatures, "__call__", "mia: random-conv embedding",
         lambda name, a, kw, out, dt: clock.info[name].append(len(out)))
    for cls in (sa.PixelDCR, sa.EmbeddingDCR, sa.Domias):
        wrap(cls, "scores", f"mia: attack {cls.name}")
        wrap(cls, "planted_scores", f"mia: attack {cls.name} (with planted copies)")
    wrap(mc, "planted_control", "mia: planted control (decision)")
    wrap(mc, "null_control", "mia: null control (patient relabellings)")
    wrap(mc, "exchangeability_control", "mia: exchangeability control")
    wrap(mc.MembershipInference, "_evaluate", "mia: statistics (bootstrap, halves)")
    check = MembershipInference()
    with clock.stage("mia: score (total)"):
        result = check.score(ctx, None)
    m = result.metrics
    widths = {}
    for name, a in m.get("attacks", {}).items():
        row = {"auc": a["auc"].value, "auc_ci": list(a["auc"].ci)}
        row["auc_ci_width"] = round(a["auc"].ci[1] - a["auc"].ci[0], 4)
        t = a.get("tpr_at_1pct_fpr")
        if t is not None and t.ci is not None:
            row["tpr_1pct"], row["tpr_1pct_ci_width"] = t.value, round(t.ci[1] - t.ci[0], 4)
        widths[name] = row
    return {"status": result.status, "reason": result.reason[:300], "n_members": m.get("n_members"),
            "n_nonmembers": m.get("n_nonmembers"), "attacks": widths,
            "controls": {c.name: bool(c.passed) for c in result.controls},
            "scenario_1": {k: v for k, v in m.get("scenario_1", {}).items()}}


# ----------------------------------------------------------------------------------------------- a point


def point(syn: int, real: int, args) -> dict:
    import torch

    from audit.core.context import AuditContext

    torch.set_num_threads(1)
    row: dict = {"synthetic": syn, "real": real, "threads": torch.get_num_threads(),
                 "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    n_hold = max(8, round(args.holdout_fraction * real))
    t0 = time.perf_counter()
    # distinct generator seeds for the three sets (chunk seeds of one set never reach another's), so the synthetic
    # images are independent of every real patient
    real8, real_pid = patient_phantoms(real, args.per_patient, 3 * args.seed + 1)
    hold8, hold_pid = patient_phantoms(n_hold, args.per_patient, 3 * args.seed + 2)
    syn8 = phantoms(syn, 10**9 + args.seed)
    row["generate_s"] = round(time.perf_counter() - t0, 1)
    row["holdout"] = n_hold
    row["per_patient"] = args.per_patient
    row["uint8_gb"] = round((real8.nbytes + hold8.nbytes + syn8.nbytes) / 1e9, 3)
    row["rss_after_generate_gb"] = rss_gb()
    ctx = AuditContext(synthetic=make_arrayset("synthetic", syn8, None), real=make_arrayset("real", real8, real_pid),
                       holdout=make_arrayset("holdout", hold8, hold_pid), device="cpu", seed=args.seed,
                       progress=False)
    _ = ctx.geometry
    clock = CLOCK
    t0 = time.perf_counter()
    row["reid"] = reid_point(ctx, clock, args.train_steps, args.seed)
    row["reid_wall_s"] = round(time.perf_counter() - t0, 1)
    row["rss_after_reid_gb"] = rss_gb()
    reid_clock = {k: round(v, 3) for k, v in clock.seconds.items()}
    clock.seconds.clear()
    clock.calls.clear()
    t0 = time.perf_counter()
    try:
        row["mia"] = mia_point(ctx, clock)
    except Exception as exc:  # the re-identification figures are kept; the report shows the error
        import traceback

        row["mia_error"] = "".join(traceback.format_exception_only(exc)).strip()[-500:]
        raise SystemExit(print(json.dumps(row)) or 1) from exc
    row["mia_wall_s"] = round(time.perf_counter() - t0, 1)
    row["mia"]["nearest_rms_fix"] = rms_before_after(ctx, 256, 2048)  # after the clock: not part of the check
    row["stages_reid_s"] = reid_clock
    row["stages_mia_s"] = {k: round(v, 3) for k, v in clock.seconds.items()}
    row["info"] = {k: v for k, v in clock.info.items()}
    row["peak_rss_gb"] = rss_gb()
    row["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    return row


# -------------------------------------------------------------------------------------------------- driver


def _child(syn: int, real: int, args, train_steps: int | None = None) -> dict:
    steps = args.train_steps if train_steps is None else train_steps
    cmd = [sys.executable, __file__, "--point", f"{syn}x{real}", "--seed", str(args.seed), "--train-steps",
           str(steps), "--per-patient", str(args.per_patient), "--holdout-fraction",
           str(args.holdout_fraction)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "SYNTHGATE_CACHE_DIR": "off", "SYNTHGATE_PROGRESS": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def point_total(row: dict) -> float:
    """Seconds of both checks (training as measured, shortened), without generating the images."""
    return row["reid_wall_s"] + row["mia_wall_s"]


def extrapolate(row: dict, syn: int, real: int) -> dict:
    """A point's stages scaled to ``syn x real``: searches by pairs, the rest by the set each one reads.

    Re-identification: the synthetic search by synthetic x real pairs; the fit's searches (holdout x real) by
    holdout x real; embedding per set by its size; preparing, plan and everything else by the real set's size
    (linear).  Membership inference: stages that read the synthetic set by its size, the rest by nothing (the
    sample is bounded by ``n_samples``).  Image generation by the images generated.
    """
    fs, fr = syn / row["synthetic"], real / row["real"]
    r = row["stages_reid_s"]
    search = r.get("reid: search synthetic x real", 0.0)
    fit_search = r.get("reid: search (fit, relation=other)", 0.0)  # holdout x real: both grow
    emb_syn = r.get("reid: embed synthetic", 0.0)
    train = row["reid"]["training"]["measured_s"]  # the shortened training runs the same steps at any size
    rest_reid = row["reid_wall_s"] - search - emb_syn - fit_search - train
    est_reid = search * fs * fr + fit_search * fr * fr + emb_syn * fs + rest_reid * fr + train
    m = row["stages_mia_s"]
    syn_part = (m.get("mia: pixel distances (nearest_rms)", 0.0)
                + m.get("mia: attack dcr_embedding", 0.0) + m.get("mia: attack dcr_embedding (with planted copies)", 0.0)
                + m.get("mia: attack domias", 0.0) + m.get("mia: attack domias (with planted copies)", 0.0))
    emb = m.get("mia: random-conv embedding", 0.0)
    est_mia = (row["mia_wall_s"] - syn_part - emb) + syn_part * fs + emb * fs  # holdout embedding grows like syn
    gen = row["generate_s"] * (syn + real * 1.1) / (row["synthetic"] + row["real"] + row["holdout"])
    return {"reid_s": round(est_reid, 1), "mia_s": round(est_mia, 1), "generate_s": round(gen, 1),
            "total_s": round(est_reid + est_mia + gen, 1)}


def wait_for_memory(gb: float, most_s: float = 1200) -> float | None:
    """Seconds waited until ``MemAvailable`` reaches ``gb`` (``None`` when not asked to wait)."""
    if gb <= 0:
        return None
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < most_s:
        with open("/proc/meminfo") as fh:
            avail = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable")) / 1e6
        if avail >= gb:
            break
        time.sleep(10)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--point", help="run one point SxR (synthetic x real) and print its JSON (used by the driver)")
    p.add_argument("--points", default=",".join(f"{s}x{r}" for s, r in POINTS),
                   help="points of the curve, smallest first; the last runs only when extrapolated below --budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=100,
                   help="network training steps actually run per point (0: the default training, whole)")
    p.add_argument("--validate-training", default="100x1000",
                   help="a small point run twice, shortened and with the default training, to check the "
                        "training extrapolation ('' to skip)")
    p.add_argument("--per-patient", type=int, default=4)
    p.add_argument("--holdout-fraction", type=float, default=0.1)
    p.add_argument("--min-free-gb", type=float, default=0,
                   help="before the last point, wait (at most 20 min) until this much memory is available "
                        "(a shared machine)")
    p.add_argument("--budget", type=float, default=900, help="run the last point only if extrapolated below this")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "privacy_scale.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json of an earlier run")
    args = p.parse_args(argv)
    if args.report_only:
        Path(args.out).write_text(report(json.loads(Path(args.out).with_suffix(".json").read_text())))
        return 0
    if args.point:
        s, r = (int(v) for v in args.point.split("x"))
        print(json.dumps(point(s, r, args)))
        return 0
    t_start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    points = [tuple(int(v) for v in pt.split("x")) for pt in args.points.split(",")]
    rows, predicted, failed, waits = [], None, [], []
    for i, (s, r) in enumerate(points):
        if i == len(points) - 1 and rows:
            predicted = extrapolate(rows[-1], s, r)
            print(f"extrapolated {s}x{r}: {predicted}", flush=True)
            if predicted["total_s"] >= args.budget:
                break
            waited = wait_for_memory(args.min_free_gb)
            if waited is not None:
                print(f"waited {waited:.0f} s for {args.min_free_gb} GB of free memory", flush=True)
                waits.append(waited)
        try:
            rows.append(_child(s, r, args))
        except subprocess.CalledProcessError as exc:  # recorded, and the report says so
            failed.append({"point": [s, r], "returncode": exc.returncode, "stderr_tail": exc.stderr[-2000:]})
            with contextlib.suppress(ValueError, IndexError):  # what the point measured before it failed
                failed[-1]["partial_row"] = json.loads(exc.stdout.strip().splitlines()[-1])
            print(json.dumps(failed[-1]), flush=True)
            break
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))
    check = None
    if args.validate_training:
        s, r = (int(v) for v in args.validate_training.split("x"))
        short, full = _child(s, r, args), _child(s, r, args, train_steps=0)
        check = {"point": [s, r], "shortened": short["reid"]["training"], "full": full["reid"]["training"],
                 "full_status": full["reid"]["status"], "full_auc": full["reid"]["verification_auc"]}
        print(json.dumps(check), flush=True)
    result = {"rows": rows, "points": points, "training_check": check, "failed": failed, "memory_wait_s": waits, "extrapolated_last": predicted, "budget_s": args.budget,
              "loadavg_start": load_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()],
              "cpus": os.cpu_count(), "wall_s": round(time.perf_counter() - t_start, 1),
              "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/privacy_scale.py " + " ".join(argv or sys.argv[1:])}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(report(result))
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"wrote {args.out}")
    return 0


REID_STAGES = (
    ("reid: plan (roles)", "plan (roles: gallery, calibration, probes)"),
    ("reid: prepare network inputs (train + validation)", "prepare training + validation inputs (load, 256 -> 64 px)"),
    ("reid: train: batch sampler set-up", "batch sampler set-up (shortened run's subset)"),
    ("reid: embed training set", "embed every real image (gallery)"),
    ("reid: embed calibration", "embed holdout (unseen patients)"),
    ("reid: embed control", "embed augmented training images (control)"),
    ("reid: search (fit, relation=other)", "search holdout x real (impostor scores, threshold)"),
    ("reid: search (fit, relation=same)", "search holdout x holdout (genuine scores)"),
    ("reid: search (fit, relation=any)", "search controls x real (positive controls)"),
    ("reid: verification pairs", "verification pairs"),
    ("reid: verification AUC + bootstrap", "verification AUC + patient bootstrap"),
    ("reid: retrieval metrics (mAP@R, P@1)", "mAP@R, P@1 (holdout; probes x real)"),
    ("reid: embed synthetic", "embed synthetic"),
    ("reid: search synthetic x real", "**search synthetic x real**"),
    ("reid: findings + per-patient table", "findings + per-patient table"),
)
MIA_STAGES = (
    ("mia: design (sample, folds, halves)", "design: sample, folds, halves"),
    ("mia: planted near-copies (control)", "planted near-copies (control)"),
    ("mia: random-conv embedding", "random-conv embedding (synthetic, planted, holdout, members)"),
    ("mia: pixel distances (nearest_rms)", "pixel distances: evaluated x synthetic (incl. streaming the synthetic set)"),
    ("mia: pixel DCR pass (incl. member embeddings)", "pixel DCR pass (the above + loading evaluated images + member embeddings)"),
    ("mia: attack dcr_pixel", "attack dcr_pixel"),
    ("mia: attack dcr_embedding", "attack dcr_embedding"),
    ("mia: attack domias", "attack domias"),
    ("mia: attack dcr_pixel (with planted copies)", "attack dcr_pixel, planted copies added"),
    ("mia: attack dcr_embedding (with planted copies)", "attack dcr_embedding, planted copies added (x2: control + loop)"),
    ("mia: attack domias (with planted copies)", "attack domias, planted copies added"),
    ("mia: planted control (decision)", "planted control (its bootstrap)"),
    ("mia: null control (patient relabellings)", "null control (2,000 patient relabellings)"),
    ("mia: exchangeability control", "exchangeability control (its bootstrap)"),
    ("mia: statistics (bootstrap, halves)", "statistics: bootstrap intervals, selection / evaluation halves"),
)


def _fmt(v) -> str:
    if v is None:
        return "--"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"


def _ratio(a, b) -> str:
    if a is None or b is None or a <= 0:
        return "--"
    return f"{b / a:.1f}x"


def _row(label: str, vals: list, two: bool, fmt=_fmt) -> str:
    """One table row: the label, a cell per point and, with two or more points, the growth first -> last."""
    return f"| {label} | " + " | ".join(fmt(v) for v in vals) + (f" | {_ratio(vals[0], vals[-1])}" if two else "") + " |"


def reid_default_total(row: dict) -> float:
    """Re-identification seconds with the default training (extrapolated) in place of the shortened one."""
    t = row["reid"]["training"]
    return row["reid_wall_s"] - t["measured_s"] + t["extrapolated_default_s"]


def report(res: dict) -> str:
    rows = res["rows"]
    heads = [f"{r['synthetic']:,} x {r['real']:,}" for r in rows]
    two = len(rows) >= 2
    ext = res.get("extrapolated_last")
    last = res["points"][-1]
    ran_last = any((r["synthetic"], r["real"]) == tuple(last) for r in rows)
    col = " | ".join(heads) + (" | growth" if two else "") + " |"
    sep = "|---" * (len(rows) + 1 + int(two)) + "|"
    lines = ["# Re-identification and membership inference at scale (256 x 256 input)", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {res['cpus']} cores shared with other jobs; load average (1, 5, 15 min) "
             f"{res['loadavg_start']} at the start, {res['loadavg_end']} at the end; one torch thread per point "
             f"(`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`), each point in its own process; total wall "
             f"{res['wall_s']} s.", "",
             "Images: phantom-like, generated in memory (`copy_scale.phantoms`), real and holdout "
             f"{rows[0]['per_patient']} views per patient, holdout {rows[0]['holdout'] / rows[0]['real']:.0%} of the "
             "real set's size (other patients), synthetic images independent phantoms. The sets enter the checks as "
             "`ImageSet`s whose stored pixels are those arrays: the per-image load path, the audit context and the "
             "checks' own `fit` / `score` are the audit's code; PNG decoding is not (see `copy_scale.md`: 2.25 ms "
             "per image serially). Default settings of both checks, `cpu` preset, no model (so no scenario-2 "
             "membership attacks). Seconds are wall time on a shared machine: read the ratios.", ""]
    for f in res.get("failed", []):
        lines += [f"**{f['point'][0]:,} x {f['point'][1]:,} failed** (exit {f['returncode']}): "
                  f"`{f['stderr_tail'].strip().splitlines()[-1] if f['stderr_tail'].strip() else ''}`", ""]
    if not ran_last and ext and not res.get("failed"):
        lines += [f"**{last[0]:,} x {last[1]:,} was not run**: extrapolated from the largest measured point to "
                  f"{ext['total_s']:.0f} s (re-identification {ext['reid_s']:.0f} s with the shortened training, "
                  f"membership {ext['mia_s']:.0f} s, generating the images {ext['generate_s']:.0f} s), over the "
                  f"{res['budget_s']:.0f} s budget. The figures below for it are absent.", ""]
    # ---- summary
    lines += ["## Summary (seconds, one thread)", "", "| | " + col, sep]
    for label, fn in (("re-identification, shortened training (measured)", lambda r: r["reid_wall_s"]),
                      ("re-identification, of which the shortened training", lambda r: r["reid"]["training"]["measured_s"]),
                      ("re-identification without training (measured)",
                       lambda r: r["reid_wall_s"] - r["reid"]["training"]["measured_s"]),
                      ("re-identification with the default training (**extrapolated** training)", reid_default_total),
                      ("synthetic x real embedding search (measured)",
                       lambda r: r["stages_reid_s"]["reid: search synthetic x real"]),
                      ("membership inference, scenario 1 (measured)", lambda r: r["mia_wall_s"]),
                      ("peak RSS (GB)", lambda r: r["peak_rss_gb"])):
        vals = [fn(r) for r in rows]
        lines.append(_row(label, vals, two))
    lines.append("")
    # ---- training
    lines += ["## Re-identification: network training (the check's step budget)", "",
              "| | " + col, sep]
    tr = [r["reid"]["training"] for r in rows]

    def trow(label, vals, ratio=True):
        g = f" | {_ratio(vals[0], vals[-1])}" if two and ratio and all(isinstance(v, (int, float)) for v in vals) \
            else (" | " if two else "")
        return f"| {label} | " + " | ".join(_fmt(v) for v in vals) + g + " |"

    lines += [trow("training images (real, less probes and validation patients)", [t["training_images"] for t in tr]),
              trow("default budget: 0.5 steps x images, at least 200 (steps)", [t["default_step_budget"] for t in tr]),
              trow("steps per epoch (64 images a step)", [t["steps_per_epoch"] for t in tr]),
              trow("default: whole epochs to reach the budget (cap 100)", [t["default_epochs"] for t in tr]),
              trow("default: steps (epochs x steps per epoch)", [t["default_steps"] for t in tr]),
              trow("**measured**: steps run (one epoch on a subset)", [t["measured_steps"] for t in tr]),
              trow("**measured**: seconds (incl. one validation pass)", [t["measured_s"] for t in tr]),
              trow(f"**measured**: seconds per step (mean after the first {WARM_STEPS})", [t["s_per_step"] for t in tr]),
              trow("**measured**: seconds per step (all steps: set-up included)", [t["s_per_step_incl_warmup"] for t in tr]),
              trow("**measured**: one validation pass (s)", [t["validation_s"] for t in tr]),
              trow("**measured**: batch sampler set-up on the whole set (s)", [t["sampler_setup_full_s"] for t in tr]),
              trow("default training, **extrapolated** (s)", [t["extrapolated_default_s"] for t in tr]),
              trow("default training, **extrapolated** (h)", [round(t["extrapolated_default_s"] / 3600, 2)
                                                               for t in tr], ratio=False)]
    chk = res.get("training_check")
    if chk:
        sh, fu = chk["shortened"], chk["full"]
        lines += ["", f"Checking the extrapolation at {chk['point'][0]:,} x {chk['point'][1]:,} (two more processes, "
                  f"same run): the shortened training ({sh['measured_steps']} steps, {sh['s_per_step']} s a step) "
                  f"extrapolates the default training to {sh['extrapolated_default_s']} s for a budget of "
                  f"{sh['default_steps']} steps; run whole, it took **{fu['measured_s']} s** for {fu['measured_steps']} "
                  f"steps ({fu['epochs_run']} epochs, best epoch {fu['best_epoch']}; stopped: {fu['stopped']}); "
                  f"the check then said `{chk['full_status']}` (verification AUC {chk['full_auc']['value']:.3f})."]
    lines += ["", "Only the training is shortened: the check's own `train_network` runs one epoch (its `epochs` "
              "cap set to 1) on a random subset of the training patients sized for the measured steps, with "
              "the real validation set; a step is one batch of 64 images whatever the set's size, so the default "
              "budget's time is extrapolated as budget steps x seconds per step + one validation pass per epoch. "
              "Early stopping (patience 5, two learning-rate drops) may end training before the budget; the "
              "budget is the most it runs. There is no cap beyond the budget: `epochs` (100) never binds (the "
              "budget is about 32 epochs at any size), and the wall-clock budget is off by default.", ""]
    # ---- stages
    lines += ["## Re-identification: stages (seconds)", "", "| stage | " + col, sep]
    for key, label in REID_STAGES:
        vals = [r["stages_reid_s"].get(key) for r in rows]
        if all(v is None for v in vals):
            continue
        lines.append(_row(label, vals, two))
    for label, fn in (("loading (all sets, inside the stages above)",
                       lambda r: sum(v for k, v in r["stages_reid_s"].items() if k.startswith("load "))),
                      ("fit (total, shortened training)", lambda r: r["stages_reid_s"]["reid: fit (total)"]),
                      ("score (total)", lambda r: r["stages_reid_s"]["reid: score (total)"]),
                      ("**check, shortened training**", lambda r: r["reid_wall_s"]),
                      ("**check, default training (extrapolated)**", reid_default_total)):
        vals = [fn(r) for r in rows]
        lines.append(_row(label, vals, two))
    lines += ["", "| embedding throughput (images/s) | " + col, sep]
    for key, label in (("reid: embed training set", "real (gallery)"), ("reid: embed synthetic", "synthetic"),
                       ("reid: embed calibration", "holdout")):
        vals = [sum(r["info"].get(key, [0])) / r["stages_reid_s"][key] if r["stages_reid_s"].get(key) else None
                for r in rows]
        lines.append(_row(label, vals, two))
    # ---- baseline
    lines += ["", "## Re-identification: synthetic x real search vs faiss (same embeddings, same run, one thread)", "",
              "| synthetic x real (128-d) | ours, in the check (s) | ours, again (s) | faiss IndexFlatIP (s) | faiss "
              "IndexFlatL2 (s) | ours / IP | ours / L2 | same neighbour (IP, L2) | other neighbour, tied score | "
              "differ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for h, r in zip(heads, rows):
        b = r["reid"]["baseline"]
        ip, l2 = b["IndexFlatIP"], b["IndexFlatL2"]
        lines.append(f"| {h} | {b['ours_s']} | {b['ours_again_s']} | {ip['s']} | {l2['s']} | {ip['ours_over_faiss']} | "
                     f"{l2['ours_over_faiss']} | {ip['same_neighbour']:,}, {l2['same_neighbour']:,} of {b['queries']:,} | "
                     f"{ip['other_neighbour_tied']}, {l2['other_neighbour_tied']} | {ip['differ']}, {l2['differ']} |")
    lines += ["", "faiss-gpu: not measured (no GPU on this machine).", "",
              "Check results (not meaningful with the shortened training, reported so the run is complete): "
              + "; ".join(f"{h}: `{r['reid']['status']}`, verification AUC {r['reid']['verification_auc']['value']:.3f}, "
                          f"{r['reid']['n_flagged']} flagged" for h, r in zip(heads, rows)) + ".", ""]
    # ---- MIA
    lines += ["## Membership inference (scenario 1): stages (seconds)", "", "| stage | " + col, sep]
    for key, label in MIA_STAGES:
        vals = [r["stages_mia_s"].get(key) for r in rows]
        if all(v is None for v in vals):
            continue
        lines.append(_row(label, vals, two))
    for label, fn in (("loading (all sets, inside the stages above)",
                       lambda r: sum(v for k, v in r["stages_mia_s"].items() if k.startswith("load "))),
                      ("**check (total)**", lambda r: r["stages_mia_s"]["mia: score (total)"])):
        vals = [fn(r) for r in rows]
        lines.append(_row(label, vals, two))
    lines += ["", "What grows with what (from the code; the growth column measures it): the pixel distances "
              "(every evaluated image against every synthetic image, streamed), the embedding DCR, DOMIAS' synthetic "
              "density (a KDE over the synthetic set, evaluated at the evaluated images) and embedding the synthetic "
              "set grow with the synthetic set; embedding every holdout image (DOMIAS' reference folds) grows with "
              "the holdout; the design, the planted copies (half the members), the bootstrap intervals, the null "
              "control's relabellings and the exchangeability control are bounded by `n_samples` (1,000 members + "
              "1,000 non-members) whatever the sets' sizes, and the real set enters only through the members drawn "
              "from it. AUC interval widths (below), widest of the three attacks: "
              + "; ".join(f"{h}: {max(a['auc_ci_width'] for a in r['mia']['attacks'].values())} with "
                          f"{r['mia']['n_members']:,} + {r['mia']['n_nonmembers']:,}" for h, r in zip(heads, rows))
              + "."]
    lines += ["", "### Pixel DCR: the exact recomputation, before vs after the fix (same data, same process)", "",
              "`nearest_rms` ranks candidates by a float32 product and recomputes each chunk winner's distance in "
              "float64; on whole 256-row blocks that recomputation (128 MB temporaries through memory several "
              "times) cost more than the product. It now runs 8 rows at a time on a CPU (bit-identical sums). "
              "Timed on the first real images against the first synthetic images of each point, best of two:", "",
              "| point | queries x synthetic | before (s) | after (s) | speedup | identical distances |",
              "|---|---|---|---|---|---|"]
    for h, r in zip(heads, rows):
        f = r["mia"]["nearest_rms_fix"]
        lines.append(f"| {h} | {f['queries']:,} x {f['references']:,} | {f['before_s']} | {f['after_s']} | "
                     f"{f['speedup']}x | {'yes' if f['identical'] else '**no**'} |")
    lines += ["", "## Membership inference: the intervals it reports (95 %, patient bootstrap)", "",
              "| point | members / non-members | attack | AUC [95 % CI] | AUC CI width | TPR at 1 % FPR | its CI width |",
              "|---|---|---|---|---|---|---|"]
    for h, r in zip(heads, rows):
        m = r["mia"]
        for name, a in m["attacks"].items():
            lines.append(f"| {h} | {m['n_members']:,} / {m['n_nonmembers']:,} | {name} | {a['auc']:.3f} "
                         f"[{a['auc_ci'][0]:.3f}, {a['auc_ci'][1]:.3f}] | {a['auc_ci_width']} | "
                         f"{_fmt(a.get('tpr_1pct'))} | {a.get('tpr_1pct_ci_width', '--')} |")
    lines += ["", "Check results: " + "; ".join(f"{h}: `{r['mia']['status']}` (controls: "
                                                 + ", ".join(f"{k} {'passed' if v else 'failed'}"
                                                             for k, v in r["mia"]["controls"].items()) + ")"
                                                 for h, r in zip(heads, rows)) + ".", ""]
    # ---- memory
    lines += ["## Memory (GB)", "", "| | " + col, sep]
    for label, key in (("images held as uint8 (real + holdout + synthetic)", "uint8_gb"),
                       ("peak RSS after generating them", "rss_after_generate_gb"),
                       ("peak RSS after re-identification", "rss_after_reid_gb"),
                       ("peak RSS at the end (membership inference too)", "peak_rss_gb")):
        vals = [r[key] for r in rows]
        lines.append(_row(label, vals, two, str))
    gen = " / ".join(f"{r['generate_s']:.0f}" for r in rows)
    lines += ["", f"Generating the images in memory took {gen} s (not part of any figure above).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
