"""Patient-subgroup counts built at a site, with small-cell suppression.

A site that knows per-image attributes of its validation images (``sex``,
``age``, ``view`` from its manifest, see :mod:`shared.data.attributes`)
summarises its predictions per subgroup *cell* (one value of one column, e.g.
``sex = F`` or ``age = 40-59``) with the same additive counts it sends for
all images (:class:`~shared.metrics.classification.ClassificationCounts` or
:class:`~shared.metrics.segmentation.SegmentationCounts`). The server merges
the cells of all sites (:meth:`SubgroupCounts.merge`) and derives the
subgroup metrics and gaps (:mod:`shared.metrics.fairness`), so pooled
subgroup metrics equal those of all validation images pooled.

Cells
-----
* ``sex``: ``F`` / ``M`` (``female``, ``woman``, ``male``... are mapped),
  ``O`` (DICOM "other"), else ``unknown`` (empty, unrecognised).
* ``age``: binned into bands by integer edges ``e0 < e1 < ... < ek`` (run
  config ``fairness.age-bands``): ``[e0, e1)`` ... ``[ek, inf)``, labelled
  ``"18-39"`` (an age in [18, 40), fractional ages included) and ``"80+"``.
  Ages are years (``"45"``, ``"45.5"``) or DICOM age strings (``"045Y"``,
  ``"006M"``, ``"3W"``, ``"10D"``); anything else, and ages below ``e0``, go
  to ``unknown``.
* ``view``: the value in upper case with blanks as ``-`` (``PA``, ``AP``,
  ``AP-SUPINE``, ``LL``...) if it is a short token of letters, digits and
  ``.+_-``; ``unknown`` when empty; ``other`` otherwise.

Small-cell suppression
----------------------
A cell with fewer than ``min_cell`` images at the site is not sent at all
(its counts could identify patients); the site only reports how many cells
of the column it suppressed. Suppressing one cell is not enough: the site
also sends its counts over *all* its images, and the server could subtract
the sent cells of a column from them and recover the missing one. So the site
additionally *withholds* the smallest remaining cells of that column until
the unsent images of the column number zero or at least ``min_cell``
(complementary suppression), and reports that number separately. (Columns
are independent partitions of the same images; this rule protects each
column against differencing with the site's totals, not every conceivable
combination of several columns' marginal counts.)

Limits: the age band edges come from the run config, i.e. the server. Two
runs over the same validation images with overlapping bands (``80+`` in one,
``85+`` in the other) would let the server subtract cells of different runs;
suppression within one reply cannot prevent that. A ``min-cell`` floor at the
site bounds only what each single reply reveals. The fine score histograms of
a cell (1000 bins) are close to the list of (rounded score, label) pairs of
its images, as for the site's overall counts.

Flat key scheme (version 1)
---------------------------
A flat dict of string keys and int / lists of int (what Flower records hold).
Its key set differs between sites (each sends the cells it has), so it must
travel *beside* the evaluation ``MetricRecord``, not inside it: Flower's
message strategies reject evaluate replies whose MetricRecords do not all
have the same keys (a ``ConfigRecord`` of its own is not checked). Keys:

* ``sg1/<column>/<cell>/<key>``: the cell's counts, ``<key>`` being each key
  of its ``to_flat()`` (``num-classes``, ``bins``, ``confusion``,
  ``histogram-index``, ``histogram-count``; or ``n-images``, ``dice-sum``...);
* ``sg1/<column>/suppressed`` and ``sg1/<column>/withheld``: cells of the
  column below ``min_cell``, and cells withheld to protect them;
* ``sg1/min-cell``: the threshold the site applied.

``<column>`` is one of :data:`SUBGROUP_COLUMNS`; ``<cell>`` is a sanitised
token (letters, digits, ``.+_-``): never a free-text value, a patient id or a
file path, and never containing ``/``. A column the site does not have sends
no key. :meth:`SubgroupCounts.from_flat` reads the scheme back (the server).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.errors import UserError
from shared.metrics.classification import DEFAULT_BINS, ClassificationCounts
from shared.metrics.segmentation import SegmentationCounts, Spacing

__all__ = [
    "DEFAULT_AGE_BANDS",
    "DEFAULT_MIN_CELL",
    "KEY_PREFIX",
    "OTHER",
    "SUBGROUP_COLUMNS",
    "UNKNOWN",
    "SubgroupCounts",
    "SubgroupError",
    "SubgroupSpec",
    "age_band_labels",
    "classification_subgroup_counts",
    "effective_min_cell",
    "merge_subgroup_reports",
    "parse_age_bands",
    "parse_age_years",
    "parse_subgroup_columns",
    "per_image_segmentation_counts",
    "segmentation_subgroup_counts",
    "subgroup_cells",
]

logger = logging.getLogger(__name__)

SUBGROUP_COLUMNS: tuple[str, ...] = ("sex", "age", "view")
"""The subgroup columns a run may declare. A fixed vocabulary on purpose: the
server cannot ask a site to group (and so send the values of) an arbitrary
manifest column."""

DEFAULT_MIN_CELL = 10
"""Cells with fewer images at a site are suppressed."""

DEFAULT_AGE_BANDS: tuple[int, ...] = (0, 18, 40, 60, 80)
"""Adult chest X-ray: 0-17, 18-39, 40-59, 60-79, 80+."""

KEY_PREFIX = "sg1"
"""Prefix (and version) of the flat key scheme."""

UNKNOWN = "unknown"
"""Cell of a missing or unreadable value."""

OTHER = "other"
"""Cell of a value that is not a short categorical token."""

NOT_IN_GAPS: frozenset[str] = frozenset({UNKNOWN, OTHER})
"""Cells reported but left out of the gaps between subgroups (not a patient group)."""

_MAX_TOKEN = 24
_TOKEN_RE = re.compile(r"^[A-Z0-9][A-Z0-9.+_-]*$")
_AGE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([YyMmWwDd]?)\s*")
_AGE_UNIT_YEARS = {"": 1.0, "y": 1.0, "m": 12.0, "w": 52.1775, "d": 365.25}
_SEX = {
    "f": "F", "female": "F", "w": "F", "woman": "F", "girl": "F",
    "m": "M", "male": "M", "man": "M", "boy": "M",
    "o": "O", "other": "O",
}

Counts = ClassificationCounts | SegmentationCounts


class SubgroupError(UserError):
    """A subgroup setting (columns, age bands, minimum cell size) is invalid."""


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def parse_subgroup_columns(text: str) -> tuple[str, ...]:
    """Parse ``subgroup-columns``: comma-separated names from :data:`SUBGROUP_COLUMNS`.

    Parameters
    ----------
    text : str
        E.g. ``"sex,age,view"``; blanks are ignored; ``""`` means no subgroups.

    Returns
    -------
    tuple of str
        The columns in the order given, without duplicates.

    Raises
    ------
    SubgroupError
        For a name outside :data:`SUBGROUP_COLUMNS` (with a did-you-mean).
    """
    from shared.registry import did_you_mean

    out: list[str] = []
    for raw in str(text).split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in SUBGROUP_COLUMNS:
            raise SubgroupError(
                f"subgroup column {raw.strip()!r} is not supported: expected a comma-separated list of "
                f"{', '.join(SUBGROUP_COLUMNS)} (or '' for none).{did_you_mean(name, list(SUBGROUP_COLUMNS))}"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_age_bands(text: str) -> tuple[int, ...]:
    """Parse ``fairness.age-bands``: increasing non-negative integer edges in years.

    ``"0,18,40,65"`` means the bands [0, 18), [18, 40), [40, 65), [65, inf).

    Raises
    ------
    SubgroupError
        When a value is not a non-negative integer, the edges do not increase,
        or there is none.
    """
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        edges = tuple(int(p) for p in parts)
    except ValueError:
        edges = ()
    if not edges or any(e < 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise SubgroupError(
            f"age bands {text!r} are not valid: expected increasing whole years >= 0 separated by commas, "
            "e.g. '0,18,40,60,80' for 0-17, 18-39, 40-59, 60-79, 80+."
        )
    return edges


@dataclass(frozen=True)
class SubgroupSpec:
    """Which columns a site groups by, the age bands, and the minimum cell size.

    Attributes
    ----------
    columns : tuple of str
        Declared columns (subset of :data:`SUBGROUP_COLUMNS`); those a site
        does not have are skipped.
    min_cell : int
        Cells with fewer images at a site are suppressed (>= 1).
    age_bands : tuple of int
        Increasing integer edges in years (see :func:`parse_age_bands`).
    """

    columns: tuple[str, ...] = SUBGROUP_COLUMNS
    min_cell: int = DEFAULT_MIN_CELL
    age_bands: tuple[int, ...] = DEFAULT_AGE_BANDS

    def __post_init__(self) -> None:
        """Validate the settings."""
        cols = parse_subgroup_columns(",".join(self.columns))
        if cols != tuple(self.columns):
            raise SubgroupError(f"subgroup columns must be distinct names of {SUBGROUP_COLUMNS}; got {self.columns!r}")
        if isinstance(self.min_cell, bool) or not isinstance(self.min_cell, (int, np.integer)) or self.min_cell < 1:
            raise SubgroupError(f"min_cell must be an integer >= 1; got {self.min_cell!r}")
        parse_age_bands(",".join(str(e) for e in self.age_bands))

    @classmethod
    def from_strings(cls, columns: str, min_cell: int, age_bands: str) -> SubgroupSpec:
        """Build from the run-config strings (``subgroup-columns``, ``fairness.min-cell``, ``fairness.age-bands``)."""
        return cls(parse_subgroup_columns(columns), int(min_cell), parse_age_bands(age_bands))

    @classmethod
    def for_site(cls, fairness: object, site_floor: int | None) -> SubgroupSpec:
        """The spec a site applies: the run's settings, with ``min_cell`` raised to the site's floor.

        Parameters
        ----------
        fairness : shared.config.FairnessConfig
            The run config's ``fairness`` section (``subgroup_columns``,
            ``min_cell``, ``age_bands``).
        site_floor : int or None
            ``SiteConfig.min_cell_floor`` (None: the run decides).
        """
        return cls.from_strings(
            fairness.subgroup_columns,  # type: ignore[attr-defined]
            effective_min_cell(fairness.min_cell, site_floor),  # type: ignore[attr-defined]
            fairness.age_bands,  # type: ignore[attr-defined]
        )


def effective_min_cell(run_min_cell: int, site_floor: int | None) -> int:
    """The minimum cell size a site applies: the run's, never below the site's own floor.

    Parameters
    ----------
    run_min_cell : int
        ``fairness.min-cell`` from the run config (set by the server).
    site_floor : int or None
        The site operator's floor (node config); None = no floor of its own.

    Returns
    -------
    int
        ``max(run_min_cell, site_floor)``.
    """
    return int(run_min_cell) if site_floor is None else max(int(run_min_cell), int(site_floor))


# ---------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------


def parse_age_years(value: object) -> float | None:
    """Age in years from ``"45"``, ``"45.5"`` or a DICOM age string (``"045Y"``, ``"006M"``...); None if not an age."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        v = float(value)
        return v if math.isfinite(v) and v >= 0 else None
    m = _AGE_RE.fullmatch(str(value))
    if not m:
        return None
    return float(m.group(1)) / _AGE_UNIT_YEARS[m.group(2).lower()]


