"""Build the networks a config describes: the denoiser (any registered architecture), its noise schedule, the VAE."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from synthgate.errors import ConfigError, InputError, MissingInputError

from .config import TrainConfig
from .denoisers import get_denoiser


@dataclass(frozen=True)
class Space:
    """The space the denoiser works in: pixels, or a VAE's scaled latents."""

    channels: int
    size: int
    latent: bool
    scaling_factor: float = 1.0
    vae_in_channels: int | None = None


def build_denoiser(config: TrainConfig, channels: int, size: int, num_classes: int | None, attributes=None):
    """The denoiser ``config.architecture`` names (:mod:`generators.denoisers`), for ``channels x size x size``.

    Every one is called as ``net(x_t, t, class_labels).sample``.  A latent
    ``size`` is only known once the VAE is read, so it is checked here.  With
    ``attributes`` (an :class:`~generators.conditioning.AttributeSpec`) the
    denoiser comes wrapped with its attribute encoder, whose vectors the
    network adds to its timestep embedding.
    """
    spec = get_denoiser(config.architecture)
    if num_classes is not None and spec.refuse_classes:
        raise ConfigError(spec.refuse_classes)
    if attributes is not None and spec.refuse_attributes:
        raise ConfigError(spec.refuse_attributes)
    spec.check_size(config, size, "latent size" if config.vae else "resolution")
    width = None if attributes is None else spec.condition_width(config)
    net = spec.build(config, channels=channels, size=size, num_classes=num_classes, cond_dim=width)
    if attributes is None:
        return net
    from .conditioning import attribute_conditioned, build_encoder

    return attribute_conditioned(net, build_encoder(attributes, width))


def denoiser_info(architecture: str) -> dict:
    """``synthgate.json["architecture"]``: the name, its folder, and the class that loads it."""
    return get_denoiser(architecture).info()


def load_denoiser(architecture: str, folder):
    """Load a saved denoiser of ``architecture`` from ``folder`` (the registered class, never one named by the file)."""
    return get_denoiser(architecture).load(folder)


def build_scheduler(config: TrainConfig, latent: bool):
    """The training noise schedule (diffusers ``DDPMScheduler``).

    Pixel models clip predicted samples to [-1, 1]; latents are unbounded.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=not latent)


def vae_folder(path: str | Path) -> Path:
    """The folder holding the VAE's ``config.json`` (``path`` or its ``vae/``), checked before any work."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError("VAE folder does not exist (--vae must be a local diffusers AutoencoderKL folder)",
                                path)
    root = path / "vae" if (path / "vae" / "config.json").exists() else path
    if not (root / "config.json").exists():
        raise InputError("is not a diffusers AutoencoderKL folder (no config.json; a Stable Diffusion "
                         "download has it in vae/)", path)
    return root


def load_vae(path: str | Path, device="cpu"):
    """A frozen ``AutoencoderKL`` from a local folder (never downloaded)."""
    from diffusers import AutoencoderKL

    root = vae_folder(path)
    try:
        vae = AutoencoderKL.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise InputError(f"cannot load the VAE ({' '.join(str(exc).split())[:200]})", path) from exc
    return vae.to(device).eval().requires_grad_(False)


def latent_space(vae, image_channels: int, resolution: int) -> Space:
    """Where ``image_channels x resolution^2`` images land in ``vae``'s latent space."""
    cfg = vae.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if cfg.in_channels not in (image_channels, 3):
        raise InputError(f"the VAE takes {cfg.in_channels}-channel images but the training set has "
                         f"{image_channels} channel(s)")
    if resolution % factor:
        raise InputError(f"resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")
    scaling = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    return Space(int(cfg.latent_channels), resolution // factor, True, scaling, int(cfg.in_channels))


def encode(vae, pixels, scaling_factor: float, batch_size: int = 32):
    """Scaled latent means of ``pixels`` in [-1, 1] (gray is replicated for an RGB VAE)."""
    import torch

    out = []
    device = next(vae.parameters()).device
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            x = torch.as_tensor(pixels[start:start + batch_size], device=device)
            if x.shape[1] == 1 and vae.config.in_channels == 3:
                x = x.repeat(1, 3, 1, 1)
            out.append((vae.encode(x).latent_dist.mean * scaling_factor).cpu())
    return torch.cat(out).numpy()
