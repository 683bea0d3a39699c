"""Phantom chest radiographs: the embedded stand-in for a hospital data set.

Each invented patient has a stable anatomical signature -- body outline, lung
and heart shapes and positions, rib spacing and curvature, a patient-specific
lung texture (the "vascular markings"), a few calcified nodules and sometimes
a pacemaker -- that persists across all of that patient's images, while pose
(rotation, shift, scale), breathing, exposure and noise change from image to
image.  The binary ``label`` is a visible lesion: a round opacity inside one
lung.  So a classifier can learn the label, and a re-identification network
can learn the patient, which are the two things the audit needs.

Images are rendered analytically at the target size (no interpolation), and
everything follows from ``seed``.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .fsutil import atomic_directory

_FIRST = ["Ada", "Ben", "Clara", "Dev", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemi", "Luca",
          "Mira", "Nils", "Oona", "Pavel", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yara", "Zeno"]
_LAST = ["Achterberg", "Baptiste", "Castellano", "Dimitriou", "Eklund", "Fairweather", "Grünberg", "Haddad",
         "Ivanova", "Jovanović", "Kowalczyk", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov",
         "Quintana", "Rasmussen", "Szabo", "Tanaka", "Uribe", "Valdez", "Whitfield", "Zielinski"]
_HOSPITALS = ["St. Aldhelm General Hospital", "Riverside Memorial Clinic", "Northgate University Hospital"]


@dataclass(frozen=True)
class Anatomy:
    """One patient's persistent features, in normalised coordinates [-1, 1]."""

    patient_id: str
    body: tuple[float, float, float, float]  # cx, cy, ax, ay
    lungs: tuple[tuple[float, float, float, float, float], ...]  # cx, cy, ax, ay, angle
    heart: tuple[float, float, float, float]
    spine_width: float
    ribs: tuple[float, float, float]  # top, spacing, curvature
    texture: tuple[tuple[float, float, float, float], ...]  # fx, fy, phase, amplitude
    nodules: tuple[tuple[float, float, float], ...]  # x, y, radius
    pacemaker: tuple[float, float] | None
    scanner: int  # 0: MONOCHROME2, 1: MONOCHROME1, 2: MONOCHROME2 with rescale intercept
    header: dict = field(default_factory=dict, compare=False, repr=False)


def make_anatomy(rng: np.random.Generator, patient_id: str) -> Anatomy:
    u = rng.uniform
    body = (u(-0.04, 0.04), u(0.02, 0.08), u(0.80, 0.94), u(0.78, 0.92))
    lungs = tuple(
        (side * u(0.30, 0.42), u(-0.12, 0.0), u(0.20, 0.30), u(0.42, 0.58), side * u(-0.20, 0.20))
        for side in (-1.0, 1.0)
    )
    heart = (u(0.05, 0.22), u(0.18, 0.32), u(0.20, 0.30), u(0.17, 0.25))
    ribs = (u(-0.62, -0.48), u(0.13, 0.19), u(0.15, 0.45))
    texture = tuple((u(2.5, 7.0) * rng.choice([-1, 1]), u(2.5, 7.0), u(0, 2 * math.pi), u(0.35, 1.0)) for _ in range(6))
    nodules = tuple((u(-0.5, 0.5), u(-0.45, 0.35), u(0.025, 0.05)) for _ in range(int(rng.integers(1, 4))))
    pacemaker = (u(-0.55, -0.35), u(-0.65, -0.5)) if rng.random() < 0.25 else None
    return Anatomy(patient_id, body, lungs, heart, u(0.07, 0.11), ribs, texture, nodules, pacemaker,
                   scanner=int(rng.integers(0, 3)))


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0, px=1.0):
    """Soft (about one pixel wide) inside-mask of a rotated ellipse."""
    ca, sa = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    xr, yr = ca * dx + sa * dy, -sa * dx + ca * dy
    d = np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2)
    return np.clip((1.0 - d) * min(ax, ay) / px + 0.5, 0.0, 1.0)


