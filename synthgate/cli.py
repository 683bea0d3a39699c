"""``synthgate``: the umbrella command (the composition root).

It owns the core commands (``inspect``, ``phantoms``) and dispatches every
other command to the ``cli`` module of the package that implements it, which
is imported only then: ``synthgate --help`` never imports torch.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from . import clikit

# name -> (module with main(argv, prog), one-line description)
DELEGATED = {
    "train": ("generators.cli", "train a diffusion model on an image set"),
    "sample": ("generators.cli", "sample a synthetic image set from a trained model"),
    "audit": ("audit.cli", "audit a synthetic set against the real data (`synthgate audit check ...`)"),
    "report": ("reports.cli", "render an audit.json as an HTML or PDF report"),
    "release": ("release.cli", "bundle a set that passed its audit (`synthgate release bundle ...`)"),
    "demo": ("release.demo", "run the whole story on embedded phantom data"),
}
CORE = {
    "inspect": "summarise an image set: formats, sizes, labels, patients (counted), unreadable files",
    "phantoms": "write a phantom chest X-ray data set (PNG or DICOM) with patients, labels and a split",
}

DESCRIPTION = """\
synthgate: decide with evidence whether synthetic medical images may be released.

commands:
""" + "\n".join(f"  {name:<10} {text}" for name, text in {**CORE, **{k: v[1] for k, v in DELEGATED.items()}}.items()) + """

exit codes: 0 success / audit passed, 1 audit failed, 2 bad usage or input, 3 internal error.
Run `synthgate COMMAND --help` for a command's options."""


def build_parser() -> clikit.ArgumentParser:
    parser = clikit.new_parser("synthgate", DESCRIPTION)
    sub = clikit.add_subparsers(parser)

    p = sub.add_parser("inspect", description=CORE["inspect"])
    p.add_argument("set", metavar="SET", help="image folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="continue past unreadable files (each is listed in the summary)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse files with more pixels (image bombs)")
    p.add_argument("--headers-only", action="store_true",
                   help="read headers only (fast) instead of decoding every image")

    p = sub.add_parser("phantoms", description=CORE["phantoms"])
    p.add_argument("out", metavar="OUT", help="output folder (must not exist)")
    p.add_argument("--patients", type=int, default=20)
    p.add_argument("--images-per-patient", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("png", "dicom"), default="png")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth")
    p.add_argument("--holdout-fraction", type=float, default=0.25,
                   help="share of patients in holdout/ (patient-disjoint from train/)")
    p.add_argument("--json", action="store_true")

    for name in DELEGATED:
        sub.add_parser(name, add_help=False)
    return parser


def cmd_inspect(args) -> int:
    from .imageset import ImageSet
    from .inspect import format_text, summarize

    if args.json:
        from .progress import set_quiet

        set_quiet(True)
    imageset = ImageSet(args.set, skip_unreadable=args.skip_unreadable, max_pixels=args.max_pixels)
    if not args.headers_only:
        imageset.verify()
    summary = summarize(imageset)
    if args.json:
        clikit.emit_json(summary)
    else:
        print(format_text(summary))
    return clikit.EXIT_OK


def cmd_phantoms(args) -> int:
    from .phantoms import write_phantoms

    summary = write_phantoms(args.out, patients=args.patients, images_per_patient=args.images_per_patient,
                             size=args.size, seed=args.seed, fmt=args.format,
                             holdout_fraction=args.holdout_fraction, bit_depth=args.bit_depth)
    if args.json:
        clikit.emit_json(summary)
    else:
        print(f"wrote {summary['images']} {summary['format'].upper()} phantoms of {summary['patients']} patients "
              f"to {summary['out']}: train/ {summary['train_images']} images ({summary['train_patients']} patients), "
              f"holdout/ {summary['holdout_images']} images ({summary['holdout_patients']} patients)")
    return clikit.EXIT_OK


def _dispatch(argv: Sequence[str]) -> int:
    if argv and argv[0] in DELEGATED:
        module_name, _ = DELEGATED[argv[0]]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                return clikit.not_yet_available(f"synthgate {argv[0]}")
            raise
        return module.main(list(argv[1:]), prog=f"synthgate {argv[0]}", command=argv[0])
    args = build_parser().parse_args(argv)
    return {"inspect": cmd_inspect, "phantoms": cmd_phantoms}[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    return clikit.run(_dispatch, argv, "synthgate")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
