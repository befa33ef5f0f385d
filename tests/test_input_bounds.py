"""Bounded inputs: a file is refused from its size and header, before any pixel memory is allocated.

The two acceptance cases -- a 20000 x 20000 16-bit PNG (streamed zeros) and a
DICOM whose header claims 60000 x 60000 pixels -- run in child processes whose
peak resident memory is measured (``RUSAGE_CHILDREN`` of a fresh parent that
runs nothing else), both through ``medfed data check`` and through a real
site's training loader. Decoding either would need 0.8 GB / 7.2 GB for the
bare pixel array (11.9 GB and 7 GB measured before the header check existed);
the children run under a 4 GiB address-space limit so that a regression fails
the test instead of exhausting the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from hostile_files import write_dicom, write_dicom_claiming, write_zero_png

import shared.data.dicom as dicom_mod
import shared.data.reading as reading_mod
import shared.data_check as check_mod
import shared.limits as limits_mod
from shared.config import SiteConfig, parse_run_config
from shared.data.cache import build_or_load
from shared.data.dicom import dicom_geometry, read_dicom
from shared.data.phantoms import make_chest_phantoms
from shared.data.preprocess import PreprocessConfig
from shared.data.sources import (
    ImageGeometry,
    InputRejected,
    current_max_pixels,
    pixel_limit,
    probe_image,
    read_raw,
    screen_image,
)
from shared.data_check import check_dataset
from shared.limits import DEFAULT_MAX_PIXELS
from shared.site_data import load_site_data
from shared.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
TASK = get_task("pneumonia-cxr")


def _boom(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the decoder was reached for a file that should have been refused from its header")


# ---------------------------------------------------------------------------
# The test files are what they claim to be
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "depth", "band"), [(300, 211, 16, 601 * 10), (301, 97, 8, 1000)])
def test_zero_png_builder_writes_a_valid_png(tmp_path: Path, width: int, height: int, depth: int, band: int) -> None:
    """The streamed PNG (repeated flushed deflate bands + Adler-32) decodes: the big one is a real image too."""
    path = write_zero_png(tmp_path / "z.png", width, height, bit_depth=depth, band_bytes=band)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape == (height, width) and img.dtype == (np.uint16 if depth == 16 else np.uint8)
    assert not img.any()


# ---------------------------------------------------------------------------
# Header probes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
@pytest.mark.parametrize("channels", [1, 3])
def test_raster_header_probe_reads_the_size_without_decoding(tmp_path: Path, suffix: str, channels: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    shape = (30, 50) if channels == 1 else (30, 50, 3)
    path = tmp_path / f"x{suffix}"
    assert cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
    monkeypatch.setattr(cv2, "imdecode", _boom)
    geometry = probe_image(path)
    assert geometry is not None and (geometry.width, geometry.height, geometry.frames) == (50, 30, 1)
    assert geometry.samples == channels and geometry.pixels == 1500


def test_sixteen_bit_png_probe_reports_its_depth(tmp_path: Path) -> None:
    path = write_zero_png(tmp_path / "z.png", 20000, 20000)
    assert probe_image(path) == ImageGeometry(width=20000, height=20000, frames=1, samples=1, bits=16)


def test_dicom_header_probe_reads_rows_columns_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dicom_claiming(tmp_path / "big.dcm", 60000, 60000)
    monkeypatch.setattr(dicom_mod, "get_decoder", _boom)
    assert dicom_geometry(path) == ImageGeometry(width=60000, height=60000, frames=1, samples=1, bits=16)
    assert probe_image(path) == dicom_geometry(path)  # registered for .dcm


def test_content_that_is_not_the_promised_format_is_not_decoded(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV decodes by content: a WebP or a text file named .png must not reach it unscreened."""
    img = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    ok, webp = cv2.imencode(".webp", img)
    assert ok
    (tmp_path / "photo.png").write_bytes(webp.tobytes())
    (tmp_path / "notes.png").write_text("not an image")
    ok, png = cv2.imencode(".png", img)
    (tmp_path / "really_png.jpg").write_bytes(png.tobytes())  # a known format under another suffix: fine
    monkeypatch.setattr(cv2, "imdecode", _boom)
    for name in ("photo.png", "notes.png"):
        with pytest.raises(InputRejected) as info:
            read_raw(tmp_path / name)
        assert info.value.reason == "unreadable-image" and str(tmp_path) not in str(info.value)
    assert screen_image(tmp_path / "really_png.jpg") == ImageGeometry(20, 20, samples=3)


# ---------------------------------------------------------------------------
# The cap
# ---------------------------------------------------------------------------


