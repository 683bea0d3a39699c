"""reidentification: statistics by hand, roles of the real images, learning phantoms, controls, cache, bad input."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_golden, write_png

from audit import cli as audit_cli
from audit.reidentification.check import (NotEnoughData, best_match, conformal_threshold, excess_p_value, make_plan,
                                    one_per_identity, pair_auc, retrieval_metrics)
from audit.core.stats import roc_auc
from synthgate.imageset import ImageSet
from synthgate.phantoms import generate, render, write_phantoms
from synthgate.privacy import hash_id

#: small enough for CI (a few hundred steps of a compact CNN on 32 x 32 images, stopped early), strong enough to
#: re-identify phantoms
NET = {"preset": "cpu", "image_size": 32, "epochs": 40, "patience": 3, "batch_size": 32, "lr": 3e-3, "n_boot": 200,
       "time_budget_per_image": 0}  # no time budget: a loaded machine must not change what is learned
SIZE = 32


def params(**extra) -> list[str]:
    out = []
    for k, v in {**NET, **extra}.items():
        out += ["--param", f"reidentification.{k}={v}"]
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save(path: Path, pixels: np.ndarray) -> None:
    write_png(path, np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Phantom training/holdout sets; synthetic sets from the training patients' anatomy and from unseen patients."""
    root = tmp_path_factory.mktemp("reid")
    write_phantoms(root / "p", patients=40, images_per_patient=8, size=SIZE, seed=21)
    images, anatomies = generate(patients=40, images_per_patient=8, size=SIZE, seed=21)
    train_patients = sorted({i.patient_id for i in images if i.split == "train"})
    rows = ["path,patient_id"]
    for k, pid in enumerate(train_patients):  # new acquisitions of training patients: what a leaking generator makes
        for r in range(2):
            pixels = render(anatomies[pid], SIZE, np.random.default_rng([5, k, r]), r == 1)
            _save(root / "leak" / f"s{k:02d}_{r}.png", pixels)
            rows.append(f"s{k:02d}_{r}.png,{pid}")
    (root / "leak" / "metadata.csv").write_text("\n".join(rows) + "\n")
    novel, _ = generate(patients=30, images_per_patient=2, size=SIZE, seed=22, holdout_fraction=0)
    for i, im in enumerate(novel):
        _save(root / "novel" / f"n{i:02d}.png", im.pixels)
    return {"root": root, "train": root / "p" / "train", "holdout": root / "p" / "holdout", "leak": root / "leak",
            "novel": root / "novel", "patients": train_patients, "cache": root / "cache"}


def run_audit(capsys, *argv) -> tuple[int, str, str]:
    code = audit_cli.main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def leak_audit(case):
    """The audit of the leaking set (trains the network once; later audits load it from the cache)."""
    out = case["root"] / "out_leak"
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, case)
        code = audit_cli.main(["check", str(case["leak"]), "--real", str(case["train"]), "--holdout",
                               str(case["holdout"]), "--checks", "reidentification", "--out", str(out), *params()])
    return code, json.loads((out / "audit.json").read_text()), out


def _env(mp, case):
    mp.setenv("SYNTHGATE_CACHE_DIR", str(case["cache"]))
    mp.setenv("SYNTHGATE_SALT", "test-salt")
    mp.setenv("SYNTHGATE_QUIET", "1")
    mp.setenv("XDG_CONFIG_HOME", str(case["root"] / "config"))


# ----------------------------------------------------------------- statistics by hand


def test_conformal_threshold_and_excess_by_hand():
    impostor = np.arange(1, 201) / 200.0  # 200 unseen identities
    tau, k, note = conformal_threshold(impostor, 0.01)
    assert k == 2 and tau == pytest.approx(199 / 200)  # floor(0.01 * 201) = 2: the 2nd largest
    tau, k, note = conformal_threshold(impostor[:20], 0.01)
    assert k == 1 and tau == pytest.approx(20 / 200) and "cannot resolve" in note
    # one new identity over the largest of 9: probability 1/10 exactly
    assert excess_p_value(1, 1, 1, 9) == pytest.approx(0.1)
    assert excess_p_value(0, 50, 1, 9) == 1.0
    # two new ones both above the largest of 9: E[q^2] for q ~ Beta(1, 9) = 2 / (10 * 11)
    assert excess_p_value(2, 2, 1, 9) == pytest.approx(2 / 110)


