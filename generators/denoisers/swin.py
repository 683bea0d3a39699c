"""The Swin-UNet denoiser (:class:`generators.swin.SwinUNetDenoiser`): its settings, build and presets.

Notes
-----
Pan et al. 2023 and Hosseini & Serag 2025 (DDPM with a Swin-transformer
noise estimator); the U-shape is Swin-UNet (Cao et al. 2021).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from synthgate.errors import ConfigError

from . import Denoiser

if TYPE_CHECKING:  # pragma: no cover
    from generators.config import TrainConfig


@dataclass(frozen=True)
class SwinConfig:
    """The Swin-UNet denoiser (:class:`generators.swin.SwinUNetDenoiser`).

    Attributes
    ----------
    patch_size
        Pixels (or latent cells) per token side: the token grid is
        ``size / patch_size``.
    embed_dim
        Token width at the first level; it doubles at every patch merging.
    depths, num_heads
        Swin blocks and attention heads per level (encoder and decoder alike);
        the last level is the bottleneck.  ``embed_dim * 2**i`` must be
        divisible by ``num_heads[i]``.
    window_size
        Side of the attention windows; it must divide the token grid of every
        level whose grid is at least that large (a smaller grid is one window).
    mlp_ratio
        Width of the blocks' MLP relative to the token width.
    """

    patch_size: int = 2
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (2, 4, 8)
    window_size: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        for name in ("patch_size", "embed_dim", "window_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"swin.{name} {getattr(self, name)} must be at least 1")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ConfigError(f"swin.depths {list(self.depths)} must be one or more positive block counts")
        if len(self.num_heads) != len(self.depths):
            raise ConfigError(f"swin.num_heads has {len(self.num_heads)} entries but swin.depths has "
                              f"{len(self.depths)} levels")
        for i, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2 ** i
            if heads < 1 or width % heads:
                raise ConfigError(f"swin.num_heads[{i}] = {heads} must divide the level's width {width} "
                                  f"(swin.embed_dim * 2**{i})")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"swin.mlp_ratio {self.mlp_ratio} must be > 0")

    def check_size(self, size: int, where: str = "resolution") -> None:
        """Refuse a ``size`` the patching, merging and windows do not tile exactly."""
        if size % self.patch_size:
            raise ConfigError(f"swin.patch_size {self.patch_size} must divide the {where} {size}")
        grid = size // self.patch_size
        levels = len(self.depths)
        if grid % 2 ** (levels - 1):
            raise ConfigError(f"the token grid {grid} ({where} {size} / swin.patch_size {self.patch_size}) must be "
                              f"divisible by {2 ** (levels - 1)} for {levels} levels (swin.depths)")
        for i in range(levels):
            g = grid // 2 ** i
            if g >= self.window_size and g % self.window_size:
                raise ConfigError(f"swin.window_size {self.window_size} does not divide the {g} x {g} token grid "
                                  f"of level {i} ({where} {size})")


def build(config: "TrainConfig", *, channels: int, size: int, num_classes: int | None, cond_dim: int | None):
    """A :class:`~generators.swin.SwinUNetDenoiser`; an attribute vector is projected into its timestep embedding."""
    from ..swin import SwinUNetDenoiser

    s = config.arch_settings
    return SwinUNetDenoiser(sample_size=size, in_channels=channels, patch_size=s.patch_size, embed_dim=s.embed_dim,
                            depths=s.depths, num_heads=s.num_heads, window_size=s.window_size,
                            mlp_ratio=s.mlp_ratio, num_classes=num_classes, cond_dim=cond_dim or 0)


def condition_width(config: "TrainConfig") -> int:
    return 4 * config.arch_settings.embed_dim  # the Swin denoiser's timestep-embedding width


# Measured, see tests/test_generators_transformers.py::test_dp_swin_is_refused_and_opacus_really_fails.
DP_REFUSED = (
    "dp: opacus cannot train architecture 'swin' privately: it refuses timm's WindowAttention (its "
    "relative_position_bias_table is indexed through a buffer; opacus 1.6 rejects such layers in hooks and "
    "functorch modes), and the window partition folds windows into the batch dimension; use 'dit' or 'unet'")

SWIN = Denoiser(
    name="swin", folder="denoiser", network="generators.swin:SwinUNetDenoiser", build=build, settings=SwinConfig,
    condition_width=condition_width, refuse_dp=DP_REFUSED,
    presets={
        # 32 x 32, 0.85M parameters: three levels (token grids 16, 8, 4) with 4 x 4 windows.
        "swin-tiny": {"learning_rate": 5e-4, "lr_warmup_steps": 50},
        # 128 x 128: Swin-UNet's Swin-T layout (Cao et al. 2021: embed 96, depths 2-2-2-2, heads 3-6-12-24),
        # patch 2 and window 8 so the 64/32/16/8 token grids tile; optimisation as the UNet base preset.
        "swin-base": {
            "resolution": 128,
            "swin": {"patch_size": 2, "embed_dim": 96, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24),
                     "window_size": 8, "mlp_ratio": 4.0},
            "learning_rate": 1e-4, "lr_schedule": "cosine", "lr_warmup_steps": 500, "weight_decay": 1e-6,
            "batch_size": 64, "steps": 50_000, "ema_decay": 0.9999,
        },
    })
