"""Tests for shared.metrics.classification: counts that add up across sites."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from shared.metrics.classification import (
    DEFAULT_BINS,
    THRESHOLD_METRIC_NAMES,
    ClassificationCounts,
    auprc_from_histograms,
    auroc_from_histograms,
    ece_from_histograms,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _binary_scores(
    rng: np.random.Generator, n: int, separation: float, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of a 2-class model whose positive logit is N(sep*y, scale)."""
    y = rng.integers(0, 2, n)
    logit = rng.normal(separation * y, scale)
    probs = _softmax(np.stack([np.zeros(n), logit], axis=1))
    return probs, y


def _multiclass_scores(
    rng: np.random.Generator, n: int, c: int, separation: float
) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, c, n)
    logits = rng.normal(0.0, 1.0, (n, c))
    logits[np.arange(n), y] += separation
    return _softmax(logits), y


def _split(n: int, sizes: list[int]) -> list[slice]:
    assert sum(sizes) == n
    edges = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _assert_metrics_equal(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == b[key], key


# --------------------------------------------------------------------- golden
# Six predictions, positive class 1:
#   true label   1    1    1    0    0    0
#   p(class 1)  0.9  0.8  0.3  0.6  0.7  0.1
#   predicted    1    1    0    1    1    0
# TP = 2, FN = 1, FP = 2, TN = 1.
GOLDEN_P1 = np.array([0.9, 0.8, 0.3, 0.6, 0.7, 0.1])
GOLDEN_PROBS = np.stack([1.0 - GOLDEN_P1, GOLDEN_P1], axis=1)
GOLDEN_LABELS = np.array([1, 1, 1, 0, 0, 0])


def test_golden_binary_example() -> None:
    counts = ClassificationCounts.from_predictions(GOLDEN_PROBS, GOLDEN_LABELS, bins=10)
    np.testing.assert_array_equal(counts.confusion, [[1, 2], [1, 2]])
    m = counts.metrics()
    assert m["tp"] == 2.0 and m["fn"] == 1.0 and m["fp"] == 2.0 and m["tn"] == 1.0
    assert m["num-examples"] == 6.0
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(2 / 4)
    # F1 = 2 * P * R / (P + R) = 2 * 0.5 * 2/3 / (0.5 + 2/3) = 4/7
    assert m["f1"] == pytest.approx(4 / 7)
    # positives {0.9, 0.8, 0.3} beat negatives {0.6, 0.7, 0.1} in 3 + 3 + 1 = 7 of 9 pairs
    assert m["auroc"] == pytest.approx(7 / 9)
    for value in m.values():
        assert type(value) is float


def test_golden_binary_other_positive_class() -> None:
    counts = ClassificationCounts.from_predictions(GOLDEN_PROBS, GOLDEN_LABELS, bins=10)
    m = counts.metrics(positive_class=0)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1.0, 2.0, 1.0, 2.0)
    assert m["sensitivity"] == pytest.approx(1 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / 5)
    assert m["auroc"] == pytest.approx(7 / 9)
    with pytest.raises(ValueError, match="positive_class"):
        counts.metrics(positive_class=2)


def test_golden_histogram_bins() -> None:
    counts = ClassificationCounts.from_predictions(GOLDEN_PROBS, GOLDEN_LABELS, bins=10)
    # p(class 1) of true-1 samples: 0.9, 0.8, 0.3 -> bins 9, 8, 3
    expected_k1_l1 = np.zeros(10, dtype=np.int64)
    expected_k1_l1[[9, 8, 3]] = 1
    np.testing.assert_array_equal(counts.histogram[1, 1], expected_k1_l1)
    # p(class 0) of true-0 samples: 0.4, 0.3, 0.9 -> bins 4, 3, 9
    expected_k0_l0 = np.zeros(10, dtype=np.int64)
    expected_k0_l0[[4, 3, 9]] = 1
    np.testing.assert_array_equal(counts.histogram[0, 0], expected_k0_l0)
    # every sample appears once per class row
    np.testing.assert_array_equal(counts.histogram.sum(axis=2), [[3, 3], [3, 3]])
    assert counts.histogram.dtype == np.int64 and counts.confusion.dtype == np.int64


def test_multiclass_golden_and_sklearn_agreement() -> None:
    rng = np.random.default_rng(7)
    probs, y = _multiclass_scores(rng, 500, 3, separation=1.5)
    m = ClassificationCounts.from_predictions(probs, y).metrics()
    pred = probs.argmax(axis=1)
    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=np.nan)
    for k in range(3):
        assert m[f"recall-{k}"] == pytest.approx(r[k])
        assert m[f"precision-{k}"] == pytest.approx(p[k])
        assert m[f"f1-{k}"] == pytest.approx(f[k])
        negatives = y != k
        assert m[f"specificity-{k}"] == pytest.approx(np.mean(pred[negatives] != k))
    assert m["sensitivity"] == pytest.approx(r.mean())
    assert m["precision"] == pytest.approx(p.mean())
    assert m["f1"] == pytest.approx(f.mean())
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert "tp" not in m


