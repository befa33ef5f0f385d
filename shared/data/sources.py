"""Discover a site's labelled images and read them as 8-bit grayscale arrays.

Two layouts are understood (:func:`discover`):

* a manifest CSV (``path,label[,patient_id,...]``), given directly or as
  ``manifest.csv`` inside the data folder (preferred: it carries patient ids);
* a folder of class folders (``ROOT/<class>/**/<image>``).

Pixels are decoded by a reader chosen by file suffix from a small registry
(:func:`register_reader`); :func:`read_image` then turns whatever the reader
returns into a ``uint8`` ``(size, size)`` grayscale array. DICOM (``.dcm``) is
registered by :mod:`shared.data.dicom` (imported by the :mod:`shared.data`
package); without it :func:`discover` counts such files as skipped
(``"unsupported-suffix:.dcm"``).

Every file is untrusted (:func:`screen_image`, called by :func:`read_raw`
before any decoder runs): it must be a regular file no larger than any image
under the pixel cap could need, and its header (PNG IHDR, JPEG SOF, BMP or
TIFF header via Pillow's per-format parsers, DICOM Rows x Columns x frames)
must state a size within the cap (:data:`shared.limits.DEFAULT_MAX_PIXELS`,
or :func:`pixel_limit`); otherwise it is refused with reason ``"too-large"``
before a byte of pixel memory is allocated. Content that is not one of the
formats the suffix promises is refused too (OpenCV would otherwise decode by
content whatever it recognises). :func:`discover` counts files and manifest
rows that resolve outside the data folder (``../`` rows, symlinks) as
``"outside-data-root"`` unless the site allows it.

Privacy: this module logs counts only, never a file path, a patient id or
anything read from an image. Exception messages may name a file or the data
folder the operator gave; callers decide what of that to log or forward.
"""

from __future__ import annotations

import csv
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np

from shared.errors import UserError
from shared.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_LIMIT, max_file_bytes
from shared.registry import Registry, did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAME",
    "OUTSIDE_ROOT",
    "TOO_LARGE",
    "DataSourceError",
    "ImageGeometry",
    "ImageListing",
    "ImageProbeFn",
    "ImageReadError",
    "ImageReaderFn",
    "ImageRecord",
    "InputRejected",
    "current_max_pixels",
    "data_root",
    "discover",
    "is_outside",
    "pixel_limit",
    "probe_image",
    "read_image",
    "read_raw",
    "register_probe",
    "register_reader",
    "registered_suffixes",
    "screen_image",
]

TOO_LARGE = "too-large"
"""Quarantine reason: the header states more pixels than the cap, or the file is larger than such an image."""
OUTSIDE_ROOT = "outside-data-root"
"""Quarantine reason: the path resolves (``..``, symlinks) outside the site's data folder."""

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


class InputRejected(ImageReadError):
    """A file refused before or instead of decoding; ``reason`` is its quarantine count label.

    Parameters
    ----------
    reason : str
        Short label, e.g. ``"too-large"``, ``"outside-data-root"``,
        ``"missing-file"``, ``"empty-file"``, ``"unreadable-image"``.
    message : str
        What is wrong; names the file (never its folder).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[InputRejected], tuple[str, str]]:  # picklable across worker processes
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class ImageGeometry:
    """An image's size as its header states it (nothing decoded).

    Attributes
    ----------
    width, height : int
        Columns and rows.
    frames : int
        Frames (DICOM Number of Frames); 1 for the raster formats, whose
        first image is all OpenCV decodes.
    samples : int
        Samples (channels) per pixel.
    bits : int
        Bits allocated per sample.
    """

    width: int
    height: int
    frames: int = 1
    samples: int = 1
    bits: int = 8

    @property
    def pixels(self) -> int:
        """``width x height x frames``: what the pixel cap is compared with."""
        return self.width * self.height * self.frames


ImageProbeFn = Callable[[Path], ImageGeometry | None]
"""Read one file's header and return its stated size (``None``: the header states none).

