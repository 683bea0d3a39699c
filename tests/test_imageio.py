"""Decoding every supported format to float32 HWC in [0, 1]."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import pydicom_test_file, write_png
from synthgate import imageio
from synthgate.errors import ImageReadError


def read(path, **kw):
    return imageio.read_image(path, **kw)


# ---------------------------------------------------------------- Pillow formats


def test_png_8bit_gray_exact(tmp_path):
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = read(write_png(tmp_path / "a.png", a))
    assert x.shape == (1, 16, 16, 1) and x.dtype == np.float32
    assert x[0, 0, 5, 0] == np.float32(5) / np.float32(255)
    assert x.min() == 0.0 and x.max() == 1.0


def test_png_16bit_uses_nominal_range_not_minmax(tmp_path):
    a = np.full((8, 8), 1000, np.uint16)
    a[0, 0] = 3000
    x = read(write_png(tmp_path / "a.png", a))
    info = imageio.probe(tmp_path / "a.png")
    assert info.bit_depth == 16
    assert x[0, 1, 1, 0] == pytest.approx(1000 / 65535)
    assert x[0, 0, 0, 0] == pytest.approx(3000 / 65535)


def test_rgb_and_rgba_png(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255
    x = read(write_png(tmp_path / "rgb.png", rgb))
    assert x.shape == (1, 4, 5, 3) and np.all(x[..., 0] == 1) and np.all(x[..., 1:] == 0)
    rgba = np.dstack([rgb, np.full((4, 5), 7, np.uint8)])
    info = imageio.probe(write_png(tmp_path / "rgba.png", rgba))
    assert info.channels == 3 and "alpha channel dropped" in info.notes
    assert np.array_equal(read(tmp_path / "rgba.png"), x)


def test_palette_gray_and_colour(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("P")
    gray.putpalette([v for i in range(256) for v in (i, i, i)])
    gray.save(tmp_path / "pg.png")
    assert imageio.probe(tmp_path / "pg.png").channels == 1
    colour = Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").convert("P")
    colour.putpalette([200, 10, 30] * 256)
    colour.save(tmp_path / "pc.png")
    x = read(tmp_path / "pc.png")
    assert x.shape[-1] == 3 and x[0, 0, 0, 0] == pytest.approx(200 / 255)


def test_bilevel_and_la(tmp_path):
    a = np.zeros((8, 8), bool)
    a[:4] = True
    Image.fromarray(a).save(tmp_path / "b.png")
    x = read(tmp_path / "b.png")
    assert set(np.unique(x)) == {0.0, 1.0} and x[0, 0, 0, 0] == 1.0
    Image.fromarray(np.full((4, 4, 2), 100, np.uint8), mode="LA").save(tmp_path / "la.png")
    assert read(tmp_path / "la.png").shape == (1, 4, 4, 1)


def test_jpeg_gray_rgb_cmyk(tmp_path):
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "g.jpg", quality=100)
    assert abs(float(read(tmp_path / "g.jpg").mean()) - 128 / 255) < 0.01
    Image.fromarray(np.full((16, 16, 3), 64, np.uint8)).save(tmp_path / "c.jpeg")
    assert read(tmp_path / "c.jpeg").shape == (1, 16, 16, 3)
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "k.jpg")
    assert read(tmp_path / "k.jpg").shape == (1, 8, 8, 3)


def test_tiff_8_16_float_and_multipage(tmp_path):
    Image.fromarray(np.full((6, 6), 200, np.uint8)).save(tmp_path / "a.tif")
    assert read(tmp_path / "a.tif")[0, 0, 0, 0] == pytest.approx(200 / 255)
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(tmp_path / "b.tiff")
    assert read(tmp_path / "b.tiff")[0, 0, 0, 0] == pytest.approx(40000 / 65535)
    Image.fromarray(np.full((6, 6), 0.25, np.float32)).save(tmp_path / "f.tif")
    assert read(tmp_path / "f.tif")[0, 0, 0, 0] == pytest.approx(0.25)
    hu = np.linspace(-1000, 3000, 36, dtype=np.float32).reshape(6, 6)
    Image.fromarray(hu).save(tmp_path / "hu.tif")
    x = read(tmp_path / "hu.tif")
    assert x.min() == 0.0 and x.max() == pytest.approx(1.0)  # out of [0, 1]: min-max
    pages = [Image.fromarray(np.full((5, 5), v, np.uint8)) for v in (0, 255, 51)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    x = read(tmp_path / "m.tif")
    assert x.shape == (3, 5, 5, 1) and list(x[:, 0, 0, 0]) == pytest.approx([0, 1, 0.2])


# ----------------------------------------------------------------------- NPY


@pytest.mark.parametrize("shape,expected", [
    ((8, 9), (1, 8, 9, 1)),
    ((8, 9, 1), (1, 8, 9, 1)),
    ((8, 9, 3), (1, 8, 9, 3)),
    ((3, 8, 9), (1, 8, 9, 3)),
    ((8, 9, 4), (1, 8, 9, 3)),
    ((5, 8, 9), (5, 8, 9, 1)),
    ((2, 8, 9, 3), (2, 8, 9, 3)),
])
def test_npy_layouts(tmp_path, shape, expected):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.uint8))
    assert read(tmp_path / "a.npy").shape == expected


def test_npy_dtypes(tmp_path):
    np.save(tmp_path / "u16.npy", np.full((4, 4), 65535, np.uint16))
    assert read(tmp_path / "u16.npy").max() == 1.0
    np.save(tmp_path / "f.npy", np.full((4, 4), 0.5, np.float64))
    assert read(tmp_path / "f.npy")[0, 0, 0, 0] == 0.5
    np.save(tmp_path / "i16.npy", np.array([[-100, 0], [100, 300]], np.int16))
    assert list(read(tmp_path / "i16.npy").ravel()) == pytest.approx([0, 0.25, 0.5, 1.0])
    np.save(tmp_path / "b.npy", np.eye(3, dtype=bool))
    assert read(tmp_path / "b.npy")[0, 0, 0, 0] == 1.0
    bad = np.zeros((4, 4))
    bad[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ImageReadError, match="NaN"):
        read(tmp_path / "nan.npy")
    np.save(tmp_path / "vec.npy", np.zeros(10))
    with pytest.raises(ImageReadError, match="not an image"):
        read(tmp_path / "vec.npy")
    np.save(tmp_path / "obj.npy", np.array(["a", "b"]))
    with pytest.raises(ImageReadError):
        read(tmp_path / "obj.npy")


# --------------------------------------------------------------------- DICOM


def test_dicom_all_encodings_of_mr_small_agree():
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
             "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
             "MR_small_padded.dcm"]
    ref = read(pydicom_test_file(names[0]))
    assert ref.shape == (1, 64, 64, 1)
    for name in names[1:]:
        assert np.array_equal(read(pydicom_test_file(name)), ref), name


def test_dicom_window_applied_exactly():
    import pydicom

    path = pydicom_test_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    expected[values <= c - 0.5 - (w - 1) / 2] = 0
    expected[values > c - 0.5 + (w - 1) / 2] = 1
    assert np.allclose(read(path)[0, :, :, 0], expected, atol=1e-6)


def test_dicom_rescale_then_minmax_without_window():
    import pydicom

    path = pydicom_test_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and "RescaleIntercept" in ds
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    assert np.allclose(read(path)[0, :, :, 0], expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted_and_found_without_extension():
    import pydicom

    path = pydicom_test_file("6154")
    assert path.suffix == "" and imageio.detect_format(path) == "dicom"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    windowed = imageio.window(values, float(ds.WindowCenter), float(ds.WindowWidth))
    assert np.allclose(read(path)[0, :, :, 0], 1.0 - windowed, atol=1e-6)


@pytest.mark.parametrize("name,shape", [
    ("SC_rgb_rle_2frame.dcm", (2, 100, 100, 3)),       # multi-frame RLE colour
    ("rtdose.dcm", (15, 10, 10, 1)),                    # multi-frame grayscale
    ("examples_ybr_color.dcm", (30, 240, 320, 3)),      # JPEG baseline YBR, 30 frames
    ("693_J2KI.dcm", (1, 512, 512, 1)),                 # JPEG 2000 CT
    ("SC_rgb_jls_lossy_sample.dcm", (1, 100, 100, 3)),  # JPEG-LS
    ("JPGExtended.dcm", (1, 1024, 256, 1)),             # 12-bit JPEG extended
    ("examples_palette.dcm", (1, 350, 800, 3)),         # palette colour
])
def test_dicom_compressed_multiframe_and_colour(name, shape):
    x = read(pydicom_test_file(name))
    assert x.shape == shape and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0


def test_dicom_jpeg_baseline_rgb_matches_uncompressed():
    # the same picture stored JPEG-compressed and uncompressed
    a = read(pydicom_test_file("SC_rgb_jpeg_dcmtk.dcm"))
    b = read(pydicom_test_file("SC_rgb_dcmtk_+eb+cr.dcm"))
    assert np.abs(a - b).mean() < 0.02


def test_dicom_voi_lut_sequence(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(pydicom_test_file("MR_small.dcm"))
    for kw in ("WindowCenter", "WindowWidth"):
        delattr(ds, kw)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]  # 4096 entries from 0, 8-bit output
    item.add_new(0x00283006, "US", [min(255, v // 16) for v in range(4096)])  # LUT Data
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "voi.dcm")
    raw = ds.pixel_array.astype(np.int64)
    expected = np.minimum(255, np.clip(raw, 0, 4095) // 16) / 255.0
    assert np.allclose(read(tmp_path / "voi.dcm")[0, :, :, 0], expected, atol=1e-6)


def test_window_functions_by_hand():
    x = np.array([0.0, 49.5, 50.0, 100.0])
    assert list(imageio.window(x, 50, 101)) == pytest.approx([0.005, 0.5, 0.505, 1.0])
    assert list(imageio.window(x, 50, 100, "LINEAR_EXACT")) == pytest.approx([0.0, 0.495, 0.5, 1.0])
    assert imageio.window(np.array([50.0]), 50, 10, "SIGMOID")[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="LINEAR"):
        imageio.window(x, 50, 10, "CUBIC")


def test_truncated_dicom_is_a_clear_error():
    with pytest.raises(ImageReadError, match="truncated") as err:
        read(pydicom_test_file("MR_truncated.dcm"))
    assert "MR_truncated.dcm" in str(err.value) and "\n" not in str(err.value)


def test_dicom_without_pixels_is_refused():
    with pytest.raises(ImageReadError, match="no image"):
        read(pydicom_test_file("rtplan.dcm"))


# --------------------------------------------------------------- bad input


def test_corrupt_and_mislabelled_files(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError, match="junk.png"):
        read(tmp_path / "junk.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "real.png")
    (tmp_path / "fake.jpg").write_bytes((tmp_path / "real.png").read_bytes())
    with pytest.raises(ImageReadError, match="content is PNG"):
        read(tmp_path / "fake.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="not a supported image"):
        read(tmp_path / "notes.txt")


def test_truncated_png_fails_on_decode_not_silently(tmp_path):
    rng = np.random.default_rng(0)
    data = write_png(tmp_path / "a.png", rng.integers(0, 255, (64, 64), dtype=np.uint8)).read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    imageio.probe(tmp_path / "t.png")  # the header alone is fine
    with pytest.raises(ImageReadError, match="truncated"):
        read(tmp_path / "t.png")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_image_bomb_refused_from_header(tmp_path):
    # a PNG header claiming 100,000 x 100,000 pixels, with almost no data
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _png_chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(ImageReadError, match="image bomb"):
        imageio.probe(tmp_path / "bomb.png")
    ok = write_png(tmp_path / "ok.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(ImageReadError, match="exceeds the limit of 100"):
        imageio.probe(ok, max_pixels=100)


# ------------------------------------------------------------------ geometry


def test_luminance_and_channel_conversion():
    rgb = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)
    g = imageio.convert_channels(rgb, 1)
    assert g.shape == (1, 3, 1) and list(g.ravel()) == pytest.approx([0.299, 0.587, 0.114])
    assert imageio.convert_channels(g, 3).shape == (1, 3, 3)


def test_resize_antialiased_preserves_mean():
    x = np.zeros((64, 64, 1), np.float32)
    x[::2] = 1.0  # stripes that naive subsampling would alias to all-ones or all-zeros
    y = imageio.resize(x, 16, 16)
    assert y.shape == (16, 16, 1)
    assert abs(float(y.mean()) - 0.5) < 0.02 and float(y.std()) < 0.05
