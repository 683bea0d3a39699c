"""Image sets: a folder of clinical images with labels and patients.

Conventions (the README's "Image sets" section says the same):

- The folder is scanned recursively in a stable order (sorted POSIX paths);
  hidden files and folders and the sidecar files ``metadata.csv``,
  ``manifest.json``, ``synthgate.json``, ``audit.json`` and ``*.c2pa``
  (detached C2PA content credentials, as release bundles carry next to DICOM
  files) are not images.
  Every other file must be a readable image: ``.png .jpg .jpeg .tif .tiff
  .dcm .dicom .npy``, or DICOM without extension (detected by its ``DICM``
  preamble).  Anything else is an error unless ``skip_unreadable`` is set, in
  which case it is listed in :attr:`ImageSet.skipped` -- never silently lost.
- A multi-frame file (DICOM, multi-page TIFF, 3-D/4-D ``.npy``) contributes
  one image per frame, keyed ``path#frame`` (``path`` alone when it has one).
- Labels and patients come from ``metadata.csv`` at the root (columns
  ``path`` and optionally ``patient_id``, ``label``, ``split``; any other
  column -- age, view, BI-RADS -- is kept as an image *attribute*, except one
  that looks like a misspelt known column, which is an error), else labels from class sub-folders
  (every image one level or more below the root: the first folder is the
  label) and patients from the DICOM PatientID tag.
- The set digest is the SHA-256 of the sorted ``(path, file SHA-256)`` pairs,
  ``metadata.csv`` included, so relabelling changes it too.
"""
from __future__ import annotations

import copy
import csv
import difflib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np

from . import imageio
from .cache import DecodeCache
from .errors import EmptySetError, ImageReadError, InputError, MetadataError, MissingInputError
from .fsutil import digest_pairs, sha256_file

SIDECAR_NAMES = frozenset({"metadata.csv", "manifest.json", "synthgate.json", "audit.json"})
SIDECAR_SUFFIXES = (".c2pa",)  # detached C2PA manifests (a release bundle's DICOM/TIFF credentials)
KNOWN_COLUMNS = ("path", "patient_id", "label", "split")


@dataclass(frozen=True)
class ImageRecord:
    """One image of a set (one frame of one file)."""

    key: str  # "path" or "path#frame" for multi-frame files
    path: str  # POSIX path of the file relative to the set root
    frame: int
    n_frames: int
    format: str
    sha256: str  # of the whole file
    height: int
    width: int
    channels: int
    bit_depth: int | None
    source_mode: str
    modality: str | None = None
    transfer_syntax: str | None = None
    label: str | None = None
    patient_id: str | None = field(default=None, repr=False)  # clear text: never write it out
    attributes: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    def attribute(self, name: str) -> str | None:
        return dict(self.attributes).get(name)

    def values(self) -> dict[str, str | None]:
        """The image's ``metadata.csv`` values by column: ``label`` and every attribute."""
        return {**dict(self.attributes), "label": self.label}


