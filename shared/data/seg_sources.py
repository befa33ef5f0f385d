"""Segmentation datasets: image/mask pairs from a manifest or an images/ + masks/ folder pair.

Layouts a site may provide:

* a CSV manifest (a ``.csv`` file, or a folder holding ``manifest.csv``) with
  columns ``image`` (or ``path``) and ``mask``, optionally ``patient_id``;
  paths are relative to the manifest's folder;
* a folder with ``images/`` and ``masks/`` sub-folders whose files pair up by
  name (stem).

Masks are image files (any depth); pixels above half the mask's range are
foreground (anti-aliased 0..255 masks are thresholded at 127). A mask whose
size differs from its image is quarantined, never resized silently.
Nothing here logs a path or a patient id.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.data.sources import DataSourceError, ImageReadError, read_raw, registered_suffixes

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"


class MaskReadError(ImageReadError):
    """A mask that cannot be used; ``reason`` is the quarantine reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SegRecord:
    """One image and its mask."""

    image: Path
    mask: Path
    patient_id: str | None = None


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


def _manifest_pairs(manifest: Path) -> tuple[list[SegRecord], Counter[str]]:
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataSourceError(f"segmentation manifest '{manifest.name}' is empty: expected columns image,mask[,patient_id]")
    header = [h.strip().lower() for h in rows[0]]
    col_image = header.index("image") if "image" in header else header.index("path") if "path" in header else None
    col_mask = header.index("mask") if "mask" in header else None
    if col_image is None or col_mask is None:
        raise DataSourceError(
            f"segmentation manifest '{manifest.name}' needs columns 'image' (or 'path') and 'mask'; "
            f"found {rows[0]}. Rename the columns (case does not matter)."
        )
    col_pid = header.index("patient_id") if "patient_id" in header else None
    base = manifest.parent
    records: list[SegRecord] = []
    skipped: Counter[str] = Counter()
    for row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(col_image, col_mask):
            skipped["short-row"] += 1
            continue
        image, mask = base / row[col_image].strip(), base / row[col_mask].strip()
        if not image.is_file():
            skipped["missing-file"] += 1
        elif not mask.is_file():
            skipped["missing-mask"] += 1
        else:
            pid = row[col_pid].strip() if col_pid is not None and len(row) > col_pid else ""
            records.append(SegRecord(image, mask, pid or None))
    return records, skipped


def _folder_pairs(root: Path) -> tuple[list[SegRecord], Counter[str]]:
    suffixes = set(registered_suffixes())
    images = {p.stem: p for p in sorted((root / "images").rglob("*")) if p.suffix.lower() in suffixes}
    masks = {p.stem: p for p in sorted((root / "masks").rglob("*")) if p.suffix.lower() in suffixes}
    skipped: Counter[str] = Counter()
    missing = len(set(images) - set(masks))
    if missing:
        skipped["missing-mask"] += missing
    return [SegRecord(images[s], masks[s]) for s in sorted(set(images) & set(masks))], skipped


def discover_segmentation(path: str | Path) -> SegListing:
    """List the image/mask pairs of a segmentation dataset.

    Raises
    ------
    DataSourceError
        Path missing, layout not recognised, or no usable pair.
    """
    p = Path(path)
    if not p.exists():
        raise DataSourceError("segmentation data path does not exist; expected a manifest CSV or a folder")
    if p.is_file() and p.suffix.lower() == ".csv":
        records, skipped = _manifest_pairs(p)
    elif p.is_dir() and (p / MANIFEST_NAME).is_file():
        records, skipped = _manifest_pairs(p / MANIFEST_NAME)
    elif p.is_dir() and (p / "images").is_dir() and (p / "masks").is_dir():
        records, skipped = _folder_pairs(p)
    else:
        raise DataSourceError(
            "segmentation data: expected a CSV manifest (image,mask[,patient_id]), a folder holding "
            f"'{MANIFEST_NAME}', or a folder with 'images/' and 'masks/' sub-folders"
        )
    if not records:
        raise DataSourceError(f"no usable image/mask pairs (skipped: {dict(skipped) or 'nothing found'})")
    logger.info("segmentation data: %d pairs, skipped %s", len(records), dict(skipped))
    return SegListing(tuple(records), dict(skipped))


def _gray(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 2 else img[..., :3].mean(axis=2)


def read_mask(mask_path: Path, image_path: Path | None = None) -> np.ndarray:
    """Read a mask as uint8 0/255; with ``image_path``, check that the sizes agree.

    Raises
    ------
    MaskReadError
        ``unreadable-mask`` or ``mask-size-mismatch``.
    """
    try:
        m = _gray(read_raw(mask_path)).astype(np.float32)
    except ImageReadError:
        raise MaskReadError("unreadable-mask", f"mask '{mask_path.name}' cannot be read") from None
    if image_path is not None:
        try:
            shape = read_raw(image_path).shape[:2]
        except ImageReadError:
            raise MaskReadError("unreadable-image", f"image '{image_path.name}' cannot be read") from None
        if shape != m.shape:
            raise MaskReadError("mask-size-mismatch", f"mask {m.shape} and image {shape} differ in size")
    hi = float(m.max())
    threshold = 127.0 if hi > 1.0 else 0.5
    return np.where(m > threshold, 255, 0).astype(np.uint8)
