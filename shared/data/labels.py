"""Class labels of a dataset mapped onto a task's classes (case-insensitive, with aliases).

Task-agnostic: callers pass the task's class names, its label column and its
aliases. Messages carry label values and counts only, never a path or a
patient id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from shared.data.sources import DataSourceError, ImageListing

__all__ = ["class_mapping", "task_labels"]


def _class_lookup(task_classes: tuple[str, ...], aliases: Mapping[str, str] | None) -> dict[str, int]:
    """Lower-case spelling -> class index: the class names themselves, then their aliases."""
    lookup = {c.lower(): i for i, c in enumerate(task_classes)}
    for alias, name in (aliases or {}).items():
        lookup.setdefault(alias.lower(), task_classes.index(name))
    return lookup


def class_mapping(found: tuple[str, ...], task_classes: tuple[str, ...],
                  aliases: Mapping[str, str] | None = None) -> np.ndarray:
    """Map a dataset's class indices onto the task's class order.

    Class names match case-insensitively (``NORMAL`` -> ``normal``), and so do
    the task's ``aliases`` (other spellings, e.g. ``bacteria`` -> ``bacterial``).

    Raises
    ------
    DataSourceError
        When a dataset class is not one of the task's classes.
    """
    lookup = _class_lookup(task_classes, aliases)
    unknown = [c for c in found if c.lower() not in lookup]
    if unknown:
        raise DataSourceError(
            f"dataset classes {list(found)} do not match the task's classes {list(task_classes)}: "
            f"{unknown} unknown. Rename the class folders / manifest labels to the task's class names."
        )
    return np.array([lookup[c.lower()] for c in found], dtype=np.int64)


def task_labels(listing: ImageListing, task_classes: tuple[str, ...], label_column: str | None = None,
                aliases: Mapping[str, str] | None = None) -> np.ndarray:
    """Each record's class index in the task's class order.

    Without ``label_column`` this is :func:`class_mapping` of the listing's
    labels (manifest ``label`` / class folder names). With it (the 3-class
    pneumonia task reads ``subtype``), a record's label is the value of that
    manifest column (header matched case-insensitively) where present and
    non-empty, else its ``label``: so ``NORMAL`` rows need no subtype, and a
    dataset labelled with the task's classes directly needs no column at all.
    Values match the class names and ``aliases`` case-insensitively.

    Parameters
    ----------
    listing : ImageListing
        From :func:`shared.data.sources.discover`.
    task_classes : tuple of str
        The task's class names, in label order.
    label_column : str, optional
        The manifest column carrying the task's label.
    aliases : Mapping[str, str], optional
        Lower-case spelling -> class name.

    Returns
    -------
    np.ndarray
        ``int64`` class indices, one per record.

    Raises
    ------
    DataSourceError
        A label is not one of the task's classes (for ``label_column``: the
        message says the column is missing, or how many rows lack a usable
        value and which values were found), or a row's ``label`` names one
        class and its ``label_column`` another. Messages carry label values
        and counts only, never a path or a patient id.
    """
    if label_column is None:
        return class_mapping(listing.class_names, task_classes, aliases)[listing.labels()]
    lookup = _class_lookup(task_classes, aliases)
    keys = {k.strip().lower(): k for r in listing.records[:1] for k in r.extra}
    column = keys.get(label_column.lower())
    base = [listing.class_names[r.label] for r in listing.records]
    values = [((r.extra.get(column) or "").strip() if column else "") or b
              for r, b in zip(listing.records, base, strict=True)]
    unknown = Counter(v for v in values if v.lower() not in lookup)
    spellings = sorted(set(task_classes) | set(aliases or {}))
    if unknown and column is None:
        raise DataSourceError(
            f"this task needs the classes {list(task_classes)}, but the dataset's labels are "
            f"{sorted(set(base))} and it has no '{label_column}' column. Add a '{label_column}' column to "
            f"the manifest (path,label,patient_id,{label_column}) giving each image's class "
            f"({', '.join(spellings)}; case does not matter; it may be empty on rows whose label already "
            f"is one of the classes, e.g. normal), or label the images with the classes directly "
            f"(manifest 'label' values or class folders named {', '.join(task_classes)})."
        )
    if unknown:
        found = ", ".join(f"'{v}': {n}" for v, n in sorted(unknown.items()))
        raise DataSourceError(
            f"{sum(unknown.values())} row(s) have no usable '{label_column}' value (values read, from "
            f"'{label_column}' or else 'label': {found}); "
            f"expected one of {spellings} (case does not matter) in the '{label_column}' column, or a "
            f"'label' that already is one of the task's classes. Fill in '{label_column}' on those rows."
        )
    conflicts = Counter(
        (b, v) for b, v in zip(base, values, strict=True)
        if b.lower() in lookup and lookup[b.lower()] != lookup[v.lower()]
    )
    if conflicts:
        found = ", ".join(f"label '{b}' with {label_column} '{v}': {n}" for (b, v), n in sorted(conflicts.items()))
        raise DataSourceError(
            f"{sum(conflicts.values())} row(s) have a 'label' and a '{label_column}' naming different classes "
            f"({found}). Correct one of the two columns on those rows."
        )
    return np.array([lookup[v.lower()] for v in values], dtype=np.int64)
