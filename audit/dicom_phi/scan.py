"""Scanning one synthetic file: a DICOM dataset against Annex E, an image file's text metadata.

Every function returns *problems*: one line each, naming the attribute or
metadata item and the rule, never the value (reports are shareable).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from synthgate.imagemeta import ALLOWED_BINARY, BINARY_VRS, npy_extent, read_metadata

from .annex_e import ACTIONS, AnnexETable, load_table
from .identifiers import RealIdentifiers

# VRs whose values are searched for real names and IDs (UIDs are compared whole; numbers, dates and times are
# left to the table, so digits in measurements never match an ID by chance)
SEARCHED_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT", "UN"})

TEXT_VRS = SEARCHED_VRS | {"AS", "DA", "DS", "DT", "IS", "TM", "UI"}
MAX_SEARCHED_BYTES = 1 << 20  # an undecoded (UN) value is searched up to 1 MiB
_SOFTWARE = re.compile(r"Software\nsynthgate [\w.+-]+")


@dataclass(frozen=True)
class ScanPolicy:
    """What a synthetic file may carry: the Annex E options in force and the metadata rule."""

    options: tuple[str, ...] = ()  # option columns of annex_e.csv whose K/C actions apply
    allow_text_metadata: bool = False

    @property
    def retain_safe_private(self) -> bool:
        return "retain_safe_private" in self.options


def policy_from(settings) -> ScanPolicy:
    """The scan policy of a :class:`~audit.dicom_phi.settings.DicomPhiSettings`."""
    options = []
    for name in ("retain_safe_private", "retain_device_identity", "retain_institution_identity",
                 "retain_patient_characteristics", "clean_descriptors", "clean_structured_content",
                 "clean_graphics"):
        if getattr(settings, name):
            options.append(name)
    if settings.retain_longitudinal_dates:
        options += ["retain_long_full_dates", "retain_long_modified_dates"]
    return ScanPolicy(tuple(options), settings.allow_text_metadata)


# ------------------------------------------------------------------ synthgate's own provenance


def _description() -> str:
    from generators.write import DESCRIPTION

    return DESCRIPTION


def _provenance_json(text: str):
    """The provenance object synthgate writes (JSON, ``synthetic: true``, generator ``synthgate ...``), else None."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError):
        return None
    if isinstance(obj, dict) and obj.get("synthetic") is True and str(obj.get("generator", "")).startswith("synthgate"):
        return obj
    return None


