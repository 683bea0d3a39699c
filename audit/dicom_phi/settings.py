"""Settings of the ``dicom_phi`` check."""
from __future__ import annotations

from audit.core.settings import CheckSettings


class DicomPhiSettings(CheckSettings):
    require_dicom: bool = False
    """Fail when the synthetic set holds no DICOM file (for policies that release DICOM only)."""
