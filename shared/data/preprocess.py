"""Per-image preprocessing (cached once per site) and batch-time transforms.

Two stages, deliberately separated:

* :func:`preprocess` (OpenCV + NumPy) turns one decoded image into a ``uint8``
  square of side ``cfg.size``. Its output is what :mod:`shared.data.cache`
  stores, so everything here must be deterministic and cheap to describe
  (:meth:`PreprocessConfig.to_dict` is part of the cache key).
* :func:`normalize_batch` and :func:`augment_batch` work on float tensors
  ``(B, C, H, W)`` in ``[0, 1]`` at batch time and are NOT cached: intensity
  normalisation and training augmentation can change without a rebuild.

Order inside :func:`preprocess`::

    to float [0, 1] -> gray (channels == 1, colour input) -> denoise
      -> resize (INTER_AREA shrinking, INTER_LINEAR growing)
      -> equalize (on uint8) -> letterbox padding -> uint8

When equalizing and the output is smaller than :data:`EQUALIZE_MIN_SIDE`
(256 px), the resize goes to 256 px first, equalization runs there, and a
final INTER_AREA shrink follows: CLAHE's clip limit is relative to the pixels
per tile, so "clip 2.0 on 8x8 tiles" at 64 px (64 pixels per tile for 256
bins) would be a different, much harsher operation than at 256 px.

With ``resize="letterbox"`` the image is equalized *before* it is padded, so
the uniform padding neither enters the histogram (it would put a spike at the
pad value and distort ``"hist"``) nor creates CLAHE tiles of pure padding.

Colour input is taken as **RGB**. OpenCV's decoders return BGR: a reader for a
colour task converts before it hands the image over.

This module imports neither Flower nor (at import time) torch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from shared.data.sources import ImageReadError
from shared.settings import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "NORMALIZE_MODES",
    "ROBUST_CHOICES",
    "ROBUST_LEVELS",
    "AugmentConfig",
    "PreprocessConfig",
    "UnusableImageError",
    "augment_batch",
    "normalize_batch",
    "preprocess",
    "robust_augment",
]

RESIZE_MODES: tuple[str, ...] = ("letterbox", "squash")
EQUALIZE_MODES: tuple[str, ...] = ("none", "hist", "clahe")
DENOISE_MODES: tuple[str, ...] = ("none", "gaussian", "bilateral")
NORMALIZE_MODES: tuple[str, ...] = ("fixed", "minmax", "zscore")

GAUSSIAN_SIGMA_PX = 1.0
"""``denoise="gaussian"``: sigma in source pixels (applied before resizing)."""
BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE = 5, 0.1, 2.0
"""``denoise="bilateral"``: diameter, colour sigma (on [0, 1]) and space sigma (px)."""
EQUALIZE_MIN_SIDE = 256
"""Equalization runs at this long side (or the source's, if smaller) before the final shrink."""


class UnusableImageError(ImageReadError, ValueError):
    """An image decoded but cannot be preprocessed (constant, no finite pixel, bad shape).

    ``reason`` is a short count label (``"constant-image"``), safe to log.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------
# Config validation helpers (shared by both dataclasses)
# ---------------------------------------------------------------------------


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _check_choice(owner: str, key: str, value: object, allowed: tuple[str, ...]) -> None:
    if isinstance(value, str) and value in allowed:
        return
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{owner} '{key}': got {value!r}; allowed values: {', '.join(allowed)}.{hint}")


def _check_number(owner: str, key: str, value: object, kind: type, low: float, high: float, *,
                  low_open: bool = False) -> None:
    ok_type = not isinstance(value, bool) and (
        isinstance(value, int) if kind is int else isinstance(value, (int, float)))
    lo = "(" if low_open else "["
    allowed = f"{'an integer' if kind is int else 'a number'} in {lo}{low:g}, {high:g}]"
    if not ok_type:
        raise ConfigError(f"{owner} '{key}': got {value!r} ({type(value).__name__}); allowed values: {allowed}.")
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v) or (v <= low if low_open else v < low) or v > high:
        raise ConfigError(f"{owner} '{key}': got {value!r}; allowed values: {allowed}.")


def _check_bool(owner: str, key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner} '{key}': got {value!r} ({type(value).__name__}); allowed values: true, false.")


def _from_dict(cls: Any, d: Mapping[str, object], owner: str) -> Any:
    """Build ``cls`` from kebab-case (or snake_case) keys; unknown keys raise."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{owner}: expected a mapping of settings, got {type(d).__name__}.")
    names = {_kebab(f.name): f for f in fields(cls)}
    kwargs: dict[str, object] = {}
    for raw_key, value in d.items():
        key = _kebab(str(raw_key))
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{owner}: unknown key {raw_key!r}; allowed keys: {', '.join(names)}.{hint}")
        f = names[key]
        if f.type in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _to_dict(obj: Any) -> dict[str, object]:
    return {_kebab(f.name): getattr(obj, f.name) for f in fields(obj)}


