"""C2PA content credentials for the images of a release bundle: signed when bundled, checked by ``release verify``.

Each released file gets a C2PA manifest (:mod:`synthgate.c2pa_credentials`)
whose ``c2pa.created`` action says ``trainedAlgorithmicMedia`` and names the
generator (the model's digest), with an ``org.synthgate.release`` assertion
holding the audit's digest and verdict, the file's SHA-256 as audited
(``audited_sha256``) and as it was just before the manifest went in
(``source_sha256``: pixels as audited, ancillary metadata removed).  PNG and
JPEG carry it embedded; every other format (DICOM, TIFF, NPY) gets a detached
``.c2pa`` sidecar next to it.  Signing happens *after*
:func:`synthgate.imagemeta.strip_ancillary`, which would remove an embedded
manifest.

The chain and key are the hospital's (``--c2pa-chain``/``--c2pa-key`` or
``SYNTHGATE_C2PA_CHAIN``/``SYNTHGATE_C2PA_KEY``); trust comes only from the
roots the *verifier* names (``release verify --c2pa-trust ROOT.pem``), never
from anything inside the bundle.  Offline, there is no time-stamp authority:
a credential validates only while its signing certificate is valid.

Nothing in the bundle flow re-audits a signed image: ``audit check`` on a
bundle's images would report the manifest (a ``caBX`` chunk, APP11 segments)
as text metadata.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from synthgate.errors import InputError, UsageError

CHAIN_ENV = "SYNTHGATE_C2PA_CHAIN"
KEY_ENV = "SYNTHGATE_C2PA_KEY"
EMBEDDED = ("png", "jpeg")
#: the format a detached manifest's claim records, by synthgate's image format
DETACHED_MIME = {"dicom": "application/dicom", "tiff": "image/tiff", "npy": "application/octet-stream"}


@dataclass(frozen=True)
class C2paSigner:
    """The hospital's C2PA signing material, checked once before any file is written."""

    chain: Path
    key: Path
    subject: str
    not_after: str
    fingerprint: str

    def to_dict(self) -> dict:
        return {"signer_subject": self.subject, "signer_not_after": self.not_after,
                "signer_fingerprint": self.fingerprint}


def resolve(chain: str | Path | None, key: str | Path | None) -> C2paSigner | None:
    """The signing material from the options, else the environment; ``None`` when neither is given.

    Both or neither: one without the other is a usage error.  The pair is
    tried on a one-pixel PNG, so a chain c2pa refuses (a broken profile, an
    expired certificate, a key that is not the chain's) stops the bundle
    before anything is written.
    """
    chain = chain or os.environ.get(CHAIN_ENV) or None
    key = key or os.environ.get(KEY_ENV) or None
    if chain is None and key is None:
        return None
    if chain is None or key is None:
        raise UsageError("content credentials need both the certificate chain and its key: give --c2pa-chain and "
                         f"--c2pa-key (or {CHAIN_ENV} and {KEY_ENV}) together")
    chain, key = Path(chain).expanduser(), Path(key).expanduser()
    for p, what in ((chain, "C2PA certificate chain"), (key, "C2PA private key")):
        if not p.is_file():
            raise InputError(f"{what} does not exist or is not a file", p)
    _try_sign(chain, key)
    return _describe(chain, key)


