"""Central (site-level) DP: Flower's fixed-clipping wrappers, made strict.

``central-dp.mode`` selects :class:`ServerFixedClipping` or
:class:`ClientFixedClipping`, subclasses of Flower's
``DifferentialPrivacyServerSideFixedClipping`` / ``...ClientSideFixedClipping``
that keep Flower's round configuration (current model, the clipping norm sent
to sites) but replace ``aggregate_train`` so that:

* a round with fewer replies than the noise is calibrated for, or with a failed
  reply, is **refused**: nothing is aggregated, no noise is drawn, no privacy is
  spent, the global model stays as it was; the reason is logged at ERROR and
  recorded in the round's record (Flower's wrapper only warns);
* updates are averaged uniformly (each site weighs ``1/m``; FedAvg's
  image-count weights would break the ``C/n`` calibration);
* integer buffers (BatchNorm's ``num_batches_tracked``) are kept from the
  global model instead of crashing Flower's float-only clipping;
* in client-side mode the server checks every update's norm and refuses the
  round if a site did not clip;
* every released round reports the cumulative site-level epsilon
  (:mod:`shared.privacy.central`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from server.gate import declared_site_id
from shared.config import CentralDPConfig, ConfigError
from shared.privacy.central import (
    CentralDPAccount,
    add_gaussian_noise,
    clip_update,
    keep_integer_buffers,
    refusal_reason,
    update_norm,
)

logger = logging.getLogger(__name__)

WEIGHT_KEY = "central-dp-weight"
"""Metric key the wrapper sets to 1.0 in every reply: the inner FedAvg weighs by it (uniform mean)."""
EPSILON_KEY = "central-dp-epsilon"
NORM_TOLERANCE = 1e-4
"""Relative slack on a client-clipped update's norm (float32 rounding)."""

RoundNote = Callable[[int, str, Any], None]


def _to_numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy()) for k, v in rec.items()}


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in arrays.items()})


class _StrictCentralDP:
    """Shared ``aggregate_train`` of both wrappers (mixed in before Flower's class)."""

    strategy: FedAvg
    account: CentralDPAccount
    on_round: RoundNote | None
    releases: int
    refused_rounds: list[int]
    _global: dict[str, np.ndarray]

    def _setup(self, account: CentralDPAccount, on_round: RoundNote | None) -> None:
        self.account = account
        self.on_round = on_round
        self.releases = 0
        self.refused_rounds = []
        self._global = {}

    def _prepare_updates(self, replies: list[Message]) -> str | None:
        """Clip or check each reply's update in place; return a refusal reason or None."""
        raise NotImplementedError

    def _reference(self) -> dict[str, np.ndarray]:
        """The global model this round's updates are relative to."""
        raise NotImplementedError

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Refuse the round, or aggregate uniformly, add calibrated noise and account for it."""
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        reason = refusal_reason(len(ok), len(replies) - len(ok), self.account.calibrated_sites)
        if reason is None:
            reason = self._prepare_updates(ok)
        if reason is None:
            for m in ok:
                for rec in m.content.metric_records.values():
                    rec[WEIGHT_KEY] = 1.0
            arrays, metrics = self.strategy.aggregate_train(server_round, ok)
            if arrays is None:
                reason = "the wrapped strategy produced no aggregate"
        if reason is not None:
            return self._refuse(server_round, len(ok), reason)
        noisy = keep_integer_buffers(add_gaussian_noise(_to_numpy(arrays), self.account.noise_std), self._reference())
        self.releases += 1
        eps = self.account.epsilon(self.releases)
        logger.info("round %d: central DP noise std %.4g added to the mean of %d clipped updates; "
                    "site-level epsilon %.3f at delta %g after %d releases",
                    server_round, self.account.noise_std, len(ok), eps, self.account.delta, self.releases)
        self._note(server_round, {"released": True, "replies": len(ok), "epsilon": eps})
        metrics = metrics if metrics is not None else MetricRecord()
        metrics[EPSILON_KEY] = eps
        return _to_record(noisy), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate, with the uniform weight key the inner strategy expects."""
        replies = list(replies)
        for m in replies:
            if not m.has_error():
                for rec in m.content.metric_records.values():
                    rec[WEIGHT_KEY] = 1.0
        return self.strategy.aggregate_evaluate(server_round, replies)

    def report(self) -> dict[str, object]:
        """The run's site-level privacy account (for summary.json)."""
        return {"mode": self.mode, **self.account.report(self.releases, self.refused_rounds)}

    @property
    def mode(self) -> str:
        """The ``central-dp.mode`` this wrapper implements."""
        raise NotImplementedError

    def _refuse(self, server_round: int, num_ok: int, reason: str) -> tuple[None, None]:
        self.refused_rounds.append(server_round)
        logger.error("round %d REFUSED by central DP: %s. The global model is unchanged and no privacy is spent.",
                     server_round, reason)
        self._note(server_round, {"released": False, "replies": num_ok, "refused": reason,
                                  "epsilon": self.account.epsilon(self.releases)})
        return None, None

    def _note(self, server_round: int, info: dict[str, Any]) -> None:
        if self.on_round is not None:
            self.on_round(server_round, "central-dp", {
                **info, "delta": self.account.delta, "unit": "per site (site-level)",
                "calibrated-sites": self.account.calibrated_sites, "releases": self.releases,
            })


