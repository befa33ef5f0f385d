"""Tests for shared.data.splits.train_val_split."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data.splits import train_val_split


def _check(train: np.ndarray, val: np.ndarray, n: int) -> None:
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))


def test_stratified_and_deterministic() -> None:
    y = np.array([0] * 300 + [1] * 100)
    train, val = train_val_split(y, 0.25, seed=1)
    _check(train, val, 400)
    assert len(val) == 100
    assert np.bincount(y[val]).tolist() == [75, 25]
    again = train_val_split(y, 0.25, seed=1)
    assert np.array_equal(val, again[1])
    assert not np.array_equal(val, train_val_split(y, 0.25, seed=2)[1])


def test_tiny_sets_keep_both_sides() -> None:
    train, val = train_val_split(np.array([0, 1]), 0.2)
    _check(train, val, 2)
    assert len(train) == 1 and len(val) == 1
    y = np.array([0, 0, 1, 1, 1, 2])
    train, val = train_val_split(y, 0.1)
    _check(train, val, 6)
    assert set(y[val].tolist()) == {0, 1}  # every class with >= 2 samples; the singleton stays in train
    assert set(y[train].tolist()) == {0, 1, 2}
    train, val = train_val_split(np.array([3]), 0.5)
    assert train.tolist() == [0] and val.size == 0


def test_groups_disjoint_and_roughly_stratified() -> None:
    rng = np.random.default_rng(0)
    pids, labels = [], []
    for p in range(300):
        k = int(rng.integers(1, 6))
        pids += [f"P{p}"] * k
        labels += [int(p % 4 == 0)] * k
    g, y = np.asarray(pids), np.asarray(labels)
    train, val = train_val_split(y, 0.2, seed=0, groups=g)
    _check(train, val, len(y))
    assert not set(g[train].tolist()) & set(g[val].tolist())
    assert abs(len(val) / len(y) - 0.2) < 0.03
    assert abs(y[val].mean() - y.mean()) < 0.05
    assert np.array_equal(val, train_val_split(y, 0.2, seed=0, groups=g)[1])


def test_groups_two_patients_and_one_patient() -> None:
    train, val = train_val_split(np.array([0, 0, 0]), 0.2, groups=np.array(["a", "a", "b"]))
    _check(train, val, 3)
    assert len(train) and len(val)
    with pytest.raises(ValueError, match="one patient"):
        train_val_split(np.array([0, 1]), 0.2, groups=np.array(["a", "a"]))


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, -0.1, 1.5, float("nan"), True])
def test_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match=f"got {bad!r}"):
        train_val_split(np.array([0, 1, 0, 1]), bad)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        train_val_split(np.array([], dtype=int))
    with pytest.raises(ValueError, match="groups has"):
        train_val_split(np.array([0, 1]), groups=np.array(["a"]))
