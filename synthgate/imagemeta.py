"""Ancillary metadata of image files: every text a file carries besides its pixels, and the file without it.

PNG, TIFF and JPEG files carry more than pixels: PNG text chunks (``tEXt``,
``zTXt``, ``iTXt``), ``eXIf`` and private chunks; TIFF tags (ImageDescription,
Artist, XMP, IPTC, the EXIF and GPS directories); JPEG comment and
application segments (EXIF, XMP, IPTC); and bytes after the image's end.
:func:`read_metadata` lists all of them as text, so the audit can search
them; :func:`strip_ancillary` rewrites a file without them, so a release
ships pixels and synthgate's own provenance only.

What is kept by :func:`strip_ancillary`, and why:

PNG
    the critical chunks (IHDR, PLTE, IDAT, IEND), ``tRNS`` (transparency is
    part of the decoded image), the APNG frame chunks (``acTL``, ``fcTL``,
    ``fdAT``) and the first ``iTXt`` chunk with keyword ``synthgate`` (the
    provenance that ``generators.write`` puts in every synthetic PNG).  The
    kept chunks are copied byte for byte, so the pixels are identical by
    construction;
JPEG
    every marker segment the decoder needs (SOI, DQT, DHT, DRI, SOF, SOS and
    the entropy-coded data, EOI), the JFIF ``APP0`` header and the Adobe
    ``APP14`` segment (its colour-transform flag changes how the pixels
    decode); never re-encoded, so the pixels are identical;
TIFF
    the pixels, written again by Pillow with a lossless compression (the
    original one when Pillow writes it losslessly), without any tag Pillow
    does not need to describe the pixels; every page; checked pixel for
    pixel against the original before it is returned;
DICOM
    every element but binary data beyond the pixels (OB/OW/OF/OD/OL/OV/UN
    other than Pixel Data, at any depth: an ICC profile or a private blob
    can hold a whole training image), and no trailing padding; the header
    text itself is gated by the ``dicom_phi`` check; the pixel data is
    copied as it is, and checked to decode equal;
NPY
    the header and the array; nothing after the array (a red team appended a
    training image there).
"""
from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageReadError, UsageError

#: keyword of the PNG ``iTXt`` chunk that carries synthgate's provenance (written by generators.write)
PROVENANCE_KEY = "synthgate"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEEP = (b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"acTL", b"fcTL", b"fdAT")
# ancillary PNG chunks that describe how to show the pixels and hold no free text
PNG_BINARY = (b"gAMA", b"cHRM", b"sRGB", b"cICP", b"mDCV", b"cLLI", b"pHYs", b"sBIT", b"bKGD", b"hIST", b"sPLT",
              b"tIME", b"oFFs", b"pCAL", b"sCAL")
# TIFF tags that describe the pixels (never free text)
TIFF_STRUCTURAL = frozenset({
    254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 274, 277, 278, 279, 280, 281, 282, 283, 284, 290, 291, 296,
    297, 301, 317, 318, 319, 320, 321, 322, 323, 324, 325, 332, 338, 339, 340, 341, 347, 512, 513, 514, 515,
    529, 530, 531, 532,
})
TIFF_ICC = 34675
EXIF_IFDS = {0x8769: "EXIF", 0x8825: "GPS", 0xA005: "Interop"}
LOSSLESS_TIFF = ("raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits")
MAX_INFLATE = 16 * 2**20  # a compressed text chunk is read up to 16 MiB of text (zip bombs stop there)


@dataclass(frozen=True)
class MetaText:
    """One piece of ancillary metadata, as text.

    ``where`` names it without its value (``PNG tEXt 'Comment'``, ``TIFF tag
    Artist (315)``, ``JPEG COM segment``); ``kind`` is ``text`` (free text a
    person or program wrote: metadata), ``provenance`` (synthgate's own
    provenance chunk) or ``binary`` (colour profiles and the like: searched,
    but not free text).  ``structured`` holds the decoded JSON of a
    provenance chunk.
    """

    where: str
    text: str
    kind: str = "text"
    structured: object = None


# ------------------------------------------------------------------ reading


