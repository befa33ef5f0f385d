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

Only counts are logged here: never a file path or a patient id.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.config import ConfigError, RunConfig, SiteConfig
from shared.data.partition import partition_indices
from shared.data.sources import DataSourceError, ImageListing, ImageReadError, discover, read_image
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

    def summary(self) -> str:
        """Counts only (safe to log)."""
        tr = np.bincount(self.train_labels, minlength=len(self.class_names)).tolist()
        va = np.bincount(self.val_labels, minlength=len(self.class_names)).tolist()
        skipped = f", skipped {dict(self.skipped)}" if self.skipped else ""
        return f"train {len(self.train_labels)} {tr}, validation {len(self.val_labels)} {va}{skipped}"


def class_mapping(found: tuple[str, ...], task_classes: tuple[str, ...]) -> np.ndarray:
    """Map a dataset's class indices onto the task's class order.

    Class names match case-insensitively (``NORMAL`` -> ``normal``).

    Raises
    ------
    DataSourceError
        When a dataset class is not one of the task's classes.
    """
    lookup = {c.lower(): i for i, c in enumerate(task_classes)}
    unknown = [c for c in found if c.lower() not in lookup]
    if unknown:
        raise DataSourceError(
            f"dataset classes {list(found)} do not match the task's classes {list(task_classes)}: "
            f"{unknown} unknown. Rename the class folders / manifest labels to the task's class names."
        )
    return np.array([lookup[c.lower()] for c in found], dtype=np.int64)


def resolve_path(path: str) -> Path:
    """Expand ``~`` and make a relative path absolute against ``MEDFED_DATA_ROOT`` or the cwd."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(os.environ.get("MEDFED_DATA_ROOT", os.getcwd())) / p
    return p


def _read_records(listing: ImageListing, indices: np.ndarray, size: int, skipped: Counter[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read the listed images at ``indices``; unreadable ones are counted and dropped."""
    images, keep = [], []
    for i in indices:
        try:
            images.append(read_image(listing.records[int(i)].path, size))
            keep.append(int(i))
        except ImageReadError:
            skipped["unreadable-image"] += 1
    if not images:
        raise DataSourceError(f"none of the {len(indices)} images of this site could be read")
    keep_arr = np.asarray(keep, dtype=np.int64)
    return np.stack(images), listing.labels()[keep_arr], keep_arr


def _split(images: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, cfg: RunConfig, salt: int) -> tuple[np.ndarray, ...]:
    tr, va = train_val_split(labels, cfg.data.val_fraction, seed=cfg.seed + salt, groups=groups)
    return images[tr], labels[tr], images[va], labels[va]


def _load_listing(path: str, task: TaskSpec) -> tuple[ImageListing, np.ndarray]:
    listing = discover(resolve_path(path))
    mapping = class_mapping(listing.class_names, task.class_names)
    return listing, mapping[listing.labels()]


def _load_real_site(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    listing, labels = _load_listing(site.data_path, task)
    skipped: Counter[str] = Counter(listing.skipped)
    images, _, keep = _read_records(listing, np.arange(len(listing.records)), cfg.data.image_size, skipped)
    labels = labels[keep]
    groups = listing.groups()
    groups = groups[keep] if groups is not None else None
    parts = _split(images, labels, groups, cfg, salt=0)
    return SiteData(*parts, class_names=task.class_names, skipped=dict(skipped))


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
    images, _, keep = _read_records(listing, mine, cfg.data.image_size, skipped)
    site_groups = groups[keep] if groups is not None else None
    split = _split(images, labels[keep], site_groups, cfg, salt=1 + int(site.partition_id or 0))
    return SiteData(*split, class_names=task.class_names, skipped=dict(skipped))


def _load_partition_of_phantoms(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    n = cfg.data.phantom_count
    mine = _my_partition(cfg, site, task.phantom_labels(n, cfg.seed), None)
    images, site_labels = task.render_phantoms(n, cfg.data.image_size, cfg.seed, mine)
    split = _split(images, site_labels, None, cfg, salt=1 + int(site.partition_id or 0))
    return SiteData(*split, class_names=task.class_names)


_CACHE: OrderedDict[tuple[object, ...], SiteData] = OrderedDict()
_CACHE_SIZE = 4


def load_site_data(cfg: RunConfig, site: SiteConfig, task: TaskSpec) -> SiteData:
    """Load (or reuse from this process's cache) the data of one site.

    Flower's simulation reuses worker processes across rounds, so a site's
    images are decoded once per process, not once per round.
    """
    key = (task.name, cfg.data.image_size, cfg.data.data_path, cfg.data.phantom_count,
           cfg.data.val_fraction, cfg.partition, cfg.seed, site)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    t0 = time.perf_counter()
    if not site.simulated:
        data = _load_real_site(cfg, site, task)
    elif cfg.data.data_path:
        data = _load_partition_of_dataset(cfg, site, task)
    else:
        data = _load_partition_of_phantoms(cfg, site, task)
    data = SiteData(
        data.train_images, data.train_labels, data.val_images, data.val_labels,
        data.class_names, data.skipped, load_seconds=time.perf_counter() - t0,
    )
    logger.info("site %s data: %s (%.1f s)", site.site_id, data.summary(), data.load_seconds)
    _CACHE[key] = data
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return data
