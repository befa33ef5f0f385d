"""The one local training loop, and the batching/precision helpers it shares: pure PyTorch, no Flower.

:func:`train_local` trains every task kind, with and without DP-SGD. What
differs is plugged in:

* the task's :class:`Objective` (:mod:`shared.objectives`) supplies the
  checks of its inputs, batch preparation (float conversion, augmentation,
  normalisation), the training loss and the per-example loss, and its
  evaluation counts;
* a :class:`StepEngine` decides how optimisation steps are taken: the
  default :class:`StandardSteps` (shuffled epochs, bf16 autocast +
  channels_last, FedProx term in the loss) or DP-SGD's engine
  (:class:`shared.privacy.dpsgd.DPSGDSteps`: Poisson sampling, per-example
  clipping and noise through Opacus' ``DPOptimizer``, the proximal term added
  after the noise).

Images arrive as uint8 arrays ``(N, H, W)`` or ``(N, H, W, C)`` and stay
uint8 in memory; each batch is converted to float, normalised and (for
training) augmented on the fly. Batching is done by hand from a seeded
permutation, which is faster than a ``DataLoader`` for in-memory data.

Speed-ups measured on 2-core CPU machines with native bf16: bf16 autocast
(1.6-2x) and channels_last (1.2-1.4x). ``precision="auto"`` uses bf16 autocast
only where the hardware computes in bf16 (CUDA devices that support it, CPUs
with AVX512-BF16, AMX or Arm BF16): a CPU without it only emulates bf16, and
there autocast made training 2.5x *slower* (small-cnn and U-Net at 64 px on a
2-core AVX-512 Xeon: 96 vs 242 and 71 vs 178 images/s), so ``auto`` trains in
fp32 on it. channels_last stays on unless ``precision="fp32"``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from shared.data.preprocess import AugmentConfig, normalize_batch
from shared.metrics.classification import ClassificationCounts
from shared.metrics.segmentation import SegmentationCounts
from shared.settings import TrainConfig

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
    """Counts and mean loss of one evaluation pass (only counts leave a site).

    ``predictions`` (probabilities ``(N, C)`` or predicted foreground masks
    ``(N, H, W)``) is filled only when asked for, for computations that stay
    at the site (patient-subgroup counts); it is never sent.
    """

    counts: ClassificationCounts | SegmentationCounts
    loss: float
    predictions: np.ndarray | None = None

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


_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""``/proc/cpuinfo`` flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX, Arm's BF16 (``Features``)."""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bf16 natively (read from ``/proc/cpuinfo``; False where it cannot be read).

    ``cpuinfo`` replaces the file's text (tests).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _CPU_BF16_FLAGS & set(value.split()):
            return True
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``"bf16"`` always autocasts to bf16; ``"auto"`` only where the device computes in bf16 natively
    (:func:`torch.cuda.is_bf16_supported`, :func:`cpu_has_native_bf16`), since emulated bf16 is slower than fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_native_bf16()
    return torch.bfloat16 if native else None


