"""Strategy factory: a Flower strategy by name from the run config."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

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
