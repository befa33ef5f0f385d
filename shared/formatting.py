"""One way to print a metric: three decimals, ``n/a`` when it is undefined."""

from __future__ import annotations

import math

__all__ = ["fmt_metric"]


def fmt_metric(value: object, digits: int = 3) -> str:
    """``0.84317 -> "0.843"``; ``None``, NaN, infinities and non-numbers -> ``"n/a"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    v = float(value)
    return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"
