"""Release bundles: only what passed, pixels as audited, signed, documented; every refusal.

Forgeries, leaks and trust (edited or re-signed audits, swapped images, real names) are in test_release_trust.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from audit import cli as audit_cli
from release import cli as release_cli
from synthgate.phantoms import generate, write_phantoms
from conftest import save_unit_png


@pytest.fixture(autouse=True)
def _hospital_key(hospital_key, monkeypatch):
    monkeypatch.setenv("SYNTHGATE_KEY", str(hospital_key))  # the key the module's audits were signed with


@pytest.fixture(scope="module")
def passed(tmp_path_factory, hospital_key):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHGATE_KEY", str(hospital_key))
        return _audited(tmp_path_factory.mktemp("release"))


def _audited(root):
    write_phantoms(root / "p", patients=20, images_per_patient=4, size=32, seed=41)
    novel, _ = generate(patients=6, images_per_patient=2, size=32, seed=42)
    (root / "syn").mkdir()
    with open(root / "syn" / "metadata.csv", "w") as fh:
        fh.write("path,label\n")
        for i, im in enumerate(novel):
            save_unit_png(root / "syn" / f"s{i:02d}.png", im.pixels)
            fh.write(f"s{i:02d}.png,{im.label}\n")
    code = audit_cli.main(["check", str(root / "syn"), "--real", str(root / "p" / "train"), "--policy", "research",
                           "--checks", "copy_detection", "--out", str(root / "audit_research")])
    assert code == 1  # a partial audit (one check of the policy) is never a pass
    # a policy that drops whatever is flagged, so the bundle ships only images that passed
    (root / "policy.yaml").write_text("name: release-test\nmax_drop_fraction: 0.5\n"
                                      "checks:\n  copy_detection: {action: drop}\n  dicom_phi: {action: block}\n")
    code = audit_cli.main(["check", str(root / "syn"), "--real", str(root / "p" / "train"), "--holdout",
                           str(root / "p" / "holdout"), "--policy", str(root / "policy.yaml"), "--out",
                           str(root / "audit")])
    assert code == 0
    return root


def bundle(capsys, root, out, *extra, synthetic=None, audit="audit", policy="policy.yaml"):
    code = release_cli.main(["bundle", str(synthetic or root / "syn"), "--audit", str(root / audit / "audit.json"),
                             "--out", str(out), *(["--policy", str(root / policy)] if policy else []), *extra])
    return code, capsys.readouterr()


def test_bundle_ships_released_images_signed_and_documented(passed, capsys, tmp_path):
    code, _ = bundle(capsys, passed, tmp_path / "b")
    assert code == 0
    audit = json.loads((passed / "audit" / "audit.json").read_text())
    shipped = sorted(p.name for p in (tmp_path / "b" / "images").glob("*.png"))
    assert shipped == sorted(audit["released"]) and len(shipped) >= 10
    for name in shipped:  # these PNGs carry no ancillary chunk, so stripping leaves their bytes as audited
        assert (tmp_path / "b" / "images" / name).read_bytes() == (passed / "syn" / name).read_bytes()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"audit.json", "report.html", "policy.yaml", "MODEL_CARD.md", "DATASHEET.md",
                                      "images/metadata.csv"}
    assert manifest["policy"]["name"] == "release-test" and manifest["signature"]["algorithm"] == "Ed25519"
    assert {e["path"]: e["audited_sha256"] for e in manifest["images"]} == {
        f"images/{k}": v for k, v in audit["released_sha256"].items()}
    bundled_audit = json.loads((tmp_path / "b" / "audit.json").read_text())
    assert bundled_audit["edition"]["kind"] == "shareable" and bundled_audit["command"] is None
    assert bundled_audit["edition"]["derived_from"]["audit_sha256"] == manifest["audit"]["internal"]["sha256"]
    marker = json.loads((tmp_path / "b" / ".synthgate-output.json").read_text())
    assert marker["kind"] == "release bundle"
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers")
    for section in ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                    "Quantitative analyses", "Ethical considerations", "Caveats and recommendations"):
        assert f"## {section}" in card
    sheet = (tmp_path / "b" / "DATASHEET.md").read_text()
    for section in ("Motivation", "Composition", "Collection process", "Preprocessing", "Uses", "Distribution",
                    "Maintenance", "STANDING Together"):
        assert f"## {section}" in sheet
    assert "MRN" not in card + sheet + (tmp_path / "b" / "report.html").read_text()
    assert not re.search(r"(^|[\s`(])\?($|[\s`×,.)])", card + sheet)  # no placeholder: what was not given is said
    assert "gated by copy detection, DICOM" in card and "membership inference did not run" in card
    assert release_cli.main(["verify", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize("tamper", ["change", "add", "remove", "symlink"])
def test_verify_catches_any_change(passed, capsys, tmp_path, tamper):
    bundle(capsys, passed, tmp_path / "b")
    target = next((tmp_path / "b" / "images").glob("*.png"))
    if tamper == "change":
        target.write_bytes(target.read_bytes() + b"\0")
    elif tamper == "add":
        (tmp_path / "b" / "images" / "extra.png").write_bytes(target.read_bytes())
    elif tamper == "remove":
        target.unlink()
    else:
        target.unlink()
        os.symlink(passed / "syn" / target.name, target)
    assert release_cli.main(["verify", str(tmp_path / "b")]) == 1
    assert target.name in capsys.readouterr().err or tamper == "add"


def _refused(capsys, code_out, message):
    code, (out, err) = code_out
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_refuses_a_failed_audit(passed, capsys, tmp_path):
    shutil.copytree(passed / "syn", tmp_path / "syn")
    shutil.copy(sorted((passed / "p" / "train").glob("*.png"))[0], tmp_path / "syn" / "copy.png")
    with open(tmp_path / "syn" / "metadata.csv", "a") as fh:
        fh.write("copy.png,0\n")
    assert audit_cli.main(["check", str(tmp_path / "syn"), "--real", str(passed / "p" / "train"), "--policy",
                           "strict", "--checks", "copy_detection", "--out", str(tmp_path / "a")]) == 1
    capsys.readouterr()
    code = release_cli.main(["bundle", str(tmp_path / "syn"), "--audit", str(tmp_path / "a" / "audit.json"),
                             "--out", str(tmp_path / "b")])
    assert code == 2 and "nothing may be released" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_refuses_a_partial_audit(passed, capsys, tmp_path):
    _refused(capsys, bundle(capsys, passed, tmp_path / "b", audit="audit_research"), "nothing may be released")


def test_refuses_a_set_changed_after_the_audit(passed, capsys, tmp_path):
    shutil.copytree(passed / "syn", tmp_path / "syn")
    name = json.loads((passed / "audit" / "audit.json").read_text())["released"][0]
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "syn" / name)
    _refused(capsys, bundle(capsys, passed, tmp_path / "b", synthetic=tmp_path / "syn"), "changed after the audit")
    assert not (tmp_path / "b").exists()


def test_refuses_policy_mismatch_and_existing_target(passed, capsys, tmp_path):
    _refused(capsys, bundle(capsys, passed, tmp_path / "b", "--policy", "strict"), "policy mismatch")
    (tmp_path / "b").mkdir()
    _refused(capsys, bundle(capsys, passed, tmp_path / "b"), "already exists")


def test_refuses_symlink_leading_outside(passed, capsys, tmp_path):
    syn = tmp_path / "syn"
    shutil.copytree(passed / "syn", syn)
    outside = tmp_path / "outside"
    outside.mkdir()
    name = json.loads((passed / "audit" / "audit.json").read_text())["released"][0]
    shutil.move(syn / name, outside / name)
    os.symlink(outside / name, syn / name)  # same bytes, so the digest still matches
    _refused(capsys, bundle(capsys, passed, tmp_path / "b", synthetic=syn), "outside the synthetic set")
    assert not (tmp_path / "b").exists()


def test_interrupted_bundle_leaves_nothing(passed, capsys, tmp_path, monkeypatch):
    import release.bundle as rb

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rb, "datasheet", boom, raising=False)
    monkeypatch.setattr("release.documents.datasheet", boom)
    code, _ = bundle(capsys, passed, tmp_path / "b")
    assert code == 130
    assert list(tmp_path.iterdir()) == []