def _try_sign(chain: Path, key: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    from synthgate.c2pa_credentials import sign_image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(buf, "PNG")
    sign_image(buf.getvalue(), "png", chain=chain, key=key,
               assertion={"model_sha256": None, "audit_sha256": None, "verdict": "trial"})


def _describe(chain: Path, key: Path) -> C2paSigner:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else leaf.subject.rfc4514_string()
    return C2paSigner(chain, key, subject, leaf.not_valid_after_utc.replace(microsecond=0).isoformat(),
                      hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest())


def sidecar_for(rel: str) -> str:
    """The detached manifest's path (bundle-relative, POSIX) for an image at ``rel``."""
    from synthgate.c2pa_credentials import sidecar_path

    return sidecar_path(Path(rel)).as_posix()


def check_sidecars(files: list[str], formats: Mapping[str, str]) -> None:
    """Refuse (before writing) a set where two detached manifests, or a manifest and an image, would share a name."""
    taken: dict[str, str] = {f: f for f in files}
    for f in files:
        if formats[f] in EMBEDDED:
            continue
        side = sidecar_for(f)
        if side in taken:
            raise UsageError(f"{f} and {taken[side]} would share the detached C2PA manifest {side} (C2PA names a "
                             "sidecar after its file without the extension); rename one and audit again")
        taken[side] = f


def sign(data: bytes, fmt: str, signer: C2paSigner, assertion: Mapping) -> tuple[bytes, bytes | None, str]:
    """``(file bytes, sidecar bytes or None, claim format)`` for one released file; ``data`` is what shipped before."""
    from synthgate.c2pa_credentials import sign_detached, sign_image

    if fmt in EMBEDDED:
        return sign_image(data, fmt, chain=signer.chain, key=signer.key, assertion=assertion), None, fmt
    mime = DETACHED_MIME.get(fmt, "application/octet-stream")
    return data, sign_detached(data, chain=signer.chain, key=signer.key, assertion=assertion, fmt=mime), mime


def assertion_for(*, model_sha256: str | None, model_source: str, audit_sha256: str, internal_audit_sha256: str,
                  verdict: str, audited_sha256: str, policy: str) -> dict:
    """The ``org.synthgate.release`` assertion of one file (synthgate adds ``source_sha256`` and its version)."""
    generator = (f"synthgate diffusion model {model_sha256[:16]}" if model_sha256
                 else "synthgate diffusion model (not given to the audit)")
    return {"model_sha256": model_sha256, "model_source": model_source, "generator": generator,
            "audit_sha256": audit_sha256, "internal_audit_sha256": internal_audit_sha256, "verdict": verdict,
            "audited_sha256": audited_sha256, "policy": policy}


# ------------------------------------------------------------------ verifying


def _inside(rel: str) -> bool:
    from pathlib import PurePosixPath

    p = PurePosixPath(rel)
    return bool(rel) and "\\" not in rel and not p.is_absolute() and ".." not in p.parts


def verify_images(root: Path, manifest: dict, trust: str | Path | None, ok: list[str], bad: list[str]) -> str | None:
    """Check every released image's credentials; returns a note when they were not checked (else ``None``).

    Always (no trust needed): each credentialed file without its embedded
    manifest hashes to the ``source_sha256`` the signed manifest records, so
    the shipped image is the one that was signed.  With ``trust`` (the root
    certificates the verifier gives): every file's C2PA manifest is valid and
    ``Trusted`` against them, says ``trainedAlgorithmicMedia``, and its
    assertion names this bundle's audit, verdict, model and the image's
    audited SHA-256.
    """
    from synthgate.c2pa_credentials import read_credentials, strip_manifest
    from synthgate.errors import ImageReadError

    info = manifest.get("content_credentials") if isinstance(manifest.get("content_credentials"), dict) else None
    entries = [e for e in manifest.get("images") or [] if isinstance(e, dict) and isinstance(e.get("path"), str)]
    if info is None:
        if trust is not None:
            bad.append("content credentials were asked for (--c2pa-trust) but this bundle carries none (it was made "
                       "without --c2pa-chain)")
        return None if trust is not None else "content credentials: none in this bundle"
    audit_sha = (manifest.get("audit") or {}).get("sha256") if isinstance(manifest.get("audit"), dict) else None
    model_sha = (manifest.get("privacy") or {}).get("model_sha256") if isinstance(manifest.get("privacy"), dict) else None
    before = len(bad)
    checked = 0
    for e in entries:
        path, cred = root / e["path"], e.get("credentials")
        if not isinstance(cred, dict) or not isinstance(cred.get("source_sha256"), str):
            bad.append(f"{e['path']}: has no content credentials, though the bundle's are recorded")
            continue
        if not path.is_file() or path.is_symlink():
            continue  # missing or replaced: already reported by the file checks
        sidecar = cred.get("sidecar")
        data = path.read_bytes()
        try:
            unsigned = data if sidecar else strip_manifest(data, cred.get("format") or "png")
        except (ImageReadError, UsageError):
            unsigned = b""
        if hashlib.sha256(unsigned).hexdigest() != cred["source_sha256"]:
            bad.append(f"{e['path']}: without its C2PA manifest it is not the file that was signed (SHA-256 differs "
                       "from source_sha256 in manifest.json)")
            continue
        if trust is None:
            continue
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        if sidecar is not None and not (isinstance(sidecar, str) and sidecar in files and _inside(sidecar)):
            bad.append(f"{e['path']}: its detached C2PA manifest is not a file the manifest lists")
            continue
        if sidecar is not None and not (root / sidecar).is_file():
            bad.append(f"{e['path']}: its detached C2PA manifest {sidecar} is missing")
            continue
        try:
            found = read_credentials(data, cred.get("format") or "png",
                                     detached=(root / sidecar) if sidecar else None, trust_anchors=trust)
        except (InputError, UsageError) as exc:
            bad.append(f"{e['path']}: content credentials cannot be read ({getattr(exc, 'message', exc)})")
            continue
        problems = list(found.problems)
        claim = found.assertion or {}
        if found.assertion is not None:
            expected = {"audited_sha256": e.get("audited_sha256"), "audit_sha256": audit_sha, "verdict": "pass",
                        "model_sha256": model_sha}
            problems += [f"its credentials say {k} {str(claim.get(k))[:16]}…, the bundle {str(v)[:16]}…"
                         for k, v in expected.items() if claim.get(k) != v]
        if problems:
            bad.append(f"{e['path']}: content credentials do not hold ({'; '.join(problems)})")
        else:
            checked += 1
    if trust is None:
        return ("content credentials: NOT checked (give --c2pa-trust ROOT.pem, the root certificate the hospital "
                "publishes, to validate them)")
    if len(bad) == before:
        ok.append(f"content credentials of {checked} image file(s): C2PA manifests valid and trusted against the "
                  f"root you gave, trainedAlgorithmicMedia, naming this bundle's audit, verdict and model "
                  f"(signer {info.get('signer_subject')}, certificate valid until {info.get('signer_not_after')})")
    return None


__all__ = ["C2paSigner", "CHAIN_ENV", "KEY_ENV", "assertion_for", "check_sidecars", "resolve", "sign", "sidecar_for",
           "verify_images"]
