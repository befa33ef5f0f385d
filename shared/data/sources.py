"""Discover a site's labelled images and read them as 8-bit grayscale arrays.

Two layouts are understood (:func:`discover`):

* a manifest CSV (``path,label[,patient_id,...]``), given directly or as
  ``manifest.csv`` inside the data folder (preferred: it carries patient ids);
* a folder of class folders (``ROOT/<class>/**/<image>``).

Pixels are decoded by a reader chosen by file suffix from a small registry
(:func:`register_reader`); :func:`read_image` then turns whatever the reader
returns into a ``uint8`` ``(size, size)`` grayscale array. DICOM (``.dcm``) is
deliberately *not* registered yet: :func:`discover` counts such files as
skipped (``"unsupported-suffix:.dcm"``) until a DICOM reader registers itself.

Privacy: this module logs counts only, never a file path, a patient id or
anything read from an image. Exception messages may name a file or the data
folder the operator gave; callers decide what of that to log or forward.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np

from shared.errors import UserError
from shared.registry import Registry, did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAME",
    "DataSourceError",
    "ImageListing",
    "ImageReadError",
    "ImageReaderFn",
    "ImageRecord",
    "discover",
    "read_image",
    "register_reader",
    "registered_suffixes",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Suffixes decoded by OpenCV (matched case-insensitively)."""

MANIFEST_NAME = "manifest.csv"
"""A data folder containing this file is read through it."""

# Formats we know are images but cannot read yet: counted under their own
# reason so that an operator sees "unsupported-suffix:.dcm: 120", not noise.
# Known medical formats without a 2-D reader: counted under their own skip reason.
_PENDING_SUFFIXES = frozenset({".nii", ".mha", ".nrrd"})

_REQUIRED_COLUMNS = ("path", "label")
_PATIENT_COLUMN = "patient_id"

ImageReaderFn = Callable[[Path], np.ndarray]
"""Decode one file to a 2-D ``(H, W)`` or 3-D ``(H, W, C)`` array of any dtype.

Channels, if any, are in OpenCV order (BGR / BGRA). The reader raises
:class:`ImageReadError` for a file it cannot decode.
"""

_READERS: Registry[ImageReaderFn] = Registry("image reader")


class DataSourceError(UserError):
    """A data folder or manifest is not usable as given.

    The message says what was expected, what was found and how to fix it.
    """


