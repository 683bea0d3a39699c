"""C2PA content credentials: signed offline with a local chain, read back, and every tampering caught."""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("c2pa")
pytest.importorskip("cryptography")

from PIL import Image

from synthgate import c2pa_credentials as cc
from synthgate.errors import InputError, UsageError
from synthgate.imagemeta import PNG_SIGNATURE, _jpeg_segments, _png_chunks

pytestmark = pytest.mark.timeout(60)  # a stray network call would hang; fail instead

RELEASE = {"model_sha256": "a1" * 32, "audit_sha256": "b2" * 32, "verdict": "pass", "policy": "default"}


@pytest.fixture(scope="module")
def chain_a(tmp_path_factory):
    return cc.make_test_chain(tmp_path_factory.mktemp("chain-a"))


@pytest.fixture(scope="module")
def chain_b(tmp_path_factory):
    """Another hospital's chain (or an attacker's): a valid chain that is not the trusted one."""
    return cc.make_test_chain(tmp_path_factory.mktemp("chain-b"))


def _pixels(rgb: bool) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:96, 0:80]
    base = (127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    if not rgb:
        return base
    noise = rng.integers(0, 30, (96, 80, 3), dtype=np.uint8)
    return (base[..., None] // 2 + noise).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG" if fmt == "png" else "JPEG", quality=90)
    return buf.getvalue()


def _decode(data: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.mode, np.asarray(img)


@pytest.fixture(scope="module", params=["png", "jpeg"])
def signed(request, chain_a):
    fmt = request.param
    src = _encode(_pixels(rgb=fmt == "jpeg"), fmt)
    return fmt, src, cc.sign_image(src, fmt, chain=chain_a.chain, key=chain_a.key, assertion=RELEASE)


def _leaf_fingerprint(chain) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = x509.load_pem_x509_certificates(chain.chain.read_bytes())[0]
    return hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()


def _container(data: bytes, fmt: str) -> list[tuple[bool, bytes]]:
    """The file as ``(is manifest, raw bytes)`` pieces."""
    if fmt == "png":
        return [(ctype == b"caBX", raw) for ctype, _, raw in _png_chunks(data)]
    return [(marker == 0xEB and payload[:2] == b"JP", raw) for marker, payload, raw in _jpeg_segments(data)]


def _transplant(signed_file: bytes, other: bytes, fmt: str) -> bytes:
    """``other`` with ``signed_file``'s manifest put where it sat in ``signed_file`` (same byte offset)."""
    pieces = _container(signed_file, fmt)
    at = next(i for i, (is_manifest, _) in enumerate(pieces) if is_manifest)
    manifest = b"".join(raw for is_manifest, raw in pieces if is_manifest)
    rest = [raw for _, raw in _container(other, fmt)]
    head = PNG_SIGNATURE if fmt == "png" else b""
    return head + b"".join(rest[:at]) + manifest + b"".join(rest[at:])


# ------------------------------------------------------------ what is signed

def test_signed_image_keeps_its_pixels_and_says_what_it_is(signed, chain_a):
    fmt, src, out = signed
    assert out != src
    assert _decode(out)[0] == _decode(src)[0]
    assert np.array_equal(_decode(out)[1], _decode(src)[1])
    assert cc.strip_manifest(out, fmt) == src  # the manifest is the only addition

    cred = cc.read_credentials(out, fmt, trust_anchors=chain_a.anchors)
    assert cred.valid, cred.problems
    assert cred.state == "Trusted" and cred.failures == () and cred.problems == ()
    assert "assertion.dataHash.match" in {s.code for s in cred.status}
    created = [a for a in cred.actions if a["action"] == "c2pa.created"]
    assert created and created[0]["digitalSourceType"] == cc.TRAINED_ALGORITHMIC_MEDIA
    assert created[0]["parameters"]["model_sha256"] == RELEASE["model_sha256"]
    assert {k: cred.assertion[k] for k in RELEASE} == RELEASE
    assert cred.assertion["synthgate_version"]
    assert cred.assertion["source_sha256"] == hashlib.sha256(src).hexdigest()
    assert cred.signer_fingerprint == _leaf_fingerprint(chain_a)
    assert cred.signer["common_name"] == "synthgate test release signer"
    assert cred.to_dict()["valid"] is True


def test_paths_work_like_bytes(tmp_path, chain_a):
    src = tmp_path / "s.png"
    src.write_bytes(_encode(_pixels(rgb=False), "png"))
    before = src.read_bytes()
    out = cc.sign_image(src, "png", chain=chain_a.chain.read_bytes(), key=chain_a.key, assertion=RELEASE)
    assert src.read_bytes() == before  # the input is never written
    (tmp_path / "signed.png").write_bytes(out)
    assert cc.read_credentials(tmp_path / "signed.png", "png", trust_anchors=chain_a.anchors.read_text()).valid


@pytest.mark.parametrize("alg", ["es256", "ps256", "ed25519"])
def test_every_c2pa_algorithm_signs_offline(tmp_path, alg):
    chain = cc.make_test_chain(tmp_path, alg=alg)
    out = cc.sign_image(_encode(_pixels(rgb=False), "png"), "png", chain=chain.chain, key=chain.key,
                        assertion=RELEASE)
    cred = cc.read_credentials(out, "png", trust_anchors=chain.anchors)
    assert cred.valid, cred.problems
    assert cred.signer["alg"].lower() == alg


def test_large_manifest_split_over_jpeg_segments_is_read(chain_a):
    """A manifest over 64 KiB spans several APP11 segments; the signer is still found."""
    big = dict(RELEASE, notes="n" * 150_000)
    src = _encode(_pixels(rgb=True), "jpeg")
    out = cc.sign_image(src, "jpeg", chain=chain_a.chain, key=chain_a.key, assertion=big)
    assert sum(is_manifest for is_manifest, _ in _container(out, "jpeg")) >= 3
    cred = cc.read_credentials(out, "jpeg", trust_anchors=chain_a.anchors)
    assert cred.valid, cred.problems
    assert cred.signer_fingerprint == _leaf_fingerprint(chain_a)


# ------------------------------------------------------------------ tampering

def test_changed_pixels_under_the_same_manifest_are_caught(signed, chain_a):
    fmt, src, out = signed
    pixels = _decode(src)[1].copy()
    pixels[10:20, 10:20] = 255 - pixels[10:20, 10:20]
    forged = _transplant(out, _encode(pixels, fmt), fmt)
    assert not np.array_equal(_decode(forged)[1], _decode(out)[1])
    cred = cc.read_credentials(forged, fmt, trust_anchors=chain_a.anchors)
    assert not cred.valid
    assert "assertion.dataHash.mismatch" in cred.failures


def test_flipped_image_byte_is_caught(signed, chain_a):
    fmt, _, out = signed
    # the middle byte of the compressed image data (PNG IDAT payload, JPEG entropy-coded scan)
    pos = len(PNG_SIGNATURE) if fmt == "png" else 0
    items = _png_chunks(out) if fmt == "png" else _jpeg_segments(out)
    for kind, _, raw in items:
        if kind in (b"IDAT", None):
            at = pos + len(raw) // 2
            break
        pos += len(raw)
    forged = bytearray(out)
    forged[at] ^= 0x01 if forged[at] not in (0xFE, 0xFF) else 0x10  # never make a JPEG marker
    cred = cc.read_credentials(bytes(forged), fmt, trust_anchors=chain_a.anchors)
    assert not cred.valid
    assert cred.failures == ("assertion.dataHash.mismatch",)


def test_edited_assertion_is_caught(signed, chain_a):
    fmt, _, out = signed
    old = RELEASE["audit_sha256"].encode()
    assert out.count(old) == 1  # the assertion is stored in clear CBOR inside the manifest
    forged = out.replace(old, b"c3" * 32)
    cred = cc.read_credentials(forged, fmt, trust_anchors=chain_a.anchors)
    assert not cred.valid
    assert "assertion.hashedURI.mismatch" in cred.failures


def test_stripped_manifest_is_caught(signed, chain_a):
    fmt, _, out = signed
    reencoded = io.BytesIO()
    Image.open(io.BytesIO(out)).save(reencoded, "PNG" if fmt == "png" else "JPEG", quality=95)
    if fmt == "png":  # the same pixels, without credentials
        assert np.array_equal(_decode(reencoded.getvalue())[1], _decode(out)[1])
    for forged in (cc.strip_manifest(out, fmt), reencoded.getvalue()):
        cred = cc.read_credentials(forged, fmt, trust_anchors=chain_a.anchors)
        assert not cred.valid and cred.state == "missing"
        assert cred.problems == ("the file carries no C2PA manifest",)


def test_another_chain_is_not_trusted(signed, chain_a, chain_b):
    fmt, src, _ = signed
    other = cc.sign_image(src, fmt, chain=chain_b.chain, key=chain_b.key, assertion=RELEASE)
    against_a = cc.read_credentials(other, fmt, trust_anchors=chain_a.anchors)
    # c2pa-rs calls an untrusted but intact manifest "Valid": synthgate asks for "Trusted"
    assert against_a.state == "Valid"
    assert not against_a.valid
    assert "signingCredential.untrusted" in against_a.failures
    assert cc.read_credentials(other, fmt, trust_anchors=chain_b.anchors).valid  # negative control


def test_without_anchors_nothing_is_trusted(signed):
    fmt, _, out = signed
    cred = cc.read_credentials(out, fmt)
    assert not cred.valid
    assert "no trust anchors were given, so the signer cannot be trusted" in cred.problems


def _sign_raw(manifest: dict, src: bytes, chain, *, remote_url: str | None = None) -> bytes:
    """Sign with c2pa-python directly: manifests synthgate itself would never write."""
    import c2pa

    chain_pem, key_pem, alg = cc._load_signing_material(chain.chain, chain.key)
    with c2pa.Context.from_dict(cc._OFFLINE) as ctx, \
            c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, chain_pem, key_pem, None)) as signer, \
            c2pa.Builder(manifest, context=ctx) as builder:
        if remote_url:
            builder.set_no_embed()
            builder.set_remote_url(remote_url)
        out = io.BytesIO()
        builder.sign(signer, "image/png", io.BytesIO(src), out)
    return out.getvalue()


def _created(source_type: str) -> dict:
    return {"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": source_type}]}}


