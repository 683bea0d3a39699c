"""Benchmark: re-identification verification AUC vs hospital size, with and without public attacker data.

A small hospital cannot train a re-identification attacker that proves
anything: with 8 training patients the verifier does not reach the check's
``min_auc`` on unseen patients, so the check is inconclusive and nothing can
be released.  A real attacker also trains on public data (Packhaeuser et al.
2022 trained on ChestX-ray14).  This runs the ``reidentification`` check on
phantom hospitals of 8, 30 and 100 training patients, each with the same 30
unseen (holdout) patients who calibrate and judge the verifier, without and
with ``--attacker-data`` -- phantoms of other patients (another seed) standing
in for the public set -- and reports, per run: verification AUC on the unseen
hospital patients (95% patient-bootstrap CI), epochs run (early stopping) and
why training stopped, training seconds, and the check's status on a synthetic
set of new patients (it should pass when the attacker is strong enough).

    .venv/bin/python bench/reid_attacker.py --threads 1     # about 5 minutes on a loaded 2-core machine
    .venv/bin/python bench/reid_attacker.py --size 64 --time-budget-per-image 0.2   # the cpu preset's defaults

Writes ``bench/results/reid_attacker.md`` (``--out`` moves it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.core.base import create_check  # noqa: E402
from audit.core.context import AuditContext  # noqa: E402
from synthgate.imageset import ImageSet  # noqa: E402
from synthgate.phantoms import write_phantoms  # noqa: E402

UNSEEN = 30  # holdout patients: they calibrate and judge every verifier, never train one


def make_data(root: Path, sizes: list[int], per_patient: int, public: int, size: int, seed: int) -> None:
    # one hospital of max(sizes) training patients; smaller hospitals are its first patients
    biggest = max(sizes)
    write_phantoms(root / "hosp", patients=biggest + UNSEEN, images_per_patient=per_patient, size=size, seed=seed,
                   holdout_fraction=UNSEEN / (biggest + UNSEEN))
    rows = (root / "hosp" / "train" / "metadata.csv").read_text().splitlines()
    header, rows = rows[0], rows[1:]
    col = header.split(",").index("patient_id")
    order = list(dict.fromkeys(r.split(",")[col] for r in rows))
    for n in sizes:
        keep = set(order[:n])
        folder = root / f"train{n}"
        folder.mkdir()
        chosen = [r for r in rows if r.split(",")[col] in keep]
        for r in chosen:
            name = r.split(",")[0]
            os.link(root / "hosp" / "train" / name, folder / name)
        (folder / "metadata.csv").write_text("\n".join([header, *chosen]) + "\n")
    write_phantoms(root / "public", patients=public, images_per_patient=per_patient, size=size, seed=seed + 1,
                   holdout_fraction=0)
    write_phantoms(root / "novel", patients=20, images_per_patient=1, size=size, seed=seed + 2, holdout_fraction=0)


def run(root: Path, n: int, attacker: bool, params: dict, device: str) -> dict:
    ctx = AuditContext(synthetic=ImageSet(root / "novel" / "train"), real=ImageSet(root / f"train{n}"),
                       holdout=ImageSet(root / "hosp" / "holdout"), device=device, seed=0,
                       cache_dir=root / "cache", progress=False,
                       attacker=(ImageSet(root / "public" / "train"),) if attacker else ())
    start = time.perf_counter()
    r = create_check("reidentification", **params).run(ctx).to_dict()
    wall = time.perf_counter() - start
    m = r["metrics"]
    t = m["network"]["training"]
    auc = m["verification"]["auc"]
    return {"patients": n, "attacker": attacker, "auc": auc["value"], "ci": auc["ci"], "epochs": t["epochs_run"],
            "best": t.get("best_epoch"), "stopped": t["stopped"], "train_s": t["train_seconds"], "wall_s": wall,
            "images": t["images"], "identities": t["identities"], "status": r["status"],
            "controls": {c["name"]: c["passed"] for c in r["controls"]},
            "reid": {c["name"]: c["metrics"]["reidentified"]["value"] for c in r["controls"] if c["kind"] == "positive"},
            "guaranteed": r["thresholds"]["guaranteed_false_match_rate"]}


def table(rows: list[dict], args) -> str:
    out = [f"Phantoms {args.size} x {args.size}, {args.images_per_patient} images per patient; {UNSEEN} unseen "
           f"(holdout) patients judge every verifier; attacker data: {args.public} public phantom patients "
           f"(another seed); `cpu` preset at {args.size} px, batch 32, lr 3e-3, patience {args.patience}, step "
           f"budget {args.step_budget_per_image:g} per training image (at least {args.min_step_budget} steps); "
           f"torch threads {args.threads}; synthetic set: 20 new patients. The threshold's guaranteed false-match "
           f"rate is {100 * rows[0]['guaranteed']:.1f}% (30 unseen patients cannot certify 1%); each positive control "
           "must re-identify at least 50% of its images.", "",
           "| training patients | attacker data | verification AUC on unseen patients [95% CI] | trained on "
           "(images / identities) | epochs (best) | stopped | training s | augmented / new images of training "
           "patients re-identified | check |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r["ci"] else ""
        failed = [k for k, ok in r["controls"].items() if not ok]
        rates = [r["reid"].get(k) for k in ("augmented training images", "new images of training patients")]
        reid = " / ".join("-" if v is None else f"{100 * v:.0f}%" for v in rates)
        status = r["status"] + (f" ({', '.join(failed)} failed)" if failed else "")
        out.append(f"| {r['patients']} | {'yes' if r['attacker'] else 'no'} | {r['auc']:.3f} {ci} | "
                   f"{r['images']} / {r['identities']} | {r['epochs']} ({r['best']}) | {r['stopped']} | "
                   f"{r['train_s']:.0f} | {reid} | {status} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="8,30,100", help="training patients per run (comma-separated)")
    p.add_argument("--images-per-patient", type=int, default=4)
    p.add_argument("--public", type=int, default=100, help="patients in the public attacker set")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--step-budget-per-image", type=float, default=0.5,
                   help="optimizer steps per training image (the check's default)")
    p.add_argument("--min-step-budget", type=int, default=200, help="at least this many steps (the default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reid_attacker.md")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("SYNTHGATE_QUIET", "1")
    sizes = [int(s) for s in args.sizes.split(",")]
    params = {"preset": "cpu", "image_size": args.size, "batch_size": 32, "lr": 3e-3, "n_boot": 200,
              "patience": args.patience, "step_budget_per_image": args.step_budget_per_image,
              "min_step_budget": args.min_step_budget}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-reid-attacker-") as tmp:
        root = Path(tmp)
        make_data(root, sizes, args.images_per_patient, args.public, args.size, args.seed)
        for n in sizes:
            for attacker in (False, True):
                rows.append(run(root, n, attacker, params, args.device))
                r = rows[-1]
                print(f"{n} patients, attacker data {'yes' if attacker else 'no'}: AUC {r['auc']:.3f}, "
                      f"{r['epochs']} epochs, {r['train_s']:.0f} s, {r['status']}", file=sys.stderr, flush=True)
    text = table(rows, args)
    cmd = " ".join(["bench/reid_attacker.py", *sys.argv[1:]])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Re-identification: verification AUC vs training patients, with and without attacker "
                        f"data\n\n`.venv/bin/python {cmd}`\n\n{text}")


if __name__ == "__main__":
    main()
