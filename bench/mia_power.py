"""Benchmark: how strong are the membership attacks on a small pixel DDPM that memorises real patches?

The setting of the audit-power issue: the ``tiny`` preset (32 x 32 pixel
UNet) trained 3,000 steps (batch 32: 750 epochs) on 128 real image patches
(fundus and microscopy crops that ship inside scikit-image, see
``bench/mia_data.py``), with 128 unseen patches of the same pictures as the
holdout.  Every registered model attack runs through the audit's own
``membership_inference`` check (the default policy's settings: all 128
members against all 128 non-members, the deciding attack chosen on one half
and measured on the other), and from its per-image scores
(``membership_inference.csv``) this script reports for every attack:

* AUC on the whole sample, on the selection half and on the evaluation
  (held-out) half -- the issue's goal is AUC >= 0.85 held-out;
* TPR at 1 % FPR on the whole sample (128 non-members resolve 1 %: one
  false positive allowed) and TPR at zero false positives -- the goal is a
  resolvable TPR at 1 % FPR >= 10 %;
* its cost: forward passes and wall seconds per image;

and the check's own status, reason and controls.  A negative run follows:
the same model and holdout with 128 *unseen* patches in the members' place
(``DATA/unseen``): every attack must then sit at chance and the check must
not fail.

    .venv/bin/python bench/mia_data.py --out /tmp/mia                      # 128 members, 128 holdout
    OMP_NUM_THREADS=1 .venv/bin/synthgate train /tmp/mia/members --out /tmp/mia/model --preset tiny \\
        --steps 3000 --batch-size 32 --conditioning none --threads 1 --seed 0
    OMP_NUM_THREADS=1 .venv/bin/python bench/mia_power.py --data /tmp/mia --model /tmp/mia/model
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit.core.stats import roc_auc, tpr_at_fpr  # noqa: E402

BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, capture_output=True)


def sample(model: Path, out: Path, n: int, threads: int) -> None:
    if out.exists():
        return
    r = run([str(BIN / "synthgate"), "sample", str(model), "--out", str(out), "--n", str(n), "--sampler", "ddim",
             "--steps", "50", "--seed", "0", "--threads", str(threads), "--quiet"])
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])


def audit(data: Path, model: Path, synthetic: Path, out: Path, threads: int, params: list[str],
          real: str = "members") -> tuple[dict, float]:
    cmd = [str(BIN / "audit"), "check", str(synthetic), "--real", str(data / real), "--holdout",
           str(data / "holdout"), "--model", str(model), "--checks", "membership_inference", "--out", str(out),
           "--threads", str(threads), "--json"]
    for p in params:
        cmd += ["--param", p]
    start = time.perf_counter()
    r = run(cmd)
    seconds = time.perf_counter() - start
    if r.returncode not in (0, 1):
        raise SystemExit(r.stderr[-3000:])
    doc = json.loads(r.stdout)
    return next(c for c in doc["checks"] if c["name"] == "membership_inference"), seconds


def per_attack(csv_path: Path, check: dict) -> list[dict]:
    rows = list(csv.DictReader(open(csv_path)))
    y = np.array([r["role"] == "member" for r in rows])
    sel = np.array([r["half"] == "selection" for r in rows])
    fixed = {"role", "image", "patient", "fold", "half"}
    names = [k for k in rows[0] if k not in fixed]
    s2 = check["metrics"].get("scenario_2", {})
    passes = s2.get("forward_passes_per_image", {})
    secs = s2.get("seconds", {}).get("per_image", {})
    chosen = check["metrics"]["decision"]["chosen_attack"]
    out = []
    for n in names:
        s = np.array([float(r[n]) for r in rows])
        family = next((f for f in passes if n == f or n.startswith(f + "_")), None)
        out.append({
            "attack": n, "scenario": check["metrics"]["attacks"][n]["scenario"], "chosen": n == chosen,
            "auc": roc_auc(s, y), "auc_selection": roc_auc(s[sel], y[sel]), "auc_heldout": roc_auc(s[~sel], y[~sel]),
            "tpr_at_1pct_fpr": tpr_at_fpr(s, y, 0.01), "tpr_at_0_fp": tpr_at_fpr(s, y, 0.0),
            "passes_per_image": passes.get(family), "seconds_per_image": secs.get(family),
        })
    return out


def markdown(res: dict) -> str:
    c = res["check"]
    lines = [
        "# Membership attacks on a small pixel DDPM that memorises real patches", "",
        f"Command: `{res['command']}`  ",
        f"Model: {res['model']}; members {res['n_members']}, non-members {res['n_nonmembers']}; "
        f"load average {res['load_start']} at the start, {res['load_end']} at the end; audit wall {res['seconds']:.0f} s.",
        "", f"Check status: **{c['status']}** -- {c['reason']}", "",
        "| attack | scenario | AUC (whole) | AUC (selection half) | AUC (held-out half) | TPR @ 1 % FPR (whole) "
        "| TPR @ 0 FP (whole) | passes / image | s / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in res["attacks"]:
        name = f"**{a['attack']}** (decides)" if a["chosen"] else a["attack"]
        lines.append(f"| {name} | {a['scenario']} | {a['auc']:.3f} | {a['auc_selection']:.3f} | "
                     f"{a['auc_heldout']:.3f} | {a['tpr_at_1pct_fpr']:.3f} | {a['tpr_at_0_fp']:.3f} | "
                     f"{a['passes_per_image'] if a['passes_per_image'] is not None else '-'} | "
                     f"{a['seconds_per_image'] if a['seconds_per_image'] is not None else '-'} |")
    lines += ["", "Controls:", ""]
    lines += [f"- {k['name']} ({k['kind']}): {'passed' if k['passed'] else 'FAILED'} -- {k['detail']}"
              for k in c["controls"]]
    if "negative" in res:
        n = res["negative"]
        lines += ["", "## Negative run: the same model and holdout, 128 unseen patches in the members' place", "",
                  f"Check status: **{n['check']['status']}** -- {n['check']['reason']}", "",
                  "| attack | AUC (whole) | AUC (held-out half) | TPR @ 1 % FPR (whole) |", "|---|---|---|---|"]
        lines += [f"| {x['attack']}{' (decides)' if x['chosen'] else ''} | {x['auc']:.3f} | {x['auc_heldout']:.3f} | "
                  f"{x['tpr_at_1pct_fpr']:.3f} |" for x in n["attacks"]]
    held = c["metrics"]["decision"]["held_out"]
    lines += ["", "The check's held-out measurement of the deciding attack: "
              + ", ".join(f"{k} {v.get('value')}" for k, v in held.items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with members/ and holdout/ (bench/mia_data.py)")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--synthetic", type=Path, help="synthetic set (default: DATA/synthetic, sampled if missing)")
    ap.add_argument("--n-synthetic", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--param", action="append", default=[], help="membership_inference setting override")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mia_power")
    ap.add_argument("--no-negative", action="store_true", help="skip the negative run (DATA/unseen as members)")
    a = ap.parse_args()
    synthetic = a.synthetic or a.data / "synthetic"
    sample(a.model, synthetic, a.n_synthetic, a.threads)
    load_start = [round(v, 2) for v in os.getloadavg()]
    audit_out = a.data / "audit"
    params = [f"membership_inference.{p}" if not p.startswith("membership_inference.") else p for p in a.param]
    check, seconds = audit(a.data, a.model, synthetic, audit_out, a.threads, params)
    res = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/mia_power.py " + " ".join(sys.argv[1:]),
        "model": a.model.name,
        "n_members": check["metrics"]["n_members"], "n_nonmembers": check["metrics"]["n_nonmembers"],
        "seconds": seconds, "load_start": load_start, "load_end": [round(v, 2) for v in os.getloadavg()],
        "check": {k: check[k] for k in ("status", "reason", "controls", "metrics")},
        "attacks": per_attack(audit_out / "membership_inference.csv", check),
    }
    if (a.data / "unseen").exists() and not a.no_negative:
        # negative run: the same model and holdout, "members" it never saw -- every attack must sit at chance
        neg, neg_s = audit(a.data, a.model, synthetic, a.data / "audit-negative", a.threads, params, real="unseen")
        res["negative"] = {"seconds": neg_s, "check": {k: neg[k] for k in ("status", "reason", "controls")},
                           "attacks": per_attack(a.data / "audit-negative" / "membership_inference.csv", neg)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    a.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
