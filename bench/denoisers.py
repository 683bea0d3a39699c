"""Benchmark: the transformer denoisers' training step and forward pass against the UNet's, same run.

For each preset (the UNet ``tiny`` preset is the baseline; ``swin-tiny``,
``dit-tiny`` by default) a ``generators.train.Trainer`` takes steps on the
same phantom batch; the steps are timed interleaved (one per preset per
repetition) and the median seconds per step are reported with their ratio to
the baseline's.  The eval forward pass at the sampling batch size (what one
sampler step costs) is timed the same way.  Parameter counts come along.

    .venv/bin/python bench/denoisers.py                      # 32x32 presets, batch 32, 1 thread
    .venv/bin/python bench/denoisers.py --presets base,swin-base,dit-base --device cuda --batch 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,swin-tiny,dit-tiny", help="the first is the baseline")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import warnings

    import numpy as np
    import torch
    from accelerate import Accelerator

    from generators.config import preset
    from generators.nets import build_denoiser, build_scheduler
    from generators.train import Trainer
    from synthgate.device import resolve_device
    from synthgate.phantoms import generate

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    names = args.presets.split(",")
    configs = {n: preset(n, batch_size=args.batch, ema_decay=0.999, conditioning="none") for n in names}
    size = configs[names[0]].resolution
    if any(c.resolution != size for c in configs.values()):
        raise SystemExit("the presets compared must share a resolution")
    images, _ = generate(patients=max(2, args.batch // 4), images_per_patient=4, size=size, seed=0,
                         holdout_fraction=0)
    pixels = np.stack([im.pixels for im in images[:args.batch]]).astype(np.float32)
    x = torch.as_tensor(pixels / max(float(pixels.max()), 1e-6) * 2 - 1).reshape(-1, 1, size, size).to(device)
    trainers, nets = {}, {}
    for n, cfg in configs.items():
        torch.manual_seed(0)
        net = build_denoiser(cfg, 1, size, None)
        trainers[n] = Trainer(cfg, net, build_scheduler(cfg, False), len(x),
                              accelerator=Accelerator(cpu=device.type == "cpu"))
        nets[n] = net
    xs = torch.randn(args.sample_batch, 1, size, size, device=device)
    ts = torch.full((args.sample_batch,), 500, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step_s = {n: [] for n in names}
    fwd_s = {n: [] for n in names}
    losses = {n: [] for n in names}
    for rep in range(args.warmup + args.reps):
        for n in names:
            sync()
            start = time.perf_counter()
            loss = trainers[n].step(x)
            sync()
            took = time.perf_counter() - start
            losses[n].append(float(loss))
            nets[n].eval()
            with torch.no_grad():
                sync()
                start2 = time.perf_counter()
                nets[n](xs, ts).sample
                sync()
                fwd = time.perf_counter() - start2
            nets[n].train()
            if rep >= args.warmup:
                step_s[n].append(took)
                fwd_s[n].append(fwd)
    base = names[0]
    med = {n: statistics.median(step_s[n]) for n in names}
    fmed = {n: statistics.median(fwd_s[n]) for n in names}
    out = {
        "device": str(device), "threads": torch.get_num_threads(), "resolution": size, "batch": args.batch,
        "sample_batch": args.sample_batch, "reps": args.reps, "baseline": base,
        "presets": {n: {
            "architecture": configs[n].architecture,
            "parameters": sum(p.numel() for p in nets[n].parameters()),
            "train_step_s": round(med[n], 4), "train_step_ratio_to_baseline": round(med[n] / med[base], 2),
            "forward_s": round(fmed[n], 4), "forward_ratio_to_baseline": round(fmed[n] / fmed[base], 2),
            "loss_first_last": [round(losses[n][0], 4), round(losses[n][-1], 4)],
        } for n in names},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