@pytest.mark.parametrize("case", ["camera capture", "wrong source_sha256"])
def test_trusted_manifest_that_is_not_synthgates_claim_is_not_valid(case, chain_a):
    """Positive controls of the content checks: signed by the trusted chain and intact, but not what synthgate signs."""
    src = _encode(_pixels(rgb=False), "png")
    if case == "camera capture":
        manifest = {"assertions": [_created("http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture")]}
        expected = {"no c2pa.created action with digitalSourceType trainedAlgorithmicMedia",
                    f"no {cc.ASSERTION_LABEL} assertion"}
    else:
        claim = dict(RELEASE, synthgate_version="0", source_sha256=hashlib.sha256(b"another file").hexdigest())
        manifest = {"assertions": [_created(cc.TRAINED_ALGORITHMIC_MEDIA), {"label": cc.ASSERTION_LABEL, "data": claim}]}
        expected = {(f"source_sha256 of the {cc.ASSERTION_LABEL} assertion is not the SHA-256 of the file "
                    "without its manifest")}
    cred = cc.read_credentials(_sign_raw(manifest, src, chain_a), "png", trust_anchors=chain_a.anchors)
    assert cred.state == "Trusted" and cred.failures == ()
    assert not cred.valid
    assert set(cred.problems) == expected


