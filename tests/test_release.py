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
    for section in HF_SECTIONS:
        assert f"\n## {section}\n" in card, section
    sheet = (tmp_path / "b" / "DATASHEET.md").read_text()
    for section in DATASHEET_SECTIONS:
        assert f"\n## {section}" in sheet, section
    assert "MRN" not in card + sheet + (tmp_path / "b" / "report.html").read_text()
    assert_no_placeholder(card + sheet)
    assert "gated by copy detection, DICOM" in card and "membership inference did not run" in card
    assert release_cli.main(["verify", str(tmp_path / "b")]) == 0


HF_SECTIONS = ("Model details", "Uses", "Bias, risks, and limitations", "Training details", "Evaluation",
               "Environmental impact and compute", "Technical specifications", "Citation", "Model card authors")
DATASHEET_SECTIONS = ("Summary", "Motivation", "Composition", "Collection process", "Preprocessing", "Uses",
                      "Distribution", "Maintenance", "STANDING Together")


def assert_no_placeholder(text: str) -> None:
    """No ``?`` standing for a value, no Python/JSON empty value, no made-up model type."""
    assert not re.search(r"(^|[\s`(|])\?($|[\s`×,.)|])", text), re.search(r".{0,60}\?.{0,20}", text).group(0)
    for word in ("None", "null", "unknown diffusion model", "nan", "{}", "[]"):
        assert not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text), word


def test_a_synthetic_set_named_synthetic_given_relative_bundles(passed, capsys, tmp_path, monkeypatch):
    """Red team: `release bundle synthetic ...` (the README's own spelling) failed: the relative path `synthetic`
    was replaced as a substring everywhere, keys included, and the shareable audit lost inputs.synthetic."""
    shutil.copytree(passed / "syn", tmp_path / "synthetic")
    monkeypatch.chdir(tmp_path)
    code = release_cli.main(["bundle", "synthetic", "--audit", str(passed / "audit" / "audit.json"), "--out", "b",
                             "--policy", str(passed / "policy.yaml")])
    _, err = capsys.readouterr()
    assert code == 0, err
    share = json.loads((tmp_path / "b" / "audit.json").read_text())
    assert share["inputs"]["synthetic"]["path"] == "the synthetic set"
    assert "the synthetic setthetic" not in (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert release_cli.main(["verify", "b"]) == 0


def test_a_card_made_without_the_model_says_what_was_not_given(passed, capsys, tmp_path):
    code, _ = bundle(capsys, passed, tmp_path / "b")
    assert code == 0
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    sheet = (tmp_path / "b" / "DATASHEET.md").read_text()
    assert "model_given_to_audit: false" in card
    assert "The audit was not given the model" in card and "**not** part of this release's evidence" in card
    assert "Training procedure\n- Not given (the model was not given to the audit)." in card
    assert "no differential-privacy guarantee that anyone checked" in card
    assert "Custodian: not given (`release bundle --custodian`)" in sheet
    unknown = sheet.split("What is unknown, stated as unknown:")[1]
    assert "the model that generated the images (not given to the audit)" in unknown
    assert "the custodian (not given: `release bundle --custodian`)" in unknown
    assert "re-identification evidence (not in the policy)" in unknown
    # a check the policy did not hold is named as not run, with what that leaves unknown
    assert "membership inference: **not run** (not in the policy); so nothing shows whether the model" in card
    assert_no_placeholder(card + sheet)


def test_the_custodian_s_statements_reach_both_documents(passed, capsys, tmp_path):
    code, (_, err) = bundle(capsys, passed, tmp_path / "b", "--custodian", "Radiology data office, St Elsewhere",
                            "--licence", "CC-BY-4.0", "--purpose", "teaching chest imaging", "--uses-to-avoid",
                            "commercial products")
    assert code == 0, err
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    sheet = (tmp_path / "b" / "DATASHEET.md").read_text()
    assert "license: cc-by-4.0" in card.split("---")[1]
    assert "**Developed by / data custodian:** Radiology data office, St Elsewhere." in card
    assert "- Teaching chest imaging; within the **custom policy 'release-test'" in card and "commercial products (stated by the custodian)" in card
    assert "Purpose: teaching chest imaging." in sheet and "Uses to avoid: commercial products" in sheet
    assert "Licence and terms of use: CC-BY-4.0." in sheet
    assert "not given (`release bundle --custodian`)" not in card + sheet
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["custodian"]["licence"] == "CC-BY-4.0"
    code, (_, err) = bundle(capsys, passed, tmp_path / "c", "--purpose", "a\x07b")
    assert code == 2 and "control character" in err


def test_datasheet_composition_counts_are_the_bundle_s_metadata_csv(passed, capsys, tmp_path):
    import csv
    from collections import Counter

    assert bundle(capsys, passed, tmp_path / "b")[0] == 0
    with open(tmp_path / "b" / "images" / "metadata.csv", newline="") as fh:
        shipped = Counter(row["label"] for row in csv.DictReader(fh))
    sheet = (tmp_path / "b" / "DATASHEET.md").read_text()
    rows = re.findall(r"^\| label \| (\S+) \| (\d+) \(\d+%\) \| (\d+) \(\d+%\) \|$", sheet, re.M)
    assert {v: int(n) for v, n, _ in rows} == dict(shipped) and sum(shipped.values()) >= 10
    real = Counter(r.label for r in __import__("synthgate.imageset", fromlist=["ImageSet"]).ImageSet(
        passed / "p" / "train", cache=None))
    assert {v: int(n) for v, _, n in rows} == dict(real)  # no model: the real set as audited is the reference
    assert "real set as audited (taken to be the training set)" in sheet


def test_the_placeholder_check_catches_what_the_old_cards_printed():
    for old in ("unknown diffusion model (UNet2DModel), ?×? pixels", "Training: ? steps, seed ?",
                "Digest `?`, ? images", "seed None", "delta: null"):
        with pytest.raises(AssertionError):
            assert_no_placeholder(old)
    assert_no_placeholder("Is it a copy? No: ε = 2.5, training set unknown to synthgate.")


def test_a_bundle_folder_gets_normal_permissions(passed, capsys, tmp_path):
    mask = os.umask(0o022)  # mkdtemp makes 0700 whatever the umask; a bundle is meant to be shared
    try:
        assert bundle(capsys, passed, tmp_path / "b")[0] == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755


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
