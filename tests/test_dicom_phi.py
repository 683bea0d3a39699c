"""dicom_phi: Annex E as data, recursively; real identifiers searched in every text in normalised form; clean files
pass; findings never quote a value; strip_ancillary keeps pixels and drops metadata."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pydicom
import pytest

from PIL import Image, PngImagePlugin
from pydicom import Dataset
from pydicom.uid import generate_uid

from audit import cli as audit_cli
from audit.dicom_phi import annex_e
from audit.dicom_phi.check import run_controls
from audit.dicom_phi.identifiers import RealIdentifiers, from_sets
from audit.dicom_phi.scan import ScanPolicy, read_dicom, scan_dataset, scan_image
from conftest import only_policy, pydicom_test_file, write_deidentified_dicom
from generators.write import dicom_bytes, png_bytes
from synthgate import __version__
from synthgate.imageset import ImageSet
from synthgate.imagemeta import PROVENANCE_KEY, read_metadata, strip_ancillary

# A realistic patient added to the real set (CT_small's own PatientID '1CT1' is too short to test reformatting).
PATIENT = {"PatientName": "Quinn^Harriet", "PatientID": "MRN0042137", "AccessionNumber": "ACC88231"}
META = {"synthetic": True, "generator": f"synthgate {__version__}", "label": "normal", "index": 0, "seed": 11,
        "model": {"path": "/models/m1", "sha256": "ab" * 32}, "sampler": "ddim", "sampler_steps": 10}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def real_dicom(tmp_path_factory):
    """A real DICOM set from pydicom's test files: CT_small, MR_small and CT_small as patient Quinn."""
    root = tmp_path_factory.mktemp("real")
    ct, mr = pydicom_test_file("CT_small.dcm"), pydicom_test_file("MR_small.dcm")
    shutil.copy(ct, root / "ct_small.dcm")
    shutil.copy(mr, root / "mr_small.dcm")
    ds = pydicom.dcmread(ct)
    for kw, value in PATIENT.items():
        setattr(ds, kw, value)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, kw, generate_uid(entropy_srcs=["test-real-patient", kw]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(root / "patient.dcm")
    return root


@pytest.fixture(scope="module")
def real_headers(real_dicom):
    return {name: pydicom.dcmread(real_dicom / f"{name}.dcm", stop_before_pixels=True)
            for name in ("ct_small", "mr_small", "patient")}


@pytest.fixture(scope="module")
def real_ids(real_dicom):
    return from_sets(ImageSet(real_dicom, cache=None))


def synthetic_dicom(index: int = 0) -> Dataset:
    """A clean synthetic DICOM exactly as synthgate writes one (provenance in Image Comments included)."""
    uids = {k: generate_uid(entropy_srcs=["test-synthetic", k, str(index)]) for k in ("sop", "study", "series")}
    data = dicom_bytes(np.full((1, 16, 16), 0.25, np.float32), 8, {**META, "index": index}, uids, index + 1)
    return pydicom.dcmread(io.BytesIO(data))


def item(**attrs) -> Dataset:
    ds = Dataset()
    for kw, value in attrs.items():
        setattr(ds, kw, value)
    return ds


# ------------------------------------------------------------------ the evaluator's 24 crafted files


def _private(ds, r):
    ds.private_block(0x0011, "ACME scanner", create=True).add_new(0x01, "LO", str(r["patient"].PatientName))


def _overlay(ds, r):
    ds.add_new(0x60000010, "US", 16)
    ds.add_new(0x60000011, "US", 16)
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60003000, "OW", b"\xff" * 32)


def _overlay_description(ds, r):
    ds.add_new(0x60000022, "LO", "annotated by Dr Roe")


def _curve(ds, r):
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50003000, "OW", b"\x01\x02" * 8)


def _file_meta(ds, r):
    ds.file_meta.MediaStorageSOPInstanceUID = r["ct_small"].SOPInstanceUID


