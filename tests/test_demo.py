"""``synthgate demo``: both generators through the gate on small settings; the verdicts reported as measured."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from release import cli as release_cli
from release import demo
from synthgate import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small enough for a test: 16 x 16 phantoms; the memorising generator sees 2 images for 1,000 steps, the
# careful one 24 images for 20. The rules are the default policy's drop-and-block logic on the checks a run
# this small can settle: copy detection on the holdout quantile (its default ratio rule needs 400 unseen
# images), DICOM PHI; membership inference needs more members and non-members than a test can train on (the
# demo's own run has 160 of each, under the default policy).
POLICY = """name: demo-test
max_drop_fraction: 0.2
checks:
  copy_detection:
    action: drop
    on_inconclusive: fail
    settings: {rule: holdout, holdout_quantile: 0.05, control_copies: 8}
  dicom_phi: {action: block}
"""

SMALL = ["--patients", "12", "--holdout-patients", "10", "--images-per-patient", "2", "--size", "16",
         "--few-patients", "1", "--few-steps", "1000", "--steps", "20", "--samples", "12", "--public-patients",
         "0", "--threads", "1"]


def test_both_arms(tmp_path, capsys):
    """The memorising generator never gets a bundle; the careful one's verdict is the audit's, and a pass ships."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--policy", str(policy), "--jobs", "2", *SMALL])
    text = capsys.readouterr().out
    memorising = json.loads((out / "memorising" / "audit" / "audit.json").read_text())
    careful = json.loads((out / "careful" / "audit" / "audit.json").read_text())

    # the leak: copies of the few training images found, the release refused, no bundle
    assert memorising["verdict"] != "pass", text
    copies = next(c for c in memorising["checks"] if c["name"] == "copy_detection")
    assert copies["status"] == "fail" and copies["flagged"], text
    assert not (out / "memorising" / "bundle").exists()
    assert "copy_detection flagged" in text and "--internal" in text

    # the careful arm: what the demo says is what its signed audit says
    row = next(line for line in text.splitlines() if line.strip().startswith("verdict "))
    assert row.split()[1:] == [memorising["verdict"].upper(), careful["verdict"].upper()], row
    if careful["verdict"] == "pass":
        assert code == 0, text
        assert (out / "careful" / "bundle" / "manifest.json").exists()
        assert "verified intact" in text and "The gate told them apart" in text
        capsys.readouterr()
        assert release_cli.main(["verify", str(out / "careful" / "bundle")]) == 0
        assert "intact" in capsys.readouterr().out
    else:
        assert code == 1, text
        assert "DEMO FAILED: the careful generator did NOT pass" in text
        assert not (out / "careful" / "bundle").exists()
    # the demo's release ledger stays in the demo's folder
    assert (out / "ledger.jsonl").exists() == (careful["verdict"] == "pass")
    for o in ("memorising", "careful"):
        assert (out / o / "audit" / "report.html").exists()
        assert f"open {out / o / 'audit' / 'report.html'}" in text


def _outcome(key: str, verdict: str, tmp_path: Path, flagged=(), verification=None) -> demo.Outcome:
    audit = {"verdict": verdict, "verdict_reasons": [] if verdict == "pass" else [f"{key} reason"],
             "dropped": [], "released": ["a.png"] if verdict == "pass" else [],
             "inputs": {"synthetic": {"n_images": 4}},
             "checks": [{"name": "copy_detection", "status": "pass" if not flagged else "fail",
                         "reason": "r", "flagged": [{"synthetic": f, "reason": f"{f} copies t.png"} for f in flagged]},
                        {"name": "dicom_phi", "status": "pass", "reason": "r", "flagged": []},
                        {"name": "reidentification", "status": "inconclusive", "reason": "r", "flagged": [],
                         "controls": [{"name": "probes", "kind": "positive", "passed": verdict == "pass",
                                       "detail": "1 of 40"}, {"name": "unseen", "kind": "negative",
                                                              "passed": False, "detail": "n"}]}]}
    arm = demo.Arm(key, key, tmp_path, 4, 2, 10)
    return demo.Outcome(arm, 0.1, audit, tmp_path / key / "audit", bundle=tmp_path / key / "bundle"
                        if verification else None, verification=verification)


class _Verified:
    intact, problems, checked, trusted_by = True, (), ("a", "b"), "this installation's key"


@pytest.mark.parametrize("memorising, careful, verified, code, says", [
    ("fail", "pass", True, 0, "The gate told them apart"),
    ("fail", "fail", False, 1, "DEMO FAILED: the careful generator did NOT pass"),
    ("fail", "inconclusive", False, 1, "DEMO FAILED: the careful generator did NOT pass"),
    ("pass", "pass", True, 1, "DEMO FAILED: the memorising generator PASSED"),
])
def test_conclusion_follows_the_audits(tmp_path, capsys, memorising, careful, verified, code, says):
    """Exit 0 only when the memorising generator did not pass and the careful one passed with an intact bundle."""
    outcomes = [_outcome("memorising", memorising, tmp_path, flagged=["s1.png", "s2.png"] if memorising == "fail"
                         else ()),
                _outcome("careful", careful, tmp_path, verification=_Verified() if verified else None)]
    args = type("Args", (), {"out": str(tmp_path)})()
    assert demo.conclude(outcomes, args) == code
    text = capsys.readouterr().out
    assert says in text
    assert ("bundle: " in text) == (careful == "pass")
    if memorising == "fail":
        assert "s1.png: s1.png copies t.png" in text
    # a failed positive control is named (only positive ones invalidate an audit)
    failed = "reidentification: positive control failed: probes: 1 of 40"
    assert text.count(failed) == (memorising != "pass") + (careful != "pass")
    assert "control failed: unseen" not in text
    table = demo.side_by_side(outcomes)
    assert "fail (2 flagged)" in table if memorising == "fail" else "fail" not in table.split("verdict")[0]
    assert ("verified intact" in table) == verified


def test_subset_keeps_whole_patients(tmp_path):
    from synthgate.imageset import ImageSet
    from synthgate.phantoms import write_phantoms

    write_phantoms(tmp_path / "h", patients=5, images_per_patient=3, size=16, seed=1, holdout_fraction=0.0)
    few = demo.subset_patients(tmp_path / "h" / "train", tmp_path / "few", 2)
    s = ImageSet(few)
    assert len(s) == 6 and s.n_patients == 2
    with pytest.raises(Exception, match="between 1 and the 5"):
        demo.subset_patients(tmp_path / "h" / "train", tmp_path / "few2", 6)
