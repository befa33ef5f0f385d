"""A site's own data: where it comes from and its train/validation split.

Three sources, one result (:class:`SiteData`):

* a real hospital site: ``data-path`` in the SuperNode's node config points
  at a class-folder tree or a CSV manifest;
* a simulated site on a real dataset: the run config's ``data-path`` is
  partitioned across ``num-partitions`` sites (patient-disjoint when the
  manifest has patient ids) and this site takes ``partition-id``;
* a simulated site on the task's synthetic phantoms (the default).

A simulated site's share follows the run config's partition (iid, label skew,
pathological, size skew, or the manifest's own site column; see
:mod:`shared.data.partition`). With ``site-shift`` every simulated site but
site 0 sees its images through its own acquisition profile
(:func:`shared.data.phantoms_tasks.site_profile`): phantoms are rendered
through it, real images get it after decoding and preprocessing, so the site
cache keeps un-shifted pixels; segmentation masks are never changed.

A simulated site never trains on the run's ``test-path``: images of
``data-path`` that are also in ``test-path`` (same file) are left out before
the partition is made, so a test split can be written as a manifest of the
same folder.

Each site then splits its own data into train and validation, by patient when
patient ids are known. Everything is deterministic given the run's seed. A
site whose train or validation split is below ``min-train-images`` /
``min-val-images`` logs a ``[medfed] warning`` line before round 1.

Every file goes through :func:`shared.data.usable.read_usable` under the
site's input policy (node config ``max-image-pixels``,
``allow-outside-data-root``; :func:`shared.data.reading.input_policy`), the
same function ``medfed data check`` uses, so that the check and the site
agree on what is usable. A real site reads nothing the run config names
(:func:`shared.config.for_site`).

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
from pathlib import Path
from typing import Any

import numpy as np

from shared.data.attributes import manifest_attributes
from shared.data.cache import SiteCache, build_or_load
from shared.data.labels import task_labels
from shared.data.partition import partition_indices
from shared.data.phantoms import phantom_attributes
from shared.data.phantoms_tasks import apply_profile, site_profile
from shared.data.preprocess import preprocess
from shared.data.reading import READER_VERSION, cache_root, input_policy, make_reader, resolve_path
from shared.data.seg_sources import SegRecord, discover_segmentation, model_spacings, read_record_mask
from shared.data.sources import DataSourceError, ImageListing, ImageRecord, data_root, discover, pixel_limit
from shared.data.splits import train_val_split
from shared.data.usable import InputPolicy, bounded, usable_reader
from shared.kinds import SEGMENTATION
from shared.settings import ConfigError, RunConfig, SiteConfig, for_site
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

    @property
    def train_targets(self) -> np.ndarray:
        """What training fits: the masks of a segmentation site, else the labels."""
        return self.train_masks if self.train_masks is not None else self.train_labels

    @property
    def val_targets(self) -> np.ndarray:
        """What evaluation scores against: the masks of a segmentation site, else the labels."""
        return self.val_masks if self.val_masks is not None else self.val_labels

    @property
    def quarantined(self) -> int:
        """Files this site could not use (counted by reason in ``skipped``)."""
        return int(sum(self.skipped.values()))

    def summary(self) -> str:
        """Counts only (safe to log)."""
        if self.train_masks is not None:
            skipped = f", skipped {dict(self.skipped)}" if self.skipped else ""
            return f"train {len(self.train_images)} image/mask pairs, validation {len(self.val_images)}{skipped}"
        tr = np.bincount(self.train_labels, minlength=len(self.class_names)).tolist()
        va = np.bincount(self.val_labels, minlength=len(self.class_names)).tolist()
        skipped = f", skipped {dict(self.skipped)}" if self.skipped else ""
        return f"train {len(self.train_labels)} {tr}, validation {len(self.val_labels)} {va}{skipped}"


def _read_records(
    listing: ImageListing, indices: np.ndarray, labels: np.ndarray, cfg: RunConfig, task: TaskSpec,
    site: SiteConfig, skipped: Counter[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode + preprocess the listed images at ``indices`` (or load them from the site cache).

    Unusable files (:func:`shared.data.usable.read_usable`) are quarantined: counted by
    reason in ``skipped``, never trained on.
    Returns ``(images, labels, kept)`` with ``kept`` indexing into ``listing.records``.
    """
    pcfg = task.preprocess_for(cfg)
    policy = input_policy(site)
    cache = SiteCache(cache_root(site)) if cfg.data.cache else None
    files = [listing.records[int(i)].path for i in indices]
    arrays = build_or_load(
        cache, files, labels[indices], pcfg, usable_reader(make_reader(cfg), policy, listing.root),
        extra=_cache_extra(cfg, policy),
    )
    skipped.update(arrays.skipped)
    if len(arrays.kept) == 0:
        raise DataSourceError(
            f"none of the {len(indices)} images of this site could be read "
            f"(quarantined: {dict(arrays.skipped)}); run 'medfed data check' on the data folder"
        )
    kept = np.asarray(indices)[np.asarray(arrays.kept, dtype=np.int64)]
    return np.array(arrays.images), np.asarray(arrays.labels, dtype=np.int64), kept


