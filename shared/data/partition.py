"""Split one dataset across simulated sites (IID or Dirichlet label skew).

Pure NumPy, so that the ClientApp can partition in simulation mode without
importing ``simulation/`` or Flower. The Dirichlet scheme follows
flwr-datasets' ``DirichletPartitioner`` (Hsu et al. 2019, with its
self-balancing step) and adds patient grouping: when ``groups`` is given, whole
patients are assigned to sites, never single images.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import NamedTuple

import numpy as np

from shared.errors import UserError
from shared.registry import did_you_mean

logger = logging.getLogger(__name__)

__all__ = ["PARTITION_KINDS", "GroupUnits", "PartitionError", "encode_groups", "partition_indices"]

PARTITION_KINDS: tuple[str, ...] = ("iid", "dirichlet")


class PartitionError(UserError):
    """The requested partitioning is invalid or cannot be achieved."""


class GroupUnits(NamedTuple):
    """Samples gathered into units (patients, or single samples).

    Attributes
    ----------
    sample_unit : np.ndarray
        ``int64`` unit index of each sample, shape ``(n_samples,)``.
    sizes : np.ndarray
        ``int64`` number of samples per unit, shape ``(n_units,)``.
    majority : np.ndarray
        ``int64`` majority class code per unit (ties -> the lowest code),
        indexing ``classes``.
    classes : np.ndarray
        The sorted distinct labels.
    """

    sample_unit: np.ndarray
    sizes: np.ndarray
    majority: np.ndarray
    classes: np.ndarray


def _as_1d(values: np.ndarray, what: str, error: type[ValueError]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:  # e.g. MedMNIST's (N, 1) labels
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise error(f"{what} must be a 1-D array (one entry per sample), got shape {arr.shape}")
    return arr


def encode_groups(
    labels: np.ndarray, groups: np.ndarray | None = None, *, error: type[ValueError] = ValueError
) -> GroupUnits:
    """Gather samples into units: one per distinct group, or one per sample.

    Parameters
    ----------
    labels : np.ndarray
        Label of each sample, shape ``(n,)`` (``(n, 1)`` is accepted).
    groups : np.ndarray, optional
        Group (patient) id of each sample; ``None`` makes every sample a unit.
    error : type[ValueError]
        Exception class raised for invalid input.

    Returns
    -------
    GroupUnits
        Unit of each sample, unit sizes and each unit's majority label code.

    Raises
    ------
    ValueError
        (or ``error``) if shapes disagree or a group id is missing (``None``).
    """
    y = _as_1d(labels, "labels", error)
    classes, codes = np.unique(y, return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    n = y.shape[0]
    if groups is None:
        ones = np.ones(n, dtype=np.int64)
        return GroupUnits(np.arange(n, dtype=np.int64), ones, codes, classes)
    g = _as_1d(groups, "groups", error)
    if g.shape[0] != n:
        raise error(f"groups has {g.shape[0]} entries but labels has {n}: give one group id per sample")
    if g.dtype == object and any(v is None for v in g):
        raise error("groups contains missing ids (None): give every sample a group id (a unique one if unknown)")
    _, unit = np.unique(g, return_inverse=True)
    unit = unit.astype(np.int64).ravel()
    n_units = int(unit.max()) + 1 if n else 0
    counts = np.zeros((n_units, len(classes)), dtype=np.int64)
    np.add.at(counts, (unit, codes), 1)
    return GroupUnits(unit, counts.sum(axis=1), counts.argmax(axis=1).astype(np.int64), classes)


def _check_args(
    n: int, num_partitions: int, kind: str, alpha: float, min_partition_size: int, max_tries: int
) -> None:
    if kind not in PARTITION_KINDS:
        raise PartitionError(
            f"unknown partition kind {kind!r}; valid kinds: {', '.join(PARTITION_KINDS)}."
            f"{did_you_mean(str(kind), PARTITION_KINDS)}"
        )
    for name, value, lowest in (
        ("num_partitions", num_partitions, 1),
        ("min_partition_size", min_partition_size, 0),
        ("max_tries", max_tries, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lowest:
            raise PartitionError(f"{name} must be an integer >= {lowest}, got {value!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number) or not (
        math.isfinite(alpha) and alpha > 0
    ):
        raise PartitionError(f"alpha must be a finite number > 0 (smaller = more label skew), got {alpha!r}")
    if n == 0:
        raise PartitionError("labels is empty: there is nothing to partition")
    if num_partitions * min_partition_size > n:
        raise PartitionError(
            f"{num_partitions} partitions x min_partition_size {min_partition_size} = "
            f"{num_partitions * min_partition_size} samples needed, but only {n} are available: "
            "use fewer partitions or a smaller min_partition_size."
        )


def _iid_units(sizes: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Assign shuffled units to partitions, balancing sample counts.

    Largest units first (random order among equal sizes), each to the partition
    with the fewest samples so far (ties -> lowest partition index).
    """
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    heap = [(0, p) for p in range(k)]
    owner = np.empty(len(sizes), dtype=np.int64)
    for u in order:
        total, p = heapq.heappop(heap)
        owner[u] = p
        heapq.heappush(heap, (total + int(sizes[u]), p))
    return owner


