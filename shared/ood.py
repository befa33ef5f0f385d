"""Out-of-distribution warning: the training population as site sums, and each input's distance to it.

A federated model says nothing by itself about images unlike the ones it
was trained on (another hospital's detector, adults instead of children, a
photo instead of a radiograph): it just outputs a probability. This module
holds the framework-free (NumPy) math of the warning medfed attaches to a
model; the site side is :mod:`shared.site_stats`, the server's phases
:mod:`server.post_training`, the use at prediction time :mod:`shared.inference`.

What describes the training population (never a per-image value)
    * the mean and covariance of the model's *penultimate features* (see
      :mod:`shared.models.features`): each training site sends, over its
      training images, the count ``n``, the sum of the feature vectors, the
      sum of their outer products and, for the shrinkage below, the sums of
      ``||x||^2 x`` and ``||x||^4`` (:class:`FeatureSums`); the server adds
      them up and derives the pooled mean and covariance, which equal those of
      all training features pooled (up to float rounding);
    * the covariance is shrunk towards a multiple of the identity by the
      Ledoit-Wolf rule (Ledoit and Wolf 2004, as ``sklearn.covariance.ledoit_wolf``),
      whose intensity is computed exactly from the same sums: a covariance of
      d-dimensional features from a few hundred images is singular or nearly
      so, and shrinkage keeps its inverse stable. A site with fewer than about
      20 training images still contributes its sums, but its share of the
      covariance rests on few images; the pooled estimate is what counts, and
      it is unstable when the whole federation has few images per dimension;
    * the distribution of the distances of held-out in-distribution images:
      once the pooled mean and covariance are known, each site returns the
      counts of its *validation* images' Mahalanobis distances in fixed
      log-spaced bins (:func:`distance_edges`, about 2.3 % wide); the server
      sums them and takes the 99th percentile (:func:`histogram_quantile`) as
      the threshold beyond which an input is flagged. Validation, not
      training, images: the training images' own distances are in-sample
      (the covariance was fitted to them) and run smaller, which would flag
      far more than 1 % of new in-distribution images; the training images'
      99th percentile is recorded beside it for reference;
    * a histogram of preprocessed pixel values per channel (32 bins), summed
      over the training images of all sites, and the largest total-variation
      distance of one site's histogram from the pooled one (how much the
      training sites already differ).

Features wider than :data:`MAX_DIMS` are first multiplied by a fixed random
+-1 projection (:func:`projection_matrix`, reproducible everywhere from its
seed without a random-number library), which bounds what a site sends and
what the model card stores.

At prediction time an input is flagged when its distance exceeds the
threshold; by construction about 1 % of new images from the training
population are flagged, and a large share flagged (``medfed predict`` and
``medfed evaluate`` warn above 10 % by default) says the inputs are unlike the
training population. Not being flagged is no proof that an input is in
distribution: the features are the model's own, and a shift the model is
blind to stays invisible to them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from shared import protocol

__all__ = [
    "DEFAULT_WARN_SHARE",
    "DISTANCE_BINS",
    "INTENSITY_BINS",
    "MAX_DIMS",
    "OOD_QUANTILE",
    "FeatureSums",
    "OODReference",
    "OODSummary",
    "distance_counts",
    "distance_edges",
    "histogram_quantile",
    "intensity_counts",
    "ledoit_wolf",
    "mahalanobis",
    "precision_matrix",
    "projection_matrix",
    "summarize",
    "total_variation",
]

MAX_DIMS = 256
"""Features wider than this are projected to this many dimensions (:func:`projection_matrix`)."""
PROJECTION_SEED = 20_261_201
"""Seed of the fixed projection (recorded in the model card)."""
DISTANCE_BINS = 600
"""Log-spaced distance bins from ``1e-2 sqrt(d)`` to ``1e4 sqrt(d)`` (each ~2.3 % wide); the last bin takes overflow."""
INTENSITY_BINS = 32
"""Bins of the per-channel histogram of preprocessed pixel values (0..255, 8 values each)."""
OOD_QUANTILE = 0.99
"""The share of held-out training-population images below the threshold."""
DEFAULT_WARN_SHARE = 0.10
"""``medfed predict``/``evaluate`` warn when more than this share of inputs is flagged."""


# ---------------------------------------------------------------------------
# Fixed projection
# ---------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrap-around arithmetic): the same bits on every platform."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def projection_matrix(in_dims: int, out_dims: int = MAX_DIMS, seed: int = PROJECTION_SEED) -> np.ndarray:
    """A fixed ``(in_dims, out_dims)`` matrix of ``+-1 / sqrt(out_dims)`` (Achlioptas' random projection).

    Each entry's sign is one bit of SplitMix64 of ``seed`` and its index, so
    server, sites and ``medfed predict`` rebuild the same matrix from the seed
    recorded in the model card, on any platform and NumPy version.
    """
    if in_dims < 1 or out_dims < 1:
        raise ValueError(f"projection dimensions must be >= 1, got {in_dims} -> {out_dims}")
    with np.errstate(over="ignore"):
        idx = np.arange(in_dims * out_dims, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x100000001B3)
    bits = _splitmix64(idx) >> np.uint64(63)
    signs = np.where(bits == 1, 1.0, -1.0)
    return (signs / math.sqrt(out_dims)).reshape(in_dims, out_dims)


# ---------------------------------------------------------------------------
# Feature sums (a site's reply) and the pooled moments
# ---------------------------------------------------------------------------


def _triu(d: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(d)


@dataclass(frozen=True)
class FeatureSums:
    """Additive sums of feature vectors ``x_i`` (``(d,)`` each) over a set of images.

    Attributes
    ----------
    n:
        Number of images.
    s1:
        ``sum x_i``, ``(d,)``.
    s2:
        ``sum x_i x_i^T``, ``(d, d)`` (symmetric; sent as its upper triangle).
    s3:
        ``sum ||x_i||^2 x_i``, ``(d,)``.
    s4:
        ``sum ||x_i||^4``.
    """

    n: int
    s1: np.ndarray
    s2: np.ndarray
    s3: np.ndarray
    s4: float

    @property
    def dims(self) -> int:
        """Feature dimensions ``d``."""
        return int(self.s1.shape[0])

    @classmethod
    def from_features(cls, x: np.ndarray) -> FeatureSums:
        """The sums of the rows of ``x`` (``(N, d)``; float64 arithmetic)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, d), got {x.shape}")
        sq = np.einsum("ij,ij->i", x, x)
        return cls(int(x.shape[0]), x.sum(axis=0), x.T @ x, (sq[:, None] * x).sum(axis=0), float((sq**2).sum()))

    @classmethod
    def empty(cls, d: int) -> FeatureSums:
        """No images."""
        return cls(0, np.zeros(d), np.zeros((d, d)), np.zeros(d), 0.0)

    def merge(self, other: FeatureSums) -> FeatureSums:
        """The sums over both sets of images."""
        if other.dims != self.dims:
            raise ValueError(f"cannot add feature sums of {other.dims} and {self.dims} dimensions")
        return FeatureSums(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2, self.s3 + other.s3,
                           self.s4 + other.s4)

    def to_flat(self) -> dict[str, int | float | list[float]]:
        """The reply fields (``s2`` as its row-major upper triangle)."""
        rows, cols = _triu(self.dims)
        return {protocol.FEATURE_COUNT: int(self.n), protocol.FEATURE_DIMS: self.dims,
                protocol.FEATURE_SUM: [float(v) for v in self.s1],
                protocol.FEATURE_OUTER: [float(v) for v in self.s2[rows, cols]],
                protocol.FEATURE_NORM2_X: [float(v) for v in self.s3], protocol.FEATURE_NORM4: float(self.s4)}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> FeatureSums:
        """Decode :meth:`to_flat` (raises ValueError on wrong lengths)."""
        d = int(flat[protocol.FEATURE_DIMS])
        rows, cols = _triu(d)
        s1 = np.asarray(flat[protocol.FEATURE_SUM], dtype=np.float64)
        up = np.asarray(flat[protocol.FEATURE_OUTER], dtype=np.float64)
        s3 = np.asarray(flat[protocol.FEATURE_NORM2_X], dtype=np.float64)
        if s1.shape != (d,) or up.shape != (rows.size,) or s3.shape != (d,):
            raise ValueError(f"feature sums do not have the lengths of {d} dimensions")
        s2 = np.zeros((d, d))
        s2[rows, cols] = up
        s2[cols, rows] = up
        return cls(int(flat[protocol.FEATURE_COUNT]), s1, s2, s3, float(flat[protocol.FEATURE_NORM4]))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and empirical covariance (normalised by ``n``, as ``np.cov(..., bias=True)``)."""
        if self.n < 1:
            raise ValueError("no images: no mean or covariance")
        mean = self.s1 / self.n
        cov = self.s2 / self.n - np.outer(mean, mean)
        return mean, (cov + cov.T) / 2

    def centered_fourth_moment(self) -> float:
        """``sum ||x_i - mean||^4``, expanded in the sums (no per-image value needed)."""
        mean = self.s1 / self.n
        c = float(mean @ mean)
        total = (self.s4 + 4 * float(mean @ self.s2 @ mean) + self.n * c * c - 4 * float(mean @ self.s3)
                 + 2 * c * float(np.trace(self.s2)) - 4 * c * float(mean @ self.s1))
        return max(total, 0.0)


def ledoit_wolf(sums: FeatureSums) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, Ledoit-Wolf shrunk covariance and shrinkage intensity from pooled sums.

    The estimator of ``sklearn.covariance.ledoit_wolf`` (same normalisation,
    same intensity formula), computed from :class:`FeatureSums` instead of the
    features: ``(1 - a) S + a (tr S / d) I`` with ``S`` the empirical
    covariance and ``a = min(b, c) / c``, ``c = ||S - (tr S / d) I||_F^2 / d``,
    ``b = (sum ||x_i - mean||^4 / n - ||S||_F^2) / (d n)``.
    """
    mean, s = sums.mean_cov()
    d, n = sums.dims, sums.n
    mu = float(np.trace(s)) / d
    delta_ = float((s**2).sum())
    delta = (delta_ - 2.0 * mu * float(np.trace(s)) + d * mu**2) / d
    beta = (sums.centered_fourth_moment() / n - delta_) / (d * n)
    beta = min(beta, delta)
    shrinkage = 0.0 if beta <= 0 or delta <= 0 else beta / delta
    shrunk = (1.0 - shrinkage) * s
    shrunk[np.diag_indices(d)] += shrinkage * mu
    return mean, shrunk, float(shrinkage)


