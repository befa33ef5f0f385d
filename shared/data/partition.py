"""Split one dataset across simulated sites: every kind of non-IID difference.

Kinds (``partition`` run-config key), all seeded and patient-grouped when
``groups`` (patient ids) is given -- whole patients go to one site, never
single images:

* ``iid``: a seeded shuffle dealt out as evenly as possible.
* ``dirichlet``: label skew; per class, shares ~ Dir(alpha) over the sites
  (Hsu et al. 2019, with flwr-datasets' self-balancing step).
* ``pathological``: each site holds exactly ``classes_per_site`` classes
  (Li et al. 2021, "Federated Learning on Non-IID Data Silos"); classes are
  dealt round-robin from a seeded permutation so that every class has a site.
* ``quantity``: labels iid, site sizes skewed (:mod:`shared.data.site_sizes`).
* ``natural``: one site per distinct value of a manifest column (e.g. the
  hospital each image came from), sites ordered by sorted value.

Size skew (``size_skew``) combines with ``iid`` (= ``quantity``),
``dirichlet`` and ``pathological``: each site's share of every class is
weighted by its size share, so a site is both small *and* label-skewed.
(For ``pathological`` a class is split among the sites holding it by their
size shares, so the size targets' ``min_partition_size`` floor is not
guaranteed there; the final check names any site that falls short.)
Acquisition shift is applied later, per site (``site-shift``), and combines
with every kind.

Invariants (tested): every sample is in exactly one site, the sizes add up,
the same seed gives the same split and another seed another one (``natural``
has no randomness), and every site gets ``min_partition_size`` samples or a
:class:`PartitionError` says which site fell short and what to change.

Why NumPy and not flwr-datasets' partitioners: its ``Dirichlet``,
``Pathological``, ``Size`` and ``NaturalId`` partitioners work on a Hugging
Face ``datasets.Dataset`` row by row. They cannot keep a patient's images
together weighted by image count, ``PathologicalPartitioner`` drops the
samples of a class no site drew (breaking "every sample in one site"),
``SizePartitioner`` takes sizes but cannot reach them with indivisible
patients, and only the Dirichlet one enforces a minimum size. Installing it
would also put ``datasets`` (pyarrow, pandas) into every hospital's site
install and, for flwr-datasets 0.6.1, downgrade the ``huggingface_hub`` that
timm uses (2.x -> 1.x). The schemes here follow those partitioners'
definitions (the Dirichlet one step by step) and add grouping and size
weighting. Pure NumPy, so the ClientApp partitions without Flower.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import NamedTuple

import numpy as np

from shared.data.site_sizes import SIZE_SKEWS, fill_to_targets, resolve_size_skew, site_targets
from shared.errors import UserError
from shared.registry import did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "PARTITION_KINDS", "SIZE_SKEWS", "GroupUnits", "PartitionError", "encode_groups", "partition_indices",
    "resolve_size_skew",
]

PARTITION_KINDS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "quantity", "natural")
SIZE_SKEWED_KINDS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "quantity")
"""Kinds that combine with a size skew (``natural`` sites have the sizes the column gives them)."""


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


def _is_int(value: object, lowest: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value >= lowest


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.number) and math.isfinite(value)


def _check_args(
    n: int, num_partitions: int, kind: str, alpha: float, min_partition_size: int, max_tries: int,
    classes_per_site: int = 1, size_skew: str = "auto", size_alpha: float = 1.0, size_exponent: float = 1.0,
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
        ("classes_per_site", classes_per_site, 1),
    ):
        if not _is_int(value, lowest):
            raise PartitionError(f"{name} must be an integer >= {lowest}, got {value!r}")
    if not (_is_number(alpha) and alpha > 0):
        raise PartitionError(f"alpha must be a finite number > 0 (smaller = more label skew), got {alpha!r}")
    if size_skew not in SIZE_SKEWS:
        raise PartitionError(
            f"unknown size skew {size_skew!r}; valid: {', '.join(SIZE_SKEWS)}."
            f"{did_you_mean(str(size_skew), SIZE_SKEWS)}"
        )
    skew = resolve_size_skew(kind, size_skew)
    if kind == "quantity" and skew == "none":
        raise PartitionError(
            "partition 'quantity' skews site sizes, but size skew is 'none' (that is partition 'iid'): "
            "set size skew to 'dirichlet' or 'power-law' (or 'auto' = 'dirichlet')."
        )
    if kind == "natural" and skew != "none":
        raise PartitionError(
            f"partition 'natural' takes its sites and their sizes from a data column; size skew {skew!r} "
            "cannot be applied on top: set size skew to 'auto' or 'none', or use another partition kind."
        )
    if not (_is_number(size_alpha) and size_alpha > 0):
        raise PartitionError("size_alpha must be a finite number > 0 (smaller = more unequal sizes), "
                             f"got {size_alpha!r}")
    if not (_is_number(size_exponent) and size_exponent >= 0):
        raise PartitionError(f"size_exponent must be a finite number >= 0 (0 = equal sizes), got {size_exponent!r}")
    if n == 0:
        raise PartitionError("labels is empty: there is nothing to partition")
    if num_partitions * min_partition_size > n:
        raise PartitionError(
            f"{num_partitions} partitions x min_partition_size {min_partition_size} = "
            f"{num_partitions * min_partition_size} samples needed, but only {n} are available: "
            "use fewer partitions or a smaller min_partition_size."
        )


def _check_min_size(sizes: np.ndarray, min_partition_size: int, kind: str, hint: str) -> None:
    """Raise naming the first site below ``min_partition_size``."""
    short = np.flatnonzero(sizes < min_partition_size)
    if short.size:
        p = int(short[0])
        raise PartitionError(
            f"{kind} partition: site {p} (partition-id {p}) would get {int(sizes[p])} samples < "
            f"min-partition-size {min_partition_size} ({short.size} of {len(sizes)} sites are below it; "
            f"patients are kept whole). {hint}"
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


def _largest_first(members: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``members`` in a seeded random order, then stably sorted by decreasing unit size."""
    members = members[rng.permutation(members.size)]
    return members[np.argsort(-sizes[members], kind="stable")]