def render(anatomy: Anatomy, size: int, rng: np.random.Generator, lesion: bool) -> np.ndarray:
    """Render one radiograph of ``anatomy``; returns float32 ``(size, size)`` in [0, 1]."""
    u = rng.uniform
    px = 2.0 / size  # one pixel in normalised units
    # pose: output pixel p shows anatomy point R^-1 (p - t) / s
    angle, (tx, ty), scale = math.radians(u(-6, 6)), (u(-0.07, 0.07), u(-0.07, 0.07)), u(0.93, 1.07)
    breath = u(0.95, 1.05)
    grid = (np.arange(size, dtype=np.float64) + 0.5) * px - 1.0
    gx, gy = np.meshgrid(grid, grid)
    ca, sa = math.cos(angle), math.sin(angle)
    x = (ca * (gx - tx) + sa * (gy - ty)) / scale
    y = (-sa * (gx - tx) + ca * (gy - ty)) / scale

    body = _ellipse(x, y, *anatomy.body, px=px)
    lungs = np.zeros_like(x)
    for cx, cy, ax, ay, ang in anatomy.lungs:
        lungs = np.maximum(lungs, _ellipse(x, y, cx, cy, ax, ay * breath, ang, px))
    lungs *= body
    tex = sum(a * np.cos(fx * x + fy * y + ph) for fx, fy, ph, a in anatomy.texture)
    img = 0.04 + 0.46 * body - 0.30 * lungs + 0.05 * tex * lungs
    img += 0.20 * _ellipse(x, y, *anatomy.heart, px=px) * body
    img += 0.24 * np.clip((anatomy.spine_width - np.abs(x - anatomy.body[0])) / px + 0.5, 0, 1) * body
    top, spacing, curve = anatomy.ribs
    for i in range(7):
        ry = top + i * spacing + curve * x**2
        band = np.clip((0.022 - np.abs(y - ry)) / px + 0.5, 0, 1)
        img += 0.07 * band * body * (np.abs(x - anatomy.body[0]) > anatomy.spine_width)
    for nx, ny, nr in anatomy.nodules:
        img += 0.30 * _ellipse(x, y, nx, ny, nr, nr, 0.0, px)
    if anatomy.pacemaker is not None:
        pxc, pyc = anatomy.pacemaker
        box = np.clip((0.09 - np.abs(x - pxc)) / px + 0.5, 0, 1) * np.clip((0.06 - np.abs(y - pyc)) / px + 0.5, 0, 1)
        img += 0.5 * box
    if lesion:
        cx, cy, ax, ay, ang = anatomy.lungs[int(rng.integers(0, 2))]
        r, t = math.sqrt(u(0, 0.45)), u(0, 2 * math.pi)
        lx, ly = cx + r * ax * math.cos(t), cy + r * ay * math.sin(t)
        sigma = u(0.10, 0.14)
        img += u(0.30, 0.40) * np.exp(-((x - lx) ** 2 + (y - ly) ** 2) / (2 * sigma**2))
    # exposure and detector noise
    contrast, brightness, gamma = u(0.85, 1.15), u(-0.05, 0.05), u(0.85, 1.18)
    img = np.clip((img - 0.4) * contrast + 0.4 + brightness, 0, 1) ** gamma
    img = img + rng.normal(0.0, u(0.008, 0.025), img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _header(rng: np.random.Generator, anatomy_rng_id: int) -> dict:
    first, last = _FIRST[int(rng.integers(len(_FIRST)))], _LAST[int(rng.integers(len(_LAST)))]
    year, month, day = int(rng.integers(1938, 2004)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return {
        "PatientName": f"{last}^{first}",
        "PatientBirthDate": f"{year:04d}{month:02d}{day:02d}",
        "PatientSex": "F" if rng.random() < 0.5 else "M",
        "InstitutionName": _HOSPITALS[anatomy_rng_id % len(_HOSPITALS)],
    }


#: the year every phantom study is dated (ages are counted to it)
STUDY_YEAR = 2024


def patient_age(anatomy: "Anatomy") -> int:
    """The invented patient's age in whole years at the (fixed) study year."""
    return STUDY_YEAR - int(anatomy.header["PatientBirthDate"][:4])


@dataclass(frozen=True)
class PhantomImage:
    path: str  # relative to the output root, e.g. "train/img_00007.png"
    split: str
    patient_id: str
    label: int
    pixels: np.ndarray = field(repr=False)
    index: int = 0


def _plan(patients: int, images_per_patient: int, size: int, seed: int, holdout_fraction: float):
    if patients < 1 or images_per_patient < 1:
        raise UsageError("--patients and --images-per-patient must be at least 1")
    if size < 16 or size > 2048:
        raise UsageError(f"--size {size} must be between 16 and 2048")
    if not 0.0 <= holdout_fraction < 1.0:
        raise UsageError(f"--holdout-fraction {holdout_fraction} must be in [0, 1)")
    root = np.random.default_rng(seed)
    ids = root.choice(9_000_000, size=patients, replace=False) + 1_000_000
    patient_ids = [f"MRN{int(v):07d}" for v in ids]
    n_holdout = 0 if patients < 2 or holdout_fraction == 0 else min(patients - 1, max(1, round(patients * holdout_fraction)))
    holdout = set(root.choice(patients, size=n_holdout, replace=False).tolist()) if n_holdout else set()
    anatomies: dict[str, Anatomy] = {}
    for p, pid in enumerate(patient_ids):
        prng = np.random.default_rng([seed, p, 1])
        anatomy = make_anatomy(prng, pid)
        anatomy.header.update(_header(prng, p))
        anatomies[pid] = anatomy
    return patient_ids, holdout, anatomies


def iter_phantoms(images_per_patient: int, size: int, seed: int, suffix: str, anatomies: dict[str, Anatomy],
                  patient_ids: list[str], holdout: set[int]):
    """Render images one at a time (a large set never sits in memory)."""
    counter = 0
    for p, pid in enumerate(patient_ids):
        split = "holdout" if p in holdout else "train"
        for k in range(images_per_patient):
            irng = np.random.default_rng([seed, p, 2, k])
            label = int(irng.random() < 0.5)
            counter += 1
            pixels = render(anatomies[pid], size, irng, bool(label))
            yield PhantomImage(f"{split}/img_{counter:05d}{suffix}", split, pid, label, pixels, counter)


def generate(patients: int = 20, images_per_patient: int = 4, size: int = 64, seed: int = 0,
             holdout_fraction: float = 0.25, suffix: str = ".png") -> tuple[list[PhantomImage], dict[str, Anatomy]]:
    """Render a phantom data set in memory (see :func:`write_phantoms`)."""
    patient_ids, holdout, anatomies = _plan(patients, images_per_patient, size, seed, holdout_fraction)
    images = list(iter_phantoms(images_per_patient, size, seed, suffix, anatomies, patient_ids, holdout))
    return images, anatomies


def _metadata_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row[c] for c in columns})
    return buf.getvalue()


