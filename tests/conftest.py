"""Shared fixtures: every test builds its own data and writes nothing outside tmp."""
from __future__ import annotations

from pathlib import Path

import pytest

from synthgate.phantoms import write_phantoms


def _isolate(monkeypatch, home: Path) -> None:
    """Caches, logs, keys and salt under ``home``: nothing a test does touches the developer's real ones."""
    monkeypatch.setenv("SYNTHGATE_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("SYNTHGATE_LOG_DIR", str(home / "logs"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "xdg-data"))  # the release ledger
    monkeypatch.setenv("SYNTHGATE_SALT", "test-salt")
    monkeypatch.setenv("SYNTHGATE_QUIET", "1")
    for name in ("SYNTHGATE_MAX_PIXELS", "SYNTHGATE_DEVICE", "SYNTHGATE_KEY", "SYNTHGATE_RAY_ADDRESS",
                 "SYNTHGATE_LEDGER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session_env(tmp_path_factory):
    """Session-wide isolation, so module- and session-scoped fixtures are isolated too."""
    mp = pytest.MonkeyPatch()
    _isolate(mp, tmp_path_factory.mktemp("session-home"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Per test, a fresh home on top of the session's."""
    _isolate(monkeypatch, tmp_path_factory.mktemp("home"))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks on a shared 2-core machine: OpenMP spin-waiting made 2 threads several times slower than 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def phantom_png(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "png"
    write_phantoms(out, patients=10, images_per_patient=4, size=32, seed=7, fmt="png")
    return out


@pytest.fixture(scope="session")
def phantom_dicom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "dicom"
    write_phantoms(out, patients=10, images_per_patient=4, size=32, seed=7, fmt="dicom")
    return out


def pydicom_test_file(name: str) -> Path:
    """A file from pydicom's bundled test data (ships in the wheel; never fetched)."""
    import pydicom

    root = Path(pydicom.__file__).parent / "data" / "test_files"
    hits = sorted(root.rglob(name))
    if not hits:
        pytest.skip(f"pydicom test file {name} not bundled in this pydicom")
    return hits[0]


def write_png(path: Path, array, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path)
    return path


def write_deidentified_dicom(src: Path, dst: Path) -> Path:
    """A phantom DICOM de-identified as a synthetic output should be (PS3.15 basic profile, marked), with new UIDs
    derived from the file name (reproducible, never the source's)."""
    import pydicom

    ds = pydicom.dcmread(src)
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
               "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        setattr(ds, kw, "")
    del ds.InstitutionName
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic image; no patient data"
    for kw, n in (("StudyInstanceUID", 1), ("SeriesInstanceUID", 2), ("SOPInstanceUID", 3)):
        setattr(ds, kw, pydicom.uid.generate_uid(entropy_srcs=[src.name, str(n)]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def save_unit_png(path: Path, pixels) -> Path:
    """Float pixels in [0, 1] (clipped) as an 8-bit PNG, creating the folder."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def write_labelled_set(root: Path, images, labels, patients=None) -> Path:
    """A PNG image set with ``metadata.csv`` (path, label[, patient_id]) from float arrays in [0, 1]."""
    import csv

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, label) in enumerate(zip(images, labels)):
        name = f"img_{i:05d}.png"
        save_unit_png(root / name, img)
        rows.append({"path": name, "label": str(label), **({"patient_id": patients[i]} if patients else {})})
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return root


def one_line_error(result, *needles):
    """A CLI result ``(code, out, err)`` is exit 2 with one stderr line holding every needle."""
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_training_halves_the_loss(trainer, x, draws: int) -> None:
    """``trainer.steps`` steps on ``x`` must halve the loss measured on fixed timesteps and noise."""
    import torch

    from generators.train import diffusion_loss

    def fixed_loss():  # the same timesteps and noise before and after
        with torch.no_grad():
            return float(diffusion_loss(trainer.unet, trainer.noise_scheduler, x, None, draws,
                                        torch.Generator().manual_seed(0)).mean())

    before = fixed_loss()
    for _ in range(trainer.config.steps):
        trainer.step(x[torch.as_tensor(trainer.next_indices())])
    after = fixed_loss()
    assert after < 0.5 * before, (before, after)


def assert_golden(actual, pinned, rel: float, abs: float = 0.0, what: str = "golden numbers") -> None:
    """Every pinned value holds: integers, strings, booleans, lists, dicts and ``None`` exactly, floats within ``rel`` /
    ``abs``, and a value pinned as ``pytest.approx(...)`` within its own tolerance.

    Seeded tests pin literal values measured once (with one and two torch
    threads), so that a stub returning constants, or a change that moves the
    numbers, fails -- comparing two runs of the code with each other cannot
    see either.  The message lists every value as it is now, ready to paste
    when a deliberate change moves them.
    """
    import pytest

    wrong = {}
    for key, want in pinned.items():
        got = actual[key]
        if hasattr(want, "expected"):  # pytest.approx(value, ...): its own tolerance
            ok = got is not None and got == want
        elif want is None or got is None or isinstance(want, (bool, str, list, tuple, dict)) or (
                isinstance(want, int) and isinstance(got, int)):
            ok = got == want
        else:
            ok = got == pytest.approx(want, rel=rel, abs=abs)
        if not ok:
            wrong[key] = (want, got)
    assert not wrong, f"{what} moved (pinned, now): {wrong}; every value now: {dict(actual)}"


def only_policy(check: str, action: str = "block", required: bool = True, on_inconclusive: str = "fail",
                max_drop_fraction: float = 0.5, **settings) -> Path:
    """A policy file holding only ``check`` (a whole audit of that one check, not a partial one).

    Written into the test's isolated home (pytest's temporary folder).
    """
    import json
    import os

    folder = Path(os.environ["SYNTHGATE_LOG_DIR"]).parent / "policies"
    folder.mkdir(parents=True, exist_ok=True)
    rule = {"required": required, "action": action, "on_inconclusive": on_inconclusive, "settings": settings}
    text = f"name: only-{check}\nmax_drop_fraction: {max_drop_fraction}\nchecks:\n  {check}: {json.dumps(rule)}\n"
    path = folder / f"only-{check}-{abs(hash(text)) % 10**8}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def hospital_key(tmp_path_factory) -> Path:
    """One signing key file (``SYNTHGATE_KEY``) for audits made in module fixtures and the bundles of later tests.

    Each test gets a fresh home, and so a fresh installation key: an audit signed in a module fixture would be
    another installation's.  Use with ``monkeypatch.setenv("SYNTHGATE_KEY", str(hospital_key))``.
    """
    from synthgate.signing import write_new_key

    path = tmp_path_factory.mktemp("hospital-key") / "signing-key.pem"
    write_new_key(path)
    return path