@dataclass(frozen=True)
class Skipped:
    """A file left out of the set, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Geometry:
    """A common size and channel count that two or more sets are brought to."""

    height: int
    width: int
    channels: int
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.notes)


class ImageSet:
    """A scanned image folder with streaming, cached access to its pixels.

    Parameters
    ----------
    root
        The folder.
    skip_unreadable
        Continue past unreadable files, listing each in :attr:`skipped`.
    max_pixels
        Refuse files with more pixels than this (all frames together).
    extra_columns
        Columns the caller uses even though they resemble a known column name
        (every other extra column is kept as an attribute anyway).
    cache
        A :class:`DecodeCache`, ``None`` for no cache, or ``"default"``.
    progress
        Show a progress bar while scanning (``None``: on a terminal only).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        skip_unreadable: bool = False,
        max_pixels: int | None = None,
        extra_columns: Sequence[str] = (),
        cache: DecodeCache | None | str = "default",
        progress: bool | None = None,
    ):
        self.root = Path(root)
        self.skip_unreadable = skip_unreadable
        self.max_pixels = max_pixels
        self.extra_columns = tuple(extra_columns)
        self.cache = DecodeCache.default() if cache == "default" else cache
        self._last: tuple[str, np.ndarray] | None = None
        self._scan(progress)
        self.digest = self._digest()

    # ------------------------------------------------------------------ scan

    def _scan(self, progress: bool | None) -> None:
        from .progress import progress_bar

        root = self.root
        if not root.exists():
            raise MissingInputError("image set folder does not exist", root)
        if not root.is_dir():
            raise InputError("is not a folder (an image set is a folder of images)", root)
        if not os.access(root, os.R_OK | os.X_OK):
            raise InputError("cannot read the folder (permission denied)", root)

        self._link_skips: list[Skipped] = []
        files = self._list_files()
        self.skipped: list[Skipped] = list(self._link_skips)
        found: list[tuple[str, str, imageio.ImageInfo]] = []
        for rel in progress_bar(files, desc=f"scan {root.name}", unit="file", enabled=progress):
            path = root / rel
            try:
                info = imageio.probe(path, max_pixels=self.max_pixels)
                sha = sha256_file(path)
            except ImageReadError as exc:
                self._unreadable(rel, exc.message)
                continue
            except OSError as exc:
                self._unreadable(rel, f"cannot read ({exc.strerror or exc})")
                continue
            found.append((rel, sha, info))

        metadata = self._read_metadata({rel for rel, _, _ in found} | {s.path for s in self.skipped})
        labels_from_folders = metadata is None and bool(found) and all("/" in rel for rel, _, _ in found)
        self.label_source = "metadata.csv" if metadata is not None else "folders" if labels_from_folders else "none"
        csv_patients = metadata is not None and "patient_id" in self._metadata_columns
        records: list[ImageRecord] = []
        for rel, sha, info in found:
            row = metadata.get(rel, {}) if metadata is not None else {}
            label = row.get("label") or (rel.split("/", 1)[0] if labels_from_folders else None)
            patient = row.get("patient_id") or (info.patient_id if "patient_id" not in row else None)
            attributes = tuple((k, v) for k, v in row.items() if k not in KNOWN_COLUMNS and v)
            for frame in range(info.n_frames):
                records.append(ImageRecord(
                    key=rel if info.n_frames == 1 else f"{rel}#{frame}",
                    path=rel, frame=frame, n_frames=info.n_frames, format=info.format, sha256=sha,
                    height=info.height, width=info.width, channels=info.channels, bit_depth=info.bit_depth,
                    source_mode=info.source_mode, modality=info.modality, transfer_syntax=info.transfer_syntax,
                    label=label or None, patient_id=patient or None, attributes=attributes, notes=info.notes,
                ))
        self.records = records
        self.patient_source = (
            "metadata.csv" if csv_patients
            else "DICOM PatientID" if any(r.patient_id for r in records) else "none"
        )
        if not records:
            what = f" ({len(self.skipped)} unreadable file(s) skipped)" if self.skipped else ""
            raise EmptySetError(f"image set holds no images{what}", root)

    def _unreadable(self, rel: str, reason: str) -> None:
        if not self.skip_unreadable:
            raise ImageReadError(reason, self.root / rel)
        self.skipped.append(Skipped(rel, reason))

    def _list_files(self) -> list[str]:
        """Image candidates, recursively.  A symlinked sub-folder is never silently ignored: it leads either
        outside the set or to a folder the walk reads anyway, so it is listed as skipped with the reason."""
        out: list[str] = []
        root_real = os.path.realpath(self.root)
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
            keep = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    real = os.path.realpath(full)
                    inside = real == root_real or real.startswith(root_real + os.sep)
                    why = ("symlink to a folder inside the set, which is read at its own place (not twice)" if inside
                           else "symlink to a folder outside the set (not read)")
                    self._link_skips.append(Skipped(Path(full).relative_to(self.root).as_posix() + "/", why))
                    continue
                keep.append(d)
            dirnames[:] = keep
            rel_dir = Path(dirpath).relative_to(self.root)
            for name in sorted(filenames):
                if name.startswith(".") or name in SIDECAR_NAMES or name.lower().endswith(SIDECAR_SUFFIXES):
                    continue
                out.append((rel_dir / name).as_posix())
        return sorted(out)

    def _walk_error(self, exc: OSError) -> None:
        raise InputError(f"cannot list the folder ({exc.strerror or exc})", exc.filename)

    def _read_metadata(self, present: set[str]) -> dict[str, dict[str, str]] | None:
        path = self.root / "metadata.csv"
        self._metadata_columns: list[str] = []
        if not path.exists():
            self._metadata_sha = None
            return None
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise MetadataError(f"cannot read metadata.csv ({exc})", path) from exc
        self._metadata_sha = sha256_file(path)
        reader = csv.DictReader(io.StringIO(text))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise MetadataError(f"has no 'path' column (columns: {', '.join(columns) or 'none'})", path)
        for col in columns:
            near = _misspelt_known_column(col) if col not in KNOWN_COLUMNS and col not in self.extra_columns else None
            if near:
                raise MetadataError(f"unknown column {col!r} (did you mean {near!r}?); known columns: "
                                    f"{', '.join(KNOWN_COLUMNS)}; other columns are kept as attributes", path)
        if len(set(columns)) != len(columns):
            raise MetadataError("has a repeated column name", path)
        self._metadata_columns = columns
        rows: dict[str, dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise MetadataError(f"line {line} has a different number of fields than the header", path)
            row = {k.strip(): v.strip() for k, v in row.items()}
            rel = self._normalise_rel(row["path"], path, line)
            if rel in rows:
                raise MetadataError(f"line {line} repeats path {rel!r}", path)
            if rel not in present:
                raise MetadataError(f"line {line} names {rel!r}, which is not an image file of this set", path)
            rows[rel] = row
        missing = sorted(present - set(rows) - {s.path for s in self.skipped})
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise MetadataError(f"image {missing[0]!r}{more} has no row in metadata.csv", path)
        return rows

    @staticmethod
    def _normalise_rel(value: str, path: Path, line: int) -> str:
        if not value:
            raise MetadataError(f"line {line} has an empty path", path)
        p = PurePosixPath(value.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts:
            raise MetadataError(f"line {line}: path {value!r} must be relative to the set, inside it", path)
        return p.as_posix()

    # --------------------------------------------------------------- views

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __repr__(self) -> str:
        return f"ImageSet({str(self.root)!r}, {len(self)} images, digest={self.digest[:12]})"

    def _digest(self) -> str:
        pairs = sorted({(r.path, r.sha256) for r in self.records})
        if self._metadata_sha:
            pairs.append(("metadata.csv", self._metadata_sha))
        return digest_pairs(pairs)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]

    @property
    def labels(self) -> list[str | None]:
        return [r.label for r in self.records]

    @property
    def patient_ids(self) -> list[str | None]:
        return [r.patient_id for r in self.records]

    @property
    def has_labels(self) -> bool:
        return all(r.label is not None for r in self.records)

    @property
    def has_patients(self) -> bool:
        return all(r.patient_id is not None for r in self.records)

    @property
    def n_patients(self) -> int:
        return len({r.patient_id for r in self.records if r.patient_id is not None})

    @property
    def classes(self) -> list[str]:
        return sorted({r.label for r in self.records if r.label is not None})

    @property
    def file_hashes(self) -> dict[str, str]:
        return {r.path: r.sha256 for r in self.records}

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        """A view of some images (same root and cache; its own digest)."""
        view = copy.copy(self)
        view.records = [self.records[i] for i in indices]
        view.skipped = list(self.skipped)
        view._last = None
        view.digest = view._digest()
        return view

    # -------------------------------------------------------------- pixels

    def _stored(self, record: ImageRecord) -> np.ndarray:
        if self._last is not None and self._last[0] == record.sha256:
            return self._last[1]
        stored = self.cache.get(record.sha256) if self.cache is not None else None
        if stored is None or stored.shape != (record.n_frames, record.height, record.width, record.channels):
            path = self.root / record.path
            try:
                stored, _ = imageio.decode(path, record.format, self.max_pixels)
            except OSError as exc:
                raise ImageReadError(f"cannot read ({exc.strerror or exc})", path) from exc
            if self.cache is not None:
                self.cache.put(record.sha256, stored)
        self._last = (record.sha256, stored)
        return stored

    def load(self, index: int, geometry: Geometry | None = None) -> np.ndarray:
        """Image ``index`` as float32 ``(H, W, C)`` in [0, 1], optionally harmonised."""
        record = self.records[index]
        x = imageio.to_float(self._stored(record)[record.frame])
        if geometry is not None:
            x = imageio.convert_channels(x, geometry.channels)
            x = imageio.resize(x, geometry.height, geometry.width)
        return x

    def iter_batches(
        self,
        batch_size: int = 64,
        geometry: Geometry | None = None,
        indices: Sequence[int] | None = None,
        layout: str = "NCHW",
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Stream images in batches so a large set never sits in memory whole.

        Yields ``(indices, array)``; ``array`` is float32 ``NCHW`` (or
        ``NHWC``) at ``geometry`` (default: this set's own single geometry).
        """
        geometry = geometry or self.geometry()
        order = list(range(len(self))) if indices is None else list(indices)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = np.stack([self.load(i, geometry) for i in chunk])
            if layout == "NCHW":
                batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
            yield chunk, batch

    def verify(self, progress: bool | None = None) -> list[Skipped]:
        """Decode every file once (filling the cache) so corruption shows up now.

        Unreadable files raise, or with ``skip_unreadable`` are removed from
        the set and listed in :attr:`skipped`; returns the newly skipped.
        """
        from .progress import progress_bar

        bad: dict[str, str] = {}
        seen: set[str] = set()
        for record in progress_bar(self.records, desc=f"decode {self.root.name}", unit="img", enabled=progress):
            if record.path in seen:
                continue
            seen.add(record.path)
            try:
                self._stored(record)
            except ImageReadError as exc:
                if not self.skip_unreadable:
                    raise
                bad[record.path] = exc.message
        if not bad:
            return []
        new = [Skipped(p, reason) for p, reason in bad.items()]
        self.skipped.extend(new)
        self.records = [r for r in self.records if r.path not in bad]
        if not self.records:
            raise EmptySetError(f"image set holds no readable images ({len(self.skipped)} skipped)", self.root)
        self.digest = self._digest()
        return new

    def geometry(self) -> Geometry:
        """This set's own geometry; if sizes or channels vary, the common one."""
        return harmonize(self)


# Column names that mean "the patient" in hospital exports; read as attributes they would silently
# drop the patient grouping that re-identification and patient-disjoint splits rely on.
_PATIENT_SYNONYMS = frozenset({"patient", "patientid", "subject", "subjectid", "mrn", "participant",
                               "participantid", "caseid"})


def _misspelt_known_column(column: str) -> str | None:
    """The known column ``column`` most likely stands for (``PatientID``, ``labels``, ``subject_id``), or ``None``.

    Other columns (age, view, BI-RADS...) are kept as attributes.
    """
    norm = "".join(ch for ch in column.lower() if ch.isalnum())
    if norm in _PATIENT_SYNONYMS:
        return "patient_id"
    by_norm = {k.replace("_", ""): k for k in KNOWN_COLUMNS}
    near = difflib.get_close_matches(norm, list(by_norm), n=1, cutoff=0.8)
    return by_norm[near[0]] if near else None


def harmonize(*sets: ImageSet, size: tuple[int, int] | None = None, channels: int | None = None) -> Geometry:
    """The rule that brings sets to a common size and channel count.

    - Channels: if every image has 3 channels, keep RGB; otherwise compare in
      grayscale (RGB -> BT.601 luma), so a gray set is never compared against
      invented colour.
    - Size: ``size`` if given; else the one size all images share; else the
      smallest height and the smallest width found (antialiased downsampling
      only, never upsampling beyond any image's detail).
    The returned :class:`Geometry` lists in ``notes`` everything it changed.
    """
    records = [r for s in sets for r in s.records]
    notes: list[str] = []
    chans = {r.channels for r in records}
    target_c = channels or (3 if chans == {3} else 1)
    if chans - {target_c}:
        notes.append(f"channels {sorted(chans)} brought to {target_c} ({'luma' if target_c == 1 else 'replicated gray'})")
    sizes = {(r.height, r.width) for r in records}
    if size is not None:
        h, w = size
    elif len(sizes) == 1:
        h, w = next(iter(sizes))
    else:
        h, w = min(s[0] for s in sizes), min(s[1] for s in sizes)
    if sizes - {(h, w)}:
        shown = ", ".join(f"{a}x{b}" for a, b in sorted(sizes)[:6]) + (" ..." if len(sizes) > 6 else "")
        notes.append(f"sizes {shown} resized to {h}x{w}")
    return Geometry(h, w, target_c, tuple(notes))


def metadata_columns(root: str | Path) -> list[str]:
    """The column names of ``root/metadata.csv`` (empty when the set has none), read from its header only.

    Lets a caller declare a set's extra columns (``ImageSet(extra_columns=...)``)
    before scanning it, e.g. to fill caption templates.
    """
    path = Path(root) / "metadata.csv"
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MetadataError(f"cannot read metadata.csv ({exc})", path) from exc
    return [c.strip() for c in header]