def test_best_match_exclusions_by_hand():
    g = np.eye(4, dtype=np.float32)
    q = np.array([[1, 0.5, 0.2, 0.1], [0, 0, 1, 0.9]], np.float32)
    g_ids, q_ids = np.array([0, 0, 1, 2]), np.array([0, 1])
    s, i = best_match(q, g)
    assert i.tolist() == [0, 2] and s.tolist() == pytest.approx([1.0, 1.0])
    s, i = best_match(q, g, q_ids=q_ids, g_ids=g_ids, relation="other")
    assert i.tolist() == [2, 3] and s.tolist() == pytest.approx([0.2, 0.9])
    s, i = best_match(q, g, q_ids=q_ids, g_ids=g_ids, relation="same", q_self=np.array([0, -1]))
    assert i.tolist() == [1, 2] and s.tolist() == pytest.approx([0.5, 1.0])
    s, i = best_match(q[:1], g, q_ids=np.array([9]), g_ids=g_ids, relation="same")
    assert i.tolist() == [-1] and s[0] == -np.inf


def test_pair_auc_cluster_bootstrap_agrees_with_plain_auc():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(12), 4)
    i, j = np.triu_indices(len(ids), 1)
    genuine = ids[i] == ids[j]
    scores = rng.normal(genuine * 1.5, 1.0)
    auc, ci = pair_auc(scores, genuine, ids[i], ids[j], 300, np.random.default_rng(1))
    assert auc == pytest.approx(roc_auc(scores, genuine))
    assert ci[0] < auc < ci[1] and 0.5 < ci[0]
    assert pair_auc(scores, genuine, ids[i], ids[j], 0, None)[1] is None


def test_retrieval_metrics_match_pytorch_metric_learning():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    rng = np.random.default_rng(2)
    ids = np.array([0] * 5 + [1] * 3 + [2] * 4 + [3] * 1)  # patient 3 has no other image: left out
    centers = rng.normal(size=(4, 8))
    x = centers[ids] + rng.normal(0, 0.9, (len(ids), 8))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ours = retrieval_metrics(x, ids, n_boot=100, rng=np.random.default_rng(0))
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), k="max_bin_count",
                              knn_func=CustomKNN(CosineSimilarity()))
    ref = calc.get_accuracy(torch.as_tensor(x), torch.as_tensor(ids))
    assert ours["map_at_r"].value == pytest.approx(ref["mean_average_precision_at_r"])
    assert ours["precision_at_1"].value == pytest.approx(ref["precision_at_1"])
    assert ours["map_at_r"].n == 12
    # query vs a separate reference
    q, r = x[:6], x[6:]
    ours = retrieval_metrics(q, ids[:6], r, ids[6:], n_boot=0)
    ref = calc.get_accuracy(torch.as_tensor(q[5:]), torch.as_tensor(ids[5:6]), torch.as_tensor(r),
                            torch.as_tensor(ids[6:]))
    assert ours["precision_at_1"].value == pytest.approx(ref["precision_at_1"])  # only patient 1's query has a match


def test_one_per_identity():
    ids = np.array([3, 3, 1, 2, 2, 2])
    pick = one_per_identity(ids, np.random.default_rng(0))
    assert sorted(ids[pick].tolist()) == [1, 2, 3] and len(set(pick.tolist())) == 3


# ----------------------------------------------------------------- who plays which role


def _metadata(folder: Path, rows: list[tuple[str, str | None]]):
    cols = "path,patient_id" if any(p for _, p in rows) else "path"
    text = "\n".join([cols] + [f"{f},{p}" if p else f for f, p in rows]) + "\n"
    (folder / "metadata.csv").write_text(text)


