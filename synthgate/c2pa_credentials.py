"""C2PA content credentials for synthetic images: sign them, read them back, check them.

A synthetic image that leaves the hospital should say what it is wherever it
goes, not only in the bundle it left in.  The Coalition for Content
Provenance and Authenticity (C2PA) manifest is the standard way: a signed
claim, bound to the file's bytes by a hash, that lists what happened to the
asset.  Each synthetic file gets a manifest with

- a ``c2pa.actions`` assertion whose ``c2pa.created`` action has the IPTC
  digital source type ``trainedAlgorithmicMedia`` (the value C2PA and IPTC
  prescribe for the output of a trained generative model) and names the
  generator (the model's digest) as its software agent;
- an ``org.synthgate.release`` assertion: the model digest, the audit digest
  and its verdict, the SHA-256 of the file as it was audited (before the
  manifest went in) and synthgate's version;
- a hard binding (``c2pa.hash.data``): SHA-256 of every byte of the file
  except the manifest's own box, so any change to the pixels breaks it;
- a COSE signature made with the hospital's key, whose certificate chain is
  carried in the manifest (``x5chain``).

PNG and JPEG carry the manifest inside the file (a ``caBX`` chunk, APP11
segments); the decoded pixels are unchanged, which :func:`sign_image`
checks before returning.  DICOM has no C2PA embedding, so :func:`sign_detached`
writes a *detached* manifest store (a ``.c2pa`` sidecar, C2PA's "external
manifest"): the same claim, with a ``c2pa.hash.data`` assertion over the whole
file and no exclusions, i.e. the file's SHA-256.

Everything runs offline: no time-stamp authority (``ta_url`` is None, so the
signature has no trusted time and certificates are checked against the
clock at validation: a credential stops validating, ``signingCredential.expired``,
once the signing certificate expires), no OCSP, no remote manifest fetch, no
allowed network host.  Trust comes only from the anchors the verifier passes in: a manifest
is called valid only when c2pa-rs reports it ``Trusted`` against them, every
hash matches and it says what synthgate requires.

Notes
-----
C2PA Technical Specification 2.x (spec.c2pa.org): claims, ``c2pa.actions``
(v2), hard bindings, external manifests, the X.509 certificate profile
(§14.5: v3, key usage digitalSignature, an EKU such as id-kp-emailProtection
or id-kp-documentSigning, never anyExtendedKeyUsage, not a CA, an authority
key identifier, not self-signed).  IPTC NewsCodes Digital Source Type
``trainedAlgorithmicMedia``.  Signing and validation are c2pa-rs through
``c2pa-python`` (tested with 0.38.1 / c2pa-rs 0.91.3).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ImageReadError, InputError, IntegrityError, MissingInputError, UsageError, require

#: IPTC digital source type of media made by a trained generative model
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
#: label of synthgate's own assertion
ASSERTION_LABEL = "org.synthgate.release"
#: what the caller's assertion must hold (synthgate adds ``synthgate_version`` and ``source_sha256``)
REQUIRED_KEYS = ("model_sha256", "audit_sha256", "verdict")
#: extension of a detached manifest store
SIDECAR_SUFFIX = ".c2pa"

_MIME = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "dicom": "application/dicom",
         "dcm": "application/dicom"}
_EMBEDDED = ("image/png", "image/jpeg")
# c2pa-rs settings that keep every operation on this machine
_OFFLINE = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False, "verify_trust": True,
               "verify_after_reading": True, "verify_after_sign": True},
    "core": {"allowed_network_hosts": []},
    # a thumbnail would be a second, lossy copy of the image inside the manifest
    "builder": {"thumbnail": {"enabled": False}},
}


@dataclass(frozen=True)
class TestChain:
    """Paths of a locally generated certificate chain, **for tests and demos only**.

    ``chain``: the signing certificate then the intermediate CA (PEM), what
    ``sign_*`` take as ``chain``; ``key``: the signing key (PKCS#8 PEM, not
    encrypted); ``anchors``: the root CA (PEM), what a verifier passes as
    ``trust_anchors``.
    """

    __test__ = False  # not a pytest class

    chain: Path
    key: Path
    anchors: Path


@dataclass(frozen=True)
class Status:
    """One C2PA validation status: ``kind`` is success, informational or failure."""

    kind: str
    code: str
    explanation: str = ""
    url: str = ""


@dataclass(frozen=True)
class Credentials:
    """What a file's content credentials say, and whether they hold.

    Attributes
    ----------
    valid
        True only when a manifest is present, c2pa-rs validated it as
        ``Trusted`` against the given anchors with no failure status, its
        ``c2pa.created`` action says ``trainedAlgorithmicMedia`` and it holds
        a complete ``org.synthgate.release`` assertion.
    state
        c2pa-rs' validation state (``Trusted``, ``Valid``: signature and hashes
        hold but the signer is not trusted, ``Invalid``) or ``missing``/``error``.
    problems
        Why it is not valid, one line each (empty when valid).
    status
        Every validation status c2pa-rs reported for the active manifest.
    actions
        The actions of the active manifest.
    assertion
        The ``org.synthgate.release`` assertion's data, or None.
    signer_fingerprint
        SHA-256 (hex) of the signing certificate's DER, read from the COSE
        signature's ``x5chain``; None when there is no readable signature.
    signer
        Subject common name and issuer of the signing certificate, as c2pa-rs reports them.
    detached
        Whether the manifest came from a sidecar rather than the file.
    """

    valid: bool
    state: str
    problems: tuple[str, ...] = ()
    status: tuple[Status, ...] = ()
    actions: tuple[dict, ...] = ()
    assertion: Mapping[str, Any] | None = None
    signer_fingerprint: str | None = None
    signer: Mapping[str, str] = field(default_factory=dict)
    detached: bool = False

    @property
    def failures(self) -> tuple[str, ...]:
        """The failure codes c2pa-rs reported."""
        return tuple(s.code for s in self.status if s.kind == "failure")

    def to_dict(self) -> dict:
        return {"valid": self.valid, "state": self.state, "problems": list(self.problems),
                "status": [vars(s) for s in self.status], "actions": [dict(a) for a in self.actions],
                "assertion": None if self.assertion is None else dict(self.assertion),
                "signer_fingerprint": self.signer_fingerprint, "signer": dict(self.signer),
                "detached": self.detached}


# ---------------------------------------------------------------- test chain

def make_test_chain(folder: str | Path, *, alg: str = "es256", days: int = 30,
                    organisation: str = "synthgate test hospital") -> TestChain:
    """Generate a local root CA, intermediate CA and C2PA signing certificate, **for tests and demos only**.

    The certificates follow the profile c2pa-rs enforces (C2PA §14.5): X.509
    v3; the signing certificate has key usage digitalSignature (critical),
    extended key usage id-kp-documentSigning and id-kp-emailProtection,
    ``CA:FALSE``, subject and authority key identifiers, and is not
    self-signed.  The keys are unencrypted files: a hospital signs with the
    chain its own PKI issues, never with these.

    Parameters
    ----------
    folder
        Where ``c2pa-test-chain.pem``, ``c2pa-test-key.pem`` and
        ``c2pa-test-root.pem`` are written (created if missing).
    alg
        ``es256`` (P-256), ``es384`` (P-384), ``ps256`` (RSA 2048) or ``ed25519``.
    days
        Validity of the certificates from now.
    """
    require("cryptography", purpose="C2PA test certificates")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    makers = {"es256": lambda: ec.generate_private_key(ec.SECP256R1()),
              "es384": lambda: ec.generate_private_key(ec.SECP384R1()),
              "ps256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
              "ed25519": ed25519.Ed25519PrivateKey.generate}
    if alg not in makers:
        raise UsageError(f"unknown test-chain algorithm {alg!r}; use one of {', '.join(makers)}")
    digest = None if alg == "ed25519" else (hashes.SHA384() if alg == "es384" else hashes.SHA256())
    now = _dt.datetime.now(_dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)])

    def issue(subject, key, issuer, issuer_key, *, ca: bool):
        usage = {"digital_signature": True, "content_commitment": False, "key_encipherment": False,
                 "data_encipherment": False, "key_agreement": False, "key_cert_sign": ca, "crl_sign": ca,
                 "encipher_only": False, "decipher_only": False}
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=1 if ca else None), critical=True)
                   .add_extension(x509.KeyUsage(**usage), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([
                x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36"),  # id-kp-documentSigning (RFC 9336)
                ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        return builder.sign(issuer_key, digest)

    root_key, inter_key, leaf_key = makers[alg](), makers[alg](), makers[alg]()
    root = issue("synthgate test root CA", root_key, "synthgate test root CA", root_key, ca=True)
    inter = issue("synthgate test intermediate CA", inter_key, "synthgate test root CA", root_key, ca=True)
    leaf = issue("synthgate test release signer", leaf_key, "synthgate test intermediate CA", inter_key, ca=False)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    out = TestChain(folder / "c2pa-test-chain.pem", folder / "c2pa-test-key.pem", folder / "c2pa-test-root.pem")
    out.chain.write_bytes(leaf.public_bytes(pem) + inter.public_bytes(pem))
    out.anchors.write_bytes(root.public_bytes(pem))
    out.key.write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return out


# ------------------------------------------------------------------- signing

def sign_image(src: bytes | str | Path, fmt: str, *, chain: str | Path | bytes, key: str | Path | bytes,
               assertion: Mapping[str, Any]) -> bytes:
    """Return a PNG or JPEG file with a signed C2PA manifest embedded; its pixels are unchanged.

    Parameters
    ----------
    src
        The file's bytes or path (read only).
    fmt
        ``png``, ``jpeg``/``jpg`` or their MIME types.
    chain, key
        The signing certificate chain (signing certificate first, then any
        intermediates; PEM) and its private key (PEM, unencrypted), as paths
        or bytes.
    assertion
        At least ``model_sha256``, ``audit_sha256`` and ``verdict``; any
        other JSON value is kept.  ``synthgate_version`` and ``source_sha256``
        (SHA-256 of ``src``) are added.

    Raises
    ------
    InputError
        Unreadable image, chain or key, or a chain c2pa-rs refuses.
    IntegrityError
        The signed file would not decode to the same pixels (never expected).
    """
    mime = _mime(fmt)
    if mime not in _EMBEDDED:
        raise UsageError(f"C2PA manifests are embedded in PNG and JPEG only, not {fmt!r}; "
                         "use sign_detached for DICOM")
    data = _read_bytes(src, "image")
    where = src if isinstance(src, (str, Path)) else None
    if strip_manifest(data, mime) != data:
        raise UsageError("already carries a C2PA manifest (or a segment like one); sign the audited file", where)
    signed = _sign(data, mime, chain, key, assertion, embed=True)[0]
    _check_pixels(data, signed, where)
    if strip_manifest(signed, mime) != data:  # what makes source_sha256 checkable
        raise IntegrityError("c2pa changed more of the file than the manifest's own box; nothing was written", where)
    return signed


def sign_detached(file_bytes: bytes | str | Path, *, chain: str | Path | bytes, key: str | Path | bytes,
                  assertion: Mapping[str, Any], fmt: str = "dicom") -> bytes:
    """Return a detached C2PA manifest store (the bytes of a ``.c2pa`` sidecar) bound to the file's SHA-256.

    The file itself is not changed.  The manifest's hard binding is a
    ``c2pa.hash.data`` assertion over every byte of the file, with no
    exclusions, which is the file's SHA-256; :func:`read_credentials` with
    ``detached=`` checks it.

    Parameters are as for :func:`sign_image`; ``fmt`` is the file's format
    (recorded as the claim's format; ``dicom`` by default).
    """
    data = _read_bytes(file_bytes, "file")
    return _sign(data, _mime(fmt), chain, key, assertion, embed=False)[1]


def strip_manifest(data: bytes, fmt: str) -> bytes:
    """The file without its embedded C2PA manifest: the bytes :func:`sign_image` was given.

    PNG loses its ``caBX`` chunks, JPEG its APP11 ``JP`` (JUMBF) segments;
    other formats are returned unchanged.  ``sha256(strip_manifest(signed))``
    is the assertion's ``source_sha256``, so a verifier can tie a signed file
    to the file the audit hashed.
    """
    from .imagemeta import PNG_SIGNATURE, _jpeg_segments, _png_chunks

    mime = _mime(fmt)
    try:
        if mime == "image/png":
            return PNG_SIGNATURE + b"".join(raw for ctype, _, raw in _png_chunks(data) if ctype != b"caBX")
        if mime == "image/jpeg":
            return b"".join(raw for marker, payload, raw in _jpeg_segments(data)
                            if not (marker == 0xEB and payload[:2] == b"JP"))
    except ValueError as exc:
        raise ImageReadError(f"is not a well-formed {fmt} file ({exc})") from exc
    return data


def sidecar_path(path: str | Path) -> Path:
    """Where the detached manifest of ``path`` lives: its extension replaced by ``.c2pa`` (C2PA's convention).

    c2pa-rs and c2patool look for exactly this name next to an asset
    (``image.dcm`` -> ``image.c2pa``; an extensionless DICOM file gets
    ``.c2pa`` appended), so two files differing only by extension would share
    a sidecar: a bundle must not hold such a pair.
    """
    return Path(path).with_suffix(SIDECAR_SUFFIX)


def _sign(data: bytes, mime: str, chain, key, assertion: Mapping[str, Any], *, embed: bool) -> tuple[bytes, bytes]:
    c2pa = _c2pa()
    chain_pem, key_pem, alg = _load_signing_material(chain, key)
    content = _assertion_content(assertion, data)
    manifest = {
        "claim_generator_info": [{"name": "synthgate", "version": __version__}],
        "format": mime,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": str(content.get("generator") or "synthgate generator")},
                "parameters": {"model_sha256": content["model_sha256"]},
            }]}},
            {"label": ASSERTION_LABEL, "data": content},
        ],
    }
    info = c2pa.C2paSignerInfo(alg, chain_pem, key_pem, None)  # None: no time-stamp authority, offline
    try:
        with c2pa.Context.from_dict(_OFFLINE) as context, c2pa.Signer.from_info(info) as signer, \
                c2pa.Builder(manifest, context=context) as builder:
            if not embed:
                builder.set_no_embed()
            out = io.BytesIO()
            store = builder.sign(signer, mime, io.BytesIO(data), out)
    except c2pa.C2paError as exc:
        where = chain if isinstance(chain, (str, Path)) else None
        raise InputError(f"c2pa could not sign with this certificate chain and key: {exc}", where) from exc
    return out.getvalue(), store


def _assertion_content(assertion: Mapping[str, Any], data: bytes) -> dict:
    missing = [k for k in REQUIRED_KEYS if k not in assertion]
    if missing:
        raise UsageError(f"the {ASSERTION_LABEL} assertion needs {', '.join(missing)} "
                         f"(it must hold {', '.join(REQUIRED_KEYS)})")
    content = dict(assertion)
    content.setdefault("synthgate_version", __version__)
    content["source_sha256"] = hashlib.sha256(data).hexdigest()
    try:
        return json.loads(json.dumps(content))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the {ASSERTION_LABEL} assertion must be plain JSON ({exc})") from exc


def _load_signing_material(chain, key) -> tuple[bytes, bytes, Any]:
    """The chain and key as c2pa-rs takes them (PEM, PKCS#8), and the COSE algorithm the key implies."""
    require("cryptography", purpose="C2PA signing")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    c2pa = _c2pa()
    chain_bytes = _read_bytes(chain, "certificate chain")
    key_bytes = _read_bytes(key, "private key")
    chain_where = chain if isinstance(chain, (str, Path)) else None
    key_where = key if isinstance(key, (str, Path)) else None
    try:
        certs = x509.load_pem_x509_certificates(chain_bytes)
    except ValueError as exc:
        raise InputError(f"is not a PEM certificate chain ({exc})", chain_where) from exc
    try:
        private = serialization.load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"is not an unencrypted PEM private key ({exc})", key_where) from exc
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(serialization.Encoding.DER, raw) != \
            private.public_key().public_bytes(serialization.Encoding.DER, raw):
        raise InputError("the private key does not belong to the first certificate of the chain "
                         "(the chain must start with the signing certificate)", key_where)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        alg = c2pa.C2paSigningAlg.ED25519
    elif isinstance(private, rsa.RSAPrivateKey):
        alg = c2pa.C2paSigningAlg.PS256
    elif isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name in ("secp256r1", "secp384r1",
                                                                                     "secp521r1"):
        alg = {"secp256r1": c2pa.C2paSigningAlg.ES256, "secp384r1": c2pa.C2paSigningAlg.ES384,
               "secp521r1": c2pa.C2paSigningAlg.ES512}[private.curve.name]
    else:
        raise InputError("C2PA signs with P-256/P-384/P-521 ECDSA, RSA-PSS or Ed25519 keys only", key_where)
    pkcs8 = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return chain_pem, pkcs8, alg


def _check_pixels(before: bytes, after: bytes, where) -> None:
    import numpy as np
    from PIL import Image

    def pixels(data: bytes):
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.mode, np.asarray(img)

    try:
        (mode_a, a), (mode_b, b) = pixels(before), pixels(after)
    except Exception as exc:
        raise ImageReadError(f"cannot be decoded ({exc})", where) from exc
    if mode_a != mode_b or a.shape != b.shape or not np.array_equal(a, b):
        raise IntegrityError("embedding the C2PA manifest changed the decoded pixels; nothing was written", where)


# ------------------------------------------------------------------- reading

def read_credentials(src: bytes | str | Path, fmt: str, *, detached: bytes | str | Path | None = None,
                     trust_anchors: bytes | str | Path | None = None) -> Credentials:
    """Read and validate the content credentials of a file, offline.

    Parameters
    ----------
    src
        The file's bytes or path.
    fmt
        ``png``, ``jpeg``, ``dicom`` (or a MIME type).
    detached
        The detached manifest store (bytes or path of the ``.c2pa``
        sidecar); without it the manifest is read from the file.
    trust_anchors
        Root certificates (PEM bytes, text or path) the signer must chain
        to.  Without anchors nothing can be trusted and ``valid`` is False
        (the signature and hashes are still checked and reported).

    Returns
    -------
    Credentials
        Never raises for a missing, broken or untrusted manifest: those are
        findings, reported in ``problems``.
    """
    c2pa = _c2pa()
    mime = _mime(fmt)
    data = _read_bytes(src, "file")
    store = None if detached is None else _read_bytes(detached, "detached manifest")
    if detached is None and mime not in _EMBEDDED:
        return Credentials(False, "missing", ((f"{fmt} files carry no embedded C2PA manifest; "
                                              "pass the detached .c2pa manifest"),), detached=False)
    settings = json.loads(json.dumps(_OFFLINE))
    anchors = None if trust_anchors is None else _read_bytes(trust_anchors, "trust anchors").decode("ascii", "replace")
    if anchors is not None:
        settings["trust"] = {"trust_anchors": anchors}  # replaces c2pa-rs' built-in anchors: only these count
    try:
        with c2pa.Context.from_dict(settings) as context:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), store, context)
            if reader is None:
                return Credentials(False, "missing", ("the file carries no C2PA manifest",), detached=store is not None)
            with reader:
                report = json.loads(reader.json())
                embedded = reader.is_embedded()
    except c2pa.C2paError as exc:
        return Credentials(False, "error", (f"c2pa could not read the manifest: {exc}",), detached=store is not None)
    if store is None and not embedded:
        return Credentials(False, "error", ("the manifest is remote, and remote manifests are not fetched",))
    try:
        unsigned = data if store is not None else strip_manifest(data, mime)
    except ImageReadError:
        unsigned = None
    return _interpret(report, store if store is not None else _embedded_store(data, mime), anchors is not None,
                      unsigned_sha256=None if unsigned is None else hashlib.sha256(unsigned).hexdigest(),
                      detached=store is not None)


