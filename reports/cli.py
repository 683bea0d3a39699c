"""``synthgate report AUDIT_JSON`` (also ``audit report``): render an audit as HTML, and PDF."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from synthgate import clikit

DESCRIPTION = """\
Render an audit.json as one self-contained HTML report (and a PDF with --pdf).

The default edition is shareable: no real patient images, no flagged synthetic
images, no identifiers. --internal adds flagged images beside their nearest
training image and marks every page as internal.
"""


def build_parser(prog: str) -> clikit.ArgumentParser:
    p = clikit.new_parser(prog, DESCRIPTION)
    p.add_argument("audit", metavar="AUDIT_JSON", help="an audit.json written by `audit check`")
    p.add_argument("--out", help="output HTML file (default: report.html, or report-internal.html, beside it)")
    p.add_argument("--internal", action="store_true", help="include patient images (never share this edition)")
    p.add_argument("--pdf", action="store_true", help="also write a PDF next to the HTML")
    p.add_argument("--pdf-engine", choices=("auto", "chromium", "weasyprint"), default="auto")
    return p


def write_report(audit, out: Path, internal: bool = False, synthetic=None, real=None, sets=None) -> Path:
    """Render ``audit`` to ``out``; ``sets`` (``{"real": ImageSet, ...}``) name what the shareable edition hides."""
    from synthgate.fsutil import atomic_write_text

    from .render import render_html

    return atomic_write_text(out, render_html(audit, internal=internal, synthetic=synthetic, real=real, sets=sets))


def _run(argv: Sequence[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    path = Path(args.audit)
    from audit.record import read_audit

    audit = read_audit(path)
    default = "report-internal.html" if args.internal else "report.html"
    out = Path(args.out) if args.out else path.parent / default
    from synthgate.outputs import refuse_overlap

    ins = audit.inputs
    refuse_overlap(out, {"audit": path, "synthetic": ins.synthetic.path, "real": ins.real and ins.real.path,
                         "holdout": ins.holdout and ins.holdout.path, "model": ins.model and ins.model.path})
    write_report(audit, out, internal=args.internal)
    print(f"wrote {out}" + (" (INTERNAL: contains patient data)" if args.internal else ""))
    if args.pdf:
        from .pdf import html_to_pdf

        pdf = out.with_suffix(".pdf")
        engine = html_to_pdf(out, pdf, args.pdf_engine)
        print(f"wrote {pdf} ({engine})")
    return clikit.EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "synthgate report", command: str | None = None) -> int:
    return clikit.run(lambda a: _run(a, prog), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
