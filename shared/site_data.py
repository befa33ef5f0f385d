"""A site's own data: where it comes from and its train/validation split.

Three sources, one result (:class:`SiteData`):

* a real hospital site: ``data-path`` in the SuperNode's node config points
  at a class-folder tree or a CSV manifest;
* a simulated site on a real dataset: the run config's ``data-path`` is
  partitioned across ``num-partitions`` sites (patient-disjoint when the
  manifest has patient ids) and this site takes ``partition-id``;
* a simulated site on the task's synthetic phantoms (the default).

Each site then splits its own data into train and validation, by patient when
patient ids are known. Everything is deterministic given the run's seed.

Per-image patient attributes of the validation images (``sex``, ``age``,
``view`` from a manifest; synthetic ``sex``/``age`` for phantoms) ride along
in :attr:`SiteData.val_attributes` for subgroup reporting.

Only counts are logged here: never a file path, a patient id or an attribute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.config import ConfigError, RunConfig, SiteConfig
from shared.data.attributes import manifest_attributes
from shared.data.cache import SiteCache, build_or_load
from shared.data.labels import task_labels
from shared.data.partition import partition_indices
from shared.data.phantoms import phantom_attributes
from shared.data.phantoms_tasks import apply_profile, site_profile
from shared.data.preprocess import (
    AUGMENT_DEFAULTS,
    TASK_DEFAULTS,
    AugmentConfig,
    PreprocessConfig,
    preprocess,
)
from shared.data.seg_sources import SegRecord, discover_segmentation, model_spacings, read_record_mask
from shared.data.reading import READER_VERSION, cache_root, make_reader, resolve_path
from shared.data.sources import DataSourceError, ImageListing, ImageRecord, discover
from shared.data.splits import train_val_split
from shared.tasks import TaskSpec


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """One site's images (uint8, in memory) split into train and validation."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    class_names: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0
    train_masks: np.ndarray | None = None  # segmentation: uint8 class-index masks (N, H, W)
    val_masks: np.ndarray | None = None
    # segmentation: (row, column) mm spacing of each validation image at the model's size, None if unknown
    val_spacings: tuple[tuple[float, float] | None, ...] | None = None
    # attribute (sex, age, view) -> one raw value per validation image; None when the source has none. Never log.
    val_attributes: dict[str, np.ndarray] | None = None

    def summary(self) -> str:
        """Counts only (safe to log)."""
        if self.train_masks is not None:
            skipped = f", skipped {dict(self.skipped)}" if self.skipped else ""
            return f"train {len(self.train_images)} image/mask pairs, validation {len(self.val_images)}{skipped}"
        tr = np.bincount(self.train_labels, minlength=len(self.class_names)).tolist()
        va = np.bincount(self.val_labels, minlength=len(self.class_names)).tolist()
        skipped = f", skipped {dict(self.skipped)}" if self.skipped else ""
        return f"train {len(self.train_labels)} {tr}, validation {len(self.val_labels)} {va}{skipped}"


def resolve_preprocess(cfg: RunConfig, task: TaskSpec) -> PreprocessConfig:
    """The task's default preprocessing with the run config's overrides applied."""
    base = TASK_DEFAULTS.get(task.name, PreprocessConfig())
    d = cfg.data
    return dataclasses.replace(
        base,
        size=d.image_size,
        resize=base.resize if d.resize == "auto" else d.resize,
        equalize=base.equalize if d.equalize == "auto" else d.equalize,
        denoise=base.denoise if d.denoise == "auto" else d.denoise,
        clahe_clip=d.clahe_clip,
        clahe_tiles=d.clahe_tiles,
        channels=task.in_channels,
    )


def resolve_augment(cfg: RunConfig, task: TaskSpec) -> AugmentConfig | None:
    """The task's training augmentation (None when ``augment`` is off); ``hflip=true`` forces flips on."""
    if not cfg.data.augment:
        return None
    base = AUGMENT_DEFAULTS.get(task.name, AugmentConfig())
    return dataclasses.replace(base, hflip=base.hflip or cfg.data.hflip)