# (name, how the one identifier is planted, what the finding must name); each is caught per the issue or missed
CASES = [
    ("PatientName", lambda ds, r: setattr(ds, "PatientName", r["patient"].PatientName), "PatientName (0010,0010)"),
    ("PatientID", lambda ds, r: setattr(ds, "PatientID", r["patient"].PatientID), "PatientID (0010,0020)"),
    ("AccessionNumber", lambda ds, r: setattr(ds, "AccessionNumber", r["patient"].AccessionNumber),
     "AccessionNumber (0008,0050)"),
    ("InstitutionName", lambda ds, r: setattr(ds, "InstitutionName", r["ct_small"].InstitutionName),
     "InstitutionName (0008,0080)"),
    ("real StudyInstanceUID", lambda ds, r: setattr(ds, "StudyInstanceUID", r["mr_small"].StudyInstanceUID),
     "StudyInstanceUID (0020,000D): equals a UID of the real set"),
    ("private attribute", _private, "private attribute"),
    ("ImageComments with a real ID", lambda ds, r: setattr(ds, "ImageComments", f"follow-up of {PATIENT['PatientID']}"),
     "ImageComments (0020,4000)"),
    ("OtherPatientIDsSequence", lambda ds, r: setattr(ds, "OtherPatientIDsSequence", [item(PatientID="ABCD1234")]),
     "OtherPatientIDsSequence[0].PatientID (0010,0020)"),
    ("ReferencedPatientSequence name", lambda ds, r: setattr(ds, "ReferencedPatientSequence",
                                                             [item(PatientName="Roe^Richard")]),
     "ReferencedPatientSequence[0].PatientName (0010,0010)"),
    ("RequestAttributesSequence ID", lambda ds, r: setattr(ds, "RequestAttributesSequence",
                                                           [item(RequestedProcedureID="RP7781")]),
     "RequestAttributesSequence[0].RequestedProcedureID (0040,1001)"),
    ("name two sequences deep", lambda ds, r: setattr(ds, "AnatomicRegionSequence", [item(
        AnatomicRegionModifierSequence=[item(CodeMeaning="Harriet Quinn")])]),
     "AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeMeaning (0008,0104): contains a real"),
    ("StudyDescription", lambda ds, r: setattr(ds, "StudyDescription", "CT chest, Dr Roe, St Elsewhere"),
     "StudyDescription (0008,1030)"),
    ("SeriesDescription", lambda ds, r: setattr(ds, "SeriesDescription", "follow-up for R. Roe"),
     "SeriesDescription (0008,103E)"),
    ("ProtocolName", lambda ds, r: setattr(ds, "ProtocolName", "Roe research protocol"), "ProtocolName (0018,1030)"),
    ("DerivationDescription", lambda ds, r: setattr(ds, "DerivationDescription", "derived from the study of R. Roe"),
     "DerivationDescription (0008,2111)"),
    ("InstanceCreationDate", lambda ds, r: setattr(ds, "InstanceCreationDate", "20240315"),
     "InstanceCreationDate (0008,0012)"),
    ("ContentCreatorName", lambda ds, r: setattr(ds, "ContentCreatorName", "Roe^Richard"),
     "ContentCreatorName (0070,0084)"),
    ("overlay data", _overlay, "OverlayData (6000,3000)"),
    ("overlay description", _overlay_description, "OverlayDescription (6000,0022)"),
    ("curve data", _curve, "CurveData (5000,3000)"),
    ("real UID in SourceImageSequence", lambda ds, r: setattr(ds, "SourceImageSequence", [item(
        ReferencedSOPClassUID=r["patient"].SOPClassUID, ReferencedSOPInstanceUID=r["patient"].SOPInstanceUID)]),
     "SourceImageSequence[0].ReferencedSOPInstanceUID (0008,1155): equals a UID of the real set"),
    ("real UID in the file meta", _file_meta, "FileMeta.MediaStorageSOPInstanceUID (0002,0003): equals a UID"),
    ("reformatted ID (MRN-...)", lambda ds, r: setattr(ds, "DeidentificationMethod", "copy of mrn-0042137"),
     "DeidentificationMethod (0012,0063): contains a real patient's ID"),
    ("ID digits only", lambda ds, r: setattr(ds, "ManufacturerModelName", "0042137"),
     "ManufacturerModelName (0008,1090): contains a real patient's ID (digits only)"),
]


