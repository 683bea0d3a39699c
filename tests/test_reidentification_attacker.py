"""reidentification with attacker data (--attacker-data) and early stopping of the attacker's network."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from audit import cli as audit_cli
from audit.reidentification.plan import make_plan, training_data
from synthgate.imageset import ImageSet
from synthgate.phantoms import write_phantoms

SIZE = 32
#: fast settings (no fixed epoch count: early stopping decides, within 60 epochs)
NET = {"preset": "cpu", "image_size": SIZE, "epochs": 60, "patience": 3, "batch_size": 32, "lr": 3e-3,
       "n_boot": 100, "time_budget_per_image": 0}  # no time budget: a loaded machine must not change what is learned

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def params(**extra) -> list[str]:
    return [a for k, v in {**NET, **extra}.items() for a in ("--param", f"reidentification.{k}={v}")]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A small hospital (5 training patients, 10 unseen), public phantoms of 60 other patients, a novel set."""
    root = tmp_path_factory.mktemp("reid-attacker")
    write_phantoms(root / "hosp", patients=15, images_per_patient=4, size=SIZE, seed=31, holdout_fraction=0.67)
    write_phantoms(root / "public", patients=60, images_per_patient=4, size=SIZE, seed=32, holdout_fraction=0)
    write_phantoms(root / "novel", patients=10, images_per_patient=2, size=SIZE, seed=33, holdout_fraction=0)
    public_ids = {r["patient_id"] for r in csv.DictReader(open(root / "public" / "train" / "metadata.csv"))}
    return {"root": root, "train": root / "hosp" / "train", "holdout": root / "hosp" / "holdout",
            "public": root / "public" / "train", "novel": root / "novel" / "train", "public_ids": public_ids}


def audit(capsys, sets, out: Path, *extra) -> tuple[int, dict, str]:
    code = audit_cli.main(["check", str(sets["novel"]), "--real", str(sets["train"]), "--holdout",
                           str(sets["holdout"]), "--checks", "reidentification", "--policy", "research",
                           "--out", str(out), "--json", *map(str, extra), *params()])
    stdout, err = capsys.readouterr()
    return code, json.loads(stdout) if stdout.strip() else {}, err


# ----------------------------------------------------------------- the point of it


def test_attacker_data_rescues_a_validation_that_fails_without_it(sets, capsys, tmp_path):
    _, alone, _ = audit(capsys, sets, tmp_path / "alone")
    _, helped, _ = audit(capsys, sets, tmp_path / "helped", "--attacker-data", sets["public"])
    a, h = alone["checks"][0], helped["checks"][0]
    auc_a, auc_h = (c["metrics"]["verification"]["auc"]["value"] for c in (a, h))
    # 5 training patients cannot teach a verifier what a patient is: it cannot vouch for anything
    assert a["status"] == "inconclusive" and "cannot re-identify real patients" in a["reason"], (auc_a, a["reason"])
    # 60 public patients can, judged on the same 10 unseen hospital patients (never the public data)
    assert h["status"] in ("pass", "warn"), (auc_h, h["reason"])
    assert auc_h >= 0.8 and auc_h > auc_a + 0.05, (auc_a, auc_h)
    assert h["metrics"]["calibration"] == a["metrics"]["calibration"] == {"source": "holdout", "images": 40,
                                                                           "identities": 10}
    net = h["metrics"]["network"]
    assert net["cached"] is False and net["validation_source"] == "attacker data"
    att = net["attacker_data"]
    assert {k: att[k] for k in ("sets", "images", "patients")} == {"sets": 1, "images": 240, "patients": 60}
    assert att["validation_images"] == 48 and att["training_images"] == 192  # 12 of 60 patients validate
    training = net["training"]
    # every hospital training image but the 5 withheld probes trains, with the 48 public patients
    assert training["identities"] == 5 + 48 and training["images"] == 15 + 192
    assert training["validation_identities"] == 12
    assert len(training["validation_auc_per_epoch"]) == training["epochs_run"] <= 60
    assert training["stopped"].startswith(("validation AUC did not improve", "reached the most epochs",
                                           "step budget"))
    assert training["step_budget"] == 200  # the smallest budget: 0.5 x 207 images is less
    entry = helped["inputs"]["attacker_data"]
    assert len(entry) == 1 and entry[0]["n_patients"] == 60 and entry[0]["n_images"] == 240
    assert entry[0]["sha256"] == ImageSet(sets["public"]).digest and alone["inputs"]["attacker_data"] == []
    assert a["metrics"]["network"]["attacker_data"] is None
    assert a["metrics"]["network"]["validation_source"] == "real training set"
    # no public patient ID anywhere: audit.json, the report, the CSV, the cached network's metadata
    files = [f for f in (tmp_path / "helped").rglob("*") if f.is_file()]
    files += list(Path(__import__("os").environ["SYNTHGATE_CACHE_DIR"]).rglob("*.json"))
    text = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", "".join(f.read_text(errors="ignore") for f in files))
    assert "attacker data" in (tmp_path / "helped" / "report.html").read_text()
    assert text and not any(p in text for p in sets["public_ids"])


