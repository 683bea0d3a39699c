"""Bundle a synthetic set that passed its audit, and verify bundles.

A bundle holds only the released images, byte for byte, with:

- ``manifest.json``: SHA-256 of every file in the bundle, what the bundle is,
  the audit's digest and verdict, the policy, the generator provenance;
- ``audit.json`` (the audit as run), ``report.html`` (its shareable edition),
  ``policy.yaml`` (the exact policy text the gate applied);
- ``MODEL_CARD.md`` (Mitchell et al. 2019 sections, Hugging Face front matter)
  and ``DATASHEET.md`` (Gebru et al. 2021 sections, STANDING Together items).

Refused: an audit that failed or whose controls failed; a synthetic set whose
files changed since the audit (digest and per-file hashes); a policy other
than the audited one; a released file that is a symlink leading outside the
set; an existing target.  The bundle is written in a temporary sibling and
renamed into place, so an interruption leaves nothing half-written.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

from synthgate import __version__
from synthgate.errors import InputError, IntegrityError, MissingInputError, UsageError
from synthgate.fsutil import atomic_directory, sha256_file, sha256_text, to_json
from synthgate.imageset import ImageSet

MANIFEST = "manifest.json"
IMAGES = "images"


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise MissingInputError(f"{what} does not exist", path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} is not readable JSON ({exc})", path) from exc


def _check_audit(audit: dict, audit_path: Path) -> None:
    if "verdict" not in audit or "inputs" not in audit:
        raise InputError("is not an audit.json written by `audit check`", audit_path)
    if audit["verdict"] != "pass":
        reasons = "; ".join(audit.get("verdict_reasons", [])[:2])
        raise UsageError(f"the audit failed, so nothing may be released ({reasons})", audit_path)
    if not audit.get("control", {}).get("passed", False):
        raise UsageError("the audit's positive controls failed: it is invalid and releases nothing", audit_path)
    flagged = {f["synthetic"]: c["name"] for c in audit["checks"] for f in c.get("flagged", [])}
    shipped = [k for k in audit.get("released", []) if k in flagged]
    if shipped:
        raise UsageError(f"{len(shipped)} released image(s) were flagged (e.g. {shipped[0]} by {flagged[shipped[0]]}) "
                         "and only warned about by the policy; a bundle ships only what passed: re-audit with a "
                         "policy that drops or blocks them", audit_path)


def _check_set(synthetic: Path, audit: dict, released: list[str]) -> ImageSet:
    entry = audit["inputs"]["synthetic"]
    imageset = ImageSet(synthetic, skip_unreadable=bool(entry.get("skipped")))
    if imageset.skipped:
        imageset.verify()
    if imageset.digest != entry["sha256"]:
        raise IntegrityError("the synthetic set changed after the audit (its digest differs); audit it again",
                             synthetic)
    root = synthetic.resolve()
    by_key = {r.key: r for r in imageset.records}
    for key in released:
        record = by_key.get(key)
        if record is None:
            raise IntegrityError(f"released image {key!r} is not in the synthetic set", synthetic)
        path = synthetic / record.path
        if path.is_symlink() and root not in path.resolve().parents:
            raise UsageError(f"{record.path} is a symlink that leads outside the synthetic set; refusing to bundle",
                             synthetic)
        if sha256_file(path) != record.sha256:
            raise IntegrityError(f"{record.path} changed after the audit", synthetic)
    return imageset


def _released_files(imageset: ImageSet, released: list[str]) -> list[str]:
    """Files whose every frame was released (a file ships whole or not at all)."""
    keep = set(released)
    files: dict[str, bool] = {}
    for r in imageset.records:
        files[r.path] = files.get(r.path, True) and r.key in keep
    return sorted(p for p, ok in files.items() if ok)


def bundle(synthetic: str | Path, audit_path: str | Path, out: str | Path, policy: str | None = None) -> dict:
    """Write a release bundle; returns its manifest."""
    from reports.render import render_html

    from .documents import datasheet, model_card

    synthetic, audit_path, out = Path(synthetic), Path(audit_path), Path(out)
    audit = _read_json(audit_path, "audit file")
    _check_audit(audit, audit_path)
    if policy is not None:
        from audit.core.policy import load_policy

        wanted = load_policy(policy)
        if wanted.sha256 != (audit.get("policy") or {}).get("sha256"):
            raise UsageError(f"policy mismatch: the audit applied {audit['policy'].get('name')!r} "
                             f"(sha256 {str(audit['policy'].get('sha256'))[:12]}), not {wanted.name!r}", audit_path)
    if out.exists():
        raise UsageError("bundle target already exists; choose a new folder", out)
    if not synthetic.exists():
        raise MissingInputError("synthetic set folder does not exist", synthetic)
    imageset = _check_set(synthetic, audit, audit["released"])
    files = _released_files(imageset, audit["released"])
    if not files:
        raise UsageError("the audit released no image", audit_path)
    gen_manifest = _read_json(synthetic / "manifest.json", "manifest") if (synthetic / "manifest.json").exists() else None
    model_info = _model_info(audit)
    labels = {r.path: r.label for r in imageset.records}
    with atomic_directory(out) as tmp:
        (tmp / IMAGES).mkdir()
        for rel in files:
            dst = tmp / IMAGES / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(synthetic / rel, dst)  # bytes as audited (symlinks inside the set resolved)
        if any(labels[p] is not None for p in files):
            rows = "".join(f"{p},{labels[p] or ''}\n" for p in files)
            (tmp / IMAGES / "metadata.csv").write_text("path,label\n" + rows)
        (tmp / "audit.json").write_text(to_json(audit))
        (tmp / "report.html").write_text(render_html(audit, internal=False, synthetic=imageset))
        policy_text = (audit.get("policy") or {}).get("text")
        if policy_text:
            (tmp / "policy.yaml").write_text(policy_text)
        (tmp / "MODEL_CARD.md").write_text(model_card(audit, model_info, gen_manifest))
        (tmp / "DATASHEET.md").write_text(datasheet(audit, model_info, gen_manifest, files, labels))
        manifest = {
            "schema_version": 1,
            "kind": "synthgate release bundle",
            "tool": {"name": "synthgate", "version": __version__},
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "synthetic_set": {"path": str(synthetic), "sha256": audit["inputs"]["synthetic"]["sha256"]},
            "audit": {"sha256": sha256_text((tmp / "audit.json").read_text()), "verdict": audit["verdict"],
                      "created": audit.get("created")},
            "policy": {k: (audit.get("policy") or {}).get(k) for k in ("name", "sha256")},
            "generator": gen_manifest and {k: gen_manifest.get(k) for k in ("model", "training_set", "sampler")},
            "images": len(files),
            "files": {p.relative_to(tmp).as_posix(): sha256_file(p)
                      for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / MANIFEST).write_text(to_json(manifest))
    return manifest


def _model_info(audit: dict) -> dict | None:
    model = audit["inputs"].get("model")
    if not model:
        return None
    path = Path(model["path"]) / "synthgate.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verify(bundle_dir: str | Path) -> list[str]:
    """Problems found in a bundle (empty when every hash matches and nothing was added)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise MissingInputError("bundle folder does not exist", bundle_dir)
    manifest = _read_json(bundle_dir / MANIFEST, "bundle manifest")
    expected = manifest.get("files")
    if not isinstance(expected, dict):
        raise InputError("manifest.json lists no files (not a synthgate bundle)", bundle_dir / MANIFEST)
    problems = []
    present = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file() or p.is_symlink()}
    for rel, sha in sorted(expected.items()):
        path = bundle_dir / rel
        if rel not in present:
            problems.append(f"{rel}: missing")
        elif path.is_symlink():
            problems.append(f"{rel}: replaced by a symlink")
        elif sha256_file(path) != sha:
            problems.append(f"{rel}: changed (SHA-256 differs)")
    for rel in sorted(present - set(expected) - {MANIFEST}):
        problems.append(f"{rel}: not in the manifest (added after bundling)")
    return problems