class ServerFixedClipping(_StrictCentralDP, DifferentialPrivacyServerSideFixedClipping):
    """Server-side fixed clipping: the server clips each site's update, then averages and adds noise."""

    def __init__(self, strategy: FedAvg, account: CentralDPAccount, on_round: RoundNote | None = None) -> None:
        DifferentialPrivacyServerSideFixedClipping.__init__(
            self, strategy, account.noise_multiplier, account.clipping_norm, account.calibrated_sites)
        self._setup(account, on_round)

    @property
    def mode(self) -> str:  # noqa: D102
        return "server-fixed"

    def _reference(self) -> dict[str, np.ndarray]:
        return _to_numpy(self.current_arrays)

    def _prepare_updates(self, replies: list[Message]) -> str | None:
        ref = self._reference()
        for m in replies:
            key = self.strategy.arrayrecord_key
            try:
                m.content[key] = _to_record(clip_update(_to_numpy(m.content[key]), ref, self.clipping_norm))
            except (KeyError, ValueError) as e:
                return (f"site {(declared_site_id(m) or f'node-{m.metadata.src_node_id}')} sent an update that does "
                        f"not match the global model ({e})")
        return None


class ClientFixedClipping(_StrictCentralDP, DifferentialPrivacyClientSideFixedClipping):
    """Client-side fixed clipping: sites clip (client.central_dp mod), the server checks, averages, adds noise."""

    def __init__(self, strategy: FedAvg, account: CentralDPAccount, on_round: RoundNote | None = None) -> None:
        DifferentialPrivacyClientSideFixedClipping.__init__(
            self, strategy, account.noise_multiplier, account.clipping_norm, account.calibrated_sites)
        self._setup(account, on_round)

    @property
    def mode(self) -> str:  # noqa: D102
        return "client-fixed"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global model (to check the sites' clipping), then let Flower send the clipping norm."""
        self._global = _to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _reference(self) -> dict[str, np.ndarray]:
        return self._global

    def _prepare_updates(self, replies: list[Message]) -> str | None:
        limit = self.clipping_norm * (1 + NORM_TOLERANCE)
        for m in replies:
            try:
                norm = update_norm(_to_numpy(m.content[self.strategy.arrayrecord_key]), self._global)
            except (KeyError, ValueError) as e:
                return (f"site {(declared_site_id(m) or f'node-{m.metadata.src_node_id}')} sent an update that does "
                        f"not match the global model ({e})")
            if norm > limit:
                return (f"site {(declared_site_id(m) or f'node-{m.metadata.src_node_id}')} sent an update of norm "
                        f"{norm:.4g} > clipping norm {self.clipping_norm:g}: it did not clip (does its run config say "
                        "central-dp.mode='client-fixed'?)")
        return None


def wrap_central_dp(strategy: Strategy, c: CentralDPConfig, min_sites: int,
                    on_round: RoundNote | None = None) -> Strategy:
    """Wrap ``strategy`` as ``c.mode`` asks ('none' returns it unchanged).

    The noise is calibrated for ``c.num_sites`` sites, or ``min_sites`` when 0.
    ``strategy`` must be a FedAvg/FedProx weighted by :data:`WEIGHT_KEY`
    (``build_strategy`` does that when central DP is on).
    """
    if c.mode == "none":
        return strategy
    if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
        raise ConfigError(
            f"central-dp.mode='{c.mode}' needs a strategy that averages the updates (fedavg or fedprox), "
            f"got {type(strategy).__name__}; use strategy 'fedavg' or set central-dp.mode='none'.")
    if strategy.weighted_by_key != WEIGHT_KEY:
        raise ConfigError(f"central DP needs the strategy weighted by '{WEIGHT_KEY}' (uniform mean), "
                          f"got '{strategy.weighted_by_key}'; build it with server.strategies.build_strategy.")
    account = CentralDPAccount(c.noise_multiplier, c.clipping_norm, c.num_sites or min_sites, c.delta)
    wrappers = {"server-fixed": ServerFixedClipping, "client-fixed": ClientFixedClipping}
    if c.mode not in wrappers:
        raise ConfigError(f"central-dp.mode: expected one of 'none', {', '.join(map(repr, wrappers))}; got {c.mode!r}.")
    return wrappers[c.mode](strategy, account, on_round)


def central_dp_summary(strategy: Strategy) -> dict[str, object]:
    """``{"central-dp": account}`` for summary.json when ``strategy`` is a central-DP wrapper, else ``{}``."""
    return {"central-dp": strategy.report()} if isinstance(strategy, _StrictCentralDP) else {}
