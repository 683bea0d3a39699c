"""Signed documents: who wrote an ``audit.json`` or a bundle manifest, and that nobody changed it since.

A hash listed in a file proves nothing about that file's author: whoever
edits the file re-computes the hash.  So every installation of synthgate has
its own signing key (Ed25519, RFC 8032), and every ``audit.json`` that
``audit check`` writes and every bundle manifest that ``release bundle``
writes carries a signature over its canonical JSON.  ``release verify`` then
calls a bundle *intact* only when the signature holds **and** the key is one
the reader trusts: this installation's own key, or the key (or fingerprint)
the hospital publishes.

Keys
    ``SYNTHGATE_KEY=/path/key.pem`` (a hospital's key file, PKCS#8 PEM,
    never created for you) or else ``$XDG_CONFIG_HOME/synthgate/signing-key.pem``
    (``~/.config/...``), created on first use with mode 0600 (``O_EXCL``, so
    two processes never write two keys).  A key file that other users may
    read or write is refused.  The private key never appears in any output;
    documents carry only the public key and its fingerprint.

Canonical form
    the document without its ``signature`` field, serialised as JSON with
    sorted keys, separators ``,`` and ``:``, no ASCII escaping, encoded as
    UTF-8 -- after one round trip through the JSON that synthgate writes, so
    what is signed is exactly what a reader parses back.

Signature block
    ``{"algorithm": "Ed25519", "public_key": base64(raw 32 bytes),
    "fingerprint": sha256(raw public key) hex, "value": base64(64 bytes)}``.
    Anyone can check a signature with the embedded key; only the fingerprint
    comparison with a trusted one says *whose* it is.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ConfigError, InputError, IntegrityError, MissingInputError

ALGORITHM = "Ed25519"
KEY_ENV = "SYNTHGATE_KEY"
KEY_FILE = "signing-key.pem"
SIGNATURE = "signature"
MAX_KEY_BYTES = 16 * 1024


class SignatureError(IntegrityError):
    """A document's signature is missing, malformed or does not verify."""