# ----------------------------------------------------- pooled == summed counts
@pytest.mark.parametrize(("c", "seed"), [(2, 0), (2, 1), (3, 2), (5, 3)])
def test_merged_site_counts_equal_pooled(c: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 1000
    probs, y = _multiclass_scores(rng, n, c, separation=1.0)
    sites = [
        ClassificationCounts.from_predictions(probs[s], y[s])
        for s in _split(n, [7, 193, 800])
    ]
    merged = sites[0].merge(sites[1]).merge(sites[2])
    pooled = ClassificationCounts.from_predictions(probs, y)
    np.testing.assert_array_equal(merged.confusion, pooled.confusion)
    np.testing.assert_array_equal(merged.histogram, pooled.histogram)
    assert merged.num_examples == pooled.num_examples == n
    _assert_metrics_equal(merged.metrics(), pooled.metrics())
    # merging is pure: the site counts are unchanged
    assert sites[0].num_examples == 7


def test_update_in_batches_equals_from_predictions() -> None:
    rng = np.random.default_rng(11)
    probs, y = _multiclass_scores(rng, 300, 4, separation=1.0)
    counts = ClassificationCounts.empty(4)
    for s in _split(300, [1, 0, 99, 200]):
        counts.update(probs[s], y[s])
    pooled = ClassificationCounts.from_predictions(probs, y)
    np.testing.assert_array_equal(counts.confusion, pooled.confusion)
    np.testing.assert_array_equal(counts.histogram, pooled.histogram)


def test_merge_with_empty_is_identity() -> None:
    counts = ClassificationCounts.from_predictions(GOLDEN_PROBS, GOLDEN_LABELS)
    merged = ClassificationCounts.empty(2).merge(counts)
    np.testing.assert_array_equal(merged.histogram, counts.histogram)
    np.testing.assert_array_equal(merged.confusion, counts.confusion)


# ---------------------------------------------------------------------- AUROC
BINARY_CASES = [
    # (seed, separation, logit scale, site sizes)
    (0, 0.5, 1.0, [3, 40, 957]),  # heavily overlapping
    (1, 1.0, 1.5, [200, 300, 500]),
    (2, 3.0, 1.0, [1, 2, 997]),  # well separated, tiny sites
    (3, 6.0, 1.0, [10, 490, 500]),  # almost perfectly separated
    (4, 2.0, 3.0, [5, 5, 90]),  # small and overconfident
    (5, 0.0, 1.0, [333, 333, 334]),  # uninformative, AUROC ~ 0.5
]


@pytest.mark.parametrize(("seed", "sep", "scale", "sizes"), BINARY_CASES)
def test_binary_auroc_from_merged_histograms_matches_sklearn(
    seed: int, sep: float, scale: float, sizes: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    probs, y = _binary_scores(rng, n, sep, scale)
    merged = ClassificationCounts.empty(2)
    for s in _split(n, sizes):
        merged = merged.merge(ClassificationCounts.from_predictions(probs[s], y[s]))
    expected = roc_auc_score(y, probs[:, 1])
    assert abs(merged.metrics()["auroc"] - expected) < 1e-3
    assert abs(merged.metrics(positive_class=0)["auroc"] - roc_auc_score(1 - y, probs[:, 0])) < 1e-3


@pytest.mark.parametrize(("seed", "sep"), [(10, 0.5), (11, 1.5), (12, 4.0)])
def test_multiclass_macro_ovr_auroc_matches_sklearn(seed: int, sep: float) -> None:
    rng = np.random.default_rng(seed)
    n = 1200
    probs, y = _multiclass_scores(rng, n, 3, sep)
    merged = ClassificationCounts.empty(3)
    for s in _split(n, [11, 389, 800]):
        merged = merged.merge(ClassificationCounts.from_predictions(probs[s], y[s]))
    m = merged.metrics()
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert abs(m["auroc"] - expected) < 1e-3
    for k in range(3):
        assert abs(m[f"auroc-{k}"] - roc_auc_score(y == k, probs[:, k])) < 1e-3


def test_auroc_from_histograms_ties_count_half_and_edge_cases() -> None:
    # all samples in one bin -> every pair tied -> 0.5
    assert auroc_from_histograms(np.array([0, 4, 0]), np.array([0, 2, 0])) == 0.5
    # perfect and inverted separation
    assert auroc_from_histograms(np.array([0, 0, 3]), np.array([5, 0, 0])) == 1.0
    assert auroc_from_histograms(np.array([3, 0, 0]), np.array([0, 0, 5])) == 0.0
    assert math.isnan(auroc_from_histograms(np.zeros(3), np.array([1, 2, 3])))
    assert math.isnan(auroc_from_histograms(np.array([1, 2, 3]), np.zeros(3)))
    with pytest.raises(ValueError, match="same number of bins"):
        auroc_from_histograms(np.ones(3), np.ones(4))


# ----------------------------------------------------------------- transport
def test_flat_round_trip_sparse_and_only_ints() -> None:
    rng = np.random.default_rng(5)
    probs, y = _multiclass_scores(rng, 200, 3, 1.0)
    counts = ClassificationCounts.from_predictions(probs, y)
    flat = counts.to_flat()
    assert set(flat) == {"num-classes", "bins", "confusion", "histogram-index", "histogram-count"}
    for value in flat.values():
        if isinstance(value, list):
            assert all(type(v) is int for v in value)
        else:
            assert type(value) is int
    assert len(flat["confusion"]) == 9
    # sparse: at most one non-zero bin per (sample, class)
    assert len(flat["histogram-index"]) == len(flat["histogram-count"]) <= 200 * 3
    back = ClassificationCounts.from_flat(json.loads(json.dumps(flat)))
    assert back.num_classes == 3 and back.bins == DEFAULT_BINS
    np.testing.assert_array_equal(back.confusion, counts.confusion)
    np.testing.assert_array_equal(back.histogram, counts.histogram)
    assert back.to_flat() == flat


def test_flat_round_trip_empty_and_dense_histogram() -> None:
    empty = ClassificationCounts.empty(2, bins=4)
    flat = empty.to_flat()
    assert flat["histogram-index"] == [] and flat["histogram-count"] == []
    assert ClassificationCounts.from_flat(flat).num_examples == 0
    counts = ClassificationCounts.from_predictions(GOLDEN_PROBS, GOLDEN_LABELS, bins=10)
    dense = {
        "num-classes": 2,
        "bins": 10,
        "confusion": counts.confusion.ravel().tolist(),
        "histogram": counts.histogram.ravel().tolist(),
    }
    np.testing.assert_array_equal(ClassificationCounts.from_flat(dense).histogram, counts.histogram)


def test_flat_form_is_accepted_by_flower_metric_record() -> None:
    app = pytest.importorskip("flwr.app")
    counts = ClassificationCounts.from_predictions(GOLDEN_PROBS, GOLDEN_LABELS)
    record = app.MetricRecord(counts.to_flat())
    back = ClassificationCounts.from_flat(dict(record))
    np.testing.assert_array_equal(back.histogram, counts.histogram)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("bins"), "lack the key 'bins'"),
        (lambda d: d.update(confusion=[1, 2, 3]), "num-classes\\*\\*2 = 4"),
        (lambda d: d.update({"histogram-index": [10**9], "histogram-count": [1]}), "must lie in"),
        (lambda d: d.update({"histogram-count": []}), "same length"),
        (lambda d: d.pop("histogram-count"), "needs both"),
        (lambda d: d.update({"num-classes": "2"}), "must be an integer"),
        (lambda d: d.update({"num-classes": 1}), "num_classes must be >= 2"),
        (lambda d: d.update({"histogram-count": [-1] * len(d["histogram-count"])}), "non-negative"),
    ],
)
def test_from_flat_rejects_bad_input(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    flat = ClassificationCounts.from_predictions(GOLDEN_PROBS, GOLDEN_LABELS).to_flat()
    mutate(flat)
    with pytest.raises(ValueError, match=match):
        ClassificationCounts.from_flat(flat)


# --------------------------------------------------------------- bad / edges
def test_merge_mismatch_raises() -> None:
    a = ClassificationCounts.empty(2, bins=10)
    with pytest.raises(ValueError, match="different numbers of classes: 2 vs 3"):
        a.merge(ClassificationCounts.empty(3, bins=10))
    with pytest.raises(ValueError, match="different numbers of bins: 10 vs 20"):
        a.merge(ClassificationCounts.empty(2, bins=20))


def test_absent_class_gives_nan_not_exception() -> None:
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 0])  # no positives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = ClassificationCounts.from_predictions(probs, labels).metrics()
        assert math.isnan(m["sensitivity"])
        assert math.isnan(m["auroc"])
        assert m["specificity"] == pytest.approx(2 / 3)
        assert m["precision"] == 0.0  # one positive prediction, wrong
        assert m["f1"] == 0.0
        # nothing at all
        empty = ClassificationCounts.empty(2).metrics()
        assert empty["num-examples"] == 0.0
        for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc"):
            assert math.isnan(empty[key]), key
        # multi-class with class 2 absent
        probs3 = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
        m3 = ClassificationCounts.from_predictions(probs3, np.array([0, 1, 1])).metrics()
        assert math.isnan(m3["recall-2"]) and math.isnan(m3["auroc-2"])
        assert math.isnan(m3["precision-2"]) and math.isnan(m3["f1-2"])
        # macro over the classes where the value is defined
        assert m3["sensitivity"] == pytest.approx((1.0 + 0.5) / 2)
        assert m3["auroc"] == pytest.approx(1.0)
    assert all(not math.isinf(v) for v in [*m.values(), *m3.values()])


