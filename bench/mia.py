"""Benchmark: the batched model attacks vs naive loops, same model, same images, same run.

For each model attack of ``audit.membership_inference.model_attacks`` (loss at several timesteps
with several noise draws, PIA, SecMI), the cost per image of

- ``ours``: every (image, timestep, draw) row of a chunk in one forward pass
  (SecMI is sequential in t, so it batches over images only);
- ``naive``: one forward pass per (image, timestep[, draw]) -- the loop a
  first implementation writes;
- ``per_timestep``: a loop over timesteps (and draws), each pass batching
  the images -- the common middle ground.

Reported: milliseconds per image, the ratios naive/ours and
per_timestep/ours, and the largest score difference between the loops
(the same noise is used, so scores must agree to float precision).

    .venv/bin/python bench/mia.py                          # 32x32, tiny UNet
    .venv/bin/python bench/mia.py --size 64 --widths 32,64,64 --images 32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.membership_inference.model_attacks import auto_batch_rows, ddim_step, loss_scores, pia_scores, secmi_scores  # noqa: E402
from audit.membership_inference.control_model import tiny_unet  # noqa: E402


def build_model(size: int, widths, device):
    import torch
    from diffusers import DDPMScheduler

    from generators.model import DiffusionModel

    unet = tiny_unet(size, 1, None, widths).to(device).eval().requires_grad_(False)
    return DiffusionModel(Path("."), unet, DDPMScheduler(num_train_timesteps=1000), None,
                          {"resolution": size, "image_channels": 1}, torch.device(device))


def loss_loop(model, x0, timesteps, draws, noise, per_timestep: bool):
    """``noise``: ``(N * T * draws, C, H, W)`` in the same row order as :func:`loss_scores` draws it."""
    import torch

    n, nt = x0.shape[0], len(timesteps)
    out = torch.empty(n, nt, draws, dtype=torch.float64)
    noise = noise.view(n, nt, draws, *x0.shape[1:])
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            a = model.alphas_cumprod[t].float()
            for k in range(draws):
                if per_timestep:
                    eps = noise[:, j, k]
                    tt = torch.full((n,), t, device=x0.device)
                    pred = model.predict_eps(a.sqrt() * x0 + (1 - a).sqrt() * eps, tt)
                    out[:, j, k] = (pred - eps).square().flatten(1).mean(1).double().cpu()
                else:
                    for i in range(n):
                        eps = noise[i, j, k][None]
                        pred = model.predict_eps(a.sqrt() * x0[i:i + 1] + (1 - a).sqrt() * eps,
                                                 torch.full((1,), t, device=x0.device))
                        out[i, j, k] = float((pred - eps).square().mean())
    return -out.mean(2).numpy()


def pia_loop(model, x0, timesteps, p, per_timestep: bool):
    import torch

    n = x0.shape[0]
    out = torch.empty(n, len(timesteps), dtype=torch.float64)
    with torch.no_grad():
        groups = [slice(0, n)] if per_timestep else [slice(i, i + 1) for i in range(n)]
        for g in groups:
            x = x0[g]
            e0 = model.predict_eps(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
            for j, t in enumerate(timesteps):
                a = model.alphas_cumprod[t].float()
                et = model.predict_eps(a.sqrt() * x + (1 - a).sqrt() * e0, torch.full((x.shape[0],), t, device=x.device))
                out[g, j] = (e0 - et).abs().pow(p).flatten(1).sum(1).double().cpu()
    return -out.numpy()


def secmi_loop(model, x0, t_sec, k):
    import torch

    out = torch.empty(x0.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(x0.shape[0]):
            x = x0[i:i + 1]
            for t in range(0, t_sec - k, k):
                x = ddim_step(model, x, t, t + k)
            back = ddim_step(model, ddim_step(model, x, t_sec - k, t_sec), t_sec, t_sec - k)
            out[i] = float((x - back).square().sum())
    return -out.numpy()


def timed(fn, repeat: int = 3):
    """Best of ``repeat`` runs (machines here are shared; the minimum is the least disturbed)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run(size: int, widths, n_images: int, timesteps, draws: int, pia_t, device: str, seed: int,
        batch_rows: int = 256) -> list[dict]:
    import torch

    model = build_model(size, widths, device)
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand((n_images, 1, size, size), generator=g) * 2 - 1).to(device)
    rows = n_images * len(timesteps) * draws
    results = []
    with torch.no_grad():  # warm up every batch shape used below, so no loop pays one-time setup
        for b in sorted({1, n_images, min(rows, batch_rows), n_images * len(pia_t)}):
            model.predict_eps(x0[:1].expand(b, -1, -1, -1), torch.zeros(b, dtype=torch.long, device=device))

    noise_seed = seed + 1
    ours, t_ours = timed(lambda: loss_scores(model, x0, None, timesteps, draws, torch.Generator().manual_seed(noise_seed),
                                             batch_rows=batch_rows))
    gen = torch.Generator().manual_seed(noise_seed)  # the same numbers, block by block, as loss_scores draws them
    noise = torch.cat([torch.randn((min(batch_rows, rows - s), 1, size, size), generator=gen)
                       for s in range(0, rows, batch_rows)]).to(device)
    naive, t_naive = timed(lambda: loss_loop(model, x0, timesteps, draws, noise, per_timestep=False))
    per_t, t_per = timed(lambda: loss_loop(model, x0, timesteps, draws, noise, per_timestep=True))
    results.append(_row("loss", n_images, len(timesteps) * draws, t_ours, t_naive, t_per, ours, naive, per_t))

    ours, t_ours = timed(lambda: pia_scores(model, x0, None, pia_t, 4, batch_rows=batch_rows))
    naive, t_naive = timed(lambda: pia_loop(model, x0, pia_t, 4, per_timestep=False))
    per_t, t_per = timed(lambda: pia_loop(model, x0, pia_t, 4, per_timestep=True))
    results.append(_row("pia", n_images, 1 + len(pia_t), t_ours, t_naive, t_per, ours, naive, per_t))

    ours, t_ours = timed(lambda: secmi_scores(model, x0, None, 100, 10, batch_rows=batch_rows))
    naive, t_naive = timed(lambda: secmi_loop(model, x0, 100, 10))
    results.append(_row("secmi", n_images, 11, t_ours, t_naive, None, ours, naive, None))
    for r in results:
        r.update({"size": size, "widths": list(widths), "device": device, "batch_rows": batch_rows,
                  "params": sum(p.numel() for p in model.unet.parameters())})
    return results