def crafted(case, real_headers, index=1) -> Dataset:
    _, plant, _ = case
    ds = synthetic_dicom(index)
    plant(ds, real_headers)
    return ds


def test_the_evaluators_24_cases_are_all_caught(real_headers, real_ids):
    assert len(CASES) == 24
    for case in CASES:
        problems = scan_dataset(crafted(case, real_headers), real_ids)
        assert any(case[2] in p for p in problems), (case[0], problems)


def test_clean_synthetic_files_pass(real_ids):
    assert scan_dataset(synthetic_dicom(), real_ids) == []
    assert scan_image(None, "png", real_ids, data=png_bytes(np.full((1, 8, 8), 0.5), 8, META)) == []
    assert scan_image(None, "png", real_ids, data=_png(np.zeros((8, 8), np.uint8))) == []


def test_the_24_through_the_cli_never_quote_a_value(real_dicom, real_headers, capsys, tmp_path):
    syn = tmp_path / "syn"
    syn.mkdir()
    for i, case in enumerate(CASES):
        crafted(case, real_headers, i + 1).save_as(syn / f"case{i:02d}.dcm")
    synthetic_dicom(99).save_as(syn / "clean.dcm")
    code, result, _ = audit(capsys, syn, real_dicom, tmp_path / "o")
    check = result["checks"][0]
    assert code == 1 and check["status"] == "fail"
    assert sorted(f["synthetic"] for f in check["flagged"]) == [f"case{i:02d}.dcm" for i in range(24)]
    assert [c["passed"] for c in check["controls"]] == [True, True]
    text = (tmp_path / "o" / "audit.json").read_text()
    secrets = [*PATIENT.values(), "Quinn", "Harriet", "0042137", "ABCD1234", "Roe", "RP7781", "Elsewhere",
               str(real_headers["ct_small"].SOPInstanceUID), str(real_headers["mr_small"].StudyInstanceUID),
               str(real_headers["ct_small"].InstitutionName)]
    assert not [s for s in secrets if s in text]  # findings name attributes and rules, never values


# ------------------------------------------------------------------ normalised matching


@pytest.mark.parametrize("text,kinds", [
    ("MRN-0042137", ["ID", "ID (digits only)"]),
    ("mrn0042137", ["ID", "ID (digits only)"]),
    ("ID: mrn 0042137.", ["ID", "ID (digits only)"]),
    ("0042137", ["ID (digits only)"]),
    ("004-2137", ["ID (digits only)"]),
    ("Harriet QUINN", ["name"]),
    ("quinn,harriet", ["name"]),
    ("Quïnn", ["name"]),
    ("00421370", []),  # equality, not containment
    ("1.2.840.0042137.5", []),  # digits of dotted numbers (UIDs, decimals) are not IDs
    ("338.0042137", []),
    ("MRN.0042137", ["ID", "ID (digits only)"]),
    ("xmrn0042137", ["ID (digits only)"]),  # glued into a longer word: only the digits match
    ("sha256 ab0042137cd", ["ID (digits only)"]),
    ("seed 42137", []),
    ("ANONYMOUS", []),
])
def test_normalised_forms(text, kinds):
    ids = RealIdentifiers()
    ids.add_name(PATIENT["PatientName"])
    ids.add_id(PATIENT["PatientID"])
    ids.add_id("ANONYMOUS")
    assert ids.find(text) == kinds