def _set(folder: Path, patients: list[str | None], seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    rows = []
    for i, p in enumerate(patients):
        _save(folder / f"i{i:03d}.png", rng.random((8, 8)))
        rows.append((f"i{i:03d}.png", p))
    _metadata(folder, rows)
    return ImageSet(folder, cache=None)


PARAMS = (0.25, 100)  # calibration_fraction, control_images


def test_plan_without_holdout_is_patient_disjoint(tmp_path):
    real = _set(tmp_path / "r", [f"P{i // 3}" for i in range(24)])  # 8 patients x 3 images
    plan = make_plan(real, None, *PARAMS, np.random.default_rng(0))
    assert plan.mode == "patient" and plan.source == "split"
    cal = set(plan.gallery_ids[plan.calibration.indices].tolist())
    assert len(cal) == 2 and not cal & set(plan.gallery_ids[plan.train].tolist())
    probes = plan.probes[0].indices
    assert len(probes) == 6 and not set(probes) & set(plan.train)  # one withheld image per training patient
    assert set(plan.gallery_ids[probes]) <= set(plan.gallery_ids[plan.train])  # ... who still trains on others
    assert any("no usable holdout" in n for n in plan.notes)
    assert all(p.startswith("pt-") for p in plan.gallery_patients)


def test_plan_with_holdout_sharing_patients(tmp_path):
    real = _set(tmp_path / "r", [f"P{i // 2}" for i in range(12)])
    hold = _set(tmp_path / "h", ["P0", "P0", "Q1", "Q1", "Q2", "Q3"], seed=1)
    plan = make_plan(real, hold, *PARAMS, np.random.default_rng(0))
    assert plan.source == "holdout" and plan.calibration.indices.tolist() == [2, 3, 4, 5]
    shared = [q for q in plan.probes if q.imageset is hold][0]
    assert shared.indices.tolist() == [0, 1] and (shared.self_index == -1).all()
    assert any("shares 1 patient" in n for n in plan.notes)
    # a holdout made only of training patients cannot calibrate: the real set is split instead
    plan = make_plan(real, _set(tmp_path / "h2", ["P1", "P2"], seed=2), *PARAMS, np.random.default_rng(0))
    assert plan.source == "split"


def test_plan_fallbacks_and_refusals(tmp_path):
    no_ids = _set(tmp_path / "a", [None] * 10)
    plan = make_plan(no_ids, None, *PARAMS, np.random.default_rng(0))
    assert plan.mode == "image" and "no patient IDs" in plan.notes[0] and not plan.probes
    singles = _set(tmp_path / "b", [f"P{i}" for i in range(10)])
    assert make_plan(singles, None, *PARAMS, np.random.default_rng(0)).mode == "image"
    hold_no_ids = _set(tmp_path / "c", [None] * 4, seed=3)
    plan = make_plan(_set(tmp_path / "d", [f"P{i // 2}" for i in range(12)]), hold_no_ids, *PARAMS,
                     np.random.default_rng(0))
    assert plan.source == "split" and any("cannot be shown to be unseen" in n for n in plan.notes)
    with pytest.raises(NotEnoughData, match="single patient"):
        make_plan(_set(tmp_path / "e", ["P"] * 6), None, *PARAMS, np.random.default_rng(0))
    with pytest.raises(NotEnoughData, match="too few to split"):
        make_plan(_set(tmp_path / "f", ["A", "A", "B", "B", "C", "C"]), None, *PARAMS, np.random.default_rng(0))


# ----------------------------------------------------------------- the attack end to end


def test_learns_phantoms_and_flags_training_patients(leak_audit, case):
    code, audit, out = leak_audit
    check = audit["checks"][0]
    m = check["metrics"]
    assert code == 1 and check["status"] == "fail", check["reason"]
    ver = m["verification"]
    assert ver["auc"]["value"] >= 0.9 and ver["auc"]["ci"][0] > 0.75, ver
    assert ver["precision_at_1"]["value"] >= 0.8 and ver["map_at_r"]["ci"] is not None, m["network"]["training"]
    assert all(c["passed"] for c in check["controls"]), check["controls"]
    assert {c["name"] for c in check["controls"]} == {"unseen patients (cross-fitted)", "augmented training images",
                                                      "new images of training patients"}
    assert m["reidentified_fraction"]["value"] >= 0.5 and m["excess_p_value"] < 1e-3
    # flagged images name the right patient (as a salted hash)
    truth = {f"s{k:02d}_{r}.png": hash_id(p, b"test-salt") for k, p in enumerate(case["patients"]) for r in range(2)}
    right = [f["patient"] == truth[f["synthetic"]] for f in check["flagged"]]
    assert np.mean(right) >= 0.8 and all(f["score"] > check["thresholds"]["tau"] for f in check["flagged"])
    assert m["synthetic_retrieval"]["precision_at_1"]["value"] >= 0.7  # the leak set names its patients
    assert m["network"]["cached"] is False and m["network"]["training"]["steps"] > 0
    rows = list(csv.DictReader(open(out / "reidentification.csv")))
    assert len(rows) == 60 and {r["synthetic"] for r in rows if r["flagged"] == "1"} == {f["synthetic"] for f in
                                                                                          check["flagged"]}
    hist = check["data"]["histograms"]
    assert sum(hist["synthetic"]) == 60 and hist["lines"]["tau"] == check["thresholds"]["tau"]


def test_no_patient_id_in_clear_anywhere(leak_audit, case):
    import re

    _, _, out = leak_audit
    files = list(out.rglob("*")) + list(case["cache"].rglob("*.json"))
    text = "".join(f.read_text(errors="ignore") for f in files if f.is_file())
    # embedded images (plots, thumbnails) are base64: letters in them are not text anyone reads; an identifier
    # written into an image would be a pixel finding, not this test's
    text = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", text)
    assert text and "MRN" not in text
    assert all(p not in text for p in case["patients"])


def test_unseen_patients_pass_from_cache(leak_audit, case, capsys, monkeypatch, tmp_path):
    import audit.reidentification.network as reid_network

    _env(monkeypatch, case)

    def no_training(*a, **k):
        raise AssertionError("trained although the network is cached")

    monkeypatch.setattr(reid_network, "train_network", no_training)
    # the research policy only warns: here the check's own verdict is under test, not a drop action
    code, stdout, err = run_audit(capsys, case["novel"], "--real", case["train"], "--holdout", case["holdout"],
                                  "--checks", "reidentification", "--policy", "research", "--out", tmp_path / "o",
                                  "--json", *params())
    audit = json.loads(stdout)
    check = audit["checks"][0]
    # one check of the policy (--checks): a partial audit, never a release verdict, whatever the check found
    assert code == 1 and audit["verdict"] == "partial" and check["status"] in ("pass", "warn"), check["reason"]
    assert check["metrics"]["network"]["cached"] is True and check["metrics"]["excess_p_value"] >= 0.05
    assert check["metrics"]["synthetic_retrieval"]["value"] is None  # no patient to retrieve
    # the same network: the verification figures are those of the first audit
    first = leak_audit[1]["checks"][0]["metrics"]["verification"]
    assert check["metrics"]["verification"] == first
    # a different training setting is a different network: it would train
    code, _, err = run_audit(capsys, case["novel"], "--real", case["train"], "--holdout", case["holdout"], "--checks",
                             "reidentification", "--out", tmp_path / "o2", *params(epochs=25))
    assert code == 3 and "trained although" in err


def test_deterministic_leak_audit_from_cache(leak_audit, case, capsys, monkeypatch, tmp_path):
    _env(monkeypatch, case)
    code, stdout, _ = run_audit(capsys, case["leak"], "--real", case["train"], "--holdout", case["holdout"],
                                "--checks", "reidentification", "--out", tmp_path / "o", "--json", *params())
    again = json.loads(stdout)["checks"][0]
    first = leak_audit[1]["checks"][0]
    for key in ("flagged", "controls", "thresholds"):
        assert again[key] == first[key], key
    # golden numbers (seed 0).  Training the network is not bit-reproducible across thread counts (convolution
    # gradients are summed in another order): with a fixed 24 epochs 1 / 2 threads gave verification AUC 0.9649 /
    # 0.9552, P@1 0.9875 / 0.95, tau 0.9267 / 0.9248, 50 / 50 of 60 flagged.  Since early stopping (6 of the 30
    # training patients validate, so 24 train; 22 epochs) 1 thread gives AUC 0.9483, P@1 0.8625, tau 0.9020, 48
    # flagged: a little weaker, the price of patients set aside to decide when to stop; pinned with margins
    m = first["metrics"]
    assert_golden({"verification auc": m["verification"]["auc"]["value"],
                   "precision_at_1": m["verification"]["precision_at_1"]["value"], "tau": first["thresholds"]["tau"],
                   "n_flagged": m["n_flagged"], "calibration": m["calibration"]},
                  {"verification auc": pytest.approx(0.948, abs=0.04), "precision_at_1": pytest.approx(0.86, abs=0.1),
                   "tau": pytest.approx(0.902, abs=0.035), "n_flagged": pytest.approx(48, abs=6),
                   "calibration": {"source": "holdout", "images": 80, "identities": 10}}, rel=0)


def test_without_holdout_calibrates_on_a_patient_split(case, capsys, tmp_path):
    rows = list(csv.DictReader(open(case["train"] / "metadata.csv")))
    keep = sorted({r["patient_id"] for r in rows})[:12]
    real = tmp_path / "real"
    real.mkdir()
    for r in rows:
        if r["patient_id"] in keep:
            shutil.copy(case["train"] / r["path"], real / r["path"])
    _metadata(real, [(r["path"], r["patient_id"]) for r in rows if r["patient_id"] in keep])
    code, stdout, _ = run_audit(capsys, case["leak"], "--real", real, "--checks", "reidentification",
                                "--out", tmp_path / "o", "--json", *params(epochs=6))
    check = json.loads(stdout)["checks"][0]
    m = check["metrics"]
    assert m["calibration"] == {"source": "split", "images": 16, "identities": 2}  # 2 of 12 patients, 8 images each
    assert any("no usable holdout" in n for n in m["notes"])
    # the network never saw the calibration patients, nor one withheld image of each other patient, nor the 2
    # (20%) training patients set aside to decide when to stop (7 images each once their probe is withheld)
    training = m["network"]["training"]
    assert training["identities"] == 8 and training["images"] == 96 - 16 - 10 - 2 * 7
    assert training["validation_identities"] == 2 and training["validation_source"] == "real training set"
    # calibration patients stay in the gallery but never match themselves (else every best match would be ~1)
    assert check["thresholds"]["tau"] < 0.99
    assert check["thresholds"]["n_calibration_identities"] == 2


# ----------------------------------------------------------------- fallbacks and bad inputs


def test_image_level_fallback_says_so(case, capsys, tmp_path):
    real = tmp_path / "real"
    files = sorted(case["train"].glob("*.png"))[:48]
    real.mkdir()
    for f in files:
        shutil.copy(f, real / f.name)  # no metadata.csv: no patient IDs
    syn = tmp_path / "syn"
    syn.mkdir()
    for f in files[:4]:
        shutil.copy(f, syn / f.name)  # exact copies of training images
    code, stdout, err = run_audit(capsys, syn, "--real", real, "--checks", "reidentification", "--out", tmp_path / "o",
                                  "--json", *params(epochs=2, control_images=10))
    check = json.loads(stdout)["checks"][0]
    assert check["metrics"]["identity"] == "image"
    assert "no patient IDs" in check["metrics"]["notes"][0]
    assert "image-level identity" in check["reason"], check["reason"]
    assert check["metrics"]["verification"]["pairs"].startswith("an unseen image and an augmented view")
    # an exact copy is its training image's best match, whatever the network learned in two epochs
    rows = {r["synthetic"]: r for r in csv.DictReader(open(tmp_path / "o" / "reidentification.csv"))}
    assert all(rows[f.name]["nearest_real"] == f.name for f in files[:4])


def test_single_patient_is_inconclusive_with_reason(case, capsys, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    files = sorted(case["train"].glob("*.png"))[:5]
    for f in files:
        shutil.copy(f, real / f.name)
    _metadata(real, [(f.name, "MRN-ONLY") for f in files])
    # strict: an inconclusive re-identification fails the audit (default only warns)
    code, stdout, _ = run_audit(capsys, case["novel"], "--real", real, "--checks", "reidentification", "--policy",
                                "strict", "--out", tmp_path / "o", "--json", *params())
    check = json.loads(stdout)["checks"][0]
    assert code == 1 and check["status"] == "inconclusive" and "single patient" in check["reason"]
    assert "MRN-ONLY" not in stdout


@pytest.mark.parametrize("case_name", ["typo", "preset", "backbone", "weights_missing", "weights_mismatch", "views"])
def test_bad_settings_exit_2_one_line(case, capsys, tmp_path, case_name):
    extra = {"typo": ["--param", "reidentification.false_match_rat=0.01"],
             "preset": ["--param", "reidentification.preset=tpu"],
             "backbone": params(backbone="resnet19"),
             "weights_missing": params(backbone="resnet18", backbone_weights=tmp_path / "none.safetensors"),
             "weights_mismatch": params(backbone="resnet18", backbone_weights=_tiny_weights(tmp_path, "resnet34")),
             "views": params(views=1)}[case_name]
    code, _, err = run_audit(capsys, case["novel"], "--real", case["train"], "--checks", "reidentification",
                             "--out", tmp_path / "o", *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
    expect = {"typo": "did you mean 'false_match_rate'", "preset": "preset", "backbone": "did you mean 'resnet18'",
              "weights_missing": "none.safetensors", "weights_mismatch": "do not fit", "views": "views"}[case_name]
    assert expect in err


def _tiny_weights(folder: Path, arch: str, suffix: str = ".safetensors") -> Path:
    """A randomly initialised torchvision state dict (classifier included, as downloaded weights have it)."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    path = folder / f"{arch}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_load_from_local_file(tmp_path, suffix):
    from audit.reidentification.network import build_network, resolve_config

    path = _tiny_weights(tmp_path, "resnet18", suffix)
    from safetensors.torch import load_file

    saved = torch.load(path, weights_only=True) if suffix == ".pth" else load_file(str(path))
    cfg = resolve_config("cpu", {"backbone": "resnet18", "backbone_weights": str(path), "image_size": 32})
    net = build_network(cfg, torch.Generator().manual_seed(3))
    assert torch.equal(net[0].conv1.weight, saved["conv1.weight"])
    assert torch.equal(net[0].layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert cfg.backbone_weights_sha256 and net(torch.zeros(2, 3, 32, 32)).shape == (2, 128)
    fresh = build_network(resolve_config("cpu", {"backbone": "resnet18"}), torch.Generator().manual_seed(3))
    assert not torch.equal(fresh[0].conv1.weight, saved["conv1.weight"])


def test_network_pieces():
    from audit.reidentification.network import IdentityBatches, augment, build_network, prepare, resolve_config

    ids = np.array([0, 0, 0, 1, 2, 2])  # patient 1 has one image: its views are copies, made different by augment
    idx, labels = IdentityBatches(ids, per_batch=3, views=4, rng=np.random.default_rng(0))()
    assert len(idx) == 12 and sorted(set(labels.tolist())) == [0, 1, 2]
    assert all(ids[i] == ids[idx[labels == labels[n]][0]] for n, i in enumerate(idx))
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1 and not torch.allclose(x, y)
    assert torch.equal(y, augment(x, torch.Generator().manual_seed(1)))  # seeded
    u8 = prepare(np.random.default_rng(0).random((2, 1, 40, 30)), resolve_config("cpu", {"image_size": 24}))
    assert u8.dtype == torch.uint8 and tuple(u8.shape) == (2, 1, 24, 24)
    gpu = resolve_config("gpu", {})
    assert (gpu.backbone, gpu.image_size) == ("resnet50", 224)
    net = build_network(gpu, torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 128)
