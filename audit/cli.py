"""``audit``: the data steward's command."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from synthgate import clikit
from synthgate.errors import ConfigError, UsageError

from .core.base import available_checks

DESCRIPTION = """\
Audit a synthetic image set against the real data it was made from.

commands:
  check            run the checks; exit 0 pass, 1 fail, 2 bad input
  validate-policy  check a release policy file
  report           render an audit.json as HTML or PDF
"""

CHECK_HELP = """\
Run the audit's checks on SYNTHETIC and write OUT/audit.json (plus each check's
own files, e.g. copy_detection.csv). The real training set and the model are
read from SYNTHETIC/manifest.json when not given.

exit codes: 0 the audit passed, 1 it failed (or is invalid), 2 bad usage or input.
"""


def build_parser(prog: str) -> clikit.ArgumentParser:
    parser = clikit.new_parser(prog, DESCRIPTION)
    sub = clikit.add_subparsers(parser)
    p = sub.add_parser("check", description=CHECK_HELP, formatter_class=parser.formatter_class)
    p.add_argument("synthetic", metavar="SYNTHETIC", help="the synthetic image set")
    p.add_argument("--real", help="the real training set (default: from manifest.json)")
    p.add_argument("--holdout", help="real images never trained on (calibration, false-alarm rates)")
    p.add_argument("--model", help="the model directory (default: from manifest.json)")
    p.add_argument("--attacker-data", action="append", default=[], metavar="SET",
                   help="public image set with patient IDs (same modality) that the re-identification attacker "
                        "trains on too, as a real attacker would (repeatable)")
    p.add_argument("--policy", default="default",
                   help="built-in policy (default, strict, research) or a policy YAML file (default: default)")
    p.add_argument("--checks", help="comma-separated checks to run instead of all the policy's (each then "
                                    f"required); available: {', '.join(available_checks())}")
    p.add_argument("--param", action="append", default=[], metavar="CHECK.KEY=VALUE",
                   help="override a check setting, e.g. copy_detection.rule=holdout (repeatable)")
    p.add_argument("--out", help="output folder (default: SYNTHETIC-audit next to the synthetic set)")
    p.add_argument("--json", action="store_true", help="print audit.json to stdout; no progress display")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: SYNTHGATE_THREADS, else the cores not already busy; 1 is "
                        "often fastest for the audit's small networks on a few busy cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run copy detection's training-set decoding and search on a Ray cluster (ray://HOST:PORT, "
                        "HOST:PORT, auto or local; default: SYNTHGATE_RAY_ADDRESS); results identical to one process")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="continue past unreadable files; every skipped file is listed in audit.json")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (image bombs)")
    v = sub.add_parser("validate-policy", description="Check a release policy file; exit 0 if valid, 2 if not.")
    v.add_argument("policy", metavar="FILE", help="policy YAML file, or a built-in name")
    sub.add_parser("report", add_help=False)  # reports.cli parses its own arguments
    return parser


def parse_params(items: Sequence[str]) -> dict[str, dict]:
    """``CHECK.KEY=VALUE`` overrides; values are read as YAML scalars (numbers, booleans, null).

    Which checks and keys exist, and the values' types and ranges, are
    validated with the policy (:func:`audit.core.policy.parse_policy`).
    """
    from policies.loader import scalar

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        check, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise UsageError(f"--param {item!r} must look like CHECK.KEY=VALUE")
        try:
            out.setdefault(check, {})[name] = scalar(value)
        except Exception as exc:  # noqa: BLE001 - any YAML problem is the user's value
            raise UsageError(f"--param {item!r}: cannot read the value ({' '.join(str(exc).split())})") from None
    return out


def cmd_check(args) -> int:
    from synthgate.progress import set_quiet

    from .api import check, default_out
    from .core.result import format_summary
    from .core.policy import load_policy

    if args.json:
        set_quiet(True)
    only = None
    if args.checks is not None:  # "--checks ''" once ran the whole policy without a word
        only = list(dict.fromkeys(c.strip() for c in args.checks.split(",") if c.strip()))
        if not only:
            raise UsageError(f"--checks names no check; name at least one of {', '.join(available_checks())}, or "
                             "leave --checks out to run the whole policy")
    for c in only or []:
        if c not in available_checks():
            from .core.settings import did_you_mean

            raise UsageError(f"--checks: unknown check {c!r}{did_you_mean(c, available_checks())}; "
                             f"available: {', '.join(available_checks())}")
    try:
        policy = load_policy(args.policy, only=only, overrides=parse_params(args.param))
    except ConfigError as exc:
        if only or args.param:  # the command line, not the file, may be what is wrong
            raise UsageError(exc.one_line()) from None
        raise
    out = Path(args.out) if args.out else default_out(args.synthetic)
    from synthgate.device import set_threads

    set_threads(args.threads)
    failed_report = []

    def report(document, path, synthetic, sets):
        failed_report.append(_try_report(document, path, synthetic, sets, args.argv))

    result = check(args.synthetic, real=args.real, holdout=args.holdout, model=args.model, policy=policy,
                   out=out, seed=args.seed, device=args.device or "auto", skip_unreadable=args.skip_unreadable,
                   max_pixels=args.max_pixels, command=args.argv, report=report,
                   cluster=args.cluster, attacker_data=args.attacker_data)
    document = result.written or result.to_dict()  # the signed audit.json, as written
    if args.json:
        clikit.emit_json(document)
    else:
        print(format_summary(document, out, list(result.left_alone)))
    if any(failed_report):
        return clikit.EXIT_INTERNAL
    return clikit.EXIT_OK if result.passed else clikit.EXIT_FAIL  # partial is not a pass


def _try_report(audit: dict, path: Path, synthetic, sets, argv) -> bool:
    """Render the report; a rendering bug must not lose the audit itself (it is kept, exit 3)."""
    from reports.cli import write_report

    try:
        write_report(audit, path, synthetic=synthetic, sets=sets)
        return False
    except Exception:
        log = clikit.write_crash_log("audit report", argv)
        print(f"audit: internal error: the report could not be rendered; audit.json is written "
              f"(traceback in {log})", file=sys.stderr)
        return True


def cmd_validate_policy(args) -> int:
    from .core.policy import load_policy

    p = load_policy(args.policy)
    print(f"{p.source}: valid policy {p.name!r} (sha256 {p.sha256[:12]})")
    for name, rule in p.checks.items():
        req = "required" if rule.required else "optional"
        print(f"  {name:<22} {req:<9} on finding: {rule.action:<6} on inconclusive: {rule.on_inconclusive}"
              + (f"  settings: {dict(rule.given)}" if rule.given else ""))
    print(f"  max_drop_fraction {p.max_drop_fraction:g}")
    return clikit.EXIT_OK


def _run(argv: Sequence[str], prog: str) -> int:
    parser = build_parser(prog)
    if argv and argv[0] == "report":
        from reports.cli import main as report_main

        return report_main(list(argv[1:]), prog=f"{prog} report")
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "check":
        args.argv = [*prog.split(), *argv]
        return cmd_check(args)
    if args.command == "validate-policy":
        return cmd_validate_policy(args)
    return clikit.not_yet_available(f"{prog} {args.command}")


def main(argv: Sequence[str] | None = None, prog: str = "audit", command: str | None = None) -> int:
    return clikit.run(lambda a: _run(a, prog), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
