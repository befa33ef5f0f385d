"""Size skew for simulated sites: how many samples each site should get.

A hospital federation mixes a few large sites with many small ones. This
module draws each simulated site's *share* of the data, seeded, from

* ``"dirichlet"``: shares ~ Dir(``size_alpha``) over the sites (small alpha:
  very unequal; large alpha: nearly equal), or
* ``"power-law"``: the site of rank ``r`` (1 = largest) gets a share
  proportional to ``r ** -size_exponent`` (0 = equal; 1 = Zipf); which site
  has which rank is a seeded permutation, so site 0 is not always the largest.

Every site first gets ``min_partition_size`` samples, and the shares split the
rest, so a size-skewed partition never starves a site by construction
(patient grouping can still miss a target by up to one patient's images;
:func:`shared.data.partition.partition_indices` checks the result).

:func:`fill_to_targets` deals indivisible units (patients) to sites so that
each site's sample count comes close to its target.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["SIZE_SKEWS", "fill_to_targets", "resolve_size_skew", "site_targets"]

SIZE_SKEWS: tuple[str, ...] = ("auto", "none", "dirichlet", "power-law")
"""Values of the run config's ``size-skew`` (``auto``: ``dirichlet`` for ``partition='quantity'``, else ``none``)."""

_SIZE_STREAM = 0x517E  # a seed stream of its own: size draws never shift the label draws of the same seed


def resolve_size_skew(kind: str, size_skew: str) -> str:
    """The size-skew distribution in force: ``"none"``, ``"dirichlet"`` or ``"power-law"``.

    Parameters
    ----------
    kind : str
        The partition kind (``partition`` run-config key).
    size_skew : str
        One of :data:`SIZE_SKEWS`.

    Returns
    -------
    str
        ``size_skew`` itself, or for ``"auto"``: ``"dirichlet"`` when ``kind`` is
        ``"quantity"``, else ``"none"``.
    """
    if size_skew == "auto":
        return "dirichlet" if kind == "quantity" else "none"
    return size_skew


def _shares(k: int, skew: str, size_alpha: float, size_exponent: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([int(seed), _SIZE_STREAM])
    if skew == "dirichlet":
        w = np.nan_to_num(rng.dirichlet(np.full(k, float(size_alpha))), nan=0.0)
    elif skew == "power-law":
        ranks = rng.permutation(k) + 1
        w = ranks.astype(np.float64) ** -float(size_exponent)
    else:
        raise ValueError(f"size skew must be 'dirichlet' or 'power-law', got {skew!r}")
    total = w.sum()
    return w / total if total > 0 and math.isfinite(total) else np.full(k, 1.0 / k)


def site_targets(
    n: int, k: int, skew: str, *, size_alpha: float = 1.0, size_exponent: float = 1.0,
    min_partition_size: int = 0, seed: int = 0,
) -> np.ndarray:
    """Target sample count of each of ``k`` sites, summing to ``n``.

    Parameters
    ----------
    n : int
        Samples to share out; ``n >= k * min_partition_size``.
    k : int
        Number of sites, >= 1.
    skew : {"dirichlet", "power-law"}
        The distribution of the shares (see the module docstring).
    size_alpha : float
        Dirichlet concentration of the shares, > 0 (smaller = more unequal).
    size_exponent : float
        Power-law exponent, >= 0 (larger = more unequal; 0 = equal sizes).
    min_partition_size : int
        Every target is at least this; the shares split the remaining samples.
    seed : int
        Seed; same seed, same targets.

    Returns
    -------
    np.ndarray
        ``int64`` targets, shape ``(k,)``, each ``>= min_partition_size``, summing
        to ``n`` (largest-remainder rounding).

    Raises
    ------
    ValueError
        If ``n < k * min_partition_size`` or ``skew`` is unknown.
    """
    free = n - k * min_partition_size
    if free < 0:
        raise ValueError(f"{k} sites x {min_partition_size} samples exceed the {n} samples available")
    raw = min_partition_size + free * _shares(k, skew, size_alpha, size_exponent, seed)
    base = np.floor(raw).astype(np.int64)
    short = int(n - base.sum())
    if short > 0:
        order = np.argsort(-(raw - base), kind="stable")  # largest remainders first, ties -> lowest index
        base[order[:short]] += 1
    return base


def fill_to_targets(unit_sizes: np.ndarray, targets: Sequence[float] | np.ndarray) -> np.ndarray:
    """Deal units (in the given order) to bins so that bin totals approach ``targets``.

    The first ``len(targets)`` units go one to each bin, the largest target
    first (so no bin stays empty when there are enough units); every further
    unit goes to the bin furthest below its target (ties -> lowest index).
    Callers shuffle the units (seeded) and sort them largest first, so that the
    totals end within about one unit of their targets.

    Parameters
    ----------
    unit_sizes : np.ndarray
        Samples per unit, in dealing order.
    targets : array-like
        Target total of each bin (any non-negative numbers).

    Returns
    -------
    np.ndarray
        ``int64`` bin of each unit, shape ``(len(unit_sizes),)``.
    """
    t = np.asarray(targets, dtype=np.float64)
    owner = np.empty(len(unit_sizes), dtype=np.int64)
    first = np.argsort(-t, kind="stable")
    seeded = min(len(first), len(unit_sizes))
    load = np.zeros(len(t), dtype=np.float64)
    for i in range(seeded):
        owner[i] = first[i]
        load[first[i]] += float(unit_sizes[i])
    heap: list[tuple[float, int]] = [(float(load[b] - t[b]), b) for b in range(len(t))]
    heapq.heapify(heap)
    for i in range(seeded, len(unit_sizes)):
        gap, b = heapq.heappop(heap)
        owner[i] = b
        heapq.heappush(heap, (gap + float(unit_sizes[i]), b))
    return owner
