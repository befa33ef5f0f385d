"""What a site computes for the post-training phases: calibration sums, feature sums, distance counts.

After the last round the server asks each training site for aggregates of
the final model's outputs on its own images (:mod:`server.post_training`):

* :func:`calibration_reply`: the summed NLL of its validation images at each
  temperature the server proposes, and/or its ordinary evaluation counts
  (confusion matrix, score histograms) of the probabilities at one
  temperature (:mod:`shared.metrics.calibration`);
* :func:`feature_sums_reply`: sums of the penultimate features of its
  training images and a histogram of their preprocessed pixel values
  (:mod:`shared.ood`);
* :func:`distance_reply`: counts of its images' Mahalanobis distances to the
  pooled training mean, in fixed bins.

Every reply is counts and sums over all of the site's images of one split:
no per-image value, no file name. The model runs in fp32 and eval mode with
exactly the input path of ``medfed predict`` (``[0, 1]`` floats, then the
run's ``normalize``), so the statistics describe what prediction later sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from shared import protocol
from shared.data.preprocess import normalize_batch
from shared.metrics.calibration import Calibration, nll_derivatives, nll_sums
from shared.metrics.classification import ClassificationCounts
from shared.models.features import forward_with_features
from shared.ood import (
    MAX_DIMS,
    PROJECTION_SEED,
    FeatureSums,
    distance_counts,
    distance_edges,
    intensity_counts,
    mahalanobis,
    projection_matrix,
)
from shared.training import batch_indices, model_in_channels, select_device, to_float01

__all__ = ["calibration_reply", "distance_reply", "feature_sums_reply", "model_outputs", "project"]


@torch.no_grad()
def model_outputs(model: nn.Module, model_name: str, images: torch.Tensor, *, normalize: str, batch_size: int = 64,
                  logits: bool = True, features: bool = False, device: torch.device | None = None
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(logits (N, C) or None, features (N, d) or None)`` of uint8 images ``(N, C, H, W)``, fp32, eval mode."""
    device = device or select_device()
    was = model.training
    model = model.to(device).float().eval()
    in_ch = model_in_channels(model)
    outs: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    try:
        for idx in batch_indices(len(images), batch_size, None):
            x = normalize_batch(to_float01(images[idx], in_ch, device, False), normalize)
            if features:
                y, f = forward_with_features(model, model_name, x)
                feats.append(f.cpu().numpy().astype(np.float64))
            else:
                y = model(x)
            if logits:
                outs.append(y.float().cpu().numpy().astype(np.float64))
    finally:
        model.train(was)
    lg = np.concatenate(outs) if logits and outs else None
    ft = np.concatenate(feats) if features and feats else None
    return lg, ft


def project(features: np.ndarray) -> np.ndarray:
    """Features wider than :data:`shared.ood.MAX_DIMS` through the fixed projection (else unchanged)."""
    d = features.shape[1]
    return features if d <= MAX_DIMS else features @ projection_matrix(d, MAX_DIMS, PROJECTION_SEED)


def calibration_reply(logits: np.ndarray, labels: np.ndarray, *, num_classes: int,
                      temperatures: Sequence[float] | None = None, derivatives_at: Calibration | None = None,
                      score_at: Calibration | None = None) -> dict[str, int | float | list]:
    """What a site answers a calibration message, from its validation logits (:mod:`shared.metrics.calibration`).

    Returns the reply's metric fields: ``num-examples`` always; with
    ``temperatures`` the summed NLL at each (``nll-sums``); with
    ``derivatives_at`` the NLL sum and the sums of its gradient and Hessian
    there (``nll-sum``, ``nll-gradient``, ``nll-hessian``); with ``score_at``
    the fields of an evaluation reply of the calibrated probabilities
    (``eval-loss`` = their mean NLL, and :meth:`ClassificationCounts.to_flat`).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if z.ndim != 2 or z.shape[1] != num_classes:
        raise ValueError(f"model outputs {z.shape[-1]} classes, task has {num_classes}")
    out: dict[str, int | float | list] = {protocol.NUM_EXAMPLES: int(len(y))}
    if temperatures is not None:
        out[protocol.NLL_SUMS] = [float(v) for v in nll_sums(z, y, temperatures)]
    if derivatives_at is not None:
        f, g, h = nll_derivatives(z, y, derivatives_at)
        out.update({protocol.NLL_SUM: f, protocol.NLL_GRADIENT: [float(v) for v in g],
                    protocol.NLL_HESSIAN: [float(v) for v in h.ravel()]})
    if score_at is not None:
        counts = ClassificationCounts.from_predictions(score_at.probabilities(z), y)
        out[protocol.EVAL_LOSS] = score_at.nll_sum(z, y) / max(len(y), 1)
        out.update(counts.to_flat())
    return out


def feature_sums_reply(features: np.ndarray, images: torch.Tensor) -> dict[str, int | float | list]:
    """Sums of the (projected) penultimate ``features`` of ``images`` and their per-channel intensity histogram.

    ``features`` are the final model's (:func:`model_outputs`), ``(N, d)``;
    ``images`` the same N uint8 images ``(N, C, H, W)``.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) != len(images):
        raise ValueError(f"expected features (N, d) of {len(images)} images, got {f.shape}")
    flat: dict[str, int | float | list] = dict(FeatureSums.from_features(project(f)).to_flat())
    hist = intensity_counts(images.cpu().numpy())
    flat[protocol.NUM_EXAMPLES] = int(len(images))
    flat[protocol.RAW_FEATURE_DIMS] = int(f.shape[1])
    flat[protocol.INTENSITY_CHANNELS] = int(hist.shape[0])
    flat[protocol.INTENSITY_HIST] = [int(v) for v in hist.ravel()]
    return flat


def distance_reply(train_features: np.ndarray | None, val_features: np.ndarray | None, mean: np.ndarray,
                   precision: np.ndarray) -> dict[str, int | float | list]:
    """Counts of the training and validation images' Mahalanobis distances in :func:`shared.ood.distance_edges` bins.

    The features are the final model's raw penultimate features (None or
    empty for a split without images); they are projected as for the sums.
    """
    edges = distance_edges(int(mean.shape[0]))
    out: dict[str, int | float | list] = {}
    for key, f in ((protocol.TRAIN_DISTANCE_COUNTS, train_features), (protocol.VAL_DISTANCE_COUNTS, val_features)):
        if f is None or len(f) == 0:
            out[key] = [0] * (len(edges) - 1)
            continue
        out[key] = [int(v) for v in distance_counts(mahalanobis(project(np.asarray(f)), mean, precision), edges)]
    out[protocol.NUM_EXAMPLES] = 0 if val_features is None else int(len(val_features))
    out[protocol.TRAIN_DISTANCE_TOTAL] = 0 if train_features is None else int(len(train_features))
    return out
