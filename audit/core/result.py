"""The result of an audit as one typed value, and the one place ``audit.json`` is made from it."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

from synthgate import __version__
from synthgate.fsutil import to_json
from synthgate.outputs import OutputFolder
from synthgate.imageset import Geometry, ImageSet
from synthgate.privacy import salt_id
from synthgate.provenance import versions

from .base import CheckResult
from .policy import Policy
from .runner import Decision

SCHEMA_VERSION = 1


def _set_entry(s: ImageSet | None) -> dict | None:
    if s is None:
        return None
    # resolved: a bundle or report made from another working directory finds the same set
    return {"path": str(Path(s.root).resolve()), "n_images": len(s), "sha256": s.digest,
            "skipped": [{"path": k.path, "reason": k.reason} for k in s.skipped]}


def manifest_digest(synthetic: str | Path) -> str | None:
    """SHA-256 of the synthetic set's ``manifest.json`` (the generator's claims), ``None`` when it has none.

    The image digest leaves sidecars out, so the audit records this one: a manifest written or edited after the
    audit would otherwise reach the bundle's signed manifest, its model card and the release ledger.
    """
    from synthgate.fsutil import sha256_file

    path = Path(synthetic) / "manifest.json"
    return sha256_file(path) if path.is_file() else None


def _synthetic_entry(s: ImageSet) -> dict:
    return {**_set_entry(s), "manifest_sha256": manifest_digest(s.root)}


def _attacker_entry(s: ImageSet) -> dict:
    """An attacker data set: where, how many images and patients, its digest (never its patient IDs)."""
    return {**_set_entry(s), "n_patients": s.n_patients}


@dataclass(frozen=True)
class Audit:
    """Everything one audit found and decided (DESIGN.md, "Audit result").

    ``synthetic`` is the whole synthetic set as given; ``results`` describe
    what remained after drop rounds.  :meth:`to_dict` is the only place the
    ``audit.json`` document is built.
    """

    synthetic: ImageSet
    real: ImageSet | None
    holdout: ImageSet | None
    model: Path | None
    geometry: Geometry
    policy: Policy
    results: tuple[CheckResult, ...]
    decision: Decision
    seed: int = 0
    device: str = "auto"
    command: Sequence[str] | None = None
    notes: tuple[str, ...] = ()
    attacker: tuple[ImageSet, ...] = ()  # --attacker-data: public sets the re-identification attacker trains on
    left_alone: tuple[str, ...] = ()  # files found in the output folder that this audit did not write
    written: dict | None = field(default=None, compare=False, repr=False)  # audit.json as written (signed)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())

    @property
    def control_passed(self) -> bool:
        """Every positive control of every check held."""
        return all(c.passed for r in self.results for c in r.controls if c.kind == "positive")

    @property
    def verdict(self) -> str:
        """``fail``; ``partial`` (a ``--checks`` subset ran: never a release verdict); or ``pass``."""
        if self.decision.verdict != "pass" or not self.control_passed:  # never a pass with a failed control
            return "fail"
        return "partial" if self.policy.subset is not None else "pass"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def reasons(self) -> list[str]:
        out = list(self.decision.reasons)
        if self.decision.verdict == "pass" and not self.control_passed:
            out.append("a positive control failed: the audit is invalid")
        if self.verdict == "partial":
            out.append(f"partial audit: only {', '.join(self.policy.subset)} of the policy's checks ran "
                       "(--checks); it can never release anything")
        return out

    @property
    def dropped(self) -> list[str]:
        return sorted(self.decision.dropped)

    @property
    def released(self) -> list[str]:
        return [k for k in self.synthetic.keys if k not in self.decision.dropped] if self.passed else []

    @property
    def released_sha256(self) -> dict[str, str]:
        """The SHA-256 of every released image's file, as audited (a bundle must ship exactly these)."""
        by_key = {r.key: r.sha256 for r in self.synthetic.records}
        return {k: by_key[k] for k in self.released}

    @cached_property
    def model_sha256(self) -> str | None:
        from generators.loading import model_digest

        return model_digest(self.model) if self.model is not None else None

    def result(self, name: str) -> CheckResult | None:
        return next((r for r in self.results if r.name == name), None)

    def to_dict(self) -> dict:
        """The ``audit.json`` document (DESIGN.md contract)."""
        controls = {r.name: [c.to_dict() for c in r.controls] for r in self.results if r.controls}
        dropped = self.dropped
        geo = self.geometry
        model = None if self.model is None else {"path": str(Path(self.model).resolve()), "sha256": self.model_sha256}
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "synthgate", "version": __version__},
            "created": self.created,
            "command": list(self.command) if self.command is not None else None,
            "seed": self.seed,
            "device": str(self.device),
            "inputs": {
                "synthetic": _synthetic_entry(self.synthetic), "real": _set_entry(self.real),
                "holdout": _set_entry(self.holdout), "model": model,
                "attacker_data": [_attacker_entry(a) for a in self.attacker],
                "geometry": {"height": geo.height, "width": geo.width, "channels": geo.channels,
                             "notes": list(geo.notes)},
                "notes": [*self.notes, *self.decision.notes],
            },
            "policy": self.policy.to_dict(),
            "checks": [r.to_dict() for r in self.results],
            "control": {"passed": self.control_passed, "checks": controls},
            "verdict": self.verdict,
            "verdict_reasons": self.reasons,
            "dropped": dropped,
            "dropped_evidence": {k: self.decision.dropped[k] for k in dropped},
            "drop_rounds": self.decision.rounds,
            "released": self.released,
            "released_sha256": self.released_sha256,
            **({"subgroups": self.decision.subgroups} if self.decision.subgroups is not None else {}),
            "patient_hash_salt_id": salt_id(),
            "versions": versions("pydicom", "scikit-learn", "opacus", "faiss-cpu", "open_clip_torch"),
        }