# ---------------------------------------------------------------------------
# Per-image preprocessing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    """How one decoded image becomes a cached ``uint8`` square.

    Attributes
    ----------
    size : int
        Output side in pixels (8..4096).
    resize : str
        ``"letterbox"``: keep the aspect ratio and pad to a square with the
        median of the resized image's border pixels; ``"squash"``: stretch to
        the square (distorts anatomy, e.g. the cardiothoracic ratio).
    equalize : str
        ``"none"``, ``"hist"`` (global histogram equalization) or ``"clahe"``.
        Colour images are equalized on the L channel of Lab.
    clahe_clip : float
        CLAHE clip limit (0, 40].
    clahe_tiles : int
        CLAHE tile grid (``tiles x tiles``), 1..64.
    denoise : str
        ``"none"``, ``"gaussian"`` (sigma 1 px) or ``"bilateral"`` (d 5), at
        source resolution before resizing.
    channels : int
        1 (gray; colour input is converted) or 3 (RGB; gray input is repeated).
    """

    size: int = 64
    resize: str = "letterbox"
    equalize: str = "none"
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    denoise: str = "none"
    channels: int = 1

    def __post_init__(self) -> None:
        o = "preprocess"
        _check_number(o, "size", self.size, int, 8, 4096)
        _check_choice(o, "resize", self.resize, RESIZE_MODES)
        _check_choice(o, "equalize", self.equalize, EQUALIZE_MODES)
        _check_number(o, "clahe-clip", self.clahe_clip, float, 0, 40, low_open=True)
        _check_number(o, "clahe-tiles", self.clahe_tiles, int, 1, 64)
        _check_choice(o, "denoise", self.denoise, DENOISE_MODES)
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ConfigError(f"preprocess 'channels': got {self.channels!r}; allowed values: 1, 3.")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready kebab-case settings (recorded in results, hashed into the cache key)."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults.

        Raises
        ------
        shared.config.ConfigError
            (a ``ValueError``) for an unknown key or a bad value, naming the
            key, the value, the allowed values and a did-you-mean.
        """
        return _from_dict(cls, d, "preprocess")