def age_band_labels(edges: Sequence[int]) -> tuple[str, ...]:
    """Labels of the bands: ``"0-17"``, ``"18-39"``, ..., ``"80+"`` (in order)."""
    e = list(edges)
    return tuple(f"{a}-{b - 1}" if b - 1 > a else f"{a}" for a, b in zip(e, e[1:], strict=False)) + (f"{e[-1]}+",)


def _age_cells(values: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    labels = age_band_labels(edges)
    edge_arr = np.asarray(edges, dtype=np.float64)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        years = parse_age_years(v)
        if years is None or years < edge_arr[0]:
            out[i] = UNKNOWN
        else:
            out[i] = labels[int(np.searchsorted(edge_arr, years, side="right")) - 1]
    return out


def _sex_cell(value: object) -> str:
    text = str(value).strip().lower() if value is not None else ""
    return _SEX.get(text, UNKNOWN)


def _token_cell(value: object) -> str:
    text = str(value).strip() if value is not None else ""
    if not text or text.lower() == UNKNOWN:
        return UNKNOWN
    if text.lower() == OTHER:
        return OTHER
    token = re.sub(r"\s+", "-", text.upper())
    if len(token) > _MAX_TOKEN or not _TOKEN_RE.fullmatch(token):
        return OTHER
    return token


def subgroup_cells(attributes: Mapping[str, np.ndarray] | None, spec: SubgroupSpec, n: int) -> dict[str, np.ndarray]:
    """The cell of every image, for each declared column the site has.

    Parameters
    ----------
    attributes : mapping or None
        Column -> per-image values (length ``n``), as loaded by the site.
    spec : SubgroupSpec
        Declared columns and age bands.
    n : int
        Number of images.

    Returns
    -------
    dict
        Column -> object array of cell labels (``n`` entries), for the
        declared columns present in ``attributes`` in declaration order.

    Raises
    ------
    ValueError
        If a column's values do not have ``n`` entries.
    """
    out: dict[str, np.ndarray] = {}
    if not attributes:
        return out
    for column in spec.columns:
        if column not in attributes:
            continue
        values = np.asarray(attributes[column], dtype=object)
        if values.shape != (n,):
            raise ValueError(f"subgroup column {column!r} has {values.shape} values for {n} images")
        if column == "age":
            out[column] = _age_cells(values, spec.age_bands)
        elif column == "sex":
            out[column] = np.array([_sex_cell(v) for v in values], dtype=object)
        else:
            out[column] = np.array([_token_cell(v) for v in values], dtype=object)
    return out


# ---------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------


@dataclass
class SubgroupCounts:
    """Per-column, per-cell counts and the numbers of unsent cells; merge by adding.

    Attributes
    ----------
    cells : dict
        Column -> cell -> counts (only cells that were sent).
    suppressed : dict
        Column -> cells below the minimum size (summed over sites after merging).
    withheld : dict
        Column -> cells withheld so the suppressed ones cannot be recovered
        from the site's totals (summed over sites).
    sites : dict
        Column -> cell -> number of sites that sent the cell.
    min_cell : int
        The largest minimum cell size among the merged reports.
    """

    cells: dict[str, dict[str, Counts]] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)
    withheld: dict[str, int] = field(default_factory=dict)
    sites: dict[str, dict[str, int]] = field(default_factory=dict)
    min_cell: int = 0

    @property
    def columns(self) -> list[str]:
        """Columns with any cell sent or suppressed, in a fixed order."""
        names = set(self.cells) | set(self.suppressed) | set(self.withheld)
        return [c for c in SUBGROUP_COLUMNS if c in names] + sorted(names - set(SUBGROUP_COLUMNS))

    def merge(self, other: SubgroupCounts) -> SubgroupCounts:
        """Sum of two reports (neither is modified); cells of the same column and value are added."""
        if not isinstance(other, SubgroupCounts):
            raise ValueError(f"can only merge SubgroupCounts, got {type(other).__name__}")
        cells: dict[str, dict[str, Counts]] = {c: dict(v) for c, v in self.cells.items()}
        sites = {c: dict(v) for c, v in self.sites.items()}
        for column, by_cell in other.cells.items():
            mine = cells.setdefault(column, {})
            n_sites = sites.setdefault(column, {})
            for cell, counts in by_cell.items():
                mine[cell] = mine[cell].merge(counts) if cell in mine else counts  # type: ignore[arg-type]
                n_sites[cell] = n_sites.get(cell, 0) + other.sites.get(column, {}).get(cell, 1)
        return SubgroupCounts(
            cells=cells,
            suppressed=_add(self.suppressed, other.suppressed),
            withheld=_add(self.withheld, other.withheld),
            sites=sites,
            min_cell=max(self.min_cell, other.min_cell),
        )

    def to_flat(self) -> dict[str, int | float | list[int]]:
        """The flat key scheme (see the module docstring); values are plain ints/floats/lists of ints."""
        out: dict[str, int | float | list[int]] = {f"{KEY_PREFIX}/min-cell": int(self.min_cell)}
        for column in self.columns:
            out[f"{KEY_PREFIX}/{column}/suppressed"] = int(self.suppressed.get(column, 0))
            out[f"{KEY_PREFIX}/{column}/withheld"] = int(self.withheld.get(column, 0))
            for cell, counts in sorted(self.cells.get(column, {}).items()):
                for key, value in counts.to_flat().items():
                    out[f"{KEY_PREFIX}/{column}/{cell}/{key}"] = value
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, object]) -> SubgroupCounts | None:
        """Read the subgroup part of a site's flat reply; None when it has none.

        Keys of other schemes are ignored. Cells of the same column and value
        arriving from one site count once in :attr:`sites`.

        Raises
        ------
        ValueError
            A key of the scheme is malformed, names an unknown column or an
            unsafe cell label, or its counts do not decode.
        """
        prefix = f"{KEY_PREFIX}/"
        keys = [k for k in flat if isinstance(k, str) and k.startswith(prefix)]
        if not keys:
            return None
        grouped: dict[tuple[str, str], dict[str, object]] = {}
        report = cls()
        for key in keys:
            parts = key[len(prefix):].split("/")
            if parts == ["min-cell"]:
                report.min_cell = _nonneg_int(flat[key], key)
                continue
            if len(parts) < 2 or parts[0] not in SUBGROUP_COLUMNS:
                raise ValueError(f"subgroup key {key!r}: expected {prefix}<column>/... with a column of "
                                 f"{SUBGROUP_COLUMNS}")
            column = parts[0]
            if len(parts) == 2 and parts[1] in ("suppressed", "withheld"):
                target = report.suppressed if parts[1] == "suppressed" else report.withheld
                target[column] = _nonneg_int(flat[key], key)
                continue
            if len(parts) != 3 or not _is_cell_label(parts[1]):
                raise ValueError(f"subgroup key {key!r}: expected {prefix}<column>/<cell>/<count-key>")
            grouped.setdefault((column, parts[1]), {})[parts[2]] = flat[key]
        for (column, cell), d in grouped.items():
            counts = ClassificationCounts.from_flat(d) if "num-classes" in d else SegmentationCounts.from_flat(d)
            report.cells.setdefault(column, {})[cell] = counts
            report.sites.setdefault(column, {})[cell] = 1
        return report


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in set(a) | set(b)}


