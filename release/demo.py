"""``synthgate demo``: two generators of one phantom hospital through the release gate, on a CPU, in minutes.

One phantom hospital (invented patients; a patient-disjoint holdout of
unseen patients) and one public phantom set of other patients (another seed:
the data a re-identification attacker would bring).  Two generators are
trained on it and each goes through the same release gate (the ``default``
policy unless ``--policy`` says otherwise; the public phantoms are the
re-identification attacker's ``--attacker-data``):

memorising
    a tiny DDPM trained long on a few patients' images: it memorises them,
    and the gate must find it (copies dropped, membership inference) and
    block the release, with the evidence;
careful
    the same network on every training patient's images, trained for fewer
    steps: it should pass, and its release bundle is written and verified
    (``release verify``).

Every number printed is measured in this run; nothing is staged.  If the
careful generator does not pass (or the memorising one does), the demo says
so and exits 1.  A tiny CPU model is not a clinical generator: the demo shows
the gate at work, not image quality.
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthgate import clikit
from synthgate.errors import UsageError

DESCRIPTION = """\
Run two generators of one phantom hospital through the release gate: a tiny
diffusion model trained long on a few patients' images (it memorises them: the
gate must drop its copies or block it) and one trained on every training
patient for fewer steps (it should pass; its signed bundle is written and
verified). Prints both verdicts side by side. Minutes on 2 CPU cores; nothing
is downloaded. Exit 0 when the gate told them apart, 1 when it did not.
"""

#: the ``tiny`` preset's UNet at a quarter of its widths (16, 32, 32 channels; 0.26 M parameters rather than 1.05 M): a
#: training step costs a third of the preset's on one CPU core, and it still memorises a few patients' images
NETWORK = {"block_out_channels": (16, 32, 32)}

CHECK_ORDER = ("copy_detection", "reidentification", "membership_inference", "dicom_phi", "utility", "fidelity")


@dataclass(frozen=True)
class Arm:
    """One generator of the demo: its name, its training set and how long it trains."""

    key: str
    title: str
    train: Path
    images: int
    patients: int
    steps: int


@dataclass(frozen=True)
class Outcome:
    """What one arm did, every number measured: training, the signed audit, the bundle and its verification."""

    arm: Arm
    final_loss: float
    audit: dict
    audit_dir: Path
    bundle: Path | None = None
    verification: Any = None
    bundle_problem: str | None = None
    seconds: dict = field(default_factory=dict)
    cpu_seconds: dict = field(default_factory=dict)
    threads: int = 0
    log: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.audit["verdict"] == "pass"

    @property
    def released(self) -> bool:
        """A bundle was written and ``release verify`` found it intact."""
        return self.verification is not None and self.verification.intact


def build_parser(prog: str) -> clikit.ArgumentParser:
    p = clikit.new_parser(prog, DESCRIPTION)
    p.add_argument("--out", default="synthgate-demo", help="folder for everything the demo writes "
                                                          "(must not exist; default: ./synthgate-demo)")
    p.add_argument("--patients", type=int, default=60,
                   help="the hospital's training patients (default 60: with 4 images each, enough for the membership "
                        "check's null control to resolve its AUC limit over all 20 attacks; 40 did not)")
    p.add_argument("--holdout-patients", type=int, default=100,
                   help="unseen patients (default 100: with 4 images each, the 400 the default copy rule needs "
                        "to resolve its 0.5%% false-alarm rate)")
    p.add_argument("--images-per-patient", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="image side (the tiny preset trains at 32)")
    p.add_argument("--few-patients", type=int, default=4,
                   help="patients the memorising generator trains on (default 4)")
    p.add_argument("--few-steps", type=int, default=500, help="its training steps (default 500)")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps of the careful generator, on every training patient (default 300)")
    p.add_argument("--samples", type=int, default=64, help="synthetic images each generator makes (default 64)")
    p.add_argument("--public-patients", type=int, default=60,
                   help="phantom patients of another seed standing in for a public data set that the "
                        "re-identification attacker also trains on (--attacker-data), when the policy runs "
                        "re-identification; 0: none (default: 60)")
    p.add_argument("--policy", default="default", help="release policy (default: default)")
    p.add_argument("--checks", help="run only these checks of the policy (comma-separated): a partial audit, which "
                                    "never releases, so the demo then exits 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads of each generator's process (default: SYNTHGATE_THREADS, else the cores "
                        "not already busy, shared between the processes)")
    p.add_argument("--jobs", type=int, default=None, choices=(1, 2),
                   help="run the two generators one after the other (1) or side by side in two processes (2; the "
                        "default on 2 or more cores: small networks run fastest one thread per core)")
    return p


class Clock:
    """Wall and CPU seconds of one stage (CPU: this process's, all threads)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _say(text: str) -> None:
    print(text, flush=True)


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "load average unknown"


def write_data(out: Path, args) -> tuple[dict, Path, Path | None]:
    """The hospital (one write), the memorising arm's few patients (a subset of train/), the public set.

    Returns the hospital's summary, the few patients' folder and the public
    attacker folder (None with ``--public-patients 0``).
    """
    from synthgate.phantoms import write_phantoms

    total = args.patients + args.holdout_patients
    summary = write_phantoms(out / "hospital", patients=total, images_per_patient=args.images_per_patient,
                             size=args.size, seed=args.seed, holdout_fraction=args.holdout_patients / total)
    few = subset_patients(out / "hospital" / "train", out / "few-patients", args.few_patients)
    public = None
    if args.public_patients:
        public = out / "public"
        write_phantoms(public, patients=args.public_patients, images_per_patient=args.images_per_patient,
                       size=args.size, seed=args.seed + 1, holdout_fraction=0.0)
    return summary, few, public


def subset_patients(source: Path, out: Path, patients: int) -> Path:
    """Copy the first ``patients`` patients of an image set (by ``metadata.csv`` order) with their metadata rows."""
    with open(source / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    order = list(dict.fromkeys(r["patient_id"] for r in rows))
    if not 1 <= patients <= len(order):
        raise UsageError(f"--few-patients {patients} must be between 1 and the {len(order)} training patients")
    keep = set(order[:patients])
    chosen = [r for r in rows if r["patient_id"] in keep]
    out.mkdir(parents=True)
    for r in chosen:
        shutil.copyfile(source / r["path"], out / r["path"])
    with open(out / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(chosen)
    return out


def run_arm(arm: Arm, out: Path, holdout: Path, public: Path | None, args, threads: int, say=None) -> Outcome:
    """Train, sample, audit (with the report) and, only if the audit passed, bundle and verify.

    Runs in a worker process when the arms run side by side: ``say`` then
    collects the lines, which the parent prints when the arm is done.
    """
    from synthgate.device import resolve_device, set_threads
    from synthgate.errors import SynthgateError

    lines: list[str] = []
    say = say or lines.append
    threads = set_threads(threads)
    device = resolve_device(args.device)
    root = out / arm.key
    model_dir, synthetic, audit_dir, bundle_dir = (root / n for n in ("model", "synthetic", "audit", "bundle"))
    seconds, cpu = {}, {}

    clock = Clock()
    final_loss = train_arm(arm, model_dir, args, device)
    seconds["train"], cpu["train"] = clock.lap()
    say(f"      trained {arm.steps} steps on {arm.images} images of {arm.patients} patients: final loss "
        f"{final_loss:.4f} ({seconds['train']:.0f} s)")

    clock = Clock()
    sample_arm(model_dir, synthetic, args, device)
    seconds["sample"], cpu["sample"] = clock.lap()
    say(f"      sampled {args.samples} images (DDIM, 50 steps; {seconds['sample']:.0f} s)")

    clock = Clock()
    document = audit_arm(arm, model_dir, synthetic, audit_dir, holdout, public, args, device)
    seconds["audit"], cpu["audit"] = clock.lap()
    from audit.core.result import format_summary

    say("      " + format_summary(document, audit_dir).replace("\n", "\n      "))
    say(f"      (audit {seconds['audit']:.0f} s)")
    done = {"arm": arm, "final_loss": final_loss, "audit": document, "audit_dir": audit_dir, "threads": threads}
    if document["verdict"] != "pass":
        return Outcome(**done, seconds=seconds, cpu_seconds=cpu, log=tuple(lines))

    from release.bundle import bundle, verify

    clock = Clock()
    try:
        bundle(synthetic, audit_dir / "audit.json", bundle_dir, policy=args.policy, ledger=out / "ledger.jsonl",
               warn=lambda m: say(f"      warning: {m}"))
    except SynthgateError as exc:  # the gate passed but bundling refused: say why, never pretend
        seconds["bundle"], cpu["bundle"] = clock.lap()
        return Outcome(**done, bundle_problem=exc.one_line(), seconds=seconds, cpu_seconds=cpu, log=tuple(lines))
    verification = verify(bundle_dir)
    seconds["bundle"], cpu["bundle"] = clock.lap()
    say(f"      bundled {len(document['released'])} images and verified it ({seconds['bundle']:.0f} s)")
    return Outcome(**done, bundle=bundle_dir, verification=verification, seconds=seconds, cpu_seconds=cpu,
                   log=tuple(lines))


def train_arm(arm: Arm, model_dir: Path, args, device) -> float:
    from generators.config import preset
    from generators.run import train

    config = preset("tiny", resolution=args.size, steps=arm.steps, batch_size=min(32, arm.images), seed=args.seed,
                    conditioning="none", **NETWORK)
    return train(arm.train, model_dir, config, device=str(device), progress=False).final_loss


def sample_arm(model_dir: Path, synthetic: Path, args, device) -> None:
    from generators.loading import load_model
    from generators.sample import SamplerSettings, generate, plan
    from generators.write import write_synthetic

    model = load_model(model_dir, device)
    settings = SamplerSettings("ddim", 50, 0.0, 32)
    items = plan(model, args.samples, seed=args.seed)
    write_synthetic(synthetic, model, generate(model, items, settings, progress=False),
                    sampler=settings.describe(model), fmt="png", bit_depth=None, seed=args.seed)


def audit_arm(arm: Arm, model_dir: Path, synthetic: Path, audit_dir: Path, holdout: Path, public: Path | None,
              args, device) -> dict:
    """``audit check`` with the report; returns the signed audit.json as written."""
    from audit.api import check
    from reports.cli import write_report

    only = [c.strip() for c in args.checks.split(",") if c.strip()] if args.checks else None
    attacker = {"attacker_data": [public]} if public is not None else {}  # public phantoms of other patients
    result = check(synthetic, real=arm.train, holdout=holdout, model=model_dir, policy=args.policy, checks=only,
                   out=audit_dir, seed=args.seed, device=str(device), progress=False,
                   report=lambda document, path, synth, sets: write_report(document, path, synthetic=synth,
                                                                           sets=sets),
                   **attacker)
    return result.written or result.to_dict()


def _cell(check: dict | None) -> str:
    if check is None:
        return "not run"
    flagged = len(check.get("flagged") or [])
    return check["status"] + (f" ({flagged} flagged)" if flagged else "")


def _evidence(o: Outcome, examples: int = 3) -> list[str]:
    """Why the gate decided as it did, from the signed audit: its reasons and a few flagged images."""
    lines = [f"verdict {o.audit['verdict'].upper()}: " + "; ".join(o.audit["verdict_reasons"])
             if o.audit["verdict_reasons"] else f"verdict {o.audit['verdict'].upper()}"]
    dropped = o.audit.get("dropped_evidence") or {}
    if dropped:
        lines.append(f"dropped {len(dropped)} image(s) before the final audit, e.g.")
        lines += [f"  {k}: {e['check']}: {e['reason']}" for k, e in list(dropped.items())[:examples]]
    for c in o.audit["checks"]:
        for control in c.get("controls") or []:
            if control.get("kind") == "positive" and not control.get("passed"):
                lines.append(f"{c['name']}: positive control failed: {control['name']}: {control.get('detail', '')}")
        flagged = c.get("flagged") or []
        if flagged:
            lines.append(f"{c['name']} flagged {len(flagged)} image(s), e.g.")
            lines += [f"  {f['synthetic']}: {f['reason']}" for f in flagged[:examples]]
    return lines


def side_by_side(outcomes: Sequence[Outcome]) -> str:
    """The two verdicts as a table: each check's status, drops, released images, the verdict and the bundle."""
    from synthgate.clikit import printable

    names = [n for n in CHECK_ORDER if any(n in {c["name"] for c in o.audit["checks"]} for o in outcomes)]
    names += sorted({c["name"] for o in outcomes for c in o.audit["checks"]} - set(names))
    width = 30
    head = [f"{o.arm.key} ({o.arm.images} images, {o.arm.steps} steps)" for o in outcomes]
    rows = [("", head), ("", ["-" * min(width - 2, len(h)) for h in head])]
    for n in names:
        rows.append((n, [_cell(next((c for c in o.audit["checks"] if c["name"] == n), None)) for o in outcomes]))
    rows.append(("dropped", [str(len(o.audit["dropped"])) for o in outcomes]))
    rows.append(("released", [f"{len(o.audit['released'])} of {o.audit['inputs']['synthetic']['n_images']}"
                              for o in outcomes]))
    rows.append(("verdict", [o.audit["verdict"].upper() for o in outcomes]))
    rows.append(("bundle", ["verified intact" if o.released else
                            ("NOT intact" if o.verification is not None else
                             ("refused" if o.bundle_problem else "none (not passed)")) for o in outcomes]))
    return "\n".join(f"  {name:<22}" + "".join(f"{printable(v):<{max(width, len(h) + 2)}}"
                                               for v, h in zip(values, head)) for name, values in rows)


def run_demo(args) -> int:
    from synthgate.device import default_threads

    out = Path(args.out)
    if out.exists() or out.is_symlink():
        raise UsageError("already exists; choose a new --out folder for the demo", out)
    if args.public_patients < 0:
        raise UsageError(f"--public-patients {args.public_patients} must be 0 or more")
    for name in ("patients", "holdout_patients", "images_per_patient", "few_steps", "steps", "samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads} must be at least 1")
    jobs = args.jobs or (2 if (os.cpu_count() or 1) >= 2 else 1)
    threads = args.threads
    if threads is None and not os.environ.get("SYNTHGATE_THREADS", "").strip():
        threads = max(1, default_threads() // jobs)  # one process per arm: split the free cores between them
    start = Clock()
    out.mkdir(parents=True)
    _say(f"synthgate demo: {jobs} process(es) x {threads or os.environ.get('SYNTHGATE_THREADS')} torch thread(s); "
         f"{_load()}, {os.cpu_count()} cores")
    from audit.core.policy import load_policy

    if "reidentification" not in load_policy(args.policy).checks:
        args.public_patients = 0  # no attacker to give them to

    clock = Clock()
    _say(f"[1/4] phantom hospital: {args.patients} training + {args.holdout_patients} unseen patients x "
         f"{args.images_per_patient} chest-like images"
         + (f"; public phantoms of {args.public_patients} other patients (another seed) for the "
            "re-identification attacker" if args.public_patients else ""))
    summary, few, public = write_data(out, args)
    hospital = out / "hospital"
    _say(f"      {hospital}/train: {summary['train_images']} images of {summary['train_patients']} patients; "
         f"{hospital}/holdout: {summary['holdout_images']} images of {summary['holdout_patients']} unseen patients "
         f"(both arms' holdout); {few}: the first {args.few_patients} training patients' images "
         f"({time.perf_counter() - clock.wall:.0f} s)")
    few_images = sum(1 for p in few.iterdir() if p.suffix == ".png")
    arms = [Arm("memorising", f"a tiny DDPM trained {args.few_steps} steps on only {args.few_patients} patients' "
                              f"images (small on purpose: it memorises)", few, few_images, args.few_patients,
                args.few_steps),
            Arm("careful", f"the same network trained {args.steps} steps on all {summary['train_patients']} training "
                           "patients' images", hospital / "train", summary["train_images"], summary["train_patients"],
                args.steps)]
    outcomes = run_arms(arms, out, hospital / "holdout", public, args, threads, jobs)
    wall, cpu = start.lap()
    cpu += sum(sum(o.cpu_seconds.values()) for o in outcomes) if jobs > 1 else 0  # the workers' CPU time
    _say(f"[4/4] side by side (total {wall:.0f} s wall, {cpu:.0f} s CPU; {_load()})")
    _say(side_by_side(outcomes))
    return conclude(outcomes, args)


def run_arms(arms: Sequence[Arm], out: Path, holdout: Path, public: Path | None, args, threads: int | None,
             jobs: int) -> list[Outcome]:
    """Both arms, one after the other or in two processes; each arm's lines are printed as one block."""
    heads = [f"[{i}/4] {arm.key}: {arm.title}; audit under the `{args.policy}` policy"
             for i, arm in enumerate(arms, start=2)]
    if jobs == 1:
        outcomes = []
        for head, arm in zip(heads, arms):
            _say(head)
            outcomes.append(run_arm(arm, out, holdout, public, args, threads, say=_say))
        return outcomes
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _say("      the two generators run side by side, one process each; each one's log follows when it is done")
    # spawn: a fresh interpreter per arm (no forked OpenMP or torch state)
    with ProcessPoolExecutor(len(arms), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_arm, arm, out, holdout, public, args, threads) for arm in arms]
        outcomes = []
        for head, future in zip(heads, futures):
            outcome = future.result()
            _say(head)
            for line in outcome.log:
                _say(line)
            outcomes.append(outcome)
    return outcomes


def conclude(outcomes: Sequence[Outcome], args) -> int:
    """What the run showed, where everything is, and exit 0 only if the gate told the two generators apart."""
    from synthgate.clikit import printable

    memorising, careful = outcomes
    for o in outcomes:
        _say(f"\n{o.arm.key}:")
        for line in _evidence(o):
            _say(f"  {printable(line)}")
        _say(f"  report: open {o.audit_dir / 'report.html'} (shareable); the internal edition shows each flagged "
             f"image beside its training twin: synthgate report {o.audit_dir / 'audit.json'} --internal")
    problems = []
    if memorising.passed:
        problems.append("the memorising generator PASSED the gate: this run does not show the gate catching a "
                        "leak")
    if not careful.passed:
        problems.append("the careful generator did NOT pass the gate (see its reasons above): this run shows no "
                        "releasable generator")
    elif not careful.released:
        why = careful.bundle_problem or "; ".join(careful.verification.problems) or "not signed by a trusted key"
        problems.append(f"the careful generator passed but its bundle is not verified: {why}")
    else:
        _say(f"\nbundle: {careful.bundle} ({len(careful.audit['released'])} images, signed manifest, shareable audit "
             f"and report, model card, datasheet); `release verify {careful.bundle}`: intact, "
             f"{len(careful.verification.checked)} checks, signed by {careful.verification.trusted_by}")
        _say(f"  the demo's release ledger: {Path(args.out) / 'ledger.jsonl'} (not this installation's)")
    if problems:
        for p in problems:
            _say(f"\nDEMO FAILED: {p}")
        return clikit.EXIT_FAIL
    _say("\nThe gate told them apart: the generator that memorised its few patients did not pass, with the evidence; "
         "the one trained on more patients for fewer steps passed every required check and was released in a "
         "signed, verified bundle. A tiny CPU model's images are blurry: fidelity and utility here say little about "
         "a real generator trained on a GPU.")
    return clikit.EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "synthgate demo", command: str | None = None) -> int:
    return clikit.run(lambda a: run_demo(build_parser(prog).parse_args(a)), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
