"""Strategy factory: a Flower strategy by name from the run config."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
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
    Strategy,
)

from server.central_dp import WEIGHT_KEY, RoundNote, wrap_central_dp
from shared import protocol
from shared.config import CentralDPConfig, StrategyConfig, TrainConfig
from shared.registry import Registry

AggrFn = Callable[[list[RecordDict], str], MetricRecord]
StrategyFactory = Callable[[StrategyConfig, TrainConfig, dict], Strategy]

STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


def _common(s: StrategyConfig, aggr: dict) -> dict:
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_sites,
        "min_evaluate_nodes": s.min_sites,
        "min_available_nodes": s.min_sites,
        "arrayrecord_key": protocol.ARRAYS,
        "configrecord_key": protocol.CONFIG,
        "weighted_by_key": protocol.NUM_EXAMPLES,
        **aggr,
    }


@STRATEGIES.register("fedavg")
def _fedavg(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return FedAvg(**_common(s, aggr))


@STRATEGIES.register("fedbn")
def _fedbn(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    """FedAvg over everything but the normalisation layers, which the sites keep (:mod:`shared.fedbn`)."""
    return FedAvg(**_common(s, aggr))


@STRATEGIES.register("fedprox")
def _fedprox(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return FedProx(**_common(s, aggr), proximal_mu=t.proximal_mu)


def _fedopt(s: StrategyConfig) -> dict:
    return {"eta": s.eta, "eta_l": s.eta_l, "beta_1": s.beta_1, "beta_2": s.beta_2, "tau": s.tau}


@STRATEGIES.register("fedadam")
def _fedadam(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return FedAdam(**_common(s, aggr), **_fedopt(s))


@STRATEGIES.register("fedyogi")
def _fedyogi(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return FedYogi(**_common(s, aggr), **_fedopt(s))


@STRATEGIES.register("fedmedian")
def _fedmedian(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return FedMedian(**_common(s, aggr))


@STRATEGIES.register("fedtrimmedavg")
def _fedtrimmedavg(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return FedTrimmedAvg(**_common(s, aggr), beta=s.trim_beta)


@STRATEGIES.register("krum")
def _krum(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return Krum(**_common(s, aggr), num_malicious_nodes=s.num_malicious)


@STRATEGIES.register("multikrum")
def _multikrum(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return MultiKrum(**_common(s, aggr), num_malicious_nodes=s.num_malicious,
                     num_nodes_to_select=s.multikrum_num_select())


@STRATEGIES.register("bulyan")
def _bulyan(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return Bulyan(**_common(s, aggr), num_malicious_nodes=s.num_malicious)


@STRATEGIES.register("fedavgm")
def _fedavgm(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return FedAvgM(**_common(s, aggr), server_learning_rate=s.fedavgm_server_lr, server_momentum=s.fedavgm_momentum)


TRAIN_LOSS_KEY = "train-loss"


class QFedAvgWithBuffers(QFedAvg):
    """Flower's q-FedAvg, with integer buffers kept out of the q-FFL update.

    Flower's q-FFL arithmetic scales ``w - w_k`` by ``L = 1/client_learning_rate`` in
    place, which fails on BatchNorm's int64 ``num_batches_tracked``; converted
    to float, the counters' differences would also enter ``|w - w_k|^2`` and
    damp the step. Integer buffers are counters, not weights: they are taken
    out of the global model and the replies before q-FFL runs, and the new
    global model keeps the previous global values (as under central DP), in
    the model's key order.
    """

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the floating-point tensors with q-FFL; integer buffers keep the global model's values."""
        replies = list(replies)
        if self.current_arrays is None:
            return super().aggregate_train(server_round, replies)
        order = list(self.current_arrays.keys())
        buffers = {k: a.numpy() for k, a in self.current_arrays.items()
                   if not np.issubdtype(np.dtype(a.dtype), np.floating)}
        for k in buffers:
            del self.current_arrays[k]
        for m in replies:
            rec = None if m.has_error() else m.content.array_records.get(self.arrayrecord_key)
            for k in buffers:
                if rec is not None and k in rec:
                    del rec[k]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({k: Array(buffers[k].copy()) if k in buffers else arrays[k] for k in order})
        return arrays, metrics


@STRATEGIES.register("qfedavg")
def _qfedavg(s: StrategyConfig, t: TrainConfig, aggr: dict) -> Strategy:
    return QFedAvgWithBuffers(client_learning_rate=1.0 / s.qfedavg_lipschitz, q=s.qfedavg_q,
                              train_loss_key=TRAIN_LOSS_KEY, **_common(s, aggr))


def build_strategy(
    s: StrategyConfig,
    t: TrainConfig,
    train_metrics_aggr_fn: AggrFn | None = None,
    evaluate_metrics_aggr_fn: AggrFn | None = None,
    central_dp: CentralDPConfig | None = None,
    on_round: RoundNote | None = None,
) -> Strategy:
    """Build the strategy named ``s.name`` with medfed's metric aggregation.

    With ``central_dp.mode`` other than 'none' the strategy averages updates
    uniformly and is wrapped by :func:`server.central_dp.wrap_central_dp`;
    ``on_round(round, key, value)`` receives each round's privacy record.
    """
    aggr = {"train_metrics_aggr_fn": train_metrics_aggr_fn, "evaluate_metrics_aggr_fn": evaluate_metrics_aggr_fn}
    if central_dp is None or central_dp.mode == "none":
        return STRATEGIES.get(s.name)(s, t, aggr)
    inner = STRATEGIES.get(s.name)(s, t, {**aggr, "weighted_by_key": WEIGHT_KEY})
    return wrap_central_dp(inner, central_dp, s.min_sites, on_round)