def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/synthgate/signing-key.pem`` (``~/.config/synthgate/...`` when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "synthgate" / KEY_FILE


def key_path() -> Path:
    """Where this installation's signing key lives: ``SYNTHGATE_KEY`` when set, else :func:`default_key_path`."""
    env = os.environ.get(KEY_ENV)
    return Path(env).expanduser() if env else default_key_path()


# ------------------------------------------------------------------ keys


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (its 32 raw bytes)."""

    raw: bytes

    def __post_init__(self):
        if len(self.raw) != 32:
            raise InputError(f"an Ed25519 public key has 32 bytes, not {len(self.raw)}")

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the raw public key, hex: what a hospital publishes so readers can check its bundles."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def pem(self) -> str:
        """The key as a SubjectPublicKeyInfo PEM block (what ``release verify --key`` reads)."""
        from cryptography.hazmat.primitives import serialization

        return self._key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def _key(self):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Ed25519PublicKey.from_public_bytes(self.raw)

    def verifies(self, data: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._key().verify(signature, data)
        except InvalidSignature:
            return False
        return True

    @classmethod
    def from_b64(cls, text: str) -> "PublicKey":
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InputError("is not a base64 Ed25519 public key") from None
        return cls(raw)

    @classmethod
    def read(cls, path: str | Path) -> "PublicKey":
        """A public key file: PEM (``-----BEGIN PUBLIC KEY-----``) or the base64 of the 32 raw bytes."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        path = Path(path)
        data = _read_small(path, "public key file")
        if b"PRIVATE KEY" in data:
            raise InputError("holds a private key; give the public key (`release key --export FILE` writes it)",
                             path)
        if data.lstrip().startswith(b"-----BEGIN"):
            try:
                key = serialization.load_pem_public_key(data)
            except ValueError as exc:
                raise InputError(f"is not a readable PEM public key ({exc})", path) from None
            if not isinstance(key, Ed25519PublicKey):
                raise InputError(f"holds a {type(key).__name__}, not an Ed25519 public key", path)
            return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        try:
            return cls.from_b64(data.decode("ascii"))
        except (UnicodeDecodeError, InputError):
            raise InputError("is neither a PEM public key nor the base64 of an Ed25519 public key", path) from None


@dataclass(frozen=True)
class SigningKey:
    """This installation's private key.  Its ``repr`` and every output show only the public half."""

    path: Path | None
    public: PublicKey
    _private: Any = field(repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def sign_bytes(self, data: bytes) -> bytes:
        return self._private.sign(data)

    @classmethod
    def generate(cls) -> "SigningKey":
        """A fresh key in memory (tests, or a hospital making its key with :func:`write_new_key`)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls._of(Ed25519PrivateKey.generate(), None)

    @classmethod
    def _of(cls, private, path: Path | None) -> "SigningKey":
        from cryptography.hazmat.primitives import serialization

        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(path, PublicKey(raw), private)


def _read_small(path: Path, what: str) -> bytes:
    if not path.exists():
        raise MissingInputError(f"{what} does not exist", path)
    if not path.is_file():
        raise InputError(f"is not a {what} (a folder?)", path)
    if path.stat().st_size > MAX_KEY_BYTES:
        raise InputError(f"is too large to be a {what}", path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what} ({exc.strerror or exc})", path) from None


def _private_pem(private) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def write_new_key(path: str | Path) -> SigningKey:
    """Create a new key file at ``path`` (mode 0600, never replacing an existing file)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # FileExistsError: someone was first
    try:
        os.write(fd, _private_pem(private))
        os.fsync(fd)
    finally:
        os.close(fd)
    return SigningKey._of(private, path)


def read_key(path: str | Path) -> SigningKey:
    """Read a private key file (PKCS#8 PEM, Ed25519, unencrypted, not readable or writable by other users)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    data = _read_small(path, "signing key file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"other users may read or change this signing key (mode {mode:04o}); a signing key "
                          f"must be private: chmod 600 {path}", path)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError("is an encrypted key; synthgate reads unencrypted PKCS#8 keys kept private by their "
                          "file mode", path) from None
    except ValueError as exc:
        raise ConfigError(f"is not a readable PEM private key ({' '.join(str(exc).split())[:120]})", path) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"holds a {type(private).__name__}; synthgate signs with Ed25519 keys", path)
    return SigningKey._of(private, path)


def load_signing_key(path: str | Path | None = None) -> SigningKey:
    """The key to sign with: ``path`` if given, else ``SYNTHGATE_KEY``, else this installation's key file.

    Only the installation's own default file is created on first use; a key
    named by ``path`` or ``SYNTHGATE_KEY`` must exist (a typo must not
    silently make a new, untrusted key).
    """
    if path is not None:
        return read_key(path)
    if os.environ.get(KEY_ENV):
        return read_key(key_path())
    p = default_key_path()
    if not p.exists():
        try:
            return write_new_key(p)
        except FileExistsError:  # another process created it a moment ago
            pass
    return read_key(p)


def installation_public_key() -> PublicKey | None:
    """This installation's public key, or ``None`` when it has none yet (nothing is created)."""
    p = key_path()
    if not os.environ.get(KEY_ENV) and not p.exists():
        return None
    return read_key(p).public


# ------------------------------------------------------------------ documents


def _normalised(document: Mapping) -> dict:
    """``document`` as a reader will parse it back from synthgate's JSON (tuples, numpy values, paths...)."""
    from .fsutil import to_json

    return json.loads(to_json({k: v for k, v in document.items() if k != SIGNATURE}))


def canonical_bytes(document: Mapping) -> bytes:
    """The bytes a signature covers: ``document`` minus ``signature``, canonical JSON, UTF-8."""
    body = {k: v for k, v in document.items() if k != SIGNATURE}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def sign_document(document: Mapping, key: SigningKey | None = None) -> dict:
    """``document`` (normalised to its JSON form) with a ``signature`` block over its canonical bytes.

    Any earlier signature is replaced.  ``key`` defaults to :func:`load_signing_key`.
    """
    key = key if key is not None else load_signing_key()
    body = _normalised(document)
    value = key.sign_bytes(canonical_bytes(body))
    return {**body, SIGNATURE: {"algorithm": ALGORITHM, "public_key": key.public.b64,
                                "fingerprint": key.fingerprint,
                                "value": base64.b64encode(value).decode("ascii")}}


def verify_document(document: Any, what: str = "document") -> PublicKey:
    """The key that signed ``document``; :class:`SignatureError` when it is unsigned or does not verify.

    This proves the document is unchanged since *that key* signed it; whether
    the key is trusted is a separate question (:func:`is_trusted`).
    """
    if not isinstance(document, dict):
        raise SignatureError(f"{what} is not a JSON object, so it carries no signature")
    block = document.get(SIGNATURE)
    if block is None:
        raise SignatureError(f"{what} is not signed")
    if not isinstance(block, dict) or not all(isinstance(block.get(k), str) for k in
                                              ("algorithm", "public_key", "fingerprint", "value")):
        raise SignatureError(f"{what}'s signature block is malformed (algorithm, public_key, fingerprint, value)")
    if block["algorithm"] != ALGORITHM:
        raise SignatureError(f"{what} is signed with {block['algorithm']!r}; synthgate signs with {ALGORITHM}")
    try:
        key = PublicKey.from_b64(block["public_key"])
        value = base64.b64decode(block["value"], validate=True)
    except (InputError, binascii.Error, ValueError):
        raise SignatureError(f"{what}'s signature block is malformed (not base64)") from None
    if key.fingerprint != block["fingerprint"].lower():
        raise SignatureError(f"{what}'s signature names fingerprint {block['fingerprint'][:16]}… but carries "
                             f"the key {key.fingerprint[:16]}…")
    try:
        data = canonical_bytes(document)
    except (TypeError, ValueError):
        raise SignatureError(f"{what} cannot be put in canonical form") from None
    if len(value) != 64 or not key.verifies(data, value):
        raise SignatureError(f"{what}'s signature does not verify: it was changed after it was signed")
    return key


def signer(document: Any) -> str | None:
    """The fingerprint a document's signature block names (unverified), or ``None``."""
    block = document.get(SIGNATURE) if isinstance(document, dict) else None
    fp = block.get("fingerprint") if isinstance(block, dict) else None
    return fp if isinstance(fp, str) else None


def parse_fingerprint(text: str) -> str:
    """A full SHA-256 fingerprint (64 hex digits; colons and spaces ignored), lower case."""
    fp = "".join(str(text).split()).replace(":", "").lower()
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise InputError(f"{str(text)[:80]!r} is not a key fingerprint (64 hex digits, as `release key` prints)")
    return fp


def trusted_key(spec: str) -> str:
    """The fingerprint named by ``spec``: a public key file, or a fingerprint itself."""
    p = Path(spec).expanduser()
    if p.exists():
        return PublicKey.read(p).fingerprint
    try:
        return parse_fingerprint(spec)
    except InputError:
        raise MissingInputError("is neither a public key file nor a key fingerprint (64 hex digits)", spec) from None


def is_trusted(key: PublicKey | str, trusted: Iterable[str]) -> bool:
    fp = key.fingerprint if isinstance(key, PublicKey) else str(key).lower()
    return fp in {str(t).lower() for t in trusted}


__all__ = ["ALGORITHM", "KEY_ENV", "PublicKey", "SignatureError", "SigningKey", "canonical_bytes",
           "default_key_path", "installation_public_key", "is_trusted", "key_path", "load_signing_key",
           "parse_fingerprint", "read_key", "sign_document", "signer", "trusted_key", "verify_document",
           "write_new_key"]
