"""Run an audit: resolve inputs, run each requested check, decide, write ``audit.json``."""
from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from synthgate import __version__
from synthgate.errors import InputError, MissingInputError, UsageError
from synthgate.fsutil import atomic_directory, digest_folder, to_json
from synthgate.imageset import ImageSet
from synthgate.privacy import salt_id
from synthgate.provenance import versions

from audit.core.base import CheckResult, check_class, create_check
from audit.core.context import AuditContext

SCHEMA_VERSION = 1

_NEEDS = {
    "real": "the real training set (--real, or a manifest.json naming it)",
    "holdout": "a holdout set of unseen real images (--holdout)",
    "model": "the model directory (--model, or a manifest.json naming it)",
    "patients": "patient IDs on the real set (metadata.csv patient_id or DICOM PatientID)",
    "labels": "labels on the real and synthetic sets",
}


@dataclass
class AuditInputs:
    synthetic: Path
    real: Path | None = None
    holdout: Path | None = None
    model: Path | None = None
    manifest: dict | None = None
    notes: list[str] = field(default_factory=list)


def read_manifest(synthetic: Path) -> dict | None:
    path = synthetic / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"manifest.json is not valid JSON ({exc})", path) from exc


def _manifest_path(synthetic: Path, manifest: dict, key: str) -> Path | None:
    entry = manifest.get(key)
    value = entry.get("path") if isinstance(entry, dict) else None
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else (synthetic / p).resolve()


def resolve_inputs(synthetic, real=None, holdout=None, model=None) -> AuditInputs:
    """Fill in the real set and model from the synthetic set's ``manifest.json`` when not given."""
    synthetic = Path(synthetic)
    if not synthetic.exists():
        raise MissingInputError("synthetic set folder does not exist", synthetic)
    inputs = AuditInputs(synthetic, Path(real) if real else None, Path(holdout) if holdout else None,
                         Path(model) if model else None)
    manifest = read_manifest(synthetic)
    inputs.manifest = manifest
    if manifest:
        if inputs.real is None and (p := _manifest_path(synthetic, manifest, "training_set")):
            inputs.real = p
            inputs.notes.append(f"real set from manifest.json: {p}")
        if inputs.model is None and (p := _manifest_path(synthetic, manifest, "model")):
            inputs.model = p
            inputs.notes.append(f"model from manifest.json: {p}")
    for name in ("real", "holdout", "model"):
        p = getattr(inputs, name)
        if p is not None and not p.exists():
            raise MissingInputError(f"{name} path does not exist", p)
    return inputs


def _set_entry(s: ImageSet | None) -> dict | None:
    if s is None:
        return None
    return {"path": str(s.root), "n_images": len(s), "sha256": s.digest,
            "skipped": [{"path": k.path, "reason": k.reason} for k in s.skipped]}


def missing_requirements(name: str, ctx: AuditContext) -> list[str]:
    missing = []
    for need in check_class(name).requires:
        if need == "real" and ctx.real is None:
            missing.append(_NEEDS["real"])
        elif need == "holdout" and ctx.holdout is None:
            missing.append(_NEEDS["holdout"])
        elif need == "model" and ctx.model is None:
            missing.append(_NEEDS["model"])
        elif need == "patients" and (ctx.real is None or not ctx.real.has_patients):
            missing.append(_NEEDS["patients"])
        elif need == "labels" and (ctx.real is None or not ctx.real.has_labels or not ctx.synthetic.has_labels):
            missing.append(_NEEDS["labels"])
    return missing


def check_overlap(ctx: AuditContext) -> None:
    """Refuse a holdout that shares files with the training set (it would not be unseen)."""
    if ctx.real is None or ctx.holdout is None:
        return
    shared = set(ctx.real.file_hashes.values()) & set(ctx.holdout.file_hashes.values())
    if shared:
        names = sorted(p for p, h in ctx.holdout.file_hashes.items() if h in shared)
        raise InputError(f"holdout shares {len(shared)} file(s) with the training set by content "
                         f"(e.g. {names[0]}); a holdout must be unseen", ctx.holdout.root)


