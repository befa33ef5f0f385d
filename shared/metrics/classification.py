"""Classification metrics computed from counts that add up across sites.

Federated evaluation must not send per-image scores off a hospital site.
Each site therefore summarises its predictions as a
:class:`ClassificationCounts` (a confusion matrix and per-label histograms of
predicted probabilities), sends the integer counts (see
:meth:`ClassificationCounts.to_flat`), and the server sums the counts of all
sites (:meth:`ClassificationCounts.merge`) before deriving rates
(:meth:`ClassificationCounts.metrics`). Because every metric is a function of
summed counts, the pooled metrics equal those computed on all predictions
pooled: exactly for the confusion-derived metrics, and up to the binning of
scores for AUROC, AUPRC, ECE and threshold-dependent metrics (see the
docstrings of :func:`auprc_from_histograms`,
:meth:`ClassificationCounts.metrics_at_threshold` and
:meth:`ClassificationCounts.expected_calibration_error` for the exact rounding
rules and error bounds).

Notes
-----
A probability histogram with many bins and very few samples is close to the
multiset of (rounded score, label) pairs of a site. Sites with very few
images should use fewer bins (or add noise before sending) if that matters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_ECE_BINS",
    "THRESHOLD_METRIC_NAMES",
    "ClassificationCounts",
    "auprc_from_histograms",
    "auroc_from_histograms",
    "ece_from_histograms",
]

logger = logging.getLogger(__name__)

DEFAULT_BINS = 1000
"""Default number of uniform probability bins on [0, 1]."""

DEFAULT_ECE_BINS = 15
"""Default number of (coarse) calibration bins for the expected calibration error."""

THRESHOLD_METRIC_NAMES = (
    "tp",
    "fp",
    "tn",
    "fn",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
)
"""Keys of :meth:`ClassificationCounts.metrics_at_threshold`, in order."""

THRESHOLD_METHODS = ("youden", "target-sensitivity")

_NAN = float("nan")


def _ratio(numerator: float, denominator: float) -> float:
    """Return ``numerator / denominator`` or NaN when the denominator is zero."""
    if denominator == 0:
        return _NAN
    return float(numerator) / float(denominator)


def _mean_defined(values: list[float]) -> float:
    """Mean of the non-NaN values, NaN if there are none (no warning)."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return _NAN
    return float(sum(defined) / len(defined))


