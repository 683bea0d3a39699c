"""``dicom_phi``: does any synthetic file carry identifying header data or text metadata?

A synthetic image has no patient, so the rule is strict.  Each DICOM file is
checked against DICOM PS3.15 Annex E, Table E.1-1, kept as data
(:mod:`audit.dicom_phi.annex_e`), recursively through every sequence, the
file meta information, private attributes, overlays (60xx) and curves (50xx):

- every attribute the Basic Profile removes, empties or replaces with a dummy
  (X, Z, D and their combinations) is absent or empty, unless an option the
  policy enables keeps or cleans it (``retain_longitudinal_dates``,
  ``clean_descriptors``... see :mod:`audit.dicom_phi.settings`);
- attributes given new UIDs (U) may stay, but no UID anywhere may equal an
  instance UID of the real set;
- no private attribute (unless ``retain_safe_private``);
- Patient Identity Removed (0012,0062) is ``YES``, a De-identification Method
  (0012,0063/0064) is recorded, Burned In Annotation (0028,0301) is not ``YES``.

Every text value of every synthetic file -- DICOM values of any text VR at
any depth, PNG text chunks, TIFF tags, EXIF, JPEG comments and application
segments -- is searched for the identifiers of the real set and the holdout
(DICOM headers and ``metadata.csv``'s ``patient_id``), compared in
normalised form (:mod:`audit.dicom_phi.identifiers`).  PNG/TIFF/JPEG text
metadata other than synthgate's own provenance is a finding in itself unless
``allow_text_metadata``.

Findings never repeat a value: they name the file, the attribute path
(``RequestAttributesSequence[0].RequestedProcedureID (0040,1001)``) and the
rule.  Positive controls (planted leaks of every kind the check covers) must
be caught and negative controls (synthgate's own clean DICOM and PNG) must
pass, against the real set's own identifiers, on every run.
"""
from __future__ import annotations

from synthgate.privacy import hash_id
from synthgate.progress import progress_bar

from audit.core.base import Check, CheckResult, Control, Finding
from audit.core.stats import clopper_pearson

from .annex_e import load_table
from .identifiers import RealIdentifiers, from_sets
from .scan import (
    ScanPolicy,
    metadata_rows,
    policy_from,
    read_dicom,
    scan_dataset,
    scan_image,
    scan_name,
    scan_npy,
    scan_npy_bytes,
    scan_values,
)
from .settings import DicomPhiSettings

# ------------------------------------------------------------------ controls

CONTROL_NAME = "Plantedcontrol^Quintessa"
CONTROL_ID = "QX7741902"
CONTROL_UID = "1.2.826.0.1.3680043.10.1234.99.7"


def control_identifiers(min_digits: int = 6) -> RealIdentifiers:
    """The identifiers of an imaginary real patient that the controls plant."""
    ids = RealIdentifiers(min_digits=min_digits)
    ids.add_name(CONTROL_NAME)
    ids.add_id(CONTROL_ID)
    ids.add_uid(CONTROL_UID)
    return ids


def _clean_dicom():
    """A clean synthetic DICOM dataset exactly as synthgate writes one (provenance included)."""
    import io

    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    from generators.write import dicom_bytes

    uids = {k: generate_uid(entropy_srcs=["synthgate-control", k]) for k in ("sop", "study", "series")}
    data = dicom_bytes(np.full((1, 8, 8), 0.5, np.float32), 8, _control_meta(), uids, 1)
    return pydicom.dcmread(io.BytesIO(data))


def _clean_png() -> bytes:
    import numpy as np

    from generators.write import png_bytes

    return png_bytes(np.full((1, 8, 8), 0.5, np.float32), 8, _control_meta())


def _control_meta() -> dict:
    from synthgate import __version__

    return {"synthetic": True, "generator": f"synthgate {__version__}", "label": "control", "index": 0, "seed": 0,
            "model": {"path": "control", "sha256": "0" * 64}, "sampler": "control", "sampler_steps": 0}


