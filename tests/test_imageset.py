"""ImageSet: scanning, labels, patients, streaming, caching and every bad input."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import pydicom_test_file, write_png
from synthgate import imageio
from synthgate.cache import DecodeCache
from synthgate.errors import EmptySetError, ImageReadError, InputError, MetadataError, MissingInputError
from synthgate.imageset import ImageSet, harmonize


def make_set(root, n=4, size=8, sub=None):
    for i in range(n):
        folder = root / sub[i % len(sub)] if sub else root
        write_png(folder / f"im{i}.png", np.full((size, size), 30 * i, np.uint8))
    return root


def test_scan_order_labels_and_patients_from_metadata(phantom_png):
    s = ImageSet(phantom_png / "train")
    assert s.keys == sorted(s.keys)
    assert s.label_source == "metadata.csv" and s.patient_source == "metadata.csv"
    assert s.classes == ["0", "1"] and s.has_labels and s.has_patients
    assert s.n_patients == 8 and len(s) == 32


def test_dicom_patients_from_header_and_same_labels_as_png(phantom_png, phantom_dicom):
    png, dcm = ImageSet(phantom_png), ImageSet(phantom_dicom)
    assert dcm.patient_source == "DICOM PatientID" and png.patient_source == "metadata.csv"
    assert [r.label for r in png] == [r.label for r in dcm]
    assert [r.patient_id for r in png] == [r.patient_id for r in dcm]
    # the same phantom through 12-bit DICOM (MONOCHROME1, rescale, window) and 8-bit PNG
    for i in range(0, len(png), 9):
        assert np.abs(png.load(i) - dcm.load(i)).max() < 1 / 255 + 1 / 4095


def test_class_subfolders_give_labels(tmp_path):
    s = ImageSet(make_set(tmp_path, n=6, sub=["normal", "pneumonia/deep"]))
    assert s.label_source == "folders" and s.classes == ["normal", "pneumonia"]
    assert not s.has_patients and s.patient_source == "none"


def test_mixed_root_files_mean_no_labels(tmp_path):
    make_set(tmp_path, n=2, sub=["a"])
    write_png(tmp_path / "loose.png", np.zeros((8, 8), np.uint8))
    assert ImageSet(tmp_path).label_source == "none"


def test_hidden_and_sidecar_files_ignored(tmp_path):
    make_set(tmp_path, n=2)
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / ".thumbs").mkdir()
    (tmp_path / ".thumbs" / "x.png").write_bytes(b"junk")
    (tmp_path / "manifest.json").write_text("{}")
    assert len(ImageSet(tmp_path)) == 2


def test_multiframe_files_give_one_image_per_frame(tmp_path):
    shutil.copy(pydicom_test_file("SC_rgb_rle_2frame.dcm"), tmp_path / "clip.dcm")
    shutil.copy(pydicom_test_file("6154"), tmp_path / "NOEXT")
    s = ImageSet(tmp_path)
    assert s.keys == ["NOEXT", "clip.dcm#0", "clip.dcm#1"]
    assert s.load(2).shape == (100, 100, 3)


def test_digest_stable_and_sensitive(tmp_path):
    make_set(tmp_path)
    (tmp_path / "metadata.csv").write_text("path,label\n" + "".join(f"im{i}.png,{i % 2}\n" for i in range(4)))
    d1 = ImageSet(tmp_path).digest
    assert ImageSet(tmp_path).digest == d1
    (tmp_path / "metadata.csv").write_text("path,label\n" + "".join(f"im{i}.png,{1 - i % 2}\n" for i in range(4)))
    d2 = ImageSet(tmp_path).digest
    assert d2 != d1  # relabelling changes the digest
    write_png(tmp_path / "im0.png", np.full((8, 8), 1, np.uint8))
    assert ImageSet(tmp_path).digest != d2


def test_extra_columns_are_attributes(tmp_path):
    make_set(tmp_path, n=2)
    (tmp_path / "metadata.csv").write_text("path,label,birads,age\nim0.png,1,4,61\nim1.png,0,2,\n")
    s = ImageSet(tmp_path)
    assert s[0].attribute("birads") == "4" and s[0].attribute("age") == "61"
    assert s[1].attribute("age") is None  # an empty cell is a missing value
    for column, known in (("labels", "label"), ("PatientID", "patient_id"), ("Subject ID", "patient_id"),
                          ("MRN", "patient_id"), ("Split", "split")):
        (tmp_path / "metadata.csv").write_text(f"path,{column}\nim0.png,1\nim1.png,0\n")
        with pytest.raises(MetadataError, match=f"unknown column '{column}' \\(did you mean '{known}'"):
            ImageSet(tmp_path)
    (tmp_path / "metadata.csv").write_text("path,labels\nim0.png,1\nim1.png,0\n")
    assert ImageSet(tmp_path, extra_columns=["labels"])[0].attribute("labels") == "1"


@pytest.mark.parametrize("csv_text,message", [
    ("path,patientid,label\nim0.png,a,1\nim1.png,b,0\n", "did you mean 'patient_id'"),
    ("file,label\nim0.png,1\n", "no 'path' column"),
    ("path,label\nim0.png,1\nim1.png,0\nmissing.png,1\n", "'missing.png', which is not an image"),
    ("path,label\nim0.png,1\n", "'im1.png' .*has no row"),
    ("path,label\nim0.png,1\nim0.png,0\nim1.png,1\n", "repeats path"),
    ("path,label\n../im0.png,1\nim1.png,0\n", "inside it"),
    ("path,label\nim0.png,1,extra\nim1.png,0\n", "number of fields"),
])
def test_metadata_errors_name_the_file(tmp_path, csv_text, message):
    make_set(tmp_path, n=2)
    (tmp_path / "metadata.csv").write_text(csv_text)
    with pytest.raises(MetadataError, match=message) as err:
        ImageSet(tmp_path)
    assert "metadata.csv" in str(err.value)


def test_bad_folders(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        ImageSet(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        ImageSet(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySetError, match="no images"):
        ImageSet(tmp_path / "empty")


def test_unreadable_files_raise_or_are_listed(tmp_path):
    make_set(tmp_path, n=3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "notes.txt").write_text("clinical notes")
    with pytest.raises(ImageReadError, match="broken.png"):
        ImageSet(tmp_path)
    s = ImageSet(tmp_path, skip_unreadable=True)
    assert len(s) == 3
    assert sorted(k.path for k in s.skipped) == ["broken.png", "notes.txt"]
    assert all(k.reason for k in s.skipped)


def test_all_unreadable_is_empty(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(EmptySetError, match="1 unreadable"):
        ImageSet(tmp_path, skip_unreadable=True)


def test_verify_finds_truncated_pixel_data(tmp_path):
    make_set(tmp_path, n=2)
    data = write_png(tmp_path / "big.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).read_bytes()
    (tmp_path / "big.png").write_bytes(data[: len(data) // 2])
    s = ImageSet(tmp_path)  # headers are fine
    with pytest.raises(ImageReadError, match="big.png"):
        s.verify()
    s = ImageSet(tmp_path, skip_unreadable=True)
    d0 = s.digest
    assert [k.path for k in s.verify()] == ["big.png"]
    assert len(s) == 2 and [k.path for k in s.skipped] == ["big.png"] and s.digest != d0


def test_permission_error_is_reported(tmp_path, monkeypatch):
    make_set(tmp_path, n=1)
    real_open = open

    def deny(path, *a, **k):
        if str(path).endswith("im0.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(ImageReadError, match="im0.png.*(denied|cannot read)"):
        ImageSet(tmp_path, cache=None)


def test_symlinked_file_is_followed(tmp_path):
    make_set(tmp_path / "store", n=1)
    (tmp_path / "set").mkdir()
    os.symlink(tmp_path / "store" / "im0.png", tmp_path / "set" / "link.png")
    assert ImageSet(tmp_path / "set").keys == ["link.png"]


def test_iter_batches_streams_in_nchw(phantom_png):
    s = ImageSet(phantom_png / "train")
    seen = []
    for idx, batch in s.iter_batches(batch_size=5):
        assert batch.shape[1:] == (1, 32, 32) and batch.dtype == np.float32 and len(idx) == len(batch) <= 5
        seen += idx
    assert seen == list(range(len(s)))
    idx, batch = next(s.iter_batches(batch_size=3, indices=[4, 2], layout="NHWC"))
    assert idx == [4, 2] and batch.shape == (2, 32, 32, 1)
    assert np.array_equal(batch[1], s.load(2))


def test_cache_is_content_addressed_and_bit_identical(tmp_path, monkeypatch):
    make_set(tmp_path / "a", n=3)
    cache = DecodeCache(tmp_path / "cache")
    first = ImageSet(tmp_path / "a", cache=cache)
    ref = [first.load(i) for i in range(3)]
    calls = []
    real = imageio.decode
    monkeypatch.setattr(imageio, "decode", lambda *a, **k: calls.append(a) or real(*a, **k))
    shutil.copytree(tmp_path / "a", tmp_path / "renamed")  # same bytes, other place
    again = ImageSet(tmp_path / "renamed", cache=cache)
    assert all(np.array_equal(again.load(i), ref[i]) for i in range(3))
    assert calls == []  # nothing decoded a second time
    uncached = ImageSet(tmp_path / "a", cache=None)
    assert all(np.array_equal(uncached.load(i), ref[i]) for i in range(3))
    assert len(calls) == 3


def test_damaged_cache_entry_is_redecoded(tmp_path):
    make_set(tmp_path / "a", n=1)
    cache = DecodeCache(tmp_path / "cache")
    s = ImageSet(tmp_path / "a", cache=cache)
    ref = s.load(0)
    entry = next((tmp_path / "cache").rglob("*.sgc"))
    entry.write_bytes(b"garbage")
    assert np.array_equal(ImageSet(tmp_path / "a", cache=cache).load(0), ref)


def test_subset_has_own_digest(phantom_png):
    s = ImageSet(phantom_png / "train")
    sub = s.subset([0, 1, 2])
    assert len(sub) == 3 and sub.digest != s.digest and sub[0] == s[0]
    assert np.array_equal(sub.load(1), s.load(1))


def test_harmonize_rule(tmp_path):
    write_png(tmp_path / "g" / "a.png", np.zeros((32, 40), np.uint8))
    write_png(tmp_path / "g" / "b.png", np.zeros((24, 48), np.uint8))
    write_png(tmp_path / "c" / "a.png", np.zeros((32, 40, 3), np.uint8))
    gray, rgb = ImageSet(tmp_path / "g"), ImageSet(tmp_path / "c")
    geo = harmonize(gray, rgb)
    assert (geo.height, geo.width, geo.channels) == (24, 40, 1) and geo.changed
    assert any("luma" in n for n in geo.notes) and any("resized to 24x40" in n for n in geo.notes)
    assert harmonize(rgb) == harmonize(rgb) and not harmonize(rgb).changed and harmonize(rgb).channels == 3
    assert rgb.load(0, geo).shape == (24, 40, 1)
    assert harmonize(gray, size=(16, 16)).height == 16
