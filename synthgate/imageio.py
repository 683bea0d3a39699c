"""Read clinical image files into float32 arrays in [0, 1].

Every decoder returns the frames of one file as a ``(F, H, W, C)`` array in a
*storage* dtype that is exact for the source (``uint8`` means value/255,
``uint16`` means value/65535, ``float32`` means the value itself) so the
on-disk cache can keep 8-bit images at one byte per pixel and still give back
bit-identical floats.  :func:`to_float` is the only place the division
happens, so cached and uncached reads agree to the last bit.

Channel layout is always ``HWC`` with ``C`` in ``{1, 3}``:

- grayscale (``L``, ``I;16``, ``F``, ``1``, MONOCHROME1/2 DICOM) -> ``C = 1``;
- RGB, YCbCr, CMYK, palette and DICOM colour -> ``C = 3`` (a palette whose
  entries are all gray becomes ``C = 1``);
- an alpha channel is dropped (the :class:`ImageInfo` ``notes`` say so).

Intensity rules:

- 8-bit data -> value / 255, 16-bit data -> value / 65535 (the nominal range of
  the bit depth, not the image's own min/max, so exposure is preserved);
- float data (TIFF ``F``, ``.npy``) already inside [0, 1] is kept; otherwise it
  and integer data of other widths are min-max scaled per frame (noted);
- DICOM grayscale: Modality LUT / Rescale Slope-Intercept, then the VOI LUT
  sequence or the first Window Center/Width (LINEAR, LINEAR_EXACT or SIGMOID,
  DICOM PS3.3 C.11.2.1.2) mapped onto [0, 1]; without either, min-max of the
  frame's rescaled values; MONOCHROME1 is inverted last, so bright is always
  dense tissue.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageReadError

#: File name endings read as images (DICOM is also detected without one).
IMAGE_SUFFIXES = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".npy": "npy",
}

#: Refuse files whose decoded pixel count (all frames) exceeds this; an image
#: bomb must not exhaust memory before we notice.  Override with the
#: ``SYNTHGATE_MAX_PIXELS`` environment variable or ``--max-pixels``.
DEFAULT_MAX_PIXELS = 2**28

#: Bumped whenever decoding changes, so the cache never serves stale arrays.
DECODER_VERSION = "1"


def default_max_pixels() -> int:
    value = os.environ.get("SYNTHGATE_MAX_PIXELS")
    return int(value) if value else DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says, read without decoding the pixels."""

    format: str
    height: int
    width: int
    channels: int  # after conversion: 1 or 3
    n_frames: int
    bit_depth: int | None
    source_mode: str  # e.g. "L", "I;16", "RGBA", "MONOCHROME1", "uint16"
    modality: str | None = None
    transfer_syntax: str | None = None
    patient_id: str | None = field(default=None, repr=False)  # never printed
    notes: tuple[str, ...] = ()

    @property
    def pixels(self) -> int:
        return self.height * self.width * self.n_frames


def detect_format(path: str | Path) -> str | None:
    """Return the format name of ``path`` or ``None`` when it is not an image.

    The extension decides, except that a file with no (or an unknown)
    extension is read as DICOM when it carries the ``DICM`` preamble.
    """
    p = Path(path)
    fmt = IMAGE_SUFFIXES.get(p.suffix.lower())
    if fmt is not None:
        return fmt
    return "dicom" if has_dicom_preamble(p) else None


