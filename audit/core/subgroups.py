"""Results per subgroup (STANDING Together): where memorisation and re-identification risk concentrate.

A policy names ``metadata.csv`` columns (sex, age band, site, scanner, view,
label...) in its ``subgroups`` block.  For every value of every named column
this module reports, with intervals and the subgroup's size:

- **copy rate** -- of the synthetic images whose nearest training image is in
  the subgroup, the share flagged as copies (and how many training images of
  the subgroup were copied);
- **re-identification rate** -- the same for the re-identification check's
  best match;
- **membership AUC** -- the deciding membership attack on the subgroup's
  members against the subgroup's non-members;
- **utility** -- the synthetic-trained and real-trained classifiers' AUC on
  the subgroup's holdout images, and their difference;
- **composition** -- the subgroup's share of the training set and, when the
  synthetic images carry the column, of the released set.

A subgroup with fewer than ``min_size`` units on a side is named as too small
to resolve instead of being given a number that means nothing.  Per-subgroup
limits are optional; the worst subgroup decides, on evidence: a limit fails
only when the subgroup's interval lies beyond it (``judge: interval``, the
default) or its point estimate does (``judge: point``).

Checks contribute through :attr:`~audit.core.base.CheckResult.per_image`
(never serialised): ``copy_detection`` / ``reidentification`` give, for every
synthetic image of the first round, the index of its matched training image
(``matched_real``) and whether it was flagged (``flagged``);
``membership_inference`` gives the evaluated images (``members``,
``nonmembers``: indices into the real set and the holdout) and the deciding
attack's ``scores``; ``utility`` gives the holdout images it scored
(``holdout``), their labels ``y`` and each arm's probabilities ``probs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .stats import binomial_rate, classification_metrics, roc_auc

LIMIT_KEYS = ("copy_rate", "reidentification_rate", "membership_auc", "utility_drop")


@dataclass(frozen=True)
class SubgroupSpec:
    """The policy's ``subgroups`` block, validated (see :mod:`audit.core.policy`)."""

    columns: tuple[str, ...]
    min_size: int = 20
    bins: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    limits: Mapping[str, float] = field(default_factory=dict)
    judge: str = "interval"


def value_of(record, column: str, bins: Mapping[str, Sequence[float]]) -> str | None:
    """The subgroup value of one image: its label or an attribute, binned when the policy gives bins."""
    raw = record.label if column == "label" else record.attribute(column)
    if raw is None or str(raw).strip() == "":
        return None
    edges = bins.get(column)
    if not edges:
        return str(raw)
    try:
        x = float(raw)
    except ValueError:
        return str(raw)
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo <= x < hi:
            return f"{lo:g}-{hi:g}"
    return f">={edges[-1]:g}" if x >= edges[-1] else f"<{edges[0]:g}"


def _values(imageset, column: str, bins) -> list[str | None]:
    return [value_of(r, column, bins) for r in imageset.records] if imageset is not None else []


def _rate_row(matched: np.ndarray, flagged: np.ndarray, real_values: list, value: str, min_size: int,
              n_real_in_group: int) -> dict:
    idx = np.array([i for i, m in enumerate(matched) if m >= 0 and real_values[int(m)] == value], int)
    n = len(idx)
    hits = int(flagged[idx].sum()) if n else 0
    copied_sources = len({int(matched[i]) for i in idx if flagged[i]})
    row = {"n_synthetic_matched": n, "flagged": hits,
           "training_images_matched_by_a_flagged_image": copied_sources, "n_training": n_real_in_group}
    if n < min_size:
        row["rate"] = None
        row["resolved"] = False
        row["note"] = f"too small to resolve: {n} synthetic image(s) matched this subgroup (needs {min_size})"
    else:
        row["rate"] = binomial_rate(hits, n).to_dict()
        row["resolved"] = True
    return row


def _auc_row(scores: np.ndarray, labels: np.ndarray, min_size: int, rng: np.random.Generator,
             n_boot: int = 400) -> dict:
    pos, neg = int(labels.sum()), int((~labels).sum())
    row = {"n_members": pos, "n_nonmembers": neg}
    if min(pos, neg) < min_size:
        row.update({"auc": None, "resolved": False,
                    "note": f"too small to resolve: {pos} members and {neg} non-members (needs {min_size} each)"})
        return row
    auc = roc_auc(scores, labels)
    boot = []
    p_idx, n_idx = np.flatnonzero(labels), np.flatnonzero(~labels)
    for _ in range(n_boot):
        s = np.r_[rng.choice(p_idx, pos), rng.choice(n_idx, neg)]
        boot.append(roc_auc(scores[s], labels[s]))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    row.update({"auc": {"value": round(float(auc), 6), "ci": [round(float(lo), 6), round(float(hi), 6)],
                        "n": pos + neg}, "resolved": True})
    return row


def _utility_row(y: np.ndarray, probs: Mapping[str, np.ndarray], mask: np.ndarray, min_size: int,
                 rng: np.random.Generator, n_boot: int = 400) -> dict:
    n = int(mask.sum())
    classes = np.unique(y[mask]) if n else np.array([])
    row: dict[str, Any] = {"n_holdout": n}
    if n < min_size or len(classes) < 2 or "real" not in probs or "synthetic" not in probs:
        row.update({"resolved": False, "note": f"too small to resolve: {n} holdout image(s) of "
                    f"{len(classes)} class(es) (needs {min_size} and two classes)"})
        return row

    def aucs(sel):  # the utility check's own metric: macro one-vs-rest AUC
        return {arm: float(classification_metrics(probs[arm][sel], y[sel])[0]) for arm in ("real", "synthetic")}

    idx = np.flatnonzero(mask)
    point = aucs(idx)
    diffs = []
    for _ in range(n_boot):
        s = rng.choice(idx, len(idx))
        a = aucs(s)
        if all(math.isfinite(v) for v in a.values()):
            diffs.append(a["real"] - a["synthetic"])
    drop = point["real"] - point["synthetic"]
    lo, hi = (np.percentile(diffs, [2.5, 97.5]) if diffs else (float("nan"), float("nan")))
    row.update({"auc_real": round(point["real"], 6), "auc_synthetic": round(point["synthetic"], 6),
                "drop": {"value": round(float(drop), 6), "ci": [round(float(lo), 6), round(float(hi), 6)], "n": n},
                "resolved": True})
    return row


