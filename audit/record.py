"""A typed reader of ``audit.json``, shared by ``reports`` and ``release``.

``audit.json`` is read back from disk -- possibly hand-edited, truncated or
not an audit at all -- so it is validated on the way in: a missing or
mistyped key is one clear error (exit 2) naming the key, never a
``KeyError`` deep inside a report template.  Keys the reader does not know
are kept (``extra="allow"``), so audits from newer versions still render.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synthgate.errors import InputError, MissingInputError

STATUSES = ("pass", "fail", "warn", "inconclusive", "skipped", "error")
MAX_AUDIT_BYTES = 256 << 20


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class SetRecord(_Record):
    path: str
    n_images: int = Field(ge=0)
    sha256: str
    skipped: list[dict[str, Any]] = []


class SyntheticRecord(SetRecord):
    manifest_sha256: str | None = None  # the generator's manifest.json as audited (None: the set had none)


class ModelRecord(_Record):
    path: str
    sha256: str | None = None


class GeometryRecord(_Record):
    height: int
    width: int
    channels: int
    notes: list[str] = []


class InputsRecord(_Record):
    synthetic: SyntheticRecord
    real: SetRecord | None = None
    holdout: SetRecord | None = None
    model: ModelRecord | None = None
    attacker_data: list[SetRecord] = []
    geometry: GeometryRecord | None = None
    notes: list[str] = []


class RuleRecord(_Record):
    required: bool = True
    action: str = "block"
    on_inconclusive: str = "fail"
    settings: dict[str, Any] = {}


class PolicyRecord(_Record):
    name: str
    source: str = ""
    sha256: str
    text: str = ""
    max_drop_fraction: float = 0.0
    checks: dict[str, RuleRecord] = {}
    overrides: dict[str, dict[str, Any]] = {}


class FindingRecord(_Record):
    synthetic: str
    reason: str

    @property
    def evidence(self) -> dict[str, Any]:
        """Everything a check recorded about this finding beyond the image and the reason."""
        return dict(self.model_extra or {})

    @property
    def real(self) -> str | None:
        value = (self.model_extra or {}).get("real")
        return None if value is None else str(value)


class ControlRecord(_Record):
    name: str
    kind: str
    passed: bool
    detail: str = ""
    metrics: dict[str, Any] = {}


class CheckRecord(_Record):
    name: str
    status: Literal["pass", "fail", "warn", "inconclusive", "skipped", "error"]
    reason: str
    method: str = ""
    references: list[str] = []
    limitations: list[str] = []
    params: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    thresholds: dict[str, Any] = {}
    flagged: list[FindingRecord] = []
    controls: list[ControlRecord] = []
    data: dict[str, Any] = {}
    seconds: float | None = None


class ControlSummary(_Record):
    passed: bool
    checks: dict[str, list[ControlRecord]] = {}


class ToolRecord(_Record):
    name: str = "synthgate"
    version: str = "?"


class AuditRecord(_Record):
    """``audit.json`` as typed values (DESIGN.md, "Audit result")."""

    schema_version: int
    tool: ToolRecord = ToolRecord()
    created: str = ""
    command: list[str] | None = None
    seed: int | None = None
    device: str | None = None
    inputs: InputsRecord
    policy: PolicyRecord | None = None
    checks: list[CheckRecord]
    control: ControlSummary
    verdict: Literal["pass", "fail", "partial"]
    verdict_reasons: list[str] = []
    dropped: list[str] = []
    dropped_evidence: dict[str, dict[str, Any]] = {}
    drop_rounds: list[dict[str, Any]] = []
    released: list[str] = []
    patient_hash_salt_id: str | None = None
    versions: dict[str, Any] = {}

    def check(self, name: str) -> CheckRecord | None:
        return next((c for c in self.checks if c.name == name), None)

    @property
    def flagged(self) -> dict[str, str]:
        """Every flagged synthetic image and the first check that flagged it."""
        out: dict[str, str] = {}
        for c in self.checks:
            for f in c.flagged:
                out.setdefault(f.synthetic, c.name)
        return out

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _explain(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "the document"
    if err["type"] == "missing":
        return f"is not an audit.json written by `audit check`: {where} is missing"
    return f"is not an audit.json written by `audit check`: {where}: {err['msg']}"


def parse_audit(data: Any, source: str | Path) -> AuditRecord:
    """Validate an already parsed ``audit.json`` document; :class:`InputError` naming ``source`` if invalid."""
    if not isinstance(data, dict):
        raise InputError("is not an audit.json written by `audit check` (not a JSON object)", source)
    try:
        return AuditRecord.model_validate(data)
    except ValidationError as exc:
        raise InputError(_explain(exc), source) from None


def read_audit(path: str | Path) -> AuditRecord:
    """Read and validate ``path``; one-line :class:`InputError` (exit 2) for anything that is not an audit."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError("audit file does not exist", path)
    if not path.is_file():
        raise InputError("is not an audit.json file (a folder?)", path)
    if path.stat().st_size > MAX_AUDIT_BYTES:
        raise InputError(f"is larger than {MAX_AUDIT_BYTES >> 20} MB: not an audit.json written by `audit check`", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"is not a readable audit.json ({' '.join(str(exc).split())})", path) from None
    return parse_audit(data, path)