def precision_matrix(cov: np.ndarray) -> np.ndarray:
    """The inverse of a covariance, with a tiny ridge if it is singular (all-constant features)."""
    d = cov.shape[0]
    ridge = 1e-9 * max(float(np.trace(cov)) / d, 1e-12)
    return np.linalg.inv(cov + ridge * np.eye(d))


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``sqrt((x - mean)^T P (x - mean))`` per row of ``features`` (``(N, d)``)."""
    x = np.asarray(features, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, precision, x), 0.0))


# ---------------------------------------------------------------------------
# Distance histograms and their quantiles
# ---------------------------------------------------------------------------


def distance_edges(dims: int, bins: int = DISTANCE_BINS) -> np.ndarray:
    """``bins + 1`` log-spaced edges from ``1e-2 sqrt(d)`` to ``1e4 sqrt(d)`` (typical distances: about ``sqrt(d)``)."""
    return np.geomspace(1e-2, 1e4, bins + 1) * math.sqrt(dims)


def distance_counts(distances: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``distances`` per bin of ``edges`` (below the first edge: bin 0; above the last: the last bin)."""
    idx = np.searchsorted(edges, np.asarray(distances, dtype=np.float64), side="right") - 1
    return np.bincount(np.clip(idx, 0, len(edges) - 2), minlength=len(edges) - 1).astype(np.int64)