def analyse(spec: SubgroupSpec, ctx, first: Mapping[str, Any], final: Mapping[str, Any]) -> dict:
    """The subgroup table: ``{column: {value: {metric: ...}}}`` plus the limits' verdicts.

    ``first`` maps per-image check names to their first-round results (every
    synthetic image), ``final`` the set-level checks to theirs.
    """
    rng = np.random.default_rng(int(ctx.rng("subgroups").integers(0, 2**31)))
    out: dict[str, Any] = {"columns": list(spec.columns), "min_size": spec.min_size, "judge": spec.judge,
                           "limits": dict(spec.limits), "table": {}, "exceeded": [], "unavailable": []}
    real, hold, synth = ctx.real, ctx.holdout, ctx.synthetic
    for column in spec.columns:
        real_v = _values(real, column, spec.bins)
        hold_v = _values(hold, column, spec.bins)
        syn_v = _values(synth, column, spec.bins)
        if real is None or all(v is None for v in real_v):
            out["unavailable"].append(f"{column}: no training image carries it (metadata.csv)")
            continue
        values = sorted({v for v in real_v if v is not None} | {v for v in hold_v if v is not None})
        col: dict[str, Any] = {}
        for value in values:
            row: dict[str, Any] = {}
            n_real = sum(1 for v in real_v if v == value)
            row["composition"] = {
                "training": n_real, "training_share": round(n_real / max(len(real_v), 1), 6),
                "holdout": sum(1 for v in hold_v if v == value),
                **({"synthetic": sum(1 for v in syn_v if v == value),
                    "synthetic_share": round(sum(1 for v in syn_v if v == value) / max(len(syn_v), 1), 6)}
                   if any(v is not None for v in syn_v) else {})}
            for check, key in (("copy_detection", "copy"), ("reidentification", "reidentification")):
                r = first.get(check)
                pi = getattr(r, "per_image", None) or {}
                if "matched_real" in pi:
                    row[key] = _rate_row(np.asarray(pi["matched_real"]), np.asarray(pi["flagged"], bool), real_v,
                                         value, spec.min_size, n_real)
            r = final.get("membership_inference")
            pi = getattr(r, "per_image", None) or {}
            if "scores" in pi:
                members, nonmembers = np.asarray(pi["members"], int), np.asarray(pi["nonmembers"], int)
                in_m = np.array([real_v[i] == value for i in members], bool)
                in_n = np.array([hold_v[i] == value for i in nonmembers], bool) if hold_v else np.zeros(0, bool)
                scores = np.asarray(pi["scores"], float)
                sel = np.r_[in_m, in_n]
                labels = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)][sel]
                row["membership"] = {"attack": pi.get("attack"), **_auc_row(scores[sel], labels, spec.min_size, rng)}
            r = final.get("utility")
            pi = getattr(r, "per_image", None) or {}
            if "probs" in pi:
                holdout_idx = np.asarray(pi["holdout"], int)
                mask = np.array([hold_v[i] == value for i in holdout_idx], bool)
                row["utility"] = _utility_row(np.asarray(pi["y"]), pi["probs"], mask, spec.min_size, rng)
            col[value] = row
        out["table"][column] = col
    out["exceeded"] = _exceeded(spec, out["table"])
    return out


def _beyond(est: Mapping | None, limit: float, judge: str) -> float | None:
    """The value that exceeds ``limit`` (lower interval bound or point), else ``None``."""
    if not est:
        return None
    value = est.get("ci", [None])[0] if judge == "interval" and est.get("ci") else est.get("value")
    return value if value is not None and value > limit else None


def _exceeded(spec: SubgroupSpec, table: Mapping) -> list[dict]:
    """Every subgroup beyond a policy limit, worst first."""
    found = []
    where = {"copy_rate": ("copy", "rate"), "reidentification_rate": ("reidentification", "rate"),
             "membership_auc": ("membership", "auc"), "utility_drop": ("utility", "drop")}
    for key, limit in spec.limits.items():
        if limit is None:
            continue
        part, metric = where[key]
        for column, values in table.items():
            for value, row in values.items():
                est = (row.get(part) or {}).get(metric)
                beyond = _beyond(est, float(limit), spec.judge)
                if beyond is not None:
                    found.append({"limit": key, "column": column, "value": value, "limit_value": float(limit),
                                  "estimate": est, "excess": round(beyond - float(limit), 6)})
    return sorted(found, key=lambda f: -f["excess"])


def reasons(analysis: Mapping) -> list[str]:
    """The verdict reasons for subgroups beyond a limit (the worst subgroup of each limit first)."""
    out, seen = [], set()
    for f in analysis.get("exceeded", []):
        if f["limit"] in seen:
            continue
        seen.add(f["limit"])
        est = f["estimate"]
        ci = f" [{est['ci'][0]:.3f}, {est['ci'][1]:.3f}]" if est.get("ci") else ""
        out.append(f"subgroup {f['column']}={f['value']}: {f['limit'].replace('_', ' ')} {est['value']:.3f}{ci} "
                   f"beyond the policy's per-subgroup limit {f['limit_value']:g} (the worst subgroup decides)")
    return out
