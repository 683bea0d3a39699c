"""Phantoms: deterministic, patient-disjoint, and learnable in both senses the audit needs."""
from __future__ import annotations

import numpy as np
import pytest

from synthgate.errors import UsageError
from synthgate.imageset import ImageSet
from synthgate.phantoms import generate, write_phantoms
from conftest import assert_golden


def test_deterministic_for_a_seed():
    a, _ = generate(patients=3, images_per_patient=2, size=32, seed=5)
    b, _ = generate(patients=3, images_per_patient=2, size=32, seed=5)
    c, _ = generate(patients=3, images_per_patient=2, size=32, seed=6)
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b))
    assert not np.array_equal(a[0].pixels, c[0].pixels)
    # golden numbers: pure numpy (float64 rendering stored as float32); rel 1e-6 leaves room for another libm
    assert_golden({"patients": [i.patient_id for i in a], "labels": [i.label for i in a],
                   "splits": [i.split for i in a], "sum 0": float(a[0].pixels.sum(dtype=np.float64)),
                   "sum 5": float(a[5].pixels.sum(dtype=np.float64)), "pixel": float(a[3].pixels[16, 10])},
                  {"patients": ["MRN8245025", "MRN8245025", "MRN7037109", "MRN7037109", "MRN1203878", "MRN1203878"],
                   "labels": [1, 0, 0, 0, 0, 0], "splits": ["train", "train", "holdout", "holdout", "train", "train"],
                   "sum 0": 309.30422187300064, "sum 5": 269.4803385547457, "pixel": 0.19401225447654724}, rel=1e-6)


def test_split_is_patient_disjoint_and_sized(phantom_png):
    train, hold = ImageSet(phantom_png / "train"), ImageSet(phantom_png / "holdout")
    assert set(train.patient_ids).isdisjoint(hold.patient_ids)
    assert (train.n_patients, hold.n_patients) == (8, 2)
    whole = ImageSet(phantom_png)  # the top-level metadata.csv covers both splits
    assert len(whole) == len(train) + len(hold)


def test_dicom_headers_carry_invented_phi(phantom_dicom):
    import pydicom

    f = next((phantom_dicom / "train").glob("*.dcm"))
    ds = pydicom.dcmread(f)
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber"):
        assert str(ds.get(kw) or "").strip(), kw
    assert ds.PatientID.startswith("MRN")
    photometrics = {pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation
                    for p in phantom_dicom.rglob("*.dcm")}
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}  # both reader paths are exercised


def test_sixteen_bit_png(tmp_path):
    write_phantoms(tmp_path / "p", patients=2, images_per_patient=1, size=16, bit_depth=16)
    s = ImageSet(tmp_path / "p")
    assert {r.bit_depth for r in s} == {16}


@pytest.mark.parametrize("kwargs,message", [
    (dict(patients=0), "at least 1"),
    (dict(size=8), "between 16 and 2048"),
    (dict(holdout_fraction=1.0), r"\[0, 1\)"),
    (dict(fmt="jpeg"), "png"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        write_phantoms(tmp_path / "p", **kwargs)
    assert not (tmp_path / "p").exists()


def test_existing_output_refused(tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        write_phantoms(tmp_path / "p")


def test_patients_are_recognisable():
    """Nearest neighbour in (blurred) pixel space finds the same patient far above chance."""
    from scipy.ndimage import gaussian_filter

    imgs, _ = generate(patients=40, images_per_patient=5, size=32, seed=0)
    x = np.stack([gaussian_filter(i.pixels, 1).ravel() for i in imgs])
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    pid = np.array([i.patient_id for i in imgs])
    accuracy = float(np.mean(pid[sim.argmax(1)] == pid))
    chance = 4 / (len(imgs) - 1)
    assert accuracy > 10 * chance


def small_cnn_holdout_auc(seed: int) -> float:
    """Holdout AUC of a tiny CNN trained (torch seed ``seed``) on the train/ split of 80 phantom patients."""
    import torch
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(seed)
    imgs, _ = generate(patients=80, images_per_patient=6, size=32, seed=0)
    x = torch.tensor(np.stack([i.pixels for i in imgs]))[:, None]
    y = torch.tensor([i.label for i in imgs], dtype=torch.float32)
    train = torch.tensor([i.split == "train" for i in imgs])
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = x[train], y[train]
    for _ in range(40):
        perm = torch.randperm(len(xt))
        for b in range(0, len(xt), 32):
            idx = perm[b:b + 32]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx]).squeeze(1), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()  # the training set's batch statistics, not the holdout's
    with torch.no_grad():
        scores = net(x[~train]).squeeze(1).numpy()
    return float(roc_auc_score(y[~train].numpy(), scores))


@pytest.mark.usefixtures("one_torch_thread")
def test_label_is_learnable_by_a_small_cnn():
    """A tiny CNN trained on train/ separates lesion from no lesion on unseen holdout patients.

    The bound comes from the distribution of :func:`small_cnn_holdout_auc` over torch seeds 0-15 with 1 and 2
    torch threads (32 trainings): min 0.871, mean 0.926, max 0.978, SD 0.029 (seed 0: 0.937 / 0.930); one
    seed moved by at most 0.018 between thread counts.  The bound 0.8 is 0.07 below the lowest and 4.3 SD
    below the mean, and far above chance (0.5).  Batch normalisation made the distribution that narrow:
    without it the same network gave min 0.643, mean 0.803, max 0.882 (SD 0.064) over seeds 0-7 x 1 and 2
    threads, one seed moving by up to 0.18 between thread counts (seed 0: 0.774 with one thread, 0.860 with
    two, 0.734 on another machine), so its bound of 0.75 failed by chance.  The test also runs on one torch
    thread, which fixes the arithmetic on a given machine.  Reproduce a column with
    ``OMP_NUM_THREADS=N python -c "import sys, torch; sys.path[:0] = ['tests', '.']; torch.set_num_threads(N);
    from test_phantoms import small_cnn_holdout_auc as f; print([f(s) for s in range(16)])"``.
    """
    assert small_cnn_holdout_auc(0) > 0.8
