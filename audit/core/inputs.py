"""The inputs of an audit: where the real set and model come from, and what each check needs of them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from synthgate.errors import InputError, MissingInputError, UsageError
from synthgate.outputs import resolved

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


MAX_MANIFEST_BYTES = 64 << 20


def read_manifest(synthetic: Path) -> dict | None:
    """The synthetic set's ``manifest.json`` (a JSON object), or ``None`` when there is none."""
    path = synthetic / "manifest.json"
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise InputError(f"manifest.json is larger than {MAX_MANIFEST_BYTES >> 20} MB", path)
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"manifest.json is not valid JSON ({' '.join(str(exc).split())})", path) from None
    if not isinstance(data, dict):
        raise InputError("manifest.json must be a JSON object (a synthetic set manifest written by "
                         "`synthgate sample`)", path)
    return data


def _manifest_path(synthetic: Path, manifest: dict, key: str, flag: str) -> Path | None:
    """A path the manifest names, confined to the synthetic set's parent folder.

    Relative paths resolve against the manifest's folder.  The manifest is an
    input anyone can edit, so it may not send the audit anywhere on the disk:
    a path that resolves outside the folder holding the synthetic set is used
    only when given explicitly on the command line (``flag``).
    """
    entry = manifest.get(key)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), (str, type(None))):
        raise InputError(f"manifest.json: {key} must be an object with a 'path' string", synthetic / "manifest.json")
    value = entry.get("path")
    if not value:
        return None
    p = Path(value)
    p = resolved(p if p.is_absolute() else synthetic / p)
    tree = resolved(synthetic).parent
    if not p.is_relative_to(tree):
        raise InputError(f"manifest.json names a {key.replace('_', ' ')} outside {tree} ({value}); a path outside "
                         f"the folder holding the synthetic set is used only when given explicitly: pass {flag}",
                         synthetic / "manifest.json")
    return p


def resolve_inputs(synthetic, real=None, holdout=None, model=None) -> AuditInputs:
    """Fill in the real set and model from the synthetic set's ``manifest.json`` when not given."""
    synthetic = Path(synthetic)
    if not synthetic.exists():
        raise MissingInputError("synthetic set folder does not exist", synthetic)
    if not synthetic.is_dir():
        raise InputError("is not a folder (a synthetic image set is a folder)", synthetic)
    inputs = AuditInputs(synthetic, Path(real) if real else None, Path(holdout) if holdout else None,
                         Path(model) if model else None)
    manifest = read_manifest(synthetic)
    inputs.manifest = manifest
    if manifest:
        if inputs.real is None and (p := _manifest_path(synthetic, manifest, "training_set", "--real")):
            inputs.real = p
            inputs.notes.append(f"real set from manifest.json: {p}")
        if inputs.model is None and (p := _manifest_path(synthetic, manifest, "model", "--model")):
            inputs.model = p
            inputs.notes.append(f"model from manifest.json: {p}")
    for name in ("real", "holdout", "model"):
        p = getattr(inputs, name)
        if p is not None and not p.exists():
            raise MissingInputError(f"{name} path does not exist", p)
    if inputs.model is not None:
        from generators.loading import model_files, read_info

        read_info(inputs.model)  # a model folder (synthgate.json) or a clear error, before any work
        model_files(inputs.model)  # and one whose declared files are its own (no symlinks), before any work
    return inputs


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