@pytest.mark.parametrize("text", ["9736\u200b676", "9\u0303736676", "\u0669\u0667\u0663\u0666\u0666\u0667\u0666",
                                  "973\u00b76676", "973,6676", "973+6676", "973--6676", "MRN\u200b9736676",
                                  "\uff19\uff17\uff13\uff16\uff16\uff17\uff16"])
def test_disguised_ids_are_found(text):
    """Red team: zero-width spaces, combining marks, other scripts' digits and other separators hid an ID."""
    ids = RealIdentifiers()
    ids.add_id("MRN9736676")
    assert ids.find(f"case {text} done") and ids.find(f"{text}.png", loose=True), text


def test_loose_digits_for_file_names_only():
    ids = RealIdentifiers()
    ids.add_id("MRN9736676")
    assert not ids.find("value 973.66.76") and ids.find("973.66.76.png", loose=True)
    assert not ids.find("img_00001.png", loose=True) and not ids.find("img_9736677.png", loose=True)


def test_short_digit_forms_are_not_searched():
    ids = RealIdentifiers(min_digits=6)
    ids.add_id("AB1234")
    assert ids.digits == set() and ids.find("1234") == [] and ids.find("ab-1234") == ["ID"]


def test_real_identifiers_come_from_headers_at_any_depth_and_metadata_csv(real_ids, phantom_png):
    assert {"abcd1234", "1234abcd", "mrn0042137", "quinn", "harriet"} <= set(real_ids.tokens)
    assert "0042137" in real_ids.digits and len(real_ids.uids) >= 9  # study, series, SOP and file meta of 3 files
    png_ids = from_sets(ImageSet(phantom_png / "train", cache=None))
    patient = ImageSet(phantom_png / "train", cache=None).records[0].patient_id
    assert "ID" in png_ids.find(f"case {patient.lower()}")


# ------------------------------------------------------------------ the table


def test_table_agrees_with_dicom_anonymizer():
    """annex_e.csv's basic actions equal those of a maintained library's copy of Table E.1-1 (DICOM 2026c)."""
    pytest.importorskip("dicomanonymizer")
    theirs = {tag: action for tag, (action, _) in annex_e._kitware_rows().items()}
    ours = {r.tag: r.basic for r in annex_e.load_table().rows if r.source != annex_e.OWN}
    assert len(ours) >= 650
    assert {t: (ours.get(t), a) for t, a in theirs.items() if ours.get(t) != a} == {}
    assert set(ours) - set(theirs) == {annex_e.PRIVATE_TAG}


def test_table_lookup_and_option_columns():
    table = annex_e.load_table()
    row = table.lookup(0x00080012)
    assert row.keyword == "InstanceCreationDate" and row.basic == "X/D"
    assert row.options == {"retain_long_full_dates": "K", "retain_long_modified_dates": "C"}
    assert table.lookup(0x0008103E).options == {"clean_descriptors": "C"}
    assert table.lookup(0x00100040).options == {"retain_patient_characteristics": "K"}
    assert table.lookup(0x00080080).options == {"retain_institution_identity": "K"}
    assert table.lookup(0x60023000).name == "Overlay Data" and table.lookup(0x60020010) is None
    assert table.lookup(0x501E1234).name == "Curve Data" and table.lookup(0x00091001) is table.private
    assert table.lookup(0x00280010) is None  # Rows: not identifying


def test_options_are_policy_settings(real_headers, real_ids):
    ds = synthetic_dicom()
    ds.InstanceCreationDate, ds.StudyDescription, ds.PatientSex = "20240315", "chest CT", "F"
    strict = scan_dataset(ds, real_ids)
    assert {"InstanceCreationDate", "StudyDescription", "PatientSex"} <= {p.split(" ")[0] for p in strict}
    relaxed = ScanPolicy(("retain_long_full_dates", "retain_long_modified_dates", "clean_descriptors",
                          "retain_patient_characteristics"))
    assert scan_dataset(ds, real_ids, relaxed) == []
    ds.StudyDescription = "chest CT of harriet quinn"  # a kept descriptor is still searched
    assert scan_dataset(ds, real_ids, relaxed) == ["StudyDescription (0008,1030): contains a real patient's name"]


