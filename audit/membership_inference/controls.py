"""The membership check's controls: it must catch planted leaks and must not flag independent data.

positive
    near-copies of members planted in an in-memory copy of the synthetic set
    must make the pixel DCR attack fail the policy (scenario 1); a tiny model
    overfit on a handful of real images must be caught by every model-attack
    family (scenario 2);
null
    chance, measured by relabelling whole patients member / non-member at
    random: it must stay below the policy's AUC limit, else the sample cannot
    resolve a leak at the limit and no pass is possible (it never excuses a
    leak);
negative
    an attack with no access to the synthetic data or the model must not
    separate members from non-members (holdout exchangeability: otherwise the
    holdout is not from the training population).
"""
from __future__ import annotations

import math

import numpy as np

from synthgate.imageset import Geometry

from audit.core.base import Control, Estimate
from audit.core.stats import roc_auc

from .design import Sample, groups_of
from .statistics import RocMetrics, exceeded, relabelled_max_auc, roc_metrics


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
    """Overfit a tiny model on a few real images; the model attacks must catch them (at least one family).

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
    ok = bool(caught)
    parts = [f"{fam}: {best} AUC {res[best].auc:.3f} [{res[best].auc_ci[0]:.3f}, {res[best].auc_ci[1]:.3f}]"
             + ("" if fam in caught else " not caught (this family is not validated on this model; the decision "
                "rests on the families that are)") for fam, best in families.items()]
    detail = (f"tiny model overfit on {m} real images at {side}x{side} ({'cached' if cached else 'trained now'}; "
              f"never written to the outputs), {n_non} unseen real images as non-members: " + "; ".join(parts))
    return Control("overfit model (model attacks)", "positive", ok, detail,
                   {"members": m, "nonmembers": n_non, "resolution": side, "best": families, "validated": caught,
                    "attacks": {k: {kk: v.to_dict() for kk, v in r.estimates().items()} for k, r in res.items()}})


def null_control(ctx, settings, limits: dict, sample: Sample, scores: dict[str, np.ndarray]) -> Control:
    """Chance, measured: the strongest attack's AUC when whole patients are relabelled at random.

    Its ``1 - alpha`` quantile is the largest AUC that chance alone gives the
    best of the k attacks on this sample (patients moved together).  When it
    reaches the policy's AUC limit, the sample *cannot resolve* a leak at the
    limit: a pass would mean nothing, so the check is inconclusive and says
    how many patients would resolve it.  It never excuses a leak: a
    significant, confirmed leak fails whatever this control says.
    """
    level = settings.alpha
    null, distinct, exact = relabelled_max_auc(scores, sample.labels, sample.groups, settings.n_permutations,
                                               ctx.rng("membership_inference.null"))
    q = float(np.quantile(null, 1 - level, method="higher"))
    observed = max(roc_auc(s, sample.labels) for s in scores.values())
    p = float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))
    n_groups = len(set(map(str, sample.groups)))
    limit = limits.get("auc")
    total = count_text(distinct)
    how = f"all {total} relabellings" if exact else f"{len(null):,} random relabellings (of {total})"
    metrics = {"chance_auc_quantile": round(q, 4), "level": level, "relabellings": how, "patients": n_groups,
               "observed_max_auc": round(observed, 4), "p_value": round(p, 6), "limit": limit}
    if limit is None:
        return Control(NULL_NAME, "null", True, f"{how} of {n_groups} patients: chance gives the best of "
                       f"{len(scores)} attack(s) an AUC up to {q:.3f} ({1 - level:.0%}); the policy sets no AUC "
                       f"limit to compare it with", {**metrics, "resolved": True})
    resolved = q < limit
    detail = (f"{how} of {n_groups} patients between the roles: chance alone gives the best of {len(scores)} "
              f"attack(s) an AUC up to {q:.3f} ({1 - level:.0%} quantile); observed {observed:.3f}, permutation "
              f"p = {p:.4f}")
    if resolved:
        detail += f"; below the limit {limit:g}, so a leak at the limit stands out from chance"
    else:
        need = needed_patients(q, limit, n_groups)
        detail += (f"; cannot resolve: a leak at the limit {limit:g} would not stand out from chance with this "
                   f"many patients; about {need:,} patients (members and non-members together) would resolve it")
        metrics["patients_needed"] = need
    return Control(NULL_NAME, "null", resolved, detail, {**metrics, "resolved": resolved})


def count_text(n: int) -> str:
    """A count of relabellings: exact below a billion, else two significant figures.

    The count is a binomial coefficient of the sample's patients: with every member its own patient
    (a 100,000-image training set, 1,000 members) it is about 1e600, beyond a float, so the largest ones are
    formatted exactly as integers (``decimal``) instead of through ``float``, which overflowed.
    """
    if n < 10**9:
        return f"{n:,}"
    if n < 10**300:
        return f"{n:.2g}"
    from decimal import Decimal

    return format(Decimal(n), ".2g")


#: the null control's name in results and reports
NULL_NAME = "null: patients relabelled at random"


def needed_patients(q: float, limit: float, n_groups: int) -> int:
    """Patients that bring chance's quantile ``q`` below ``limit`` (its spread shrinks as 1 / sqrt(n))."""
    spread, room = max(q - 0.5, 1e-9), max(limit - 0.5, 1e-9)
    return int(math.ceil(n_groups * (spread / room) ** 2 * 1.1))


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