def check_attacker_data(ctx: AuditContext, paths: dict[str, Path | None]) -> None:
    """Refuse attacker data that is empty, lacks patient IDs, or overlaps an audited set.

    Attacker data is public data *other* than the audited sets: the same
    folder, a folder inside one of them, or one image file in common (by
    content) would let the attacker train on the patients it is judged on.
    ``paths`` maps each audited role to its folder.
    """
    sets = {"synthetic": ctx.synthetic, "real": ctx.real, "holdout": ctx.holdout}
    audited_pixels: dict[str, set[str]] = {}  # each audited set decoded and hashed once, however many attacker sets
    seen: dict[Path, Path] = {}
    for a in ctx.attacker:
        root = resolved(a.root)
        if len(a) == 0:
            raise InputError("attacker data holds no images (--attacker-data)", a.root)
        if not a.has_patients:
            missing = sum(p is None for p in a.patient_ids)
            raise InputError(f"attacker data needs a patient_id on every image (metadata.csv patient_id or DICOM "
                             f"PatientID); {missing} of {len(a)} images have none (--attacker-data)", a.root)
        for role, path in [*paths.items(), *((f"attacker data {p}", p) for p in seen)]:
            if path is None:
                continue
            other = resolved(path)
            if other == root or other in root.parents or root in other.parents:
                raise UsageError(f"--attacker-data {a.root} is the {role} set's folder or overlaps it; attacker data "
                                 "must be other patients' public images", a.root)
        seen[root] = root
        for role, s in sets.items():
            if s is None:
                continue
            shared = set(a.file_hashes.values()) & set(s.file_hashes.values())
            if shared:
                name = sorted(p for p, h in a.file_hashes.items() if h in shared)[0]
                raise InputError(f"attacker data shares {len(shared)} image file(s) with the {role} set by content "
                                 f"(e.g. {name}); attacker data must be other patients' public images", a.root)
        # the same images re-encoded (other bytes, same pixels): the holdout's unseen patients as "public" data
        # made the verifier's validation and calibration look at patients it trained on (red team)
        mine = pixel_digests(a)
        for role, s in sets.items():
            if s is None:
                continue
            if role not in audited_pixels:
                audited_pixels[role] = set(pixel_digests(s).values())
            shared = set(mine.values()) & audited_pixels[role]
            if shared:
                name = sorted(k for k, h in mine.items() if h in shared)[0]
                raise InputError(f"attacker data holds {len(shared)} image(s) pixel-identical to images of the {role} "
                                 f"set (e.g. {name}, re-encoded?); attacker data must be other patients' public "
                                 "images", a.root)


def pixel_digests(imageset) -> dict[str, str]:
    """SHA-256 of every image's decoded pixels (float32 in [0, 1], shape included), by record key."""
    import hashlib

    import numpy as np

    out = {}
    for i, r in enumerate(imageset.records):
        x = np.ascontiguousarray(imageset.load(i), np.float32)
        out[r.key] = hashlib.sha256(repr(x.shape).encode() + x.tobytes()).hexdigest()
    return out


def check_overlap(ctx: AuditContext) -> None:
    """Refuse a holdout that shares files with the training set (it would not be unseen) or with the synthetic set.

    The holdout calibrates the copy rule and stands for unseen real images in
    every check; synthetic images in it (the synthetic folder given as the
    holdout, or planted copies added to a real holdout) would make copies look
    like unseen images and lower every threshold until nothing is flagged.
    """
    if ctx.holdout is None:
        return
    held = resolved(ctx.holdout.root)
    others = [(role, s) for role, s in (("synthetic", ctx.synthetic), ("training", ctx.real)) if s is not None]
    for role, other in others:
        root = resolved(other.root)
        if root == held or root in held.parents or held in root.parents:
            raise UsageError(f"the holdout is the {role} set's folder or overlaps it; a holdout must be unseen real "
                             "images", ctx.holdout.root)
    for role, other in others:
        shared = set(other.file_hashes.values()) & set(ctx.holdout.file_hashes.values())
        if shared:
            names = sorted(p for p, h in ctx.holdout.file_hashes.items() if h in shared)
            raise InputError(f"holdout shares {len(shared)} file(s) with the {role} set by content "
                             f"(e.g. {names[0]}); a holdout must be unseen real images", ctx.holdout.root)


def check_model_training_set(ctx: AuditContext) -> None:
    """Refuse a model whose own record says it was trained on the holdout.

    Membership inference would then test the holdout's images as non-members
    and the real set's as members, exactly backwards, and copy detection would
    search a set the model never saw (a red team bundled such a model).
    """
    if ctx.model is None or ctx.holdout is None:
        return
    from generators.loading import read_info

    block = read_info(ctx.model).get("training_set")
    digest = block.get("sha256") if isinstance(block, dict) else None
    if isinstance(digest, str) and digest and digest == ctx.holdout.digest:
        raise InputError("the model's synthgate.json records the holdout as its training set (same digest); the "
                         "holdout must be images the model never saw: give the set it was trained on as --real and "
                         "unseen images as --holdout", ctx.holdout.root)