def test_unknown_settings_and_ranges_are_refused():
    from audit.dicom_phi.settings import DicomPhiSettings

    with pytest.raises(Exception, match="min_id_digits"):
        DicomPhiSettings(min_id_digits=2)
    with pytest.raises(Exception, match="retain_uids"):
        DicomPhiSettings(retain_uids=True)  # never offered: a real UID in a synthetic file links it to a study


# ------------------------------------------------------------------ markers and controls


@pytest.mark.parametrize("change,expected", [
    (lambda ds: setattr(ds, "BurnedInAnnotation", "YES"), "Burned In Annotation"),
    (lambda ds: delattr(ds, "PatientIdentityRemoved"), "Patient Identity Removed"),
    (lambda ds: delattr(ds, "DeidentificationMethod"), "no De-identification Method"),
])
def test_required_markers(change, expected):
    ds = synthetic_dicom()
    change(ds)
    assert any(expected in p for p in scan_dataset(ds, RealIdentifiers()))


def test_controls_fail_when_the_scanner_is_blind(monkeypatch):
    assert all(c.passed for c in run_controls(RealIdentifiers(), ScanPolicy()))
    blind = annex_e.AnnexETable(())
    monkeypatch.setattr("audit.dicom_phi.scan.load_table", lambda: blind)
    positive = run_controls(RealIdentifiers(), ScanPolicy())[0]
    assert not positive.passed and "missed: identity attributes" in positive.detail and "overlay" in positive.detail


def test_elements_after_the_pixel_data_are_checked(tmp_path, real_ids):
    ds = synthetic_dicom()
    ds.add_new(0xFFFCFFFC, "OB", b"Quinn Harriet  ")  # Data Set Trailing Padding: X
    ds.save_as(tmp_path / "a.dcm")
    problems = scan_dataset(read_dicom(tmp_path / "a.dcm"), real_ids)
    assert problems == ["DataSetTrailingPadding (FFFC,FFFC): has a value; Annex E basic profile X (remove)"]


# ------------------------------------------------------------------ PNG / TIFF / JPEG metadata


def _png(array, **texts) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def audit(capsys, synthetic, real, out, *extra):
    code = audit_cli.main(["check", str(synthetic), "--real", str(real), "--policy", str(only_policy("dicom_phi")),
                           "--out", str(out), "--json", *extra])
    stdout, err = capsys.readouterr()
    return code, (json.loads(stdout) if stdout.strip() else None), err


def test_png_text_chunk_with_a_real_patient_id_from_metadata_csv(phantom_png, capsys, tmp_path):
    patient = ImageSet(phantom_png / "train", cache=None).records[0].patient_id  # e.g. MRN0001234
    syn = tmp_path / "syn"
    syn.mkdir()
    (syn / "leaky.png").write_bytes(_png(np.zeros((16, 16), np.uint8), Comment=f"from {patient[:3]}-{patient[3:]}"))
    (syn / "plain.png").write_bytes(_png(np.zeros((16, 16), np.uint8)))
    (syn / "ours.png").write_bytes(png_bytes(np.full((1, 16, 16), 0.5), 8, META))
    code, result, _ = audit(capsys, syn, phantom_png / "train", tmp_path / "o")
    check = result["checks"][0]
    assert code == 1 and [f["synthetic"] for f in check["flagged"]] == ["leaky.png"]
    assert "PNG tEXt 'Comment': contains a real patient's ID" in check["flagged"][0]["reason"]
    assert patient not in (tmp_path / "o" / "audit.json").read_text()