def write_outputs(out: Path, document: dict, workdir: Path) -> tuple[list[str], dict]:
    """Write the audit's files into ``out`` (see :class:`synthgate.outputs.OutputFolder`).

    A new folder appears whole; an earlier audit folder has only the files an
    audit wrote replaced, and anything else there (an internal report, a
    steward's notes) is left alone -- returned, so the caller can say so,
    with the signed document as written.
    ``released.jsonl`` / ``dropped.jsonl`` hold one JSON object per image, so
    a file name with a newline or a control character cannot split or forge
    a line.  ``audit.json`` is signed with this installation's key
    (:mod:`synthgate.signing`).
    """
    import json

    from synthgate.signing import sign_document

    document = sign_document(document)  # who wrote this audit, and that nobody edited it since (release verifies)
    folder = OutputFolder(out, "audit check")
    with folder.writing() as tmp:
        for f in sorted(workdir.iterdir()) if workdir.exists() else []:
            f.replace(tmp / f.name)
        (tmp / "audit.json").write_text(to_json(document))
        sha = document.get("released_sha256") or {}
        (tmp / "released.jsonl").write_text("".join(
            json.dumps({"image": k, "sha256": sha.get(k)}, ensure_ascii=True) + "\n" for k in document["released"]))
        evidence = document.get("dropped_evidence") or {}
        (tmp / "dropped.jsonl").write_text("".join(
            json.dumps({"image": k, **evidence.get(k, {})}, ensure_ascii=True) + "\n" for k in document["dropped"]))
    return folder.left_alone, document


def format_summary(audit: dict, out: Path, left_alone: list[str] | None = None) -> str:
    """The terminal summary of an audit (every name escaped: file names may hold control characters)."""
    from synthgate.clikit import printable

    lines = [f"verdict: {audit['verdict'].upper()}"]
    for c in audit["checks"]:
        lines.append(f"  {c['name']:<22} {c['status']:<12} {printable(c['reason'])}")
    for r in audit["verdict_reasons"]:
        lines.append(f"  - {printable(r)}")
    if audit["dropped"]:
        by: dict[str, int] = {}
        for e in audit["dropped_evidence"].values():
            by[e["check"]] = by.get(e["check"], 0) + 1
        lines.append(f"dropped {len(audit['dropped'])} image(s) ({', '.join(f'{k}: {v}' for k, v in by.items())}); "
                     "the checks above describe what remained")
    lines.append(f"released {len(audit['released'])} of {audit['inputs']['synthetic']['n_images']} images; "
                 f"report: {printable(out / 'report.html')}")
    if left_alone:
        lines.append(f"left alone in {printable(out)} (not written by this audit; they may describe an earlier "
                     f"one): {', '.join(printable(f) for f in left_alone[:5])}"
                     + (f" and {len(left_alone) - 5} more" if len(left_alone) > 5 else ""))
    return "\n".join(lines)
