"""How a site reads its files: path resolution, the decoder for each file, its input policy, the cache location.

Only counts are logged by callers of these helpers: never a file path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from shared.data.dicom import DicomOptions, read_dicom
from shared.data.sources import read_raw
from shared.data.usable import InputPolicy
from shared.settings import RunConfig, SiteConfig

__all__ = ["DICOM_SUFFIXES", "READER_VERSION", "cache_root", "input_policy", "make_reader", "resolve_path"]

# bump when decoding changes: invalidates every site cache. 2: header screening, constant 8-bit images quarantined
READER_VERSION = "medfed-reader-2"
DICOM_SUFFIXES = (".dcm", ".dicom")


def resolve_path(path: str) -> Path:
    """Expand ``~`` and make a relative path absolute against ``MEDFED_DATA_ROOT`` or the cwd."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(os.environ.get("MEDFED_DATA_ROOT", os.getcwd())) / p
    return p


def input_policy(site: SiteConfig) -> InputPolicy:
    """The site's input policy from its node config (``max-image-pixels``, ``allow-outside-data-root``).

    A real site is held to its ``data-path`` folder unless its node config
    says ``allow-outside-data-root=true``. A simulated site is not: it reads
    the run's own dataset, chosen by whoever runs the simulation on their
    machine (often a subset manifest listing files elsewhere), and Flower
    gives simulated sites no node config in which to allow it. The pixel cap
    applies to both.
    """
    allow = site.allow_outside_data_root or site.simulated
    return InputPolicy(max_pixels=site.max_image_pixels, allow_outside_root=allow)


def make_reader(cfg: RunConfig) -> Callable[[Path], np.ndarray]:
    """Decode one file for the pipeline: DICOM via :func:`read_dicom`, others via the registry (RGB order).

    Both refuse a file over the pixel cap in force before decoding it
    (:func:`shared.data.sources.pixel_limit`; the default outside one). A
    site reads through :func:`shared.data.usable.usable_reader`, which sets
    the site's own cap and applies the rest of its input policy.
    """
    options = DicomOptions(window_fallback=cfg.data.dicom_window_fallback)

    def read(path: Path) -> np.ndarray:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return read_dicom(path, options)
        img = read_raw(path)
        if img.ndim == 3 and img.shape[2] == 4:
            return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        if img.ndim == 3 and img.shape[2] == 3:
            return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return img

    return read


def cache_root(site: SiteConfig) -> Path:
    """Where this site caches preprocessed images.

    Node config ``cache-dir``, ``$MEDFED_CACHE_DIR`` or ``~/.cache/medfed``.
    """
    root = site.cache_dir or os.environ.get("MEDFED_CACHE_DIR") or "~/.cache/medfed"
    return Path(root).expanduser()
