"""``release``: bundle only what passed, verify a bundle against a trusted key, show this installation's key."""
from __future__ import annotations

import sys
from typing import Sequence

from synthgate import clikit

DESCRIPTION = """\
Bundle a synthetic set that passed its audit, and verify bundles.

commands:
  bundle   write the released images, signed manifest, shareable audit and report, policy, model card, datasheet
  verify   check a bundle's signatures, files, images and verdict, and whether its key is trusted
           (exit 0 intact and trusted; 1 changed, or not verified against a trusted key; 2 not a bundle)
  key      show this installation's signing key fingerprint (publish it) and export its public key
"""


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
    b.add_argument("--trust-key", action="append", default=[], metavar="PUBLIC_KEY_OR_FINGERPRINT",
                   help="also accept audits signed by this key (a public key file or its fingerprint); repeatable")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier output of `release bundle`")
    b.add_argument("--json", action="store_true", help="print the bundle manifest")
    v = sub.add_parser("verify", description="Check a bundle's signatures and every file, and whether it was signed "
                                             "by a trusted key (this installation's, or the one you name).")
    v.add_argument("bundle", metavar="BUNDLE")
    who = v.add_mutually_exclusive_group()
    who.add_argument("--key", action="append", default=[], metavar="PUBLIC_KEY_FILE",
                     help="trust only this public key (as `release key --export` writes it)")
    who.add_argument("--fingerprint", action="append", default=[], metavar="FP",
                     help="trust only the key with this SHA-256 fingerprint (as the hospital publishes it)")
    k = sub.add_parser("key", description="This installation's signing key: its fingerprint, and its public half.")
    k.add_argument("--export", metavar="FILE", help="write the public key (PEM) to FILE (must not exist)")
    return parser


def _bundle(args) -> int:
    from synthgate.clikit import printable

    from .bundle import bundle

    manifest = bundle(args.synthetic, args.audit, args.out, policy=args.policy, signing_key=args.signing_key,
                      trust=args.trust_key, overwrite=args.overwrite)
    if args.json:
        clikit.emit_json(manifest)
    else:
        print(f"bundled {len(manifest['images'])} released image file(s) into {printable(args.out)} "
              f"({len(manifest['files'])} files hashed in manifest.json, signed by key "
              f"{manifest['signature']['fingerprint']})")
    return clikit.EXIT_OK


def _verify(args, prog: str) -> int:
    from synthgate.clikit import printable

    from .bundle import verify

    result = verify(args.bundle, keys=args.key, fingerprints=args.fingerprint)
    name = printable(args.bundle)
    for line in result.checked:
        print(f"  ok: {printable(line)}")
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


def _run(argv: Sequence[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.command == "bundle":
        return _bundle(args)
    if args.command == "key":
        return _key(args)
    return _verify(args, f"{prog} verify")


def main(argv: Sequence[str] | None = None, prog: str = "release", command: str | None = None) -> int:
    return clikit.run(lambda a: _run(a, prog), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
