"""Turn per-site reports into pooled and per-site metrics.

Sites report counts (classification: :mod:`shared.metrics.classification`;
segmentation: :mod:`shared.metrics.segmentation`); summing the counts gives
exactly the metrics of all validation images pooled, which an average of
per-site ratios would not (small sites would weigh as much as large ones).
Which counts type a site sent is the task's to say
(:attr:`shared.metrics.presentation.MetricView.counts_from_flat`), never
guessed from the keys.

For binary classification the operating threshold is chosen on the pooled
validation counts with the task's rule (Youden's J, or the highest threshold
reaching a target sensitivity), and pooled and per-site metrics are reported
at 0.5 and at that threshold (``<name>@thr``). The threshold is chosen and
scored on the same validation data, so the ``@thr`` figures are optimistic;
score held-out data with ``medfed evaluate`` for an unbiased estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from shared import protocol
from shared.metrics.classification import ClassificationCounts, ThresholdRule
from shared.metrics.segmentation import SegmentationCounts

__all__ = [
    "Counts",
    "RoundEvaluation",
    "SiteEvaluation",
    "ThresholdRule",
    "pool_evaluations",
    "pool_training",
]

AnyCounts = ClassificationCounts | SegmentationCounts


class Counts(Protocol):
    """What every counts type offers: additive merge, size, threshold choice, reported metrics."""

    @property
    def num_examples(self) -> int: ...  # noqa: D102

    def merge(self, other: Counts) -> Counts: ...  # noqa: D102

    def operating_threshold(self, rule: ThresholdRule) -> float | None: ...  # noqa: D102

    def report(self, threshold: float | None = None, positive_class: int | None = 1) -> dict[str, float]: ...  # noqa: D102

    def to_flat(self) -> dict[str, object]: ...  # noqa: D102


@dataclass
class SiteEvaluation:
    """One site's evaluation report for one round."""

    site_id: str
    counts: AnyCounts
    loss: float

    @classmethod
    def from_flat(cls, site_id: str, flat: Mapping[str, object],
                  counts_from_flat: Callable[[Mapping[str, object]], AnyCounts]) -> SiteEvaluation:
        """Rebuild from the flat metric record a site sent, with the task's counts type."""
        return cls(site_id=site_id, counts=counts_from_flat(flat), loss=float(flat["eval-loss"]))  # type: ignore[arg-type]


@dataclass
class RoundEvaluation:
    """Pooled and per-site metrics of one round."""

    pooled: dict[str, float]
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: AnyCounts | None = None
    """The merged counts the pooled metrics come from (aggregate data: what the report's curves are drawn from)."""


def pool_evaluations(reports: list[SiteEvaluation], rule: ThresholdRule | None = None, *,
                     threshold: float | None = None) -> RoundEvaluation:
    """Pooled metrics from summed counts, plus each site's own metrics.

    With ``threshold`` given (e.g. the one chosen on the validation sites),
    the counts are scored at it instead of choosing one on them: the honest
    way to score held-out sites and test sets.

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
    if threshold is None:
        threshold = total.operating_threshold(rule)
    pooled = total.report(threshold, rule.positive_class)
    n = sum(r.counts.num_examples for r in reports)
    pooled["eval-loss"] = sum(r.loss * r.counts.num_examples for r in reports) / n if n else math.nan
    pooled["num-sites"] = float(len(reports))
    per_site = {}
    for r in reports:
        m = r.counts.report(threshold, rule.positive_class)
        m["eval-loss"] = r.loss
        per_site[r.site_id] = m
    return RoundEvaluation(pooled=pooled, per_site=per_site, counts=total)


def pool_training(reports: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted mean training loss, total examples, slowest site time."""
    if not reports:
        raise ValueError("no site training reports to pool")
    n = sum(float(r[protocol.NUM_EXAMPLES]) for r in reports.values())
    return {
        "train-loss": sum(float(r[protocol.TRAIN_LOSS]) * float(r[protocol.NUM_EXAMPLES])
                          for r in reports.values()) / n,
        "num-examples": n,
        "num-sites": float(len(reports)),
        "max-train-seconds": max(float(r[protocol.TRAIN_SECONDS]) for r in reports.values()),
    }
