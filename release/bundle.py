"""Bundle a synthetic set that passed its audit, and verify bundles against a trusted key.

A bundle holds only the released images (their pixels as audited, without
ancillary metadata), with:

- ``manifest.json``, signed: SHA-256 of every file in the bundle; each
  released image with the SHA-256 its file had when audited and the SHA-256
  of the file shipped; the digests of the internal and the shareable audit;
  the policy; the generator's provenance;
- ``audit.json``: the *shareable* edition of the audit (every real file name
  and patient ID a salted hash, every local path a set name), signed; the
  internal ``audit.json`` stays with the data steward;
- ``report.html`` rendered from that shareable edition, ``policy.yaml`` (the
  exact policy text), ``MODEL_CARD.md`` and ``DATASHEET.md``.

Refused before any work (exit 2, one line): an ``--out`` that is, contains or
lies inside an input; an existing target; an ``audit.json`` that is not one
(read by :mod:`audit.record`); an audit whose signature does not verify or
was made by a key this installation does not trust; a verdict other than
``pass`` (``fail``, ``partial``); failed positive controls; the ``research``
policy; a policy other than the bundle's (``--policy``, default
``default``), or one changed with ``--param``; an audit without conclusive
copy-detection evidence; a required check that did not decide; any input
(synthetic set, real set, holdout, model) missing or changed since the
audit; a released image that a check flagged; a released file that is a
symlink leading outside the set.  The bundle is built in a temporary sibling
and renamed into place, marked as ``release bundle``'s output.

:func:`verify` re-checks all of it from the bundle alone and says whether the
signing key is one the reader trusts.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from synthgate import __version__
from synthgate.errors import InputError, IntegrityError, MissingInputError, UsageError
from synthgate.fsutil import atomic_directory, sha256_file, to_json
from synthgate.imageset import ImageSet

if TYPE_CHECKING:  # pragma: no cover
    from audit.core.policy import Policy
    from audit.record import AuditRecord
    from synthgate.signing import SigningKey

    from .credentials import C2paSigner
    from .documents import Stewardship
    from .ledger import Cumulative, Release

MANIFEST = "manifest.json"
AUDIT = "audit.json"
IMAGES = "images"
METADATA = "metadata.csv"
POLICY = "policy.yaml"
KIND = "release bundle"
SCHEMA_VERSION = 2
CONCLUSIVE = ("pass", "warn", "fail")  # a per-image check that failed has had its findings dropped in a pass
MAX_MANIFEST_BYTES = 64 << 20
ROLES = {"synthetic": "the synthetic set", "real": "the real set", "holdout": "the holdout set",
         "model": "the audited model"}


# ------------------------------------------------------------------ reading the audit


@dataclass(frozen=True)
class SignedAudit:
    """An ``audit.json`` as read: the parsed document (what the signature covers), its typed record, its digest."""

    path: Path
    document: dict
    record: "AuditRecord"
    sha256: str

    @property
    def released_sha256(self) -> dict[str, str]:
        value = self.document.get("released_sha256")
        return value if isinstance(value, dict) else {}


def _read_bytes(path: Path, what: str, limit: int) -> bytes:
    if not path.exists():
        raise MissingInputError(f"{what} does not exist", path)
    if not path.is_file():
        raise InputError(f"is not a {what} file (a folder?)", path)
    if path.stat().st_size > limit:
        raise InputError(f"is larger than {limit >> 20} MB: not a {what} written by synthgate", path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what} ({exc.strerror or exc})", path) from None


def _parse_json(data: bytes, path: Path, what: str):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"is not a readable {what} ({' '.join(str(exc).split())[:160]})", path) from None


def read_signed_audit(path: str | Path) -> SignedAudit:
    """Read ``audit.json`` once: the bytes hashed, the document signed, the typed record validated (exit 2)."""
    from audit.record import MAX_AUDIT_BYTES, parse_audit

    path = Path(path)
    data = _read_bytes(path, "audit", MAX_AUDIT_BYTES)
    document = _parse_json(data, path, "audit.json")
    record = parse_audit(document, path)  # a JSON array, a missing key, a wrong type: one line, exit 2
    return SignedAudit(path, document, record, hashlib.sha256(data).hexdigest())


# ------------------------------------------------------------------ refusals


def _trust_audit(audit: SignedAudit, trusted: dict[str, str]) -> str:
    """The fingerprint of the key that signed the audit, when the signature holds and that key is trusted."""
    from synthgate.signing import SignatureError, verify_document

    try:
        key = verify_document(audit.document, "the audit")
    except SignatureError as exc:
        raise IntegrityError(f"{exc.message}; only an audit exactly as `audit check` wrote and signed it can be "
                             "bundled: audit again", audit.path) from None
    if key.fingerprint not in trusted:
        raise IntegrityError(f"the audit was signed by key {key.fingerprint[:16]}…, which is not this "
                             f"installation's key ({next(iter(trusted))[:16]}…); if that key is your hospital's "
                             f"audit machine, name it with --trust-key (its public key file or fingerprint)",
                             audit.path)
    return key.fingerprint


def _is_research(name: str | None, sha256: str | None) -> bool:
    from policies.loader import builtin_text

    research = hashlib.sha256(builtin_text("research").encode("utf-8")).hexdigest()
    return str(name or "").strip().lower() == "research" or sha256 == research


def _check_verdict(audit: "AuditRecord", path: Path) -> None:
    if audit.verdict == "partial":
        raise UsageError("the audit is partial (only some of the policy's checks ran, --checks), so nothing may "
                         "be released: run the whole policy", path)
    if audit.verdict != "pass":
        reasons = "; ".join(audit.verdict_reasons[:2]) or "no reason recorded"
        raise UsageError(f"the audit failed, so nothing may be released ({reasons})", path)
    if not audit.control.passed:
        raise UsageError("the audit's positive controls failed: it is invalid and releases nothing", path)
    if audit.policy is None:
        raise UsageError("the audit records no policy, so nothing may be released", path)
    if _is_research(audit.policy.name, audit.policy.sha256):
        raise UsageError("the audit applied the `research` policy, which is for exploration inside the hospital and "
                         "never approves a release: audit again under the release policy", path)


def _check_evidence(audit: "AuditRecord", path: Path) -> None:
    copy = audit.check("copy_detection")
    if copy is None or copy.status not in CONCLUSIVE:
        why = "did not run" if copy is None else f"is {copy.status}: {' '.join(copy.reason.split())}"
        raise UsageError(f"the audit holds no copy-detection evidence (copy_detection {why}); a bundle needs at "
                         "least proof that no released image copies a training image", path)
    for name, rule in audit.policy.checks.items():
        c = audit.check(name)
        if rule.required and (c is None or c.status not in CONCLUSIVE):
            raise UsageError(f"the policy requires {name}, which did not decide "
                             f"({'absent' if c is None else c.status}); nothing may be released", path)
    both = sorted(set(audit.released) & set(audit.dropped))
    if both:
        raise UsageError(f"the audit both dropped and released {both[0]!r}; it is not an audit `audit check` "
                         "wrote", path)
    flagged = audit.flagged
    shipped = [k for k in audit.released if k in flagged]
    if shipped:
        raise UsageError(f"{len(shipped)} released image(s) were flagged (e.g. {shipped[0]} by {flagged[shipped[0]]}) "
                         "and only warned about by the policy; a bundle ships only what passed: re-audit with a "
                         "policy that drops or blocks them", path)


def _check_policy(audit: "AuditRecord", wanted: "Policy", path: Path) -> None:
    from audit.core.policy import masquerades

    recorded = audit.policy
    if masquerades(recorded.name, recorded.sha256):
        raise UsageError(f"the audit applied a custom policy calling itself {recorded.name!r}, the name of a built-in "
                         "policy, with other text; a bundle is never made under a policy that can be taken for a "
                         "built-in one: give the file a name of its own and audit again", path)
    if recorded.sha256 != wanted.sha256:
        raise UsageError(f"policy mismatch: the audit applied {recorded.name!r} (sha256 {recorded.sha256[:12]}), not "
                         f"{wanted.name!r} (sha256 {wanted.sha256[:12]}) that this bundle is made under; name the "
                         "audited policy with --policy, or audit again under this one", path)
    if recorded.overrides:
        raise UsageError(f"the audit changed the policy's settings with --param ({', '.join(recorded.overrides)}); "
                         "a bundle is made under the policy as written: put the settings in a policy file and audit "
                         "again", path)


def _recorded_path(entry, role: str) -> Path:
    p = Path(entry.path)
    if not p.exists():
        raise MissingInputError(f"the audit's {role} is missing (recorded as {entry.path!r}); a bundle re-checks "
                                "every input the audit recorded, so the audit still describes them: restore it, or "
                                "audit again", p)
    return p


def _check_recorded_inputs(audit: "AuditRecord") -> dict[str, ImageSet]:
    """Re-hash the real set, the holdout and the model the audit recorded; the opened sets by role."""
    sets: dict[str, ImageSet] = {}
    for role in ("real", "holdout"):
        entry = getattr(audit.inputs, role)
        if entry is None:
            continue
        p = _recorded_path(entry, f"{role} set")
        s = ImageSet(p, skip_unreadable=bool(entry.skipped), cache=None)
        if s.digest != entry.sha256:
            raise IntegrityError(f"the {role} set changed after the audit (its digest differs): the audit no longer "
                                 "describes it; audit again", p)
        sets[role] = s
    model = audit.inputs.model
    if model is not None:
        from generators.loading import model_digest

        p = _recorded_path(model, "model")
        if model.sha256 is None or model_digest(p) != model.sha256:
            raise IntegrityError("the model changed after the audit (its digest differs); audit again", p)
    return sets


def _check_set(synthetic: Path, audit: SignedAudit) -> ImageSet:
    entry = audit.record.inputs.synthetic
    imageset = ImageSet(synthetic, skip_unreadable=bool(entry.skipped))
    if imageset.skipped:
        imageset.verify()
    if imageset.digest != entry.sha256:
        raise IntegrityError("the synthetic set changed after the audit (its digest differs); audit it again",
                             synthetic)
    from audit.core.result import manifest_digest

    if manifest_digest(synthetic) != entry.manifest_sha256:
        # its claims (model, training set, DP) go into the signed manifest, the model card and the ledger
        what = ("appeared" if entry.manifest_sha256 is None else
                "was removed" if not (synthetic / "manifest.json").is_file() else "changed")
        raise IntegrityError(f"the synthetic set's manifest.json {what} after the audit; the bundle carries its "
                             "claims, so it must be the one audited: audit again", synthetic)
    root = synthetic.resolve()
    by_key = {r.key: r for r in imageset.records}
    recorded = audit.released_sha256
    for key in audit.record.released:
        record = by_key.get(key)
        if record is None:
            raise IntegrityError(f"released image {key!r} is not in the synthetic set", synthetic)
        if recorded.get(key) != record.sha256:
            raise IntegrityError(f"released image {key!r} has no SHA-256 in the audit's released_sha256, or another "
                                 "one: audit again", audit.path)
        path = synthetic / record.path
        if path.is_symlink() and root not in path.resolve().parents:
            raise UsageError(f"{record.path} is a symlink that leads outside the synthetic set; refusing to bundle",
                             synthetic)
        if sha256_file(path) != record.sha256:
            raise IntegrityError(f"{record.path} changed after the audit", synthetic)
    return imageset


def _released_files(imageset: ImageSet, released: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Files whose every frame was released (a file ships whole or not at all), and the files held back."""
    keep = set(released)
    files: dict[str, list] = {}
    for r in imageset.records:
        files.setdefault(r.path, []).append(r.key)
    shipped = sorted(p for p, keys in files.items() if all(k in keep for k in keys))
    held = [{"file": p, "released": [k for k in keys if k in keep], "dropped": [k for k in keys if k not in keep]}
            for p, keys in sorted(files.items()) if p not in shipped and any(k in keep for k in keys)]
    return shipped, held