def _dirichlet_units(
    units: GroupUnits, k: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """One Dirichlet draw per class, splitting that class's units by sample count."""
    owner = np.empty(len(units.sizes), dtype=np.int64)
    totals = np.zeros(k, dtype=np.float64)
    average = units.sizes.sum() / k
    for c in range(len(units.classes)):
        members = np.flatnonzero(units.majority == c)
        if members.size == 0:
            continue
        members = members[rng.permutation(members.size)]
        props = rng.dirichlet(np.full(k, float(alpha)))
        # Self-balancing as in flwr-datasets: no more of this class for a
        # partition that already holds more than the average.
        props[totals > average] = 0.0
        if props.sum() <= 0.0:  # every open share underflowed (tiny alpha)
            props = (totals <= average).astype(np.float64)
        props /= props.sum()
        sizes = units.sizes[members]
        bounds = np.cumsum(props) * sizes.sum()
        midpoints = np.cumsum(sizes) - sizes / 2.0
        part = np.minimum(np.searchsorted(bounds, midpoints, side="right"), k - 1)
        owner[members] = part
        totals += np.bincount(part, weights=sizes, minlength=k)
    return owner


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    kind: str = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
    groups: np.ndarray | None = None,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Split sample indices across ``num_partitions`` simulated sites.

    Parameters
    ----------
    labels : np.ndarray
        Label of each sample, shape ``(n,)`` (``(n, 1)`` accepted).
    num_partitions : int
        Number of sites, >= 1.
    kind : {"iid", "dirichlet"}
        ``"iid"``: seeded shuffle, dealt out as evenly as possible.
        ``"dirichlet"``: label skew; for each class, proportions
        ~ Dir(alpha) over partitions (as flwr-datasets'
        ``DirichletPartitioner``, including its self-balancing).
    alpha : float
        Dirichlet concentration, > 0; smaller means more skew. Ignored for iid.
    seed : int
        Seed of the random generator; same seed, same split.
    min_partition_size : int
        Every partition must get at least this many samples. Dirichlet draws
        are repeated (same seeded sequence) until it holds.
    groups : np.ndarray, optional
        Patient id of each sample. If given, whole groups are assigned (no
        patient in two partitions); for dirichlet a group counts under its
        majority label.
    max_tries : int
        Maximum number of Dirichlet draws.

    Returns
    -------
    list[np.ndarray]
        ``num_partitions`` sorted ``int64`` index arrays; every sample is in
        exactly one.

    Raises
    ------
    PartitionError
        Invalid arguments, too few samples (or groups), or no Dirichlet draw
        within ``max_tries`` giving every partition ``min_partition_size``.
    """
    n = int(_as_1d(labels, "labels", PartitionError).shape[0])
    _check_args(n, num_partitions, kind, alpha, min_partition_size, max_tries)
    k = int(num_partitions)
    units = encode_groups(labels, groups, error=PartitionError)
    n_units = len(units.sizes)
    if n_units < k and min_partition_size > 0:
        raise PartitionError(
            f"only {n_units} groups (patients) for {k} partitions: each partition needs at least one "
            "whole group. Use fewer partitions."
        )
    rng = np.random.default_rng(seed)

    if kind == "iid":
        if groups is None:
            owner = np.empty(n, dtype=np.int64)
            for p, chunk in enumerate(np.array_split(rng.permutation(n), k)):
                owner[chunk] = p
        else:
            owner = _iid_units(units.sizes, k, rng)
        sizes = np.bincount(owner, weights=units.sizes, minlength=k)
        if sizes.min() < min_partition_size:
            raise PartitionError(
                f"the smallest partition got {int(sizes.min())} samples < min_partition_size "
                f"{min_partition_size} (groups are kept whole): use fewer partitions or a smaller "
                "min_partition_size."
            )
    else:
        best = -1
        for attempt in range(1, max_tries + 1):
            owner = _dirichlet_units(units, k, alpha, rng)
            sizes = np.bincount(owner, weights=units.sizes, minlength=k)
            smallest = int(sizes.min())
            if smallest >= min_partition_size:
                if attempt > 1:
                    logger.info("dirichlet partition met min size after %d draws", attempt)
                break
            best = max(best, smallest)
        else:
            raise PartitionError(
                f"no Dirichlet draw (alpha={alpha}, {k} partitions, {max_tries} tries) gave every "
                f"partition >= {min_partition_size} samples (best smallest partition: {best}). "
                "Use a larger alpha (less skew), fewer partitions, a smaller min_partition_size, "
                "or more max_tries."
            )

    sample_owner = owner[units.sample_unit]
    parts = [np.flatnonzero(sample_owner == p).astype(np.int64) for p in range(k)]
    logger.info(
        "partitioned %d samples into %d %s partitions (sizes %d..%d)",
        n, k, kind, min(len(p) for p in parts), max(len(p) for p in parts),
    )
    return parts