def test_oversized_png_is_refused_before_decoding_and_read_under_a_larger_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wide.png"
    assert cv2.imwrite(str(path), np.random.default_rng(2).integers(0, 256, (300, 400), dtype=np.uint8))
    with monkeypatch.context() as m:
        m.setattr(cv2, "imdecode", _boom)
        with pytest.raises(InputRejected) as info:
            read_raw(path, max_pixels=100_000)
        assert info.value.reason == "too-large" and "400 x 300 = 120000 pixels" in str(info.value)
        with pixel_limit(100_000), pytest.raises(InputRejected, match="too-large|over the cap"):
            read_raw(path)  # the cap in force reaches readers that are given none
    assert read_raw(path, max_pixels=120_000).shape == (300, 400)


def test_dicom_claiming_a_huge_size_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = write_dicom_claiming(tmp_path / "big.dcm", 60000, 60000)
    small = write_dicom(tmp_path / "small.dcm", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48))
    with monkeypatch.context() as m:
        m.setattr(dicom_mod, "get_decoder", _boom)
        for call in (lambda: read_dicom(big), lambda: read_raw(big), lambda: screen_image(big)):
            with pytest.raises(InputRejected) as info:
                call()
            assert info.value.reason == "too-large" and "60000 x 60000" in str(info.value)
        with pytest.raises(InputRejected, match="over the cap"):
            read_dicom(small, dicom_mod.DicomOptions(max_pixels=1000))
    assert read_dicom(small).shape == (64, 48)
    with pixel_limit(64 * 48):
        assert read_raw(small).shape == (64, 48)


def test_files_larger_than_any_capped_image_are_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small header on a huge file: the decoder would read the whole file into memory first."""
    monkeypatch.setattr(limits_mod, "FILE_BYTES_SLACK", 0)  # cap 100 px -> at most 800 bytes
    ok, png = cv2.imencode(".png", np.eye(10, dtype=np.uint8) * 255)
    padded = tmp_path / "padded.png"
    padded.write_bytes(png.tobytes() + bytes(5000))  # OpenCV ignores bytes after IEND
    assert read_raw(padded, max_pixels=10_000).shape == (10, 10)
    with pytest.raises(InputRejected, match="bytes") as info:
        read_raw(padded, max_pixels=100)
    assert info.value.reason == "too-large"

    dcm = write_dicom(tmp_path / "private.dcm", np.eye(10, dtype=np.uint16))
    import pydicom

    ds = pydicom.dcmread(dcm)
    ds.add_new((0x0011, 0x0010), "LO", "BLOB CREATOR")
    ds.add_new((0x0011, 0x1001), "OB", bytes(5000))
    ds.save_as(dcm)
    with pytest.raises(InputRejected, match="bytes") as info:
        read_dicom(dcm, dicom_mod.DicomOptions(max_pixels=100))
    assert info.value.reason == "too-large"


def test_pixel_limit_is_scoped_and_validated() -> None:
    assert current_max_pixels() == DEFAULT_MAX_PIXELS == 50_000_000
    with pixel_limit(1234):
        assert current_max_pixels() == 1234
        with pixel_limit(99):
            assert current_max_pixels() == 99
        assert current_max_pixels() == 1234
    assert current_max_pixels() == DEFAULT_MAX_PIXELS
    for bad in (0, -1, True, 1.5, "10", 10**11):
        with pytest.raises(ValueError, match="max_pixels"):
            with pixel_limit(bad):  # type: ignore[arg-type]
                pass


# ---------------------------------------------------------------------------
# MemoryError: one file is quarantined, the site goes on
# ---------------------------------------------------------------------------


def _class_tree(root: Path, n: int = 24) -> None:
    images, labels = make_chest_phantoms(n, size=48, seed=4)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("PNEUMONIA" if lab else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img{i:02d}.png"), img)


def test_memory_error_quarantines_the_file_in_check_and_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "site"
    _class_tree(root)
    real = read_raw

    def exhausting(path: Path, **kwargs: object) -> np.ndarray:
        if path.name == "img03.png":
            raise MemoryError("cannot allocate")
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(check_mod, "read_raw", exhausting)
    monkeypatch.setattr(reading_mod, "read_raw", exhausting)
    report = check_dataset(root)
    assert report.quarantined == {"out-of-memory": 1} and report.num_usable == 23
    cfg = parse_run_config({"image-size": 32, "cache": False})
    data = load_site_data(cfg, SiteConfig(site_id="oom", data_path=str(root)), TASK)
    assert data.skipped == {"out-of-memory": 1}
    assert len(data.train_labels) + len(data.val_labels) == 23


def test_build_or_load_counts_a_memory_error_and_goes_on(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"{i}.png"
        cv2.imwrite(str(f), np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8))
        files.append(f)

    def reader(path: Path) -> np.ndarray:
        if path.name == "1.png":
            raise MemoryError
        return read_raw(path)

    out = build_or_load(None, files, [0, 1, 0], PreprocessConfig(size=8), reader)
    assert out.skipped == {"out-of-memory": 1} and out.kept.tolist() == [0, 2]


# ---------------------------------------------------------------------------
# Acceptance: the huge files, measured in child processes
# ---------------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # inherited: a regression fails, not the machine
    proc = subprocess.run(sys.argv[2:], capture_output=True, text=True, timeout=600)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # this process has only this child
    print(json.dumps({"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-4000:],
                      "peak_bytes": peak_kib * 1024}))
""")