def has_dicom_preamble(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def to_float(stored: np.ndarray) -> np.ndarray:
    """Storage array -> float32 in [0, 1] (see the module docstring)."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(255)
    if stored.dtype == np.uint16:
        return stored.astype(np.float32) / np.float32(65535)
    if stored.dtype == np.float32:
        return stored
    raise TypeError(f"unexpected storage dtype {stored.dtype}")


# --------------------------------------------------------------------------
# probing (header only)


def probe(path: str | Path, fmt: str | None = None, max_pixels: int | None = None) -> ImageInfo:
    """Read the header of an image file; raise :class:`ImageReadError` if unusable."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt is None:
        raise ImageReadError(
            f"not a supported image (extension {path.suffix or 'none'!r} and no DICOM preamble); "
            f"supported: {', '.join(sorted(set(IMAGE_SUFFIXES)))} and DICOM without extension",
            path,
        )
    with _reading(path, f"unreadable {fmt.upper()} header"):
        if fmt == "dicom":
            info = _probe_dicom(path)
        elif fmt == "npy":
            info = _probe_npy(path)
        else:
            info = _probe_pillow(path, fmt)
    _check_geometry(info, path, max_pixels)
    return info


def _check_geometry(info: ImageInfo, path: Path, max_pixels: int | None) -> None:
    limit = default_max_pixels() if max_pixels is None else max_pixels
    if info.height <= 0 or info.width <= 0 or info.n_frames <= 0:
        raise ImageReadError(f"has no pixels ({info.n_frames} frame(s) of {info.height}x{info.width})", path)
    if info.pixels > limit:
        raise ImageReadError(
            f"refused: {info.n_frames} frame(s) of {info.height}x{info.width} = {info.pixels:,} pixels "
            f"exceeds the limit of {limit:,} (possible image bomb; raise it with --max-pixels)",
            path,
        )


@contextmanager
def _reading(path: Path, problem: str):
    """Turn whatever a decoder library raises into one :class:`ImageReadError` naming the file."""
    try:
        yield
    except ImageReadError:
        raise
    except PermissionError as exc:
        raise ImageReadError(f"cannot read ({exc.strerror or 'permission denied'})", path) from exc
    except MemoryError as exc:
        raise ImageReadError("not enough memory to decode", path) from exc
    except Exception as exc:  # decoder libraries raise anything
        raise ImageReadError(f"{problem} ({_short(exc)})", path) from exc


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


_PIL_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "PA": 8, "CMYK": 8, "YCbCr": 8,
             "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32, "LAB": 8, "HSV": 8}


def _open_pillow(path: Path):
    from PIL import Image

    # Our own pixel limit applies; Pillow's own bomb check would fire first
    # with a different message, so it is lifted for the header read only.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _pillow_channels(img) -> tuple[int, list[str]]:
    mode = img.mode
    notes: list[str] = []
    if mode in ("RGBA", "LA", "PA"):
        notes.append("alpha channel dropped")
    if mode in ("P", "PA"):
        return (1 if _palette_is_gray(img) else 3), notes
    if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;16"):
        return 1, notes
    return 3, notes


def _palette_is_gray(img) -> bool:
    pal = img.getpalette() or []
    rgb = np.asarray(pal, dtype=np.int32).reshape(-1, 3) if pal else np.zeros((0, 3), np.int32)
    return bool(len(rgb)) and bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def _probe_pillow(path: Path, fmt: str) -> ImageInfo:
    with _open_pillow(path) as img:
        actual = (img.format or "").lower()
        expected = {"png": "png", "jpeg": "jpeg", "tiff": "tiff"}[fmt]
        if actual != expected:
            raise ImageReadError(f"file extension says {fmt.upper()} but the content is {actual.upper() or 'unknown'}", path)
        channels, notes = _pillow_channels(img)
        n_frames = getattr(img, "n_frames", 1) if fmt == "tiff" else 1
        return ImageInfo(
            format=fmt, height=img.height, width=img.width, channels=channels, n_frames=n_frames,
            bit_depth=_PIL_BITS.get(img.mode), source_mode=img.mode, notes=tuple(notes),
        )


def _npy_layout(shape: tuple[int, ...]) -> tuple[str, int, int, int, int]:
    """Return (layout, frames, height, width, source_channels) for an array shape."""
    if len(shape) == 2:
        return "HW", 1, shape[0], shape[1], 1
    if len(shape) == 3:
        if shape[-1] in (1, 3, 4):
            return "HWC", 1, shape[0], shape[1], shape[2]
        if shape[0] in (1, 3, 4):
            return "CHW", 1, shape[1], shape[2], shape[0]
        return "FHW", shape[0], shape[1], shape[2], 1
    if len(shape) == 4 and shape[-1] in (1, 3, 4):
        return "FHWC", shape[0], shape[1], shape[2], shape[3]
    raise ValueError(f"array of shape {shape} is not an image (expected HW, HWC, CHW, FHW or FHWC)")


def _probe_npy(path: Path) -> ImageInfo:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype.kind not in "biuf":
        raise ImageReadError(f"NPY dtype {arr.dtype} is not numeric", path)
    layout, frames, h, w, c = _npy_layout(arr.shape)
    notes = ["alpha channel dropped"] if c == 4 else []
    return ImageInfo(
        format="npy", height=h, width=w, channels=1 if c == 1 else 3, n_frames=frames,
        bit_depth=arr.dtype.itemsize * 8, source_mode=f"{arr.dtype}:{layout}", notes=tuple(notes),
    )


def _probe_dicom(path: Path) -> ImageInfo:
    ds = _read_dicom(path, stop_before_pixels=True)
    return _dicom_info(ds, path)


def _read_dicom(path: Path, stop_before_pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        # a .dcm without preamble / file meta (legacy ACR-NEMA style)
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)


def _dicom_info(ds, path: Path) -> ImageInfo:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None or "BitsAllocated" not in ds:
        kind = ds.get("Modality") or "this object"
        raise ImageReadError(f"DICOM file holds no image (no Rows/Columns/pixel attributes; modality {kind})", path)
    frames = int(ds.get("NumberOfFrames") or 1)
    spp = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2")
    channels = 3 if (spp == 3 or photometric == "PALETTE COLOR") else 1
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    pid = ds.get("PatientID")
    return ImageInfo(
        format="dicom", height=int(rows), width=int(cols), channels=channels, n_frames=frames,
        bit_depth=int(ds.get("BitsStored") or ds.get("BitsAllocated")), source_mode=photometric,
        modality=str(ds.get("Modality")) if ds.get("Modality") else None,
        transfer_syntax=ts.name if ts is not None else None,
        patient_id=str(pid).strip() or None if pid is not None else None,
    )


# --------------------------------------------------------------------------
# decoding


def decode(path: str | Path, fmt: str | None = None, max_pixels: int | None = None) -> tuple[np.ndarray, ImageInfo]:
    """Decode every frame of ``path``.

    Returns
    -------
    stored, info
        ``stored`` has shape ``(F, H, W, C)`` in a storage dtype (convert with
        :func:`to_float`); ``info`` is the file's :class:`ImageInfo`.
    """
    path = Path(path)
    info = probe(path, fmt, max_pixels)
    with _reading(path, f"corrupt or truncated {info.format.upper()} data"):
        if info.format == "dicom":
            stored = _decode_dicom(path, info)
        elif info.format == "npy":
            stored = _decode_npy(path, info)
        else:
            stored = _decode_pillow(path, info)
    expected = (info.n_frames, info.height, info.width, info.channels)
    if stored.shape != expected:
        raise ImageReadError(f"decoded shape {stored.shape} disagrees with the header {expected}", path)
    return np.ascontiguousarray(stored), info


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``path`` to float32 ``(F, H, W, C)`` in [0, 1] (no cache)."""
    stored, _ = decode(path, max_pixels=max_pixels)
    return to_float(stored)


def _minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    lo, hi = float(np.min(x)), float(np.max(x))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("contains NaN or infinite values")
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def _float_unit(x: np.ndarray) -> np.ndarray:
    """Float data: keep when inside [0, 1], else min-max per frame."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("contains NaN or infinite values")
    if x.size and (x.min() < 0 or x.max() > 1):
        return np.stack([_minmax(f) for f in x])
    return x


def _pillow_frame(img, channels: int) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        a = np.asarray(img.convert("L"), dtype=np.uint8)
    elif mode in ("L", "LA"):
        a = np.asarray(img.getchannel(0) if mode == "LA" else img, dtype=np.uint8)
    elif mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.uint16)
    elif mode == "I":
        raw = np.asarray(img, dtype=np.int64)
        if raw.size and raw.min() >= 0 and raw.max() <= 65535:
            a = raw.astype(np.uint16)
        else:
            a = _minmax(raw)
    elif mode == "F":
        a = _float_unit(np.asarray(img, dtype=np.float32)[None])[0]
    elif mode in ("P", "PA"):
        a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    elif mode in ("RGB", "RGBA"):
        a = np.asarray(img.convert("RGB") if mode == "RGBA" else img, dtype=np.uint8)
    else:  # CMYK, YCbCr, LAB, HSV, ...
        a = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return a


