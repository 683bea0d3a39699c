"""The inputs of an audit: where the real set and model come from, and what each check needs of them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from synthgate.errors import InputError, MissingInputError
from synthgate.imageset import ImageSet

from .base import check_class
from .context import AuditContext

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
