"""Turn per-site reports into pooled and per-site metrics.

Sites report counts (see :mod:`shared.metrics.classification`); summing the
counts gives exactly the metrics of all validation images pooled, which an
average of per-site ratios would not (small sites would weigh as much as
large ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.metrics.classification import ClassificationCounts

# Keys a site's evaluation reply carries besides the flat counts.
EVAL_SCALARS = ("num-examples", "eval-loss")
# Keys a site's training reply carries.
TRAIN_SCALARS = ("num-examples", "train-loss", "train-seconds", "train-images-per-s", "load-seconds")


@dataclass
class SiteEvaluation:
    """One site's evaluation report for one round."""

    site_id: str
    counts: ClassificationCounts
    loss: float

    @classmethod
    def from_flat(cls, site_id: str, flat: Mapping[str, object]) -> "SiteEvaluation":
        """Rebuild from the flat metric record a site sent."""
        return cls(site_id=site_id, counts=ClassificationCounts.from_flat(flat), loss=float(flat["eval-loss"]))  # type: ignore[arg-type]


@dataclass
class RoundEvaluation:
    """Pooled and per-site metrics of one round."""

    pooled: dict[str, float]
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)


def pool_evaluations(reports: list[SiteEvaluation], positive_class: int = 1) -> RoundEvaluation:
    """Pooled metrics from summed counts, plus each site's own metrics.

    The pooled ``eval-loss`` is the example-weighted mean of site losses.
    """
    if not reports:
        raise ValueError("no site evaluation reports to pool")
    total = reports[0].counts
    for r in reports[1:]:
        total = total.merge(r.counts)
    pooled = total.metrics(positive_class=positive_class)
    n = sum(r.counts.num_examples for r in reports)
    pooled["eval-loss"] = sum(r.loss * r.counts.num_examples for r in reports) / n if n else math.nan
    pooled["num-sites"] = float(len(reports))
    per_site = {}
    for r in reports:
        m = r.counts.metrics(positive_class=positive_class)
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
