"""``release``: bundle only what passed, and verify a bundle."""
from __future__ import annotations

import sys
from typing import Sequence

from synthgate import clikit

DESCRIPTION = """\
Bundle a synthetic set that passed its audit, and verify bundles.

commands:
  bundle   write the released images, manifest, audit, report, policy, model card and datasheet
  verify   re-check every hash of a bundle (exit 0 intact, 1 changed, 2 unreadable)
"""


def build_parser(prog: str) -> clikit.ArgumentParser:
    parser = clikit.new_parser(prog, DESCRIPTION)
    sub = clikit.add_subparsers(parser)
    b = sub.add_parser("bundle", description="Bundle the images a passing audit released.")
    b.add_argument("synthetic", metavar="SYNTHETIC", help="the audited synthetic set")
    b.add_argument("--audit", required=True, help="the audit.json of that set (from `audit check`)")
    b.add_argument("--out", required=True, help="the bundle folder to create (must not exist)")
    b.add_argument("--policy", help="refuse unless the audit applied this policy (name or file)")
    b.add_argument("--json", action="store_true", help="print the bundle manifest")
    v = sub.add_parser("verify", description="Re-check every SHA-256 of a bundle.")
    v.add_argument("bundle", metavar="BUNDLE")
    return parser


def _run(argv: Sequence[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.command == "bundle":
        from .bundle import bundle

        manifest = bundle(args.synthetic, args.audit, args.out, policy=args.policy)
        if args.json:
            clikit.emit_json(manifest)
        else:
            print(f"bundled {manifest['images']} released image(s) into {args.out} "
                  f"({len(manifest['files'])} files hashed in manifest.json)")
        return clikit.EXIT_OK
    from .bundle import verify

    problems = verify(args.bundle)
    if problems:
        for p in problems:
            print(f"{args.bundle}: {p}", file=sys.stderr)
        print(f"{prog}: {len(problems)} problem(s): the bundle is not as released", file=sys.stderr)
        return clikit.EXIT_FAIL
    print(f"{args.bundle}: intact (every file matches manifest.json)")
    return clikit.EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "release", command: str | None = None) -> int:
    return clikit.run(lambda a: _run(a, prog), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