_CHECK = "import sys; from simulation.cli import main; sys.exit(main())"

_LOAD = textwrap.dedent("""
    import json, sys
    from shared.config import SiteConfig, parse_run_config
    from shared.site_data import load_site_data
    from shared.tasks import get_task
    cfg = parse_run_config({"image-size": 32})
    site = SiteConfig(site_id="hospital", data_path=sys.argv[1], cache_dir=sys.argv[2])
    data = load_site_data(cfg, site, get_task("pneumonia-cxr"))
    print(json.dumps({"usable": len(data.train_labels) + len(data.val_labels), "skipped": data.skipped}))
""")


def _measured(argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(4 * GIB), *argv], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


N_GOOD = 24


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good images, a 20000x20000 16-bit PNG, a DICOM claiming 60000x60000, a '../' row, an outside symlink."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "site"
    images, labels = make_chest_phantoms(N_GOOD, size=64, seed=11)
    rows = ["path,label,patient_id"]
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        name = f"img{i:02d}.png" if i % 3 else f"img{i:02d}.dcm"
        if name.endswith(".dcm"):
            write_dicom(root / name, img.astype(np.uint16) * 16)
        else:
            root.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / name), img)
        rows.append(f"{name},{'PNEUMONIA' if lab else 'NORMAL'},P{i:02d}")
    write_zero_png(root / "huge.png", 20000, 20000, bit_depth=16)
    write_dicom_claiming(root / "huge.dcm", 60000, 60000)
    outside = base / "elsewhere"
    outside.mkdir()
    cv2.imwrite(str(outside / "escape.png"), images[0])
    cv2.imwrite(str(outside / "linked.png"), images[1])
    (root / "linked.png").symlink_to(outside / "linked.png")
    rows += ["huge.png,NORMAL,P90", "huge.dcm,PNEUMONIA,P91", "../elsewhere/escape.png,NORMAL,P92",
             "linked.png,PNEUMONIA,P93"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def measured_check(hostile_site: Path) -> dict:
    result = _measured([sys.executable, "-c", _CHECK, "data", "check", str(hostile_site), "--json"])
    print(f"\nmedfed data check on the hostile site: peak RSS {result['peak_bytes'] / 2**20:.0f} MiB")
    return result


def test_data_check_quarantines_huge_png_and_dicom_without_allocating(measured_check: dict) -> None:
    assert measured_check["rc"] == 1, measured_check["stderr"]  # ready with warnings: 24 good images remain
    report = json.loads(measured_check["stdout"])
    assert report["quarantined"] == {"outside-data-root": 2, "too-large": 2}
    assert report["num_usable"] == N_GOOD
    assert measured_check["peak_bytes"] < GIB, f"peak RSS {measured_check['peak_bytes'] / 2**20:.0f} MiB"


def test_training_site_quarantines_them_too_and_agrees_with_the_check(
    hostile_site: Path, measured_check: dict, tmp_path: Path
) -> None:
    result = _measured([sys.executable, "-c", _LOAD, str(hostile_site), str(tmp_path / "cache")])
    print(f"\ntraining site loader on the hostile site: peak RSS {result['peak_bytes'] / 2**20:.0f} MiB")
    assert result["rc"] == 0, result["stderr"]
    loaded = json.loads(result["stdout"].strip().splitlines()[-1])
    report = json.loads(measured_check["stdout"])
    assert loaded["skipped"] == report["quarantined"] == {"outside-data-root": 2, "too-large": 2}
    assert loaded["usable"] == report["num_usable"] == N_GOOD
    assert result["peak_bytes"] < GIB, f"peak RSS {result['peak_bytes'] / 2**20:.0f} MiB"
    assert str(hostile_site) not in result["stderr"]  # counted, never logged
