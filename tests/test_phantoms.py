"""Phantoms: deterministic, patient-disjoint, and learnable in both senses the audit needs."""
from __future__ import annotations

import numpy as np
import pytest

from synthgate.errors import UsageError
from synthgate.imageset import ImageSet
from synthgate.phantoms import generate, write_phantoms


def test_deterministic_for_a_seed():
    a, _ = generate(patients=3, images_per_patient=2, size=32, seed=5)
    b, _ = generate(patients=3, images_per_patient=2, size=32, seed=5)
    c, _ = generate(patients=3, images_per_patient=2, size=32, seed=6)
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b))
    assert not np.array_equal(a[0].pixels, c[0].pixels)


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


def test_label_is_learnable_by_a_small_cnn():
    """A tiny CNN trained on train/ separates lesion from no lesion on unseen holdout patients."""
    import torch
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    imgs, _ = generate(patients=80, images_per_patient=6, size=32, seed=0)
    x = torch.tensor(np.stack([i.pixels for i in imgs]))[:, None]
    y = torch.tensor([i.label for i in imgs], dtype=torch.float32)
    train = torch.tensor([i.split == "train" for i in imgs])
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 1))
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
    with torch.no_grad():
        scores = net(x[~train]).squeeze(1).numpy()
    assert roc_auc_score(y[~train].numpy(), scores) > 0.75
