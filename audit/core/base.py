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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from .settings import CheckSettings, validate_settings

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
    #: per-image evidence for the per-subgroup analysis (audit.core.subgroups); never serialised
    per_image: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

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
    """Base class of every check: typed settings in, one life cycle, a :class:`CheckResult` out.

    Subclasses set ``name``, ``Settings`` (their :class:`~audit.core.settings.CheckSettings`
    model), ``requires`` and implement :meth:`fit` and :meth:`score`:

    ``preflight(ctx)``
        cheap checks of the inputs (a model's geometry, a weights file),
        called for every check before any check does real work;
    ``fit(ctx)``
        everything that depends only on the real side -- the real set, the
        holdout, the model -- and the settings (training features, a trained
        attacker, thresholds calibrated on the holdout, the controls);
    ``score(ctx, fitted)``
        judge ``ctx.synthetic`` with the fitted state.  Drop rounds and audits
        of new synthetic sets against the same real data call it again with
        the same fitted state.

    ``requires`` names what the check needs from the context: ``real``,
    ``holdout``, ``model``, ``patients`` (patient IDs on the real set),
    ``labels``.  When something is missing the runner reports ``skipped``
    with the reason instead of running the check.
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[CheckSettings]] = CheckSettings
    requires: ClassVar[tuple[str, ...]] = ()
    #: True when each finding names one synthetic image that a ``drop`` action can remove
    per_image: ClassVar[bool] = False
    method: ClassVar[str] = ""
    references: ClassVar[tuple[str, ...]] = ()
    limitations: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: CheckSettings | None = None, **params):
        if settings is None:
            settings = validate_settings(self.Settings, params, self.name)
        elif params:
            raise TypeError(f"{self.name}: give a settings model or keyword settings, not both")
        elif not isinstance(settings, self.Settings):
            raise TypeError(f"{self.name}: settings must be a {self.Settings.__name__}, not {type(settings).__name__}")
        self.settings = settings
        self.params = settings.model_dump(mode="json")  # the exact settings, recorded with every result

    def preflight(self, ctx: "AuditContext") -> None:
        """Refuse unusable inputs (with a :class:`~synthgate.errors.SynthgateError`) before any work."""

    def fit(self, ctx: "AuditContext") -> Any:
        """The state that depends only on the real side and the settings (``None`` when there is none)."""
        return None

    def score(self, ctx: "AuditContext", fitted: Any) -> CheckResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit_state(self, fitted: Any) -> Any:
        """The picklable part of ``fitted`` worth keeping on disk across audits (``None``: nothing is kept)."""
        return None

    def from_state(self, ctx: "AuditContext", state: Any) -> Any:
        """Rebuild the fitted state from :meth:`fit_state`'s value (only called when that is not ``None``)."""
        raise NotImplementedError

    def run(self, ctx: "AuditContext") -> CheckResult:
        """Fit and score in one go (one audit, no drop rounds)."""
        return self.score(ctx, self.fit(ctx))

    def result(self, status: str, reason: str, **kw) -> CheckResult:
        """Build a :class:`CheckResult` carrying this check's method, references and settings."""
        return CheckResult(name=self.name, status=status, reason=reason, method=self.method,
                           references=self.references, limitations=self.limitations, params=self.params, **kw)


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class CheckEntry:
    """Where a registered check and its settings model live (``"package.module:Class"`` each).

    Modules are imported only when needed: validating a policy imports the
    light settings modules, running a check imports the check (and torch).
    """

    check: str
    settings: str | None = None  # None: the check class's own ``Settings`` attribute


_REGISTRY: dict[str, CheckEntry] = {
    "copy_detection": CheckEntry("audit.copy_detection.check:CopyDetection",
                                 "audit.copy_detection.settings:CopyDetectionSettings"),
    "reidentification": CheckEntry("audit.reidentification.check:Reidentification",
                                   "audit.reidentification.settings:ReidentificationSettings"),
    "dicom_phi": CheckEntry("audit.dicom_phi.check:DicomPhi", "audit.dicom_phi.settings:DicomPhiSettings"),
    "membership_inference": CheckEntry("audit.membership_inference.check:MembershipInference",
                                       "audit.membership_inference.settings:MembershipInferenceSettings"),
    "utility": CheckEntry("audit.quality.utility:Utility", "audit.quality.settings:UtilitySettings"),
    "fidelity": CheckEntry("audit.quality.fidelity:Fidelity", "audit.quality.settings:FidelitySettings"),
}


def register_check(name: str, check: str, settings: str | None = None) -> None:
    """Register a check by dotted path ``"package.module:Class"`` (and its settings model's, if separate)."""
    _REGISTRY[name] = CheckEntry(check, settings)


def unregister_check(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_checks() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> CheckEntry:
    if name not in _REGISTRY:
        from .settings import did_you_mean

        raise ValueError(f"unknown check {name!r}{did_you_mean(name, _REGISTRY)}; "
                         f"available: {', '.join(available_checks())}")
    return _REGISTRY[name]


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_class(name: str) -> type[Check]:
    return _load(_entry(name).check)


def settings_class(name: str) -> type[CheckSettings]:
    """The settings model of a registered check (imports no check code when registered separately)."""
    entry = _entry(name)
    return _load(entry.settings) if entry.settings else check_class(name).Settings


def create_check(name: str, settings: CheckSettings | None = None, **params) -> Check:
    """Instantiate a registered check; ``ValueError`` names the allowed ones on a typo."""
    return check_class(name)(settings, **params)
