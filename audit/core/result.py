"""The result of an audit as one typed value, and the one place ``audit.json`` is made from it."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

from synthgate import __version__
from synthgate.errors import UsageError
from synthgate.fsutil import atomic_directory, digest_folder, to_json
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
    return {"path": str(s.root), "n_images": len(s), "sha256": s.digest,
            "skipped": [{"path": k.path, "reason": k.reason} for k in s.skipped]}


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
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())

    @property
    def control_passed(self) -> bool:
        """Every positive control of every check held."""
        return all(c.passed for r in self.results for c in r.controls if c.kind == "positive")

    @property
    def verdict(self) -> str:
        # never a pass with a failed control
        return "fail" if self.decision.verdict == "pass" and not self.control_passed else self.decision.verdict

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def reasons(self) -> list[str]:
        out = list(self.decision.reasons)
        if self.decision.verdict == "pass" and not self.control_passed:
            out.append("a positive control failed: the audit is invalid")
        return out

    @property
    def dropped(self) -> list[str]:
        return sorted(self.decision.dropped)

    @property
    def released(self) -> list[str]:
        return [k for k in self.synthetic.keys if k not in self.decision.dropped] if self.passed else []

    @cached_property
    def model_sha256(self) -> str | None:
        return digest_folder(self.model) if self.model is not None and self.model.is_dir() else None

    def result(self, name: str) -> CheckResult | None:
        return next((r for r in self.results if r.name == name), None)

    def to_dict(self) -> dict:
        """The ``audit.json`` document (DESIGN.md contract)."""
        controls = {r.name: [c.to_dict() for c in r.controls] for r in self.results if r.controls}
        dropped = self.dropped
        geo = self.geometry
        model = None if self.model is None else {"path": str(self.model), "sha256": self.model_sha256}
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "synthgate", "version": __version__},
            "created": self.created,
            "command": list(self.command) if self.command is not None else None,
            "seed": self.seed,
            "device": str(self.device),
            "inputs": {
                "synthetic": _set_entry(self.synthetic), "real": _set_entry(self.real),
                "holdout": _set_entry(self.holdout), "model": model,
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
            "patient_hash_salt_id": salt_id(),
            "versions": versions("pydicom", "scikit-learn", "opacus", "faiss-cpu", "open_clip_torch"),
        }


def write_outputs(out: Path, document: dict, workdir: Path) -> None:
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
        (tmp / "audit.json").write_text(to_json(document))
        (tmp / "released.txt").write_text("".join(k + "\n" for k in document["released"]))
        (tmp / "dropped.txt").write_text("".join(k + "\n" for k in document["dropped"]))


def format_summary(audit: dict, out: Path) -> str:
    lines = [f"verdict: {audit['verdict'].upper()}"]
    for c in audit["checks"]:
        lines.append(f"  {c['name']:<22} {c['status']:<12} {c['reason']}")
    for r in audit["verdict_reasons"]:
        lines.append(f"  - {r}")
    if audit["dropped"]:
        by: dict[str, int] = {}
        for e in audit["dropped_evidence"].values():
            by[e["check"]] = by.get(e["check"], 0) + 1
        lines.append(f"dropped {len(audit['dropped'])} image(s) ({', '.join(f'{k}: {v}' for k, v in by.items())}); "
                     "the checks above describe what remained")
    lines.append(f"released {len(audit['released'])} of {audit['inputs']['synthetic']['n_images']} images; "
                 f"report: {out / 'report.html'}")
    return "\n".join(lines)
