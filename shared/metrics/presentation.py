"""How each kind of result is shown: its primary metric, headline, round line and table columns.

Three views, chosen once per task (:meth:`shared.tasks.TaskSpec.view`) or per
model card (:func:`view_for`): binary classification, multi-class
classification (argmax decisions, macro one-vs-rest averages) and
segmentation. Server, CLI, studies and reports ask the view; none of them
inspects metric names to find out what kind of task produced them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.formatting import fmt_metric as f
from shared.kinds import OUTPUT_KINDS, SEGMENTATION
from shared.metrics.classification import ClassificationCounts
from shared.metrics.segmentation import SegmentationCounts

__all__ = ["BINARY", "MULTICLASS", "SEGMENTATION_VIEW", "MetricView", "view_for"]

Metrics = Mapping[str, Any]


@dataclass(frozen=True)
class MetricView:
    """The presentation of one kind of result.

    Attributes
    ----------
    name:
        ``"binary"``, ``"multiclass"`` or ``"segmentation"``.
    primary:
        The metric a study compares (``auroc`` or ``dice``).
    columns:
        Per-round and per-site table columns (rounds.csv, sites.csv).
    report_keys:
        What ``medfed evaluate`` prints.
    counts_from_flat:
        Rebuilds a site's counts from the flat record it sent.
    """

    name: str
    primary: str
    columns: tuple[str, ...]
    report_keys: tuple[str, ...]
    counts_from_flat: Callable[[Mapping[str, object]], ClassificationCounts | SegmentationCounts]
    _headline: Callable[[Metrics], str]
    _round: Callable[[Metrics], str]

    @property
    def primary_label(self) -> str:
        """The primary metric's display name (``AUROC``, ``macro AUROC``, ``Dice``)."""
        return {"binary": "AUROC", "multiclass": "macro AUROC", "segmentation": "Dice"}[self.name]

    def headline(self, metrics: Metrics) -> str:
        """The final figures in one phrase, e.g. ``AUROC 0.843, accuracy 0.804, ...``."""
        return self._headline(metrics)

    def round_scores(self, metrics: Metrics) -> str:
        """A round's pooled validation figures for its progress line."""
        return self._round(metrics)


def _binary_headline(m: Metrics) -> str:
    return (f"AUROC {f(m.get('auroc'))}, accuracy {f(m.get('accuracy'))}, "
            f"sensitivity {f(m.get('sensitivity'))}, specificity {f(m.get('specificity'))}")


def _binary_round(m: Metrics) -> str:
    s = (f"val AUROC {f(m.get('auroc'))} acc {f(m.get('accuracy'))} sens {f(m.get('sensitivity'))} "
         f"spec {f(m.get('specificity'))} F1 {f(m.get('f1'))}")
    thr = m.get("threshold")
    if isinstance(thr, (int, float)) and thr == thr:
        s += f" | @thr {thr:.3f}: sens {f(m.get('sensitivity@thr'))} spec {f(m.get('specificity@thr'))}"
    return s


def _multiclass_headline(m: Metrics) -> str:
    return (f"macro AUROC {f(m.get('auroc'))}, accuracy {f(m.get('accuracy'))}, "
            f"macro sensitivity {f(m.get('sensitivity'))}, macro specificity {f(m.get('specificity'))}")


def _multiclass_round(m: Metrics) -> str:
    return (f"val macro AUROC {f(m.get('auroc'))} acc {f(m.get('accuracy'))} macro sens {f(m.get('sensitivity'))} "
            f"spec {f(m.get('specificity'))} F1 {f(m.get('f1'))}")


def _seg_headline(m: Metrics) -> str:
    return f"Dice {f(m.get('dice'))}, IoU {f(m.get('iou'))}, HD95 {f(m.get('hd95'))} px"


def _seg_round(m: Metrics) -> str:
    return f"val Dice {f(m.get('dice'))} IoU {f(m.get('iou'))} HD95 {f(m.get('hd95'))} px"


_CLS_COLUMNS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "eval-loss")
_CLS_REPORT = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "auprc", "ece")

BINARY = MetricView("binary", "auroc", _CLS_COLUMNS, _CLS_REPORT, ClassificationCounts.from_flat,
                    _binary_headline, _binary_round)
MULTICLASS = MetricView("multiclass", "auroc", _CLS_COLUMNS, _CLS_REPORT, ClassificationCounts.from_flat,
                        _multiclass_headline, _multiclass_round)
SEGMENTATION_VIEW = MetricView("segmentation", "dice", ("dice", "iou", "hd95", "hd95-mm", "eval-loss"),
                               ("dice", "iou", "hd95", "hd95-mm"), SegmentationCounts.from_flat,
                               _seg_headline, _seg_round)


def view_for(kind: str, num_classes: int) -> MetricView:
    """The view of a task or model: by output kind, and for classification by number of classes."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    if kind == SEGMENTATION:
        return SEGMENTATION_VIEW
    return BINARY if num_classes <= 2 else MULTICLASS
