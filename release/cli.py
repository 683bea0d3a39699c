"""``release``: bundle only what passed, and verify a bundle."""
from __future__ import annotations

import sys
from typing import Sequence

from synthgate import clikit

DESCRIPTION = """\
Bundle a synthetic set that passed its audit, and verify bundles.

commands:
  bundle   write the released images, manifest, audit, report, model card and datasheet
  verify   re-check every hash of a bundle
"""


def build_parser(prog: str) -> clikit.ArgumentParser:
    parser = clikit.new_parser(prog, DESCRIPTION)
    sub = clikit.add_subparsers(parser)
    sub.add_parser("bundle", add_help=False)
    sub.add_parser("verify", add_help=False)
    return parser


def _run(argv: Sequence[str], prog: str) -> int:
    args, rest = build_parser(prog).parse_known_args(argv)
    return clikit.not_yet_available(f"{prog} {args.command}")


def main(argv: Sequence[str] | None = None, prog: str = "release", command: str | None = None) -> int:
    return clikit.run(lambda a: _run(a, prog), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
