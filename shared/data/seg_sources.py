"""Segmentation datasets: image/mask pairs from a manifest or an images/ + masks/ folder pair.

Layouts a site may provide:

* a CSV manifest (a ``.csv`` file, or a folder holding ``manifest.csv``) with
  columns ``image`` (or ``path``) and ``mask``, optionally ``patient_id``;
  paths are relative to the manifest's folder;
* a folder with ``images/`` and ``masks/`` sub-folders whose files pair up by
  name (stem);
* SIIM-ACR style run-length masks: a CSV with columns ``ImageId`` and
  ``EncodedPixels`` (:mod:`shared.data.rle`; a leading space in the header is
  fine), given as the data path or lying at the top level of the data folder
  (the folder's only such CSV). ``ImageId`` is an image's file stem; images
  are looked up anywhere below the CSV's folder (``.dcm``, ``.png``, ...).
  ``-1`` is an empty mask; several rows of one ``ImageId`` are united.

A manifest may also give a ``spacing_mm`` column: the pixel spacing of the
image in mm, ``"0.7"`` (square pixels) or ``"0.7x0.6"`` (row x column). It
overrides the DICOM header (*Pixel Spacing*, else *Imager Pixel Spacing*),
which is used otherwise; with neither, HD95 is reported in pixels only.
Spacing is a physical property, used locally for ``hd95-mm`` and never logged.

Masks are image files (any depth); pixels above half the mask's range are
foreground (anti-aliased 0..255 masks are thresholded at 127). A mask whose
size differs from its image is quarantined, never resized silently.
Nothing here logs a path or a patient id.

Image and mask paths (manifest columns, folder pairs, run-length image
lookups) that resolve outside the data folder -- ``../`` rows, symlinks -- are
counted as ``"outside-data-root"`` and not listed, unless the site allows it
(``allow_outside_root``; node config ``allow-outside-data-root=true``). Every
read goes through :func:`shared.data.sources.read_raw`, so the pixel cap
applies to images and masks alike.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.data.dicom import DICOM_SUFFIXES, DicomRejected, dicom_shape, pixel_spacing_mm
from shared.data.preprocess import PreprocessConfig, model_spacing
from shared.data.rle import rle_decode
from shared.data.sources import (
    OUTSIDE_ROOT,
    TOO_LARGE,
    DataSourceError,
    ImageReadError,
    data_root,
    is_outside,
    read_raw,
    registered_suffixes,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
RLE_COLUMNS = ("imageid", "encodedpixels")
"""Header names (case-insensitive, stripped) that mark a SIIM-ACR run-length CSV."""

Spacing = tuple[float, float]


class MaskReadError(ImageReadError):
    """A mask that cannot be used; ``reason`` is the quarantine reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SegRecord:
    """One image and its mask.

    ``mask`` is a mask image file, or for run-length masks a stand-in
    ``<csv>#<ImageId>`` (unique per record) with the runs in ``rle``.
    ``spacing`` is the manifest's ``spacing_mm`` (row, column), if given.
    ``extra`` holds the manifest's other columns (e.g. ``sex``, ``age``,
    ``view``), carried through unchanged; never log it. ``row`` is the
    manifest line (``medfed data check`` names a pair by it).
    """

    image: Path
    mask: Path
    patient_id: str | None = None
    spacing: Spacing | None = None
    rle: tuple[str, ...] | None = None
    extra: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    row: int | None = field(default=None, compare=False)
    """Line of the manifest or run-length CSV the pair comes from (header = line 1); None for folder pairs."""


@dataclass(frozen=True)
class SegListing:
    """The usable pairs of a segmentation dataset and what was skipped."""

    records: tuple[SegRecord, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)

    def groups(self) -> np.ndarray | None:
        """Patient ids (a record without one is its own group), or None when no record has one."""
        if not any(r.patient_id for r in self.records):
            return None
        return np.array([r.patient_id or f"__record-{i}" for i, r in enumerate(self.records)], dtype=object)


