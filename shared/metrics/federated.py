"""Turn per-site reports into pooled and per-site metrics.

Sites report counts (classification: :mod:`shared.metrics.classification`;
segmentation: :mod:`shared.metrics.segmentation`); summing the counts gives
exactly the metrics of all validation images pooled, which an average of
per-site ratios would not (small sites would weigh as much as large ones).

For classification the operating threshold is chosen on the pooled
validation counts with the task's rule (Youden's J, or the highest threshold
reaching a target sensitivity), and pooled and per-site metrics are reported
at 0.5 and at that threshold (``<name>@thr``). The threshold is chosen and
scored on the same validation data, so the ``@thr`` figures are optimistic;
score held-out data with ``medfed evaluate`` for an unbiased estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from shared.metrics.classification import ClassificationCounts
from shared.metrics.segmentation import SegmentationCounts

# Keys a site's training reply carries.
TRAIN_SCALARS = ("num-examples", "train-loss", "train-seconds", "train-images-per-s", "load-seconds")


class Counts(Protocol):
    """What both count types offer."""

    def merge(self, other: Counts) -> Counts: ...  # noqa: D102


def counts_from_flat(flat: Mapping[str, object]) -> ClassificationCounts | SegmentationCounts:
    """Rebuild a site's counts from its flat metric record (classification carries ``num-classes``)."""
    if "num-classes" in flat:
        return ClassificationCounts.from_flat(flat)
    return SegmentationCounts.from_flat(flat)


@dataclass(frozen=True)
class ThresholdRule:
    """How the classification operating threshold is chosen on validation counts.

    ``method="argmax"`` (multi-class tasks, ``positive_class=None``) chooses
    no threshold: decisions are the most probable class and the metrics are
    one-vs-rest per class with macro averages.
    """

    method: str = "youden"
    target_sensitivity: float = 0.9
    positive_class: int | None = 1

    @property
    def chooses_threshold(self) -> bool:
        """Whether a binary operating threshold is selected (not for ``argmax``)."""
        return self.method != "argmax" and self.positive_class is not None


@dataclass
class SiteEvaluation:
    """One site's evaluation report for one round."""

    site_id: str
    counts: ClassificationCounts | SegmentationCounts
    loss: float

    @classmethod
    def from_flat(cls, site_id: str, flat: Mapping[str, object]) -> SiteEvaluation:
        """Rebuild from the flat metric record a site sent."""
        return cls(site_id=site_id, counts=counts_from_flat(flat), loss=float(flat["eval-loss"]))  # type: ignore[arg-type]


@dataclass
class RoundEvaluation:
    """Pooled and per-site metrics of one round."""

    pooled: dict[str, float]
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)


def _metrics(counts: ClassificationCounts | SegmentationCounts, rule: ThresholdRule, threshold: float | None) -> dict[str, float]:
    if isinstance(counts, SegmentationCounts):
        return counts.metrics()
    if counts.num_classes != 2:
        return counts.metrics()  # one-vs-rest per class and macro averages
    positive = rule.positive_class if rule.positive_class is not None else 1
    return counts.metrics(positive_class=positive, threshold=threshold)


def pool_evaluations(reports: list[SiteEvaluation], rule: ThresholdRule | None = None) -> RoundEvaluation:
    """Pooled metrics from summed counts, plus each site's own metrics.

    The pooled ``eval-loss`` is the example-weighted mean of site losses. For
    binary classification the threshold chosen on the pooled counts is also
    applied to every site's counts; with more than two classes (or the
    ``argmax`` rule) there is no threshold and the metrics are macro averages
    of one-vs-rest per-class figures (``auroc``, ``sensitivity`` ...) next to
    the per-class ones (``auroc-<k>`` ...).
    """
    if not reports:
        raise ValueError("no site evaluation reports to pool")
    rule = rule or ThresholdRule()
    total = reports[0].counts
    for r in reports[1:]:
        total = total.merge(r.counts)  # type: ignore[arg-type]
    threshold = None
    if isinstance(total, ClassificationCounts) and total.num_classes == 2 and rule.chooses_threshold:
        threshold = total.select_threshold(rule.method, rule.target_sensitivity, rule.positive_class)
    pooled = _metrics(total, rule, threshold)
    n = sum(r.counts.num_examples if isinstance(r.counts, ClassificationCounts) else r.counts.n_images for r in reports)
    pooled["eval-loss"] = sum(
        r.loss * (r.counts.num_examples if isinstance(r.counts, ClassificationCounts) else r.counts.n_images) for r in reports
    ) / n if n else math.nan
    pooled["num-sites"] = float(len(reports))
    per_site = {}
    for r in reports:
        m = _metrics(r.counts, rule, threshold)
        m["eval-loss"] = r.loss
        per_site[r.site_id] = m
    return RoundEvaluation(pooled=pooled, per_site=per_site)


def pool_training(reports: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted mean training loss, total examples, slowest site time."""
    if not reports:
        raise ValueError("no site training reports to pool")
    n = sum(float(r["num-examples"]) for r in reports.values())
    return {
        "train-loss": sum(float(r["train-loss"]) * float(r["num-examples"]) for r in reports.values()) / n,
        "num-examples": n,
        "num-sites": float(len(reports)),
        "max-train-seconds": max(float(r["train-seconds"]) for r in reports.values()),
    }
