"""The UNet denoiser: diffusers' ``UNet2DModel`` (Ho et al. 2020), the default architecture.

Its settings are the config's top-level ``block_out_channels``,
``layers_per_block``, ``attention``, ``mid_attention`` and
``norm_num_groups`` (they were there before architectures were a choice, so
it has no settings block).  A UNet model directory is a diffusers
``DDPMPipeline``: ``DiffusionPipeline.from_pretrained(MODEL)`` loads it anywhere.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from synthgate.errors import ConfigError

from . import Denoiser

if TYPE_CHECKING:  # pragma: no cover
    from generators.config import TrainConfig


def build(config: "TrainConfig", *, channels: int, size: int, num_classes: int | None, cond_dim: int | None):
    """A ``UNet2DModel`` for ``channels x size x size`` inputs.

    Class conditioning uses the UNet's learned class embedding
    (``num_class_embeds``), added to the timestep embedding; an attribute
    vector (``cond_dim``) goes where the class embedding would
    (``class_embed_type="identity"``).
    """
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        down_block_types=down, up_block_types=up, add_attention=config.mid_attention,
        norm_num_groups=config.norm_num_groups, num_class_embeds=num_classes,
        class_embed_type="identity" if cond_dim is not None else None,
        attention_head_dim=min(8, min(config.block_out_channels)),
    )


def condition_width(config: "TrainConfig") -> int:
    return 4 * config.block_out_channels[0]  # UNet2DModel's timestep embedding is 4x the first level's width


def check_config(config: "TrainConfig") -> None:
    levels = len(config.block_out_channels)
    if config.resolution % 2 ** (levels - 1):
        raise ConfigError(f"resolution {config.resolution} must be divisible by {2 ** (levels - 1)} ({levels} levels)")


def check_size(config: "TrainConfig", size: int, where: str) -> None:
    """Nothing beyond :func:`check_config` (the resolution is checked whatever the space)."""


UNET = Denoiser(
    name="unet", folder="unet", network="diffusers:UNet2DModel", build=build, condition_width=condition_width,
    check_size=check_size, check_config=check_config, ddpm_pipeline=True,
    presets={
        # On phantoms it draws recognisable anatomy after 400 steps (measured; see the issue note).
        "tiny": {},
        # The diffusers unconditional DDPM example (train_unconditional.py) at 128 x 128.
        "base": {
            "resolution": 128,
            "block_out_channels": (128, 128, 256, 256, 512, 512),
            "layers_per_block": 2,
            "attention": (False, False, False, False, True, False),
            "mid_attention": True,
            "norm_num_groups": 32,
            "learning_rate": 1e-4,
            "lr_schedule": "cosine",
            "lr_warmup_steps": 500,
            "weight_decay": 1e-6,
            "batch_size": 64,
            "steps": 50_000,
            "ema_decay": 0.9999,
        },
    })
