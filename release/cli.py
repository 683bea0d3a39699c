"""``release``: bundle only what passed, verify a bundle, list the release ledger, show this installation's key."""
from __future__ import annotations

import sys
from typing import Sequence

from synthgate import clikit

DESCRIPTION = """\
Bundle a synthetic set that passed its audit, and verify bundles.

commands:
  bundle   write the released images (with C2PA content credentials when given a chain), signed manifest,
           shareable audit and report, policy, model card, datasheet; record the release in the ledger
  verify   check a bundle's signatures, files, images and verdict, whether its key is trusted, and (with
           --c2pa-trust) its content credentials
           (exit 0 intact and trusted; 1 changed, bad credentials, or not verified against a trusted key;
           2 not a bundle)
  ledger   list the releases drawn from each training set and their cumulative privacy cost
           (exit 0 every entry verifies; 1 an entry does not; 2 no such ledger)
  key      show this installation's signing key fingerprint (publish it) and export its public key
"""


def _ledger_and_trust_options(p, trust_help: str) -> None:
    """``--trust-key`` and ``--ledger``: the same options, with the same defaults, for ``bundle`` and ``ledger``."""
    p.add_argument("--trust-key", action="append", default=[], metavar="PUBLIC_KEY_OR_FINGERPRINT", help=trust_help)
    p.add_argument("--ledger", metavar="FILE", help="the release ledger (default: $SYNTHGATE_LEDGER or "
                                                    "$XDG_DATA_HOME/synthgate/ledger.jsonl)")


def build_parser(prog: str) -> clikit.ArgumentParser:
    parser = clikit.new_parser(prog, DESCRIPTION)
    sub = clikit.add_subparsers(parser)
    b = sub.add_parser("bundle", description="Bundle the images a passing, signed audit released.")
    b.add_argument("synthetic", metavar="SYNTHETIC", help="the audited synthetic set")
    b.add_argument("--audit", required=True, help="the audit.json of that set (from `audit check`)")
    b.add_argument("--out", required=True, help="the bundle folder to create (must not exist)")
    b.add_argument("--policy", default="default",
                   help="the policy this release is made under (name or file; default: default); the audit must "
                        "have applied exactly this policy")
    b.add_argument("--signing-key", metavar="KEY_FILE",
                   help="private key to sign the bundle with (default: $SYNTHGATE_KEY or this installation's key)")
    _ledger_and_trust_options(b, "also accept audits signed by this key (a public key file or its fingerprint); "
                                 "repeatable")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier output of `release bundle`")
    b.add_argument("--c2pa-chain", metavar="CHAIN_PEM",
                   help="C2PA certificate chain (signing certificate first; default $SYNTHGATE_C2PA_CHAIN): every "
                        "released file gets content credentials; needs --c2pa-key")
    b.add_argument("--c2pa-key", metavar="KEY_PEM", help="the chain's private key (default $SYNTHGATE_C2PA_KEY)")
    b.add_argument("--custodian", help="who curates and answers for this data set (model card, datasheet)")
    b.add_argument("--licence", "--license", dest="licence", help="licence / terms of use of the released images")
    b.add_argument("--purpose", help="what the release is for (model card: direct use; datasheet: motivation)")
    b.add_argument("--uses-to-avoid", help="uses the custodian rules out (model card: out-of-scope use)")
    b.add_argument("--json", action="store_true", help="print the bundle manifest")
    v = sub.add_parser("verify", description="Check a bundle's signatures and every file, and whether it was signed "
                                             "by a trusted key (this installation's, or the one you name).")
    v.add_argument("bundle", metavar="BUNDLE")
    who = v.add_mutually_exclusive_group()
    who.add_argument("--key", action="append", default=[], metavar="PUBLIC_KEY_FILE",
                     help="trust only this public key (as `release key --export` writes it)")
    who.add_argument("--fingerprint", action="append", default=[], metavar="FP",
                     help="trust only the key with this SHA-256 fingerprint (as the hospital publishes it)")
    v.add_argument("--c2pa-trust", metavar="ROOT_PEM",
                   help="validate every image's C2PA content credentials against these root certificates (the "
                        "hospital publishes them; never taken from the bundle); without it they are not checked")
    led = sub.add_parser("ledger", description="The releases recorded in the release ledger, grouped by training set, "
                                               "with their cumulative privacy cost and whether each entry verifies.")
    _ledger_and_trust_options(led, "also trust entries signed by this key; repeatable")
    led.add_argument("--training-set", metavar="DIGEST",
                     help="only the releases drawn from this training set (its SHA-256 digest, or 8+ leading hex digits)")
    led.add_argument("--json", action="store_true", help="print the ledger report as JSON")
    k = sub.add_parser("key", description="This installation's signing key: its fingerprint, and its public half.")
    k.add_argument("--export", metavar="FILE", help="write the public key (PEM) to FILE (must not exist)")
    return parser


