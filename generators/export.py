"""Write a model directory that diffusers and synthgate both load.

Layout (see :mod:`generators.model`): for a UNet a ``DDPMPipeline``
(``model_index.json``, ``unet/``, ``scheduler/``) so
``DiffusionPipeline.from_pretrained(MODEL)`` works anywhere; for the other
denoisers the network in the folder its registry entry names
(:mod:`generators.denoisers`: ``denoiser/`` for the Swin-UNet,
``transformer/`` for DiT) with ``scheduler/`` beside it, loaded by
:func:`generators.loading.load_model` (``synthgate.json["architecture"]``
names the folder and class).  ``vae/`` for latent models, and
``synthgate.json`` with the provenance.  Written atomically.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from synthgate import __version__
from synthgate.fsutil import atomic_directory, atomic_write_json

SCHEMA_VERSION = 1


def save_model(out: str | Path, unet, noise_scheduler, vae, info: dict, *, overwrite: bool = False,
               pipeline=None, extra=None) -> Path:
    """Save the denoiser ``unet`` (of ``info["architecture"]``, a UNet without it) with its schedule, the VAE
    (latent models) and ``synthgate.json`` to ``out``.

    ``pipeline`` replaces the default ``DDPMPipeline`` (e.g. a
    ``StableDiffusionPipeline``); ``extra(tmp)`` writes more files into the
    folder before it is moved into place.  An attribute-conditioned network
    is saved as its denoiser and its attribute encoder (``condition/``).
    """
    from diffusers import DDPMPipeline

    from .denoisers import get_denoiser

    out = Path(out)
    spec = get_denoiser((info.get("architecture") or {"name": "unet"})["name"])
    encoder = getattr(unet, "encoder", None)
    unet = getattr(unet, "net", unet)
    with atomic_directory(out, overwrite=overwrite, kind="synthgate train") as tmp:
        if pipeline is not None or spec.ddpm_pipeline:
            pipeline = pipeline or DDPMPipeline(unet=unet, scheduler=noise_scheduler)
            pipeline.save_pretrained(tmp, safe_serialization=True)
        else:  # no diffusers pipeline runs these denoisers: the network and its schedule, side by side
            unet.save_pretrained(tmp / spec.folder, safe_serialization=True)
            noise_scheduler.save_pretrained(tmp / "scheduler")
        if extra is not None:
            extra(tmp)
        if encoder is not None:
            encoder.save_pretrained(tmp / "condition", safe_serialization=True)
        if vae is not None:
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
        atomic_write_json(tmp / "synthgate.json", {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "synthgate", "version": __version__},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **info,
        })
    return out
