"""Content-addressed on-disk cache of decoded images.

Entries are keyed by the SHA-256 of the file's bytes and the decoder version,
so a renamed or copied file hits the cache and a changed one never does.  An
entry is the storage array of :mod:`synthgate.imageio` saved as ``.npy``
(8-bit data stays one byte per pixel).

The cache holds decoded pixels of whatever sets were read, real patient
images included: it lives in the user's cache folder on the machine that
already holds the data, never in an output.  Choose the folder with
``SYNTHGATE_CACHE_DIR``; set it to ``off`` to disable caching.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .imageio import DECODER_VERSION

_OFF = {"off", "0", "none", "false", "no", ""}


def default_cache_root() -> Path | None:
    """The cache folder from the environment, or ``None`` when disabled."""
    env = os.environ.get("SYNTHGATE_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "synthgate"


class DecodeCache:
    """Decoded arrays by file content hash.

    Parameters
    ----------
    root
        Cache folder; entries go to ``root/decoded/ab/<sha>-v<version>.npy``.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def default(cls) -> "DecodeCache | None":
        root = default_cache_root()
        return None if root is None else cls(root)

    def _path(self, sha256: str) -> Path:
        return self.root / "decoded" / sha256[:2] / f"{sha256}-v{DECODER_VERSION}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        path = self._path(sha256)
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            # missing or damaged entry: decode again (and overwrite it)
            return None

    def put(self, sha256: str, stored: np.ndarray) -> None:
        path = self._path(sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npy.tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, stored, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            # a read-only or full cache folder must never fail an audit
            with contextlib.suppress(Exception):
                os.unlink(tmp)  # type: ignore[possibly-undefined]