# ------------------------------------------------------------------ writing


def _metadata_csv(files: list[str], labels: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # quotes a label with a comma, a quote or a newline
    writer.writerow(["path", "label"])
    writer.writerows([p, labels.get(p) or ""] for p in files)
    return buf.getvalue()


def _read_optional_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def bundle(synthetic: str | Path, audit_path: str | Path, out: str | Path, policy: str | Path | None = "default", *,
           signing_key: str | Path | None = None, trust: Iterable[str] = (), overwrite: bool = False,
           ledger: str | Path | None = None, c2pa_chain: str | Path | None = None, c2pa_key: str | Path | None = None,
           steward: "Stewardship | None" = None, warn: Callable[[str], None] | None = None) -> dict:
    """Write a release bundle and record it in the release ledger; returns its (signed) manifest.

    Parameters
    ----------
    synthetic, audit_path
        The audited synthetic set and its ``audit.json`` (signed by ``audit check``).
    out
        The bundle folder to create.
    policy
        The policy the bundle is made under (name or file); the audit must have applied exactly it.
    signing_key
        A private key file to sign with (default: ``SYNTHGATE_KEY`` or this installation's key).
    trust
        Further keys (public key files or fingerprints) whose audits, and ledger entries, are trusted.
    overwrite
        Replace an earlier output of ``release bundle`` (and nothing else) at ``out``.
    ledger
        The release ledger (:mod:`release.ledger`; default ``SYNTHGATE_LEDGER`` or
        ``$XDG_DATA_HOME/synthgate/ledger.jsonl``).  The release is appended to it, signed
        with this installation's key; a policy's ``max_cumulative_epsilon`` is checked
        against it before anything is written.
    c2pa_chain, c2pa_key
        The hospital's C2PA certificate chain and key (default ``SYNTHGATE_C2PA_CHAIN`` /
        ``SYNTHGATE_C2PA_KEY``): every released file gets content credentials.  Both or neither.
    steward
        What the custodian states for the model card and datasheet (:func:`release.documents.stewardship`).
    warn
        Called with each warning (a cumulative ε past a ``warn`` limit, a ledger that does not
        verify); default :func:`warnings.warn`.
    """
    from audit.core.policy import load_policy
    from synthgate.outputs import check_target, refuse_overlap
    from synthgate.signing import load_signing_key, trusted_key

    from . import credentials as c2pa
    from .ledger import read_ledger, release_facts

    warn = warn or _warn
    synthetic, audit_path, out = Path(synthetic), Path(audit_path), Path(out)
    audit = read_signed_audit(audit_path)
    record = audit.record
    wanted = load_policy(policy or "default")
    if _is_research(wanted.name, wanted.sha256):
        raise UsageError("the `research` policy never approves a release; bundle under the release policy")
    inputs = {"synthetic": synthetic, "audit file": audit_path, "policy": wanted.path}
    for role in ("real", "holdout", "model"):
        entry = getattr(record.inputs, role)
        inputs[role] = Path(entry.path) if entry is not None else None
    refuse_overlap(out, inputs)
    from .ledger import ledger_path

    # the ledger is appended to: never an input (a --ledger naming the real set's metadata.csv corrupted it)
    refuse_overlap(ledger_path(ledger), {**inputs, "bundle": out}, flag="the release ledger")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UsageError("bundle target already exists; choose a new folder (or --overwrite to replace an earlier "
                         "`release bundle` output)", out)
    check_target(out, KIND, overwrite=overwrite)
    key = load_signing_key(signing_key)
    trusted = {key.fingerprint: "this installation's key"} | {trusted_key(str(t)): "--trust-key" for t in trust}
    audit_signer = _trust_audit(audit, trusted)
    _check_verdict(record, audit_path)
    _check_policy(record, wanted, audit_path)
    _check_evidence(record, audit_path)
    if not synthetic.exists():
        raise MissingInputError("synthetic set folder does not exist", synthetic)
    imageset = _check_set(synthetic, audit)
    sets = _check_recorded_inputs(record)
    files, held = _released_files(imageset, record.released)
    if not files:
        raise UsageError("the audit released no image that can ship (a file ships only when all its frames were "
                         "released)", audit_path)
    formats = {r.path: r.format for r in imageset.records}
    signer = c2pa.resolve(c2pa_chain, c2pa_key)
    if signer is not None:
        c2pa.check_sidecars(files, formats)
    steward = steward or _default_steward()
    model_info = _model_info(record)
    generator = _read_optional_json(synthetic / "manifest.json")
    shipped = set(files)
    facts = release_facts(record, model_info, generator, sum(1 for r in imageset.records if r.path in shipped))
    state = read_ledger(ledger, trust)
    cumulative = _check_privacy(state.cumulative(facts.training_set, facts), wanted, state.problems, warn)
    release = _Release(facts, cumulative, ledger, tuple(str(t) for t in trust), signer, steward)
    return _write(out, synthetic, audit, audit_signer, imageset, sets, files, held, wanted, key, overwrite,
                  model_info, generator, release)


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def _default_steward() -> "Stewardship":
    from .documents import Stewardship

    return Stewardship()


@dataclass(frozen=True)
class _Release:
    """What the bundle needs beyond the audit: ledger facts and cost, where the ledger is, C2PA, the custodian."""

    facts: "Release"
    cumulative: "Cumulative"
    ledger: str | Path | None
    trust: tuple[str, ...]
    signer: "C2paSigner | None"
    steward: "Stewardship"


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "(digest not recorded)"


def _limit_problem(cumulative: "Cumulative", policy: "Policy") -> str | None:
    """Why this release breaks the policy's ``max_cumulative_epsilon``, or ``None``."""
    limit = policy.max_cumulative_epsilon
    if limit is None:
        return None
    where = f"training set {_short(cumulative.training_set)}"
    if not cumulative.bounded:
        return (f"policy {policy.name!r} limits the cumulative ε of a training set to {limit:g}, but {where} has "
                f"no differential-privacy guarantee ({'; '.join(cumulative.reasons)}), so its cumulative ε is not "
                "bounded")
    if cumulative.epsilon > limit:
        return (f"this release takes the cumulative ε of {where} to {cumulative.epsilon:.4g} (δ "
                f"{cumulative.delta:.3g}) over {len(cumulative.models)} DP model(s), past policy {policy.name!r}'s "
                f"max_cumulative_epsilon {limit:g} (basic composition: the models' ε add up)")
    return None


def _check_privacy(cumulative: "Cumulative", policy: "Policy", ledger_problems: Sequence[str],
                   warn: Callable[[str], None]) -> "Cumulative":
    """Refuse (exit 2, nothing written) or warn when the cumulative ε passes the policy's limit."""
    problem = _limit_problem(cumulative, policy)
    if problem is not None:
        if policy.on_cumulative_epsilon == "refuse":
            raise UsageError(f"{problem}; nothing was written (see `release ledger`)")
        warn(f"{problem}; bundling anyway (on_cumulative_epsilon: warn)")
    elif ledger_problems:
        warn(f"the release ledger does not verify ({ledger_problems[0]}{'; …' if len(ledger_problems) > 1 else ''}); "
             "this release is recorded after it: see `release ledger`")
    return cumulative


def _write(out: Path, synthetic: Path, audit: SignedAudit, audit_signer: str, imageset: ImageSet,
           sets: dict[str, ImageSet], files: list[str], held: list[dict], policy: "Policy",
           key: "SigningKey", overwrite: bool, model_info: dict | None, generator: dict | None,
           release: _Release) -> dict:
    from audit.record import parse_audit
    from audit.shareable import redactor_for, shareable
    from reports.render import render_html
    from synthgate.imagemeta import strip_ancillary
    from synthgate.signing import sign_document

    from . import credentials as c2pa
    from .documents import datasheet, model_card

    record = audit.record
    # local paths beyond the audit's own inputs: the model's training set, the generator's model, this synthetic set
    local = {str(synthetic): ROLES["synthetic"], str(synthetic.resolve()): ROLES["synthetic"]}
    for source in (model_info, generator):
        training = (source or {}).get("training_set") or {}
        if isinstance(training, dict) and isinstance(training.get("path"), str):
            local[training["path"]] = "the training set"
        model = (source or {}).get("model") or {}
        if isinstance(model, dict) and isinstance(model.get("path"), str):
            local[model["path"]] = ROLES["model"]
    redactor = redactor_for(audit.document, sets, local)
    model_info, generator = redactor.value(model_info), redactor.value(generator)

    share = shareable(audit.document, sets, local)
    share["edition"]["derived_from"] = {"audit_sha256": audit.sha256, "signed_by": audit_signer}
    share = sign_document(share, key)
    share_record = parse_audit(share, AUDIT)
    share_text = to_json(share)
    share_sha = hashlib.sha256(share_text.encode()).hexdigest()
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    facts, signer = release.facts, release.signer
    credentials = None if signer is None else {
        **signer.to_dict(), "standard": "C2PA", "digital_source_type": "trainedAlgorithmicMedia",
        "assertion": "org.synthgate.release", "embedded_in": list(c2pa.EMBEDDED),
        "detached": "a .c2pa sidecar next to every other file"}

    by_path = {}
    for r in imageset.records:
        by_path.setdefault(r.path, []).append(r)
    labels = {p: rs[0].label for p, rs in by_path.items()}
    reference = None
    if "real" in sets and any(r.label is not None for r in sets["real"].records):
        from collections import Counter

        reference = dict(Counter(str(r.label) for r in sets["real"].records if r.label is not None))
    with atomic_directory(out, overwrite=overwrite, kind=KIND) as tmp:
        images = []
        for rel in files:
            dst = tmp / IMAGES / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            first = by_path[rel][0]
            data = strip_ancillary(synthetic / rel, first.format)  # pixels as audited; no text chunks or EXIF
            entry = {"path": f"{IMAGES}/{rel}", "keys": [r.key for r in by_path[rel]],
                     "audited_sha256": first.sha256}
            if signer is not None:  # after strip_ancillary, which would remove an embedded manifest
                assertion = c2pa.assertion_for(
                    model_sha256=facts.model, model_source=facts.model_source, audit_sha256=share_sha,
                    internal_audit_sha256=audit.sha256, verdict=record.verdict, audited_sha256=first.sha256,
                    policy=policy.name)
                source_sha = hashlib.sha256(data).hexdigest()
                data, sidecar, fmt = c2pa.sign(data, first.format, signer, assertion)
                cred = {"format": fmt, "source_sha256": source_sha}
                if sidecar is not None:
                    cred["sidecar"] = f"{IMAGES}/{c2pa.sidecar_for(rel)}"
                    (tmp / cred["sidecar"]).write_bytes(sidecar)
                entry["credentials"] = cred
            dst.write_bytes(data)
            entry["shipped_sha256"] = hashlib.sha256(data).hexdigest()
            images.append(entry)
        if any(labels[p] is not None for p in files):
            (tmp / IMAGES / METADATA).write_text(_metadata_csv(files, labels), encoding="utf-8")
        (tmp / AUDIT).write_text(share_text, encoding="utf-8")
        (tmp / "report.html").write_text(render_html(share_record, internal=False, synthetic=imageset),
                                         encoding="utf-8")
        (tmp / POLICY).write_text(policy.text, encoding="utf-8")
        card = model_card(share_record, model_info, generator, steward=release.steward, privacy=release.cumulative,
                          credentials=credentials)
        sheet = datasheet(share_record, model_info, generator, files, labels, key.fingerprint,
                          steward=release.steward, privacy=release.cumulative, credentials=credentials,
                          created=created, reference_labels=reference,
                          reference_name="real set as audited (taken to be the training set)")
        (tmp / "MODEL_CARD.md").write_text(redactor.text(card), encoding="utf-8")
        (tmp / "DATASHEET.md").write_text(redactor.text(sheet), encoding="utf-8")
        gen = generator and {k: generator.get(k) for k in ("model", "training_set", "sampler")}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": "synthgate release bundle",
            "tool": {"name": "synthgate", "version": __version__},
            "created": created,
            "synthetic_set": {"sha256": record.inputs.synthetic.sha256, "n_images": record.inputs.synthetic.n_images},
            "audit": {"file": AUDIT, "edition": "shareable", "sha256": share_sha,
                      "verdict": record.verdict, "created": record.created,
                      "internal": {"sha256": audit.sha256, "signed_by": audit_signer}},
            "policy": {"name": policy.name, "sha256": policy.sha256, "file": POLICY},
            "generator": gen,
            "privacy": {"training_set_sha256": facts.training_set, "training_set_source": facts.training_set_source,
                        "model_sha256": facts.model, "model_source": facts.model_source,
                        "dp": None if facts.dp is None else facts.dp.to_dict(), "no_dp": facts.no_dp,
                        "cumulative_at_bundling": release.cumulative.to_dict()},
            "content_credentials": credentials,
            "custodian": redactor.value(release.steward.to_dict()),
            "images": images,
            "held_back": held,
            "files": {p.relative_to(tmp).as_posix(): sha256_file(p)
                      for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        manifest = sign_document(manifest, key)
        manifest_text = to_json(manifest)
        (tmp / MANIFEST).write_text(manifest_text, encoding="utf-8")
        _record(release, policy, out, hashlib.sha256(manifest_text.encode("utf-8")).hexdigest(), key.fingerprint,
                audit)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700; a bundle is meant to be shared
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _record(release: _Release, policy: "Policy", out: Path, manifest_sha: str, bundle_signer: str,
            audit: SignedAudit) -> None:
    """Append the release to the ledger, re-checking the policy's limit under the ledger's lock.

    Runs as the last step inside the bundle's temporary folder: a refusal here
    (a concurrent bundle took the cumulative ε past the limit meanwhile)
    removes the bundle, and a ledger entry is never missing for a bundle that
    exists (at worst one is recorded for a bundle whose final rename failed:
    an over-count, never an under-count).
    """
    from synthgate.signing import load_signing_key

    from .ledger import append

    def recheck(state) -> None:
        cumulative = state.cumulative(release.facts.training_set, release.facts)
        problem = _limit_problem(cumulative, policy)
        if problem is not None and policy.on_cumulative_epsilon == "refuse":
            raise UsageError(f"{problem} (another release was recorded while this one was being written); nothing "
                             "was written (see `release ledger`)")

    append(release.facts, path=release.ledger, key=load_signing_key(), bundle_sha256=manifest_sha,
           bundle_path=str(out.resolve()), bundle_signer=bundle_signer,
           policy={"name": policy.name, "sha256": policy.sha256},
           audit={"sha256": audit.sha256, "verdict": audit.record.verdict}, trust=release.trust, check=recheck)


def _model_info(audit: "AuditRecord") -> dict | None:
    model = audit.inputs.model
    if model is None:
        return None
    return _read_optional_json(Path(model.path) / "synthgate.json")


# ------------------------------------------------------------------ verifying


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found.

    ``checked``: what held; ``problems``: what did not; ``signer``: the
    fingerprint of the key whose signature over the manifest verified (None
    when it did not); ``trusted_by``: why that key is trusted (``this
    installation's key``, ``the key you named``) or None.
    """

    bundle: Path
    checked: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    signer: str | None = None
    trusted_by: str | None = None
    named: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = ()

    @property
    def consistent(self) -> bool:
        """Every signature verifies and every file, image and the audit match (whoever signed)."""
        return not self.problems and self.signer is not None

    @property
    def intact(self) -> bool:
        """Consistent, and signed by a trusted key: the only outcome ``release verify`` calls intact."""
        return self.consistent and self.trusted_by is not None


def _safe_rel(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts


def verify(bundle_dir: str | Path, keys: Iterable[str | Path] = (), fingerprints: Iterable[str] = (),
           c2pa_trust: str | Path | None = None) -> Verification:
    """Check a bundle: signatures, every file's hash, the images against the audit, the verdict, and trust.

    Trust: with ``keys`` (public key files) or ``fingerprints``, exactly those
    keys are trusted; without, this installation's own key.  Content
    credentials (C2PA) are validated only against ``c2pa_trust``, the root
    certificates the verifier gives (never anything inside the bundle);
    without it they are reported as not checked (``notes``).  Raises (exit 2)
    only when the folder is not a bundle at all, or ``c2pa_trust`` cannot be
    read; everything else is a problem in the result.
    """
    from synthgate.outputs import MARKER
    from synthgate.signing import PublicKey, SignatureError, installation_public_key, parse_fingerprint, verify_document

    root = Path(bundle_dir)
    if not root.is_dir():
        raise MissingInputError("bundle folder does not exist", root)
    manifest = _parse_json(_read_bytes(root / MANIFEST, "bundle manifest", MAX_MANIFEST_BYTES), root / MANIFEST,
                           "bundle manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise InputError("lists no files (not a synthgate bundle manifest)", root / MANIFEST)
    named = tuple(PublicKey.read(k).fingerprint for k in keys) + tuple(parse_fingerprint(f) for f in fingerprints)
    anchors = _read_trust_roots(c2pa_trust, root) if c2pa_trust is not None else None
    ok: list[str] = []
    bad: list[str] = []

    # 1. the manifest's signature, and whose it is
    signer = None
    try:
        signer = verify_document(manifest, "manifest.json").fingerprint
        ok.append(f"manifest.json signature (Ed25519, key {signer})")
    except SignatureError as exc:
        bad.append(exc.message)
    trusted_by = None
    if signer is not None:
        if named:
            trusted_by = "the key you named" if signer in named else None
        else:
            own = installation_public_key()
            trusted_by = "this installation's key" if own is not None and own.fingerprint == signer else None

    # 2. every file: listed, present, unchanged; nothing added
    files = manifest["files"]
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    hashes_ok = True
    for rel, sha in sorted(files.items(), key=lambda kv: str(kv[0])):
        path = root / rel if _safe_rel(rel) else None
        if path is None or not isinstance(sha, str):
            bad.append(f"{rel!r}: not a file name inside the bundle (manifest.json is malformed)")
        elif rel not in present:
            bad.append(f"{rel}: missing")
        elif path.is_symlink():
            bad.append(f"{rel}: replaced by a symlink")
        elif sha256_file(path) != sha:
            bad.append(f"{rel}: changed (SHA-256 differs from manifest.json)")
        else:
            continue
        hashes_ok = False
    for rel in sorted(present - set(files) - {MANIFEST, MARKER}):
        bad.append(f"{rel}: not in the manifest (added after bundling)")
        hashes_ok = False
    if (root / MARKER).is_symlink() or ((root / MARKER).exists() and
                                          (_read_optional_json(root / MARKER) or {}).get("kind") != KIND):
        bad.append(f"{MARKER}: not the marker `release bundle` writes")
        hashes_ok = False
    if hashes_ok:
        ok.append(f"{len(files)} files match their SHA-256 in manifest.json; nothing added or missing")

    # 3. the shareable audit: signed by the same key, the digest the manifest records, a pass
    audit_doc = _verify_audit(root, manifest, signer, ok, bad)

    # 4. the images: exactly the audit's released images, with the hashes it and the manifest record
    if audit_doc is not None:
        _verify_images(root, manifest, audit_doc, ok, bad)
        _verify_policy(root, manifest, audit_doc, ok, bad)
    from .credentials import verify_images as verify_credentials

    note = verify_credentials(root, manifest, anchors, ok, bad)
    return Verification(root, tuple(ok), tuple(bad), signer, trusted_by, named, (note,) if note else ())


def _read_trust_roots(path: str | Path, bundle_root: Path) -> bytes:
    """The verifier's C2PA trust roots (PEM certificates); refused when they come from inside the bundle."""
    path = Path(path)
    data = _read_bytes(path, "C2PA trust root", 1 << 20)
    if path.resolve() == bundle_root.resolve() or bundle_root.resolve() in path.resolve().parents:
        raise UsageError("lies inside the bundle: trust roots must come from the hospital that signed it (the root "
                         "certificate it publishes), never from the bundle being checked", path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InputError("holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the root certificate(s) the "
                         "hospital publishes", path)
    return data


def _verify_audit(root: Path, manifest: dict, signer: str | None, ok: list[str], bad: list[str]) -> dict | None:
    from audit.core.policy import masquerades, policy_label
    from audit.record import parse_audit
    from synthgate.errors import SynthgateError
    from synthgate.signing import SignatureError, verify_document

    path = root / AUDIT
    if not path.is_file() or path.is_symlink():
        bad.append(f"{AUDIT}: missing; a bundle carries its audit")
        return None
    try:
        data = path.read_bytes()
        doc = _parse_json(data, path, AUDIT)
        record = parse_audit(doc, AUDIT)
    except (OSError, SynthgateError) as exc:
        bad.append(f"{AUDIT}: not readable as an audit ({getattr(exc, 'message', exc)})")
        return None
    entry = manifest.get("audit") if isinstance(manifest.get("audit"), dict) else {}
    if entry.get("sha256") != hashlib.sha256(data).hexdigest():
        bad.append(f"{AUDIT}: its SHA-256 is not the one manifest.json records for the audit")
    try:
        audit_signer = verify_document(doc, AUDIT).fingerprint
    except SignatureError as exc:
        bad.append(exc.message)
    else:
        if signer is not None and audit_signer != signer:
            bad.append(f"{AUDIT} is signed by key {audit_signer[:16]}…, the manifest by {signer[:16]}…: "
                       "one of them was replaced")
        else:
            ok.append(f"{AUDIT} signature (same key)")
    edition = doc.get("edition") if isinstance(doc.get("edition"), dict) else {}
    derived = edition.get("derived_from") if isinstance(edition.get("derived_from"), dict) else {}
    internal = entry.get("internal") if isinstance(entry.get("internal"), dict) else {}
    if edition.get("kind") != "shareable":
        bad.append(f"{AUDIT}: not the shareable edition (a bundle never carries the internal audit)")
    elif not derived.get("audit_sha256") or derived.get("audit_sha256") != internal.get("sha256"):
        bad.append(f"{AUDIT}: the internal audit it was derived from is not the one manifest.json records")
    problems = []
    if record.verdict != "pass":
        problems.append(f"its verdict is {record.verdict}")
    if not record.control.passed:
        problems.append("its positive controls failed")
    if record.policy is None or _is_research(record.policy.name, record.policy.sha256):
        problems.append("its policy is research or not recorded")
    excluded = set(record.flagged) | set(record.dropped)
    flagged = [k for k in record.released if k in excluded]
    if flagged:
        problems.append(f"{len(flagged)} released image(s) were flagged or dropped (e.g. {flagged[0]})")
    if problems:
        bad.append(f"{AUDIT}: not a release verdict: {'; '.join(problems)}")
    else:
        ok.append(f"{AUDIT}: verdict pass, controls held, no released image flagged "
                  f"({policy_label(record.policy.name, record.policy.sha256)})")
        if masquerades(record.policy.name, record.policy.sha256):
            bad.append(f"{AUDIT}: its policy calls itself {record.policy.name!r} but is not that built-in policy")
    return doc


def _verify_images(root: Path, manifest: dict, audit: dict, ok: list[str], bad: list[str]) -> None:
    released = audit.get("released") if isinstance(audit.get("released"), list) else []
    released_set = {k for k in released if isinstance(k, str)}
    audited = audit.get("released_sha256") if isinstance(audit.get("released_sha256"), dict) else {}
    dropped = set(audit.get("dropped") or []) if isinstance(audit.get("dropped"), list) else set()
    entries = manifest.get("images")
    files = manifest["files"]
    if not isinstance(entries, list):
        bad.append("manifest.json lists no released images")
        return
    before = len(bad)
    shipped_keys: set[str] = set()
    paths = set()
    for e in entries:
        if not (isinstance(e, dict) and _safe_rel(e.get("path")) and isinstance(e.get("keys"), list)
                and e["keys"] and all(isinstance(k, str) for k in e["keys"])):
            bad.append("manifest.json: a malformed image entry")
            continue
        path, rel = e["path"], e["path"].removeprefix(f"{IMAGES}/")
        paths.add(path)
        if files.get(path) != e.get("shipped_sha256"):
            bad.append(f"{path}: the shipped SHA-256 is not the file's SHA-256 in the manifest")
        for k in e["keys"]:
            if k != rel and not k.startswith(rel + "#"):
                bad.append(f"{path}: image {k!r} is not a frame of this file")
            elif k not in released_set:
                bad.append(f"{path}: image {k!r} is not released by the audit")
            elif audited.get(k) != e.get("audited_sha256"):
                bad.append(f"{path}: the audited SHA-256 of {k!r} is not the one the audit records")
            shipped_keys.add(k)
    on_disk = {p.relative_to(root).as_posix() for p in (root / IMAGES).rglob("*")
               if (p.is_file() or p.is_symlink())} if (root / IMAGES).is_dir() else set()
    on_disk -= {f"{IMAGES}/{METADATA}"}
    sidecars = {e["credentials"]["sidecar"] for e in entries if isinstance(e, dict)
                and isinstance(e.get("credentials"), dict) and isinstance(e["credentials"].get("sidecar"), str)}
    on_disk -= sidecars & set(files)  # detached C2PA manifests the signed manifest lists
    for extra in sorted(on_disk - paths):
        bad.append(f"{extra}: an image file that is not one of the audit's released images")
    for missing in sorted(paths - on_disk):
        bad.append(f"{missing}: a released image listed in the manifest is not in the bundle")
    held = manifest.get("held_back") if isinstance(manifest.get("held_back"), list) else []
    held_keys = set()
    for h in held:
        if (isinstance(h, dict) and isinstance(h.get("released"), list) and isinstance(h.get("dropped"), list)
                and h["dropped"] and set(h["dropped"]) <= dropped):
            held_keys |= {k for k in h["released"] if isinstance(k, str)}
    unshipped = [k for k in released if k not in shipped_keys and k not in held_keys]
    if unshipped:
        bad.append(f"released image {unshipped[0]!r} (and {len(unshipped) - 1} more) is not in the bundle"
                   if len(unshipped) > 1 else f"released image {unshipped[0]!r} is not in the bundle")
    if len(bad) == before:
        ok.append(f"{len(paths)} image file(s): exactly the audit's released images, each with the SHA-256 the "
                  "audit recorded (audited) and the manifest records (shipped)")


def _verify_policy(root: Path, manifest: dict, audit: dict, ok: list[str], bad: list[str]) -> None:
    from audit.core.policy import policy_label

    policy = audit.get("policy") if isinstance(audit.get("policy"), dict) else {}
    path = root / POLICY
    if not path.is_file() or path.is_symlink():
        bad.append(f"{POLICY}: missing")
        return
    if hashlib.sha256(path.read_bytes()).hexdigest() != policy.get("sha256"):
        bad.append(f"{POLICY}: not the policy text the audit applied (SHA-256 differs)")
    else:
        label = policy_label(policy.get("name"), policy.get("sha256"))
        ok.append(f"{POLICY}: the exact policy the audit applied ({label})")
