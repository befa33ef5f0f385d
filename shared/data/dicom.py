"""Read single-frame DICOM radiographs (CR, DX, secondary capture) as float images.

Importing this module registers :func:`read_dicom` (as 8-bit, via
:func:`dicom_to_uint8`) with :func:`shared.data.sources.register_reader` for the
suffixes ``.dcm`` and ``.dicom``, so :func:`shared.data.sources.read_image`
can decode DICOM files once ``shared.data.dicom`` has been imported.

Grayscale pipeline (PS3.4 grayscale standard display pipeline, in this order):

1. decode the stored pixel values (pydicom 3 and its decoder plugins);
2. modality LUT: *Rescale Slope/Intercept* or a *Modality LUT Sequence*
   (:func:`pydicom.pixels.apply_modality_lut`);
3. VOI: the file's *VOI LUT Sequence* or, failing that, its *first*
   *Window Center/Width* pair (:func:`pydicom.pixels.apply_voi_lut`, honouring
   *VOI LUT Function*), scaled from the VOI output range to ``[0, 1]``. When
   the file has no usable VOI (absent, invalid, or mapping the whole image to
   a single value) a data-driven window is used instead
   (:attr:`DicomOptions.window_fallback`): by default the 0.5th-99.5th
   percentiles of the modality values, which ignores collimator edges,
   burnt-in labels and dead pixels that would otherwise compress the
   anatomy into a few grey levels under min-max;
4. ``MONOCHROME1`` is inverted *after* VOI (``1 - v``), so that bone and
   other attenuating tissue is bright in every output, whatever the file's
   photometric interpretation.

Colour images (``RGB``, ``YBR_FULL``, ``YBR_FULL_422`` and JPEG 2000
``YBR_ICT``/``YBR_RCT``) are converted to RGB and divided by
``2**BitsStored - 1``: no modality or VOI transform applies to them.

Anything else is rejected with :class:`DicomRejected`, whose ``reason`` is one
of :data:`REJECT_REASONS`, so that callers can quarantine a file and count
why, rather than crash a round or train on zeros.

Bounded input: before anything is decoded, a file larger than any image
within the pixel cap could need, or a header whose Rows x Columns x Number of
Frames exceeds the cap (:data:`shared.limits.DEFAULT_MAX_PIXELS`, a site's
``max-image-pixels``, :attr:`DicomOptions.max_pixels`), is refused with
:class:`shared.data.sources.InputRejected` reason ``"too-large"``; the
decoder never allocates it. :func:`dicom_geometry` (registered as the header
probe for ``.dcm``/``.dicom``) reads only the header (``stop_before_pixels``,
large values deferred).

Privacy: exception messages name the file (never its folder) and, of all the
header, at most the transfer syntax and photometric interpretation. Log lines
carry neither the file name nor any header value other than those two.
While a file is being read, records from pydicom's and the decoders' loggers
are dropped (they can quote header values or the file path) and Python
warnings are swallowed; only their number is logged, at DEBUG. (Python 3.11's
``warnings.catch_warnings`` is process-global: read from worker *processes*,
as torch's DataLoader does, rather than from several threads at once.)
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from shared.data.sources import (
    TOO_LARGE,
    ImageGeometry,
    ImageReadError,
    InputRejected,
    current_max_pixels,
    register_probe,
    register_reader,
)
from shared.limits import max_file_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "DICOM_SUFFIXES",
    "REJECT_REASONS",
    "DicomOptions",
    "DicomRejected",
    "dicom_geometry",
    "dicom_to_uint8",
    "dicom_shape",
    "pixel_spacing_mm",
    "read_dicom",
]

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
"""Suffixes this module registers with :func:`shared.data.sources.register_reader`."""

REJECT_REASONS: tuple[str, ...] = (
    "not-dicom",
    "corrupt",
    "no-pixel-data",
    "multi-frame",
    "missing-decoder",
    "unsupported-transfer-syntax",
    "constant-image",
    "all-zero",
    "unsupported-photometric",
)
"""Every value :attr:`DicomRejected.reason` can take."""

WINDOW_FALLBACKS: tuple[str, ...] = ("percentile", "minmax")

_GRAY: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
# YBR_ICT / YBR_RCT only occur with JPEG 2000, whose decoder undoes the
# colour transform; pydicom then reports the result as RGB.
_COLOUR: Final = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})

# pip packages that provide a pydicom decoder plugin, by transfer syntax UID.
_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg"
_DECODER_PACKAGES: Final[dict[str, str]] = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG Baseline (also Pillow)
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _LIBJPEG + " (or: pip install pyjpegls)",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _LIBJPEG + " (or: pip install pyjpegls)",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",  # RLE (pydicom has a built-in one)
}
_ALL_DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"

_UID_RE: Final = re.compile(r"[0-9]+(\.[0-9]+)+")
# Defined terms of (0028,0004): only these are ever quoted in a message.
_KNOWN_PHOTOMETRIC: Final = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
    "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
})
# Loggers of third-party code that runs inside a read and may quote header
# values or paths in its messages (pydicom's warn_and_log, decoder plugins).
_QUIET_LOGGER_PREFIXES: Final = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls", "gdcm", "PIL")


class DicomRejected(ImageReadError):
    """A DICOM file that cannot be used as a single-frame training image.

    Parameters
    ----------
    reason : str
        One of :data:`REJECT_REASONS`; count quarantined files by it.
    message : str
        What is wrong and, where possible, how to fix it. It names the file
        (not its folder) and no header value other than the transfer syntax
        and photometric interpretation.

    Attributes
    ----------
    reason : str
        As given.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown DICOM reject reason {reason!r}; valid reasons: {', '.join(REJECT_REASONS)}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[DicomRejected], tuple[str, str]]:  # picklable across DataLoader workers
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class DicomOptions:
    """How :func:`read_dicom` turns stored values into ``[0, 1]``.

    Attributes
    ----------
    window_fallback : str
        Used when the file has no usable VOI LUT or window (or when
        ``use_file_voi`` is false): ``"percentile"`` (default) maps the
        ``percentiles`` of the modality values to 0 and 1 and clips outside;
        ``"minmax"`` maps the image's minimum and maximum.
    percentiles : tuple[float, float]
        Low and high percentile (0-100) for ``"percentile"``; default
        ``(0.5, 99.5)``. If they coincide (an image that is mostly one
        value) min-max is used instead.
    use_file_voi : bool
        Apply the file's VOI LUT / first window (default). ``False`` always
        uses the data-driven fallback, e.g. to harmonise sites whose stored
        windows differ.
    force : bool
        Also read files without the 128-byte preamble and ``DICM`` marker
        (some old exports). Off by default: with it any file parses as a
        (meaningless) dataset.
    max_pixels : int or None
        Cap on Rows x Columns x Number of Frames; ``None`` (default) = the
        cap in force (:func:`shared.data.sources.current_max_pixels`).
    """

    window_fallback: str = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    use_file_voi: bool = True
    force: bool = False
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.window_fallback not in WINDOW_FALLBACKS:
            raise ValueError(
                f"window_fallback must be one of {', '.join(WINDOW_FALLBACKS)}, got {self.window_fallback!r}"
            )
        p = self.percentiles
        if (
            not isinstance(p, tuple)
            or len(p) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
            or not 0.0 <= p[0] < p[1] <= 100.0
        ):
            raise ValueError(f"percentiles must be a tuple (low, high) with 0 <= low < high <= 100, got {p!r}")
        m = self.max_pixels
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_pixels must be a positive integer or None, got {m!r}")