def _cache_extra(cfg: RunConfig, policy: InputPolicy) -> dict[str, object]:
    """Everything besides the file list and preprocessing that decides what a cache entry holds."""
    return {"reader": READER_VERSION, "dicom-window-fallback": cfg.data.dicom_window_fallback,
            "max-pixels": policy.max_pixels, "allow-outside-root": policy.allow_outside_root}


def _split(images: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, cfg: RunConfig, salt: int,
           attributes: dict[str, np.ndarray] | None = None,
           ) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray] | None]:
    """``(train images, train labels, val images, val labels)`` and the validation images' attributes."""
    tr, va = train_val_split(labels, cfg.data.val_fraction, seed=cfg.seed + salt, groups=groups)
    return (images[tr], labels[tr], images[va], labels[va]), _take(attributes, va)


def _take(attributes: dict[str, np.ndarray] | None, rows: np.ndarray) -> dict[str, np.ndarray] | None:
    """The attributes of the images at ``rows`` (None stays None)."""
    if attributes is None:
        return None
    return {name: np.asarray(values)[np.asarray(rows, dtype=np.int64)] for name, values in attributes.items()}


def _listing_attributes(records: Sequence[ImageRecord] | Sequence[SegRecord],
                        rows: np.ndarray) -> dict[str, np.ndarray] | None:
    """Manifest attributes of the records at ``rows`` (patient ids of all records are kept out of them)."""
    return manifest_attributes([records[int(i)].extra for i in rows], (r.patient_id for r in records))


def _load_listing(path: str, task: TaskSpec, site: SiteConfig) -> tuple[ImageListing, np.ndarray]:
    listing = discover(resolve_path(path), allow_outside_root=input_policy(site).allow_outside_root)
    return listing, task_labels(listing, task.class_names, task.label_column, task.label_aliases)