def _sized_iid_units(units: GroupUnits, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels iid, site sizes ``targets``: exact without groups, within about a patient with them."""
    n_units = len(units.sizes)
    owner = np.empty(n_units, dtype=np.int64)
    if np.all(units.sizes == 1):
        order = rng.permutation(n_units)
        for p, chunk in enumerate(np.split(order, np.cumsum(targets)[:-1])):
            owner[chunk] = p
        return owner
    order = _largest_first(np.arange(n_units), units.sizes, rng)
    owner[order] = fill_to_targets(units.sizes[order], targets)
    return owner


def _dirichlet_units(
    units: GroupUnits, k: int, alpha: float, rng: np.random.Generator, weights: np.ndarray | None = None
) -> np.ndarray:
    """One Dirichlet draw per class, splitting that class's units by sample count.

    With ``weights`` (size shares summing to 1) each draw is multiplied by the
    shares and the self-balancing cap is each site's own target, not the average.
    """
    owner = np.empty(len(units.sizes), dtype=np.int64)
    totals = np.zeros(k, dtype=np.float64)
    average = units.sizes.sum() / k
    cap = average if weights is None else weights * units.sizes.sum()
    for c in range(len(units.classes)):
        members = np.flatnonzero(units.majority == c)
        if members.size == 0:
            continue
        members = members[rng.permutation(members.size)]
        props = rng.dirichlet(np.full(k, float(alpha)))
        if weights is not None:
            props = props * weights
        # Self-balancing as in flwr-datasets: no more of this class for a
        # partition that already holds more than the average (its target).
        props[totals > cap] = 0.0
        if props.sum() <= 0.0:  # every open share underflowed (tiny alpha)
            props = (totals <= cap).astype(np.float64)
        props /= props.sum()
        sizes = units.sizes[members]
        bounds = np.cumsum(props) * sizes.sum()
        midpoints = np.cumsum(sizes) - sizes / 2.0
        part = np.minimum(np.searchsorted(bounds, midpoints, side="right"), k - 1)
        owner[members] = part
        totals += np.bincount(part, weights=sizes, minlength=k)
    return owner


def _pathological_units(
    units: GroupUnits, k: int, per_site: int, rng: np.random.Generator, weights: np.ndarray | None
) -> np.ndarray:
    """Each site holds ``per_site`` classes; each class is shared among its holders.

    Classes (those some unit has as majority) are permuted (seeded) and dealt
    round-robin: site ``p`` holds positions ``p * per_site ... + per_site - 1``
    modulo the number of classes, so every class has a holder once
    ``k * per_site >= classes`` and the classes are used equally often (+-1).
    A class's units go largest first to its holders, one each first, then to the
    holder furthest below its share (equal shares, or the size-skew ``weights``).
    """
    present = np.unique(units.majority)
    n_classes = len(present)
    names = [str(units.classes[c]) for c in present]
    if per_site > n_classes:
        raise PartitionError(
            f"pathological partition: classes-per-site {per_site} exceeds the {n_classes} classes present in "
            f"the data ({', '.join(names)}): set classes-per-site to at most {n_classes}."
        )
    if k * per_site < n_classes:
        raise PartitionError(
            f"pathological partition: {k} sites x classes-per-site {per_site} = {k * per_site} class slots, but "
            f"the data has {n_classes} classes and each must be held by some site (or its images would be "
            f"dropped): raise classes-per-site to {math.ceil(n_classes / k)}, "
            f"or simulate {math.ceil(n_classes / per_site)} "
            "or more sites."
        )
    order = present[rng.permutation(n_classes)]
    holds = np.zeros((k, len(units.classes)), dtype=bool)
    for p in range(k):
        for i in range(per_site):
            holds[p, order[(p * per_site + i) % n_classes]] = True
    share = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    owner = np.empty(len(units.sizes), dtype=np.int64)
    for c in present:
        holders = np.flatnonzero(holds[:, c])
        members = _largest_first(np.flatnonzero(units.majority == c), units.sizes, rng)
        if members.size < holders.size:
            raise PartitionError(
                f"pathological partition: class '{units.classes[c]}' is held by {holders.size} sites but has only "
                f"{members.size} patients/images: use fewer sites or a smaller classes-per-site."
            )
        total = units.sizes[members].sum()
        targets = total * share[holders] / share[holders].sum()
        owner[members] = holders[fill_to_targets(units.sizes[members], targets)]
    return owner


def _natural_parts(
    site_values: np.ndarray, n: int, k: int, groups: np.ndarray | None, min_partition_size: int, column: str
) -> list[np.ndarray]:
    """One partition per distinct value (sorted) of ``site_values``."""
    values = _as_1d(site_values, "site_values", PartitionError)
    if values.shape[0] != n:
        raise PartitionError(f"site_values has {values.shape[0]} entries but labels has {n}: give one per sample")
    text = np.array(["" if v is None else str(v).strip() for v in values.tolist()], dtype=object)
    empty = int((text == "").sum())
    if empty:
        raise PartitionError(
            f"natural partition: {empty} of {n} rows have no value in column '{column}': fill it in on every "
            "row (the site each image came from), or use another partition kind."
        )
    names, owner = np.unique(text.astype(str), return_inverse=True)
    owner = owner.astype(np.int64).ravel()
    if len(names) != k:
        raise PartitionError(
            f"natural partition: column '{column}' has {len(names)} distinct values but the simulation has {k} "
            f"sites: simulate {len(names)} sites (medfed simulate --sites {len(names)}, or "
            f"num-supernodes={len(names)}), or use another partition kind."
        )
    if groups is not None:
        g = _as_1d(groups, "groups", PartitionError)
        if g.shape[0] != n:
            raise PartitionError(f"groups has {g.shape[0]} entries but labels has {n}: give one group id per sample")
        _, unit = np.unique(g.astype(str), return_inverse=True)
        pairs = np.unique(np.stack([unit.ravel(), owner]), axis=1)
        spread = int(len(pairs[0]) - len(np.unique(pairs[0])))
        if spread:
            raise PartitionError(
                f"natural partition: {spread} patient(s) have images under more than one value of column "
                f"'{column}', so sites would share patients: give each patient's images one '{column}' value."
            )
    sizes = np.bincount(owner, minlength=k)
    _check_min_size(sizes, min_partition_size, "natural",
                    f"Lower min-partition-size to {int(sizes.min())} or merge small values of column '{column}'.")
    logger.info(
        "natural partition from a data column: %d sites (sorted values) with %s samples", k, sizes.tolist()
    )
    return [np.flatnonzero(owner == p).astype(np.int64) for p in range(k)]


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
    classes_per_site: int = 1,
    size_skew: str = "auto",
    size_alpha: float = 1.0,
    size_exponent: float = 1.0,
    site_values: np.ndarray | None = None,
    column: str = "site",
) -> list[np.ndarray]:
    """Split sample indices across ``num_partitions`` simulated sites.

    Parameters
    ----------
    labels : np.ndarray
        Label of each sample, shape ``(n,)`` (``(n, 1)`` accepted).
    num_partitions : int
        Number of sites, >= 1.
    kind : {"iid", "dirichlet", "pathological", "quantity", "natural"}
        ``"iid"``: seeded shuffle, dealt out as evenly as possible.
        ``"dirichlet"``: label skew; for each class, proportions
        ~ Dir(alpha) over partitions (as flwr-datasets'
        ``DirichletPartitioner``, including its self-balancing).
        ``"pathological"``: every site holds exactly ``classes_per_site``
        classes. ``"quantity"``: labels iid, sizes skewed (``size_skew``).
        ``"natural"``: one site per distinct value of ``site_values``.
    alpha : float
        Dirichlet concentration, > 0; smaller means more skew. Used by dirichlet.
    seed : int
        Seed of the random generator; same seed, same split.
    min_partition_size : int
        Every partition must get at least this many samples. Dirichlet draws
        are repeated (same seeded sequence) until it holds; size-skew targets
        start from it; other kinds raise naming the site that fell short.
    groups : np.ndarray, optional
        Patient id of each sample. If given, whole groups are assigned (no
        patient in two partitions); for label skew a group counts under its
        majority label.
    max_tries : int
        Maximum number of Dirichlet draws.
    classes_per_site : int
        Classes each site holds (pathological), between 1 and the number of classes.
    size_skew : {"auto", "none", "dirichlet", "power-law"}
        Site-size distribution (see :mod:`shared.data.site_sizes`); ``"auto"``
        is ``"dirichlet"`` for quantity and ``"none"`` otherwise. Combines with
        iid, dirichlet and pathological.
    size_alpha : float
        Dirichlet concentration of the size shares, > 0 (smaller = more unequal).
    size_exponent : float
        Power-law exponent of the size shares, >= 0 (0 = equal).
    site_values : np.ndarray, optional
        For natural: each sample's value of the site column (required).
    column : str
        The name of that column, for messages only.

    Returns
    -------
    list[np.ndarray]
        ``num_partitions`` sorted ``int64`` index arrays; every sample is in
        exactly one.

    Raises
    ------
    PartitionError
        Invalid arguments or combinations, too few samples (or groups), a
        site below ``min_partition_size`` (naming it), no Dirichlet draw
        within ``max_tries`` meeting it, classes that cannot be dealt
        (pathological), or a column whose distinct values do not match
        ``num_partitions`` (natural).
    """
    n = int(_as_1d(labels, "labels", PartitionError).shape[0])
    _check_args(n, num_partitions, kind, alpha, min_partition_size, max_tries,
                classes_per_site, size_skew, size_alpha, size_exponent)
    k = int(num_partitions)
    if kind == "natural":
        if site_values is None:
            raise PartitionError(
                f"partition 'natural' needs each sample's value of column '{column}' (site_values); got none"
            )
        return _natural_parts(site_values, n, k, groups, min_partition_size, column)
    units = encode_groups(labels, groups, error=PartitionError)
    n_units = len(units.sizes)
    if n_units < k and min_partition_size > 0:
        raise PartitionError(
            f"only {n_units} groups (patients) for {k} partitions: each partition needs at least one "
            "whole group. Use fewer partitions."
        )
    rng = np.random.default_rng(seed)
    skew = resolve_size_skew(kind, size_skew)
    targets = None if skew == "none" else site_targets(
        n, k, skew, size_alpha=size_alpha, size_exponent=size_exponent,
        min_partition_size=min_partition_size, seed=seed,
    )
    weights = None if targets is None else targets / n
    fewer = "use fewer partitions or a smaller min-partition-size"
    if skew != "none":
        fewer += f", or less size skew ({'a larger size-alpha' if skew == 'dirichlet' else 'a smaller size-exponent'})"

    if kind in ("iid", "quantity"):
        if targets is not None:
            owner = _sized_iid_units(units, targets, rng)
        elif groups is None:
            owner = np.empty(n, dtype=np.int64)
            for p, chunk in enumerate(np.array_split(rng.permutation(n), k)):
                owner[chunk] = p
        else:
            owner = _iid_units(units.sizes, k, rng)
        sizes = np.bincount(owner, weights=units.sizes, minlength=k)
        _check_min_size(sizes, min_partition_size, kind, f"Fix: {fewer}.")
    elif kind == "pathological":
        owner = _pathological_units(units, k, int(classes_per_site), rng, weights)
        sizes = np.bincount(owner, weights=units.sizes, minlength=k)
        _check_min_size(sizes, min_partition_size, kind, f"Fix: {fewer}, or a larger classes-per-site.")
    else:
        best = -1
        for attempt in range(1, max_tries + 1):
            owner = _dirichlet_units(units, k, alpha, rng, weights)
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
                + (" With size skew, also try less of it." if skew != "none" else "")
            )

    sample_owner = owner[units.sample_unit]
    parts = [np.flatnonzero(sample_owner == p).astype(np.int64) for p in range(k)]
    logger.info(
        "partitioned %d samples into %d %s partitions%s (sizes %d..%d)",
        n, k, kind, f" with {skew} size skew" if skew != "none" else "",
        min(len(p) for p in parts), max(len(p) for p in parts),
    )
    return parts