def _manifest_pairs(manifest: Path, root: Path | None) -> tuple[list[SegRecord], Counter[str]]:
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataSourceError(f"segmentation manifest '{manifest.name}' is empty: expected columns "
                              "image,mask[,patient_id]")
    header = [h.strip().lower() for h in rows[0]]
    col_image = header.index("image") if "image" in header else header.index("path") if "path" in header else None
    col_mask = header.index("mask") if "mask" in header else None
    if col_image is None or col_mask is None:
        raise DataSourceError(
            f"segmentation manifest '{manifest.name}' needs columns 'image' (or 'path') and 'mask'; "
            f"found {rows[0]}. Rename the columns (case does not matter)."
        )
    col_pid = header.index("patient_id") if "patient_id" in header else None
    col_sp = header.index("spacing_mm") if "spacing_mm" in header else None
    used = {col_image, col_mask, col_pid, col_sp}
    extra_cols = [(i, rows[0][i].strip()) for i in range(len(header)) if i not in used and rows[0][i].strip()]
    base = manifest.parent
    records: list[SegRecord] = []
    skipped: Counter[str] = Counter()
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(col_image, col_mask):
            skipped["short-row"] += 1
            continue
        image, mask = base / row[col_image].strip(), base / row[col_mask].strip()
        if root is not None and (is_outside(image, root) or is_outside(mask, root)):
            skipped[OUTSIDE_ROOT] += 1  # counted, never logged
        elif not image.is_file():
            skipped["missing-file"] += 1
        elif not mask.is_file():
            skipped["missing-mask"] += 1
        else:
            pid = row[col_pid].strip() if col_pid is not None and len(row) > col_pid else ""
            text = row[col_sp].strip() if col_sp is not None and len(row) > col_sp else ""
            spacing = parse_spacing(text, f"'{manifest.name}' line {line}") if text else None
            extra = {name: row[i].strip() for i, name in extra_cols if i < len(row)}
            records.append(SegRecord(image, mask, pid or None, spacing, extra=extra, row=line))
    return records, skipped