def test_a_real_patient_in_a_file_name_is_flagged_and_hidden_from_shareable_outputs(phantom_png, capsys, tmp_path):
    """Red team: `MRN…_Family_Given_synth.png` passed ("searched for real identifiers") and shipped in every
    shareable output; the scanner read headers and metadata, never the name."""
    record = ImageSet(phantom_png / "train", cache=None).records[0]
    leaky = f"{record.patient_id}_synth.png"
    syn = tmp_path / "syn"
    (syn / "ward").mkdir(parents=True)
    (syn / leaky).write_bytes(_png(np.zeros((16, 16), np.uint8)))
    (syn / "ward" / f"x_{record.patient_id.lower()}" ).mkdir()
    (syn / "ward" / f"x_{record.patient_id.lower()}" / "a.png").write_bytes(_png(np.zeros((16, 16), np.uint8)))
    (syn / "ours.png").write_bytes(png_bytes(np.full((1, 16, 16), 0.5), 8, META))
    code, result, _ = audit(capsys, syn, phantom_png / "train", tmp_path / "o")
    check = result["checks"][0]
    assert code == 1 and check["status"] == "fail"
    assert sorted(f["synthetic"] for f in check["flagged"]) == sorted([leaky, f"ward/x_{record.patient_id.lower()}/a.png"])
    assert all("file name: contains a real patient's ID" in f["reason"] for f in check["flagged"])
    from audit.shareable import shareable

    internal = json.loads((tmp_path / "o" / "audit.json").read_text())  # the steward's own copy names them
    for name, text in (("report.html", (tmp_path / "o" / "report.html").read_text()),
                       ("shareable audit", json.dumps(shareable(internal)))):
        assert record.patient_id not in text and record.patient_id.lower() not in text, name


def test_hidden_payloads_and_metadata_csv_names_are_flagged(real_dicom, capsys, tmp_path):
    """Red team: a training image in an ICC profile, a name appended after an NPY array and a real name as a
    metadata.csv label all passed and shipped; binary data beyond the pixels, bytes after an array and every
    metadata.csv value are checked now."""
    syn = tmp_path / "syn"
    syn.mkdir()
    synthetic_dicom(0).save_as(syn / "a_clean.dcm", enforce_file_format=True)
    ds = synthetic_dicom(1)
    ds.ICCProfile = bytes(range(256)) * 4  # a 32 x 32 training image fits in 1 KiB
    ds.save_as(syn / "b_icc.dcm", enforce_file_format=True)
    buf = io.BytesIO()
    np.save(buf, np.full((16, 16), 0.5, np.float32))
    (syn / "c_clean.npy").write_bytes(buf.getvalue())
    (syn / "d_trailer.npy").write_bytes(buf.getvalue() + b"Quinn^Harriet MRN0042137")
    (syn / "e_plain.png").write_bytes(png_bytes(np.full((1, 16, 16), 0.5), 8, META))
    (syn / "f_label.png").write_bytes(png_bytes(np.full((1, 16, 16), 0.5), 8, META))
    (syn / "metadata.csv").write_text("path,label\na_clean.dcm,0\nb_icc.dcm,0\nc_clean.npy,0\nd_trailer.npy,0\n"
                                      "e_plain.png,0\nf_label.png,Harriet Quinn\n")
    code, result, err = audit(capsys, syn, real_dicom, tmp_path / "o")
    check = result["checks"][0]
    by = {f["synthetic"]: f["reason"] for f in check["flagged"]}
    assert code == 1 and sorted(by) == ["b_icc.dcm", "d_trailer.npy", "f_label.png"], (by, err)
    assert "ICCProfile (0028,2000): binary data (OB, 1024 bytes) beyond the pixel data" in by["b_icc.dcm"]
    assert "24 bytes after the array" in by["d_trailer.npy"]
    assert "metadata.csv column 'label': contains a real patient's name" in by["f_label.png"]
    assert "Quinn" not in json.dumps(check)


