"""Per-image patient attributes (sex, age, view) from a site's manifest.

Manifests may carry demographic and acquisition columns next to
``path,label,patient_id`` (``sex``, ``age``, ``view``, under a few common
spellings: ``gender``, ``patient_age``, ``ViewPosition``...). The site loader
keeps them for its validation images so that evaluation can report metrics
per patient subgroup (:mod:`shared.metrics.subgroups`). They stay at the
site: only counts per subgroup, with small cells suppressed, ever leave it,
and nothing here is logged.

Values are kept as the manifest's strings (stripped), except that a ``sex``
or ``view`` value equal to one of the site's patient ids is dropped (kept as
``""``, i.e. unknown): an id in the wrong column must never become a
subgroup label. Binning and
normalisation (age bands, ``female`` -> ``F``...) happen when the subgroups
are built, with the run's settings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["ATTRIBUTE_ALIASES", "manifest_attributes"]

ATTRIBUTE_ALIASES: Mapping[str, str] = {
    # normalised manifest column name -> attribute
    "sex": "sex",
    "gender": "sex",
    "patient_sex": "sex",
    "patientsex": "sex",
    "age": "age",
    "age_years": "age",
    "patient_age": "age",
    "patientage": "age",
    "view": "view",
    "view_position": "view",
    "viewposition": "view",
    "projection": "view",
}
"""Manifest columns read as attributes (names compared case-insensitively, blanks and ``-`` as ``_``)."""

_NOT_ID_CHECKED = frozenset({"age"})  # binned into bands, never sent as a value


def _normalise_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def manifest_attributes(extras: Sequence[Mapping[str, str]],
                        patient_ids: Iterable[str | None] = ()) -> dict[str, np.ndarray] | None:
    """Attributes of some images from their manifest columns.

    Parameters
    ----------
    extras : sequence of mapping
        Each image's other manifest columns (``ImageRecord.extra``), in image order.
    patient_ids : iterable of str or None
        The site's patient ids (any order); a ``sex``/``view`` value equal to
        one of them is replaced by ``""`` (unknown).

    Returns
    -------
    dict or None
        Attribute (``sex``, ``age``, ``view``) -> object array of stripped
        strings, one per image (``""`` where the cell is empty), for the
        attributes the manifest has; None when it has none (or no images).
    """
    if not extras:
        return None
    columns: dict[str, str] = {}  # attribute -> manifest column (the first spelling found)
    for record in extras:
        for key in record:
            attr = ATTRIBUTE_ALIASES.get(_normalise_column(key))
            if attr is not None and attr not in columns:
                columns[attr] = key
    if not columns:
        return None
    ids = {str(p) for p in patient_ids if p}
    out: dict[str, np.ndarray] = {}
    for attr, key in columns.items():
        values = [str(record.get(key, "") or "").strip() for record in extras]
        if attr not in _NOT_ID_CHECKED and ids:
            values = ["" if v in ids else v for v in values]
        out[attr] = np.array(values, dtype=object)
    return out
