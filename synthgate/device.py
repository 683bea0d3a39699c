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


def set_threads(n: int | None) -> int:
    """Set torch's CPU thread count (``None``: leave it); returns the count in force.

    Small networks on a few loaded cores are memory- and synchronisation-bound:
    on this project's 2-core machines one thread was measured about ten times
    faster than two while another process was busy, so commands take
    ``--threads`` (or ``SYNTHGATE_THREADS``) rather than trusting the default.
    """
    import torch

    value = n if n is not None else os.environ.get("SYNTHGATE_THREADS")
    if value is not None and str(value).strip():
        try:
            count = int(value)
        except ValueError:
            raise UsageError(f"--threads {value!r} must be a positive whole number") from None
        if count < 1:
            raise UsageError(f"--threads {count} must be at least 1")
        torch.set_num_threads(count)
    return torch.get_num_threads()