def positive_cases() -> list[tuple[str, str, object]]:
    """``(name, expected words in a problem, planted file)``: one per kind of leak the check covers.

    The planted file is a DICOM dataset or ``("png", bytes)``.
    """
    import io

    from PIL import Image, PngImagePlugin
    from pydicom import Dataset

    cases = []
    ds = _clean_dicom()
    ds.PatientName, ds.PatientBirthDate, ds.InstitutionName = CONTROL_NAME, "19700101", "Control General Hospital"
    cases.append(("identity attributes", "PatientBirthDate", ds))
    ds = _clean_dicom()
    modifier = Dataset()
    modifier.CodeMeaning = "seen with Quintessa Plantedcontrol"
    region = Dataset()
    region.AnatomicRegionModifierSequence = [modifier]
    ds.AnatomicRegionSequence = [region]
    cases.append(("identifier in a nested sequence",
                  "AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeMeaning", ds))
    ds = _clean_dicom()
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60003000, "OW", b"\x01" * 8)
    cases.append(("overlay", "OverlayData (6000,3000): has a value", ds))
    ds = _clean_dicom()
    ds.file_meta.MediaStorageSOPInstanceUID = CONTROL_UID
    cases.append(("real UID in the file meta", "FileMeta.MediaStorageSOPInstanceUID", ds))
    ds = _clean_dicom()
    ds.DeidentificationMethod = "pseudonymised from qx-7741902"
    cases.append(("reformatted ID", "DeidentificationMethod (0012,0063): contains a real patient's ID, ", ds))
    ds = _clean_dicom()
    ds.Manufacturer = "lot 7741902"
    cases.append(("digits-only ID", "Manufacturer (0008,0070): contains a real patient's ID (digits only)", ds))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "case qx7741902")
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG", pnginfo=info)
    cases.append(("PNG text chunk", "PNG tEXt 'Comment': contains a real patient's ID, ", ("png", buf.getvalue())))
    cases.append(("identifier in a file name", "file name: contains a real patient's",
                  ("name", "ward-b/Plantedcontrol_Quintessa_qx7741902.png")))
    ds = _clean_dicom()
    ds.ICCProfile = b"\x07" * 64  # any bytes: a training image fits in one
    cases.append(("binary element beyond the pixel data", "ICCProfile (0028,2000): binary data", ds))
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4), np.float32))
    cases.append(("bytes after an NPY array", "16 bytes after the array", ("npy", buf.getvalue() + b"\x01" * 16)))
    cases.append(("identifier in metadata.csv", "metadata.csv column 'label': contains a real patient's",
                  ("values", {"label": "Quintessa Plantedcontrol"})))
    return cases


def _scan(planted, real: RealIdentifiers, policy: ScanPolicy) -> list[str]:
    if isinstance(planted, tuple) and planted[0] == "name":
        return scan_name(planted[1], real)
    if isinstance(planted, tuple) and planted[0] == "values":
        return scan_values("metadata.csv", planted[1], real)
    if isinstance(planted, tuple) and planted[0] == "npy":
        return scan_npy_bytes(planted[1])
    if isinstance(planted, tuple):
        return scan_image(None, planted[0], real, policy, data=planted[1])
    return scan_dataset(planted, real, policy)


def run_controls(real: RealIdentifiers, policy: ScanPolicy) -> tuple[Control, ...]:
    """Positive controls (every planted leak caught) and negative controls (synthgate's own files pass),
    searched with the real set's identifiers plus the control patient's."""
    ids = RealIdentifiers(min_digits=real.min_digits).update(real).update(control_identifiers(real.min_digits))
    strict = ScanPolicy()  # the planted leaks must be caught by the basic profile whatever the policy allows
    caught, missed = [], []
    for name, expected, planted in positive_cases():
        (caught if any(expected in p for p in _scan(planted, ids, strict)) else missed).append(name)
    clean = {"synthgate DICOM": _scan(_clean_dicom(), ids, policy),
             "synthgate PNG": _scan(("png", _clean_png()), ids, policy),
             "synthgate file names": _scan(("name", "synthetic/label_1/img_00001.png"), ids, policy)}
    flagged = {k: v for k, v in clean.items() if v}
    n = len(caught) + len(missed)
    return (
        Control("planted identifiers", "positive", not missed,
                f"caught {len(caught)} of {n} planted leaks ({', '.join(caught)})"
                + (f"; missed: {', '.join(missed)}" if missed else ""),
                {"planted": n, "caught": len(caught)}),
        Control("clean synthetic files", "negative", not flagged,
                "synthgate's own DICOM and PNG output passed" if not flagged
                else "flagged: " + "; ".join(f"{k}: {v[0]}" for k, v in flagged.items())),
    )


# ------------------------------------------------------------------ the check


