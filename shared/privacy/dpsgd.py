"""DP-SGD local training at one site (Opacus per-sample gradients, no Flower).

One call of :func:`train_local_dp` takes exactly ``spec.steps`` optimizer
steps. Each step draws a Poisson batch (every image independently with
probability ``q = spec.sample_rate``), computes per-sample gradients,
clips each to ``max_grad_norm`` (C), sums them, adds Gaussian noise of std
``noise_multiplier * C`` and divides by the *expected* batch size
``round(q * N)``: the same update ``PrivacyEngine.make_private`` builds
(``DPOptimizer`` with ``loss_reduction="mean"``), without its accountant
(the site's privacy ledger accounts for the steps).

Privacy-relevant choices:

* The loss of each image depends on that image only: class-weighted cross
  entropy with weights computed once from the site's labels, or per-image
  Dice + cross entropy for segmentation. (BatchNorm is gone, see
  :func:`shared.models.dp.make_dp_compatible`.)
* An empty Poisson batch still takes a noise-only step (the accountant
  counts it).
* FedProx: a proximal term in the loss does nothing under per-sample
  clipping, so ``mu * (w - w_global)`` is added to the *noised* gradient,
  through ``DPOptimizer``'s step hook (after noise and scaling, before the
  wrapped optimizer's step). It is data-independent post-processing.
* The batch draws and the noise come from a generator seeded from the OS
  (``dp_seed=None``), never from the run-config seed, which the server
  knows: a known seed would let anyone regenerate and subtract the noise and
  would void amplification by subsampling. Tests and benchmarks pass
  ``dp_seed`` for reproducibility.
* fp32 always: autocast with per-sample hooks is not validated.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from shared.config import TrainConfig
from shared.data.preprocess import AugmentConfig, augment_batch, normalize_batch
from shared.seg_training import check_mask_values, check_pairs, augment_pair
from shared.training import (
    TrainResult,
    class_weights,
    make_optimizer,
    model_in_channels,
    select_device,
    snapshot_params,
    to_float01,
)

__all__ = ["GRAD_SAMPLE_MODES", "DPSGDSpec", "per_sample_seg_loss", "train_local_dp"]

logger = logging.getLogger(__name__)

GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ew", "functorch", "ghost")
"""Opacus per-sample gradient engines: layer hooks, torch ExpandedWeights,
functorch (vmap) for every layer, ghost clipping (per-sample norms only, two
backward passes)."""

#: Opacus bookkeeping attributes removed from parameters after training.
_OPACUS_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample")


@dataclass(frozen=True)
class DPSGDSpec:
    """What one DP-SGD round does at a site (decided by the privacy ledger).

    Attributes
    ----------
    noise_multiplier:
        sigma; the noise std on the clipped gradient sum is ``sigma * C``.
    max_grad_norm:
        C, the per-sample L2 clipping norm.
    sample_rate:
        Poisson sampling rate ``q = batch_size / N``.
    steps:
        Exact number of optimizer steps this round.
    grad_sample_mode:
        One of :data:`GRAD_SAMPLE_MODES`.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    grad_sample_mode: str = "hooks"

    def __post_init__(self) -> None:
        """Reject values that would break the guarantee or the loop."""
        if not self.noise_multiplier >= 0:
            raise ValueError(f"DPSGDSpec.noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"DPSGDSpec.max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(
                f"DPSGDSpec.sample_rate must be in (0, 1] (batch_size / N), got {self.sample_rate!r}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"DPSGDSpec.steps must be an integer >= 0, got {self.steps!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"DPSGDSpec.grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                f"got {self.grad_sample_mode!r}"
            )


# ---------------------------------------------------------------------------
# Per-sample losses
# ---------------------------------------------------------------------------


def per_sample_seg_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Dice + cross entropy of each image, shape ``(B,)``.

    Its batch mean equals :func:`shared.seg_training.seg_loss` (MONAI
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


def _classification_loss(weights: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, y, reduction="none")
        return ce * weights[y] if weights is not None else ce

    return loss


# ---------------------------------------------------------------------------
# Opacus wrappers
# ---------------------------------------------------------------------------


def _wrap(model: nn.Module, mode: str, max_grad_norm: float) -> AbstractGradSampleModule:
    """Per-sample-gradient wrapper for ``mode``; gradients of a *summed* loss."""
    if mode == "ew":
        return GradSampleModuleExpandedWeights(model, loss_reduction="sum")
    if mode == "ghost":
        return GradSampleModuleFastGradientClipping(
            model, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True
        )
    return GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")


def _unwrap(gsm: AbstractGradSampleModule, model: nn.Module) -> None:
    """Remove Opacus hooks and per-parameter attributes; ``model`` is plain again."""
    gsm.cleanup()
    for p in model.parameters():
        p.grad = None
        for attr in _OPACUS_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)


def _probe_mode(model: nn.Module, mode: str, spec: DPSGDSpec, sample: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor) -> str:
    """``mode`` if a forward/backward on a zero batch works with it, else ``"hooks"`` (logged).

    Uses an all-zero input, never site data, and takes no optimizer step.
    """
    if mode == "hooks":
        return mode
    gsm = _wrap(model, mode, spec.max_grad_norm)
    try:
        per_sample = loss_fn(gsm(torch.zeros_like(sample)), target)
        if mode == "ghost":
            opt = DPOptimizerFastGradientClipping(
                torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                max_grad_norm=spec.max_grad_norm, expected_batch_size=len(sample),
            )
            DPTensorFastGradientClipping(gsm, opt, per_sample, loss_reduction="sum").backward()
        else:
            per_sample.sum().backward()
        return mode
    except Exception as exc:  # noqa: BLE001 - any failure means: use the reference engine
        logger.warning(
            "DP-SGD: grad-sample-mode '%s' does not work for %s (%s: %s); falling back to 'hooks'",
            mode, type(model).__name__, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
        )
        return "hooks"
    finally:
        _unwrap(gsm, model)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train_local_dp(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    spec: DPSGDSpec,
    *,
    num_classes: int,
    seed: int,
    augment: AugmentConfig | None = None,
    normalize: str = "fixed",
    proximal_mu: float | None = None,
    device: torch.device | None = None,
    segmentation: bool = False,
    dp_seed: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with DP-SGD for exactly ``spec.steps`` steps.

    Parameters
    ----------
    model:
        A DP-compatible network (:func:`shared.models.dp.make_dp_compatible`)
        holding this round's global weights. Afterwards it holds the new
        weights under its plain state-dict keys (no ``_module.`` prefix, no
        Opacus hooks left).
    images:
        uint8 ``(N, C, H, W)`` images.
    targets:
        int64 labels ``(N,)`` (classification) or uint8/bool class-index
        masks ``(N, H, W)`` (``segmentation=True``).
    cfg:
        Local training settings: ``optimizer``, ``lr``, ``momentum``,
        ``weight_decay``, ``class_weighting``, ``proximal_mu``. Batch size,
        epochs and precision are not used: the batch is Poisson-sampled with
        ``spec.sample_rate``, the step count is ``spec.steps`` and DP
        training runs in fp32.
    spec:
        Noise multiplier, clipping norm, sampling rate, steps, engine.
    num_classes:
        Output classes (class weights; mask value check).
    seed:
        Seeds augmentation and dropout.
    augment, normalize:
        As in :func:`shared.training.train_local` (segmentation: joint
        image/mask augmentation, :func:`shared.seg_training.augment_pair`).
    proximal_mu:
        FedProx weight (default ``cfg.proximal_mu``): ``mu * (w - w_global)``
        is added to the noised gradient before each step.
    device:
        Default: CUDA if available, else CPU.
    segmentation:
        ``True`` for per-pixel models trained on masks.
    dp_seed:
        Seed of the Poisson batch draws and the noise. ``None`` (the default
        and the only safe choice in a real run) draws it from the OS; pass an
        integer only in tests and benchmarks.

    Returns
    -------
    TrainResult
        ``num_examples`` = N, mean per-image loss over the sampled images
        (a non-private statistic), time, sampled images per second, steps.

    Raises
    ------
    ValueError
        Mismatched or empty inputs, mask values outside ``[0, num_classes)``.
    """
    device = device or select_device()
    mu = cfg.proximal_mu if proximal_mu is None else proximal_mu
    n = len(images)
    if n == 0:
        raise ValueError("no training images at this site")
    if len(targets) != n:
        raise ValueError(f"{n} images but {len(targets)} {'masks' if segmentation else 'labels'}")
    if segmentation:
        check_pairs(images, targets)
        check_mask_values(targets, num_classes)
        loss_fn = per_sample_seg_loss
    else:
        weights = class_weights(targets, num_classes).to(device) if cfg.class_weighting else None
        loss_fn = _classification_loss(weights)

    model = model.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format)
    in_ch = model_in_channels(model)
    model.train()
    probe_x = torch.zeros((1, in_ch, *images.shape[2:]), device=device)
    probe_y = (torch.zeros((1, *images.shape[2:]), dtype=torch.long, device=device) if segmentation
               else torch.zeros((1,), dtype=torch.long, device=device))
    mode = _probe_mode(model, spec.grad_sample_mode, spec, probe_x, loss_fn, probe_y)

    gsm = _wrap(model, mode, spec.max_grad_norm)
    expected_batch = max(1, round(spec.sample_rate * n))
    dp_gen = torch.Generator(device="cpu").manual_seed(secrets.randbits(63) if dp_seed is None else dp_seed)
    noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=dp_gen)))
    opt_cls = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
    optimizer = opt_cls(
        make_optimizer(model, cfg),
        noise_multiplier=spec.noise_multiplier,
        max_grad_norm=spec.max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        generator=noise_gen,
    )
    if mu > 0:
        optimizer.attach_step_hook(_proximal_hook(model, mu))
    params = [p for p in model.parameters() if p.requires_grad]
    aug_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    t0 = time.perf_counter()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    try:
        for _ in range(spec.steps):
            idx = (torch.rand(n, generator=dp_gen) < spec.sample_rate).nonzero().squeeze(1)
            optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:
                _empty_batch_grads(params, ghost=mode == "ghost")
            else:
                if segmentation:
                    x = to_float01(images[idx], in_ch, device, channels_last=False)
                    y = targets[idx].to(device).long()
                    if augment is not None:
                        x, y = augment_pair(x, y, augment, aug_gen)
                else:
                    x = to_float01(images[idx], in_ch, device, channels_last=False)
                    y = targets[idx].to(device)
                    if augment is not None:
                        x = augment_batch(x, augment, aug_gen)
                x = normalize_batch(x, normalize)
                per_sample = loss_fn(gsm(x).float(), y)
                if mode == "ghost":
                    DPTensorFastGradientClipping(gsm, optimizer, per_sample, loss_reduction="sum").backward()
                else:
                    per_sample.sum().backward()
                total_loss += per_sample.detach().sum()
                seen += len(idx)
            optimizer.step()
    finally:
        _unwrap(gsm, model)
    if not torch.isfinite(total_loss):
        raise FloatingPointError(
            f"DP-SGD training loss became {float(total_loss)}: lower 'lr' (now {cfg.lr}) "
            f"or 'dp.max-grad-norm' (now {spec.max_grad_norm})"
        )
    seconds = time.perf_counter() - t0
    return TrainResult(
        num_examples=n,
        loss=float(total_loss) / max(seen, 1),
        seconds=seconds,
        images_per_second=seen / seconds if seconds > 0 else float("nan"),
        steps=spec.steps,
    )


def _empty_batch_grads(params: list[nn.Parameter], *, ghost: bool) -> None:
    """Gradients of an empty Poisson batch: the step adds noise only."""
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _proximal_hook(model: nn.Module, mu: float) -> Callable[[DPOptimizer], None]:
    """DPOptimizer step hook adding ``mu * (w - w_global)`` to the noised gradients."""
    global_params = snapshot_params(model)
    pairs = [(p, global_params[name]) for name, p in model.named_parameters() if p.requires_grad]

    def hook(_optimizer: DPOptimizer) -> None:
        with torch.no_grad():
            for p, w0 in pairs:
                if p.grad is not None:
                    p.grad.add_(p - w0, alpha=mu)

    return hook