# --------------------------------------------------------------------- DICOM

@pytest.fixture(scope="module")
def dicom_bytes():
    pydicom = pytest.importorskip("pydicom")
    path = pydicom.data.get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's CT_small.dcm test file is not installed")
    with open(path, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def dicom_manifest(dicom_bytes, chain_a):
    return cc.sign_detached(dicom_bytes, chain=chain_a.chain, key=chain_a.key, assertion=RELEASE)


def test_dicom_detached_manifest_is_bound_to_the_file(dicom_bytes, dicom_manifest, chain_a, tmp_path):
    assert dicom_manifest[4:8] == b"jumb"  # a bare JUMBF manifest store, what a .c2pa sidecar holds
    dcm = tmp_path / "image.dcm"
    dcm.write_bytes(dicom_bytes)
    cc.sidecar_path(dcm).write_bytes(dicom_manifest)
    assert cc.sidecar_path(dcm).name == "image.c2pa"
    cred = cc.read_credentials(dcm, "dicom", detached=cc.sidecar_path(dcm), trust_anchors=chain_a.anchors)
    assert cred.valid, cred.problems
    assert cred.detached
    assert cred.assertion["source_sha256"] == hashlib.sha256(dicom_bytes).hexdigest()
    assert cred.signer_fingerprint == _leaf_fingerprint(chain_a)
    assert [a["digitalSourceType"] for a in cred.actions] == [cc.TRAINED_ALGORITHMIC_MEDIA]


def _dicom_edit(data: bytes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.InstitutionName = "Tampered"
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.mark.parametrize("change", ["pixel byte", "header", "first preamble byte", "appended byte", "other file"])
def test_dicom_tampering_is_caught(change, dicom_bytes, dicom_manifest, chain_a):
    if change == "pixel byte":
        forged = bytearray(dicom_bytes)
        forged[-100] ^= 0x01
    elif change == "header":
        forged = _dicom_edit(dicom_bytes)
    elif change == "first preamble byte":
        forged = bytearray(dicom_bytes)
        forged[0] ^= 0x01
    elif change == "appended byte":
        forged = dicom_bytes + b"\0"
    else:
        import pydicom

        with open(pydicom.data.get_testdata_file("MR_small.dcm", download=False), "rb") as fh:
            forged = fh.read()
    cred = cc.read_credentials(bytes(forged), "dicom", detached=dicom_manifest, trust_anchors=chain_a.anchors)
    assert not cred.valid
    assert "assertion.dataHash.mismatch" in cred.failures


def test_dicom_manifest_tampering_is_caught(dicom_bytes, dicom_manifest, chain_a, chain_b):
    edited = dicom_manifest.replace(RELEASE["audit_sha256"].encode(), b"c3" * 32)
    assert edited != dicom_manifest
    cred = cc.read_credentials(dicom_bytes, "dicom", detached=edited, trust_anchors=chain_a.anchors)
    assert not cred.valid and "assertion.hashedURI.mismatch" in cred.failures

    other = cc.sign_detached(dicom_bytes, chain=chain_b.chain, key=chain_b.key, assertion=RELEASE)
    cred = cc.read_credentials(dicom_bytes, "dicom", detached=other, trust_anchors=chain_a.anchors)
    assert not cred.valid and "signingCredential.untrusted" in cred.failures

    cred = cc.read_credentials(dicom_bytes, "dicom", trust_anchors=chain_a.anchors)  # sidecar lost
    assert not cred.valid and cred.state == "missing"

    cred = cc.read_credentials(dicom_bytes, "dicom", detached=dicom_manifest[:-200], trust_anchors=chain_a.anchors)
    assert not cred.valid  # truncated sidecar


# ------------------------------------------------------- offline and refusals

def test_remote_manifest_is_never_fetched(chain_a):
    """A file that points at a remote manifest (here an unroutable address) is reported, not fetched."""
    out = _sign_raw({"assertions": [_created(cc.TRAINED_ALGORITHMIC_MEDIA)]}, _encode(_pixels(rgb=False), "png"),
                    chain_a, remote_url="http://10.255.255.1/manifest.c2pa")
    start = time.monotonic()
    cred = cc.read_credentials(out, "png", trust_anchors=chain_a.anchors)
    assert time.monotonic() - start < 5
    assert not cred.valid and cred.state == "error"
    assert "must fetch remote manifests" in cred.problems[0]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_signing_and_validation_need_no_network(tmp_path):
    """The whole round trip in a network namespace with no interface up."""
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("user namespaces are not available here")
    script = textwrap.dedent(f"""
        import io, sys
        import numpy as np
        from PIL import Image
        from synthgate import c2pa_credentials as cc
        chain = cc.make_test_chain({str(tmp_path)!r})
        buf = io.BytesIO(); Image.fromarray(np.full((32, 32), 7, np.uint8)).save(buf, "PNG")
        out = cc.sign_image(buf.getvalue(), "png", chain=chain.chain, key=chain.key, assertion={RELEASE!r})
        store = cc.sign_detached(b"any bytes", chain=chain.chain, key=chain.key, assertion={RELEASE!r})
        ok = (cc.read_credentials(out, "png", trust_anchors=chain.anchors).valid
              and cc.read_credentials(b"any bytes", "dicom", detached=store, trust_anchors=chain.anchors).valid)
        sys.exit(0 if ok else 1)
    """)
    proc = subprocess.run(["unshare", "-rn", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False, cwd=str(Path(cc.__file__).parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_expired_certificate_fails_validation_and_signing(tmp_path):
    """No time-stamp authority: a credential holds only while the signing certificate is valid."""
    import datetime as dt

    from cryptography import x509

    chain = cc.make_test_chain(tmp_path, days=4 / 86400)
    out = cc.sign_image(_encode(_pixels(rgb=False), "png"), "png", chain=chain.chain, key=chain.key,
                        assertion=RELEASE)
    assert cc.read_credentials(out, "png", trust_anchors=chain.anchors).valid
    expiry = x509.load_pem_x509_certificates(chain.chain.read_bytes())[0].not_valid_after_utc
    time.sleep(max(0.0, (expiry - dt.datetime.now(dt.UTC)).total_seconds()) + 1.1)
    cred = cc.read_credentials(out, "png", trust_anchors=chain.anchors)
    assert not cred.valid and "signingCredential.expired" in cred.failures
    with pytest.raises(InputError, match="not valid at time of signing"):
        cc.sign_image(_encode(_pixels(rgb=False), "png"), "png", chain=chain.chain, key=chain.key,
                      assertion=RELEASE)


def test_refusals(tmp_path, chain_a, chain_b, signed):
    fmt, src, out = signed
    with pytest.raises(UsageError, match="needs audit_sha256"):
        cc.sign_image(src, fmt, chain=chain_a.chain, key=chain_a.key,
                      assertion={"model_sha256": "x", "verdict": "pass"})
    with pytest.raises(UsageError, match="already carries a C2PA manifest"):
        cc.sign_image(out, fmt, chain=chain_a.chain, key=chain_a.key, assertion=RELEASE)
    with pytest.raises(InputError, match="does not belong to the first certificate"):
        cc.sign_image(src, fmt, chain=chain_a.chain, key=chain_b.key, assertion=RELEASE)
    with pytest.raises(UsageError, match="embedded in PNG and JPEG only"):
        cc.sign_image(src, "dicom", chain=chain_a.chain, key=chain_a.key, assertion=RELEASE)
    with pytest.raises(InputError, match="not a PEM certificate chain"):
        cc.sign_image(src, fmt, chain=b"not a chain", key=chain_a.key, assertion=RELEASE)


def test_chain_that_breaks_the_c2pa_profile_is_refused(tmp_path):
    """A self-signed certificate without an extended key usage: c2pa-rs refuses it, and says so."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with pytest.raises(InputError, match="c2pa could not sign .* the certificate is invalid"):
        cc.sign_image(_encode(_pixels(rgb=False), "png"), "png", chain=pem, key=key_pem, assertion=RELEASE)


def test_cbor_decoder_reads_the_cose_shapes_it_needs():
    # {1: -7, 33: [h'0102', h'03']} as protected header, tag 18 around [bstr, {}, null, h'ff']
    protected = bytes.fromhex("a2" "01" "26" "1821" "82" "420102" "4103")
    cose = bytes.fromhex("d2" "84") + bytes([0x40 | len(protected)]) + protected + bytes.fromhex("a0" "f6" "41ff")
    value, end = cc._cbor(cose, 0)
    assert end == len(cose)
    assert value.tag == 18 and value.value[2] is None and value.value[3] == b"\xff"
    assert cc._cbor(protected, 0)[0] == {1: -7, 33: [b"\x01\x02", b"\x03"]}
    assert cc._x5chain_leaf(cose) == b"\x01\x02"
    with pytest.raises(ValueError, match="indefinite"):
        cc._cbor(b"\x9f\xff", 0)
