"""Settings of the ``copy_detection`` check."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from audit.core.settings import CheckSettings

RULES = ("auto", "ratio", "absolute", "calibrated", "holdout", "any")
#: Rules decided on Carlini's tiled distance (the exact tiled search)
TILED_RULES = ("absolute", "calibrated", "holdout")

Zoom = Annotated[float, Field(ge=0.8, le=1.25)]


class CopyDetectionSettings(CheckSettings):
    rule: Literal["auto", "ratio", "absolute", "calibrated", "holdout", "any"] = "auto"
    """Decision rule: ``ratio`` (nearest / second-nearest training image, shift- and zoom-tolerant, calibrated on
    the holdout), Carlini's ``absolute`` or ``calibrated``, ``holdout`` (tiled distance below the holdout's
    quantile), ``any`` (any of them); ``auto`` = ``ratio`` with a holdout, else ``absolute`` (said so in the
    result)."""

    # ---------------------------------------------------------------- the ratio rule
    false_alarm_rate: float = Field(0.005, gt=0, lt=0.5)
    """Ratio rule: the false-alarm rate on unseen images (alpha), split equally between its two tests; the holdout
    needs at least 2 / alpha - 1 images to resolve it (399 for 0.005)."""
    max_shift: int = Field(3, ge=0, le=8)
    """Ratio rule: largest translation (pixels at the analysis size, each axis) the shift/zoom test undoes."""
    zooms: list[Zoom] = [0.95, 1.0, 1.05]
    """Ratio rule: zooms about the centre the shift/zoom test tries (rescaled copies between them are caught by
    the pooling)."""
    inverted: bool = True
    """Ratio rule: the identity test also compares each synthetic image with its intensities inverted (1 - x), the
    nearer of the two counting, so a copy exported without its DICOM MONOCHROME1 inversion (a generator trained on
    raw pixel arrays), or inverted on purpose, is caught (unshifted: the shift/zoom test does not invert)."""
    analysis_size: int = Field(64, ge=16, le=512)
    """Ratio rule: images whose shorter side is longer are area-downsampled to this shorter side first."""
    blocks: int = Field(8, ge=2, le=32)
    """Ratio rule: the compared image is the mean of ``blocks x blocks`` blocks of the central region (a
    low-pass that tolerates noise, JPEG, blur and sub-pixel misalignment); fewer on images too small for it."""
    min_ratio_threshold: float = Field(0.1, ge=0, lt=1)
    """Ratio rule: warn when a calibrated threshold falls below this (a holdout holding near-copies of training
    images drives it towards 0, and then only exact copies are caught)."""
    control_min_content: float = Field(0.02, ge=0, lt=1)
    """Ratio rule's control: plant copies only of training images whose content (RMS of the pooled image, mean
    removed) reaches this; a near-constant image cannot be told from a novel one by any pixel rule."""

    # ------------------------------------------------------- Carlini's tiled distance
    threshold: float = Field(0.15, gt=0, lt=1)
    """Fixed tiled-distance threshold of the ``absolute`` rule (Carlini et al. 2023; MediSyn's 0.15)."""
    grid: int = Field(4, ge=1, le=64)
    """Tiles per side of the tiled distance (4 = Carlini's 4 x 4 grid)."""
    pool: int = Field(8, ge=1, le=64)
    """Pooling blocks per tile side in the tiled search's lower bound (speed only; results are exact)."""
    alpha: float = Field(0.5, gt=0)
    """Carlini's calibrated distance: nearest / (alpha x mean distance of the n nearest)."""
    n_neighbors: int = Field(50, ge=1)
    """Neighbours averaged by the calibrated distance (Carlini et al.: 50)."""
    holdout_quantile: float = Field(0.01, gt=0, lt=0.5)
    """``holdout`` rule: conformal quantile of unseen images' tiled distances (its false-alarm rate)."""

    # ------------------------------------------------------------------- everything
    control_copies: int = Field(26, ge=0)
    """Planted near-copies the rule must catch, at least one per transform (0 disables the control, which then
    fails)."""
    synthetic_duplicates: bool = True
    """Also look for near-duplicates inside the synthetic set (Carlini's clique signal)."""
    training_duplicates: bool = True
    """Also look for near-duplicates inside the training set (a curation problem)."""
    max_duplicate_queries: int = Field(5000, ge=1)
    """Most images queried by each duplicate search (a seeded sample beyond this); under the ratio rule the
    training set is always searched whole, since its groups (the second distance) need every pair."""
    query_chunk_mb: int = Field(1024, ge=1)
    """Memory for one chunk of query images (MB)."""
    batch_size: int = Field(64, ge=1)
    """Images decoded per batch."""
    embedding_weights: str | None = None
    """Local open_clip weights: embedding retrieval as extra evidence, never instead of the exact search."""
    engine: Literal["torch", "faiss"] = "torch"
    """First stage of the exact tiled search: torch bounds (default) or a faiss flat index."""

    @field_validator("zooms")
    @classmethod
    def _zooms(cls, zooms: list[float]) -> list[float]:
        if not zooms:
            raise ValueError("give at least one zoom (1.0 alone: shifts only)")
        if len(set(zooms)) != len(zooms):
            raise ValueError("zooms must not repeat")
        if len(zooms) > 7:
            raise ValueError("at most 7 zooms (each multiplies the search's work)")
        return zooms
