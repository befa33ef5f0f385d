"""How medfed writes a metric for a person: one formatter, one run headline.

Every command line output, progress line and summary formats numbers through
:func:`fmt_metric`, so a missing figure reads ``n/a`` everywhere (a metric
that was not computed, a NaN from an empty class, an infinite epsilon), and
:func:`metrics_headline` is the one wording of a run's final pooled metrics.
Framework-free and import-light (no NumPy, no torch).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["NA", "fmt_metric", "metrics_headline"]

NA = "n/a"
"""What a missing, NaN or infinite figure is shown as."""


def fmt_metric(value: object, digits: int = 3, *, spec: str | None = None) -> str:
    """A number for a person, or ``"n/a"`` when there is none to show.

    Parameters
    ----------
    value:
        A real number (int, float, NumPy scalar) or anything else. ``None``,
        NaN, +-inf, booleans and non-numbers give :data:`NA`.
    digits:
        Digits after the decimal point (fixed-point), default 3.
    spec:
        A format spec used instead of ``f"{digits}f"``, e.g. ``".1e"`` or ``"g"``.

    Returns
    -------
    str
        ``fmt_metric(0.84312) == "0.843"``, ``fmt_metric(None) == "n/a"``,
        ``fmt_metric(1e-5, spec=".1e") == "1.0e-05"``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return NA
    number = float(value)
    if not math.isfinite(number):
        return NA
    return format(number, spec if spec is not None else f".{digits}f")


def metrics_headline(final: Mapping[str, Any]) -> str:
    """The final pooled metrics of a run in one phrase, worded for its kind of task.

    Segmentation (``dice`` present): ``Dice 0.812, IoU 0.701``. More than two
    classes (``auroc-0`` present: one-vs-rest figures): ``macro AUROC ...,
    accuracy ..., macro sensitivity ..., macro specificity ...``. Binary:
    ``AUROC ..., accuracy ..., sensitivity ..., specificity ...`` (at the
    default 0.5 decision). Missing figures read ``n/a``.

    Parameters
    ----------
    final:
        The pooled validation metrics, e.g. ``summary.json["final"]``.
    """
    if "dice" in final:
        return f"Dice {fmt_metric(final.get('dice'))}, IoU {fmt_metric(final.get('iou'))}"
    macro = "macro " if "auroc-0" in final else ""
    return (f"{macro}AUROC {fmt_metric(final.get('auroc'))}, accuracy {fmt_metric(final.get('accuracy'))}, "
            f"{macro}sensitivity {fmt_metric(final.get('sensitivity'))}, "
            f"{macro}specificity {fmt_metric(final.get('specificity'))}")
