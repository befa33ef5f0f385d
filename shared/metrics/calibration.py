"""Federated temperature scaling: the math, framework-free (NumPy only).

Temperature scaling (Guo et al., ICML 2017) divides a classifier's logits by
one scalar ``T > 0`` before the softmax. It changes no decision of the
argmax (and, for a binary task, no ranking: AUROC is unchanged), only how
confident the probabilities are; ``T > 1`` softens an over-confident model.
``T`` is the value minimising the negative log-likelihood (NLL) of held-out
labels.

A federation fits it without moving an image or a per-image score:

1. the server proposes temperatures (:func:`first_grid`: 25 values
   log-spaced in ``[0.25, 8]`` plus ``T = 1``);
2. every training site returns, for each proposed ``T``, the *sum* of the NLL
   of its validation images at that ``T`` and its image count
   (:func:`nll_sums`): one float per temperature;
3. the server adds the sums of all sites (:func:`pool_nll_sums`) and keeps the
   ``T`` with the smallest pooled NLL; a second message repeats this on a
   finer grid between that value's neighbours (:func:`refine_grid`: 25
   values, steps of about 1.2 % of ``T``);
4. the sites then send their ordinary evaluation counts (confusion matrix,
   1000-bin score histograms, :class:`~shared.metrics.classification.ClassificationCounts`)
   of the probabilities at the chosen ``T``; from those the server derives
   the ECE after calibration and re-chooses the operating threshold on the
   calibrated scores with the task's rule (the ECE before comes from the same
   counts at ``T = 1``, sent with the first message).

Because the NLL of pooled data is the sum of the sites' NLL sums, the pooled
objective is exactly the one a server holding every validation prediction
would minimise: the federated ``T`` equals the centrally fitted one up to
the final grid's resolution. Only aggregates leave a site: per temperature one
sum over all its validation images, and the counts every evaluation round
sends already.

Operating threshold: the threshold chosen on uncalibrated scores during the
rounds does not apply to calibrated probabilities. The calibrated model's
threshold is chosen again, by the same rule, on the same validation images'
counts at ``T``; for a binary task ``p1 = sigmoid((z1 - z0) / T)`` is a
monotone function of the uncalibrated score, so this selects the same
operating point (the same sensitivity and specificity up to the 1/1000
histogram bins). :func:`map_threshold` gives the exact image of a threshold
under ``T`` for reference. A model card stores the calibrated pair
(``temperature``, ``threshold``) under ``calibration`` and keeps the
uncalibrated threshold at its top level, so a reader that ignores the
calibration still has a consistent pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "COARSE_POINTS",
    "FINE_POINTS",
    "T_MAX",
    "T_MIN",
    "CalibrationFit",
    "apply_temperature",
    "card_temperature",
    "first_grid",
    "map_threshold",
    "nll_sums",
    "not_fitted",
    "pool_nll_sums",
    "refine_grid",
]

T_MIN = 0.25
"""Smallest temperature proposed."""
T_MAX = 8.0
"""Largest temperature proposed."""
COARSE_POINTS = 25
"""Temperatures of the first grid (log-spaced in ``[T_MIN, T_MAX]``), ``T = 1`` added."""
FINE_POINTS = 25
"""Temperatures of the second grid, log-spaced between the neighbours of the first grid's best."""
METHOD = (f"federated temperature scaling: pooled validation NLL (sites send one sum per temperature) on "
          f"{COARSE_POINTS} log-spaced temperatures in [{T_MIN:g}, {T_MAX:g}] plus T=1, then {FINE_POINTS} "
          "between the best one's neighbours; ECE (15 bins) and the operating threshold from the sites' "
          "score histograms at the chosen T")
"""How the temperature was fitted, as recorded in a model card."""


def first_grid() -> np.ndarray:
    """The first message's temperatures: :data:`COARSE_POINTS` log-spaced in ``[T_MIN, T_MAX]`` and 1.0, ascending."""
    return np.unique(np.append(np.geomspace(T_MIN, T_MAX, COARSE_POINTS), 1.0))


def refine_grid(temperatures: Sequence[float], pooled: Sequence[float], points: int = FINE_POINTS) -> np.ndarray:
    """A finer grid around the best temperature of a coarser one.

    Parameters
    ----------
    temperatures:
        The coarse grid, ascending.
    pooled:
        The pooled NLL sum at each of them.
    points:
        Temperatures of the new grid (>= 3).

    Returns
    -------
    np.ndarray
        ``points`` values log-spaced between the best temperature's two
        neighbours (or the best one and its only neighbour at an end of the
        grid), plus the best one itself (so the refined best is never worse
        than the coarse one), ascending.
    """
    t = _temperatures(temperatures)
    nll = np.asarray(pooled, dtype=np.float64)
    if nll.shape != t.shape or not np.isfinite(nll).all():
        raise ValueError(f"expected {t.size} finite pooled NLL sums, got {nll.shape}")
    if points < 3:
        raise ValueError(f"a refined grid needs at least 3 points, got {points}")
    best = int(np.argmin(nll))
    lo, hi = t[max(best - 1, 0)], t[min(best + 1, t.size - 1)]
    return np.unique(np.append(np.geomspace(lo, hi, points), t[best]))