def _nonneg_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"subgroup key {key!r}: expected a non-negative integer, got {value!r}")
    return int(value)


def _is_cell_label(label: str) -> bool:
    if label in (UNKNOWN, OTHER):
        return True
    return len(label) <= _MAX_TOKEN and _TOKEN_RE.fullmatch(label) is not None


def _suppress(sizes: Mapping[str, int], min_cell: int) -> tuple[list[str], int, int]:
    """Cells to send, and the numbers suppressed (small) and withheld (complementary).

    Small cells (< ``min_cell``) are dropped; then, while the dropped images
    number between 1 and ``min_cell - 1``, the smallest remaining cell is
    dropped too, so that the site's totals minus the sent cells never single
    out fewer than ``min_cell`` images.
    """
    order = sorted(sizes, key=lambda c: (sizes[c], c))
    small = [c for c in order if sizes[c] < min_cell]
    rest = [c for c in order if sizes[c] >= min_cell]
    dropped = sum(sizes[c] for c in small)
    withheld = 0
    while 0 < dropped < min_cell and rest:
        cell = rest.pop(0)
        dropped += sizes[cell]
        withheld += 1
    return sorted(rest), len(small), withheld


def _build(cells: Mapping[str, np.ndarray], spec: SubgroupSpec,
           count_rows: Callable[[np.ndarray], Counts]) -> SubgroupCounts:
    report = SubgroupCounts(min_cell=spec.min_cell)
    for column, labels in cells.items():
        values, sizes = np.unique(labels.astype(str), return_counts=True)
        size_of = {str(v): int(s) for v, s in zip(values, sizes, strict=True)}
        keep, small, withheld = _suppress(size_of, spec.min_cell)
        report.suppressed[column] = small
        report.withheld[column] = withheld
        report.cells[column] = {cell: count_rows(np.flatnonzero(labels == cell)) for cell in keep}
        report.sites[column] = {cell: 1 for cell in keep}
    logger.debug("subgroup counts: %d column(s), %d cell(s) sent",
                 len(cells), sum(len(v) for v in report.cells.values()))  # counts only, never values
    return report


