"""bench/gpu_check.py is run once whenever a GPU is lent: its logic is checked here on the CPU at toy sizes,
so that the one prepared GPU run does not fail on a typo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_gpu_check_runs_every_stage_on_cpu_at_toy_size(tmp_path):
    script = Path(__file__).parent.parent / "bench" / "gpu_check.py"
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--skip", "dit-base", "--out",
                           str(out), "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in report.items() if isinstance(v, dict) and "error" in v}
    assert proc.returncode == 0 and not errors, (errors, proc.stderr[-2000:])
    assert report["train_base"]["steps_per_s"] > 0 and report["sample_lora"]["images_per_s"] > 0
    assert report["copy_search"]["cpu/torch"]["identical_to_cpu_on_subsample"] is True
    assert report["reid_network"]["images_per_s"] > 0
