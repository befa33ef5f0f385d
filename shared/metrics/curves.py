"""ROC, precision-recall and reliability curves from binned scores (the counts sites send).

The server never sees a per-image score: it has, per label, a histogram of
the predicted probability (:meth:`~shared.metrics.classification.ClassificationCounts.score_histograms`).
The curves here sweep the threshold over the histogram's bin edges exactly as
the metrics do (a bin counts as positive when its lower edge is >= the
threshold, :meth:`~shared.metrics.classification.ClassificationCounts.metrics_at_threshold`),
so an operating point drawn on a curve is the one the reported sensitivity and
specificity belong to, and the area under :func:`roc_points` is
:func:`~shared.metrics.classification.auroc_from_histograms`.

Every function takes the positive and negative histograms (ascending score,
same length) and returns plain NumPy arrays or dicts; nothing here draws.
"""

from __future__ import annotations

import math

import numpy as np

from shared.metrics.classification import DEFAULT_ECE_BINS

__all__ = ["operating_point", "pr_points", "reliability_bins", "roc_points"]


def _pair(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    if pos.ndim != 1 or pos.shape != neg.shape:
        raise ValueError(f"expected two 1-D histograms of equal length, got shapes {pos.shape} and {neg.shape}")
    if (pos < 0).any() or (neg < 0).any():
        raise ValueError("histogram counts must be non-negative")
    return pos, neg


def roc_points(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` from binned scores.

    Points run from (0, 0) (threshold above every score) to (1, 1)
    (threshold 0); ``thresholds[i]`` is the bin lower edge of point ``i``
    (``inf`` for the first). Bins holding no sample add no point.

    Returns
    -------
    tuple of np.ndarray
        Empty arrays when there are no positives or no negatives (the curve
        is undefined).
    """
    pos, neg = _pair(pos_hist, neg_hist)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    bins = pos.shape[0]
    tp = np.cumsum(pos[::-1])[::-1]  # called positive at the lower edge of bin b
    fp = np.cumsum(neg[::-1])[::-1]
    used = np.flatnonzero((pos + neg) > 0)[::-1]  # high to low
    fpr = np.concatenate(([0.0], fp[used] / n_neg))
    tpr = np.concatenate(([0.0], tp[used] / n_pos))
    thr = np.concatenate(([math.inf], used / bins))
    return fpr, tpr, thr


def pr_points(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve ``(recall, precision, thresholds)`` from binned scores.

    One point per non-empty bin edge, from the highest threshold down
    (recall rising). The step-wise area under it is the average precision
    (:func:`~shared.metrics.classification.auprc_from_histograms`). Empty
    arrays when there are no positives.
    """
    pos, neg = _pair(pos_hist, neg_hist)
    n_pos = pos.sum()
    if n_pos == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    bins = pos.shape[0]
    tp = np.cumsum(pos[::-1])[::-1]
    fp = np.cumsum(neg[::-1])[::-1]
    used = np.flatnonzero((pos + neg) > 0)[::-1]
    return tp[used] / n_pos, tp[used] / (tp[used] + fp[used]), used / bins


def operating_point(pos_hist: np.ndarray, neg_hist: np.ndarray, threshold: float) -> dict[str, float]:
    """Where ``threshold`` sits on the curves: ``fpr``, ``tpr``, ``precision`` (NaN where undefined).

    Uses the metrics' convention (the bin holding ``threshold`` counts as
    positive), so ``tpr`` equals the reported ``sensitivity@thr``.
    """
    pos, neg = _pair(pos_hist, neg_hist)
    bins = pos.shape[0]
    if threshold > 1.0:
        b = bins
    elif threshold <= 0.0:
        b = 0
    else:
        edges = np.arange(bins + 1, dtype=np.float64) / bins
        b = min(max(int(np.searchsorted(edges, threshold, side="right")) - 1, 0), bins - 1)
    tp, fp = pos[b:].sum(), neg[b:].sum()
    n_pos, n_neg = pos.sum(), neg.sum()
    nan = float("nan")
    return {"threshold": float(threshold), "tpr": tp / n_pos if n_pos else nan, "fpr": fp / n_neg if n_neg else nan,
            "precision": tp / (tp + fp) if tp + fp else nan}


def reliability_bins(pos_hist: np.ndarray, neg_hist: np.ndarray,
                     ece_bins: int = DEFAULT_ECE_BINS) -> dict[str, np.ndarray]:
    """The reliability (calibration) diagram's bins: mean predicted probability vs observed frequency.

    Fine bins are merged into ``ece_bins`` coarse bins as the ECE does
    (:func:`~shared.metrics.classification.ece_from_histograms`: each fine
    bin goes to the coarse bin holding its centre, probabilities taken at the
    fine-bin centres). The n-weighted mean of ``|observed - confidence|`` over
    the non-empty bins is the ECE.

    Returns
    -------
    dict
        ``lower``, ``upper`` (coarse bin edges), ``n`` (samples),
        ``confidence`` (mean predicted probability) and ``observed``
        (fraction of positives), NaN for empty bins.
    """
    pos, neg = _pair(pos_hist, neg_hist)
    if isinstance(ece_bins, bool) or not isinstance(ece_bins, int) or ece_bins < 1:
        raise ValueError(f"ece_bins must be an integer >= 1, got {ece_bins!r}")
    fine = pos.shape[0]
    b = np.arange(fine, dtype=np.int64)
    coarse = np.minimum(((2 * b + 1) * ece_bins) // (2 * fine), ece_bins - 1)
    centres = (b + 0.5) / fine
    total = pos + neg
    n = np.bincount(coarse, weights=total, minlength=ece_bins)
    events = np.bincount(coarse, weights=pos, minlength=ece_bins)
    conf = np.bincount(coarse, weights=total * centres, minlength=ece_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(n > 0, conf / n, np.nan)
        observed = np.where(n > 0, events / n, np.nan)
    edges = np.arange(ece_bins + 1) / ece_bins
    return {"lower": edges[:-1], "upper": edges[1:], "n": n, "confidence": confidence, "observed": observed}