def _row(attack, n, passes, t_ours, t_naive, t_per, ours, naive, per_t) -> dict:
    row = {
        "attack": attack, "images": n, "forward_passes_per_image": passes,
        "ours_ms_per_image": round(1000 * t_ours / n, 3), "naive_ms_per_image": round(1000 * t_naive / n, 3),
        "naive_over_ours": round(t_naive / t_ours, 2),
        "max_score_difference_naive": float(np.max(np.abs(np.asarray(ours) - np.asarray(naive)) /
                                                   np.maximum(np.abs(np.asarray(naive)), 1e-12))),
    }
    if t_per is not None:
        row["per_timestep_ms_per_image"] = round(1000 * t_per / n, 3)
        row["per_timestep_over_ours"] = round(t_per / t_ours, 2)
        row["max_score_difference_per_timestep"] = float(np.max(np.abs(np.asarray(ours) - np.asarray(per_t)) /
                                                                np.maximum(np.abs(np.asarray(per_t)), 1e-12)))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--widths", default="16,32", help="UNet block widths")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--timesteps", default="50,100,200,300")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--pia-timesteps", default="100,200")
    ap.add_argument("--batch-rows", default="auto",
                    help="rows per forward pass (the check's model_batch_rows; default auto, as the check)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(v) for v in args.widths.split(",")]
    for row in run(args.size, widths, args.images, [int(v) for v in args.timesteps.split(",")], args.draws,
                   [int(v) for v in args.pia_timesteps.split(",")], args.device, args.seed,
                   auto_batch_rows(torch.device(args.device), args.size * args.size) if args.batch_rows == "auto"
                   else int(args.batch_rows)):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
