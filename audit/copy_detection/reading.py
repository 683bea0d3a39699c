"""Reading image sets for copy detection: features batch by batch, query chunks, the ratio rule's analysis size."""
from __future__ import annotations

import math

import numpy as np

from synthgate.imageset import ImageSet
from synthgate.progress import progress_bar


def stream_features(ctx, imageset: ImageSet, features, what: str, batch_size: int):
    """``features(batch)`` of every image of ``imageset``, concatenated (a torch tensor)."""
    import torch

    out = []
    for _, batch in progress_bar(ctx.batches(imageset, batch_size), desc=f"copy: index {what}", unit="batch",
                                 enabled=ctx.progress, total=math.ceil(len(imageset) / batch_size)):
        out.append(features(batch))
    return torch.cat(out)


def query_chunks(ctx, imageset: ImageSet, chunk_mb: int, batch_size: int, indices=None):
    """``(indices, images)`` chunks of at most ``chunk_mb`` MB at the audit geometry."""
    geo = ctx.geometry
    per = geo.height * geo.width * geo.channels * 4
    size = max(1, chunk_mb * (1 << 20) // per)
    order = list(range(len(imageset))) if indices is None else [int(i) for i in indices]
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        yield np.asarray(idx, np.int64), np.concatenate([b for _, b in ctx.batches(imageset, batch_size, idx)])


def analysis_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The ratio rule's comparison size: the shorter side brought down to ``size`` (never up), aspect kept."""
    f = min(1.0, size / min(height, width))
    return max(1, round(height * f)), max(1, round(width * f))


def to_analysis(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-downsample images ``(N, C, H, W)`` to ``shape`` (each output pixel the mean of the input it covers)."""
    if tuple(x.shape[-2:]) == tuple(shape):
        return np.ascontiguousarray(x, np.float32)
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    return F.adaptive_avg_pool2d(t, shape).numpy()


def set_loader(ctx, imageset: ImageSet, shape: tuple[int, int], batch_size: int):
    """``(n, load)``: ``load(indices)`` reads those images at the analysis size (what the ratio rule takes)."""

    def load(idx):
        idx = [int(i) for i in idx]
        if not idx:
            return np.zeros((0, ctx.geometry.channels, *shape), np.float32)
        x = np.concatenate([b for _, b in ctx.batches(imageset, batch_size, idx)])
        return to_analysis(x, shape)

    return len(imageset), load
