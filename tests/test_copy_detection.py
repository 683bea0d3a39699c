"""copy_detection: the metric by hand, the bound's properties, exactness, controls, CLI and bad inputs."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from audit import cli as audit_cli
from audit.copy_detection.check import holdout_threshold, plant
from audit.core.tiled import ExactTiledSearch, TiledMetric, TileLayout, brute_force, edges, tiled_distance_np
from synthgate.phantoms import generate
from conftest import assert_golden, only_policy, save_unit_png


def tiled(a, b, grid=4):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.ndim == 2:
        a, b = a[None], b[None]
    m = TiledMetric(TileLayout(a.shape[1], a.shape[2], a.shape[0], grid=grid))
    return float(m.exact(a[None], b[None])[0])


# ------------------------------------------------------------------- metric


def test_distance_by_hand():
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    b[:2, :2] = 0.3  # one tile of a 2x2 grid differs by 0.3 everywhere
    assert tiled(a, b, grid=2) == pytest.approx(0.3)
    assert tiled(a, np.full((4, 4), 0.1), grid=2) == pytest.approx(0.1)
    c = np.zeros((4, 4))
    c[0, 0] = 0.4  # one pixel of a 4-pixel tile: RMS = sqrt(0.16 / 4) = 0.2
    assert tiled(a, c, grid=2) == pytest.approx(0.2)
    assert tiled(a, a, grid=2) == 0.0


def test_uneven_tiles_by_hand():
    assert edges(5, 2) == [0, 2, 5]
    a, b = np.zeros((5, 5)), np.zeros((5, 5))
    b[4, 4] = 0.6  # bottom-right tile is 3x3: sqrt(0.36 / 9) = 0.2
    assert tiled(a, b, grid=2) == pytest.approx(0.2)


def test_matches_medisyn_formula_on_8bit_rgb():
    rng = np.random.default_rng(0)
    p1 = rng.integers(0, 256, (16, 16, 3)).astype(np.float64)
    p2 = np.clip(p1 + rng.integers(-30, 30, p1.shape), 0, 255)
    worst = 0.0
    for i in range(4):
        for j in range(4):
            t1, t2 = p1[4 * i:4 * i + 4, 4 * j:4 * j + 4], p2[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            worst = max(worst, np.linalg.norm(t1 - t2) / np.sqrt(255**2 * t1.size))
    ours = tiled((p1 / 255).transpose(2, 0, 1), (p2 / 255).transpose(2, 0, 1))
    assert ours == pytest.approx(worst, rel=1e-6)
    assert tiled_distance_np(p1 / 255, p2 / 255) == pytest.approx(worst, rel=1e-9)


@pytest.mark.parametrize("shape,grid,pool", [((1, 32, 32), 4, 8), ((3, 37, 29), 4, 8), ((1, 64, 48), 3, 5),
                                             ((1, 20, 24), 5, 2), ((1, 16, 16), 1, 4)])
def test_bound_never_exceeds_distance(shape, grid, pool):
    rng = np.random.default_rng(1)
    layout = TileLayout(shape[1], shape[2], shape[0], grid=grid, pool=pool)
    m = TiledMetric(layout)
    for scale in (0.01, 0.1, 0.5):
        a = rng.random((20, *shape)).astype(np.float32)
        b = np.clip(a + rng.normal(0, scale, a.shape), 0, 1).astype(np.float32)
        exact = m.exact(a, b).numpy()
        fa, fb = m.features(a).double(), m.features(b).double()
        bound = torch.sqrt(((fa - fb) ** 2).sum(-1).amax(1)).numpy()
        whole = np.sqrt(((a - b).astype(np.float64) ** 2).mean(axis=(1, 2, 3)))
        assert np.all(bound <= exact + 1e-6)  # float32 features; the search also lowers it by BOUND_SLACK
        assert np.all(whole <= exact + 1e-6)  # whole-image RMS never exceeds the max over tiles
        matrix = TiledMetric.bound_sq(m.features(a), m.features(b)).clamp_min(0).sqrt().numpy()
        assert np.all(np.diag(matrix) <= exact + 1e-6)


def _smooth_set(rng, n, shape):
    from scipy.ndimage import gaussian_filter

    x = rng.random((n, *shape))
    x = np.stack([gaussian_filter(v, (0, 1.5, 1.5)) for v in x])
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 24, 20)])
def test_exact_search_equals_brute_force(shape):
    rng = np.random.default_rng(2)
    refs = _smooth_set(rng, 150, shape)
    queries = np.clip(refs[:30] + rng.normal(0, 0.08, (30, *shape)), 0, 1).astype(np.float32)
    queries = np.concatenate([queries, _smooth_set(rng, 10, shape)])
    m = TiledMetric(TileLayout(shape[1], shape[2], shape[0]))
    search = ExactTiledSearch(m, m.features(refs), lambda idx: refs[idx], query_block=7, ref_block=32)
    idx, dist = search.search(queries, k=5)
    b_idx, b_dist, _ = brute_force(queries, refs, k=5)
    assert np.array_equal(idx, b_idx)
    assert np.allclose(dist, b_dist, atol=1e-12)  # the same exact function on both sides
    assert search.stats.exact_pairs < 40 * 150  # it pruned


def test_exact_search_excluding_self():
    rng = np.random.default_rng(3)
    refs = _smooth_set(rng, 60, (1, 16, 16))
    refs[7] = refs[3]  # a duplicate pair
    m = TiledMetric(TileLayout(16, 16, 1))
    search = ExactTiledSearch(m, m.features(refs), lambda idx: refs[idx])
    idx, dist = search.search(refs, k=1, exclude=list(range(60)))
    assert idx[3, 0] == 7 and idx[7, 0] == 3 and dist[3, 0] == 0.0
    _, _, full = brute_force(refs, refs, k=60)
    np.fill_diagonal(full, np.inf)
    assert np.allclose(dist[:, 0], full.min(1))


# ------------------------------------------------------------ rule helpers


def test_holdout_threshold_conformal():
    d = np.arange(1, 201) / 1000.0  # 200 holdout distances 0.001 .. 0.2
    tau, k, _ = holdout_threshold(d, 0.01)
    assert k == 2 and tau == pytest.approx(0.002)  # floor(0.01 * 201) = 2
    tau, k, note = holdout_threshold(d[:50], 0.01)
    assert k == 1 and tau == pytest.approx(0.001) and "cannot resolve" in note


def test_calibrated_by_hand():
    from audit.copy_detection.check import CopyDetection
    from audit.copy_detection.tiled_side import TiledSide

    c = CopyDetection(alpha=0.5, n_neighbors=3)
    dist = np.array([[0.1, 0.2, 0.3, 0.9]])
    # 0.1 / (0.5 * mean(0.1, 0.2, 0.3)) = 0.1 / 0.1 = 1.0
    assert TiledSide.calibrated(c.settings, dist)[0] == pytest.approx(1.0)


def test_planted_transforms_are_near_copies():
    rng = np.random.default_rng(0)
    imgs, _ = generate(patients=1, images_per_patient=1, size=64, seed=0)
    x = imgs[0].pixels[None]
    for t in ("exact", "noise", "brightness_contrast", "jpeg", "blur"):
        y = plant(x, t, rng)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
        assert tiled(x, y) < 0.08, t
    with pytest.raises(ValueError, match="must be one of"):
        plant(x, "flip", rng)


# ---------------------------------------------------------- audit end to end


@pytest.fixture(scope="module")
def copy_case(tmp_path_factory):
    """Training phantoms, a holdout, and a synthetic set: novel patients plus two planted near-copies.

    The holdout's 400 images resolve the ratio rule's false-alarm rate of 0.5 % (2 / 0.005 - 1 = 399 needed).
    """
    from synthgate.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("copy")
    write_phantoms(root / "p", patients=124, images_per_patient=4, size=32, seed=11, holdout_fraction=100 / 124)
    novel, _ = generate(patients=8, images_per_patient=2, size=32, seed=12)
    for i, im in enumerate(novel):
        save_unit_png(root / "syn" / f"novel_{i:02d}.png", im.pixels)
    rng = np.random.default_rng(0)
    train = sorted((root / "p" / "train").glob("*.png"))
    for j, f in enumerate(train[:2]):
        x = np.asarray(Image.open(f), np.float64) / 255
        save_unit_png(root / "syn" / f"copy_{j}.png", x + rng.normal(0, 0.015, x.shape))
    for i, im in enumerate(novel[:6]):
        save_unit_png(root / "clean" / f"novel_{i:02d}.png", im.pixels)
    return root


def run_audit(capsys, *argv):
    argv = list(map(str, argv))
    if "--checks" not in argv and "--policy" not in argv:  # the default policy also trains networks
        argv += ["--policy", str(only_policy("copy_detection", action="drop", max_drop_fraction=0.1))]
    code = audit_cli.main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_flags_planted_copies_and_only_them(copy_case, capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_audit(capsys, copy_case / "syn", "--real", copy_case / "p" / "train",
                                  "--holdout", copy_case / "p" / "holdout", "--out", out)
    assert code == 1, err
    audit = json.loads((out / "audit.json").read_text())
    check = audit["checks"][0]
    assert check["status"] == "fail" and audit["verdict"] == "fail"
    flagged = sorted(f["synthetic"] for f in check["flagged"])
    assert flagged == ["copy_0.png", "copy_1.png"]
    train = sorted(p.name for p in (copy_case / "p" / "train").glob("*.png"))
    assert {f["real"] for f in check["flagged"]} == set(train[:2])
    assert all(f["patient"].startswith("pt-") for f in check["flagged"])
    assert check["controls"][0]["passed"] and audit["control"]["passed"]
    assert audit["released"] == []
    for f in check["flagged"]:  # the default rule with a holdout is the ratio rule: its evidence
        assert f["rule"] == "ratio" and f["ratio"] < f["threshold"] and f["test"] in ("identity", "shift_zoom")
        assert f["distance"] <= f["second_distance"] and {"zoom", "dy", "dx", "inverted"} == set(f["transform"])
        assert f["transform"]["inverted"] is False  # a copy as it is matches as it is
    assert check["thresholds"]["rule"] == "ratio" and 0 < check["thresholds"]["tau_shift_zoom"] < 1
    rows = list(csv.DictReader(open(out / "copy_detection.csv")))
    assert len(rows) == 18 and {"synthetic", "nearest_real", "distance", "nearest_exact", "ratio_identity",
                                "ratio_shift_zoom"} <= set(rows[0])
    assert {r["synthetic"] for r in rows if r["flagged"] == "1"} == set(flagged)
    text = (out / "audit.json").read_text() + (out / "copy_detection.csv").read_text()
    assert "MRN" not in text  # patients only as salted hashes


def test_negative_control_independent_images_pass(copy_case, capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_audit(capsys, copy_case / "clean", "--real", copy_case / "p" / "train",
                                  "--holdout", copy_case / "p" / "holdout", "--out", out, "--json")
    audit = json.loads(stdout)
    assert code == 0, audit["checks"][0]["reason"]
    assert audit["verdict"] == "pass" and audit["checks"][0]["flagged"] == []
    assert sorted(audit["released"]) == sorted(p.name for p in (copy_case / "clean").glob("*.png"))
    for key in ("schema_version", "tool", "created", "inputs", "policy", "checks", "control", "verdict",
                "dropped", "released"):
        assert key in audit
    for name in ("synthetic", "real", "holdout"):
        assert {"path", "n_images", "sha256"} <= set(audit["inputs"][name])
    holdout = audit["checks"][0]["metrics"]["holdout"]
    far = holdout["false_alarms_ratio_rule"]  # cross-fitted on the holdout's two halves
    assert far["n"] == len(list((copy_case / "p" / "holdout").glob("*.png"))) == 400 and far["value"] <= 0.02
    ratio = audit["checks"][0]["metrics"]["ratio"]
    assert ratio["false_alarm_bound"] <= 0.005 and set(ratio["threshold"]) == {"identity", "shift_zoom"}


def test_failed_positive_control_makes_audit_invalid(copy_case, capsys, tmp_path):
    code, stdout, _ = run_audit(capsys, copy_case / "clean", "--real", copy_case / "p" / "train",
                                "--param", "copy_detection.rule=absolute",
                                "--param", "copy_detection.threshold=0.001", "--out", tmp_path / "o", "--json")
    audit = json.loads(stdout)
    check = audit["checks"][0]
    assert code == 1 and check["status"] == "error" and audit["verdict"] == "fail"
    assert "positive control failed" in check["reason"] and not audit["control"]["passed"]


def test_rules_selectable_and_deterministic(copy_case, capsys, tmp_path):
    results = []
    for i, rule in enumerate(("absolute", "calibrated", "any", "absolute")):
        code, stdout, _ = run_audit(capsys, copy_case / "syn", "--real", copy_case / "p" / "train",
                                    "--holdout", copy_case / "p" / "holdout", "--param", f"copy_detection.rule={rule}",
                                    "--out", tmp_path / f"o{i}", "--json")
        check = json.loads(stdout)["checks"][0]
        assert check["thresholds"]["rule"] == rule
        assert {"copy_0.png", "copy_1.png"} <= {f["synthetic"] for f in check["flagged"]}
        results.append(check)
    for key in ("metrics", "flagged", "controls"):
        assert results[0][key] == results[3][key], key
    # golden numbers (seed 0; identical with 1 and 2 torch threads; re-measured when copy_case grew a 400-image
    # holdout for the ratio rule); rel 1e-5: the tiled distance is float32
    m = results[0]["metrics"]
    flagged = {f["synthetic"]: f["distance"] for f in results[0]["flagged"]}
    assert_golden({"nearest min": m["nearest_distance"]["min"], "nearest median": m["nearest_distance"]["median"],
                   "holdout median": m["holdout"]["nearest_distance"]["median"],
                   "tau_holdout": results[0]["thresholds"]["tau_holdout"], "copy_0": flagged["copy_0.png"],
                   "copy_1": flagged["copy_1.png"], "n_flagged": [r["metrics"]["n_flagged"] for r in results]},
                  {"nearest min": 0.01763344048293218, "nearest median": 0.1754483243044539,
                   "holdout median": 0.17972991789876142, "tau_holdout": 0.12644493653315478, "copy_0": 0.017749,
                   "copy_1": 0.017633, "n_flagged": [2, 2, 2, 2]}, rel=1e-5)


def test_near_duplicates_inside_synthetic_set_warn(copy_case, capsys, tmp_path):
    syn = tmp_path / "syn"
    novel, _ = generate(patients=2, images_per_patient=1, size=32, seed=99)
    rng = np.random.default_rng(5)
    for i in range(11):  # a clique of near-identical generations
        save_unit_png(syn / f"mode_{i:02d}.png", novel[0].pixels + rng.normal(0, 0.005, novel[0].pixels.shape))
    save_unit_png(syn / "other.png", novel[1].pixels)
    code, stdout, _ = run_audit(capsys, syn, "--real", copy_case / "p" / "train", "--holdout",
                                copy_case / "p" / "holdout", "--out", tmp_path / "o", "--json")
    check = json.loads(stdout)["checks"][0]
    dup = check["metrics"]["duplicates"]["synthetic"]
    assert dup["largest_group"] == 11 and check["status"] == "warn" and code == 0
    assert "near-duplicates" in check["reason"]


def test_training_duplicates_across_patients_reported(tmp_path, capsys):
    from synthgate.phantoms import write_phantoms

    write_phantoms(tmp_path / "p", patients=6, images_per_patient=2, size=32, seed=3)
    train = tmp_path / "p" / "train"
    files = sorted(train.glob("*.png"))
    rows = list(csv.DictReader(open(train / "metadata.csv")))
    other = next(r for r in rows if r["patient_id"] != rows[0]["patient_id"])
    shutil.copy(files[0], train / "dup.png")  # the same image filed under another patient
    with open(train / "metadata.csv", "a", newline="") as fh:  # every column of the header, CSV-quoted
        csv.DictWriter(fh, fieldnames=list(rows[0])).writerow({**rows[0], "path": "dup.png",
                                                             "patient_id": other["patient_id"]})
    novel, _ = generate(patients=2, images_per_patient=1, size=32, seed=50)
    for i, im in enumerate(novel):
        save_unit_png(tmp_path / "syn" / f"s{i}.png", im.pixels)
    code, stdout, _ = run_audit(capsys, tmp_path / "syn", "--real", train, "--out", tmp_path / "o", "--json")
    dup = json.loads(stdout)["checks"][0]["metrics"]["duplicates"]["training"]
    assert dup["pairs"] >= 1 and dup["pairs_across_patients"] >= 1


# ------------------------------------------------------------- bad inputs


def test_different_sizes_and_rgb_are_harmonised_and_reported(copy_case, capsys, tmp_path):
    novel, _ = generate(patients=3, images_per_patient=1, size=48, seed=70)
    for i, im in enumerate(novel):
        rgb = np.repeat(im.pixels[..., None], 3, axis=2)
        Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save((tmp_path / f"s{i}.png"))
    code, stdout, err = run_audit(capsys, tmp_path, "--real", copy_case / "p" / "train", "--out",
                                  tmp_path.parent / "o_rgb", "--json")
    audit = json.loads(stdout)
    notes = audit["inputs"]["geometry"]["notes"]
    assert audit["inputs"]["geometry"]["height"] == 32 and audit["inputs"]["geometry"]["channels"] == 1
    assert any("resized" in n for n in notes) and any("luma" in n for n in notes)


@pytest.mark.parametrize("case", ["empty", "no_real", "overlap", "unknown_check", "bad_param", "bad_rule",
                                  "missing_real", "corrupt"])
def test_bad_inputs_exit_2_one_line(copy_case, capsys, tmp_path, case):
    syn, train = copy_case / "syn", copy_case / "p" / "train"
    argv = [syn, "--real", train, "--out", tmp_path / "o"]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        argv[0] = tmp_path / "empty"
    elif case == "no_real":
        argv = [syn, "--out", tmp_path / "o"]
    elif case == "overlap":
        argv += ["--holdout", train]
    elif case == "unknown_check":
        argv += ["--checks", "copy_detektion"]
    elif case == "bad_param":
        argv += ["--param", "copy_detection.treshold=0.2"]
    elif case == "bad_rule":
        argv += ["--param", "copy_detection.rule=magic"]
    elif case == "missing_real":
        argv[2] = tmp_path / "nope"
    elif case == "corrupt":
        shutil.copytree(syn, tmp_path / "syn")
        (tmp_path / "syn" / "zz.png").write_bytes(b"\x89PNG corrupt")
        argv[0] = tmp_path / "syn"
    code, out, err = run_audit(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # nothing half-written
    if case == "bad_param":
        assert "did you mean 'threshold'" in err
    if case == "corrupt":
        assert "zz.png" in err


def test_existing_foreign_output_folder_refused(copy_case, capsys, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("keep me")
    code, _, err = run_audit(capsys, copy_case / "clean", "--real", copy_case / "p" / "train", "--out", tmp_path / "o")
    assert code == 2 and "was not written by `audit check`" in err
    assert (tmp_path / "o" / "precious.txt").read_text() == "keep me"


# ------------------------------------------------ optional embedding evidence


def _tiny_open_clip(folder):
    """A tiny randomly initialised open_clip model saved in the local-dir layout BiomedCLIP uses."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    return folder


