"""Settings of the ``dicom_phi`` check.

The defaults are the strict Basic Application Level Confidentiality Profile
(DICOM PS3.15 Annex E) with no option: every attribute of Table E.1-1 must be
absent or empty in a synthetic file (new UIDs excepted), no private
attribute, no text metadata in PNG/TIFF/JPEG files but synthgate's own
provenance.  Each ``retain_*`` / ``clean_*`` setting applies one option
column of Table E.1-1: the attributes that column marks K (keep) or C
(clean) may then carry a value.  Whatever the options, every text value is
still searched for the real set's identifiers, so "keep" and "clean" behave
alike here: a value is allowed when it carries no real identifier.  The
check cannot tell whether a kept text names someone outside the real set;
that is what the options trade away.
"""
from __future__ import annotations

from pydantic import Field

from audit.core.settings import CheckSettings


class DicomPhiSettings(CheckSettings):
    require_dicom: bool = False
    """Fail when the synthetic set holds no DICOM file (for policies that release DICOM only)."""
    retain_longitudinal_dates: bool = False
    """Annex E Retain Longitudinal Temporal Information options (full or modified dates): dates and times may stay."""
    retain_patient_characteristics: bool = False
    """Annex E Retain Patient Characteristics option: sex, age, size, weight... may stay (conditioned generation)."""
    retain_device_identity: bool = False
    """Annex E Retain Device Identity option: station name, device serial numbers... may stay."""
    retain_institution_identity: bool = False
    """Annex E Retain Institution Identity option: institution name, address, department may stay."""
    clean_descriptors: bool = False
    """Annex E Clean Descriptors option: descriptions and comments (Study/Series Description, Protocol Name, Image
    Comments...) may stay when they carry no real identifier."""
    clean_structured_content: bool = False
    """Annex E Clean Structured Content option: Content Sequence and Acquisition Context may stay when they carry
    no real identifier."""
    clean_graphics: bool = False
    """Annex E Clean Graphics option: overlays (60xx), curves (50xx) and graphic annotations may stay."""
    retain_safe_private: bool = False
    """Annex E Retain Safe Private option: private attributes may stay (still searched for real identifiers; the
    check cannot verify that a private attribute is one the standard calls safe)."""
    allow_text_metadata: bool = False
    """Allow free-text metadata in PNG/TIFF/JPEG files (text chunks, TIFF tags, EXIF, comments) other than
    synthgate's own provenance; it is still searched for real identifiers."""
    min_id_digits: int = Field(6, ge=4, le=32)
    """Fewest digits of a real ID whose digits alone (e.g. 001234 of MRN001234) are searched for; with n real IDs
    of d digits an unrelated d-digit number matches by chance with probability n / 10**d."""
