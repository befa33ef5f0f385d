"""Three-class chest phantoms: normal, bacterial and viral pneumonia.

The patients are the chest phantoms of :mod:`shared.data.phantoms` (same
anatomy, exposure, distractors and noise for the same ``(seed, index)``); only
the finding drawn into the lungs differs with the label:

* **normal** (0): nothing added.
* **bacterial** (1): lobar consolidation. One lobe of one lung (upper, middle
  or lower zone, bounded by a sharp fissure) is densely opacified, patchy
  inside, with a few air bronchograms (dark branching lines). In about a fifth
  of the cases it is small and faint; in about one in seven a second, smaller
  focus sits in the other lung.
* **viral** (2): bilateral diffuse interstitial pattern. A perihilar haze in
  both lungs, fanning out from the hila, overlaid with a fine reticular
  network. About a fifth are faint; the two sides are never exactly equal.

Determinism is as in :mod:`shared.data.phantoms`: pixels depend only on
``(seed, index, size, label)`` and labels only on ``(seed, index, probs)``,
from their own hash, so this set's labels are independent of the binary
set's. The three labels of one index are the same patient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

from shared.data.phantoms import (
    _MIN_RENDER,
    MAX_SIZE,
    MIN_SIZE,
    _Anatomy,
    _blob_shape,
    _check_indices,
    _check_int,
    _compose,
    _curves_layer,
    _Grid,
    _low_freq,
    _mask_to_bool,
    _ramp,
    _splitmix64,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PNEUMONIA_SUBTYPE_CLASSES",
    "make_pneumonia_subtype_phantoms",
    "pneumonia_subtype_labels",
    "render_pneumonia_subtype_phantom",
]

PNEUMONIA_SUBTYPE_CLASSES: tuple[str, ...] = ("normal", "bacterial", "viral")

_LABEL_SALT = 0x33434C53_4C41424C  # "3CLSLABL"
_MAX_SEED = 2**63 - 1
_P_HARD = 0.2  # fraction of diseased phantoms with only a faint/small finding
_P_SECOND_FOCUS = 0.15  # bacterial: a second, smaller focus in the other lung
_DEFAULT_PROBS = (1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0)


# ---------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------


def _check_probs(probs: object) -> np.ndarray:
    try:
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"probs must be three class probabilities (normal, bacterial, viral), got {probs!r}") from None
    if p.shape != (3,) or not np.all(np.isfinite(p)) or np.any(p <= 0.0) or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError(
            f"probs must be three positive probabilities (normal, bacterial, viral) summing to 1, got {probs!r}"
        )
    return p


def _labels_of(indices: np.ndarray, seed: int, probs: np.ndarray) -> np.ndarray:
    base = _splitmix64(np.asarray([seed ^ _LABEL_SALT], dtype=np.uint64))
    h = _splitmix64(base ^ _splitmix64(indices.astype(np.uint64)))
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
    edges = np.cumsum(probs)[:-1]
    return np.searchsorted(edges, u, side="right").astype(np.int64)


def pneumonia_subtype_labels(n: int, seed: int = 0, probs: Sequence[float] = _DEFAULT_PROBS) -> np.ndarray:
    """Labels of 3-class phantoms ``0..n-1`` (0 normal, 1 bacterial, 2 viral), cheap (no rendering).

    Parameters
    ----------
    n : int
        Number of phantoms in the set, ``>= 1``.
    seed : int, optional
        Non-negative seed of the set.
    probs : sequence of 3 float, optional
        Class probabilities (normal, bacterial, viral), positive, summing to 1.

    Returns
    -------
    np.ndarray
        ``int64`` labels, shape ``(n,)``; label ``i`` depends only on ``(seed, i, probs)``.

    Raises
    ------
    ValueError
        If ``n < 1``, ``seed < 0`` or ``probs`` is not three positive probabilities summing to 1.
    """
    n = _check_int(n, "n", 1)
    seed = _check_int(seed, "seed", 0, _MAX_SEED)
    return _labels_of(np.arange(n, dtype=np.uint64), seed, _check_probs(probs))


# ---------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------


def _side(g: _Grid, sign: float) -> np.ndarray:
    """Soft indicator of one half of the image (``sign`` -1 image left, +1 image right)."""
    return _ramp(g.u * sign, 0.04)


def _air_bronchograms(g: _Grid, lung_sign: float, centre: tuple[float, float],
                      rng: np.random.Generator) -> np.ndarray:
    """A few dark branching lines running from the hilum side into a consolidation."""
    layer = np.zeros((g.r, g.r), np.float32)
    k = int(rng.integers(2, 5))
    hu = lung_sign * rng.uniform(0.12, 0.18)
    for _ in range(k):
        t = np.linspace(0.0, 1.0, 6)
        end = (centre[0] + rng.normal(0.0, 0.08), centre[1] + rng.normal(0.0, 0.08))
        start = (hu + 0.5 * (centre[0] - hu), centre[1] + rng.normal(0.0, 0.05))
        u = start[0] + (end[0] - start[0]) * t + rng.normal(0.0, 0.01, t.size)
        v = start[1] + (end[1] - start[1]) * t + rng.normal(0.0, 0.01, t.size)
        _curves_layer(g, u[None], v[None], 0.018, value=1.0, layer=layer)
    return layer


def _lobar_focus(g: _Grid, a: _Anatomy, lungs: np.ndarray, rng: np.random.Generator, lung_index: int,
                 hard: bool, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """One lobar consolidation: a lung zone cut by a sloping fissure, patchy, with air bronchograms."""
    lung = a.lungs[lung_index]
    own = lungs * _side(g, lung.sign)
    span = lung.base - lung.apex
    zone = int(rng.integers(0, 3))  # upper, middle, lower lobe
    slope = rng.uniform(-0.25, 0.25)
    au = g.u * lung.sign  # distance from the midline into this lung
    if zone == 0:
        fissure = lung.apex + span * rng.uniform(0.38, 0.5) + slope * (au - 0.4)
        lobe = _ramp(fissure - g.v, 0.02)
        centre_v = 0.5 * (lung.apex + fissure.mean())
    elif zone == 1:
        top = lung.apex + span * rng.uniform(0.35, 0.45) + slope * (au - 0.4)
        bottom = top + span * rng.uniform(0.25, 0.35)
        lobe = _ramp(g.v - top, 0.02) * _ramp(bottom - g.v, 0.02)
        centre_v = 0.5 * (top.mean() + bottom.mean())
    else:
        fissure = lung.apex + span * rng.uniform(0.5, 0.62) + slope * (au - 0.4)
        lobe = _ramp(g.v - fissure, 0.02)
        centre_v = 0.5 * (fissure.mean() + lung.base)
    centre_u = lung.sign * 0.5 * (lung.medial + lung.lateral)
    if hard:
        radius, amp = rng.uniform(0.10, 0.16), rng.uniform(0.06, 0.11)
    else:
        radius, amp = rng.uniform(0.3, 0.5), rng.uniform(0.26, 0.42)
    radius *= scale
    # The consolidation fills much of the lobe (sharp at the fissure, soft elsewhere) and is patchy inside.
    patch = _blob_shape(g, rng, (centre_u, float(centre_v)), radius)
    fill = np.clip(2.0 * patch, 0.0, 1.0) * lobe * own
    fill *= 0.8 + 0.2 * np.tanh(_low_freq(rng, g.r, 10))
    bronchi = _air_bronchograms(g, lung.sign, (centre_u, float(centre_v)), rng)
    layer = amp * scale * fill * (1.0 - 0.45 * bronchi)
    return layer.astype(np.float32), (fill > 0.5) & (lungs > 0.5)


def bacterial_findings(g: _Grid, a: _Anatomy, lungs: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lobar consolidation (dense, focal, mostly one lung): (added intensity, boolean region)."""
    hard = rng.random() < _P_HARD
    first = int(rng.integers(0, 2))
    layer, region = _lobar_focus(g, a, lungs, rng, first, hard, 1.0)
    if not hard and rng.random() < _P_SECOND_FOCUS:
        extra, extra_region = _lobar_focus(g, a, lungs, rng, 1 - first, False, 0.6)
        layer, region = layer + extra, region | extra_region
    return layer, region