def write_phantoms(out: str | Path, *, patients: int = 20, images_per_patient: int = 4, size: int = 64,
                   seed: int = 0, fmt: str = "png", holdout_fraction: float = 0.25, bit_depth: int = 8,
                   overwrite: bool = False) -> dict:
    """Write a phantom data set to ``out`` atomically; return a summary.

    Layout: ``train/`` and ``holdout/`` (patient-disjoint), each with its
    images and a ``metadata.csv`` (``path,label`` plus ``patient_id`` for PNG;
    DICOM carries PatientID in its header), and a top-level ``metadata.csv``
    with a ``split`` column so the whole folder also reads as one set.
    ``fmt="dicom"`` writes CR images with invented identifying header values
    (name, ID, birth date, institution, accession number) for PHI tests.
    """
    if fmt not in ("png", "dicom"):
        raise UsageError(f"--format {fmt!r} must be one of `png` or `dicom`")
    if bit_depth not in (8, 16):
        raise UsageError(f"--bit-depth {bit_depth} must be 8 or 16")
    patient_ids, holdout, anatomies = _plan(patients, images_per_patient, size, seed, holdout_fraction)
    stream = iter_phantoms(images_per_patient, size, seed, ".png" if fmt == "png" else ".dcm", anatomies,
                           patient_ids, holdout)
    images: list[PhantomImage] = []  # metadata only; pixels are written and dropped
    with atomic_directory(out, overwrite=overwrite, kind="synthgate phantoms") as tmp:
        for img in stream:
            target = tmp / img.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "png":
                _write_png(target, img.pixels, bit_depth)
            else:
                _write_dicom(target, img, anatomies[img.patient_id], seed)
            images.append(PhantomImage(img.path, img.split, img.patient_id, img.label, np.empty(0), img.index))
        # sex and age of the invented patient (from its header): subgroups for the per-subgroup analysis
        cols = (["path", "patient_id", "label"] if fmt == "png" else ["path", "label"]) + ["sex", "age"]
        demo = {pid: {"sex": a.header["PatientSex"], "age": patient_age(a)} for pid, a in anatomies.items()}
        for split in ("train", "holdout"):
            rows = [{"path": i.path.split("/", 1)[1], "patient_id": i.patient_id, "label": i.label,
                     **demo[i.patient_id]} for i in images if i.split == split]
            if rows:
                (tmp / split / "metadata.csv").write_text(_metadata_csv(rows, cols))
        rows = [{"path": i.path, "patient_id": i.patient_id, "label": i.label, "split": i.split, **demo[i.patient_id]}
                for i in images]
        (tmp / "metadata.csv").write_text(_metadata_csv(rows, cols + ["split"]))
    counts = {s: sum(1 for i in images if i.split == s) for s in ("train", "holdout")}
    return {
        "out": str(out), "format": fmt, "size": size, "seed": seed, "images": len(images),
        "patients": len(anatomies), "train_images": counts["train"], "holdout_images": counts["holdout"],
        "train_patients": len({i.patient_id for i in images if i.split == "train"}),
        "holdout_patients": len({i.patient_id for i in images if i.split == "holdout"}),
        "lesion_fraction": round(float(np.mean([i.label for i in images])), 3),
    }


