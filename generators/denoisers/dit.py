"""The DiT denoiser (:class:`generators.dit.DiTDenoiser`, diffusers' ``DiTTransformer2DModel``).

Notes
-----
Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT,
adaLN-Zero blocks).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from synthgate.errors import ConfigError

from . import Denoiser

if TYPE_CHECKING:  # pragma: no cover
    from generators.config import TrainConfig


@dataclass(frozen=True)
class DiTConfig:
    """diffusers' ``DiTTransformer2DModel`` (Peebles & Xie 2023).

    Attributes
    ----------
    patch_size
        Pixels (or latent cells) per token side.
    num_layers, num_attention_heads, attention_head_dim
        Transformer depth, heads, and width per head (hidden size is their
        product with one another: ``heads * head_dim``).
    """

    patch_size: int = 2
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"dit.{f.name} {getattr(self, f.name)} must be at least 1")

    def check_size(self, size: int, where: str = "resolution") -> None:
        if size % self.patch_size:
            raise ConfigError(f"dit.patch_size {self.patch_size} must divide the {where} {size}")


def build(config: "TrainConfig", *, channels: int, size: int, num_classes: int | None, cond_dim: int | None):
    """A :class:`~generators.dit.DiTDenoiser`; adaLN-Zero always embeds a label: unconditional is one class."""
    from ..dit import build_dit

    s = config.arch_settings
    return build_dit(sample_size=size, in_channels=channels, out_channels=channels, patch_size=s.patch_size,
                     num_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
                     attention_head_dim=s.attention_head_dim, num_embeds_ada_norm=num_classes or 1)


DIT = Denoiser(
    name="dit", folder="transformer", network="generators.dit:DiTDenoiser", build=build, settings=DiTConfig,
    refuse_attributes="conditioning `attributes` is for the unet and swin architectures: DiT's adaLN-Zero embeds "
                      "class indices only (use --conditioning class, or --architecture unet|swin)",
    presets={
        # 32 x 32, 0.39M parameters: 256 tokens of width 64, 4 layers.
        "dit-tiny": {"learning_rate": 5e-4, "lr_warmup_steps": 50},
        # DiT-B/4 (Peebles & Xie 2023, Table 1: 12 layers, hidden 768, 12 heads) on 128 x 128 pixels (1,024
        # tokens); the paper's AdamW lr 1e-4 without weight decay, EMA 0.9999. In a VAE's latent space the
        # paper's patch 2 is the usual choice (dit.patch_size).
        "dit-base": {
            "resolution": 128,
            "dit": {"patch_size": 4, "num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64},
            "learning_rate": 1e-4, "lr_warmup_steps": 0, "batch_size": 64, "steps": 100_000, "ema_decay": 0.9999,
        },
    })