# ---------------------------------------------------------------------------
# Keeping third-party log records and warnings out of the logs
# ---------------------------------------------------------------------------

_local = threading.local()
_filtered_loggers: set[str] = set()
_filter_lock = threading.Lock()


class _DropWhileReading(logging.Filter):
    """Drop (and count) records emitted by this thread while a DICOM file is read."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_local, "depth", 0) > 0:
            _local.dropped = getattr(_local, "dropped", 0) + 1
            return False
        return True


_DROP_FILTER = _DropWhileReading()


def _install_log_filters() -> None:
    """Attach the filter to every existing third-party logger we know of.

    A logger's filters do not see records propagated from its children, so
    each logger (``pydicom``, ``pydicom.pixels.decoders.base``, ...) needs it.
    """
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _QUIET_LOGGER_PREFIXES]
    new = [n for n in [*_QUIET_LOGGER_PREFIXES, *names] if n not in _filtered_loggers]
    if not new:
        return
    with _filter_lock:
        for name in new:
            if name not in _filtered_loggers:
                logging.getLogger(name).addFilter(_DROP_FILTER)
                _filtered_loggers.add(name)


@contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Silence pydicom/decoder log records and warnings for this read; log their count."""
    _install_log_filters()
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.dropped = 0
    _local.depth = depth + 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _local.depth = depth
        if depth == 0:
            dropped = getattr(_local, "dropped", 0)
            if dropped or caught:
                logger.debug(
                    "suppressed %d warning(s) and %d log record(s) from pydicom/decoders while reading a DICOM file",
                    len(caught), dropped,
                )


