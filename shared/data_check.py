"""The pre-flight data check a hospital runs before joining a federation.

:func:`check_dataset` looks at a site's data the way training will see it
(:func:`~shared.data.sources.discover`, the task's classes, the site's own
train/validation split; for segmentation tasks the image/mask pairs of
:func:`~shared.data.seg_sources.discover_segmentation`, in every layout
training reads) and decodes every image once, so that problems show up
before a round does: unreadable or corrupt files, missing classes, class
imbalance, empty masks, duplicated images (and duplicates filed under
different classes), missing patient ids, odd sizes and bit depths.

Each file is judged by :func:`shared.data.usable.read_usable`, the function
the training loader uses too, under the same input policy (pixel cap
``--max-pixels`` / node config ``max-image-pixels``; containment in the data
folder, ``--allow-outside-root`` / ``allow-outside-data-root``): the check's
usable and quarantine counts are the site's.

The result, :class:`DataCheckReport`, holds counts, class names, the task
name and the values of a few known categorical manifest columns (view, sex,
age in decades, ...); never an absolute path, a patient id or anything read
from an image header. So that the operator can find and remove them, it names
each duplicate image by its manifest row or its path relative to the data
folder (:attr:`DataCheckReport.duplicate_files`); those names may contain file
names, so the shareable form (``to_dict(shareable=True)``,
``format_report(..., shareable=True)``, ``medfed data check --shareable``)
leaves them out and is counts only, fit to send to the federation's
coordinator.

No Flower import here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import os
import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.data.labels import task_labels
from shared.data.sources import (
    MANIFEST_NAME,
    DataSourceError,
    ImageListing,
    ImageReadError,
    data_root,
    discover,
    read_raw,
)
from shared.data.splits import train_val_split
from shared.data.usable import InputPolicy, bounded, quarantine_reason, read_usable
from shared.kinds import SEGMENTATION
from shared.limits import DEFAULT_MAX_PIXELS
from shared.tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = [
    "IMBALANCE_RATIO",
    "MIN_IMAGES_PER_CLASS",
    "REPORTED_COLUMNS",
    "DataCheckReport",
    "check_dataset",
    "format_report",
]

IMBALANCE_RATIO = 0.2
"""Warn when the smallest class has fewer than this share of the largest."""

MIN_IMAGES_PER_CLASS = 20
"""Warn when a class has fewer usable images than this."""

REPORTED_COLUMNS: Mapping[str, str] = {
    # normalised manifest column name -> name in the report
    "view": "view",
    "view_position": "view",
    "projection": "view",
    "sex": "sex",
    "gender": "sex",
    "age": "age",
    "age_years": "age",
    "age_band": "age-band",
    "age_group": "age-band",
    "site": "site",
    "subtype": "subtype",
}
"""Manifest columns summarised as value counts. Every other column (free text,
dates, accession numbers...) is never reported."""

_AGE_COLUMNS = frozenset({"age"})
_MAX_VALUES_PER_COLUMN = 20  # more distinct values are folded into "other"
_MAX_VALUE_LENGTH = 40  # longer values are not categorical: "other"
_MAX_SIZES = 10
_PROGRESS_STEPS = 50  # ~every 2 %
_QUOTED_PATH_RE = re.compile(r"'[^']*[\\/][^']*'")

VERDICT_READY = "ready"
VERDICT_WARNINGS = "ready with warnings"
VERDICT_NOT_READY = "not ready"
_EXIT_CODES = {VERDICT_READY: 0, VERDICT_WARNINGS: 1, VERDICT_NOT_READY: 2}

ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


@dataclass
class DataCheckReport:
    """What a site's data looks like to the federation: counts only.

    Attributes
    ----------
    task : str
        The task checked against.
    source : str
        ``"manifest"`` or ``"class folders"`` (never the path).
    num_files : int
        Files / manifest rows considered (usable + skipped by discovery).
    num_usable : int
        Images that decoded; these are what training will use.
    per_class : dict[str, int]
        Task class name -> usable images (every task class present, 0 if none).
    num_patients : int or None
        Distinct patient ids among usable images; ``None`` without ids.
    images_per_patient : dict[str, float] or None
        ``min`` / ``median`` / ``max`` images per patient.
    per_column : dict[str, dict[str, int]]
        For known categorical manifest columns (:data:`REPORTED_COLUMNS`):
        value -> usable images. Age is binned into decades (``"90+"`` on top).
    sizes : dict[str, int]
        ``"HxW"`` -> images (top 10, the rest as ``"other"``).
    bit_depths : dict[str, int]
        ``"8-bit gray"``, ``"16-bit gray"``, ``"8-bit RGB"``... -> images.
    duplicates : int
        Images whose decoded pixels equal those of an earlier image.
    duplicate_across_classes : int
        Of those, images labelled differently from the earlier copy.
    quarantined : dict[str, int]
        Reason -> files not used (decoding failures and discovery skips).
    patient_overlap_train_val : int
        Patients in both train and validation of the site's own split.
    duplicate_files : list[dict]
        Each duplicate image, named so the site can find it: ``file`` (its
        manifest row, ``"manifest row 17"``, or its path relative to the data
        folder, ``"NORMAL/x.jpeg"``), ``same-as`` (the earlier copy, named
        alike) and ``other-class`` (labelled differently). Never an absolute
        path; left out of :meth:`to_dict` / :func:`format_report` with
        ``shareable=True``, since relative paths may hold file names.
    kind : str
        ``"classification"`` (labelled images) or ``"segmentation"``
        (image/mask pairs; ``per_class`` is empty then).
    masks_with_foreground, empty_masks : int or None
        Segmentation: usable pairs whose mask has / has no foreground pixel.
    warnings, errors : list[str]
        Human-readable findings (no paths, no ids).
    verdict : str
        ``"ready"``, ``"ready with warnings"`` or ``"not ready"``.
    """

    task: str
    source: str
    num_files: int = 0
    num_usable: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    num_patients: int | None = None
    images_per_patient: dict[str, float] | None = None
    per_column: dict[str, dict[str, int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    bit_depths: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    duplicate_across_classes: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    patient_overlap_train_val: int = 0
    duplicate_files: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "classification"
    masks_with_foreground: int | None = None
    empty_masks: int | None = None
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    verdict: str = VERDICT_NOT_READY

    def exit_code(self) -> int:
        """Return 0 for "ready", 1 for "ready with warnings", 2 for "not ready"."""
        return _EXIT_CODES[self.verdict]

    def to_dict(self, *, shareable: bool = False) -> dict[str, Any]:
        """Return the report as JSON-serialisable plain data (with ``exit_code``).

        ``shareable`` leaves out :attr:`duplicate_files` (relative paths may
        hold file names): what remains is counts only, for the coordinator.
        """
        d = asdict(self)
        d["exit_code"] = self.exit_code()
        if shareable:
            d.pop("duplicate_files")
        return d


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _load_optional_readers() -> None:
    """Register readers that live in optional modules (the DICOM reader).

    A reader registers itself on import; a module that is present but cannot
    be imported (e.g. pydicom not installed) leaves its suffixes counted as
    ``unsupported-suffix:...`` by discovery.
    """
    name = "shared.data.dicom"
    try:
        found = importlib.util.find_spec(name) is not None
    except ImportError:
        found = False
    if not found:
        return
    try:
        importlib.import_module(name)
    except ImportError as exc:
        logger.warning("DICOM reader not available (%s): .dcm files will be counted as unsupported", type(exc).__name__)


def _spellings(class_names: Sequence[str]) -> tuple[str, ...]:
    """The task's class names as written, lower, upper and title case (no duplicates)."""
    out: dict[str, None] = {}
    for c in class_names:
        for form in (c, c.lower(), c.upper(), c.title()):
            out.setdefault(form, None)
    return tuple(out)


