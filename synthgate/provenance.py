"""Which software made an artefact: recorded in every model, manifest and audit."""
from __future__ import annotations

import platform

from . import __version__

CORE = ("numpy", "torch", "diffusers", "accelerate")


def versions(*extra: str) -> dict[str, str]:
    """Versions of synthgate, Python and the libraries (installed ones only) that made an artefact."""
    import importlib.metadata as md

    out = {"synthgate": __version__, "python": platform.python_version()}
    for name in (*CORE, *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out
