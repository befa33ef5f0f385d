"""Tests for shared.data.dicom: real radiographs, rejection paths, PHI hygiene.

Real files come from ``../shared/data/dicom`` (skipped with a message when the
folder is absent; present in CI); edge cases from the test files that ship
inside the pydicom wheel (never downloaded).
"""

from __future__ import annotations

import logging
import traceback
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import JPEGLSNearLossless

from shared.data import dicom as dicom_mod
from shared.data.dicom import (
    REJECT_REASONS,
    DicomOptions,
    DicomRejected,
    dicom_to_uint8,
    pixel_spacing_mm,
    read_dicom,
)
from shared.data.sources import ImageReadError, read_image, registered_suffixes

DICOM_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"


@pytest.fixture(scope="module")
def real_dir() -> Path:
    if not DICOM_DIR.is_dir():
        pytest.skip(f"real DICOM folder {DICOM_DIR} not found (it sits beside the checkout in CI)")
    return DICOM_DIR


@pytest.fixture(scope="module")
def rg1(real_dir: Path) -> np.ndarray:
    return read_dicom(real_dir / "RG1_J2KI.dcm")


def _pydicom_file(name: str) -> Path:
    """A test file shipped inside the pydicom package (no download)."""
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"pydicom test file {name} is not in this pydicom install")
    return Path(p)


def _reject(path: Path | str, options: DicomOptions | None = None) -> DicomRejected:
    with pytest.raises(DicomRejected) as info:
        read_dicom(path, DicomOptions() if options is None else options)
    assert info.value.reason in REJECT_REASONS
    return info.value


# ---------------------------------------------------------------------------
# API surface
# ---------------------------------------------------------------------------


def test_api_surface() -> None:
    assert set(REJECT_REASONS) == {
        "not-dicom", "corrupt", "no-pixel-data", "multi-frame", "missing-decoder",
        "unsupported-transfer-syntax", "constant-image", "all-zero", "unsupported-photometric",
    }
    err = DicomRejected("corrupt", "x")
    assert isinstance(err, ImageReadError) and err.reason == "corrupt" and str(err) == "x"
    with pytest.raises(ValueError, match="valid reasons"):
        DicomRejected("nope", "x")
    with pytest.raises(ValueError, match="percentile, minmax"):
        DicomOptions(window_fallback="median")
    with pytest.raises(ValueError, match="percentiles"):
        DicomOptions(percentiles=(99.5, 0.5))


def test_importing_the_module_registers_dcm_and_dicom() -> None:
    assert {".dcm", ".dicom"} <= set(registered_suffixes())


# ---------------------------------------------------------------------------
# Real radiographs
# ---------------------------------------------------------------------------


def _regions(img: np.ndarray) -> tuple[float, float, float]:
    """Mean of the central vertical band (spine/mediastinum) and of the two lung fields."""
    h, w = img.shape
    rows = slice(int(0.25 * h), int(0.50 * h))
    centre = float(img[rows, int(0.46 * w):int(0.54 * w)].mean())
    left = float(img[rows, int(0.18 * w):int(0.34 * w)].mean())
    right = float(img[rows, int(0.66 * w):int(0.82 * w)].mean())
    return centre, left, right


