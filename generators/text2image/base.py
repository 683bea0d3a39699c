"""The Stable Diffusion base folder: checking a local 1.x/2.x or SDXL pipeline, loading its parts, encoding prompts.

Everything is read from a local diffusers folder (never downloaded) and
checked before any work, with one-line errors naming what is missing.
:class:`PromptEncoder` turns prompts into the conditioning tensors the
U-Net takes, one tensor per example for 1.x/2.x and SDXL alike.

Notes
-----
SDXL's conditioning (penultimate hidden states of both encoders, pooled
embedding, size/crop ids) follows diffusers' ``train_text_to_image_sdxl.py``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from synthgate.errors import InputError, MissingInputError, UsageError

# What a Stable Diffusion 1.x/2.x folder must hold (diffusers layout).
REQUIRED = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
            "tokenizer": "tokenizer/", "scheduler": "scheduler/scheduler_config.json"}
XL_REQUIRED = {"text_encoder_2": "text_encoder_2/config.json", "tokenizer_2": "tokenizer_2/"}


def check_base_model(path: str | Path) -> Path:
    """The base Stable Diffusion folder, checked for every part before any work (one-line errors)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError("base model folder does not exist (--base-model must be a local diffusers "
                                "Stable Diffusion folder)", path)
    unet_config = _read_json(path / "unet" / "config.json") if (path / "unet" / "config.json").exists() else {}
    xl = is_xl(path)
    required = {**REQUIRED, **(XL_REQUIRED if xl else {})}
    missing = [f"{name} ({rel})" for name, rel in required.items() if not (path / rel).exists()]
    for tok in (("tokenizer", "tokenizer_2") if xl else ("tokenizer",)):
        folder = path / tok
        if folder.is_dir() and not ((folder / "tokenizer.json").exists() or
                                    ((folder / "vocab.json").exists() and (folder / "merges.txt").exists())):
            missing.append(f"tokenizer files ({tok}/vocab.json + merges.txt, or {tok}/tokenizer.json)")
    if missing:
        kind = "Stable Diffusion XL" if xl else "Stable Diffusion"
        raise InputError(f"is not a complete {kind} folder: missing {', '.join(missing)}", path)
    extra = unet_config.get("addition_embed_type")
    if unet_config.get("_class_name") not in (None, "UNet2DConditionModel") or extra not in (None, "text_time") \
            or (extra == "text_time") != xl:
        raise UsageError(f"unet/ is a {unet_config.get('_class_name')} with addition_embed_type {extra!r}; "
                         "supported are Stable Diffusion 1.x/2.x U-Nets (none) and SDXL base U-Nets ('text_time' "
                         "with text_encoder_2/)", path)
    return path


def is_xl(path: Path) -> bool:
    """Whether ``path`` looks like a Stable Diffusion XL folder (a second text encoder, size conditioning)."""
    unet = path / "unet" / "config.json"
    return (path / "text_encoder_2").exists() or (path / "tokenizer_2").exists() or \
        (unet.exists() and _read_json(unet).get("addition_embed_type") == "text_time")


def native_resolution(path: str | Path) -> int:
    """The image side the base pipeline was trained at (U-Net sample size x VAE downsampling)."""
    path = check_base_model(path)
    unet, vae = _read_json(path / "unet" / "config.json"), _read_json(path / "vae" / "config.json")
    return int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def unet_config_digest(path: str | Path) -> str:
    """SHA-256 of the base U-Net's ``config.json`` (which architecture was fine-tuned)."""
    return hashlib.sha256((Path(path) / "unet" / "config.json").read_bytes()).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read ({exc})", path) from exc


def load_part(cls, folder: Path, what: str):
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise InputError(f"cannot load the {what} ({' '.join(str(exc).split())[:200]})", folder) from exc


@dataclass
class PromptEncoder:
    """The frozen tokenizer(s) and CLIP text encoder(s) of a pipeline: prompts -> conditioning tensors.

    Stable Diffusion 1.x/2.x: the text encoder's last hidden states
    ``(N, tokens, dim)``.  SDXL: both encoders' penultimate hidden states
    side by side, plus one extra row carrying the second encoder's pooled
    projection and the six size/crop conditioning values (``resolution,
    resolution, 0, 0, resolution, resolution``: no crop), so that the
    conditioning still travels as one tensor per example through the
    trainer, opacus and the attacks; :func:`wrap_unet` unpacks it.
    """

    tokenizers: tuple
    encoders: tuple
    resolution: int = 0

    @property
    def pooled_dim(self) -> int | None:
        """SDXL: width of the pooled text embedding (``None`` for 1.x/2.x)."""
        return int(self.encoders[1].config.projection_dim) if len(self.encoders) == 2 else None

    def __call__(self, prompts: Sequence[str], batch_size: int = 32):
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                out.append(self._encode(list(prompts[start:start + batch_size])))
        return torch.cat(out)

    def _encode(self, prompts: list[str]):
        import torch

        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                      return_tensors="pt").input_ids.to(next(enc.parameters()).device)
            if self.pooled_dim is None:
                return enc(ids)[0]
            o = enc(ids, output_hidden_states=True)
            hidden.append(o.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = o[0]  # the projection model's text_embeds (the last encoder)
        emb = torch.cat(hidden, -1)
        n, _, width = emb.shape
        if self.pooled_dim + 6 > width:
            raise InputError(f"the SDXL text embeddings ({width} wide) cannot carry the pooled embedding "
                             f"({self.pooled_dim}) and the size conditioning")
        row = torch.zeros(n, 1, width, dtype=emb.dtype, device=emb.device)
        row[:, 0, :self.pooled_dim] = pooled
        r = float(self.resolution)
        row[:, 0, self.pooled_dim:self.pooled_dim + 6] = torch.tensor([r, r, 0.0, 0.0, r, r], dtype=emb.dtype)
        return torch.cat([emb, row], 1)


def load_text_components(path: Path, device, resolution: int = 0) -> PromptEncoder:
    """The frozen tokenizer(s) and CLIP text encoder(s) of a pipeline folder (never downloaded)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise on our stderr
    try:
        tokenizers = [load_part(CLIPTokenizer, path / "tokenizer", "tokenizer")]
        encoders = [load_part(CLIPTextModel, path / "text_encoder", "text encoder")]
        if (path / "text_encoder_2").exists():
            tokenizers.append(load_part(CLIPTokenizer, path / "tokenizer_2", "second tokenizer"))
            encoders.append(load_part(CLIPTextModelWithProjection, path / "text_encoder_2", "second text encoder"))
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return PromptEncoder(tuple(tokenizers), tuple(e.to(device).eval().requires_grad_(False) for e in encoders),
                         resolution)


__all__ = ["REQUIRED", "XL_REQUIRED", "check_base_model", "is_xl", "native_resolution", "unet_config_digest",
           "load_part", "PromptEncoder", "load_text_components"]