def _bundle(args) -> int:
    from synthgate.clikit import printable

    from .bundle import bundle

    from .documents import stewardship
    from .ledger import ledger_path

    def warn(message: str) -> None:
        print(f"release bundle: warning: {printable(message)}", file=sys.stderr)

    steward = stewardship(args.custodian, args.licence, args.purpose, args.uses_to_avoid)
    manifest = bundle(args.synthetic, args.audit, args.out, policy=args.policy, signing_key=args.signing_key,
                      trust=args.trust_key, overwrite=args.overwrite, ledger=args.ledger, c2pa_chain=args.c2pa_chain,
                      c2pa_key=args.c2pa_key, steward=steward, warn=warn)
    if args.json:
        clikit.emit_json(manifest)
        return clikit.EXIT_OK
    credentials = " with C2PA content credentials" if manifest.get("content_credentials") else ""
    print(f"bundled {len(manifest['images'])} released image file(s){credentials} into {printable(args.out)} "
          f"({len(manifest['files'])} files hashed in manifest.json, signed by key "
          f"{manifest['signature']['fingerprint']})")
    cumulative = manifest["privacy"]["cumulative_at_bundling"]
    print(f"recorded in the release ledger {printable(ledger_path(args.ledger))}: training set "
          f"{_short(cumulative['training_set_sha256'])} {_cost(cumulative)}")
    return clikit.EXIT_OK


def _short(digest) -> str:
    return f"{digest[:12]}…" if digest else "(digest not recorded)"


def _cost(c: dict) -> str:
    n = len(c["models"])
    if c["bounded"]:
        return (f"cumulative ε = {c['epsilon']:.4g}, δ = {c['delta']:.3g} over {n} model(s), "
                f"{c['releases']} release(s)")
    return f"NO differential-privacy guarantee ({'; '.join(c['reasons'])}): cumulative ε not bounded"


def _verify(args, prog: str) -> int:
    from synthgate.clikit import printable

    from .bundle import verify

    result = verify(args.bundle, keys=args.key, fingerprints=args.fingerprint, c2pa_trust=args.c2pa_trust)
    name = printable(args.bundle)
    for line in result.checked:
        print(f"  ok: {printable(line)}")
    for line in result.notes:
        print(f"  note: {printable(line)}")
    for p in result.problems:
        print(f"{name}: {printable(p)}", file=sys.stderr)
    if result.problems:
        print(f"{prog}: {len(result.problems)} problem(s): the bundle is not as released", file=sys.stderr)
        return clikit.EXIT_FAIL
    if result.intact:
        print(f"{name}: intact: signed by {result.trusted_by} ({result.signer}); every signature, file and image "
              "checked")
        return clikit.EXIT_OK
    if result.named:
        print(f"{name}: signed by key {result.signer}, NOT by the key you named "
              f"({', '.join(result.named)}): do not trust this bundle", file=sys.stderr)
    else:
        print(f"{name}: self-consistent, NOT verified against a trusted key: signed by key {result.signer}, which is "
              f"not this installation's key; anyone can make a self-consistent bundle, so its origin is unknown. "
              f"Run `{prog} {name} --fingerprint FP` with the fingerprint the hospital publishes", file=sys.stderr)
    return clikit.EXIT_FAIL


