"""Run an audit: resolve inputs, run each requested check, decide, write ``audit.json``."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from synthgate import __version__
from synthgate.errors import InputError, MissingInputError, UsageError
from synthgate.fsutil import atomic_directory, digest_folder, to_json
from synthgate.imageset import ImageSet
from synthgate.privacy import salt_id

from .base import CheckResult, check_class, create_check
from .context import AuditContext

SCHEMA_VERSION = 1
DEFAULT_CHECKS = ("copy_detection",)

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


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "synthgate": __version__}
    for dist in ("numpy", "torch", "diffusers", "pydicom", "scikit-learn", "opacus", "faiss-cpu"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


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


def decide(results: list[CheckResult]) -> tuple[str, list[str]]:
    """The gate without a policy: every check must pass (warn allowed, skipped noted)."""
    reasons = []
    for r in results:
        if r.status == "error":
            reasons.append(f"{r.name}: invalid ({r.reason})")
        elif r.status in ("fail", "inconclusive"):
            reasons.append(f"{r.name}: {r.status} ({r.reason})")
    return ("fail" if reasons else "pass"), reasons


def run_checks(ctx: AuditContext, checks: Mapping[str, Mapping[str, Any]], strict: bool = True) -> list[CheckResult]:
    """Run each check (in order) and collect every result before anything is decided."""
    from synthgate.progress import set_quiet  # noqa: F401  (progress follows ctx.progress)

    instances = {}
    for name, params in checks.items():
        try:
            instances[name] = create_check(name, **dict(params))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    results = []
    for name, check in instances.items():
        missing = missing_requirements(name, ctx)
        if missing:
            if strict:
                raise UsageError(f"check {name} needs {'; '.join(missing)}")
            results.append(check.result("skipped", "needs " + "; ".join(missing)))
            continue
        start = time.perf_counter()
        result = check.run(ctx)
        results.append(_with_seconds(result, time.perf_counter() - start))
    return results


def _with_seconds(result: CheckResult, seconds: float) -> CheckResult:
    from dataclasses import replace

    return replace(result, seconds=seconds)


def build_audit(ctx: AuditContext, results: list[CheckResult], inputs: AuditInputs, policy: dict | None = None,
                command: list[str] | None = None) -> dict:
    verdict, reasons = decide(results)
    controls = {r.name: [c.to_dict() for c in r.controls] for r in results if r.controls}
    control_ok = all(c["passed"] for cs in controls.values() for c in cs if c["kind"] == "positive")
    keys = ctx.synthetic.keys
    dropped: list[str] = []
    released = [k for k in keys if k not in set(dropped)] if verdict == "pass" else []
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
        "policy": policy or {"name": "checks-only", "sha256": None, "checks": [r.name for r in results]},
        "checks": [r.to_dict() for r in results],
        "control": {"passed": control_ok, "checks": controls},
        "verdict": verdict,
        "verdict_reasons": reasons,
        "dropped": dropped,
        "released": released,
        "patient_hash_salt_id": salt_id(),
        "versions": _versions(),
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