# ---------------------------------------------------------------------------
# Safe descriptions (the only header values that may appear in messages)
# ---------------------------------------------------------------------------


def _ts_label(uid: str | None) -> str:
    """``"<name> (<uid>)"`` for a well-formed UID, else a fixed placeholder."""
    if not uid or len(uid) > 64 or not _UID_RE.fullmatch(uid):
        return "an invalid or missing transfer syntax UID"
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else f"unknown transfer syntax ({uid})"


def _pi_label(pi: str) -> str:
    if not pi:
        return "no Photometric Interpretation"
    if pi in _KNOWN_PHOTOMETRIC:
        return f"Photometric Interpretation {pi}"
    return "an unrecognised Photometric Interpretation value"


def _reject(reason: str, message: str) -> DicomRejected:
    logger.debug("rejected a DICOM file: %s", reason)
    return DicomRejected(reason, message)


# ---------------------------------------------------------------------------
# Reading and decoding
# ---------------------------------------------------------------------------


def _too_large(name: str, what: str, cap: int) -> InputRejected:
    logger.debug("refused a DICOM file over the pixel cap")
    return InputRejected(
        TOO_LARGE,
        f"'{name}' {what}, over the cap of {cap} pixels; not decoded. Raise the site's max-image-pixels "
        "if such images are expected",
    )


def _read_dataset(path: Path, force: bool, cap: int) -> Dataset:
    # Rejections are raised outside the ``except`` blocks so that they carry
    # no ``__context__``: pydicom's own messages may quote paths or values.
    name = path.name
    try:
        size: int | None = path.stat().st_size
    except OSError:
        size = None
    if size is None:
        raise _reject("corrupt", f"'{name}' cannot be opened (missing or unreadable)")
    if size == 0:
        raise _reject("corrupt", f"'{name}' is an empty file (0 bytes): truncated or failed copy")
    if size > max_file_bytes(cap):
        raise _too_large(name, f"has {size} bytes, more than any image within the cap needs", cap)
    failure: str | None = None
    try:
        ds = pydicom.dcmread(path, force=force)
    except InvalidDicomError:
        failure = "not-dicom"
    except MemoryError:
        raise
    except Exception:  # pydicom raises many types (EOFError, struct.error, OSError, ValueError...) on damage
        failure = "corrupt"
    if failure is None and force and not _looks_like_dicom(ds):
        failure = "not-dicom"
    if failure == "not-dicom":
        raise _reject(
            "not-dicom",
            f"'{name}' is not a DICOM file (no 'DICM' marker after the 128-byte preamble). If it is an old "
            "DICOM export without a preamble, read it with DicomOptions(force=True).",
        )
    if failure == "corrupt":
        raise _reject("corrupt", f"'{name}' is a damaged or truncated DICOM file: its header cannot be parsed")
    return ds


