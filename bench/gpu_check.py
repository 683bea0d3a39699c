"""One prepared run on a GPU: every CUDA path synthgate has, timed, and the searches checked against the CPU.

The development and CI machines have no GPU, so every CUDA path is otherwise
exercised only by its CPU twin.  Whenever a GPU is lent, run this once
(under 8 minutes on one H100/H200-class GPU) and record its JSON in the
README's sizing table::

    python bench/gpu_check.py --out gpu_check.json

It trains the ``base`` preset and ``dit-base`` for a few hundred steps in
bf16 and a LoRA on a tiny Stable Diffusion pipeline, samples with each,
runs the exact copy search on CUDA (torch engine, and faiss-gpu when
installed) against the CPU on a subsample (the neighbours must be
identical), trains the re-identification network on CUDA, and prints
steps/s, images/s, pairs/s and peak GPU memory per stage.  Each stage is
timed separately and a stage that fails is recorded with its error, so one
broken path does not hide the others.

``--device cpu --tiny`` runs the same script at toy sizes on a CPU: the
script's own logic is tested that way (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak(torch, device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _reset(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def stage(report: dict, name: str, torch, device):
    """Context manager: time a stage, record peak GPU memory and any error."""
    class _Stage:
        def __enter__(self):
            _reset(torch, device)
            self.t = time.perf_counter()
            self.out = report.setdefault(name, {})
            return self.out

        def __exit__(self, exc_type, exc, tb):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.out["seconds"] = round(time.perf_counter() - self.t, 2)
            self.out["peak_gpu_gib"] = _peak(torch, device)
            if exc is not None:
                self.out["error"] = f"{exc_type.__name__}: {exc}"
                self.out["traceback"] = traceback.format_exc(limit=3)
            print(f"[gpu_check] {name}: {json.dumps({k: v for k, v in self.out.items() if k != 'traceback'})}",
                  file=sys.stderr, flush=True)
            return True  # the next stage runs anyway
    return _Stage()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU logic check)")
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip (e.g. dit-base)")
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    import numpy as np
    import torch

    from synthgate.device import resolve_device

    device = resolve_device(args.device)
    tiny = args.tiny
    size, steps, n_samples = (16, 6, 8) if tiny else (128, 300, 64)
    report: dict = {"device": str(device), "torch": torch.__version__, "tiny": tiny,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    work = Path(args.work or tempfile.mkdtemp(prefix="synthgate-gpu-check-"))
    from synthgate import cli
    from synthgate.phantoms import write_phantoms

    with stage(report, "data", torch, device) as s:
        patients = 8 if tiny else 100
        write_phantoms(work / "data", patients=patients, images_per_patient=4, size=size, seed=0)
        s["images"] = patients * 4
    precision = [] if device.type != "cuda" else ["--mixed-precision", "bf16"]
    for name, preset in (("train_base", "base"), ("train_dit_base", "dit-base")):
        if preset in skip:
            continue
        with stage(report, name, torch, device) as s:
            extra = ["--resolution", str(size)] + (["--block-out-channels", "32,64", "--attention", "0,0"]
                                                   if tiny and preset == "base" else [])
            code = cli.main(["train", str(work / "data" / "train"), "--out", str(work / preset), "--preset", preset,
                             "--steps", str(steps), "--batch-size", "8" if tiny else "64", "--device", args.device,
                             "--quiet", *extra, *precision])
            assert code == 0, f"train exit {code}"
            s["steps"] = steps
        report[name]["steps_per_s"] = round(steps / report[name]["seconds"], 3)
    with stage(report, "train_lora_tiny_sd", torch, device) as s:
        from generators.text2image.tiny import tiny_stable_diffusion

        sd = tiny_stable_diffusion(work / "sdbase")
        code = cli.main(["train", str(work / "data" / "train"), "--out", str(work / "lora"), "--base-model", str(sd),
                         "--caption-template", "phantom {label}", "--finetune", "lora", "--steps", str(steps),
                         "--resolution", "16", "--batch-size", "4", "--device", args.device, "--quiet"])
        assert code == 0, f"train exit {code}"
    report["train_lora_tiny_sd"]["steps_per_s"] = round(steps / report["train_lora_tiny_sd"]["seconds"], 3)
    for model in ("base", "dit-base", "lora"):
        if model in skip:
            continue
        name = f"sample_{model.replace('-', '_')}"
        with stage(report, name, torch, device) as s:
            code = cli.main(["sample", str(work / model), "--n", str(n_samples), "--out", str(work / f"syn-{model}"),
                             "--steps", "10" if tiny else "50", "--batch-size", "32", "--device", args.device,
                             "--quiet"])
            assert code == 0, f"sample exit {code}"
            s["images"] = n_samples
        report[name]["images_per_s"] = round(n_samples / report[name]["seconds"], 3)

    with stage(report, "copy_search", torch, device) as s:
        from audit.core.tiled import ExactTiledSearch, TiledMetric, TileLayout

        rng = np.random.default_rng(0)
        q_n, r_n, side = (64, 512, 32) if tiny else (2000, 50_000, 64)
        refs = rng.random((r_n, 1, side, side), dtype=np.float32)
        queries = np.concatenate([refs[:q_n // 2] + rng.normal(0, 0.01, (q_n // 2, 1, side, side)).astype(np.float32),
                                  rng.random((q_n - q_n // 2, 1, side, side), dtype=np.float32)])
        results = {}
        for dev_name in ("cpu", str(device)) if device.type == "cuda" else ("cpu",):
            for engine in ("torch", "faiss"):
                metric = TiledMetric(TileLayout(side, side, 1), dev_name)
                feats = torch.cat([metric.features(refs[i:i + 4096]) for i in range(0, r_n, 4096)])
                search = ExactTiledSearch(metric, feats, lambda idx: refs[idx], engine=engine)
                sub = queries if dev_name != "cpu" else queries[: max(8, q_n // 8)]
                t = time.perf_counter()
                try:
                    nb = search.search(sub, k=1)
                except Exception as exc:  # faiss-gpu may be absent: recorded, not fatal
                    results[f"{dev_name}/{engine}"] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                dt = time.perf_counter() - t
                results[f"{dev_name}/{engine}"] = {"queries": len(sub), "pairs_per_s": round(len(sub) * r_n / dt),
                                                   "indices": nb.indices[:, 0].tolist()}
        cpu = results.get("cpu/torch", {}).get("indices")
        for key, r in results.items():
            if "indices" in r and cpu is not None:
                n = min(len(cpu), len(r["indices"]))
                r["identical_to_cpu_on_subsample"] = r["indices"][:n] == cpu[:n]
            r.pop("indices", None)
        s.update(results)

    with stage(report, "reid_network", torch, device) as s:
        from audit.reidentification.network import prepare, resolve_config, train_network
        from synthgate.imageset import ImageSet

        real = ImageSet(work / "data" / "train")
        ids = np.unique(np.array(real.patient_ids), return_inverse=True)[1]
        batch = np.concatenate([b for _, b in real.iter_batches(64)])
        cfg = resolve_config("cpu" if tiny or device.type != "cuda" else "gpu", {"epochs": 2 if tiny else 5})
        images = prepare(batch, cfg)
        _, history = train_network(images, ids, cfg, device, torch.Generator().manual_seed(0),
                                   np.random.default_rng(0), progress=False)
        s["images"] = len(images)
        s["epochs"] = cfg.epochs
    if "seconds" in report["reid_network"]:
        report["reid_network"]["images_per_s"] = round(report["reid_network"].get("images", 0) * cfg.epochs
                                                       / report["reid_network"]["seconds"], 1)

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if any("error" in v for v in report.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
