"""``dicom_phi``: does any output DICOM file carry identifying header data?

Checked against the identifying attributes of DICOM PS3.15 Annex E (Basic
Application Level Confidentiality Profile).  For a synthetic image there is
no patient, so the rule is strict and simple:

- identity, care-team, institution, identifier and acquisition date/time
  attributes must be absent or empty (Annex E actions X, Z, D);
- no private attributes (the basic profile removes them);
- no UID may equal a UID of the real set (a copied UID links the file to a
  real study), when the real set is DICOM;
- no header value anywhere (free text included, sequences searched) may
  contain a real patient's name, ID or accession number, when the real set
  is DICOM; non-DICOM synthetic files' text metadata (PNG text chunks, TIFF
  tags) are searched for the same;
- Patient Identity Removed (0012,0062) must be ``YES`` and a De-identification
  Method (0012,0063) or Method Code Sequence (0012,0064) recorded;
- Burned In Annotation (0028,0301) must not be ``YES``.

The result never repeats a header value: findings name the file, the
attribute and the rule, not the text.  A positive control (a DICOM carrying
PHI, built in memory) must be flagged and a negative control (a clean one)
must not, on every run.
"""
from __future__ import annotations

from pathlib import Path

from synthgate.privacy import hash_id

from audit.core.base import Check, CheckResult, Control, Finding
from audit.core.stats import clopper_pearson

from .settings import DicomPhiSettings

# PS3.15 Annex E identifying attributes (by keyword), grouped for the report.
IDENTITY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate", "PatientBirthTime",
    "PatientAddress", "PatientTelephoneNumbers", "PatientTelecomInformation", "MedicalRecordLocator",
    "MilitaryRank", "BranchOfService", "EthnicGroup", "Occupation", "PatientReligiousPreference",
    "PatientComments", "AdditionalPatientHistory", "PatientInsurancePlanCodeSequence", "ResponsiblePerson",
    "ResponsibleOrganization", "CountryOfResidence", "RegionOfResidence", "PatientAge", "PatientSize",
    "PatientWeight", "PatientSex", "MedicalAlerts", "Allergies", "SpecialNeeds", "PatientState",
    "PregnancyStatus", "LastMenstrualDate", "SmokingStatus",
)
CARE_TEAM = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician",
    "ScheduledPerformingPhysicianName", "StationName", "DeviceSerialNumber",
)
IDENTIFIERS = (
    "AccessionNumber", "StudyID", "RequestedProcedureID", "AdmissionID", "ServiceEpisodeID",
    "PerformedProcedureStepID", "ScheduledProcedureStepID", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest",
)
DATES = (
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime",
    "ContentTime", "AcquisitionDateTime", "AdmittingDate", "AdmittingTime",
)
GROUPS = {"identity": IDENTITY, "care team / institution": CARE_TEAM, "identifier": IDENTIFIERS,
          "acquisition date/time": DATES}
UID_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def _empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return value.strip() == ""
    if isinstance(value, (int, float)):
        return False
    try:  # multi-valued attributes and sequences: empty when every item is
        return all(_empty(v) for v in value)
    except TypeError:
        return str(value).strip() == ""


def _walk_text(ds):
    """Every string-like value in a dataset, sequences included: (keyword, text)."""
    for elem in ds.iterall():
        if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            continue
        value = elem.value
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for v in values:
            if v is not None and str(v).strip():
                yield elem.keyword or str(elem.tag), str(v)


class RealIdentifiers:
    """Identifying values and UIDs of the real DICOM set, kept only in memory."""

    def __init__(self, tokens: set[str] | None = None, uids: set[str] | None = None):
        self.tokens = {t for t in (tokens or set()) if len(t) >= 4}
        self.uids = uids or set()

    @classmethod
    def from_set(cls, imageset) -> "RealIdentifiers":
        import pydicom

        tokens, uids = set(), set()
        for path in sorted({r.path for r in imageset.records if r.format == "dicom"}):
            ds = pydicom.dcmread(imageset.root / path, stop_before_pixels=True, force=True)
            for kw in ("PatientName", "PatientID", "AccessionNumber", "OtherPatientIDs", "PatientBirthName"):
                v = ds.get(kw)
                if not _empty(v):
                    tokens.add(str(v).strip())
                    if kw == "PatientName":  # the family and given names on their own as well
                        tokens.update(p.strip() for p in str(v).split("^") if p.strip())
            for kw in UID_ATTRIBUTES:
                v = ds.get(kw)
                if v:
                    uids.add(str(v))
        return cls(tokens, uids)

    def found_in(self, text: str) -> bool:
        low = text.lower()
        return any(t.lower() in low for t in self.tokens)


def scan_dicom(ds, real: RealIdentifiers) -> list[str]:
    """Problems in one dataset, as reasons that never quote a value."""
    problems = []
    for group, keywords in GROUPS.items():
        for kw in keywords:
            if kw in ds and not _empty(ds.get(kw)):
                problems.append(f"{kw} ({group}) has a value")
    private = sorted({str(e.tag) for e in ds.iterall() if e.tag.is_private})
    if private:
        problems.append(f"{len(private)} private attribute(s), e.g. {private[0]}")
    for kw in UID_ATTRIBUTES:
        if str(ds.get(kw) or "") in real.uids:
            problems.append(f"{kw} equals a UID of the real set")
    if real.tokens:
        for kw, text in _walk_text(ds):
            if real.found_in(text):
                problems.append(f"{kw} contains a real patient's identifier")
    if str(ds.get("PatientIdentityRemoved") or "").upper() != "YES":
        problems.append("Patient Identity Removed (0012,0062) is not YES")
    if _empty(ds.get("DeidentificationMethod")) and _empty(ds.get("DeidentificationMethodCodeSequence")):
        problems.append("no De-identification Method (0012,0063/0064) recorded")
    if str(ds.get("BurnedInAnnotation") or "").upper() == "YES":
        problems.append("Burned In Annotation (0028,0301) is YES")
    return problems


