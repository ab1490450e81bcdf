"""Preprocessing of DICOM and image files into the detector's two views."""

from __future__ import annotations

import copy
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MPEG2MPML,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import detector.pixels as pixels
from detector.errors import (
    BundleError,
    CheckpointError,
    DetectorError,
    ImageTooLargeError,
    NoPixelDataError,
    PreprocessError,
    UnsupportedPixelDataError,
)
from detector.preprocess import (
    PreparedImage,
    PreprocessConfig,
    noise_crop,
    prepare_dataset,
    prepare_file,
)
from detector.pixels import sample_frames

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CFG = PreprocessConfig()
MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------ helpers


def _read(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def make_ds(arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.set_pixel_data(arr, photometric, bits_stored or arr.dtype.itemsize * 8)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def check_prepared(p: PreparedImage, n_frames: int | None = None, cfg: PreprocessConfig = CFG) -> None:
    f = len(p.frame_indices)
    assert f >= 1 and (n_frames is None or f == n_frames)
    assert p.semantic.shape == (f, 3, cfg.semantic_size, cfg.semantic_size)
    assert p.noise.shape == (f, 3, cfg.noise_crop, cfg.noise_crop)
    assert p.semantic.dtype == torch.float32 and p.noise.dtype == torch.float32
    assert torch.isfinite(p.semantic).all() and torch.isfinite(p.noise).all()
    assert p.noise.min() >= 0.0 and p.noise.max() <= 1.0
    # semantic is CLIP-normalised [0, 1] data
    unnorm = p.semantic * STD + MEAN
    assert unnorm.min() >= -1e-4 and unnorm.max() <= 1 + 1e-4


def crop_of(p: PreparedImage, frame: int = 0) -> np.ndarray:
    """Noise crop of one frame as (C, C, 3)."""
    return p.noise[frame].permute(1, 2, 0).numpy()


# --------------------------------------------------------------------- every pydicom test file


def _pixel_files() -> list[str]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The files pydicom ships, globbed directly: get_testdata_files() also tries to
        # download pydicom-data, which makes the set depend on the network.
        local = Path(pydicom.data.__file__).parent / "test_files"
        for path in sorted(str(p) for p in local.rglob("*") if p.suffix != ".py"):
            if not os.path.isfile(path):
                continue
            try:
                ds = pydicom.dcmread(path, force=True, defer_size=256)
                has_pixels = any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009))
            except Exception:
                continue
            if has_pixels:
                found.append(path)
    return found


PIXEL_FILES = _pixel_files()

# Files that cannot be preprocessed here, with the expected error and a word of
# the reason.  Every other file must preprocess.  (A file listed here may also
# succeed, e.g. once GDCM is installed.)
KNOWN_FAILURES: dict[str, tuple[type[PreprocessError], str]] = {
    # a JPEG with a marker segment only GDCM accepts
    "JPEG-lossy.dcm": (PreprocessError, "cannot decode"),
    # fragment table deliberately broken in pydicom's own tests
    "JPEG2000-embedded-sequence-delimiter.dcm": (PreprocessError, "cannot decode"),
    "MR_truncated.dcm": (PreprocessError, "truncated"),
    "badVR.dcm": (UnsupportedPixelDataError, "NumberOfFrames"),
    # Pixel Data without an Image Pixel module
    "meta_missing_tsyntax.dcm": (UnsupportedPixelDataError, "missing Rows"),
    "nested_priv_SQ.dcm": (UnsupportedPixelDataError, "missing Rows"),
}


def test_found_the_pydicom_pixel_files():
    assert len(PIXEL_FILES) >= 50


@pytest.mark.parametrize("path", PIXEL_FILES, ids=lambda p: os.path.relpath(p, os.path.dirname(get_testdata_file("CT_small.dcm"))))
def test_every_pydicom_file_prepares_or_raises_preprocess_error(path, record_property):
    name = os.path.basename(path)
    try:
        prepared = prepare_file(path, CFG)
    except PreprocessError as exc:  # any other exception fails the test
        record_property("outcome", f"{type(exc).__name__}: {exc.reason}")
        assert exc.reason.strip()
        assert exc.source == str(path)
        assert name in KNOWN_FAILURES, f"unexpected failure: {exc}"
        expected_type, word = KNOWN_FAILURES[name]
        assert isinstance(exc, expected_type)
        assert word in exc.reason
        return
    record_property("outcome", "prepared")
    check_prepared(prepared)
    assert prepared.source == str(path)
    assert prepared.modality


