"""Sample images from a trained model, each reproducible from its own seed.

Every image ``i`` gets a seed derived from the run's ``--seed`` and ``i``
(recorded in the manifest).  Its starting noise -- and, for the stochastic
samplers, every noise draw along the way -- comes from a generator seeded
with that seed alone, so any single image can be regenerated from the
manifest without the rest of its batch (:func:`sample_one`).
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from synthgate.errors import UsageError

from . import seeds

SAMPLERS = ("ddim", "ddpm", "dpm")
DEFAULT_STEPS = {"ddim": 50, "dpm": 25, "ddpm": None}  # ddpm: every training timestep


@dataclass(frozen=True)
class SampleItem:
    """One image to generate: its position, class label (``None`` if unconditional), seed and,
    for attribute-conditioned models, its attributes ``((column, value), ...)``."""

    index: int
    label: str | None
    seed: int
    attributes: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None  # text-conditioned models: the prompt (recorded per image)


@dataclass(frozen=True)
class SamplerSettings:
    """How images are generated (recorded in the manifest)."""

    name: str = "ddim"
    steps: int | None = None
    eta: float = 0.0
    batch_size: int = 16

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise UsageError(f"--sampler {self.name!r} must be one of " + ", ".join(f"`{s}`" for s in SAMPLERS))
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps {self.steps} must be at least 1")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if not (self.eta >= 0 and math.isfinite(self.eta)):  # NaN passed "< 0" and sampled black images
            raise UsageError(f"--eta {self.eta} must be a finite number >= 0")

    @classmethod
    def from_manifest(cls, sampler: Mapping) -> "SamplerSettings":
        """The settings a manifest's ``sampler`` block records."""
        return cls(name=sampler["name"], steps=sampler["steps"], eta=sampler.get("eta", 0.0),
                   batch_size=sampler.get("batch_size", 16))

    def resolved_steps(self, model) -> int:
        return self.steps or DEFAULT_STEPS[self.name] or model.num_train_timesteps

    def describe(self, model) -> dict:
        return {"name": self.name, "steps": self.resolved_steps(model), "eta": self.eta,
                "batch_size": self.batch_size}


def plan(model, n: int | None = None, *, seed: int = 0, label: str | None = None,
         per_label: Mapping[str, int] | None = None, conditions: Mapping[str, str] | None = None) -> list[SampleItem]:
    """The images to generate: ``n`` class-balanced, ``n`` of one ``label``, or ``per_label`` counts.

    For an attribute-conditioned model, ``conditions`` fixes some attributes
    (``--condition birads=4``); each image draws the others from the
    training marginals with its own seed (:meth:`AttributeSpec.draw`).
    """
    if model.attributes is not None:
        return _plan_attributes(model, n, seed, label, per_label, conditions or {})
    if conditions:
        raise UsageError("--condition needs a model trained on attributes (synthgate train --conditioning "
                         f"attributes); this one was not ({model.path})")
    labels = model.labels
    if labels is None and (label is not None or per_label):
        raise UsageError("the model is unconditional: --label/--per-label cannot be used "
                         f"(it was trained without class labels; {model.path})")
    if per_label:
        if n is not None and n != sum(per_label.values()):
            raise UsageError(f"--n {n} disagrees with --per-label, which asks for {sum(per_label.values())} images")
        model.class_labels(list(per_label))  # unknown labels fail here, naming the known ones
        wanted = [str(lab) for lab, count in per_label.items() for _ in range(int(count))]
    elif n is None or n < 1:
        raise UsageError("--n must be at least 1 (or give --per-label LABEL=COUNT,...)")
    elif label is not None:
        model.class_labels([label])
        wanted = [str(label)] * n
    else:
        wanted = [labels[i % len(labels)] for i in range(n)] if labels else [None] * n
    return [SampleItem(i, lab, seeds.derive_seed(seed, f"image:{i}")) for i, lab in enumerate(wanted)]


def _plan_attributes(model, n, seed, label, per_label, conditions) -> list[SampleItem]:
    spec = model.attributes
    if per_label:
        raise UsageError("--per-label is for class-conditional models; use --condition NAME=VALUE")
    if label is not None:
        conditions = {**conditions, "label": label}
    fixed = spec.check_fixed(conditions, model.path)
    if n is None or n < 1:
        raise UsageError("--n must be at least 1")
    items = []
    for i in range(n):
        s = seeds.derive_seed(seed, f"image:{i}")
        attrs = spec.draw(fixed, seeds.derive_seed(s, "attributes"))
        items.append(SampleItem(i, attrs.get("label"), s, tuple(attrs.items())))
    return items


