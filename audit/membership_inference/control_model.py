"""A deliberately overfit tiny diffusion model: the positive control of the model attacks.

This is a *control fixture*, not a trainer (``generators`` trains real
models).  :func:`overfit_model` trains a tiny ``UNet2DModel`` on a handful of
images until it has memorised them, and :func:`save_model_dir` writes it in
the model-directory layout :func:`generators.loading.load_model` reads
(``DDPMPipeline.save_pretrained`` plus ``synthgate.json``), so the control
goes through the same loading and attack code as the audited model.  Tests
use the same helpers to build small models with known members.

A control model memorises real images: it is kept only in the local model
cache (the machine that already holds the data), never in an output.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

CONTROL_VERSION = 1
CACHE_PURPOSE = "membership control model cache"


def tiny_unet(resolution: int, channels: int, n_classes: int | None = None, widths: Sequence[int] = (16, 32),
              seed: int = 0):
    """A small two-level ``UNet2DModel`` without attention (class-conditional when ``n_classes``)."""
    import torch
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global generator: leave it as it was
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=1,
            block_out_channels=tuple(widths), down_block_types=("DownBlock2D",) * len(widths),
            up_block_types=("UpBlock2D",) * len(widths), norm_num_groups=min(8, widths[0]),
            num_class_embeds=n_classes,
        )


def overfit_model(images01: np.ndarray, scheduler, class_labels: np.ndarray | None = None, n_classes: int | None = None,
                  steps: int = 200, lr: float = 2e-3, batch: int = 32, widths: Sequence[int] = (16, 32),
                  seed: int = 0, max_timestep: int | None = None, device="cpu"):
    """Train a tiny UNet on ``images01`` (``(N, C, S, S)`` in [0, 1]) until it memorises them.

    Standard DDPM training (Ho et al. 2020) with the target ``scheduler``'s
    ``prediction_type``, timesteps uniform over the whole schedule, the few
    images repeated to fill each batch, Adam at a high learning rate.
    ``max_timestep`` limits training to timesteps ``0..max_timestep``.
    Returns the trained UNet in eval mode.
    """
    import torch

    x0 = torch.as_tensor(images01, dtype=torch.float32, device=device) * 2.0 - 1.0
    n, c, s = x0.shape[0], x0.shape[1], x0.shape[-1]
    unet = tiny_unet(s, c, n_classes, widths, seed).to(device).train()
    labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    reps = max(1, batch // n)
    steps_total = int(scheduler.config.num_train_timesteps)
    if max_timestep is not None:  # a control only needs to memorise where it is attacked: train there
        steps_total = min(steps_total, int(max_timestep) + 1)
    for _ in range(steps):
        xb = x0.repeat(reps, 1, 1, 1)
        lb = None if labels is None else labels.repeat(reps)
        t = torch.randint(0, steps_total, (len(xb),), generator=g).to(device)
        noise = torch.randn(xb.shape, generator=g).to(device)
        xt = scheduler.add_noise(xb, noise, t)
        out = unet(xt, t, class_labels=lb).sample
        loss = (out - _target(scheduler, xb, noise, t)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return unet.eval().requires_grad_(False)


def _target(scheduler, x0, noise, t):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0  # "sample"


def save_model_dir(path: str | Path, unet, scheduler, labels: Sequence[str] | None = None, extra: dict | None = None) -> Path:
    """Write a model directory that :func:`generators.loading.load_model` reads (written atomically)."""
    from diffusers import DDPMPipeline

    from synthgate.fsutil import atomic_directory

    path = Path(path)
    info = {
        "resolution": int(unet.config.sample_size), "image_channels": int(unet.config.in_channels),
        "conditioning": {"type": "class", "labels": [str(v) for v in labels]} if labels else {"type": "none"},
        **(extra or {}),
    }
    with atomic_directory(path, overwrite=True) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
        (tmp / "synthgate.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return path


def control_key(images01: np.ndarray, labels: Sequence[str] | None, classes: Sequence[str] | None,
                scheduler_config: dict, settings: dict) -> str:
    """Cache key: the exact pixels, labels, classes, schedule and training settings of a control model."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images01, np.float32).tobytes())
    h.update(json.dumps({"labels": list(labels) if labels else None, "classes": list(classes) if classes else None,
                         "version": CONTROL_VERSION,
                         "scheduler": {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")},
                         "settings": settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def control_model(images01: np.ndarray, labels: Sequence[str] | None, classes: Sequence[str] | None,
                  scheduler_config: dict, settings: dict, device, cache: Path | None):
    """The overfit control model for these images, from the cache or trained now (seconds on a CPU).

    ``labels`` (one per image) and ``classes`` (every label it may be asked
    about) make it class-conditional, as the audited model is.
    Returns ``(DiffusionModel, from_cache)``.
    """
    from diffusers import DDPMScheduler

    from generators.loading import load_model
    from synthgate.cache import folder_is_sealed, seal_folder

    classes = sorted({str(c) for c in classes}) if labels else None
    key = control_key(images01, labels, classes, scheduler_config, settings)
    folder = None if cache is None else Path(cache) / key
    if folder is not None and (folder / "synthgate.json").exists() and folder_is_sealed(folder, CACHE_PURPOSE):
        return load_model(folder, device), True
    scheduler = DDPMScheduler.from_config(dict(scheduler_config))
    index = None if classes is None else np.array([classes.index(str(v)) for v in labels])
    unet = overfit_model(images01, scheduler, index, len(classes) if classes else None, device=device, **settings)
    if folder is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="synthgate-mia-control-") as tmp:
            save_model_dir(Path(tmp) / "model", unet.cpu(), scheduler, classes,
                           {"purpose": "membership_inference positive control (overfit on purpose; never release)"})
            return load_model(Path(tmp) / "model", device), False
    save_model_dir(folder, unet.cpu(), scheduler, classes,
                   {"purpose": "membership_inference positive control (overfit on purpose; never release)"})
    seal_folder(folder, CACHE_PURPOSE)
    return load_model(folder, device), False
