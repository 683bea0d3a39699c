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


# ------------------------------------------------------------------------- audit check: the copy search


@pytest.fixture(scope="module")
def copy_sets(tmp_path_factory):
    """32 px phantoms: a training set and a holdout (patient-disjoint), and a synthetic set of four shifted and
    noisy copies of training images among eight images of other patients."""
    import numpy as np
    from PIL import Image

    from conftest import save_unit_png
    from synthgate.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("clustercopy")
    write_phantoms(root / "p", patients=24, images_per_patient=3, size=32, seed=4, holdout_fraction=0.5)
    write_phantoms(root / "q", patients=4, images_per_patient=2, size=32, seed=11, holdout_fraction=0.0)
    rng = np.random.default_rng(0)
    for i, f in enumerate(sorted((root / "q" / "train").glob("*.png"))):
        save_unit_png(root / "syn" / f"novel_{i}.png", np.asarray(Image.open(f), np.float32) / 255)
    train = sorted((root / "p" / "train").glob("*.png"))
    for j, f in enumerate(train[::9][:4]):
        x = np.roll(np.asarray(Image.open(f), np.float32) / 255, (j % 2 + 1, -1), axis=(0, 1))
        save_unit_png(root / "syn" / f"copy_{j}.png", x + rng.normal(0, 0.01, x.shape))
    return root


def _copy_audit(sets, monkeypatch, cluster=None, cache=False):
    import audit
    from conftest import only_policy

    if not cache:  # else the second run restores the first run's fitted real side (features, calibration)
        monkeypatch.setenv("SYNTHGATE_CACHE_DIR", "off")
    policy = only_policy("copy_detection", action="warn", required=False, on_inconclusive="warn")
    r = audit.check(sets / "syn", real=sets / "p" / "train", holdout=sets / "p" / "holdout", policy=policy,
                    progress=False, device="cpu", cluster=cluster).result("copy_detection")
    doc = r.to_dict()
    # what the search cost (pairs evaluated, seconds, tasks) is not part of the result
    search = {k: doc["metrics"]["ratio"].pop(k) for k in list(doc["metrics"]["ratio"]) if k.startswith("search")}
    doc.pop("seconds", None)
    return doc, search


def test_the_audit_copy_search_on_the_cluster_is_identical(cluster, copy_sets, monkeypatch):
    one, one_cost = _copy_audit(copy_sets, monkeypatch)
    many, many_cost = _copy_audit(copy_sets, monkeypatch, cluster["address"])
    assert many_cost["search_fit_shift_zoom"]["shards"] == 2 and many_cost["search_shift_zoom"]["tasks"] > 0
    assert "shards" not in one_cost["search_fit_shift_zoom"]
    flagged = {f["synthetic"] for f in one["flagged"]}
    assert {f"copy_{j}.png" for j in range(4)} <= flagged  # the planted copies are found (a run that can fail)
    assert one["thresholds"] == many["thresholds"] and one["flagged"] == many["flagged"]
    assert one == many  # every metric, ratio, distance, control and finding


@pytest.mark.parametrize("cache", [False, True], ids=["killed-decoding", "killed-searching"])
def test_a_worker_killed_mid_run_is_retried_and_the_audit_is_identical(cluster, copy_sets, monkeypatch, cache):
    """Without the fit cache the first task is a training chunk's decoding; with it (the real side restored from
    the one-process run) the first task is a shard's search of the synthetic images."""
    one, _ = _copy_audit(copy_sets, monkeypatch, cache=cache)
    cluster["fault"].unlink()  # arm: the next task kills its worker once
    many, cost = _copy_audit(copy_sets, monkeypatch, cluster["address"], cache=cache)
    assert cluster["fault"].exists()
    assert ("shards" in cost["search_fit_identity"]) is not cache  # restored: the fit was not recomputed
    assert cost["search_shift_zoom"]["shards"] == 2
    assert one == many


def test_audit_cluster_without_ray_is_one_line(copy_sets, tmp_path, capsys, monkeypatch):
    from audit.cli import main as audit_main

    monkeypatch.setitem(sys.modules, "ray", None)
    code = audit_main(["check", str(copy_sets / "syn"), "--real", str(copy_sets / "p" / "train"), "--holdout",
                       str(copy_sets / "p" / "holdout"), "--out", str(tmp_path / "a"), "--cluster", "local"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "synthgate[cluster]"' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_sharded_search_equals_one_process_search(cluster):
    """The primitives themselves: decisions with their radii and brackets (one of them with a search task's worker
    killed and retried), two nearest, self-excluding radius search."""
    import numpy as np
    import torch

    from audit.copy_detection.ratio_rule import COMPONENTS, decide_ratio
    from audit.core.shiftzoom import CopyLayout, CopyMetric
    from audit.core.shiftzoom_search import ExactCopySearch
    from audit.core.shiftzoom_shards import ShardedCopySearch
    from synthgate.cluster import connect

    ray_mod = connect(cluster["address"])
    rng = np.random.default_rng(1)
    smooth = torch.nn.functional.avg_pool2d(torch.as_tensor(rng.random((90, 1, 40, 40)), dtype=torch.float32), 9, 1)
    refs = smooth.numpy()[:70]
    queries = np.concatenate([smooth.numpy()[70:], np.roll(refs[:6], 1, axis=-1) + 0.002])
    metric = CopyMetric(CopyLayout(32, 32, 1, pooled=8, transforms=COMPONENTS["shift_zoom"]))
    feats = metric.features(refs)
    one = ExactCopySearch(metric, feats)
    many = ShardedCopySearch(ray_mod, metric, feats, shards=3, device="cpu")
    assert len(many.spans) == 3
    for tau in (0.3, 0.8):
        if tau == 0.8:
            cluster["fault"].unlink()  # arm: the first search task of this decision kills its worker once
        a, b = decide_ratio(one, queries, tau, 0.0), decide_ratio(many, queries, tau, 0.0)
        for name in ("flagged", "nearest", "d1", "d1_exact", "ratio_low", "ratio_high", "radius"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert cluster["fault"].exists()  # the worker did die, and the retried task gave the same answer
    assert a.flagged[-6:].all() and not a.flagged[:20].all()  # the shifted copies, not every query (tau 0.8)
    na, nb = one.search(refs[:12], k=2, exclude=range(12)), many.search(refs[:12], k=2, exclude=range(12))
    np.testing.assert_array_equal(na.indices, nb.indices)
    np.testing.assert_array_equal(na.distances, nb.distances)
    assert (na.indices != np.arange(12)[:, None]).all()
    wa = one.within(refs[:12], radius=na.distances[:, 1], exclude=list(range(12)))
    wb = many.within(refs[:12], radius=na.distances[:, 1], exclude=list(range(12)))
    assert [w.as_dict() for w in wa] == [w.as_dict() for w in wb]
    assert many.stats.tasks > 0 and many.stats.bound_pairs == one.stats.bound_pairs