class ImageReadError(Exception):
    """One image could not be read (unreadable, empty, not an image...)."""


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image of a site.

    Attributes
    ----------
    path : Path
        Where the image is (absolute when produced by :func:`discover`).
    label : int
        Class index into :attr:`ImageListing.class_names`.
    patient_id : str or None
        Patient identifier, if the manifest has one. Never log it.
    extra : Mapping[str, str]
        Other manifest columns, carried through unchanged.
    """

    path: Path
    label: int
    patient_id: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ImageListing:
    """The usable images of a site, their class names and what was skipped.

    Attributes
    ----------
    records : tuple[ImageRecord, ...]
        Usable images, in manifest order or sorted by path (class folders).
    class_names : tuple[str, ...]
        Class names; ``records[i].label`` indexes into this.
    skipped : Mapping[str, int]
        Reason -> number of manifest rows / files that were not usable.
    """

    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    skipped: Mapping[str, int] = field(hash=False)

    def __len__(self) -> int:
        return len(self.records)

    def labels(self) -> np.ndarray:
        """Return the class indices of all records.

        Returns
        -------
        np.ndarray
            ``int64`` array of shape ``(len(records),)``.
        """
        return np.fromiter((r.label for r in self.records), dtype=np.int64, count=len(self.records))

    def groups(self) -> np.ndarray | None:
        """Return patient ids for patient-level splitting.

        A record without a patient id gets a unique placeholder
        (``"__record-<i>"``) so that it forms a group of its own.

        Returns
        -------
        np.ndarray or None
            String array of shape ``(len(records),)``, or ``None`` when no
            record has a patient id.
        """
        if not any(r.patient_id is not None for r in self.records):
            return None
        ids = [r.patient_id if r.patient_id is not None else f"__record-{i}" for i, r in enumerate(self.records)]
        return np.asarray(ids, dtype=str)

    def paths(self) -> list[Path]:
        """Return the image paths in record order."""
        return [r.path for r in self.records]


# ---------------------------------------------------------------------------
# Reader registry
# ---------------------------------------------------------------------------


def _normalise_suffix(suffix: str) -> str:
    s = suffix.strip().lower()
    if not s:
        raise ValueError("an image suffix must not be empty (e.g. '.png')")
    return s if s.startswith(".") else f".{s}"


def register_reader(suffixes: str | Iterable[str]) -> Callable[[ImageReaderFn], ImageReaderFn]:
    """Register a pixel reader for one or more file suffixes.

    Parameters
    ----------
    suffixes : str or Iterable[str]
        Suffix(es) such as ``".dcm"`` (case-insensitive, dot optional).

    Returns
    -------
    Callable
        A decorator that registers the function and returns it unchanged.

    Raises
    ------
    ValueError
        If a suffix already has a reader.

    Examples
    --------
    >>> @register_reader([".dcm"])          # doctest: +SKIP
    ... def read_dicom(path: Path) -> np.ndarray: ...
    """
    names = [_normalise_suffix(suffixes)] if isinstance(suffixes, str) else [_normalise_suffix(s) for s in suffixes]
    if not names:
        raise ValueError("register_reader needs at least one suffix")

    def deco(fn: ImageReaderFn) -> ImageReaderFn:
        for name in names:
            _READERS.add(name, fn)
        return fn

    return deco


def registered_suffixes() -> tuple[str, ...]:
    """Return the suffixes that currently have a reader, sorted."""
    return tuple(_READERS.names())


@register_reader(IMAGE_SUFFIXES)
def _read_with_opencv(path: Path) -> np.ndarray:
    """Decode a PNG/JPEG/BMP/TIFF file with OpenCV, keeping bit depth and colour.

    ``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR`` (not ``IMREAD_UNCHANGED``) so that a
    JPEG's EXIF orientation is applied: phone photos are often stored sideways.
    An alpha channel is dropped.
    """
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot open '{path.name}': {exc.strerror or exc}") from None
    if buf.size == 0:
        raise ImageReadError(f"'{path.name}' is an empty file (0 bytes)")
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error:
        img = None
    if img is None:
        raise ImageReadError(f"'{path.name}' is not a decodable image (corrupt, truncated or not {path.suffix})")
    return img


# ---------------------------------------------------------------------------
# Reading pixels
# ---------------------------------------------------------------------------


def _to_gray(img: np.ndarray, name: str) -> np.ndarray:
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
    raise ImageReadError(f"'{name}' has an unsupported shape {img.shape}: expected (H, W) or (H, W, 1/3/4)")


def _to_uint8(gray: np.ndarray, name: str) -> np.ndarray:
    """8-bit passes through; any other depth is min-max scaled to 0..255."""
    if gray.dtype == np.uint8:
        return gray
    if gray.dtype == np.bool_:
        return gray.astype(np.uint8) * np.uint8(255)
    data = gray.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        raise ImageReadError(f"'{name}' has no finite pixel values")
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if hi <= lo:
        # Min-max scaling is undefined; a constant image must not silently become zeros.
        raise ImageReadError(f"'{name}' is constant (every pixel = {lo:g}): nothing to scale to 8 bits")
    scaled = (np.where(finite, data, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    h, w = gray.shape
    if (h, w) == (size, size):
        return gray
    shrinking = h >= size and w >= size
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(gray, (size, size), interpolation=interp)


def read_raw(path: Path) -> np.ndarray:
    """Decode one image with the reader registered for its suffix, unresized.

    Returns whatever the reader gives (any dtype, ``(H, W)`` or ``(H, W, C)``).

    Raises
    ------
    ImageReadError
        No reader for the suffix, or the file does not decode to a non-empty image.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        hint = " (3-D volumes are not supported: export 2-D images)" if suffix in _PENDING_SUFFIXES else ""
        raise ImageReadError(
            f"'{path.name}': no reader for suffix '{suffix}'{hint}; "
            f"readable suffixes: {', '.join(registered_suffixes())}"
        )
    img = _READERS.get(suffix)(path)
    if img is None or img.size == 0:
        raise ImageReadError(f"'{path.name}' decoded to an empty image")
    return img


