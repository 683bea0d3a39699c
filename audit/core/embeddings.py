"""Optional embedding-space retrieval (open_clip, e.g. BiomedCLIP) as extra evidence.

MediSyn finds each synthetic image's nearest training image by BiomedCLIP
cosine similarity and only then measures the pixel distance; its authors note
that the encoder may not find the true nearest match.  synthgate always runs
the exact pixel-space search; when the user gives local open_clip weights it
also runs the embedding retrieval and reports how often the two agree and how
many flagged copies the embedding route alone would have missed.

Weights are only ever read from a local folder in open_clip's ``local-dir``
layout (``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``,
plus ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), the
layout BiomedCLIP ships in; nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from synthgate.errors import InputError, MissingInputError, require


@contextlib.contextmanager
def _offline():
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ImageEncoder:
    """An open_clip image tower loaded from a local folder."""

    def __init__(self, folder: str | Path, device="cpu"):
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingInputError("embedding weights folder does not exist (a local open_clip folder is needed)", folder)
        if not (folder / "open_clip_config.json").is_file():
            raise InputError("has no open_clip_config.json (expected open_clip's local-dir layout, as BiomedCLIP ships)",
                             folder)
        open_clip = require("open_clip", purpose="embedding retrieval")
        import torch

        with _offline():
            try:
                model, _ = open_clip.create_model_from_pretrained(f"local-dir:{folder}", device=device)
            except Exception as exc:  # open_clip raises many kinds
                raise InputError(f"cannot load open_clip weights ({' '.join(str(exc).split())[:200]})", folder) from exc
        model.eval()
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device).view(1, 3, 1, 1)
        self.model = model
        self.device = device
        self.name = folder.name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings of ``(N, C, H, W)`` images in [0, 1]."""
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(batch, dtype=torch.float32, device=self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            e = self.model.encode_image((x - self.mean) / self.std)
        return F.normalize(e.float(), dim=-1).cpu().numpy()


def embed(ctx, imageset, encoder: ImageEncoder, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([encoder(b) for _, b in ctx.batches(imageset, batch_size)])


def nearest_by_cosine(queries: np.ndarray, refs: np.ndarray, block: int = 4096) -> np.ndarray:
    out = np.empty(len(queries), np.int64)
    for s in range(0, len(queries), block):
        out[s:s + block] = np.argmax(queries[s:s + block] @ refs.T, axis=1)
    return out


def embedding_agreement(ctx, weights, exact_nearest: np.ndarray, flagged: np.ndarray, pair_distance) -> dict:
    """Compare embedding retrieval with the exact search.

    ``pair_distance(synthetic_indices, real_indices)`` returns the tiled
    distances of those pairs, so a copy the embedding route would have missed
    is one flagged by the exact search whose embedding-nearest training image
    is not within the threshold.
    """
    encoder = ImageEncoder(weights, ctx.torch_device)
    emb_nn = nearest_by_cosine(embed(ctx, ctx.synthetic, encoder), embed(ctx, ctx.real, encoder))
    agree = emb_nn == exact_nearest
    emb_dist = pair_distance(np.arange(len(emb_nn)), emb_nn)
    return {
        "encoder": encoder.name,
        "nearest": emb_nn,
        "agreement": float(agree.mean()) if len(agree) else None,
        "flagged": int(flagged.sum()),
        "flagged_found_by_embedding": int((flagged & agree).sum()),
        "embedding_pair_distance": emb_dist,
    }
