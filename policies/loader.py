"""Read release policy text safely: built-in names, size cap, strict YAML.

Policies are short hand-written files, so the YAML reader refuses what such
a file never needs and an attacker could abuse: anchors and aliases (an
"alias bomb" expands a few lines into gigabytes), merge keys, duplicate keys
(the second silently wins in plain YAML), non-standard tags (the safe loader
already refuses them) and files over :data:`MAX_POLICY_BYTES`.

This package holds policy *data*; the typed model that validates a policy
against each check's settings lives with the checks (``audit.core.policy``).
"""
from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from synthgate.errors import ConfigError, MissingInputError

BUILTIN = ("default", "strict", "research")
MAX_POLICY_BYTES = 64 * 1024


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors, aliases, merge keys or duplicate keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, f"alias *{event.anchor} is not allowed in a policy "
                                                    "(write the value out)", event.start_mark)
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.constructor.ConstructorError(None, None, f"anchor &{event.anchor} is not allowed in a policy",
                                                    event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(None, None, "merge keys (<<) are not allowed in a policy",
                                                        key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: the base class reports it
                duplicate = False
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str, source: str):
    """Parse policy YAML strictly; :class:`ConfigError` naming ``source`` on any problem."""
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise ConfigError(f"is larger than {MAX_POLICY_BYTES // 1024} KiB; a policy is a short hand-written file",
                          source)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"is not valid policy YAML ({' '.join(str(exc).split())})", source) from None


def scalar(text: str):
    """A command-line value read as a YAML scalar (number, boolean, null, string); strict like policies."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506


def builtin_text(name: str) -> str:
    """The text of a built-in policy."""
    return (Path(__file__).parent / f"{name}.yaml").read_text()


def read_policy_text(name_or_path: str | Path | None) -> tuple[str, str]:
    """``(text, source)`` of a built-in policy by name, or of a policy file."""
    value = str(name_or_path or "default")
    if value in BUILTIN:
        return builtin_text(value), f"built-in policy {value!r}"
    path = Path(value)
    if not path.exists():
        near = difflib.get_close_matches(value, BUILTIN, n=1)
        hint = f" (did you mean the built-in {near[0]!r}?)" if near else ""
        raise MissingInputError(f"policy file does not exist{hint}; built-in policies: {', '.join(BUILTIN)}", path)
    if not path.is_file():
        raise ConfigError("is not a policy file (a folder?)", path)
    try:
        size = path.stat().st_size
        if size > MAX_POLICY_BYTES:
            raise ConfigError(f"is {size:,} bytes, larger than {MAX_POLICY_BYTES // 1024} KiB; a policy is a short "
                              "hand-written file", path)
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the policy ({exc})", path) from None