def classification_subgroup_counts(
    probs: np.ndarray,
    labels: np.ndarray,
    attributes: Mapping[str, np.ndarray] | None,
    spec: SubgroupSpec,
    *,
    bins: int = DEFAULT_BINS,
) -> SubgroupCounts:
    """Per-subgroup classification counts of a site's validation predictions, small cells suppressed.

    Parameters
    ----------
    probs : np.ndarray
        ``(N, C)`` class probabilities, as the evaluation computes them.
    labels : np.ndarray
        ``(N,)`` integer labels.
    attributes : mapping or None
        Column -> ``(N,)`` per-image values (``SiteData.val_attributes``).
    spec : SubgroupSpec
        Declared columns, age bands and minimum cell size.
    bins : int, default DEFAULT_BINS
        Histogram bins; must equal the site's overall counts' (for merging).

    Returns
    -------
    SubgroupCounts
        Send ``.to_flat()`` with the site's evaluation reply.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs must be (N, C) and labels (N,); got {p.shape} and {y.shape}")
    cells = subgroup_cells(attributes, spec, p.shape[0])
    return _build(cells, spec, lambda rows: ClassificationCounts.from_predictions(p[rows], y[rows], bins=bins))


def per_image_segmentation_counts(
    pred_masks: np.ndarray, target_masks: np.ndarray, spacings: Spacing | Sequence[Spacing | None] | None = None,
) -> list[SegmentationCounts]:
    """One :class:`SegmentationCounts` per image (their merge equals counting all images at once)."""
    preds = np.asarray(pred_masks)
    targets = np.asarray(target_masks)
    if preds.ndim != 3 or preds.shape != targets.shape:
        raise ValueError(f"expected pred and target masks of equal shape (N, H, W), got {preds.shape} "
                         f"and {targets.shape}")
    n = len(preds)
    if spacings is None:
        per: list[Spacing | None] = [None] * n
    else:
        sp = list(spacings)  # type: ignore[arg-type]
        one = len(sp) == 2 and all(isinstance(v, (int, float, np.integer, np.floating)) for v in sp)
        per = [tuple(sp)] * n if one else sp  # type: ignore[list-item]
        if len(per) != n:
            raise ValueError(f"spacings must be None, one (row, column) pair, or one per image ({n}); got {len(per)}")
    out = []
    for i in range(n):
        c = SegmentationCounts.empty()
        c.update(preds[i : i + 1], targets[i : i + 1], None if per[i] is None else [per[i]])
        out.append(c)
    return out


def segmentation_subgroup_counts(
    pred_masks: np.ndarray | None,
    target_masks: np.ndarray | None,
    attributes: Mapping[str, np.ndarray] | None,
    spec: SubgroupSpec,
    *,
    spacings: Spacing | Sequence[Spacing | None] | None = None,
    per_image: Sequence[SegmentationCounts] | None = None,
) -> SubgroupCounts:
    """Per-subgroup segmentation sums of a site's validation predictions, small cells suppressed.

    Parameters
    ----------
    pred_masks, target_masks : np.ndarray or None
        Binary foreground masks ``(N, H, W)`` (prediction and reference).
    attributes : mapping or None
        Column -> ``(N,)`` per-image values (``SiteData.val_attributes``).
    spec : SubgroupSpec
        Declared columns, age bands and minimum cell size.
    spacings : optional
        As in :meth:`SegmentationCounts.update`.
    per_image : sequence of SegmentationCounts, optional
        Already computed per-image counts (see
        :func:`per_image_segmentation_counts`) instead of the masks.

    Returns
    -------
    SubgroupCounts
    """
    if per_image is None:
        if pred_masks is None or target_masks is None:
            raise ValueError("give pred_masks and target_masks, or per_image counts")
        per_image = per_image_segmentation_counts(pred_masks, target_masks, spacings)
    items = list(per_image)
    cells = subgroup_cells(attributes, spec, len(items))

    def count_rows(rows: np.ndarray) -> SegmentationCounts:
        total = SegmentationCounts.empty()
        for i in rows:
            total = total.merge(items[int(i)])
        return total

    return _build(cells, spec, count_rows)


def merge_subgroup_reports(flats: Iterable[Mapping[str, object]]) -> SubgroupCounts | None:
    """Merge the subgroup parts of several sites' flat replies (None when no site sent any)."""
    total: SubgroupCounts | None = None
    for flat in flats:
        part = SubgroupCounts.from_flat(flat)
        if part is None:
            continue
        total = part if total is None else total.merge(part)
    return total