def _source_kind(root: Path) -> str:
    if root.is_file() or (root / MANIFEST_NAME).is_file():
        return "manifest"
    return "class folders"


def _redact(message: str, root: Path) -> str:
    """Remove the data path and file names from a discovery error message."""
    forms: set[str] = set()
    for p in (root, root.expanduser()):
        forms.add(str(p))
        forms.add(str(p.absolute()))
        try:
            forms.add(str(p.resolve()))
        except OSError:
            pass
    out = message
    for form in sorted((f for f in forms if f and f != "."), key=len, reverse=True):
        out = out.replace(form, "<data path>")
    names = {root.name, MANIFEST_NAME} - {""}
    for name in sorted(names, key=len, reverse=True):
        out = out.replace(f"'{name}'", "<manifest>" if name.endswith(".csv") else "<data path>")
    out = _QUOTED_PATH_RE.sub("<path>", out)
    return out


def _depth_name(img: np.ndarray) -> str:
    dt = img.dtype
    if dt == np.bool_:
        bits = "1-bit"
    elif dt.kind == "u":
        bits = f"{dt.itemsize * 8}-bit"
    elif dt.kind == "i":
        bits = f"{dt.itemsize * 8}-bit signed"
    elif dt.kind == "f":
        bits = f"{dt.itemsize * 8}-bit float"
    else:
        bits = str(dt)
    channels = 1 if img.ndim == 2 else int(img.shape[2])
    kind = {1: "gray", 2: "gray+alpha", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels}-channel")
    return f"{bits} {kind}"