def histogram_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The ``q``-quantile of binned values, interpolated geometrically within its bin (NaN without values)."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n <= 0:
        return math.nan
    target = q * n
    cum = np.cumsum(c)
    b = int(np.searchsorted(cum, target, side="left"))
    b = min(b, len(c) - 1)
    before = cum[b - 1] if b > 0 else 0.0
    frac = 0.0 if c[b] == 0 else min(max((target - before) / c[b], 0.0), 1.0)
    lo, hi = float(edges[b]), float(edges[b + 1])
    return lo * (hi / lo) ** frac


# ---------------------------------------------------------------------------
# Intensity histograms
# ---------------------------------------------------------------------------


def intensity_counts(images: np.ndarray, bins: int = INTENSITY_BINS) -> np.ndarray:
    """Per-channel counts of uint8 pixel values in ``bins`` equal bins: ``(C, bins)`` from ``(N, C, H, W)``."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {x.shape}")
    width = 256 // bins
    return np.stack([np.bincount((x[:, ch].ravel() // width).astype(np.int64), minlength=bins)
                     for ch in range(x.shape[1])]).astype(np.int64)


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two histograms (each normalised per channel; mean over channels), in [0, 1]."""
    pa = np.asarray(a, dtype=np.float64)
    pb = np.asarray(b, dtype=np.float64)
    if pa.shape != pb.shape:
        raise ValueError(f"histograms of shapes {pa.shape} and {pb.shape} cannot be compared")
    pa = pa / np.maximum(pa.sum(axis=-1, keepdims=True), 1e-300)
    pb = pb / np.maximum(pb.sum(axis=-1, keepdims=True), 1e-300)
    return float(0.5 * np.abs(pa - pb).sum(axis=-1).mean())


