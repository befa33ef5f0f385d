"""Local training loop: FedProx drift, determinism, class weights, evaluation counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared.config import TrainConfig
from shared.data.phantoms import make_chest_phantoms
from shared.models import build_model
from shared.objectives import ClassificationObjective
from shared.objectives.classification import evaluate_model
from shared.training import (
    class_weights,
    cpu_has_native_bf16,
    images_to_tensor,
    resolve_precision,
    snapshot_params,
    train_local,
    weight_drift,
)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = make_chest_phantoms(96, size=32, seed=3)
    return images_to_tensor(images), torch.from_numpy(labels).long()


def fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small-cnn", 1, 2)


def test_fedprox_term_reduces_drift_from_global_model(data) -> None:
    x, y = data
    cfg = TrainConfig(local_epochs=3, batch_size=16, lr=0.05, optimizer="sgd", precision="fp32")
    drifts = {}
    for mu in (0.0, 1.0):
        model = fresh_model()
        start = snapshot_params(model)
        train_local(model, x, y, cfg, ClassificationObjective(2), seed=1, proximal_mu=mu, device=torch.device("cpu"))
        drifts[mu] = weight_drift(model, start)
    assert drifts[0.0] > 0
    assert drifts[1.0] < 0.8 * drifts[0.0], drifts


def test_proximal_mu_from_config_is_used_by_default(data) -> None:
    x, y = data
    base = TrainConfig(local_epochs=2, batch_size=16, lr=0.05, optimizer="sgd", precision="fp32")
    drift = {}
    for mu in (0.0, 1.0):
        model = fresh_model()
        start = snapshot_params(model)
        train_local(model, x, y, dataclasses.replace(base, proximal_mu=mu), ClassificationObjective(2), seed=1,
                    device=torch.device("cpu"))
        drift[mu] = weight_drift(model, start)
    assert drift[1.0] < drift[0.0]


def test_training_is_deterministic_for_a_seed(data) -> None:
    x, y = data
    cfg = TrainConfig(local_epochs=1, batch_size=16, lr=0.01, precision="fp32")
    outs = []
    for _ in range(2):
        model = fresh_model()
        res = train_local(model, x, y, cfg, ClassificationObjective(2), seed=7, device=torch.device("cpu"))
        outs.append((res.loss, [p.detach().clone() for p in model.parameters()]))
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(a, b)


def test_training_reduces_loss_and_reports_throughput(data) -> None:
    x, y = data
    model = fresh_model()
    cfg = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3, precision="auto")
    first = train_local(model, x, y, cfg, ClassificationObjective(2), seed=0, augment=None)
    for s in range(1, 6):
        last = train_local(model, x, y, cfg, ClassificationObjective(2), seed=s, augment=None)
    assert last.loss < first.loss
    assert last.num_examples == len(x) and last.steps == 6 and last.images_per_second > 0


XEON_AVX512 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f avx512bw avx512_vnni\n"
XEON_BF16 = XEON_AVX512.replace("avx512_vnni", "avx512_vnni avx512_bf16 amx_tile")
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_auto_precision_uses_bf16_only_where_the_cpu_computes_in_it(monkeypatch) -> None:
    assert not cpu_has_native_bf16(XEON_AVX512)  # AVX-512 without BF16: bf16 is emulated (2.5x slower)
    assert cpu_has_native_bf16(XEON_BF16) and cpu_has_native_bf16(ARM_BF16)
    assert not cpu_has_native_bf16("")  # unreadable or unknown: fp32
    cpu = torch.device("cpu")
    import shared.training as training

    for native, expected in ((False, None), (True, torch.bfloat16)):
        monkeypatch.setattr(training, "_cpu_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", cpu) is expected
        assert resolve_precision("bf16", cpu) is torch.bfloat16  # asked for explicitly: always
        assert resolve_precision("fp32", cpu) is None


def test_class_weights_inverse_frequency() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    w3 = class_weights(np.array([0, 0, 2, 2]), 3)
    assert w3[1] == 0 and torch.allclose(w3[[0, 2]], torch.tensor([1.0, 1.0]))


def test_evaluate_returns_counts_only(data) -> None:
    x, y = data
    res = evaluate_model(fresh_model(), x, y, num_classes=2, precision="fp32", device=torch.device("cpu"))
    assert res.num_examples == len(y)
    assert int(res.counts.confusion.sum()) == len(y)
    assert int(res.counts.histogram.sum()) == 2 * len(y)  # one score per class per image
    assert np.isfinite(res.loss)


def test_empty_site_data_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no training images"):
        train_local(fresh_model(), torch.zeros((0, 1, 32, 32), dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                    TrainConfig(), ClassificationObjective(2), seed=0)


def test_non_finite_loss_stops_training_with_advice(data) -> None:
    x, y = data
    model = fresh_model()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lower 'lr'"):
        train_local(model, x, y, TrainConfig(precision="fp32"), ClassificationObjective(2), seed=0,
                    device=torch.device("cpu"))
