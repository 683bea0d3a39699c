"""C2PA content credentials in release bundles: signed after the metadata is stripped, checked by `release verify`.

One synthetic set of PNG, JPEG, DICOM and TIFF files is audited once and bundled with a locally generated test
chain (``make_test_chain``); every tampering test works on a copy of that bundle.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("c2pa")

from PIL import Image

from audit import cli as audit_cli
from conftest import one_line_error, save_unit_png
from release import cli as release_cli
from release import credentials as rc
from synthgate import c2pa_credentials as cc
from synthgate.imagemeta import PNG_SIGNATURE, _png_chunks
from synthgate.phantoms import generate, write_phantoms

pytestmark = pytest.mark.timeout(300)
POLICY = ("name: c2pa-test\nmax_drop_fraction: 0.5\nchecks:\n  copy_detection: {action: drop}\n"
          "  dicom_phi: {action: block}\n")


@pytest.fixture(autouse=True)
def _hospital_key(hospital_key, monkeypatch):
    monkeypatch.setenv("SYNTHGATE_KEY", str(hospital_key))


def _dicom(path: Path, pixels: np.ndarray, i: int) -> None:
    from generators.write import dicom_bytes

    uids = {"study": "1.2.826.0.1.3680043.8.498.1", "series": "1.2.826.0.1.3680043.8.498.2",
            "sop": f"1.2.826.0.1.3680043.8.498.3.{i}"}
    import pydicom

    meta = {"seed": i, "model": {"sha256": "0" * 64}}
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.clip(pixels, 0, 1)[None], 8, meta, uids, i + 1)))
    del ds.ImageComments  # free text the Annex E basic profile removes (dicom_phi would block it)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory, hospital_key):
    root = tmp_path_factory.mktemp("c2pa-bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHGATE_KEY", str(hospital_key))
        write_phantoms(root / "p", patients=10, images_per_patient=3, size=32, seed=71)
        novel, _ = generate(patients=5, images_per_patient=2, size=32, seed=72)
        syn = root / "syn"
        rows = []
        for i, im in enumerate(novel):
            kind = ("png", "png", "png", "png", "jpg", "jpg", "dcm", "dcm", "dcm", "tif")[i]
            name = f"s{i:02d}.{kind}"
            if kind == "png":
                save_unit_png(syn / name, im.pixels)
            elif kind == "dcm":
                _dicom(syn / name, im.pixels, i)
            else:
                arr = np.round(np.clip(im.pixels, 0, 1) * 255).astype(np.uint8)
                Image.fromarray(arr).save(syn / name, **({"quality": 95} if kind == "jpg" else {}))
            rows.append((name, im.label))
        with open(syn / "metadata.csv", "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows([("path", "label"), *rows])
        (root / "policy.yaml").write_text(POLICY)
        assert audit_cli.main(["check", str(syn), "--real", str(root / "p" / "train"), "--policy",
                               str(root / "policy.yaml"), "--out", str(root / "audit")]) == 0
        chain = cc.make_test_chain(root / "chain")
        assert release_cli.main(["bundle", str(syn), "--audit", str(root / "audit" / "audit.json"), "--out",
                                 str(root / "bundle"), "--policy", str(root / "policy.yaml"), "--c2pa-chain",
                                 str(chain.chain), "--c2pa-key", str(chain.key)]) == 0
    return root


@pytest.fixture(scope="module")
def chain(case):
    return cc.TestChain(case / "chain" / "c2pa-test-chain.pem", case / "chain" / "c2pa-test-key.pem",
                        case / "chain" / "c2pa-test-root.pem")


def _verify(capsys, bundle, *extra):
    code = release_cli.main(["verify", str(bundle), *map(str, extra)])
    out, err = capsys.readouterr()
    return code, out, err


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _copy(case, tmp_path) -> Path:
    shutil.copytree(case / "bundle", tmp_path / "b", symlinks=True)
    return tmp_path / "b"


# ------------------------------------------------------------------ what a bundle carries


def test_every_released_file_carries_credentials_that_verify_with_the_root(case, chain, capsys):
    bundle = case / "bundle"
    manifest = _manifest(bundle)
    audit = json.loads((case / "audit" / "audit.json").read_text())
    assert len(manifest["images"]) == len(audit["released"]) >= 8
    kinds = {}
    for e in manifest["images"]:
        path, cred = bundle / e["path"], e["credentials"]
        fmt = path.suffix.lstrip(".")
        kinds[fmt] = kinds.get(fmt, 0) + 1
        data = path.read_bytes()
        if fmt in ("png", "jpg"):
            assert "sidecar" not in cred and cc.strip_manifest(data, cred["format"]) != data
            assert hashlib.sha256(cc.strip_manifest(data, cred["format"])).hexdigest() == cred["source_sha256"]
            found = cc.read_credentials(data, cred["format"], trust_anchors=chain.anchors)
        else:  # DICOM and TIFF: a detached .c2pa next to the file, the file as audited
            assert cred["sidecar"] == e["path"].rsplit(".", 1)[0] + ".c2pa" and (bundle / cred["sidecar"]).is_file()
            assert hashlib.sha256(data).hexdigest() == cred["source_sha256"]
            found = cc.read_credentials(data, cred["format"], detached=bundle / cred["sidecar"],
                                        trust_anchors=chain.anchors)
        assert found.valid and found.state == "Trusted", (e["path"], found.problems)
        claim = found.assertion
        assert claim["audited_sha256"] == e["audited_sha256"] and claim["verdict"] == "pass"
        assert claim["audit_sha256"] == manifest["audit"]["sha256"]
        assert any(a["digitalSourceType"].endswith("trainedAlgorithmicMedia") for a in found.actions)
    assert kinds.keys() >= {"png", "jpg", "dcm", "tif"}
    # the pixels are still the audited ones (PNG: the file without its manifest is the stripped original)
    png = next(e for e in manifest["images"] if e["path"].endswith(".png"))
    shipped = np.asarray(Image.open(bundle / png["path"]))
    assert np.array_equal(shipped, np.asarray(Image.open(case / "syn" / png["path"].removeprefix("images/"))))
    info = manifest["content_credentials"]
    assert info["signer_subject"] == "synthgate test release signer" and info["signer_not_after"]
    code, out, err = _verify(capsys, bundle, "--c2pa-trust", chain.anchors)
    assert code == 0, err
    assert f"ok: content credentials of {len(manifest['images'])} image file(s)" in out and "intact" in out
    sheet = (bundle / "DATASHEET.md").read_text()
    assert "Content credentials (C2PA)" in sheet and "--c2pa-trust ROOT.pem" in sheet
    # the images folder is still an image set (the sidecars are not images): labels and all
    from synthgate.imageset import ImageSet

    shipped_set = ImageSet(bundle / "images", cache=None)
    assert len(shipped_set) == len(manifest["images"]) and all(r.label is not None for r in shipped_set)


def test_without_a_trust_root_credentials_are_said_not_to_be_checked(case, capsys):
    code, out, err = _verify(capsys, case / "bundle")
    assert code == 0, err  # the Ed25519 trust decides the exit; the credentials are named as unchecked
    assert "note: content credentials: NOT checked (give --c2pa-trust ROOT.pem" in out


def test_another_hospital_s_root_does_not_validate_them(case, capsys, tmp_path):
    other = cc.make_test_chain(tmp_path / "other")
    code, _, err = _verify(capsys, case / "bundle", "--c2pa-trust", other.anchors)
    assert code == 1 and "content credentials do not hold" in err and "not Trusted" in err


# ------------------------------------------------------------------ tampering


def _flip_idat(data: bytes) -> bytes:
    pos = len(PNG_SIGNATURE)
    for ctype, _, raw in _png_chunks(data):
        if ctype == b"IDAT":
            at = pos + 8 + (len(raw) - 12) // 2  # inside the payload, not the length, type or CRC
            out = bytearray(data)
            out[at] ^= 0x01
            return bytes(out)
        pos += len(raw)
    raise AssertionError("no IDAT")


def _tamper(bundle: Path, how: str) -> str:
    manifest = _manifest(bundle)
    pick = {"pixels": ".png", "manifest": ".png", "jpeg": ".jpg", "sidecar": ".dcm", "dicom": ".dcm"}[how]
    entry = next(e for e in manifest["images"] if e["path"].endswith(pick))
    path = bundle / entry["path"]
    data = path.read_bytes()
    if how == "pixels":
        path.write_bytes(_flip_idat(data))
    elif how in ("manifest", "jpeg"):
        old = manifest["audit"]["sha256"].encode()
        assert data.count(old) == 1  # the assertion sits in clear CBOR inside the embedded manifest
        path.write_bytes(data.replace(old, b"0" * 64))
    elif how == "sidecar":
        side = bundle / entry["credentials"]["sidecar"]
        store = side.read_bytes()
        side.write_bytes(store.replace(entry["audited_sha256"].encode(), b"f" * 64))
    else:  # a DICOM pixel byte
        out = bytearray(data)
        out[-10] ^= 0xFF
        path.write_bytes(bytes(out))
    return entry["path"]


@pytest.mark.parametrize("how", ["pixels", "manifest", "jpeg", "sidecar", "dicom"])
def test_tampering_with_an_image_or_its_credentials_fails_verify_naming_it(case, chain, capsys, tmp_path, how):
    bundle = _copy(case, tmp_path)
    name = _tamper(bundle, how)
    code, _, err = _verify(capsys, bundle, "--c2pa-trust", chain.anchors)
    assert code == 1 and name.rsplit(".", 1)[0] in err, err


def _rehashed(bundle: Path) -> dict:
    """The manifest as an attacker with write access would recompute it (every hash), before any signature."""
    from synthgate.fsutil import sha256_file

    manifest = _manifest(bundle)
    manifest["files"] = {k: sha256_file(bundle / k) for k in manifest["files"]}
    for e in manifest["images"]:
        e["shipped_sha256"] = manifest["files"][e["path"]]
        data = (bundle / e["path"]).read_bytes()
        cred = e["credentials"]
        unsigned = data if "sidecar" in cred else cc.strip_manifest(data, cred["format"])
        cred["source_sha256"] = hashlib.sha256(unsigned).hexdigest()
    return manifest


@pytest.mark.parametrize("how", ["pixels", "manifest", "sidecar", "dicom"])
def test_the_credentials_alone_catch_a_change_even_when_every_hash_is_recomputed(case, chain, tmp_path, how):
    bundle = _copy(case, tmp_path)
    name = _tamper(bundle, how)
    ok, bad = [], []
    note = rc.verify_images(bundle, _rehashed(bundle), chain.anchors.read_bytes(), ok, bad)
    assert note is None and not ok
    assert len(bad) == 1 and bad[0].startswith(f"{name}: content credentials do not hold"), bad


def test_credentials_replaced_with_another_chain_are_not_trusted(case, chain, tmp_path):
    bundle = _copy(case, tmp_path)
    entry = next(e for e in _manifest(bundle)["images"] if e["path"].endswith(".png"))
    path = bundle / entry["path"]
    other = cc.make_test_chain(tmp_path / "attacker")
    claim = cc.read_credentials(path, "png", trust_anchors=chain.anchors).assertion
    resigned = cc.sign_image(cc.strip_manifest(path.read_bytes(), "png"), "png", chain=other.chain, key=other.key,
                             assertion={k: v for k, v in claim.items() if k != "source_sha256"})
    path.write_bytes(resigned)
    ok, bad = [], []
    rc.verify_images(bundle, _rehashed(bundle), chain.anchors.read_bytes(), ok, bad)
    assert len(bad) == 1 and "validation state is Valid, not Trusted" in bad[0]


def test_a_missing_sidecar_is_named(case, chain, capsys, tmp_path):
    bundle = _copy(case, tmp_path)
    entry = next(e for e in _manifest(bundle)["images"] if "sidecar" in e["credentials"])
    (bundle / entry["credentials"]["sidecar"]).unlink()
    code, _, err = _verify(capsys, bundle, "--c2pa-trust", chain.anchors)
    assert code == 1 and f"{entry['credentials']['sidecar']}: missing" in err


# ------------------------------------------------------------------ options and refusals


def test_chain_and_key_come_together_and_from_the_environment(case, chain, capsys, tmp_path, monkeypatch):
    argv = ["bundle", str(case / "syn"), "--audit", str(case / "audit" / "audit.json"), "--policy",
            str(case / "policy.yaml")]
    code = release_cli.main([*argv, "--out", str(tmp_path / "b1"), "--c2pa-chain", str(chain.chain)])
    one_line_error((code, *capsys.readouterr()), "--c2pa-chain", "--c2pa-key")
    assert not (tmp_path / "b1").exists()
    code = release_cli.main([*argv, "--out", str(tmp_path / "b1"), "--c2pa-chain", str(chain.chain), "--c2pa-key",
                             str(chain.anchors)])  # not the chain's key
    one_line_error((code, *capsys.readouterr()), str(chain.anchors))
    monkeypatch.setenv("SYNTHGATE_C2PA_CHAIN", str(chain.chain))
    monkeypatch.setenv("SYNTHGATE_C2PA_KEY", str(chain.key))
    assert release_cli.main([*argv, "--out", str(tmp_path / "b2")]) == 0
    assert "with C2PA content credentials" in capsys.readouterr().out
    assert _verify(capsys, tmp_path / "b2", "--c2pa-trust", chain.anchors)[0] == 0


def test_trust_roots_from_inside_the_bundle_are_refused(case, capsys, tmp_path):
    bundle = _copy(case, tmp_path)
    shutil.copy(case / "chain" / "c2pa-test-root.pem", bundle / "root.pem")
    one_line_error(_verify(capsys, bundle, "--c2pa-trust", bundle / "root.pem"), "inside the bundle")
    (tmp_path / "notpem").write_text("hello")
    one_line_error(_verify(capsys, bundle, "--c2pa-trust", tmp_path / "notpem"), "no PEM certificate")


def test_asking_for_credentials_of_a_bundle_without_them_is_a_problem(case, chain, capsys, tmp_path):
    assert release_cli.main(["bundle", str(case / "syn"), "--audit", str(case / "audit" / "audit.json"), "--out",
                             str(tmp_path / "plain"), "--policy", str(case / "policy.yaml")]) == 0
    capsys.readouterr()
    code, _, err = _verify(capsys, tmp_path / "plain", "--c2pa-trust", chain.anchors)
    assert code == 1 and "carries none" in err
    code, out, _ = _verify(capsys, tmp_path / "plain")
    assert code == 0 and "content credentials: none in this bundle" in out


def test_files_that_would_share_a_sidecar_are_refused():
    from synthgate.errors import UsageError

    rc.check_sidecars(["a.png", "a.dcm", "b.dcm"], {"a.png": "png", "a.dcm": "dicom", "b.dcm": "dicom"})
    with pytest.raises(UsageError, match="would share the detached C2PA manifest a.c2pa"):
        rc.check_sidecars(["a.dcm", "a.tif"], {"a.dcm": "dicom", "a.tif": "tiff"})