def _interpret(report: dict, store: bytes | None, anchored: bool, *, unsigned_sha256: str | None,
               detached: bool) -> Credentials:
    label = report.get("active_manifest")
    manifest = (report.get("manifests") or {}).get(label) or {}
    results = (report.get("validation_results") or {}).get("activeManifest") or {}
    status = tuple(Status(kind, s.get("code", ""), s.get("explanation", ""), s.get("url", ""))
                   for kind in ("success", "informational", "failure") for s in results.get(kind) or [])
    # statuses of the store that are not attached to the active manifest (e.g. a broken store)
    # (c2pa-rs lists only failures there)
    seen = {(s.code, s.url) for s in status}
    status += tuple(Status("failure", s.get("code", ""), s.get("explanation", ""), s.get("url", ""))
                    for s in report.get("validation_status") or [] if (s.get("code"), s.get("url", "")) not in seen)
    state = report.get("validation_state") or "unknown"
    assertions = {a.get("label"): a.get("data") for a in manifest.get("assertions") or []}
    actions = tuple(dict(a) for a in ((assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions")
                                       or {}).get("actions") or []))
    ours = assertions.get(ASSERTION_LABEL)

    problems = []
    if not anchored:
        problems.append("no trust anchors were given, so the signer cannot be trusted")
    if state != "Trusted":
        problems.append(f"c2pa validation state is {state}, not Trusted")
    problems += [f"{s.code}: {s.explanation}" for s in status if s.kind == "failure"]
    if not any(a.get("action") == "c2pa.created" and a.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA
               for a in actions):
        problems.append("no c2pa.created action with digitalSourceType trainedAlgorithmicMedia")
    if not isinstance(ours, dict):
        problems.append(f"no {ASSERTION_LABEL} assertion")
    else:
        missing = [k for k in (*REQUIRED_KEYS, "synthgate_version", "source_sha256") if k not in ours]
        if missing:
            problems.append(f"the {ASSERTION_LABEL} assertion lacks {', '.join(missing)}")
        elif ours["source_sha256"] != unsigned_sha256:
            problems.append(f"source_sha256 of the {ASSERTION_LABEL} assertion is not the SHA-256 of the file "
                            "without its manifest")

    info = manifest.get("signature_info") or {}
    signer = {k: str(info[k]) for k in ("common_name", "issuer", "alg", "cert_serial_number") if k in info}
    fingerprint = _signer_fingerprint(store, label) if store else None
    return Credentials(valid=not problems, state=state, problems=tuple(problems), status=status, actions=actions,
                       assertion=ours if isinstance(ours, dict) else None, signer_fingerprint=fingerprint,
                       signer=signer, detached=detached)


