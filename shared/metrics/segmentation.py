"""Segmentation metrics (Dice, IoU, HD95) from sums that add up across sites.

Each site evaluates its images, keeps per-image Dice/IoU/HD95 only long
enough to add them into a :class:`SegmentationCounts`, and sends the sums
(:meth:`SegmentationCounts.to_flat`). The server merges the sums of all sites
(:meth:`SegmentationCounts.merge`) and derives the means over ALL images
(:meth:`SegmentationCounts.metrics`), not the mean of per-site means, which
would over-weight small sites.

Exact merging
-------------
Before being summed, every per-image value is rounded to a fixed binary grid
(:data:`SCORE_QUANTUM` = 2**-32 for Dice/IoU, :data:`DISTANCE_QUANTUM` =
2**-20 for distances). Sums of grid values are exact in float64 while they
stay below 2**21 images (Dice/IoU) or 2**33 distance units (HD95), so merged
site sums equal the sums over the pooled images bit for bit, in any order.
The rounding changes a mean by less than 1e-6 px / 3e-10.

Conventions (compared with MONAI in ``tests/test_segmentation.py``)
------------------------------------------------------------------
* Dice and IoU of two empty masks are 1.0 (MONAI ``DiceMetric`` /
  ``MeanIoU`` with ``ignore_empty=False``; their default ``ignore_empty=True``
  gives NaN when the target is empty). One empty mask and one not: 0.0.
* HD95 follows ``monai.metrics.compute_hausdorff_distance(percentile=95)``:
  boundary pixels are ``mask XOR binary_erosion(mask)`` (4-connected
  erosion, pixels outside the image count as background, so a full mask's
  boundary is the image border), directed distances from every boundary
  pixel of one mask to the nearest boundary pixel of the other, the 95th
  percentile (linear interpolation) of each direction, and the larger of the
  two. When either mask is empty HD95 is NaN (as MONAI 1.6.1 returns, with
  a warning) and the image is left out of the HD95 mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

__all__ = [
    "DISTANCE_QUANTUM",
    "SCORE_QUANTUM",
    "SegmentationCounts",
    "boundary",
    "dice_iou",
    "hd95",
]

SCORE_QUANTUM = 2.0**-32
"""Grid that per-image Dice/IoU are rounded to before summing."""
DISTANCE_QUANTUM = 2.0**-20
"""Grid that per-image HD95 values (px or mm) are rounded to before summing."""

_NAN = float("nan")
Spacing = tuple[float, float]


def _as_mask(a: object, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask (H, W), got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _check_pair(pred: object, target: object) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_mask(pred, "pred"), _as_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target masks differ in shape: {p.shape} vs {t.shape}")
    return p, t


def dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU (Jaccard) of two binary masks.

    Parameters
    ----------
    pred, target : np.ndarray
        Masks ``(H, W)``; nonzero = foreground.

    Returns
    -------
    tuple of float
        ``(dice, iou)``; ``(1.0, 1.0)`` when both masks are empty.
    """
    p, t = _check_pair(pred, target)
    inter = int(np.count_nonzero(p & t))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if total == 0:
        return 1.0, 1.0
    union = total - inter
    return 2.0 * inter / total, inter / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a mask: ``mask XOR erode(mask)`` (4-connected, zero border)."""
    m = _as_mask(mask, "mask")
    return m ^ ndimage.binary_erosion(m)


def _directed(from_edges: np.ndarray, to_edges: np.ndarray, spacing: Spacing | None) -> np.ndarray:
    """Distances from each pixel of ``from_edges`` to the nearest pixel of ``to_edges``."""
    dist = ndimage.distance_transform_edt(~to_edges, sampling=spacing)
    return np.asarray(dist[from_edges], dtype=np.float64)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Spacing | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between mask boundaries.

    Parameters
    ----------
    pred, target : np.ndarray
        Masks ``(H, W)``; nonzero = foreground.
    spacing : tuple of float, optional
        Pixel size ``(row, column)``, e.g. in mm; ``None`` = pixels.

    Returns
    -------
    float
        The distance (pixels, or the unit of ``spacing``); NaN when either
        mask is empty.
    """
    p, t = _check_pair(pred, target)
    if not p.any() or not t.any():
        return _NAN
    if spacing is not None:
        spacing = _check_spacing(spacing)
    # Crop to the union's bounding box plus a 1-px background margin: the
    # boundaries and all nearest-boundary distances lie inside it.
    rows, cols = np.nonzero(p | t)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    p = np.pad(p[r0:r1, c0:c1], 1)
    t = np.pad(t[r0:r1, c0:c1], 1)
    ep, et = boundary(p), boundary(t)
    d_pt = _directed(ep, et, spacing)
    d_tp = _directed(et, ep, spacing)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _check_spacing(spacing: object) -> Spacing:
    try:
        sy, sx = (float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a pair (row, column) of positive numbers, got {spacing!r}") from None
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"spacing must be a pair (row, column) of positive numbers, got {spacing!r}")
    return sy, sx


def _quantize(value: float, quantum: float) -> float:
    return round(value / quantum) * quantum


def _spacing_list(spacings: object, n: int) -> list[Spacing | None]:
    """``None``, one ``(sy, sx)`` for all images, or one entry (or None) per image."""
    if spacings is None:
        return [None] * n
    arr = list(spacings)  # type: ignore[call-overload]
    if len(arr) == 2 and all(isinstance(v, (int, float, np.floating, np.integer)) for v in arr):
        one = _check_spacing(arr)
        return [one] * n
    if len(arr) != n:
        raise ValueError(
            f"spacings must be None, one (row, column) pair, or one pair per image ({n}); got {len(arr)} entries"
        )
    return [None if s is None else _check_spacing(s) for s in arr]


