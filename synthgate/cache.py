"""Content-addressed on-disk cache of decoded images, authenticated.

Entries are keyed by the SHA-256 of the file's bytes and the decoder version,
so a renamed or copied file hits the cache and a changed one never does.  An
entry is the storage array of :mod:`synthgate.imageio` saved as ``.npy``
(8-bit data stays one byte per pixel), preceded by an HMAC-SHA256 over the
content hash and the array bytes, keyed with this installation's secret.
An entry is used only if it verifies: one written into the cache by hand (say,
noise stored under the hash of a training copy, so that the copy looks novel
to the audit) is a miss, counted in :attr:`DecodeCache.rejected` and decoded
again.  The folder is created owner-only (0700).

The cache holds decoded pixels of whatever sets were read, real patient
images included: it lives in the user's cache folder on the machine that
already holds the data, never in an output.  Choose the folder with
``SYNTHGATE_CACHE_DIR``; set it to ``off`` to disable caching.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from .imageio import DECODER_VERSION

_OFF = {"off", "0", "none", "false", "no", ""}
MAGIC = b"SGDC1"


def installation_secret(purpose: str) -> bytes:
    """A key for ``purpose`` derived from this installation's secret (the patient-hash salt)."""
    from .privacy import get_salt

    return hmac.new(get_salt(), f"synthgate {purpose} v1".encode(), hashlib.sha256).digest()


def default_cache_root() -> Path | None:
    """The cache folder from the environment, or ``None`` when disabled."""
    env = os.environ.get("SYNTHGATE_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "synthgate"


class DecodeCache:
    """Decoded arrays by file content hash, each entry authenticated.

    Parameters
    ----------
    root
        Cache folder; entries go to ``root/decoded/ab/<sha>-v<version>.sgc``.
    secret
        HMAC key (default: derived from the installation's secret).
    """

    def __init__(self, root: str | Path, secret: bytes | None = None):
        self.root = Path(root)
        self._secret = secret
        self.rejected = 0  # entries that did not verify (tampered, truncated, another installation's)

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = installation_secret("decoded-image cache")
        return self._secret

    @classmethod
    def default(cls) -> "DecodeCache | None":
        root = default_cache_root()
        return None if root is None else cls(root)

    def _path(self, sha256: str) -> Path:
        return self.root / "decoded" / sha256[:2] / f"{sha256}-v{DECODER_VERSION}.sgc"

    def _tag(self, sha256: str, body: bytes) -> bytes:
        return hmac.new(self.secret, sha256.encode() + b"\0" + body, hashlib.sha256).digest()

    def get(self, sha256: str) -> np.ndarray | None:
        path = self._path(sha256)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        tag, body = blob[len(MAGIC):len(MAGIC) + 32], blob[len(MAGIC) + 32:]
        if not blob.startswith(MAGIC) or not hmac.compare_digest(tag, self._tag(sha256, body)):
            self.rejected += 1  # never trusted: decoded again (and overwritten)
            return None
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            self.rejected += 1
            return None

    def put(self, sha256: str, stored: np.ndarray) -> None:
        path = self._path(sha256)
        buf = io.BytesIO()
        np.save(buf, stored, allow_pickle=False)
        body = buf.getvalue()
        tmp = None
        try:
            for folder in (self.root, self.root / "decoded", path.parent):
                folder.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(MAGIC + self._tag(sha256, body) + body)
            os.replace(tmp, path)
        except OSError:
            # a read-only or full cache folder must never fail an audit
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


# ------------------------------------------------------------------ sealed folders

SEAL = ".synthgate-seal"


def _folder_digest(folder: Path) -> bytes:
    from .fsutil import sha256_file

    lines = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel == SEAL or p.is_dir():
            continue
        if p.is_symlink():  # a sealed entry never holds links: refuse rather than follow
            lines.append(f"symlink {rel}")
            continue
        lines.append(f"{sha256_file(p)}  {rel}")
    return "\n".join(lines).encode()


def seal_folder(folder: str | Path, purpose: str) -> None:
    """Authenticate every file of a cache folder (a trained network, a control model) for this installation."""
    folder = Path(folder)
    tag = hmac.new(installation_secret(purpose), _folder_digest(folder), hashlib.sha256).hexdigest()
    (folder / SEAL).write_text(tag + "\n")


def folder_is_sealed(folder: str | Path, purpose: str) -> bool:
    """True when the folder's files are exactly those sealed by this installation (a miss otherwise)."""
    folder = Path(folder)
    try:
        tag = (folder / SEAL).read_text().strip()
    except OSError:
        return False
    expected = hmac.new(installation_secret(purpose), _folder_digest(folder), hashlib.sha256).hexdigest()
    return hmac.compare_digest(tag, expected)