def test_png_only_set_is_checked_not_skipped(phantom_png, capsys, tmp_path):
    code, result, _ = audit(capsys, phantom_png / "holdout", phantom_png / "train", tmp_path / "o")
    check = result["checks"][0]
    assert code == 0 and check["status"] == "pass" and check["metrics"]["real_identifiers_searched"]


def test_other_text_metadata_is_flagged_unless_allowed(tmp_path):
    data = _png(np.zeros((8, 8), np.uint8), Software="GIMP 2.10")
    assert scan_image(None, "png", RealIdentifiers(), data=data) == [
        "PNG tEXt 'Software': text metadata (allow_text_metadata is off)"]
    assert scan_image(None, "png", RealIdentifiers(), ScanPolicy(allow_text_metadata=True), data=data) == []


def _tiff(array, **tags) -> bytes:
    from PIL import TiffImagePlugin

    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, value in tags.items():
        ifd[{"ImageDescription": 270, "Artist": 315}[tag]] = value
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF", tiffinfo=ifd)
    return buf.getvalue()


def _jpeg(array, comment: bytes | None = None, exif: dict | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {"comment": comment} if comment else {}
    if exif:
        e = Image.Exif()
        e.update(exif)
        kw["exif"] = e.tobytes()
    Image.fromarray(array).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def test_tiff_tags_and_jpeg_segments_are_searched(real_ids):
    tif = _tiff(np.zeros((8, 8), np.uint16), Artist="H. Quinn")
    assert scan_image(None, "tiff", real_ids, data=tif) == [
        "TIFF tag Artist (315): contains a real patient's name",
        "TIFF tag Artist (315): text metadata (allow_text_metadata is off)"]
    jpg = _jpeg(np.zeros((8, 8, 3), np.uint8), exif={0x010E: "case MRN 0042137"})
    assert "JPEG APP1 EXIF ImageDescription (270): contains a real patient's ID, ID (digits only)" in scan_image(
        None, "jpeg", real_ids, data=jpg)
    assert any("JPEG COM segment" in p for p in scan_image(None, "jpeg", real_ids,
                                                           data=_jpeg(np.zeros((8, 8), np.uint8), b"scanned")))
    assert scan_image(None, "jpeg", real_ids, data=_jpeg(np.zeros((8, 8), np.uint8))) == []  # JFIF only


# ------------------------------------------------------------------ strip_ancillary


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).copy()


