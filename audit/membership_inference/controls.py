"""The membership check's controls: it must catch planted leaks and must not flag independent data.

positive
    near-copies of members planted in an in-memory copy of the synthetic set
    must make the pixel DCR attack fail the policy (scenario 1); a tiny model
    overfit on a handful of real images must be caught by every model-attack
    family (scenario 2);
null
    two halves of the unseen images, as "members" and "non-members", must
    look alike to every attack;
negative
    an attack with no access to the synthetic data or the model must not
    separate members from non-members (holdout exchangeability: otherwise the
    holdout is not from the training population).
"""
from __future__ import annotations

import numpy as np

from synthgate.imageset import Geometry

from audit.core.base import Control, Estimate

from .design import Sample, groups_of
from .statistics import RocMetrics, exceeded, roc_metrics


def detected(m: RocMetrics, limits: dict) -> bool:
    """A control leak is caught when the policy would fail it, on evidence above chance."""
    return bool(exceeded(m, limits, above_chance=True))


def planted_control(ctx, settings, limits: dict, sample: Sample, planted_scores: dict, chosen: np.ndarray) -> Control:
    """Near-copies of members planted in the synthetic set must make the pixel DCR attack fail the policy."""
    y = sample.labels
    n_boot = settings.n_boot
    res = {name: roc_metrics(s, y, n_boot=n_boot, rng=ctx.rng(f"membership_inference.planted.{name}"),
                             groups=sample.groups) for name, s in planted_scores.items()}
    m = res["dcr_pixel"]
    ok = detected(m, limits)
    detail = (f"near-copies of {len(chosen)} of {sample.n} members planted in a copy of the synthetic set "
              f"(never written): pixel DCR AUC {m.auc:.3f} [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}]"
              + (f", TPR at 1% FPR {m.tpr[0.01]:.3f}" if m.tpr.get(0.01) is not None else "")
              + ("; the policy would fail this leak" if ok else "; NOT caught: the attack or the limits cannot "
                 "detect even this leak"))
    return Control("planted near-copies (synthetic-set attacks)", "positive", ok, detail,
                   {k: {kk: v.to_dict() for kk, v in r.estimates().items()} for k, r in res.items()})