def read_image(path: Path, size: int) -> np.ndarray:
    """Read one image as an 8-bit grayscale square.

    Parameters
    ----------
    path : Path
        Image file; its suffix selects the reader (see :func:`register_reader`).
    size : int
        Output side length in pixels. The image is squashed (not cropped) to
        ``(size, size)``: ``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when
        growing.

    Returns
    -------
    np.ndarray
        ``uint8`` array of shape ``(size, size)``. Colour is converted to
        gray; depths other than 8 bits are min-max scaled over the image's
        actual range (not truncated).

    Raises
    ------
    ImageReadError
        File missing, empty, not decodable, an unsupported suffix, an
        unsupported shape, or a constant image of more than 8 bits. The
        message names the file (not its folder).
    ValueError
        If ``size`` is not a positive integer.
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer number of pixels, got {size!r}")
    size = int(size)
    path = Path(path)
    img = read_raw(path)
    gray = _to_uint8(_to_gray(img, path.name), path.name)
    return np.ascontiguousarray(_resize(gray, size))


# ---------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------


def _skip_reason(path: Path) -> str | None:
    """``None`` if the suffix is readable, else the reason to count it under."""
    suffix = path.suffix.lower()
    if suffix in _READERS:
        return None
    if suffix in _PENDING_SUFFIXES:
        return f"unsupported-suffix:{suffix}"
    return "unknown-suffix"


def _check_class_names(class_names: Sequence[str] | None) -> tuple[str, ...] | None:
    if class_names is None:
        return None
    if isinstance(class_names, str):
        raise DataSourceError(f"class_names must be a sequence of names, got the single string {class_names!r}")
    names = tuple(str(c) for c in class_names)
    if len(names) < 2:
        raise DataSourceError(f"class_names needs at least 2 classes, got {list(names)}")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise DataSourceError(f"class_names has duplicates: {dupes}")
    return names


def _sorted_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Sort class names; all-integer names ("0", "1", "10") sort numerically."""
    uniq = set(labels)
    if uniq and all(s.isdigit() for s in uniq):
        return tuple(sorted(uniq, key=lambda s: (int(s), s)))
    return tuple(sorted(uniq))


def _unknown_label_error(label: str, where: str, names: tuple[str, ...]) -> DataSourceError:
    return DataSourceError(
        f"{where}: label '{label}' is not one of the given class_names {list(names)}.{did_you_mean(label, names)} "
        "Fix the label, or pass class_names that include it."
    )


