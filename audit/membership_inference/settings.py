"""Settings of the ``membership_inference`` check."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from audit.core.settings import CheckSettings

from .registry import attack_names

SYNTHETIC_ATTACKS = ("dcr_pixel", "dcr_embedding", "domias")
MODEL_ATTACKS = ("loss", "pia", "secmi", "sima", "pfami", "mirror")

Timestep = Annotated[int, Field(ge=0)]


class MembershipInferenceSettings(CheckSettings):
    max_auc: float | None = Field(0.6, ge=0.5, lt=1)
    """Largest ROC AUC the strongest attack may reach (null: no AUC limit)."""
    max_tpr_at_1pct_fpr: float | None = Field(0.05, ge=0, lt=1)
    """Largest TPR at 1% FPR (Carlini et al. 2022: low-FPR TPR is what matters; null: no limit)."""
    max_tpr_at_0_1pct_fpr: float | None = Field(None, ge=0, lt=1)
    """Largest TPR at 0.1% FPR (null: no limit)."""
    judge: Literal["point", "interval"] = "point"
    """Pass on point estimates within the limits, or only when every simultaneous upper bound is."""
    n_samples: int = Field(1000, ge=4)
    """Members and non-members drawn (each at most the set's size)."""
    n_boot: int = Field(1000, ge=100)
    """Bootstrap resamples for the intervals."""
    n_permutations: int = Field(2000, ge=100)
    """Null control: random relabellings of patients (all of them when there are fewer)."""
    alpha: float = Field(0.05, gt=0, lt=0.5)
    """Level of the intervals; the simultaneous ones use alpha / k over k attacks (Bonferroni)."""
    control_alpha: float = Field(0.01, gt=0, lt=0.5)
    """Level of the negative controls' intervals."""
    synthetic_attacks: list[str] = list(SYNTHETIC_ATTACKS)
    """Scenario 1 (synthetic images released) attacks, by registered name."""
    model_attacks: list[str] = list(MODEL_ATTACKS)
    """Scenario 2 (model released) attack families, by registered name."""
    run_model_attacks: bool = True
    """Run scenario 2 when a model is given."""
    dcr_grid: int = Field(1, ge=1, le=64)
    """Grid of the pixel DCR distance (1 = whole-image RMS; 4 = Carlini's tiled distance)."""
    embedding_weights: str | None = None
    """Local open_clip weights for the embedding attacks (default: a seeded random CNN)."""
    density_dims: int = Field(5, ge=1)
    """PCA dimensions of DOMIAS' density estimates."""
    timesteps: list[Timestep] = [50, 100, 200, 300]
    """Timesteps of the loss attack (Carlini et al. 2023)."""
    noise_draws: int = Field(4, ge=1)
    """Noise draws per image and timestep of the loss attack."""
    pia_timesteps: list[Annotated[int, Field(ge=1)]] = [100, 200]
    """Timesteps of PIA (Kong et al. 2024)."""
    pia_p: float = Field(4.0, gt=0)
    """Norm of PIA's discrepancy."""
    secmi_t: int = Field(100, ge=1)
    """SecMI's attack timestep (Duan et al. 2023)."""
    secmi_k: int = Field(10, ge=1)
    """SecMI's step size."""
    sima_timesteps: list[Timestep] = [10, 50, 100]
    """Timesteps of SimA (Rao et al. 2025): the clean image queried as if at timestep t."""
    sima_p: float = Field(4.0, gt=0)
    """Norm of SimA's statistic."""
    pfami_timesteps: list[Timestep] = [50, 100]
    """Timesteps of PFAMI's fluctuation (Fu et al. 2024)."""
    pfami_strengths: list[Annotated[float, Field(gt=0, lt=1)]] = [0.95, 0.9, 0.85, 0.8]
    """Centre-crop strengths of PFAMI's neighbours (each crop resized back to the image size)."""
    pfami_draws: int = Field(2, ge=1)
    """Noise draws per image and timestep of PFAMI and ``mirror`` (shared by the image and its neighbours)."""
    mirror_timesteps: list[Timestep] = [50, 100]
    """Timesteps of the ``mirror`` fluctuation (neighbours: the image flipped left-right, upside down, both)."""
    resize_for_model: bool = False
    """Resize the real images to the model's resolution for the model attacks, for a model whose record does not say
    its trainer did (a synthgate-trained model's ``synthgate.json`` does: then it is applied by default)."""
    batch_size: int = Field(64, ge=1)
    """Images per batch."""
    query_chunk_mb: int = Field(256, ge=1)
    """Memory for one chunk of evaluated images (MB)."""
    model_batch_rows: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    """Rows per model forward pass ('auto': by device)."""
    control_fraction: float = Field(0.5, gt=0, le=1)
    """Share of members planted as near-copies in the synthetic-set control."""
    control_model: bool = True
    """Validate the model attacks on a tiny model overfit on a few real images."""
    control_model_images: int = Field(8, ge=1)
    """Members of the control model."""
    control_model_nonmembers: int = Field(56, ge=1)
    """Non-members scored against the control model."""
    control_model_resolution: int = Field(16, ge=4)
    """Side of the control model's images."""
    control_model_steps: int = Field(150, ge=1)
    """Training steps of the control model."""

    @field_validator("synthetic_attacks", "model_attacks")
    @classmethod
    def _registered(cls, names: list[str], info) -> list[str]:
        scenario = 1 if info.field_name == "synthetic_attacks" else 2
        allowed = attack_names(scenario)
        for name in names:
            if name not in allowed:
                raise ValueError(f"{name!r} is not a registered scenario-{scenario} attack; "
                                 f"allowed: {', '.join(allowed)}")
        return names

    @model_validator(mode="after")
    def _secmi(self):
        if self.secmi_t <= self.secmi_k:
            raise ValueError(f"secmi_t ({self.secmi_t}) must be larger than secmi_k ({self.secmi_k})")
        return self