def _rich_png(array) -> bytes:
    """A PNG with every kind of ancillary chunk: text (tEXt/zTXt/iTXt), provenance, EXIF, gamma, time, trailing."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PROVENANCE_KEY, json.dumps(META))
    info.add_text("Comment", "Harriet Quinn")
    info.add_text("Title", "x" * 200, zip=True)
    info.add_itxt("Author", "MRN0042137", lang="en", tkey="Autor")
    info.add(b"tIME", b"\x07\xe8\x03\x0f\x0c\x00\x00")
    info.add(b"prVt", b"private notes")
    e = Image.Exif()
    e[0x013B] = "Dr Roe"  # Artist
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", pnginfo=info, exif=e.tobytes(), gamma=0.45)
    return buf.getvalue() + b"trailing bytes after IEND"


@pytest.mark.parametrize("array", [
    np.arange(256, dtype=np.uint8).reshape(16, 16),
    (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16),
    np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8),
], ids=["gray8", "gray16", "rgb"])
def test_strip_png_keeps_pixels_and_only_the_provenance_chunk(array, tmp_path, real_ids):
    src = tmp_path / "a.png"
    src.write_bytes(_rich_png(array))
    before = read_metadata(src, "png")
    assert {"PNG tEXt 'Comment'", "PNG zTXt 'Title'", "PNG iTXt 'Author'", "PNG prVt chunk",
            "PNG bytes after IEND"} <= {m.where for m in before}
    assert any(m.where.startswith("PNG eXIf") for m in before)
    out = strip_ancillary(src, "png")
    assert np.array_equal(_pixels(out), array) and np.array_equal(_pixels(out), _pixels(src.read_bytes()))
    after = read_metadata(None, "png", out)
    assert [(m.where, m.kind, m.structured) for m in after] == [(f"PNG iTXt {PROVENANCE_KEY!r}", "provenance", META)]
    assert scan_image(None, "png", real_ids, data=out) == []
    assert src.read_bytes().endswith(b"after IEND")  # the source is never modified


def test_strip_tiff_and_jpeg_keep_pixels(tmp_path):
    gray16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    (tmp_path / "a.tif").write_bytes(_tiff(gray16, ImageDescription="Harriet Quinn", Artist="Dr Roe"))
    out = strip_ancillary(tmp_path / "a.tif", "tiff")
    assert np.array_equal(_pixels(out), gray16) and read_metadata(None, "tiff", out) == ()
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    (tmp_path / "a.jpg").write_bytes(_jpeg(rgb, b"Harriet Quinn", {0x013B: "Dr Roe"}) + b"trailing")
    out = strip_ancillary(tmp_path / "a.jpg", "jpeg")
    assert np.array_equal(_pixels(out), _pixels((tmp_path / "a.jpg").read_bytes()))
    assert read_metadata(None, "jpeg", out) == () and b"Quinn" not in out and b"Roe" not in out


def test_strip_leaves_clean_dicom_unchanged_and_drops_hidden_payloads(tmp_path):
    synthetic_dicom().save_as(tmp_path / "a.dcm")
    assert strip_ancillary(tmp_path / "a.dcm", "dicom") == (tmp_path / "a.dcm").read_bytes()
    ds = synthetic_dicom(1)
    ds.ICCProfile = bytes(range(256)) * 4
    seq = Dataset()
    seq.add_new(0x00091010, "OB", b"private blob")
    ds.add_new(0x00091001, "LO", "ACME")
    ds.ReferencedImageSequence = [seq]
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    out = pydicom.dcmread(io.BytesIO(strip_ancillary(tmp_path / "b.dcm", "dicom")))
    assert "ICCProfile" not in out and 0x00091010 not in out.ReferencedImageSequence[0]
    assert np.array_equal(out.pixel_array, pydicom.dcmread(tmp_path / "b.dcm").pixel_array)
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.float32).reshape(3, 4))
    (tmp_path / "c.npy").write_bytes(buf.getvalue() + b"a training image")
    assert strip_ancillary(tmp_path / "c.npy", "npy") == buf.getvalue()
    with pytest.raises(ValueError, match="unknown image format"):
        strip_ancillary(tmp_path / "a.dcm", "gif")


# ------------------------------------------------------------------ the phantom set, through the CLI


def test_real_phantom_headers_are_flagged_and_clean_copies_pass(phantom_dicom, capsys, tmp_path):
    code, result, _ = audit(capsys, phantom_dicom / "holdout", phantom_dicom / "train", tmp_path / "o")
    check = result["checks"][0]
    assert code == 1 and len(check["flagged"]) == result["inputs"]["synthetic"]["n_images"]
    for kw in ("PatientName", "PatientBirthDate", "InstitutionName", "AccessionNumber", "Patient Identity Removed"):
        assert kw in check["flagged"][0]["reason"]
    ds = pydicom.dcmread(next((phantom_dicom / "holdout").glob("*.dcm")))
    text = (tmp_path / "o" / "audit.json").read_text()
    assert not [v for v in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.InstitutionName,
                            ds.AccessionNumber) if v in text]
    for f in sorted((phantom_dicom / "holdout").glob("*.dcm")):
        write_deidentified_dicom(f, tmp_path / "syn" / f.name)
    code, result, err = audit(capsys, tmp_path / "syn", phantom_dicom / "train", tmp_path / "o2")
    assert code == 0, result["checks"][0]["reason"] if result else err
    assert result["checks"][0]["metrics"]["real_uids_compared"] > 0