def _looks_like_dicom(ds: Dataset) -> bool:
    """After a forced read: does anything say this really is a DICOM object?"""
    meta = getattr(ds, "file_meta", None)
    has_meta = meta is not None and meta.get("TransferSyntaxUID") is not None
    try:
        return has_meta or ds.get("SOPClassUID") is not None or "PixelData" in ds
    except Exception:
        return False


def _transfer_syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return str(uid).strip().rstrip("\x00")
    # No file meta (forced read): infer a native syntax from how pydicom parsed it.
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = ds.file_meta if meta is not None else pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return str(uid)


def _is_image_sop_class(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    for uid in (meta.get("MediaStorageSOPClassUID") if meta is not None else None, ds.get("SOPClassUID")):
        if uid and "Image Storage" in UID(str(uid)).name:
            return True
    return False


def _stated_pixels(ds: Dataset) -> tuple[int, int, int] | None:
    """(Rows, Columns, frames) as the header states them; None when absent or malformed."""
    try:
        rows, cols = int(ds.get("Rows")), int(ds.get("Columns"))
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return None
    if rows < 1 or cols < 1 or frames < 1:
        return None
    return rows, cols, frames


def _check_header(ds: Dataset, name: str, cap: int) -> tuple[str, str]:
    """Reject what can be judged from the header; return (transfer syntax UID, photometric)."""
    stated = _stated_pixels(ds)
    if stated is not None and stated[0] * stated[1] * stated[2] > cap:
        rows, cols, frames = stated
        n_frames = f" x {frames} frames" if frames > 1 else ""
        raise _too_large(name, f"states {cols} x {rows}{n_frames} = {rows * cols * frames} pixels", cap)
    if "PixelData" not in ds:
        # pydicom silently stops at the end of a truncated file, so an image
        # object without pixels is damaged, not a non-image object.
        if any(k in ds for k in ("Rows", "Columns", "BitsAllocated")) or _is_image_sop_class(ds):
            raise _reject(
                "corrupt",
                f"'{name}' is an image object whose pixel data is missing or cut off: the file is truncated or damaged",
            )
        raise _reject(
            "no-pixel-data",
            f"'{name}' has no Pixel Data (a non-image object such as a report, plan or structured document)",
        )
    try:
        frames: int | None = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = None
    if frames is None:
        raise _reject("corrupt", f"'{name}' has an invalid Number of Frames value")
    if frames > 1:
        raise _reject(
            "multi-frame",
            f"'{name}' is a multi-frame object ({frames} frames): only single-frame radiographs are read; "
            "split it into single frames or leave it out",
        )
    ts = _transfer_syntax(ds)
    if ts is None or len(ts) > 64 or not _UID_RE.fullmatch(ts):
        raise _reject("corrupt", f"'{name}' has {_ts_label(ts)}: cannot tell how its pixels are encoded")
    pi = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if pi not in _GRAY and pi not in _COLOUR:
        raise _reject(
            "unsupported-photometric",
            f"'{name}' has {_pi_label(pi)}: supported are {', '.join(sorted(_GRAY | _COLOUR))}",
        )
    return ts, pi


def _decode(ds: Dataset, name: str, ts: str) -> tuple[np.ndarray, str]:
    """Decode the single frame; return (array, photometric interpretation of the array)."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        decoder = None
    if decoder is None:
        raise _reject(
            "unsupported-transfer-syntax",
            f"'{name}' uses {_ts_label(ts)}, which pydicom cannot decode; convert it to an uncompressed or "
            "JPEG 2000 / JPEG-LS / RLE transfer syntax (e.g. with dcmtk's dcmdjpeg or gdcmconv)",
        )
    if not decoder.is_available:
        raise _reject(
            "missing-decoder",
            f"'{name}' uses {_ts_label(ts)} and no decoder for it is installed: "
            f"{_DECODER_PACKAGES.get(ts, _ALL_DECODERS)}",
        )
    decoded: tuple[np.ndarray, dict[str, str | int]] | None = None
    try:
        decoded = decoder.as_array(ds, index=None, as_rgb=True)
    except MemoryError:
        raise
    except Exception:
        decoded = None
    if decoded is None:
        raise _reject(
            "corrupt",
            f"'{name}' ({_ts_label(ts)}) could not be decoded by the installed decoder(s) "
            f"({', '.join(decoder.available_plugins) or 'native'}): damaged, truncated or inconsistent pixel data",
        )
    arr, props = decoded
    return arr, str(props.get("photometric_interpretation", "") or "").upper()


# ---------------------------------------------------------------------------
# Pixel pipeline
# ---------------------------------------------------------------------------


def _has_voi(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    if seq and len(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return True
    return ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, "")


def _file_voi(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Apply the file's VOI LUT / first window, scaled to [0, 1]; ``None`` if unusable.

    The VOI output range is found by sending a very low and a very high
    modality value through the same transform, so LUTs, LINEAR, LINEAR_EXACT
    and SIGMOID windows and signed/rescaled data are all handled alike.
    """
    seq = ds.get("VOILUTSequence")
    if seq and np.issubdtype(values.dtype, np.floating):
        values = np.rint(values).astype(np.int64)  # LUTs are indexed by integers
    probe_dtype = np.int64 if np.issubdtype(values.dtype, np.integer) else np.float64
    probe = np.array([-(2**40), 2**40], dtype=probe_dtype)
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            out = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)
            ends = np.asarray(apply_voi_lut(probe, ds, index=0, prefer_lut=True), dtype=np.float64)
    except MemoryError:
        raise
    except Exception:  # invalid width, unsupported VOI function or LUT depth, malformed LUT...
        logger.debug("the file's VOI LUT/window is unusable; using the fallback window")
        return None
    lo, hi = float(ends[0]), float(ends[1])
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi == lo or not np.isfinite(out).all():
        logger.debug("the file's VOI LUT/window has no usable output range; using the fallback window")
        return None
    scaled = np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    if float(scaled.max()) - float(scaled.min()) <= 1e-6:
        logger.debug("the file's VOI window maps the whole image to one value; using the fallback window")
        return None
    return scaled