def auroc_from_histograms(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
    """Area under the ROC curve from binned scores of positives and negatives.

    Thresholds are swept over the bin edges from high to low; cumulative true
    and false positive counts give the ROC points and the area is the
    trapezoidal rule. Samples that share a bin are treated as tied, so the
    result is the Mann-Whitney statistic with ties counted half.

    Parameters
    ----------
    pos_hist : np.ndarray
        1-D integer counts of positive samples per score bin (ascending score).
    neg_hist : np.ndarray
        1-D integer counts of negative samples per score bin, same length.

    Returns
    -------
    float
        AUROC in [0, 1], or NaN if there are no positives or no negatives.

    Notes
    -----
    The binning error is at most half the fraction of (positive, negative)
    pairs that share a bin. With 1000 uniform bins it is below 1e-3 for
    typical softmax outputs, but it grows when both classes pile up in the
    extreme bins (e.g. an overconfident model with many scores > 0.999).

    Raises
    ------
    ValueError
        If the histograms are not 1-D, differ in length, or contain negative
        counts.
    """
    pos = np.asarray(pos_hist)
    neg = np.asarray(neg_hist)
    if pos.ndim != 1 or neg.ndim != 1:
        raise ValueError(
            "auroc_from_histograms expects two 1-D histograms; got shapes "
            f"{pos.shape} and {neg.shape}."
        )
    if pos.shape != neg.shape:
        raise ValueError(
            "Positive and negative histograms must have the same number of bins; "
            f"got {pos.shape[0]} and {neg.shape[0]}."
        )
    if (pos < 0).any() or (neg < 0).any():
        raise ValueError("Histogram counts must be non-negative.")
    pos_f = pos.astype(np.float64)
    neg_f = neg.astype(np.float64)
    n_pos = pos_f.sum()
    n_neg = neg_f.sum()
    if n_pos == 0 or n_neg == 0:
        return _NAN
    # Sweep thresholds from the highest bin down: cumulative counts above
    # each threshold, starting at the point (0, 0).
    tp = np.concatenate(([0.0], np.cumsum(pos_f[::-1])))
    fp = np.concatenate(([0.0], np.cumsum(neg_f[::-1])))
    # Trapezoidal area in count units, then normalise.
    area = np.sum(np.diff(fp) * (tp[1:] + tp[:-1])) / 2.0
    return float(area / (n_pos * n_neg))


def _check_pos_neg_histograms(pos_hist: np.ndarray, neg_hist: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of 1-D histograms and return them as float64."""
    pos = np.asarray(pos_hist)
    neg = np.asarray(neg_hist)
    if pos.ndim != 1 or neg.ndim != 1:
        raise ValueError(
            f"{name} expects two 1-D histograms; got shapes {pos.shape} and {neg.shape}."
        )
    if pos.shape != neg.shape:
        raise ValueError(
            "Positive and negative histograms must have the same number of bins; "
            f"got {pos.shape[0]} and {neg.shape[0]}."
        )
    if (pos < 0).any() or (neg < 0).any():
        raise ValueError("Histogram counts must be non-negative.")
    return pos.astype(np.float64), neg.astype(np.float64)


def auprc_from_histograms(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
    """Average precision (area under the step-wise precision-recall curve).

    Thresholds are swept over the bin edges from high to low. At the lower
    edge of bin ``b`` every sample in bins ``>= b`` is called positive, giving
    cumulative ``tp_b`` and ``fp_b``; the average precision is

        AP = sum_b (R_b - R_{b+1}) * P_b,  R_b = tp_b / n_pos,  P_b = tp_b / (tp_b + fp_b),

    the same step-wise (non-interpolated) sum as
    ``sklearn.metrics.average_precision_score``. Samples that share a bin are
    treated as tied scores, exactly as sklearn treats equal scores, so the
    result equals sklearn's on the pooled scores whenever no bin holds two
    different scores (e.g. scores on distinct bins), and equals sklearn's on
    the scores rounded to their bin otherwise.

    Parameters
    ----------
    pos_hist : np.ndarray
        1-D integer counts of positive samples per score bin (ascending score).
    neg_hist : np.ndarray
        1-D integer counts of negative samples per score bin, same length.

    Returns
    -------
    float
        AP in [0, 1]; NaN if there are no positives (undefined); 1.0 if there
        are positives but no negatives.

    Notes
    -----
    The chance level of AP is the prevalence ``n_pos / n``, not 0.5. Binning
    error: only samples that share a bin with samples of the other class
    matter; with 1000 bins it is below 1e-3 for typical softmax outputs but,
    as for AUROC, grows when both classes pile up in the extreme bins.

    Raises
    ------
    ValueError
        If the histograms are not 1-D, differ in length, or contain negative
        counts.
    """
    pos_f, neg_f = _check_pos_neg_histograms(pos_hist, neg_hist, "auprc_from_histograms")
    n_pos = pos_f.sum()
    if n_pos == 0:
        return _NAN
    tp = np.cumsum(pos_f[::-1])  # called positive at the lower edge of each bin, high to low
    fp = np.cumsum(neg_f[::-1])
    gained = pos_f[::-1]  # recall step (in counts) at each threshold
    used = gained > 0  # tp + fp > 0 wherever a positive is gained
    precision = tp[used] / (tp[used] + fp[used])
    return float(np.sum(gained[used] * precision) / n_pos)


def _coarse_bin_index(bins: int, ece_bins: int) -> np.ndarray:
    """Coarse calibration bin of each fine bin: the one holding its centre.

    Fine bin ``b`` (centre ``(b + 1/2) / bins``) goes to coarse bin
    ``floor((b + 1/2) * ece_bins / bins)``, computed in exact integer
    arithmetic. Equivalently each coarse edge ``j / ece_bins`` is moved to the
    nearest fine edge (by at most ``1 / (2 * bins)``; not at all when
    ``ece_bins`` divides ``bins``).
    """
    b = np.arange(bins, dtype=np.int64)
    return np.minimum(((2 * b + 1) * ece_bins) // (2 * bins), ece_bins - 1)


def _validate_ece_bins(ece_bins: int) -> int:
    if isinstance(ece_bins, bool) or not isinstance(ece_bins, (int, np.integer)) or ece_bins < 1:
        raise ValueError(f"ece_bins must be an integer >= 1; got {ece_bins!r}.")
    return int(ece_bins)


def ece_from_histograms(
    pos_hist: np.ndarray, neg_hist: np.ndarray, ece_bins: int = DEFAULT_ECE_BINS
) -> float:
    """Expected calibration error of a probability from its binned values.

    ``pos_hist[b]`` / ``neg_hist[b]`` count samples whose predicted
    probability of the event lies in fine bin ``b`` of ``B`` uniform bins on
    [0, 1] and for which the event did / did not happen. The fine bins are
    merged into ``ece_bins`` coarse bins (see below) and

        ECE = sum_j (n_j / n) * |observed_j - confidence_j|,

    with ``observed_j`` the fraction of events and ``confidence_j`` the mean
    predicted probability in coarse bin ``j``.

    Rounding (no per-sample probabilities are available): each sample's
    probability is taken as the centre ``(b + 1/2) / B`` of its fine bin,
    which changes every ``confidence_j`` by at most ``1 / (2 B)``, hence

        |ECE_hist - ECE_exact| <= 1 / (2 B)   (5e-4 for B = 1000),

    where ``ECE_exact`` is the ECE of the exact probabilities over the same
    coarse bins. The coarse bins are equal-width up to the fine grid: coarse
    edge ``j / ece_bins`` is moved to the nearest fine edge (exact when
    ``ece_bins`` divides ``B``; for B = 1000 and 15 bins, edges move by
    <= 1/3000). Versus textbook equal-width bins on raw scores this only
    re-assigns samples lying within ``1 / (2 B)`` of a coarse edge.

    Parameters
    ----------
    pos_hist, neg_hist : np.ndarray
        1-D integer counts per fine bin (ascending probability), same length.
    ece_bins : int, default DEFAULT_ECE_BINS
        Number of coarse calibration bins.

    Returns
    -------
    float
        ECE in [0, 1], NaN if there are no samples.
    """
    pos_f, neg_f = _check_pos_neg_histograms(pos_hist, neg_hist, "ece_from_histograms")
    ece_bins = _validate_ece_bins(ece_bins)
    total = pos_f + neg_f
    n = total.sum()
    if n == 0:
        return _NAN
    fine = pos_f.shape[0]
    coarse = _coarse_bin_index(fine, ece_bins)
    centres = (np.arange(fine, dtype=np.float64) + 0.5) / fine
    events = np.bincount(coarse, weights=pos_f, minlength=ece_bins)
    confidence_sum = np.bincount(coarse, weights=total * centres, minlength=ece_bins)
    return float(np.sum(np.abs(events - confidence_sum)) / n)


def _threshold_bin(threshold: float, bins: int) -> int:
    """Index of the lowest fine bin counted as ``score >= threshold``.

    The bin containing ``threshold`` (the largest ``b`` with ``b / bins <=
    threshold``, comparing the float edge values) counts as ``>= threshold``.
    Thresholds <= 0 select every bin; 1.0 selects the last bin (which holds
    the probabilities 1.0); thresholds > 1 select none (returns ``bins``).
    """
    if threshold > 1.0:
        return bins
    if threshold <= 0.0:
        return 0
    edges = np.arange(bins + 1, dtype=np.float64) / bins
    index = int(np.searchsorted(edges, threshold, side="right")) - 1
    return min(max(index, 0), bins - 1)


def _rates_from_counts(tp: float, fp: float, tn: float, fn: float) -> dict[str, float]:
    """The THRESHOLD_METRIC_NAMES dict from confusion counts."""
    n = tp + fp + tn + fn
    return {
        "tp": float(tp),
        "fp": float(fp),
        "tn": float(tn),
        "fn": float(fn),
        "accuracy": _ratio(tp + tn, n),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _validate_num_classes_and_bins(num_classes: int, bins: int) -> None:
    """Raise ValueError if ``num_classes`` or ``bins`` is not a valid size."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)):
        raise ValueError(f"bins must be an integer >= 1; got {bins!r}.")
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}.")


def _validate_batch(
    probs: np.ndarray, labels: np.ndarray, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert a batch of probabilities and labels.

    Parameters
    ----------
    probs : np.ndarray
        Array of shape (N, C) with class probabilities.
    labels : np.ndarray
        Array of shape (N,) with integer labels in [0, C).
    num_classes : int or None
        Expected C, or None to take it from ``probs``.

    Returns
    -------
    tuple of np.ndarray
        ``probs`` as float64 (N, C) and ``labels`` as int64 (N,).
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise ValueError(
            f"probs must have shape (N, C) (one row of class probabilities per "
            f"sample); got shape {p.shape}."
        )
    n, c = p.shape
    if num_classes is not None and c != num_classes:
        raise ValueError(
            f"probs has {c} columns but these counts are for {num_classes} classes."
        )
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(
            f"labels must have shape ({n},) to match probs {p.shape}; got {y.shape}."
        )
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values.")
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise ValueError(
                f"labels must be integers in [0, {c}); got dtype {y.dtype}."
            )
    y = y.astype(np.int64, copy=False)
    if y.size:
        bad = (y < 0) | (y >= c)
        if bad.any():
            raise ValueError(
                f"labels must be integers in [0, {c}) for {c} classes; found "
                f"{int(bad.sum())} label(s) out of range (min {int(y.min())}, "
                f"max {int(y.max())})."
            )
    return p, y


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
class ClassificationCounts:
    """Additive summary of classification predictions.

    Attributes
    ----------
    num_classes : int
        Number of classes C (>= 2).
    bins : int
        Number of uniform probability bins on [0, 1].
    confusion : np.ndarray
        int64 array (C, C); rows are the true label, columns the predicted
        label (argmax of the probabilities, ties to the lowest index).
    histogram : np.ndarray
        int64 array (C, C, bins); ``histogram[k, l, b]`` is the number of
        samples with true label ``l`` whose predicted probability of class
        ``k`` falls in bin ``b``. Bin ``b`` covers ``[b / bins, (b + 1) / bins)``
        and probability 1.0 falls in the last bin; probabilities marginally
        outside [0, 1] (rounding) are clipped into the first or last bin.
    """

    num_classes: int
    bins: int
    confusion: np.ndarray
    histogram: np.ndarray

    def __post_init__(self) -> None:
        """Validate sizes and convert the arrays to int64."""
        _validate_num_classes_and_bins(self.num_classes, self.bins)
        self.num_classes = int(self.num_classes)
        self.bins = int(self.bins)
        c, b = self.num_classes, self.bins
        confusion = np.asarray(self.confusion)
        histogram = np.asarray(self.histogram)
        if confusion.shape != (c, c):
            raise ValueError(
                f"confusion must have shape ({c}, {c}); got {confusion.shape}."
            )
        if histogram.shape != (c, c, b):
            raise ValueError(
                f"histogram must have shape ({c}, {c}, {b}); got {histogram.shape}."
            )
        self.confusion = confusion.astype(np.int64, copy=False)
        self.histogram = histogram.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ build
    @classmethod
    def empty(cls, num_classes: int, bins: int = DEFAULT_BINS) -> ClassificationCounts:
        """Return all-zero counts.

        Parameters
        ----------
        num_classes : int
            Number of classes C (>= 2).
        bins : int, default DEFAULT_BINS
            Number of uniform probability bins on [0, 1].

        Returns
        -------
        ClassificationCounts
            Counts with no samples.
        """
        _validate_num_classes_and_bins(num_classes, bins)
        return cls(
            num_classes=int(num_classes),
            bins=int(bins),
            confusion=np.zeros((num_classes, num_classes), dtype=np.int64),
            histogram=np.zeros((num_classes, num_classes, bins), dtype=np.int64),
        )

    @classmethod
    def from_predictions(
        cls, probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS
    ) -> ClassificationCounts:
        """Summarise predictions as counts.

        Parameters
        ----------
        probs : np.ndarray
            Array (N, C) of class probabilities (softmax output; rows sum to ~1).
        labels : np.ndarray
            Array (N,) of integer true labels in [0, C).
        bins : int, default DEFAULT_BINS
            Number of uniform probability bins on [0, 1].

        Returns
        -------
        ClassificationCounts
            Counts of the given predictions.

        Raises
        ------
        ValueError
            If shapes disagree, probabilities are not finite, or a label is
            out of range.
        """
        p, _ = _validate_batch(probs, labels, None)
        counts = cls.empty(p.shape[1], bins)
        counts.update(probs, labels)
        return counts

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """Accumulate a batch of predictions in place.

        Parameters
        ----------
        probs : np.ndarray
            Array (N, C) of class probabilities.
        labels : np.ndarray
            Array (N,) of integer true labels in [0, C).

        Raises
        ------
        ValueError
            If shapes disagree with these counts, probabilities are not
            finite, or a label is out of range.
        """
        p, y = _validate_batch(probs, labels, self.num_classes)
        n = y.shape[0]
        if n == 0:
            return
        c, b = self.num_classes, self.bins
        predicted = np.argmax(p, axis=1)
        self.confusion += np.bincount(y * c + predicted, minlength=c * c).reshape(c, c)
        bin_index = np.clip(np.floor(p * b), 0, b - 1).astype(np.int64)  # (N, C)
        # flat index of histogram[k, y_i, bin_index[i, k]] for every (i, k)
        k = np.arange(c, dtype=np.int64)[None, :]
        flat = (k * c + y[:, None]) * b + bin_index
        self.histogram += np.bincount(flat.ravel(), minlength=c * c * b).reshape(c, c, b)

    def merge(self, other: ClassificationCounts) -> ClassificationCounts:
        """Return the sum of two sets of counts (neither is modified).

        Parameters
        ----------
        other : ClassificationCounts
            Counts with the same number of classes and bins.

        Returns
        -------
        ClassificationCounts
            New counts equal to those of the pooled predictions.

        Raises
        ------
        ValueError
            If the number of classes or bins differs.
        """
        if not isinstance(other, ClassificationCounts):
            raise ValueError(
                f"Can only merge ClassificationCounts; got {type(other).__name__}."
            )
        if other.num_classes != self.num_classes:
            raise ValueError(
                "Cannot merge counts with different numbers of classes: "
                f"{self.num_classes} vs {other.num_classes}. All sites must "
                "evaluate the same task."
            )
        if other.bins != self.bins:
            raise ValueError(
                f"Cannot merge counts with different numbers of bins: {self.bins} "
                f"vs {other.bins}. All sites must use the same bins setting."
            )
        return ClassificationCounts(
            num_classes=self.num_classes,
            bins=self.bins,
            confusion=self.confusion + other.confusion,
            histogram=self.histogram + other.histogram,
        )

    @property
    def num_examples(self) -> int:
        """Number of samples counted."""
        return int(self.confusion.sum())

    def operating_threshold(self, rule: ThresholdRule) -> float | None:
        """The threshold ``rule`` chooses on these counts (binary only; ``None`` for argmax decisions)."""
        if self.num_classes != 2 or not rule.chooses_threshold:
            return None
        return self.select_threshold(rule.method, rule.target_sensitivity, rule.positive_class)

    def report(self, threshold: float | None = None, positive_class: int | None = 1) -> dict[str, float]:
        """The reported metrics: binary at 0.5 and at ``threshold``; multi-class one-vs-rest with macro averages."""
        if self.num_classes != 2:
            return self.metrics()
        return self.metrics(positive_class=1 if positive_class is None else positive_class, threshold=threshold)

    # ------------------------------------------------------------ transport
    def to_flat(self) -> dict[str, int | list[int]]:
        """Encode as a flat dict of ints and lists of ints.

        Suitable for JSON or a Flower ``MetricRecord`` (plain Python ints).
        The histogram is encoded sparsely because most bins are zero.

        Returns
        -------
        dict
            ``"num-classes"``: C; ``"bins"``: B; ``"confusion"``: the C*C
            confusion matrix flattened row-major; ``"histogram-index"``:
            ascending row-major flat indices into the (C, C, B) histogram of
            its non-zero entries; ``"histogram-count"``: the counts at those
            indices (same length).
        """
        flat_hist = self.histogram.ravel()
        nonzero = np.flatnonzero(flat_hist)
        return {
            "num-classes": int(self.num_classes),
            "bins": int(self.bins),
            "confusion": [int(v) for v in self.confusion.ravel().tolist()],
            "histogram-index": [int(v) for v in nonzero.tolist()],
            "histogram-count": [int(v) for v in flat_hist[nonzero].tolist()],
        }

    @classmethod
    def from_flat(cls, d: Mapping[str, object]) -> ClassificationCounts:
        """Decode counts produced by :meth:`to_flat`.

        A dense ``"histogram"`` (C*C*B values, row-major) is accepted in place
        of ``"histogram-index"``/``"histogram-count"``. Extra keys are ignored.

        Parameters
        ----------
        d : Mapping[str, object]
            The flat encoding.

        Returns
        -------
        ClassificationCounts
            The decoded counts.

        Raises
        ------
        ValueError
            If a key is missing or a size, index or count is invalid.
        """
        for key in ("num-classes", "bins", "confusion"):
            if key not in d:
                raise ValueError(
                    f"Flat classification counts lack the key {key!r}; found keys "
                    f"{sorted(d)}."
                )
        c = _as_int(d["num-classes"], "num-classes")
        b = _as_int(d["bins"], "bins")
        _validate_num_classes_and_bins(c, b)
        confusion = _as_int_array(d["confusion"], "confusion")
        if confusion.size != c * c:
            raise ValueError(
                f"'confusion' must have num-classes**2 = {c * c} values; got "
                f"{confusion.size}."
            )
        size = c * c * b
        if "histogram-index" in d or "histogram-count" in d:
            if "histogram-index" not in d or "histogram-count" not in d:
                raise ValueError(
                    "Sparse histogram needs both 'histogram-index' and "
                    "'histogram-count'."
                )
            index = _as_int_array(d["histogram-index"], "histogram-index")
            count = _as_int_array(d["histogram-count"], "histogram-count")
            if index.size != count.size:
                raise ValueError(
                    "'histogram-index' and 'histogram-count' must have the same "
                    f"length; got {index.size} and {count.size}."
                )
            if index.size and (index.min() < 0 or index.max() >= size):
                raise ValueError(
                    f"'histogram-index' values must lie in [0, {size}) for "
                    f"{c} classes and {b} bins."
                )
            if np.unique(index).size != index.size:
                raise ValueError("'histogram-index' contains duplicate indices.")
            hist = np.zeros(size, dtype=np.int64)
            hist[index] = count
        elif "histogram" in d:
            hist = _as_int_array(d["histogram"], "histogram")
            if hist.size != size:
                raise ValueError(
                    f"'histogram' must have num-classes**2 * bins = {size} values; "
                    f"got {hist.size}."
                )
        else:
            raise ValueError(
                "Flat classification counts lack a histogram: expected "
                "'histogram-index' and 'histogram-count' (or a dense 'histogram')."
            )
        if (confusion < 0).any() or (hist < 0).any():
            raise ValueError("Counts must be non-negative.")
        return cls(
            num_classes=c,
            bins=b,
            confusion=confusion.reshape(c, c),
            histogram=hist.reshape(c, c, b),
        )

    # -------------------------------------------------------------- metrics
    def confusion_matrix(self) -> list[list[int]]:
        """The C x C confusion matrix as nested lists of ints (for JSON).

        Returns
        -------
        list[list[int]]
            ``[true label][predicted label]`` counts at the argmax decision
            (ties to the lowest index), i.e. ``self.confusion.tolist()``.
        """
        return [[int(v) for v in row] for row in self.confusion.tolist()]

    def metrics(
        self,
        positive_class: int = 1,
        threshold: float | None = None,
        *,
        ece_bins: int = DEFAULT_ECE_BINS,
    ) -> dict[str, float]:
        """Derive metrics from the counts.

        Undefined values (e.g. specificity with no negatives) are NaN; this
        method never raises for missing classes.

        Parameters
        ----------
        positive_class : int, default 1
            The positive class for binary tasks (C == 2). Ignored for C > 2.
        threshold : float or None, default None
            Binary tasks only: also report the metrics at this operating
            point on the probability of ``positive_class`` (see
            :meth:`metrics_at_threshold`), e.g. one chosen on validation
            counts with :meth:`select_threshold`.
        ece_bins : int, default DEFAULT_ECE_BINS
            Number of calibration bins for ``ece``.

        Returns
        -------
        dict[str, float]
            Always ``accuracy`` and ``num-examples``.

            Binary: ``sensitivity`` (recall), ``specificity``, ``precision``,
            ``f1``, ``auroc`` and ``auprc`` (average precision; scores =
            probability of ``positive_class``), ``ece`` (expected
            calibration error of the probability of ``positive_class``, see
            :meth:`expected_calibration_error`), and ``tp``, ``fp``, ``tn``,
            ``fn``. The confusion-based values are at the argmax decision
            (= threshold 0.5 up to exact ties). With ``threshold``, also
            ``threshold`` and ``<name>@thr`` for every name in
            :data:`THRESHOLD_METRIC_NAMES` (``tp@thr`` ... ``f1@thr``).

            Multi-class: per class k one-vs-rest ``recall-<k>``,
            ``specificity-<k>``, ``precision-<k>``, ``f1-<k>``, ``auroc-<k>``,
            ``auprc-<k>``, ``ece-<k>`` (calibration of the probability of
            class k), and their macro averages ``sensitivity``,
            ``specificity``, ``precision``, ``f1``, ``auroc``, ``auprc``,
            ``ece``. A macro average is the mean over the classes where the
            per-class value is defined (NaN if none). The multi-class ``ece``
            is therefore the *class-wise* ECE, not the top-label ECE: the
            latter needs the histogram of the maximum probability, which the
            per-class histograms do not determine.

            F1 is ``2 tp / (2 tp + fp + fn)``: 0 when there are positives or
            positive predictions but no true positives, NaN when there are
            neither.

        Raises
        ------
        ValueError
            If ``positive_class`` is not a valid class for a binary task, or
            ``threshold`` is given for a task with more than two classes.
        """
        c = self.num_classes
        n = self.num_examples
        out: dict[str, float] = {
            "accuracy": _ratio(int(np.trace(self.confusion)), n),
            "num-examples": float(n),
        }
        if c == 2:
            if positive_class not in (0, 1):
                raise ValueError(
                    f"positive_class must be 0 or 1 for a binary task; got "
                    f"{positive_class!r}."
                )
            per = self._one_vs_rest(positive_class, ece_bins)
            out.update(
                {
                    "sensitivity": per["recall"],
                    "specificity": per["specificity"],
                    "precision": per["precision"],
                    "f1": per["f1"],
                    "auroc": per["auroc"],
                    "auprc": per["auprc"],
                    "ece": per["ece"],
                    "tp": per["tp"],
                    "fp": per["fp"],
                    "tn": per["tn"],
                    "fn": per["fn"],
                }
            )
            if threshold is not None:
                at = self.metrics_at_threshold(threshold, positive_class=positive_class)
                out["threshold"] = float(threshold)
                out.update({f"{name}@thr": at[name] for name in THRESHOLD_METRIC_NAMES})
            return out
        if threshold is not None:
            raise ValueError(
                f"metrics(threshold=...) is for binary tasks; this task has {c} "
                "classes. Use metrics_at_threshold(t, positive_class=k) for a "
                "one-vs-rest operating point of class k."
            )
        names = ("recall", "specificity", "precision", "f1", "auroc", "auprc", "ece")
        per_class = [self._one_vs_rest(k, ece_bins) for k in range(c)]
        for k, per in enumerate(per_class):
            for name in names:
                out[f"{name}-{k}"] = per[name]
        macro_names = {"recall": "sensitivity"}
        for name in names:
            out[macro_names.get(name, name)] = _mean_defined([p[name] for p in per_class])
        return out

    def metrics_at_threshold(self, threshold: float, positive_class: int = 1) -> dict[str, float]:
        """Confusion counts and rates at ``score >= threshold``, from the histograms.

        The score is the predicted probability of ``positive_class``; a
        sample is called positive when its score is >= ``threshold``. For
        C > 2 this is ``positive_class`` one-vs-rest.

        Rounding: only the bin of each score is known, so the whole bin
        containing ``threshold`` counts as ``>= threshold``: the effective
        threshold is the lower edge ``floor(threshold * bins) / bins`` of
        that bin. Results are therefore exact when ``threshold`` is a bin
        edge ``b / bins`` (up to floating-point rounding of scores within an
        ulp of the edge), and otherwise equal those at the bin's lower edge,
        i.e. scores in ``[floor(t * bins) / bins, t)`` are counted as
        positive (the error is on the side of sensitivity). ``threshold`` <= 0
        calls every sample positive; 1.0 calls the last bin (scores >=
        1 - 1/bins) positive; > 1 calls none positive. Thresholds returned
        by :meth:`select_threshold` are bin edges and round-trip exactly.

        Parameters
        ----------
        threshold : float
            Decision threshold on the probability of ``positive_class``. NaN
            (e.g. from :meth:`select_threshold` without positives) gives NaN
            for every value.
        positive_class : int, default 1
            The class whose probability is thresholded.

        Returns
        -------
        dict[str, float]
            ``tp``, ``fp``, ``tn``, ``fn``, ``accuracy``, ``sensitivity``,
            ``specificity``, ``precision``, ``f1`` (see :meth:`metrics` for
            the NaN and F1 conventions).

        Raises
        ------
        ValueError
            If ``positive_class`` is not in [0, C) or ``threshold`` is not a
            real number.
        """
        k = self._check_class(positive_class)
        t = self._check_threshold(threshold)
        if math.isnan(t):
            return {name: _NAN for name in THRESHOLD_METRIC_NAMES}
        pos, neg = self._score_histograms(k)
        b = _threshold_bin(t, self.bins)
        tp = int(pos[b:].sum())
        fp = int(neg[b:].sum())
        fn = int(pos.sum()) - tp
        tn = int(neg.sum()) - fp
        return _rates_from_counts(tp, fp, tn, fn)

    def select_threshold(
        self,
        method: str = "youden",
        target_sensitivity: float = 0.9,
        positive_class: int = 1,
    ) -> float:
        """Choose a decision threshold on (validation) counts.

        Candidates are the fine-bin lower edges ``b / bins``, ``b = 0 ..
        bins - 1``, with the convention of :meth:`metrics_at_threshold` (a
        bin counts as positive when its lower edge is >= the threshold), so
        the returned value reproduces the chosen operating point exactly.

        ``"youden"``: maximise Youden's J = sensitivity + specificity - 1
        (compared exactly in integer arithmetic). Ties: the operating point
        with the highest sensitivity wins (a missed case is worse than a
        false alarm); among the equivalent edges of that point (empty bins),
        the highest is returned, which is the lower edge of the lowest bin
        called positive (as sklearn's ``roc_curve`` thresholds sit on the
        lowest score called positive).

        ``"target-sensitivity"``: the highest threshold whose sensitivity is
        >= ``target_sensitivity`` (the most specific operating point that
        still finds that fraction of positives). Since sensitivity only
        falls as the threshold rises, this is the lower edge of the bin
        holding the ``ceil(target * n_pos)``-th highest positive score.

        Parameters
        ----------
        method : {"youden", "target-sensitivity"}, default "youden"
        target_sensitivity : float, default 0.9
            In (0, 1]; used by ``"target-sensitivity"`` only.
        positive_class : int, default 1
            The class whose probability is thresholded (one-vs-rest for C > 2).

        Returns
        -------
        float
            The threshold; NaN when undefined (no positives, or for
            ``"youden"`` no negatives). Never raises for missing classes.

        Raises
        ------
        ValueError
            If ``method``, ``target_sensitivity`` or ``positive_class`` is
            invalid.
        """
        if method not in THRESHOLD_METHODS:
            raise ValueError(
                f"method must be one of {THRESHOLD_METHODS}; got {method!r}."
            )
        k = self._check_class(positive_class)
        pos, neg = self._score_histograms(k)
        n_pos = int(pos.sum())
        n_neg = int(neg.sum())
        # tp[b], fp[b]: called positive when the threshold is the lower edge of bin b
        tp = np.cumsum(pos[::-1])[::-1]
        fp = np.cumsum(neg[::-1])[::-1]
        if method == "target-sensitivity":
            if isinstance(target_sensitivity, bool) or not isinstance(
                target_sensitivity, (int, float, np.integer, np.floating)
            ) or not 0.0 < float(target_sensitivity) <= 1.0:
                raise ValueError(
                    f"target_sensitivity must be in (0, 1]; got {target_sensitivity!r}."
                )
            if n_pos == 0:
                return _NAN
            target = float(target_sensitivity)
            # Same float ratio as the reported sensitivity, so they agree.
            ok = np.array([_ratio(int(v), n_pos) >= target for v in tp])
            b = int(np.flatnonzero(ok)[-1])  # ok[0] is True: sensitivity 1 at edge 0
            return float(b / self.bins)
        if n_pos == 0 or n_neg == 0:
            return _NAN
        # J * n_pos * n_neg = tp * n_neg - fp * n_pos + const, exact in ints
        score = tp.astype(object) * n_neg - fp.astype(object) * n_pos
        best = max(score)
        lowest = min(i for i, v in enumerate(score) if v == best)
        b = lowest
        while b + 1 < self.bins and tp[b + 1] == tp[lowest] and fp[b + 1] == fp[lowest]:
            b += 1
        return float(b / self.bins)

    def expected_calibration_error(
        self, positive_class: int = 1, ece_bins: int = DEFAULT_ECE_BINS
    ) -> float:
        """ECE of the predicted probability of ``positive_class``.

        Binary: the usual binary ECE of the positive-class probability. For
        C > 2 this is class ``positive_class`` one-vs-rest; :meth:`metrics`
        averages it over classes (class-wise ECE). Computed from the fine
        histograms with fine-bin centres; ``|error| <= 1 / (2 * bins)``. See
        :func:`ece_from_histograms` for the coarse-bin edges.

        Returns
        -------
        float
            ECE in [0, 1], NaN with no samples.
        """
        pos, neg = self._score_histograms(self._check_class(positive_class))
        return ece_from_histograms(pos, neg, ece_bins)

    def _check_class(self, k: object) -> int:
        """Return ``k`` as an int class index, or raise ValueError."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.num_classes:
            raise ValueError(
                f"positive_class must be an integer in [0, {self.num_classes}); got {k!r}."
            )
        return int(k)

    @staticmethod
    def _check_threshold(threshold: object) -> float:
        if isinstance(threshold, bool) or not isinstance(
            threshold, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"threshold must be a real number; got {threshold!r}.")
        return float(threshold)

    def score_histograms(self, positive_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Histograms of the probability of ``positive_class`` for the samples of that label and of the others.

        What ROC, precision-recall and reliability curves are drawn from
        (:mod:`shared.metrics.curves`): ``(pos, neg)``, each of ``bins``
        int64 counts in ascending probability. One-vs-rest for C > 2.

        Raises
        ------
        ValueError
            If ``positive_class`` is not in [0, C).
        """
        pos, neg = self._score_histograms(self._check_class(positive_class))
        return pos.copy(), neg.copy()

    def label_totals(self) -> list[int]:
        """Samples per true label (the confusion matrix's row sums)."""
        return [int(v) for v in self.confusion.sum(axis=1).tolist()]

    def _score_histograms(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Histograms of the probability of class ``k`` for label k / other labels."""
        pos_hist = self.histogram[k, k]
        neg_hist = self.histogram[k].sum(axis=0) - pos_hist
        return pos_hist, neg_hist

    def _one_vs_rest(self, k: int, ece_bins: int = DEFAULT_ECE_BINS) -> dict[str, float]:
        """Counts and rates for class ``k`` against all other classes."""
        cm = self.confusion
        tp = int(cm[k, k])
        fn = int(cm[k, :].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = int(cm.sum()) - tp - fn - fp
        pos_hist, neg_hist = self._score_histograms(k)
        return {
            "tp": float(tp),
            "fp": float(fp),
            "tn": float(tn),
            "fn": float(fn),
            "recall": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "auroc": auroc_from_histograms(pos_hist, neg_hist),
            "auprc": auprc_from_histograms(pos_hist, neg_hist),
            "ece": ece_from_histograms(pos_hist, neg_hist, ece_bins),
        }

def _as_int(value: object, name: str) -> int:
    """Convert a scalar integer from a flat encoding, with a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name!r} must be an integer; got {value!r}.")
    return int(value)


def _as_int_array(value: object, name: str) -> np.ndarray:
    """Convert a list of integers from a flat encoding, with a clear error."""
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name!r} must be a flat list of integers; got shape {arr.shape}.")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name!r} must contain only integers; got dtype {arr.dtype}.")
    return arr.astype(np.int64)
