"""How many torch threads for small models on a few cores: 1 vs all, OpenMP waiting actively vs passively,
on an idle machine and with a second CPU-bound process running -- same run, ratios.

Each configuration trains the ``tiny`` preset for a few steps in a fresh process (thread settings must be
made before the OpenMP runtime starts), interleaved over repetitions; the figure is the median step time.

    .venv/bin/python bench/threads.py --steps 30 --reps 3
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from accelerate import Accelerator
from generators.config import preset
from generators.nets import build_denoiser, build_scheduler
from generators.train import Trainer
cfg = preset("tiny", steps={steps}, batch_size=32, resolution=32, seed=0, conditioning="none")
x = torch.rand(256, 1, 32, 32) * 2 - 1
torch.manual_seed(0)
trainer = Trainer(cfg, build_denoiser(cfg, 1, 32, None), build_scheduler(cfg, False), len(x),
                  accelerator=Accelerator(cpu=True))
trainer.step(x[torch.as_tensor(trainer.next_indices())])  # warm-up
t = time.perf_counter()
for _ in range({steps}):
    trainer.step(x[torch.as_tensor(trainer.next_indices())])
print((time.perf_counter() - t) / {steps})
"""


def _burn(stop):
    x = 0
    while not stop.is_set():
        for i in range(100000):
            x += i * i


def one(threads: int, wait: str, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": wait}
    code = CHILD.format(root=str(ROOT), threads=threads, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    configs = [(1, "PASSIVE"), (cores, "PASSIVE"), (cores, "ACTIVE")]
    results = {}
    for load in ("idle", "loaded"):
        stop, burner = mp.Event(), None
        if load == "loaded":
            burner = mp.Process(target=_burn, args=(stop,), daemon=True)
            burner.start()
        times = {c: [] for c in configs}
        for _ in range(args.reps):  # interleaved: drifting load hits every configuration alike
            for c in configs:
                times[c].append(one(*c, args.steps))
        if burner is not None:
            stop.set()
            burner.join(5)
        base = statistics.median(times[(1, "PASSIVE")])
        results[load] = {f"threads={t} wait={w}": {"median_step_s": round(statistics.median(v), 4),
                                                   "ratio_to_1_thread": round(statistics.median(v) / base, 2)}
                         for (t, w), v in times.items()}
    text = json.dumps({"cores": cores, "steps": args.steps, "reps": args.reps, "results": results}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
