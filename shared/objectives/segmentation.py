"""Segmentation: Dice + cross-entropy (MONAI), joint image/mask augmentation, Dice/IoU/HD95 sums.

Images are uint8 ``(N, C, H, W)`` tensors, masks uint8/bool ``(N, H, W)``
class indices (binary: 0 background, 1 foreground). Augmentation applies one
random geometry to an image and its mask (:func:`augment_pair`). Evaluation
returns only sums (:class:`~shared.metrics.segmentation.SegmentationCounts`),
never per-image masks or scores.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from shared.data.preprocess import AugmentConfig, affine_theta, augment_batch, normalize_batch
from shared.data.robust_augment import draw_robust, elastic_offsets
from shared.kinds import SEGMENTATION
from shared.metrics.segmentation import SegmentationCounts
from shared.settings import TrainConfig
from shared.training import (
    EvalResult,
    autocast,
    batch_indices,
    model_in_channels,
    prepare_model,
    resolve_precision,
    select_device,
    to_float01,
)

if TYPE_CHECKING:  # pragma: no cover
    from shared.metrics.subgroups import SubgroupCounts, SubgroupSpec

__all__ = [
    "SegmentationObjective",
    "augment_pair",
    "check_mask_values",
    "check_pairs",
    "evaluate_seg",
    "per_sample_seg_loss",
    "seg_loss",
]

logger = logging.getLogger(__name__)

Spacing = tuple[float, float]

# Rotation, zoom, shifts and flips: the first columns of augment_batch's draws (see affine_theta).
_N_GEOM_DRAWS = 6


def seg_loss(foreground_batch_dice: bool = False) -> nn.Module:
    """Dice + cross-entropy on softmax logits ``(B, K, H, W)`` vs indices ``(B, 1, H, W)``.

    By default Dice is computed per image and class, background included.
    ``foreground_batch_dice=True`` computes it over the whole batch and on the
    foreground classes only: images without foreground then no longer push
    every prediction towards empty, which otherwise wins for small structures
    (e.g. a pneumothorax of ~5 % of the image, absent in half the images).
    """
    if foreground_batch_dice:
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def _geometry_theta(b: int, h: int, w: int, cfg: AugmentConfig, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """Random affine matrices ``(B, 2, 3)`` (output -> input, ``[-1, 1]`` units), as augment_batch draws them."""
    r = torch.rand((b, _N_GEOM_DRAWS), generator=generator, device=generator.device, dtype=torch.float64)
    return affine_theta(r.to(device=device, dtype=torch.float32), cfg, h, w)


def augment_pair(
    x: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images and masks with the SAME random geometry per image.

    Geometry (rotation, zoom, shift, flips and the elastic deformation of
    ``robust-augment``; ranges from ``cfg``) is one sampling grid shared by
    image and mask: the image is resampled bilinearly (outside pixels take
    the image's minimum, as in :func:`~shared.data.preprocess.augment_batch`),
    the mask with nearest neighbour (outside = class 0, background).
    Everything else (contrast, brightness, colour, and the acquisition
    transforms: resolution loss, blur, gamma, tone curve, noise) then goes to
    the image only, through ``augment_batch`` with geometry switched off.

    Parameters
    ----------
    x : torch.Tensor
        Float images ``(B, C, H, W)`` in ``[0, 1]``; not modified.
    mask : torch.Tensor
        Integer/bool class-index masks ``(B, H, W)``; not modified.
    cfg : AugmentConfig
        Ranges of the random transforms.
    generator : torch.Generator
        Source of randomness; same state, same result.

    Returns
    -------
    tuple of torch.Tensor
        New image batch (same dtype, clamped to ``[0, 1]``) and mask (same dtype).
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"augment_pair expects float images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    b, c, h, w = x.shape
    if mask.shape != (b, h, w):
        raise ValueError(f"augment_pair: mask shape {tuple(mask.shape)} does not match images {tuple(x.shape)}")
    out_x, out_m = x, mask
    if cfg.geometric and b > 0:
        theta = _geometry_theta(b, h, w, cfg, generator, x.device).to(x.dtype)
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        if cfg.elastic:
            draws = draw_robust(b, generator, x.device)
            grid = grid + elastic_offsets(draws, cfg, h, w).to(x.dtype)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        out_x = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + lo
        m = mask.to(x.dtype).unsqueeze(1)
        out_m = F.grid_sample(m, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        out_m = out_m.squeeze(1).round().to(mask.dtype)
    photometric = dataclasses.replace(cfg, rotation_deg=0.0, hflip=False, vflip=False, scale=0.0, translate=0.0,
                                      elastic=0.0)
    out_x = augment_batch(out_x, photometric, generator)  # new tensor, clamped
    if out_m is mask:
        out_m = mask.clone()
    return out_x, out_m


def check_pairs(images: torch.Tensor, masks: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` (N, C, H, W) and ``masks`` (N, H, W) match in N, H, W and N > 0."""
    if images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got shape {tuple(images.shape)}")
    if masks.ndim != 3 or masks.shape[0] != images.shape[0] or masks.shape[1:] != images.shape[2:]:
        raise ValueError(
            f"masks must be (N, H, W) matching images (N, C, H, W) = {tuple(images.shape)}, got {tuple(masks.shape)}"
        )
    if len(images) == 0:
        raise ValueError("no images at this site")