def _fallback_window(values: np.ndarray, options: DicomOptions) -> np.ndarray:
    data = values.astype(np.float64, copy=False)
    lo, hi = float(data.min()), float(data.max())
    if options.window_fallback == "percentile":
        plo, phi = np.percentile(data, options.percentiles)
        if phi > plo:
            lo, hi = float(plo), float(phi)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0)


def _gray_pipeline(arr: np.ndarray, ds: Dataset, pi: str, name: str, options: DicomOptions) -> np.ndarray:
    if not arr.any():
        raise _reject("all-zero", f"'{name}' has only zero pixels (a blank or failed acquisition/export)")
    values: np.ndarray | None = None
    try:
        values = np.asarray(apply_modality_lut(arr, ds))
    except MemoryError:
        raise
    except Exception:
        values = None
    if values is None:
        raise _reject("corrupt", f"'{name}' has an invalid modality LUT or rescale slope/intercept")
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise _reject("corrupt", f"'{name}' gives non-finite values after its rescale slope/intercept")
    if values.min() == values.max():
        raise _reject("constant-image", f"'{name}' is a constant image (every pixel has the same value)")
    out = _file_voi(values, ds) if options.use_file_voi and _has_voi(ds) else None
    if out is None:
        out = _fallback_window(values, options)
    if pi == "MONOCHROME1":
        out = 1.0 - out  # after VOI: high stored values are dark in MONOCHROME1
    return out