def _strings(obj) -> list[str]:
    """The keys and string values of a JSON object (numbers are synthgate's own counters and seeds)."""
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (str(k), *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def own_dicom_value(keyword: str, value) -> list[str] | None:
    """The texts to search when ``value`` is synthgate's own provenance in a top-level attribute, else ``None``.

    generators.write puts the provenance JSON in Image Comments and its fixed
    description in Derivation Description; both are descriptors that the
    basic profile removes, so they are recognised exactly, and still searched.
    """
    text = str(value or "")
    if keyword == "ImageComments" and (obj := _provenance_json(text)) is not None:
        return _strings(obj)
    if keyword == "DerivationDescription" and text.startswith(_description()):
        return [text]
    return None


def own_image_metadata(item) -> list[str] | None:
    """Like :func:`own_dicom_value` for a PNG: the provenance chunk and the Software/Description chunks."""
    if item.kind == "provenance" and _provenance_json(json.dumps(item.structured)) is not None:
        return _strings(item.structured)
    if item.where == "PNG tEXt 'Software'" and _SOFTWARE.fullmatch(item.text):
        return [item.text]
    if item.where == "PNG tEXt 'Description'" and item.text == "Description\n" + _description():
        return [item.text]
    return None


# ------------------------------------------------------------------ DICOM


class _Deferred:
    """A large binary value left unread on disk (pixel data and the like): only its length is known."""

    def __init__(self, raw, vr):
        self.tag, self.VR, self.length, self.value, self.keyword = raw.tag, vr, raw.length, None, ""


def _vr(raw) -> str:
    if raw.VR:
        return raw.VR
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(raw.tag).split(" ")[0]
    except KeyError:
        return "UN"


def _elements(dataset):
    """The elements of one dataset level, reading deferred values only when they are text or sequences."""
    from pydicom.dataelem import RawDataElement

    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length not in (0, 0xFFFFFFFF):
            vr = _vr(raw)
            if vr not in TEXT_VRS and vr != "SQ":
                yield _Deferred(raw, vr)
                continue
        yield dataset[tag]


def _keyword(elem) -> str:
    """The element's keyword; repeating-group elements (overlays, curves) included; private ones have none."""
    if (int(elem.tag) >> 16) & 1:
        return ""
    if elem.keyword:
        return elem.keyword
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(elem.tag) or ""


def _length(elem) -> int:
    if isinstance(elem, _Deferred):
        return int(elem.length)
    return len(elem.value) if isinstance(elem.value, (bytes, bytearray)) else 0


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _values(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def is_empty(elem) -> bool:
    """Zero length: no value, blanks only, or a sequence whose items hold no element."""
    if isinstance(elem, _Deferred):
        return elem.length == 0
    if elem.VR == "SQ":
        return all(len(item) == 0 for item in elem.value or ())
    value = elem.value
    if value is None:
        return True
    if isinstance(value, bytes):
        return value.strip(b"\0 ") == b""
    if isinstance(value, (int, float)):
        return False
    return all(str(v).strip(" \0") == "" for v in _values(value))


def _texts(elem) -> list[str]:
    if elem.VR == "UN":
        value = elem.value or b""
        return [value[:MAX_SEARCHED_BYTES].decode("latin-1")] if isinstance(value, bytes) else [str(value)]
    return [str(v) for v in _values(elem.value) if v is not None and str(v).strip()]


class _DicomScan:
    def __init__(self, real: RealIdentifiers, policy: ScanPolicy, table: AnnexETable):
        self.real, self.policy, self.table = real, policy, table
        self.problems: list[str] = []
        self.private: list[str] = []

    def walk(self, dataset, prefix: str, top: bool) -> None:
        for elem in _elements(dataset):
            tag = int(elem.tag)
            name = _keyword(elem)
            where = f"{prefix}{name} {tag_text(tag)}" if name else f"{prefix}{tag_text(tag)}"
            own = own_dicom_value(name, elem.value) if top and elem.VR in ("LT", "ST", "UT") else None
            if (tag >> 16) & 1:
                self.private.append(where)
            elif (row := self.table.lookup(tag)) is not None and not is_empty(elem) and own is None \
                    and not (row.replaces_uids or row.retained_by(self.policy.options)):
                actions = ", ".join(ACTIONS[a] for a in row.basic.rstrip("*").split("/"))
                self.problems.append(f"{where}: has a value; Annex E basic profile {row.basic} ({actions})")
            elif elem.VR in BINARY_VRS and tag not in ALLOWED_BINARY and not is_empty(elem):
                # an ICC profile or any OB/OW element can hold a whole training image or a name (red team)
                self.problems.append(f"{where}: binary data ({elem.VR}, {_length(elem)} bytes) beyond the pixel "
                                     "data; it can carry anything (an image, text) and is not released")
            if isinstance(elem, _Deferred):
                continue
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or ()):
                    self.walk(item, f"{prefix}{name or tag_text(tag)}[{i}].", top=False)
            elif elem.VR == "UI":
                if any(str(v).strip("\0 ") in self.real.uids for v in _values(elem.value)):
                    self.problems.append(f"{where}: equals a UID of the real set")
            elif elem.VR in SEARCHED_VRS and not self.real.empty:
                kinds = sorted({k for t in (own if own is not None else _texts(elem)) for k in self.real.find(t)})
                if kinds:
                    self.problems.append(f"{where}: contains a real patient's {', '.join(kinds)}")


def scan_dataset(ds, real: RealIdentifiers, policy: ScanPolicy = ScanPolicy(),
                 table: AnnexETable | None = None) -> list[str]:
    """Problems of one DICOM dataset (file meta and every sequence item included), as lines without values.

    Rules, for a synthetic image (there is no patient):

    - every attribute of Table E.1-1 at any depth is absent or empty, unless
      its basic action gives it new UIDs (``U``, ``X/Z/U*``: it may stay, and
      its UIDs are compared with the real set's) or an option in
      ``policy.options`` keeps or cleans it; synthgate's own provenance in
      Image Comments and Derivation Description is recognised exactly;
    - no private attribute, unless the Retain Safe Private option is in force;
    - no UI value anywhere equals an instance UID of the real set;
    - no text value anywhere carries a real identifier (normalised; see
      :mod:`audit.dicom_phi.identifiers`);
    - Patient Identity Removed is YES, a De-identification Method is
      recorded, Burned In Annotation is not YES.
    """
    scan = _DicomScan(real, policy, table or load_table())
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        scan.walk(meta, "FileMeta.", top=False)
    scan.walk(ds, "", top=True)
    problems = scan.problems
    if scan.private and not policy.retain_safe_private:
        problems.append(f"{len(scan.private)} private attribute(s), e.g. {scan.private[0]}; Annex E basic profile X "
                        "(remove)")
    if str(ds.get("PatientIdentityRemoved") or "").upper() != "YES":
        problems.append("Patient Identity Removed (0012,0062) is not YES")
    if is_empty_value(ds.get("DeidentificationMethod")) and is_empty_value(ds.get("DeidentificationMethodCodeSequence")):
        problems.append("no De-identification Method (0012,0063/0064) recorded")
    if str(ds.get("BurnedInAnnotation") or "").upper() == "YES":
        problems.append("Burned In Annotation (0028,0301) is YES")
    return problems


def is_empty_value(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return value.strip() == "" if isinstance(value, str) else value.strip(b"\0 ") == b""
    try:
        return all(is_empty_value(v) for v in value)
    except TypeError:
        return str(value).strip() == ""


def read_dicom(path: str | Path):
    """A DICOM file's dataset, large binary values (pixel data) left on disk; elements after the pixels included."""
    import pydicom

    return pydicom.dcmread(path, defer_size="64 KB", force=True)


# ------------------------------------------------------------------ other images


def scan_image(path: str | Path, fmt: str, real: RealIdentifiers, policy: ScanPolicy = ScanPolicy(),
               data: bytes | None = None) -> list[str]:
    """Problems of a PNG/JPEG/TIFF file's ancillary metadata (PNG text chunks, TIFF tags, EXIF, JPEG segments).

    Every item is searched for real identifiers; an item of free text that is
    not synthgate's own provenance is a problem in itself unless
    ``policy.allow_text_metadata``: a release ships pixels, and text that no
    rule can vouch for is not released.
    """
    problems = []
    for item in read_metadata(path, fmt, data):
        own = own_image_metadata(item)
        if not real.empty:
            kinds = sorted({k for t in (own if own is not None else [item.text]) for k in real.find(t)})
            if kinds:
                problems.append(f"{item.where}: contains a real patient's {', '.join(kinds)}")
        if item.kind != "binary" and own is None and not policy.allow_text_metadata:
            problems.append(f"{item.where}: text metadata (allow_text_metadata is off)")
    return problems


#: The words a problem found in a file's name starts with (the shareable edition hides such names).
NAME_PROBLEM = "file name"


def scan_name(rel_path: str, real: RealIdentifiers) -> list[str]:
    """Problems of a synthetic file's path within its set: a real patient's name, ID or UID in a file or folder name.

    A release ships its files under their names; a name such as ``MRN9736676_Valdez_Ben.png`` leaks as surely as
    a header does.  The problem names the kind of identifier, never the value.
    """
    if real.empty:
        return []
    kinds = sorted({k for part in str(rel_path).replace("\\", "/").split("/") for k in real.find(part, loose=True)})
    return [f"{NAME_PROBLEM}: contains a real patient's {', '.join(kinds)}"] if kinds else []


def scan_npy(path: str | Path) -> list[str]:
    """Problems of an ``.npy`` file: bytes after its array (a training image or a name was appended that way)."""
    return scan_npy_bytes(Path(path).read_bytes())


def scan_npy_bytes(data: bytes) -> list[str]:
    """:func:`scan_npy` of a file's bytes."""
    try:
        end = npy_extent(data)
    except (ValueError, OSError):  # unreadable headers are refused when the set is read
        return []
    extra = len(data) - end
    return [f"{extra} bytes after the array: they can carry anything (an image, text) and are not released"] \
        if extra > 0 else []


def scan_values(where: str, values: dict[str, str], real: RealIdentifiers) -> list[str]:
    """Problems of a file's row of the synthetic set's ``metadata.csv``: a real identifier in any column."""
    out = []
    for column, value in values.items():
        kinds = real.find(str(value or ""))
        if kinds:
            out.append(f"{where} column {column!r}: contains a real patient's {', '.join(kinds)}")
    return out


def metadata_rows(root: str | Path) -> dict[str, dict[str, str]]:
    """The synthetic set's ``metadata.csv`` as ``{path: {column: value}}`` (every column but ``path``); ``{}`` when
    it has none.  Labels and attributes ship in the bundle's own ``metadata.csv`` and its datasheet."""
    import csv

    path = Path(root) / "metadata.csv"
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return {str(r.get("path") or ""): {k: v for k, v in r.items() if k and k != "path" and isinstance(v, str)}
                    for r in csv.DictReader(fh)}
    except (OSError, UnicodeDecodeError, csv.Error):  # an unreadable metadata.csv is refused when the set is read
        return {}
