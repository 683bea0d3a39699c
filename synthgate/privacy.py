"""Patient identifiers never leave synthgate in clear: outputs carry keyed hashes.

The key (salt) is secret and per installation, so a hash cannot be reversed
by hashing a list of candidate medical record numbers.  It comes from
``SYNTHGATE_SALT`` when set, else from ``~/.config/synthgate/salt`` (created
with 32 random bytes, mode 0600, on first use).  Keep that file: the same
patient then gets the same hash in every audit of this installation.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .errors import ConfigError


def _salt_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "synthgate" / "salt"


def get_salt() -> bytes:
    env = os.environ.get("SYNTHGATE_SALT")
    if env:
        return env.encode("utf-8")
    path = _salt_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process just made it
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError as exc:
        # never replace it silently: every earlier hash depends on it
        raise ConfigError("salt file is damaged (expected hex); restore it or set SYNTHGATE_SALT", path) from exc


def salt_id(salt: bytes | None = None) -> str:
    """A fingerprint of the salt (safe to publish) so reports say which key hashed them."""
    return hashlib.sha256(salt if salt is not None else get_salt()).hexdigest()[:8]


def hash_id(value: str, salt: bytes | None = None) -> str:
    """Keyed hash of a patient identifier, e.g. ``pt-3fa9c0d1e2b4a5f6``."""
    key = salt if salt is not None else get_salt()
    return "pt-" + hmac.new(key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[:16]