# ----------------------------------------------------------------------------- intensities


def test_ct_hu_windowing_known_value():
    ds = _read("CT_small.dcm")
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    p = prepare_dataset(ds, CFG, "ct")
    assert p.modality == "CT" and p.sop_instance_uid == ds.SOPInstanceUID
    crop = crop_of(p)[:, :, 0]
    raw = ds.pixel_array.astype(np.float64)
    # 128 x 128 image, 64 crop: the crop starts at (32, 32)
    assert raw[32, 35] == 1028  # HU 4
    assert crop[0, 3] == pytest.approx((4 - 39.5) / 399 + 0.5, abs=1e-6)
    hu = raw[32:96, 32:96] - 1024
    np.testing.assert_allclose(crop, np.clip((hu - 39.5) / 399 + 0.5, 0, 1), atol=1e-6)


def test_multivalued_window_uses_first_value():
    ds = _read("examples_overlay.dcm")
    assert len(ds.WindowCenter) == 2
    single = copy.deepcopy(ds)
    single.WindowCenter, single.WindowWidth = ds.WindowCenter[0], ds.WindowWidth[0]
    assert torch.equal(prepare_dataset(ds, CFG, "a").noise, prepare_dataset(single, CFG, "b").noise)


def test_percentile_window_when_no_voi():
    arr = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    p = prepare_dataset(make_ds(arr), CFG, "ramp")
    lo, hi = np.percentile(arr, (0.5, 99.5))
    expected = np.clip((arr[18:82, 18:82] - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(crop_of(p)[:, :, 1], expected, atol=1e-6)


def test_monochrome1_is_inverted():
    ds = _read("6154")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    mono2 = copy.deepcopy(ds)
    mono2.PhotometricInterpretation = "MONOCHROME2"
    a, b = prepare_dataset(ds, CFG, "m1"), prepare_dataset(mono2, CFG, "m2")
    torch.testing.assert_close(a.noise, 1 - b.noise)
    assert not torch.allclose(a.noise, b.noise)


def test_voi_lut_sequence():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = make_ds(arr)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = [255 - i for i in range(256)]
    ds.VOILUTSequence = Sequence([item])
    p = prepare_dataset(ds, PreprocessConfig(noise_crop=16), "voilut")
    np.testing.assert_allclose(crop_of(p)[:, :, 0], 1 - arr / 255.0, atol=1e-6)


def enhanced_ds() -> Dataset:
    """Two 8x8 frames (100 and 200) whose rescale (x2 - 100) and window (200/201) come from
    the shared functional groups of an enhanced multi-frame object."""
    arr = np.stack([np.full((8, 8), 100, np.uint16), np.full((8, 8), 200, np.uint16)])
    ds = make_ds(arr)
    pvt, voi, shared = Dataset(), Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 2, -100, "US"
    voi.WindowCenter, voi.WindowWidth = 200, 201
    shared.PixelValueTransformationSequence = Sequence([pvt])
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    return ds


def test_enhanced_functional_groups():
    p = prepare_dataset(enhanced_ds(), PreprocessConfig(noise_crop=8), "enhanced")
    # frame 0: 100 * 2 - 100 = 100, frame 1: 300; window 200/201
    assert p.frame_indices == (0, 1)
    assert float(p.noise[0].max()) == pytest.approx((100 - 199.5) / 200 + 0.5)
    assert float(p.noise[1].min()) == 1.0


def test_non_finite_float_pixel_data_raises():
    arr = np.ones((8, 8), np.float32)
    arr[3, 3] = np.nan
    ds = make_ds(np.zeros((8, 8), np.uint8))
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored = 32, 32
    del ds.HighBit
    del ds.PixelRepresentation
    ds.FloatPixelData = arr.tobytes()
    with pytest.raises(PreprocessError, match="non-finite"):
        prepare_dataset(ds, CFG, "nan")
    ds.FloatPixelData = np.ones((8, 8), np.float32).tobytes()
    check_prepared(prepare_dataset(ds, CFG, "finite"))


# ---------------------------------------------------------------------------------- colour


def test_rgb_file_is_three_channel():
    p = prepare_file(get_testdata_file("ExplVR_BigEnd.dcm"), CFG)
    check_prepared(p)
    ds = _read("ExplVR_BigEnd.dcm")
    assert ds.PhotometricInterpretation == "RGB"
    assert not torch.equal(p.noise[:, 0], p.noise[:, 1])
    # 60 x 80: crop pads 2 rows each side, crops columns 8..72
    native = ds.pixel_array[:, 8:72, :] / 255.0
    np.testing.assert_allclose(crop_of(p)[2:62], native, atol=1e-6)


def test_ybr_jpeg_is_converted_to_rgb():
    rgb = prepare_file(get_testdata_file("SC_rgb_dcmtk_+eb+cr.dcm"), CFG)
    for name in ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        assert _read(name).PhotometricInterpretation.startswith("YBR")
        ybr = prepare_file(get_testdata_file(name), CFG)
        assert (ybr.noise - rgb.noise).abs().mean() < 0.03, name


def test_palette_color_becomes_rgb():
    ds = _read("examples_palette.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and ds.SamplesPerPixel == 1
    p = prepare_dataset(ds, CFG, "palette")
    check_prepared(p)
    # 350 x 800 image: crop starts at (143, 368); the LUT entries are 16-bit
    indices = ds.pixel_array[143:207, 368:432].astype(int) - ds.RedPaletteColorLookupTableDescriptor[1]
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        lut = np.frombuffer(getattr(ds, f"{colour}PaletteColorLookupTableData"), "<u2")
        np.testing.assert_allclose(crop_of(p)[:, :, channel], lut[indices] / 65535, atol=1e-6)
    # the LUT is a colour map, and the semantic view shows it
    assert not torch.allclose(p.semantic[:, 0] * STD[0, 0] + MEAN[0, 0], p.semantic[:, 2] * STD[0, 2] + MEAN[0, 2])


# ------------------------------------------------------------------------------- multi-frame


def _frames_ds(n: int) -> Dataset:
    arr = np.stack([np.full((10, 12), 10 * i, np.uint8) for i in range(n)])
    return make_ds(arr, WindowCenter=127.5, WindowWidth=256)


def test_sample_frames_rules():
    assert sample_frames(1, 4, "even") == (0,)
    assert sample_frames(3, 4, "even") == (0, 1, 2)
    assert sample_frames(10, 4, "even") == (0, 3, 6, 9)
    assert sample_frames(30, 4, "even") == (0, 10, 19, 29)
    assert sample_frames(10, 2, "even") == (0, 9)
    assert sample_frames(10, 1, "even") == (5,)
    assert sample_frames(10, 4, "first") == (0,)
    assert sample_frames(10, 4, "middle") == (5,)


@pytest.mark.parametrize(
    "rule, expected", [("even", (0, 3, 6, 9)), ("first", (0,)), ("middle", (5,))]
)
def test_multiframe_sampling_picks_the_right_frames(rule, expected):
    cfg = PreprocessConfig(frame_rule=rule, noise_crop=8)
    p = prepare_dataset(_frames_ds(10), cfg, "mf")
    assert p.frame_indices == expected
    check_prepared(p, len(expected), cfg)
    for k, frame in enumerate(expected):
        # window 127.5/256 (LINEAR): y = (x - 127) / 255 + 0.5
        assert torch.allclose(p.noise[k], torch.tensor((10 * frame - 127) / 255 + 0.5))


def test_multiframe_file_decodes_only_sampled_frames(tmp_path, monkeypatch):
    path = save(_frames_ds(10), tmp_path / "mf.dcm")
    seen: list[int] = []
    real = pixels.get_decoder

    class Spy:
        def __init__(self, decoder):
            self._decoder = decoder

        def __getattr__(self, name):
            return getattr(self._decoder, name)

        def as_array(self, src, index=None, **kw):
            seen.append(index)
            return self._decoder.as_array(src, index=index, **kw)

    monkeypatch.setattr(pixels, "get_decoder", lambda ts: Spy(real(ts)))
    p = prepare_file(path, CFG)
    assert p.frame_indices == (0, 3, 6, 9) and seen == [0, 3, 6, 9]


def test_compressed_multiframe_sampling():
    p = prepare_file(get_testdata_file("examples_ybr_color.dcm"), CFG)  # 30 JPEG frames
    check_prepared(p, 4)
    assert p.frame_indices == (0, 10, 19, 29)


# --------------------------------------------------------------------- images and the crop


def test_png_and_16bit_tiff_use_the_same_path(tmp_path):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (80, 90), dtype=np.uint8)
    Image.fromarray(gray8).save(tmp_path / "a.png")
    p = prepare_file(tmp_path / "a.png", CFG)
    check_prepared(p, 1)
    assert p.modality == "OT" and p.sop_instance_uid is None and p.frame_indices == (0,)
    np.testing.assert_allclose(crop_of(p)[:, :, 0], gray8[8:72, 13:77] / 255.0, atol=1e-7)

    gray16 = rng.integers(0, 4096, (80, 90), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "b.tiff")
    assert Image.open(tmp_path / "b.tiff").mode.startswith("I;16")
    t = prepare_file(tmp_path / "b.tiff", CFG, modality="mr")
    check_prepared(t, 1)
    assert t.modality == "MR"
    # identical to a DICOM of the same values without VOI attributes
    d = prepare_dataset(make_ds(gray16, bits_stored=12), CFG, "same")
    assert torch.equal(t.noise, d.noise)
    assert torch.allclose(t.semantic, d.semantic)


def test_multipage_tiff_is_sampled_like_multiframe(tmp_path):
    pages = [Image.fromarray(np.full((40, 40), 20 * i, np.uint8)) for i in range(6)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    p = prepare_file(tmp_path / "pages.tif", PreprocessConfig(max_frames=3, noise_crop=16))
    assert p.frame_indices == (0, 2, 5)
    assert [round(float(p.noise[k].mean()) * 255) for k in range(3)] == [0, 40, 100]
    odd = [Image.fromarray(np.zeros((40, 40), np.uint8)), Image.fromarray(np.zeros((30, 40), np.uint8))]
    odd[0].save(tmp_path / "odd.tif", save_all=True, append_images=odd[1:])
    with pytest.raises(UnsupportedPixelDataError, match="differ"):
        prepare_file(tmp_path / "odd.tif", CFG)


def test_rgb_png_and_jpeg_are_read_by_content(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "noext", format="PNG")
    p = prepare_file(tmp_path / "noext", CFG)
    np.testing.assert_allclose(crop_of(p), rgb[3:67, 3:67] / 255.0, atol=1e-7)
    rgba = np.dstack([rgb, np.full((70, 70), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert torch.equal(prepare_file(tmp_path / "alpha.png", CFG).noise, p.noise)
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=90)
    check_prepared(prepare_file(tmp_path / "x.jpg", CFG))


def test_dicom_file_without_preamble(tmp_path):
    ds = make_ds(np.arange(64, dtype=np.uint8).reshape(8, 8))
    ds.SOPInstanceUID = generate_uid()
    del ds.file_meta
    path = tmp_path / "raw.dcm"
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    check_prepared(prepare_file(path, CFG))


def test_constant_image_gives_constant_crop(tmp_path):
    Image.fromarray(np.full((100, 100), 77, np.uint8)).save(tmp_path / "c.png")
    p = prepare_file(tmp_path / "c.png", CFG)
    assert torch.all(p.noise == p.noise.flatten()[0])
    assert float(p.noise[0, 0, 0, 0]) == pytest.approx(77 / 255)
    d = prepare_dataset(make_ds(np.full((100, 100), 1000, np.uint16)), CFG, "const")
    assert torch.all(d.noise == d.noise.flatten()[0])
    check_prepared(d)


def test_small_image_is_padded_not_resized(tmp_path):
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "s.png")
    crop = crop_of(prepare_file(tmp_path / "s.png", CFG))[:, :, 0]
    top, left = (64 - 20) // 2, (64 - 30) // 2
    np.testing.assert_array_equal(crop[top : top + 20, left : left + 30], small / np.float32(255))
    # reflect padding mirrors the pixels next to the border
    np.testing.assert_array_equal(crop[top - 1, left : left + 30], crop[top + 1, left : left + 30])
    np.testing.assert_array_equal(crop[top : top + 20, left - 2], crop[top : top + 20, left + 2])
    # every value in the crop is one of the original values (nothing interpolated)
    assert set(np.unique(np.rint(crop * 255))).issubset(set(np.unique(small).astype(float)))


def test_tiny_image_pads():
    frames = np.arange(3 * 3 * 3, dtype=np.float32).reshape(1, 3, 3, 3)
    out = noise_crop(frames, 8)
    assert out.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(out[0, 2:5, 2:5], frames[0])
    one = noise_crop(np.ones((1, 1, 5, 3), np.float32), 8)
    assert out.shape == one.shape and np.all(one == 1)


def test_noise_crop_is_native_pixels_of_large_dicom(tmp_path):
    # 1100 x 2000 x 16 bit = 4.4 MB: bigger than the defer size, so the pixel
    # data is read from disk lazily; the crop must still be the native pixels.
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 4096, (1100, 2000), dtype=np.uint16)
    path = save(make_ds(arr, bits_stored=12, WindowCenter=2048, WindowWidth=4097), tmp_path / "big.dcm")
    p = prepare_file(path, PreprocessConfig(noise_crop=32))
    top, left = (1100 - 32) // 2, (2000 - 32) // 2
    expected = np.clip((arr[top : top + 32, left : left + 32] - 2047.5) / 4096 + 0.5, 0, 1)
    np.testing.assert_allclose(crop_of(p)[:, :, 2], expected, atol=1e-6)


def test_semantic_is_resized_and_clip_normalised(tmp_path):
    Image.fromarray(np.full((300, 200, 3), 255, np.uint8)).save(tmp_path / "w.png")
    p = prepare_file(tmp_path / "w.png", PreprocessConfig(semantic_size=32))
    assert p.semantic.shape == (1, 3, 32, 32)
    expected = (1 - MEAN) / STD
    assert torch.allclose(p.semantic, expected.expand(1, 3, 32, 32), atol=1e-5)


# ------------------------------------------------------------------------------------ errors


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    ds = make_ds(np.zeros((4, 4), np.uint16))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000
    path = save(ds, tmp_path / "huge.dcm")

    def no_decoding(ts):
        raise AssertionError("decoder requested")

    monkeypatch.setattr(pixels, "get_decoder", no_decoding)
    with pytest.raises(ImageTooLargeError) as info:
        prepare_file(path, CFG)
    assert info.value.source == str(path) and "limit" in info.value.reason
    small = make_ds(np.zeros((100, 100), np.uint8))
    with pytest.raises(ImageTooLargeError):
        prepare_dataset(small, PreprocessConfig(max_pixels=9999), "limit")


def test_pixel_limit_for_image_files(tmp_path):
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "p.png")
    with pytest.raises(ImageTooLargeError):
        prepare_file(tmp_path / "p.png", PreprocessConfig(max_pixels=9999))


def test_truncated_pixel_data_raises_with_reason(tmp_path):
    with pytest.raises(PreprocessError) as info:
        prepare_file(get_testdata_file("MR_truncated.dcm"), CFG)
    assert "truncated" in info.value.reason and "MR_truncated.dcm" in str(info.value)
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(PreprocessError) as info:
        prepare_file(tmp_path / "cut.dcm", CFG)
    assert info.value.reason


def test_garbage_and_unreadable_files(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "garbage.dcm").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "text.txt").write_text("hello, not an image\n" * 20)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    for name in ("garbage.dcm", "text.txt", "empty", "broken.png", "missing.dcm"):
        with pytest.raises(PreprocessError) as info:
            prepare_file(tmp_path / name, CFG)
        assert info.value.reason and info.value.source == str(tmp_path / name)
    with pytest.raises(PreprocessError, match="directory"):
        prepare_file(tmp_path, CFG)


def test_no_pixel_data():
    with pytest.raises(NoPixelDataError) as info:
        prepare_file(get_testdata_file("rtplan.dcm"), CFG)
    assert "Pixel Data" in info.value.reason


@pytest.mark.parametrize(
    "change, word",
    [
        ({"BitsAllocated": 12}, "BitsAllocated"),
        ({"Rows": 0}, "rows"),
        ({"PhotometricInterpretation": "HSV"}, "PhotometricInterpretation"),
        ({"SamplesPerPixel": 3}, "SamplesPerPixel"),
    ],
)
def test_bad_headers_are_unsupported(change, word):
    ds = make_ds(np.zeros((8, 8), np.uint16))
    for key, value in change.items():
        setattr(ds, key, value)
    with pytest.raises(UnsupportedPixelDataError, match=word):
        prepare_dataset(ds, CFG)


def test_unsupported_transfer_syntax_and_missing_plugin(monkeypatch):
    ds = make_ds(np.zeros((8, 8), np.uint8))
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(UnsupportedPixelDataError, match="not supported") as info:
        prepare_dataset(ds, CFG)
    assert info.value.source == "SOP 1.2.3.4"

    class Unavailable:
        is_available = False
        missing_dependencies = ["gdcm - requires gdcm>=3.0.10"]

    monkeypatch.setattr(pixels, "get_decoder", lambda ts: Unavailable())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.raises(UnsupportedPixelDataError, match="gdcm"):
        prepare_dataset(ds, CFG)


def test_unexpected_errors_are_wrapped(monkeypatch):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(pixels, "apply_window", boom)
    ds = make_ds(np.zeros((8, 8), np.uint8), WindowCenter=1, WindowWidth=2)
    with pytest.raises(PreprocessError, match="ZeroDivisionError"):
        prepare_dataset(ds, CFG, "x")


def test_dataset_without_file_meta():
    ds = make_ds(np.arange(64, dtype=np.uint16).reshape(8, 8))
    del ds.file_meta
    check_prepared(prepare_dataset(ds, CFG, "in-memory"))


# ---------------------------------------------------------------------------- config, errors


def test_config_is_strict_and_frozen():
    with pytest.raises(ValidationError):
        PreprocessConfig(unknown=1)
    with pytest.raises(ValidationError):
        PreprocessConfig(percentile_window=(99.0, 1.0))
    with pytest.raises(ValidationError):
        CFG.noise_crop = 3
    assert CFG.semantic_size == 64 and CFG.noise_crop == 64 and CFG.max_frames == 4
    assert CFG.max_pixels == 512 * 1024 * 1024 and CFG.frame_rule == "even"


def test_error_types_and_messages():
    e = UnsupportedPixelDataError("SOP 1.2", "no decoder")
    assert isinstance(e, PreprocessError) and isinstance(e, DetectorError)
    assert str(e) == "SOP 1.2: no decoder" and (e.source, e.reason) == ("SOP 1.2", "no decoder")
    for err in (e, ImageTooLargeError("a", "b"), NoPixelDataError("a", "b"), BundleError("/b", "bad")):
        clone = pickle.loads(pickle.dumps(err))
        assert type(clone) is type(err) and str(clone) == str(err)
    c = CheckpointError("/w.pt", "sha256 mismatch", "aa11", "bb22")
    assert "/w.pt" in str(c) and "aa11" in str(c) and "bb22" in str(c)
    assert (c.path, c.reason, c.expected_sha256, c.actual_sha256) == ("/w.pt", "sha256 mismatch", "aa11", "bb22")
    assert str(pickle.loads(pickle.dumps(c))) == str(c)
    assert str(BundleError("/b", "bad")) == "/b: bad"


def test_pixel_data_a_frame_longer_than_declared_is_refused() -> None:
    # A header that understates the image (Rows halved) would otherwise be decoded
    # from the leading bytes and scored on misread pixels.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Rows // 2
    with pytest.raises(UnsupportedPixelDataError, match="header and data disagree"):
        prepare_dataset(ds, CFG, source="halved")


def test_trailing_padding_shorter_than_a_frame_is_tolerated() -> None:
    p = prepare_file(get_testdata_file("MR_small_padded.dcm"), CFG)
    assert torch.isfinite(p.noise).all()