def parse_spacing(text: str, where: str = "spacing_mm") -> Spacing:
    """Parse a ``spacing_mm`` value: ``"0.7"`` (square pixels) or ``"0.7x0.6"`` (row x column, mm).

    Raises
    ------
    DataSourceError
        Not one or two positive numbers; the message names ``where``.
    """
    parts = [t for t in text.lower().replace("x", " ").replace(";", " ").replace(",", " ").split() if t]
    try:
        values = [float(t) for t in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise DataSourceError(
            f"{where}: spacing_mm {text!r} is not a pixel spacing; expected one positive number in mm "
            "(square pixels, e.g. 0.7) or 'row x column' (e.g. 0.7x0.6), or leave the cell empty"
        )
    return values[0], values[1]


def _rle_header(path: Path) -> tuple[int, int] | None:
    """Columns of ``ImageId`` and ``EncodedPixels`` when ``path`` is a run-length CSV, else None."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    names = [h.strip().lower() for h in header]
    if all(c in names for c in RLE_COLUMNS):
        return names.index(RLE_COLUMNS[0]), names.index(RLE_COLUMNS[1])
    return None


def _rle_pairs(table: Path, root: Path | None) -> tuple[list[SegRecord], Counter[str]]:
    """Records of a SIIM-ACR CSV whose ``ImageId`` names an image (file stem) below the CSV's folder."""
    cols = _rle_header(table)
    if cols is None:
        raise DataSourceError(f"'{table.name}' is not a run-length CSV: expected columns ImageId, EncodedPixels")
    col_id, col_rle = cols
    with open(table, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))[1:]
    runs: dict[str, list[str]] = {}
    skipped: Counter[str] = Counter()
    for row in rows:
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(col_id, col_rle) or not row[col_id].strip():
            skipped["short-row"] += 1
            continue
        runs.setdefault(row[col_id].strip(), []).append(row[col_rle].strip())
    suffixes = set(registered_suffixes())
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(table.parent.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes and not any(
                part.startswith(".") for part in p.relative_to(table.parent).parts):
            by_stem.setdefault(p.stem, []).append(p)
    records: list[SegRecord] = []
    for image_id, rles in runs.items():
        found = by_stem.get(image_id, [])
        if len(found) != 1:
            skipped["missing-file" if not found else "ambiguous-image-id"] += 1
            continue
        if root is not None and is_outside(found[0], root):
            skipped[OUTSIDE_ROOT] += 1  # a symlinked image leading out of the data folder
            continue
        records.append(SegRecord(found[0], table.with_name(f"{table.name}#{image_id}"), rle=tuple(rles)))
    unlabelled = sum(len(v) for k, v in by_stem.items() if k not in runs)
    if unlabelled:
        skipped["missing-mask"] += unlabelled
    return records, skipped


def _folder_pairs(root: Path, contain: Path | None) -> tuple[list[SegRecord], Counter[str]]:
    suffixes = set(registered_suffixes())
    images = {p.stem: p for p in sorted((root / "images").rglob("*")) if p.suffix.lower() in suffixes}
    masks = {p.stem: p for p in sorted((root / "masks").rglob("*")) if p.suffix.lower() in suffixes}
    skipped: Counter[str] = Counter()
    missing = len(set(images) - set(masks))
    if missing:
        skipped["missing-mask"] += missing
    records = []
    for s in sorted(set(images) & set(masks)):
        if contain is not None and (is_outside(images[s], contain) or is_outside(masks[s], contain)):
            skipped[OUTSIDE_ROOT] += 1
            continue
        records.append(SegRecord(images[s], masks[s]))
    return records, skipped


def discover_segmentation(path: str | Path, *, allow_outside_root: bool = False) -> SegListing:
    """List the image/mask pairs of a segmentation dataset.

    Parameters
    ----------
    path : str or Path
        A manifest or run-length CSV, or a folder (see the module docstring).
    allow_outside_root : bool
        Keep pairs whose image or mask resolves outside the data folder (the
        folder given, or the CSV's folder). Off by default: such pairs are
        counted as ``"outside-data-root"``.

    Raises
    ------
    DataSourceError
        Path missing, layout not recognised, the folder's manifest is a link
        leading outside it (unless allowed), or no usable pair.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataSourceError("segmentation data path does not exist; expected a manifest CSV or a folder")
    root = data_root(p)
    contain = None if allow_outside_root else root
    rle_tables = sorted(t for t in p.glob("*.csv") if _rle_header(t) is not None) if p.is_dir() else []
    if contain is not None and p.is_dir() and (p / MANIFEST_NAME).is_file() and is_outside(p / MANIFEST_NAME, root):
        raise DataSourceError(
            f"segmentation data: '{MANIFEST_NAME}' is a link to a file outside the data folder; copy it in, or set "
            "allow-outside-data-root=true in the site's node config if the site really means to read outside its folder"
        )
    if p.is_file() and p.suffix.lower() == ".csv":
        records, skipped = _rle_pairs(p, contain) if _rle_header(p) is not None else _manifest_pairs(p, contain)
    elif p.is_dir() and (p / MANIFEST_NAME).is_file():
        records, skipped = _manifest_pairs(p / MANIFEST_NAME, contain)
    elif p.is_dir() and (p / "images").is_dir() and (p / "masks").is_dir():
        records, skipped = _folder_pairs(p, contain)
    elif len(rle_tables) == 1:
        records, skipped = _rle_pairs(rle_tables[0], contain)
    elif len(rle_tables) > 1:
        raise DataSourceError(
            f"segmentation data: the folder holds {len(rle_tables)} run-length CSVs ({[t.name for t in rle_tables]}); "
            "pass the one to use as the data path"
        )
    else:
        raise DataSourceError(
            "segmentation data: expected a CSV manifest (image,mask[,patient_id][,spacing_mm]), a folder holding "
            f"'{MANIFEST_NAME}', a folder with 'images/' and 'masks/' sub-folders, or images with a run-length "
            "CSV (ImageId,EncodedPixels; SIIM-ACR convention)"
        )
    if not records:
        raise DataSourceError(f"no usable image/mask pairs (skipped: {dict(skipped) or 'nothing found'})")
    logger.info("segmentation data: %d pairs, skipped %s", len(records), dict(skipped))
    return SegListing(tuple(records), dict(skipped))


def _gray(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 2 else img[..., :3].mean(axis=2)


def read_mask(mask_path: Path, image_path: Path | None = None) -> np.ndarray:
    """Read a mask as uint8 0/255; with ``image_path``, check that the sizes agree.

    The image is read first: when it cannot be used the pair is counted once,
    under the image's reason, by whoever reads the images.

    Raises
    ------
    MaskReadError
        ``unreadable-image`` (the image), ``too-large`` (the mask is over the
        pixel cap), ``unreadable-mask`` or ``mask-size-mismatch``.
    """
    shape: tuple[int, ...] | None = None
    if image_path is not None:
        try:
            shape = read_raw(image_path).shape[:2]
        except ImageReadError:
            raise MaskReadError("unreadable-image", f"image '{image_path.name}' cannot be read") from None
    failure: str | None = None
    try:
        m = _gray(read_raw(mask_path)).astype(np.float32)
    except ImageReadError as exc:
        failure = TOO_LARGE if getattr(exc, "reason", None) == TOO_LARGE else "unreadable-mask"
    if failure is not None:
        raise MaskReadError(failure, f"mask '{mask_path.name}' cannot be read ({failure})")
    if shape is not None and shape != m.shape:
        raise MaskReadError("mask-size-mismatch", f"mask {m.shape} and image {shape} differ in size")
    hi = float(m.max())
    threshold = 127.0 if hi > 1.0 else 0.5
    return np.where(m > threshold, 255, 0).astype(np.uint8)


def read_record_mask(record: SegRecord) -> np.ndarray:
    """A record's mask as uint8 0/255 at its image's size (mask file or run-length rows).

    Raises
    ------
    MaskReadError
        ``unreadable-mask``, ``unreadable-image``, ``mask-size-mismatch`` or
        ``bad-rle`` (runs that are malformed or do not fit the image).
    """
    if record.rle is None:
        return read_mask(record.mask, record.image)
    try:
        h, w = read_raw(record.image).shape[:2]
    except ImageReadError:
        raise MaskReadError("unreadable-image", f"image '{record.image.name}' cannot be read") from None
    mask = np.zeros((h, w), dtype=bool)
    for rle in record.rle:
        try:
            mask |= rle_decode(rle, h, w)
        except ValueError as exc:
            raise MaskReadError("bad-rle", f"run-length mask of '{record.image.name}': {exc}") from None
    return mask.astype(np.uint8) * 255


def record_spacing(record: SegRecord) -> Spacing | None:
    """Pixel spacing (row, column) in mm of a record's image: manifest ``spacing_mm``, else the DICOM header."""
    if record.spacing is not None:
        return record.spacing
    if record.image.suffix.lower() in DICOM_SUFFIXES:
        try:
            return pixel_spacing_mm(record.image)
        except DicomRejected:
            return None
    return None


def model_spacings(records: Sequence[SegRecord], cfg: PreprocessConfig) -> list[Spacing | None]:
    """Spacing of each record's pixels *after* preprocessing (see :func:`~shared.data.preprocess.model_spacing`).

    ``None`` where the spacing is unknown or the image cannot be read. Only
    images with a known spacing are looked at, for their size: DICOM from the
    header, other formats by decoding.
    """
    out: list[Spacing | None] = []
    for r in records:
        sp = record_spacing(r)
        if sp is not None:
            try:
                shape = dicom_shape(r.image) if r.image.suffix.lower() in DICOM_SUFFIXES else None
                sp = model_spacing(sp, shape or read_raw(r.image).shape[:2], cfg)
            except ImageReadError:
                sp = None
        out.append(sp)
    return out