@functools.cache
def _cpu_native_bf16() -> bool:
    return cpu_has_native_bf16()


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
        return float(math.sqrt(sum(float((p - reference[n]).pow(2).sum())
                                   for n, p in model.named_parameters() if n in reference)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named in ``cfg`` ('adam' or 'sgd')."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam' or 'sgd'")


def site_round_seed(seed: int, server_round: int, site_id: str) -> int:
    """The training seed of one site in one round: differs per site and round, stable across processes.

    Federated sites and the in-process baselines (``medfed simulate
    --baseline``) use the same formula, so a site trained alone sees the same
    shuffling and augmentation as in the federation.
    """
    return (seed * 1_000_003 + server_round * 7919 + zlib.crc32(site_id.encode())) % 2**31


# ---------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------


def model_in_channels(model: nn.Module) -> int:
    """Input channels of the first convolution (or linear) layer."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return int(m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)
    raise ValueError("model has no Conv2d/Linear layer")


class Objective(Protocol):
    """What a task kind contributes to :func:`train_local` (see :mod:`shared.objectives`)."""

    num_classes: int

    def check_inputs(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise ValueError for empty or mismatched images and targets."""

    def prepare(self, images: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, device: torch.device) -> None:
        """Per-call set-up from the site's data (class weights, target value checks)."""

    def batch(
        self, images: torch.Tensor, targets: torch.Tensor, *, device: torch.device, in_channels: int,
        augment: AugmentConfig | None, generator: torch.Generator, normalize: str, channels_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch: uint8 images and targets -> network input and loss target."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (a scalar)."""

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One loss per example, each depending on that example only (DP-SGD, audits)."""

    def zero_targets(self, n: int, spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """All-zero targets for ``n`` examples of ``spatial`` size (engine probes; never site data)."""

    def class_counts(self, targets: torch.Tensor) -> list[int] | None:
        """Images per class of a site's targets (roll-call summary), or None when images have no class."""


class StepEngine(Protocol):
    """How :func:`train_local` takes its optimisation steps."""

    channels_last: bool
    """Whether batches are laid out channels_last."""

    def setup(self, model: nn.Module, device: torch.device, objective: Objective,
              shape: tuple[int, ...]) -> nn.Module:
        """Move/prepare the model for training on images of ``shape`` ``(N, C, H, W)``; return it."""

    def make_optimizer(self, model: nn.Module, cfg: TrainConfig, proximal_mu: float) -> torch.optim.Optimizer:
        """The optimizer (FedProx is the engine's to apply, in the loss or after noise)."""

    def epochs(self, n: int, cfg: TrainConfig, generator: torch.Generator) -> Iterator[Iterator[torch.Tensor]]:
        """Index batches, grouped in passes after each of which the loss is checked for divergence."""

    def step(self, x: torch.Tensor, y: torch.Tensor, objective: Objective,
             optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Forward and backward pass of one batch; returns the detached summed loss of its examples."""

    def empty_step(self) -> None:
        """Gradients for an empty batch (only Poisson sampling draws them)."""

    def finish(self, model: nn.Module) -> None:
        """Undo any wrapping of the model (it keeps its trained weights under its own keys)."""

    def divergence_hint(self, cfg: TrainConfig) -> str:
        """What to change when the loss becomes non-finite."""


class StandardSteps:
    """Non-private training.

    Shuffled epochs of ``cfg.batch_size``, bf16 autocast + channels_last, FedProx in the loss.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.precision = cfg.precision
        self.channels_last = cfg.precision != "fp32"
        self._amp: torch.dtype | None = None
        self._device = torch.device("cpu")
        self._model: nn.Module | None = None
        self._mu = 0.0
        self._global: dict[str, torch.Tensor] | None = None

    def setup(self, model: nn.Module, device: torch.device, objective: Objective,
              shape: tuple[int, ...]) -> nn.Module:
        """Move to ``device``, channels_last unless fp32."""
        self._device, self._amp = device, resolve_precision(self.precision, device)
        self._model = prepare_model(model, device, self.precision)
        return self._model

    def make_optimizer(self, model: nn.Module, cfg: TrainConfig, proximal_mu: float) -> torch.optim.Optimizer:
        """``cfg.optimizer``; with mu > 0 the loss gains ``mu/2 ||w - w_global||^2`` (weights on entry)."""
        self._mu = proximal_mu
        self._global = snapshot_params(model) if proximal_mu > 0 else None
        return make_optimizer(model, cfg)

    def epochs(self, n: int, cfg: TrainConfig, generator: torch.Generator) -> Iterator[Iterator[torch.Tensor]]:
        """``cfg.local_epochs`` passes over a fresh seeded permutation each."""
        for _ in range(cfg.local_epochs):
            yield batch_indices(n, cfg.batch_size, generator)

    def step(self, x: torch.Tensor, y: torch.Tensor, objective: Objective,
             optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Mean loss (plus the proximal term) backwards; returns loss x batch size."""
        assert self._model is not None
        with autocast(self._device, self._amp):
            logits = self._model(x)
        loss = objective.loss(logits.float(), y)
        if self._global is not None:
            loss = loss + 0.5 * self._mu * proximal_term(self._model, self._global)
        loss.backward()
        return loss.detach() * len(x)

    def empty_step(self) -> None:
        """Never called: epochs have no empty batches."""
        raise RuntimeError("standard training never draws an empty batch")

    def finish(self, model: nn.Module) -> None:
        """Nothing to undo."""

    def divergence_hint(self, cfg: TrainConfig) -> str:
        """Lower the learning rate or leave bf16."""
        return f"lower 'lr' (now {cfg.lr}) or use precision='fp32'"


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    objective: Objective,
    *,
    seed: int,
    augment: AugmentConfig | None = None,
    normalize: str = "fixed",
    proximal_mu: float | None = None,
    device: torch.device | None = None,
    engine: StepEngine | None = None,
) -> TrainResult:
    """Train ``model`` in place on one site's data: the one local training loop.

    Parameters
    ----------
    model:
        The network, already holding the global weights of this round.
    images:
        uint8 ``(N, C, H, W)`` tensor (see :func:`images_to_tensor`).
    targets:
        What ``objective`` trains against: int64 labels ``(N,)`` or uint8
        class-index masks ``(N, H, W)``.
    cfg:
        Local training settings.
    objective:
        The task's objective (:meth:`shared.tasks.TaskSpec.objective`).
    seed:
        Seeds shuffling, augmentation and dropout: same seed, same result.
    augment:
        Training augmentation (``None`` = none), applied on ``[0, 1]`` images.
    normalize:
        Batch intensity normalisation (see :func:`shared.data.preprocess.normalize_batch`).
    proximal_mu:
        FedProx weight; defaults to ``cfg.proximal_mu``: the update is pulled
        towards the weights the model held on entry.
    device:
        Default: CUDA if available, else CPU.
    engine:
        How steps are taken: :class:`StandardSteps` (default) or DP-SGD's
        :class:`shared.privacy.dpsgd.DPSGDSteps`.

    Returns
    -------
    TrainResult
        Examples, mean loss over the examples seen, time, throughput, steps.

    Raises
    ------
    ValueError
        Empty or mismatched inputs, targets the objective cannot use.
    FloatingPointError
        The loss became NaN or infinite (checked after each pass).
    """
    device = device or select_device()
    mu = cfg.proximal_mu if proximal_mu is None else proximal_mu
    objective.check_inputs(images, targets)
    engine = engine or StandardSteps(cfg)
    model = engine.setup(model, device, objective, tuple(images.shape))
    in_ch = model_in_channels(model)
    objective.prepare(images, targets, cfg, device)
    optimizer = engine.make_optimizer(model, cfg, mu)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()

    t0 = time.perf_counter()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)  # no host sync per step
    seen, steps = 0, 0
    try:
        for epoch, batches in enumerate(engine.epochs(len(images), cfg, gen), start=1):
            for idx in batches:
                optimizer.zero_grad(set_to_none=True)
                if len(idx) == 0:
                    engine.empty_step()
                else:
                    x, y = objective.batch(images[idx], targets[idx], device=device, in_channels=in_ch,
                                           augment=augment, generator=gen, normalize=normalize,
                                           channels_last=engine.channels_last)
                    total_loss += engine.step(x, y, objective, optimizer)
                    seen += len(idx)
                optimizer.step()
                steps += 1
            if not torch.isfinite(total_loss):
                raise FloatingPointError(
                    f"training loss became {float(total_loss)} in pass {epoch}: {engine.divergence_hint(cfg)}"
                )
    finally:
        engine.finish(model)
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
