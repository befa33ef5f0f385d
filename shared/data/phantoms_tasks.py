"""Synthetic phantoms for the other clinical tasks, and per-site acquisition profiles.

Four tasks beside the chest "pneumonia" phantoms of :mod:`shared.data.phantoms`:

* **Pneumothorax** (chest X-ray, ``PNEUMOTHORAX_CLASSES``): one lung has partly
  collapsed towards the hilum. Between the chest wall and the thin, bright
  visceral pleural line the field is more lucent and carries no lung markings
  (no vessels, no parenchymal texture). Sizes range from a small apical rim to a
  large collapse; returned with the pneumothorax mask. Skin folds (a lateral
  edge that looks like a pleural line but has markings beyond it) occur in both
  classes. ``conspicuous=True`` (the segmentation task's rendering) darkens the
  pleural space clearly, so the region can be delineated at 64 px.
* **Lung-field segmentation** (chest X-ray): every image has a mask of both lung
  fields (heart and mediastinum excluded). About a third carry opacities inside
  the lungs, which stay in the mask, so "dark pixels" is not the answer.
* **NEC** (neonatal abdominal X-ray, ``NEC_CLASSES``): infant abdomen with the
  lung bases, ribs, liver shadow, spine, faint pelvis and gas-filled bowel loops.
  Surgical cases show pneumoperitoneum (football sign with the falciform
  ligament, a subdiaphragmatic crescent, Rigler's sign), extensive pneumatosis
  intestinalis (bubbly and linear gas in the bowel wall) and/or portal venous
  gas (branching lucencies over the liver). Non-surgical cases are normal or have
  focal pneumatosis. About 20 % of each class are borderline and drawn from one
  shared "mild findings" distribution. Tubes, lines, ECG leads and mottled stool
  occur in both classes.
* **Necrotizing fasciitis** (RGB skin photograph, ``NF_CLASSES``): a limb or
  close-up of skin (light to dark tones) on a drape or sheet, with lighting and
  white-balance variation. Both classes have erythema; NF adds dusky/violaceous
  patches, haemorrhagic bullae, grey-black necrosis and sharp demarcation,
  cellulitis has soft-edged erythema and sometimes small clear blisters. About
  20 % of each class are borderline (early NF without necrosis; cellulitis with a
  dusky tinge or a haemorrhagic-looking blister). Marker-pen outlines, rulers
  and dressings occur in both classes.

Acquisition profiles (:class:`AcquisitionProfile`, :func:`site_profile`,
:func:`apply_profile`) make sites differ in more than their labels: contrast,
gamma, brightness, noise, blur, resolution and (photos) colour cast.

Determinism
-----------
As in :mod:`shared.data.phantoms`: the pixels of phantom ``i`` depend only on
``(seed, i, size)`` (and its label), labels only on ``(seed, i, prevalence)``,
and each task has its own random streams, so the four sets of one seed are
independent. Anatomy/scene, noise and findings come from separate streams; for
the X-ray tasks the two labels of one index are the same patient. Sizes below
64 px are rendered at 64 px and reduced with ``cv2.INTER_AREA``.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import cv2
import numpy as np

from shared.data.phantoms import (
    MAX_SIZE,
    MIN_SIZE,
    _blob_shape,
    _blur,
    _body,
    _check_disparity,
    _check_indices,
    _check_int,
    _check_prevalence,
    _clavicles,
    _curves_layer,
    _distractors,
    _ellipse,
    _expose,
    _faded,
    _Grid,
    _lesions,
    _low_freq,
    _lung_field,
    _mask_to_bool,
    _mediastinum,
    _ramp,
    _ribs,
    _sample_anatomy,
    _spine,
    _splitmix64,
    _stamp,
    _vessels,
)

logger = logging.getLogger(__name__)

__all__ = [
    "NEC_CLASSES",
    "NF_CLASSES",
    "PNEUMOTHORAX_CLASSES",
    "AcquisitionProfile",
    "apply_profile",
    "lung_seg_labels",
    "make_lung_seg_phantoms",
    "make_nec_phantoms",
    "make_nf_phantoms",
    "make_pneumothorax_phantoms",
    "nec_labels",
    "nf_labels",
    "pneumothorax_labels",
    "render_pneumothorax_phantom",
    "site_profile",
]

PNEUMOTHORAX_CLASSES: tuple[str, ...] = ("absent", "present")
NEC_CLASSES: tuple[str, ...] = ("no-surgery", "surgery")
NF_CLASSES: tuple[str, ...] = ("other-infection", "necrotizing-fasciitis")

_MIN_RENDER = 64
_MAX_SEED = 2**63 - 1

# Task codes: mixed into every random stream and label hash so the tasks' sets are independent.
_TASK_PTX, _TASK_LUNGSEG, _TASK_NEC, _TASK_NF, _TASK_SITE = 11, 12, 13, 14, 15
_LABEL_SALTS = {
    _TASK_PTX: 0x5054584C_41424C53,  # "PTXLABLS"
    _TASK_NEC: 0x4E45434C_41424C53,  # "NECLABLS"
    _TASK_NF: 0x4E464C41_424C5321,  # "NFLABLS!"
}
_STREAM_SCENE, _STREAM_NOISE, _STREAM_FINDING = 0, 1, 2
_P_BORDERLINE = 0.2
# Extra darkening of the pleural space in pneumothorax phantoms rendered for segmentation: at 64 px
# the classification phantoms' lucency (0.01-0.09) is too faint to delineate the region.
_CONSPICUOUS_LUCENCY = 0.12


# ---------------------------------------------------------------------------
# Labels, streams, shared plumbing
# ---------------------------------------------------------------------------


def _task_labels(indices: np.ndarray, seed: int, prevalence: float, task: int) -> np.ndarray:
    base = _splitmix64(np.asarray([seed ^ _LABEL_SALTS[task]], dtype=np.uint64))
    h = _splitmix64(base ^ _splitmix64(indices.astype(np.uint64)))
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (u < prevalence).astype(np.int64)


def _labels_api(n: int, seed: int, prevalence: float, task: int) -> np.ndarray:
    n = _check_int(n, "n", 1)
    seed = _check_int(seed, "seed", 0, _MAX_SEED)
    p = _check_prevalence(prevalence)
    return _task_labels(np.arange(n, dtype=np.uint64), seed, p, task)


def _rng(seed: int, index: int, task: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, task], spawn_key=(stream,)))


def _validate_set(n: object, size: object, seed: object, indices: object,
                  prevalence: object | None = None) -> tuple[int, int, int, np.ndarray, float]:
    n_ = _check_int(n, "n", 1)
    size_ = _check_int(size, "size", MIN_SIZE, MAX_SIZE)
    seed_ = _check_int(seed, "seed", 0, _MAX_SEED)
    p = _check_prevalence(prevalence) if prevalence is not None else 0.5
    idx = _check_indices(indices, n_)  # type: ignore[arg-type]
    return n_, size_, seed_, idx, p


def _to_uint8(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


def _mask_out(mask: np.ndarray, size: int, keep_peak: bool) -> np.ndarray:
    if mask.shape[0] != size:
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    return _mask_to_bool(mask) if keep_peak else mask >= 0.5


def _warp_all(layers: list[np.ndarray], a: object, g: _Grid) -> list[np.ndarray]:
    """Patient position (the chest phantoms' rotation, scale and shift) applied to image and masks alike."""
    centre = (g.r / 2.0 - 0.5, g.r / 2.0 - 0.5)
    m = cv2.getRotationMatrix2D(centre, a.angle, a.scale)  # type: ignore[attr-defined]
    m[0, 2] += a.shift[0] * g.px  # type: ignore[attr-defined]
    m[1, 2] += a.shift[1] * g.px  # type: ignore[attr-defined]
    out = [cv2.warpAffine(layers[0], m, (g.r, g.r), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)]
    for layer in layers[1:]:
        out.append(cv2.warpAffine(layer, m, (g.r, g.r), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
                   if layer.any() else layer)
    return out


# ---------------------------------------------------------------------------
# Chest X-ray tasks: pneumothorax and lung-field segmentation
# ---------------------------------------------------------------------------


def _collapsed_lung(g: _Grid, lung: object, rng: np.random.Generator) -> np.ndarray:
    """Soft field of a lung shrunk towards its medial base (the hilum side): small apical rim to large."""
    kind = rng.choice(3, p=[0.35, 0.4, 0.25])
    if kind == 0:  # small apical rim
        sx, sy = rng.uniform(0.92, 0.99), rng.uniform(0.80, 0.92)
    elif kind == 1:  # moderate: apex and lateral wall
        sx, sy = rng.uniform(0.74, 0.88), rng.uniform(0.68, 0.84)
    else:  # large collapse
        sx, sy = rng.uniform(0.45, 0.65), rng.uniform(0.45, 0.65)
    au = lung.sign * (lung.medial + 0.02)  # type: ignore[attr-defined]
    av = lung.base - 0.04  # type: ignore[attr-defined]
    shrunk = SimpleNamespace(u=(au + (g.u - au) / sx).astype(np.float32),
                             v=(av + (g.v - av) / sy).astype(np.float32))
    return _lung_field(shrunk, lung)  # type: ignore[arg-type]


def _skin_fold(g: _Grid, a: object, rng: np.random.Generator) -> np.ndarray:
    """A skin fold: a soft vertical-ish edge over the lateral chest (a pleural-line mimic with markings beyond)."""
    lung = a.lungs[int(rng.integers(0, 2))]  # type: ignore[attr-defined]
    u0 = lung.sign * rng.uniform(0.55, 0.8) * lung.lateral
    tilt = rng.uniform(-0.25, 0.25)
    d = (g.u - u0 - tilt * g.v) * lung.sign  # > 0 laterally
    band = _ramp(0.35 - np.abs(g.v - rng.uniform(-0.2, 0.3)), 0.2)
    return band * np.clip(1.0 + d / 0.08, 0.0, 1.0) * (d <= 0)  # bright medially, a sharp edge laterally


def _compose_chest(r: int, index: int, seed: int, task: int, ptx: bool,
                   opacities: bool, conspicuous: bool = False,
                   fade: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chest image in [0, 1], lung-field mask and pneumothorax mask (float), at render size ``r``.

    ``conspicuous`` darkens the pleural space by a further ``_CONSPICUOUS_LUCENCY`` (same random
    draws: masks, absent cases and pixels away from the pleural space are unchanged).
    ``fade`` > 0 (a planted disparity) makes the pneumothorax signs (lucency, denser collapsed lung,
    pleural line) ``1 - fade`` as strong, after the same random draws: masks are unchanged.
    """
    arng = _rng(seed, index, task, _STREAM_SCENE)
    nrng = _rng(seed, index, task, _STREAM_NOISE)
    frng = _rng(seed, index, task, _STREAM_FINDING)
    a = _sample_anatomy(arng)
    g = _Grid(r)

    body = _body(g, a)
    media = _mediastinum(g, a)
    fields_ = [_lung_field(g, lung) for lung in a.lungs]
    lungs = np.maximum(fields_[0], fields_[1]) * (1.0 - media)
    lung_depth = 0.36 * arng.uniform(0.85, 1.15) * (1.0 - 0.22 * np.clip(g.v + 0.2, 0.0, 1.0))
    lung_depth = lung_depth * (1.0 - 0.25 * np.clip(np.abs(g.u) - 0.45, 0.0, 1.0) / 0.35)

    gap = np.zeros((r, r), np.float32)  # pneumothorax: pleural space (soft, 0..1)
    pleura = np.zeros((r, r), np.float32)
    collapsed = None
    side = int(frng.integers(0, 2))
    if ptx:
        lung = a.lungs[side]
        collapsed = _collapsed_lung(g, lung, frng) * (1.0 - media)
        own = fields_[side] * (1.0 - media)
        gap = np.clip(own - collapsed, 0.0, 1.0).astype(np.float32)
        inner = _ramp(own - 0.5, 0.5)  # keep the line off the lung's own border
        pleura = (4.0 * collapsed * (1.0 - collapsed) * inner).astype(np.float32)

    img = 0.05 + 0.50 * arng.uniform(0.9, 1.1) * body
    img = img - lung_depth * lungs
    img += 0.10 * media * body
    trachea = _ramp(0.028 - np.abs(g.u - 0.005), 0.02) * (g.v < -0.32) * body
    img -= 0.12 * trachea
    left = a.lungs[1]
    if arng.random() < 0.6:
        q = _ellipse(g, 0.4, left.base - left.dome + 0.12, arng.uniform(0.09, 0.16), 0.07, 0.0)
        img -= 0.18 * _ramp((1.0 - q) * 0.05, 0.03)
    img += 0.05 * _spine(g) * body
    below = _ramp(max(lung.base for lung in a.lungs) + 0.06 - g.v, 0.1)
    img += a.rib_gain * _ribs(g, a, arng) * body * (0.3 + 0.7 * lungs) * below
    img += 0.12 * _clavicles(g, a) * body
    markings = 1.0 - gap  # no lung markings in the pleural space
    img += 0.09 * a.vessel_gain * _vessels(g, a, arng) * (0.3 + 0.7 * lungs) * markings
    img += _distractors(g, a, lungs, body, arng)
    if arng.random() < 0.2:
        img += arng.uniform(0.03, 0.06) * _skin_fold(g, a, arng) * body
    img += arng.uniform(0.012, 0.028) * _low_freq(nrng, r, 24) * lungs * markings
    img += arng.uniform(0.01, 0.03) * _low_freq(nrng, r, 5) * body

    if ptx:
        vis = 1.0 - fade  # exactly 1.0 without a planted disparity: x * 1.0 == x
        lucency = frng.uniform(0.03, 0.09) if frng.random() > _P_BORDERLINE else frng.uniform(0.01, 0.03)
        img -= (lucency + (_CONSPICUOUS_LUCENCY if conspicuous else 0.0)) * vis * gap
        img += frng.uniform(0.02, 0.05) * vis * collapsed * (1.0 - gap)  # the collapsed lung is denser
        img += frng.uniform(0.08, 0.16) * vis * pleura
    if opacities and frng.random() < 0.35:
        lesion, _ = _lesions(g, a, lungs, frng)
        img += np.minimum(lesion, 0.9 * lung_depth)

    img, lung_mask, gap = _warp_all([img.astype(np.float32), lungs.astype(np.float32), gap], a, g)
    img = _blur(img, arng.uniform(0.006, 0.02) * g.px)
    img = _expose(img, arng)
    img += nrng.standard_normal((r, r), dtype=np.float32) * np.float32(arng.uniform(0.006, 0.025))
    return img, lung_mask, gap


def pneumothorax_labels(n: int, seed: int = 0, prevalence: float = 0.5) -> np.ndarray:
    """Labels of pneumothorax phantoms ``0..n-1`` (1 = "present"), cheap (no rendering).

    Parameters
    ----------
    n : int
        Number of phantoms in the set, ``>= 1``.
    seed : int, optional
        Non-negative seed of the set.
    prevalence : float, optional
        Probability of "present", strictly between 0 and 1.

    Returns
    -------
    np.ndarray
        ``int64`` labels, shape ``(n,)``; label ``i`` depends only on ``(seed, i, prevalence)``.

    Raises
    ------
    ValueError
        If ``n < 1``, ``seed < 0`` or ``prevalence`` is outside ``(0, 1)``.
    """
    return _labels_api(n, seed, prevalence, _TASK_PTX)


def render_pneumothorax_phantom(index: int, label: int, size: int = 64,
                                seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one pneumothorax phantom with its pneumothorax and lung-field masks.

    Parameters
    ----------
    index : int
        Non-negative index of the phantom in its set; selects the patient.
    label : int
        0 ("absent") or 1 ("present").
    size : int, optional
        Output height and width in pixels, 16..1024.
    seed : int, optional
        Non-negative seed of the set.

    Returns
    -------
    image : np.ndarray
        ``uint8``, shape ``(size, size)``.
    ptx_mask : np.ndarray
        ``bool``: the pleural space (pneumothorax); all False for "absent", never empty for "present".
    lung_mask : np.ndarray
        ``bool``: both lung fields as they would be without the collapse (the thoracic lung area).

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    index = _check_int(index, "index", 0)
    label = _check_int(label, "label", 0, 1)
    size = _check_int(size, "size", MIN_SIZE, MAX_SIZE)
    seed = _check_int(seed, "seed", 0, _MAX_SEED)
    return _render_ptx(index, label, size, seed)


def _render_ptx(index: int, label: int, size: int, seed: int, conspicuous: bool = False,
                fade: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img, lungs, gap = _compose_chest(max(size, _MIN_RENDER), index, seed, _TASK_PTX, bool(label), False, conspicuous,
                                     fade)
    ptx = _mask_out(gap, size, keep_peak=True) if label else np.zeros((size, size), bool)
    return _to_uint8(img, size), ptx, _mask_out(lungs, size, keep_peak=False)


def make_pneumothorax_phantoms(
    n: int,
    size: int = 64,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    prevalence: float = 0.5,
    conspicuous: bool = False,
    disparity: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render pneumothorax phantoms of a set of ``n`` (all, or the given ``indices``).

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
    prevalence : float, optional
        Probability of "present", strictly between 0 and 1.
    conspicuous : bool, optional
        Render the pleural space clearly darker (for segmentation, where the region must be
        delineable at 64 px). Same patients, labels and masks; only positive images change.
    disparity : float, optional
        In [0, 0.95]. Above 0 plants a known subgroup disparity: in female phantoms
        (:func:`shared.data.phantoms.phantom_attributes`) the pneumothorax signs are
        ``1 - disparity`` as strong. Masks, labels and every other image are unchanged.

    Returns
    -------
    images : np.ndarray
        ``uint8``, shape ``(k, size, size)``.
    labels : np.ndarray
        ``int64``, shape ``(k,)``, equal to ``pneumothorax_labels(n, seed, prevalence)[indices]``.
    masks : np.ndarray
        ``bool``, shape ``(k, size, size)``: the pneumothorax; empty exactly for "absent".

    Raises
    ------
    ValueError
        If an argument is out of range or ``indices`` is not a 1-D integer array within ``[0, n)``.
    """
    n, size, seed, idx, p = _validate_set(n, size, seed, indices, prevalence)
    fades = _faded(idx, seed, _check_disparity(disparity))
    labels = _task_labels(idx.astype(np.uint64), seed, p, _TASK_PTX)
    images = np.empty((idx.size, size, size), np.uint8)
    masks = np.zeros((idx.size, size, size), bool)
    for row, (i, y) in enumerate(zip(idx.tolist(), labels.tolist(), strict=True)):
        images[row], masks[row], _ = _render_ptx(i, y, size, seed, conspicuous, float(fades[row]))
    logger.debug("rendered %d pneumothorax phantoms (%d positive) at %d px", idx.size, int(labels.sum()), size)
    return images, labels, masks


def lung_seg_labels(n: int, seed: int = 0) -> np.ndarray:
    """All-zero ``int64`` labels of a lung-segmentation set (for partitioning code that wants labels).

    Raises
    ------
    ValueError
        If ``n < 1`` or ``seed < 0``.
    """
    n = _check_int(n, "n", 1)
    _check_int(seed, "seed", 0, _MAX_SEED)
    return np.zeros(n, np.int64)


def make_lung_seg_phantoms(
    n: int,
    size: int = 64,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render chest phantoms with lung-field masks (both lungs, heart excluded) for segmentation.

    Parameters
    ----------
    n, size, seed, indices
        As in :func:`make_pneumothorax_phantoms`.

    Returns
    -------
    images : np.ndarray
        ``uint8``, shape ``(k, size, size)``.
    masks : np.ndarray
        ``bool``, shape ``(k, size, size)``, never empty.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    n, size, seed, idx, _ = _validate_set(n, size, seed, indices)
    images = np.empty((idx.size, size, size), np.uint8)
    masks = np.zeros((idx.size, size, size), bool)
    r = max(size, _MIN_RENDER)
    for row, i in enumerate(idx.tolist()):
        img, lungs, _ = _compose_chest(r, i, seed, _TASK_LUNGSEG, False, True)
        images[row] = _to_uint8(img, size)
        masks[row] = _mask_out(lungs, size, keep_peak=True)
    logger.debug("rendered %d lung-segmentation phantoms at %d px", idx.size, size)
    return images, masks


# ---------------------------------------------------------------------------
# NEC: neonatal abdominal X-ray
# ---------------------------------------------------------------------------


def _smooth_walk(rng: np.random.Generator, start: tuple[float, float], steps: int, step: float,
                 box: tuple[float, float, float, float]) -> np.ndarray:
    """A meandering bowel-loop centre line, points ``(steps, 2)`` kept inside ``box``."""
    pts = np.empty((steps, 2))
    p = np.array(start, float)
    ang = rng.uniform(0, 2 * np.pi)
    turn = rng.uniform(0.5, 1.2) * rng.choice([-1.0, 1.0])
    for k in range(steps):
        pts[k] = p
        ang += turn + rng.normal(0.0, 0.5)
        p = p + step * np.array([np.cos(ang), np.sin(ang)])
        if not (box[0] < p[0] < box[1] and box[2] < p[1] < box[3]):
            ang += np.pi
            p = np.clip(p, [box[0], box[2]], [box[1], box[3]])
    return pts


def _points_along(rng: np.random.Generator, lines: list[np.ndarray], k: int, offset: float) -> np.ndarray:
    """``k`` random points on the polylines, shifted sideways by ``+-offset`` (onto the bowel wall)."""
    if not lines or k <= 0:
        return np.zeros((0, 2))
    which = rng.integers(0, len(lines), k)
    out = np.empty((k, 2))
    for j, w in enumerate(which.tolist()):
        line = lines[w]
        s = int(rng.integers(0, len(line) - 1))
        t = rng.random()
        p0, p1 = line[s], line[s + 1]
        d = p1 - p0
        nrm = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9)
        out[j] = p0 + t * d + nrm * offset * rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.1)
    return out


def _branches(g: _Grid, layer: np.ndarray, rng: np.random.Generator, root: tuple[float, float],
              angles: np.ndarray, length: float, width: float, value: float, depth: int = 3) -> None:
    """A tapering branching tree (portal venous gas / vessels) drawn into ``layer``."""
    p0 = np.tile(root, (angles.size, 1))
    ang, ln = angles.astype(float), np.full(angles.size, length)
    for level in range(depth):
        p1 = p0 + ln[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        _curves_layer(g, np.stack([p0[:, 0], p1[:, 0]], 1), np.stack([p0[:, 1], p1[:, 1]], 1),
                      width / (1 + level), value=value, layer=layer)
        turn = np.concatenate([-np.ones_like(ang), np.ones_like(ang)])
        keep = rng.random(turn.size) < 0.8
        p0 = np.concatenate([p1, p1])[keep]
        ang = (np.concatenate([ang, ang]) + turn * rng.uniform(0.3, 0.7, turn.size))[keep]
        ln = (np.concatenate([ln, ln]) * rng.uniform(0.5, 0.8, turn.size))[keep]


@dataclass(frozen=True)
class _NecFindings:
    free_air: float  # 0 none, (0, 0.4) subtle, >= 0.6 obvious pneumoperitoneum
    pneumatosis: int  # number of intramural gas bubbles
    linear: int  # number of linear (tram-track) pneumatosis segments
    portal: float  # 0 none, else contrast of portal venous gas
    dilated: bool


def _nec_findings(label: int, rng: np.random.Generator) -> _NecFindings:
    borderline = rng.random() < _P_BORDERLINE
    dilated = bool(rng.random() < (0.45 if label else 0.25))
    if borderline:  # one shared "mild findings" distribution for both classes
        return _NecFindings(
            free_air=rng.uniform(0.15, 0.4) if rng.random() < 0.3 else 0.0,
            pneumatosis=int(rng.integers(8, 25)),
            linear=int(rng.integers(0, 3)),
            portal=rng.uniform(0.03, 0.06) if rng.random() < 0.3 else 0.0,
            dilated=dilated,
        )
    if label == 0:
        focal = rng.random() < 0.45
        return _NecFindings(0.0, int(rng.integers(4, 12)) if focal else 0, 0, 0.0, dilated)
    kinds = rng.random(3) < [0.5, 0.6, 0.4]
    if not kinds.any():
        kinds[int(rng.integers(0, 3))] = True
    return _NecFindings(
        free_air=rng.uniform(0.6, 1.0) if kinds[0] else 0.0,
        pneumatosis=int(rng.integers(35, 90)) if kinds[1] else int(rng.integers(0, 10)),
        linear=int(rng.integers(3, 8)) if kinds[1] else 0,
        portal=rng.uniform(0.07, 0.14) if kinds[2] else 0.0,
        dilated=dilated,
    )


def _compose_nec(r: int, index: int, label: int, seed: int) -> np.ndarray:
    arng = _rng(seed, index, _TASK_NEC, _STREAM_SCENE)
    nrng = _rng(seed, index, _TASK_NEC, _STREAM_NOISE)
    frng = _rng(seed, index, _TASK_NEC, _STREAM_FINDING)
    f = _nec_findings(label, frng)
    g = _Grid(r)
    u, v = g.u, g.v

    # Body: a wide rounded trunk (chest bases to pelvis) with flanks.
    # Protuberant infant abdomen: flanks bulge below the ribs, narrow at the pelvis.
    half_w = arng.uniform(0.7, 0.84) + 0.12 * np.cos(np.pi * np.clip((v - 0.05) / 1.3, -0.5, 0.5)) - 0.12
    body = _ramp(half_w - np.abs(u), 0.06) * _ramp(1.3 - np.abs(v + 0.1), 0.1)
    rel = np.clip(np.abs(u) / half_w, 0.0, 1.0)
    thick = body * (0.6 + 0.4 * np.sqrt(1.0 - rel * rel))
    img = 0.06 + 0.46 * arng.uniform(0.92, 1.08) * thick

    # Lung bases over the domes (right dome higher), heart between them.
    dia = arng.uniform(-0.62, -0.48)
    domes = []
    for sign, lift in ((-1.0, 0.05), (1.0, 0.0)):
        cu = sign * arng.uniform(0.38, 0.48)
        dome_v = dia - lift - 0.18 * np.clip(1.0 - ((u - cu) / 0.42) ** 2, 0.0, 1.0)
        lung = _ramp(dome_v - v, 0.04) * _ramp(0.72 - np.abs(u - cu) * 2.0, 0.08)
        domes.append(dome_v)
        img -= 0.3 * lung * body
    heart = _ramp((1.0 - _ellipse(g, 0.06, dia - 0.3, 0.3, 0.22, 0.0)) * 0.1, 0.03)
    img += 0.12 * heart * (v < dia) * body
    diaphragm = np.minimum(domes[0], domes[1])  # per-pixel dome height (the lower of the two lines)

    # Liver (image left = patient's right), spine, ribs, faint pelvis.
    liver = _ramp((1.0 - _ellipse(g, -0.38, dia + 0.3, arng.uniform(0.42, 0.52), arng.uniform(0.26, 0.34), -12.0))
                  * 0.12, 0.05) * (v > domes[0])
    img += 0.07 * liver
    img += 0.08 * _ramp(0.055 - np.abs(u), 0.03) * (1.0 - 0.5 * np.cos(np.pi * (v + 1.0) / 0.13) ** 8) * body
    t = np.linspace(0.0, 1.0, 10)[None, :]
    k = np.arange(4)[:, None]
    for sign in (-1.0, 1.0):
        ru = np.broadcast_to(sign * (0.07 + 0.75 * t), (4, 10))
        rv = dia - 0.55 + k * 0.14 + 0.25 * t**1.8 - 0.08 * t
        img += 0.05 * _blur(_curves_layer(g, ru, rv, 0.04), 0.012 * g.px) * body
        ilium = _ramp((1.0 - _ellipse(g, sign * 0.42, 0.92, 0.26, 0.16, sign * 25.0)) * 0.08, 0.05)
        img += arng.uniform(0.03, 0.06) * ilium * body

    # Bowel gas: meandering loops (lumen) and the soft-tissue wall around them.
    box = (-0.62, 0.62, dia + 0.12, 0.8)
    lines = []
    lumen = np.zeros((r, r), np.float32)
    outer = np.zeros((r, r), np.float32)
    width = arng.uniform(0.07, 0.1) * (1.5 if f.dilated else 1.0)
    for _ in range(int(arng.integers(6, 11))):
        start = (arng.uniform(box[0], box[1]), arng.uniform(box[2] + 0.1, box[3]))
        line = _smooth_walk(arng, start, int(arng.integers(3, 7)), width * 1.5, box)
        lines.append(line)
        _curves_layer(g, line[None, :, 0], line[None, :, 1], width, layer=lumen)
        _curves_layer(g, line[None, :, 0], line[None, :, 1], width + 0.05, layer=outer)
    if arng.random() < 0.8:  # stomach bubble under the left dome
        _stamp(g, lumen, arng.uniform(0.3, 0.45), dia + 0.05, arng.uniform(0.08, 0.13), 1.0, ring=False)
    lumen = np.minimum(_blur(lumen, 0.01 * g.px), 1.0)
    img -= arng.uniform(0.1, 0.18) * lumen * body
    if arng.random() < 0.35:  # mottled stool in the colon: a bubbly pneumatosis mimic
        spots = np.zeros((r, r), np.float32)
        cu, cv_ = arng.choice([-0.45, 0.45]), arng.uniform(0.2, 0.6)
        for _ in range(int(arng.integers(8, 20))):
            _stamp(g, spots, cu + arng.normal(0, 0.08), cv_ + arng.normal(0, 0.08), arng.uniform(0.012, 0.025),
                   1.0, ring=False)
        img -= 0.08 * np.minimum(spots, 1.0) * body

    # Findings.
    gas = np.zeros((r, r), np.float32)
    if f.pneumatosis:
        pick = lines if f.pneumatosis > 30 else lines[: 1 + int(f.pneumatosis > 12)]
        for p in _points_along(frng, pick, f.pneumatosis, 0.5 * width):
            _stamp(g, gas, p[0], p[1], frng.uniform(0.018, 0.034), 1.0, ring=False)
    for _ in range(f.linear):  # tram-track intramural gas along a stretch of a loop
        line = lines[int(frng.integers(0, len(lines)))]
        s = int(frng.integers(0, len(line) - 1))
        seg = line[s:s + 3]
        d = np.diff(seg, axis=0).mean(0)
        nrm = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9) * 0.55 * width
        for side in (-1.0, 1.0):
            _curves_layer(g, (seg[:, 0] + side * nrm[0])[None], (seg[:, 1] + side * nrm[1])[None], 0.012,
                          layer=gas)
    img -= frng.uniform(0.12, 0.2) * np.minimum(gas, 1.0) * body * (1.0 - 0.5 * lumen)
    if f.portal:
        pvg = np.zeros((r, r), np.float32)
        root = (-0.2, dia + 0.35)
        _branches(g, pvg, frng, root, frng.uniform(np.pi * 0.9, np.pi * 1.35, int(frng.integers(3, 6))),
                  frng.uniform(0.2, 0.3), 0.022, 1.0)
        img -= f.portal * _blur(np.minimum(pvg, 1.0), 0.008 * g.px) * liver
    if f.free_air:
        s = f.free_air
        ax, ay = s * frng.uniform(0.45, 0.6), s * frng.uniform(0.3, 0.42)
        football = _ramp((1.0 - _ellipse(g, frng.uniform(-0.1, 0.1), dia + 0.45, ax, ay, 0.0)) * 0.5 * ay, 0.06)
        crescent = _ramp(v - diaphragm, 0.02) * _ramp(diaphragm + 0.05 * s + 0.02 - v, 0.02) * (np.abs(u) < 0.7)
        free = np.clip(football + crescent, 0.0, 1.0) * (v > diaphragm) * body
        amp = 0.06 + 0.12 * s
        img -= amp * free * (1.0 - np.minimum(outer, 1.0))  # the walls stay: Rigler's sign
        img -= 0.5 * amp * free * lumen
        if s > 0.5:  # falciform ligament: a thin bright line through the football
            img += 0.6 * amp * _curves_layer(g, np.array([[-0.08, -0.04]]), np.array([[dia + 0.1, dia + 0.8]]),
                                              0.015) * football

    # Devices in both classes: orogastric tube, umbilical catheter, ECG leads.
    dev = np.zeros((r, r), np.float32)
    if arng.random() < 0.6:
        tu = np.array([[0.0, 0.02, 0.15, 0.35]]) + arng.normal(0, 0.02, (1, 4))
        tv = np.array([[-1.0, dia - 0.2, dia, dia + 0.05]])
        _curves_layer(g, tu, tv, 0.02, value=0.25, layer=dev)
    if arng.random() < 0.4:
        cu = np.array([[0.0, -0.02, -0.12, -0.15, -0.1]])
        cv_ = np.array([[0.35, 0.15, -0.1, dia, dia - 0.3]])
        _curves_layer(g, cu + arng.normal(0, 0.02, cu.shape), cv_, 0.015, value=0.3, layer=dev)
    for _ in range(int(arng.integers(0, 3))):
        _stamp(g, dev, arng.uniform(-0.8, 0.8), arng.uniform(-0.9, -0.5), 0.05, 0.35, ring=True)
    img += dev

    img += arng.uniform(0.01, 0.03) * _low_freq(nrng, r, 6) * body
    img = _blur(img.astype(np.float32), arng.uniform(0.008, 0.022) * g.px)
    img = _expose(img, arng)
    img += nrng.standard_normal((r, r), dtype=np.float32) * np.float32(arng.uniform(0.006, 0.025))
    return img


def nec_labels(n: int, seed: int = 0, prevalence: float = 0.4) -> np.ndarray:
    """Labels of NEC phantoms ``0..n-1`` (1 = "surgery"), cheap (no rendering).

    Parameters
    ----------
    n : int
        Number of phantoms in the set, ``>= 1``.
    seed : int, optional
        Non-negative seed of the set.
    prevalence : float, optional
        Probability of "surgery", strictly between 0 and 1.

    Returns
    -------
    np.ndarray
        ``int64`` labels, shape ``(n,)``.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    return _labels_api(n, seed, prevalence, _TASK_NEC)


def make_nec_phantoms(
    n: int,
    size: int = 64,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    prevalence: float = 0.4,
) -> tuple[np.ndarray, np.ndarray]:
    """Render neonatal abdominal X-ray phantoms (NEC: surgery needed or not).

    Parameters
    ----------
    n, size, seed, indices
        As in :func:`make_pneumothorax_phantoms`.
    prevalence : float, optional
        Probability of "surgery", strictly between 0 and 1.

    Returns
    -------
    images : np.ndarray
        ``uint8``, shape ``(k, size, size)``.
    labels : np.ndarray
        ``int64``, shape ``(k,)``, equal to ``nec_labels(n, seed, prevalence)[indices]``.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    n, size, seed, idx, p = _validate_set(n, size, seed, indices, prevalence)
    labels = _task_labels(idx.astype(np.uint64), seed, p, _TASK_NEC)
    images = np.empty((idx.size, size, size), np.uint8)
    r = max(size, _MIN_RENDER)
    for row, (i, y) in enumerate(zip(idx.tolist(), labels.tolist(), strict=True)):
        images[row] = _to_uint8(_compose_nec(r, i, y, seed), size)
    logger.debug("rendered %d NEC phantoms (%d surgical) at %d px", idx.size, int(labels.sum()), size)
    return images, labels


# ---------------------------------------------------------------------------
# Necrotizing fasciitis: RGB skin photographs
# ---------------------------------------------------------------------------

_SKIN_TONES = np.array([  # light to very dark, RGB in [0, 1]
    [0.93, 0.78, 0.68], [0.84, 0.64, 0.52], [0.70, 0.50, 0.37], [0.52, 0.35, 0.25], [0.34, 0.22, 0.16],
    [0.22, 0.15, 0.11],
], np.float32)
_BACKDROPS = np.array([  # sheet white, pale blue, surgical green, surgical blue, grey, beige
    [0.90, 0.90, 0.88], [0.72, 0.80, 0.88], [0.35, 0.55, 0.48], [0.25, 0.42, 0.62], [0.45, 0.45, 0.46],
    [0.80, 0.74, 0.62],
], np.float32)


def _soft_region(g: _Grid, rng: np.random.Generator, centre: tuple[float, float], radius: float,
                 edge: float) -> np.ndarray:
    """Irregular region in ``[0, 1]``; ``edge`` near 0 gives a sharp border, near 1 a very soft one."""
    shape = _blob_shape(g, rng, centre, radius)
    lo = 0.5 - 0.5 * edge
    return np.clip((shape - lo) / max(edge, 0.02), 0.0, 1.0) if edge < 1.0 else shape


def _tint(img: np.ndarray, weight: np.ndarray, mult: Sequence[float], add: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
    """In place: blend ``img`` towards ``img * mult + add`` with per-pixel ``weight``."""
    target = img * np.asarray(mult, np.float32) + np.asarray(add, np.float32)
    img += weight[..., None] * (target - img)


@dataclass(frozen=True)
class _NfFindings:
    erythema: float  # strength
    edge: float  # erythema border softness: small = sharp demarcation
    dusky: float  # violaceous patch strength
    dusky_edge: float
    bullae: int  # haemorrhagic bullae
    necrosis: float  # 0 none, else size of grey-black necrosis
    blisters: int  # small clear blisters


def _nf_findings(label: int, rng: np.random.Generator) -> _NfFindings:
    if rng.random() < _P_BORDERLINE:  # shared borderline distribution: early NF / angry cellulitis
        return _NfFindings(
            erythema=rng.uniform(0.5, 0.8), edge=rng.uniform(0.3, 0.7),
            dusky=rng.uniform(0.15, 0.35) if rng.random() < 0.6 else 0.0, dusky_edge=rng.uniform(0.4, 0.8),
            bullae=int(rng.random() < 0.25), necrosis=0.0, blisters=int(rng.integers(0, 4)),
        )
    if label == 0:
        return _NfFindings(
            erythema=rng.uniform(0.4, 0.85), edge=rng.uniform(0.6, 1.0),
            dusky=rng.uniform(0.05, 0.15) if rng.random() < 0.2 else 0.0, dusky_edge=0.9,
            bullae=0, necrosis=0.0, blisters=int(rng.integers(0, 6)) if rng.random() < 0.35 else 0,
        )
    necro = rng.random() < 0.55
    return _NfFindings(
        erythema=rng.uniform(0.5, 0.9), edge=rng.uniform(0.1, 0.5),
        dusky=rng.uniform(0.35, 0.7), dusky_edge=rng.uniform(0.1, 0.4),
        bullae=int(rng.integers(0, 5)) if rng.random() < 0.65 else 0,
        necrosis=rng.uniform(0.08, 0.22) if necro else 0.0, blisters=0,
    )


def _compose_nf(r: int, index: int, label: int, seed: int) -> np.ndarray:
    arng = _rng(seed, index, _TASK_NF, _STREAM_SCENE)
    nrng = _rng(seed, index, _TASK_NF, _STREAM_NOISE)
    frng = _rng(seed, index, _TASK_NF, _STREAM_FINDING)
    f = _nf_findings(label, frng)
    g = _Grid(r)
    u, v = g.u, g.v

    # Backdrop with a soft lighting gradient and fabric texture.
    back = _BACKDROPS[int(arng.integers(0, len(_BACKDROPS)))] * arng.uniform(0.8, 1.1)
    img = np.empty((r, r, 3), np.float32)
    img[:] = back
    img *= (1.0 + 0.06 * _low_freq(nrng, r, 4))[..., None]

    # Skin: a limb crossing the frame (or a close-up filling it), cylinder shading.
    t = arng.uniform(0.0, len(_SKIN_TONES) - 1.0)
    k = int(min(t, len(_SKIN_TONES) - 2))
    tone = _SKIN_TONES[k] + (t - k) * (_SKIN_TONES[k + 1] - _SKIN_TONES[k])
    theta = arng.uniform(0.0, np.pi)
    c, s = math.cos(theta), math.sin(theta)
    across = (u - arng.uniform(-0.2, 0.2)) * -s + (v - arng.uniform(-0.2, 0.2)) * c
    half = 2.5 if arng.random() < 0.35 else arng.uniform(0.55, 0.85)
    limb = _ramp(half - np.abs(across), 0.04).astype(np.float32)
    shade = np.clip(1.0 - 0.45 * (np.abs(across) / half) ** 2, 0.5, 1.0)
    skin = np.empty((r, r, 3), np.float32)
    skin[:] = tone
    skin *= (shade * (1.0 + 0.05 * _low_freq(nrng, r, 12)))[..., None]

    # Findings on the skin, centred on the limb.
    cu, cv_ = arng.uniform(-0.15, 0.15), arng.uniform(-0.15, 0.15)
    ery = _soft_region(g, frng, (cu, cv_), frng.uniform(0.35, 0.7), f.edge) * f.erythema
    _tint(skin, ery, (1.08, 0.62, 0.62), (0.04, 0.0, 0.0))
    if f.dusky:
        dusk = _soft_region(g, frng, (cu + frng.normal(0, 0.1), cv_ + frng.normal(0, 0.1)),
                            frng.uniform(0.15, 0.35), f.dusky_edge) * f.dusky
        _tint(skin, dusk, (0.55, 0.4, 0.62), (0.04, 0.0, 0.05))
    if f.necrosis:
        nec = _soft_region(g, frng, (cu + frng.normal(0, 0.08), cv_ + frng.normal(0, 0.08)), f.necrosis, 0.15)
        grey = frng.uniform(0.12, 0.3)
        _tint(skin, nec * frng.uniform(0.75, 0.95), (0.25, 0.25, 0.25), (grey * 0.6, grey * 0.58, grey * 0.55))
    spots = np.zeros((r, r), np.float32)
    highlight = np.zeros((r, r), np.float32)
    bulla_r = []
    for kind, count in ((0, f.bullae), (1, f.blisters)):
        for _ in range(count):
            bu, bv = cu + frng.normal(0, 0.18), cv_ + frng.normal(0, 0.18)
            rad = frng.uniform(0.04, 0.09) if kind == 0 else frng.uniform(0.015, 0.04)
            layer = np.zeros((r, r), np.float32)
            _stamp(g, layer, bu, bv, rad, 1.0, ring=False)
            if kind == 0:
                _tint(skin, layer * 0.85, (0.45, 0.12, 0.2), (0.1, 0.0, 0.02))
            else:
                _tint(skin, layer * 0.6, (1.0, 1.0, 0.8), (0.1, 0.08, 0.0))
            _stamp(g, highlight, bu - 0.35 * rad, bv - 0.35 * rad, 0.3 * rad, 1.0, ring=False)
            bulla_r.append(rad)
            spots += layer
    skin += 0.35 * np.minimum(highlight, 1.0)[..., None]
    img += limb[..., None] * (skin - img)

    # Distractors in both classes: marker-pen outline, ruler, dressing.
    if arng.random() < 0.3:
        ang = np.linspace(0, 2 * np.pi, 24)
        rad = arng.uniform(0.3, 0.55) * (1.0 + 0.1 * np.sin(3 * ang + arng.uniform(0, 6)))
        pen = _curves_layer(g, (cu + rad * np.cos(ang))[None], (cv_ + rad * np.sin(ang))[None], 0.012)
        _tint(img, np.minimum(pen, 1.0) * limb * 0.9, (0.2, 0.2, 0.35))
    if arng.random() < 0.2:
        ruler = np.zeros((r, r), np.float32)
        y0 = arng.uniform(0.75, 0.9) * arng.choice([-1.0, 1.0])
        ruler += (_ramp(0.07 - np.abs(v - y0), 0.02) * np.ones_like(u)).astype(np.float32)
        ticks = (np.cos(np.pi * (u + 1.0) / 0.05) > 0.85) & (np.abs(v - y0) < 0.03)
        img += np.minimum(ruler, 1.0)[..., None] * (np.float32(0.92) - img)
        img[ticks] *= 0.3
    if arng.random() < 0.1:
        gauze = _ramp(0.18 - np.maximum(np.abs(u - arng.uniform(-0.7, 0.7)), np.abs(v - arng.uniform(-0.7, 0.7))),
                      0.02)
        img += (gauze * 0.9)[..., None] * (np.float32(0.95) - img)

    # Camera: white balance, exposure, specular sheen, blur, noise.
    img *= arng.uniform(0.9, 1.1, 3).astype(np.float32) * np.float32(arng.uniform(0.8, 1.15))
    light = 1.0 + 0.15 * (u * arng.uniform(-1, 1) + v * arng.uniform(-1, 1))
    img *= light[..., None].astype(np.float32)
    img = _blur(img, arng.uniform(0.005, 0.015) * g.px)
    img += nrng.standard_normal((r, r, 3), dtype=np.float32) * np.float32(arng.uniform(0.005, 0.02))
    return np.clip(img, 0.0, 1.0)


def nf_labels(n: int, seed: int = 0, prevalence: float = 0.4) -> np.ndarray:
    """Labels of NF phantoms ``0..n-1`` (1 = "necrotizing-fasciitis"), cheap (no rendering).

    Parameters
    ----------
    n : int
        Number of phantoms in the set, ``>= 1``.
    seed : int, optional
        Non-negative seed of the set.
    prevalence : float, optional
        Probability of NF, strictly between 0 and 1.

    Returns
    -------
    np.ndarray
        ``int64`` labels, shape ``(n,)``.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    return _labels_api(n, seed, prevalence, _TASK_NF)


def make_nf_phantoms(
    n: int,
    size: int = 64,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    prevalence: float = 0.4,
) -> tuple[np.ndarray, np.ndarray]:
    """Render RGB skin-photograph phantoms (necrotizing fasciitis vs other soft-tissue infection).

    Parameters
    ----------
    n, size, seed, indices
        As in :func:`make_pneumothorax_phantoms`.
    prevalence : float, optional
        Probability of NF, strictly between 0 and 1.

    Returns
    -------
    images : np.ndarray
        ``uint8``, shape ``(k, size, size, 3)``, RGB channel order.
    labels : np.ndarray
        ``int64``, shape ``(k,)``, equal to ``nf_labels(n, seed, prevalence)[indices]``.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    n, size, seed, idx, p = _validate_set(n, size, seed, indices, prevalence)
    labels = _task_labels(idx.astype(np.uint64), seed, p, _TASK_NF)
    images = np.empty((idx.size, size, size, 3), np.uint8)
    r = max(size, _MIN_RENDER)
    for row, (i, y) in enumerate(zip(idx.tolist(), labels.tolist(), strict=True)):
        images[row] = _to_uint8(_compose_nf(r, i, y, seed), size)
    logger.debug("rendered %d NF phantoms (%d NF) at %d px", idx.size, int(labels.sum()), size)
    return images, labels


# ---------------------------------------------------------------------------
# Per-site acquisition profiles
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AcquisitionProfile:
    """How one site's scanner/camera renders images (applied by :func:`apply_profile`).

    Attributes
    ----------
    contrast : float
        Gain about mid-grey (0.5), ``> 0``.
    gamma : float
        Power applied to intensities in ``[0, 1]``, ``> 0`` (``> 1`` darkens mid-tones).
    noise : float
        Standard deviation of additive Gaussian noise in ``[0, 1]`` intensity units, ``>= 0``.
    blur : float
        Gaussian blur sigma in pixels of the image it is applied to, ``>= 0``.
    resolution : float
        In ``(0, 1]``: below 1 the image is reduced to this fraction (``INTER_AREA``) and
        enlarged back (``INTER_LINEAR``), losing detail.
    brightness : float
        Offset in ``[0, 1]`` intensity units, in ``[-0.5, 0.5]``.
    color_cast : tuple of 3 float
        RGB multipliers, each ``> 0``; used for RGB images only (ignored for grayscale).
    """

    contrast: float = 1.0
    gamma: float = 1.0
    noise: float = 0.0
    blur: float = 0.0
    resolution: float = 1.0
    brightness: float = 0.0
    color_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("contrast", "gamma", "noise", "blur", "resolution", "brightness"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(float(value)):
                raise ValueError(f"AcquisitionProfile.{name} must be a finite number, got {value!r}")
        checks = [
            ("contrast", self.contrast > 0, "> 0"),
            ("gamma", self.gamma > 0, "> 0"),
            ("noise", self.noise >= 0, ">= 0"),
            ("blur", self.blur >= 0, ">= 0"),
            ("resolution", 0 < self.resolution <= 1, "in (0, 1]"),
            ("brightness", -0.5 <= self.brightness <= 0.5, "in [-0.5, 0.5]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"AcquisitionProfile.{name} must be {expected}, got {getattr(self, name)!r}")
        cast = tuple(self.color_cast)
        if len(cast) != 3 or not all(isinstance(x, (int, float, np.floating, np.integer)) and 0 < float(x) < math.inf
                                     for x in cast):
            raise ValueError(f"AcquisitionProfile.color_cast must be three positive numbers (R, G, B), "
                             f"got {self.color_cast!r}")
        object.__setattr__(self, "color_cast", tuple(float(x) for x in cast))

    @property
    def is_identity(self) -> bool:
        """True if applying the profile leaves images unchanged."""
        return self == AcquisitionProfile()


def site_profile(site: int, seed: int = 0) -> AcquisitionProfile:
    """The acquisition profile of simulated site ``site``.

    Site 0 is the identity (reference) profile; every other site draws moderate
    contrast, gamma, brightness, noise, blur, resolution and colour-cast values
    from ``(seed, site)`` only.

    Parameters
    ----------
    site : int
        Non-negative site id.
    seed : int, optional
        Non-negative seed of the federation.

    Returns
    -------
    AcquisitionProfile

    Raises
    ------
    ValueError
        If ``site`` or ``seed`` is negative or not an integer.
    """
    site = _check_int(site, "site", 0)
    seed = _check_int(seed, "seed", 0, _MAX_SEED)
    if site == 0:
        return AcquisitionProfile()
    rng = _rng(seed, site, _TASK_SITE, 0)
    return AcquisitionProfile(
        contrast=round(float(rng.uniform(0.8, 1.25)), 4),
        gamma=round(float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))), 4),
        noise=round(float(rng.uniform(0.0, 0.03)), 4),
        blur=round(float(rng.uniform(0.0, 1.0)), 4) if rng.random() < 0.6 else 0.0,
        resolution=round(float(rng.uniform(0.5, 0.9)), 4) if rng.random() < 0.4 else 1.0,
        brightness=round(float(rng.uniform(-0.08, 0.08)), 4),
        color_cast=tuple(round(float(x), 4) for x in rng.uniform(0.9, 1.1, 3)),  # type: ignore[arg-type]
    )


def apply_profile(images: np.ndarray, profile: AcquisitionProfile, seed: int = 0) -> np.ndarray:
    """Render ``images`` as the site with ``profile`` would acquire them.

    Order: resolution loss, blur, contrast and brightness about mid-grey, gamma,
    colour cast (RGB only), noise, rounding to ``uint8``.

    Parameters
    ----------
    images : np.ndarray
        ``uint8``: one grayscale image ``(H, W)``, a grayscale batch ``(k, H, W)``
        or an RGB batch ``(k, H, W, 3)``. (A single RGB image must be passed as
        ``(1, H, W, 3)``: a 3-D array is always a grayscale batch.)
    profile : AcquisitionProfile
        The site's profile.
    seed : int, optional
        Non-negative seed of the noise. The noise of each image depends only on
        ``seed`` and that image's bytes, so any subset or order of a batch gets
        the same output per image.

    Returns
    -------
    np.ndarray
        ``uint8``, same shape as ``images``; a copy equal to the input for the identity profile.

    Raises
    ------
    ValueError
        If ``images`` is not ``uint8`` of a supported shape, ``profile`` is not an
        :class:`AcquisitionProfile` or ``seed`` is negative.
    """
    if not isinstance(profile, AcquisitionProfile):
        raise ValueError(f"profile must be an AcquisitionProfile, got {type(profile).__name__}")
    seed = _check_int(seed, "seed", 0, _MAX_SEED)
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 2:
        return apply_profile(arr[None], profile, seed)[0]
    rgb = arr.ndim == 4 and arr.shape[-1] == 3
    if not (arr.ndim == 3 or rgb):
        raise ValueError(f"images must have shape (H, W), (k, H, W) or (k, H, W, 3), got {arr.shape}")
    if profile.is_identity or arr.size == 0:
        return arr.copy()
    out = np.empty_like(arr)
    for row in range(arr.shape[0]):
        out[row] = _apply_one(arr[row], profile, seed, rgb)
    return out


def _apply_one(image: np.ndarray, p: AcquisitionProfile, seed: int, rgb: bool) -> np.ndarray:
    h, w = image.shape[:2]
    img = image.astype(np.float32) * np.float32(1.0 / 255.0)
    if p.resolution < 1.0:
        sh, sw = max(1, round(h * p.resolution)), max(1, round(w * p.resolution))
        img = cv2.resize(cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA), (w, h),
                         interpolation=cv2.INTER_LINEAR)
    img = _blur(img, p.blur)
    img = np.clip((img - 0.5) * np.float32(p.contrast) + np.float32(0.5 + p.brightness), 0.0, 1.0)
    if p.gamma != 1.0:
        img = np.power(img, np.float32(p.gamma), dtype=np.float32)
    if rgb and p.color_cast != (1.0, 1.0, 1.0):
        img = img * np.asarray(p.color_cast, np.float32)
    if p.noise > 0.0:
        key = zlib.crc32(image.tobytes()) ^ (image.shape[0] << 20) ^ image.shape[1]
        rng = np.random.default_rng(np.random.SeedSequence([seed, key], spawn_key=(_TASK_SITE,)))
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(p.noise)
    return np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)

