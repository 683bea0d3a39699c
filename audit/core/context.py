"""What a check may look at: the inputs of one audit, read once."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from synthgate.imageset import Geometry, ImageSet, harmonize

if TYPE_CHECKING:  # pragma: no cover
    from .fitstore import FitStore


@dataclass
class AuditContext:
    """The inputs of an audit and the shared services checks use.

    Attributes
    ----------
    synthetic, real, holdout
        The image sets (``real``/``holdout`` may be ``None``).
    model
        Path of the model directory, when one is audited.
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (resolved lazily).
    seed
        Every check derives its randomness from this and its own name.
    workdir
        Where checks write their own artifacts (e.g. ``copy_detection.csv``);
        it becomes part of the audit's output folder.
    cache_dir
        Where trained attack networks are cached between audits.
    fit_store
        Where checks' fitted real-side state is kept between audits
        (:class:`~audit.core.fitstore.FitStore`), or ``None``.
    cluster
        A connected ``ray`` module (:func:`synthgate.cluster.connect`) when
        the audit runs with ``--cluster``, else ``None``; checks that can
        spread their work use it (copy detection's ratio rule).
    attacker
        Public image sets with patient IDs that an attacker would train on
        (``--attacker-data``); only the re-identification network uses them.
    """

    synthetic: ImageSet
    real: ImageSet | None = None
    holdout: ImageSet | None = None
    model: Path | None = None
    device: str = "auto"
    seed: int = 0
    workdir: Path | None = None
    cache_dir: Path | None = None
    progress: bool | None = None
    geometry_override: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)
    fit_store: "FitStore | None" = None
    cluster: Any = None
    attacker: tuple[ImageSet, ...] = ()

    @cached_property
    def geometry(self) -> Geometry:
        """The common geometry of every set in this audit (see :func:`synthgate.imageset.harmonize`)."""
        sets = [s for s in (self.synthetic, self.real, self.holdout) if s is not None]
        return harmonize(*sets, size=self.geometry_override)

    @cached_property
    def torch_device(self):
        from synthgate.device import resolve_device

        return resolve_device(self.device)

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator seeded by the audit seed and ``purpose`` (deterministic, independent per use)."""
        digest = hashlib.sha256(f"{self.seed}:{purpose}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def torch_generator(self, purpose: str):
        import torch

        g = torch.Generator()
        g.manual_seed(int(self.rng(purpose).integers(0, 2**62)))
        return g

    def batches(self, imageset: ImageSet, batch_size: int = 64, indices=None) -> Iterator[tuple[list[int], np.ndarray]]:
        """Stream a set at the audit's common geometry, ``NCHW`` float32."""
        return imageset.iter_batches(batch_size=batch_size, geometry=self.geometry, indices=indices)

    def artifact(self, name: str) -> Path | None:
        """Path for a check's own output file, or ``None`` when nothing is written."""
        if self.workdir is None:
            return None
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir / name

    def model_cache(self, *parts: str) -> Path | None:
        """Folder for a cached trained network, or ``None`` when caching is off."""
        from synthgate.cache import default_cache_root

        root = self.cache_dir or default_cache_root()
        if root is None:
            return None
        path = Path(root)
        for part in ("models", *parts):  # owner-only: trained attackers hold features of patient images
            path = path / part
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path
