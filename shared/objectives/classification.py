"""Image classification: (class-weighted) cross-entropy, augmented batches, confusion counts and score histograms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.data.preprocess import AugmentConfig, augment_batch, normalize_batch
from shared.kinds import CLASSIFICATION
from shared.metrics.classification import ClassificationCounts
from shared.settings import TrainConfig
from shared.training import EvalResult, class_weights, predict_proba, to_float01

if TYPE_CHECKING:  # pragma: no cover
    from shared.metrics.subgroups import SubgroupCounts, SubgroupSpec

__all__ = ["ClassificationObjective", "evaluate_model"]


class ClassificationObjective:
    """Labels ``(N,)`` int64 in ``[0, num_classes)``; logits ``(B, num_classes)``.

    With ``cfg.class_weighting`` the loss weighs each class by its inverse
    frequency at the site (:func:`shared.training.class_weights`).
    """

    kind = CLASSIFICATION
    loss_name = "cross-entropy"
    """What :meth:`per_sample_loss` computes, for reports."""
    explainable = True
    """Grad-CAM can explain its class scores (:mod:`shared.site_explain`)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.weight: torch.Tensor | None = None

    def check_inputs(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise ValueError for mismatched lengths or no images."""
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        if len(images) == 0:
            raise ValueError("no training images at this site")

    def prepare(self, images: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, device: torch.device) -> None:
        """Inverse-frequency class weights from the site's labels (when ``cfg.class_weighting``)."""
        self.weight = class_weights(targets, self.num_classes).to(device) if cfg.class_weighting else None

    def batch(
        self, images: torch.Tensor, targets: torch.Tensor, *, device: torch.device, in_channels: int,
        augment: AugmentConfig | None, generator: torch.Generator, normalize: str, channels_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in ``[0, 1]`` (channels_last if asked), augmented, normalised; labels on ``device``."""
        x = to_float01(images, in_channels, device, channels_last)
        y = targets.to(device)
        if augment is not None:
            x = augment_batch(x, augment, generator)
        return normalize_batch(x, normalize), y

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(Class-weighted) mean cross-entropy."""
        return F.cross_entropy(logits, targets, weight=self.weight)

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each example, times its class weight (each term depends on one example only)."""
        ce = F.cross_entropy(logits, targets, reduction="none")
        return ce * self.weight[targets] if self.weight is not None else ce

    def zero_targets(self, n: int, spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """All-zero labels ``(n,)`` (engine probes; never site data)."""
        return torch.zeros((n,), dtype=torch.long, device=device)

    def subgroup_counts(self, predictions: np.ndarray, targets: np.ndarray, attributes: Mapping[str, np.ndarray],
                        spec: SubgroupSpec, *, spacings: object = None) -> SubgroupCounts:
        """Per-subgroup counts of evaluation probabilities (small cells suppressed; stays a site's own computation)."""
        from shared.metrics.subgroups import classification_subgroup_counts

        return classification_subgroup_counts(predictions, targets, attributes, spec)

    def class_counts(self, targets: torch.Tensor) -> list[int]:
        """Images per class of a site's labels (its roll-call data summary; counts only)."""
        return [int(v) for v in torch.bincount(targets.long().reshape(-1), minlength=self.num_classes).tolist()]

    @staticmethod
    def eval_batch_size(train_batch_size: int) -> int:
        """Evaluation batch size for a site training with ``train_batch_size``."""
        return max(train_batch_size, 64)

    def evaluate(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 128,
        precision: str = "auto", normalize: str = "fixed", device: torch.device | None = None,
        spacings: Sequence[object] | None = None, keep_predictions: bool = False,
    ) -> EvalResult:
        """Confusion counts, score histograms and mean loss (``spacings`` do not apply)."""
        return evaluate_model(model, images, targets, num_classes=self.num_classes, batch_size=batch_size,
                              precision=precision, normalize=normalize, device=device,
                              keep_predictions=keep_predictions)


def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    batch_size: int = 128,
    precision: str = "auto",
    normalize: str = "fixed",
    device: torch.device | None = None,
    keep_predictions: bool = False,
) -> EvalResult:
    """Evaluate a classifier: confusion counts, score histograms and mean loss.

    Only counts leave a site; ``keep_predictions`` also returns the
    probabilities for computations that stay at the site.
    """
    if len(images) == 0:
        raise ValueError("no validation images at this site")
    probs = predict_proba(model, images, batch_size=batch_size, precision=precision, normalize=normalize, device=device)
    lab = labels.cpu()
    loss = float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), lab))
    counts = ClassificationCounts.from_predictions(probs.numpy().astype(np.float64), lab.numpy())
    if counts.num_classes != num_classes:
        raise ValueError(f"model outputs {counts.num_classes} classes, task has {num_classes}")
    return EvalResult(counts=counts, loss=loss,
                      predictions=probs.numpy().astype(np.float64) if keep_predictions else None)