Must not decode pixels. Raises :class:`ImageReadError` (with a ``reason``)
for a file whose header cannot be parsed.
"""

_PROBES: Registry[ImageProbeFn] = Registry("image header probe")
_MAX_PIXELS: ContextVar[int] = ContextVar("medfed_max_pixels", default=DEFAULT_MAX_PIXELS)


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
    row : int or None
        The manifest line the image comes from (the header is line 1); None
        for class folders. ``medfed data check`` names an image by it.
    """

    path: Path
    label: int
    patient_id: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)
    row: int | None = field(default=None, compare=False)


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
    root : Path or None
        The resolved data folder the records were checked against (see
        :func:`data_root`); ``None`` when the listing was built by hand.
    """

    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    skipped: Mapping[str, int] = field(hash=False)
    root: Path | None = field(default=None, compare=False)

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


def register_probe(suffixes: str | Iterable[str]) -> Callable[[ImageProbeFn], ImageProbeFn]:
    """Register a header probe (size without decoding) for one or more file suffixes.

    :func:`screen_image` calls it before the suffix's reader runs, so that an
    image over the pixel cap is refused unallocated. Every built-in reader has
    one; a reader registered without a probe is trusted to bound its own
    allocations.

    Parameters
    ----------
    suffixes : str or Iterable[str]
        Suffix(es) such as ``".dcm"`` (case-insensitive, dot optional).

    Returns
    -------
    Callable
        A decorator that registers the function and returns it unchanged.
    """
    names = [_normalise_suffix(suffixes)] if isinstance(suffixes, str) else [_normalise_suffix(s) for s in suffixes]
    if not names:
        raise ValueError("register_probe needs at least one suffix")

    def deco(fn: ImageProbeFn) -> ImageProbeFn:
        for name in names:
            _PROBES.add(name, fn)
        return fn

    return deco


# ---------------------------------------------------------------------------
# Screening: bounded inputs
# ---------------------------------------------------------------------------


def _check_max_pixels(max_pixels: object) -> int:
    if (isinstance(max_pixels, bool) or not isinstance(max_pixels, int | np.integer)
            or not 1 <= max_pixels <= MAX_PIXELS_LIMIT):
        raise ValueError(f"max_pixels must be an integer in [1, {MAX_PIXELS_LIMIT}], got {max_pixels!r}")
    return int(max_pixels)


def current_max_pixels() -> int:
    """The pixel cap in force: the innermost :func:`pixel_limit`, else :data:`~shared.limits.DEFAULT_MAX_PIXELS`."""
    return _MAX_PIXELS.get()


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Within the block, readers that are not given a cap use ``max_pixels``.

    A site's own cap (node config ``max-image-pixels``) reaches nested reads
    (e.g. a mask reader that also reads the image for its size) this way.
    Context-local: threads and tasks each see their own.

    Raises
    ------
    ValueError
        ``max_pixels`` is not an integer in ``[1, MAX_PIXELS_LIMIT]``.
    """
    token = _MAX_PIXELS.set(_check_max_pixels(max_pixels))
    try:
        yield
    finally:
        _MAX_PIXELS.reset(token)