def _read_records(
    listing: ImageListing, indices: np.ndarray, labels: np.ndarray, cfg: RunConfig, task: TaskSpec,
    site: SiteConfig, skipped: Counter[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode + preprocess the listed images at ``indices`` (or load them from the site cache).

    Unreadable files are quarantined: counted by reason in ``skipped``, never trained on.
    Returns ``(images, labels, kept)`` with ``kept`` indexing into ``listing.records``.
    """
    pcfg = resolve_preprocess(cfg, task)
    cache = SiteCache(cache_root(site)) if cfg.data.cache else None
    files = [listing.records[int(i)].path for i in indices]
    arrays = build_or_load(
        cache, files, labels[indices], pcfg, make_reader(cfg),
        extra={"reader": READER_VERSION, "dicom-window-fallback": cfg.data.dicom_window_fallback},
    )
    skipped.update(arrays.skipped)
    if len(arrays.kept) == 0:
        raise DataSourceError(
            f"none of the {len(indices)} images of this site could be read "
            f"(quarantined: {dict(arrays.skipped)}); run 'medfed data check' on the data folder"
        )
    kept = np.asarray(indices)[np.asarray(arrays.kept, dtype=np.int64)]
    return np.array(arrays.images), np.asarray(arrays.labels, dtype=np.int64), kept


def _split(images: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, cfg: RunConfig, salt: int,
           attributes: dict[str, np.ndarray] | None = None) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray] | None]:
    """``(train images, train labels, val images, val labels)`` and the validation images' attributes."""
    tr, va = train_val_split(labels, cfg.data.val_fraction, seed=cfg.seed + salt, groups=groups)
    return (images[tr], labels[tr], images[va], labels[va]), _take(attributes, va)


def _take(attributes: dict[str, np.ndarray] | None, rows: np.ndarray) -> dict[str, np.ndarray] | None:
    """The attributes of the images at ``rows`` (None stays None)."""
    if attributes is None:
        return None
    return {name: np.asarray(values)[np.asarray(rows, dtype=np.int64)] for name, values in attributes.items()}


def _listing_attributes(records: Sequence[ImageRecord] | Sequence[SegRecord], rows: np.ndarray) -> dict[str, np.ndarray] | None:
    """Manifest attributes of the records at ``rows`` (patient ids of all records are kept out of them)."""
    return manifest_attributes([records[int(i)].extra for i in rows], (r.patient_id for r in records))


def _load_listing(path: str, task: TaskSpec) -> tuple[ImageListing, np.ndarray]:
    listing = discover(resolve_path(path))
    return listing, task_labels(listing, task.class_names, task.label_column, task.label_aliases)


def _load_real_site(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    listing, labels = _load_listing(site.data_path, task)
    skipped: Counter[str] = Counter(listing.skipped)
    images, labels, keep = _read_records(listing, np.arange(len(listing.records)), labels, cfg, task, site, skipped)
    groups = listing.groups()
    groups = groups[keep] if groups is not None else None
    parts, val_attributes = _split(images, labels, groups, cfg, salt=0,
                                   attributes=_listing_attributes(listing.records, keep))
    return SiteData(*parts, class_names=task.class_names, skipped=dict(skipped), val_attributes=val_attributes)


def _my_partition(cfg: RunConfig, site: SiteConfig, labels: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Indices of this simulated site's share of the run's dataset."""
    if site.partition_id is None or site.num_partitions is None:
        raise ConfigError("a simulated site needs partition-id and num-partitions in its node config")
    parts = partition_indices(
        labels,
        site.num_partitions,
        cfg.partition.kind,
        alpha=cfg.partition.dirichlet_alpha,
        seed=cfg.seed,
        min_partition_size=cfg.partition.min_partition_size,
        groups=groups,
    )
    return parts[site.partition_id]


def _load_partition_of_dataset(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    listing, labels = _load_listing(cfg.data.data_path, task)
    groups = listing.groups()
    mine = _my_partition(cfg, site, labels, groups)
    skipped: Counter[str] = Counter(listing.skipped)
    images, site_labels, keep = _read_records(listing, mine, labels, cfg, task, site, skipped)
    site_groups = groups[keep] if groups is not None else None
    split, val_attributes = _split(images, site_labels, site_groups, cfg, salt=1 + int(site.partition_id or 0),
                                   attributes=_listing_attributes(listing.records, keep))
    return SiteData(*split, class_names=task.class_names, skipped=dict(skipped), val_attributes=val_attributes)


def _load_partition_of_phantoms(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    n = cfg.data.phantom_count
    mine = _my_partition(cfg, site, task.phantom_labels(n, cfg.seed), None)
    images, site_labels = _render_phantoms(task, cfg, mine)
    images = _acquire(images, cfg, site)
    pcfg = resolve_preprocess(cfg, task)
    images = np.stack([preprocess(img, pcfg) for img in images])  # the same pipeline as real images
    split, val_attributes = _split(images, site_labels, None, cfg, salt=1 + int(site.partition_id or 0),
                                   attributes=phantom_attributes(mine, cfg.seed))
    return SiteData(*split, class_names=task.class_names, val_attributes=val_attributes)


def _render_phantoms(task: TaskSpec, cfg: RunConfig, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The task's phantoms at ``indices``; with ``phantom-disparity``, the ones with a planted subgroup disparity."""
    n, size, seed, d = cfg.data.phantom_count, cfg.data.image_size, cfg.seed, cfg.data.phantom_disparity
    if d > 0.0:
        if task.render_disparity_phantoms is None:
            raise ConfigError(f"phantom-disparity is not available for task '{task.name}'; set phantom-disparity=0")
        return task.render_disparity_phantoms(n, size, seed, indices, d)
    return task.render_phantoms(n, size, seed, indices)


def _acquire(images: np.ndarray, cfg: RunConfig, site: SiteConfig) -> np.ndarray:
    """With ``site-shift``, render phantoms through this simulated site's acquisition profile."""
    if not cfg.data.site_shift:
        return images
    return apply_profile(images, site_profile(int(site.partition_id or 0), cfg.seed), cfg.seed)


def _load_segmentation(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    """Image/mask pairs: a real site's folder, a partition of the run's dataset, or phantoms."""
    pcfg = resolve_preprocess(cfg, task)
    if site.simulated and not cfg.data.data_path:
        n = cfg.data.phantom_count
        mine = _my_partition(cfg, site, task.phantom_labels(n, cfg.seed), None)
        images, masks = _render_phantoms(task, cfg, mine)
        images = _acquire(images, cfg, site)
        images = np.stack([preprocess(img, pcfg) for img in images])
        masks = np.asarray(masks).astype(np.uint8)
        groups, skipped = None, Counter()
        kept: list[SegRecord] | None = None
        attributes = phantom_attributes(mine, cfg.seed)
    else:
        listing = discover_segmentation(resolve_path(cfg.data.data_path if site.simulated else site.data_path))
        zeros = np.zeros(len(listing.records), dtype=np.int64)
        all_groups = listing.groups()
        mine = _my_partition(cfg, site, zeros, all_groups) if site.simulated else np.arange(len(listing.records))
        recs = [listing.records[int(i)] for i in mine]
        cache = SiteCache(cache_root(site)) if cfg.data.cache else None
        extra = {"reader": READER_VERSION, "dicom-window-fallback": cfg.data.dicom_window_fallback}
        imgs = build_or_load(cache, [r.image for r in recs], zeros[mine], pcfg, make_reader(cfg), extra=extra)
        record_of = {r.mask: r for r in recs}
        mcfg = dataclasses.replace(pcfg, equalize="none", denoise="none", channels=1)
        mextra: dict[str, object] = {**extra, "kind": "mask"}
        if any(r.rle is not None for r in recs):  # run-length masks have no file of their own: key on their runs
            mextra["rle"] = hashlib.sha256(json.dumps([r.rle for r in recs]).encode()).hexdigest()
        msks = build_or_load(cache, [r.mask for r in recs], zeros[mine], mcfg,
                             lambda p: read_record_mask(record_of[p]), extra=mextra)
        skipped = Counter(listing.skipped)
        skipped.update(imgs.skipped)
        skipped.update({k: v for k, v in msks.skipped.items() if k != "unreadable-image"})
        both = sorted(set(np.asarray(imgs.kept).tolist()) & set(np.asarray(msks.kept).tolist()))
        if not both:
            raise DataSourceError(f"no readable image/mask pair at this site (quarantined: {dict(skipped)})")
        pos_i = {k: j for j, k in enumerate(np.asarray(imgs.kept).tolist())}
        pos_m = {k: j for j, k in enumerate(np.asarray(msks.kept).tolist())}
        images = np.array(imgs.images)[[pos_i[k] for k in both]]
        masks = (np.array(msks.images)[[pos_m[k] for k in both]] > 127).astype(np.uint8)
        groups = all_groups[mine][both] if all_groups is not None else None
        kept = [recs[k] for k in both]
        attributes = manifest_attributes([r.extra for r in kept], (r.patient_id for r in listing.records))
    tr, va = train_val_split(np.zeros(len(images), dtype=np.int64), cfg.data.val_fraction,
                             seed=cfg.seed + 1 + int(site.partition_id or 0), groups=groups)
    empty = np.zeros(0, dtype=np.int64)
    spacings = model_spacings([kept[int(i)] for i in va], pcfg) if kept is not None else []
    val_spacings = tuple(spacings) if any(s is not None for s in spacings) else None
    return SiteData(images[tr], empty, images[va], empty, task.class_names, dict(skipped),
                    train_masks=masks[tr], val_masks=masks[va], val_spacings=val_spacings,
                    val_attributes=_take(attributes, va))


_CACHE: OrderedDict[tuple[object, ...], SiteData] = OrderedDict()
_CACHE_SIZE = 4


def load_site_data(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    """Load (or reuse from this process's cache) the data of one site.

    Flower's simulation reuses worker processes across rounds, so a site's
    images are decoded once per process, not once per round.
    """
    key = (task.name, cfg.data, cfg.partition, cfg.seed, site)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    t0 = time.perf_counter()
    if task.kind == "segmentation":
        data = _load_segmentation(cfg, site, task)
    elif not site.simulated:
        data = _load_real_site(cfg, site, task)
    elif cfg.data.data_path:
        data = _load_partition_of_dataset(cfg, site, task)
    else:
        data = _load_partition_of_phantoms(cfg, site, task)
    data = dataclasses.replace(data, load_seconds=time.perf_counter() - t0)
    logger.info("site %s data: %s (%.1f s)", site.site_id, data.summary(), data.load_seconds)
    _CACHE[key] = data
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return data