def read_metadata(path: str | Path, fmt: str, data: bytes | None = None) -> tuple[MetaText, ...]:
    """Every piece of ancillary metadata of one image file (``fmt``: png, jpeg, tiff; others have none)."""
    if fmt in ("dicom", "npy"):
        return ()
    if data is None:
        data = Path(path).read_bytes()
    try:
        if fmt == "png":
            return tuple(_png_metadata(data))
        if fmt == "jpeg":
            return tuple(_jpeg_metadata(data))
        if fmt == "tiff":
            return tuple(_tiff_metadata(data))
    except (ValueError, OSError, SyntaxError, zlib.error) as exc:
        raise ImageReadError(f"cannot read the metadata of this {fmt.upper()} file: {exc}", path) from None
    raise UsageError(f"unknown image format {fmt!r}; one of `png`, `jpeg`, `tiff`, `dicom`, `npy`")


def _png_chunks(data: bytes):
    """``(type, payload, raw)`` of every chunk, then ``(b"", trailing bytes, ...)`` if anything follows IEND."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG signature")
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError("truncated chunk header")
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError(f"truncated {ctype.decode('latin-1')} chunk")
        yield ctype, data[pos + 8:pos + 8 + length], data[pos:end]
        pos = end
        if ctype == b"IEND":
            break
    if pos < len(data):
        yield b"", data[pos:], data[pos:]


def _inflate(payload: bytes) -> bytes:
    return zlib.decompressobj().decompress(payload, MAX_INFLATE)


def _png_metadata(data: bytes):
    for ctype, payload, _ in _png_chunks(data):
        name = ctype.decode("latin-1")
        if ctype == b"":
            yield MetaText("PNG bytes after IEND", payload.decode("latin-1"))
        elif ctype == b"tEXt":
            key, _, value = payload.partition(b"\0")
            yield MetaText(f"PNG tEXt {key.decode('latin-1')!r}", key.decode("latin-1") + "\n" + value.decode("latin-1"))
        elif ctype == b"zTXt":
            key, _, rest = payload.partition(b"\0")
            yield MetaText(f"PNG zTXt {key.decode('latin-1')!r}",
                           key.decode("latin-1") + "\n" + _inflate(rest[1:]).decode("latin-1"))
        elif ctype == b"iTXt":
            yield _png_itxt(payload)
        elif ctype == b"eXIf":
            yield from _exif_texts(payload, "PNG eXIf")
        elif ctype == b"iCCP":
            key, _, _ = payload.partition(b"\0")
            yield MetaText("PNG iCCP profile name", key.decode("latin-1"), "binary")
        elif ctype in PNG_KEEP or ctype in PNG_BINARY:
            continue
        else:  # a private or unknown ancillary chunk: anything may be in it
            yield MetaText(f"PNG {name} chunk", payload.decode("latin-1"))


def _png_itxt(payload: bytes) -> MetaText:
    key, _, rest = payload.partition(b"\0")
    compressed = rest[:1] == b"\x01"
    lang, _, rest = rest[2:].partition(b"\0")
    translated, _, text = rest.partition(b"\0")
    text = (_inflate(text) if compressed else text).decode("utf-8", "replace")
    keyword = key.decode("latin-1")
    full = "\n".join(t for t in (keyword, lang.decode("latin-1"), translated.decode("utf-8", "replace"), text) if t)
    if keyword == PROVENANCE_KEY:
        try:
            structured = json.loads(text)
        except ValueError:
            structured = None
        if isinstance(structured, dict):
            return MetaText(f"PNG iTXt {keyword!r}", full, "provenance", structured)
    return MetaText(f"PNG iTXt {keyword!r}", full)


def _exif_texts(payload: bytes, where: str):
    """Every string value of an EXIF block (IFD0 and its EXIF, GPS and interoperability directories)."""
    from PIL import ExifTags, Image

    exif = Image.Exif()
    try:
        exif.load(payload)
    except Exception:  # noqa: BLE001 - a malformed block is still searched, as raw text
        yield MetaText(f"{where} (unparsed)", payload.decode("latin-1"))
        return
    blocks = [("", dict(exif), ExifTags.TAGS)]
    for ifd, label in EXIF_IFDS.items():
        try:
            sub = exif.get_ifd(ifd)
        except Exception:  # noqa: BLE001
            sub = {}
        blocks.append((label + " ", dict(sub), ExifTags.GPSTAGS if label == "GPS" else ExifTags.TAGS))
    found = False
    for label, tags, names in blocks:
        for tag, value in tags.items():
            if tag in EXIF_IFDS:
                continue
            text = _as_text(value, utf16=0x9C9B <= tag <= 0x9C9F)
            if text is not None:
                found = True
                yield MetaText(f"{where} {label}{names.get(tag, 'tag')} ({tag})", text)
    if not found:
        yield MetaText(where, "")  # an EXIF block with no text is still metadata


def _as_text(value, utf16: bool = False) -> str | None:
    """A tag value as text when it can hold text (strings, bytes, sequences of them), else ``None``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        if utf16:
            return value.decode("utf-16-le", "replace")
        if value[:8] in (b"ASCII\0\0\0", b"UNICODE\0", b"JIS\0\0\0\0\0", b"\0" * 8):  # EXIF UserComment
            return value[8:].decode("utf-16" if value[:7] == b"UNICODE" else "latin-1", "replace")
        return value.decode("latin-1")
    if isinstance(value, (tuple, list)):
        parts = [_as_text(v) for v in value]
        parts = [p for p in parts if p is not None]
        return "\n".join(parts) if parts else None
    return None


