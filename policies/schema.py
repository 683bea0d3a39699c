"""Release policies: which checks a release needs, their settings, and what a finding does.

A policy is YAML checked entirely at load time, before any heavy work: the
structure by pydantic (unknown keys are an error with a "did you mean"
hint), and every check's settings by constructing the check itself, so a
typo in a threshold name fails in milliseconds, not after an hour of
training.  The exact text of the policy (and its SHA-256) travels with every
audit.

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
"""
from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synthgate.errors import ConfigError, MissingInputError

BUILTIN = ("default", "strict", "research")
ACTIONS = ("block", "drop", "warn")


class CheckPolicy(BaseModel):
    """How one check takes part in the release decision."""

    model_config = ConfigDict(extra="forbid")

    required: bool = Field(True, description="a required check that cannot run (missing inputs) fails the audit")
    action: Literal["block", "drop", "warn"] = Field(
        "block", description="block the release, drop the flagged images and re-audit the rest, or only warn")
    on_inconclusive: Literal["fail", "warn"] = Field(
        "fail", description="an inconclusive result (the check could not vouch) fails the audit or warns")
    settings: dict[str, Any] = Field(default_factory=dict, description="the check's own settings")


class Policy(BaseModel):
    """A release policy."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    max_drop_fraction: float = Field(0.1, ge=0.0, le=1.0,
                                     description="if a drop action removes more than this share, block instead")
    checks: dict[str, CheckPolicy]

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, checks: dict[str, CheckPolicy]) -> dict[str, CheckPolicy]:
        from audit.core.base import available_checks

        if not checks:
            raise ValueError("a policy must name at least one check")
        for name in checks:
            if name not in available_checks():
                near = difflib.get_close_matches(name, available_checks(), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"unknown check {name!r}{hint}; available: {', '.join(available_checks())}")
        return checks


class LoadedPolicy:
    """A validated policy with its source text and digest."""

    def __init__(self, policy: Policy, text: str, source: str):
        self.policy = policy
        self.text = text
        self.source = source
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def name(self) -> str:
        return self.policy.name

    def check_params(self) -> dict[str, dict]:
        return {name: dict(cp.settings) for name, cp in self.policy.checks.items()}

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "text": self.text,
                "max_drop_fraction": self.policy.max_drop_fraction,
                "checks": {n: cp.model_dump() for n, cp in self.policy.checks.items()}}


def _hint(loc: tuple, allowed: list[str]) -> str:
    bad = str(loc[-1])
    near = difflib.get_close_matches(bad, allowed, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _explain(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "policy"
    if err["type"] == "extra_forbidden":
        model = CheckPolicy if len(loc) >= 3 and loc[0] == "checks" else Policy
        allowed = sorted(model.model_fields)
        return f"unknown key {where!r}{_hint(loc, allowed)}; allowed here: {', '.join(allowed)}"
    return f"{where}: {err['msg']}"


def parse_policy(text: str, source: str) -> LoadedPolicy:
    """Validate policy YAML ``text``; raise :class:`ConfigError` naming ``source`` on any problem."""
    from audit.core.base import create_check

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"is not valid YAML ({' '.join(str(exc).split())})", source) from exc
    if not isinstance(data, dict):
        raise ConfigError("must be a YAML mapping with at least 'name' and 'checks'", source)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc), source) from exc
    for name, cp in policy.checks.items():
        try:
            create_check(name, **cp.settings)  # the check validates its own settings
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"checks.{name}.settings: {exc}", source) from exc
    return LoadedPolicy(policy, text, source)


def load_policy(name_or_path: str | Path | None) -> LoadedPolicy:
    """A built-in policy by name (``default``, ``strict``, ``research``) or a YAML file."""
    value = str(name_or_path or "default")
    if value in BUILTIN:
        path = Path(__file__).parent / f"{value}.yaml"
        return parse_policy(path.read_text(), f"built-in policy {value!r}")
    path = Path(value)
    if not path.exists():
        near = difflib.get_close_matches(value, BUILTIN, n=1)
        hint = f" (did you mean the built-in {near[0]!r}?)" if near else ""
        raise MissingInputError(f"policy file does not exist{hint}; built-in policies: {', '.join(BUILTIN)}", path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the policy ({exc})", path) from exc
    return parse_policy(text, str(path))