def _colour_pipeline(arr: np.ndarray, ds: Dataset, pi: str, name: str) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise _reject("corrupt", f"'{name}' is a colour image whose decoded shape is not (rows, columns, 3)")
    if pi in ("YBR_FULL", "YBR_FULL_422"):  # normally already converted by pydicom
        arr = convert_color_space(arr, pi, "RGB")
    elif pi != "RGB":
        raise _reject("unsupported-photometric", f"'{name}' decodes to {_pi_label(pi)}, which cannot be shown as RGB")
    if not arr.any():
        raise _reject("all-zero", f"'{name}' has only zero pixels (a blank or failed capture/export)")
    if (arr == arr.reshape(-1, 3)[0]).all():
        raise _reject("constant-image", f"'{name}' is a constant image (every pixel has the same colour)")
    try:
        bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    except (TypeError, ValueError):
        bits = arr.dtype.itemsize * 8
    bits = min(max(bits, 1), arr.dtype.itemsize * 8)
    return np.clip(arr.astype(np.float64) / float(2**bits - 1), 0.0, 1.0)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def read_dicom(path: str | Path, options: DicomOptions = DicomOptions()) -> np.ndarray:  # noqa: B008 (frozen)
    """Read a single-frame DICOM image as ``float32`` in ``[0, 1]``.

    Parameters
    ----------
    path : str or Path
        The DICOM file.
    options : DicomOptions, optional
        Window fallback and related choices; see :class:`DicomOptions`.

    Returns
    -------
    np.ndarray
        ``float32``, C-contiguous: ``(H, W)`` for grayscale (modality LUT, then
        VOI LUT / first window or the fallback, then ``MONOCHROME1`` inverted
        so bone is bright), ``(H, W, 3)`` RGB for colour images.

    Raises
    ------
    DicomRejected
        With ``reason`` one of :data:`REJECT_REASONS`: not a DICOM file,
        damaged or truncated, no pixel data, several frames, no installed
        decoder (the message names the transfer syntax and the ``pip install``
        command), a transfer syntax pydicom cannot decode, a constant or
        all-zero image, or an unsupported photometric interpretation.
    shared.data.sources.InputRejected
        ``"too-large"``: the file, or the size its header states (Rows x
        Columns x frames), exceeds the pixel cap; nothing was decoded.
    """
    path = Path(path)
    name = path.name
    cap = options.max_pixels if options.max_pixels is not None else current_max_pixels()
    with _quiet_third_party():
        ds = _read_dataset(path, options.force, cap)
        ts, pi = _check_header(ds, name, cap)
        arr, decoded_pi = _decode(ds, name, ts)
        if arr.ndim == 4 or (arr.ndim == 3 and pi in _GRAY):
            raise _reject("multi-frame", f"'{name}' decodes to several frames: only single-frame images are read")
        if pi in _GRAY:
            out = _gray_pipeline(arr, ds, pi, name, options)
        else:
            out = _colour_pipeline(arr, ds, decoded_pi or pi, name)
    logger.debug("read a DICOM image (%s)", "grayscale" if out.ndim == 2 else "colour")
    return np.ascontiguousarray(out, dtype=np.float32)


def dicom_to_uint8(
    path: str | Path,
    options: DicomOptions = DicomOptions(),  # noqa: B008 (frozen)
    *,
    bgr: bool = False,
) -> np.ndarray:
    """Read a DICOM image with :func:`read_dicom` and scale it to ``uint8``.

    Parameters
    ----------
    path : str or Path
        The DICOM file.
    options : DicomOptions, optional
        Passed to :func:`read_dicom`.
    bgr : bool, optional
        Return colour images in OpenCV channel order (BGR), as the reader
        registry of :mod:`shared.data.sources` expects. Default RGB.

    Returns
    -------
    np.ndarray
        ``uint8`` ``(H, W)`` or ``(H, W, 3)``: ``round(255 * read_dicom(path))``.

    Raises
    ------
    DicomRejected
        As :func:`read_dicom`.
    """
    img = np.rint(read_dicom(path, options) * np.float32(255.0)).astype(np.uint8)
    if bgr and img.ndim == 3:
        img = np.ascontiguousarray(img[:, :, ::-1])
    return img


