"""What ``medfed evaluate`` adds to the metrics: 95 % intervals and subgroup figures, computed locally.

A hospital validating a federated model on its own images has every image's
prediction, which the federation never has: this module turns them into

* seeded percentile-bootstrap 95 % intervals over images
  (:mod:`shared.metrics.bootstrap`) for AUROC, sensitivity and specificity at
  the model's operating threshold and accuracy (classification), or Dice and
  IoU (segmentation);
* figures per patient subgroup for the dataset's ``sex``, ``age`` (in the
  model's age bands) and ``view`` columns, with the number of images in each
  (:mod:`shared.metrics.subgroups`, :mod:`shared.metrics.fairness`; no
  small-cell suppression: nothing leaves the machine), and a bootstrap
  interval for each subgroup's AUROC or Dice.

Everything returned is JSON-ready and free of paths and ids (only subgroup
labels such as ``F`` or ``40-59``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.metrics.bootstrap import DEFAULT_REPLICATES, classification_intervals, mean_intervals
from shared.metrics.fairness import subgroup_report
from shared.metrics.subgroups import (
    SUBGROUP_COLUMNS,
    SubgroupSpec,
    classification_subgroup_counts,
    parse_age_bands,
    segmentation_subgroup_counts,
    subgroup_cells,
)

__all__ = ["classifier_uncertainty", "segmentation_uncertainty"]


def _spec(age_bands: str) -> SubgroupSpec:
    """Every subgroup column, the model's age bands, no suppression (the figures stay at the hospital)."""
    return SubgroupSpec(SUBGROUP_COLUMNS, 1, parse_age_bands(age_bands))


def _bootstrap_info(replicates: int, seed: int) -> dict[str, Any]:
    return {"replicates": replicates, "seed": seed, "confidence": 0.95,
            "method": "percentile bootstrap over images (images resampled with replacement; several images of "
                      "one patient make the intervals somewhat narrow)"}


def classifier_uncertainty(probs: np.ndarray, labels: np.ndarray, attributes: Mapping[str, np.ndarray] | None, *,
                           threshold: float | None, positive_class: int | None, age_bands: str = "0,18,40,60,80",
                           replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> dict[str, Any]:
    """Bootstrap intervals and subgroup figures of a classifier on a hospital's images.

    Parameters
    ----------
    probs, labels:
        ``(n, C)`` probabilities and ``(n,)`` labels of the scored images.
    attributes:
        Column -> ``(n,)`` manifest values (``sex``, ``age``, ``view``), or None.
    threshold, positive_class:
        The model's operating threshold and positive class (binary models;
        None for more than two classes).
    age_bands:
        Age band edges (the model's run config ``fairness.age-bands``).
    replicates, seed:
        Bootstrap draws and their seed.

    Returns
    -------
    dict
        ``intervals`` (:func:`~shared.metrics.bootstrap.classification_intervals`),
        ``subgroups`` (:func:`~shared.metrics.fairness.subgroup_report`, each
        subgroup with ``auroc-ci``), ``bootstrap`` (settings).
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    intervals = classification_intervals(p, y, threshold=threshold, positive_class=positive_class,
                                         replicates=replicates, seed=seed)
    spec = _spec(age_bands)
    counts = classification_subgroup_counts(p, y, attributes, spec)
    report = subgroup_report(counts if counts.cells else None, threshold=threshold, positive_class=positive_class)
    cells = subgroup_cells(attributes, spec, len(y))
    for column, col in report["columns"].items():
        for entry in col["subgroups"]:
            rows = np.flatnonzero(cells[column] == entry["subgroup"])
            ci = classification_intervals(p[rows], y[rows], threshold=None, positive_class=positive_class,
                                          replicates=replicates, seed=seed)["auroc"]
            entry["auroc-ci"] = [ci["low"], ci["high"]]
    return {"intervals": intervals, "subgroups": report, "bootstrap": _bootstrap_info(replicates, seed)}


def segmentation_uncertainty(per_image: list[Any], attributes: Mapping[str, np.ndarray] | None, *,
                             age_bands: str = "0,18,40,60,80", replicates: int = DEFAULT_REPLICATES,
                             seed: int = 0) -> dict[str, Any]:
    """Bootstrap intervals of mean Dice and IoU, and subgroup means, of a segmentation model.

    Parameters
    ----------
    per_image:
        One :class:`~shared.metrics.segmentation.SegmentationCounts` per scored image.
    attributes:
        Column -> per-image manifest values, or None.

    Returns
    -------
    dict
        ``intervals`` (``dice``, ``iou``), ``subgroups`` (each with
        ``dice-ci``), ``bootstrap`` (settings).
    """
    dice = np.array([c.dice_sum for c in per_image], dtype=np.float64)
    iou = np.array([c.iou_sum for c in per_image], dtype=np.float64)
    intervals = mean_intervals({"dice": dice, "iou": iou}, replicates=replicates, seed=seed)
    spec = _spec(age_bands)
    counts = segmentation_subgroup_counts(None, None, attributes, spec, per_image=per_image)
    report = subgroup_report(counts if counts.cells else None)
    cells = subgroup_cells(attributes, spec, len(per_image))
    for column, col in report["columns"].items():
        for entry in col["subgroups"]:
            rows = np.flatnonzero(cells[column] == entry["subgroup"])
            ci = mean_intervals({"dice": dice[rows]}, replicates=replicates, seed=seed)["dice"]
            entry["dice-ci"] = [ci["low"], ci["high"]]
    return {"intervals": intervals, "subgroups": report, "bootstrap": _bootstrap_info(replicates, seed)}