@dataclass
class SegmentationCounts:
    """Per-site sums of per-image Dice, IoU and HD95; merge by adding.

    Attributes
    ----------
    n_images : int
        Images evaluated.
    dice_sum, iou_sum : float
        Sums of per-image Dice and IoU (empty/empty = 1).
    hd95_sum, hd95_n : float, int
        Sum and number of per-image HD95 in pixels (images where both masks
        are non-empty).
    hd95_mm_sum, hd95_mm_n : float, int
        Same in physical units, for images with a known spacing.
    """

    n_images: int = 0
    dice_sum: float = 0.0
    iou_sum: float = 0.0
    hd95_sum: float = 0.0
    hd95_n: int = 0
    hd95_mm_sum: float = 0.0
    hd95_mm_n: int = 0

    @classmethod
    def empty(cls) -> SegmentationCounts:
        """All-zero sums."""
        return cls()

    def update(
        self,
        pred_masks: np.ndarray,
        target_masks: np.ndarray,
        spacings: Spacing | Sequence[Spacing | None] | None = None,
    ) -> None:
        """Add a batch of images (in place).

        Parameters
        ----------
        pred_masks, target_masks : array-like
            Binary masks ``(N, H, W)`` (numpy arrays or CPU tensors).
        spacings : optional
            ``None`` (no physical HD95), one ``(row, column)`` spacing for
            all images, or one spacing (or ``None``) per image.
        """
        preds = np.asarray(pred_masks).astype(bool, copy=False)
        targets = np.asarray(target_masks).astype(bool, copy=False)
        if preds.ndim != 3 or preds.shape != targets.shape:
            raise ValueError(
                f"expected pred and target masks of equal shape (N, H, W), got {preds.shape} and {targets.shape}"
            )
        sp = _spacing_list(spacings, len(preds))
        for p, t, s in zip(preds, targets, sp, strict=True):
            d, j = dice_iou(p, t)
            self.n_images += 1
            self.dice_sum += _quantize(d, SCORE_QUANTUM)
            self.iou_sum += _quantize(j, SCORE_QUANTUM)
            h = hd95(p, t)
            if not math.isnan(h):
                self.hd95_sum += _quantize(h, DISTANCE_QUANTUM)
                self.hd95_n += 1
                if s is not None:
                    self.hd95_mm_sum += _quantize(hd95(p, t, s), DISTANCE_QUANTUM)
                    self.hd95_mm_n += 1

    @property
    def num_examples(self) -> int:
        """Images counted (the same as ``n_images``; every counts type has ``num_examples``)."""
        return int(self.n_images)

    def operating_threshold(self, rule: object) -> None:
        """Segmentation has no operating threshold to choose (the decision is the argmax per pixel)."""
        return None

    def report(self, threshold: float | None = None, positive_class: int | None = None) -> dict[str, float]:
        """The reported metrics (:meth:`metrics`); ``threshold`` and ``positive_class`` do not apply."""
        return self.metrics()

    def merge(self, other: SegmentationCounts) -> SegmentationCounts:
        """Sum of two sets of counts (neither is modified)."""
        if not isinstance(other, SegmentationCounts):
            raise ValueError(f"can only merge SegmentationCounts, got {type(other).__name__}")
        return SegmentationCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_flat(self) -> dict[str, int | float]:
        """Flat kebab-case dict of plain ints/floats (JSON, Flower ``MetricRecord``)."""
        return {f.name.replace("_", "-"): (int if f.type in (int, "int") else float)(getattr(self, f.name))
                for f in fields(self)}

    @classmethod
    def from_flat(cls, d: Mapping[str, object]) -> SegmentationCounts:
        """Inverse of :meth:`to_flat`; extra keys are ignored.

        Raises
        ------
        ValueError
            A key is missing or a value is negative / of the wrong type.
        """
        kwargs: dict[str, int | float] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in d:
                raise ValueError(f"flat segmentation counts lack the key {key!r}; found keys {sorted(d)}")
            v = d[key]
            is_int = f.type in (int, "int")
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or (
                is_int and float(v) != int(v)
            ):
                raise ValueError(f"flat segmentation counts: {key!r} must be "
                                 f"{'an integer' if is_int else 'a number'}, got {v!r}")
            if not v >= 0:
                raise ValueError(f"flat segmentation counts: {key!r} must be >= 0, got {v!r}")
            kwargs[f.name] = int(v) if is_int else float(v)
        return cls(**kwargs)  # type: ignore[arg-type]

    def metrics(self) -> dict[str, float]:
        """Means over all images: ``dice``, ``iou``, ``hd95`` (px), ``hd95-mm``, ``num-examples``.

        Undefined means (no images; no image with both masks non-empty; no
        spacing) are NaN.
        """

        def ratio(a: float, n: int) -> float:
            return a / n if n else _NAN

        return {
            "dice": ratio(self.dice_sum, self.n_images),
            "iou": ratio(self.iou_sum, self.n_images),
            "hd95": ratio(self.hd95_sum, self.hd95_n),
            "hd95-mm": ratio(self.hd95_mm_sum, self.hd95_mm_n),
            "num-examples": float(self.n_images),
        }
