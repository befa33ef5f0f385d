"""Synthetic chest-radiograph phantoms: the demo's and the test suite's data.

Each phantom is a frontal (PA) chest-radiograph-like grayscale image: dark air
outside the body, a soft-tissue silhouette with shoulders (and sometimes
arms), two dark lung fields (the left lung smaller because of the heart),
mediastinum, heart, aortic knob, trachea, spine, clavicles, posterior and
anterior ribs, hilar vessel markings, diaphragm domes and a gastric bubble.
Anatomy, exposure (brightness, contrast, gamma), blur and noise vary per
image. Class 1 ("pneumonia") adds one to three irregular opacities inside a
lung field, from small and faint (about a fifth of the positives are
genuinely hard) to lobar and obvious. Distractors occur in both classes:
vessel markings, calcified granulomas, ECG leads with wires, side markers,
breast shadows and cardiac-size variation, so "any bright spot" is not a
perfect cue.

Determinism
-----------
Pixels of phantom ``i`` depend only on ``(seed, i, size)`` and its label, and
labels only on ``(seed, i, prevalence)``: any subset of a set can be rendered
on its own (each site renders only its partition) with identical bytes. The
anatomy, the noise and the lesions come from three independent random streams,
so ``render_chest_phantom(i, 0)`` and ``render_chest_phantom(i, 1)`` are the
same patient and differ only where the opacity was added: a counterfactual pair
for saliency (Grad-CAM) checks.

Subgroups
---------
Every phantom index also has synthetic patient attributes, ``sex`` and
``age`` (:func:`phantom_attributes`, from ``(seed, index)`` only and
independent of the label), so subgroup reporting can be exercised on
phantoms. ``make_chest_phantoms(..., disparity=d)`` plants a known disparity:
the opacities of female phantoms are fainter and smaller, so a model's
sensitivity drops in that subgroup; with ``d = 0`` (the default) nothing
changes.

Geometry is drawn in normalised coordinates (``[-1, 1]`` across the image, y
pointing down; negative x is the image left = the patient's right), so the
same index gives the same patient at every size. Sizes below 64 px are
rendered at 64 px and reduced with ``cv2.INTER_AREA``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CHEST_CLASSES",
    "DISPARITY_SUBGROUP",
    "PHANTOM_AGE_RANGE",
    "make_chest_phantoms",
    "phantom_attributes",
    "phantom_labels",
    "render_chest_phantom",
]

CHEST_CLASSES: tuple[str, ...] = ("normal", "pneumonia")

MIN_SIZE = 16
MAX_SIZE = 1024
_MIN_RENDER = 64  # smaller sizes are rendered here, then reduced with INTER_AREA
_SHIFT = 4  # cv2 drawing sub-pixel bits
_ONE = float(1 << _SHIFT)

# Independent random streams of one phantom (SeedSequence spawn keys).
_STREAM_ANATOMY, _STREAM_NOISE, _STREAM_LESION = 0, 1, 2
_LABEL_SALT = 0x50484E54_4D4C424C  # "PHNTMLBL"
_SEX_SALT = 0x50484E54_53455846  # "PHNTSEXF"
_AGE_SALT = 0x50484E54_41474559  # "PHNTAGEY"

PHANTOM_AGE_RANGE: tuple[int, int] = (18, 90)
"""Synthetic ages are whole years drawn uniformly in ``[low, high)`` (adults)."""

DISPARITY_SUBGROUP: tuple[str, str] = ("sex", "F")
"""The subgroup whose findings are fainter when a disparity is planted (``phantom-disparity``)."""

# Intensities ("attenuation" before exposure, roughly 0..1).
_BACKGROUND = 0.05
_SOFT_TISSUE = 0.55
_LUNG_DEPTH = 0.36

# Lesion difficulty: probability that a positive image carries only faint/small opacities.
_P_HARD = 0.2


# ---------------------------------------------------------------------------
# Validation and labels
# ---------------------------------------------------------------------------


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    v = int(value)
    if v < low or (high is not None and v > high):
        rng = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def _check_prevalence(prevalence: object) -> float:
    try:
        p = float(prevalence)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"prevalence must be a number in (0, 1), got {prevalence!r}") from None
    if not 0.0 < p < 1.0:
        raise ValueError(f"prevalence must lie strictly between 0 and 1, got {p}")
    return p


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a ``uint64`` array (wrap-around arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def phantom_labels(n: int, seed: int = 0, prevalence: float = 0.5) -> np.ndarray:
    """Labels of phantoms ``0..n-1``, cheap (no rendering).

    Label ``i`` is 1 ("pneumonia") with probability ``prevalence``, drawn from a
    counter-based hash of ``(seed, i)``: it depends only on ``(seed, i,
    prevalence)``, never on ``n``, so a larger set extends a smaller one.

    Parameters
    ----------
    n : int
        Number of phantoms in the set, ``>= 1``.
    seed : int, optional
        Non-negative seed of the set.
    prevalence : float, optional
        Probability of the positive class, strictly between 0 and 1.

    Returns
    -------
    np.ndarray
        ``int64`` labels, shape ``(n,)``, values in ``{0, 1}``.

    Raises
    ------
    ValueError
        If ``n < 1``, ``seed < 0`` or ``prevalence`` is outside ``(0, 1)``.
    """
    n = _check_int(n, "n", 1)
    seed = _check_int(seed, "seed", 0, 2**63 - 1)
    p = _check_prevalence(prevalence)
    return _labels_of(np.arange(n, dtype=np.uint64), seed, p)


def _uniform_of(indices: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per index from a counter-based hash of ``(seed, salt, index)``."""
    base = _splitmix64(np.asarray([seed ^ salt], dtype=np.uint64))
    h = _splitmix64(base ^ _splitmix64(indices.astype(np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _labels_of(indices: np.ndarray, seed: int, prevalence: float) -> np.ndarray:
    return (_uniform_of(indices, seed, _LABEL_SALT) < prevalence).astype(np.int64)


def phantom_attributes(indices: Sequence[int] | np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic patient attributes of phantoms: ``sex`` and ``age``, as a manifest would give them.

    Each depends only on ``(seed, index)`` (not on the task, the label or the
    set size), from its own counter-based hash: sex is ``"F"`` or ``"M"``
    with probability 1/2 each, age a whole number of years uniform in
    :data:`PHANTOM_AGE_RANGE`, both independent of the label. The same index
    of every phantom task shares them.

    Parameters
    ----------
    indices : sequence of int or np.ndarray
        Non-negative phantom indices (any order, repeats allowed).
    seed : int, optional
        Non-negative seed of the set.

    Returns
    -------
    dict
        ``{"sex": str array, "age": str array}`` (manifest-like strings), one
        entry per index.

    Raises
    ------
    ValueError
        If an index or the seed is negative or not an integer.
    """
    seed = _check_int(seed, "seed", 0, 2**63 - 1)
    idx = np.asarray(indices)
    if idx.size == 0:
        return {"sex": np.zeros(0, dtype="<U1"), "age": np.zeros(0, dtype="<U3")}
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or int(idx.min()) < 0:
        raise ValueError(f"indices must be a 1-D sequence of non-negative integers, got {idx!r}")
    u = idx.astype(np.uint64)
    sex = np.where(_uniform_of(u, seed, _SEX_SALT) < 0.5, "F", "M")
    low, high = PHANTOM_AGE_RANGE
    age = low + np.floor(_uniform_of(u, seed, _AGE_SALT) * (high - low)).astype(np.int64)
    return {"sex": sex.astype("<U1"), "age": age.astype(str)}


def _check_disparity(disparity: object) -> float:
    try:
        d = float(disparity)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"disparity must be a number in [0, 0.95], got {disparity!r}") from None
    if not 0.0 <= d <= 0.95:
        raise ValueError(f"disparity must be in [0, 0.95] (0 = none), got {d}")
    return d


def _faded(indices: np.ndarray, seed: int, disparity: float) -> np.ndarray:
    """Per index: how much fainter its findings are (``disparity`` for the disadvantaged subgroup, else 0)."""
    if disparity == 0.0 or indices.size == 0:
        return np.zeros(indices.size, np.float64)
    column, value = DISPARITY_SUBGROUP
    return np.where(phantom_attributes(indices, seed)[column] == value, disparity, 0.0)


def _stream(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=(stream,)))


# ---------------------------------------------------------------------------
# Anatomy parameters (normalised coordinates)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lung:
    sign: float  # -1 image left (patient's right), +1 image right
    apex: float  # v of the apex
    base: float  # v of the costophrenic angle
    apex_u: float  # |u| of the lateral edge at the apex
    lateral: float  # |u| of the lateral edge at the base
    medial: float  # |u| of the medial edge
    dome: float  # diaphragm dome height above the base


@dataclass(frozen=True)
class _Anatomy:
    scale: float
    shift: tuple[float, float]
    angle: float  # degrees
    neck: float
    shoulder_w: float
    shoulder_v: float
    waist_w: float
    arms: bool
    lungs: tuple[_Lung, _Lung]
    mediastinum_w: float
    heart: tuple[float, float, float, float, float]  # cx, cy, ax, ay, angle(deg)
    rib_start: float
    rib_spacing: float
    rib_count: int
    rib_curve: float
    clavicle_v: float
    rib_gain: float
    vessel_gain: float


def _sample_lung(rng: np.random.Generator, sign: float, base_shift: float, chest_w: float) -> _Lung:
    lateral = chest_w - rng.uniform(0.05, 0.11)
    return _Lung(
        sign=sign,
        apex=rng.uniform(-0.74, -0.62),
        base=rng.uniform(0.38, 0.56) + base_shift,
        apex_u=rng.uniform(0.22, 0.32),
        lateral=lateral,
        medial=rng.uniform(0.05, 0.09),
        dome=rng.uniform(0.12, 0.24),
    )


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    cardio = rng.uniform(0.88, 1.15) if rng.random() < 0.85 else rng.uniform(1.15, 1.40)
    heart = (
        rng.uniform(0.09, 0.15),
        rng.uniform(0.20, 0.28),
        rng.uniform(0.31, 0.37) * cardio,
        rng.uniform(0.24, 0.30),
        rng.uniform(-30.0, -15.0),
    )
    shoulder_w = rng.uniform(0.86, 0.98)
    waist_w = rng.uniform(0.80, 0.92)
    chest_w = 0.35 * shoulder_w + 0.65 * waist_w
    right = _sample_lung(rng, -1.0, base_shift=-0.04, chest_w=chest_w)  # right hemidiaphragm sits higher
    left = _sample_lung(rng, +1.0, base_shift=0.0, chest_w=chest_w)
    return _Anatomy(
        scale=rng.uniform(0.90, 1.06),
        shift=(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)),
        angle=rng.uniform(-4.0, 4.0),
        neck=rng.uniform(0.15, 0.22),
        shoulder_w=shoulder_w,
        shoulder_v=rng.uniform(-0.80, -0.68),
        waist_w=waist_w,
        arms=bool(rng.random() < 0.4),
        lungs=(right, left),
        mediastinum_w=rng.uniform(0.10, 0.14),
        heart=heart,
        rib_start=rng.uniform(-0.74, -0.64),
        rib_spacing=rng.uniform(0.105, 0.135),
        rib_count=int(rng.integers(9, 12)),
        rib_curve=rng.uniform(0.22, 0.36),
        clavicle_v=rng.uniform(-0.66, -0.56),
        rib_gain=rng.uniform(0.05, 0.10),
        vessel_gain=rng.uniform(0.7, 1.3),
    )


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


class _Grid:
    """Pixel-centre coordinates of an ``r x r`` canvas in normalised units."""

    def __init__(self, r: int) -> None:
        self.r = r
        c = ((np.arange(r, dtype=np.float32) + 0.5) / r * 2.0 - 1.0).astype(np.float32)
        self.u = c[None, :]
        self.v = c[:, None]
        self.px = r / 2.0  # pixels per normalised unit

    def to_px(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Fixed-point (``_SHIFT`` bits) pixel coordinates for cv2 drawing."""
        x = (u + 1.0) * self.px * _ONE - _ONE / 2
        y = (v + 1.0) * self.px * _ONE - _ONE / 2
        return np.stack([x, y], axis=-1).round().astype(np.int32)

    def pt(self, u: float, v: float) -> tuple[int, int]:
        """Fixed-point pixel coordinates of one point (fast path of :meth:`to_px`)."""
        k = self.px * _ONE
        return int(round((u + 1.0) * k - _ONE / 2)), int(round((v + 1.0) * k - _ONE / 2))

    def thick(self, units: float) -> int:
        return max(1, int(round(units * self.px)))


def _ramp(d: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-indicator of a signed distance (positive inside)."""
    return np.clip(0.5 + d / edge, 0.0, 1.0)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.2:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REPLICATE)


def _body(g: _Grid, a: _Anatomy) -> np.ndarray:
    v = g.v[:, 0]
    t = np.clip((v - (a.shoulder_v - 0.22)) / 0.22, 0.0, 1.0)
    t = t * t * (3 - 2 * t)
    lower = np.clip((v - a.shoulder_v) / (1.0 - a.shoulder_v), 0.0, 1.0)
    width = a.neck + (a.shoulder_w - a.neck) * t + (a.waist_w - a.shoulder_w) * lower * (v > a.shoulder_v)
    # A rounded cross-section: thicker (brighter) in the middle than at the flanks.
    rel = np.clip(np.abs(g.u) / width[:, None], 0.0, 1.0)
    body = _ramp(width[:, None] - np.abs(g.u), 0.05) * (0.55 + 0.45 * np.sqrt(1.0 - rel * rel))
    if a.arms:
        gap = width[:, None] + 0.05
        arm = _ramp(np.minimum(np.abs(g.u) - gap, gap + 0.14 - np.abs(g.u)), 0.04)
        arm *= (v > a.shoulder_v + 0.05)[:, None]
        body = np.maximum(body, 0.75 * arm)
    return body


def _lung_field(g: _Grid, lung: _Lung) -> np.ndarray:
    au = g.u * lung.sign
    t = np.clip((g.v - lung.apex) / (lung.base - lung.apex), 0.0, 1.0)
    lateral = lung.apex_u + (lung.lateral - lung.apex_u) * np.sqrt(t)
    mid = 0.5 * (lung.medial + lung.lateral)
    half = 0.5 * (lung.lateral - lung.medial)
    dome = lung.base - lung.dome * np.clip(1.0 - ((au - mid) / half) ** 2, 0.0, 1.0)
    top = (g.v - lung.apex) * 2.0 - np.maximum(lung.apex_u * 0.6 - np.abs(au - mid), 0.0)
    d = np.minimum(np.minimum(au - lung.medial, lateral - au), np.minimum(top, dome - g.v))
    return _ramp(d, 0.035)


def _ellipse(g: _Grid, cx: float, cy: float, ax: float, ay: float, angle_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    du, dv = g.u - cx, g.v - cy
    x = (du * c + dv * s) / ax
    y = (-du * s + dv * c) / ay
    return x * x + y * y


def _mediastinum(g: _Grid, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay, ang = a.heart
    heart = _ramp((1.0 - _ellipse(g, cx, cy, ax, ay, ang)) * 0.5 * min(ax, ay), 0.03)
    knob = _ramp((1.0 - _ellipse(g, a.mediastinum_w + 0.01, -0.30, 0.07, 0.06, 0.0)) * 0.035, 0.03)
    widen = 0.14 * np.clip((g.v + 0.25) / (cy + 0.25), 0.0, 1.0) ** 2  # the band flares into the heart
    band = _ramp(a.mediastinum_w + widen - np.abs(g.u - 0.01), 0.03)
    return np.maximum(np.maximum(heart, knob), band * (g.v < cy))


def _curves_layer(g: _Grid, u: np.ndarray, v: np.ndarray, thickness: float, value: float = 1.0,
                  layer: np.ndarray | None = None) -> np.ndarray:
    """Draw open polylines (one per row of ``u``/``v``, shape ``(k, points)``) with anti-aliasing."""
    if layer is None:
        layer = np.zeros((g.r, g.r), np.float32)
    if u.size:
        cv2.polylines(layer, list(g.to_px(u, v)), False, value, g.thick(thickness), cv2.LINE_AA, _SHIFT)
    return layer


def _ribs(g: _Grid, a: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Posterior ribs (bright arcs from the spine, curving down laterally) and fainter anterior ribs."""
    t = np.linspace(0.0, 1.0, 14)[None, :]
    k = np.arange(a.rib_count, dtype=np.float64)[:, None]
    sign = np.repeat([lung.sign for lung in a.lungs], a.rib_count)[:, None]
    width = np.repeat([lung.lateral + 0.10 for lung in a.lungs], a.rib_count)[:, None]
    k = np.tile(k, (2, 1))
    v0 = a.rib_start + k * a.rib_spacing * (1.0 + 0.04 * k) + rng.normal(0.0, 0.008, k.shape)
    span = width * np.minimum(1.0, 0.55 + 0.12 * k)
    u = sign * (0.05 + span * t)
    v = v0 - 0.12 * t + a.rib_curve * (1.0 + 0.05 * k) * t**2.4
    front = k[:, 0] < 7
    ua = sign * (span - (span - 0.18) * t)
    va = v0 + 0.08 + 0.03 * k + 0.22 * t**1.3
    layer = _curves_layer(g, u, v, 0.055)
    layer += _curves_layer(g, ua[front], va[front], 0.045, value=0.45)
    return _blur(layer, 0.012 * g.px)


def _clavicles(g: _Grid, a: _Anatomy) -> np.ndarray:
    t = np.linspace(0.0, 1.0, 10)[None, :]
    sign = np.array([[-1.0], [1.0]])
    u = sign * (0.07 + 0.55 * t)
    v = np.repeat(a.clavicle_v + 0.03 * np.sin(np.pi * t * 1.6) - 0.13 * t, 2, axis=0)
    return _blur(_curves_layer(g, u, v, 0.06), 0.012 * g.px)


def _spine(g: _Grid) -> np.ndarray:
    discs = 1.0 - 0.45 * np.cos(np.pi * (g.v + 1.0) / 0.11) ** 8
    return _ramp(0.06 - np.abs(g.u), 0.03) * discs


def _vessels(g: _Grid, a: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Hilar shadows and vessel trees fanning out into the lungs (three generations, tapering)."""
    layer = np.zeros((g.r, g.r), np.float32)
    starts, angles, lengths = [], [], []
    for lung in a.lungs:
        hu, hv = lung.sign * rng.uniform(0.13, 0.18), rng.uniform(-0.12, 0.0)
        _stamp(g, layer, hu, hv, rng.uniform(0.04, 0.06), 0.3, ring=False)  # hilum
        m = int(rng.integers(6, 10))
        ang = rng.uniform(-0.45 * np.pi, 0.5 * np.pi, m)  # from up-lateral to down, in the lung's frame
        starts.append(np.tile([hu, hv], (m, 1)))
        angles.append(np.arctan2(np.sin(ang), lung.sign * np.cos(ang)))
        lengths.append(rng.uniform(0.22, 0.42, m))
    p0, ang, length = np.concatenate(starts), np.concatenate(angles), np.concatenate(lengths)
    value = 0.5
    for depth in range(3):
        p1 = p0 + length[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        _curves_layer(g, np.stack([p0[:, 0], p1[:, 0]], 1), np.stack([p0[:, 1], p1[:, 1]], 1),
                      0.022 / (1 + depth), value=value, layer=layer)
        turn = np.concatenate([-np.ones_like(ang), np.ones_like(ang)])
        keep = rng.random(turn.size) < 0.75
        p0 = np.concatenate([p1, p1])[keep]
        ang = (np.concatenate([ang, ang]) + turn * rng.uniform(0.25, 0.6, turn.size))[keep]
        length = (np.concatenate([length, length]) * rng.uniform(0.5, 0.75, turn.size))[keep]
        value *= 0.75
    return _blur(layer, 0.01 * g.px)


def _low_freq(rng: np.random.Generator, r: int, cells: int) -> np.ndarray:
    """Smooth zero-mean, unit-ish noise field (bicubic upsampling of a coarse grid)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (r, r), interpolation=cv2.INTER_CUBIC)


def _sample_in(rng: np.random.Generator, g: _Grid, field: np.ndarray, box: tuple[float, float, float, float],
               threshold: float = 0.95) -> tuple[float, float] | None:
    """Random point (u, v) inside ``box`` (u0, u1, v0, v1) where ``field > threshold``."""
    for _ in range(30):
        u = rng.uniform(box[0], box[1])
        v = rng.uniform(box[2], box[3])
        col = int(np.clip((u + 1.0) * g.px, 0, g.r - 1))
        row = int(np.clip((v + 1.0) * g.px, 0, g.r - 1))
        if field[row, col] > threshold:
            return u, v
    return None


def _stamp(g: _Grid, layer: np.ndarray, u: float, v: float, radius: float, value: float, ring: bool) -> None:
    centre = g.pt(u, v)
    rad = int(round(radius * g.px * _ONE))
    if ring:
        cv2.circle(layer, centre, rad, value, g.thick(0.012), cv2.LINE_AA, _SHIFT)
        cv2.circle(layer, centre, max(1, rad // 3), value, -1, cv2.LINE_AA, _SHIFT)
    else:
        cv2.circle(layer, centre, rad, value, -1, cv2.LINE_AA, _SHIFT)


def _distractors(g: _Grid, a: _Anatomy, lungs: np.ndarray, body: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Bright structures of both classes: granulomas, ECG leads and wires, side marker, breasts."""
    layer = np.zeros((g.r, g.r), np.float32)
    if rng.random() < 0.3:  # calcified granulomas
        for _ in range(int(rng.integers(1, 3))):
            p = _sample_in(rng, g, lungs, (-0.8, 0.8, -0.6, 0.45))
            if p is not None:
                _stamp(g, layer, p[0], p[1], rng.uniform(0.012, 0.025), rng.uniform(0.15, 0.35), ring=False)
    if rng.random() < 0.3:  # ECG leads with wires
        for _ in range(int(rng.integers(1, 5))):
            p = _sample_in(rng, g, body, (-0.85, 0.85, -0.7, 0.9), threshold=0.9)
            if p is None:
                continue
            value = rng.uniform(0.25, 0.5)
            _stamp(g, layer, p[0], p[1], rng.uniform(0.03, 0.05), value, ring=True)
            t = np.linspace(0.0, 1.0, 8)
            end_u = np.sign(p[0] + 1e-3) * 1.1
            wire_u = p[0] + (end_u - p[0]) * t
            wire_v = p[1] + rng.uniform(-0.3, 0.3) * np.sin(np.pi * t) + rng.uniform(-0.2, 0.4) * t
            _curves_layer(g, wire_u[None], wire_v[None], 0.0, value=0.6 * value, layer=layer)
    if rng.random() < 0.6:  # side marker
        scale = 0.011 * g.px
        org = (int(g.r * rng.uniform(0.04, 0.12)), int(g.r * rng.uniform(0.10, 0.16)))
        if rng.random() < 0.5:
            org = (g.r - org[0] - int(22 * scale), org[1])
        text = np.zeros((g.r, g.r), np.uint8)  # cv2.putText draws on 8-bit images only
        cv2.putText(text, "L" if rng.random() < 0.7 else "R", org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255,
                    max(1, int(round(2 * scale))), cv2.LINE_AA)
        layer += text.astype(np.float32) * np.float32(0.7 / 255.0)
    if rng.random() < 0.35:  # breast shadows over the lower zones
        gain = rng.uniform(0.04, 0.08)
        for lung in a.lungs:
            q = _ellipse(g, lung.sign * 0.5, lung.base + 0.05, 0.38, 0.32, 0.0)
            layer += gain * _ramp((1.0 - q) * 0.5, 0.5) * _ramp(g.v - (lung.base - 0.15), 0.1)
    return layer


def _lesions(g: _Grid, a: _Anatomy, lungs: np.ndarray, rng: np.random.Generator,
             fade: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Opacities inside the lung fields: (added intensity, boolean region).

    ``fade`` > 0 (a planted disparity) multiplies every opacity's intensity by
    ``1 - fade`` and its radius by ``1 - fade / 2``, after the same random
    draws: the positions and the rest of the image are unchanged.
    """
    hard = rng.random() < _P_HARD
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    layer = np.zeros((g.r, g.r), np.float32)
    region = np.zeros((g.r, g.r), bool)
    for _ in range(count):
        lung = a.lungs[int(rng.integers(0, 2))]
        zone = int(rng.integers(0, 3))  # upper, middle, lower
        z0 = lung.apex + 0.08 + zone * (lung.base - lung.apex - 0.12) / 3.0
        z1 = z0 + (lung.base - lung.apex - 0.12) / 3.0
        u0, u1 = sorted((lung.sign * (lung.medial + 0.04), lung.sign * (lung.lateral - 0.03)))
        centre = _sample_in(rng, g, lungs, (u0, u1, z0, z1), threshold=0.9)
        if centre is None:
            centre = _sample_in(rng, g, lungs, (-0.85, 0.85, -0.7, 0.5), threshold=0.9)
        if centre is None:
            continue
        if hard:
            radius, amp = rng.uniform(0.05, 0.10), rng.uniform(0.04, 0.07)
        else:
            radius = float(np.exp(rng.uniform(np.log(0.18), np.log(0.5))))
            amp = rng.uniform(0.22, 0.42)
        if fade:
            radius, amp = radius * (1.0 - 0.5 * fade), amp * (1.0 - fade)
        shape = _blob_shape(g, rng, centre, radius)
        layer += amp * shape * lungs
        region |= (shape > 0.5) & (lungs > 0.5)
    return layer, region


def _blob_shape(g: _Grid, rng: np.random.Generator, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Irregular patch in ``[0, 1]``: a sum of Gaussian blobs, modulated by smooth noise and soft-thresholded."""
    field = np.zeros((g.r, g.r), np.float32)
    for _ in range(int(rng.integers(3, 8))):
        cu = centre[0] + rng.normal(0.0, 0.45 * radius)
        cv = centre[1] + rng.normal(0.0, 0.45 * radius)
        sigma = radius * rng.uniform(0.35, 0.7)
        gx = np.exp(-0.5 * ((g.u[0] - cu) / sigma) ** 2)
        gy = np.exp(-0.5 * ((g.v[:, 0] - cv) / sigma) ** 2)
        field += rng.uniform(0.5, 1.0) * np.outer(gy, gx)
    cells = int(np.clip(2.0 / radius, 4, 24))
    field *= 0.65 + 0.35 * np.tanh(_low_freq(rng, g.r, cells))
    peak = float(field.max())
    if peak <= 0.0:
        return field
    field /= peak
    t = np.clip((field - 0.2) / 0.45, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ---------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------


Findings = Callable[[_Grid, _Anatomy, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
"""``(grid, anatomy, lung field, lesion rng) -> (added intensity, boolean region)``: what a disease adds."""


def _compose(r: int, index: int, label: int, seed: int,
             findings: Findings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Float image in [0, 1] and float lesion mask at the render size ``r``.

    ``findings`` draws the disease into the lungs (default: the binary set's
    opacities for ``label == 1``, nothing for ``label == 0``); it gets the
    lesion stream, so the patient (anatomy, noise) is the same whatever is added.
    """
    if findings is None and label == 1:
        findings = _lesions
    arng = _stream(seed, index, _STREAM_ANATOMY)
    nrng = _stream(seed, index, _STREAM_NOISE)
    a = _sample_anatomy(arng)
    g = _Grid(r)

    body = _body(g, a)
    media = _mediastinum(g, a)
    lungs = np.maximum(_lung_field(g, a.lungs[0]), _lung_field(g, a.lungs[1])) * (1.0 - media)
    # Lungs are a little denser towards the bases and the chest wall.
    lung_depth = _LUNG_DEPTH * arng.uniform(0.85, 1.15) * (1.0 - 0.22 * np.clip(g.v + 0.2, 0.0, 1.0))
    lung_depth = lung_depth * (1.0 - 0.25 * np.clip(np.abs(g.u) - 0.45, 0.0, 1.0) / 0.35)

    img = _BACKGROUND + (_SOFT_TISSUE - _BACKGROUND) * arng.uniform(0.9, 1.1) * body
    img = img - lung_depth * lungs
    img += 0.10 * media * body
    # Trachea (air column) and gastric bubble under the left hemidiaphragm.
    trachea = _ramp(0.028 - np.abs(g.u - 0.005), 0.02) * (g.v < -0.32) * body
    img -= 0.12 * trachea
    left = a.lungs[1]
    if arng.random() < 0.6:
        q = _ellipse(g, 0.4, left.base - left.dome + 0.12, arng.uniform(0.09, 0.16), 0.07, 0.0)
        img -= 0.18 * _ramp((1.0 - q) * 0.05, 0.03)
    img += 0.05 * _spine(g) * body
    below = _ramp(max(lung.base for lung in a.lungs) + 0.06 - g.v, 0.1)  # ribs fade below the domes
    img += a.rib_gain * _ribs(g, a, arng) * body * (0.3 + 0.7 * lungs) * below
    img += 0.12 * _clavicles(g, a) * body
    img += 0.09 * a.vessel_gain * _vessels(g, a, arng) * (0.3 + 0.7 * lungs)
    img += _distractors(g, a, lungs, body, arng)

    # Parenchymal texture (fine) and low-frequency background texture (coarse).
    img += arng.uniform(0.012, 0.028) * _low_freq(nrng, r, 24) * lungs
    img += arng.uniform(0.01, 0.03) * _low_freq(nrng, r, 5) * body

    mask = np.zeros((r, r), np.float32)
    if findings is not None:
        lesion, region = findings(g, a, lungs, _stream(seed, index, _STREAM_LESION))
        img += np.minimum(lesion, 0.9 * lung_depth)  # consolidation is at most about water-dense
        mask = region.astype(np.float32)

    img, mask = _warp(img.astype(np.float32), mask, a, g)
    img = _blur(img, arng.uniform(0.006, 0.02) * g.px)
    img = _expose(img, arng)
    img += nrng.standard_normal((r, r), dtype=np.float32) * np.float32(arng.uniform(0.006, 0.025))
    return img, mask


def _warp(img: np.ndarray, mask: np.ndarray, a: _Anatomy, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Patient position: rotation, scale and shift about the image centre."""
    centre = (g.r / 2.0 - 0.5, g.r / 2.0 - 0.5)
    m = cv2.getRotationMatrix2D(centre, a.angle, a.scale)
    m[0, 2] += a.shift[0] * g.px
    m[1, 2] += a.shift[1] * g.px
    out = cv2.warpAffine(img, m, (g.r, g.r), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if mask.any():
        mask = cv2.warpAffine(mask, m, (g.r, g.r), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return out, mask


def _expose(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure: contrast and brightness about mid-grey, then gamma."""
    contrast = rng.uniform(0.8, 1.25)
    brightness = rng.uniform(-0.08, 0.08)
    gamma = float(np.exp(rng.uniform(np.log(0.75), np.log(1.35))))
    out = np.clip((img - 0.35) * contrast + 0.35 + brightness, 0.0, 1.0)
    return np.power(out, np.float32(gamma), dtype=np.float32)


def _mask_to_bool(mask: np.ndarray) -> np.ndarray:
    out = mask >= 0.5
    if not out.any() and mask.max() > 0.0:  # a tiny lesion at a small size: keep its peak pixel
        out.flat[int(np.argmax(mask))] = True
    return out


def render_chest_phantom(index: int, label: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one chest phantom.

    Parameters
    ----------
    index : int
        Non-negative index of the phantom in its set; selects the patient.
    label : int
        0 ("normal") or 1 ("pneumonia": one to three opacities in the lungs).
    size : int, optional
        Output height and width in pixels, 16..1024.
    seed : int, optional
        Non-negative seed of the set.

    Returns
    -------
    image : np.ndarray
        ``uint8`` image, shape ``(size, size)``.
    lesion_mask : np.ndarray
        ``bool``, shape ``(size, size)``: the opacity region(s); all False
        for normals, never empty for pneumonia.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Notes
    -----
    The pixels depend only on ``(seed, index, size, label)``; the two labels of
    one index are the same patient and differ only by the opacities.
    """
    index = _check_int(index, "index", 0)
    label = _check_int(label, "label", 0, len(CHEST_CLASSES) - 1)
    size = _check_int(size, "size", MIN_SIZE, MAX_SIZE)
    seed = _check_int(seed, "seed", 0, 2**63 - 1)
    return _render(index, label, size, seed)


def _render(index: int, label: int, size: int, seed: int, fade: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    r = max(size, _MIN_RENDER)
    findings = partial(_lesions, fade=fade) if fade and label == 1 else None
    img, mask = _compose(r, index, label, seed, findings)
    if r != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        if label == 1:
            mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    image = np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    if label == 1:
        return image, _mask_to_bool(mask)
    return image, np.zeros((size, size), bool)


def make_chest_phantoms(
    n: int,
    size: int = 64,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    prevalence: float = 0.5,
    disparity: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render phantoms of a set of ``n`` (all, or the given ``indices``).

    Parameters
    ----------
    n : int
        Size of the set, ``>= 1``.
    size : int, optional
        Image height and width in pixels, 16..1024.
    seed : int, optional
        Non-negative seed of the set.
    indices : sequence of int or np.ndarray, optional
        Which phantoms to render, each in ``[0, n)``, in the order given
        (repeats allowed, may be empty). Default: ``range(n)``.
    prevalence : float, optional
        Probability of "pneumonia", strictly between 0 and 1.
    disparity : float, optional
        In [0, 0.95]. Above 0 plants a known subgroup disparity: the
        opacities of phantoms in :data:`DISPARITY_SUBGROUP` (female, see
        :func:`phantom_attributes`) are ``disparity`` fainter and
        ``disparity / 2`` smaller, so a model finds fewer of them. Every
        other image (negatives, male phantoms) is byte-identical to
        ``disparity=0``, which is the default rendering.

    Returns
    -------
    images : np.ndarray
        ``uint8``, shape ``(k, size, size)``.
    labels : np.ndarray
        ``int64``, shape ``(k,)``, equal to
        ``phantom_labels(n, seed, prevalence)[indices]``.

    Raises
    ------
    ValueError
        If an argument is out of range or ``indices`` is not a 1-D integer
        array within ``[0, n)``.
    """
    n = _check_int(n, "n", 1)
    size = _check_int(size, "size", MIN_SIZE, MAX_SIZE)
    seed = _check_int(seed, "seed", 0, 2**63 - 1)
    p = _check_prevalence(prevalence)
    idx = _check_indices(indices, n)
    fades = _faded(idx, seed, _check_disparity(disparity))
    labels = _labels_of(idx.astype(np.uint64), seed, p)
    images = np.empty((idx.size, size, size), np.uint8)
    for row, (i, y) in enumerate(zip(idx.tolist(), labels.tolist(), strict=True)):
        images[row] = _render(i, y, size, seed, float(fades[row]))[0]
    logger.debug("rendered %d chest phantoms (%d positive) at %d px", idx.size, int(labels.sum()), size)
    return images, labels


def _check_indices(indices: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(indices)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D sequence of integers, got dtype {arr.dtype} and shape {arr.shape}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(f"indices must lie in [0, n) = [0, {n}), got {bad}")
    return arr.astype(np.int64)