def test_probabilities_zero_and_one_land_in_valid_bins() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0 + 1e-12, -1e-12]])
    counts = ClassificationCounts.from_predictions(probs, np.array([0, 1, 0]), bins=5)
    assert counts.histogram[0, 0, 4] == 2  # p = 1.0 (and 1 + eps) -> last bin
    assert counts.histogram[1, 0, 0] == 2  # p = 0.0 (and -eps) -> first bin
    assert counts.histogram[1, 1, 4] == 1 and counts.histogram[0, 1, 0] == 1
    assert counts.histogram.sum() == 3 * 2
    assert counts.metrics()["auroc"] == 1.0


@pytest.mark.parametrize("bad", [[0, 2], [-1, 0]])
def test_labels_out_of_range_raise(bad: list[int]) -> None:
    probs = np.array([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 2\)"):
        ClassificationCounts.from_predictions(probs, np.array(bad))
    counts = ClassificationCounts.empty(2)
    with pytest.raises(ValueError, match="out of range"):
        counts.update(probs, np.array(bad))
    assert counts.num_examples == 0  # nothing accumulated on error


def test_other_bad_batches_raise() -> None:
    probs = np.array([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="labels must be integers"):
        ClassificationCounts.from_predictions(probs, np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        ClassificationCounts.from_predictions(probs, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="3 columns"):
        ClassificationCounts.empty(2).update(np.full((2, 3), 1 / 3), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        ClassificationCounts.from_predictions(np.array([[np.nan, 1.0]]), np.array([0]))
    # integral floats and booleans are accepted as labels
    a = ClassificationCounts.from_predictions(probs, np.array([0.0, 1.0]))
    b = ClassificationCounts.from_predictions(probs, np.array([False, True]))
    np.testing.assert_array_equal(a.confusion, b.confusion)


# =================================================== AUPRC, thresholds, ECE
def _binary_counts(p1: list[float] | np.ndarray, labels: list[int] | np.ndarray, bins: int) -> ClassificationCounts:
    p1 = np.asarray(p1, dtype=np.float64)
    return ClassificationCounts.from_predictions(np.stack([1.0 - p1, p1], axis=1), np.asarray(labels), bins=bins)


def _bin_floor(scores: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Scores replaced by their bin's lower edge (ties exactly as the histogram)."""
    return np.clip(np.floor(scores * bins), 0, bins - 1) / bins


def test_golden_auprc_hand_computed() -> None:
    counts = _binary_counts(GOLDEN_P1, GOLDEN_LABELS, bins=10)
    # descending: 0.9 P, 0.8 P, 0.7 N, 0.6 N, 0.3 P, 0.1 N (all on distinct bins)
    # AP = (1/3) * (1/1 + 2/2 + 3/5) = 13/15
    m = counts.metrics()
    assert m["auprc"] == pytest.approx(13 / 15, abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(GOLDEN_LABELS, GOLDEN_P1), abs=1e-12)
    # class 0: p0 of true-0 {0.4, 0.3, 0.9}, of true-1 {0.1, 0.2, 0.7}
    # descending: 0.9 P, 0.7 N, 0.4 P, 0.3 P -> AP = (1/3) * (1 + 2/3 + 3/4) = 29/36
    m0 = counts.metrics(positive_class=0)
    assert m0["auprc"] == pytest.approx(29 / 36, abs=1e-12)
    assert m0["auprc"] == pytest.approx(average_precision_score(1 - GOLDEN_LABELS, 1 - GOLDEN_P1), abs=1e-12)


def test_auprc_ties_within_a_bin_and_edge_cases() -> None:
    # two positives and one negative share a bin: one threshold, precision 2/3
    # bins ascending: [N, -, (P, P, N), P] -> descending: P (1/1); then +2P +1N (3/4)
    ap = auprc_from_histograms(np.array([0, 0, 2, 1]), np.array([1, 0, 1, 0]))
    assert ap == pytest.approx((1 / 3) * 1.0 + (2 / 3) * (3 / 4))
    assert auprc_from_histograms(np.array([0, 0, 3]), np.array([5, 0, 0])) == 1.0
    assert auprc_from_histograms(np.array([0, 2, 0]), np.zeros(3)) == 1.0  # no negatives
    assert auprc_from_histograms(np.array([0, 4, 0]), np.array([0, 4, 0])) == 0.5  # all tied: prevalence
    assert math.isnan(auprc_from_histograms(np.zeros(3), np.array([1, 2, 3])))
    with pytest.raises(ValueError, match="same number of bins"):
        auprc_from_histograms(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        auprc_from_histograms(np.array([1, -1]), np.array([1, 1]))


@pytest.mark.parametrize(("seed", "sep", "scale", "sizes"), BINARY_CASES)
def test_binary_auprc_from_merged_histograms_matches_sklearn(
    seed: int, sep: float, scale: float, sizes: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    probs, y = _binary_scores(rng, n, sep, scale)
    merged = ClassificationCounts.empty(2)
    for s in _split(n, sizes):
        merged = merged.merge(ClassificationCounts.from_predictions(probs[s], y[s]))
    for k, labels in ((1, y), (0, 1 - y)):
        got = merged.metrics(positive_class=k)["auprc"]
        # exact against sklearn on the bin-rounded scores (same ties) ...
        assert got == pytest.approx(average_precision_score(labels, _bin_floor(probs[:, k])), abs=1e-12)
        # ... and close to sklearn on the raw scores; the small overconfident case
        # (many scores of both classes in the top bin) carries ~2e-3 binning error
        tol = 5e-3 if scale > 2 else 1e-3
        assert abs(got - average_precision_score(labels, probs[:, k])) < tol


@pytest.mark.parametrize(("seed", "sep"), [(10, 0.5), (11, 1.5), (12, 4.0)])
def test_multiclass_macro_auprc_matches_sklearn(seed: int, sep: float) -> None:
    rng = np.random.default_rng(seed)
    probs, y = _multiclass_scores(rng, 1200, 3, sep)
    m = ClassificationCounts.from_predictions(probs, y).metrics()
    onehot = np.eye(3)[y]
    assert abs(m["auprc"] - average_precision_score(onehot, probs, average="macro")) < 1e-3
    for k in range(3):
        assert abs(m[f"auprc-{k}"] - average_precision_score(y == k, probs[:, k])) < 1e-3


def test_metrics_at_threshold_golden() -> None:
    counts = _binary_counts(GOLDEN_P1, GOLDEN_LABELS, bins=10)
    # p1 >= 0.8: positives 0.9, 0.8 -> TP 2, FN 1; negatives none -> FP 0, TN 3
    at = counts.metrics_at_threshold(0.8)
    assert tuple(at) == THRESHOLD_METRIC_NAMES
    assert (at["tp"], at["fp"], at["tn"], at["fn"]) == (2.0, 0.0, 3.0, 1.0)
    assert at["accuracy"] == pytest.approx(5 / 6)
    assert at["sensitivity"] == pytest.approx(2 / 3)
    assert at["specificity"] == 1.0 and at["precision"] == 1.0
    assert at["f1"] == pytest.approx(4 / 5)
    # p1 >= 0.3: TP 3, FP 2 (0.6, 0.7), TN 1
    at = counts.metrics_at_threshold(0.3)
    assert (at["tp"], at["fp"], at["tn"], at["fn"]) == (3.0, 2.0, 1.0, 0.0)
    # not a bin edge: the bin [0.3, 0.4) containing 0.35 counts as >= 0.35
    assert counts.metrics_at_threshold(0.35) == at
    # extremes: <= 0 all positive, 1.0 only the last bin, > 1 none
    assert counts.metrics_at_threshold(0.0)["tp"] == 3 and counts.metrics_at_threshold(-1.0)["fp"] == 3
    assert counts.metrics_at_threshold(1.0)["tp"] == 1.0  # 0.9 is in the last of 10 bins
    none = counts.metrics_at_threshold(1.5)
    assert (none["tp"], none["fp"], none["tn"], none["fn"]) == (0.0, 0.0, 3.0, 3.0)
    assert math.isnan(none["precision"]) and none["f1"] == 0.0
    # positive class 0 at p0 >= 0.35 (bin of 0.3 counts): true-0 p0 {0.4, 0.3, 0.9} all >= ; true-1 {0.7}
    at0 = counts.metrics_at_threshold(0.35, positive_class=0)
    assert (at0["tp"], at0["fp"], at0["tn"], at0["fn"]) == (3.0, 1.0, 2.0, 0.0)
    # NaN threshold -> all NaN; bad input raises
    assert all(math.isnan(v) for v in counts.metrics_at_threshold(float("nan")).values())
    with pytest.raises(ValueError, match="positive_class"):
        counts.metrics_at_threshold(0.5, positive_class=2)
    with pytest.raises(ValueError, match="threshold must be a real number"):
        counts.metrics_at_threshold("0.5")  # type: ignore[arg-type]


@pytest.mark.parametrize("positive_class", [0, 1])
def test_metrics_at_bin_edges_equal_direct_computation(positive_class: int) -> None:
    rng = np.random.default_rng(21)
    probs, y = _binary_scores(rng, 2000, 1.5, 1.5)
    counts = ClassificationCounts.from_predictions(probs, y)
    score = probs[:, positive_class]
    truth = y == positive_class
    for b in [0, 1, 37, 250, 499, 500, 501, 873, 999]:
        t = b / DEFAULT_BINS
        called = score >= t
        tp = int(np.sum(called & truth))
        fp = int(np.sum(called & ~truth))
        fn = int(np.sum(~called & truth))
        tn = int(np.sum(~called & ~truth))
        at = counts.metrics_at_threshold(t, positive_class=positive_class)
        assert (at["tp"], at["fp"], at["tn"], at["fn"]) == (tp, fp, tn, fn), t
        assert at["sensitivity"] == tp / (tp + fn)
        assert at["specificity"] == tn / (tn + fp)
    # at 0.5 the threshold metrics equal the argmax metrics (no exact ties here)
    m = counts.metrics(positive_class=positive_class)
    at = counts.metrics_at_threshold(0.5, positive_class=positive_class)
    for name in THRESHOLD_METRIC_NAMES:
        assert at[name] == m[name], name


def test_metrics_with_threshold_keys() -> None:
    counts = _binary_counts(GOLDEN_P1, GOLDEN_LABELS, bins=10)
    plain = counts.metrics()
    assert "threshold" not in plain and "tp@thr" not in plain
    assert {"auprc", "ece"} <= plain.keys()
    m = counts.metrics(threshold=0.8)
    assert m["threshold"] == 0.8
    for name in THRESHOLD_METRIC_NAMES:
        assert m[f"{name}@thr"] == counts.metrics_at_threshold(0.8)[name]
        assert m[name] == plain[name]  # the argmax metrics are unchanged
    assert m["tp@thr"] == 2.0 and m["f1@thr"] == pytest.approx(4 / 5)
    assert all(type(v) is float for v in m.values())
    with pytest.raises(ValueError, match="binary"):
        ClassificationCounts.empty(3).metrics(threshold=0.5)


def test_select_threshold_youden_golden() -> None:
    counts = _binary_counts(GOLDEN_P1, GOLDEN_LABELS, bins=10)
    # positives in bins {9, 8, 3}, negatives in {7, 6, 1}; J at edge b/10:
    # b<=1: 0; b=2,3: 1 - 2/3 = 1/3; b=4..6: 2/3 - 2/3 = 0; b=7: 2/3 - 1/3; b=8: 2/3 - 0; b=9: 1/3
    assert counts.select_threshold("youden") == 0.8
    at = counts.metrics_at_threshold(0.8)
    assert at["sensitivity"] + at["specificity"] - 1 == pytest.approx(2 / 3)


def test_select_threshold_youden_ties_prefer_sensitivity_then_top_of_gap() -> None:
    # positives at 0.95, 0.55; negatives at 0.75, 0.15 (bins 9, 5 / 7, 1 of 10)
    # J = 1/2 for edges 0.2..0.5 (TP 2, FP 1) and for 0.8..0.9 (TP 1, FP 0).
    # Tie -> higher sensitivity (TP 2); within 0.2..0.5 (bins 2-4 empty) -> 0.5,
    # the lower edge of the lowest bin called positive.
    counts = _binary_counts([0.95, 0.55, 0.75, 0.15], [1, 1, 0, 0], bins=10)
    t = counts.select_threshold("youden")
    assert t == 0.5
    at = counts.metrics_at_threshold(t)
    assert (at["tp"], at["fp"]) == (2.0, 1.0)
    for edge in (0.2, 0.3, 0.4):
        assert counts.metrics_at_threshold(edge) == at


def test_select_threshold_target_sensitivity() -> None:
    counts = _binary_counts(GOLDEN_P1, GOLDEN_LABELS, bins=10)
    # positive scores 0.9, 0.8, 0.3: sensitivity 1 needs t <= 0.3; 2/3 needs t <= 0.8
    assert counts.select_threshold("target-sensitivity", target_sensitivity=0.9) == 0.3
    assert counts.select_threshold("target-sensitivity", target_sensitivity=1.0) == 0.3
    assert counts.select_threshold("target-sensitivity", target_sensitivity=2 / 3) == 0.8
    assert counts.select_threshold("target-sensitivity", target_sensitivity=0.6) == 0.8
    assert counts.select_threshold("target-sensitivity", target_sensitivity=0.3) == 0.9
    # class 0: positive p0 {0.9, 0.4, 0.3} -> 0.3 for sensitivity 1
    assert counts.select_threshold("target-sensitivity", 1.0, positive_class=0) == 0.3
    # realistic scores: the chosen edge reaches the target, the next edge up does not
    rng = np.random.default_rng(4)
    probs, y = _binary_scores(rng, 3000, 1.0, 1.5)
    big = ClassificationCounts.from_predictions(probs, y)
    for target in (0.8, 0.9, 0.95, 0.99):
        t = big.select_threshold("target-sensitivity", target_sensitivity=target)
        assert big.metrics_at_threshold(t)["sensitivity"] >= target
        assert big.metrics_at_threshold(t + 1 / DEFAULT_BINS)["sensitivity"] < target
        assert np.mean(probs[y == 1, 1] >= t) >= target  # also on the raw scores


def test_select_threshold_youden_matches_raw_roc_optimum() -> None:
    rng = np.random.default_rng(8)
    probs, y = _binary_scores(rng, 2000, 1.5, 1.0)
    counts = ClassificationCounts.from_predictions(probs, y)
    t = counts.select_threshold("youden")
    at = counts.metrics_at_threshold(t)
    j = at["sensitivity"] + at["specificity"] - 1
    # no bin edge does better, and the raw-score optimum is at most slightly better
    for b in range(DEFAULT_BINS):
        m = counts.metrics_at_threshold(b / DEFAULT_BINS)
        assert m["sensitivity"] + m["specificity"] - 1 <= j + 1e-12
    s = probs[:, 1]
    raw = max(np.mean(s[y == 1] >= v) - np.mean(s[y == 0] >= v) for v in np.unique(s))
    assert j <= raw + 1e-12 and raw - j < 5e-3


def test_select_threshold_undefined_and_bad_input() -> None:
    no_pos = _binary_counts([0.2, 0.7], [0, 0], bins=10)
    assert math.isnan(no_pos.select_threshold("youden"))
    assert math.isnan(no_pos.select_threshold("target-sensitivity"))
    no_neg = _binary_counts([0.2, 0.7], [1, 1], bins=10)
    assert math.isnan(no_neg.select_threshold("youden"))
    assert no_neg.select_threshold("target-sensitivity", target_sensitivity=1.0) == 0.2
    m = no_pos.metrics(threshold=no_pos.select_threshold())  # never raises for a missing class
    assert math.isnan(m["threshold"]) and all(math.isnan(m[f"{k}@thr"]) for k in THRESHOLD_METRIC_NAMES)
    with pytest.raises(ValueError, match="method"):
        no_neg.select_threshold("f1")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="target_sensitivity"):
            no_neg.select_threshold("target-sensitivity", target_sensitivity=bad)
    with pytest.raises(ValueError, match="positive_class"):
        no_neg.select_threshold(positive_class=3)


def test_ece_perfectly_calibrated_is_zero() -> None:
    # bins=10: scores 0.25 / 0.75 are fine-bin centres, so the value is exact.
    # 0.25 with 1 of 4 positive, 0.75 with 3 of 4 positive -> ECE 0
    counts = _binary_counts([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0], bins=10)
    assert counts.metrics()["ece"] == pytest.approx(0.0, abs=1e-12)
    assert counts.expected_calibration_error(positive_class=0) == pytest.approx(0.0, abs=1e-12)
    # default 1000 bins: 0.2 with 20 % positives, 0.8 with 80 %; centre error <= 1/(2*1000)
    p1 = [0.2] * 10 + [0.8] * 10
    y = [1, 1] + [0] * 8 + [1] * 8 + [0, 0]
    ece = _binary_counts(p1, y, bins=DEFAULT_BINS).metrics()["ece"]
    assert ece <= 1 / (2 * DEFAULT_BINS) + 1e-12


def test_ece_overconfident_hand_value() -> None:
    # 10 samples at 0.95 with 6 positive, 10 at 0.05 with 4 positive (bins=10 centres):
    # ECE = 1/2 * |0.6 - 0.95| + 1/2 * |0.4 - 0.05| = 0.35
    p1 = [0.95] * 10 + [0.05] * 10
    y = [1] * 6 + [0] * 4 + [1] * 4 + [0] * 6
    counts = _binary_counts(p1, y, bins=10)
    assert counts.metrics()["ece"] == pytest.approx(0.35, abs=1e-12)
    assert counts.expected_calibration_error(ece_bins=2) == pytest.approx(0.35, abs=1e-12)
    # one coarse bin: |mean(y) - mean(p)| = |0.5 - 0.5| = 0
    assert counts.expected_calibration_error(ece_bins=1) == pytest.approx(0.0, abs=1e-12)
    # default bins: 0.9 with 60 % and 0.1 with 40 % positives -> 0.3, within 1/(2*1000)
    p1 = [0.9] * 10 + [0.1] * 10
    ece = _binary_counts(p1, y, bins=DEFAULT_BINS).metrics()["ece"]
    assert abs(ece - 0.3) <= 1 / (2 * DEFAULT_BINS) + 1e-12
    assert math.isnan(ClassificationCounts.empty(2).metrics()["ece"])
    with pytest.raises(ValueError, match="ece_bins"):
        counts.expected_calibration_error(ece_bins=0)


def _ece_reference(p: np.ndarray, y: np.ndarray, ece_bins: int, bins: int | None) -> float:
    """ECE on raw probabilities; coarse edges j/ece_bins, or moved to the nearest fine edge."""
    if bins is None:
        coarse = np.minimum(np.floor(p * ece_bins), ece_bins - 1).astype(int)
    else:
        fine = np.clip(np.floor(p * bins), 0, bins - 1).astype(int)
        coarse = np.minimum(((2 * fine + 1) * ece_bins) // (2 * bins), ece_bins - 1)
    total = sum(abs(y[coarse == j].sum() - p[coarse == j].sum()) for j in range(ece_bins))
    return float(total / len(p))


@pytest.mark.parametrize(("seed", "sep", "scale", "sizes"), BINARY_CASES)
def test_binary_ece_matches_raw_scores_within_bound(
    seed: int, sep: float, scale: float, sizes: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    probs, y = _binary_scores(rng, n, sep, scale)
    counts = ClassificationCounts.from_predictions(probs, y)
    for k, labels in ((1, y), (0, 1 - y)):
        got = counts.metrics(positive_class=k)["ece"]
        # same coarse bins, exact probabilities: |error| <= 1 / (2 * bins)
        assert abs(got - _ece_reference(probs[:, k], labels, 15, DEFAULT_BINS)) <= 1 / (2 * DEFAULT_BINS)
        # textbook equal-width bins: only samples within 1/2000 of an edge move
        assert abs(got - _ece_reference(probs[:, k], labels, 15, None)) < 3e-3
    # with ece_bins dividing bins the coarse bins are exactly equal-width
    ref = _ece_reference(probs[:, 1], y, 10, None)
    assert abs(counts.expected_calibration_error(ece_bins=10) - ref) <= 1 / (2 * DEFAULT_BINS)


def test_multiclass_ece_is_classwise() -> None:
    rng = np.random.default_rng(13)
    probs, y = _multiclass_scores(rng, 900, 4, 1.0)
    counts = ClassificationCounts.from_predictions(probs, y)
    m = counts.metrics()
    per = []
    for k in range(4):
        ref = _ece_reference(probs[:, k], (y == k).astype(float), 15, DEFAULT_BINS)
        assert abs(m[f"ece-{k}"] - ref) <= 1 / (2 * DEFAULT_BINS)
        assert m[f"ece-{k}"] == counts.expected_calibration_error(positive_class=k)
        per.append(m[f"ece-{k}"])
    assert m["ece"] == pytest.approx(np.mean(per))
    # one-vs-rest threshold metrics for C > 2
    at = counts.metrics_at_threshold(0.3, positive_class=2)
    assert at["tp"] == np.sum((probs[:, 2] >= 0.3) & (y == 2))


def test_ece_from_histograms_direct() -> None:
    # 4 fine bins, centres 1/8, 3/8, 5/8, 7/8; 2 coarse bins = {0, 1}, {2, 3}
    pos = np.array([0, 1, 0, 3])
    neg = np.array([2, 1, 0, 1])
    # coarse 0: n 4, events 1, conf sum 2/8 + 3/8 * 2 = 1 -> |1 - 1| = 0
    # coarse 1: n 4, events 3, conf sum 7/8 * 4 = 3.5 -> 0.5
    assert ece_from_histograms(pos, neg, ece_bins=2) == pytest.approx(0.5 / 8)
    with pytest.raises(ValueError, match="same number of bins"):
        ece_from_histograms(np.ones(3), np.ones(4))


def test_confusion_matrix_nested_lists() -> None:
    counts = _binary_counts(GOLDEN_P1, GOLDEN_LABELS, bins=10)
    cm = counts.confusion_matrix()
    assert cm == [[1, 2], [1, 2]]
    assert all(type(v) is int for row in cm for v in row)
    assert json.loads(json.dumps(cm)) == cm
    assert ClassificationCounts.empty(3).confusion_matrix() == [[0, 0, 0]] * 3


@pytest.mark.parametrize(("c", "seed"), [(2, 0), (2, 1), (3, 2)])
def test_new_metrics_merged_equal_pooled(c: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 1000
    probs, y = _multiclass_scores(rng, n, c, separation=1.0)
    sites = [
        ClassificationCounts.from_flat(
            json.loads(json.dumps(ClassificationCounts.from_predictions(probs[s], y[s]).to_flat()))
        )
        for s in _split(n, [5, 295, 700])
    ]
    merged = sites[2].merge(sites[0]).merge(sites[1])
    pooled = ClassificationCounts.from_predictions(probs, y)
    for k in range(c):
        for method in ("youden", "target-sensitivity"):
            t = merged.select_threshold(method, positive_class=k)
            assert t == pooled.select_threshold(method, positive_class=k)
            assert merged.metrics_at_threshold(t, k) == pooled.metrics_at_threshold(t, k)
        assert merged.expected_calibration_error(k) == pooled.expected_calibration_error(k)
    assert merged.confusion_matrix() == pooled.confusion_matrix()
    kw = {"threshold": 0.37} if c == 2 else {}
    a, b = merged.metrics(**kw), pooled.metrics(**kw)
    assert {"auprc", "ece"} <= a.keys()
    _assert_metrics_equal(a, b)


def test_old_flat_dict_still_loads_and_gives_new_metrics() -> None:
    # A flat dict as written before AUPRC/ECE/thresholds existed (format unchanged):
    # GOLDEN with bins=10; histogram[k, l, b] at flat index (k * 2 + l) * 10 + b.
    old = {
        "num-classes": 2,
        "bins": 10,
        "confusion": [1, 2, 1, 2],
        "histogram-index": [3, 4, 9, 10, 11, 17, 21, 26, 27, 33, 38, 39],
        "histogram-count": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    }
    counts = ClassificationCounts.from_flat(old)
    fresh = _binary_counts(GOLDEN_P1, GOLDEN_LABELS, bins=10)
    np.testing.assert_array_equal(counts.histogram, fresh.histogram)
    assert counts.to_flat() == old
    m = counts.metrics(threshold=0.8)
    assert m["auprc"] == pytest.approx(13 / 15)
    assert m["tp@thr"] == 2.0
    assert counts.select_threshold() == 0.8
