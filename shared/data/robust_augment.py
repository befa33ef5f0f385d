"""Acquisition-robust augmentation on batched tensors: gamma, tone curve, noise, blur, resolution loss, elastic.

The random transforms behind ``robust-augment`` (domain randomisation: a
model trained on one federation's scanners should survive another
hospital's). :func:`shared.data.preprocess.augment_batch` and
:func:`shared.objectives.segmentation.augment_pair` call these; the ranges
come from :class:`shared.data.preprocess.AugmentConfig` (``gamma``,
``hist_shift``, ``noise``, ``blur``, ``resolution_loss``, ``elastic``,
``robust_p``).

Why not MONAI's (or torchvision's) random transforms
----------------------------------------------------
MONAI's ``RandAdjustContrast``, ``RandHistogramShift``, ``RandGaussianNoise``,
``RandGaussianSmooth``, ``RandSimulateLowResolution`` and ``Rand2DElasticd``
work on one image per call with their own ``numpy.random.RandomState``: on a
batch they need a Python loop per image and per transform. Measured on this
project's 2-core CPU machine (``benchmarks/augment_throughput.py`` keeps the
comparison), the five photometric ones cost ~0.5 s per batch of 32 images at
64 px, and ``Rand2DElasticd`` another ~0.5 s, 10-50x a small-cnn training step;
here every transform is one batched tensor operation (a few ms). torchvision's
v2 transforms draw one set of parameters per call (the same for the whole
batch) from torch's global generator. So the transforms are written here,
per image, on the training device, every random number drawn from the
training loop's ``torch.Generator`` (same seed, same batches). Their
deterministic parts are tested against MONAI's non-random transforms
(``AdjustContrast``, ``GaussianSmooth``) and ``numpy.interp`` in
``tests/test_robust_augment.py``.

Every transform is per image: an image's output depends on its own pixels
and its own random draws (row ``i`` of each draw) only, as DP-SGD requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class AugmentConfig(Protocol):
    """The fields of :class:`shared.data.preprocess.AugmentConfig` these transforms read.

    A protocol rather than an import: :mod:`shared.data.preprocess` calls this
    module, so importing from it here would make the two modules import each
    other.
    """

    robust_p: float
    gamma: float
    hist_shift: float
    noise: float
    blur: float
    resolution_loss: float
    elastic: float

__all__ = [
    "ELASTIC_GRID",
    "HIST_POINTS",
    "RobustDraws",
    "add_noise",
    "degrade",
    "draw_robust",
    "elastic_offsets",
    "gaussian_blur",
    "resample_lower",
    "tone",
    "tone_curve",
]

ELASTIC_GRID = 5
"""Control points per side of the elastic displacement field (bicubic in between)."""
HIST_POINTS = 6
"""Control points of the random tone curve (the 2 end points stay fixed)."""

# Columns of RobustDraws.params: for each transform "does it fire" then its magnitude. Fixed, so that
# turning one transform on or off does not shift the random numbers of the others.
(_P_GAMMA, _GAMMA, _P_HIST, _P_RES, _RES, _P_BLUR, _BLUR, _P_NOISE, _NOISE, _P_ELASTIC, _ELASTIC) = range(11)
_N_PARAMS = 11


@dataclass(frozen=True)
class RobustDraws:
    """The uniform ``[0, 1)`` draws of one batch (rows = images), on the images' device.

    Attributes
    ----------
    params : torch.Tensor
        ``(B, 11)``: per transform whether it fires (``< robust_p``) and its magnitude.
    hist : torch.Tensor
        ``(B, HIST_POINTS - 2)``: displacement of the tone curve's inner control points.
    field : torch.Tensor
        ``(B, 2, ELASTIC_GRID, ELASTIC_GRID)``: elastic control-point offsets (x, y).
    """

    params: torch.Tensor
    hist: torch.Tensor
    field: torch.Tensor

    def fires(self, column: int, p: float) -> torch.Tensor:
        """Boolean ``(B,)``: which images get the transform of ``column``."""
        return self.params[:, column] < p


def draw_robust(b: int, generator: torch.Generator, device: torch.device) -> RobustDraws:
    """Draw every fixed-size random number of a batch's robust transforms (noise is drawn by :func:`add_noise`).

    Always the same amount, whichever transforms are on, so each keeps its
    random stream when another is switched.
    """
    def rand(*shape: int) -> torch.Tensor:
        r = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
        return r.to(device=device, dtype=torch.float32)

    return RobustDraws(rand(b, _N_PARAMS), rand(b, HIST_POINTS - 2), rand(b, 2, ELASTIC_GRID, ELASTIC_GRID))


# ---------------------------------------------------------------------------
# Geometry: elastic deformation (added to the affine sampling grid)
# ---------------------------------------------------------------------------


def elastic_offsets(draws: RobustDraws, cfg: AugmentConfig, h: int, w: int) -> torch.Tensor:
    """Smooth random displacements ``(B, H, W, 2)`` in ``grid_sample`` units, to add to an affine grid.

    Each firing image gets control-point offsets uniform in ``+-m`` of the
    side, ``m`` uniform in ``[0, cfg.elastic]``, on a
    :data:`ELASTIC_GRID` x :data:`ELASTIC_GRID` grid upsampled bicubically
    (smooth, no folding at these magnitudes); the others get zeros. Image and
    mask must be sampled with the same grid.
    """
    mag = draws.params[:, _ELASTIC] * cfg.elastic * draws.fires(_P_ELASTIC, cfg.robust_p)
    coarse = (draws.field * 2.0 - 1.0) * (2.0 * mag).view(-1, 1, 1, 1)  # [-1, 1] grid units span 2 sides
    dense = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    return dense.permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------
# Image quality: resolution loss and blur (before contrast changes)
# ---------------------------------------------------------------------------


def resample_lower(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Shrink each image to ``factors[i]`` of its side (area average) and enlarge it back (bilinear).

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, H, W)`` float.
    factors : torch.Tensor
        ``(B,)`` in ``(0, 1]``; images whose reduced side rounds to the full
        side are returned unchanged.

    Returns
    -------
    torch.Tensor
        A new tensor like ``x``. Images of the same reduced size are resampled
        together (one ``interpolate`` pair per distinct size).
    """
    b, _, h, w = x.shape
    hs = (factors * h).round().clamp(2, h).long()
    ws = (factors * w).round().clamp(2, w).long()
    out = x.clone()
    sizes = torch.stack([hs, ws], dim=1)
    todo = (hs < h) | (ws < w)
    for sh, sw in torch.unique(sizes[todo], dim=0).tolist():
        rows = torch.nonzero(todo & (hs == sh) & (ws == sw)).flatten()
        small = F.interpolate(x[rows], size=(sh, sw), mode="area")
        out[rows] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (pixels) per image; sigma 0 leaves an image exactly unchanged.

    The kernel is the sampled Gaussian truncated at 4 sigma of the batch's
    largest sigma and normalised to sum 1 (MONAI ``GaussianSmooth`` with
    ``approx="sampled"`` computes the same inside the image); borders
    replicate the edge pixels. One grouped convolution per axis for the whole
    batch.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, H, W)`` float.
    sigma : torch.Tensor
        ``(B,)`` non-negative.
    """
    b, c, h, w = x.shape
    top = float(sigma.max()) if b else 0.0
    radius = int(max(top * 4.0, 0.5) + 0.5) if top > 0 else 0
    if radius == 0:
        return x.clone()
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-6).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, L)
    size = 2 * radius + 1
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, 1, size), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, size, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, draws: RobustDraws, cfg: AugmentConfig) -> torch.Tensor:
    """Resolution loss then blur, each on the images it fires for (a new tensor)."""
    out = x
    if cfg.resolution_loss:
        factor = 1.0 - draws.params[:, _RES] * cfg.resolution_loss
        factor = torch.where(draws.fires(_P_RES, cfg.robust_p), factor, torch.ones_like(factor))
        out = resample_lower(out, factor)
    if cfg.blur:
        sigma = draws.params[:, _BLUR] * cfg.blur * draws.fires(_P_BLUR, cfg.robust_p)
        out = gaussian_blur(out, sigma)
    return out if out is not x else x.clone()


# ---------------------------------------------------------------------------
# Tone: gamma and a random monotone curve (on [0, 1] intensities)
# ---------------------------------------------------------------------------


def tone_curve(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map intensities through a piecewise-linear curve per image (``numpy.interp`` per image).

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, H, W)`` in ``[0, 1]``.
    points : torch.Tensor
        ``(B, K)``: the curve's values at ``K`` equally spaced inputs
        ``0, 1/(K-1), ..., 1``.
    """
    b, k = points.shape
    pos = x.reshape(b, -1) * (k - 1)
    idx = pos.floor().clamp(0, k - 2)
    frac = pos - idx
    idx = idx.long()
    lo = torch.gather(points, 1, idx)
    hi = torch.gather(points, 1, idx + 1)
    return (lo + (hi - lo) * frac).reshape(x.shape)


