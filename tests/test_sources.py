"""Tests for shared.data.sources: discovery (class folders, manifests) and reading."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.data import sources
from shared.data.sources import (
    DataSourceError,
    ImageListing,
    ImageReadError,
    ImageRecord,
    discover,
    read_image,
    register_reader,
    registered_suffixes,
)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    buf.tofile(path)
    return path


def _gray(seed: int, h: int = 12, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    _write(root / "b_pos" / "x2.png", _gray(1))
    _write(root / "b_pos" / "sub" / "x1.JPG", np.dstack([_gray(2)] * 3))
    _write(root / "a_neg" / "y.jpeg", _gray(3))
    _write(root / "a_neg" / "z.png", _gray(4))
    (root / "a_neg" / "notes.txt").write_text("not an image")
    (root / "a_neg" / "scan.nii").write_bytes(b"NII")
    return root


@pytest.fixture
def manifest_site(tmp_path: Path) -> Path:
    root = tmp_path / "msite"
    _write(root / "img" / "p1a.png", _gray(1))
    _write(root / "img" / "p1b.png", _gray(2))
    _write(root / "img" / "p2.jpg", _gray(3))
    _write(root / "img" / "p3.png", _gray(4))
    (root / "manifest.csv").write_text(
        "Path,LABEL,patient_id,site_note\n"
        "img/p1a.png,sick,P1,first\n"
        "img/p1b.png,sick,P1,second\n"
        "img/p2.jpg,healthy,P2,\n"
        "img/gone.png,healthy,P9,missing\n"
        "img/p3.png,healthy,,no pid\n"
    )
    return root


# --------------------------------------------------------------------- discover


def test_class_folders(class_tree: Path) -> None:
    listing = discover(class_tree)
    assert listing.class_names == ("a_neg", "b_pos")
    assert len(listing) == 4
    names = [r.path.name for r in listing.records]
    assert names == ["y.jpeg", "z.png", "x1.JPG", "x2.png"]  # sorted by path, recursive
    assert listing.labels().tolist() == [0, 0, 1, 1]
    assert listing.labels().dtype == np.int64
    assert listing.groups() is None
    assert dict(listing.skipped) == {"unknown-suffix": 1, "unsupported-suffix:.nii": 1}
    assert all(r.path.is_absolute() for r in listing.records)


def test_class_folders_given_order_and_unknown_folder(class_tree: Path) -> None:
    listing = discover(class_tree, class_names=["b_pos", "a_neg", "other"])
    assert listing.class_names == ("b_pos", "a_neg", "other")
    assert listing.labels().tolist() == [1, 1, 0, 0]
    with pytest.raises(DataSourceError, match="a_neg"):
        discover(class_tree, class_names=["b_pos", "c"])


def test_manifest_in_folder_preferred(manifest_site: Path) -> None:
    # A stray class folder must be ignored when manifest.csv is present.
    _write(manifest_site / "zzz" / "q.png", _gray(9))
    listing = discover(manifest_site)
    assert listing.class_names == ("healthy", "sick")
    assert [r.path.name for r in listing.records] == ["p1a.png", "p1b.png", "p2.jpg", "p3.png"]
    assert listing.labels().tolist() == [1, 1, 0, 0]
    assert dict(listing.skipped) == {"missing-file": 1}
    assert [r.patient_id for r in listing.records] == ["P1", "P1", "P2", None]
    assert listing.records[0].extra == {"site_note": "first"}
    groups = listing.groups()
    assert groups is not None and groups.tolist()[:3] == ["P1", "P1", "P2"]
    assert len(set(groups.tolist())) == 3  # the record without an id is its own group


def test_manifest_csv_direct_and_class_names(manifest_site: Path) -> None:
    listing = discover(str(manifest_site / "manifest.csv"), class_names=("sick", "healthy"))
    assert listing.labels().tolist() == [0, 0, 1, 1]
    with pytest.raises(DataSourceError, match="'sick'.*Did you mean 'sicky'"):
        discover(manifest_site / "manifest.csv", class_names=("healthy", "sicky"))


def test_manifest_skips_duplicates_and_volumes(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", _gray(1))
    _write(tmp_path / "b.png", _gray(2))
    (tmp_path / "c.nii").write_bytes(b"x")
    (tmp_path / "list.csv").write_text("path,label\na.png,0\na.png,0\nb.png,1\nc.nii,1\n")
    listing = discover(tmp_path / "list.csv")
    assert len(listing) == 2
    assert dict(listing.skipped) == {"duplicate-path": 1, "unsupported-suffix:.nii": 1}


def test_bad_manifest_header_names_columns(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("file,diagnosis\na.png,x\n")
    with pytest.raises(DataSourceError) as info:
        discover(tmp_path)
    msg = str(info.value)
    assert "'path'" in msg and "'label'" in msg and "'file'" in msg and "'diagnosis'" in msg


def test_single_class_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "only" / "a.png", _gray(1))
    with pytest.raises(DataSourceError, match="single class"):
        discover(tmp_path)
    # With the task's class names a one-class site is accepted.
    listing = discover(tmp_path, class_names=["only", "other"])
    assert listing.labels().tolist() == [0]


def test_single_class_manifest_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", _gray(1))
    (tmp_path / "m.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(DataSourceError, match="single class"):
        discover(tmp_path / "m.csv")


@pytest.mark.parametrize("case", ["missing", "empty-dir", "loose-files", "no-images", "all-missing"])
def test_layout_errors(tmp_path: Path, case: str) -> None:
    target = tmp_path / "d"
    target.mkdir()
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "loose-files":
        _write(target / "a.png", _gray(1))
    elif case == "no-images":
        (target / "x").mkdir()
        (target / "y").mkdir()
        (target / "x" / "readme.txt").write_text("hi")
    elif case == "all-missing":
        (target / "manifest.csv").write_text("path,label\na.png,x\nb.png,y\n")
    with pytest.raises(DataSourceError) as info:
        discover(target)
    assert "expected" in str(info.value).lower()


def test_discover_logs_counts_only(manifest_site: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="shared.data"):
        discover(manifest_site)
    text = caplog.text
    assert "4 images" in text
    for secret in ("P1", "P2", "p1a", "gone", str(manifest_site)):
        assert secret not in text


def test_records_are_hashable() -> None:
    rec = ImageRecord(Path("a.png"), 1, "P", {"k": "v"})
    assert hash(rec) == hash(ImageRecord(Path("a.png"), 1, "P", {"k": "v"}))
    listing = ImageListing((rec,), ("a", "b"), {})
    assert listing.groups() is not None and listing.groups().tolist() == ["P"]


# ------------------------------------------------------------------ read_image


def test_read_color_and_resize(tmp_path: Path) -> None:
    bgr = np.zeros((40, 30, 3), np.uint8)
    bgr[..., 2] = 200  # pure red in BGR
    img = read_image(_write(tmp_path / "c.png", bgr), 16)
    assert img.shape == (16, 16) and img.dtype == np.uint8
    assert abs(int(img.mean()) - round(0.299 * 200)) <= 1
    bgra = np.dstack([bgr, np.full((40, 30), 255, np.uint8)])
    assert read_image(_write(tmp_path / "c4.png", bgra), 8).shape == (8, 8)
    grown = read_image(_write(tmp_path / "small.bmp", _gray(5, 4, 4)), 32)
    assert grown.shape == (32, 32)


def test_read_16bit_uses_actual_range(tmp_path: Path) -> None:
    arr = np.zeros((8, 8), np.uint16)
    arr[:, :4] = 1000
    arr[:, 4:] = 3000  # well below 65535: truncation or /257 would give ~4..12
    img = read_image(_write(tmp_path / "deep.png", arr), 8)
    assert img.dtype == np.uint8
    assert img[:, :4].max() == 0 and img[:, 4:].min() == 255
    const = np.full((8, 8), 1234, np.uint16)
    with pytest.raises(ImageReadError, match="constant"):
        read_image(_write(tmp_path / "flat.png", const), 8)


def test_read_same_size_is_unchanged(tmp_path: Path) -> None:
    g = _gray(7, 16, 16)
    np.testing.assert_array_equal(read_image(_write(tmp_path / "g.png", g), 16), g)


@pytest.mark.parametrize("content", [b"", b"this is text, not a PNG"])
def test_unreadable_files_raise(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_image(bad, 8)
    assert str(tmp_path) not in str(info.value)


def test_missing_file_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "nope.png", 8)
    (tmp_path / "a.nii").write_bytes(b"x")
    with pytest.raises(ImageReadError, match=r"\.nii"):
        read_image(tmp_path / "a.nii", 8)
    with pytest.raises(ValueError, match="size"):
        read_image(tmp_path / "nope.png", 0)


def test_reader_registry_seam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ".dcm" in registered_suffixes()  # shared.data registers the DICOM reader
    assert ".nii" not in registered_suffixes()
    assert set(sources.IMAGE_SUFFIXES) <= set(registered_suffixes())
    monkeypatch.setattr(sources, "_READERS", sources.Registry("image reader"))

    @register_reader("FAKE")
    def _fake(path: Path) -> np.ndarray:
        return np.arange(16, dtype=np.float32).reshape(4, 4)

    f = tmp_path / "x.fake"
    f.write_bytes(b"x")
    img = read_image(f, 4)
    assert img[0, 0] == 0 and img[3, 3] == 255
    with pytest.raises(ValueError, match="already registered"):
        register_reader(".fake")(_fake)


# -------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_cxr_pneumonia() -> None:
    folder = REAL_DATA / "cxr-pneumonia"
    if not folder.is_dir():
        pytest.skip(f"real data not found: expected ../shared/data beside the checkout ({folder})")
    listing = discover(folder)
    assert len(listing) == 5232
    assert listing.class_names == ("NORMAL", "PNEUMONIA")
    assert np.bincount(listing.labels()).tolist() == [1349, 3883]
    groups = listing.groups()
    assert groups is not None and all(r.patient_id for r in listing.records)
    assert 1 < len(np.unique(groups)) < len(listing)
    assert "subtype" in listing.records[0].extra
    for rec in listing.records[:: len(listing) // 5][:5]:
        img = read_image(rec.path, 64)
        assert img.shape == (64, 64) and img.dtype == np.uint8 and img.std() > 0


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise) reads upright."""
    from PIL import Image

    arr = np.zeros((40, 80), dtype=np.uint8)
    arr[:10, :10] = 255  # bright marker in the stored image's top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    img = sources.read_raw(tmp_path / "sideways.jpg")
    assert img.shape[:2] == (80, 40)  # rotated: portrait now
    gray = img if img.ndim == 2 else img.mean(axis=2)
    assert gray[:10, -10:].mean() > 200 and gray[:10, :10].mean() < 50  # marker moved to the top-right
