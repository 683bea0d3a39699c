"""Read a model directory back: ``synthgate.json`` (:func:`read_info`) and the whole model (:func:`load_model`).

The one loader of every model ``synthgate train`` writes, whatever its kind:
a denoiser of a registered architecture (:mod:`generators.denoisers`; the
folder layout is in :mod:`generators.model`), or a text-to-image model
fine-tuned from Stable Diffusion (:mod:`generators.text2image`).  It sits
apart from both model classes so that neither imports the other.
"""
from __future__ import annotations

import json
from pathlib import Path

from synthgate.errors import InputError, MissingInputError

from .model import DiffusionModel, architecture_name


def read_info(path: str | Path) -> dict:
    """``synthgate.json`` of a model directory, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError("model directory does not exist", path)
    if not path.is_dir():
        raise InputError("is not a model directory", path)
    info_path = path / "synthgate.json"
    if not info_path.exists():
        raise InputError("has no synthgate.json (not a model directory written by `synthgate train`)", path)
    try:
        info = json.loads(info_path.read_text())
    except ValueError as exc:
        raise InputError(f"synthgate.json is not valid JSON ({exc})", info_path) from exc
    for key in ("resolution", "image_channels"):
        if key not in info:
            raise InputError(f"synthgate.json lacks {key!r}", info_path)
    return info


def load_model(path: str | Path, device="cpu") -> DiffusionModel:
    """Load ``path`` (a model directory, any architecture) onto ``device`` in eval mode.

    This is the documented loader of every model ``synthgate train`` writes;
    ``model.unet(x_t, t, class_labels).sample`` is the denoiser's output and
    :meth:`DiffusionModel.predict_eps` its noise prediction.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler

    from .denoisers import architectures, get_denoiser

    path = Path(path)
    info = read_info(path)
    device = torch.device(device)
    if (info.get("conditioning") or {}).get("type") == "text":  # fine-tuned Stable Diffusion
        from .text2image.model import load_text_model

        return load_text_model(path, info, device)
    arch = architecture_name(info)
    if arch not in architectures():
        raise InputError(f"synthgate.json names architecture {arch!r}; this synthgate knows "
                         + ", ".join(architectures()), path / "synthgate.json")
    spec = get_denoiser(arch)
    try:
        unet = spec.load(path / spec.folder).to(device).eval()
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        vae = AutoencoderKL.from_pretrained(path / "vae").to(device).eval() if (path / "vae").exists() else None
        if (info.get("conditioning") or {}).get("type") == "attributes":
            from .conditioning import attribute_conditioned, load_encoder

            unet = attribute_conditioned(unet, load_encoder(path / "condition").to(device).eval()).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot load the model ({' '.join(str(exc).split())[:200]})", path) from exc
    for module in (unet, vae):
        if module is not None:
            module.requires_grad_(False)
    return DiffusionModel(path, unet, scheduler, vae, info, device)


__all__ = ["read_info", "load_model"]


#: component folders a model directory may hold besides its denoiser's (diffusers pipelines name theirs in
#: model_index.json; synthgate adds the attribute encoder and the LoRA adapter)
_COMPONENTS = ("scheduler", "vae", "condition", "lora", "unet", "text_encoder", "text_encoder_2", "tokenizer",
               "tokenizer_2", "transformer", "denoiser")


def model_files(path: str | Path) -> list[Path]:
    """The files a model directory declares: ``synthgate.json``, ``model_index.json`` and its components.

    Only these are hashed into a model's digest: a path that is not a model
    folder is refused (``/usr/share`` is not hashed recursively), files
    outside the declared components are ignored, and a symbolic link among the
    declared files is refused (the loader would follow it; the digest would not).
    """
    path = Path(path)
    read_info(path)  # refuses anything that is not a model directory
    folders = set(_COMPONENTS)
    index = path / "model_index.json"
    if index.is_file():
        try:
            declared = json.loads(index.read_text())
        except ValueError as exc:
            raise InputError(f"model_index.json is not valid JSON ({exc})", index) from exc
        if isinstance(declared, dict):
            folders |= {k for k, v in declared.items() if isinstance(v, list) and not k.startswith("_")}
    try:
        from .denoisers import architectures, get_denoiser

        folders |= {get_denoiser(a).folder for a in architectures()}
    except Exception:  # noqa: BLE001 - the registry is optional for hashing; the fixed list covers built-ins
        pass
    def refuse_link(p: Path) -> None:
        # the loader follows links, the digest cannot vouch for what they point to: weights swapped behind a
        # link after the audit kept the digest (red team)
        raise InputError(f"{p.relative_to(path)} is a symbolic link; a model's declared files must be its own so "
                         "that its digest covers what loads: copy the model with its links resolved (cp -rL)", path)

    files = []
    for p in (path / "synthgate.json", index):
        if p.is_symlink():
            refuse_link(p)
        if p.is_file():
            files.append(p)
    for name in sorted(folders):
        sub = path / name
        if sub.is_symlink():
            refuse_link(sub)
        if not sub.is_dir():
            continue
        for p in sorted(sub.rglob("*")):
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if p.is_symlink():
                refuse_link(p)
            if p.is_file():
                files.append(p)
    return files


def model_digest(path: str | Path) -> str:
    """SHA-256 digest of a model directory's declared files (:func:`model_files`)."""
    from synthgate.fsutil import digest_pairs, sha256_file

    path = Path(path)
    return digest_pairs([(p.relative_to(path).as_posix(), sha256_file(p)) for p in model_files(path)])
