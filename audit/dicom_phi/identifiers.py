"""The real set's identifiers, and a search for them in any text, compared in normalised form.

Identifiers come from the real set and the holdout: the ``patient_id`` of
every record (``metadata.csv`` or DICOM PatientID), and from DICOM headers,
at any depth, the patient's names, IDs, accession and study numbers and every
instance UID.  They are kept in memory only, normalised, and never written.

Normalisation (both sides):

- Unicode NFKD with accents dropped, case folded; punctuation, spaces and
  every other non-alphanumeric character are separators;
- a name or an ID that has a letter matches when it equals a run of
  consecutive words of the text joined together: ``MRN001234`` matches
  ``MRN-001234``, ``mrn 001234`` and ``ID:mrn001234.``; ``Doe^Jane`` matches
  ``Jane Doe`` (by its parts) and ``doe,jane``; it does not match inside a
  longer word (``xmrn001234``), which keeps random hex digests and UIDs from
  matching by chance.  Tokens need at least :data:`MIN_TOKEN_CHARS` characters;
- the digits of an ID (``001234`` for ``MRN001234``) match a group of digits
  in the text, possibly split by single ``-``, ``_``, ``/`` or space
  characters (``001-234``), when the ID has at least ``min_digits`` digits
  (default 6), and the group is not part of a dotted number (a UID or a
  decimal).  Equality, not containment: ``0012345`` does not match
  ``001234``, so digits inside UIDs, digests and measurements do not match by
  chance as often as a substring search would.  With ``n`` real IDs of ``d``
  digits, one unrelated ``d``-digit group in a synthetic file matches with
  probability ``n / 10**d``: that is the trade-off ``min_digits`` sets;
- a UID matches when the text holds it as a whole dotted number.

Placeholder values that de-identified real sets use (``ANONYMOUS``,
``UNKNOWN``...) are not identifiers and are ignored.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

#: shortest name or ID (letters and digits, after normalisation) that is searched for
MIN_TOKEN_CHARS = 4
#: longest identifier compared (longer values are truncated to this many characters)
MAX_TOKEN_CHARS = 64
PLACEHOLDERS = frozenset({
    "anonymous", "anonymized", "anonymised", "anon", "anonymisiert", "unknown", "none", "null", "nil", "removed",
    "deidentified", "redacted", "patient", "test", "xxxx", "xxxxxx", "notapplicable", "unnamed", "noname",
})

# attributes whose values identify the patient, read from the real set's headers at any depth
NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName")
ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "AdmissionID", "MedicalRecordLocator",
               "StudyID", "RequestedProcedureID", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
               "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest",
               "ServiceEpisodeID")
STANDARD_UID_ROOT = "1.2.840.10008."  # DICOM's own UIDs (classes, transfer syntaxes): shared, never identifying

_WORD = re.compile(r"[^\W_]+")
# separators inside a digit group: one or two of - _ / space , + and the middle dot (never a dot: UIDs, decimals)
_SEP = r"[-_/ ,+\u00b7]{1,2}"
# a group of digits, possibly split by separators, that is not part of a dotted number (UID, decimal)
_DIGITS = re.compile(rf"(?<![0-9]\.)(?<![0-9])[0-9]+(?:{_SEP}[0-9]+)*(?![0-9])(?!\.[0-9])")
_DIGIT_SEPARATOR = re.compile(_SEP)
_DIGIT_RUN = re.compile(r"[0-9]+")


def canonical(text: str) -> str:
    """``text`` as a reader sees it: NFKC, without invisible format characters (zero-width spaces, joiners) and
    combining marks, every decimal digit of any script as its ASCII digit (a red team hid ``9736676`` as
    ``9736<ZWSP>676``, ``9<U+0303>736676`` and Arabic-Indic digits)."""
    out = []
    for c in unicodedata.normalize("NFKC", text):
        cat = unicodedata.category(c)
        if cat in ("Cf", "Mn", "Me"):
            continue
        out.append(str(unicodedata.decimal(c)) if cat == "Nd" and not c.isascii() else c)
    return "".join(out)
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)+")


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def words(text: str) -> list[str]:
    """The words of ``text``: maximal runs of letters and digits, folded (accents dropped, case folded)."""
    return _WORD.findall(_fold(text))


def alnum(text: str) -> str:
    """``text`` folded with everything but letters and digits removed."""
    return "".join(words(text))


def _joined_runs(parts: list[str], limit: int) -> set[str]:
    """Every concatenation of consecutive ``parts`` no longer than ``limit`` characters."""
    out = set()
    for i in range(len(parts)):
        joined = ""
        for part in parts[i:]:
            joined += part
            if len(joined) > limit:
                break
            out.add(joined)
    return out


@dataclass
class RealIdentifiers:
    """Normalised identifiers of the real side, in memory only.

    ``tokens`` maps a normalised name or ID (with a letter) to its kind
    (``name`` or ``ID``); ``digits`` holds the digits of IDs; ``uids`` the
    instance UIDs.
    """

    min_digits: int = 6
    tokens: dict[str, str] = field(default_factory=dict)
    digits: set[str] = field(default_factory=set)
    uids: set[str] = field(default_factory=set)
    values: int = 0  # identifier values read (before normalisation and de-duplication)

    # ---------------------------------------------------------------- adding

    def add_name(self, value) -> None:
        """A person name (DICOM PN ``Family^Given^Middle^Prefix^Suffix``, or free text)."""
        text = str(value or "")
        if not text.strip():
            return
        self.values += 1
        parts = [alnum(p) for p in re.split(r"[\^=]", text)]
        parts = [p for p in parts if p]
        self._add_token(alnum(text), "name")
        for p in parts:
            self._add_token(p, "name")
        if len(parts) >= 2:  # "Given Family" as well as "Family^Given"
            self._add_token(parts[1] + parts[0], "name")

    def add_id(self, value) -> None:
        """A patient ID, accession number or similar identifier."""
        text = str(value or "").strip()
        if not text:
            return
        self.values += 1
        token = alnum(text)
        if any(c.isalpha() for c in token):
            self._add_token(token, "ID")
        digits = "".join(c for c in token if c.isdigit())
        if len(digits) >= self.min_digits and len(set(digits)) > 1:  # "000000" is a placeholder, not an ID
            self.digits.add(digits[:MAX_TOKEN_CHARS])

    def add_uid(self, value) -> None:
        uid = str(value or "").strip().rstrip("\x00")
        if uid and not uid.startswith(STANDARD_UID_ROOT):
            self.uids.add(uid)

    def _add_token(self, token: str, kind: str) -> None:
        if len(token) >= MIN_TOKEN_CHARS and token not in PLACEHOLDERS and not token.isdigit():
            self.tokens.setdefault(token[:MAX_TOKEN_CHARS], kind)

    def update(self, other: RealIdentifiers) -> RealIdentifiers:
        for token, kind in other.tokens.items():
            self.tokens.setdefault(token, kind)
        self.digits |= other.digits
        self.uids |= other.uids
        self.values += other.values
        return self

    # ---------------------------------------------------------------- searching

    @property
    def empty(self) -> bool:
        return not (self.tokens or self.digits or self.uids)

    def find(self, text: str, *, uids_only: bool = False, loose: bool = False) -> list[str]:
        """What kinds of real identifier ``text`` carries (``UID``, ``name``, ``ID``, ``ID (digits only)``), never the value.

        ``loose`` (file names): an ID's digits also match across any separator, dots included (``973.66.76``);
        a file name rarely holds a UID, and a real UID is matched whole in any case.
        """
        found = []
        if not text:
            return found
        text = canonical(text)
        if self.uids and any(u in self.uids for u in _UID.findall(text)):
            found.append("UID")
        if uids_only:
            return found
        if self.tokens:
            longest = min(MAX_TOKEN_CHARS, max(map(len, self.tokens)))
            kinds = {self.tokens[s] for s in _joined_runs(words(text), longest) if s in self.tokens}
            found += sorted(kinds, reverse=True)  # "name" before "ID"
        if self.digits:
            longest = max(map(len, self.digits))
            groups = [_DIGIT_SEPARATOR.split(g) for g in _DIGITS.findall(text)]
            if loose:  # every run of digit words with nothing but separators between them
                groups += [_DIGIT_RUN.findall(g) for g in re.split(r"[^\W\d_]+", text)]
            if any(_joined_runs(parts, longest) & self.digits for parts in groups):
                found.append("ID (digits only)")
        return found

    def digest_source(self) -> str:
        """A canonical string of every identifier, for a salted digest that proves which set was searched."""
        return "\n".join(sorted({*self.tokens, *self.digits, *self.uids}))


def from_dataset(ds, ids: RealIdentifiers) -> None:
    """Add the identifiers of one real DICOM dataset (file meta and every sequence item included)."""
    from .annex_e import load_table

    table = load_table()

    def visit(dataset):
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    visit(item)
                continue
            if elem.keyword in NAME_KEYWORDS:
                for v in _values(elem.value):
                    ids.add_name(v)
            elif elem.keyword in ID_KEYWORDS:
                for v in _values(elem.value):
                    ids.add_id(v)
            elif elem.VR == "UI":
                row = table.lookup(int(elem.tag))
                if row is not None and row.replaces_uids:
                    for v in _values(elem.value):
                        ids.add_uid(v)

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        visit(meta)
    visit(ds)


def _values(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def from_sets(*imagesets, min_digits: int = 6) -> RealIdentifiers:
    """Identifiers of the real side: every record's ``patient_id`` and every DICOM header's identifying values."""
    import pydicom

    ids = RealIdentifiers(min_digits=min_digits)
    for imageset in imagesets:
        if imageset is None:
            continue
        for record in imageset.records:
            if record.patient_id:
                ids.add_id(record.patient_id)
        for path in sorted({r.path for r in imageset.records if r.format == "dicom"}):
            from_dataset(pydicom.dcmread(imageset.root / path, stop_before_pixels=True, force=True), ids)
    return ids
