"""``audit``: the data steward's command."""
from __future__ import annotations

import sys
from typing import Sequence

from synthgate import clikit

DESCRIPTION = """\
Audit a synthetic image set against the real data it was made from.

commands:
  check            run the policy's checks; exit 0 pass, 1 fail, 2 bad input
  validate-policy  check a release policy file
  report           render an audit.json as HTML or PDF
"""


def build_parser(prog: str) -> clikit.ArgumentParser:
    parser = clikit.new_parser(prog, DESCRIPTION)
    sub = clikit.add_subparsers(parser)
    sub.add_parser("check", add_help=False)
    sub.add_parser("validate-policy", add_help=False)
    sub.add_parser("report", add_help=False)
    return parser


def _run(argv: Sequence[str], prog: str) -> int:
    args, rest = build_parser(prog).parse_known_args(argv)
    return clikit.not_yet_available(f"{prog} {args.command}")


def main(argv: Sequence[str] | None = None, prog: str = "audit", command: str | None = None) -> int:
    return clikit.run(lambda a: _run(a, prog), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
