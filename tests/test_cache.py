"""Tests for shared.data.cache: build once, memory-map afterwards, invalidate, detect corruption."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.data import cache as cache_mod
from shared.data.cache import CACHE_VERSION, CachedArrays, SiteCache, build_or_load
from shared.data.preprocess import PreprocessConfig, preprocess
from shared.data.sources import ImageReadError, read_raw

CFG = PreprocessConfig(size=16, equalize="clahe")
N = 10


class CountingReader:
    """``read_raw`` that counts its calls; files named ``*_dcm*`` raise with a reason."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> np.ndarray:
        self.calls += 1
        if "_dcm" in path.name:
            err = ImageReadError(f"no DICOM reader for {path}")
            err.reason = "unsupported-suffix:.dcm"  # type: ignore[attr-defined]
            raise err
        if "_leaky" in path.name:
            err = ImageReadError("bad")
            err.reason = f"failed at {path}"  # type: ignore[attr-defined]  # must not reach the cache
            raise err
        return read_raw(path)


@pytest.fixture
def site(tmp_path: Path) -> tuple[list[Path], list[int]]:
    folder = tmp_path / "hospital" / "patient_PID12345"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(N):
        f = folder / f"img_{i:03d}.png"
        cv2.imwrite(str(f), rng.integers(0, 256, (24 + i, 20), dtype=np.uint8))
        files.append(f)
    return files, [i % 2 for i in range(N)]


@pytest.fixture
def cache(tmp_path: Path) -> SiteCache:
    return SiteCache(tmp_path / "cache")


def _entry_files(c: SiteCache) -> list[Path]:
    return sorted(p for p in c.root.rglob("*") if p.is_file())


def _assert_same(a: CachedArrays, b: CachedArrays) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.kept, b.kept)
    assert a.skipped == b.skipped


def test_second_load_is_identical_memmapped_and_does_not_read(cache: SiteCache,
                                                              site: tuple[list[Path], list[int]]) -> None:
    files, labels = site
    reader = CountingReader()
    progress: list[tuple[int, int]] = []
    first = build_or_load(cache, files, labels, CFG, reader, progress=lambda d, t: progress.append((d, t)))
    assert reader.calls == N and progress[-1] == (N, N)
    second = build_or_load(cache, files, labels, CFG, reader)
    assert reader.calls == N  # no decoding the second time
    _assert_same(first, second)
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    assert second.images.shape == (N, 16, 16) and second.images.dtype == np.uint8
    np.testing.assert_array_equal(second.labels, labels)
    in_memory = build_or_load(None, files, labels, CFG, CountingReader())
    _assert_same(first, in_memory)
    assert not isinstance(in_memory.images, np.memmap)
    # exactly one entry, no leftover temporary folders
    assert [p.name for p in cache.root.iterdir()] == [cache.key(files, labels, CFG)]


def test_touching_or_rewriting_a_file_invalidates(cache: SiteCache, site: tuple[list[Path], list[int]]) -> None:
    files, labels = site
    reader = CountingReader()
    build_or_load(cache, files, labels, CFG, reader)
    k0 = cache.key(files, labels, CFG)
    st = files[3].stat()
    os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    k1 = cache.key(files, labels, CFG)
    assert k1 != k0
    build_or_load(cache, files, labels, CFG, reader)
    assert reader.calls == 2 * N
    before = np.array(build_or_load(cache, files, labels, CFG, reader).images[5])
    cv2.imwrite(str(files[5]), np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1)))  # new content and size
    assert cache.key(files, labels, CFG) not in (k0, k1)
    out = build_or_load(cache, files, labels, CFG, reader)
    assert reader.calls == 3 * N
    np.testing.assert_array_equal(out.images[5], preprocess(read_raw(files[5]), CFG))
    assert not np.array_equal(out.images[5], before)


def test_settings_labels_and_extra_change_the_key(cache: SiteCache, site: tuple[list[Path], list[int]]) -> None:
    files, labels = site
    k = cache.key(files, labels, CFG)
    assert k == cache.key(list(files), list(labels), PreprocessConfig.from_dict(CFG.to_dict()))
    others = {
        cache.key(files, labels, PreprocessConfig(size=16, equalize="hist")),
        cache.key(files, labels, PreprocessConfig(size=16, equalize="clahe", clahe_clip=3.0)),
        cache.key(files, labels, PreprocessConfig(size=32, equalize="clahe")),
        cache.key(files, [1 - y for y in labels], CFG),
        cache.key(files[::-1], labels[::-1], CFG),
        cache.key(files, labels, CFG, extra={"reader": "dicom-v2"}),
    }
    assert k not in others and len(others) == 6
    reader = CountingReader()
    build_or_load(cache, files, labels, CFG, reader)
    build_or_load(cache, files, labels, PreprocessConfig(size=16, equalize="hist"), reader)
    assert reader.calls == 2 * N
    with pytest.raises(ValueError, match="labels"):
        cache.key(files, labels[:-1], CFG)


def _corrupt_truncate(entry: Path) -> None:
    p = entry / "images.npy"
    p.write_bytes(p.read_bytes()[:-100])


def _corrupt_garble_meta(entry: Path) -> None:
    (entry / "meta.json").write_bytes(b"{not json\xff")


def _corrupt_flip_pixel(entry: Path) -> None:
    p = entry / "images.npy"
    data = bytearray(p.read_bytes())
    data[-7] ^= 0xFF  # same size, one pixel changed
    p.write_bytes(bytes(data))


