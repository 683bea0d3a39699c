"""Benchmark: synthgate's training step against a plain diffusers loop, and the DP step against the plain one.

Same UNet (same initial weights), same batch, same run; the three steps are
timed interleaved (one of each per repetition) and the median seconds per
step are compared:

- ``overhead``: ``generators.train.Trainer.step`` (no DP) over a hand-written
  loop in the style of diffusers' ``train_unconditional.py`` (noise,
  ``add_noise``, UNet, MSE, backward, gradient clipping, AdamW, LR schedule,
  EMA) -- what our trainer costs on top of the loop everyone writes;
- ``dp_cost``: the differentially private step (opacus per-example
  gradients, clipping, noise; K noise draws per image) over our non-private step.

Both loops must learn (their losses drop over the run); the JSON says so.

    .venv/bin/python bench/train_step.py                         # 32x32, widths 32,64,64, batch 32
    .venv/bin/python bench/train_step.py --resolution 64 --reps 5 --noise-multiplicity 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_step(unet, scheduler, optimizer, lr_scheduler, ema, x0, generator):
    """The loop of diffusers' examples/unconditional_image_generation, without accelerate."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator, device=x0.device)
    out = unet(scheduler.add_noise(x0, noise, t), t).sample
    loss = F.mse_loss(out.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    ema.step(unet.parameters())
    return float(loss)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, float(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--widths", default="32,64,64")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--noise-multiplicity", type=int, default=1, help="K for the DP step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import warnings

    import torch
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from generators.config import TrainConfig
    from generators.nets import build_denoiser, build_scheduler
    from generators.train import Trainer
    from synthgate.device import resolve_device
    from synthgate.phantoms import generate

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    widths = tuple(int(w) for w in args.widths.split(","))
    n_images = max(2 * args.batch, 64)
    cfg = TrainConfig(resolution=args.resolution, block_out_channels=widths, attention=(False,) * len(widths),
                      batch_size=args.batch, steps=args.warmup + args.reps, lr_warmup_steps=0, mixed_precision="no",
                      conditioning="none")
    dp_cfg = cfg.replace(dp={"epsilon": 10.0, "accountant": "rdp"}, noise_multiplicity=args.noise_multiplicity)
    imgs, _ = generate(patients=n_images // 4, images_per_patient=4, size=args.resolution, seed=0, holdout_fraction=0)
    x0 = torch.as_tensor([i.pixels for i in imgs[:args.batch]], dtype=torch.float32)[:, None].to(device) * 2 - 1

    def fresh_unet():
        torch.manual_seed(0)
        return build_denoiser(cfg, 1, args.resolution, None)

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
    ours = Trainer(cfg, fresh_unet(), build_scheduler(cfg, False), n_images, accelerator=accelerator)
    private = Trainer(dp_cfg, fresh_unet(), build_scheduler(cfg, False), n_images, accelerator=accelerator)
    unet = fresh_unet().to(device).train()
    scheduler = build_scheduler(cfg, False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    gen = torch.Generator(device=device).manual_seed(0)

    steps = {
        "plain": lambda: plain_step(unet, scheduler, optimizer, lr_scheduler, ema, x0, gen),
        "ours": lambda: ours.step(x0),
        "ours_dp": lambda: private.step(x0),
    }
    times = {k: [] for k in steps}
    losses = {k: [] for k in steps}
    for rep in range(args.warmup + args.reps):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds, loss = timed(fn)
            if device.type == "cuda":
                torch.cuda.synchronize()
            losses[name].append(loss)
            if rep >= args.warmup:
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "resolution": args.resolution, "widths": widths,
        "batch": args.batch, "noise_multiplicity_dp": args.noise_multiplicity, "reps": args.reps,
        "params": sum(p.numel() for p in unet.parameters()),
        "seconds_per_step": {k: round(v, 4) for k, v in med.items()},
        "overhead_ours_vs_plain": round(med["ours"] / med["plain"], 3),
        "dp_cost_dp_vs_ours": round(med["ours_dp"] / med["ours"], 3),
        "loss_first_last": {k: [round(v[0], 4), round(v[-1], 4)] for k, v in losses.items()},
        # the DP run adds the noise of a real budget, so only the non-private loops must visibly learn here
        "plain_and_ours_learn": all(sum(losses[k][-2:]) < sum(losses[k][:2]) for k in ("plain", "ours")),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