@dataclass
class Decision:
    """The gate's outcome: verdict, why, and which images were dropped by which check and why."""

    verdict: str
    reasons: list[str]
    dropped: dict[str, dict]  # synthetic key -> {"check": name, "reason": ...} (the finding that dropped it)
    rounds: list[dict]


def _instances(checks: Mapping[str, Mapping[str, Any]]):
    out = {}
    for name, params in checks.items():
        try:
            out[name] = create_check(name, **dict(params))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    return out


def _run_one(check, ctx: AuditContext, required: bool) -> CheckResult:
    from dataclasses import replace

    missing = missing_requirements(check.name, ctx)
    if missing:
        if required:
            raise UsageError(f"check {check.name} is required but needs {'; '.join(missing)}")
        return check.result("skipped", "needs " + "; ".join(missing))
    start = time.perf_counter()
    result = check.run(ctx)
    return replace(result, seconds=time.perf_counter() - start)


def _files_of(keys: set[str], synthetic: ImageSet) -> set[str]:
    """Dropping one frame of a multi-frame file drops the whole file (a file is what ships)."""
    paths = {r.path for r in synthetic.records if r.key in keys}
    return {r.key for r in synthetic.records if r.path in paths}


def _without(ctx: AuditContext, dropped) -> AuditContext:
    from dataclasses import replace

    keep = [i for i, r in enumerate(ctx.synthetic.records) if r.key not in dropped]
    sub = replace(ctx, synthetic=ctx.synthetic.subset(keep))
    sub.__dict__["geometry"] = ctx.geometry  # the same comparison geometry as the whole audit
    return sub


def run_policy(ctx: AuditContext, policy, only: list[str] | None = None, max_rounds: int = 3):
    """Run a policy's checks, apply its actions, and decide.

    Per-image checks run first on the whole set.  Images flagged by a check
    whose action is ``drop`` are removed and the per-image checks re-run on
    what remains (privacy-enhancing sampling, as Packhäuser et al. 2023 filter
    synthetic chest X-rays), up to ``max_rounds``; set-level checks then run
    once on the final set.  If drops would remove more than the policy's
    ``max_drop_fraction``, the release is blocked instead.

    Returns ``(results, decision, final_context)``.
    """
    from policies.schema import CheckPolicy

    names = list(only) if only else list(policy.policy.checks)
    rules = {n: policy.policy.checks.get(n) or CheckPolicy() for n in names}
    checks = _instances({n: rules[n].settings for n in names})
    per_image = [n for n in names if checks[n].per_image]
    set_level = [n for n in names if not checks[n].per_image]
    n_total = len(ctx.synthetic)
    limit = policy.policy.max_drop_fraction * n_total
    dropped: dict[str, dict] = {}
    rounds: list[dict] = []
    results: dict[str, CheckResult] = {}
    current = ctx
    for round_no in range(1, max_rounds + 1):
        new: dict[str, dict] = {}
        for n in per_image:
            r = results[n] = _run_one(checks[n], current, rules[n].required)
            # a drop action removes every flagged image, also when the check only warns (e.g. matches within
            # the false-match rate): privacy-enhancing sampling filters each match, not only a significant excess
            if r.status in ("fail", "warn") and r.flagged and rules[n].action == "drop":
                why = {f.synthetic: f.reason for f in r.flagged}
                for key in sorted(_files_of(set(why), current.synthetic)):
                    new.setdefault(key, {"check": n, "reason": why.get(key, "another frame of this file was flagged")})
        rounds.append({"round": round_no, "images": len(current.synthetic), "dropped": len(new)})
        if not new:
            break
        dropped.update(new)
        if len(dropped) > limit or len(dropped) == n_total:
            break  # too much to filter: the last results stand and the gate blocks
        current = _without(ctx, dropped)
    over = len(dropped) > limit or (bool(dropped) and len(dropped) == n_total)
    if not over:
        for n in set_level:
            results[n] = _run_one(checks[n], current, rules[n].required)
    ordered = [results[n] for n in names if n in results]
    return ordered, _decide(ordered, rules, dropped, n_total, policy.policy.max_drop_fraction, rounds), current


