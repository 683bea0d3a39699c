"""Settings of the ``reidentification`` check."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from audit.core.settings import CheckSettings

#: the network presets' batch size and views (kept in step with reidentification.network.PRESETS)
_PRESET_BATCH_VIEWS = {"cpu": (64, 4), "gpu": (128, 4)}


class ReidentificationSettings(CheckSettings):
    preset: Literal["auto", "cpu", "gpu"] = "auto"
    """Network preset: ``cpu`` (compact ResNet, 64 px), ``gpu`` (ResNet-50, 224 px); ``auto`` follows the device."""
    backbone: str | None = None
    """``compact`` or a torchvision classification model name (default: the preset's)."""
    image_size: int | None = Field(None, ge=16)
    """Network input side (default: the preset's)."""
    embedding_dim: int | None = Field(None, ge=2)
    """Embedding dimensions (default: the preset's)."""
    epochs: int | None = Field(None, ge=1)
    """Most training epochs (default: the preset's, 100); early stopping usually ends training sooner."""
    patience: int = Field(5, ge=0)
    """Stop when the validation AUC has not improved for this many epochs (0: train ``epochs`` epochs)."""
    min_delta: float = Field(0.001, ge=0, le=1)
    """Smallest rise of the validation AUC that counts as an improvement."""
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the training identities (real and attacker data) set aside to decide when to stop training."""
    max_validation_identities: int = Field(100, ge=2)
    """Most identities set aside for validation (each validation costs one embedding pass over them)."""
    step_budget_per_image: float = Field(0.5, ge=0)
    """Most optimizer steps of network training per training image (0: no step budget): a compute budget that
    scales with the set and, counted in steps rather than seconds, gives the same network on any machine."""
    min_step_budget: int = Field(200, ge=1)
    """Steps of training allowed however small the training set."""
    time_budget_per_image: float = Field(0.0, ge=0)
    """Also stop after this many seconds of training per training image (0, the default: no wall-clock budget; a
    wall-clock budget makes the network, and so the verdict, depend on the machine's speed and load)."""
    min_time_budget: float = Field(60.0, ge=0)
    """With a wall-clock budget: seconds of training allowed however small the training set."""
    batch_size: int | None = Field(None, ge=2)
    """Images per training batch, at least 2 x views (default: the preset's)."""
    views: int | None = Field(None, ge=2)
    """Images (or augmented views) per identity in a batch (default: the preset's)."""
    lr: float | None = Field(None, gt=0)
    """Learning rate (default: the preset's)."""
    backbone_weights: str | None = None
    """Local torchvision weights for the backbone (.safetensors/.pt/.pth); never downloaded."""
    false_match_rate: float = Field(0.01, gt=0, lt=0.5)
    """False-match rate on unseen patients that the conformal threshold guarantees."""
    calibration_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the real set's patients set aside for calibration when the holdout cannot serve."""
    control_images: int = Field(100, ge=1)
    """Images in each positive control (augmented training images, new images of training patients)."""
    min_auc: float = Field(0.8, ge=0, le=1)
    """Verification AUC on unseen patients the attacker must reach, else the check is inconclusive."""
    min_reid_rate: float = Field(0.5, ge=0, le=1)
    """Share of each positive control the attacker must re-identify."""
    fail_on: Literal["excess", "any"] = "excess"
    """Fail on significantly more matches than the false-match rate explains, or on any match."""
    significance: float = Field(0.05, gt=0, lt=1)
    """Level of the excess test."""
    n_boot: int = Field(1000, ge=0)
    """Bootstrap resamples for the intervals."""
    max_pairs: int = Field(200_000, ge=1)
    """Most verification pairs scored."""
    embed_batch_size: int = Field(256, ge=1)
    """Images per embedding batch."""

    @model_validator(mode="after")
    def _batch_holds_views(self):
        presets = [self.preset] if self.preset != "auto" else list(_PRESET_BATCH_VIEWS)
        for name in presets:
            batch, views = _PRESET_BATCH_VIEWS[name]
            batch, views = self.batch_size or batch, self.views or views
            if batch < 2 * views:
                raise ValueError(f"batch_size must be at least 2 x views (got batch_size {batch}, views {views}"
                                 + (f" with the {name} preset" if self.preset == "auto" else "") + ")")
        return self