def viral_findings(g: _Grid, a: _Anatomy, lungs: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bilateral diffuse interstitial, perihilar pattern: (added intensity, boolean region)."""
    hard = rng.random() < _P_HARD
    haze_amp = rng.uniform(0.03, 0.05) if hard else rng.uniform(0.09, 0.15)
    net_amp = rng.uniform(0.04, 0.06) if hard else rng.uniform(0.08, 0.14)
    weight = np.zeros((g.r, g.r), np.float32)
    for lung in a.lungs:
        hu, hv = lung.sign * rng.uniform(0.12, 0.2), rng.uniform(-0.15, 0.05)
        su, sv = rng.uniform(0.22, 0.36), rng.uniform(0.3, 0.45)
        side_gain = rng.uniform(0.75, 1.0)
        fan = np.exp(-0.5 * (((g.u - hu) / su) ** 2 + ((g.v - hv) / sv) ** 2))
        weight = np.maximum(weight, side_gain * fan * _side(g, lung.sign))
    # Reticular network: the ridges (zero crossings) of a smooth random field.
    cells = int(rng.integers(20, 28))
    ridges = np.clip(1.0 - np.abs(_low_freq(rng, g.r, cells)) / 0.35, 0.0, 1.0) ** 2
    layer = (haze_amp + net_amp * ridges) * weight * lungs
    return layer.astype(np.float32), (weight > 0.5) & (lungs > 0.5)


_FINDINGS = {1: bacterial_findings, 2: viral_findings}


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _render(index: int, label: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = max(size, _MIN_RENDER)
    img, mask = _compose(r, index, 0, seed, findings=_FINDINGS.get(label))
    if r != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        if label:
            mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    image = np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return image, (_mask_to_bool(mask) if label else np.zeros((size, size), bool))


def render_pneumonia_subtype_phantom(index: int, label: int, size: int = 64,
                                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one 3-class chest phantom.

    Parameters
    ----------
    index : int
        Non-negative index of the phantom in its set; selects the patient.
    label : int
        0 normal, 1 bacterial (lobar consolidation), 2 viral (bilateral interstitial).
    size : int, optional
        Output height and width in pixels, 16..1024.
    seed : int, optional
        Non-negative seed of the set.

    Returns
    -------
    image : np.ndarray
        ``uint8``, shape ``(size, size)``.
    finding_mask : np.ndarray
        ``bool``, shape ``(size, size)``: where the finding is; all False for normal.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    index = _check_int(index, "index", 0)
    label = _check_int(label, "label", 0, len(PNEUMONIA_SUBTYPE_CLASSES) - 1)
    size = _check_int(size, "size", MIN_SIZE, MAX_SIZE)
    seed = _check_int(seed, "seed", 0, _MAX_SEED)
    return _render(index, label, size, seed)


def make_pneumonia_subtype_phantoms(
    n: int,
    size: int = 64,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    probs: Sequence[float] = _DEFAULT_PROBS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render 3-class chest phantoms of a set of ``n`` (all, or the given ``indices``).

    Parameters
    ----------
    n : int
        Size of the set, ``>= 1``.
    size : int, optional
        Image height and width in pixels, 16..1024.
    seed : int, optional
        Non-negative seed of the set.
    indices : sequence of int or np.ndarray, optional
        Which phantoms to render, each in ``[0, n)``, in the order given. Default: ``range(n)``.
    probs : sequence of 3 float, optional
        Class probabilities (normal, bacterial, viral), positive, summing to 1.

    Returns
    -------
    images : np.ndarray
        ``uint8``, shape ``(k, size, size)``.
    labels : np.ndarray
        ``int64``, shape ``(k,)``, equal to ``pneumonia_subtype_labels(n, seed, probs)[indices]``.
    masks : np.ndarray
        ``bool``, shape ``(k, size, size)``: the finding; empty for normals.

    Raises
    ------
    ValueError
        If an argument is out of range or ``indices`` is not a 1-D integer array within ``[0, n)``.
    """
    n = _check_int(n, "n", 1)
    size = _check_int(size, "size", MIN_SIZE, MAX_SIZE)
    seed = _check_int(seed, "seed", 0, _MAX_SEED)
    p = _check_probs(probs)
    idx = _check_indices(indices, n)
    labels = _labels_of(idx.astype(np.uint64), seed, p)
    images = np.empty((idx.size, size, size), np.uint8)
    masks = np.zeros((idx.size, size, size), bool)
    for row, (i, y) in enumerate(zip(idx.tolist(), labels.tolist(), strict=True)):
        images[row], masks[row] = _render(i, y, size, seed)
    logger.debug("rendered %d 3-class chest phantoms (per class %s) at %d px",
                 idx.size, np.bincount(labels, minlength=3).tolist(), size)
    return images, labels, masks