class DicomPhi(Check):
    name = "dicom_phi"
    requires = ()
    per_image = True
    method = ("Every DICOM file of the synthetic set is checked against DICOM PS3.15 Annex E Table E.1-1 (kept as "
              "data), recursively through sequences, the file meta, private attributes, overlays and curves, with "
              "the profile options the policy enables; no UID may equal one of the real set; Patient Identity "
              "Removed and a De-identification Method must be recorded. Every text value of every synthetic file "
              "(DICOM values, PNG text chunks, TIFF tags, EXIF, JPEG segments) is searched for the real set's and "
              "the holdout's identifiers (DICOM headers and metadata.csv patient_id) in normalised form (case, "
              "punctuation, digits only); PNG/TIFF/JPEG text metadata other than synthgate's provenance is a "
              "finding unless allowed.")
    references = ("DICOM PS3.15 Annex E, Attribute Confidentiality Profiles, Table E.1-1 (Basic Application Level "
                  "Confidentiality Profile and Options); table from innolitics/dicom-standard (DICOM 2024e) and "
                  "dicom-anonymizer (DICOM 2026c)",)
    limitations = (
        "Pixel data is not read: text burned into the image itself is only caught through the Burned In "
        "Annotation attribute (copy detection and re-identification look at pixels).",
        "Real identifiers are found only in the forms the normalisation covers (case, punctuation, separators, "
        "digits only); a name misspelt, abbreviated or glued into a longer word is not found, nor names of people "
        "outside the real set in text that an enabled option keeps.",
        "IDs with fewer letters-and-digits than 4, and digit forms shorter than min_id_digits, are not searched.",
    )

    Settings = DicomPhiSettings

    def fit(self, ctx) -> tuple[RealIdentifiers, tuple[Control, ...]]:
        """The real set's and holdout's identifiers (in memory only) and the scanner's controls."""
        real = from_sets(ctx.real, ctx.holdout, min_digits=self.settings.min_id_digits)
        return real, run_controls(real, policy_from(self.settings))

    def score(self, ctx, fitted) -> CheckResult:
        real, controls = fitted
        policy = policy_from(self.settings)
        files = sorted({(r.path, r.format) for r in ctx.synthetic.records})
        dicom = [p for p, f in files if f == "dicom"]
        if not dicom and self.settings.require_dicom:
            return self.result("fail", "the policy requires DICOM outputs but the synthetic set has none",
                               controls=controls)
        keys: dict[str, list[str]] = {}
        for r in ctx.synthetic.records:
            keys.setdefault(r.path, []).append(r.key)
        findings, flagged_files = [], 0
        rows = metadata_rows(ctx.synthetic.root)
        for path, fmt in progress_bar(files, desc="dicom_phi: headers and metadata", unit="file", total=len(files),
                                      enabled=ctx.progress):
            full = ctx.synthetic.root / path
            problems = scan_name(path, real) + scan_values("metadata.csv", rows.get(path, {}), real)
            problems += (scan_dataset(read_dicom(full), real, policy) if fmt == "dicom" else scan_npy(full)
                         if fmt == "npy" else scan_image(full, fmt, real, policy))
            if problems:
                flagged_files += 1
                findings += [Finding(key, "; ".join(problems), {"problems": problems}) for key in keys[path]]
        lo, hi = clopper_pearson(flagged_files, len(files))
        metrics = {"files": len(files), "dicom_files": len(dicom), "files_with_phi": flagged_files,
                   "files_with_phi_ci": [lo, hi], "real_identifiers_searched": not real.empty,
                   "real_identifier_values": real.values, "real_uids_compared": len(real.uids),
                   "annex_e_rows": len(load_table()), "options": list(policy.options),
                   "real_identifier_digest": hash_id(real.digest_source()) if not real.empty else None}
        thresholds = {"min_id_digits": self.settings.min_id_digits, "allow_text_metadata": policy.allow_text_metadata}
        kw = {"metrics": metrics, "thresholds": thresholds, "controls": controls}
        if not all(c.passed for c in controls):
            return self.result("error", "control failed: the scanner did not behave on its planted cases; the audit "
                               "is invalid", **kw)
        if findings:
            return self.result("fail", f"{flagged_files} of {len(files)} files carry identifying data",
                               flagged=tuple(findings), **kw)
        if all(f == "npy" for _, f in files):  # conclusive: arrays with nothing after them carry no metadata
            return self.result("pass", f"no file carries metadata ({len(files)} NPY arrays, nothing after any "
                               "array; file names and metadata.csv searched)", **kw)
        searched = "searched for real identifiers" if not real.empty else "no real identifiers to search for"
        return self.result("pass", f"{len(files)} files ({len(dicom)} DICOM) carry no identifying data "
                           f"(Annex E basic profile{' + ' + ', '.join(policy.options) if policy.options else ''}; "
                           f"{searched})", **kw)