# ------------------------------------------------- manifest store internals
# Only to report which certificate signed: c2pa-rs validates, this reads.

def _embedded_store(data: bytes, mime: str) -> bytes | None:
    """The JUMBF manifest store embedded in a PNG (``caBX`` chunk) or JPEG (APP11 segments)."""
    from .imagemeta import _jpeg_segments, _png_chunks

    try:
        if mime == "image/png":
            return next((payload for ctype, payload, _ in _png_chunks(data) if ctype == b"caBX"), None)
        packets: dict[bytes, list[tuple[int, bytes]]] = {}
        for marker, payload, _ in _jpeg_segments(data):
            if marker == 0xEB and payload[:2] == b"JP" and len(payload) >= 16:
                packets.setdefault(payload[2:4], []).append((int.from_bytes(payload[4:8], "big"), payload[8:]))
    except ValueError:
        return None
    for parts in packets.values():
        parts.sort()
        first = parts[0][1]
        if first[4:8] != b"jumb":
            continue
        # every packet repeats the box header (LBox, TBox and, when LBox is 1, XLBox)
        header = 16 if first[:4] == b"\0\0\0\x01" else 8
        return first + b"".join(p[header:] for _, p in parts[1:])
    return None


def _boxes(data: bytes):
    """``(type, payload)`` of the ISO BMFF boxes in ``data``."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        head = 8
        if size == 1:
            size, head = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        elif size == 0:
            size = len(data) - pos
        if size < head or pos + size > len(data):
            return
        yield kind, data[pos + head:pos + size]
        pos += size


def _jumbf_children(payload: bytes) -> tuple[str, list[tuple[bytes, bytes]]]:
    """Label of a ``jumb`` superbox and its content boxes."""
    boxes = list(_boxes(payload))
    label = ""
    if boxes and boxes[0][0] == b"jumd":
        desc = boxes[0][1]
        if len(desc) > 17 and desc[16] & 0x02:
            label = desc[17:].split(b"\0", 1)[0].decode("utf-8", "replace")
        boxes = boxes[1:]
    return label, boxes


def _signer_fingerprint(store: bytes, manifest_label: str | None) -> str | None:
    """SHA-256 of the first certificate of the active manifest's COSE ``x5chain``."""
    try:
        top = next((p for k, p in _boxes(store) if k == b"jumb"), None)
        if top is None:
            return None
        _, manifests = _jumbf_children(top)
        for kind, payload in manifests:
            label, parts = _jumbf_children(payload) if kind == b"jumb" else ("", [])
            if label != manifest_label:
                continue
            for kind2, payload2 in parts:
                sub_label, content = _jumbf_children(payload2) if kind2 == b"jumb" else ("", [])
                if sub_label == "c2pa.signature":
                    cose = next(p for k, p in content if k == b"cbor")
                    der = _x5chain_leaf(cose)
                    return None if der is None else hashlib.sha256(der).hexdigest()
    except (ValueError, IndexError, StopIteration, KeyError, TypeError):
        return None
    return None