def _temperatures(temperatures: Sequence[float] | np.ndarray) -> np.ndarray:
    t = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"temperatures must be finite and > 0, got {t.tolist()[:5]}")
    return t


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def nll_sums(logits: np.ndarray, labels: np.ndarray, temperatures: Sequence[float] | np.ndarray) -> np.ndarray:
    """Summed negative log-likelihood of ``labels`` under ``softmax(logits / T)``, one sum per temperature.

    Parameters
    ----------
    logits:
        ``(N, C)`` raw network outputs (float; computed in float64 here).
    labels:
        ``(N,)`` integer labels in ``[0, C)``.
    temperatures:
        Temperatures ``> 0``.

    Returns
    -------
    np.ndarray
        ``(K,)`` float64 sums ``sum_i -log softmax(z_i / T_k)[y_i]`` (each >= 0).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"logits must be (N, C) for {y.shape[0]} labels, got {z.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")
    if not np.isfinite(z).all():
        raise ValueError("logits hold NaN or infinite values")
    out = np.empty(len(_temperatures(temperatures)), dtype=np.float64)
    rows = np.arange(y.size)
    for k, t in enumerate(_temperatures(temperatures)):
        out[k] = float(-_log_softmax(z / t)[rows, y].sum()) if y.size else 0.0
    return np.maximum(out, 0.0)  # -log p >= 0 exactly; rounding may leave -1e-16


def apply_temperature(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / T)`` in float64, ``(N, C)``."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def map_threshold(threshold: float, temperature: float) -> float:
    """Where a binary threshold on ``p1 = sigmoid(m)`` lands on ``sigmoid(m / T)`` (the same decisions).

    ``m = z1 - z0`` is the logit margin; 0 and 1 map to themselves.
    """
    if not 0.0 < threshold < 1.0:
        return float(threshold)
    margin = math.log(threshold) - math.log1p(-threshold)
    return 1.0 / (1.0 + math.exp(-margin / temperature))


def pool_nll_sums(replies: Sequence[tuple[int, Sequence[float]]], k: int) -> tuple[int, np.ndarray]:
    """Total image count and summed NLL per temperature over sites' ``(count, sums)`` replies (each of length ``k``)."""
    total = np.zeros(k, dtype=np.float64)
    n = 0
    for count, sums in replies:
        s = np.asarray(sums, dtype=np.float64)
        if s.shape != (k,):
            raise ValueError(f"expected {k} NLL sums per site, got {s.shape}")
        total += s
        n += int(count)
    return n, total


@dataclass(frozen=True)
class CalibrationFit:
    """The result of the federated calibration phase, as stored in the model card and summary.json.

    Attributes
    ----------
    temperature:
        ``T`` (1.0 when nothing was fitted).
    nll_before, nll_after:
        Mean validation NLL per image at ``T = 1`` and at ``T``.
    ece_before, ece_after:
        Expected calibration error (15 bins; binary: of the positive class,
        multi-class: class-wise) at ``T = 1`` and at ``T``.
    threshold:
        Operating threshold re-chosen on the calibrated scores (binary tasks; None otherwise).
    threshold_uncalibrated:
        The one chosen on uncalibrated scores in the last round.
    num_examples, sites:
        Validation images and the sites whose replies were pooled.
    grid:
        The temperatures proposed in each message.
    at_edge:
        The best temperature lies at an end of the search range ``[T_MIN, T_MAX]``.
    """

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    threshold: float | None
    threshold_uncalibrated: float | None
    num_examples: int
    sites: tuple[str, ...]
    grid: tuple[tuple[float, ...], ...] = ()
    at_edge: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_card(self) -> dict[str, Any]:
        """The ``calibration`` section of a model card (plain JSON types)."""
        return {
            "status": "fitted", "temperature": self.temperature,
            "ece-before": self.ece_before, "ece-after": self.ece_after,
            "nll-before": self.nll_before, "nll-after": self.nll_after,
            "threshold": self.threshold, "threshold-uncalibrated": self.threshold_uncalibrated,
            "num-examples": self.num_examples, "sites": list(self.sites), "at-edge": self.at_edge,
            "method": METHOD, **dict(self.extra),
        }


def not_fitted(reason: str) -> dict[str, Any]:
    """The ``calibration`` card section of a model without a temperature, and why (e.g. a segmentation model)."""
    return {"status": "not-fitted", "temperature": 1.0, "reason": reason}


def card_temperature(section: Mapping[str, Any] | None) -> tuple[float, float | None] | None:
    """``(temperature, calibrated threshold)`` from a card's ``calibration`` section, or None when not fitted/invalid.

    A damaged or hand-edited section (T not a finite number > 0, threshold not
    a probability) counts as not fitted: the model is then used uncalibrated.
    """
    if not isinstance(section, Mapping) or section.get("status") != "fitted":
        return None
    t = section.get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 < t <= 1e6:
        return None
    thr = section.get("threshold")
    ok = isinstance(thr, (int, float)) and not isinstance(thr, bool) and math.isfinite(thr) and 0.0 <= thr <= 1.0
    return float(t), float(thr) if ok else None
