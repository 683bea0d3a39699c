"""``audit``: the data steward's command."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Sequence

from synthgate import clikit
from synthgate.errors import UsageError

from audit.core.base import available_checks

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
    p.add_argument("--policy", default="default",
                   help="built-in policy (default, strict, research) or a policy YAML file (default: default)")
    p.add_argument("--checks", help="comma-separated checks to run instead of all the policy's (each then "
                                    f"required); available: {', '.join(available_checks())}")
    p.add_argument("--param", action="append", default=[], metavar="CHECK.KEY=VALUE",
                   help="override a check setting, e.g. copy_detection.rule=holdout (repeatable)")
    p.add_argument("--out", help="output folder (default: SYNTHETIC-audit next to the synthetic set)")
    p.add_argument("--json", action="store_true", help="print audit.json to stdout; no progress display")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-unreadable", action="store_true",
                   help="continue past unreadable files; every skipped file is listed in audit.json")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (image bombs)")
    v = sub.add_parser("validate-policy", description="Check a release policy file; exit 0 if valid, 2 if not.")
    v.add_argument("policy", metavar="FILE", help="policy YAML file, or a built-in name")
    sub.add_parser("report", add_help=False)  # reports.cli parses its own arguments
    return parser


def parse_params(items: Sequence[str], checks: Sequence[str]) -> dict[str, dict]:
    """``CHECK.KEY=VALUE`` overrides; values are read as YAML scalars (numbers, booleans, null)."""
    import yaml

    out: dict[str, dict] = {c: {} for c in checks}
    for item in items:
        key, eq, value = item.partition("=")
        check, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise UsageError(f"--param {item!r} must look like CHECK.KEY=VALUE")
        if check not in out:
            raise UsageError(f"--param {item!r} names check {check!r}, which is not being run ({', '.join(checks)})")
        try:
            out[check][name] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UsageError(f"--param {item!r}: cannot read the value ({exc})") from exc
    return out


def cmd_check(args) -> int:
    from synthgate.imageset import ImageSet
    from synthgate.progress import set_quiet

    from audit.core.context import AuditContext
    from policies.schema import CheckPolicy, load_policy

    from audit.core.runner import build_audit, check_overlap, resolve_inputs, run_policy, write_outputs

    if args.json:
        set_quiet(True)
    policy = load_policy(args.policy)
    only = [c.strip() for c in args.checks.split(",") if c.strip()] if args.checks else None
    checks = only or list(policy.policy.checks)
    for c in checks:
        if c not in available_checks():
            import difflib

            near = difflib.get_close_matches(c, available_checks(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UsageError(f"--checks: unknown check {c!r}{hint}; available: {', '.join(available_checks())}")
    overrides = parse_params(args.param, checks)
    for name in checks:
        rule = policy.policy.checks.get(name) or CheckPolicy()
        # a check named on the command line is one the user wants: missing inputs are an error
        policy.policy.checks[name] = rule.model_copy(update={
            "settings": {**rule.settings, **overrides[name]}, "required": rule.required or bool(only)})
    inputs = resolve_inputs(args.synthetic, args.real, args.holdout, args.model)

    def load(path):
        if path is None:
            return None
        s = ImageSet(path, skip_unreadable=args.skip_unreadable, max_pixels=args.max_pixels)
        s.verify()  # every unreadable image is found now, before hours of work
        return s

    synthetic, real, holdout = load(inputs.synthetic), load(inputs.real), load(inputs.holdout)
    out = Path(args.out) if args.out else inputs.synthetic.resolve().parent / f"{inputs.synthetic.resolve().name}-audit"
    with tempfile.TemporaryDirectory(prefix="synthgate-audit-") as work:
        ctx = AuditContext(synthetic=synthetic, real=real, holdout=holdout, model=inputs.model,
                           device=args.device or "auto", seed=args.seed, workdir=Path(work) / "files")
        check_overlap(ctx)
        results, decision, _ = run_policy(ctx, policy, only=only)
        audit = build_audit(ctx, results, decision, inputs, policy=policy, command=args.argv)
        audit["policy"]["overrides"] = {k: v for k, v in overrides.items() if v}
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        report_failed = _try_report(audit, ctx.workdir / "report.html", synthetic, args.argv)
        write_outputs(out, audit, ctx.workdir)
    if args.json:
        clikit.emit_json(audit)
    else:
        print(format_summary(audit, out))
    if report_failed:
        return clikit.EXIT_INTERNAL
    return clikit.EXIT_OK if audit["verdict"] == "pass" else clikit.EXIT_FAIL


def _try_report(audit: dict, path: Path, synthetic, argv) -> bool:
    """Render the report; a rendering bug must not lose the audit itself (it is kept, exit 3)."""
    from reports.cli import write_report

    try:
        write_report(audit, path, synthetic=synthetic)
        return False
    except Exception:
        log = clikit.write_crash_log("audit report", argv)
        print(f"audit: internal error: the report could not be rendered; audit.json is written "
              f"(traceback in {log})", file=sys.stderr)
        return True


def cmd_validate_policy(args) -> int:
    from policies.schema import load_policy

    loaded = load_policy(args.policy)
    p = loaded.policy
    print(f"{loaded.source}: valid policy {p.name!r} (sha256 {loaded.sha256[:12]})")
    for name, cp in p.checks.items():
        req = "required" if cp.required else "optional"
        print(f"  {name:<22} {req:<9} on finding: {cp.action:<6} on inconclusive: {cp.on_inconclusive}"
              + (f"  settings: {cp.settings}" if cp.settings else ""))
    print(f"  max_drop_fraction {p.max_drop_fraction:g}")
    return clikit.EXIT_OK


def format_summary(audit: dict, out: Path) -> str:
    lines = [f"verdict: {audit['verdict'].upper()}"]
    for c in audit["checks"]:
        lines.append(f"  {c['name']:<22} {c['status']:<12} {c['reason']}")
    for r in audit["verdict_reasons"]:
        lines.append(f"  - {r}")
    if audit["dropped"]:
        by: dict[str, int] = {}
        for e in audit["dropped_evidence"].values():
            by[e["check"]] = by.get(e["check"], 0) + 1
        lines.append(f"dropped {len(audit['dropped'])} image(s) ({', '.join(f'{k}: {v}' for k, v in by.items())}); "
                     "the checks above describe what remained")
    lines.append(f"released {len(audit['released'])} of {audit['inputs']['synthetic']['n_images']} images; "
                 f"report: {out / 'report.html'}")
    return "\n".join(lines)


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
