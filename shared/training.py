"""Local training and evaluation loops: pure PyTorch, no Flower.

Images arrive as uint8 arrays ``(N, H, W)`` or ``(N, H, W, C)`` and stay
uint8 in memory; each batch is converted to float, normalised and (for
training) lightly augmented on the fly. Batching is done by hand from a
seeded permutation, which is faster than a ``DataLoader`` for in-memory data.

Speed-ups measured on the 2-core CPU machines (GUIDE.md section 4): bf16
autocast (1.6-2x) and channels_last (1.2-1.4x). ``precision="auto"`` turns
both on for CPU and CUDA (when bf16 is supported) and leaves fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.config import TrainConfig
from shared.data.preprocess import AugmentConfig, augment_batch, normalize_batch
from shared.metrics.classification import ClassificationCounts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_local` did."""

    num_examples: int
    loss: float
    seconds: float
    images_per_second: float
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """Counts and mean loss of one evaluation pass."""

    counts: ClassificationCounts
    loss: float

    @property
    def num_examples(self) -> int:
        """Images evaluated."""
        return self.counts.num_examples


# ---------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------


def select_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``"auto"`` picks bf16 on CPU and on CUDA devices that support it.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None if precision == "auto" else torch.bfloat16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """An autocast context for ``dtype``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Move ``model`` to ``device``; channels_last memory format unless fp32-only."""
    model = model.to(device)
    if precision != "fp32":
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N,H,W)`` or ``(N,H,W,C)`` -> uint8 tensor ``(N,C,H,W)``."""
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        return t.unsqueeze(1)
    if t.ndim == 4:
        return t.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"expected images of shape (N,H,W) or (N,H,W,C), got {tuple(images.shape)}")


def to_float01(batch: torch.Tensor, in_channels: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 ``(B,C,H,W)`` -> float in ``[0, 1]`` on ``device`` with ``in_channels`` channels."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    if x.shape[1] != in_channels:
        if x.shape[1] == 1:
            x = x.expand(-1, in_channels, -1, -1)
        elif in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot map {x.shape[1]}-channel images to a {in_channels}-channel model")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``, shuffled when ``generator`` is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


# ---------------------------------------------------------------------------
# Loss pieces
# ---------------------------------------------------------------------------


def class_weights(labels: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, normalised to mean 1 over present classes.

    Absent classes get weight 0 (they contribute nothing to the loss anyway).
    """
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(lab, minlength=num_classes).double()
    w = torch.zeros(num_classes, dtype=torch.float64)
    present = counts > 0
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    return w.float()


def snapshot_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (the global model for FedProx)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def proximal_term(model: nn.Module, global_params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """FedProx term ``sum ||w - w_global||^2`` over trainable parameters (without mu/2)."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.requires_grad:
            total = total + (p - global_params[name]).pow(2).sum()
    return total


def weight_drift(model: nn.Module, reference: Mapping[str, torch.Tensor]) -> float:
    """L2 distance between the model's trainable parameters and ``reference``."""
    with torch.no_grad():
        return float(math.sqrt(sum(float((p - reference[n]).pow(2).sum()) for n, p in model.named_parameters() if n in reference)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named in ``cfg`` ('adam' or 'sgd')."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam' or 'sgd'")


# ---------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------


def model_in_channels(model: nn.Module) -> int:
    """Input channels of the first convolution (or linear) layer."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return int(m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)
    raise ValueError("model has no Conv2d/Linear layer")


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    num_classes: int,
    seed: int,
    augment: AugmentConfig | None = None,
    normalize: str = "fixed",
    proximal_mu: float | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.local_epochs`` on one site's data.

    Parameters
    ----------
    model:
        The network, already holding the global weights of this round.
    images, labels:
        uint8 ``(N,C,H,W)`` tensor (see :func:`images_to_tensor`) and int64 labels.
    cfg:
        Local training settings.
    num_classes:
        Output classes (for class weights).
    seed:
        Seeds shuffling, augmentation and dropout: same seed, same result.
    augment:
        Training augmentation (``None`` = none), applied on ``[0, 1]`` images.
    normalize:
        Batch intensity normalisation (see :func:`shared.data.preprocess.normalize_batch`).
    proximal_mu:
        FedProx weight; defaults to ``cfg.proximal_mu``. With mu > 0 the loss
        gains ``mu/2 * ||w - w_global||^2`` where ``w_global`` are the weights
        the model held on entry.
    """
    device = device or select_device()
    mu = cfg.proximal_mu if proximal_mu is None else proximal_mu
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no training images at this site")
    amp = resolve_precision(cfg.precision, device)
    model = prepare_model(model, device, cfg.precision)
    channels_last = cfg.precision != "fp32"
    in_ch = model_in_channels(model)
    weight = class_weights(labels, num_classes).to(device) if cfg.class_weighting else None
    global_params = snapshot_params(model) if mu > 0 else None
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()

    t0 = time.perf_counter()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen, steps = 0, 0
    for epoch in range(cfg.local_epochs):
        for idx in batch_indices(len(images), cfg.batch_size, gen):
            x = to_float01(images[idx], in_ch, device, channels_last)
            y = labels[idx].to(device)
            if augment is not None:
                x = augment_batch(x, augment, gen)
            x = normalize_batch(x, normalize)
            with autocast(device, amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=weight)
            if global_params is not None:
                loss = loss + 0.5 * mu * proximal_term(model, global_params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(idx)  # no host sync per step
            seen += len(idx)
            steps += 1
        if not torch.isfinite(total_loss):  # checked once per epoch
            raise FloatingPointError(
                f"training loss became {float(total_loss)} in epoch {epoch + 1}: lower 'lr' "
                f"(now {cfg.lr}) or use precision='fp32'"
            )
    seconds = time.perf_counter() - t0
    return TrainResult(
        num_examples=len(images),
        loss=float(total_loss) / max(seen, 1),
        seconds=seconds,
        images_per_second=seen / seconds if seconds > 0 else float("nan"),
        steps=steps,
    )


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 128,
    precision: str = "auto",
    normalize: str = "fixed",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Softmax probabilities ``(N, num_classes)`` as float32 on CPU."""
    device = device or select_device()
    amp = resolve_precision(precision, device)
    model = prepare_model(model, device, precision)
    in_ch = model_in_channels(model)
    model.eval()
    out = []
    for idx in batch_indices(len(images), batch_size, None):
        x = normalize_batch(to_float01(images[idx], in_ch, device, precision != "fp32"), normalize)
        with autocast(device, amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


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
) -> EvalResult:
    """Evaluate ``model``: confusion counts, score histograms and mean loss.

    Only counts leave this function, never per-image scores.
    """
    if len(images) == 0:
        raise ValueError("no validation images at this site")
    probs = predict_proba(model, images, batch_size=batch_size, precision=precision, normalize=normalize, device=device)
    lab = labels.cpu()
    loss = float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), lab))
    counts = ClassificationCounts.from_predictions(probs.numpy().astype(np.float64), lab.numpy())
    if counts.num_classes != num_classes:
        raise ValueError(f"model outputs {counts.num_classes} classes, task has {num_classes}")
    return EvalResult(counts=counts, loss=loss)
