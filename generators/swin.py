"""A Swin-UNet noise estimator for DDPM: windowed attention instead of convolutions.

:class:`SwinUNetDenoiser` is the denoiser of the DDPM + Swin studies: a
U-shaped network whose encoder and decoder are stages of Swin transformer
blocks (windowed and shifted-window self-attention), joined by patch merging
on the way down, patch expanding on the way up, and skip connections between
levels of the same resolution.  The blocks and the patch merging are timm's
(``timm.models.swin_transformer``); patch expanding (Swin-UNet's, a linear
layer and a pixel shuffle) is written here.

It follows the protocol the trainer and the sampler use for diffusers'
``UNet2DModel`` -- ``net(x_t, t, class_labels=None).sample`` -- and is a
diffusers ``ModelMixin``/``ConfigMixin``, so ``save_pretrained`` /
``from_pretrained`` work on a folder (``generators.loading.load_model`` is the
documented loader of a whole model directory).

Notes
-----
Pan et al. 2023, "2D medical image synthesis using transformer-based
denoising diffusion probabilistic model" (a Swin-transformer noise
estimator); Hosseini & Serag 2025 (DDPM + Swin, three modalities); the
U-shape with patch merging / expanding and skips is Swin-UNet (Cao et al.
2021), the blocks Swin (Liu et al. 2021); after the final patch expanding a
3 x 3 convolution maps the cells to the output channels (as the DDPM UNet
ends), which lets neighbouring patches agree at their seams.  The timestep enters every block
as a learned projection of its sinusoidal embedding added to the tokens (as
the DDPM UNet adds it to every ResNet block, Ho et al. 2020); a class
embedding, or a projected conditioning vector, is added to the timestep
embedding (as ``UNet2DModel``'s ``num_class_embeds`` does).
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import nn


class PatchExpand(nn.Module):
    """Double the token grid, halving the width (Swin-UNet's patch expanding).

    A linear layer widens each token to ``factor**2 * out_dim`` and the
    channels are rearranged into a ``factor x factor`` block of tokens.
    """

    def __init__(self, dim: int, out_dim: int, factor: int = 2):
        super().__init__()
        self.factor, self.out_dim = factor, out_dim
        self.expand = nn.Linear(dim, factor * factor * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, fH, fW, out_dim)
        b, h, w, _ = x.shape
        f = self.factor
        x = self.expand(x).view(b, h, w, f, f, self.out_dim).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, h * f, w * f, self.out_dim))


class _ConditionedBlock(nn.Module):
    """A timm Swin block with the conditioning embedding added to its input tokens."""

    def __init__(self, block: SwinTransformerBlock, dim: int, emb_dim: int):
        super().__init__()
        self.block = block
        self.emb = nn.Linear(emb_dim, dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block(x + self.emb(emb)[:, None, None, :])


class _Stage(nn.Module):
    """``depth`` Swin blocks at one resolution, alternating plain and shifted windows."""

    def __init__(self, dim: int, grid: int, depth: int, heads: int, window: int, mlp_ratio: float, emb_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            _ConditionedBlock(SwinTransformerBlock(dim, (grid, grid), num_heads=heads, window_size=window,
                                                   shift_size=0 if i % 2 == 0 else window // 2,
                                                   mlp_ratio=mlp_ratio), dim, emb_dim)
            for i in range(depth))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, emb)
        return x


class SwinUNetDenoiser(ModelMixin, ConfigMixin):
    """Swin-UNet noise estimator ``(x_t, t, class_labels) -> eps`` for DDPM.

    Parameters
    ----------
    sample_size, in_channels, out_channels
        Input side and channels (pixels or latents); ``out_channels`` defaults
        to ``in_channels``.
    patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio
        See :class:`generators.config.SwinConfig` (checked there).
    num_classes
        Learned class embeddings added to the timestep embedding (``None``:
        unconditional).
    cond_dim
        Width of a float conditioning vector ``(B, cond_dim)`` passed as
        ``class_labels``, projected and added to the timestep embedding
        (0: none).

    Notes
    -----
    Cao et al. 2021 (Swin-UNet); Pan et al. 2023 and Hosseini & Serag 2025
    (Swin denoisers for DDPM).  See the module docstring.
    """

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 1, out_channels: int | None = None,
                 patch_size: int = 2, embed_dim: int = 32, depths: Sequence[int] = (2, 2, 2),
                 num_heads: Sequence[int] = (2, 4, 8), window_size: int = 4, mlp_ratio: float = 4.0,
                 num_classes: int | None = None, cond_dim: int = 0):
        super().__init__()
        out_channels = out_channels or in_channels
        depths, num_heads = tuple(depths), tuple(num_heads)
        grid = sample_size // patch_size
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        emb_dim = 4 * embed_dim
        self.time_proj = Timesteps(embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(embed_dim, emb_dim)
        self.class_embedding = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim else None
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.embed_norm = nn.LayerNorm(embed_dim)

        def stage(i):
            return _Stage(dims[i], grid // 2 ** i, depths[i], num_heads[i], window_size, mlp_ratio, emb_dim)

        self.down = nn.ModuleList(stage(i) for i in range(len(depths)))
        self.merge = nn.ModuleList(PatchMerging(dims[i], dims[i + 1]) for i in range(len(depths) - 1))
        self.expand = nn.ModuleList(PatchExpand(dims[i + 1], dims[i]) for i in range(len(depths) - 1))
        self.skip = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(len(depths) - 1))
        self.up = nn.ModuleList(stage(i) for i in range(len(depths) - 1))
        self.out_norm = nn.LayerNorm(embed_dim)
        # final patch expanding: one token -> a patch_size x patch_size block of cells with `features` channels,
        # then a 3x3 convolution to the output channels (as the DDPM UNet ends) so patch seams can be smoothed
        self.features = max(8, embed_dim // 2)
        self.out_proj = nn.Linear(embed_dim, patch_size * patch_size * self.features)
        self.out_conv = nn.Conv2d(self.features, out_channels, 3, padding=1)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' loader, building the network for real first (not on the meta device).

        timm's blocks keep their attention masks and relative-position
        indices in non-persistent buffers, which are not in the weights file:
        built on the meta device, as diffusers does by default, they would
        stay empty.
        """
        kwargs.setdefault("low_cpu_mem_usage", False)
        return super().from_pretrained(*args, **kwargs)

    def _embedding(self, t, class_labels, batch: int, dtype) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t[None]
        emb = self.time_embedding(self.time_proj(t.expand(batch)).to(dtype))
        if class_labels is None:
            if self.class_embedding is not None or self.cond_proj is not None:
                raise ValueError("this denoiser is conditional: class_labels must be given")
            return emb
        if class_labels.is_floating_point():
            if self.cond_proj is None:
                raise ValueError("a float conditioning vector was given but the denoiser has cond_dim 0")
            return emb + self.cond_proj(class_labels.to(dtype))
        if self.class_embedding is None:
            raise ValueError("class labels were given but the denoiser has no class embedding (num_classes)")
        return emb + self.class_embedding(class_labels)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """Predict the noise (or the configured target) for ``sample`` at ``timestep``."""
        b, _, h, w = sample.shape
        p = self.config.patch_size
        emb = self._embedding(timestep, class_labels, b, sample.dtype)
        x = self.embed_norm(self.patch_embed(sample).permute(0, 2, 3, 1))  # (B, H/p, W/p, D)
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(x, emb)
            if i < len(self.merge):
                skips.append(x)
                x = self.merge[i](x)
        for i in reversed(range(len(self.up))):
            x = self.skip[i](torch.cat([self.expand[i](x), skips[i]], dim=-1))
            x = self.up[i](x, emb)
        x = self.out_proj(self.out_norm(x))  # (B, H/p, W/p, p*p*F)
        f = self.features
        x = x.view(b, h // p, w // p, p, p, f).permute(0, 5, 1, 3, 2, 4).reshape(b, f, h, w)
        out = self.out_conv(nn.functional.silu(x))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


__all__ = ["SwinUNetDenoiser", "PatchExpand"]
