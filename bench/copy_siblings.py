"""Benchmark: the ratio rule's grouped second distance on demo-like phantom data (nothing trained).

The demo's data: 12 invented phantom patients x 4 chest-like images at 32 x
32, 8 patients (32 images) for training and 4 (16 images) as the holdout
(``write_phantoms(..., holdout_fraction=0.3)``).  The "synthetic set" is 40
images: 10 planted copies of training images (the control's kinds in turn:
exact, noise 0.01 and 0.05, brightness, contrast, JPEG 80, gamma 0.85, blur
0.8, shifts of 1 and 2 px) and 30 images of 8 further unseen patients.  Each
seed is another phantom set and another draw of sources.  Reported apart,
not counted as copies: 10 *patient blends* per seed, the mean of two images
of one training patient plus noise 0.02 -- what a model that memorised a
patient rather than an image can produce, as near both sources as either.

The rule is :class:`audit.copy_detection.ratio_rule.CopyRatioRule` at the
check's default settings, fitted three ways: the plain second-nearest (the
definition before), grouped by patient ID (as the check does with the
phantoms' ``metadata.csv``) and grouped by near-duplicates only (a training
set without IDs).  ``--holdout-patients`` enlarges the holdout (the demo's
16 images cannot resolve a 0.5 % false-alarm rate: each threshold is the
smallest holdout ratio).

    OMP_NUM_THREADS=1 .venv/bin/python bench/copy_siblings.py --seeds 0,1,2,3,4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("exact", "noise_0.01", "noise_0.05", "brightness", "contrast", "jpeg_80", "gamma_0.85", "blur_0.8",
         "shift_1", "shift_2")
SIZE = 32


def data(seed: int, holdout_patients: int):
    """Training and holdout phantoms as the demo writes them, 30 unseen images, 10 planted copies."""
    from audit.core.controls import plant
    from synthgate.phantoms import generate

    rng = np.random.default_rng(seed + 100)
    images, _ = generate(patients=12, images_per_patient=4, size=SIZE, seed=seed, holdout_fraction=0.3)
    train = [im for im in images if im.split == "train"]
    hold = [im for im in images if im.split == "holdout"]
    if holdout_patients > 4:  # more unseen patients for the holdout, from another phantom set
        extra, _ = generate(patients=holdout_patients - 4, images_per_patient=4, size=SIZE, seed=seed + 5000,
                            holdout_fraction=0.0)
        hold += extra
    novel, _ = generate(patients=8, images_per_patient=4, size=SIZE, seed=seed + 9000, holdout_fraction=0.0)
    x = np.stack([im.pixels for im in train])[:, None].astype(np.float32)
    sources = rng.choice(len(train), len(KINDS), replace=False)
    copies = np.stack([plant(x[s], k, rng) for s, k in zip(sources, KINDS)])
    unseen = np.stack([im.pixels for im in novel[:30]])[:, None].astype(np.float32)
    h = np.stack([im.pixels for im in hold])[:, None].astype(np.float32)
    ids = np.array([im.patient_id for im in train])
    blends = []
    for p in rng.choice(np.unique(ids), 10, replace=True):
        a, b = rng.choice(np.nonzero(ids == p)[0], 2, replace=False)
        blends.append(np.clip((x[a] + x[b]) / 2 + rng.normal(0, 0.02, x[a].shape), 0, 1))
    return x, list(ids), h, np.concatenate([copies, unseen, np.stack(blends).astype(np.float32)])


def run(seed: int, holdout_patients: int) -> dict:
    from audit.copy_detection.ratio_rule import CopyRatioRule, components
    from audit.copy_detection.ratio_side import ratio_geometry
    from audit.copy_detection.settings import CopyDetectionSettings

    s = CopyDetectionSettings()
    shape, pooled = ratio_geometry(SIZE, SIZE, s)
    x, ids, h, q = data(seed, holdout_patients)
    out = {"seed": seed, "train": len(x), "holdout": len(h)}
    for name, kw in (("plain second-nearest (before)", {"grouped": False}),
                     ("grouped by patient ID (now, with IDs)", {"patients": ids}),
                     ("grouped by near-duplicates (now, no IDs)", {})):
        rule = CopyRatioRule(*shape, 1, alpha=s.false_alarm_rate, components=components(s.max_shift, s.zooms),
                             pooled=pooled).fit(x, h, **kw)
        flagged = rule.decide(q).flagged
        out[name] = {"copies_caught": int(flagged[:10].sum()), "unseen_flagged": int(flagged[10:40].sum()),
                     "blends_flagged": int(flagged[40:].sum()),
                     "missed": [KINDS[i] for i in np.nonzero(~flagged[:10])[0]],
                     "tau": {k: round(t.tau, 4) for k, t in rule.thresholds_.items()},
                     "groups": None if rule.labels_ is None else int(rule.labels_.max()) + 1}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--holdout-patients", type=int, default=4, help="4: the demo's holdout (16 images)")
    ap.add_argument("--out", help="write the JSON results here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = [run(int(seed), args.holdout_patients) for seed in args.seeds.split(",")]
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    print(f"holdout: {rows[0]['holdout']} images; training: {rows[0]['train']} images; synthetic: 10 copies + 30 "
          f"unseen per seed; seeds {args.seeds}\n")
    print("| rule | copies caught | unseen images flagged | patient blends flagged | per seed (caught / flagged "
          "unseen / blends) |")
    print("|---|---|---|---|---|")
    for name in names:
        caught = sum(r[name]["copies_caught"] for r in rows)
        fa = sum(r[name]["unseen_flagged"] for r in rows)
        bl = sum(r[name]["blends_flagged"] for r in rows)
        per = ", ".join(f"{r[name]['copies_caught']}/{r[name]['unseen_flagged']}/{r[name]['blends_flagged']}"
                        for r in rows)
        print(f"| {name} | {caught} of {10 * len(rows)} | {fa} of {30 * len(rows)} | {bl} of {10 * len(rows)} | "
              f"{per} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
