"""A loaded synthgate model: the denoiser, its noise schedule, and the space it works in.

A model directory loads with diffusers' ``DiffusionPipeline.from_pretrained``
and carries ``synthgate.json`` (the contract in DESIGN.md);
:func:`generators.loading.load_model` reads it back into a
:class:`DiffusionModel`, which the sampler and the membership-inference
attacks share: it knows how to bring images in [0, 1] into the space the
denoiser works in (pixels in [-1, 1], or scaled VAE latents) and how to ask
the denoiser for its noise prediction whatever its ``prediction_type``.

Layout::

    MODEL/
      model_index.json     # diffusers pipeline index (UNet models only)
      unet/                # UNet2DModel (config.json + weights), or the folder another architecture's
      denoiser/            #   registry entry names (generators.denoisers): generators.swin.SwinUNetDenoiser
      transformer/         #   ("swin"), generators.dit.DiTDenoiser, a DiTTransformer2DModel ("dit")
      scheduler/           # the training noise schedule (DDPMScheduler config)
      vae/                 # AutoencoderKL, latent models only
      condition/           # AttributeEncoder, attribute-conditioned models only
      synthgate.json       # provenance: training set digest, counts, labels, seed, steps, DP, versions,
                           # and "architecture" (name, folder, class; absent in older UNet models)

``DiffusionModel.unet`` is the denoiser whatever its architecture: every one
is called as ``unet(x_t, t, class_labels).sample``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthgate.errors import InputError


@dataclass
class DiffusionModel:
    """A trained denoiser with its schedule (and VAE for latent models)."""

    path: Path
    unet: Any
    scheduler: Any
    vae: Any | None
    info: dict  # synthgate.json
    device: Any

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def resolution(self) -> int:
        """Side of the images the model was trained on, in pixels."""
        return int(self.info["resolution"])

    @property
    def image_channels(self) -> int:
        return int(self.info["image_channels"])

    @property
    def labels(self) -> list[str] | None:
        cond = self.info.get("conditioning") or {}
        return list(cond["labels"]) if cond.get("type") == "class" else None

    @property
    def attributes(self):
        """The conditioning columns (:class:`~generators.conditioning.AttributeSpec`), or ``None``."""
        cond = self.info.get("conditioning") or {}
        if cond.get("type") != "attributes":
            return None
        from .conditioning import AttributeSpec

        return AttributeSpec.from_dict(cond)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self):
        return self.scheduler.alphas_cumprod.to(self.device)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    def class_labels(self, labels) -> Any:
        """Label strings -> class indices on the device (``None`` for unconditional models)."""
        import torch

        if self.labels is None:
            return None
        index = {name: i for i, name in enumerate(self.labels)}
        unknown = sorted({str(v) for v in labels} - set(index))
        if unknown:
            raise InputError(f"label {unknown[0]!r} is not one the model knows ({', '.join(self.labels)})", self.path)
        return torch.tensor([index[str(v)] for v in labels], device=self.device, dtype=torch.long)

    def attribute_vectors(self, rows) -> Any:
        """Attribute rows (``{column: value}``) -> the attribute encoder's inputs on the device."""
        import torch

        return torch.as_tensor(self.attributes.encode_rows(rows, self.path), device=self.device)

    def condition(self, items) -> Any:
        """The denoiser's conditioning input for sample items (class, attributes, or ``None``)."""
        if self.attributes is not None:
            return self.attribute_vectors([dict(it.attributes or ()) for it in items])
        return self.class_labels([it.label for it in items])

    def condition_records(self, records) -> Any:
        """The conditioning input for real images (:class:`~synthgate.imageset.ImageRecord`), e.g. for attacks."""
        if self.attributes is not None:
            return self.attribute_vectors([r.values() for r in records])
        return self.class_labels([r.label for r in records])

    def to_model_space(self, images) -> Any:
        """Images ``(N, C, H, W)`` in [0, 1] -> the denoiser's x0 (pixels in [-1, 1] or scaled latents)."""
        import torch

        x = torch.as_tensor(images, dtype=torch.float32, device=self.device)
        if x.shape[1] != self.image_channels or x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise InputError(
                f"images of shape {tuple(x.shape[1:])} do not match the model's "
                f"{self.image_channels}x{self.resolution}x{self.resolution}", self.path)
        x = x * 2.0 - 1.0
        if self.vae is None:
            return x
        if x.shape[1] == 1 and self.vae.config.in_channels == 3:  # gray data through an RGB VAE
            x = x.repeat(1, 3, 1, 1)
        with torch.no_grad():
            latents = self.vae.encode(x).latent_dist.mean
        return latents * self.scaling_factor

    @property
    def scaling_factor(self) -> float:
        """Latents are multiplied by this before the denoiser sees them (1 for pixel models)."""
        if self.vae is None:
            return 1.0
        return float((self.info.get("vae") or {}).get("scaling_factor", self.vae.config.scaling_factor))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the denoiser's input (pixels, or latents), from ``synthgate.json``."""
        if self.vae is None:
            return self.image_channels, self.resolution, self.resolution
        cfg = self.vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        size = (self.info.get("vae") or {}).get("latent_size", self.resolution // factor)
        return int(cfg.latent_channels), int(size), int(size)

    @property
    def architecture(self) -> str:
        """The registered architecture's name (``unet``, ``swin``, ``dit``; see :mod:`generators.denoisers`)."""
        return architecture_name(self.info)

    def from_model_space(self, x0) -> Any:
        """The denoiser's x0 -> images ``(N, C, H, W)`` in [0, 1] (inverse of :meth:`to_model_space`)."""
        import torch

        x = x0
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.decode(x0.to(self.vae.dtype) / self.scaling_factor).sample
            if x.shape[1] == 3 and self.image_channels == 1:  # BT.601 luma, as synthgate.imageio reads RGB
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def predict_eps(self, x_t, t, class_labels=None):
        """The model's noise prediction at ``x_t``, timestep(s) ``t``, converted to epsilon."""
        import torch

        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.unet(x_t, t, class_labels=class_labels).sample
        if self.prediction_type == "epsilon":
            return out
        a = self.alphas_cumprod[t].view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * x_t
        if self.prediction_type == "sample":
            return (x_t - a.sqrt() * out) / (1 - a).sqrt()
        raise InputError(f"prediction_type {self.prediction_type!r} is not supported", self.path)


def architecture_name(info: dict) -> str:
    """The denoiser's architecture from ``synthgate.json`` (models written before there was a choice: ``unet``)."""
    return str((info.get("architecture") or {}).get("name", "unet"))