def _jpeg_segments(data: bytes):
    """``(marker, payload, raw)`` of every segment up to EOI, entropy-coded data as marker ``None``,
    then ``(-1, trailing bytes, ...)`` when anything follows EOI."""
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG start-of-image marker")
    yield 0xD8, b"", data[:2]
    pos, n = 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            raise ValueError(f"expected a marker at byte {pos}")
        marker = data[pos + 1] if pos + 1 < n else 0xD9
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            yield marker, b"", data[pos:pos + 2]
            pos += 2
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            yield marker, b"", data[pos:pos + 2]
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > n:
            raise ValueError(f"truncated segment 0xFF{marker:02X}")
        yield marker, data[pos + 4:end], data[pos:end]
        pos = end
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not a stuffed byte or restart
            start = pos
            while pos + 1 < n and not (data[pos] == 0xFF and data[pos + 1] not in (0x00, *range(0xD0, 0xD8))):
                pos += 1
            if pos + 1 >= n:
                pos = n
            yield None, b"", data[start:pos]
    if pos < n:
        yield -1, data[pos:], data[pos:]


def _jpeg_kept(marker, payload: bytes) -> bool:
    """Whether a JPEG segment is part of the image (not ancillary metadata)."""
    if marker is None or marker == 0xD8 or marker == 0xD9 or marker == 0x01 or (0xD0 <= (marker or 0) <= 0xD7):
        return True
    if marker == 0xE0:
        return payload.startswith(b"JFIF\0")
    if marker == 0xEE:
        return payload.startswith(b"Adobe")
    return marker != 0xFE and not (0xE0 <= marker <= 0xEF) and marker != -1


def _jpeg_metadata(data: bytes):
    for marker, payload, _ in _jpeg_segments(data):
        if marker == -1:
            yield MetaText("JPEG bytes after EOI", payload.decode("latin-1"))
        elif _jpeg_kept(marker, payload):
            continue
        elif marker == 0xFE:
            yield MetaText("JPEG COM segment", payload.decode("utf-8", "replace"))
        elif marker == 0xE1 and payload.startswith(b"Exif\0"):
            yield from _exif_texts(payload, "JPEG APP1 EXIF")
        elif marker == 0xE1 and payload.startswith(b"http://ns.adobe.com/xap/1.0/\0"):
            yield MetaText("JPEG APP1 XMP", payload.split(b"\0", 1)[1].decode("utf-8", "replace"))
        elif marker == 0xE2 and payload.startswith(b"ICC_PROFILE\0"):
            yield MetaText("JPEG APP2 ICC profile", payload[14:].decode("latin-1"), "binary")
        else:
            yield MetaText(f"JPEG APP{marker - 0xE0} segment", payload.decode("latin-1"))


def _tiff_metadata(data: bytes):
    from PIL import Image, TiffTags

    with Image.open(io.BytesIO(data)) as img:
        for page in range(getattr(img, "n_frames", 1)):
            img.seek(page)
            prefix = f"TIFF page {page + 1} " if page else "TIFF "
            for tag, value in img.tag_v2.items():
                if tag in TIFF_STRUCTURAL or tag in EXIF_IFDS:
                    continue
                text = _as_text(value)
                kind = "binary" if tag == TIFF_ICC else "text"
                if text is not None or kind == "binary":
                    name = TiffTags.lookup(tag).name
                    yield MetaText(f"{prefix}tag {name} ({tag})", text or "", kind)
            exif = img.getexif()
            for ifd, label in EXIF_IFDS.items():
                if ifd not in exif:
                    continue
                for tag, value in exif.get_ifd(ifd).items():
                    text = _as_text(value, utf16=0x9C9B <= tag <= 0x9C9F)
                    if text is not None:
                        yield MetaText(f"{prefix}{label} tag {tag}", text)


