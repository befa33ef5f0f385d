"""Tests for shared.metrics.classification: counts that add up across sites."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from shared.metrics.classification import (
    DEFAULT_BINS,
    ClassificationCounts,
    auroc_from_histograms,
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
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


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
