"""``synthgate train`` and ``synthgate sample``.

The umbrella CLI dispatches here (``main(argv, prog="synthgate train",
command="train")``); ``python -m generators.cli train ...`` works too, and so
does ``accelerate launch -m synthgate.cli train ...`` for several GPUs.
Heavy libraries are imported inside the command functions only.
"""
from __future__ import annotations

import sys
from typing import Sequence

from synthgate import clikit
from synthgate.errors import UsageError

TRAIN_HELP = """\
Train a diffusion model on the image set REAL and save it to MODEL: a folder
that diffusers loads (DiffusionPipeline.from_pretrained) with synthgate.json
recording the training set's digest, counts, seed, steps and, with
--dp-epsilon, the privacy budget actually spent.

Settings come from --preset (tiny: 32x32, minutes on a CPU; base: 128x128, a
GPU; swin-tiny/swin-base and dit-tiny/dit-base the same for the Swin-UNet and
DiT transformer denoisers), then --config FILE (JSON/YAML, or an earlier
model's synthgate.json), then the flags below. --architecture picks the
denoiser ({architectures}); its own settings come from the preset or the
{blocks} block of --config. Under --dp-epsilon training is differentially private
(opacus DP-SGD, Poisson sampling, per-example clipping to --max-grad-norm).
Checkpoints (--checkpoint-every) go to MODEL-checkpoints; --resume continues
from the newest one exactly where it stopped.
"""

SAMPLE_HELP = """\
Sample a synthetic image set from MODEL into SYNTHETIC: PNG (16-bit when the
training data was) or DICOM, each file marked as synthetic with its seed,
plus metadata.csv (labels) and manifest.json (model, training set, sampler,
per-image seed). Images are class-balanced unless --label or --per-label.
"""


def train_help() -> str:
    """``TRAIN_HELP`` naming the registered architectures and their settings blocks."""
    from .denoisers import architectures, settings_blocks

    return TRAIN_HELP.format(architectures=", ".join(architectures()),
                             blocks="/".join(f'"{name}"' for name in settings_blocks()))


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"{text!r} must be comma-separated integers") from exc


def _csv_flags(text: str) -> list[bool]:
    values = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    items = [v.strip().lower() for v in text.split(",") if v.strip()]
    if any(v not in values for v in items):
        raise UsageError(f"--attention {text!r} must be comma-separated 0/1 flags, one per level")
    return [values[v] for v in items]