# ---------------------------------------------------------------------------
# The reference a model card carries
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OODReference:
    """The training population as a model card stores it, and the distance rule.

    Attributes
    ----------
    feature_dims:
        Width of the model's penultimate features.
    dims:
        Width after the projection (``feature_dims`` when none).
    projection_seed:
        Seed of :func:`projection_matrix` (None: features used as they are).
    mean, cov:
        Pooled training mean and Ledoit-Wolf shrunk covariance (``dims`` wide).
    shrinkage:
        The Ledoit-Wolf intensity used.
    threshold:
        Distance beyond which an input is flagged: the :data:`OOD_QUANTILE`
        quantile of the sites' validation images' distances.
    train_quantile:
        The same quantile of the training images' own (in-sample) distances.
    num_train, num_val:
        Images behind the mean/covariance and behind the threshold.
    intensity:
        Pooled training histogram of preprocessed pixel values, ``(C, INTENSITY_BINS)`` counts.
    intensity_site_tv:
        The largest total-variation distance of one training site's histogram from the pooled one.
    sites:
        The training sites pooled.
    """

    feature_dims: int
    dims: int
    projection_seed: int | None
    mean: np.ndarray
    cov: np.ndarray
    shrinkage: float
    threshold: float
    train_quantile: float
    num_train: int
    num_val: int
    intensity: np.ndarray
    intensity_site_tv: float
    sites: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def precision(self) -> np.ndarray:
        """Inverse of the shrunk covariance."""
        return precision_matrix(self.cov)

    @cached_property
    def projection(self) -> np.ndarray | None:
        """The fixed projection of the features, or None."""
        return None if self.projection_seed is None else projection_matrix(self.feature_dims, self.dims,
                                                                          self.projection_seed)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of the model's raw penultimate features ``(N, feature_dims)``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.feature_dims:
            raise ValueError(f"expected features (N, {self.feature_dims}), got {x.shape}")
        if self.projection is not None:
            x = x @ self.projection
        return mahalanobis(x, self.mean, self.precision)

    def to_card(self) -> dict[str, Any]:
        """The ``ood`` section of a model card (plain JSON types)."""
        return {
            "status": "ready", "method": METHOD, "quantile": OOD_QUANTILE, "threshold": self.threshold,
            "train-quantile-distance": self.train_quantile, "feature-dims": self.feature_dims, "dims": self.dims,
            "projection-seed": self.projection_seed, "shrinkage": self.shrinkage,
            "num-train-images": self.num_train, "num-val-images": self.num_val, "sites": list(self.sites),
            "mean": [float(v) for v in self.mean], "cov": [[float(v) for v in row] for row in self.cov],
            "intensity-histogram": [[int(v) for v in row] for row in self.intensity],
            "intensity-site-tv-max": self.intensity_site_tv, **dict(self.extra),
        }

    @classmethod
    def from_card(cls, section: Mapping[str, Any] | None) -> OODReference | None:
        """Read a card's ``ood`` section; None when absent, not ready, or malformed (then no warning is possible)."""
        if not isinstance(section, Mapping) or section.get("status") != "ready":
            return None
        try:
            dims, fdims = int(section["dims"]), int(section["feature-dims"])
            mean = np.asarray(section["mean"], dtype=np.float64)
            cov = np.asarray(section["cov"], dtype=np.float64)
            seed = section.get("projection-seed")
            ref = cls(
                feature_dims=fdims, dims=dims, projection_seed=None if seed is None else int(seed),
                mean=mean, cov=cov, shrinkage=float(section.get("shrinkage", 0.0)),
                threshold=float(section["threshold"]), train_quantile=float(section.get("train-quantile-distance",
                                                                                        math.nan)),
                num_train=int(section.get("num-train-images", 0)), num_val=int(section.get("num-val-images", 0)),
                intensity=np.asarray(section.get("intensity-histogram", []), dtype=np.int64),
                intensity_site_tv=float(section.get("intensity-site-tv-max", math.nan)),
                sites=tuple(str(s) for s in section.get("sites", [])),
            )
        except (KeyError, TypeError, ValueError):
            return None
        ok = (mean.shape == (dims,) and cov.shape == (dims, dims) and np.isfinite(cov).all() and np.isfinite(mean).all()
              and math.isfinite(ref.threshold) and ref.threshold > 0 and (seed is None) == (dims == fdims))
        return ref if ok else None


