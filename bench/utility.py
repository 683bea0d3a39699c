"""Benchmark: the utility check on ~2,000 64 x 64 phantom images, and our trainer against a plain torch loop.

1. The whole ``utility`` check (CPU preset: small CNN, 64 x 64, 15 epochs,
   3 repeats of real / synthetic / real+synthetic, one control, 2,000
   bootstrap resamples) on phantom sets written to disk: 900 real training
   images, 300 holdout images (unseen patients), 804 "synthetic" images
   (independent phantom patients with true labels, i.e. a perfect
   generator).  Reported: wall time, per-phase times, status and AUCs.
2. In the same run, on the same real images: one model trained by
   :func:`audit.classifier.train_classifier` against the same network,
   optimiser, batch size and number of steps in a bare torch loop
   (baseline); the ratio of their times is the trainer's overhead, and both
   holdout AUCs are printed to show they learn alike.

    .venv/bin/python bench/utility.py                 # default sizes, torch's default thread count
    .venv/bin/python bench/utility.py --threads 1     # one thread (faster on a crowded 2-core machine)
    .venv/bin/python bench/utility.py --repeats 1 --n-boot 500   # a quicker look
    .venv/bin/python bench/utility.py --threads 1 --skip-check --fidelity   # the fidelity check's time too
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthgate.phantoms import generate, write_phantoms  # noqa: E402


def write_sets(root: Path, size: int) -> dict:
    from conftest import write_labelled_set

    t0 = time.perf_counter()
    write_phantoms(root / "real", patients=200, images_per_patient=6, size=size, seed=0, holdout_fraction=0.25)
    imgs, _ = generate(patients=134, images_per_patient=6, size=size, seed=1, holdout_fraction=0)
    write_labelled_set(root / "synthetic", [i.pixels for i in imgs], [i.label for i in imgs])
    return {"write_s": round(time.perf_counter() - t0, 1)}


def plain_loop(x, y, steps: int, batch: int, lr: float, weight_decay: float, seed: int, mean: float, std: float):
    """The baseline: the same network and optimiser in the simplest possible torch loop."""
    import torch
    import torch.nn.functional as F

    from audit.quality.classifier import small_cnn

    torch.manual_seed(seed)
    model = small_cnn(1, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    xf = (x.float() - mean) / std
    yt = torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(xf), generator=g), 0
    model.train()
    for _ in range(steps):
        if pos + batch > len(xf):
            perm, pos = torch.randperm(len(xf), generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(model(xf[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def trainer_vs_plain(ctx, seed: int = 0, rounds: int = 2) -> dict:
    import torch

    from audit.quality.classifier import TrainConfig, load_images, normalizer_for, train_classifier
    from audit.core.stats import roc_auc

    cfg = TrainConfig()
    index = {c: i for i, c in enumerate(sorted(ctx.real.classes))}
    x = load_images(ctx, ctx.real, cfg.image_size)
    y = np.array([index[r.label] for r in ctx.real.records])
    xh = load_images(ctx, ctx.holdout, cfg.image_size)
    yh = np.array([index[r.label] for r in ctx.holdout.records])
    norm = normalizer_for(cfg, x)
    steps = cfg.steps_for(len(x))

    # alternate the two and keep each one's fastest round: the machines here are shared and noisy
    ours_times, plain_times = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ours = train_classifier(x, y, 2, cfg, norm, seed, torch.device("cpu"))
        ours_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model = plain_loop(x, y, steps, cfg.batch_size, cfg.lr, cfg.weight_decay, seed, norm.mean[0], norm.std[0])
        plain_times.append(time.perf_counter() - t0)
    ours_s, plain_s = min(ours_times), min(plain_times)
    auc_ours = roc_auc(ours.predict_proba(xh)[:, 1], yh == 1)
    model.eval()
    with torch.no_grad():
        scores = torch.softmax(model((xh.float() - norm.mean[0]) / norm.std[0]), 1)[:, 1].numpy()
    return {"steps": steps, "rounds": rounds, "ours_s": round(ours_s, 2), "plain_loop_s": round(plain_s, 2),
            "overhead_ratio": round(ours_s / plain_s, 3), "holdout_auc_ours": round(auc_ours, 4),
            "holdout_auc_plain_loop": round(roc_auc(scores, yh == 1), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=None, help="override the preset's 3")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--skip-check", action="store_true", help="only the trainer-vs-plain-loop comparison")
    ap.add_argument("--fidelity", action="store_true", help="also time the fidelity check on the same sets")
    args = ap.parse_args(argv)

    import torch

    from audit.core.base import create_check
    from audit.core.context import AuditContext
    from synthgate.imageset import ImageSet

    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"threads": torch.get_num_threads(), "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out.update(write_sets(root, args.size))
        real, hold = ImageSet(root / "real" / "train", cache=None), ImageSet(root / "real" / "holdout", cache=None)
        synth = ImageSet(root / "synthetic", cache=None)
        out["images"] = {"real": len(real), "holdout": len(hold), "synthetic": len(synth),
                         "total": len(real) + len(hold) + len(synth)}
        ctx = AuditContext(synthetic=synth, real=real, holdout=hold, device="cpu", seed=0)
        out["trainer_vs_plain_loop"] = trainer_vs_plain(ctx)
        if not args.skip_check:
            t0 = time.perf_counter()
            result = create_check("utility", repeats=args.repeats, n_boot=args.n_boot).run(ctx)
            out["check"] = {
                "wall_s": round(time.perf_counter() - t0, 1), "status": result.status, "reason": result.reason,
                "models_trained": sum(len(v) for v in result.metrics["runs"].values()),
                "steps_per_model": result.metrics["training"]["steps_per_model"],
                "auc": {row["arm"]: [round(row["auc"]["value"], 4), [round(v, 4) for v in row["auc"]["ci"]]]
                        for row in result.data["table"]["rows"]},
                "controls": {c.name: c.passed for c in result.controls},
                "control_single_model_auc": [m["auc"] for m in result.metrics["runs"]["shuffled"]],
                "phases_note": "wall_s includes decoding the PNGs, all trainings and the bootstrap",
            }
        if args.fidelity:
            t0 = time.perf_counter()
            fid = create_check("fidelity").run(ctx)
            prdc = fid.metrics["prdc"]
            out["fidelity"] = {
                "wall_s": round(time.perf_counter() - t0, 1), "status": fid.status, "reason": fid.reason,
                "coverage_ratio": round(prdc["synthetic"]["ratio_to_baseline"]["coverage"], 3),
                "precision_ratio": round(prdc["synthetic"]["ratio_to_baseline"]["precision"], 3),
                "nearest_ssim_median": {k: round(fid.metrics["nearest_ssim"][k]["median"], 4)
                                        for k in ("real", "synthetic")},
                "controls": {c.name: c.passed for c in fid.controls},
            }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
