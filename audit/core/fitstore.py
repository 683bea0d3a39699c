"""Fitted real-side state on disk, so a new synthetic set audited against the same real data starts where the
last audit's real side ended -- and an interrupted audit resumes from its completed stages.

An entry is keyed by everything the state depends on (check, settings,
digests of the real set, holdout and model, the comparison geometry, seed,
synthgate version, device kind) and is authenticated: the file holds an
HMAC-SHA256, keyed with this installation's secret, over the serialised
state.  An entry that does not verify (edited, truncated, written by
another installation) is a miss and is said so in the check's result; it is
never trusted.  The store lives in the user's cache folder (owner-only), on
the machine that already holds the data: it contains features of real
images.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthgate import __version__

MAGIC = b"synthgate-fit-v1\n"


def _secret() -> bytes:
    from synthgate.cache import installation_secret

    return installation_secret("fitted-state store")


@dataclass
class FitStore:
    """Authenticated pickles of fitted state under ``root/fitted``."""

    root: Path
    secret: bytes = field(default_factory=_secret, repr=False)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def default(cls) -> "FitStore | None":
        from synthgate.cache import default_cache_root

        root = default_cache_root()
        return None if root is None else cls(Path(root))

    @staticmethod
    def key(check: str, **parts: Any) -> str:
        """A stable key from JSON-able parts (the synthgate version is always one of them)."""
        blob = json.dumps({"check": check, "synthgate": __version__, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / "fitted" / key[:2] / f"{key}.fit"

    def load(self, key: str) -> Any | None:
        """The stored state, or ``None`` when absent or when it does not verify (noted in :attr:`notes`)."""
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        tag, body = blob[len(MAGIC):len(MAGIC) + 32], blob[len(MAGIC) + 32:]
        expected = hmac.new(self.secret, key.encode() + body, hashlib.sha256).digest()
        if not blob.startswith(MAGIC) or not hmac.compare_digest(tag, expected):
            self.notes.append(f"a stored fitted state ({key[:12]}) did not verify and was ignored")
            return None
        try:
            return pickle.loads(body)  # noqa: S301 - authenticated with this installation's secret above
        except Exception:  # noqa: BLE001 - a verified but unreadable entry (another library version): recompute
            self.notes.append(f"a stored fitted state ({key[:12]}) could not be read and was recomputed")
            return None

    def save(self, key: str, state: Any) -> None:
        """Store ``state`` atomically; a read-only or full cache never fails an audit."""
        path = self._path(key)
        body = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        tag = hmac.new(self.secret, key.encode() + body, hashlib.sha256).digest()
        tmp = None
        try:
            for folder in (self.root, self.root / "fitted", path.parent):
                folder.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(MAGIC + tag + body)
            os.replace(tmp, path)
        except OSError:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
