"""Release policies as typed values: which checks a release needs, what a finding does, each check's settings.

A policy is YAML (read strictly by :mod:`policies.loader`: no anchors,
aliases or duplicate keys, size-capped) validated here exactly once, at load
time, before any heavy work: the structure by pydantic (unknown keys are an
error with a "did you mean" hint) and every check's settings against the
typed model that check registered (:mod:`audit.core.settings`).  Command-line
``--param`` overrides and ``--checks`` subsets go through the same
validation.  The exact text of the policy (and its SHA-256) travels with
every audit.

Example::

    name: my-hospital
    description: what this policy is for
    max_drop_fraction: 0.05          # dropping more than this blocks the release
    checks:
      copy_detection:
        required: true               # missing inputs fail the audit instead of skipping
        action: drop                 # block | drop | warn
        on_inconclusive: fail        # fail | warn
        settings: {rule: holdout, holdout_quantile: 0.01}
    max_cumulative_epsilon: 8.0      # optional: DP budget of every release from one training set
    on_cumulative_epsilon: refuse    # refuse (default) | warn, when `release bundle` would pass it

``max_cumulative_epsilon`` is read by ``release bundle``, not by the audit: the
ε of every model released from the same training set adds up (basic sequential
composition, see :mod:`release.ledger`), and a release that would take the sum
past the limit -- or add a model without a differential-privacy guarantee -- is
refused or warned about.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.loader import BUILTIN, read_policy_text, safe_load
from synthgate.errors import ConfigError

from .base import available_checks, settings_class
from .settings import CheckSettings, did_you_mean, validate_settings

ACTIONS = ("block", "drop", "warn")


class _Rule(BaseModel):
    """How one check takes part in the release decision (the YAML shape)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    required: bool = Field(True, description="a required check that cannot run (missing inputs) fails the audit")
    action: Literal["block", "drop", "warn"] = Field(
        "block", description="block the release, drop the flagged images and re-audit the rest, or only warn")
    on_inconclusive: Literal["fail", "warn"] = Field(
        "fail", description="an inconclusive result (the check could not vouch) fails the audit or warns")
    settings: dict[str, Any] = Field(default_factory=dict, description="the check's own settings")


class _Subgroups(BaseModel):
    """Which metadata columns results are broken down by, and optional per-subgroup limits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    columns: list[str] = Field(min_length=1, description="metadata.csv columns (or label) to break results down by")
    min_size: int = Field(20, ge=2, description="fewest units on a side for a subgroup's figure to be reported")
    bins: dict[str, list[float]] = Field(default_factory=dict, description="bin edges for numeric columns (age)")
    limits: dict[Literal["copy_rate", "reidentification_rate", "membership_auc", "utility_drop"], float | None] = \
        Field(default_factory=dict, description="per-subgroup limits; the worst subgroup decides")
    judge: Literal["interval", "point"] = Field("interval", description="a limit fails on the interval's lower "
                                                                      "bound (interval) or the point estimate")


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=10_000)
    max_drop_fraction: float = Field(0.1, ge=0.0, le=1.0,
                                     description="if a drop action removes more than this share, block instead")
    checks: dict[str, Any]
    max_cumulative_epsilon: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="release bundle: the most DP epsilon all releases from one training set may add up to")
    on_cumulative_epsilon: Literal["warn", "refuse"] | None = Field(
        None, description="release bundle: refuse (default) or only warn when a release passes that limit")
    subgroups: _Subgroups | None = None


@dataclass(frozen=True)
class CheckRule:
    """One check's part in a policy, its settings validated against the check's own model."""

    required: bool
    action: str
    on_inconclusive: str
    settings: CheckSettings
    given: Mapping[str, Any] = field(default_factory=dict)  # the settings as written (policy + overrides)

    def to_dict(self) -> dict:
        return {"required": self.required, "action": self.action, "on_inconclusive": self.on_inconclusive,
                "settings": dict(self.given)}


@dataclass(frozen=True)
class Policy:
    """A validated policy with its source text and digest."""

    name: str
    description: str
    max_drop_fraction: float
    checks: Mapping[str, CheckRule]
    text: str
    source: str
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    subset: tuple[str, ...] | None = None  # --checks: the audit ran only these (a partial audit)
    path: Path | None = None  # the policy file, when it is one (an input: outputs never go there)
    max_cumulative_epsilon: float | None = None  # release bundle's limit on the training set's cumulative DP ε
    on_cumulative_epsilon: str = "refuse"  # what release bundle does past it: refuse | warn
    subgroups: Any = None  # audit.core.subgroups.SubgroupSpec, when the policy names subgroup columns

    @property
    def builtin(self) -> str | None:
        """The built-in policy's name when this is one, unchanged (same text), else ``None``."""
        return builtin_named(self.name, self.sha256)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        out = {"name": self.name, "source": self.source, "sha256": self.sha256, "text": self.text,
               "max_drop_fraction": self.max_drop_fraction,
               "checks": {n: r.to_dict() for n, r in self.checks.items()},
               "max_cumulative_epsilon": self.max_cumulative_epsilon,
               "on_cumulative_epsilon": self.on_cumulative_epsilon}
        out["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        if self.subgroups is not None:
            sg = self.subgroups
            out["subgroups"] = {"columns": list(sg.columns), "min_size": sg.min_size,
                                "bins": {k: list(v) for k, v in sg.bins.items()}, "limits": dict(sg.limits),
                                "judge": sg.judge}
        return out

    def rule(self, name: str) -> CheckRule:
        return self.checks[name]


def _first_error(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join([where, *loc] if where else loc) or "policy"
    if err["type"] == "extra_forbidden":
        allowed = sorted(model.model_fields)
        return f"unknown key {key!r}{did_you_mean(loc[-1], allowed)}; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{key}: {err['msg']}{shown}"


def _rule(name: str, raw: Any, overrides: Mapping[str, Any], required: bool | None) -> CheckRule:
    where = f"checks.{name}"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a mapping (required, action, on_inconclusive, settings)")
    try:
        shape = _Rule.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_first_error(exc, _Rule, where)) from None
    given = {**shape.settings, **overrides}
    settings = validate_settings(settings_class(name), given, f"{where}.settings")
    if shape.required and shape.on_inconclusive == "warn":
        raise ValueError(f"{where}: a required check cannot warn when it is inconclusive: a pass needs its "
                         "evidence (make it optional with required: false, or set on_inconclusive: fail)")
    return CheckRule(shape.required if required is None else (shape.required or required), shape.action,
                     shape.on_inconclusive, settings, given)


def parse_policy(text: str, source: str, *, only: list[str] | None = None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Policy:
    """Validate policy YAML ``text`` (plus a ``--checks`` subset and ``--param`` overrides) once.

    Raises :class:`ConfigError` naming ``source`` with one line on any problem.
    A check named in ``only`` is required (the user asked for it); a check in
    ``only`` that the policy does not list runs with its default rule.
    """
    data = safe_load(text, source)
    if not isinstance(data, dict):
        raise ConfigError("must be a YAML mapping with at least 'name' and 'checks'", source)
    try:
        shape = _Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, _Policy, ""), source) from None
    if not shape.checks:
        raise ConfigError("checks: a policy must name at least one check", source)
    if shape.on_cumulative_epsilon is not None and shape.max_cumulative_epsilon is None:
        raise ConfigError("on_cumulative_epsilon: says what to do past max_cumulative_epsilon, which is not set "
                          "(set both, or neither)", source)
    overrides = {k: dict(v) for k, v in (overrides or {}).items() if v}
    names = list(only) if only else list(shape.checks)
    for name in [*shape.checks, *names, *overrides]:
        if name not in available_checks():
            raise ConfigError(f"unknown check {name!r}{did_you_mean(name, available_checks())}; available: "
                              f"{', '.join(available_checks())}", source)
    for name in overrides:
        if name not in names:
            raise ConfigError(f"--param names check {name!r}, which is not being run ({', '.join(names)})", source)
    rules = {}
    try:
        for name in names:
            rules[name] = _rule(name, shape.checks.get(name), overrides.get(name, {}), True if only else None)
    except ValueError as exc:
        raise ConfigError(str(exc), source) from None
    subgroups = None
    if shape.subgroups is not None:
        from .subgroups import SubgroupSpec

        sg = shape.subgroups
        for column, edges in sg.bins.items():
            if len(edges) < 2 or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
                raise ConfigError(f"subgroups.bins.{column}: needs at least two increasing edges", source)
        subgroups = SubgroupSpec(tuple(sg.columns), sg.min_size, {k: tuple(v) for k, v in sg.bins.items()},
                                 {k: v for k, v in sg.limits.items() if v is not None}, sg.judge)
    return Policy(shape.name, shape.description, shape.max_drop_fraction, rules, text, source, overrides,
                  tuple(names) if only else None, subgroups=subgroups,
                  max_cumulative_epsilon=shape.max_cumulative_epsilon,
                  on_cumulative_epsilon=shape.on_cumulative_epsilon or "refuse")


