"""Build the networks a config describes: the denoiser (UNet, Swin-UNet or DiT), its noise schedule, the VAE."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from synthgate.errors import InputError, MissingInputError

from .config import TrainConfig


@dataclass(frozen=True)
class Space:
    """The space the denoiser works in: pixels, or a VAE's scaled latents."""

    channels: int
    size: int
    latent: bool
    scaling_factor: float = 1.0
    vae_in_channels: int | None = None


def build_unet(config: TrainConfig, channels: int, size: int, num_classes: int | None, attributes=None):
    """A diffusers ``UNet2DModel`` for ``channels x size x size`` inputs.

    Class conditioning uses the UNet's learned class embedding
    (``num_class_embeds``), added to the timestep embedding.  Attribute
    conditioning (``attributes``, an :class:`~generators.conditioning.AttributeSpec`)
    returns the UNet wrapped with an attribute encoder whose vectors go where
    the class embedding would (``class_embed_type="identity"``).
    """
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
    unet = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        down_block_types=down, up_block_types=up, add_attention=config.mid_attention,
        norm_num_groups=config.norm_num_groups, num_class_embeds=num_classes,
        class_embed_type="identity" if attributes is not None else None,
        attention_head_dim=min(8, min(config.block_out_channels)),
    )
    if attributes is None:
        return unet
    from .conditioning import attribute_conditioned, build_encoder

    # UNet2DModel's timestep embedding is 4x the first level's width
    return attribute_conditioned(unet, build_encoder(attributes, 4 * config.block_out_channels[0]))


# architecture -> (folder in the model directory, the class that loads it); read by export and model
DENOISERS = {
    "unet": ("unet", "diffusers:UNet2DModel"),
    "swin": ("denoiser", "generators.swin:SwinUNetDenoiser"),
    "dit": ("transformer", "generators.dit:DiTDenoiser"),
}


def build_denoiser(config: TrainConfig, channels: int, size: int, num_classes: int | None, attributes=None):
    """The denoiser ``config.architecture`` names, for ``channels x size x size`` inputs.

    Every one is called as ``net(x_t, t, class_labels).sample``.  A latent
    ``size`` is only known once the VAE is read, so the transformer settings
    are checked against it here.  With ``attributes`` (an
    :class:`~generators.conditioning.AttributeSpec`) the denoiser comes wrapped
    with its attribute encoder.
    """
    if config.architecture == "unet":
        return build_unet(config, channels, size, num_classes, attributes)
    settings = config.arch_settings
    settings.check_size(size, "latent size" if config.vae else "resolution")
    if config.architecture == "swin":
        from .swin import SwinUNetDenoiser

        width = 4 * settings.embed_dim  # the Swin denoiser's timestep-embedding width
        net = SwinUNetDenoiser(sample_size=size, in_channels=channels, patch_size=settings.patch_size,
                               embed_dim=settings.embed_dim, depths=settings.depths, num_heads=settings.num_heads,
                               window_size=settings.window_size, mlp_ratio=settings.mlp_ratio,
                               num_classes=num_classes, cond_dim=width if attributes is not None else 0)
        if attributes is None:
            return net
        from .conditioning import attribute_conditioned, build_encoder

        return attribute_conditioned(net, build_encoder(attributes, width))
    from .dit import build_dit

    # adaLN-Zero always embeds a label: an unconditional model is a one-class DiT
    return build_dit(sample_size=size, in_channels=channels, out_channels=channels, patch_size=settings.patch_size,
                     num_layers=settings.num_layers, num_attention_heads=settings.num_attention_heads,
                     attention_head_dim=settings.attention_head_dim, num_embeds_ada_norm=num_classes or 1)


def denoiser_info(architecture: str) -> dict:
    """``synthgate.json["architecture"]``: the name, its folder, and the class that loads it."""
    folder, cls = DENOISERS[architecture]
    return {"name": architecture, "folder": folder, "class": cls}


def load_denoiser(architecture: str, folder):
    """Load a saved denoiser of ``architecture`` from ``folder`` (fixed classes, never one named by the file)."""
    if architecture == "unet":
        from diffusers import UNet2DModel as cls
    elif architecture == "swin":
        from .swin import SwinUNetDenoiser as cls
    else:
        from .dit import DiTDenoiser as cls
    return cls.from_pretrained(folder)


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
