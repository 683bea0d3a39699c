"""The life cycle every check shares, and the values it returns.

A check is a class registered by name.  Its constructor only stores keyword
arguments (the policy's settings for it); :meth:`Check.run` does the work on
an :class:`~audit.context.AuditContext` and returns a frozen
:class:`CheckResult` that carries its evidence: metrics with intervals, the
thresholds it was held to, every flagged image and why, and its controls.
JSON is made from these values in one place (:meth:`CheckResult.to_dict`).

Statuses:

``pass``
    the check ran, its controls passed and nothing exceeded a threshold;
``fail``
    the check found what it looks for (flagged images or a leak);
``warn``
    something the steward should read that does not fail the check;
``inconclusive``
    the check ran but cannot vouch for anything (an attack that could not
    beat its own baseline on real data, too few samples): never a pass;
``skipped``
    not applicable to these inputs (the reason says why);
``error``
    the check's positive control failed, or it could not run: the audit is
    invalid.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from audit.core.context import AuditContext

STATUSES = ("pass", "fail", "warn", "inconclusive", "skipped", "error")


@dataclass(frozen=True)
class Estimate:
    """A number with its confidence interval and the counts behind it."""

    value: float | None
    ci: tuple[float, float] | None = None
    n: int | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"value": _clean(self.value)}
        if self.ci is not None:
            out["ci"] = [_clean(self.ci[0]), _clean(self.ci[1])]
        if self.n is not None:
            out["n"] = self.n
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class Finding:
    """One flagged synthetic image and the evidence against it."""

    synthetic: str  # key relative to the synthetic set
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"synthetic": self.synthetic, "reason": self.reason, **{k: _clean(v) for k, v in self.evidence.items()}}


@dataclass(frozen=True)
class Control:
    """A control run: positive (must catch a planted leak) or negative (must not flag independent data)."""

    name: str
    kind: str  # "positive" | "negative" | "null"
    passed: bool
    detail: str
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "passed": self.passed, "detail": self.detail,
                "metrics": _clean(dict(self.metrics))}


@dataclass(frozen=True)
class CheckResult:
    """Everything one check found."""

    name: str
    status: str
    reason: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, Any] = field(default_factory=dict)
    flagged: tuple[Finding, ...] = ()
    controls: tuple[Control, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)  # plot data for the report (histograms, ROC)
    method: str = ""
    references: tuple[str, ...] = ()
    limitations: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} must be one of {', '.join(STATUSES)}")

    @property
    def controls_passed(self) -> bool:
        return all(c.passed for c in self.controls if c.kind == "positive")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "method": self.method,
            "references": list(self.references),
            "limitations": list(self.limitations),
            "params": _clean(dict(self.params)),
            "metrics": _clean(dict(self.metrics)),
            "thresholds": _clean(dict(self.thresholds)),
            "flagged": [f.to_dict() for f in self.flagged],
            "controls": [c.to_dict() for c in self.controls],
            "data": _clean(dict(self.data)),
            "seconds": None if self.seconds is None else round(self.seconds, 3),
        }


def _clean(value):
    """JSON-ready copy: numpy scalars to Python, dataclasses to dicts, NaN to None."""
    import math

    if isinstance(value, Estimate):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Check:
    """Base class: subclasses set ``name``, ``requires`` and implement :meth:`run`.

    ``requires`` names what the check needs from the context: ``real``,
    ``holdout``, ``model``, ``patients`` (patient IDs on the real set),
    ``labels``.  When something is missing the runner reports ``skipped``
    with the reason instead of calling :meth:`run`.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    #: True when each finding names one synthetic image that a ``drop`` action can remove
    per_image: ClassVar[bool] = False
    method: ClassVar[str] = ""
    references: ClassVar[tuple[str, ...]] = ()
    limitations: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params):
        unknown = set(params) - set(self.default_params())
        if unknown:
            import difflib

            allowed = sorted(self.default_params())
            bad = sorted(unknown)[0]
            near = difflib.get_close_matches(bad, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"{self.name}: unknown setting {bad!r}{hint}; allowed: {', '.join(allowed)}")
        self.params = {**self.default_params(), **params}

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        """The settings this check accepts, with their defaults."""
        return {}

    def run(self, ctx: "AuditContext") -> CheckResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def result(self, status: str, reason: str, **kw) -> CheckResult:
        """Build a :class:`CheckResult` carrying this check's method, references and params."""
        return CheckResult(name=self.name, status=status, reason=reason, method=self.method,
                           references=self.references, limitations=self.limitations, params=self.params, **kw)


# ------------------------------------------------------------------ registry

#: name -> "module:Class"; modules are imported only when a check is created,
#: so listing checks (and ``audit --help``) never imports torch.
_REGISTRY: dict[str, str] = {
    "copy_detection": "audit.copy_detection.check:CopyDetection",
    "reidentification": "audit.reidentification.check:Reidentification",
    "dicom_phi": "audit.dicom_phi.check:DicomPhi",
    "membership_inference": "audit.membership_inference.check:MembershipInference",
    "utility": "audit.quality.utility:Utility",
    "fidelity": "audit.quality.fidelity:Fidelity",
}


def register_check(name: str, target: str) -> None:
    """Register a check class by dotted path ``"package.module:Class"``."""
    _REGISTRY[name] = target


def available_checks() -> list[str]:
    return sorted(_REGISTRY)


def check_class(name: str) -> type[Check]:
    if name not in _REGISTRY:
        import difflib

        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown check {name!r}{hint}; available: {', '.join(available_checks())}")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def create_check(name: str, **params) -> Check:
    """Instantiate a registered check; ``ValueError`` names the allowed ones on a typo."""
    return check_class(name)(**params)


def dataclass_dict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}