def _corrupt_meta_shape(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["images"]["shape"][0] += 1
    (entry / "meta.json").write_text(json.dumps(meta))


def _corrupt_header(entry: Path) -> None:
    p = entry / "labels.npy"
    p.write_bytes(b"garbage" + p.read_bytes()[7:])


def _remove_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


def _old_version(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["cache_version"] = CACHE_VERSION - 1
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_truncate, _corrupt_garble_meta, _corrupt_flip_pixel, _corrupt_meta_shape, _corrupt_header, _remove_meta,
     _old_version],
)
def test_corrupt_entry_is_detected_deleted_and_rebuilt(
    corrupt, cache: SiteCache, site: tuple[list[Path], list[int]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, labels = site
    reader = CountingReader()
    first = build_or_load(cache, files, labels, CFG, reader)
    key = cache.key(files, labels, CFG)
    del first  # release the memmap before rewriting the file
    corrupt(cache.root / key)
    with caplog.at_level(logging.WARNING, logger="shared.data.cache"):
        assert cache.load(key) is None
    assert not (cache.root / key).exists()
    assert key[:12] in caplog.text and str(tmp_path) not in caplog.text
    rebuilt = build_or_load(cache, files, labels, CFG, reader)
    assert reader.calls == 2 * N
    _assert_same(rebuilt, build_or_load(None, files, labels, CFG, CountingReader()))
    assert cache.load(key) is not None


def test_skipped_counts_and_kept_indices_survive(cache: SiteCache, site: tuple[list[Path], list[int]]) -> None:
    files, labels = site
    folder = files[0].parent
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "scan_dcm.png").write_bytes(b"x")
    (folder / "scan_leaky.png").write_bytes(b"x")
    files = [files[0], folder / "broken.png", files[1], folder / "scan_dcm.png", folder / "scan_leaky.png", files[2]]
    labels = [0, 1, 1, 0, 1, 0]
    first = build_or_load(cache, files, labels, CFG, CountingReader())
    expected = {"unreadable-image": 2, "unsupported-suffix:.dcm": 1}
    assert first.skipped == expected
    np.testing.assert_array_equal(first.kept, [0, 2, 5])
    np.testing.assert_array_equal(first.labels, [0, 1, 0])
    reader = CountingReader()
    second = build_or_load(cache, files, labels, CFG, reader)
    assert reader.calls == 0 and second.skipped == expected
    _assert_same(first, second)


def test_cache_contains_no_paths_or_names(cache: SiteCache, site: tuple[list[Path], list[int]], tmp_path: Path) -> None:
    files, labels = site
    (files[0].parent / "scan_leaky.png").write_bytes(b"x")
    build_or_load(cache, [*files, files[0].parent / "scan_leaky.png"], [*labels, 0], CFG, CountingReader())
    needles = [str(tmp_path).encode(), b"hospital", b"PID12345", b"img_00", b".png"]
    stored = _entry_files(cache)
    assert {p.name for p in stored} == {"images.npy", "labels.npy", "kept.npy", "meta.json"}
    for p in stored:
        blob = p.read_bytes()
        for needle in needles:
            assert needle not in blob, f"{needle!r} found in {p.name}"


def test_all_unreadable_is_not_cached(cache: SiteCache, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    out = build_or_load(cache, [bad], [1], CFG, CountingReader())
    assert out.images.shape == (0, 16, 16) and out.skipped == {"unreadable-image": 1}
    assert not cache.root.exists() or not any(cache.root.iterdir())


def test_three_channel_entries(cache: SiteCache, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"photo_{i}.png"
        cv2.imwrite(str(f), np.random.default_rng(i).integers(0, 256, (20, 30, 3), dtype=np.uint8))
        files.append(f)
    cfg = PreprocessConfig(size=12, channels=3)
    first = build_or_load(cache, files, [0, 1, 0], cfg, read_raw)
    assert first.images.shape == (3, 12, 12, 3)
    _assert_same(first, build_or_load(cache, files, [0, 1, 0], cfg, CountingReader()))


def test_sampled_checksum_for_large_entries(
    cache: SiteCache, site: tuple[list[Path], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "FULL_CHECKSUM_BYTES", 0)
    monkeypatch.setattr(cache_mod, "SAMPLED_ROWS", 4)
    files, labels = site
    build_or_load(cache, files, labels, CFG, CountingReader())
    key = cache.key(files, labels, CFG)
    assert json.loads((cache.root / key / "meta.json").read_text())["checksum"]["scope"] == "rows:4"
    assert cache.load(key) is not None
    _corrupt_flip_pixel(cache.root / key)  # the last row is always sampled
    assert cache.load(key) is None


def test_store_validates_and_key_format(cache: SiteCache) -> None:
    key = "a" * 64
    with pytest.raises(ValueError, match="uint8"):
        cache.store(key, np.zeros((2, 4, 4), np.float32), np.zeros(2), np.arange(2), {})
    with pytest.raises(ValueError, match="labels"):
        cache.store(key, np.zeros((2, 4, 4), np.uint8), np.zeros(3), np.arange(2), {})
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.load("../../etc")
    assert cache.load(key) is None
    out = cache.store(key, np.ones((2, 4, 4), np.uint8), np.array([0, 1]), np.array([0, 2]), {"/secret/path.png": 1})
    assert out.skipped == {"unreadable-image": 1}
    again = cache.store(key, np.full((2, 4, 4), 7, np.uint8), np.array([0, 1]), np.array([0, 2]), {})  # replaces
    assert (again.images == 7).all() and [p.name for p in cache.root.iterdir()] == [key]
