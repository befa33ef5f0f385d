"""How medfed writes a metric for a person: one formatter.

Every command line output, progress line and summary formats numbers through
:func:`fmt_metric`, so a missing figure reads ``n/a`` everywhere (a metric
that was not computed, a NaN from an empty class, an infinite epsilon). How a
run's final figures are worded is the task's
(:meth:`shared.metrics.presentation.MetricView.headline`; the server writes it
into ``summary.json`` as ``headline``). Framework-free and import-light (no
NumPy, no torch).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["NA", "fmt_metric"]

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