def test_rg1_monochrome1_is_inverted_after_voi_so_bone_is_bright(real_dir: Path, rg1: np.ndarray) -> None:
    ds = pydicom.dcmread(real_dir / "RG1_J2KI.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert rg1.dtype == np.float32 and rg1.shape == (1955, 1841)
    assert 0.0 <= rg1.min() and rg1.max() <= 1.0

    # The same pipeline WITHOUT the inversion, built independently from pydicom.
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    not_inverted = windowed / float(2**ds.BitsStored - 1)
    np.testing.assert_allclose(rg1, 1.0 - not_inverted, atol=1e-5)

    centre, left, right = _regions(rg1)
    assert centre > left + 0.1 and centre > right + 0.1, (centre, left, right)
    # The statistic is honest: without the inversion the ordering flips.
    c0, l0, r0 = _regions(not_inverted)
    assert c0 < l0 - 0.1 and c0 < r0 - 0.1, (c0, l0, r0)


def test_rg2_lossless_encodings_are_identical(real_dir: Path) -> None:
    names = ["RG2_J2KR.dcm", "RG2_RLE.dcm", "RG2_JPLL.dcm"]
    raws = [pydicom.dcmread(real_dir / n).pixel_array for n in names]
    outs = [read_dicom(real_dir / n) for n in names]
    for raw, out in zip(raws[1:], outs[1:], strict=True):
        np.testing.assert_array_equal(raw, raws[0])
        np.testing.assert_array_equal(out, outs[0])
    assert outs[0].shape == (2140, 1760) and outs[0].dtype == np.float32
    assert outs[0].std() > 0.05


def test_rg1_jpeg_ls_near_lossless_matches_jpeg2000_or_names_missing_decoder(real_dir: Path, rg1: np.ndarray) -> None:
    try:
        jls = read_dicom(real_dir / "RG1_JLSN.dcm")
    except DicomRejected as err:
        assert err.reason == "missing-decoder"
        assert "JPEG-LS" in str(err) and "pip install" in str(err)
        return
    assert jls.shape == rg1.shape
    assert float(np.abs(jls - rg1).mean()) < 0.02
    assert float(np.corrcoef(jls.ravel(), rg1.ravel())[0, 1]) > 0.99


def test_missing_jpeg_ls_decoder_is_a_clear_error(real_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = get_decoder(JPEGLSNearLossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if no JPEG-LS plugin were installed
    err = _reject(real_dir / "RG1_JLSN.dcm")
    assert err.reason == "missing-decoder"
    msg = str(err)
    assert "JPEG-LS" in msg and "1.2.840.10008.1.2.4.81" in msg
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in msg
    assert "RG1_JLSN.dcm" in msg and str(real_dir) not in msg


def test_highdicom_dx_uncompressed_monochrome1(real_dir: Path) -> None:
    path = real_dir / "highdicom_dx_image.dcm"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and not ds.file_meta.TransferSyntaxUID.is_compressed
    img = read_dicom(path)
    assert img.shape == (169, 211) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    # Stored high values (dense) must come out bright.
    raw = ds.pixel_array
    assert np.corrcoef(raw.ravel(), img.ravel())[0, 1] < -0.9


def test_monochrome1_rle_and_j2k_agree(real_dir: Path) -> None:
    np.testing.assert_array_equal(read_dicom(real_dir / "RG3_RLE.dcm"), read_dicom(real_dir / "RG3_J2KR.dcm"))


def test_pixel_spacing(real_dir: Path) -> None:
    assert pixel_spacing_mm(real_dir / "RG2_RLE.dcm") == pytest.approx((0.2, 0.2))
    assert pixel_spacing_mm(real_dir / "highdicom_dx_image.dcm") == pytest.approx((1.2, 1.2012))
    assert pixel_spacing_mm(real_dir / "RG1_J2KI.dcm") is None  # stored as 0.000\0.000
    assert pixel_spacing_mm(real_dir / "RG3_RLE.dcm") is None  # absent


def test_uint8_and_image_registry(real_dir: Path) -> None:
    path = real_dir / "highdicom_dx_image.dcm"
    u8 = dicom_to_uint8(path)
    assert u8.dtype == np.uint8 and u8.shape == (169, 211)
    np.testing.assert_array_equal(u8, np.rint(read_dicom(path) * 255).astype(np.uint8))
    out = read_image(path, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8 and out.std() > 5
    copy = path.read_bytes()
    assert read_image(Path(path), 16).shape == (16, 16) and copy == path.read_bytes()


# ---------------------------------------------------------------------------
# pydicom's own edge cases
# ---------------------------------------------------------------------------


def test_big_endian_decodes_like_little_endian() -> None:
    little = read_dicom(_pydicom_file("MR_small.dcm"))
    big = read_dicom(_pydicom_file("MR_small_bigendian.dcm"))
    assert little.shape == (64, 64)
    np.testing.assert_array_equal(big, little)


def test_colour_images_are_rgb() -> None:
    ref = read_dicom(_pydicom_file("SC_rgb_rle.dcm"))  # stored as RGB
    assert ref.shape == (100, 100, 3) and ref.dtype == np.float32
    # The test pattern's first band is pure red.
    np.testing.assert_allclose(ref[2, 50], [1.0, 0.0, 0.0], atol=1e-6)
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm"):  # stored as YBR_FULL(_422)
        ybr = read_dicom(_pydicom_file(name))
        assert ybr.shape == ref.shape
        assert float(np.abs(ybr - ref).mean()) < 0.02, name
    j2k = read_dicom(_pydicom_file("GDCMJ2K_TextGBR.dcm"))  # JPEG 2000, YBR_RCT
    assert j2k.shape == (400, 400, 3)
    bgr = dicom_to_uint8(_pydicom_file("SC_rgb_rle.dcm"), bgr=True)
    assert bgr.dtype == np.uint8 and tuple(bgr[2, 50]) == (0, 0, 255)


@pytest.mark.parametrize("name", ["rtdose.dcm", "SC_rgb_rle_2frame.dcm"])
def test_multi_frame_rejected(name: str) -> None:
    assert _reject(_pydicom_file(name)).reason == "multi-frame"


def test_no_pixel_data_rejected() -> None:
    assert _reject(_pydicom_file("rtplan.dcm")).reason == "no-pixel-data"


def test_text_file_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is a text file, not an image\n" * 20)
    assert _reject(path).reason == "not-dicom"
    assert _reject(path, DicomOptions(force=True)).reason == "not-dicom"
    with pytest.raises(ImageReadError):  # and via the registry
        read_image(path, 8)


def test_empty_and_missing_files_are_corrupt(tmp_path: Path) -> None:
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert _reject(tmp_path / "empty.dcm").reason == "corrupt"
    assert _reject(tmp_path / "missing.dcm").reason == "corrupt"


@pytest.mark.parametrize("name", ["highdicom_dx_image.dcm", "RG2_RLE.dcm"])
def test_truncated_file_is_corrupt(real_dir: Path, tmp_path: Path, name: str) -> None:
    data = (real_dir / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    assert _reject(path).reason == "corrupt"


def _edited(src: str, dest: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(_pydicom_file(src))
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dest)
    return dest


def test_constant_and_all_zero_images_rejected(tmp_path: Path) -> None:
    shape = (64, 64)
    const = _edited("MR_small.dcm", tmp_path / "const.dcm", PixelData=np.full(shape, 321, np.int16).tobytes())
    zero = _edited("MR_small.dcm", tmp_path / "zero.dcm", PixelData=np.zeros(shape, np.int16).tobytes())
    assert _reject(const).reason == "constant-image"
    assert _reject(zero).reason == "all-zero"
    rgb = pydicom.dcmread(_pydicom_file("SC_rgb_rle.dcm"))
    rgb.decompress()
    rgb.PixelData = np.full((100, 100, 3), 7, np.uint8).tobytes()
    rgb.save_as(tmp_path / "rgb_const.dcm")
    assert _reject(tmp_path / "rgb_const.dcm").reason == "constant-image"


def test_unsupported_photometric_and_transfer_syntax(tmp_path: Path) -> None:
    err = _reject(_edited("MR_small.dcm", tmp_path / "hsv.dcm", PhotometricInterpretation="HSV"))
    assert err.reason == "unsupported-photometric" and "HSV" in str(err)
    ds = pydicom.dcmread(_pydicom_file("SC_rgb_jpeg_gdcm.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder exists
    ds.save_as(tmp_path / "mpeg.dcm")
    err = _reject(tmp_path / "mpeg.dcm")
    assert err.reason == "unsupported-transfer-syntax" and "1.2.840.10008.1.2.4.100" in str(err)


# ---------------------------------------------------------------------------
# Windowing
# ---------------------------------------------------------------------------


def test_window_fallbacks(tmp_path: Path) -> None:
    src = pydicom.dcmread(_pydicom_file("CT_small.dcm"))  # rescale, no window
    assert "WindowCenter" not in src and "RescaleIntercept" in src
    values = apply_modality_lut(src.pixel_array, src).astype(np.float64)
    path = _pydicom_file("CT_small.dcm")
    mm = read_dicom(path, DicomOptions(window_fallback="minmax"))
    np.testing.assert_allclose(mm, (values - values.min()) / np.ptp(values), atol=1e-6)
    pct = read_dicom(path)  # default: 0.5-99.5 percentiles, clipped
    lo, hi = np.percentile(values, [0.5, 99.5])
    np.testing.assert_allclose(pct, np.clip((values - lo) / (hi - lo), 0, 1), atol=1e-6)
    # A stored window is used unless told otherwise; one that saturates the image is ignored.
    windowed = _edited("CT_small.dcm", tmp_path / "w.dcm", WindowCenter=40, WindowWidth=400)
    w = read_dicom(windowed)
    assert not np.allclose(w, pct) and w.min() == 0.0 and w.max() == 1.0
    np.testing.assert_allclose(read_dicom(windowed, DicomOptions(use_file_voi=False)), pct, atol=1e-6)
    far = _edited("CT_small.dcm", tmp_path / "far.dcm", WindowCenter=60000, WindowWidth=10)
    np.testing.assert_allclose(read_dicom(far), pct, atol=1e-6)


# ---------------------------------------------------------------------------
# Privacy
# ---------------------------------------------------------------------------

CANARIES = ("PHI^CANARY", "CANARY-ID-123", "CANARYACC77", "19990909", "CANARY-PRIVATE", "CANARY GENERAL HOSPITAL")


def _phi_copy(dest: Path, raw: dict[str, tuple[str, bytes]] | None = None, **changes: object) -> Path:
    ds = pydicom.dcmread(_pydicom_file("MR_small.dcm"))
    ds.PatientName = "PHI^CANARY"
    ds.PatientID = "CANARY-ID-123"
    ds.AccessionNumber = "CANARYACC77"
    ds.StudyDate = "19990909"
    ds.InstitutionName = "CANARY GENERAL HOSPITAL"
    block = ds.private_block(0x0011, "MEDFED TEST", create=True)
    block.add_new(0x01, "LO", "CANARY-PRIVATE")
    for key, value in changes.items():
        setattr(ds, key, value)
    for keyword, (vr, value) in (raw or {}).items():  # invalid values pydicom would refuse to set
        tag = pydicom.tag.Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(dest)
    return dest


def _assert_clean(text: str, folder: Path) -> None:
    for canary in CANARIES:
        assert canary not in text
    assert str(folder) not in text


def test_no_phi_in_logs_or_exceptions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "CANARY-FOLDER"
    folder.mkdir()
    good = _phi_copy(folder / "CANARY-NAME.dcm")
    data = good.read_bytes()
    (folder / "trunc.dcm").write_bytes(data[: len(data) // 2])
    variants = [
        folder / "trunc.dcm",
        _phi_copy(folder / "frames.dcm", NumberOfFrames=2),
        _phi_copy(folder / "flat.dcm", PixelData=np.full((64, 64), 5, np.int16).tobytes()),
        # pydicom itself warns AND logs "Invalid value for VR IS: 'PHI^CANARY'" on this one:
        _phi_copy(folder / "badnf.dcm", raw={"NumberOfFrames": ("IS", b"PHI^CANARY")}),
        _phi_copy(folder / "photo.dcm", raw={"PhotometricInterpretation": ("CS", b"PHI^CANARY")}),
        _phi_copy(folder / "short.dcm", Rows=128),  # pixel data too short for the header
    ]
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = read_dicom(good)
        assert img.shape == (64, 64)
        assert pixel_spacing_mm(good) is not None
        reasons = []
        for path in variants:
            with pytest.raises(DicomRejected) as info:
                read_dicom(path)
            err = info.value
            reasons.append(err.reason)
            assert err.__cause__ is None and err.__context__ is None  # no pydicom message rides along
            _assert_clean("".join(traceback.format_exception(err)), folder)
            _assert_clean(repr(err), folder)
    assert reasons == ["corrupt", "multi-frame", "constant-image", "corrupt", "unsupported-photometric", "corrupt"]
    assert caplog.records, "expected some DEBUG records (counts/reasons)"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    _assert_clean(logged, folder)
    assert "CANARY-NAME" not in logged and ".dcm" not in logged  # not even the bare file name
    _assert_clean("\n".join(str(w.message) for w in caught), folder)


def test_third_party_log_records_are_dropped_only_while_reading(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with dicom_mod._quiet_third_party():
        logging.getLogger("pydicom").warning("value PHI^CANARY")
        logging.getLogger("pydicom.pixels.decoders.base").warning("value PHI^CANARY")
        warnings.warn("value PHI^CANARY", UserWarning, stacklevel=1)
    assert "CANARY" not in caplog.text
    assert "suppressed 1 warning(s) and 2 log record(s)" in caplog.text
    logging.getLogger("pydicom").warning("outside a read")
    assert "outside a read" in caplog.text
