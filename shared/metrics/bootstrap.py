"""Bootstrap confidence intervals over images, for a hospital's local validation (``medfed evaluate``).

Per-image scores never leave a site, so the federation reports counts; a
hospital validating the model on its own images does have them, and can say
how uncertain each figure is. Here every interval is a seeded percentile
bootstrap over images: ``n`` images are drawn with replacement ``B`` times,
the statistic is recomputed on each draw, and the 2.5th and 97.5th
percentiles of the draws bound the 95 % interval. A draw where the statistic
is undefined (e.g. no positive image drawn, for AUROC) is left out and the
number of usable draws is reported.

The statistics are computed exactly as the reported metrics are
(:class:`~shared.metrics.classification.ClassificationCounts`): scores are
binned to the same 1000 bins (ties within a bin count half in AUROC), and a
threshold counts the bin holding it as positive. The point estimate of each
interval is therefore the reported figure itself.

Resampling images treats them as independent; several images of one patient
make the intervals somewhat too narrow. No external library offers the
binned-score statistics, which is why the loop is written here
(``scipy.stats.bootstrap`` recomputes a Python statistic per draw as well, and
would not reproduce the binned metrics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shared.metrics.classification import DEFAULT_BINS, auroc_from_histograms

__all__ = [
    "DEFAULT_REPLICATES",
    "bootstrap_interval",
    "classification_intervals",
    "mean_intervals",
]

DEFAULT_REPLICATES = 1000
"""Bootstrap draws per interval (``medfed evaluate --bootstrap``)."""

CONFIDENCE = 0.95

Statistic = Callable[[np.ndarray], float]


def bootstrap_interval(statistic: Statistic, n: int, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                       estimate: float | None = None) -> dict[str, Any]:
    """Percentile bootstrap 95 % interval of ``statistic`` over ``n`` items.

    Parameters
    ----------
    statistic : callable
        Takes an index array (items drawn with replacement, length ``n``)
        and returns the statistic on them (NaN when undefined).
    n : int
        Number of items.
    replicates : int
        Number of draws (>= 1).
    seed : int
        Seed of the draws (the same seed gives the same interval).
    estimate : float, optional
        The point estimate; default ``statistic(arange(n))``.

    Returns
    -------
    dict
        ``estimate``, ``low``, ``high`` (None where undefined), ``replicates``
        (draws asked for), ``valid`` (draws where the statistic was defined),
        ``method`` (``"percentile bootstrap"``), ``confidence`` (0.95).
    """
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be an integer >= 1, got {replicates!r}")
    if n < 1:
        raise ValueError(f"need at least one item to bootstrap, got {n}")
    point = statistic(np.arange(n)) if estimate is None else estimate
    rng = np.random.default_rng(seed)
    draws = np.empty(replicates, dtype=np.float64)
    for i in range(replicates):
        draws[i] = statistic(rng.integers(0, n, size=n))
    ok = draws[np.isfinite(draws)]
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    low, high = (float(np.percentile(ok, tail)), float(np.percentile(ok, 100.0 - tail))) if ok.size else (None, None)
    return {"estimate": _num(point), "low": low, "high": high, "replicates": replicates, "valid": int(ok.size),
            "method": "percentile bootstrap", "confidence": CONFIDENCE}


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _bins(probs: np.ndarray, bins: int) -> np.ndarray:
    """The histogram bin of each probability, exactly as :meth:`ClassificationCounts.update` bins it."""
    return np.clip(np.floor(probs * bins), 0, bins - 1).astype(np.int64)


def _threshold_bin(threshold: float, bins: int) -> int:
    if threshold > 1.0:
        return bins
    if threshold <= 0.0:
        return 0
    edges = np.arange(bins + 1, dtype=np.float64) / bins
    return min(max(int(np.searchsorted(edges, threshold, side="right")) - 1, 0), bins - 1)


def _auroc(score_bins: np.ndarray, positive: np.ndarray, bins: int) -> Statistic:
    def stat(idx: np.ndarray) -> float:
        b, y = score_bins[idx], positive[idx]
        return auroc_from_histograms(np.bincount(b[y], minlength=bins), np.bincount(b[~y], minlength=bins))

    return stat


def _rate(hit: np.ndarray, among: np.ndarray) -> Statistic:
    def stat(idx: np.ndarray) -> float:
        m = among[idx]
        total = int(m.sum())
        return float(hit[idx][m].sum()) / total if total else math.nan

    return stat


def _macro(stats: list[Statistic]) -> Statistic:
    def stat(idx: np.ndarray) -> float:
        values = [s(idx) for s in stats]
        defined = [v for v in values if math.isfinite(v)]
        return float(np.mean(defined)) if defined else math.nan

    return stat


def classification_intervals(probs: np.ndarray, labels: np.ndarray, *, threshold: float | None,
                             positive_class: int | None, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                             bins: int = DEFAULT_BINS) -> dict[str, dict[str, Any]]:
    """95 % bootstrap intervals of a classifier's figures on ``n`` images.

    Parameters
    ----------
    probs : np.ndarray
        ``(n, C)`` class probabilities.
    labels : np.ndarray
        ``(n,)`` integer labels.
    threshold : float or None
        Binary models: the operating threshold on the probability of
        ``positive_class`` (the model's, chosen on federated validation).
    positive_class : int or None
        The positive class of a binary model; None for C > 2.
    replicates, seed : int
        Bootstrap draws and their seed.
    bins : int
        Score bins (as the counts use).

    Returns
    -------
    dict
        Binary: ``auroc``, ``accuracy`` (argmax decision, as reported),
        ``sensitivity@thr``, ``specificity@thr``, ``accuracy@thr`` (at
        ``threshold``, when given). More than two classes: ``auroc``,
        ``sensitivity`` and ``specificity`` (macro one-vs-rest, argmax
        decisions) and ``accuracy``. Each value is a
        :func:`bootstrap_interval` dict.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs must be (n, C) and labels (n,), got {p.shape} and {y.shape}")
    n, c = p.shape
    predicted = np.argmax(p, axis=1)
    correct = predicted == y
    everyone = np.ones(n, dtype=bool)
    stats: dict[str, Statistic] = {}
    if c == 2:
        k = 1 if positive_class is None else int(positive_class)
        score_bins = _bins(p[:, k], bins)
        positive = y == k
        stats["auroc"] = _auroc(score_bins, positive, bins)
        stats["accuracy"] = _rate(correct, everyone)
        if threshold is not None and math.isfinite(threshold):
            called = score_bins >= _threshold_bin(float(threshold), bins)
            stats["sensitivity@thr"] = _rate(called, positive)
            stats["specificity@thr"] = _rate(~called, ~positive)
            stats["accuracy@thr"] = _rate(called == positive, everyone)
    else:
        per_class = [(_bins(p[:, j], bins), y == j, predicted == j) for j in range(c)]
        stats["auroc"] = _macro([_auroc(b, pos, bins) for b, pos, _ in per_class])
        stats["sensitivity"] = _macro([_rate(pred, pos) for _, pos, pred in per_class])
        stats["specificity"] = _macro([_rate(~pred, ~pos) for _, pos, pred in per_class])
        stats["accuracy"] = _rate(correct, everyone)
    return {name: bootstrap_interval(stat, n, replicates=replicates, seed=seed) for name, stat in stats.items()}


def mean_intervals(values: Mapping[str, np.ndarray], *, replicates: int = DEFAULT_REPLICATES,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """95 % bootstrap intervals of the mean of per-image values (e.g. Dice, IoU), NaNs left out of each mean.

    All arrays must have the same length (one value per image); images are
    drawn once per draw for all of them.
    """
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    lengths = {a.shape for a in arrays.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"expected 1-D arrays of one length, got shapes {sorted(lengths)}")
    n = next(iter(lengths))[0]

    def mean_of(a: np.ndarray) -> Statistic:
        def stat(idx: np.ndarray) -> float:
            v = a[idx]
            v = v[np.isfinite(v)]
            return float(v.mean()) if v.size else math.nan

        return stat

    return {name: bootstrap_interval(mean_of(a), n, replicates=replicates, seed=seed) for name, a in arrays.items()}
