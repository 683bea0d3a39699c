"""The whole story through the CLI, on phantoms, PNG and DICOM: phantoms -> train -> sample -> audit -> report -> bundle."""
from __future__ import annotations

import json

import pydicom
import pytest

from audit import cli as audit_cli
from release import cli as release_cli
from synthgate import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--preset", "tiny", "--steps", "30", "--batch-size", "8", "--block-out-channels", "16,32",
        "--resolution", "16", "--quiet"]
POLICY = """name: e2e
max_drop_fraction: 1.0
checks:
  copy_detection: {action: drop, settings: {control_copies: 5, training_duplicates: false}}
  dicom_phi: {action: block}
  fidelity: {required: false, action: warn, on_inconclusive: warn}
"""


@pytest.mark.parametrize("fmt", ["png", "dicom"])
def test_story_through_the_cli(tmp_path, capsys, fmt):
    data, model, syn, out, bundle = (tmp_path / n for n in ("data", "model", "syn", "audit", "bundle"))
    assert cli.main(["phantoms", str(data), "--patients", "8", "--images-per-patient", "3", "--size", "16",
                     "--format", fmt, "--seed", "3"]) == 0
    assert cli.main(["train", str(data / "train"), "--out", str(model), *TINY]) == 0
    info = json.loads((model / "synthgate.json").read_text())
    assert info["training_set"]["n_images"] == 18 and info["steps"] == 30
    assert cli.main(["sample", str(model), "--n", "10", "--out", str(syn), "--steps", "5", "--seed", "2",
                     "--format", fmt, "--quiet"]) == 0
    manifest = json.loads((syn / "manifest.json").read_text())
    assert len(manifest["images"]) == 10 and manifest["model"]["sha256"]
    if fmt == "dicom":
        ds = pydicom.dcmread(next(syn.rglob("*.dcm")))
        assert ds.PatientIdentityRemoved == "YES" and not str(ds.get("PatientName") or "")
    (tmp_path / "policy.yaml").write_text(POLICY)
    capsys.readouterr()
    # the real set and the model come from the synthetic set's manifest
    code = audit_cli.main(["check", str(syn), "--holdout", str(data / "holdout"), "--policy",
                           str(tmp_path / "policy.yaml"), "--out", str(out), "--json"])
    audit = json.loads(capsys.readouterr().out)
    assert code == (0 if audit["verdict"] == "pass" else 1)
    assert audit["inputs"]["real"]["path"].endswith("train") and audit["inputs"]["model"]["sha256"]
    statuses = {c["name"]: c["status"] for c in audit["checks"]}
    assert statuses["dicom_phi"] == ("pass" if fmt == "dicom" else "skipped") or statuses["dicom_phi"] == "pass"
    assert all(c["controls"] and all(k["passed"] for k in c["controls"] if k["kind"] == "positive")
               for c in audit["checks"] if c["name"] == "copy_detection")
    assert (out / "report.html").exists() and (out / "copy_detection.csv").exists()
    assert audit["verdict"] == "pass", audit["verdict_reasons"]  # max_drop_fraction 1.0: drops never block here
    assert release_cli.main(["bundle", str(syn), "--audit", str(out / "audit.json"), "--out", str(bundle),
                             "--policy", str(tmp_path / "policy.yaml")]) == 0
    assert release_cli.main(["verify", str(bundle)]) == 0
    shipped = {p.name for p in (bundle / "images").iterdir() if p.name != "metadata.csv"}
    assert shipped == {k.split("/")[-1] for k in audit["released"]}
    assert not shipped & {k.split("/")[-1] for k in audit["dropped"]}
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "30 steps" in card and "without** differential privacy" in card
    real = [str(data / "train"), str((data / "train").resolve()), str(data / "holdout")]
    for f in (p for p in bundle.rglob("*") if p.is_file()):  # the model's training set path included
        assert not [r for r in real if r.encode() in f.read_bytes()], f
    with open(model / "synthgate.json", "a") as fh:  # the model changed after the audit: no bundle
        fh.write("\n")
    capsys.readouterr()
    assert release_cli.main(["bundle", str(syn), "--audit", str(out / "audit.json"), "--out", str(tmp_path / "b2"),
                             "--policy", str(tmp_path / "policy.yaml")]) == 2
    assert "model changed after the audit" in capsys.readouterr().err
