"""Benchmark: the re-identification check on phantoms vs a pixel-space attacker, same data, same run.

Writes a phantom data set (train/holdout, patient-disjoint), makes two
synthetic sets -- new renders of the *training* patients' anatomy (what a
generator that memorised patients would make) and images of *unseen*
patients (another seed, one image each) -- and runs the ``reidentification`` check on both
(the second audit loads the network from the cache).  Reported: training
time (wall and CPU), the network's verification AUC / mAP@R / P@1 on the
holdout patients with 95% CIs, the calibrated threshold and its guaranteed
false-match rate, the controls, and the fraction of each synthetic set
flagged.  The baseline is the same attack with raw pixels as the embedding
(per-image centred and normalised: cosine = Pearson correlation), scored by
the same code, so the ratio says what the trained network adds.

    .venv/bin/python bench/reidentification.py                  # 100 patients x 20 images, 64 x 64 (2,000 images)
    .venv/bin/python bench/reidentification.py --patients 400 --images-per-patient 5
    .venv/bin/python bench/reidentification.py --threads 1      # a loaded 2-core machine
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.core.base import create_check  # noqa: E402
from audit.core.context import AuditContext  # noqa: E402
from audit.reidentification.check import (best_match, conformal_threshold, one_per_identity, pair_auc,  # noqa: E402
                                    retrieval_metrics)
from synthgate.imageset import ImageSet  # noqa: E402
from synthgate.phantoms import _write_png, generate, render, write_phantoms  # noqa: E402


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png(path, pixels, 8)


def make_data(root: Path, patients: int, per_patient: int, size: int, seed: int, synthetic_per_patient: int) -> dict:
    summary = write_phantoms(root / "p", patients=patients, images_per_patient=per_patient, size=size, seed=seed)
    images, anatomies = generate(patients=patients, images_per_patient=per_patient, size=size, seed=seed)
    train = sorted({i.patient_id for i in images if i.split == "train"})
    rows = ["path,patient_id"]
    for k, pid in enumerate(train):
        for r in range(synthetic_per_patient):
            name = f"v{k:04d}_{r}.png"
            pixels = render(anatomies[pid], size, np.random.default_rng([seed, 7, k, r]), r % 2 == 1)
            _save(root / "variations" / name, pixels)
            rows.append(f"{name},{pid}")
    (root / "variations" / "metadata.csv").write_text("\n".join(rows) + "\n")
    # one image per unseen patient: a generator that makes new people makes each image a new person
    unseen, _ = generate(patients=len(train) * synthetic_per_patient, images_per_patient=1, size=size,
                         seed=seed + 1000, holdout_fraction=0)
    for i, im in enumerate(unseen):
        _save(root / "unseen" / f"u{i:05d}.png", im.pixels)
    return summary


def run_check(root: Path, synthetic: str, params: dict, device: str) -> tuple[dict, float, float]:
    ctx = AuditContext(synthetic=ImageSet(root / synthetic), real=ImageSet(root / "p" / "train"),
                       holdout=ImageSet(root / "p" / "holdout"), device=device, seed=0, workdir=root / f"w_{synthetic}",
                       cache_dir=root / "cache", progress=False)
    wall, cpu = time.perf_counter(), time.process_time()
    result = create_check("reidentification", **params).run(ctx).to_dict()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def pixel_attack(root: Path, rate: float, n_boot: int) -> dict:
    """The same calibration, verification and flagging with centred, normalised pixels as the embedding."""
    def embed(folder):
        s = ImageSet(folder)
        x = np.stack([s.load(i).ravel() for i in range(len(s))]).astype(np.float32)
        x -= x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True), s

    gallery, real = embed(root / "p" / "train")
    hold, hs = embed(root / "p" / "holdout")
    codes = {p: i for i, p in enumerate(sorted(set(real.patient_ids) | set(hs.patient_ids)))}
    h_ids = np.array([codes[p] for p in hs.patient_ids])
    rng = np.random.default_rng(0)
    impostor, _ = best_match(hold, gallery)
    tau, k, note = conformal_threshold(impostor[one_per_identity(h_ids, rng)], rate)
    i, j = np.triu_indices(len(h_ids), 1)
    auc, ci = pair_auc(np.einsum("nd,nd->n", hold[i], hold[j]), h_ids[i] == h_ids[j], h_ids[i], h_ids[j], n_boot, rng)
    retrieval = retrieval_metrics(hold, h_ids, n_boot=n_boot, rng=rng)
    out = {"verification_auc": {"value": auc, "ci": ci}, **{name: v.to_dict() for name, v in retrieval.items()},
           "tau": tau, "tau_note": note}
    for name in ("variations", "unseen"):
        s, _ = embed(root / name)
        score, _ = best_match(s, gallery)
        out[f"flagged_{name}"] = float((score > tau).mean())
    return out


def summarise(result: dict) -> dict:
    m, t = result["metrics"], result["thresholds"]
    return {
        "status": result["status"], "reason": result["reason"],
        "verification": {k: m["verification"][k] for k in ("auc", "map_at_r", "precision_at_1", "identities",
                                                           "genuine_pairs", "impostor_pairs")},
        "tau": t["tau"], "guaranteed_false_match_rate": t["guaranteed_false_match_rate"], "tau_note": t["tau_note"],
        "reidentified_fraction": m["reidentified_fraction"], "excess_p_value": m["excess_p_value"],
        "synthetic_retrieval": m["synthetic_retrieval"],
        "controls": {c["name"]: {"passed": c["passed"], "detail": c["detail"]} for c in result["controls"]},
        "network": {k: m["network"][k] for k in ("preset", "backbone", "image_size", "epochs", "cached")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--images-per-patient", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--synthetic-per-patient", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", default=None, help="keep the data and cache here (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("SYNTHGATE_QUIET", "1")
    params = {"preset": args.preset, "epochs": args.epochs, "n_boot": args.n_boot}
    with tempfile.TemporaryDirectory(prefix="synthgate-bench-reid-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        data = make_data(root, args.patients, args.images_per_patient, args.size, args.seed, args.synthetic_per_patient)
        load_before = os.getloadavg()
        variations, wall_v, cpu_v = run_check(root, "variations", params, args.device)
        unseen, wall_u, cpu_u = run_check(root, "unseen", params, args.device)
        training = variations["metrics"]["network"]["training"]
        report = {
            "data": data, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "timing": {"train_wall_s": training["train_seconds"], "train_steps": training["steps"],
                       "train_images": training["images"], "first_audit_wall_s": round(wall_v, 1),
                       "first_audit_cpu_s": round(cpu_v, 1), "cached_audit_wall_s": round(wall_u, 1),
                       "cached_audit_cpu_s": round(cpu_u, 1)},
            "variations_of_training_patients": summarise(variations),
            "unseen_patients": summarise(unseen),
        }
        t0 = time.perf_counter()
        report["pixel_baseline"] = pixel_attack(root, float(variations["thresholds"]["false_match_rate"]), args.n_boot)
        report["pixel_baseline"]["wall_s"] = round(time.perf_counter() - t0, 1)
        ours, base = report["variations_of_training_patients"], report["pixel_baseline"]
        report["ratios"] = {
            "verification_auc_network_over_pixels": (ours["verification"]["auc"]["value"]
                                                     / base["verification_auc"]["value"]),
            "flagged_variations_network_over_pixels": (ours["reidentified_fraction"]["value"]
                                                       / max(base["flagged_variations"], 1e-9)),
        }
    print(json.dumps(report, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
