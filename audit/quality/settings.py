"""Settings of the ``utility`` and ``fidelity`` checks."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from audit.core.settings import CheckSettings


class UtilitySettings(CheckSettings):
    preset: Literal["auto", "cpu", "gpu"] = "auto"
    """Classifier preset: ``cpu`` (small CNN, 64 px), ``gpu`` (ResNet-50, 224 px); ``auto`` follows the device."""
    architecture: str | None = None
    """``small_cnn`` or a torchvision classification model name (default: the preset's)."""
    image_size: int | None = Field(None, ge=8)
    """Classifier input side (default: the preset's)."""
    epochs: int | None = Field(None, ge=1)
    """Training epochs (default: the preset's)."""
    batch_size: int | None = Field(None, ge=1)
    """Training batch size (default: the preset's)."""
    lr: float | None = Field(None, gt=0)
    """Learning rate (default: the preset's)."""
    weight_decay: float | None = Field(None, ge=0)
    """Weight decay (default: the preset's)."""
    repeats: int | None = Field(None, ge=1)
    """Trainings per arm (default: the preset's)."""
    weights: str | None = None
    """Local torchvision weights to start from (never downloaded)."""
    metric: Literal["auc", "f1", "precision", "recall", "accuracy"] = "auc"
    """The metric the decision compares."""
    max_drop: float = Field(0.05, ge=0, lt=1)
    """Largest shortfall of synthetic-only against real-only training."""
    n_boot: int = Field(2000, ge=100)
    """Bootstrap resamples over holdout images."""
    alpha: float = Field(0.05, gt=0, lt=0.5)
    """Level of the intervals and tests."""
    augmented: bool = True
    """Also train on real + synthetic."""
    max_images: int = Field(20000, ge=1)
    """Most images per arm (a seeded sample beyond this)."""
    batch_size_eval: int = Field(256, ge=1)
    """Images per evaluation batch."""


class FidelitySettings(CheckSettings):
    nearest_k: int = Field(5, ge=1)
    """k of the k-nearest-neighbour balls of precision/recall/density/coverage (Naeem et al. 2020)."""
    feature_size: int = Field(64, ge=8)
    """Image side for the random-CNN features and intensity tests."""
    max_images: int = Field(5000, ge=2)
    """Most images per set (a seeded sample beyond this)."""
    ssim_queries: int = Field(100, ge=1)
    """Query images of nearest-SSIM."""
    ssim_max_side: int = Field(128, ge=8)
    """Largest side at which SSIM is computed."""
    max_ssim_gap: float = Field(0.05, ge=0, le=1)
    """Largest rise of synthetic nearest-SSIM over real nearest-SSIM before a mode-collapse warning."""
    min_precision_ratio: float = Field(0.5, ge=0, le=1)
    """Precision at least this share of the real-vs-real baseline."""
    min_coverage_ratio: float = Field(0.5, ge=0, le=1)
    """Coverage at least this share of the real-vs-real baseline."""
    min_class_ratio: float = Field(0.5, ge=0, le=1)
    """Every real class at least this share as frequent among synthetic images."""
    alpha: float = Field(0.05, gt=0, lt=0.5)
    """Level of the tests."""
    intensity_effect: float = Field(0.5, ge=0)
    """Smallest standardised intensity difference worth a warning."""
    n_boot: int = Field(200, ge=10)
    """Bootstrap resamples for the PRDC intervals."""
    collapse_sources: int = Field(3, ge=1)
    """Synthetic images sharing one nearest real image before it counts as collapse."""
    inception_weights: str | None = None
    """Local Inception-v3 weights: FID, KID and IS are computed only with them."""
    max_fid: float | None = Field(None, gt=0)
    """Largest FID (null: FID is reported, not judged)."""
    kid_subsets: int = Field(100, ge=1)
    """KID subsets."""
    kid_subset_size: int = Field(1000, ge=2)
    """Images per KID subset."""
    is_splits: int = Field(10, ge=1)
    """Inception Score splits."""
