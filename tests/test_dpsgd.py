"""DP-SGD local training (shared/privacy/dpsgd.py): clipping, noise scale, sampling, FedProx, engines."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from shared.config import TrainConfig
from shared.data.phantoms_tasks import make_lung_seg_phantoms
from shared.models import build_model
from shared.models.dp import dp_state_keys, make_dp_compatible
from shared.objectives import ClassificationObjective, SegmentationObjective
from shared.objectives.segmentation import per_sample_seg_loss, seg_loss
from shared.privacy.dpsgd import GRAD_SAMPLE_MODES, DPSGDSpec, DPSGDSteps
from shared.training import images_to_tensor, snapshot_params, train_local, weight_drift

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

SIZE = 32
SGD = TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, class_weighting=False)


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images whose label is visible (bright vs dark), so gradients are informative."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.randint(0, 128, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    return base + (labels.view(-1, 1, 1, 1) * 100).to(torch.uint8), labels


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return make_dp_compatible(build_model("small-cnn", 1, 2))[0]


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train(model: nn.Module, spec: DPSGDSpec, cfg: TrainConfig = SGD, *, dp_seed: int = 1, **kw):
    images, labels = kw.pop("data", None) or _data()
    return train_local(model, images, labels, cfg, ClassificationObjective(2), seed=0,
                       device=torch.device("cpu"), engine=DPSGDSteps(spec, dp_seed=dp_seed), **kw)


def test_same_seeds_same_weights_other_dp_seed_other_weights() -> None:
    """Batches and noise are reproducible from dp_seed, and only from it."""
    spec = DPSGDSpec(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=3)
    a, b, c = _small_cnn(), _small_cnn(), _small_cnn()
    cfg = TrainConfig(lr=1e-2)
    _train(a, spec, cfg, dp_seed=7)
    _train(b, spec, cfg, dp_seed=7)
    _train(c, spec, cfg, dp_seed=8)
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.equal(_flat(a), _flat(c))


def test_without_dp_seed_noise_is_not_reproducible() -> None:
    """The default draws batches and noise from the OS, never from the run seed."""
    spec = DPSGDSpec(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=1)
    a, b = _small_cnn(), _small_cnn()
    images, labels = _data()
    for m in (a, b):
        train_local(m, images, labels, SGD, ClassificationObjective(2), seed=0, device=torch.device("cpu"),
                    engine=DPSGDSteps(spec))
    assert not torch.equal(_flat(a), _flat(b))


@pytest.mark.parametrize("steps", [0, 1, 5])
def test_takes_exactly_the_given_number_of_steps(steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """spec.steps optimizer steps, whatever the data size and sampling rate."""
    calls = []
    original = torch.optim.SGD.step

    def counting_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    model = _small_cnn()
    before = _flat(model)
    result = _train(model, DPSGDSpec(1.0, 1.0, sample_rate=0.5, steps=steps))
    assert result.steps == steps == len(calls)
    assert result.num_examples == 32
    assert torch.equal(_flat(model), before) == (steps == 0)


def test_update_norm_is_bounded_by_lr_times_clip_norm() -> None:
    """Without noise, one SGD step moves the weights by at most lr * C (mean of clipped gradients)."""
    clip = 1e-3
    images, labels = _data()
    model = _small_cnn()
    before = _flat(model)
    # q = 1: every image is in the batch, expected batch = N.
    _train(model, DPSGDSpec(0.0, clip, sample_rate=1.0, steps=1), data=(images, labels))
    moved = float((_flat(model) - before).norm())
    assert 0 < moved <= SGD.lr * clip * (1 + 1e-3)
    # The unclipped step would be far larger, so the bound above is the clipping's doing.
    free = _small_cnn()
    _train(free, DPSGDSpec(0.0, 1e6, sample_rate=1.0, steps=1), data=(images, labels))
    assert float((_flat(free) - before).norm()) > 100 * SGD.lr * clip


@pytest.mark.parametrize(("sample_rate", "expected_batch"), [(1e-9, 1), (0.25, 8)])
def test_noise_std_is_sigma_c_over_expected_batch(sample_rate: float, expected_batch: int) -> None:
    """The noise on the averaged gradient has std sigma * C / round(q * N), as with PrivacyEngine.

    With a huge sigma the data term is negligible next to the noise; with
    q = 1e-9 every batch is empty (a noise-only step).
    """
    sigma, clip = 1000.0, 1.0
    model = _small_cnn()
    before = _flat(model)
    _train(model, DPSGDSpec(sigma, clip, sample_rate=sample_rate, steps=1))
    delta = (_flat(model) - before) / SGD.lr
    expected = sigma * clip / expected_batch
    assert float(delta.mean()) == pytest.approx(0.0, abs=0.02 * expected)
    assert float(delta.std()) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_empty_batches_take_noise_only_steps(mode: str) -> None:
    """An empty Poisson batch contributes no gradient, but the step and its noise still happen."""
    model = _small_cnn()
    before = _flat(model)
    result = _train(model, DPSGDSpec(0.0, 1.0, sample_rate=1e-9, steps=3, grad_sample_mode=mode))
    assert result.steps == 3
    assert torch.equal(_flat(model), before)
    _train(model, DPSGDSpec(1.0, 1.0, sample_rate=1e-9, steps=1, grad_sample_mode=mode))
    assert float((_flat(model) - before).std()) == pytest.approx(SGD.lr * 1.0 * 1.0, rel=0.05)


def test_fedprox_under_dp_reduces_drift() -> None:
    """mu * (w - w_global) is added after the noise: drift from the global weights shrinks."""
    spec = DPSGDSpec(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=8)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0)
    drift = {}
    for mu in (0.0, 2.0):
        model = _small_cnn()
        start = snapshot_params(model)
        _train(model, spec, cfg, proximal_mu=mu)
        drift[mu] = weight_drift(model, start)
    assert drift[2.0] < 0.8 * drift[0.0]


def test_model_is_plain_after_training() -> None:
    """No Opacus hooks, attributes or key prefixes remain: the weights can be sent as they are."""
    model = _small_cnn()
    keys = dp_state_keys(model)
    _train(model, DPSGDSpec(1.0, 1.0, sample_rate=0.25, steps=2))
    assert dp_state_keys(model) == keys
    assert not any(k.startswith("_module.") for k in model.state_dict())
    for p in model.parameters():
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter"))
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("mode", [m for m in GRAD_SAMPLE_MODES if m != "hooks"])
def test_every_engine_gives_the_hooks_result(mode: str) -> None:
    """ew, functorch and ghost clipping compute the same clipped, noised update as hooks."""
    spec = DPSGDSpec(1.0, 0.5, sample_rate=0.25, steps=2)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0)
    ref, other = _small_cnn(), _small_cnn()
    _train(ref, spec, cfg)
    _train(other, DPSGDSpec(1.0, 0.5, sample_rate=0.25, steps=2, grad_sample_mode=mode), cfg)
    torch.testing.assert_close(_flat(other), _flat(ref), rtol=1e-4, atol=1e-5)


class _Scale(nn.Module):
    """A bare parameter used outside any functional op torch's ExpandedWeights knows."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_unsupported_engine_falls_back_to_hooks(caplog: pytest.LogCaptureFixture) -> None:
    """A mode that fails on the model is replaced by hooks, with a warning, and training still works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _Scale(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    before = _flat(model)
    with caplog.at_level(logging.WARNING, logger="shared.privacy.dpsgd"):
        _train(model, DPSGDSpec(1.0, 1.0, sample_rate=0.25, steps=2, grad_sample_mode="ew"))
    assert "falling back to 'hooks'" in caplog.text
    assert not torch.equal(_flat(model), before)


def test_per_sample_seg_loss_matches_dice_ce() -> None:
    """The per-image Dice + CE averages to the non-private segmentation loss."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((4, 2, 16, 16), generator=gen)
    masks = (torch.rand((4, 16, 16), generator=gen) < 0.4).long()
    per_image = per_sample_seg_loss(logits, masks)
    assert per_image.shape == (4,)
    torch.testing.assert_close(per_image.mean(), seg_loss()(logits, masks.unsqueeze(1)))
    # Each entry depends on its own image only.
    torch.testing.assert_close(per_sample_seg_loss(logits[1:2], masks[1:2]), per_image[1:2])