def _decode_pillow(path: Path, info: ImageInfo) -> np.ndarray:
    from PIL import ImageSequence

    with _open_pillow(path) as img:
        frames = []
        for page in ImageSequence.Iterator(img):
            page.load()
            frames.append(_pillow_frame(page, info.channels))
        dtypes = {f.dtype for f in frames}
        if len(dtypes) > 1:  # pages of different depth: fall back to float
            frames = [to_float(f) if f.dtype != np.float32 else f for f in frames]
        return np.stack(frames)


def _decode_npy(path: Path, info: ImageInfo) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    layout = info.source_mode.split(":")[1]
    if layout == "HW":
        arr = arr[None, :, :, None]
    elif layout == "HWC":
        arr = arr[None]
    elif layout == "CHW":
        arr = np.moveaxis(arr, 0, -1)[None]
    elif layout == "FHW":
        arr = arr[..., None]
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype.kind in "iu":
        return np.stack([_minmax(f) for f in arr])
    return _float_unit(arr)


# DICOM ---------------------------------------------------------------------


def _functional_value(ds, frame: int, group: str, keyword: str):
    """Look up an attribute in per-frame, then shared functional groups."""
    for seq_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if not seq or index >= len(seq):
            continue
        sub = seq[index].get(group)
        if sub and keyword in sub[0]:
            return sub[0].get(keyword)
    return None