def _pixel_hash(img: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.dtype.str}{img.shape}".encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return h.digest()


def _normalise_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _age_bin(value: str) -> str:
    """Bin an age ("45", "45.5", DICOM "045Y", "006M") into a decade; 90 and over as "90+"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YyMmWwDd]?)\s*", value)
    if not m:
        return "invalid"
    years = float(m.group(1)) / {"": 1, "y": 1, "m": 12, "w": 52.18, "d": 365.25}[m.group(2).lower()]
    if years >= 90:
        return "90+"
    decade = int(years // 10) * 10
    return f"{decade}-{decade + 9}"


def _column_counts(records: Sequence[Any], usable: Sequence[int]) -> dict[str, dict[str, int]]:
    """Value counts of the known categorical manifest columns over the usable images (or pairs)."""
    if not usable:
        return {}
    columns: dict[str, str] = {}  # original key -> report name
    for key in records[usable[0]].extra:
        report_name = REPORTED_COLUMNS.get(_normalise_column(key))
        if report_name is not None and report_name not in columns.values():
            columns[key] = report_name
    patient_ids = {r.patient_id for r in records if r.patient_id}
    out: dict[str, dict[str, int]] = {}
    for key, report_name in columns.items():
        counts: Counter[str] = Counter()
        for i in usable:
            raw = str(records[i].extra.get(key, "")).strip()
            if not raw:
                value = "missing"
            elif report_name in _AGE_COLUMNS:
                value = _age_bin(raw)
            elif len(raw) > _MAX_VALUE_LENGTH or raw in patient_ids:
                value = "other"  # not a categorical value, or an id: never reported
            else:
                value = raw
            counts[value] += 1
        top = _top(counts, _MAX_VALUES_PER_COLUMN)
        if report_name in _AGE_COLUMNS:
            top = dict(sorted(top.items(), key=lambda kv: _age_order(kv[0])))
        out[report_name] = top
    return out


def _age_order(label: str) -> tuple[int, str]:
    m = re.match(r"\d+", label)
    return (int(m.group()), label) if m else (10_000, label)


def _top(counts: Counter[str], k: int) -> dict[str, int]:
    """The ``k`` most common values (ties by name), the rest summed as ``"other"``."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    top = dict(ranked[:k])
    rest = sum(v for _, v in ranked[k:])
    if rest:
        top["other"] = top.get("other", 0) + rest
    return top