# ----------------------------------------------------------------- refusals


def _copy_set(src: Path, dst: Path, n: int | None = None, with_ids: bool = True) -> Path:
    rows = list(csv.DictReader(open(src / "metadata.csv")))[:n]
    dst.mkdir(parents=True)
    for r in rows:
        shutil.copy(src / r["path"], dst / r["path"])
    if with_ids:
        (dst / "metadata.csv").write_text("path,patient_id\n" + "".join(f"{r['path']},{r['patient_id']}\n"
                                                                         for r in rows))
    return dst


@pytest.mark.parametrize("case", ["no_ids", "same_folder", "inside_real", "shares_holdout_file",
                                  "reencoded_holdout_image", "empty", "missing"])
def test_bad_attacker_data_exit_2_one_line(sets, capsys, tmp_path, case):
    if case == "no_ids":
        bad = _copy_set(sets["public"], tmp_path / "a", 8, with_ids=False)
    elif case == "same_folder":
        bad = sets["train"]
    elif case == "inside_real":
        bad = sets["train"].parent  # a folder holding the real set
    elif case == "shares_holdout_file":
        bad = _copy_set(sets["public"], tmp_path / "a", 8)
        first = next(r for r in csv.DictReader(open(sets["holdout"] / "metadata.csv")))
        shutil.copy(sets["holdout"] / first["path"], bad / "copied.png")
        with open(bad / "metadata.csv", "a") as fh:
            fh.write("copied.png,PUBLIC-X\n")
    elif case == "reencoded_holdout_image":  # red team: other bytes, the same pixels
        from PIL import Image

        bad = _copy_set(sets["public"], tmp_path / "a", 8)
        first = next(r for r in csv.DictReader(open(sets["holdout"] / "metadata.csv")))
        Image.open(sets["holdout"] / first["path"]).save(bad / "copied.png", compress_level=1)
        assert (bad / "copied.png").read_bytes() != (sets["holdout"] / first["path"]).read_bytes()
        with open(bad / "metadata.csv", "a") as fh:
            fh.write("copied.png,PUBLIC-X\n")
    elif case == "empty":
        bad = tmp_path / "empty"
        bad.mkdir()
    else:
        bad = tmp_path / "nowhere"
    code, _, err = audit(capsys, sets, tmp_path / "o", "--attacker-data", bad)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
    expect = {"no_ids": "patient_id on every image", "same_folder": "overlaps", "inside_real": "overlaps",
              "shares_holdout_file": "shares 1 image file(s) with the holdout set",
              "reencoded_holdout_image": "1 image(s) pixel-identical to images of the holdout set", "empty": "no images",
              "missing": "does not exist"}[case]
    assert expect in err, err


def test_api_takes_attacker_data_and_refuses_the_real_set(sets, tmp_path):
    import audit as audit_api
    from synthgate.errors import SynthgateError

    with pytest.raises(SynthgateError, match="overlaps"):
        audit_api.check(sets["novel"], real=sets["train"], holdout=sets["holdout"], checks=["reidentification"],
                        attacker_data=[sets["public"], sets["train"]])


# ----------------------------------------------------------------- pieces