def _decide(results, rules, dropped, n_total, max_drop, rounds) -> Decision:
    reasons = []
    if dropped and (len(dropped) > max_drop * n_total or len(dropped) == n_total):
        reasons.append(f"drop actions would remove {len(dropped)} of {n_total} images, more than the policy's "
                       f"max_drop_fraction {max_drop:g}: the model leaks too much to filter")
    for r in results:
        rule = rules[r.name]
        if r.status == "error":
            reasons.append(f"{r.name}: invalid ({r.reason})")
        elif r.status == "fail" and rule.action in ("block", "drop"):
            reasons.append(f"{r.name}: fail ({r.reason})")
        elif r.status == "inconclusive" and rule.on_inconclusive == "fail":
            reasons.append(f"{r.name}: inconclusive ({r.reason})")
    return Decision("fail" if reasons else "pass", reasons, dropped, rounds)


def build_audit(ctx: AuditContext, results: list[CheckResult], decision: Decision, inputs: AuditInputs,
                policy=None, command: list[str] | None = None) -> dict:
    """The ``audit.json`` document (DESIGN.md contract)."""
    controls = {r.name: [c.to_dict() for c in r.controls] for r in results if r.controls}
    control_ok = all(c["passed"] for cs in controls.values() for c in cs if c["kind"] == "positive")
    verdict, reasons = decision.verdict, list(decision.reasons)
    if not control_ok and verdict == "pass":  # never a pass with a failed control
        verdict = "fail"
        reasons.append("a positive control failed: the audit is invalid")
    dropped = sorted(decision.dropped)
    released = [k for k in ctx.synthetic.keys if k not in decision.dropped] if verdict == "pass" else []
    # ``ctx`` is the whole synthetic set; the checks' results describe what remained after drops
    model = None
    if ctx.model is not None:
        model = {"path": str(ctx.model), "sha256": digest_folder(ctx.model) if ctx.model.is_dir() else None}
    geo = ctx.geometry
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "synthgate", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": command,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "inputs": {
            "synthetic": _set_entry(ctx.synthetic), "real": _set_entry(ctx.real),
            "holdout": _set_entry(ctx.holdout), "model": model,
            "geometry": {"height": geo.height, "width": geo.width, "channels": geo.channels, "notes": list(geo.notes)},
            "notes": inputs.notes,
        },
        "policy": policy.to_dict() if policy is not None else None,
        "checks": [r.to_dict() for r in results],
        "control": {"passed": control_ok, "checks": controls},
        "verdict": verdict,
        "verdict_reasons": reasons,
        "dropped": dropped,
        "dropped_evidence": {k: decision.dropped[k] for k in dropped},
        "drop_rounds": decision.rounds,
        "released": released,
        "patient_hash_salt_id": salt_id(),
        "versions": versions("pydicom", "scikit-learn", "opacus", "faiss-cpu", "open_clip_torch"),
    }


def write_outputs(out: Path, audit: dict, workdir: Path) -> None:
    """Move the audit's files into ``out`` atomically (replacing an earlier audit there, never other data)."""
    out = Path(out)
    overwrite = out.exists() and (out / "audit.json").exists()
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise UsageError("output folder exists and does not hold an earlier audit; choose another --out", out)
        out.rmdir()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for f in sorted(workdir.iterdir()):
            f.replace(tmp / f.name)
        (tmp / "audit.json").write_text(to_json(audit))
        (tmp / "released.txt").write_text("".join(k + "\n" for k in audit["released"]))
        (tmp / "dropped.txt").write_text("".join(k + "\n" for k in audit["dropped"]))
