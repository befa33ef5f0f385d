"""A site's own train/validation split: seeded, stratified, patient-disjoint."""

from __future__ import annotations

import logging
import math

import numpy as np

from shared.data.partition import GroupUnits, encode_groups

logger = logging.getLogger(__name__)

__all__ = ["train_val_split"]


def _check_fraction(val_fraction: float) -> float:
    ok = (
        not isinstance(val_fraction, bool)
        and isinstance(val_fraction, int | float | np.number)
        and math.isfinite(val_fraction)
        and 0.0 < val_fraction < 1.0
    )
    if not ok:
        raise ValueError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    return float(val_fraction)


def _units_to_val(sizes: np.ndarray, target: float) -> int:
    """How many of the (shuffled) units to put in validation.

    The prefix whose sample count is closest to ``target``, keeping at least
    one unit on each side when there are two or more (earliest on ties).
    """
    n_units = len(sizes)
    if n_units < 2:
        return 0
    cum = np.cumsum(sizes)[: n_units - 1]  # prefixes of 1 .. n_units-1 units
    return int(np.argmin(np.abs(cum - target))) + 1


def _split_units(units: GroupUnits, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask over units: True = validation."""
    in_val = np.zeros(len(units.sizes), dtype=bool)
    for c in range(len(units.classes)):
        members = np.flatnonzero(units.majority == c)
        if members.size == 0:
            continue
        members = members[rng.permutation(members.size)]
        sizes = units.sizes[members]
        take = _units_to_val(sizes, fraction * sizes.sum())
        in_val[members[:take]] = True
    # Strata with a single unit all stayed in train: make sure both sides exist.
    if len(in_val) >= 2 and not in_val.any():
        in_val[rng.choice(np.flatnonzero(units.sizes == units.sizes.min()))] = True
    elif len(in_val) >= 2 and in_val.all():  # cannot happen with the rule above; kept as a guard
        in_val[rng.choice(len(in_val))] = False
    return in_val


def train_val_split(
    labels: np.ndarray,
    val_fraction: float = 0.2,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a site's samples into training and validation indices.

    Parameters
    ----------
    labels : np.ndarray
        Label of each sample, shape ``(n,)`` (``(n, 1)`` accepted).
    val_fraction : float
        Share of samples for validation, strictly between 0 and 1.
    seed : int
        Seed; the same inputs and seed give the same split.
    groups : np.ndarray, optional
        Patient id of each sample. If given, the split is by patient (no
        patient on both sides), approximately stratified: patients are
        shuffled within the stratum of their majority label and each stratum
        gives the number of patients whose image count is closest to
        ``val_fraction`` of its images.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(train, val)``: sorted ``int64`` index arrays, disjoint, covering
        all samples. With ``n >= 2`` samples (``>= 2`` patients when grouped)
        both are non-empty, and every class (stratum) with at least two
        samples (patients) has at least one in validation and one in
        training.

    Raises
    ------
    ValueError
        ``val_fraction`` not in (0, 1); ``labels`` empty or not 1-D;
        ``groups`` of the wrong length or with missing ids; or ``groups``
        holding a single patient for ``n >= 2`` samples (no patient-disjoint
        split exists).
    """
    fraction = _check_fraction(val_fraction)
    units = encode_groups(labels, groups)
    n = len(units.sample_unit)
    if n == 0:
        raise ValueError("labels is empty: there is nothing to split")
    if groups is not None and n >= 2 and len(units.sizes) < 2:
        raise ValueError(
            "all samples belong to one patient, so no patient-disjoint train/validation split exists: "
            "add data from more patients, or split without groups (accepting patient overlap)."
        )
    rng = np.random.default_rng(seed)
    in_val = _split_units(units, fraction, rng)[units.sample_unit]
    train = np.flatnonzero(~in_val).astype(np.int64)
    val = np.flatnonzero(in_val).astype(np.int64)
    if n == 1:
        logger.warning("a single sample: it goes to training, validation is empty")
    logger.info(
        "train/val split: %d train, %d val samples (%d units, %s)",
        len(train), len(val), len(units.sizes), "by patient" if groups is not None else "stratified by label",
    )
    return train, val