def _key(args) -> int:
    from pathlib import Path

    from synthgate.errors import UsageError
    from synthgate.signing import load_signing_key

    key = load_signing_key()
    print(f"fingerprint: {key.fingerprint}")
    print(f"key file:    {key.path} (private: keep it inside the hospital)")
    if args.export:
        out = Path(args.export)
        if out.exists() or out.is_symlink():
            raise UsageError("already exists; choose a new file for the public key", out)
        out.write_text(key.public.pem())
        print(f"public key:  {out} (give it to those who verify your bundles: `release verify BUNDLE --key {out}`)")
    return clikit.EXIT_OK


def _ledger(args) -> int:
    from synthgate.clikit import printable
    from synthgate.errors import UsageError

    from .ledger import NOT_COVERED, RULE, read_ledger

    wanted = None
    if args.training_set is not None:
        wanted = "".join(args.training_set.split()).lower()
        if len(wanted) < 8 or any(c not in "0123456789abcdef" for c in wanted):
            raise UsageError(f"--training-set {args.training_set[:80]!r} is not a digest (8 or more hex digits, as "
                             "`release ledger` prints them)")
    state = read_ledger(args.ledger, args.trust_key, must_exist=args.ledger is not None)
    groups = [t for t in state.training_sets() if wanted is None or (t or "").startswith(wanted)]
    report = {"ledger": str(state.path), "exists": state.exists, "entries": len(state.entries),
              "verified": state.intact, "problems": list(state.problems), "rule": RULE, "not_covered": NOT_COVERED,
              "training_sets": [{"sha256": t, "entries": [e.to_dict() for e in state.entries_for(t)],
                                 "cumulative": state.cumulative(t).to_dict()} for t in groups]}
    if args.json:
        clikit.emit_json(report)
        return clikit.EXIT_OK if state.intact else clikit.EXIT_FAIL
    where = printable(state.path)
    if not state.exists:
        print(f"{where}: no release recorded yet (no ledger file)")
        return clikit.EXIT_OK
    status = "every entry verifies" if state.intact else f"{len(state.problems)} problem(s): it does NOT verify"
    print(f"{where}: {len(state.entries)} release(s) recorded; {status}")
    if wanted is not None and not groups:
        print(f"no release recorded from a training set whose digest starts with {wanted}")
    for group in report["training_sets"]:
        print(f"\ntraining set {group['sha256'] or '(digest not recorded)'}")
        for e in group["entries"]:
            model = e["model"]
            dp = model["dp"]
            cost = (f"DP ε {dp['epsilon_spent']:.4g}, δ {dp['delta']:.3g}" if dp
                    else f"no DP guarantee ({model['no_dp'] or 'not recorded'})")
            mark = "ok" if e["verified"] else "DOES NOT VERIFY"
            print(f"  #{e['line']} {e['created']}  {mark}  bundle {printable(e['bundle']['path'])} (manifest "
                  f"{_short(e['bundle']['manifest_sha256'])})  model {_short(model['sha256'])}  {cost}  "
                  f"{e['images_released']} image(s) released")
            for p in e["problems"]:
                print(f"      {printable(p)}")
        print(f"  cumulative: {_cost(group['cumulative'])}")
    print(f"\nrule: {RULE}.\nnot covered: {NOT_COVERED}.")
    for p in state.problems:
        if not any(p in e.problems for e in state.entries):
            print(f"{where}: {printable(p)}", file=sys.stderr)
    if not state.intact:
        print(f"release ledger: {len(state.problems)} problem(s): the ledger was changed after it was written; "
              "cumulative costs cannot be vouched for", file=sys.stderr)
        return clikit.EXIT_FAIL
    return clikit.EXIT_OK


def _run(argv: Sequence[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.command == "bundle":
        return _bundle(args)
    if args.command == "key":
        return _key(args)
    if args.command == "ledger":
        return _ledger(args)
    return _verify(args, f"{prog} verify")


def main(argv: Sequence[str] | None = None, prog: str = "release", command: str | None = None) -> int:
    return clikit.run(lambda a: _run(a, prog), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