def probe_image(path: Path) -> ImageGeometry | None:
    """The size ``path``'s header states, via the probe registered for its suffix.

    Returns ``None`` when the suffix has no probe or the header states no size.

    Raises
    ------
    ImageReadError
        The header cannot be parsed (reason from the probe).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in _PROBES:
        return None
    return _PROBES.get(suffix)(Path(path))


def screen_image(path: Path, max_pixels: int | None = None) -> ImageGeometry | None:
    """Decide from metadata and the header alone whether ``path`` may be decoded.

    Parameters
    ----------
    path : Path
        The file (symlinks followed).
    max_pixels : int, optional
        Cap on ``width x height x frames``; default :func:`current_max_pixels`.

    Returns
    -------
    ImageGeometry or None
        The stated size, or ``None`` when the suffix has no probe (a reader
        registered without one) or the header states no size (the reader
        then rejects the file before allocating).

    Raises
    ------
    InputRejected
        ``"missing-file"``; ``"empty-file"``; ``"unreadable-image"`` (not a
        regular file, or content that is not the suffix's format);
        ``"too-large"`` (more bytes than :func:`~shared.limits.max_file_bytes`,
        or a stated size over the cap).
    ImageReadError
        The probe's own rejection (e.g. DICOM ``"not-dicom"``, ``"corrupt"``).
    """
    path = Path(path)
    cap = _check_max_pixels(max_pixels) if max_pixels is not None else current_max_pixels()
    name = path.name
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputRejected("missing-file", f"'{name}' does not exist") from None
    except OSError as exc:
        raise InputRejected("unreadable-image", f"cannot open '{name}': {exc.strerror or type(exc).__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputRejected("unreadable-image", f"'{name}' is not a regular file")
    if st.st_size == 0:
        raise InputRejected("empty-file", f"'{name}' is an empty file (0 bytes)")
    limit = max_file_bytes(cap)
    if st.st_size > limit:
        raise InputRejected(
            TOO_LARGE,
            f"'{name}' has {st.st_size} bytes, more than any image within the pixel cap ({cap} pixels) needs "
            f"({limit} bytes); raise the site's max-image-pixels if such images are expected",
        )
    geometry = probe_image(path)
    if geometry is not None and geometry.pixels > cap:
        frames = f" x {geometry.frames} frames" if geometry.frames > 1 else ""
        raise InputRejected(
            TOO_LARGE,
            f"'{name}' states {geometry.width} x {geometry.height}{frames} = {geometry.pixels} pixels, over the "
            f"cap of {cap}; not decoded. Raise the site's max-image-pixels if such images are expected",
        )
    return geometry


# Magic numbers of the formats the OpenCV reader is registered for, and Pillow's
# parser for each: only the header is read (Pillow's ImageFile classes parse it in
# their constructor; decoding happens on load(), which is never called). Pillow's
# own decompression-bomb check lives in Image.open, which is not used here: the
# cap is ours.
_RASTER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_MODE_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def _pillow_parser(kind: str) -> type:
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

    return {
        "png": PngImagePlugin.PngImageFile,
        "jpeg": JpegImagePlugin.JpegImageFile,
        "bmp": BmpImagePlugin.BmpImageFile,
        "tiff": TiffImagePlugin.TiffImageFile,
    }[kind]


@register_probe(IMAGE_SUFFIXES)
def _probe_raster(path: Path) -> ImageGeometry:
    """PNG/JPEG/BMP/TIFF size from the header, recognised by content (as OpenCV decodes by content)."""
    name = path.name
    with open(path, "rb") as fh:
        head = fh.read(16)
        kind = next((k for magic, k in _RASTER_MAGIC if head.startswith(magic)), None)
        if kind is None:
            raise InputRejected(
                "unreadable-image", f"'{name}' is not a PNG, JPEG, BMP or TIFF image (unrecognised content)"
            )
        fh.seek(0)
        geometry: ImageGeometry | None = None
        try:
            im = _pillow_parser(kind)(fh)
            geometry = ImageGeometry(width=int(im.size[0]), height=int(im.size[1]), samples=len(im.getbands()),
                                     bits=_MODE_BITS.get(str(im.mode), 8))
        except MemoryError:
            raise
        except Exception:  # Pillow raises SyntaxError, OSError, ValueError, struct.error... on damage
            geometry = None
    if geometry is None:  # raised here, outside the except: Pillow's message may quote the file
        raise InputRejected("unreadable-image", f"'{name}' has a damaged {kind.upper()} header")
    return geometry


def is_outside(path: Path, root: Path) -> bool:
    """True when ``path``, with ``..`` and every symlink resolved, is not inside ``root`` (resolved)."""
    try:
        return not Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a symlink loop: not provably inside
        return True


def data_root(path: str | Path) -> Path:
    """The folder a data path's files must stay in: the folder itself, or a manifest/CSV file's folder (resolved)."""
    p = Path(path).expanduser()
    return (p.parent if p.is_file() else p).resolve()


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


def read_raw(path: Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Screen one image (:func:`screen_image`), then decode it with the reader registered for its suffix, unresized.

    Returns whatever the reader gives (any dtype, ``(H, W)`` or ``(H, W, C)``).

    Parameters
    ----------
    path : Path
        The file.
    max_pixels : int, optional
        Pixel cap; default :func:`current_max_pixels` (which is also in force
        for the reader itself).

    Raises
    ------
    ImageReadError
        No reader for the suffix, the file is refused by :func:`screen_image`
        (:class:`InputRejected`, e.g. ``"too-large"``), or it does not decode
        to a non-empty image.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        hint = " (3-D volumes are not supported: export 2-D images)" if suffix in _PENDING_SUFFIXES else ""
        raise ImageReadError(
            f"'{path.name}': no reader for suffix '{suffix}'{hint}; "
            f"readable suffixes: {', '.join(registered_suffixes())}"
        )
    if max_pixels is None:
        screen_image(path)
        img = _READERS.get(suffix)(path)
    else:
        with pixel_limit(max_pixels):
            screen_image(path)
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
    records: list[ImageRecord], class_names: tuple[str, ...], skipped: Counter[str], source: str, root: Path
) -> ImageListing:
    if not records:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "nothing found"
        outside = (
            " Files outside the data folder (manifest rows with '..' or absolute paths elsewhere, symlinks "
            "leading out) are not read unless the site sets allow-outside-data-root=true in its node config "
            "(medfed data check --allow-outside-root)."
            if skipped.get(OUTSIDE_ROOT) else ""
        )
        raise DataSourceError(
            f"no usable images in the {source} (skipped: {detail}). Expected image files with suffixes "
            f"{', '.join(registered_suffixes())}; check the paths and file types.{outside}"
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
    return ImageListing(tuple(records), class_names, MappingProxyType(dict(sorted(skipped.items()))), root)


def _read_manifest(manifest: Path, class_names: tuple[str, ...] | None, root: Path,
                   allow_outside: bool) -> ImageListing:
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
        if not allow_outside and is_outside(path, root):
            skipped[OUTSIDE_ROOT] += 1  # counted, never logged: the row names a path outside the site's folder
            continue
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
        records.append(ImageRecord(path, index[label], pid, MappingProxyType(extra), row=lineno))
    return _finish(records, names, skipped, "manifest", root)


def _read_class_folders(root: Path, class_names: tuple[str, ...] | None, allow_outside: bool) -> ImageListing:
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
    resolved = root.resolve()
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
            if not allow_outside and is_outside(f, resolved):
                skipped[OUTSIDE_ROOT] += 1  # a symlinked file or class folder leading out of the data folder
                continue
            reason = _skip_reason(f)
            if reason is not None:
                skipped[reason] += 1
                continue
            records.append(ImageRecord(f.absolute(), label))
    return _finish(records, names, skipped, "class-folder tree", resolved)


def discover(
    path: str | Path, class_names: Sequence[str] | None = None, *, allow_outside_root: bool = False
) -> ImageListing:
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
    allow_outside_root : bool
        Keep manifest rows and symlinked files/folders that resolve outside
        the data folder (the folder given, or a manifest file's folder).
        Off by default: they are counted as ``"outside-data-root"`` and not
        listed, so that a manifest cannot make a site read
        ``../../../etc/...`` or a symlink lead out of the data the site
        agreed to share. A site allows it in its node config
        (``allow-outside-data-root=true``).

    Returns
    -------
    ImageListing
        Usable records, class names and counts of skipped rows/files
        (``"missing-file"``, ``"unknown-suffix"``,
        ``"unsupported-suffix:.nii"``, ``"duplicate-path"``, ``"empty-path"``,
        ``"empty-label"``, ``"outside-class-folder"``, ``"outside-data-root"``).
        Its ``root`` is the resolved data folder.

    Raises
    ------
    DataSourceError
        The path does not exist or is an unexpected file; the folder is empty
        or has no class folders; only one class is found (and no
        ``class_names`` given); the manifest lacks ``path``/``label``; a
        label is not in ``class_names``; the folder's ``manifest.csv`` is a
        symlink leading outside it (unless allowed); or no usable image remains.

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
        return _read_manifest(root, names, data_root(root), allow_outside_root)
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        if not allow_outside_root and is_outside(manifest, root):
            raise DataSourceError(
                f"'{MANIFEST_NAME}' in the data folder is a link to a file outside it: expected the manifest inside "
                "the data folder. Copy it in, or set allow-outside-data-root=true in the site's node config "
                "(medfed data check --allow-outside-root) if the site really means to read outside its folder."
            )
        logger.info("reading the data folder through its manifest")
        return _read_manifest(manifest, names, data_root(root), allow_outside_root)
    return _read_class_folders(root, names, allow_outside_root)
