"""A bundle a steward can trust: every forgery, leak and refusal of the trust issue, one test each.

The audits here are made once per module and signed with one hospital key (``SYNTHGATE_KEY``); forgeries edit
copies of them.  An attacker is anyone with write access to the files but not to the hospital's private key.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from audit import cli as audit_cli
from conftest import one_line_error, only_policy, save_unit_png
from release import cli as release_cli
from synthgate import signing
from synthgate.imageset import ImageSet
from synthgate.phantoms import generate, write_phantoms

LABELS = ["plain", "a,b", 'say "hi"', "two\nlines"]  # each must survive metadata.csv
POLICY = ("name: release-trust\nmax_drop_fraction: 0.5\nchecks:\n  copy_detection: {action: drop}\n"
          "  dicom_phi: {action: block, settings: {allow_text_metadata: true}}\n")


@pytest.fixture(autouse=True)
def _hospital_key(hospital_key, monkeypatch):
    monkeypatch.setenv("SYNTHGATE_KEY", str(hospital_key))


def _audit(*args) -> int:
    return audit_cli.main(["check", *map(str, args)])


@pytest.fixture(scope="module")
def case(tmp_path_factory, hospital_key):
    """A real set with patient IDs, a synthetic set with one copy of a training image (dropped), odd labels and a
    text chunk; a passing audit and its bundle; a partial, a research and a copy-detection-free audit."""
    root = tmp_path_factory.mktemp("trust")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHGATE_KEY", str(hospital_key))
        write_phantoms(root / "p", patients=8, images_per_patient=3, size=32, seed=41)
        novel, _ = generate(patients=4, images_per_patient=2, size=32, seed=42)
        syn = root / "syn"
        rows = []
        for i, im in enumerate(novel):
            save_unit_png(syn / f"s{i:02d}.png", im.pixels)
            rows.append((f"s{i:02d}.png", LABELS[i % len(LABELS)]))
        info = PngImagePlugin.PngInfo()  # allowed by the policy, but a bundle ships pixels and provenance only
        info.add_text("Comment", "acquired on the night shift")
        Image.open(syn / "s01.png").save(syn / "s01.png", pnginfo=info)
        src = sorted((root / "p" / "train").glob("*.png"))[3]
        shutil.copy(src, syn / "zz_copy.png")  # a training image, byte for byte: copy detection drops it
        rows.append(("zz_copy.png", "plain"))
        with open(syn / "metadata.csv", "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows([("path", "label"), *rows])
        (root / "policy.yaml").write_text(POLICY)
        real, hold = root / "p" / "train", root / "p" / "holdout"
        assert _audit(syn, "--real", real, "--holdout", hold, "--policy", root / "policy.yaml",
                      "--out", root / "audit") == 0
        assert _audit(syn, "--real", real, "--policy", root / "policy.yaml", "--checks", "copy_detection",
                      "--out", root / "partial") == 1
        assert _audit(syn, "--policy", "research", "--out", root / "research") == 0  # six checks skipped: a "pass"
        assert _audit(syn, "--real", real, "--policy", only_policy("dicom_phi", allow_text_metadata=True),
                      "--out", root / "nocopy") == 0
        assert release_cli.main(["bundle", str(syn), "--audit", str(root / "audit" / "audit.json"), "--out",
                                 str(root / "bundle"), "--policy", str(root / "policy.yaml")]) == 0
    return root


def _bundle(capsys, case, out, audit=None, *extra, synthetic=None, policy="policy"):
    argv = ["bundle", str(synthetic or case / "syn"), "--audit", str(audit or case / "audit" / "audit.json"),
            "--out", str(out)]
    if policy == "policy":
        argv += ["--policy", str(case / "policy.yaml")]
    elif policy is not None:
        argv += ["--policy", policy]
    code = release_cli.main([*argv, *map(str, extra)])
    out_, err = capsys.readouterr()
    return code, out_, err


def _verify(capsys, bundle, *extra):
    code = release_cli.main(["verify", str(bundle), *map(str, extra)])
    out, err = capsys.readouterr()
    return code, out, err


def _doc(case, name="audit") -> dict:
    return json.loads((case / name / "audit.json").read_text())


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


def _resign(doc: dict, key=None) -> dict:
    return signing.sign_document(doc, key or signing.load_signing_key())


# ------------------------------------------------------------------ forged audits


def _forge_verdict(case):
    doc = _doc(case, "partial")  # a partial audit, edited into a pass that releases everything
    doc["verdict"], doc["verdict_reasons"] = "pass", []
    doc["released"] = sorted(set(doc["released"]) | set(_doc(case)["released"]))
    return doc


def _forge_control(case):
    doc = _doc(case)
    controls = doc["control"]["checks"]["copy_detection"]
    controls[0]["passed"] = False  # the evidence says a control failed ...
    doc["control"]["passed"] = True  # ... and the summary is edited to say they held
    return doc


def _forge_released(case):
    doc = _doc(case)  # the dropped training copy is added to what is released
    doc["released"].append("zz_copy.png")
    doc["released_sha256"]["zz_copy.png"] = ImageSet(case / "syn", cache=None).records[-1].sha256
    return doc


def _forge_flagged(case):
    doc = _forge_released(case)  # ... and the findings against it removed
    for c in doc["checks"]:
        c["flagged"] = [f for f in c["flagged"] if f["synthetic"] != "zz_copy.png"]
    doc["dropped"], doc["dropped_evidence"] = [], {}
    return doc


@pytest.mark.parametrize("forge", [_forge_verdict, _forge_control, _forge_released, _forge_flagged],
                         ids=["verdict", "control.passed", "released", "flagged"])
def test_an_edited_audit_is_refused(case, capsys, tmp_path, forge):
    forged = _write(tmp_path / "audit.json", forge(case))
    one_line_error(_bundle(capsys, case, tmp_path / "b", forged), "signature does not verify")
    assert not (tmp_path / "b").exists()


def test_an_unsigned_audit_is_refused(case, capsys, tmp_path):
    doc = _doc(case)
    del doc["signature"]
    one_line_error(_bundle(capsys, case, tmp_path / "b", _write(tmp_path / "audit.json", doc)), "is not signed")


def test_an_audit_resigned_with_another_key_is_refused_unless_trusted(case, capsys, tmp_path):
    other = signing.write_new_key(tmp_path / "other.pem")
    forged = _write(tmp_path / "forged.json", _resign(_forge_flagged(case), other))
    one_line_error(_bundle(capsys, case, tmp_path / "b", forged), "not this installation's key", "--trust-key")
    # the same key, trusted by name (another audit machine of the hospital): an unedited audit it signed bundles
    (tmp_path / "other.pub").write_text(other.public.pem())
    honest = _write(tmp_path / "honest.json", _resign(_doc(case), other))
    code, out, err = _bundle(capsys, case, tmp_path / "b", honest, "--trust-key", tmp_path / "other.pub")
    assert code == 0, err


# ------------------------------------------------------------------ refusals


def test_a_partial_audit_is_refused(case, capsys, tmp_path):
    one_line_error(_bundle(capsys, case, tmp_path / "b", case / "partial" / "audit.json"), "partial", "--checks")


@pytest.mark.parametrize("policy", [None, "research"])
def test_a_research_audit_is_refused(case, capsys, tmp_path, policy):
    assert _doc(case, "research")["verdict"] == "pass"  # every check skipped: no evidence at all
    one_line_error(_bundle(capsys, case, tmp_path / "b", case / "research" / "audit.json", policy=policy),
                   "research")


def test_a_policy_mismatch_or_param_override_is_refused(case, capsys, tmp_path):
    one_line_error(_bundle(capsys, case, tmp_path / "b", policy=None), "policy mismatch", "'default'")
    doc = _doc(case)
    doc["policy"]["overrides"] = {"copy_detection": {"threshold": 0.01}}
    one_line_error(_bundle(capsys, case, tmp_path / "b", _write(tmp_path / "a.json", _resign(doc))), "--param")


def test_a_custom_policy_under_a_built_in_name_is_refused_and_custom_ones_are_labelled(case, capsys, tmp_path):
    """Red team: a file calling itself `default` that ran only copy detection and DICOM PHI passed, was bundled and
    verified as "policy default"; a recipient could not tell it from the built-in."""
    from policies.loader import builtin_text

    fake = tmp_path / "weak.yaml"
    fake.write_text(POLICY.replace("name: release-trust", "name: Default"))
    code = audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--holdout",
                           str(case / "p" / "holdout"), "--policy", str(fake), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "the name of a built-in policy" in err and not (tmp_path / "a").exists()
    assert audit_cli.main(["validate-policy", str(fake)]) == 2
    capsys.readouterr()
    same = tmp_path / "default-copy.yaml"  # the built-in's very text from a file is the built-in
    same.write_text(builtin_text("default"))
    assert audit_cli.main(["validate-policy", str(same)]) == 0
    capsys.readouterr()
    # an audit recorded before the refusal existed (re-signed by the hospital's own key) is not bundled
    doc = _doc(case)
    doc["policy"]["name"] = "default"
    one_line_error(_bundle(capsys, case, tmp_path / "b", _write(tmp_path / "a.json", _resign(doc))),
                   "calling itself 'default'")
    # every shareable document says a custom policy is custom
    code, out, _ = _verify(capsys, case / "bundle")
    assert code == 0 and "custom policy 'release-trust'" in out and "not one of synthgate's built-in" in out
    for name in ("report.html", "MODEL_CARD.md", "DATASHEET.md"):
        assert "custom policy" in (case / "bundle" / name).read_text(), name


def test_a_generator_manifest_is_bound_to_the_audit_and_never_chooses_the_ledger_key(case, capsys, tmp_path):
    """Red team: a manifest.json written after the audit (it is a sidecar, outside the image digest) put a made-up
    model, DP block and training-set digest into the signed bundle and filed the release under that digest."""
    syn = tmp_path / "syn"
    shutil.copytree(case / "syn", syn)
    claim = {"model": {"path": None, "sha256": "0" * 64, "dp": {"epsilon": 1.0}},
             "training_set": {"path": None, "sha256": "1" * 64}}
    (syn / "manifest.json").write_text(json.dumps(claim))
    # the case's audit saw no manifest: one that appeared since is refused
    one_line_error(_bundle(capsys, case, tmp_path / "b0", synthetic=syn), "manifest.json appeared after the audit")
    out = tmp_path / "a"
    assert _audit(syn, "--real", case / "p" / "train", "--holdout", case / "p" / "holdout", "--policy",
                  case / "policy.yaml", "--out", out) == 0
    capsys.readouterr()
    ledger = tmp_path / "ledger.jsonl"
    code, _, err = _bundle(capsys, case, tmp_path / "b1", out / "audit.json", "--ledger", ledger, synthetic=syn)
    assert code == 0, err
    entry = json.loads(ledger.read_text().splitlines()[-1])
    real = json.loads((out / "audit.json").read_text())["inputs"]["real"]["sha256"]
    assert entry["training_set"]["sha256"] == real != "1" * 64  # the audited set, not the claim
    (syn / "manifest.json").write_text(json.dumps(claim | {"sampler": {"name": "ddim"}}))
    one_line_error(_bundle(capsys, case, tmp_path / "b2", out / "audit.json", synthetic=syn),
                   "manifest.json changed after the audit")
    (syn / "manifest.json").unlink()
    one_line_error(_bundle(capsys, case, tmp_path / "b3", out / "audit.json", synthetic=syn),
                   "manifest.json was removed after the audit")


def test_an_audit_without_copy_detection_evidence_is_refused(case, capsys, tmp_path):
    policy = _doc(case, "nocopy")["policy"]["source"]  # the one-check policy file the audit applied
    one_line_error(_bundle(capsys, case, tmp_path / "b", case / "nocopy" / "audit.json", policy=policy),
                   "no copy-detection evidence")


@pytest.mark.parametrize("change", ["real changed", "holdout missing"])
def test_inputs_changed_or_missing_since_the_audit_are_refused(case, capsys, tmp_path, change):
    doc = _doc(case)
    for role in ("real", "holdout"):  # the audit as if it had been made on copies this test may change
        shutil.copytree(doc["inputs"][role]["path"], tmp_path / role)
        doc["inputs"][role]["path"] = str(tmp_path / role)
    audit = _write(tmp_path / "a.json", _resign(doc))
    if change == "real changed":
        victim = sorted((tmp_path / "real").glob("*.png"))[0]
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(victim)
        one_line_error(_bundle(capsys, case, tmp_path / "b", audit), "real set changed after the audit")
    else:
        shutil.rmtree(tmp_path / "holdout")
        one_line_error(_bundle(capsys, case, tmp_path / "b", audit), "holdout set is missing", str(tmp_path / "holdout"))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("where", ["inside synthetic", "synthetic itself", "inside real", "contains audit"])
def test_out_overlapping_an_input_is_refused_before_any_work(case, capsys, tmp_path, where):
    out = {"inside synthetic": case / "syn" / "bundle", "synthetic itself": case / "syn",
           "inside real": case / "p" / "train" / "b", "contains audit": case / "audit" / ".."}[where]
    before = {p: p.stat().st_mtime_ns for p in (case / "syn", case / "p" / "train", case / "audit")}
    one_line_error(_bundle(capsys, case, out), "--out")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not (case / "syn" / "bundle").exists() and not (case / "p" / "train" / "b").exists()


@pytest.mark.parametrize("content", ["[1, 2]", '{"schema_version": 1}', "no json", "inputs-without-synthetic",
                                     "verdict-not-a-string"])
def test_a_malformed_audit_is_exit_2_never_3(case, capsys, tmp_path, content):
    doc = _doc(case)
    if content == "inputs-without-synthetic":
        del doc["inputs"]["synthetic"]
        content = json.dumps(doc)
    elif content == "verdict-not-a-string":
        doc["verdict"] = ["pass"]
        content = json.dumps(doc)
    (tmp_path / "a.json").write_text(content)
    one_line_error(_bundle(capsys, case, tmp_path / "b", tmp_path / "a.json"), str(tmp_path / "a.json"))


# ------------------------------------------------------------------ what a bundle holds


def test_metadata_csv_round_trips_odd_labels_through_inspect(case, capsys):
    from synthgate import cli

    images = case / "bundle" / "images"
    shipped = ImageSet(images, cache=None)
    original = {r.key: r.label for r in ImageSet(case / "syn", cache=None)}
    assert {r.key: r.label for r in shipped} == {k: original[k] for k in shipped.keys}
    assert set(LABELS) <= {r.label for r in shipped}
    capsys.readouterr()
    assert cli.main(["inspect", str(images), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_images_ship_without_ancillary_metadata_and_with_their_pixels(case):
    manifest = json.loads((case / "bundle" / "manifest.json").read_text())
    entry = next(e for e in manifest["images"] if e["path"] == "images/s01.png")
    assert entry["audited_sha256"] != entry["shipped_sha256"]  # the text chunk is gone
    shipped, audited = Image.open(case / "bundle" / "images" / "s01.png"), Image.open(case / "syn" / "s01.png")
    assert "Comment" in audited.info and "Comment" not in shipped.info
    assert np.array_equal(np.asarray(shipped), np.asarray(audited))


def _needles(case) -> set[str]:
    """Every real file name (basename and relative path), patient ID and absolute real path."""
    out = set()
    for name in ("train", "holdout"):
        root = case / "p" / name
        out |= {str(root), str(root.resolve())}
        for r in ImageSet(root, cache=None):
            out |= {r.key, r.path, r.path.rsplit("/", 1)[-1], r.patient_id}
    return {n for n in out if n}


def test_no_real_name_patient_id_or_path_in_any_byte_of_the_bundle(case):
    needles = _needles(case)
    internal = (case / "audit" / "audit.json").read_text()
    assert sum(n in internal for n in needles) >= 5  # the internal audit holds them: the test can fail
    files = [p for p in (case / "bundle").rglob("*") if p.is_file()] + [case / "audit" / "report.html"]
    assert len(files) >= 10
    for f in files:
        data = f.read_bytes()
        found = sorted(n for n in needles if n.encode() in data)
        assert not found, (f, found[:5])


def test_shareable_hides_the_policy_file_path():
    from audit.shareable import shareable

    doc = {"inputs": {"synthetic": {"path": "/h/syn"}}, "policy": {"name": "p", "source": "/h/mrn123/policy.yaml"},
           "checks": [], "released": [], "notes": ["applied /h/mrn123/policy.yaml"]}
    assert "/h/mrn123" not in json.dumps(shareable(doc))


# ------------------------------------------------------------------ verify


def test_verify_intact_only_against_a_trusted_key(case, capsys, tmp_path):
    bundle = case / "bundle"
    code, out, err = _verify(capsys, bundle)
    assert code == 0 and "intact: signed by this installation's key" in out, err
    fp = json.loads((bundle / "manifest.json").read_text())["signature"]["fingerprint"]
    assert release_cli.main(["key", "--export", str(tmp_path / "pub.pem")]) == 0
    shown = capsys.readouterr().out
    assert f"fingerprint: {fp}" in shown and "PRIVATE" not in shown + (tmp_path / "pub.pem").read_text()
    assert _verify(capsys, bundle, "--key", tmp_path / "pub.pem")[0] == 0
    # another installation (its own key) that has not been told whose bundle this is
    signing.write_new_key(tmp_path / "elsewhere.pem")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHGATE_KEY", str(tmp_path / "elsewhere.pem"))
        code, out, err = _verify(capsys, bundle)
        assert code == 1 and "self-consistent, NOT verified against a trusted key" in err and "--fingerprint" in err
        assert "ok: manifest.json signature" in out
        assert _verify(capsys, bundle, "--fingerprint", fp)[0] == 0
        code, _, err = _verify(capsys, bundle, "--fingerprint", "ab" * 32)
        assert code == 1 and "NOT by the key you named" in err


def _copy_bundle(case, tmp_path) -> Path:
    shutil.copytree(case / "bundle", tmp_path / "b", symlinks=True)
    return tmp_path / "b"


def _rehash(bundle: Path, manifest: dict) -> dict:
    from synthgate.fsutil import sha256_file

    manifest["files"] = {k: sha256_file(bundle / k) for k in manifest["files"]}
    for e in manifest["images"]:
        e["shipped_sha256"] = manifest["files"][e["path"]]
    return manifest


@pytest.mark.parametrize("resign", [False, True], ids=["rehashed", "rehashed-and-resigned"])
def test_verify_catches_a_training_image_swapped_in(case, capsys, tmp_path, resign):
    b = _copy_bundle(case, tmp_path)
    hospital = json.loads((b / "manifest.json").read_text())["signature"]["fingerprint"]
    shutil.copy(sorted((case / "p" / "train").glob("*.png"))[0], b / "images" / "s00.png")
    attacker = signing.SigningKey.generate()
    if resign:  # everything re-signed with the attacker's key: self-consistent, but whose?
        _write(b / "audit.json", _resign(json.loads((b / "audit.json").read_text()), attacker))
    manifest = _rehash(b, json.loads((b / "manifest.json").read_text()))
    manifest["audit"]["sha256"] = manifest["files"]["audit.json"]
    _write(b / "manifest.json", _resign(manifest, attacker) if resign else manifest)
    code, out, err = _verify(capsys, b)
    assert code == 1 and "intact" not in out
    if resign:
        assert "self-consistent, NOT verified against a trusted key" in err and attacker.fingerprint in err
        code, out, err = _verify(capsys, b, "--fingerprint", hospital)  # as the hospital publishes it
        assert code == 1 and "NOT by the key you named" in err
    else:
        assert "manifest.json's signature does not verify" in err and "not as released" in err


def test_verify_catches_a_flipped_verdict_even_when_everything_is_resigned(case, capsys, tmp_path):
    b = _copy_bundle(case, tmp_path)
    attacker = signing.SigningKey.generate()
    doc = json.loads((b / "audit.json").read_text())
    doc["released"].append("zz_copy.png")  # the training copy, released by an edited audit
    _write(b / "audit.json", _resign(doc, attacker))
    shutil.copy(case / "syn" / "zz_copy.png", b / "images" / "zz_copy.png")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"]["images/zz_copy.png"] = ""
    manifest["images"].append({"path": "images/zz_copy.png", "keys": ["zz_copy.png"], "audited_sha256": "",
                               "shipped_sha256": ""})
    manifest = _rehash(b, manifest)
    manifest["audit"]["sha256"] = manifest["files"]["audit.json"]
    _write(b / "manifest.json", _resign(manifest, attacker))
    code, out, err = _verify(capsys, b)
    assert code == 1 and "zz_copy.png" in err  # flagged, and no audited hash: not self-consistent either
    code, out, err = _verify(capsys, b, "--fingerprint", attacker.fingerprint)  # even trusting the attacker's key
    assert code == 1 and "not as released" in err


def test_verify_of_an_edited_bundle_audit_fails(case, capsys, tmp_path):
    b = _copy_bundle(case, tmp_path)
    doc = json.loads((b / "audit.json").read_text())
    doc["verdict_reasons"] = ["edited"]
    _write(b / "audit.json", doc)
    code, _, err = _verify(capsys, b)
    assert code == 1 and "audit.json: changed" in err and "audit.json's signature does not verify" in err


def test_verify_of_a_folder_that_is_not_a_bundle_is_exit_2(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text("[]")
    one_line_error(_verify(capsys, tmp_path), "not a synthgate bundle")
    one_line_error(_verify(capsys, tmp_path / "nope"), "does not exist")


def test_hospital_style_real_names_never_reach_the_bundle(capsys, tmp_path):
    """Names with spaces, commas, parentheses, quotes, accents and folders, in a folder named after MRNs."""
    import html

    ims, _ = generate(patients=6, images_per_patient=3, size=32, seed=51)
    odd = ["Doe, John 0012345.png", "MRN-4455661_ct.png", "pat (7)/scan.png", "Müller_Anna.png", "x'y\"z.png"]
    real = tmp_path / "Hospital Data (MRN list)" / "train"
    rows = [(odd[i] if i < len(odd) else f"r{i:03d}.png", f"PID {i // 3:04d}", im.label) for i, im in enumerate(ims)]
    for (name, _, _), im in zip(rows, ims):
        save_unit_png(real / name, im.pixels)
    with open(real / "metadata.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "patient_id", "label"), *rows])
    syn = tmp_path / "syn"
    for i, im in enumerate(generate(patients=3, images_per_patient=2, size=32, seed=52)[0]):
        save_unit_png(syn / f"s{i:02d}.png", im.pixels)
    for j, name in enumerate(odd[:4]):  # copies of the oddest names: their names go into the audit's evidence
        shutil.copy(real / name, syn / f"zz{j}.png")
    (tmp_path / "policy.yaml").write_text(POLICY)
    assert _audit(syn, "--real", real, "--policy", tmp_path / "policy.yaml", "--out", tmp_path / "audit") == 0
    assert release_cli.main(["bundle", str(syn), "--audit", str(tmp_path / "audit" / "audit.json"), "--out",
                             str(tmp_path / "b"), "--policy", str(tmp_path / "policy.yaml")]) == 0
    needles = {str(real), str(real.parent)} | {n for name, pid, _ in rows for n in (name, name.split("/")[-1], pid)}
    assert sum(n in (tmp_path / "audit" / "audit.json").read_text() for n in needles) >= 5
    for f in [p for p in (tmp_path / "b").rglob("*") if p.is_file()] + [tmp_path / "audit" / "report.html"]:
        data = f.read_bytes()
        for n in needles:  # as written, JSON-escaped and HTML-escaped
            for form in {n, json.dumps(n)[1:-1], html.escape(n)}:
                assert form.encode() not in data, (f, n)