def test_embedding_retrieval_reported_as_extra_evidence(copy_case, capsys, tmp_path):
    weights = _tiny_open_clip(tmp_path / "tiny_clip")
    out = tmp_path / "o"
    code, stdout, err = run_audit(capsys, copy_case / "syn", "--real", copy_case / "p" / "train", "--holdout",
                                  copy_case / "p" / "holdout", "--param",
                                  f"copy_detection.embedding_weights={weights}", "--out", out, "--json")
    check = json.loads(stdout)["checks"][0]
    emb = check["metrics"]["embedding"]
    assert emb["encoder"] == "tiny_clip" and 0.0 <= emb["agreement"] <= 1.0
    assert emb["flagged"] == 2 and emb["flagged_found_by_embedding"] + emb["flagged_missed_by_embedding"] >= 0
    # the exact search decides: the same images are flagged with or without the embedding
    assert sorted(f["synthetic"] for f in check["flagged"]) == ["copy_0.png", "copy_1.png"]
    rows = list(csv.DictReader(open(out / "copy_detection.csv")))
    assert all(r["embedding_nearest"] for r in rows)


def test_embedding_weights_missing_is_a_clear_error(copy_case, capsys, tmp_path):
    code, _, err = run_audit(capsys, copy_case / "clean", "--real", copy_case / "p" / "train", "--param",
                             f"copy_detection.embedding_weights={tmp_path / 'none'}", "--out", tmp_path / "o")
    assert code == 2 and "embedding weights folder does not exist" in err