def _first(value) -> float | None:
    """First value of a possibly multi-valued DICOM attribute."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return float(value[0]) if len(value) else None
    return float(value)


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map values through a DICOM VOI window onto [0, 1] (PS3.3 C.11.2.1.2)."""
    x = np.asarray(x, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width {width} must be > 0")
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width {width} must be > 0")
        out = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    elif function == "LINEAR":
        if width < 1:
            raise ValueError(f"window width {width} must be >= 1")
        lo = center - 0.5 - (width - 1) / 2
        hi = center - 0.5 + (width - 1) / 2
        out = np.where(x <= lo, 0.0, np.where(x > hi, 1.0, ((x - (center - 0.5)) / max(width - 1, 1e-12)) + 0.5))
        out = np.clip(out, 0.0, 1.0)
    else:
        raise ValueError(f"VOI LUT function {function!r} must be one of LINEAR, LINEAR_EXACT or SIGMOID")
    return out.astype(np.float32)


def _rescale(ds, frame_index: int, values: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is None:
        slope = _functional_value(ds, frame_index, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional_value(ds, frame_index, "PixelValueTransformationSequence", "RescaleIntercept")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    return values.astype(np.float64) * slope + intercept


def _voi(ds, frame_index: int, values: np.ndarray) -> np.ndarray:
    if "VOILUTSequence" in ds:
        # PS3.3 C.11.2.1.1: index = input - first mapped value, clamped to the table
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
        if isinstance(data, bytes):  # read as OW
            data = np.frombuffer(data, dtype="<u2" if len(data) >= 2 * (entries or 65536) else np.uint8)
        table = np.asarray(data, dtype=np.float64).ravel()
        entries = entries or 65536
        index = np.clip(np.round(values) - first, 0, min(entries, table.size) - 1).astype(np.int64)
        return np.clip(table[index] / float(2**bits - 1), 0.0, 1.0).astype(np.float32)
    center = ds.get("WindowCenter")
    width = ds.get("WindowWidth")
    function = ds.get("VOILUTFunction")
    if center is None or width is None:
        center = _functional_value(ds, frame_index, "FrameVOILUTSequence", "WindowCenter")
        width = _functional_value(ds, frame_index, "FrameVOILUTSequence", "WindowWidth")
        function = function or _functional_value(ds, frame_index, "FrameVOILUTSequence", "VOILUTFunction")
    if center is not None and width is not None:
        c, w = _first(center), _first(width)
        if w is not None and w > 0:
            return window(values, c, w, str(function or "LINEAR"))
    return _minmax(values)


def _decode_dicom(path: Path, info: ImageInfo) -> np.ndarray:
    ds = _read_dicom(path, stop_before_pixels=False)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError("DICOM file has no pixel data", path)
    arr = ds.pixel_array  # decodes compressed syntaxes; YBR -> RGB
    photometric = info.source_mode
    frames = info.n_frames
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = np.asarray(apply_color_lut(arr, ds))
        rgb = rgb.reshape(frames, info.height, info.width, 3)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return (rgb.astype(np.float64) / float(2**bits - 1)).clip(0, 1).astype(np.float32)
    if info.channels == 3:
        rgb = arr.reshape(frames, info.height, info.width, 3)
        if rgb.dtype == np.uint8:
            return rgb
        bits = int(ds.get("BitsStored") or rgb.dtype.itemsize * 8)
        return (rgb.astype(np.float64) / float(2**bits - 1)).clip(0, 1).astype(np.float32)
    arr = arr.reshape(frames, info.height, info.width)
    out = np.empty((frames, info.height, info.width, 1), np.float32)
    for i in range(frames):
        values = _rescale(ds, i, arr[i])
        gray = _voi(ds, i, values)
        if photometric == "MONOCHROME1":
            gray = 1.0 - gray
        out[i, :, :, 0] = gray
    return out


# --------------------------------------------------------------------------
# geometry: channels and size


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of ``(..., 3)`` data, keeping a channel axis of 1."""
    w = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return (rgb.astype(np.float32) @ w)[..., None]


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Bring an ``(..., H, W, C)`` float image to ``channels`` (1 or 3)."""
    c = x.shape[-1]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        return luminance(x)
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of a float ``(H, W, C)`` image (Pillow, per channel)."""
    if x.shape[0] == height and x.shape[1] == width:
        return x
    from PIL import Image

    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(x[:, :, k], dtype=np.float32))
                   .resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
        for k in range(x.shape[2])
    ]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0)
