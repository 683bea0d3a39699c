"""Ray: a local cluster (two worker processes, loopback only) that the test starts and stops itself.

What runs on the cluster must give exactly what one process gives: sampled images byte for byte, audit
results identical -- also when a worker dies mid-run and Ray re-runs its task.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the cluster extra (ray) is not installed")

from synthgate import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--preset", "tiny", "--steps", "20", "--batch-size", "8", "--block-out-channels", "16,32",
        "--resolution", "16", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``ray start --head`` on loopback with 2 CPUs; the fault marker lets one test kill a worker once."""
    root = tmp_path_factory.mktemp("ray")
    port = _free_port()
    # a throwaway cluster on this machine: Ray's token authentication off for it (and for this driver)
    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "SYNTHGATE_FAULT_ONCE": str(root / "fault-armed"), "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    ray_bin = Path(sys.executable).parent / "ray"
    start = [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={root / 'tmp'}"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    (root / "fault-armed").write_text("")  # disarmed until a test removes it
    try:
        yield {"address": f"127.0.0.1:{port}", "fault": root / "fault-armed"}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
        if auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("clustermodel")
    assert cli.main(["phantoms", str(root / "data"), "--patients", "6", "--images-per-patient", "2", "--size", "16",
                     "--seed", "3"]) == 0
    assert cli.main(["train", str(root / "data" / "train"), "--out", str(root / "model"), *TINY]) == 0
    return root / "model"


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".synthgate-output.json")}


def test_sampling_on_the_cluster_is_byte_identical(cluster, model, tmp_path, capsys):
    args = ["sample", str(model), "--n", "10", "--steps", "4", "--seed", "5", "--batch-size", "3", "--threads", "1",
            "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "many"), "--cluster", cluster["address"]]) == 0
    one, many = _tree(tmp_path / "one"), _tree(tmp_path / "many")
    assert len(one) >= 10 and one == many


def test_a_worker_killed_mid_run_is_retried_and_the_result_is_identical(cluster, model, tmp_path):
    args = ["sample", str(model), "--n", "6", "--steps", "3", "--seed", "8", "--batch-size", "2", "--threads", "1",
            "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    cluster["fault"].unlink()  # arm: the next task kills its worker once
    assert cli.main([*args, "--out", str(tmp_path / "many"), "--cluster", cluster["address"]]) == 0
    assert cluster["fault"].exists()  # the fault did happen
    assert _tree(tmp_path / "one") == _tree(tmp_path / "many")


def test_without_ray_or_cluster_the_error_is_one_line(model, tmp_path, capsys, monkeypatch):
    code = cli.main(["sample", str(model), "--n", "2", "--out", str(tmp_path / "x"), "--cluster", "not an address"])
    err = capsys.readouterr().err
    assert code == 2 and "--cluster" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    code = cli.main(["sample", str(model), "--n", "2", "--out", str(tmp_path / "y"), "--cluster", "local"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "synthgate[cluster]"' in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
