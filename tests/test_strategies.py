"""Strategy factory and server-side aggregation: golden numbers on hand-made replies."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)

from server.federation import aggregate_train_metrics, make_evaluate_aggregator
from server.strategies import STRATEGIES, build_strategy
from shared.config import STRATEGY_NAMES, parse_run_config
from shared.metrics.classification import ClassificationCounts
from shared.registry import UnknownNameError
from shared.tasks import get_task


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


# The run config each strategy needs to be valid (Krum family: n >= 2f+3, Bulyan: f >= 1 and n >= 4f+3).
NEEDS: dict[str, dict] = {
    "fedprox": {"proximal-mu": 0.1},
    "krum": {"min-sites": 3},
    "multikrum": {"min-sites": 3},
    "bulyan": {"krum.num-malicious": 1, "min-sites": 7},
}
FLOWER_CLASS = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedmedian": FedMedian,
                "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum, "bulyan": Bulyan,
                "qfedavg": QFedAvg, "fedavgm": FedAvgM, "fedbn": FedAvg}  # fedbn: FedAvg; the sites keep their norms


class FakeGrid:
    """Just enough of a Grid for ``configure_train`` (node sampling)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_builds_from_config(name: str) -> None:
    cfg = parse_run_config({"strategy": name, **NEEDS.get(name, {})})
    strategy = build_strategy(cfg.strategy, cfg.train)
    assert type(strategy) is FLOWER_CLASS[name] or (name == "qfedavg" and isinstance(strategy, QFedAvg))


def test_new_strategy_options_reach_flower() -> None:
    cfg = parse_run_config({"strategy": "multikrum", "min-sites": 6, "krum.num-malicious": 1})
    mk = build_strategy(cfg.strategy, cfg.train)
    assert (mk.num_malicious_nodes, mk.num_nodes_to_select) == (1, 5)  # 0 = min-sites - f
    cfg = parse_run_config({"strategy": "multikrum", "min-sites": 6, "krum.num-malicious": 1,
                            "multikrum.num-select": 2})
    assert build_strategy(cfg.strategy, cfg.train).num_nodes_to_select == 2
    cfg = parse_run_config({"strategy": "qfedavg", "qfedavg.q": 2.0})
    q = build_strategy(cfg.strategy, cfg.train)
    assert (q.q, q.client_learning_rate, q.train_loss_key) == (2.0, 10.0, "train-loss")  # L = 0.1
    cfg = parse_run_config({"strategy": "qfedavg", "qfedavg.lipschitz": 4.0})
    assert build_strategy(cfg.strategy, cfg.train).client_learning_rate == 0.25
    cfg = parse_run_config({"strategy": "fedavgm", "fedavgm.server-lr": 0.5, "fedavgm.momentum": 0.8})
    m = build_strategy(cfg.strategy, cfg.train)
    assert (m.server_learning_rate, m.server_momentum) == (0.5, 0.8)
    cfg = parse_run_config({"strategy": "bulyan", "krum.num-malicious": 1, "min-sites": 7})
    assert build_strategy(cfg.strategy, cfg.train).num_malicious_nodes == 1


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
    big = ClassificationCounts.from_predictions(np.array([[0.9, 0.1]] * 90 + [[0.2, 0.8]] * 90),
                                                np.array([0] * 90 + [1] * 90))
    small = ClassificationCounts.from_predictions(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([0, 1]))
    records = [
        RecordDict({"metrics": MetricRecord({"num-examples": 180, "eval-loss": 0.1, **big.to_flat()})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 2, "eval-loss": 2.0, **small.to_flat()})}),
    ]
    pooled = make_evaluate_aggregator(get_task("pneumonia-cxr"))(records, "num-examples")  # Youden, positive class 1
    assert pooled["accuracy"] == pytest.approx(180 / 182)
    assert pooled["sensitivity"] == pytest.approx(90 / 91)
    assert pooled["eval-loss"] == pytest.approx((180 * 0.1 + 2 * 2.0) / 182)


@pytest.mark.usefixtures("server_identity", "no_flower_gc")
@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_aggregates_a_batchnorm_state_dict(name: str) -> None:
    """Float weights and BatchNorm's int64 counter survive every strategy's aggregation."""
    cfg = parse_run_config({"strategy": name, "min-sites": 3, **NEEDS.get(name, {})})
    strategy = build_strategy(cfg.strategy, cfg.train, train_metrics_aggr_fn=aggregate_train_metrics)
    n = cfg.strategy.min_sites
    initial = ArrayRecord({"w": torch.zeros((2, 2)), "n": torch.tensor(0, dtype=torch.int64)})
    list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid(n)))  # stateful ones remember the model
    m = {"train-seconds": 1.0, "train-images-per-s": 10.0, "load-seconds": 0.0}
    replies = [
        reply({"w": np.full((2, 2), 0.1 * k, dtype=np.float32), "n": np.array(5 + k, dtype=np.int64)},
              {"num-examples": 10 * (k + 1), "train-loss": 1.0 + 0.1 * k, **m}, f"S{k}", node_id=k + 1)
        for k in range(n)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None, name
    state = arrays.to_torch_state_dict()
    assert torch.isfinite(state["w"].float()).all() and torch.isfinite(state["n"].double()).all()
    assert state["w"].shape == (2, 2) and state["n"].shape == ()
    assert 0.0 <= float(state["w"].min()) and float(state["w"].max()) <= 0.1 * (n - 1) + 1e-6  # within the updates
    assert metrics is not None
    sizes = [10 * (k + 1) for k in range(n)]
    if name == "krum":  # Krum keeps the one selected update and that site's metrics
        assert metrics["num-examples"] in sizes
    elif name == "bulyan":  # metrics of the n - 2f updates Multi-Krum selected
        assert metrics["num-examples"] in {sum(c) for c in itertools.combinations(sizes, n - 2)}
    else:
        assert metrics["num-examples"] == sum(sizes)


@pytest.mark.usefixtures("server_identity", "no_flower_gc")
def test_qfedavg_step_golden() -> None:
    """Equal updates u and losses F: q-FFL moves by u / (1 + q L |u|^2 / F); L = qfedavg.lipschitz (default 0.1)."""
    cfg = parse_run_config({"strategy": "qfedavg", "min-sites": 3})
    strategy = build_strategy(cfg.strategy, cfg.train, train_metrics_aggr_fn=aggregate_train_metrics)
    initial = ArrayRecord({"w": torch.ones(4), "n": torch.tensor(3, dtype=torch.int64)})
    list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid(3)))
    m = {"train-seconds": 1.0, "train-images-per-s": 10.0, "load-seconds": 0.0}
    u = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)  # |u|^2 = 4
    replies = [reply({"w": 1.0 + u, "n": np.array(9, dtype=np.int64)},
                     {"num-examples": 10, "train-loss": 0.5, **m}, f"S{k}", node_id=k + 1) for k in range(3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    state = arrays.to_torch_state_dict()
    np.testing.assert_allclose(state["w"].numpy(), 1.0 + u / (1 + 0.1 * 0.1 * 4 / 0.5), rtol=1e-5)
    assert int(state["n"]) == 3  # the global model's counter, not the sites'