def add_train_arguments(p) -> None:
    from .config import PRESETS  # stdlib only: --help stays light
    from .denoisers import architectures

    p.add_argument("real", metavar="REAL", help="the training image set (folder)")
    p.add_argument("--out", required=True, metavar="MODEL", help="model folder to write (must not exist)")
    p.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    p.add_argument("--config", metavar="FILE", help="settings file (JSON/YAML or a synthgate.json)")
    s = p.add_argument_group("training settings (override the preset and --config)")
    s.add_argument("--steps", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float, dest="learning_rate")
    s.add_argument("--architecture", choices=architectures(), help="the denoiser (default: the preset's)")
    s.add_argument("--resolution", type=int)
    s.add_argument("--block-out-channels", type=_csv_ints, metavar="W1,W2,...")
    s.add_argument("--attention", type=_csv_flags, metavar="0,0,1", help="self-attention per level")
    s.add_argument("--layers-per-block", type=int)
    s.add_argument("--conditioning", choices=("auto", "none", "class", "attributes"))
    s.add_argument("--condition-on", action="append", metavar="COLUMN[:numeric]", dest="condition_columns",
                   help="condition on this metadata.csv column (repeat for several; implies --conditioning "
                        "attributes; categorical unless :numeric)")
    s.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"))
    s.add_argument("--beta-schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    s.add_argument("--noise-multiplicity", type=int, metavar="K", help="noise draws per image per step (DPDM)")
    s.add_argument("--ema-decay", type=float)
    s.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"))
    s.add_argument("--vae", metavar="PATH", help="local AutoencoderKL folder: latent diffusion")
    s.add_argument("--checkpoint-every", type=int, metavar="N")
    t = p.add_argument_group("text-guided fine-tuning of a local Stable Diffusion folder (MediSyn recipe)")
    t.add_argument("--base-model", metavar="SD_DIR",
                   help="local diffusers Stable Diffusion 1.x/2.x or SDXL folder to fine-tune")
    t.add_argument("--caption-template", metavar="TEXT", help='captions from metadata.csv columns, e.g. '
                   '"Chest X-ray showing {label}" (default "{label}")')
    t.add_argument("--caption-dropout", type=float, metavar="P", help="caption drop rate for guidance (default 0.1)")
    t.add_argument("--finetune", choices=("full", "lora"), help="the whole U-Net (default) or LoRA adapters")
    t.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank (default 4)")
    d = p.add_argument_group("differential privacy")
    d.add_argument("--dp-epsilon", type=float, metavar="E", help="train with DP-SGD to this epsilon")
    d.add_argument("--dp-delta", type=float, metavar="D", help="delta (default 1e-5)")
    d.add_argument("--max-grad-norm", type=float, metavar="C", help="per-example clipping bound (default 1.0)")
    d.add_argument("--accountant", choices=("prv", "rdp"), help="privacy accountant (default prv)")
    d.add_argument("--physical-batch-size", type=int, metavar="B", help="examples per pass (memory only)")
    r = p.add_argument_group("run")
    r.add_argument("--checkpoint-dir", metavar="DIR", help="default: MODEL-checkpoints")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    r.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints after saving the model")
    r.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    r.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: SYNTHGATE_THREADS, else the cores not already busy; 1 is often "
                        "fastest for small models on a few busy cores)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing MODEL folder")
    r.add_argument("--skip-unreadable", action="store_true", help="train on the readable images only (listed)")
    r.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    r.add_argument("--json", action="store_true", help="print the result as JSON; no progress display")
    r.add_argument("--quiet", action="store_true", help="no progress display or log lines")