def _to_float01(image: np.ndarray) -> np.ndarray:
    """Any decoded image -> float32 in [0, 1], same shape.

    ``uint8`` is divided by 255 and floats already inside [0, 1] pass; every
    other depth (uint16 holding 10-16 bit data, signed ints, floats outside
    [0, 1]) is min-max scaled over the image's finite range, as
    :func:`shared.data.sources.read_image` does: dividing a 12-bit image stored
    in uint16 by 65535 would leave 16 gray levels after the uint8 cache.
    """
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(1.0 / 255.0)
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise UnusableImageError(f"unsupported pixel type {image.dtype}", "unsupported-dtype")
    data = image.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        raise UnusableImageError("image has no finite pixel value", "no-finite-pixels")
    all_finite = bool(finite.all())
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if np.issubdtype(image.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        out = data if all_finite else np.where(finite, data, lo)
        return out.astype(np.float32)
    if hi <= lo:
        # Min-max is undefined: a constant image must not silently become zeros.
        raise UnusableImageError(f"image is constant (every pixel = {lo:g})", "constant-image")
    out = (data if all_finite else np.where(finite, data, lo)) - lo
    return (out * (1.0 / (hi - lo))).astype(np.float32)


def _channels_last(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4: alpha dropped) -> (H, W) or (H, W, 3)."""
    if image.ndim == 2:
        out = image
    elif image.ndim == 3 and image.shape[2] == 1:
        out = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        out = image[:, :, :3]
    else:
        raise UnusableImageError(f"unsupported image shape {image.shape}: expected (H, W) or (H, W, 1/3/4)",
                                 "unsupported-shape")
    if out.shape[0] < 1 or out.shape[1] < 1:
        raise UnusableImageError(f"empty image of shape {image.shape}", "empty-image")
    return out


def _denoise(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "gaussian":
        return cv2.GaussianBlur(x, (0, 0), GAUSSIAN_SIGMA_PX, borderType=cv2.BORDER_REFLECT)
    if mode == "bilateral":
        return cv2.bilateralFilter(x, BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE)
    return x


def _resize_to(x: np.ndarray, h: int, w: int) -> np.ndarray:
    if x.shape[:2] == (h, w):
        return x
    shrinking = h <= x.shape[0] and w <= x.shape[1]
    return cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _equalize(u8: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    if cfg.equalize == "none":
        return u8
    if u8.ndim == 3:  # colour: equalize lightness only, keep hue/saturation
        lab = cv2.cvtColor(u8, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = _equalize(np.ascontiguousarray(lab[:, :, 0]), cfg)
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    if cfg.equalize == "hist":
        return cv2.equalizeHist(u8)
    tiles = max(1, min(cfg.clahe_tiles, u8.shape[0], u8.shape[1]))
    return cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(tiles, tiles)).apply(u8)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _letterbox_pad(u8: np.ndarray, size: int) -> np.ndarray:
    h, w = u8.shape[:2]
    if (h, w) == (size, size):
        return u8
    ring = np.concatenate([u8[0], u8[-1], u8[:, 0], u8[:, -1]], axis=0)
    fill = np.median(ring, axis=0)
    value: float | list[float] = float(fill) if u8.ndim == 2 else [float(v) for v in fill]
    top, left = (size - h) // 2, (size - w) // 2
    return cv2.copyMakeBorder(u8, top, size - h - top, left, size - w - left, cv2.BORDER_CONSTANT, value=value)


def content_box(h: int, w: int, cfg: PreprocessConfig) -> tuple[int, int, int, int]:
    """Where an ``h`` x ``w`` image lands inside the square :func:`preprocess` makes.

    Returns
    -------
    tuple of int
        ``(top, left, height, width)`` of the resized image in the
        ``cfg.size`` square: the whole square for ``"squash"``, the centred
        aspect-keeping box for ``"letterbox"`` (the rest is padding).
    """
    size = cfg.size
    if cfg.resize == "squash":
        return 0, 0, size, size
    scale = size / max(h, w)
    th = min(size, max(1, round(h * scale)))
    tw = min(size, max(1, round(w * scale)))
    return (size - th) // 2, (size - tw) // 2, th, tw


def model_spacing(spacing: tuple[float, float], shape: tuple[int, int], cfg: PreprocessConfig) -> tuple[float, float]:
    """Pixel spacing after :func:`preprocess`: ``spacing * original extent / resized extent`` per axis.

    Parameters
    ----------
    spacing : tuple of float
        ``(row, column)`` spacing of the original image, e.g. in mm.
    shape : tuple of int
        ``(height, width)`` of the original image.
    cfg : PreprocessConfig
        The resize (letterbox keeps the aspect ratio, so both axes usually
        scale alike; squash scales each axis on its own).

    Returns
    -------
    tuple of float
        ``(row, column)`` spacing of the model's input pixels, same unit.
    """
    h, w = int(shape[0]), int(shape[1])
    _, _, th, tw = content_box(h, w, cfg)
    return float(spacing[0]) * h / th, float(spacing[1]) * w / tw


def preprocess(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Turn one decoded image into the cached ``uint8`` square.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA,
        alpha dropped); ``uint8``, another integer depth (min-max scaled),
        ``bool`` or float in ``[0, 1]`` (other float ranges are min-max scaled).
    cfg : PreprocessConfig
        The settings.

    Returns
    -------
    np.ndarray
        ``uint8`` ``(size, size)`` when ``cfg.channels == 1``, else
        ``(size, size, 3)`` RGB.

    Raises
    ------
    UnusableImageError
        (an :class:`~shared.data.sources.ImageReadError`) with a ``reason``
        for a constant non-8-bit image, no finite pixel, or a bad shape/dtype.
    """
    image = _channels_last(np.asarray(image))
    x = _to_float01(image)
    if x.ndim == 3 and cfg.channels == 1:
        x = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
    x = _denoise(np.ascontiguousarray(x), cfg.denoise)
    h, w = x.shape[:2]
    _, _, th, tw = content_box(h, w, cfg)
    # Equalize at >= EQUALIZE_MIN_SIDE px (when the source has that many), then
    # shrink: CLAHE's clip limit is per tile pixel count, and 8x8 tiles of a
    # 64 px image hold 64 pixels for 256 bins, so the limit floors to 1 and
    # "clip 2.0" stops meaning what it means in the literature (and what it
    # means at size 256). This keeps the look independent of cfg.size.
    side = max(th, tw)
    work = min(EQUALIZE_MIN_SIDE, max(h, w))
    if cfg.equalize != "none" and work > side:
        f = work / side
        x = _resize_to(x, max(1, round(th * f)), max(1, round(tw * f)))
        u8 = _equalize(_to_u8(x), cfg)
        u8 = cv2.resize(u8, (tw, th), interpolation=cv2.INTER_AREA)
    else:
        u8 = _equalize(_to_u8(_resize_to(x, th, tw)), cfg)
    u8 = _letterbox_pad(u8, cfg.size)
    if cfg.channels == 3 and u8.ndim == 2:
        u8 = np.repeat(u8[:, :, None], 3, axis=2)
    return np.ascontiguousarray(u8)




# ---------------------------------------------------------------------------
# Batch-time intensity normalisation
# ---------------------------------------------------------------------------


def normalize_batch(x: torch.Tensor, mode: str = "fixed", mean: float = 0.5, std: float = 0.25) -> torch.Tensor:
    """Normalise float images ``(B, C, H, W)`` in ``[0, 1]`` for the network.

    Parameters
    ----------
    x : torch.Tensor
        Float batch in ``[0, 1]``.
    mode : str
        ``"fixed"``: ``(x - mean) / std``. ``"minmax"``: each image stretched
        to ``[0, 1]`` (over C, H, W) then ``(x - 0.5) / 0.25``.
        ``"zscore"``: each image ``(x - mean_i) / std_i`` (population std,
        floored at 1e-6).
    mean, std : float
        Used by ``"fixed"`` only; ``std`` must be > 0.

    Returns
    -------
    torch.Tensor
        A new tensor of the same shape and dtype.
    """
    _check_choice("normalize", "mode", mode, NORMALIZE_MODES)
    if x.ndim != 4:
        raise ValueError(f"normalize_batch expects (B, C, H, W), got shape {tuple(x.shape)}")
    if mode == "fixed":
        if not std > 0:
            raise ValueError(f"normalize_batch: std must be > 0, got {std}")
        return (x - mean) / std
    flat = x.reshape(x.shape[0], -1)
    if mode == "minmax":
        lo = flat.amin(dim=1).view(-1, 1, 1, 1)
        hi = flat.amax(dim=1).view(-1, 1, 1, 1)
        return ((x - lo) / (hi - lo).clamp_min(1e-6) - 0.5) / 0.25
    # Statistics in float64: a float32 mean of a constant image is off by an
    # ulp, which the 1e-6 std floor would blow up to a visible offset.
    flat64 = flat.double()
    mu = flat64.mean(dim=1)
    sd = (flat64 - mu[:, None]).pow(2).mean(dim=1).sqrt().clamp_min(1e-6)
    return (x - mu.to(x.dtype).view(-1, 1, 1, 1)) / sd.to(x.dtype).view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------
# Batch-time training augmentation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Random training augmentation, drawn per image.

    Attributes
    ----------
    rotation_deg : float
        Rotation uniform in ``+-rotation_deg`` degrees (0..180).
    hflip, vflip : bool
        Random (p = 0.5) horizontal / vertical flips. Off by default: in chest
        and abdominal radiographs laterality matters (heart on the left,
        dextrocardia and situs inversus are findings).
    scale : float
        Zoom factor uniform in ``1 +- scale`` ([0, 0.9]).
    translate : float
        Shift uniform in ``+-translate`` of the side ([0, 0.5]).
    brightness : float
        Added offset uniform in ``+-brightness`` on [0, 1] intensities.
    contrast : float
        Contrast factor uniform in ``1 +- contrast`` around each image's mean ([0, 0.9]).
    color_jitter : float
        RGB only: saturation factor ``1 +- color_jitter`` and a hue rotation of
        ``+-90 * color_jitter`` degrees about the gray axis. Ignored for 1 channel.
    gamma : float
        Acquisition robustness (all of these default to 0 = off; see
        :func:`robust_augment`): gamma ``exp(U(-gamma, gamma))`` applied to
        the ``[0, 1]`` intensities (a detector's or a site's response curve).
    hist_shift : float
        Random monotone tone curve: the inner control points of a piecewise
        linear intensity map move by up to ``hist_shift`` of their spacing
        (MONAI ``RandHistogramShift``-like); ``< 0.5`` keeps it monotone.
    noise : float
        Additive Gaussian noise, std uniform in ``[0, noise]`` per image.
    blur : float
        Gaussian blur, sigma uniform in ``[0, blur]`` pixels per image.
    resolution_loss : float
        Down-and-up resampling: the image is shrunk to a factor uniform in
        ``[1 - resolution_loss, 1]`` of its side (area average) and enlarged
        back (bilinear), losing detail as a coarser detector would.
    elastic : float
        Smooth random deformation (a 5 x 5 grid of random offsets, bicubic
        upsampled), displacement up to ``elastic`` of the side; image and
        mask move together.
    robust_p : float
        Probability that each of the six transforms above is applied to an
        image (independently per transform and image).
    """

    rotation_deg: float = 7.0
    hflip: bool = False
    vflip: bool = False
    scale: float = 0.08
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.15
    color_jitter: float = 0.0
    gamma: float = 0.0
    hist_shift: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    resolution_loss: float = 0.0
    elastic: float = 0.0
    robust_p: float = 0.5

    def __post_init__(self) -> None:
        o = "augment"
        _check_bool(o, "hflip", self.hflip)
        _check_bool(o, "vflip", self.vflip)
        for name, high in _AUGMENT_LIMITS.items():
            _check_number(o, _kebab(name), getattr(self, name), float, 0, high)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready kebab-case settings (recorded in results)."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`; unknown keys or bad values raise ``ConfigError``."""
        return _from_dict(cls, d, "augment")

    @property
    def geometric(self) -> bool:
        """True when any geometric transform (elastic deformation included) is enabled."""
        return bool(self.rotation_deg or self.scale or self.translate or self.hflip or self.vflip or self.elastic)

    @property
    def robust(self) -> bool:
        """True when any acquisition-robustness transform (gamma ... elastic) is enabled."""
        return any(getattr(self, name) for name in ROBUST_FIELDS)


#: Upper bound of each numeric AugmentConfig field (lower bound 0).
_AUGMENT_LIMITS: dict[str, float] = {
    "rotation_deg": 180.0, "scale": 0.9, "translate": 0.5, "brightness": 1.0, "contrast": 0.9, "color_jitter": 1.0,
    "gamma": 1.0, "hist_shift": 0.45, "noise": 0.2, "blur": 4.0, "resolution_loss": 0.8, "elastic": 0.1,
    "robust_p": 1.0,
}
ROBUST_FIELDS: tuple[str, ...] = ("gamma", "hist_shift", "noise", "blur", "resolution_loss", "elastic")
"""The acquisition-robustness fields of :class:`AugmentConfig` (all 0 = today's augmentation)."""

ROBUST_LEVELS: dict[str, dict[str, float]] = {
    # About the spread of the simulated site profiles (site-shift: contrast 0.8-1.25, gamma 0.8-1.25,
    # noise <= 0.03, blur <= 1 px, resolution 0.5-0.9, brightness +-0.08), applied to half the images.
    "light": {"gamma": 0.15, "hist_shift": 0.2, "noise": 0.02, "blur": 0.75, "resolution_loss": 0.3,
              "elastic": 0.015, "contrast": 0.25, "brightness": 0.1, "scale": 0.1, "translate": 0.06,
              "robust_p": 0.5},
    # Beyond that spread, to most images: gamma 0.70-1.42, sigma up to 1.5 px, down to 40 % resolution.
    "strong": {"gamma": 0.35, "hist_shift": 0.4, "noise": 0.04, "blur": 1.5, "resolution_loss": 0.6,
               "elastic": 0.03, "contrast": 0.35, "brightness": 0.15, "scale": 0.15, "translate": 0.08,
               "robust_p": 0.8},
}
"""``robust-augment`` levels: the value each field takes at strength 1 (see :func:`robust_augment`)."""
ROBUST_CHOICES: tuple[str, ...] = ("none", *ROBUST_LEVELS)
MAX_ROBUST_STRENGTH = 2.0


def robust_augment(base: AugmentConfig, level: str, strength: float = 1.0) -> AugmentConfig:
    """``base`` with the acquisition-robust augmentation of ``level`` at ``strength`` added.

    Parameters
    ----------
    base : AugmentConfig
        The task's augmentation (rotation, flips, ...).
    level : str
        ``"none"`` (``base`` unchanged), ``"light"`` or ``"strong"`` (:data:`ROBUST_LEVELS`).
    strength : float
        In ``[0, 2]``. Each field of the level moves from ``base``'s value
        towards the level's by this factor: 0 = ``base``, 1 = the level,
        2 = twice as far (capped at each field's limit). Fields where
        ``base`` is already stronger than the level keep ``base``'s value;
        ``robust_p`` is the level's, not scaled.

    Returns
    -------
    AugmentConfig
        ``base`` itself when ``level`` is ``"none"`` or ``strength`` is 0.
    """
    _check_choice("robust-augment", "level", level, ROBUST_CHOICES)
    _check_number("robust-augment", "strength", strength, float, 0, MAX_ROBUST_STRENGTH)
    if level == "none" or strength == 0:
        return base
    changes: dict[str, float] = {}
    for name, target in ROBUST_LEVELS[level].items():
        if name == "robust_p":
            changes[name] = target
            continue
        current = float(getattr(base, name))
        if target > current:
            changes[name] = min(current + strength * (target - current), _AUGMENT_LIMITS[name])
    return replace(base, **changes)


# Column order of the random draws; fixed so that toggling one setting does not
# shift the random stream of the others.
_R_ROT, _R_SCALE, _R_TX, _R_TY, _R_HFLIP, _R_VFLIP, _R_BRIGHT, _R_CONTRAST, _R_SAT, _R_HUE = range(10)
_N_DRAWS = 10


def affine_theta(r: Any, cfg: AugmentConfig, h: int, w: int) -> Any:
    """Affine matrices ``(B, 2, 3)`` (output -> input, ``[-1, 1]`` units) from uniform draws ``r`` in ``[0, 1)``.

    ``r`` is ``(B, >= 6)`` float32; its first six columns are rotation, zoom,
    x/y shift, horizontal and vertical flip (in that order). The ``h / w``
    factors keep rotations rigid in pixels for non-square images. Shared by
    image augmentation and the joint image/mask augmentation of segmentation.
    """
    import torch

    u = r * 2.0 - 1.0
    ang = u[:, _R_ROT] * math.radians(cfg.rotation_deg)
    zoom = 1.0 + u[:, _R_SCALE] * cfg.scale
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    fx = torch.where((r[:, _R_HFLIP] < 0.5) & cfg.hflip, -1.0, 1.0)
    fy = torch.where((r[:, _R_VFLIP] < 0.5) & cfg.vflip, -1.0, 1.0)
    theta = torch.zeros((r.shape[0], 2, 3), device=r.device, dtype=torch.float32)
    theta[:, 0, 0] = cos * fx
    theta[:, 0, 1] = -sin * (h / w) * fy
    theta[:, 1, 0] = sin * (w / h) * fx
    theta[:, 1, 1] = cos * fy
    theta[:, 0, 2] = u[:, _R_TX] * cfg.translate * 2.0
    theta[:, 1, 2] = u[:, _R_TY] * cfg.translate * 2.0
    return theta


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a training batch; deterministic for a given generator state.

    Geometry (rotation, zoom, shift, flips, elastic deformation) is one
    ``affine_grid`` + ``grid_sample`` (bilinear) call for the whole batch;
    pixels that come from outside the image take each image's minimum. Then
    resolution loss and blur, contrast (around each image's mean) and
    brightness, gamma and the random tone curve, for 3 channels
    saturation/hue, and noise; the result is clamped to ``[0, 1]``. The
    acquisition-robustness transforms (:mod:`shared.data.robust_augment`)
    draw their random numbers after the others and only when one of them is
    on (:attr:`AugmentConfig.robust`): without them the draws and the output
    are exactly those of the augmentation before they existed.

    Parameters
    ----------
    x : torch.Tensor
        Float batch ``(B, C, H, W)`` in ``[0, 1]``; not modified.
    cfg : AugmentConfig
        Ranges of the random transforms.
    generator : torch.Generator
        Source of randomness (CPU or on ``x``'s device).

    Returns
    -------
    torch.Tensor
        A new tensor, same shape, dtype and device as ``x``.
    """
    import torch
    import torch.nn.functional as F

    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"augment_batch expects a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    b, c, h, w = x.shape
    r = torch.rand((b, _N_DRAWS), generator=generator, device=generator.device, dtype=torch.float64)
    r = r.to(device=x.device, dtype=torch.float32)
    u = r * 2.0 - 1.0  # uniform in [-1, 1]
    rd = None
    if cfg.robust and b > 0:
        from shared.data import robust_augment as ra

        rd = ra.draw_robust(b, generator, x.device)
    out = x
    if cfg.geometric and b > 0:
        theta = affine_theta(r, cfg, h, w).to(x.dtype)
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        if rd is not None and cfg.elastic:
            grid = grid + ra.elastic_offsets(rd, cfg, h, w).to(x.dtype)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        out = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + lo
    if rd is not None and (cfg.resolution_loss or cfg.blur):
        out = ra.degrade(out, rd, cfg)
    if cfg.contrast or cfg.brightness:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        k = (1.0 + u[:, _R_CONTRAST] * cfg.contrast).view(-1, 1, 1, 1)
        off = (u[:, _R_BRIGHT] * cfg.brightness).view(-1, 1, 1, 1)
        out = (out - mean) * k + mean + off
    if rd is not None and (cfg.gamma or cfg.hist_shift):
        out = ra.tone(out, rd, cfg)
    if c == 3 and cfg.color_jitter:
        out = _color_jitter(out, u[:, _R_SAT], u[:, _R_HUE], cfg.color_jitter)
    if rd is not None and cfg.noise:
        out = ra.add_noise(out, rd, cfg, generator)
    if out is x:
        out = x.clone()
    return out.clamp(0.0, 1.0)


def _color_jitter(x: torch.Tensor, u_sat: torch.Tensor, u_hue: torch.Tensor, amount: float) -> torch.Tensor:
    """Saturation scaling and hue rotation about the gray axis (RGB, per image)."""
    import torch

    gray = x.mean(dim=1, keepdim=True)
    x = gray + (x - gray) * (1.0 + u_sat * amount).view(-1, 1, 1, 1)
    ang = u_hue * math.radians(90.0 * amount)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # Rodrigues rotation about (1, 1, 1) / sqrt(3): keeps luminance-ish gray fixed.
    a = (cos + (1.0 - cos) / 3.0).view(-1, 1)
    b_ = ((1.0 - cos) / 3.0 - sin / math.sqrt(3.0)).view(-1, 1)
    c_ = ((1.0 - cos) / 3.0 + sin / math.sqrt(3.0)).view(-1, 1)
    m = torch.stack([torch.cat([a, b_, c_], 1), torch.cat([c_, a, b_], 1), torch.cat([b_, c_, a], 1)],
                    dim=1)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m.to(x.dtype), x)
