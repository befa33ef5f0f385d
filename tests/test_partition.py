"""Invariant tests for shared.data.partition.partition_indices."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data.partition import PartitionError, encode_groups, partition_indices


def _labels(n: int = 600, classes: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _patients(n: int, seed: int = 0) -> np.ndarray:
    """1-6 images per patient, ids as strings like real manifests."""
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    p = 0
    while len(ids) < n:
        ids += [f"P{p:04d}"] * int(rng.integers(1, 7))
        p += 1
    return np.asarray(ids[:n])


def _check_cover(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
    allidx = np.concatenate(parts)
    assert sum(len(p) for p in parts) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def _pos_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.array([labels[p].mean() for p in parts])


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
@pytest.mark.parametrize("use_groups", [False, True])
def test_every_sample_once_and_seeded(kind: str, use_groups: bool) -> None:
    y = _labels()
    g = _patients(len(y)) if use_groups else None
    parts = partition_indices(y, 5, kind, alpha=0.5, seed=3, groups=g)
    _check_cover(parts, len(y), 5)
    assert all(len(p) >= 10 for p in parts)
    again = partition_indices(y, 5, kind, alpha=0.5, seed=3, groups=g)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(y, 5, kind, alpha=0.5, seed=4, groups=g)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_as_equal_as_possible() -> None:
    parts = partition_indices(_labels(103), 4, "iid", min_partition_size=1)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    single = partition_indices(_labels(7), 1, "iid", min_partition_size=1)
    np.testing.assert_array_equal(single[0], np.arange(7))


def test_iid_groups_balanced() -> None:
    y = _labels(600)
    parts = partition_indices(y, 4, "iid", groups=_patients(600))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 6  # at most one patient's worth apart


def test_dirichlet_skews_labels_vs_iid() -> None:
    y = _labels(2000)
    iid = _pos_fraction(y, partition_indices(y, 5, "iid", seed=1))
    skew = _pos_fraction(y, partition_indices(y, 5, "dirichlet", alpha=0.1, seed=1))
    assert np.ptp(iid) < 0.15
    assert np.ptp(skew) > 0.4


def test_dirichlet_with_string_labels_and_three_classes() -> None:
    y = np.array(["a", "b", "c"])[_labels(900, classes=3)]
    parts = partition_indices(y, 3, "dirichlet", alpha=1.0, seed=0)
    _check_cover(parts, 900, 3)


def test_groups_never_split() -> None:
    y = _labels(800)
    g = _patients(800, seed=5)
    for kind in ("iid", "dirichlet"):
        parts = partition_indices(y, 6, kind, alpha=0.3, groups=g, seed=2)
        _check_cover(parts, 800, 6)
        owners = [set(g[p].tolist()) for p in parts]
        for i in range(len(owners)):
            for j in range(i + 1, len(owners)):
                assert not owners[i] & owners[j]


def test_min_size_honoured_or_explained() -> None:
    y = _labels(300)
    parts = partition_indices(y, 5, "dirichlet", alpha=0.3, min_partition_size=30, seed=0)
    assert min(len(p) for p in parts) >= 30  # needs ~20 redraws with this seed
    with pytest.raises(PartitionError, match="larger alpha"):
        partition_indices(y, 10, "dirichlet", alpha=0.01, min_partition_size=29, max_tries=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "dirichlett"}, "Did you mean 'dirichlet'"),
        ({"num_partitions": 0}, "num_partitions"),
        ({"alpha": 0.0, "kind": "dirichlet"}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"num_partitions": 11}, "110 samples needed, but only 100"),
        ({"max_tries": 0}, "max_tries"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    args = {"num_partitions": 2, "kind": "iid"} | kwargs
    with pytest.raises(PartitionError, match=match):
        partition_indices(_labels(100), **args)


def test_shape_and_group_errors() -> None:
    with pytest.raises(PartitionError, match="1-D"):
        partition_indices(np.zeros((4, 3)), 2, min_partition_size=1)
    with pytest.raises(PartitionError, match="groups has 3"):
        partition_indices(_labels(10), 2, min_partition_size=1, groups=np.array(["a", "b", "c"]))
    with pytest.raises(PartitionError, match="groups"):
        partition_indices(_labels(30), 4, min_partition_size=1, groups=np.array(["a", "b", "c"] * 10))
    # (N, 1) labels as MedMNIST stores them are accepted
    parts = partition_indices(_labels(40).reshape(-1, 1), 2, min_partition_size=5)
    _check_cover(parts, 40, 2)


def test_encode_groups_majority() -> None:
    units = encode_groups(np.array([1, 1, 0, 0, 0]), np.array(["x", "x", "x", "y", "y"]))
    assert units.sample_unit.tolist() == [0, 0, 0, 1, 1]
    assert units.sizes.tolist() == [3, 2]
    assert units.majority.tolist() == [1, 0]
