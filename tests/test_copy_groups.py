"""The ratio rule's grouped second distance on phantoms whose patients have near-identical images: copies of such
images are caught now (the second distance looks past the copied image's patient and near-duplicates) and were
missed by the plain second-nearest, with and without patient IDs; the planted-copy control plants that case."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

import audit
from audit.copy_detection.ratio_rule import CopyRatioRule
from conftest import only_policy, save_unit_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32


def _phantoms(patients: int, seed: int, rng, per: int = 3) -> tuple[list[np.ndarray], list[str]]:
    """``per`` near-identical images per phantom patient: one rendering, each with its own noise (0.004): a repeat
    scan in the same pose.  (A sibling shifted by a pixel is already far under the identity test, so the plain rule
    caught copies of it.)"""
    from synthgate.phantoms import make_anatomy, render

    images, ids = [], []
    for p in range(patients):
        anatomy = make_anatomy(np.random.default_rng([seed, p]), f"P{seed}-{p:03d}")
        base = render(anatomy, SIZE, np.random.default_rng([seed, p, 1]), lesion=bool(p % 2))
        for _ in range(per):
            images.append(np.clip(base + rng.normal(0, 0.004, base.shape), 0, 1))
            ids.append(anatomy.patient_id)
    return images, ids


def _write(folder, images, ids=None):
    for i, img in enumerate(images):
        save_unit_png(folder / f"i{i:03d}.png", img)
    if ids is not None:
        with open(folder / "metadata.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["path", "patient_id"])
            w.writerows([f"i{i:03d}.png", pid] for i, pid in enumerate(ids))


def _read(folder):
    files = sorted(folder.glob("*.png"))
    return np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files])[:, None]


def _ids(folder):
    with open(folder / "metadata.csv") as fh:
        return [row["patient_id"] for row in sorted(csv.DictReader(fh), key=lambda r: r["path"])]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Training: 8 patients with 3 near-identical images each (a repeat scan: the case) and 24 with one image;
    holdout: 80 unseen patients, one image each; synthetic: noisy copies (sigma 0.03, more than the siblings
    differ) of 8 images of the first 8 patients, and 12 images of 12 further unseen patients.

    Were every training image in a near-identical triple, the plain rule's holdout threshold would rise to ~0.99
    (every unseen image is as near its nearest's sibling) and catch the copies anyway; the hole is a training set
    where *some* images have a sibling."""
    root = tmp_path_factory.mktemp("groups")
    rng = np.random.default_rng(0)
    train, ids = _phantoms(8, 1, rng)
    singles, single_ids = _phantoms(24, 4, rng, per=1)
    train, ids = train + singles, ids + single_ids
    hold, hold_ids = _phantoms(80, 2, rng, per=1)
    novel, _ = _phantoms(12, 3, rng, per=1)
    sources = rng.choice(24, 8, replace=False)
    copies = [np.clip(train[s] + rng.normal(0, 0.03, train[s].shape), 0, 1) for s in sources]
    _write(root / "train", train, ids)
    _write(root / "train_no_ids", train)
    _write(root / "hold", hold, hold_ids)
    _write(root / "syn", copies + novel)  # i000-i007 are the copies
    return root


def _audit(root, real: str):
    policy = only_policy("copy_detection", action="warn", required=False, on_inconclusive="warn")
    return audit.check(root / "syn", real=root / real, holdout=root / "hold", policy=policy,
                       progress=False).result("copy_detection")


@pytest.mark.parametrize("real", ["train", "train_no_ids"], ids=["patient_ids", "near_duplicates"])
def test_copies_of_images_with_siblings_are_caught_now_and_were_missed_before(phantoms, real):
    r = _audit(phantoms, real)
    flagged = {f.synthetic for f in r.flagged}
    copies = {f"i{i:03d}.png" for i in range(8)}
    assert copies <= flagged, (sorted(flagged), r.reason)
    assert len(flagged - copies) <= 1  # novel patients' images: within the holdout's bound (1/81 per test)
    groups = r.metrics["ratio"]["training_groups"]
    # the 8 triples are groups (two single patients may also fall within the duplicate radius of each other)
    assert groups["groups"] <= 32 and groups["images_in_groups_of_2_or_more"] >= 24, groups
    # every flag names the copied image's patient group and a second distance outside it
    for f in r.flagged:
        if f.synthetic in copies:
            assert f.evidence["second_distance"] > 3 * f.evidence["distance"], f.evidence
    # the control planted copies of images that have a near-duplicate, one of each kind, and caught them
    control = r.controls[0]
    sib = control.metrics["with_training_duplicate"]
    assert control.passed and sib["planted"] >= 12 and sib["caught"] == sib["planted"], control.detail
    assert "copies of images that have a near-duplicate in the training set" in control.detail

    # before: the plain second-nearest (the sibling) on the same images, same settings
    train, hold, syn = _read(phantoms / real), _read(phantoms / "hold"), _read(phantoms / "syn")
    plain = CopyRatioRule(SIZE, SIZE, 1, alpha=0.005, pooled=8).fit(train, hold, grouped=False)
    before = plain.decide(syn[:8]).flagged
    assert before.sum() <= 1, before  # missed before
    grouped = CopyRatioRule(SIZE, SIZE, 1, alpha=0.005, pooled=8).fit(
        train, hold, patients=None if real == "train_no_ids" else _ids(phantoms / real))
    assert grouped.decide(syn[:8]).flagged.all()  # the rule alone agrees with the check
    assert all(len(set(grouped.labels_[3 * p:3 * p + 3])) == 1 for p in range(8))


def test_one_group_falls_back_to_the_plain_second_nearest_and_says_so(phantoms, tmp_path):
    """Every training image filed under one patient: no second group exists, so the rule uses the plain
    second-nearest and warns that copies of images with a near-duplicate can be missed."""
    images = _read(phantoms / "train")[:, 0]
    _write(tmp_path / "one", list(images[24:40]), ["P"] * 16)  # 16 single-scan patients, one ID for all
    policy = only_policy("copy_detection", action="warn", required=False, on_inconclusive="warn")
    r = audit.check(phantoms / "syn", real=tmp_path / "one", holdout=phantoms / "hold", policy=policy,
                    progress=False).result("copy_detection")
    assert r.metrics["ratio"]["training_groups"]["groups"] is None
    assert "form one group" in r.reason and "plain second-nearest" in r.reason, r.reason


def test_a_stored_state_of_the_old_definition_is_refitted(phantoms, monkeypatch):
    """A fitted state stored before the grouped second distance (no ``definition``) is not reused."""
    import audit.copy_detection.check as cd

    _audit(phantoms, "train")  # stores the fitted state (the tests' isolated cache)
    fits = []
    real_fit = cd.CopyDetection.fit
    monkeypatch.setattr(cd.CopyDetection, "fit", lambda self, ctx: fits.append(1) or real_fit(self, ctx))
    _audit(phantoms, "train")
    assert fits == []  # same definition: restored
    monkeypatch.setattr(cd, "STATE_DEFINITION", cd.STATE_DEFINITION + 1)
    r = _audit(phantoms, "train")
    assert fits == [1] and {f"i{i:03d}.png" for i in range(8)} <= {f.synthetic for f in r.flagged}
