"""DP-SGD local training at one site (Opacus per-sample gradients, no Flower).

:class:`DPSGDSteps` is the step engine that makes the one training loop
(:func:`shared.training.train_local`) private: it supplies the Poisson
sampler, the ``DPOptimizer`` and the proximal-term-after-noise hook, while the
task's objective supplies the per-example loss and the batches. One call of
``train_local(..., engine=DPSGDSteps(spec))`` takes exactly ``spec.steps``
optimizer steps. Each step draws a Poisson batch (every image independently with
probability ``q = spec.sample_rate``), computes per-sample gradients,
clips each to ``max_grad_norm`` (C), sums them, adds Gaussian noise of std
``noise_multiplier * C`` and divides by the *expected* batch size
``round(q * N)``: the same update ``PrivacyEngine.make_private`` builds
(``DPOptimizer`` with ``loss_reduction="mean"``), without its accountant
(the site's privacy ledger accounts for the steps).

Privacy-relevant choices:

* The loss of each image depends on that image only: the objective's
  ``per_sample_loss`` (class-weighted cross entropy with weights computed
  once from the site's labels, or per-image Dice + cross entropy for
  segmentation). (BatchNorm is gone, see
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from shared.settings import TrainConfig
from shared.training import Objective, make_optimizer, model_in_channels, snapshot_params

__all__ = ["GRAD_SAMPLE_MODES", "DPSGDSpec", "DPSGDSteps"]

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
# The step engine
# ---------------------------------------------------------------------------


class DPSGDSteps:
    """DP-SGD steps for :func:`shared.training.train_local`.

    Parameters
    ----------
    spec:
        Noise multiplier, clipping norm, sampling rate, steps, engine
        (decided by the site's privacy ledger).
    dp_seed:
        Seed of the Poisson batch draws and the noise. ``None`` (the default
        and the only safe choice in a real run) draws it from the OS; pass an
        integer only in tests and benchmarks.

    Notes
    -----
    ``cfg.batch_size``, ``cfg.local_epochs`` and ``cfg.precision`` are not
    used: the batch is Poisson-sampled with ``spec.sample_rate``, the step
    count is ``spec.steps``, and DP training runs in fp32. The model keeps
    its plain state-dict keys afterwards (no ``_module.`` prefix, no hooks).
    The reported loss is the mean per-image loss over the sampled images (a
    non-private statistic: sites keep it local).
    """

    channels_last = False

    def __init__(self, spec: DPSGDSpec, *, dp_seed: int | None = None) -> None:
        self.spec = spec
        self.dp_seed = dp_seed
        self._gsm: AbstractGradSampleModule | None = None
        self._mode = spec.grad_sample_mode
        self._dp_gen: torch.Generator | None = None
        self._params: list[torch.nn.Parameter] = []
        self._n = 0

    def setup(self, model: nn.Module, device: torch.device, objective: Objective,
              shape: tuple[int, ...]) -> nn.Module:
        """fp32 on ``device``; probe the grad-sample engine on a zero batch; wrap for per-sample gradients."""
        self._n = int(shape[0])
        model = model.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format)
        in_ch = model_in_channels(model)
        model.train()
        probe_x = torch.zeros((1, in_ch, *shape[2:]), device=device)
        probe_y = objective.zero_targets(1, tuple(shape[2:]), device)
        self._mode = _probe_mode(model, self.spec.grad_sample_mode, self.spec, probe_x, objective.per_sample_loss,
                                 probe_y)
        self._gsm = _wrap(model, self._mode, self.spec.max_grad_norm)
        return model

    def make_optimizer(self, model: nn.Module, cfg: TrainConfig, proximal_mu: float) -> torch.optim.Optimizer:
        """Opacus' ``DPOptimizer`` around ``cfg.optimizer``; FedProx's ``mu (w - w_global)`` added after the noise."""
        n_expected = max(1, round(self.spec.sample_rate * self._n))
        self._dp_gen = torch.Generator(device="cpu").manual_seed(
            secrets.randbits(63) if self.dp_seed is None else self.dp_seed)
        device = next(model.parameters()).device
        noise_gen = torch.Generator(device=device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=self._dp_gen)))
        opt_cls = DPOptimizerFastGradientClipping if self._mode == "ghost" else DPOptimizer
        optimizer = opt_cls(
            make_optimizer(model, cfg),
            noise_multiplier=self.spec.noise_multiplier,
            max_grad_norm=self.spec.max_grad_norm,
            expected_batch_size=n_expected,
            loss_reduction="mean",
            generator=noise_gen,
        )
        if proximal_mu > 0:
            optimizer.attach_step_hook(_proximal_hook(model, proximal_mu))
        self._params = [p for p in model.parameters() if p.requires_grad]
        return optimizer

    def epochs(self, n: int, cfg: TrainConfig, generator: torch.Generator) -> Iterator[Iterator[torch.Tensor]]:
        """One pass of ``spec.steps`` Poisson batches (each image with probability ``q``; may be empty)."""
        yield self._poisson(n)

    def _poisson(self, n: int) -> Iterator[torch.Tensor]:
        assert self._dp_gen is not None
        for _ in range(self.spec.steps):
            yield (torch.rand(n, generator=self._dp_gen) < self.spec.sample_rate).nonzero().squeeze(1)

    def step(self, x: torch.Tensor, y: torch.Tensor, objective: Objective,
             optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Per-example losses summed, backwards through Opacus (clipping happens in the optimizer step)."""
        assert self._gsm is not None
        per_sample = objective.per_sample_loss(self._gsm(x).float(), y)
        if self._mode == "ghost":
            DPTensorFastGradientClipping(self._gsm, optimizer, per_sample, loss_reduction="sum").backward()
        else:
            per_sample.sum().backward()
        return per_sample.detach().sum()

    def empty_step(self) -> None:
        """Gradients of an empty Poisson batch: the step adds noise only (the accountant counts it)."""
        _empty_batch_grads(self._params, ghost=self._mode == "ghost")

    def finish(self, model: nn.Module) -> None:
        """Remove Opacus hooks and per-parameter attributes."""
        if self._gsm is not None:
            _unwrap(self._gsm, model)
            self._gsm = None

    def divergence_hint(self, cfg: TrainConfig) -> str:
        """Lower the learning rate or the clipping norm."""
        return f"lower 'lr' (now {cfg.lr}) or 'dp.max-grad-norm' (now {self.spec.max_grad_norm})"


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