def _load_real_site(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    listing, labels = _load_listing(site.data_path, task, site)
    skipped: Counter[str] = Counter(listing.skipped)
    images, labels, keep = _read_records(listing, np.arange(len(listing.records)), labels, cfg, task, site, skipped)
    groups = listing.groups()
    groups = groups[keep] if groups is not None else None
    parts, val_attributes = _split(images, labels, groups, cfg, salt=0,
                                   attributes=_listing_attributes(listing.records, keep))
    return SiteData(*parts, class_names=task.class_names, skipped=dict(skipped), val_attributes=val_attributes)


def _my_partition(
    cfg: RunConfig, site: SiteConfig, labels: np.ndarray, groups: np.ndarray | None,
    site_values: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of this simulated site's share of the run's dataset."""
    if site.partition_id is None or site.num_partitions is None:
        raise ConfigError("a simulated site needs partition-id and num-partitions in its node config")
    p = cfg.partition
    if p.kind == "natural" and site_values is None:
        raise ConfigError(
            f"partition='natural' reads each image's site from the manifest column '{p.column}', which this "
            "dataset cannot carry (phantoms, a class-folder tree or a segmentation dataset): use a classification "
            "manifest with that column, or another partition."
        )
    parts = partition_indices(
        labels,
        site.num_partitions,
        p.kind,
        alpha=p.dirichlet_alpha,
        seed=cfg.seed,
        min_partition_size=p.min_partition_size,
        groups=groups,
        classes_per_site=p.classes_per_site,
        size_skew=p.size_skew,
        size_alpha=p.size_alpha,
        size_exponent=p.size_exponent,
        site_values=site_values,
        column=p.column,
    )
    return parts[site.partition_id]


def _column_values(listing: ImageListing, column: str) -> np.ndarray:
    """Each record's value of manifest column ``column`` (header matched case-insensitively)."""
    keys = {k.strip().lower(): k for r in listing.records[:1] for k in r.extra}
    key = keys.get(column.strip().lower())
    if key is None:
        found = sorted(keys.values())
        has = "the extra columns " + ", ".join(found) if found else "no manifest columns besides path/label/patient_id"
        raise DataSourceError(
            f"partition='natural' needs the manifest column '{column}' (the site of each image), but the dataset "
            f"has {has}"
            f": add a '{column}' column, or set partition-column to the column that names the site."
        )
    return np.array([r.extra.get(key, "") for r in listing.records], dtype=object)


def natural_site_count(cfg: RunConfig, task: TaskSpec) -> int:
    """Distinct values of the run's ``partition-column`` in its ``data-path`` manifest (for a pre-flight check).

    Reads the manifest only (no image is decoded). Raises :class:`DataSourceError`
    when the dataset has no such column; empty values are not counted (the
    partition itself rejects them).
    """
    simulated = SiteConfig(site_id="preflight", partition_id=0, num_partitions=1)  # the policy of simulated sites
    listing, _ = _load_listing(cfg.data.data_path, task, simulated)
    values = _column_values(listing, cfg.partition.column)
    return len({str(v).strip() for v in values.tolist()} - {""})


def _test_files(cfg: RunConfig, task: TaskSpec) -> frozenset[Path]:
    """Resolved image files of the run's ``test-path`` (empty without one): a simulation never trains on them."""
    if not cfg.test_path:
        return frozenset()
    path = resolve_path(cfg.test_path)
    if task.kind == SEGMENTATION:
        files = [r.image for r in discover_segmentation(path, allow_outside_root=True).records]
    else:
        files = [r.path for r in discover(path, allow_outside_root=True).records]
    return frozenset(Path(f).resolve() for f in files)


def _without_test_images(records: Sequence[Any], file_of: Any, cfg: RunConfig, task: TaskSpec) -> np.ndarray:
    """Indices of ``records`` whose image is not in the run's ``test-path`` (all of them without one).

    ``test-path`` is never trained on: when it shares files with the
    partitioned ``data-path`` (e.g. a test split written as a manifest of the
    same folder), those files leave the partition before it is made. Only
    the count is logged.
    """
    test = _test_files(cfg, task)
    keep = np.arange(len(records))
    if test:
        keep = np.array([i for i, r in enumerate(records) if Path(file_of(r)).resolve() not in test], dtype=np.int64)
        if len(keep) < len(records):
            logger.info("data-path: %d of %d images are in test-path and are left out of the partition",
                        len(records) - len(keep), len(records))
    return keep


def _load_partition_of_dataset(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    listing, labels = _load_listing(cfg.data.data_path, task, site)
    keep = _without_test_images(listing.records, lambda r: r.path, cfg, task)
    if len(keep) < len(listing.records):
        listing = dataclasses.replace(listing, records=tuple(listing.records[int(i)] for i in keep))
        labels = labels[keep]
    groups = listing.groups()
    values = _column_values(listing, cfg.partition.column) if cfg.partition.kind == "natural" else None
    mine = _my_partition(cfg, site, labels, groups, values)
    skipped: Counter[str] = Counter(listing.skipped)
    images, site_labels, keep = _read_records(listing, mine, labels, cfg, task, site, skipped)
    images = _acquire(images, cfg, site)  # after the cache: it holds un-shifted pixels
    site_groups = groups[keep] if groups is not None else None
    split, val_attributes = _split(images, site_labels, site_groups, cfg, salt=1 + int(site.partition_id or 0),
                                   attributes=_listing_attributes(listing.records, keep))
    return SiteData(*split, class_names=task.class_names, skipped=dict(skipped), val_attributes=val_attributes)


def _load_partition_of_phantoms(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    n = cfg.data.phantom_count
    mine = _my_partition(cfg, site, task.phantom_labels(n, cfg.seed), None)
    images, site_labels = _render_phantoms(task, cfg, mine)
    images = _acquire(images, cfg, site)
    pcfg = task.preprocess_for(cfg)
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
    """With ``site-shift``, this simulated site's images as its acquisition profile renders them.

    Phantoms pass through before preprocessing (as a scanner would), real
    images after decoding and preprocessing (the site cache keeps un-shifted
    pixels). Site 0 is the reference (unchanged); a real site is never shifted.
    Deterministic: the profile depends on (seed, partition-id), the noise on the
    seed and each image's pixels. Masks are never passed here.
    """
    if not cfg.data.site_shift or not site.simulated:
        return images
    return apply_profile(images, site_profile(int(site.partition_id or 0), cfg.seed), cfg.seed)


def _load_segmentation(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    """Image/mask pairs: a real site's folder, a partition of the run's dataset, or phantoms."""
    pcfg = task.preprocess_for(cfg)
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
        policy = input_policy(site)
        path = resolve_path(cfg.data.data_path if site.simulated else site.data_path)
        listing = discover_segmentation(path, allow_outside_root=policy.allow_outside_root)
        if site.simulated:
            keep = _without_test_images(listing.records, lambda r: r.image, cfg, task)
            listing = dataclasses.replace(listing, records=tuple(listing.records[int(i)] for i in keep))
        zeros = np.zeros(len(listing.records), dtype=np.int64)
        all_groups = listing.groups()
        mine = _my_partition(cfg, site, zeros, all_groups) if site.simulated else np.arange(len(listing.records))
        recs = [listing.records[int(i)] for i in mine]
        cache = SiteCache(cache_root(site)) if cfg.data.cache else None
        extra = _cache_extra(cfg, policy)
        imgs = build_or_load(cache, [r.image for r in recs], zeros[mine], pcfg,
                             usable_reader(make_reader(cfg), policy, data_root(path)), extra=extra)
        record_of = {r.mask: r for r in recs}
        mcfg = dataclasses.replace(pcfg, equalize="none", denoise="none", channels=1)
        mextra: dict[str, object] = {**extra, "kind": "mask"}
        if any(r.rle is not None for r in recs):  # run-length masks have no file of their own: key on their runs
            mextra["rle"] = hashlib.sha256(json.dumps([r.rle for r in recs]).encode()).hexdigest()

        def read_mask(p: object) -> np.ndarray:
            with bounded(policy):  # the site's pixel cap for the mask and the image read for its size
                return read_record_mask(record_of[p])

        msks = build_or_load(cache, [r.mask for r in recs], zeros[mine], mcfg, read_mask, extra=mextra)
        skipped = Counter(listing.skipped)
        skipped.update(imgs.skipped)
        skipped.update({k: v for k, v in msks.skipped.items() if k != "unreadable-image"})
        both = sorted(set(np.asarray(imgs.kept).tolist()) & set(np.asarray(msks.kept).tolist()))
        if not both:
            raise DataSourceError(f"no readable image/mask pair at this site (quarantined: {dict(skipped)})")
        pos_i = {k: j for j, k in enumerate(np.asarray(imgs.kept).tolist())}
        pos_m = {k: j for j, k in enumerate(np.asarray(msks.kept).tolist())}
        images = _acquire(np.array(imgs.images)[[pos_i[k] for k in both]], cfg, site)  # masks: never shifted
        masks = (np.array(msks.images)[[pos_m[k] for k in both]] > 127).astype(np.uint8)
        groups = all_groups[mine][both] if all_groups is not None else None
        kept = [recs[k] for k in both]
        attributes = manifest_attributes([r.extra for r in kept], (r.patient_id for r in listing.records))
    tr, va = train_val_split(np.zeros(len(images), dtype=np.int64), cfg.data.val_fraction,
                             seed=cfg.seed + 1 + int(site.partition_id or 0), groups=groups)
    empty = np.zeros(0, dtype=np.int64)
    with pixel_limit(input_policy(site).max_pixels):
        spacings = model_spacings([kept[int(i)] for i in va], pcfg) if kept is not None else []
    val_spacings = tuple(spacings) if any(s is not None for s in spacings) else None
    return SiteData(images[tr], empty, images[va], empty, task.class_names, dict(skipped),
                    train_masks=masks[tr], val_masks=masks[va], val_spacings=val_spacings,
                    val_attributes=_take(attributes, va))


def tiny_site_message(site_id: str, n_train: int, n_val: int, cfg: RunConfig) -> str | None:
    """Why a site's split is too small to trust (``None`` when it is not).

    ``min-train-images`` and ``min-val-images`` are the thresholds (0 = never).
    The site logs it in its own log; the server shows it once per run
    (:mod:`server.recorder`), from the split sizes the site reports.
    """
    short = []
    if n_train < cfg.data.min_train_images:
        short.append(f"{n_train} training images (min-train-images={cfg.data.min_train_images})")
    if n_val < cfg.data.min_val_images:
        short.append(f"{n_val} validation images (min-val-images={cfg.data.min_val_images})")
    if not short:
        return None
    return (f"{site_id} has only {' and '.join(short)}: its updates and metrics will be noisy; "
            "give it more data, simulate fewer sites or less size skew, or lower the threshold")


def warn_if_tiny(data: SiteData, cfg: RunConfig, site: SiteConfig) -> str | None:
    """Log (at WARNING, in the site's own log) when its train or validation split is tiny; return the message."""
    message = tiny_site_message(site.site_id, len(data.train_images), len(data.val_images), cfg)
    if message is not None:
        logger.warning("%s", message)
    return message


_CACHE: OrderedDict[tuple[object, ...], SiteData] = OrderedDict()
_CACHE_SIZE = 4


def load_site_data(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    """Load (or reuse from this process's cache) the data of one site.

    Flower's simulation reuses worker processes across rounds, so a site's
    images are decoded once per process, not once per round. A real site
    ignores the run config's path keys (:func:`shared.config.for_site`): it
    reads its node config's ``data-path`` only.
    """
    cfg = for_site(cfg, site)
    key = (task.name, cfg.data, cfg.partition, cfg.seed, cfg.test_path, site)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    t0 = time.perf_counter()
    if task.kind == SEGMENTATION:  # image/mask pairs instead of labelled images
        data = _load_segmentation(cfg, site, task)
    elif not site.simulated:
        data = _load_real_site(cfg, site, task)
    elif cfg.data.data_path:
        data = _load_partition_of_dataset(cfg, site, task)
    else:
        data = _load_partition_of_phantoms(cfg, site, task)
    data = dataclasses.replace(data, load_seconds=time.perf_counter() - t0)
    logger.info("site %s data: %s (%.1f s)", site.site_id, data.summary(), data.load_seconds)
    warn_if_tiny(data, cfg, site)
    _CACHE[key] = data
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return data


@dataclass(frozen=True)
class TestData:
    """A labelled test set the server scores the global model on (``test-path``): every image, no split."""

    images: Any  # uint8 tensor (N, C, H, W)
    targets: Any  # labels (N,) or masks (N, H, W)
    spacings: None = None
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Images in the test set."""
        return len(self.images)


def load_test_data(cfg: RunConfig, task: TaskSpec) -> TestData:
    """Read ``test-path`` through the same pipeline as the sites (all images; it is never partitioned).

    The test set is read like a real site's folder (same readers, quarantine
    rules and preprocessing; files may sit outside its folder since the
    operator names it), and both of that site's splits are used: nothing of it
    trains.
    """
    import torch

    from shared.training import images_to_tensor

    site = SiteConfig(site_id="test-set", data_path=cfg.test_path, allow_outside_data_root=True)
    data = load_site_data(cfg, site, task)
    images = images_to_tensor(np.concatenate([data.train_images, data.val_images]))
    targets = np.concatenate([data.train_targets, data.val_targets])
    t = torch.from_numpy(targets).long() if targets.ndim == 1 else torch.from_numpy(targets)
    return TestData(images=images, targets=t, skipped=dict(data.skipped))
