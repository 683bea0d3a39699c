"""The training set as the trainer sees it: checked, labelled, at one geometry.

Rules (the README's *Training* section says the same):

- The set is an :class:`~synthgate.imageset.ImageSet`; every image is decoded
  once up front, so an unreadable file stops training before it starts.
- Channels: every image must have the same channel count (1 or 3).  A set
  mixing grayscale and colour is an error naming one file of each kind;
  nothing is converted silently.
- Size: every image is resized to ``resolution x resolution`` with the
  antialiased bilinear resize the audit also uses
  (:func:`synthgate.imageio.resize`).  A non-square image is stretched, so
  crop first when the aspect ratio matters; ``synthgate.json`` records every
  size that was changed.
- Pixels: [0, 1] as the image set reads them (bit-depth range, DICOM
  windowing), mapped to [-1, 1] for the denoiser.
- Labels: for class conditioning every image needs a ``label``; the classes
  are the sorted distinct labels.  For attribute conditioning every image
  needs a value in each conditioning column (see :mod:`generators.conditioning`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthgate.errors import InputError
from synthgate.imageset import Geometry, ImageSet

# Above this many bytes (float32) images are loaded per batch instead of held in memory.
PRELOAD_LIMIT_BYTES = 4 << 30


@dataclass(frozen=True)
class TrainingSet:
    """A checked training set and how it will be fed to the network.

    Attributes
    ----------
    images
        The image set.
    geometry
        ``resolution x resolution`` at the set's own channel count.
    classes
        Class names in index order (class-conditional), else ``None``.
    targets
        Class index per image, or ``(N, n_columns)`` attribute encoder inputs
        (``None`` when unconditional).
    bit_depth
        16 when any image has more than 8 bits per sample, else 8 (the
        sampler writes PNGs at this depth).
    notes
        What was changed to reach the geometry.
    attributes
        The conditioning columns (:class:`~generators.conditioning.AttributeSpec`)
        for attribute conditioning, else ``None``.
    """

    images: ImageSet
    geometry: Geometry
    classes: tuple[str, ...] | None
    targets: np.ndarray | None
    bit_depth: int
    notes: tuple[str, ...] = ()
    attributes: object | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def label_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r.label for r in self.images.records if r.label is not None).items()))

    def describe(self) -> dict:
        """The ``training_set`` block of ``synthgate.json`` (no patient identifiers)."""
        return {
            "path": str(Path(self.images.root).resolve()),
            "sha256": self.images.digest,
            "n_images": len(self.images),
            "n_patients": self.images.n_patients,
            "labels": self.label_counts,
            "channels": self.geometry.channels,
            "bit_depth": self.bit_depth,
            "resized": list(self.notes),
        }


def open_training_set(path: str | Path, resolution: int, conditioning: str, *,
                      skip_unreadable: bool = False, progress: bool | None = None,
                      condition_columns: tuple[str, ...] = (), extra_columns: tuple[str, ...] | list[str] = ()) -> TrainingSet:
    """Scan, decode and check ``path`` for training at ``resolution``.

    Raises
    ------
    EmptySetError, ImageReadError, InputError
        No images, an unreadable image, mixed channel counts, or missing
        labels for class conditioning.
    """
    images = ImageSet(path, skip_unreadable=skip_unreadable, progress=progress, extra_columns=extra_columns)
    images.verify(progress=progress)
    channels = _channels(images)
    sizes = sorted({(r.height, r.width) for r in images.records})
    notes = ()
    if sizes != [(resolution, resolution)]:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:6]) + (" ..." if len(sizes) > 6 else "")
        notes = (f"sizes {shown} resized to {resolution}x{resolution}",)
    attributes = None
    if conditioning == "attributes":
        from .conditioning import AttributeSpec

        rows = [r.values() for r in images.records]
        attributes = AttributeSpec.learn(condition_columns, rows, [r.key for r in images.records], images.root)
        classes, targets = None, attributes.encode_rows(rows, images.root)
    else:
        classes, targets = _classes(images, conditioning)
    bit_depth = 16 if any((r.bit_depth or 8) > 8 for r in images.records) else 8
    return TrainingSet(images, Geometry(resolution, resolution, channels, notes), classes, targets, bit_depth, notes,
                       attributes)


def _channels(images: ImageSet) -> int:
    by_channels: dict[int, str] = {}
    for r in images.records:
        by_channels.setdefault(r.channels, r.key)
    if len(by_channels) > 1:
        shown = "; ".join(f"{c} channel(s), e.g. {key}" for c, key in sorted(by_channels.items()))
        raise InputError(f"mixes channel counts ({shown}); convert the set to all grayscale or all RGB first",
                         images.root)
    return next(iter(by_channels))


def _classes(images: ImageSet, conditioning: str) -> tuple[tuple[str, ...] | None, np.ndarray | None]:
    labelled = images.has_labels
    if conditioning == "none" or (conditioning == "auto" and (not labelled or len(images.classes) < 2)):
        return None, None
    if not labelled:
        first = next(r.key for r in images.records if r.label is None)
        raise InputError(f"class conditioning needs a label for every image, but {first!r} has none "
                         "(add a `label` column to metadata.csv or use class sub-folders, or --conditioning none)",
                         images.root)
    classes = tuple(images.classes)
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.asarray([index[r.label] for r in images.records], dtype=np.int64)


class PixelSource:
    """Images ``[-1, 1]`` for a list of indices: held in memory when small, else read per batch."""

    def __init__(self, training: TrainingSet, preload_limit: int = PRELOAD_LIMIT_BYTES):
        self.training = training
        g = training.geometry
        self.shape = (g.channels, g.height, g.width)
        self._all = None
        if len(training) * int(np.prod(self.shape)) * 4 <= preload_limit:
            self._all = self._read(range(len(training)))

    def _read(self, indices) -> np.ndarray:
        indices = list(indices)
        out = np.empty((len(indices), *self.shape), np.float32)
        pos = 0
        for _, batch in self.training.images.iter_batches(256, self.training.geometry, indices=indices):
            out[pos:pos + len(batch)] = batch
            pos += len(batch)
        return out * 2.0 - 1.0

    def __call__(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        return self._all[indices] if self._all is not None else self._read(indices.tolist())

    def __len__(self) -> int:
        return len(self.training)
