"""A site's decoded + preprocessed images, built once and memory-mapped afterwards.

Decoding DICOM/PNG files and preprocessing them costs far more than a
training step on small images, and the Deployment Engine starts a fresh
process for every message, so a site pays it once::

    cache = SiteCache(Path(node_config["cache-path"]))
    arrays = build_or_load(cache, files, labels, cfg, reader=read_raw)
    arrays.images  # read-only np.memmap, uint8 (N, H, W) or (N, H, W, 3)

Layout of ``root`` (one folder per key, all files written into a temporary
folder and then renamed into place with ``os.replace``, so a reader never sees
half an entry)::

    root/<64-hex key>/images.npy   raw uint8 .npy, loaded with mmap_mode="r"
                      labels.npy   int64 (N,)
                      kept.npy     int64 (N,) indices into the input file list
                      meta.json    shapes, dtypes, counts, checksum, created

Privacy: the key is a SHA-256 digest; the cache stores pixels, labels, indices,
skip counts and shapes only: no file path, file name, patient id or header
value. Logs name the first 12 characters of the key, never a path.

Safety: an entry is plain data, never code. Arrays are written and read with
``allow_pickle=False``, and an entry whose ``.npy`` header declares an object
dtype (which only a pickle could fill) is rejected before it is loaded and
rebuilt; ``meta.json`` is parsed as JSON.

Invalidation: the key covers every file's resolved path, size and
``mtime_ns``, the labels, the preprocessing settings, ``extra`` and
:data:`CACHE_VERSION`. Anything else that changes the pixels (a different
reader, a newly installed DICOM decoder, windowing settings) must go into
``extra``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from shared.data.preprocess import PreprocessConfig, preprocess
from shared.data.sources import ImageReadError

logger = logging.getLogger(__name__)

__all__ = ["CACHE_VERSION", "CachedArrays", "SiteCache", "build_or_load"]

CACHE_VERSION = 1
"""Bump when the preprocessing code or the on-disk layout changes meaning."""

FULL_CHECKSUM_BYTES = 256 << 20
"""Image arrays up to this size are checksummed in full (SHA-256, ~1.5 GB/s
here); larger ones over :data:`SAMPLED_ROWS` evenly spaced images plus the
exact file size, so that loading a multi-GB cache stays well under a second."""
SAMPLED_ROWS = 256

STALE_TEMP_SECONDS = 24 * 3600
"""Temporary build folders older than this (a crashed build) are removed."""

DEFAULT_SKIP_REASON = "unreadable-image"
_REASON_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"
_FILES = ("images.npy", "labels.npy", "kept.npy", "meta.json")


@dataclass(frozen=True)
class CachedArrays:
    """A site's preprocessed images.

    Attributes
    ----------
    images : np.ndarray
        ``uint8`` ``(N, H, W)`` or ``(N, H, W, 3)``; a read-only memmap when
        it came from (or went through) a :class:`SiteCache`.
    labels : np.ndarray
        ``int64`` ``(N,)``, the labels of the kept images.
    kept : np.ndarray
        ``int64`` ``(N,)``, indices into the input file list of the images
        that were readable (use them to subset patient ids / groups).
    skipped : dict[str, int]
        Unreadable inputs counted by reason.
    """

    images: np.ndarray
    labels: np.ndarray
    kept: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)


class _Corrupt(Exception):
    """An entry failed validation; the message is path-free and safe to log."""


def _safe_reason(reason: object) -> str:
    """Skip reasons are count labels; anything path-like is collapsed to the default."""
    return reason if isinstance(reason, str) and _REASON_RE.match(reason) and "/" not in reason else DEFAULT_SKIP_REASON


def _checksum(images: np.ndarray, labels: np.ndarray, kept: np.ndarray) -> tuple[str, str]:
    """``(scope, sha256 hex)`` over labels, kept and all or a sample of image rows."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(kept, dtype=np.int64).tobytes())
    h.update(repr((images.shape, str(images.dtype))).encode())
    n = images.shape[0]
    if images.nbytes <= FULL_CHECKSUM_BYTES or n <= SAMPLED_ROWS:
        scope = "full"
        step = max(1, (64 << 20) // max(1, images[0].nbytes if n else 1))
        for start in range(0, n, step):  # chunked: hashing a memmap pages it in gradually
            h.update(np.ascontiguousarray(images[start : start + step]).data)
    else:
        scope = f"rows:{SAMPLED_ROWS}"
        for i in np.unique(np.linspace(0, n - 1, SAMPLED_ROWS).round().astype(np.int64)):
            h.update(np.ascontiguousarray(images[int(i)]).data)
    return scope, h.hexdigest()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Shape, dtype, fortran order and data offset of a .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise _Corrupt(f"unsupported .npy version {version}")
        return tuple(shape), np.dtype(dtype), bool(fortran), f.tell()


class SiteCache:
    """Folder of preprocessed-image entries, one per :meth:`key`.

    Parameters
    ----------
    root : Path
        Site-configurable folder (created on first store). Keep it on local
        disk inside the hospital: it holds pixels.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- keys --------------------------------------------------------------

    def key(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        cfg: PreprocessConfig,
        extra: Mapping[str, object] | None = None,
    ) -> str:
        """SHA-256 hex key of an input list and its preprocessing.

        Covers each file's resolved path, size and ``mtime_ns`` (a missing
        file is hashed as missing), the labels, ``cfg.to_dict()``, ``extra``
        (JSON, sorted keys) and :data:`CACHE_VERSION`.
        """
        files = list(files)
        labels_arr = np.asarray(labels, dtype=np.int64)
        if labels_arr.shape != (len(files),):
            raise ValueError(f"got {len(files)} files but labels of shape {labels_arr.shape}")
        h = hashlib.sha256()
        h.update(f"medfed-site-cache:{CACHE_VERSION}\0".encode())
        h.update(len(files).to_bytes(8, "little"))
        for f in files:
            p = Path(f).resolve()
            try:
                st = p.stat()
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(os.fsencode(p) + b"\0" + stamp.encode() + b"\0")
        h.update(labels_arr.tobytes())
        h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
        h.update(json.dumps(dict(extra or {}), sort_keys=True, default=str).encode())
        return h.hexdigest()

    def _entry(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError("cache key must be 64 lowercase hex characters (from SiteCache.key)")
        return self.root / key

    # -- loading -----------------------------------------------------------

    def load(self, key: str) -> CachedArrays | None:
        """The entry for ``key``, images memory-mapped read-only, or ``None``.

        A corrupt or incomplete entry (bad meta, bad header, wrong sizes,
        checksum mismatch) is deleted, a warning naming the key prefix is
        logged, and ``None`` is returned so that the caller rebuilds.
        """
        entry = self._entry(key)
        if not entry.is_dir():
            return None
        try:
            return self._read(entry)
        except _Corrupt as exc:
            reason = str(exc)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # messages may contain paths: do not log them
            reason = f"unreadable entry ({type(exc).__name__})"
        logger.warning("site cache entry %s is invalid (%s): deleting it, it will be rebuilt", key[:12], reason)
        shutil.rmtree(entry, ignore_errors=True)
        return None

    def _read(self, entry: Path) -> CachedArrays:
        try:
            meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _Corrupt("meta.json missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Corrupt("meta.json is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("cache_version") != CACHE_VERSION:
            raise _Corrupt("meta.json has no or another cache_version")
        arrays: dict[str, np.ndarray] = {}
        for name in ("images", "labels", "kept"):
            spec = meta[name]
            path = entry / f"{name}.npy"
            if not path.is_file():
                raise _Corrupt(f"{name}.npy missing")
            shape, dtype, fortran, offset = _npy_header(path)
            if dtype.hasobject:
                raise _Corrupt(f"{name}.npy declares an object dtype (pickled data): refused")
            if list(shape) != list(spec["shape"]) or str(dtype) != spec["dtype"] or fortran:
                raise _Corrupt(f"{name}.npy header {shape} {dtype} does not match meta {spec['shape']} {spec['dtype']}")
            expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            actual = path.stat().st_size
            if actual != expected:
                raise _Corrupt(f"{name}.npy has {actual} bytes, expected {expected}")
            if name == "images" and shape[0] > 0:
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                arrays[name] = np.load(path, allow_pickle=False)
        images, labels, kept = arrays["images"], arrays["labels"], arrays["kept"]
        n = images.shape[0]
        if images.dtype != np.uint8 or labels.shape != (n,) or kept.shape != (n,) or meta.get("count") != n:
            raise _Corrupt("array counts or dtypes are inconsistent")
        scope, digest = _checksum(images, labels, kept)
        want = meta.get("checksum", {})
        if want.get("algo") != "sha256" or want.get("scope") != scope or want.get("value") != digest:
            raise _Corrupt("checksum mismatch")
        skipped = {_safe_reason(k): int(v) for k, v in dict(meta.get("skipped", {})).items()}
        return CachedArrays(images=images, labels=labels, kept=kept, skipped=skipped)

    # -- storing -----------------------------------------------------------

    def store(
        self,
        key: str,
        images: np.ndarray,
        labels: np.ndarray,
        kept: np.ndarray,
        skipped: Mapping[str, int],
    ) -> CachedArrays:
        """Write an entry atomically and return it memory-mapped from disk.

        Parameters
        ----------
        key : str
            From :meth:`key`.
        images : np.ndarray
            ``uint8`` ``(N, H, W)`` or ``(N, H, W, 3)``.
        labels, kept : np.ndarray
            ``(N,)`` integer arrays (stored as int64).
        skipped : Mapping[str, int]
            Counts by reason; reasons that look like anything but a short
            label (e.g. contain a path) are counted under ``"unreadable-image"``.
        """
        entry = self._entry(key)
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        kept = np.asarray(kept, dtype=np.int64)
        n = images.shape[0] if images.ndim else -1
        valid_shape = images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)
        if images.dtype != np.uint8 or not valid_shape:
            raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
        if labels.shape != (n,) or kept.shape != (n,):
            raise ValueError(f"labels {labels.shape} and kept {kept.shape} must both be ({n},)")
        clean: Counter[str] = Counter()
        for reason, count in skipped.items():
            clean[_safe_reason(reason)] += int(count)

        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key[:12]}-", dir=self.root))
        try:
            scope, digest = _checksum(images, labels, kept)
            for name, arr in (("images", images), ("labels", labels), ("kept", kept)):
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            meta = {
                "cache_version": CACHE_VERSION,
                "count": int(n),
                "images": {"shape": list(images.shape), "dtype": str(images.dtype)},
                "labels": {"shape": list(labels.shape), "dtype": str(labels.dtype)},
                "kept": {"shape": list(kept.shape), "dtype": str(kept.dtype)},
                "skipped": dict(sorted(clean.items())),
                "checksum": {"algo": "sha256", "scope": scope, "value": digest},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            self._publish(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        loaded = self.load(key)
        if loaded is None:  # only if the disk lost it between write and read
            raise OSError(f"site cache entry {key[:12]} could not be read back after writing")
        return loaded

    def _publish(self, tmp: Path, entry: Path) -> None:
        """Rename ``tmp`` to ``entry``; an existing entry (a concurrent build) is replaced."""
        try:
            os.replace(tmp, entry)
            return
        except OSError:
            if not entry.exists():
                raise
        # Another process published the same key first, or a leftover: move it aside, then rename.
        trash = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=self.root))
        try:
            os.replace(entry, trash / "entry")
        except OSError:
            pass
        os.replace(tmp, entry)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def build_or_load(
    cache: SiteCache | None,
    files: Sequence[Path],
    labels: Sequence[int],
    cfg: PreprocessConfig,
    reader: Callable[[Path], np.ndarray],
    extra: Mapping[str, object] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CachedArrays:
    """Load a site's preprocessed images from the cache, or build (and cache) them.

    Parameters
    ----------
    cache : SiteCache or None
        ``None`` computes in memory and stores nothing.
    files : Sequence[Path]
        Image files, in order; ``kept`` indexes into this list.
    labels : Sequence[int]
        One label per file.
    cfg : PreprocessConfig
        Applied to each decoded image with :func:`~shared.data.preprocess.preprocess`.
    reader : Callable[[Path], np.ndarray]
        Decodes one file (any dtype; colour as RGB) or raises
        :class:`~shared.data.sources.ImageReadError`, counted under its
        ``reason`` attribute (default ``"unreadable-image"``). A
        ``MemoryError`` while reading or preprocessing one file is counted as
        ``"out-of-memory"`` and the build goes on. Other exceptions
        propagate (a site wraps its reader in
        :func:`shared.data.usable.usable_reader`, which counts them).
    extra : Mapping[str, object], optional
        More key material (reader name and version, windowing...). Never
        stored, only hashed.
    progress : Callable[[int, int], None], optional
        Called as ``progress(done, total)`` about every 1 % while building.

    Returns
    -------
    CachedArrays
        With ``images`` memory-mapped when a cache is used. When no file is
        readable the images array is empty and nothing is cached (a missing
        decoder installed later must not meet a cached empty result).
    """
    files = list(files)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if labels_arr.shape != (len(files),):
        raise ValueError(f"got {len(files)} files but labels of shape {labels_arr.shape}")
    key = cache.key(files, labels_arr, cfg, extra) if cache is not None else None
    if cache is not None and key is not None:
        hit = cache.load(key)
        if hit is not None:
            logger.info("site cache %s: loaded %d images", key[:12], hit.images.shape[0])
            return hit

    t0 = time.perf_counter()
    total = len(files)
    shape = (cfg.size, cfg.size) if cfg.channels == 1 else (cfg.size, cfg.size, 3)
    images = np.empty((total, *shape), dtype=np.uint8)
    kept: list[int] = []
    skipped: Counter[str] = Counter()
    step = max(1, total // 100)
    for i, f in enumerate(files):
        try:
            images[len(kept)] = preprocess(reader(Path(f)), cfg)
            kept.append(i)
        except ImageReadError as exc:
            skipped[_safe_reason(getattr(exc, "reason", DEFAULT_SKIP_REASON))] += 1
        except MemoryError:  # one oversized or hostile file must not end the site's process
            logger.warning("a file ran out of memory while being preprocessed: quarantined as out-of-memory")
            skipped["out-of-memory"] += 1
        if progress is not None and ((i + 1) % step == 0 or i + 1 == total):
            progress(i + 1, total)
    kept_arr = np.asarray(kept, dtype=np.int64)
    images = images[: len(kept)]
    result_labels = labels_arr[kept_arr]
    logger.info(
        "preprocessed %d of %d images in %.1f s%s",
        len(kept),
        total,
        time.perf_counter() - t0,
        f", skipped {dict(skipped)}" if skipped else "",
    )
    if cache is None or key is None or not kept:
        return CachedArrays(images=images, labels=result_labels, kept=kept_arr, skipped=dict(skipped))
    return cache.store(key, images, result_labels, kept_arr, skipped)