# ------------------------------------------------------------------ stripping


def strip_ancillary(src_path: str | Path, fmt: str) -> bytes:
    """The bytes of ``src_path`` without ancillary metadata (see the module docstring for what is kept).

    Parameters
    ----------
    src_path
        An image file (never modified).
    fmt
        Its format as :class:`synthgate.imageset.ImageSet` records name it:
        ``png``, ``jpeg``, ``tiff``, ``dicom`` or ``npy``.

    Returns
    -------
    bytes
        A file of the same format whose decoded pixels equal the original's.
    """
    path = Path(src_path)
    data = path.read_bytes()
    try:
        if fmt == "npy":
            return data[:npy_extent(data)]
        if fmt == "dicom":
            return _strip_dicom(data)
        if fmt == "png":
            return _strip_png(data)
        if fmt == "jpeg":
            return b"".join(raw for marker, payload, raw in _jpeg_segments(data) if _jpeg_kept(marker, payload))
        if fmt == "tiff":
            return _strip_tiff(data, path)
    except (ValueError, OSError, SyntaxError) as exc:
        raise ImageReadError(f"cannot rewrite this {fmt.upper()} file without its metadata: {exc}", path) from None
    raise UsageError(f"unknown image format {fmt!r}; one of `png`, `jpeg`, `tiff`, `dicom`, `npy`")


#: DICOM value representations of raw bytes: outside the pixel data they can carry anything (an image, text).
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
#: The image itself, and the file meta's version (two fixed bytes): the only binary values a release keeps.
ALLOWED_BINARY = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009, 0x00020001})


def npy_extent(data: bytes) -> int:
    """Bytes an ``.npy`` file's header and array take (what follows is not part of the array)."""
    import numpy as np

    fh = io.BytesIO(data)
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    shape, _, dtype = read(fh) if read is not None else fmt._read_array_header(fh, version)
    return fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _strip_dicom(data: bytes) -> bytes:
    """``data`` without binary elements beyond the pixel data (at any depth) and without trailing padding."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    removed = 0

    def walk(dataset) -> None:
        nonlocal removed
        for elem in list(dataset):
            if elem.VR == "SQ":
                for item in elem.value or ():
                    walk(item)
            elif (elem.VR in BINARY_VRS and int(elem.tag) not in ALLOWED_BINARY) or int(elem.tag) == 0xFFFCFFFC:
                del dataset[elem.tag]
                removed += 1

    walk(ds)
    if not removed:
        return data
    try:
        return _rewritten(data, ds)
    except (ValueError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's errors have no common base: one clear message
        raise ValueError(f"pydicom could not rewrite it ({type(exc).__name__}: {exc})") from None


def _rewritten(data: bytes, ds) -> bytes:
    import numpy as np
    import pydicom

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out = buf.getvalue()
    before = pydicom.dcmread(io.BytesIO(data), force=True).pixel_array
    after = pydicom.dcmread(io.BytesIO(out), force=True).pixel_array
    if before.shape != after.shape or not np.array_equal(before, after):
        raise ValueError("its pixels changed when rewritten")
    return out


def _strip_png(data: bytes) -> bytes:
    out = [PNG_SIGNATURE]
    provenance_kept = False
    for ctype, payload, raw in _png_chunks(data):
        if ctype in PNG_KEEP:
            out.append(raw)
        elif ctype == b"iTXt" and not provenance_kept and payload.partition(b"\0")[0] == PROVENANCE_KEY.encode():
            out.append(raw)
            provenance_kept = True
    return b"".join(out)


def _strip_tiff(data: bytes, path: Path) -> bytes:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        compression = img.info.get("compression", "raw")
        pages = []
        for page in range(getattr(img, "n_frames", 1)):
            img.seek(page)
            fresh = img.copy()
            fresh.info = {}  # no ICC profile, EXIF, XMP, resolution or description carried over
            pages.append(fresh)
    compression = compression if compression in LOSSLESS_TIFF else "tiff_adobe_deflate"
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", compression=compression, save_all=len(pages) > 1, append_images=pages[1:])
    out = buf.getvalue()
    with Image.open(io.BytesIO(out)) as check:
        for page, original in enumerate(pages):
            check.seek(page)
            if check.mode != original.mode or not np.array_equal(np.asarray(check), np.asarray(original)):
                raise ValueError(f"page {page + 1} would not keep its pixels ({original.mode})")
    return out