def scan_other(path: Path, real: RealIdentifiers) -> list[str]:
    """Text metadata of a PNG/JPEG/TIFF file, searched for real identifiers."""
    if not real.tokens:
        return []
    from PIL import Image

    with Image.open(path) as img:
        texts = [str(v) for v in (getattr(img, "text", None) or img.info or {}).values() if isinstance(v, (str, bytes))]
        tags = getattr(img, "tag_v2", None)
        if tags is not None:
            texts += [str(v) for v in tags.values() if isinstance(v, (str, bytes))]
    return ["text metadata contains a real patient's identifier"] if any(real.found_in(t) for t in texts) else []


def control_datasets():
    """An in-memory DICOM with PHI (must be flagged) and a clean one (must pass)."""
    import pydicom
    from pydicom.uid import generate_uid

    def base():
        ds = pydicom.Dataset()
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["synthgate-control"])
        ds.PatientName, ds.PatientID = "", ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "synthetic image; no patient data"
        return ds

    leaky = base()
    leaky.PatientName = "Control^Planted"
    leaky.PatientBirthDate = "19700101"
    leaky.InstitutionName = "Planted Control Hospital"
    leaky.AccessionNumber = "CTRL0001"
    return leaky, base()


class DicomPhi(Check):
    name = "dicom_phi"
    requires = ()
    per_image = True
    method = ("Every DICOM file of the synthetic set is read (headers only) and checked against the identifying "
              "attributes of the DICOM PS3.15 Annex E basic confidentiality profile, private attributes, UIDs "
              "and identifiers copied from the real set, and the Patient Identity Removed / De-identification "
              "Method attributes; non-DICOM files' text metadata is searched for real identifiers.")
    references = ("DICOM PS3.15 Annex E, Attribute Confidentiality Profiles (Basic Application Level "
                  "Confidentiality Profile)",)
    limitations = (
        "Pixel data is not read: text burned into the image itself is only caught through the Burned In "
        "Annotation attribute (copy detection and re-identification look at pixels).",
        "Real identifiers can only be searched for when the real set is DICOM (their headers are the source).",
    )

    Settings = DicomPhiSettings

    def fit(self, ctx) -> tuple[RealIdentifiers, tuple[Control, ...]]:
        """The real set's identifiers (in memory only) and the scanner's controls."""
        real = RealIdentifiers.from_set(ctx.real) if ctx.real is not None else RealIdentifiers()
        return real, self._controls(real)

    def score(self, ctx, fitted) -> CheckResult:
        import pydicom

        real, control = fitted
        files = sorted({(r.path, r.format) for r in ctx.synthetic.records})
        dicom = [p for p, f in files if f == "dicom"]
        if not dicom and self.settings.require_dicom:
            return self.result("fail", "the policy requires DICOM outputs but the synthetic set has none",
                               controls=control)
        findings = []
        for path, fmt in files:
            full = ctx.synthetic.root / path
            problems = (scan_dicom(pydicom.dcmread(full, stop_before_pixels=True, force=True), real)
                        if fmt == "dicom" else scan_other(full, real))
            for key in [r.key for r in ctx.synthetic.records if r.path == path] if problems else []:
                findings.append(Finding(key, "; ".join(problems), {"problems": problems}))
        n_flag_files = len({f.synthetic.split("#")[0] for f in findings})
        lo, hi = clopper_pearson(n_flag_files, len(files))
        metrics = {"files": len(files), "dicom_files": len(dicom), "files_with_phi": n_flag_files,
                   "files_with_phi_ci": [lo, hi], "real_identifiers_searched": len(real.tokens) > 0,
                   "real_uids_compared": len(real.uids),
                   "real_identifier_digest": hash_id(",".join(sorted(real.tokens))) if real.tokens else None}
        if not all(c.passed for c in control):
            return self.result("error", "control failed: the header scanner did not behave on its planted cases; "
                               "the audit is invalid", metrics=metrics, controls=control)
        if findings:
            return self.result("fail", f"{n_flag_files} of {len(files)} files carry identifying header data",
                               metrics=metrics, flagged=tuple(findings), controls=control)
        if not dicom:
            what = ("their text metadata searched for real identifiers" if real.tokens
                    else "no DICOM headers to carry identifiers")
            return self.result("pass", f"no DICOM outputs ({len(files)} files; {what})", metrics=metrics,
                               controls=control)
        return self.result("pass", f"all {len(dicom)} DICOM files are free of identifying header data",
                           metrics=metrics, controls=control)

    @staticmethod
    def _controls(real: RealIdentifiers) -> tuple[Control, ...]:
        leaky, clean = control_datasets()
        found = scan_dicom(leaky, real)
        clean_found = scan_dicom(clean, RealIdentifiers())
        return (
            Control("planted PHI header", "positive", len(found) >= 4,
                    f"flagged {len(found)} problem(s) in a header carrying 4 planted identifying attributes"),
            Control("clean header", "negative", not clean_found,
                    "a clean synthetic header passed" if not clean_found else f"clean header flagged: {clean_found}"),
        )
