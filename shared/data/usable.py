"""The one decision whether a site may use a file, shared by the training loader and ``medfed data check``.

Every file at a hospital site is untrusted until checked. :func:`read_usable`
applies, in this order, everything that decides whether one listed file is
usable, and both the site's training loader
(:func:`shared.site_data.load_site_data`, through :func:`usable_reader`) and
the pre-flight check (:func:`shared.data_check.check_dataset`) call it, so
the two agree on what is usable and count the rest under the same reasons:

1. containment: the path, ``..`` and symlinks resolved, lies inside the data
   folder (``"outside-data-root"``), unless the site allows otherwise;
2. metadata and header (:func:`shared.data.sources.screen_image`): an
   existing (``"missing-file"``), non-empty (``"empty-file"``) regular file
   no larger than an image under the cap needs, whose header states at most
   :attr:`InputPolicy.max_pixels` pixels (``"too-large"``) -- nothing is
   decoded before this passes;
3. decoding with the caller's reader, under the same cap; its typed errors
   keep their reason (DICOM ``"corrupt"``, ``"multi-frame"``...), a
   ``MemoryError`` quarantines the file (``"out-of-memory"``) instead of
   ending the site's process, and any other exception from third-party
   decoders is counted as ``"reader-error"``;
4. content: a decoded array training would reject or learn nothing from
   (unsupported shape or dtype, no finite pixel, a constant image).

Discovery (:func:`shared.data.sources.discover`) applies step 1 to manifest
rows and symlinks when it lists the files; step 1 is repeated at read time
so that a file swapped for a symlink after listing is still refused.

Only reasons are counted and logged, never a path.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data.sources import (
    OUTSIDE_ROOT,
    ImageReadError,
    InputRejected,
    is_outside,
    pixel_limit,
    screen_image,
)
from shared.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_LIMIT

logger = logging.getLogger(__name__)

__all__ = [
    "OUT_OF_MEMORY",
    "READER_ERROR",
    "InputPolicy",
    "bounded",
    "content_problem",
    "quarantine_reason",
    "read_usable",
    "usable_reader",
]

OUT_OF_MEMORY = "out-of-memory"
"""Quarantine reason: decoding or preprocessing this one file raised ``MemoryError``."""
READER_ERROR = "reader-error"
"""Quarantine reason: a decoder raised something other than a typed read error."""
DEFAULT_REASON = "unreadable-image"
_REASON_RE = re.compile(r"^[a-z0-9][a-z0-9:._-]{0,47}$")


@dataclass(frozen=True)
class InputPolicy:
    """What a site accepts as input files.

    Attributes
    ----------
    max_pixels : int
        Cap on ``width x height (x frames)`` stated by a file's header
        (default :data:`shared.limits.DEFAULT_MAX_PIXELS`, 50 MP); node config
        ``max-image-pixels``, ``medfed data check --max-pixels``.
    allow_outside_root : bool
        Read files that resolve outside the data folder (``../`` manifest
        rows, symlinks). Off by default; node config
        ``allow-outside-data-root=true``, ``medfed data check --allow-outside-root``.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_outside_root: bool = False

    def __post_init__(self) -> None:
        m = self.max_pixels
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_PIXELS_LIMIT:
            raise ValueError(f"max_pixels must be an integer in [1, {MAX_PIXELS_LIMIT}], got {m!r}")
        if not isinstance(self.allow_outside_root, bool):
            raise ValueError(f"allow_outside_root must be true or false, got {self.allow_outside_root!r}")


def quarantine_reason(exc: BaseException) -> str:
    """A read error's count label (its ``reason``); anything that is not a short code is ``"unreadable-image"``."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and _REASON_RE.match(reason):
        return reason
    return DEFAULT_REASON


def content_problem(img: np.ndarray) -> str | None:
    """Reason to quarantine a decoded array that training would reject or learn nothing from, else ``None``."""
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)) or img.size == 0:
        return "unsupported-shape"
    if img.dtype.kind not in "uifb":
        return "unsupported-dtype"
    if img.dtype.kind == "f" and not np.isfinite(img).any():
        return "non-finite-pixels"
    values = img[np.isfinite(img)] if img.dtype.kind == "f" else img
    if values.min() == values.max():
        return "constant-image"  # no information; never train on it silently
    return None


@contextmanager
def bounded(policy: InputPolicy) -> Iterator[None]:
    """Run a read under ``policy``'s pixel cap; a ``MemoryError`` becomes :class:`InputRejected` ``"out-of-memory"``.

    For reads that are not a single listed file (a run-length mask read
    together with its image); :func:`read_usable` does this itself.
    """
    try:
        with pixel_limit(policy.max_pixels):
            yield
    except MemoryError:
        logger.warning("a file ran out of memory while being read: quarantined as %s", OUT_OF_MEMORY)
        raise InputRejected(OUT_OF_MEMORY, "ran out of memory while reading this file") from None


def read_usable(
    path: Path,
    reader: Callable[[Path], np.ndarray],
    *,
    policy: InputPolicy = InputPolicy(),  # noqa: B008 (frozen)
    root: Path | None = None,
    check_content: bool = True,
) -> np.ndarray:
    """Decode one listed file if, and only if, the site may use it.

    Parameters
    ----------
    path : Path
        The file.
    reader : Callable[[Path], np.ndarray]
        Decodes it (e.g. :func:`shared.data.sources.read_raw`, or the
        pipeline's :func:`shared.data.reading.make_reader`); runs with
        ``policy.max_pixels`` as the cap in force.
    policy : InputPolicy
        The site's cap and containment setting.
    root : Path, optional
        The resolved data folder (``ImageListing.root``); ``None`` skips the
        containment check (files given one by one, e.g. ``medfed predict``).
    check_content : bool
        Apply :func:`content_problem` to the decoded array (off for masks,
        which may well be constant).

    Returns
    -------
    np.ndarray
        What ``reader`` returned.

    Raises
    ------
    ImageReadError
        Always with a ``reason`` (see the module docstring): an
        :class:`InputRejected` for the checks made here, or the reader's own
        typed error.
    """
    path = Path(path)
    name = path.name
    if root is not None and not policy.allow_outside_root and is_outside(path, root):
        raise InputRejected(OUTSIDE_ROOT, f"'{name}' resolves outside the site's data folder")
    try:
        with pixel_limit(policy.max_pixels):
            screen_image(path)
            img = reader(path)
            problem = content_problem(img) if check_content else None
    except MemoryError:
        logger.warning("a file ran out of memory while being read: quarantined as %s", OUT_OF_MEMORY)
        raise InputRejected(OUT_OF_MEMORY, f"'{name}': ran out of memory while reading it") from None
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - one hostile file must not end the site: counted, never crashes
        logger.debug("a reader raised %s: quarantined as %s", type(exc).__name__, READER_ERROR)
        raise InputRejected(READER_ERROR, f"'{name}': the decoder failed ({type(exc).__name__})") from None
    if problem is not None:
        raise InputRejected(problem, f"'{name}' is not usable ({problem})")
    return img


def usable_reader(
    reader: Callable[[Path], np.ndarray],
    policy: InputPolicy,
    root: Path | None,
    *,
    check_content: bool = True,
) -> Callable[[Path], np.ndarray]:
    """``reader`` wrapped in :func:`read_usable`, for :func:`shared.data.cache.build_or_load`."""
    return functools.partial(_read_one, reader, policy, root, check_content)


def _read_one(
    reader: Callable[[Path], np.ndarray], policy: InputPolicy, root: Path | None, check_content: bool, path: Path
) -> np.ndarray:
    return read_usable(path, reader, policy=policy, root=root, check_content=check_content)
