"""Typed settings: every check declares what it accepts as one pydantic model.

A check's settings model is the single source of truth for the names, types,
ranges, defaults and meaning of its settings.  The policy is validated
against these models once, when it is loaded (``audit validate-policy``
included), so a wrong type, a value out of range or an unknown key fails in
milliseconds with one line naming the check, the key and the problem -- never
an hour into an audit.

Models are strict: ``grid: "four"`` or ``grid: 4.0`` is refused rather than
coerced (an int is accepted where a float is expected), lists must be lists,
and unknown keys get a "did you mean" hint.  Settings modules import only
pydantic, so validating a policy never imports torch.
"""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class CheckSettings(BaseModel):
    """Base of every check's settings model (frozen, strict, no unknown keys)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True,
                              validate_default=True)

    @classmethod
    def documented(cls) -> list[tuple[str, Any, str]]:
        """``(name, default, description)`` of every setting, for help texts and the README."""
        return [(n, f.default, f.description or "") for n, f in cls.model_fields.items()]


def did_you_mean(bad: str, allowed) -> str:
    near = difflib.get_close_matches(str(bad), list(allowed), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def explain(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line for the first problem of ``exc``: where, which key, what is wrong.

    ``where`` names the check (``checks.copy_detection.settings``); the key is
    appended, and an unknown key lists the allowed ones with a hint.
    """
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        allowed = sorted(model.model_fields)
        return (f"{where}: unknown setting {loc[-1]!r}{did_you_mean(loc[-1], allowed)}; "
                f"allowed: {', '.join(allowed)}")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{where}.{key}: {err['msg']}{shown}" if key else f"{where}: {err['msg']}{shown}"


def validate_settings(model: type[CheckSettings], values: dict | None, where: str) -> CheckSettings:
    """``model(**values)`` or a :class:`ValueError` holding one line from :func:`explain`."""
    if values is not None and not isinstance(values, dict):
        raise ValueError(f"{where}: must be a mapping of setting names to values")
    try:
        return model.model_validate(values or {})
    except ValidationError as exc:
        raise ValueError(explain(exc, model, where)) from None