METHOD = (f"Mahalanobis distance of the model's penultimate features (projected to at most {MAX_DIMS} dimensions) "
          "to the training sites' pooled mean, with a Ledoit-Wolf shrunk pooled covariance, all from site sums; "
          f"flagged beyond the {OOD_QUANTILE:.0%} quantile of the sites' validation images' distances "
          f"({DISTANCE_BINS} log-spaced bins)")


@dataclass(frozen=True)
class OODSummary:
    """What a batch of inputs amounts to: how many were scored, how many flagged, and the intensity shift."""

    scored: int
    flagged: int
    threshold: float
    warn_share: float
    intensity_tv: float
    intensity_site_tv: float

    @property
    def share(self) -> float:
        """Share of scored inputs beyond the threshold (NaN when none were scored)."""
        return self.flagged / self.scored if self.scored else math.nan

    @property
    def warn(self) -> bool:
        """Whether the share flagged exceeds the warning level."""
        return self.scored > 0 and self.share > self.warn_share

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``medfed evaluate``'s ``ood`` block)."""
        return {"scored": self.scored, "flagged": self.flagged, "share-flagged": self.share,
                "expected-share-in-distribution": round(1 - OOD_QUANTILE, 4), "threshold": self.threshold,
                "warn-share": self.warn_share, "warning": self.warn, "intensity-tv": self.intensity_tv,
                "intensity-tv-between-training-sites": self.intensity_site_tv}

    def message(self) -> str:
        """One line for a person."""
        pct = f"{100 * self.share:.1f}%" if self.scored else "n/a"
        text = (f"{self.flagged} of {self.scored} input(s) ({pct}) lie beyond the training population's "
                f"{OOD_QUANTILE:.0%} distance (about {100 * (1 - OOD_QUANTILE):.0f}% expected for images like the "
                "training data)")
        if math.isfinite(self.intensity_tv):
            text += (f"; pixel-intensity histogram differs from training by {self.intensity_tv:.2f} (total variation; "
                     f"training sites differ by up to {self.intensity_site_tv:.2f})")
        if self.warn:
            text = ("WARNING: these images look unlike the population the model was trained on, so its outputs may "
                    "be unreliable here: " + text)
        return text


def summarize(reference: OODReference, distances: Sequence[float], intensity: np.ndarray | None,
              warn_share: float = DEFAULT_WARN_SHARE) -> OODSummary:
    """Flag counts of ``distances`` and the intensity shift of a batch (``intensity``: its :func:`intensity_counts`)."""
    d = np.asarray(distances, dtype=np.float64)
    tv = math.nan
    if intensity is not None and reference.intensity.size and np.asarray(intensity).shape == reference.intensity.shape:
        tv = total_variation(intensity, reference.intensity)
    return OODSummary(int(d.size), int((d > reference.threshold).sum()), reference.threshold, warn_share, tv,
                      reference.intensity_site_tv)