def _num_classes(model: nn.Module, images: torch.Tensor, device: torch.device) -> int:
    out_ch = getattr(model, "out_channels", None)
    if isinstance(out_ch, int):
        return out_ch
    with torch.no_grad():
        return int(model(torch.zeros((1, model_in_channels(model), *images.shape[2:]), device=device)).shape[1])


def check_mask_values(masks: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError when a mask holds a class index outside ``[0, num_classes)``."""
    top = int(masks.max()) if masks.numel() else 0
    if top >= num_classes or (masks.numel() and int(masks.min()) < 0):
        raise ValueError(
            f"mask values must be class indices in [0, {num_classes - 1}] for a {num_classes}-class model, "
            f"found max {top}; binary masks stored as 0/255 must be divided by 255 first"
        )


def per_sample_seg_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Dice + cross entropy of each image, shape ``(B,)``.

    Its batch mean equals :func:`seg_loss` (MONAI
    ``DiceCELoss``, which computes Dice per image and class), but each entry
    depends on one image only, as DP-SGD requires.

    Parameters
    ----------
    logits:
        ``(B, K, H, W)`` float logits.
    masks:
        ``(B, H, W)`` int64 class indices.
    """
    dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")(logits, masks.unsqueeze(1))
    ce = F.cross_entropy(logits, masks, reduction="none")
    return dice.flatten(1).mean(dim=1) + ce.flatten(1).mean(dim=1)


class SegmentationObjective:
    """Masks ``(N, H, W)`` of class indices in ``[0, num_classes)``; logits ``(B, num_classes, H, W)``.

    The training loss is Dice + cross-entropy (:func:`seg_loss`;
    ``foreground_batch_dice`` for small structures); the per-example loss
    (DP-SGD, audits) is the per-image Dice + cross-entropy
    (:func:`per_sample_seg_loss`), whose batch mean equals the default
    training loss.
    """

    kind = SEGMENTATION
    loss_name = "dice+ce per image"
    """What :meth:`per_sample_loss` computes, for reports."""
    explainable = False
    """Grad-CAM explains a class score, which a segmentation network does not produce."""

    def __init__(self, num_classes: int, *, foreground_batch_dice: bool = False) -> None:
        self.num_classes = num_classes
        self.foreground_batch_dice = foreground_batch_dice
        self._loss = seg_loss(foreground_batch_dice)

    def check_inputs(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise ValueError unless images and masks pair up (see :func:`check_pairs`)."""
        check_pairs(images, targets)

    def prepare(self, images: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, device: torch.device) -> None:
        """Mask values must be class indices of this task (``class_weighting`` does not apply)."""
        check_mask_values(targets, self.num_classes)

    def batch(
        self, images: torch.Tensor, targets: torch.Tensor, *, device: torch.device, in_channels: int,
        augment: AugmentConfig | None, generator: torch.Generator, normalize: str, channels_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images and int64 masks, jointly augmented (:func:`augment_pair`), images normalised."""
        x = to_float01(images, in_channels, device, channels_last=False)
        y = targets.to(device).long()
        if augment is not None:
            x, y = augment_pair(x, y, augment, generator)
        x = normalize_batch(x, normalize)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy of the batch."""
        return self._loss(logits, targets.unsqueeze(1))

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy of each image (:func:`per_sample_seg_loss`)."""
        return per_sample_seg_loss(logits, targets)

    def zero_targets(self, n: int, spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """All-zero masks ``(n, H, W)`` (engine probes; never site data)."""
        return torch.zeros((n, *spatial), dtype=torch.long, device=device)

    def subgroup_counts(self, predictions: np.ndarray, targets: np.ndarray, attributes: Mapping[str, np.ndarray],
                        spec: SubgroupSpec, *, spacings: object = None) -> SubgroupCounts:
        """Per-subgroup Dice/IoU/HD95 sums of predicted foreground masks (small cells suppressed)."""
        from shared.metrics.subgroups import segmentation_subgroup_counts

        return segmentation_subgroup_counts(predictions, targets != 0, attributes, spec, spacings=spacings)

    def class_counts(self, targets: torch.Tensor) -> None:
        """Segmentation images have no class of their own: no per-class image counts."""
        return None

    @staticmethod
    def eval_batch_size(train_batch_size: int) -> int:
        """Evaluation batch size for a site training with ``train_batch_size``."""
        return max(train_batch_size, 32)

    def evaluate(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 32,
        precision: str = "auto", normalize: str = "fixed", device: torch.device | None = None,
        spacings: Spacing | Sequence[Spacing | None] | None = None, keep_predictions: bool = False,
    ) -> EvalResult:
        """Dice/IoU/HD95 sums and mean Dice+CE loss (``hd95-mm`` where ``spacings`` are known)."""
        preds: list[np.ndarray] | None = [] if keep_predictions else None
        counts, loss = evaluate_seg(model, images, targets, batch_size=batch_size, precision=precision,
                                    normalize=normalize, spacings=spacings, device=device, predictions=preds)
        return EvalResult(counts=counts, loss=loss,
                          predictions=np.concatenate(preds) if preds else None)


def _batch_spacings(
    spacings: Spacing | Sequence[Spacing | None] | None, idx: torch.Tensor, n: int
) -> Spacing | list[Spacing | None] | None:
    if spacings is None:
        return None
    seq = list(spacings)  # type: ignore[arg-type]
    if len(seq) == 2 and all(isinstance(v, (int, float, np.integer, np.floating)) for v in seq):
        return (float(seq[0]), float(seq[1]))
    if len(seq) != n:
        raise ValueError(f"spacings must be None, one (row, column) pair or one per image ({n}), got {len(seq)}")
    return [seq[i] for i in idx.tolist()]


@torch.no_grad()
def evaluate_seg(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    batch_size: int = 32,
    precision: str = "auto",
    normalize: str = "fixed",
    spacings: Spacing | Sequence[Spacing | None] | None = None,
    device: torch.device | None = None,
    predictions: list[np.ndarray] | None = None,
) -> tuple[SegmentationCounts, float]:
    """Evaluate a segmentation model: metric sums and mean Dice+CE loss.

    The predicted class is the argmax over the logits; Dice/IoU/HD95 compare
    foreground = ``class != 0`` in prediction and target (for binary
    segmentation exactly class 1).

    Parameters
    ----------
    model:
        Network returning logits ``(B, K, H, W)``.
    images, masks:
        uint8 ``(N, C, H, W)`` images and ``(N, H, W)`` class-index masks.
    batch_size, precision, normalize, device:
        As in :func:`shared.training.predict_proba`.
    spacings:
        Pixel spacing ``(row, column)`` in mm for all images, or one per
        image (``None`` entries allowed); enables ``hd95-mm``.

    Returns
    -------
    tuple
        ``(SegmentationCounts, mean loss per image)``.
    """
    check_pairs(images, masks)
    device = device or select_device()
    amp = resolve_precision(precision, device)
    model = prepare_model(model, device, precision)
    in_ch = model_in_channels(model)
    model.eval()
    check_mask_values(masks, _num_classes(model, images, device))
    loss_fn = seg_loss()
    counts = SegmentationCounts.empty()
    total_loss, n = 0.0, len(images)
    for idx in batch_indices(n, batch_size, None):
        x = normalize_batch(to_float01(images[idx], in_ch, device, precision != "fp32"), normalize)
        y = masks[idx].to(device).long()
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        total_loss += float(loss_fn(logits, y.unsqueeze(1))) * len(idx)
        pred = logits.argmax(dim=1)
        fg = (pred != 0).cpu().numpy()
        counts.update(fg, (y != 0).cpu().numpy(), _batch_spacings(spacings, idx, n))
        if predictions is not None:  # stays at the site (patient-subgroup counts)
            predictions.append(fg)
    return counts, total_loss / n
