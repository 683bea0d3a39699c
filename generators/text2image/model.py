"""A fine-tuned text-to-image model: the U-Net behind the denoiser call, loading, and prompts for sampling.

:func:`wrap_unet` puts a ``UNet2DConditionModel`` behind the
``(x_t, t, class_labels)`` call the trainer, the sampler and the attacks
make, with classifier-free guidance when sampling.
:class:`TextDiffusionModel` is a :class:`~generators.model.DiffusionModel`
whose conditions are caption embeddings; :func:`load_text_model` reads a
model directory whose ``synthgate.json`` has ``conditioning.type == "text"``
(:func:`generators.loading.load_model` sends those here).

Notes
-----
Ho & Salimans 2022 (classifier-free guidance):
``eps = eps_uncond + w (eps_cond - eps_uncond)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from synthgate.errors import InputError, UsageError

from ..model import DiffusionModel
from .base import load_part, load_text_components
from .captions import build_captions, template_fields


def wrap_unet(unet, uncond=None, pooled_dim: int | None = None):
    """``unet`` (a ``UNet2DConditionModel``) behind the ``(x_t, t, class_labels)`` call the trainer makes.

    ``class_labels`` carries text embeddings.  With ``guidance_scale != 1``
    (sampling) the conditional and unconditional predictions come from one
    doubled batch and are combined as in classifier-free guidance.
    """
    return _wrapper_class()(unet, uncond, pooled_dim)


_WRAPPER = None


def _wrapper_class():
    global _WRAPPER
    if _WRAPPER is None:
        import torch

        class TextConditionedUNet(torch.nn.Module):
            def __init__(self, unet, uncond=None, pooled_dim=None):
                super().__init__()
                self.unet = unet
                self.uncond = uncond
                self.pooled_dim = pooled_dim
                self.guidance_scale = 1.0

            @property
            def config(self):
                return self.unet.config

            @property
            def dtype(self):
                return self.unet.dtype

            def _unet(self, sample, timestep, emb):
                if self.pooled_dim is None:
                    return self.unet(sample, timestep, encoder_hidden_states=emb)
                p, extra = self.pooled_dim, emb[:, -1]  # SDXL: unpack PromptEncoder's extra row
                return self.unet(sample, timestep, encoder_hidden_states=emb[:, :-1],
                                 added_cond_kwargs={"text_embeds": extra[:, :p], "time_ids": extra[:, p:p + 6]})

            def forward(self, sample, timestep, class_labels=None):
                g = self.guidance_scale
                if g == 1.0 or self.training:
                    return self._unet(sample, timestep, class_labels)
                n = sample.shape[0]
                t = torch.as_tensor(timestep, device=sample.device)
                t = torch.cat([t, t]) if t.ndim else t
                emb = torch.cat([self.uncond.to(class_labels.dtype).expand(n, -1, -1), class_labels])
                out = self._unet(torch.cat([sample, sample]), t, emb).sample
                uncond, cond = out.chunk(2)
                return SimpleNamespace(sample=uncond + g * (cond - uncond))

        _WRAPPER = TextConditionedUNet
    return _WRAPPER


@dataclass
class TextDiffusionModel(DiffusionModel):
    """A fine-tuned text-to-image model: :class:`DiffusionModel` whose conditions are caption embeddings.

    ``unet`` is the wrapped U-Net (:func:`wrap_unet`), so ``predict_eps``
    and :func:`generators.sample.denoise` work unchanged; ``guidance_scale``
    (:meth:`set_guidance`) applies to sampling only.
    """

    prompts: Any = None  # PromptEncoder
    _embeddings: dict = field(default_factory=dict, repr=False)

    is_text = True

    @property
    def conditioning(self) -> dict:
        return self.info["conditioning"]

    @property
    def labels(self) -> list[str] | None:
        labels = self.conditioning.get("labels")
        return list(labels) if labels else None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = int(self.info["vae"]["latent_size"])
        return int(self.unet.config.in_channels), size, size

    def set_guidance(self, scale: float) -> float:
        """Classifier-free guidance scale for sampling (1: the conditional prediction alone)."""
        if not scale >= 0:
            raise UsageError(f"--guidance-scale {scale} must be >= 0")
        self.unet.guidance_scale = float(scale)
        return float(scale)

    def caption(self, label: str | None) -> str:
        """The training caption of ``label`` (the empty prompt when the model has none for it).

        A template that uses columns besides ``label`` has no caption per
        label: attacks then query the unconditional prediction.
        """
        by_label = self.conditioning.get("caption_by_label")
        if not by_label:
            fields = template_fields(self.conditioning["template"])
            return self.conditioning["template"] if not fields else ""
        if label is None:
            return ""
        if str(label) not in by_label:
            raise InputError(f"label {label!r} is not one the model knows ({', '.join(by_label)})", self.path)
        return by_label[str(label)]

    def embed(self, prompts: Sequence[str]):
        """Text embeddings of ``prompts`` on the model's device (cached per prompt)."""
        import torch

        todo = sorted({p for p in prompts if p not in self._embeddings})
        if todo:
            for p, e in zip(todo, self.prompts(todo)):
                self._embeddings[p] = e
        return torch.stack([self._embeddings[p] for p in prompts]).to(self.device)

    def class_labels(self, labels):
        """Label strings -> the embeddings of their training captions (what the attacks condition on)."""
        return self.embed([self.caption(v) for v in labels])

    def condition_records(self, records):
        """Real images -> the embeddings of the captions they were (or would have been) trained with.

        The template is filled from each image's own ``metadata.csv`` values;
        when the set lacks a column the template uses, each image gets its
        label's caption (the unconditional prediction if there is none).
        """
        template = self.conditioning["template"]
        fields = template_fields(template)
        if all(r.values().get(f) not in (None, "") for r in records for f in fields):
            return self.embed(build_captions(template, records))
        return self.class_labels([r.label for r in records])

    def condition(self, items):
        """Embeddings of each sample item's prompt (its label's caption unless it carries its own)."""
        return self.embed([it.prompt if it.prompt is not None else self.caption(it.label)
                           for it in items])


def load_text_model(path: Path, info: dict, device) -> TextDiffusionModel:
    """Load a text-to-image model directory (``conditioning.type == "text"``) onto ``device``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    device = torch.device(device)
    unet = load_part(UNet2DConditionModel, path / "unet", "U-Net").to(device).eval().requires_grad_(False)
    scheduler = load_part(DDPMScheduler, path / "scheduler", "scheduler")
    vae = load_part(AutoencoderKL, path / "vae", "VAE").to(device).eval().requires_grad_(False)
    prompts = load_text_components(path, device, int(info["resolution"]))
    model = TextDiffusionModel(path, wrap_unet(unet, pooled_dim=prompts.pooled_dim).eval(), scheduler, vae, info,
                               device, prompts)
    model.unet.uncond = model.embed([""])[0:1]
    return model


def prompt_items(model: TextDiffusionModel, items, prompt: str | None, label_given: bool) -> list:
    """Attach each planned image's prompt: ``--prompt``, else its label's caption, else a training caption."""
    if prompt is not None:
        return [replace(it, label=it.label if label_given else None, prompt=prompt) for it in items]
    if model.labels is not None:
        return [replace(it, prompt=model.caption(it.label)) for it in items]
    captions = model.conditioning["captions"]
    return [replace(it, prompt=captions[it.index % len(captions)]) for it in items]


__all__ = ["wrap_unet", "TextDiffusionModel", "load_text_model", "prompt_items"]
