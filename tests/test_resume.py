"""An interrupted audit resumes from its completed stages: each check's fitted real side is kept (authenticated)
and a rerun restores it instead of recomputing; a tampered stored state is recomputed, and the audit says so."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from audit import cli as audit_cli
from conftest import save_unit_png
from synthgate.phantoms import generate, write_phantoms


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # a holdout that resolves the default (ratio) copy rule's 0.5 % false-alarm rate (420 images; 399 needed):
    # with 180 (the threshold then the smallest holdout ratio) one of the 8 novel images was a false alarm
    write_phantoms(root / "p", patients=150, images_per_patient=3, size=32, seed=51, holdout_fraction=0.93)
    novel, _ = generate(patients=4, images_per_patient=2, size=32, seed=52)
    for i, im in enumerate(novel):
        save_unit_png(root / "syn" / f"s{i}.png", im.pixels)
    src = sorted((root / "p" / "train").glob("*.png"))[1]
    save_unit_png(root / "syn" / "copy.png", np.asarray(Image.open(src), np.float64) / 255)
    (root / "policy.yaml").write_text("name: r\nmax_drop_fraction: 0.5\nchecks:\n"
                                      "  copy_detection: {action: drop, settings: {control_copies: 4}}\n"
                                      "  dicom_phi: {action: block}\n")
    return root


def _run(case, out, capsys):
    code = audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--holdout",
                           str(case / "p" / "holdout"), "--policy", str(case / "policy.yaml"), "--out", str(out),
                           "--json"])
    out_text, err = capsys.readouterr()
    return code, (json.loads(out_text) if out_text.strip() else None), err


def test_interrupted_audit_resumes_from_the_completed_real_side(case, capsys, tmp_path, monkeypatch):
    import audit.dicom_phi.check as phi

    def crash(self, ctx, fitted):
        raise KeyboardInterrupt  # the audit is interrupted after copy detection's real side was fitted

    with monkeypatch.context() as mp:  # (not monkeypatch.undo(): that would also undo the test's isolated env)
        mp.setattr(phi.DicomPhi, "score", crash)
        code, _, err = _run(case, tmp_path / "a", capsys)
    assert code == 130 and not (tmp_path / "a").exists()

    import audit.copy_detection.check as cd

    fits = []
    real_fit = cd.CopyDetection.fit
    monkeypatch.setattr(cd.CopyDetection, "fit", lambda self, ctx: fits.append(1) or real_fit(self, ctx))
    code, audit, _ = _run(case, tmp_path / "b", capsys)
    assert code == 0 and fits == []  # restored, not refitted
    assert any("copy_detection: the real side" in n for n in audit["inputs"]["notes"])
    assert audit["dropped"] == ["copy.png"]


def test_tampered_stored_state_is_recomputed(case, capsys, tmp_path, monkeypatch):
    from pathlib import Path
    import os

    code, first, _ = _run(case, tmp_path / "a", capsys)
    assert code == 0
    store = Path(os.environ["SYNTHGATE_CACHE_DIR"]) / "fitted"
    entries = sorted(store.rglob("*.fit"))
    assert entries
    for e in entries:
        blob = bytearray(e.read_bytes())
        blob[-1] ^= 0xFF  # one bit of the state: the HMAC no longer verifies
        e.write_bytes(bytes(blob))
    code, again, _ = _run(case, tmp_path / "b", capsys)
    assert code == 0 and again["dropped"] == first["dropped"]
    assert any("did not verify" in n for n in again["inputs"]["notes"])
