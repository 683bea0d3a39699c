"""The release ledger: every bundle drawn from a training set, and the privacy cost they add up to.

A training set is often released from more than once: several models, several
samples.  ``release bundle`` records each release as one line of a local,
append-only JSON-lines file, kept with the steward (never in a bundle):

- path: ``--ledger PATH``, else ``SYNTHGATE_LEDGER``, else
  ``$XDG_DATA_HOME/synthgate/ledger.jsonl`` (``~/.local/share/...``);
- each line is one JSON object (:func:`entry_document`): ``seq`` (1, 2, ...),
  ``previous`` (SHA-256 of the previous line's bytes; ``null`` on the first),
  ``created``, the bundle (manifest SHA-256, local path, signing key), the
  training-set digest and where it was read, the model digest and where it was
  read, the model's DP block (``epsilon_spent``, ``delta``, ``accountant``),
  the number of images released and dropped, the policy (name, SHA-256) and
  the audit (SHA-256, verdict); signed with the installation's Ed25519 key
  (:mod:`synthgate.signing`: ``SYNTHGATE_KEY`` or the default key file);
- appended under an exclusive ``flock`` of the file itself, as one ``write``
  of the whole line (``O_APPEND``) followed by ``fsync``, so concurrent
  bundles never interleave and the chain of ``previous`` hashes stays whole.

Reading it back (:func:`read_ledger`) checks every line: it parses, its
signature verifies, its key is trusted (this installation's, or one named
with ``--trust-key``), ``seq`` counts up from 1 and ``previous`` is the hash of
the line before.  A hand-edited line fails its signature (and breaks the
chain at the next line); a deleted line breaks the chain.  Deleting the
*last* lines leaves no trace in the ledger itself: keep it backed up.

Composition
-----------
Differentially private models trained on the same training set compose.  The
rule used is **basic sequential composition** (Dwork & Roth 2014, Theorem
3.16): releasing the outputs of k mechanisms that are (ε_i, δ_i)-DP with
respect to the same data is (Σ ε_i, Σ δ_i)-DP.  It is sound for any
mechanisms, whatever their accountants.  Tighter results (advanced
composition, Rényi/PRV accounting) would need the mechanisms' full privacy
profiles, which a ledger of (ε, δ) pairs does not have, so none is claimed.
Sampling more images from ONE model is post-processing (Dwork & Roth,
Proposition 2.1) and costs no further ε: each model (by digest) counts once,
however many bundles it fed.  Any model without a DP guarantee (trained
without DP, a DP block that cannot be read, or a model the audit was not given)
means there is **no differential-privacy guarantee** for the training set, and
the cumulative ε is reported as not bounded.

Two things the ledger cannot see are said in its report: models trained on
*overlapping* but different training sets (different digests) are not
composed, and a release gate that dropped images did so by comparing them
with the real data, a data-dependent step that the model's ε does not cover.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from synthgate.errors import InputError, MissingInputError

if TYPE_CHECKING:  # pragma: no cover
    from audit.record import AuditRecord
    from synthgate.signing import SigningKey

LEDGER_ENV = "SYNTHGATE_LEDGER"
LEDGER_FILE = "ledger.jsonl"
SCHEMA_VERSION = 1
KIND = "synthgate release ledger entry"
MAX_LEDGER_BYTES = 256 << 20
RULE = ("basic sequential composition: the ε of the differentially private models trained on the same training "
        "set add up, and so do their δ (Dwork & Roth 2014, Theorem 3.16); images sampled from one model are "
        "post-processing and cost nothing more (Proposition 2.1), so each model counts once")
NOT_COVERED = ("models trained on overlapping but different training sets are not composed (the ledger matches "
               "training sets by digest only); and a release gate that dropped images chose what shipped by "
               "comparing with the real data, a step the models' ε does not cover")


def default_ledger_path() -> Path:
    """``$XDG_DATA_HOME/synthgate/ledger.jsonl`` (``~/.local/share/synthgate/...`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "synthgate" / LEDGER_FILE


def ledger_path(path: str | Path | None = None) -> Path:
    """The ledger to use: ``path`` when given, else ``SYNTHGATE_LEDGER``, else :func:`default_ledger_path`."""
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    env = os.environ.get(LEDGER_ENV)
    return Path(env).expanduser() if env else default_ledger_path()


# ------------------------------------------------------------------ what one release adds


@dataclass(frozen=True)
class ModelDP:
    """A model's differential-privacy guarantee as its ``synthgate.json`` records it: (ε, δ)-DP."""

    epsilon: float
    delta: float
    accountant: str | None = None

    def to_dict(self) -> dict:
        return {"epsilon_spent": self.epsilon, "delta": self.delta, "accountant": self.accountant}

    def __str__(self) -> str:
        how = f", {self.accountant} accountant" if self.accountant else ""
        return f"ε = {self.epsilon:.4g}, δ = {self.delta:.3g}{how}"


def parse_dp(block) -> tuple[ModelDP | None, str | None]:
    """``(dp, None)`` for a readable DP block; ``(None, why)`` when there is no guarantee to compose."""
    if block is None:
        return None, "trained without differential privacy"
    if not isinstance(block, Mapping):
        return None, "its DP block is not readable"
    eps, delta = block.get("epsilon_spent"), block.get("delta")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (eps, delta))
    if not ok or eps < 0 or not 0 <= delta < 1:
        return None, "its DP block records no finite ε and δ"
    accountant = block.get("accountant")
    return ModelDP(float(eps), float(delta), str(accountant) if accountant else None), None


@dataclass(frozen=True)
class Release:
    """What a bundle adds to the ledger, before it is written: where its images came from, what they cost.

    ``model`` is the digest of the model the audit was given (re-hashed by
    ``release bundle``); only then is its DP block trusted (``dp``).  A
    release whose model is not known carries ``dp=None`` and the reason in
    ``no_dp``.
    """

    training_set: str | None
    training_set_source: str
    model: str | None
    model_source: str
    dp: ModelDP | None
    no_dp: str | None
    images: int
    dropped: int = 0

    @property
    def model_label(self) -> str:
        return f"model {self.model[:12]}…" if self.model else "an unknown model"


def release_facts(audit: "AuditRecord", model_info: Mapping | None, generator: Mapping | None,
                  images: int) -> Release:
    """The ledger facts of a release: the training set, the model and its DP block, as far as they are known.

    The training-set digest comes from the audited model's ``synthgate.json``
    (the model is re-hashed when bundled), else the audit's real set (the data
    the audit compared against, re-hashed when bundled, taken to be the training
    set), and only else the synthetic set's generator manifest, a claim no one
    checked: preferred over the audited real set, a manifest naming a fresh
    digest filed each release under a training set of its own, past any
    cumulative-ε limit (red team).
    """
    gen = generator if isinstance(generator, Mapping) else {}
    info = model_info if isinstance(model_info, Mapping) else None
    audited = audit.inputs.model.sha256 if audit.inputs.model is not None else None
    gen_model = (gen.get("model") or {}).get("sha256") if isinstance(gen.get("model"), Mapping) else None

    def digest(block):
        ok = isinstance(block, Mapping) and isinstance(block.get("sha256"), str) and block["sha256"]
        return block["sha256"] if ok else None

    training, source = digest((info or {}).get("training_set")), "the audited model's synthgate.json"
    if training is None and audit.inputs.real is not None:
        training, source = audit.inputs.real.sha256, "the audit's real set (taken to be the training set)"
    if training is None:
        training, source = digest(gen.get("training_set")), "the synthetic set's generator manifest (not verified)"
    if training is None:
        source = "not recorded"

    if audited and info is not None:
        if gen_model and gen_model != audited:
            dp, why = None, (f"the synthetic set's manifest names model {gen_model[:12]}…, not the audited one, "
                             "so which model made the images is not known")
            model, model_source = audited, "the audit (the generator manifest names another model)"
        elif not gen_model:
            # nothing ties the audited model to these images: a DP model given to the audit of a non-DP model's
            # images was credited with its epsilon (red team); the manifest is bound to the audit's digest
            dp, why = None, ("the synthetic set has no generator manifest naming the audited model, so nothing "
                             "shows that this model made the images")
            model, model_source = audited, "the audit (no generator manifest names it)"
        else:
            dp, why = parse_dp(info.get("dp"))
            model, model_source = audited, "the audit (re-hashed when bundled)"
    elif audited:
        model, model_source = audited, "the audit"
        dp, why = None, "the model's synthgate.json could not be read"
    else:
        model = gen_model if isinstance(gen_model, str) else None
        model_source = "the generator manifest (not verified)" if model else "not recorded"
        dp, why = None, ("the audit was not given the model, so no DP guarantee was verified"
                         + ("" if model is None else "; the synthetic set's manifest only claims which model made it"))
    return Release(training, source, model, model_source, dp, why, int(images), len(audit.dropped))


# ------------------------------------------------------------------ entries


@dataclass(frozen=True)
class Entry:
    """One ledger line as read back: its facts and whether it verifies (``problems`` empty)."""

    line: int
    seq: int | None
    created: str
    bundle_sha256: str
    bundle_path: str
    release: Release
    policy: Mapping = field(default_factory=dict)
    audit: Mapping = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        r = self.release
        return {"line": self.line, "seq": self.seq, "created": self.created,
                "bundle": {"manifest_sha256": self.bundle_sha256, "path": self.bundle_path},
                "training_set": {"sha256": r.training_set, "source": r.training_set_source},
                "model": {"sha256": r.model, "source": r.model_source,
                          "dp": None if r.dp is None else r.dp.to_dict(), "no_dp": r.no_dp},
                "images_released": r.images, "images_dropped": r.dropped,
                "policy": dict(self.policy), "audit": dict(self.audit),
                "verified": self.verified, "problems": list(self.problems)}


def entry_document(release: Release, *, seq: int, previous: str | None, bundle_sha256: str, bundle_path: str,
                   bundle_signer: str, policy: Mapping, audit: Mapping, created: str | None = None) -> dict:
    """The (unsigned) JSON object of one ledger line."""
    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION, "seq": seq, "previous": previous,
        "created": created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "bundle": {"manifest_sha256": bundle_sha256, "path": bundle_path, "signed_by": bundle_signer},
        "training_set": {"sha256": release.training_set, "source": release.training_set_source},
        "model": {"sha256": release.model, "source": release.model_source,
                  "dp": None if release.dp is None else release.dp.to_dict(), "no_dp": release.no_dp},
        "images_released": release.images,
        "images_dropped": release.dropped,
        "policy": {"name": policy.get("name"), "sha256": policy.get("sha256")},
        "audit": {"sha256": audit.get("sha256"), "verdict": audit.get("verdict")},
    }


def _entry(doc: dict, line: int, problems: list[str]) -> Entry:
    """The facts of a parsed line, read defensively (a damaged line still shows what it claims)."""
    def part(key) -> dict:
        value = doc.get(key)
        return value if isinstance(value, dict) else {}

    def text(value) -> str | None:
        return value if isinstance(value, str) and value else None

    model, training, bundle = part("model"), part("training_set"), part("bundle")
    dp, why = parse_dp(model.get("dp"))
    if dp is None and text(model.get("no_dp")):
        why = model["no_dp"]
    images = doc.get("images_released")
    dropped = doc.get("images_dropped")
    release = Release(text(training.get("sha256")), str(training.get("source") or "not recorded"),
                      text(model.get("sha256")), str(model.get("source") or "not recorded"), dp, why,
                      images if isinstance(images, int) and not isinstance(images, bool) else 0,
                      dropped if isinstance(dropped, int) and not isinstance(dropped, bool) else 0)
    seq = doc.get("seq")
    return Entry(line, seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
                 str(doc.get("created") or ""), str(bundle.get("manifest_sha256") or ""),
                 str(bundle.get("path") or ""), release, part("policy"), part("audit"), tuple(problems))


# ------------------------------------------------------------------ cumulative cost


@dataclass(frozen=True)
class ModelCost:
    """One model's part in a training set's privacy cost (counted once, however many releases it fed)."""

    model: str | None
    dp: ModelDP | None
    no_dp: str | None
    releases: int
    images: int


@dataclass(frozen=True)
class Cumulative:
    """The privacy cost of every release from one training set, by basic sequential composition.

    ``epsilon``/``delta`` are ``None`` when the cost is not bounded
    (``reasons`` says why: a model without a DP guarantee, or a ledger that
    does not verify).
    """

    training_set: str | None
    models: tuple[ModelCost, ...]
    releases: int
    images: int
    epsilon: float | None
    delta: float | None
    reasons: tuple[str, ...] = ()
    dropped: int = 0

    @property
    def bounded(self) -> bool:
        return self.epsilon is not None

    def describe(self) -> str:
        n = len(self.models)
        models = f"{n} model{'s' if n != 1 else ''}"
        if self.bounded:
            return (f"cumulative ε = {self.epsilon:.4g}, δ = {self.delta:.3g} over {models} "
                    f"({self.releases} release(s), {self.images} image(s)); rule: {RULE}")
        return (f"NO differential-privacy guarantee: {'; '.join(self.reasons)}; the cumulative ε over {models} "
                f"({self.releases} release(s), {self.images} image(s)) is not bounded")

    def to_dict(self) -> dict:
        return {"training_set_sha256": self.training_set, "releases": self.releases, "images": self.images,
                "models": [{"sha256": m.model, "dp": None if m.dp is None else m.dp.to_dict(), "no_dp": m.no_dp,
                            "releases": m.releases, "images": m.images} for m in self.models],
                "bounded": self.bounded, "epsilon": self.epsilon, "delta": self.delta,
                "reasons": list(self.reasons), "rule": RULE, "not_covered": NOT_COVERED}


def compose(releases: Iterable[Release], training_set: str | None, damaged: Iterable[str] = ()) -> Cumulative:
    """The cumulative (ε, δ) of ``releases`` (all from ``training_set``): each model once, ε's and δ's added."""
    by_model: dict[object, list[Release]] = {}
    for i, r in enumerate(releases):
        # an unknown model is its own model: two releases of unknown origin are not assumed to share one
        by_model.setdefault(r.model if r.model and r.dp is not None else (r.model, i), []).append(r)
    models = []
    for rs in by_model.values():
        first = next((r for r in rs if r.dp is not None), rs[0])
        models.append(ModelCost(first.model, first.dp, first.no_dp, len(rs), sum(r.images for r in rs)))
    reasons = list(damaged)
    for m in models:
        if m.dp is None:
            reasons.append(f"{'model ' + m.model[:12] + '…' if m.model else 'a model of unrecorded digest'} has no "
                           f"DP guarantee: {m.no_dp or 'none recorded'}")
    all_releases = [r for rs in by_model.values() for r in rs]
    n_rel, n_img = len(all_releases), sum(r.images for r in all_releases)
    dropped = sum(r.dropped for r in all_releases)
    if reasons or not models:
        return Cumulative(training_set, tuple(models), n_rel, n_img, None if reasons else 0.0,
                          None if reasons else 0.0, tuple(reasons), dropped)
    eps = math.fsum(m.dp.epsilon for m in models)
    delta = math.fsum(m.dp.delta for m in models)
    return Cumulative(training_set, tuple(models), n_rel, n_img, eps, delta, (), dropped)


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class LedgerState:
    """A ledger as read and checked: its entries, and every problem (each naming its line)."""

    path: Path
    entries: tuple[Entry, ...] = ()
    problems: tuple[str, ...] = ()
    exists: bool = False
    lines: int = 0
    last_line_sha256: str | None = None

    @property
    def intact(self) -> bool:
        return not self.problems

    def training_sets(self) -> list[str | None]:
        seen: dict[str | None, None] = {}
        for e in self.entries:
            seen.setdefault(e.release.training_set, None)
        return list(seen)

    def entries_for(self, training_set: str | None) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.release.training_set == training_set)

    def cumulative(self, training_set: str | None, extra: Release | None = None) -> Cumulative:
        """The cost of every recorded release from ``training_set`` (plus ``extra``, a release about to be made).

        A ledger with any problem cannot vouch for a total: its problems make
        every training set's cost not bounded.
        """
        releases = [e.release for e in self.entries_for(training_set)]
        if extra is not None:
            releases.append(extra)
        damaged = tuple(f"the ledger does not verify: {p}" for p in self.problems[:3])
        if len(self.problems) > 3:
            damaged += (f"and {len(self.problems) - 3} more ledger problem(s)",)
        if training_set is None:  # nothing can be found to compose with: the total is not known
            damaged += ("the training set's digest is not recorded, so its other releases cannot be found",)
        return compose(releases, training_set, damaged)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_ledger(data: bytes, path: Path, trusted: Mapping[str, str]) -> LedgerState:
    """Check every line of a ledger's bytes; ``trusted`` maps fingerprints to why they are trusted."""
    from synthgate.signing import SignatureError, verify_document

    entries: list[Entry] = []
    problems: list[str] = []
    previous: str | None = None
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    elif raw_lines:
        problems.append(f"line {len(raw_lines)}: not ended by a newline (a write was cut short)")
    for n, raw in enumerate(raw_lines, start=1):
        mine: list[str] = []
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            problems.append(f"line {n}: not a ledger entry (edited or cut short)")
            previous = _sha(raw)
            continue
        try:
            signer = verify_document(doc, f"line {n}").fingerprint
        except SignatureError as exc:
            mine.append(f"{exc.message} (entry edited by hand?)")
        else:
            if signer not in trusted:
                mine.append(f"line {n} is signed by key {signer[:16]}…, which this installation does not trust "
                            "(name it with --trust-key if it is yours)")
        if doc.get("seq") != n:
            mine.append(f"line {n} says it is entry {doc.get('seq')!r}: a line was removed or inserted before it")
        elif doc.get("previous") != previous:
            mine.append(f"line {n} does not follow line {n - 1} (its hash of the line before differs: "
                        "that line was changed, removed or inserted)" if n > 1 else
                        f"line {n} claims a line before it")
        problems += mine
        entries.append(_entry(doc, n, mine))
        previous = _sha(raw)
    return LedgerState(path, tuple(entries), tuple(problems), True, len(raw_lines), previous)


def _trusted(trust: Iterable[str] = ()) -> dict[str, str]:
    from synthgate.signing import installation_public_key, trusted_key

    out: dict[str, str] = {}
    own = installation_public_key()
    if own is not None:
        out[own.fingerprint] = "this installation's key"
    for t in trust:
        out[trusted_key(str(t))] = "--trust-key"
    return out


def read_ledger(path: str | Path | None = None, trust: Iterable[str] = (), *,
                must_exist: bool = False) -> LedgerState:
    """Read and check the ledger at ``path`` (see :func:`ledger_path`); a missing one is empty.

    With ``must_exist``, a missing file is an error (a ``--ledger`` the user
    named, where a typo must not read as "no releases").
    """
    path = ledger_path(path)
    if not path.exists():
        if must_exist:
            raise MissingInputError("ledger file does not exist", path)
        return LedgerState(path)
    if not path.is_file():
        raise InputError("is not a ledger file (a folder?)", path)
    with _locked(path, write=False) as fd:
        data = _read_all(fd, path)
    state = parse_ledger(data, path, _trusted(trust))
    _refuse_non_ledger(data, state)
    return state


def _refuse_non_ledger(data: bytes, state: LedgerState) -> None:
    """Damaged lines in a ledger are reported and followed; a file holding no entry at all is not a ledger (a
    ``--ledger`` naming the real set's ``metadata.csv`` was once appended to)."""
    if data.strip() and not state.entries:
        raise InputError("is not a release ledger (no line of it is a ledger entry); refusing to use it: name a new "
                         "file or the ledger itself", state.path)


# ------------------------------------------------------------------ appending


@contextlib.contextmanager
def _locked(path: Path, *, write: bool):
    import fcntl

    flags = (os.O_RDWR | os.O_CREAT | os.O_APPEND) if write else os.O_RDONLY
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise InputError(f"cannot open the release ledger ({exc.strerror or exc})", path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        yield fd
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_all(fd: int, path: Path) -> bytes:
    size = os.fstat(fd).st_size
    if size > MAX_LEDGER_BYTES:
        raise InputError(f"is larger than {MAX_LEDGER_BYTES >> 20} MB: not a release ledger", path)
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def append(release: Release, *, path: str | Path | None, key: "SigningKey", bundle_sha256: str, bundle_path: str,
           bundle_signer: str, policy: Mapping, audit: Mapping, trust: Iterable[str] = (),
           check: Callable[[LedgerState], None] | None = None) -> Entry:
    """Append one signed entry under an exclusive lock; ``check(state)`` runs first, under the same lock.

    ``check`` sees the ledger exactly as the entry will follow it (so a limit
    checked there cannot be raced past by a concurrent bundle) and may raise
    to stop the append.
    """
    from synthgate.fsutil import _fsync_dir
    from synthgate.signing import sign_document

    path = ledger_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    trusted = _trusted(trust)
    with _locked(path, write=True) as fd:
        data = _read_all(fd, path)
        state = parse_ledger(data, path, trusted)
        _refuse_non_ledger(data, state)
        if check is not None:
            check(state)
        doc = entry_document(release, seq=state.lines + 1, previous=state.last_line_sha256,
                             bundle_sha256=bundle_sha256, bundle_path=bundle_path, bundle_signer=bundle_signer,
                             policy=policy, audit=audit)
        doc = sign_document(doc, key)
        line = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # a cut-short last line stays a (reported) line of its own; this entry starts on a fresh one
        out = (b"\n" if data and not data.endswith(b"\n") else b"") + line + b"\n"
        written = 0
        while written < len(out):  # O_APPEND: each write lands at the end, and only we hold the lock
            written += os.write(fd, out[written:])
        os.fsync(fd)
    if new:
        _fsync_dir(path.parent)
    return _entry(doc, state.lines + 1, [])


__all__ = ["Cumulative", "Entry", "LEDGER_ENV", "LedgerState", "ModelCost", "ModelDP", "RULE", "Release", "append",
           "compose", "default_ledger_path", "entry_document", "ledger_path", "parse_dp", "read_ledger",
           "release_facts"]