def test_dp_segmentation_on_lung_phantoms() -> None:
    """A DP U-Net trains on lung-field phantoms: finite loss, new weights, plain keys."""
    images, masks = make_lung_seg_phantoms(12, size=SIZE, seed=0)
    x = images_to_tensor(images)
    y = torch.from_numpy(masks.astype(np.uint8))
    torch.manual_seed(0)
    model = make_dp_compatible(build_model("unet", 1, 2))[0]
    keys, before = dp_state_keys(model), _flat(model)
    result = train_local(model, x, y, TrainConfig(lr=1e-3), SegmentationObjective(2), seed=0,
                         device=torch.device("cpu"), engine=DPSGDSteps(DPSGDSpec(1.0, 1.0, 0.34, steps=3), dp_seed=1))
    assert result.steps == 3 and np.isfinite(result.loss) and result.loss > 0
    assert dp_state_keys(model) == keys
    assert not torch.equal(_flat(model), before)


def test_bad_masks_are_rejected() -> None:
    """Masks stored as 0/255 are caught before training, with the fix in the message."""
    images, masks = make_lung_seg_phantoms(4, size=SIZE, seed=0)
    y = torch.from_numpy(masks.astype(np.uint8) * 255)
    model = make_dp_compatible(build_model("unet", 1, 2))[0]
    with pytest.raises(ValueError, match="divided by 255"):
        train_local(model, images_to_tensor(images), y, TrainConfig(), SegmentationObjective(2), seed=0,
                    engine=DPSGDSteps(DPSGDSpec(1.0, 1.0, 0.5, 1)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\]"),
        ({"steps": -1}, "steps must be an integer >= 0"),
        ({"steps": 2.0}, "steps must be an integer >= 0"),
        ({"grad_sample_mode": "fast"}, "grad_sample_mode must be one of hooks, ew, functorch, ghost"),
    ],
)
def test_spec_rejects_bad_values(kwargs: dict, message: str) -> None:
    """Invalid DP-SGD specs fail early and say what is allowed."""
    base = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.1, "steps": 1}
    with pytest.raises(ValueError, match=message):
        DPSGDSpec(**{**base, **kwargs})


def test_mismatched_inputs_are_rejected() -> None:
    """Images and labels of different lengths are an error naming both counts."""
    images, labels = _data()
    with pytest.raises(ValueError, match="32 images but 31 labels"):
        train_local(_small_cnn(), images, labels[:31], SGD, ClassificationObjective(2), seed=0,
                    engine=DPSGDSteps(DPSGDSpec(1.0, 1.0, 0.1, 1)))
