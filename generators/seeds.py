"""Seeds: every random choice follows from ``--seed`` and what it is for.

Public seeds (data order, diffusion noise, sampling) are derived with SHA-256
and may be recorded.  The randomness that differential privacy depends on
(Poisson sampling and the Gaussian gradient noise) must stay secret: whoever
knows the noise can subtract it.  Those seeds are keyed with the
installation's secret salt (:func:`synthgate.privacy.get_salt`), so a run is
still reproducible -- and resumable bit for bit -- on the installation that
made it, while the published seed reveals nothing about the noise.
"""
from __future__ import annotations

import hashlib
import hmac


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose``, independent of every other purpose."""
    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def secret_seed(seed: int, purpose: str) -> int:
    """Like :func:`derive_seed`, keyed with the installation's secret salt."""
    from synthgate.privacy import get_salt

    digest = hmac.new(get_salt(), f"{int(seed)}:{purpose}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, device="cpu"):
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
