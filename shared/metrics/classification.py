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
scores for AUROC.

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
    "ClassificationCounts",
    "auroc_from_histograms",
]

logger = logging.getLogger(__name__)

DEFAULT_BINS = 1000
"""Default number of uniform probability bins on [0, 1]."""

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
    def metrics(self, positive_class: int = 1) -> dict[str, float]:
        """Derive metrics from the counts.

        Undefined values (e.g. specificity with no negatives) are NaN; this
        method never raises for missing classes.

        Parameters
        ----------
        positive_class : int, default 1
            The positive class for binary tasks (C == 2). Ignored for C > 2.

        Returns
        -------
        dict[str, float]
            Always ``accuracy`` and ``num-examples``.

            Binary: ``sensitivity`` (recall), ``specificity``, ``precision``,
            ``f1``, ``auroc`` (scores = probability of ``positive_class``),
            and ``tp``, ``fp``, ``tn``, ``fn``.

            Multi-class: per class k one-vs-rest ``recall-<k>``,
            ``specificity-<k>``, ``precision-<k>``, ``f1-<k>``, ``auroc-<k>``,
            and their macro averages ``sensitivity``, ``specificity``,
            ``precision``, ``f1``, ``auroc``. A macro average is the mean over
            the classes where the per-class value is defined (NaN if none).

            F1 is ``2 tp / (2 tp + fp + fn)``: 0 when there are positives or
            positive predictions but no true positives, NaN when there are
            neither.

        Raises
        ------
        ValueError
            If ``positive_class`` is not a valid class for a binary task.
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
            per = self._one_vs_rest(positive_class)
            out.update(
                {
                    "sensitivity": per["recall"],
                    "specificity": per["specificity"],
                    "precision": per["precision"],
                    "f1": per["f1"],
                    "auroc": per["auroc"],
                    "tp": per["tp"],
                    "fp": per["fp"],
                    "tn": per["tn"],
                    "fn": per["fn"],
                }
            )
            return out
        names = ("recall", "specificity", "precision", "f1", "auroc")
        per_class = [self._one_vs_rest(k) for k in range(c)]
        for k, per in enumerate(per_class):
            for name in names:
                out[f"{name}-{k}"] = per[name]
        macro_names = {"recall": "sensitivity"}
        for name in names:
            out[macro_names.get(name, name)] = _mean_defined([p[name] for p in per_class])
        return out

    def _one_vs_rest(self, k: int) -> dict[str, float]:
        """Counts and rates for class ``k`` against all other classes."""
        cm = self.confusion
        tp = int(cm[k, k])
        fn = int(cm[k, :].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = int(cm.sum()) - tp - fn - fp
        pos_hist = self.histogram[k, k]
        neg_hist = self.histogram[k].sum(axis=0) - pos_hist
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