def tone(x: torch.Tensor, draws: RobustDraws, cfg: AugmentConfig) -> torch.Tensor:
    """Gamma then the random tone curve, on ``x`` clamped to ``[0, 1]`` (a new tensor)."""
    out = x.clamp(0.0, 1.0)
    if cfg.gamma:
        g = torch.exp((draws.params[:, _GAMMA] * 2.0 - 1.0) * cfg.gamma)
        g = torch.where(draws.fires(_P_GAMMA, cfg.robust_p), g, torch.ones_like(g))
        out = out.pow(g.to(out.dtype).view(-1, 1, 1, 1))
    if cfg.hist_shift:
        k = HIST_POINTS
        base = torch.linspace(0.0, 1.0, k, device=x.device, dtype=out.dtype)
        shift = (draws.hist * 2.0 - 1.0) * (cfg.hist_shift / (k - 1))
        shift = shift * draws.fires(_P_HIST, cfg.robust_p).view(-1, 1)
        points = base.repeat(x.shape[0], 1)
        points[:, 1:-1] += shift.to(out.dtype)
        out = tone_curve(out, points)
    return out


def add_noise(x: torch.Tensor, draws: RobustDraws, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise, std uniform in ``[0, cfg.noise]`` on the images it fires for.

    The noise is drawn last from ``generator`` (its size depends on the batch's shape).
    """
    std = draws.params[:, _NOISE] * cfg.noise * draws.fires(_P_NOISE, cfg.robust_p)
    n = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return x + n.to(device=x.device, dtype=x.dtype) * std.to(x.dtype).view(-1, 1, 1, 1)