def builtin_named(name: str | None, sha256: str | None) -> str | None:
    """The built-in policy whose name ``name`` is and whose text has digest ``sha256``, else ``None``."""
    from policies.loader import builtin_text

    key = str(name or "").strip().casefold()
    if key not in BUILTIN:
        return None
    return key if hashlib.sha256(builtin_text(key).encode("utf-8")).hexdigest() == sha256 else None


def masquerades(name: str | None, sha256: str | None) -> bool:
    """Whether a policy takes a built-in's name without being that built-in (its text differs)."""
    return str(name or "").strip().casefold() in BUILTIN and builtin_named(name, sha256) is None


def policy_label(name: str | None, sha256: str | None) -> str:
    """How every shareable document names a policy: ``built-in policy 'default'`` or ``custom policy 'x' (...)``.

    A recipient can tell the project's own policies from a hospital's file only by this (a custom file calling
    itself ``default`` was once bundled and verified as "policy default").
    """
    if name is None and sha256 is None:
        return "no policy recorded"
    if builtin_named(name, sha256):
        return f"built-in policy {str(name).strip().casefold()!r}"
    return f"custom policy {str(name)!r} (sha256 {str(sha256)[:12]}…, not one of synthgate's built-in policies)"


def load_policy(name_or_path: str | Path | None, *, only: list[str] | None = None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Policy:
    """A built-in policy by name (``default``, ``strict``, ``research``) or a YAML file, validated once."""
    text, source = read_policy_text(name_or_path)
    policy = parse_policy(text, source, only=only, overrides=overrides)
    if str(name_or_path or "default") not in BUILTIN:
        if masquerades(policy.name, policy.sha256):
            # a custom file under a built-in's name was bundled and verified as "policy default" (red team)
            raise ConfigError(f"this policy file calls itself {policy.name!r}, the name of a built-in policy, but "
                              f"its text differs from the built-in's; give it a name of its own (name: ...) so "
                              f"no one can take it for the built-in", source)
        policy = replace(policy, path=Path(str(name_or_path)))
    return policy


__all__ = ["ACTIONS", "BUILTIN", "CheckRule", "Policy", "builtin_named", "load_policy", "masquerades",
           "parse_policy", "policy_label"]