def _write_png(path: Path, pixels: np.ndarray, bit_depth: int) -> None:
    from PIL import Image

    if bit_depth == 8:
        Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path)
    else:
        Image.fromarray(np.round(pixels * 65535).astype(np.uint16)).save(path)


def _write_dicom(path: Path, img: PhantomImage, anatomy: Anatomy, seed: int) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    values = np.round(img.pixels * 4095).astype(np.uint16)
    photometric, intercept = "MONOCHROME2", 0
    if anatomy.scanner == 1:  # stored inverted; the viewer (and our reader) inverts back
        photometric, values = "MONOCHROME1", (4095 - values).astype(np.uint16)
    elif anatomy.scanner == 2:
        intercept = -1024
    uid = lambda *parts: generate_uid(entropy_srcs=[str(seed), anatomy.patient_id, *map(str, parts)])  # noqa: E731
    sop_class = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid("sop", img.index)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    study_day = 1 + img.index % 28
    for keyword, value in {
        "SpecificCharacterSet": "ISO_IR 192", "SOPClassUID": sop_class, "SOPInstanceUID": meta.MediaStorageSOPInstanceUID,
        "StudyInstanceUID": uid("study", img.index), "SeriesInstanceUID": uid("series", img.index),
        "StudyDate": f"2024{1 + img.index % 12:02d}{study_day:02d}", "StudyTime": "101500",
        "AccessionNumber": f"ACC{(seed * 7919 + img.index * 104729) % 10**8:08d}",
        "Modality": "CR", "Manufacturer": "Phantom Imaging Systems", "BodyPartExamined": "CHEST",
        "ViewPosition": "PA", "InstitutionName": anatomy.header["InstitutionName"],
        "ReferringPhysicianName": "Hartley^Morgan", "PatientName": anatomy.header["PatientName"],
        "PatientID": anatomy.patient_id, "PatientBirthDate": anatomy.header["PatientBirthDate"],
        "PatientSex": anatomy.header["PatientSex"], "StudyID": f"{img.index:05d}", "SeriesNumber": 1,
        "InstanceNumber": img.index, "ImageType": ["ORIGINAL", "PRIMARY"],
        "SamplesPerPixel": 1, "PhotometricInterpretation": photometric,
        "Rows": values.shape[0], "Columns": values.shape[1], "BitsAllocated": 16, "BitsStored": 12,
        "HighBit": 11, "PixelRepresentation": 0, "RescaleSlope": 1, "RescaleIntercept": intercept,
        "RescaleType": "US", "WindowCenter": 2048 + intercept, "WindowWidth": 4096,
    }.items():
        setattr(ds, keyword, value)
    ds.PixelData = values.tobytes()
    ds.save_as(path, enforce_file_format=True)
