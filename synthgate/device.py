"""Choose the compute device once, at the edge (``--device auto|cpu|cuda``)."""
from __future__ import annotations

import os

from .errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | None = None):
    """Return a ``torch.device``.

    ``auto`` (the default, or ``SYNTHGATE_DEVICE``) picks CUDA when available,
    else CPU.  ``cuda`` without a GPU is a usage error, never a silent CPU run.
    ``cuda:N`` selects a GPU.
    """
    import torch

    name = (name or os.environ.get("SYNTHGATE_DEVICE") or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu or auto")
        return torch.device(name)
    raise UsageError(f"--device {name!r} must be one of `auto`, `cpu` or `cuda` (or `cuda:N`)")