def pixel_spacing_mm(path: str | Path) -> tuple[float, float] | None:
    """Return the (row, column) pixel spacing in millimetres, if the file gives one.

    *Pixel Spacing* (0028,0030) is preferred, then *Imager Pixel Spacing*
    (0018,1164) (projection radiographs: at the detector, not corrected for
    magnification). Zero, negative or malformed values count as absent.

    Parameters
    ----------
    path : str or Path
        The DICOM file; pixel data is not read.

    Returns
    -------
    tuple[float, float] or None
        ``(row_spacing, column_spacing)`` in mm, or ``None``.

    Raises
    ------
    DicomRejected
        ``"not-dicom"`` or ``"corrupt"`` if the header cannot be read.
    """
    path = Path(path)
    with _quiet_third_party():
        ds = _read_dataset_header(path)
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            try:
                raw = ds.get(keyword)
                values = [float(v) for v in raw] if raw is not None and not isinstance(raw, str | bytes) else []
            except (TypeError, ValueError):
                continue
            if len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values):
                return values[0], values[1]
    return None


_GEOMETRY_TAGS = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"]


def dicom_geometry(path: str | Path) -> ImageGeometry | None:
    """The image size a DICOM header states, without reading pixel data.

    Registered as the header probe of ``.dcm``/``.dicom``
    (:func:`shared.data.sources.screen_image`): pydicom reads the header only
    (``stop_before_pixels``; values over 4 KiB are skipped, not read).

    Returns
    -------
    ImageGeometry or None
        Columns, Rows, Number of Frames, Samples per Pixel and Bits
        Allocated; ``None`` when Rows/Columns are absent or malformed (the
        reader then rejects the file without allocating).

    Raises
    ------
    DicomRejected
        ``"not-dicom"`` or ``"corrupt"`` if the header cannot be read.
    """
    with _quiet_third_party():
        ds = _read_dataset_header(Path(path), _GEOMETRY_TAGS)
        stated = _stated_pixels(ds)
        if stated is None:
            return None
        try:
            samples = max(1, int(ds.get("SamplesPerPixel") or 1))
            bits = max(1, int(ds.get("BitsAllocated") or 8))
        except (TypeError, ValueError):
            samples, bits = 1, 8
    rows, cols, frames = stated
    return ImageGeometry(width=cols, height=rows, frames=frames, samples=samples, bits=bits)


def dicom_shape(path: str | Path) -> tuple[int, int] | None:
    """``(Rows, Columns)`` from the header (the decoded image's height and width), without reading pixels.

    Returns ``None`` when the header lacks them. Raises :class:`DicomRejected`
    as :func:`pixel_spacing_mm` does.
    """
    with _quiet_third_party():
        ds = _read_dataset_header(Path(path))
        try:
            rows, cols = int(ds.get("Rows")), int(ds.get("Columns"))
        except (TypeError, ValueError):
            return None
    return (rows, cols) if rows > 0 and cols > 0 else None


def _read_dataset_header(path: Path, tags: list[str] | None = None) -> Dataset:
    name = path.name
    failure: str | None = None
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, defer_size=4096,
            specific_tags=tags or ["PixelSpacing", "ImagerPixelSpacing", "Rows", "Columns"],
        )
    except InvalidDicomError:
        failure = "not-dicom"
    except MemoryError:
        raise
    except Exception:
        failure = "corrupt"
    if failure == "not-dicom":
        raise _reject("not-dicom", f"'{name}' is not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
    if failure == "corrupt":
        raise _reject("corrupt", f"'{name}' cannot be opened or its header cannot be parsed")
    return ds


register_probe(DICOM_SUFFIXES)(dicom_geometry)


@register_reader(DICOM_SUFFIXES)
def _read_for_registry(path: Path) -> np.ndarray:
    """The reader :func:`shared.data.sources.read_image` uses: 8-bit, BGR for colour."""
    return dicom_to_uint8(path, bgr=True)


_install_log_filters()
