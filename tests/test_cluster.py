"""Ray: a local cluster (two worker processes, loopback only) that the test starts and stops itself.

What runs on the cluster must give exactly what one process gives: sampled images byte for byte, audit
results identical -- also when a worker dies mid-run and Ray re-runs its task.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
    """``ray start --head --block`` on loopback with 2 CPUs, in a session of its own; the fault marker lets one
    test kill a worker once.

    Only this cluster is stopped afterwards (never ``ray stop``, which stops every Ray instance on the machine):
    SIGTERM to the blocking ``ray start``, which kills the processes it started, then SIGKILL to whatever is left
    of its process group (the group the test created)."""
    root = tmp_path_factory.mktemp("ray")
    port = _free_port()
    # a throwaway cluster on this machine: Ray's token authentication off for it (and for this driver)
    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "SYNTHGATE_FAULT_ONCE": str(root / "fault-armed"), "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    ray_bin = Path(sys.executable).parent / "ray"
    temp = root / "tmp"
    start = [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    log = open(root / "ray-start.log", "wb")
    head = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (temp / "ray_current_cluster").exists():  # written once the head's processes are up
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {(root / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(0.5)
        (root / "fault-armed").write_text("")  # disarmed until a test removes it
        yield {"address": f"127.0.0.1:{port}", "fault": root / "fault-armed"}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # the group of the head this fixture started, nothing else
        except (ProcessLookupError, PermissionError):
            pass
        head.wait(timeout=30)
        log.close()
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


# --------------------------------------------------------- the grouped second distance on the cluster


def _driver_never_searches(monkeypatch):
    """Make the driver's own reference-wide steps fail on a sharded search: proxy ranking, bound, the candidate
    outside a group, exact distances (the workers are other processes and keep the real ones).  Returns the rows
    the sharded ``_add_outside`` was asked for, per call."""
    from audit.core.shiftzoom_search import ExactCopySearch
    from audit.core.shiftzoom_shards import ShardedCopySearch

    for name in ("_proxy_ranked", "_survivors", "_outside_candidate", "_exact", "_refine"):
        real = getattr(ExactCopySearch, name)

        def guard(self, *a, _real=real, _name=name, **k):
            assert not isinstance(self, ShardedCopySearch), f"the driver ran {_name} over every reference"
            return _real(self, *a, **k)

        monkeypatch.setattr(ExactCopySearch, name, guard)
    calls = []
    sharded = ShardedCopySearch._add_outside

    def count(self, orbits, known, labels, exclude, rows):
        calls.append(len(rows))
        return sharded(self, orbits, known, labels, exclude, rows)

    monkeypatch.setattr(ShardedCopySearch, "_add_outside", count)
    return calls


def test_sharded_grouped_search_equals_one_process_and_brute_force(cluster, monkeypatch):
    """Groups larger than the initial candidates (so the bound needs a reference from outside the best one's
    group, found by the shards with the labels), near-duplicate pairs and singles, split over 3 shards: grouped
    decisions (radii, brackets, fallbacks) and the grouped two nearest equal one process and brute force."""
    import numpy as np
    import torch

    from audit.copy_detection.ratio_rule import COMPONENTS, decide_ratio, training_groups
    from audit.core.shiftzoom import CopyLayout, CopyMetric, brute_force, grouped_two
    from audit.core.shiftzoom_search import ExactCopySearch
    from audit.core.shiftzoom_shards import ShardedCopySearch
    from synthgate.cluster import connect

    ray_mod = connect(cluster["address"])
    rng = np.random.default_rng(2)
    smooth = torch.nn.functional.avg_pool2d(torch.as_tensor(rng.random((60, 1, 40, 40)), dtype=torch.float32), 9,
                                            1).numpy()
    # references: 2 "patients" of 12 near-identical scans, 6 pairs, 20 singles (56); a group straddles a shard cut
    base = [smooth[0]] * 12 + [smooth[1]] * 12 + [smooth[2 + p // 2] for p in range(12)] + list(smooth[8:28])
    refs = np.stack([b + rng.normal(0, 0.002, b.shape) for b in base]).astype(np.float32)
    labels = training_groups(len(refs), [(24 + 2 * p, 25 + 2 * p) for p in range(6)],
                             ["A"] * 12 + ["B"] * 12 + [""] * 32)
    assert labels.max() + 1 == 28
    copies = np.stack([np.roll(refs[i], 1, axis=-1) + rng.normal(0, 0.01, refs[i].shape) for i in (3, 15, 20, 26, 31)])
    queries = np.concatenate([smooth[40:52], copies.astype(np.float32)])
    metric = CopyMetric(CopyLayout(32, 32, 1, pooled=8, transforms=COMPONENTS["shift_zoom"]))
    feats = metric.features(refs)
    one = ExactCopySearch(metric, feats)
    many = ShardedCopySearch(ray_mod, metric, feats, shards=3, device="cpu")
    outside = _driver_never_searches(monkeypatch)
    full = brute_force(metric, queries, refs)
    idx, dist = grouped_two(full, labels)
    for tau in (0.3, 0.8):
        a = decide_ratio(one, queries, tau, 0.0, labels=labels)
        b = decide_ratio(many, queries, tau, 0.0, labels=labels)
        for name in ("flagged", "nearest", "d1", "d1_exact", "ratio_low", "ratio_high", "radius"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{name} at {tau}")
    assert a.flagged[-5:].all()  # the copies, each with siblings in its group (plain second-nearest: ratio ~1)
    plain = decide_ratio(one, queries, 0.8, 0.0)
    assert not plain.flagged[-5:-1].any()  # ... which the plain second-nearest misses
    ga, gb = one.search_grouped(queries, labels), many.search_grouped(queries, labels)
    np.testing.assert_array_equal(ga.indices, gb.indices)
    np.testing.assert_array_equal(ga.distances, gb.distances)
    np.testing.assert_array_equal(gb.indices, idx)
    np.testing.assert_allclose(gb.distances, dist, rtol=1e-5, atol=1e-6)
    assert sum(outside) > 0  # some query's first candidates all lay in one group: the shards found one outside
    # a training set searched against itself (the duplicate pairs), each image leaving itself out
    own = one.within(refs, radius=0.02, exclude=list(range(len(refs))))
    shard = many.within(refs, radius=0.02, exclude=list(range(len(refs))))
    assert [w.as_dict() for w in own] == [w.as_dict() for w in shard]


@pytest.fixture(scope="module")
def sibling_sets(tmp_path_factory):
    """Phantom patients with near-identical repeat scans (tests/test_copy_groups.py): one patient with 10 scans
    (more than the search's 8 first candidates), 7 with 3, 20 with one; a holdout of 80 unseen patients; a
    synthetic set of 6 noisy copies of repeat-scanned images among 8 images of unseen patients.  No patient IDs:
    the groups come from the training duplicate search, on the cluster."""
    import numpy as np

    from test_copy_groups import _phantoms, _write

    root = tmp_path_factory.mktemp("clustersiblings")
    rng = np.random.default_rng(5)
    big, _ = _phantoms(1, 7, rng, per=10)
    triples, _ = _phantoms(7, 1, rng)
    singles, _ = _phantoms(20, 4, rng, per=1)
    train = big + triples + singles
    hold, _ = _phantoms(80, 2, rng, per=1)
    novel, _ = _phantoms(8, 3, rng, per=1)
    copies = [np.clip(train[s] + rng.normal(0, 0.03, train[s].shape), 0, 1) for s in (2, 7, 11, 15, 20, 28)]
    _write(root / "train", train)
    _write(root / "hold", hold)
    _write(root / "syn", copies + novel)  # i000-i005 are the copies
    return root


def _sibling_audit(sets, monkeypatch, cluster=None):
    import audit
    from conftest import only_policy

    monkeypatch.setenv("SYNTHGATE_CACHE_DIR", "off")
    policy = only_policy("copy_detection", action="warn", required=False, on_inconclusive="warn")
    r = audit.check(sets / "syn", real=sets / "train", holdout=sets / "hold", policy=policy, progress=False,
                    device="cpu", cluster=cluster).result("copy_detection")
    doc = r.to_dict()
    search = {k: doc["metrics"]["ratio"].pop(k) for k in list(doc["metrics"]["ratio"]) if k.startswith("search")}
    doc.pop("seconds", None)
    return doc, search


def test_the_grouped_audit_on_the_cluster_is_identical(cluster, sibling_sets, monkeypatch):
    """Where grouping decides: the duplicate radius, the training pairs and groups, the grouped calibration, the
    synthetic decisions, the control's sibling plants and the evidence all come from the shards (the driver's
    own reference-wide steps are made to fail) and equal the one-process audit."""
    from audit.copy_detection.ratio_rule import CopyRatioRule

    one, _ = _sibling_audit(sibling_sets, monkeypatch)
    outside = _driver_never_searches(monkeypatch)

    def on_driver(*a, **k):
        raise AssertionError("the driver decoded and searched the training set for its duplicate pairs")

    monkeypatch.setattr(CopyRatioRule, "duplicate_pairs", on_driver)
    many, cost = _sibling_audit(sibling_sets, monkeypatch, cluster["address"])
    assert cost["search_fit_shift_zoom"]["shards"] == 2 and cost["search_shift_zoom"]["tasks"] > 0
    groups = one["metrics"]["ratio"]["training_groups"]
    assert groups["groups"] is not None and groups["images_in_groups_of_2_or_more"] >= 31, groups
    assert groups["largest_group"] >= 10, groups
    flagged = {f["synthetic"] for f in one["flagged"]}
    copies = {f"i{i:03d}.png" for i in range(6)}
    assert copies <= flagged, sorted(flagged)  # caught only through the grouped second distance
    sib = one["controls"][0]["metrics"]["with_training_duplicate"]
    assert sib["planted"] > 0 and sib["caught"] == sib["planted"], sib
    assert sum(outside) > 0  # the shards were asked for a reference outside a group
    assert one["metrics"]["ratio"]["training_groups"] == many["metrics"]["ratio"]["training_groups"]
    assert one["metrics"]["ratio"]["duplicate_radius"] == many["metrics"]["ratio"]["duplicate_radius"]
    assert one["thresholds"] == many["thresholds"] and one["flagged"] == many["flagged"]
    assert one == many  # every metric, ratio, distance, control and finding