def test_faiss_engine_is_exact_too():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    refs = _smooth_set(rng, 80, (1, 16, 16))
    queries = np.clip(refs[:10] + rng.normal(0, 0.05, (10, 1, 16, 16)), 0, 1).astype(np.float32)
    m = TiledMetric(TileLayout(16, 16, 1))
    idx, dist = ExactTiledSearch(m, m.features(refs), lambda i: refs[i], engine="faiss").search(queries, k=3)
    b_idx, b_dist, _ = brute_force(queries, refs, k=3)
    assert np.array_equal(idx, b_idx) and np.allclose(dist, b_dist)
    self_idx, _ = ExactTiledSearch(m, m.features(refs), lambda i: refs[i], engine="faiss").search(
        refs[:5], k=1, exclude=list(range(5)))
    assert all(self_idx[i, 0] != i for i in range(5))


def test_calibrated_decisions_are_exact_with_the_cheap_search():
    """Only the nearest is proven up front; the k nearest are proven where the < 1 decision needs them."""
    from audit.copy_detection.settings import CopyDetectionSettings
    from audit.copy_detection.tiled_side import TiledSide

    rng = np.random.default_rng(6)
    refs = _smooth_set(rng, 200, (1, 24, 24))
    queries = np.concatenate([np.clip(refs[:15] + rng.normal(0, 0.03, (15, 1, 24, 24)), 0, 1),
                              _smooth_set(rng, 15, (1, 24, 24))]).astype(np.float32)
    m = TiledMetric(TileLayout(24, 24, 1))
    s = CopyDetectionSettings(n_neighbors=20)
    side = TiledSide(m, ExactTiledSearch(m, m.features(refs), lambda i: refs[i]), k=20)
    idx, dist = side.search_queries(s, queries)
    b_idx, b_dist, _ = brute_force(queries, refs, k=20)
    assert np.array_equal(idx[:, 0], b_idx[:, 0]) and np.allclose(dist[:, 0], b_dist[:, 0])
    assert np.array_equal(side.calibrated(s, dist) < 1, side.calibrated(s, b_dist) < 1)
    assert np.all(dist >= b_dist - 1e-12)  # evaluated neighbours never look nearer than the truth
