"""The shareable edition of an audit: the same document with every real name, patient ID and path replaced.

Hospital file names often carry medical record numbers, and real paths name
the hospital's folders.  What leaves the steward's hands -- the bundled
``audit.json``, the shareable report -- therefore carries, instead of each real
image's file name or key, a salted hash of it (``img-…``), instead of each
patient ID its salted hash (``pt-…``, as everywhere in synthgate's outputs),
and instead of each input's path the set's role ("the real set").  The
transformation walks *every string* of the document, so a field added later is
covered without being listed here; the internal ``audit.json`` stays with the
steward.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from synthgate.privacy import hash_id

ROLES = {"synthetic": "the synthetic set", "real": "the real set", "holdout": "the holdout set",
         "model": "the audited model"}
_TOKEN = re.compile(r"[^\s,;'\"()\[\]{}<>|=]+")
_TRAIL = ".,:;!?"


def redact_name(name: str) -> str:
    """The shareable stand-in of a real image's file name or key (salted: not reversible by guessing names)."""
    return "img-" + hash_id("path:" + str(name))[3:]


class Redactor:
    """Replaces real names, patient IDs and paths in any string, in time linear in the text."""

    def __init__(self, names: Iterable[str] = (), patients: Iterable[str] = (), paths: dict[str, str] | None = None):
        self.names = {str(n) for n in names if str(n)}
        # a name also appears without its frame suffix (a file) or as its bare file name
        for n in list(self.names):
            base = n.split("#", 1)[0]
            self.names.add(base)
            if "/" in base:
                self.names.add(base.rsplit("/", 1)[1])
        self.names = {n for n in self.names if len(n) >= 3}
        self.patients = {str(p) for p in patients if p and len(str(p)) >= 2}
        given = [(str(k), v) for k, v in (paths or {}).items() if k]
        # an absolute path is replaced wherever it occurs; a relative one ("synthetic", "data/train") only as a
        # whole value: as a substring it rewrote every occurrence of the word, keys included (a synthetic set
        # given as `synthetic` made the bundle's audit lose inputs.synthetic)
        self.paths = sorted(((k, v) for k, v in given if Path(k).is_absolute() and k != "/"), key=lambda kv: -len(kv[0]))
        self.exact = {k: v for k, v in given if not Path(k).is_absolute()}
        # names that the tokenizer cannot see whole (spaces, quotes...) are replaced by plain search
        self._odd = sorted((n for n in self.names | self.patients if _TOKEN.fullmatch(n) is None), key=len,
                           reverse=True)

    def _sub(self, token: str) -> str | None:
        if token in self.names:
            return redact_name(token)
        if token in self.patients:
            return hash_id(token)
        return None

    def text(self, s: str, whole: bool = True) -> str:
        """``s`` with real names, patient IDs and paths replaced (``whole``: also a relative path that is all of
        ``s``; off for a dict key, where a word such as ``synthetic`` is the document's structure)."""
        if whole and s in self.exact:
            return self.exact[s]
        for path, role in self.paths:  # absolute paths first: they contain the names
            if path in s:
                s = s.replace(path, role)

        def one(m: re.Match) -> str:
            tok = m.group(0)
            rep = self._sub(tok)
            if rep is not None:
                return rep
            stripped = tok.rstrip(_TRAIL)
            if stripped != tok and (rep := self._sub(stripped)) is not None:
                return rep + tok[len(stripped):]
            for sep in ("/", ":"):  # a key inside a longer token ("train/x.png", "image:x.png")
                if sep in tok:
                    parts = tok.split(sep)
                    subs = [self._sub(p) or p for p in parts]
                    if subs != parts:
                        return sep.join(subs)
            return tok

        s = _TOKEN.sub(one, s)
        for odd in self._odd:
            if odd in s:
                s = s.replace(odd, redact_name(odd) if odd in self.names else hash_id(odd))
        return s

    def value(self, v: Any) -> Any:
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {self.text(k, whole=False) if isinstance(k, str) else k: self.value(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [self.value(x) for x in v]
        return v


def redactor_for(document: dict, sets: dict[str, Any] | None = None,
                 paths: dict[str, str] | None = None) -> Redactor:
    """A :class:`Redactor` for an audit document.

    ``sets`` maps ``real`` / ``holdout`` to open :class:`~synthgate.imageset.ImageSet` objects (their record
    keys, paths and patient IDs are the names to hide).  Without them, the sets recorded in the document are
    opened when they are still on disk and unchanged (digest); real names in the flagged evidence are hidden
    in any case.  ``paths`` adds local paths to reduce to a role (``{"/data/ct/train": "the training set"}``,
    e.g. the model's own training set as its ``synthgate.json`` records it).
    """
    from synthgate.imageset import ImageSet

    sets = dict(sets or {})
    inputs = document.get("inputs") or {}
    for role in ("real", "holdout"):
        entry = inputs.get(role)
        if role in sets or not isinstance(entry, dict) or not entry.get("path"):
            continue
        try:
            s = ImageSet(entry["path"], skip_unreadable=True, cache=None)
            if s.digest == entry.get("sha256"):
                sets[role] = s
        except Exception:  # noqa: BLE001 - moved or changed data: fall back to the names the document holds
            pass
    names: set[str] = set()
    patients: set[str] = set()
    for s in sets.values():
        if s is None:
            continue
        for r in s.records:
            names.update((r.key, r.path))
            if r.patient_id:
                patients.add(r.patient_id)
        names.update(k.path.rstrip("/") for k in s.skipped)
    for check in document.get("checks") or []:  # names a check recorded as real evidence
        for f in (check.get("flagged") or []) if isinstance(check, dict) else []:
            if isinstance(f, dict) and f.get("real"):
                names.add(str(f["real"]))
    # the synthetic set's names are what is released: a real name equal to one of them is public already
    public = set(document.get("released") or []) | set(document.get("dropped") or [])
    for check in document.get("checks") or []:
        for f in (check.get("flagged") or []) if isinstance(check, dict) else []:
            if isinstance(f, dict) and f.get("synthetic"):
                public.add(str(f["synthetic"]))
    public |= {k.split("#", 1)[0] for k in public}
    names -= public
    # ...unless the name itself carries a real identifier (dicom_phi found one in it): then it is hidden too
    names |= _names_with_identifiers(document)
    extra, paths = dict(paths or {}), {}
    policy = document.get("policy") if isinstance(document.get("policy"), dict) else {}
    source = policy.get("source")
    if isinstance(source, str) and source and not source.startswith("built-in policy"):
        extra[source] = "the policy file"  # a local path, like the inputs' (its text is in the document)
    for p, label in extra.items():
        if p:
            paths[str(p)] = label
            paths[str(Path(p).resolve())] = label
    for role, label in ROLES.items():
        entry = inputs.get(role)
        if isinstance(entry, dict) and entry.get("path"):
            p = str(entry["path"])
            paths[p] = label
            paths[str(Path(p).resolve())] = label
    for entry in inputs.get("attacker_data") or []:  # public data, but its path is a local one
        if isinstance(entry, dict) and entry.get("path"):
            p = str(entry["path"])
            paths[p] = paths[str(Path(p).resolve())] = "the attacker data"
    return Redactor(names, patients, paths)


def _names_with_identifiers(document: dict) -> set[str]:
    """Synthetic keys (and their files) whose name holds a real patient's identifier, as ``dicom_phi`` found."""
    from audit.dicom_phi.scan import NAME_PROBLEM

    out: set[str] = set()
    for check in document.get("checks") or []:
        if not isinstance(check, dict) or check.get("name") != "dicom_phi":
            continue
        for f in check.get("flagged") or []:
            problems = f.get("problems") if isinstance(f, dict) else None
            if isinstance(problems, list) and any(str(p).startswith(NAME_PROBLEM + ":") for p in problems):
                key = str(f.get("synthetic") or "")
                out |= {key, key.split("#", 1)[0]} - {""}
    return out


def shareable(document: dict, sets: dict[str, Any] | None = None, paths: dict[str, str] | None = None) -> dict:
    """The shareable edition of ``document`` (a new dict; the input is not changed).

    The synthetic set's own file names stay (they are what is released);
    the command line is withheld (it holds local paths), and the edition
    records that it is one.
    """
    red = redactor_for(document, sets, paths)
    out = red.value({k: v for k, v in document.items() if k not in ("command", "signature")})
    out["command"] = None
    out["edition"] = {"kind": "shareable", "note": "real file names and patient IDs are salted hashes; real paths "
                      "are reduced to set names; the internal audit.json stays with the data steward"}
    return out