def _x5chain_leaf(cose: bytes) -> bytes | None:
    value, _ = _cbor(cose, 0)
    if isinstance(value, _Tag):
        value = value.value
    protected, unprotected = value[0], value[1]
    headers = dict(unprotected or {})
    if protected:
        headers.update(_cbor(protected, 0)[0])
    chain = headers.get(33)  # COSE header parameter x5chain (RFC 9360)
    if isinstance(chain, list):
        chain = chain[0] if chain else None
    return chain if isinstance(chain, bytes) else None


@dataclass(frozen=True)
class _Tag:
    tag: int
    value: Any


def _cbor(data: bytes, pos: int, depth: int = 0):
    """Decode one CBOR item (RFC 8949, definite lengths) at ``pos``; returns ``(value, next position)``."""
    if depth > 32:
        raise ValueError("CBOR nested too deeply")
    first = data[pos]
    major, info = first >> 5, first & 0x1F
    pos += 1
    if info < 24:
        arg = info
    elif info in (24, 25, 26, 27):
        n = 1 << (info - 24)
        arg = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    else:
        raise ValueError("indefinite-length CBOR is not expected in a COSE signature")
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major in (2, 3):
        if pos + arg > len(data):
            raise ValueError("truncated CBOR string")
        raw = data[pos:pos + arg]
        return (raw if major == 2 else raw.decode("utf-8", "replace")), pos + arg
    if major == 4:
        items = []
        for _ in range(arg):
            item, pos = _cbor(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        out = {}
        for _ in range(arg):
            k, pos = _cbor(data, pos, depth + 1)
            v, pos = _cbor(data, pos, depth + 1)
            out[k if not isinstance(k, (list, dict)) else repr(k)] = v
        return out, pos
    if major == 6:
        value, pos = _cbor(data, pos, depth + 1)
        return _Tag(arg, value), pos
    return {20: False, 21: True, 22: None}.get(arg, arg), pos  # simple values; floats kept as raw bits


# ------------------------------------------------------------------- helpers

def _c2pa():
    return require("c2pa", purpose="C2PA content credentials (pip install \"synthgate[c2pa]\")")


def _mime(fmt: str) -> str:
    key = str(fmt).lower().lstrip(".")
    if "/" in key:
        return key
    if key not in _MIME:
        raise UsageError(f"unknown format {fmt!r} for content credentials; use png, jpeg or dicom")
    return _MIME[key]


def _read_bytes(src, what: str) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, str) and src.lstrip().startswith("-----BEGIN"):
        return src.encode("ascii")
    path = Path(src)
    if not path.exists():
        raise MissingInputError(f"{what} does not exist", path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} cannot be read ({exc})", path) from exc
