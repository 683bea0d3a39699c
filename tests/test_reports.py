"""Reports: self-contained, shareable by default (no real pixels, no flagged images, no identifiers)."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image

from audit import cli as audit_cli
from reports import cli as report_cli
from reports.plots import thumbnail_uri
from synthgate.imageset import ImageSet
from synthgate.phantoms import generate, write_phantoms
from conftest import save_unit_png


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """An audit with one planted copy that the default policy drops."""
    root = tmp_path_factory.mktemp("report")
    write_phantoms(root / "p", patients=24, images_per_patient=4, size=32, seed=31)
    novel, _ = generate(patients=10, images_per_patient=2, size=32, seed=32)
    (root / "syn").mkdir()
    for i, im in enumerate(novel[:19]):
        save_unit_png(root / "syn" / f"s{i:02d}.png", im.pixels)
    shutil.copy(sorted((root / "p" / "train").glob("*.png"))[5], root / "syn" / "zz_copy.png")
    # a tiny holdout (24 images) gives a loose conformal threshold, so allow more drops than the default
    (root / "policy.yaml").write_text("name: report-test\nmax_drop_fraction: 0.5\n"
                                      "checks:\n  copy_detection: {action: drop}\n  dicom_phi: {action: block}\n")
    code = audit_cli.main(["check", str(root / "syn"), "--real", str(root / "p" / "train"), "--holdout",
                           str(root / "p" / "holdout"), "--policy", str(root / "policy.yaml"), "--out",
                           str(root / "out")])
    assert code == 0
    return root


def embedded_images(html: str) -> list[np.ndarray]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
        out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))))
    return out


def thumbs_of(imageset: ImageSet) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbnail_uri(imageset.load(i)).split(",", 1)[1]))))
            for i in range(len(imageset))]


def test_shareable_report_has_no_patient_pixels_or_identifiers(audited):
    html = (audited / "out" / "report.html").read_text()
    audit = json.loads((audited / "out" / "audit.json").read_text())
    assert "zz_copy.png" in audit["dropped"]
    embedded = embedded_images(html)
    assert len(embedded) >= len(audit["released"]) + 1  # thumbnails of released images plus plots
    hashes = {img.tobytes() for img in embedded}
    real = ImageSet(audited / "p" / "train")
    assert not hashes & {t.tobytes() for t in thumbs_of(real)}  # no real image, at thumbnail scale
    assert not hashes & {t.tobytes() for t in thumbs_of(ImageSet(audited / "p" / "holdout"))}
    syn = ImageSet(audited / "syn")
    dropped = thumbs_of(syn.subset([syn.keys.index(k) for k in audit["dropped"]]))
    assert not hashes & {d.tobytes() for d in dropped}  # dropped (flagged) images are never shown
    for r in real:
        assert r.patient_id not in html and r.path not in html  # no MRN, no real file name
    assert "INTERNAL" not in html and "<script" not in html and "http://" not in html and "https://" not in html


def test_internal_report_shows_flagged_pairs_and_says_so(audited, capsys):
    # the internal edition of the first-round finding: audit with the research policy (nothing dropped)
    out = audited / "out_research"
    assert audit_cli.main(["check", str(audited / "syn"), "--real", str(audited / "p" / "train"), "--policy",
                           "research", "--checks", "copy_detection", "--out", str(out)]) == 1  # partial
    assert report_cli.main([str(out / "audit.json"), "--internal"]) == 0
    html = (out / "report-internal.html").read_text()
    assert html.count("INTERNAL") >= 3 and "Flagged images beside their nearest training image" in html
    real_thumbs = {t.tobytes() for t in thumbs_of(ImageSet(audited / "p" / "train"))}
    assert {i.tobytes() for i in embedded_images(html)} & real_thumbs  # the real match is shown internally
    shareable = (out / "report.html").read_text()
    assert not {i.tobytes() for i in embedded_images(shareable)} & real_thumbs


def test_report_cli_errors(tmp_path, capsys):
    assert report_cli.main([str(tmp_path / "none.json")]) == 2
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert report_cli.main([str(tmp_path / "x.json")]) == 2
    assert "not an audit.json" in capsys.readouterr().err


def _browser():
    from reports.pdf import find_browser

    return find_browser()


@pytest.mark.skipif(_browser() is None, reason="no Chromium on this machine")
def test_report_renders_in_a_real_browser(audited, tmp_path):
    from reports.pdf import chromium_args

    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(chromium_args(_browser(), profile) + ["--window-size=1100,1600", f"--screenshot={shot}",
                       (audited / "out" / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 1000 and img.std() > 10  # a page with content, not a blank or error page
    green = (img[..., 1] > 100) & (img[..., 0] < 60) & (img[..., 2] < 90)  # the PASS verdict colour
    assert green.sum() > 200


@pytest.mark.skipif(_browser() is None, reason="no Chromium on this machine")
def test_pdf_with_chromium(audited, capsys, tmp_path):
    shutil.copy(audited / "out" / "audit.json", tmp_path / "audit.json")
    assert audit_cli.main(["report", str(tmp_path / "audit.json"), "--pdf", "--pdf-engine", "chromium"]) == 0
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000