def _scheduler(model, settings: SamplerSettings):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}[settings.name]
    scheduler = cls.from_config(model.scheduler.config)
    scheduler.set_timesteps(settings.resolved_steps(model), device=model.device)
    return scheduler


def denoise(model, items: Sequence[SampleItem], settings: SamplerSettings):
    """Generate ``items`` as one batch; returns images ``(N, C, H, W)`` in [0, 1] on the CPU."""
    import torch

    gens = [seeds.generator(it.seed) for it in items]  # CPU: the same noise on every device
    scheduler = _scheduler(model, settings)
    x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in gens]).to(model.device)
    x = x * scheduler.init_noise_sigma
    labels = model.condition(items)
    extra = {"generator": gens} if settings.name == "ddpm" else {"generator": gens, "eta": settings.eta} \
        if settings.name == "ddim" else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model.unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
            x = scheduler.step(out, t, x, **extra).prev_sample
        return model.from_model_space(x).cpu().numpy()


def generate(model, items: Sequence[SampleItem], settings: SamplerSettings,
             progress: bool | None = None) -> Iterator[tuple[list[SampleItem], np.ndarray]]:
    """Generate ``items`` in batches, yielding ``(batch items, images)``."""
    from synthgate.progress import Progress

    with Progress(len(items), desc="sample", unit="img", enabled=progress) as bar:
        for start in range(0, len(items), settings.batch_size):
            batch = list(items[start:start + settings.batch_size])
            yield batch, denoise(model, batch, settings)
            bar.update(len(batch))


_WORKER_MODELS: dict = {}


def _cluster_batch(model_path: str, settings: SamplerSettings, device: str, threads: int | None,
                   guidance: float | None, batch: list[SampleItem]) -> np.ndarray:
    """One batch on a cluster worker (the model is loaded once per worker process)."""
    from synthgate.device import resolve_device, set_threads

    from .loading import load_model

    set_threads(threads)
    key = (model_path, device)
    if key not in _WORKER_MODELS:
        model = load_model(model_path, resolve_device(device))
        if guidance is not None:  # text models: the driver's guidance scale, exactly
            model.set_guidance(guidance)
        _WORKER_MODELS[key] = model
    return denoise(_WORKER_MODELS[key], batch, settings)


def generate_on_cluster(ray, model, items: Sequence[SampleItem], settings: SamplerSettings, *, device: str = "auto",
                        threads: int | None = None, gpus_per_task: float = 0,
                        progress: bool | None = None) -> Iterator[tuple[list[SampleItem], np.ndarray]]:
    """:func:`generate` with the batches spread over a Ray cluster's workers.

    The batches are exactly those of a single-process run (same items, same
    order, same per-image seeds), so with the same device kind and thread
    count the images are byte-identical to a single-process run (tested);
    a batch whose worker dies is re-run by Ray.
    """
    from synthgate.cluster import imap_ordered
    from synthgate.progress import Progress

    batches = [list(items[s:s + settings.batch_size]) for s in range(0, len(items), settings.batch_size)]
    guidance = float(model.unet.guidance_scale) if getattr(model, "is_text", False) else None
    results = imap_ordered(ray, _cluster_batch, batches, num_gpus=gpus_per_task,
                           shared=(str(model.path), settings, device, threads, guidance))
    with Progress(len(items), desc="sample (cluster)", unit="img", enabled=progress) as bar:
        for batch, images in zip(batches, results):
            yield batch, images
            bar.update(len(batch))


def sample_one(model, seed: int, label: str | None = None, settings: SamplerSettings | None = None,
               attributes: Mapping[str, str] | None = None) -> np.ndarray:
    """Regenerate one image from its manifest ``seed`` (and ``label`` or ``attributes``); ``(C, H, W)`` in [0, 1]."""
    attrs = None if attributes is None else tuple(dict(attributes).items())
    return denoise(model, [SampleItem(0, label, int(seed), attrs)], settings or SamplerSettings())[0]