def _tiny_set(folder: Path, pids: list[str], seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    from conftest import write_png

    for i in range(len(pids)):
        write_png(folder / f"i{i:03d}.png", (rng.random((16, 16)) * 255).astype(np.uint8))
    (folder / "metadata.csv").write_text("path,patient_id\n" + "".join(f"i{i:03d}.png,{p}\n"
                                                                       for i, p in enumerate(pids)))
    return ImageSet(folder)


def test_training_data_roles(tmp_path):
    real = _tiny_set(tmp_path / "r", [f"P{i // 3}" for i in range(30)], 0)  # 10 patients x 3
    public = _tiny_set(tmp_path / "a", [f"P{i // 2}" for i in range(40)], 1)  # 20 patients x 2, same ID strings
    plan = make_plan(real, None, 0.2, 100, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    alone = training_data(plan, real, (), True, 0.2, 100, rng)
    assert alone.validation_source == "real training set" and [p.role for p in alone.validation] == ["real"]
    assert len(np.unique(alone.identities("validation"))) == 2  # 20% of the 8 training patients, at least 2
    assert not set(alone.identities("validation")) & set(alone.identities("train"))
    assert not set(alone.identities("validation")) & set(plan.calibration.ids)  # never the unseen patients
    helped = training_data(plan, real, (public,), True, 0.2, 100, rng)
    assert helped.validation_source == "attacker data" and {p.role for p in helped.validation} == {"attacker"}
    real_train = [p for p in helped.train if p.role == "real"]
    assert len(real_train) == 1 and np.array_equal(real_train[0].indices, plan.train)  # every real image trains
    # public patient "P0" is not the hospital's "P0": its own identity
    assert not set(helped.identities("train")[len(plan.train):]) & set(plan.gallery_ids)
    assert len(np.unique(helped.identities("validation"))) == 4 and helped.attacker == {"sets": 1, "images": 40,
                                                                                         "patients": 20}
    capped = training_data(plan, real, (public,), True, 0.5, 3, rng)
    assert len(np.unique(capped.identities("validation"))) == 3
    off = training_data(plan, real, (public,), False)
    assert off.validation == () and off.validation_source is None


def test_early_stopping_and_time_budget():
    from audit.reidentification.network import resolve_config, train_network

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(48, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    ids = np.repeat(np.arange(12), 4)
    val = ((torch.rand(16, 1, 16, 16, generator=g) * 255).to(torch.uint8), np.repeat(np.arange(4), 4))
    base = {"image_size": 16, "batch_size": 16, "embedding_dim": 8, "epochs": 40}
    # random pixels: nothing generalises to new identities, so validation plateaus and training stops early
    cfg = resolve_config("cpu", {**base, "patience": 1, "min_delta": 0.05})
    _, h = train_network(images, ids, cfg, torch.device("cpu"), torch.Generator().manual_seed(1),
                         np.random.default_rng(0), progress=False, validation=val)
    assert h["epochs_run"] < 40 and h["stopped"].startswith("validation AUC did not improve for 1 epochs"), h
    assert len(h["validation_auc_per_epoch"]) == h["epochs_run"] and h["lr_drops"] == 2
    assert 1 <= h["best_epoch"] <= h["epochs_run"] and h["steps_per_epoch"] == 10
    # a time budget far below one epoch stops after the first
    cfg = resolve_config("cpu", {**base, "patience": 5, "time_budget_per_image": 1e-6, "min_time_budget": 0.0})
    _, h = train_network(images, ids, cfg, torch.device("cpu"), torch.Generator().manual_seed(1),
                         np.random.default_rng(0), progress=False, validation=val)
    assert h["epochs_run"] == 1 and h["stopped"].startswith("time budget") and h["time_budget_s"] == 0.0
    # a step budget stops at whole epochs, the same on any machine: 25 steps -> 3 epochs of 10 steps
    cfg = resolve_config("cpu", {**base, "patience": 5, "step_budget_per_image": 0.01, "min_step_budget": 25})
    _, h = train_network(images, ids, cfg, torch.device("cpu"), torch.Generator().manual_seed(1),
                         np.random.default_rng(0), progress=False, validation=val)
    assert h["epochs_run"] == 3 and h["steps"] == 30 and h["step_budget"] == 25
    assert h["stopped"] == "step budget of 25 steps reached (3 epochs of 10 steps)"
    # patience 0: the fixed schedule, every epoch, no validation
    cfg = resolve_config("cpu", {**base, "epochs": 3, "patience": 0})
    _, h = train_network(images, ids, cfg, torch.device("cpu"), torch.Generator().manual_seed(1),
                         np.random.default_rng(0), progress=False, validation=val)
    assert h["epochs_run"] == 3 and h["steps"] == 9 and "validation_auc_per_epoch" not in h
    assert h["early_stopping"] == "off (patience 0)"


def test_shareable_edition_hides_the_attacker_data_path(tmp_path):
    from audit.shareable import shareable

    path = str(tmp_path / "hospital-public-copy")
    doc = {"inputs": {"synthetic": {"path": str(tmp_path / "syn"), "n_images": 1, "sha256": "s"},
                      "attacker_data": [{"path": path, "n_images": 4, "sha256": "a", "n_patients": 2}]},
           "checks": [{"name": "reidentification", "reason": f"trained with {path}"}], "released": []}
    out = shareable(doc)
    assert path not in json.dumps(out) and out["inputs"]["attacker_data"][0]["path"] == "the attacker data"
    assert out["inputs"]["attacker_data"][0]["n_patients"] == 2