def add_sample_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="a model folder written by `synthgate train`")
    p.add_argument("--n", type=int, help="number of images (class-balanced unless --label)")
    p.add_argument("--out", required=True, metavar="SYNTHETIC", help="folder to write (must not exist)")
    p.add_argument("--label", help="generate only this label")
    p.add_argument("--per-label", metavar="L=N,...", help="images per label, e.g. 0=50,1=50")
    p.add_argument("--condition", action="append", metavar="NAME=VALUE", default=[],
                   help="fix an attribute of an attribute-conditioned model (repeatable); the others are "
                        "drawn per image from the training distribution")
    p.add_argument("--prompt", help="text-conditioned models: this prompt for every image (default: the caption "
                   "of each image's label)")
    p.add_argument("--guidance-scale", type=float, help="text-conditioned models: classifier-free guidance "
                   "scale (default 7.5; 1: no guidance)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm", "dpm"))
    p.add_argument("--steps", type=int, help="denoising steps (default: ddim 50, dpm 25, ddpm all)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--format", default="png", choices=("png", "dicom"))
    p.add_argument("--bit-depth", default="auto", choices=("auto", "8", "16"),
                   help="auto: 16 when the training data had more than 8 bits")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (see train --help)")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="spread the batches over a Ray cluster (ray://HOST:PORT, HOST:PORT, auto or local; default: "
                        "SYNTHGATE_RAY_ADDRESS, else this process); images identical to a single-process run")
    p.add_argument("--gpus-per-batch", type=float, default=0, metavar="G",
                   help="GPUs each cluster batch asks for (e.g. 1, or 0.25 to share a GPU)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.add_argument("--quiet", action="store_true")


def resolve_config(args):
    """Preset, then ``--config``, then flags -> a checked :class:`~generators.config.TrainConfig`."""
    from .config import PRESETS, TrainConfig, load_config_file
    from .denoisers import settings_blocks

    data = dict(PRESETS[args.preset])
    if args.config:
        data.update(load_config_file(args.config))
    flags = {k: getattr(args, k) for k in (
        "steps", "seed", "batch_size", "learning_rate", "resolution", "block_out_channels", "attention",
        "layers_per_block", "conditioning", "prediction_type", "beta_schedule", "noise_multiplicity",
        "ema_decay", "mixed_precision", "vae", "checkpoint_every", "condition_columns")
        if getattr(args, k) is not None}
    if flags.get("condition_columns") and "conditioning" not in flags:
        flags["conditioning"] = "attributes"
    if "block_out_channels" in flags and "attention" not in flags:
        flags["attention"] = [False] * len(flags["block_out_channels"])
    data.update(flags)
    if args.architecture is not None:
        data["architecture"] = args.architecture
        for other in settings_blocks():  # another architecture's settings do not apply
            if other != args.architecture:
                data.pop(other, None)
    dp_flags = {k: v for k, v in {"epsilon": args.dp_epsilon, "delta": args.dp_delta,
                                  "max_grad_norm": args.max_grad_norm, "accountant": args.accountant,
                                  "physical_batch_size": args.physical_batch_size}.items() if v is not None}
    if dp_flags:
        dp = {**(data.get("dp") or {}), **dp_flags}
        if "epsilon" not in dp:
            raise UsageError("--dp-delta/--max-grad-norm/--accountant need --dp-epsilon (the privacy budget)")
        data["dp"] = dp
    return TrainConfig.from_dict(data, source=args.config)


def _text_config(args):
    """The ``--base-model`` settings (``None`` without it; the text flags alone are refused)."""
    flags = {k: getattr(args, k) for k in ("caption_template", "caption_dropout", "finetune", "lora_rank")
             if getattr(args, k) is not None}
    if args.base_model is None:
        if flags:
            raise UsageError("--caption-template/--caption-dropout/--finetune/--lora-rank need --base-model SD_DIR")
        return None
    from .text2image import TextConfig, check_base_model, native_resolution

    check_base_model(args.base_model)
    if args.resolution is None:
        args.resolution = native_resolution(args.base_model)
    return TextConfig(base_model=args.base_model, **flags)


def cmd_train(args) -> int:
    from synthgate.progress import set_quiet

    text = _text_config(args)
    config = resolve_config(args)
    if args.print_config:
        print(config.to_json(), end="")
        return clikit.EXIT_OK
    if args.json or args.quiet:
        set_quiet(True)
    from synthgate.device import set_threads
    from synthgate.outputs import check_target, refuse_overlap

    set_threads(args.threads)
    # before any training: the model folder never lands on, in or around an input
    inputs = {"real": args.real, "vae": getattr(args, "vae", None),
              "base model": getattr(args, "base_model", None), "config": getattr(args, "config", None)}
    refuse_overlap(args.out, inputs)
    if getattr(args, "checkpoint_dir", None):  # written to and emptied: never an input, never the model itself
        refuse_overlap(args.checkpoint_dir, {**inputs, "model": args.out}, flag="--checkpoint-dir")
    if not args.resume:
        check_target(args.out, "synthgate train", args.overwrite)
    if text is not None:
        from functools import partial

        from .text2image import train as train_text

        train = partial(train_text, text=text)
    else:
        from .run import train
    log = None if (args.json or args.quiet) else (lambda line: print(line, file=sys.stderr, flush=True))
    result = train(args.real, args.out, config, device=args.device or "auto", checkpoint_dir=args.checkpoint_dir,
                   resume=args.resume, keep_checkpoints=args.keep_checkpoints, overwrite=args.overwrite, log=log,
                   skip_unreadable=args.skip_unreadable)
    summary = {"model": str(result.model), "steps": result.steps, "steps_run": result.steps_run,
               "resumed_from": result.resumed_from, "final_loss": result.final_loss,
               "seconds": round(result.seconds, 2), "dp": result.info["dp"] and {
                   k: result.info["dp"][k] for k in ("epsilon_spent", "epsilon_target", "delta", "noise_multiplier")}}
    if args.json:
        clikit.emit_json(summary)
    else:
        dp = summary["dp"]
        eps = f"; epsilon spent {dp['epsilon_spent']:.3f} of {dp['epsilon_target']} (delta {dp['delta']})" if dp else ""
        print(f"trained {result.model}: {result.steps} steps ({result.steps_run} this run), "
              f"final loss {result.final_loss:.4f}{eps}")
    return clikit.EXIT_OK


def _per_label(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    out: dict[str, int] = {}
    for part in text.split(","):
        label, eq, count = part.partition("=")
        if not eq or not label.strip() or not count.strip().isdigit():
            raise UsageError(f"--per-label {text!r} must look like LABEL=COUNT,LABEL=COUNT")
        out[label.strip()] = int(count)
    return out


def _conditions(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in values:
        name, eq, value = text.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise UsageError(f"--condition {text!r} must look like NAME=VALUE")
        if name.strip() in out:
            raise UsageError(f"--condition names {name.strip()!r} twice")
        out[name.strip()] = value.strip()
    return out


def cmd_sample(args) -> int:
    from synthgate.device import resolve_device
    from synthgate.progress import set_quiet

    from .loading import load_model
    from .sample import SamplerSettings, generate, plan
    from .write import write_synthetic

    if args.json or args.quiet:
        set_quiet(True)
    from synthgate.outputs import check_target, refuse_overlap

    from synthgate.cluster import address, connect
    from synthgate.device import set_threads

    refuse_overlap(args.out, {"model": args.model})  # before any sampling
    check_target(args.out, "synthgate sample", args.overwrite)
    set_threads(args.threads)
    cluster = address(args.cluster)
    ray = connect(cluster) if cluster else None  # a missing Ray or an unreachable cluster: exit 2 before work
    settings = SamplerSettings(args.sampler, args.steps, args.eta, args.batch_size)
    model = load_model(args.model, resolve_device(args.device))
    items = plan(model, args.n, seed=args.seed, label=args.label, per_label=_per_label(args.per_label),
                 conditions=_conditions(args.condition))
    sampler = settings.describe(model)
    if getattr(model, "is_text", False):
        from .text2image import prompt_items

        items = prompt_items(model, items, args.prompt, bool(args.label or args.per_label))
        sampler["guidance_scale"] = model.set_guidance(7.5 if args.guidance_scale is None else args.guidance_scale)
    elif args.prompt is not None or args.guidance_scale is not None:
        raise UsageError(f"--prompt/--guidance-scale need a text-conditioned model (trained with --base-model); "
                         f"{args.model} is not one")
    if ray is not None:
        from .sample import generate_on_cluster

        batches = generate_on_cluster(ray, model, items, settings, device=args.device or "auto",
                                      threads=args.threads, gpus_per_task=args.gpus_per_batch)
    else:
        batches = generate(model, items, settings)
    manifest = write_synthetic(args.out, model, batches, sampler=sampler,
                               fmt=args.format, bit_depth=None if args.bit_depth == "auto" else int(args.bit_depth),
                               seed=args.seed, overwrite=args.overwrite)
    if args.json:
        clikit.emit_json({k: manifest[k] for k in ("model", "training_set", "sampler", "counts")} |
                         {"out": str(args.out), "images": len(manifest["images"])})
    else:
        counts = ", ".join(f"{k}: {v}" for k, v in manifest["counts"].items())
        print(f"wrote {len(manifest['images'])} synthetic {args.format.upper()} images to {args.out} ({counts})")
    return clikit.EXIT_OK


# name -> (its help text, made when the parser is, so that it lists every registered denoiser; arguments; command)
COMMANDS = {"train": (train_help, add_train_arguments, cmd_train),
            "sample": (lambda: SAMPLE_HELP, add_sample_arguments, cmd_sample)}


def _run(argv: Sequence[str], prog: str, command: str | None) -> int:
    argv = list(argv)
    if command is None:
        if not argv or argv[0] not in COMMANDS:
            if argv and argv[0] in ("-h", "--help", "--version"):
                parser = clikit.new_parser(prog, "train or sample diffusion models (commands: train, sample)")
                parser.parse_args(argv)
            raise UsageError(f"{prog}: give a command: {', '.join(COMMANDS)}")
        command, argv, prog = argv[0], argv[1:], f"{prog} {argv[0]}"
    text, add_arguments, func = COMMANDS[command]
    parser = clikit.new_parser(prog, text())
    add_arguments(parser)
    return func(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None, prog: str = "synthgate", command: str | None = None) -> int:
    """Entry point: ``main(["train", ...])`` or, from the umbrella, ``main([...], command="train")``."""
    return clikit.run(lambda a: _run(a, prog, command), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog="python -m generators.cli"))