def _fmt_counts(d: Mapping[str, int | float]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


# ---------------------------------------------------------------------------
# Reading every image once
# ---------------------------------------------------------------------------


MAX_LISTED_DUPLICATES = 200
"""Duplicates named one by one in a report; more are counted only."""


@dataclass
class _Scan:
    usable: list[int] = field(default_factory=list)
    quarantined: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    depths: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    cross_class: int = 0
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (duplicate, earlier copy), record indices
    with_foreground: int = 0


def _scan(total: int, read: Callable[[int], np.ndarray], labels: np.ndarray, progress: ProgressFn | None) -> _Scan:
    """Read every record once with ``read(i)`` (the loader's rules; raises ImageReadError to quarantine)."""
    scan = _Scan()
    first: dict[bytes, int] = {}
    step = max(1, math.ceil(total / _PROGRESS_STEPS))
    if progress is not None:
        progress(0, total)
    for i in range(total):
        img: np.ndarray | None
        try:
            img = read(i)
        except ImageReadError as exc:
            scan.quarantined[quarantine_reason(exc)] += 1
            img = None
        if img is not None:
            scan.usable.append(i)
            scan.sizes[f"{img.shape[0]}x{img.shape[1]}"] += 1
            scan.depths[_depth_name(img)] += 1
            digest = _pixel_hash(img)
            if digest in first:
                scan.duplicates += 1
                scan.pairs.append((i, first[digest]))
                if int(labels[first[digest]]) != int(labels[i]):
                    scan.cross_class += 1
            else:
                first[digest] = i
        done = i + 1
        if progress is not None and (done % step == 0 or done == total):
            progress(done, total)
    return scan


def _scan_images(listing: ImageListing, labels: np.ndarray, progress: ProgressFn | None, policy: InputPolicy) -> _Scan:
    records = listing.records
    return _scan(len(records), lambda i: read_usable(records[i].path, read_raw, policy=policy, root=listing.root),
                 labels, progress)


def _location(path: Path, row: int | None, root: Path | None) -> str:
    """How a site finds a file: its manifest row, else its path relative to the data folder (never absolute)."""
    if row is not None:
        return f"manifest row {row}"
    if root is not None:
        try:
            return Path(os.path.relpath(path, root)).as_posix()
        except ValueError:  # another drive
            pass
    return path.name


def _duplicate_files(scan: _Scan, where: Callable[[int], str], labels: np.ndarray) -> list[dict[str, Any]]:
    return [{"file": where(i), "same-as": where(j), "other-class": bool(int(labels[i]) != int(labels[j]))}
            for i, j in scan.pairs[:MAX_LISTED_DUPLICATES]]


# ---------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------


def _patients(records: Sequence[Any], usable: Sequence[int], report: DataCheckReport) -> np.ndarray | None:
    """Fill the patient counts; return the usable images' groups for the split."""
    ids = [records[i].patient_id for i in usable]
    if not any(pid is not None for pid in ids):
        if report.source != "manifest":
            # Class folders cannot carry ids: the text report notes it, the verdict does not suffer.
            return None
        report.warnings.append(
            "no patient ids (manifest column 'patient_id'): the train/validation split cannot be by patient, "
            "so images of one patient may end up in both and validation scores will be optimistic. "
            "Use a manifest with a patient_id column."
        )
        return None
    per_patient = Counter(pid for pid in ids if pid is not None)
    counts = sorted(per_patient.values())
    report.num_patients = len(per_patient)
    report.images_per_patient = {
        "min": float(counts[0]),
        "median": float(statistics.median(counts)),
        "max": float(counts[-1]),
    }
    missing = sum(pid is None for pid in ids)
    if missing:
        report.warnings.append(
            f"{missing} usable image(s) have no patient id: each is treated as a patient of its own in the split."
        )
    return np.asarray(
        [pid if pid is not None else f"__record-{k}" for k, pid in enumerate(ids)], dtype=str
    )


def _split_overlap(labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int,
                   report: DataCheckReport) -> None:
    if len(labels) < 2:
        return
    try:
        train, val = train_val_split(labels, val_fraction, seed=seed, groups=groups)
    except ValueError as exc:
        report.errors.append(f"the site's train/validation split is impossible: {exc}")
        return
    if groups is None:
        report.patient_overlap_train_val = 0
        return
    real = np.char.startswith(groups, "__record-")
    both = set(groups[train][~real[train]]) & set(groups[val][~real[val]])
    report.patient_overlap_train_val = len(both)
    if both:
        report.errors.append(f"{len(both)} patient(s) are in both train and validation of the site's split")


def _class_findings(report: DataCheckReport, task: TaskSpec) -> None:
    empty = [c for c in task.class_names if report.per_class.get(c, 0) == 0]
    if empty:
        present = [c for c in task.class_names if c not in empty]
        report.errors.append(
            f"class(es) {', '.join(repr(c) for c in empty)} of task '{task.name}' have no usable images "
            f"(found only {', '.join(repr(c) for c in present) or 'none'}): every site needs images of all "
            f"classes {list(task.class_names)} to train and validate."
        )
        return
    small = [f"'{c}' {n}" for c, n in report.per_class.items() if n < MIN_IMAGES_PER_CLASS]
    if small:
        report.warnings.append(
            f"fewer than {MIN_IMAGES_PER_CLASS} usable images in class(es) {', '.join(small)}: "
            "validation metrics for them will be very noisy."
        )
    lo_name = min(report.per_class, key=lambda c: report.per_class[c])
    hi_name = max(report.per_class, key=lambda c: report.per_class[c])
    ratio = report.per_class[lo_name] / report.per_class[hi_name]
    if ratio < IMBALANCE_RATIO:
        report.warnings.append(
            f"class imbalance: '{lo_name}' has {report.per_class[lo_name]} images vs "
            f"{report.per_class[hi_name]} for '{hi_name}' (ratio {ratio:.2f} < {IMBALANCE_RATIO}). "
            "Keep class weighting on (run config class-weighting=true, the default)."
        )


def _other_findings(report: DataCheckReport) -> None:
    if report.duplicates:
        report.warnings.append(
            f"{report.duplicates} image(s) have pixels identical to an earlier image: duplicates inflate "
            "their weight and can leak between train and validation. Remove them (each is named under "
            "'Duplicate files' by its manifest row or its path in the data folder)."
        )
    if report.duplicate_across_classes:
        report.warnings.append(
            f"{report.duplicate_across_classes} duplicate image(s) carry a different class than their earlier "
            "copy: a labelling error. Check the labels."
        )
    n_q = sum(report.quarantined.values())
    if n_q:
        report.warnings.append(
            f"{n_q} file(s) quarantined ({_fmt_counts(report.quarantined)}): not usable for training; "
            "fix or remove them."
        )


def _verdict(report: DataCheckReport) -> str:
    if report.errors:
        return VERDICT_NOT_READY
    return VERDICT_WARNINGS if report.warnings else VERDICT_READY


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def check_dataset(
    path: str | Path,
    task: str = "pneumonia-cxr",
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: ProgressFn | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside_root: bool = False,
) -> DataCheckReport:
    """Check a site's data before it joins a federation.

    Parameters
    ----------
    path : str or Path
        The site's data: a class-folder tree, a folder with ``manifest.csv``,
        or a manifest ``.csv`` (as for :func:`~shared.data.sources.discover`).
    task : str
        Registered task name; its classes are the classes expected.
    val_fraction : float
        Validation share of the site's own split (as in the run config).
    seed : int
        Seed of that split.
    progress : Callable[[int, int], None], optional
        Called with ``(images done, total)`` about every 2 % while decoding.
    max_pixels : int
        The site's pixel cap (node config ``max-image-pixels``): an image
        whose header states more is quarantined as ``"too-large"``, undecoded.
    allow_outside_root : bool
        As the site's ``allow-outside-data-root``: read manifest rows and
        symlinks that resolve outside the data folder (otherwise
        quarantined as ``"outside-data-root"``).

    Returns
    -------
    DataCheckReport
        Counts, warnings, errors and a verdict. An invalid layout is reported
        as a "not ready" verdict with the discovery error as its message (the
        data path redacted), not raised.

    Raises
    ------
    UnknownNameError
        ``task`` is not a registered task.
    ValueError
        ``val_fraction`` is not strictly between 0 and 1, or ``max_pixels``
        is not a positive integer.

    Notes
    -----
    Every image is judged by :func:`shared.data.usable.read_usable` (as the
    training loader does) and decoded at most once with
    :func:`~shared.data.sources.read_raw`; only a 16-byte hash of its pixels
    is kept, so memory does not grow with the image count. Files that fail
    are counted under their ``reason`` (``"unreadable-image"`` when a reader
    gives none).
    """
    spec = get_task(task)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    policy = InputPolicy(max_pixels=max_pixels, allow_outside_root=allow_outside_root)
    _load_optional_readers()
    root = Path(path).expanduser()
    if spec.kind == SEGMENTATION:  # image/mask pairs, listed as the training loader lists them
        return _check_segmentation(root, spec, val_fraction, seed, progress, policy)
    report = DataCheckReport(task=spec.name, source=_source_kind(root))
    report.per_class = {c: 0 for c in spec.class_names}

    try:
        listing = discover(root, allow_outside_root=allow_outside_root)
    except DataSourceError as first:
        # A site holding a single class is still worth counting: retry with the task's class
        # names (in their usual spellings; task_labels matches case-insensitively).
        try:
            listing = discover(root, class_names=_spellings(spec.class_names + tuple(spec.label_aliases)),
                               allow_outside_root=allow_outside_root)
        except DataSourceError:
            report.errors.append(_redact(str(first), root))
            report.verdict = _verdict(report)
            return report
    try:
        labels = task_labels(listing, spec.class_names, spec.label_column, spec.label_aliases)
    except DataSourceError as exc:
        report.errors.append(_redact(str(exc), root))
        report.verdict = _verdict(report)
        return report

    report.num_files = len(listing) + sum(listing.skipped.values())
    scan = _scan_images(listing, labels, progress, policy)
    quarantined = Counter(dict(listing.skipped))
    quarantined.update(scan.quarantined)
    report.quarantined = dict(sorted(quarantined.items()))
    report.num_usable = len(scan.usable)
    usable_labels = labels[np.asarray(scan.usable, dtype=np.int64)]
    counts = np.bincount(usable_labels, minlength=spec.num_classes)
    report.per_class = {c: int(counts[k]) for k, c in enumerate(spec.class_names)}
    report.sizes = _top(scan.sizes, _MAX_SIZES)
    report.bit_depths = dict(sorted(scan.depths.items(), key=lambda kv: (-kv[1], kv[0])))
    report.duplicates = scan.duplicates
    report.duplicate_across_classes = scan.cross_class
    records = listing.records
    report.duplicate_files = _duplicate_files(
        scan, lambda i: _location(records[i].path, records[i].row, listing.root or data_root(root)), labels)
    report.per_column = _column_counts(records, scan.usable)

    if not scan.usable:
        report.errors.append(
            f"none of the {len(listing)} listed images could be read "
            f"({_fmt_counts(report.quarantined)}): nothing to train on."
        )
    else:
        _class_findings(report, spec)
        groups = _patients(listing.records, scan.usable, report)
        _split_overlap(usable_labels, groups, val_fraction, seed, report)
    _other_findings(report)
    report.verdict = _verdict(report)
    logger.info(
        "data check (%s): %d of %d files usable, %d quarantined, %d duplicates; verdict %s",
        spec.name, report.num_usable, report.num_files, sum(report.quarantined.values()),
        report.duplicates, report.verdict,
    )
    return report


def _check_segmentation(root: Path, spec: TaskSpec, val_fraction: float, seed: int, progress: ProgressFn | None,
                        policy: InputPolicy) -> DataCheckReport:
    """:func:`check_dataset` for a segmentation task: the pairs of
    :func:`~shared.data.seg_sources.discover_segmentation`, each image read as
    training reads it and its mask checked (readable, same size)."""
    from shared.data.seg_sources import discover_segmentation, read_record_mask

    source = "manifest" if (root.is_file() or (root / MANIFEST_NAME).is_file()) else "folders or run-length CSV"
    report = DataCheckReport(task=spec.name, source=source, kind="segmentation")
    try:
        listing = discover_segmentation(root, allow_outside_root=policy.allow_outside_root)
    except DataSourceError as exc:
        report.errors.append(_redact(str(exc), root))
        report.verdict = _verdict(report)
        return report
    records = listing.records
    base = data_root(root)
    report.num_files = len(records) + sum(listing.skipped.values())
    zeros = np.zeros(len(records), dtype=np.int64)
    foreground: dict[int, bool] = {}

    def read(i: int) -> np.ndarray:
        img = read_usable(records[i].image, read_raw, policy=policy, root=base)
        with bounded(policy):
            foreground[i] = bool(np.any(read_record_mask(records[i]) > 0))
        return img

    scan = _scan(len(records), read, zeros, progress)
    quarantined = Counter(dict(listing.skipped))
    quarantined.update(scan.quarantined)
    report.quarantined = dict(sorted(quarantined.items()))
    report.num_usable = len(scan.usable)
    report.per_class = {}
    report.sizes = _top(scan.sizes, _MAX_SIZES)
    report.bit_depths = dict(sorted(scan.depths.items(), key=lambda kv: (-kv[1], kv[0])))
    report.duplicates = scan.duplicates
    report.duplicate_files = _duplicate_files(scan, lambda i: _location(records[i].image, records[i].row, base), zeros)
    report.per_column = _column_counts(records, scan.usable)
    report.masks_with_foreground = sum(1 for i in scan.usable if foreground.get(i))
    report.empty_masks = report.num_usable - report.masks_with_foreground
    if not scan.usable:
        report.errors.append(f"none of the {len(records)} image/mask pairs could be used "
                             f"({_fmt_counts(report.quarantined)}): nothing to train on.")
    else:
        if report.masks_with_foreground == 0:
            report.errors.append("every usable mask is empty (no foreground pixel): there is nothing to learn to "
                                 "segment. Check that the masks are the right files and use non-zero foreground.")
        elif report.num_usable < MIN_IMAGES_PER_CLASS:
            report.warnings.append(f"only {report.num_usable} usable image/mask pairs: validation figures will be "
                                   "very noisy.")
        groups = _patients(records, scan.usable, report)
        _split_overlap(zeros[np.asarray(scan.usable, dtype=np.int64)], groups, val_fraction, seed, report)
    _other_findings(report)
    report.verdict = _verdict(report)
    logger.info("data check (%s): %d of %d pairs usable, %d quarantined, %d duplicates; verdict %s", spec.name,
                report.num_usable, report.num_files, sum(report.quarantined.values()), report.duplicates,
                report.verdict)
    return report


def format_report(report: DataCheckReport, *, shareable: bool = False) -> str:
    """Render a report as plain text for the operator.

    Parameters
    ----------
    report : DataCheckReport
        The result of :func:`check_dataset`.
    shareable : bool
        Leave out the duplicate files' names (manifest rows, relative paths):
        counts only, for the coordinator.

    Returns
    -------
    str
        A multi-line report ending with a newline.
    """
    what = "image/mask pairs" if report.kind == "segmentation" else "files"
    lines = [
        f"medfed data check: task '{report.task}', data read from {report.source}",
        f"Verdict: {report.verdict.upper()} (exit code {report.exit_code()})",
        "",
        f"Files:          {report.num_files} {what} listed, {report.num_usable} usable, "
        f"{sum(report.quarantined.values())} quarantined",
    ]
    if report.quarantined:
        lines.append(f"  quarantined:  {_fmt_counts(report.quarantined)}")
    if report.kind == "segmentation":
        lines.append(f"Masks:          {report.masks_with_foreground} with foreground, {report.empty_masks} empty")
    else:
        lines.append(f"Classes:        {_fmt_counts(report.per_class)}")
    if report.num_patients is None:
        lines.append(
            "Patients:       no patient ids: the split cannot be by patient "
            "(use a manifest with a patient_id column)"
        )
    else:
        ipp = report.images_per_patient or {}
        lines.append(
            f"Patients:       {report.num_patients} (images per patient: min {ipp.get('min', 0):g}, "
            f"median {ipp.get('median', 0):g}, max {ipp.get('max', 0):g})"
        )
    lines.append(f"  in both train and validation of the site's split: {report.patient_overlap_train_val}")
    for name, values in report.per_column.items():
        lines.append(f"Column {name + ':':<8} {_fmt_counts(values)}")
    if report.sizes:
        lines.append(f"Image sizes:    {_fmt_counts(report.sizes)}")
    if report.bit_depths:
        lines.append(f"Bit depths:     {_fmt_counts(report.bit_depths)}")
    lines.append(f"Duplicates:     {report.duplicates}" + ("" if report.kind == "segmentation" else
                                                           f" ({report.duplicate_across_classes} across classes)"))
    if report.duplicate_files and not shareable:
        lines.append("Duplicate files (local names: leave them out when sharing, --shareable):")
        lines.extend(f"  - {d['file']} has the pixels of {d['same-as']}"
                     + (" (labelled as another class)" if d["other-class"] else "") for d in report.duplicate_files)
        if report.duplicates > len(report.duplicate_files):
            lines.append(f"  ... and {report.duplicates - len(report.duplicate_files)} more")
    for title, items in (("Errors", report.errors), ("Warnings", report.warnings)):
        if items:
            lines.append("")
            lines.append(f"{title}:")
            lines.extend(f"  - {item}" for item in items)
    return "\n".join(lines) + "\n"
