"""Strategy factory and server-side aggregation: golden numbers on hand-made replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import time

from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from shared.tasks import get_task
from server.federation import aggregate_train_metrics, make_evaluate_aggregator
from server.strategies import STRATEGIES, build_strategy
from shared.config import STRATEGY_NAMES, parse_run_config
from shared.metrics.classification import ClassificationCounts
from shared.registry import UnknownNameError


def reply(arrays: dict[str, np.ndarray], metrics: dict, site: str, node_id: int = 1) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"site-id": site}),
    })
    meta = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                    reply_to_message_id="x", group_id="", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content, metadata=meta)


def test_registry_matches_config_names() -> None:
    assert set(STRATEGIES.names()) == set(STRATEGY_NAMES)
    with pytest.raises(UnknownNameError, match="did you mean 'fedavg'|Did you mean 'fedavg'"):
        STRATEGIES.get("fedavgg")


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_builds_from_config(name: str) -> None:
    extra = {"proximal-mu": 0.1} if name == "fedprox" else {}
    if name == "krum":
        extra = {"min-sites": 3}
    cfg = parse_run_config({"strategy": name, **extra})
    strategy = build_strategy(cfg.strategy, cfg.train)
    assert type(strategy).__name__.lower() == name


def test_fedavg_golden_weighted_average() -> None:
    """Site A (30 examples) and site B (10 examples): w = (30*a + 10*b) / 40."""
    cfg = parse_run_config({"strategy": "fedavg"})
    strategy = build_strategy(cfg.strategy, cfg.train, train_metrics_aggr_fn=aggregate_train_metrics)
    a = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    b = {"w": np.array([[5.0, 6.0], [7.0, 8.0]], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    m = {"train-seconds": 1.0, "train-images-per-s": 10.0, "load-seconds": 0.0}
    replies = [
        reply(a, {"num-examples": 30, "train-loss": 1.0, **m}, "A"),
        reply(b, {"num-examples": 10, "train-loss": 3.0, **m}, "B", node_id=2),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), [[2.0, 3.0], [4.0, 5.0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["b"].numpy(), [1.0], atol=1e-6)
    assert metrics["train-loss"] == pytest.approx(1.5)  # (30*1 + 10*3) / 40
    assert metrics["num-examples"] == 40


def test_evaluate_aggregation_sums_counts_not_ratios() -> None:
    """A tiny site with accuracy 0 must not weigh as much as a large site with accuracy 1."""
    big = ClassificationCounts.from_predictions(np.array([[0.9, 0.1]] * 90 + [[0.2, 0.8]] * 90), np.array([0] * 90 + [1] * 90))
    small = ClassificationCounts.from_predictions(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([0, 1]))
    records = [
        RecordDict({"metrics": MetricRecord({"num-examples": 180, "eval-loss": 0.1, **big.to_flat()})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 2, "eval-loss": 2.0, **small.to_flat()})}),
    ]
    pooled = make_evaluate_aggregator(get_task("pneumonia-cxr"))(records, "num-examples")  # Youden, positive class 1
    assert pooled["accuracy"] == pytest.approx(180 / 182)
    assert pooled["sensitivity"] == pytest.approx(90 / 91)
    assert pooled["eval-loss"] == pytest.approx((180 * 0.1 + 2 * 2.0) / 182)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_aggregates_a_batchnorm_state_dict(name: str) -> None:
    """Float weights and BatchNorm's int64 counter survive every strategy's aggregation."""
    extra = {"proximal-mu": 0.1} if name == "fedprox" else {}
    cfg = parse_run_config({"strategy": name, "min-sites": 3, **extra})
    strategy = build_strategy(cfg.strategy, cfg.train, train_metrics_aggr_fn=aggregate_train_metrics)
    if hasattr(strategy, "current_arrays"):  # FedOpt family keeps the previous global model
        strategy.current_arrays = {"w": np.zeros((2, 2), dtype=np.float32), "n": np.array(0, dtype=np.int64)}
    m = {"train-seconds": 1.0, "train-images-per-s": 10.0, "load-seconds": 0.0}
    replies = [
        reply({"w": np.full((2, 2), float(k), dtype=np.float32), "n": np.array(5 + k, dtype=np.int64)},
              {"num-examples": 10 * (k + 1), "train-loss": 1.0, **m}, f"S{k}", node_id=k + 1)
        for k in range(3)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None, name
    state = arrays.to_torch_state_dict()
    assert torch.isfinite(state["w"].float()).all()
    assert state["w"].shape == (2, 2)
    assert metrics is not None
    # Krum keeps the one selected update and that site's metrics; the others pool all three
    expected = {10.0, 20.0, 30.0} if name == "krum" else {60.0}
    assert metrics["num-examples"] in expected
