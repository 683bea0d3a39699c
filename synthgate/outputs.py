"""Outputs never touch inputs: where a command may write, and how it replaces its own earlier output.

Every command that writes (``audit check``, ``report``, ``release bundle``,
``sample``, ``train``, ``phantoms``, ``demo``) calls :func:`refuse_overlap`
before any work: an output that equals, contains or lies inside any of its
inputs is refused with exit 2 and one line.  Paths are compared after
resolving symbolic links, so a link cannot smuggle an output into an input.

An output *folder* is written by :class:`OutputFolder`: a new folder is built
in a temporary sibling and renamed into place; an existing folder is replaced
only if it carries the marker file that synthgate wrote there for the same
command (:data:`MARKER`), and then only the files that command wrote are
replaced or removed -- anything else in it (a steward's notes, an internal
report rendered later) is left alone, and the command says so.  A folder
without the marker is never touched: the command refuses.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

from . import __version__
from .errors import UsageError

MARKER = ".synthgate-output.json"


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with every existing symbolic link resolved."""
    return Path(os.path.realpath(Path(path).expanduser()))


def refuse_overlap(out: str | Path, inputs: Mapping[str, str | Path | None], flag: str = "--out") -> None:
    """Refuse an output that is, contains, or lies inside one of ``inputs`` (``{name: path}``)."""
    o = resolved(out)
    for name, path in inputs.items():
        if path is None:
            continue
        i = resolved(path)
        if o == i:
            raise UsageError(f"{flag} is the {name} input itself; outputs never replace an input: choose another "
                             "folder", out)
        if i in o.parents:
            raise UsageError(f"{flag} lies inside the {name} input ({path}); writing there would change the input: "
                             "choose a folder outside it", out)
        if o in i.parents:
            raise UsageError(f"{flag} contains the {name} input ({path}); replacing it could delete the input: "
                             "choose another folder", out)


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "synthgate" else None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class OutputFolder:
    """The output folder of one command (``kind``, e.g. ``"audit check"``).

    :meth:`check` is called before any work and refuses a folder this command
    may not write; :meth:`writing` yields a temporary folder to fill and puts
    its files in place on success (nothing on failure or interruption).
    """

    def __init__(self, target: str | Path, kind: str):
        self.target = Path(target)
        self.kind = kind
        self.left_alone: list[str] = []

    def _files(self, root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())

    def check(self) -> None:
        """Refuse, before any work, a target that is not ours to (re)write."""
        t = self.target
        if not t.exists() and not t.is_symlink():
            return
        if t.is_symlink() or not t.is_dir():
            raise UsageError("exists and is not a folder synthgate wrote; choose another output folder", t)
        if not any(t.iterdir()):
            return
        marker = _read_marker(t)
        if marker is None:
            raise UsageError(f"exists and was not written by `{self.kind}` (no {MARKER}); synthgate never "
                             "replaces a folder it did not write: choose another output folder", t)
        if marker.get("kind") != self.kind:
            raise UsageError(f"holds the output of `{marker.get('kind')}`, not of `{self.kind}`; choose another "
                             "output folder", t)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        self.check()
        t = self.target
        t.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{t.name}.", suffix=".partial", dir=t.parent))
        try:
            yield tmp
            written = self._files(tmp)
            marker = {"tool": "synthgate", "version": __version__, "kind": self.kind, "files": written,
                      "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if not t.exists():
                os.replace(tmp, t)
            else:
                self._replace_in_place(tmp, written)
            _fsync_dir(t.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _replace_in_place(self, tmp: Path, written: list[str]) -> None:
        t = self.target
        old = _read_marker(t) or {}
        ours = {str(f) for f in old.get("files", []) if isinstance(f, str)}
        for rel in written:  # every target checked before any is replaced: a refusal leaves the folder as it was
            dst = t / rel
            if dst.is_symlink() or (dst.exists() and not dst.is_file()) or any(
                    q.is_symlink() for q in dst.parents if q != t and q.is_relative_to(t)):
                raise UsageError(f"{rel} in the output folder is not a regular file; refusing to replace it", t)
        for rel in written:  # each file atomically; the marker last, so it never lists a file not yet there
            dst = t / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, dst)
        for rel in sorted(ours - set(written)):  # an earlier run's file this run did not write: stale, ours
            p = (t / rel)
            if resolved(p).is_relative_to(resolved(t)) and p.is_file() and not p.is_symlink():
                p.unlink()
        os.replace(tmp / MARKER, t / MARKER)
        self.left_alone = [f for f in self._files(t) if f not in set(written) | {MARKER}]


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark ``folder`` (being built) as the output of ``kind``, listing the files it holds now."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.name != MARKER)
    marker = {"tool": "synthgate", "version": __version__, "kind": kind, "files": files,
              "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def check_target(out: str | Path, kind: str, overwrite: bool) -> None:
    """Before any work: may ``kind`` write a whole new folder at ``out``?

    A missing folder (or an empty one) is fine.  An existing one needs
    ``overwrite`` and must be this command's own marked output holding
    nothing but the files it wrote -- a folder with anything else in it is
    refused rather than replaced (replacing it would delete that).
    """
    t = Path(out)
    if not t.exists() and not t.is_symlink():
        return
    if t.is_dir() and not t.is_symlink() and not any(t.iterdir()):
        return
    if not overwrite:
        raise UsageError("already exists; choose a new output folder (or --overwrite to replace an earlier output "
                         f"of `{kind}`)", t)
    OutputFolder(t, kind).check()
    listed = set((_read_marker(t) or {}).get("files", [])) | {MARKER}
    foreign = [f for f in OutputFolder(t, kind)._files(t) if f not in listed]
    if foreign:
        raise UsageError(f"holds {len(foreign)} file(s) that `{kind}` did not write (e.g. {foreign[0]}); replacing "
                         "the folder would delete them: move them or choose another output folder", t)

