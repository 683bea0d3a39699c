"""copy_detection's default ratio rule inside the check, on real picture crops: exactly brute force's decisions,
shifted and rescaled copies caught, novel crops passed, the planted-copy control, rule fallbacks, restored state."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import audit
from audit.copy_detection.ratio_statistic import RATIO_FLOOR, noise_bias, noise_margin, noise_sigma, ratio_statistic
from audit.core.controls import COPY_TRANSFORMS, TRANSFORMS, plant
from audit.core.shiftzoom import CopyLayout, CopyMetric, Transforms, brute_force
from conftest import only_policy, save_unit_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 48
PICTURES = ("camera", "astronaut", "coins", "brick", "grass", "gravel", "moon", "coffee", "chelsea", "text")
GEOMETRIC = ("shift_1", "shift_2", "shift_3", "rescale")


def _picture(name: str) -> np.ndarray:
    import skimage.data
    from skimage.color import rgb2gray

    img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
    if img.ndim == 3:
        return rgb2gray(img[..., :3] / 255.0)
    return img / 255.0


def _copy(pic, y, x, kind, rng):
    """A copy of the crop at ``(y, x)`` made from the whole picture (a shift shows what lay beyond the crop)."""
    from scipy.ndimage import map_coordinates

    if kind.startswith("shift_"):
        s = int(kind[-1])
        dy, dx = rng.choice([-s, s]), int(rng.integers(-s, s + 1))
        return pic[y + dy:y + dy + SIZE, x + dx:x + dx + SIZE]
    if kind == "rescale":
        zoom = rng.choice([0.95, 0.96, 0.97, 1.03, 1.04, 1.05])
        g = (SIZE - 1) / 2 + (np.arange(SIZE) - (SIZE - 1) / 2) / zoom
        yy, xx = np.meshgrid(y + g, x + g, indexing="ij")
        return map_coordinates(pic, [yy, xx], order=1)
    return plant(pic[None, y:y + SIZE, x:x + SIZE], kind, rng)[0]


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Training crops from the left half of ten bundled pictures; holdout and novel crops in alternating strips of
    the right half; synthetic = novel crops plus copies of training crops (shifted, rescaled, noisy, JPEG)."""
    root = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(3)
    train, origins, n_hold, n_novel = [], [], 0, 0
    for p, name in enumerate(PICTURES):
        pic = _picture(name)
        h, w = pic.shape
        for y in range(8, h - SIZE - 8, 40):
            for x in range(8, w // 2 - SIZE - 8, 40):
                train.append(pic[y:y + SIZE, x:x + SIZE])
                origins.append((p, y, x))
        for k, lo in enumerate(range(w // 2 + 4, w - SIZE, 104)):
            for y in range(4, h - SIZE - 4, 20):
                for x in range(lo, min(lo + 104, w) - SIZE, 24):
                    if k % 2 == 0 and n_hold < 420:
                        save_unit_png(root / "hold" / f"h{n_hold:04d}.png", pic[y:y + SIZE, x:x + SIZE])
                        n_hold += 1
                    elif k % 2 == 1 and n_novel < 300:
                        save_unit_png(root / "syn" / f"novel_{n_novel:03d}.png", pic[y:y + SIZE, x:x + SIZE])
                        n_novel += 1
    for i, t in enumerate(train):
        save_unit_png(root / "train" / f"t{i:04d}.png", t)
    content = np.array([np.std(t.reshape(8, SIZE // 8, 8, SIZE // 8).mean((1, 3))) for t in train])
    sources = rng.choice(np.nonzero(content > 0.05)[0], 36, replace=False)
    kinds = [("shift_1", "shift_2", "shift_3", "rescale", "noise_0.05", "jpeg_80")[i % 6] for i in range(36)]
    for j, (src, kind) in enumerate(zip(sources, kinds)):
        p, y, x = origins[src]
        save_unit_png(root / "syn" / f"copy_{j:02d}_{kind}.png", _copy(_picture(PICTURES[p]), y, x, kind, rng))
    return root


def _audit(root, **settings):
    policy = only_policy("copy_detection", action="warn", required=False, on_inconclusive="warn", **settings)
    result = audit.check(root / "syn", real=root / "train", holdout=root / "hold", policy=policy, progress=False)
    return result, result.result("copy_detection")


@pytest.fixture(scope="module")
def default_run(crops):
    return _audit(crops)


def _read(folder):
    files = sorted(folder.glob("*.png"))
    return [f.name for f in files], np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files])[:, None]


def test_flagged_set_equals_brute_force(crops, default_run):
    """Every synthetic image whose exact statistic is under a threshold is flagged, and no other."""
    _, r = default_run
    names, syn = _read(crops / "syn")
    _, train = _read(crops / "train")
    want = np.zeros(len(syn), bool)
    sigma = noise_sigma(syn)
    for test, tr in (("identity", Transforms(0, (1.0,))), ("shift_zoom", Transforms(3, (0.95, 1.0, 1.05)))):
        lay = CopyLayout(SIZE, SIZE, 1, pooled=8, transforms=tr)
        d = np.sort(brute_force(CopyMetric(lay), syn, train), axis=1)
        ratio = ratio_statistic(d[:, 0], d[:, 1], noise_bias(lay, sigma), RATIO_FLOOR, noise_margin(lay))
        want |= ratio < r.thresholds[f"tau_{test}"]
    got = {f.synthetic for f in r.flagged}
    assert got == {n for n, w in zip(names, want) if w}
    assert r.thresholds["rule"] == "ratio" and len(got) >= 30  # both outcomes occur: a test that could fail


def test_shifted_and_rescaled_copies_are_caught(default_run):
    _, r = default_run
    flagged = {f.synthetic: f for f in r.flagged}
    copies = [f"copy_{j:02d}_{k}.png" for j, k in
              enumerate(("shift_1", "shift_2", "shift_3", "rescale", "noise_0.05", "jpeg_80") * 6)]
    assert set(copies) <= set(flagged)
    for name in copies:
        ev = flagged[name].evidence
        assert ev["ratio"] < ev["threshold"] and ev["real"].startswith("t")
        if "shift_3" in name and ev["test"] == "shift_zoom":  # the matched transform is the one applied
            assert max(abs(ev["transform"]["dy"]), abs(ev["transform"]["dx"])) >= 2


def test_novel_crops_are_not_flagged_beyond_alpha(default_run):
    _, r = default_run
    novel = [f for f in r.flagged if f.synthetic.startswith("novel_")]
    # a holdout of 420 resolves alpha 0.005; allow 2 % of the 300 novel crops (they come from other strips of
    # the same pictures, only approximately exchangeable with the holdout)
    assert len(novel) <= 6, [f.reason for f in novel]
    far = r.metrics["holdout"]["false_alarms_ratio_rule"]
    assert far.n == 420 and far.value <= 0.02
    assert r.metrics["ratio"]["false_alarm_bound"] <= 0.005


def test_control_plants_every_counted_copy_and_reports_its_sources(default_run):
    _, r = default_run
    control = r.controls[0]
    assert control.passed, control.detail
    by = control.metrics["by_transform"]
    assert set(by) == set(COPY_TRANSFORMS) | {"inverted"} and all(v["caught"] == v["planted"] >= 2
                                                                  for v in by.values())
    skipped = control.metrics["skipped_sources"]
    assert "content_below_floor" in skipped and control.metrics["eligible_sources"] > 0
    assert "content >= 0.02" in control.detail


def test_any_adds_the_ratio_rule_to_carlinis_and_state_is_restored(crops, default_run):
    _, ratio = default_run
    _, any_ = _audit(crops, rule="any")
    _, holdout = _audit(crops, rule="holdout")
    ratio_set = {f.synthetic for f in ratio.flagged}
    any_set = {f.synthetic for f in any_.flagged}
    hold_set = {f.synthetic for f in holdout.flagged}
    assert ratio_set | hold_set <= any_set
    geometric = {n for n in ratio_set if n.startswith("copy_") and n.endswith(tuple(f"{g}.png" for g in GEOMETRIC))}
    assert len(geometric - hold_set) >= 5  # the pixel-aligned rule misses shifted / rescaled copies
    # the fitted real side is stored (authenticated) and restored for the next audit of the same real data
    result, again = _audit(crops, rule="any")
    assert any("restored" in note for note in result.decision.notes)
    assert [f.to_dict() for f in again.flagged] == [f.to_dict() for f in any_.flagged]


def test_planted_transforms():
    rng = np.random.default_rng(0)
    x = np.stack([_picture("camera")[100:164, 100:164]])
    assert TRANSFORMS == ("exact", "noise", "brightness_contrast", "jpeg", "blur")  # membership inference's plants
    for t in COPY_TRANSFORMS:
        y = plant(x, t, rng)
        assert y.shape == x.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1, t
    for s in (1, 2, 3):
        y = plant(x, f"shift_{s}", np.random.default_rng(s))
        found = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)
                 if np.allclose(y[0, 4:-4, 4:-4], x[0, 4 - dy:60 - dy, 4 - dx:60 - dx])]
        assert len(found) == 1 and max(map(abs, found[0])) == s
    assert not np.allclose(plant(x, "rescale", rng), x, atol=0.01)
    with pytest.raises(ValueError, match="must be one of"):
        plant(x, "mirror", rng)


# --------------------------------------------------------------------- phantoms: rules without a holdout


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from synthgate.phantoms import generate, write_phantoms

    root = tmp_path_factory.mktemp("small")
    write_phantoms(root / "p", patients=16, images_per_patient=3, size=32, seed=5)
    novel, _ = generate(patients=3, images_per_patient=2, size=32, seed=6)
    for i, im in enumerate(novel):
        save_unit_png(root / "syn" / f"s{i}.png", im.pixels)
    return root


def test_auto_without_holdout_falls_back_to_absolute_and_says_so(small):
    policy = only_policy("copy_detection", action="warn", required=False)
    r = audit.check(small / "syn", real=small / "p" / "train", policy=policy, progress=False).result("copy_detection")
    assert r.thresholds["rule"] == "absolute" and r.status in ("warn", "fail")
    assert "cannot be calibrated" in r.reason and "fell back to 'absolute'" in r.reason
    r = audit.check(small / "syn", real=small / "p" / "train", policy=policy, params={"copy_detection": {
        "rule": "ratio"}}, progress=False).result("copy_detection")
    assert r.status == "skipped" and "needs a holdout" in r.reason


def test_control_skips_near_constant_training_images(small, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(small / "p" / "train", train)
    (train / "metadata.csv").unlink()
    for i in range(6):  # near-constant images: no pixel rule can tell their copies from novel flat images
        save_unit_png(train / f"flat_{i}.png", np.full((32, 32), 0.2 + 0.1 * i))
    policy = only_policy("copy_detection", action="warn", required=False)
    r = audit.check(small / "syn", real=train, holdout=small / "p" / "holdout", policy=policy,
                    progress=False).result("copy_detection")
    control = r.controls[0]
    assert control.metrics["skipped_sources"]["content_below_floor"] == 6
    assert "6 skipped for content < 0.02" in control.detail
    flat = tmp_path / "flat"
    for i in range(8):
        save_unit_png(flat / f"f{i}.png", np.full((32, 32), 0.1 * i + 0.05))
    r = audit.check(small / "syn", real=flat, holdout=small / "p" / "holdout", policy=policy,
                    progress=False).result("copy_detection")
    assert r.status == "error" and "no training image qualifies" in r.reason


def test_ratio_settings_are_validated():
    from audit.core.base import create_check

    for bad, msg in (({"zooms": []}, "at least one zoom"), ({"zooms": [1.0, 1.0]}, "must not repeat"),
                     ({"zooms": [0.5]}, "greater than or equal to 0.8"), ({"false_alarm_rate": 0.6}, "less than 0.5"),
                     ({"max_shift": -1}, "greater than or equal to 0"), ({"rule": "ratios"}, "Input should be")):
        with pytest.raises(ValueError, match=msg):
            create_check("copy_detection", **bad)
    assert create_check("copy_detection", zooms=[1, 1.1]).settings.zooms == [1, 1.1]  # ints are floats


def test_training_duplicates_under_the_shift_zoom_distance(small, tmp_path):
    """A training image filed twice under two patients: a pair across patients within the stated radius; the two
    patients form one group for the second distance, and the control plants copies of the pair and catches them."""
    import csv
    import shutil

    train = tmp_path / "train"
    shutil.copytree(small / "p" / "train", train)
    rows = list(csv.DictReader(open(train / "metadata.csv")))
    other = next(r for r in rows if r["patient_id"] != rows[0]["patient_id"])
    shutil.copy(train / rows[0]["path"], train / "dup.png")
    with open(train / "metadata.csv", "a", newline="") as fh:  # every column of the header, CSV-quoted
        csv.DictWriter(fh, fieldnames=list(rows[0])).writerow({**rows[0], "path": "dup.png",
                                                             "patient_id": other["patient_id"]})
    policy = only_policy("copy_detection", action="warn", required=False)
    r = audit.check(small / "syn", real=train, holdout=small / "p" / "holdout", policy=policy,
                    progress=False).result("copy_detection")
    dup = r.metrics["duplicates"]["training"]
    assert dup["distance"].startswith("shift/zoom") and dup["threshold"] == r.thresholds["duplicate_radius"] > 0
    assert dup["pairs_across_patients"] >= 1 and "different patients" in r.reason
    sib = r.controls[0].metrics["with_training_duplicate"]  # copies of the pair: caught (grouped second distance)
    assert r.controls[0].passed and sib["eligible_sources"] >= 2 and sib["caught"] == sib["planted"] >= 12
    assert r.metrics["ratio"]["training_groups"]["near_duplicate_pairs"] == dup["pairs"] >= 1


def test_large_rgb_images_are_compared_at_the_analysis_size(tmp_path):
    """96 x 96 RGB crops are area-downsampled to 64 x 64 (channels compared jointly); a copy shifted by 3 px and
    one rescaled by 4 % in the original pixels are caught."""
    import skimage.data

    from synthgate.imageset import ImageSet

    def rgb(path, x):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)).save(path)

    rng = np.random.default_rng(1)
    spots = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        pic = np.asarray(getattr(skimage.data, name)(), np.float64)[..., :3] / 255
        h, w, _ = pic.shape
        spots += [(pic, y, x) for y in range(8, h - 104, 44) for x in range(8, w - 104, 44)]
    order = rng.permutation(len(spots))
    for i, j in enumerate(order[:80]):
        pic, y, x = spots[j]
        rgb(tmp_path / "train" / f"t{i:03d}.png", pic[y:y + 96, x:x + 96])
    for i, j in enumerate(order[80:160]):
        pic, y, x = spots[j]
        rgb(tmp_path / "hold" / f"h{i:03d}.png", pic[y:y + 96, x:x + 96])
    for i, j in enumerate(order[160:170]):
        pic, y, x = spots[j]
        rgb(tmp_path / "syn" / f"novel_{i}.png", pic[y:y + 96, x:x + 96])
    pic, y, x = spots[order[5]]
    rgb(tmp_path / "syn" / "copy_shift.png", pic[y + 3:y + 99, x - 2:x + 94])
    from scipy.ndimage import zoom as nd_zoom

    pic, y, x = spots[order[6]]  # the region around the crop magnified by 4 %, centred
    big = np.stack([nd_zoom(pic[y - 4:y + 100, x - 4:x + 100, c], 1.04, order=1) for c in range(3)], axis=-1)
    o = (big.shape[0] - 96) // 2
    rgb(tmp_path / "syn" / "copy_rescale.png", big[o:o + 96, o:o + 96])
    assert ImageSet(tmp_path / "syn").records[0].channels == 3
    policy = only_policy("copy_detection", action="warn", required=False)
    res = audit.check(tmp_path / "syn", real=tmp_path / "train", holdout=tmp_path / "hold", policy=policy,
                      progress=False)
    r = res.result("copy_detection")
    assert res.geometry.channels == 3 and r.metrics["ratio"]["analysis"]["height"] == 64
    flagged = {f.synthetic: f.evidence for f in r.flagged}
    assert {"copy_shift.png", "copy_rescale.png"} <= set(flagged)
    assert flagged["copy_shift.png"]["analysis_size"] == [64, 64] and r.controls[0].passed


def test_ratio_rule_refuses_a_single_training_image(small, tmp_path):
    import shutil

    from synthgate.errors import UsageError

    (tmp_path / "one").mkdir()
    shutil.copy(sorted((small / "p" / "train").glob("*.png"))[0], tmp_path / "one" / "a.png")
    policy = only_policy("copy_detection", action="warn", required=False)
    with pytest.raises(UsageError, match="second-nearest"):
        audit.check(small / "syn", real=tmp_path / "one", holdout=small / "p" / "holdout", policy=policy,
                    progress=False)