def _finish(
    records: list[ImageRecord], class_names: tuple[str, ...], skipped: Counter[str], source: str
) -> ImageListing:
    if not records:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "nothing found"
        raise DataSourceError(
            f"no usable images in the {source} (skipped: {detail}). Expected image files with suffixes "
            f"{', '.join(registered_suffixes())}; check the paths and file types."
        )
    per_class = np.bincount([r.label for r in records], minlength=len(class_names))
    empty = int((per_class == 0).sum())
    logger.info(
        "discovered %d images in %d classes from a %s (%d skipped)",
        len(records), len(class_names), source, sum(skipped.values()),
    )
    if skipped:
        logger.warning("skipped %s", ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    if empty:
        logger.warning("%d of %d classes have no images at this site", empty, len(class_names))
    return ImageListing(tuple(records), class_names, MappingProxyType(dict(sorted(skipped.items()))))


def _read_manifest(manifest: Path, class_names: tuple[str, ...] | None) -> ImageListing:
    base = manifest.parent
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataSourceError(f"cannot read manifest '{manifest.name}': {exc}. Expected a UTF-8 CSV file.") from None
    if not header or not any(h.strip() for h in header):
        raise DataSourceError(
            f"manifest '{manifest.name}' is empty: expected a header row with columns "
            f"{', '.join(_REQUIRED_COLUMNS)} (optional {_PATIENT_COLUMN} and others)."
        )
    keys = [h.strip() for h in header]
    lower = [k.lower() for k in keys]
    missing = [c for c in _REQUIRED_COLUMNS if c not in lower]
    if missing:
        raise DataSourceError(
            f"manifest '{manifest.name}' lacks required column(s) {missing}: found columns {keys}. "
            f"Expected a header with 'path' (image file relative to the manifest's folder) and 'label' "
            f"(class name), optionally '{_PATIENT_COLUMN}'; rename the columns (case does not matter)."
        )
    dupes = sorted({k for k in lower if lower.count(k) > 1})
    if dupes:
        raise DataSourceError(f"manifest '{manifest.name}' has duplicate column(s) {dupes} (case-insensitive)")
    i_path, i_label = lower.index("path"), lower.index("label")
    i_pid = lower.index(_PATIENT_COLUMN) if _PATIENT_COLUMN in lower else None
    extra_cols = [(i, keys[i]) for i in range(len(keys)) if i not in (i_path, i_label, i_pid)]

    skipped: Counter[str] = Counter()
    seen: set[Path] = set()
    usable: list[tuple[Path, str, str | None, dict[str, str], int]] = []
    for lineno, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        cells = row + [""] * (len(keys) - len(row))
        raw_path, label = cells[i_path].strip(), cells[i_label].strip()
        if not raw_path:
            skipped["empty-path"] += 1
            continue
        if not label:
            skipped["empty-label"] += 1
            continue
        if os.sep == "/":
            raw_path = raw_path.replace("\\", "/")
        path = (base / raw_path).absolute()
        reason = _skip_reason(path)
        if reason is not None:
            skipped[reason] += 1
            continue
        if path in seen:
            skipped["duplicate-path"] += 1
            continue
        if not path.is_file():
            skipped["missing-file"] += 1
            continue
        seen.add(path)
        pid = cells[i_pid].strip() if i_pid is not None else ""
        extra = {name: cells[i] for i, name in extra_cols}
        usable.append((path, label, pid or None, extra, lineno))

    if class_names is None:
        names = _sorted_labels(u[1] for u in usable)
        if len(names) == 1:
            raise DataSourceError(
                f"manifest '{manifest.name}' has a single class ('{names[0]}') among its usable rows: "
                "need at least 2 classes. Add images of the other class(es), or pass class_names "
                "(the task's classes) if this site really has only one."
            )
    else:
        names = class_names
    index = {n: i for i, n in enumerate(names)}
    records: list[ImageRecord] = []
    for path, label, pid, extra, lineno in usable:
        if label not in index:
            raise _unknown_label_error(label, f"manifest '{manifest.name}' line {lineno}", names)
        records.append(ImageRecord(path, index[label], pid, MappingProxyType(extra)))
    return _finish(records, names, skipped, "manifest")


def _read_class_folders(root: Path, class_names: tuple[str, ...] | None) -> ImageListing:
    entries = sorted(root.iterdir())
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    loose = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    if not folders:
        found = f"{len(loose)} file(s) and no sub-folders" if loose else "nothing"
        raise DataSourceError(
            f"data folder '{root}' has no class sub-folders (found {found}). Expected either "
            f"'{MANIFEST_NAME}' (columns path,label[,patient_id]) or one sub-folder per class "
            "(e.g. NORMAL/, PNEUMONIA/) holding the images."
        )
    if class_names is None:
        names = tuple(p.name for p in folders)
        if len(names) == 1:
            raise DataSourceError(
                f"data folder '{root}' has a single class folder ('{names[0]}'): need at least 2 classes. "
                "Add a folder per class, or pass class_names (the task's classes) if this site really "
                "has only one."
            )
    else:
        names = class_names
    index = {n: i for i, n in enumerate(names)}
    skipped: Counter[str] = Counter()
    if loose:
        skipped["outside-class-folder"] += len(loose)
    records: list[ImageRecord] = []
    for folder in folders:
        if folder.name not in index:
            raise _unknown_label_error(folder.name, f"class folder in '{root}'", names)
        label = index[folder.name]
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for f in files:
            reason = _skip_reason(f)
            if reason is not None:
                skipped[reason] += 1
                continue
            records.append(ImageRecord(f.absolute(), label))
    return _finish(records, names, skipped, "class-folder tree")


def discover(path: str | Path, class_names: Sequence[str] | None = None) -> ImageListing:
    """Find a site's labelled images.

    Parameters
    ----------
    path : str or Path
        A manifest ``.csv``; or a folder containing ``manifest.csv`` (used in
        preference, since it carries patient ids); or a folder with one
        sub-folder per class (images found recursively, suffix
        case-insensitive, sorted by path; hidden files and folders ignored).
    class_names : Sequence[str], optional
        The task's classes, in label-index order. If omitted, the class
        names found (manifest labels / folder names) are sorted. When given,
        a site may lack some classes, but a label not in the list is an
        error.

    Returns
    -------
    ImageListing
        Usable records, class names and counts of skipped rows/files
        (``"missing-file"``, ``"unknown-suffix"``,
        ``"unsupported-suffix:.dcm"``, ``"duplicate-path"``, ``"empty-path"``,
        ``"empty-label"``, ``"outside-class-folder"``).

    Raises
    ------
    DataSourceError
        The path does not exist or is an unexpected file; the folder is empty
        or has no class folders; only one class is found (and no
        ``class_names`` given); the manifest lacks ``path``/``label``; a
        label is not in ``class_names``; or no usable image remains.

    Notes
    -----
    Manifest paths are relative to the manifest's folder. Manifest columns
    other than ``path``, ``label`` and ``patient_id`` go into
    :attr:`ImageRecord.extra`. Files are not decoded here: unreadable images
    surface later as :class:`ImageReadError` from :func:`read_image`.
    """
    names = _check_class_names(class_names)
    root = Path(path).expanduser()
    if not root.exists():
        raise DataSourceError(
            f"data path '{root}' does not exist. Expected a folder of class folders, a folder with "
            f"'{MANIFEST_NAME}', or a manifest .csv; check the site's data-path setting."
        )
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataSourceError(
                f"data path '{root.name}' is a single '{root.suffix}' file: expected a folder of class "
                f"folders, a folder with '{MANIFEST_NAME}', or a manifest .csv."
            )
        return _read_manifest(root, names)
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        logger.info("reading the data folder through its manifest")
        return _read_manifest(manifest, names)
    return _read_class_folders(root, names)
