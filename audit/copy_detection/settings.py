"""Settings of the ``copy_detection`` check."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from audit.core.settings import CheckSettings

RULES = ("auto", "absolute", "calibrated", "holdout", "any")


class CopyDetectionSettings(CheckSettings):
    threshold: float = Field(0.15, gt=0, lt=1)
    """Fixed tiled-distance threshold of the ``absolute`` rule (Carlini et al. 2023; MediSyn's 0.15)."""
    grid: int = Field(4, ge=1, le=64)
    """Tiles per side of the tiled distance (4 = Carlini's 4 x 4 grid)."""
    pool: int = Field(8, ge=1, le=64)
    """Pooling blocks per tile side in the search's lower bound (speed only; results are exact)."""
    rule: Literal["auto", "absolute", "calibrated", "holdout", "any"] = "auto"
    """Decision rule: ``holdout`` calibrates on unseen real images, ``auto`` = holdout when given, else absolute."""
    alpha: float = Field(0.5, gt=0)
    """Carlini's calibrated distance: nearest / (alpha x mean distance of the n nearest)."""
    n_neighbors: int = Field(50, ge=1)
    """Neighbours averaged by the calibrated distance (Carlini et al.: 50)."""
    holdout_quantile: float = Field(0.01, gt=0, lt=0.5)
    """Conformal quantile of unseen images' distances: the false-alarm rate the holdout rule allows."""
    control_copies: int = Field(10, ge=0)
    """Planted near-copies the rule must catch (0 disables the control, which then fails)."""
    synthetic_duplicates: bool = True
    """Also look for near-duplicates inside the synthetic set (Carlini's clique signal)."""
    training_duplicates: bool = True
    """Also look for near-duplicates inside the training set (a curation problem)."""
    max_duplicate_queries: int = Field(5000, ge=1)
    """Most images queried by each duplicate search (a seeded sample beyond this)."""
    query_chunk_mb: int = Field(1024, ge=1)
    """Memory for one chunk of query images (MB)."""
    batch_size: int = Field(64, ge=1)
    """Images decoded per batch."""
    embedding_weights: str | None = None
    """Local open_clip weights: embedding retrieval as extra evidence, never instead of the exact search."""
    engine: Literal["torch", "faiss"] = "torch"
    """First stage of the exact search: torch bounds (default) or a faiss flat index."""