def model_control(ctx, settings, limits: dict, model, score_images) -> Control:
    """Overfit a tiny model on a few real images and require every model-attack family to catch them.

    Its non-members are other real images and holdout images (both unseen
    by the control model).  It copies the audited model's noise schedule,
    prediction type and conditioning, at a small resolution.
    """
    from audit.membership_inference.control_model import control_model

    s = settings
    real, hold = ctx.real, ctx.holdout
    m = min(s.control_model_images, len(real) // 2)
    if m < 2:
        return Control("overfit model (model attacks)", "positive", False,
                       f"the training set has {len(real)} images; the model control needs at least 4")
    rng = ctx.rng("membership_inference.model_control")
    order = rng.permutation(len(real))
    members = np.sort(order[:m])
    pool = [(0, int(i)) for i in order[m:]] + [(1, int(j)) for j in range(len(hold))]
    take = [pool[i] for i in np.sort(rng.permutation(len(pool))[: s.control_model_nonmembers])]
    nonmembers = [(real, np.array([i for s_, i in take if s_ == 0], int)),
                  (hold, np.array([i for s_, i in take if s_ == 1], int))]
    side = min(s.control_model_resolution, model.resolution)
    cgeo = Geometry(side, side, model.image_channels)
    images = np.concatenate([b for _, b in real.iter_batches(64, cgeo, [int(i) for i in members])])
    labels = [real.records[int(i)].label for i in members] if model.labels is not None else None
    classes = sorted({r.label for r in real.records} | {r.label for r in hold.records}) if labels else None
    from .registry import create_attacks

    wanted = [t for a in create_attacks(s.model_attacks, s, scenario=2) for t in a.timesteps()]
    settings = {"steps": s.control_model_steps, "seed": int(rng.integers(0, 2**31)), "lr": 3e-3,
                "batch": 16, "widths": [8, 16], "max_timestep": min(model.num_train_timesteps - 1,
                                                                     max(wanted) * 3 // 2)}
    cache = ctx.model_cache("membership_inference_control")
    cmodel, cached = control_model(images, labels, classes, model.scheduler.config, settings, ctx.torch_device,
                                   cache)
    scores = score_images(ctx, cmodel, [(real, members), *[nm for nm in nonmembers if len(nm[1])]], cgeo,
                                "model control", "model_control")
    n_non = len(take)
    y = np.r_[np.ones(m), np.zeros(n_non)]
    rg, hg = groups_of(real), groups_of(hold)
    groups = ([f"r:{rg[i]}" for i in members] + [f"r:{rg[i]}" for i in nonmembers[0][1]]
              + [f"h:{hg[i]}" for i in nonmembers[1][1]])
    res = {name: roc_metrics(sc, y, n_boot=s.n_boot, groups=groups,
                             rng=ctx.rng(f"membership_inference.model_control.{name}")) for name, sc in scores.items()}
    families, caught = {}, []
    for fam in s.model_attacks:
        best = max((n for n in res if n.startswith(fam + "_")), key=lambda n: (res[n].auc, n))
        families[fam] = best
        if detected(res[best], limits):
            caught.append(fam)
    ok = len(caught) == len(families)
    parts = [f"{fam}: {best} AUC {res[best].auc:.3f} [{res[best].auc_ci[0]:.3f}, {res[best].auc_ci[1]:.3f}]"
             + ("" if fam in caught else " NOT caught") for fam, best in families.items()]
    detail = (f"tiny model overfit on {m} real images at {side}x{side} ({'cached' if cached else 'trained now'}; "
              f"never written to the outputs), {n_non} unseen real images as non-members: " + "; ".join(parts))
    return Control("overfit model (model attacks)", "positive", ok, detail,
                   {"members": m, "nonmembers": n_non, "resolution": side, "best": families,
                    "attacks": {k: {kk: v.to_dict() for kk, v in r.estimates().items()} for k, r in res.items()}})


def null_control(ctx, settings, sample: Sample, scores: dict[str, np.ndarray]) -> Control:
    """Two halves of the unseen images as "members" and "non-members": every attack must sit at chance."""
    base = [n for n in scores if not n.endswith("_rev")]  # a reversed attack has the mirrored AUC
    level = settings.control_alpha
    y = np.r_[np.ones(int(sample.null_a.sum())), np.zeros(int(sample.null_b.sum()))]
    off, table = [], {}
    for name in base:
        sc = scores[name]
        m = roc_metrics(np.r_[sc[sample.null_a], sc[sample.null_b]], y, k=len(base), alpha=level,
                        n_boot=settings.n_boot, rng=ctx.rng(f"membership_inference.null.{name}"),
                        groups=np.r_[sample.groups[sample.null_a], sample.groups[sample.null_b]])
        lo, hi = m.auc_simultaneous
        table[name] = {"auc": round(m.auc, 4), "interval": [round(lo, 4), round(hi, 4)]}
        if not lo <= 0.5 <= hi:
            off.append(f"{name} AUC {m.auc:.3f} [{lo:.3f}, {hi:.3f}]")
    detail = (f"{int(sample.null_a.sum())} vs {int(sample.null_b.sum())} unseen images; every attack's "
              f"{1 - level / max(len(base), 1):.2%} simultaneous interval "
              + ("contains 0.5" if not off else f"must contain 0.5 but: {'; '.join(off)}"))
    return Control("null: unseen vs unseen", "null", not off, detail, {"attacks": table})


def exchangeability_control(ctx, settings, sample: Sample, s: np.ndarray) -> Control:
    """An attack that sees neither the synthetic data nor the model must not separate members from non-members."""
    level = settings.control_alpha
    m = roc_metrics(s, sample.labels, alpha=level, n_boot=settings.n_boot,
                    rng=ctx.rng("membership_inference.exchangeability"), groups=sample.groups)
    ok = m.auc_ci[0] <= 0.5 <= m.auc_ci[1]
    detail = (f"distance to the other fold's holdout images, which needs neither the synthetic set nor the model: "
              f"AUC {m.auc:.3f}, {1 - level:.0%} interval [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}]"
              + ("" if ok else "; the holdout does not look like the training set, so every attack's result "
                 "mixes membership with that difference"))
    return Control("holdout exchangeability", "negative", ok, detail, {"auc": Estimate(m.auc, m.auc_ci,
                                                                                       2 * sample.n).to_dict()})
