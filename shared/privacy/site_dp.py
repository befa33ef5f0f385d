"""DP-SGD bookkeeping at one site: settings, ledger, budget, per-round decision.

The site decides every round, before it touches an image:

1. the run's noise multiplier (given, or calibrated once from
   ``dp.target-epsilon`` over all planned rounds and pinned in the ledger);
2. how many Poisson-sampled steps this round takes (:func:`steps_in_round`
   of the site's own round count, so a restarted process carries on);
3. whether those steps would take the cumulative epsilon past
   ``dp.max-epsilon``: then it refuses with a :class:`BudgetRefusal`;
4. otherwise the round is written to the ledger, and only then trained.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import protocol
from shared.privacy.accounting import (
    PRIVACY_UNIT,
    default_delta,
    resolve_noise,
    sample_rate,
    steps_in_round,
)
from shared.privacy.ledger import PrivacyLedger, ledger_path
from shared.settings import DPConfig, RunConfig

logger = logging.getLogger(__name__)

# Flower error code of a site's structured "over budget" refusal (see shared.protocol).
DP_BUDGET_ERROR_CODE = protocol.DP_BUDGET_ERROR_CODE
REFUSAL_KIND = "dp-budget"


def state_root(state_dir: str = "") -> Path:
    """The site's persistent state folder.

    Node config ``state-dir``, ``$MEDFED_STATE_DIR`` or ``~/.local/state/medfed``.

    Unlike the image cache this folder must not be wiped: it holds the privacy ledger.
    """
    root = state_dir or os.environ.get("MEDFED_STATE_DIR") or "~/.local/state/medfed"
    return Path(root).expanduser()


@dataclass(frozen=True)
class SiteDPSettings:
    """The resolved DP-SGD settings of one site for one run."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    max_grad_norm: float
    max_epsilon: float | None
    dataset_size: int
    batch_size: int
    epochs_per_round: int
    planned_rounds: int
    target_epsilon: float | None

    def header(self) -> dict[str, Any]:
        """The settings a ledger pins for the whole run."""
        return {
            "accountant": self.accountant, "delta": self.delta, "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.sample_rate, "dataset-size": self.dataset_size, "batch-size": self.batch_size,
            "epochs-per-round": self.epochs_per_round, "planned-rounds": self.planned_rounds,
            "max-grad-norm": self.max_grad_norm, "target-epsilon": self.target_epsilon, "unit": PRIVACY_UNIT,
        }


@functools.lru_cache(maxsize=64)  # calibration is a bisection over the accountant: do it once per process
def resolve_settings(cfg: RunConfig, dataset_size: int) -> SiteDPSettings:
    """Resolve ``cfg.dp`` for a site with ``dataset_size`` training images."""
    dp: DPConfig = cfg.dp
    delta = dp.target_delta or default_delta(dataset_size)
    batch = min(cfg.train.batch_size, dataset_size)
    noise = resolve_noise(
        dataset_size=dataset_size, batch_size=batch, epochs_per_round=cfg.train.local_epochs,
        rounds=cfg.num_server_rounds, delta=delta,
        noise_multiplier=dp.noise_multiplier or None, target_epsilon=dp.target_epsilon or None,
        accountant=dp.accountant,
    )
    return SiteDPSettings(
        noise_multiplier=noise, sample_rate=sample_rate(dataset_size, batch), delta=delta,
        accountant=dp.accountant, max_grad_norm=dp.max_grad_norm, max_epsilon=dp.max_epsilon or None,
        dataset_size=dataset_size, batch_size=batch, epochs_per_round=cfg.train.local_epochs,
        planned_rounds=cfg.num_server_rounds, target_epsilon=dp.target_epsilon or None,
    )


class BudgetRefusal(RuntimeError):
    """The site refuses a round that would take it past ``dp.max-epsilon``.

    ``str(exc)`` is a JSON object (kind, site id, round, epsilon spent, epsilon
    the round would reach, budget, delta): the structured reason sent to the server.
    """

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        super().__init__(json.dumps(info, sort_keys=True))


def parse_refusal(reason: str | None) -> dict[str, Any] | None:
    """The refusal info in a Flower error reason, or None if it is not a budget refusal."""
    return protocol.structured_reason(reason, REFUSAL_KIND)


@dataclass(frozen=True)
class DPRound:
    """What a site will do in one round: the DP-SGD steps and the resulting spend."""

    server_round: int
    site_round: int
    steps: int
    epsilon_before: float
    epsilon_after: float
    settings: SiteDPSettings

    def metrics(self) -> dict[str, float | int]:
        """The numbers the site reports with its update (no paths, no data)."""
        s = self.settings
        return {
            "dp-epsilon": self.epsilon_after, "dp-delta": s.delta, "dp-noise-multiplier": s.noise_multiplier,
            "dp-sample-rate": s.sample_rate, "dp-steps": self.steps, "dp-site-rounds": self.site_round,
            "dp-max-grad-norm": s.max_grad_norm,
            **({"dp-max-epsilon": s.max_epsilon} if s.max_epsilon is not None else {}),
        }


def open_ledger(cfg: RunConfig, site_id: str, state_dir: str, run_key: str,
                dataset_size: int) -> tuple[PrivacyLedger, SiteDPSettings]:
    """This site's ledger for the run, created on first use; settings pinned in its header."""
    settings = resolve_settings(cfg, dataset_size)
    path = ledger_path(state_root(state_dir), site_id, run_key)
    return PrivacyLedger.open(path, settings.header()), settings


def begin_round(ledger: PrivacyLedger, settings: SiteDPSettings, server_round: int, site_id: str,
                check: Callable[[float], None] | None = None) -> DPRound:
    """Decide and record this round's DP-SGD steps, or raise :class:`BudgetRefusal`.

    ``check(epsilon_after)`` may refuse too (the site's own cross-run budget,
    :func:`shared.site_policy.check_budget`), before anything is recorded.
    The ledger entry is saved before training starts.
    """
    site_round = ledger.rounds_trained + 1
    steps = steps_in_round(site_round, settings.dataset_size, settings.batch_size, settings.epochs_per_round)
    step = (settings.noise_multiplier, settings.sample_rate, steps)
    before = ledger.last_epsilon
    after = ledger.epsilon_with(step, settings.delta, settings.accountant)
    if settings.max_epsilon is not None and after > settings.max_epsilon:
        info = {
            "kind": REFUSAL_KIND, "site-id": site_id, "server-round": int(server_round),
            "site-rounds-trained": ledger.rounds_trained, "epsilon-spent": round(before, 6),
            "epsilon-if-trained": round(after, 6), "max-epsilon": settings.max_epsilon,
            "delta": settings.delta, "unit": PRIVACY_UNIT,
        }
        logger.warning("site %s refuses round %d: epsilon would reach %.3f > budget %.3f (spent %.3f, delta %.2g)",
                       site_id, server_round, after, settings.max_epsilon, before, settings.delta)
        raise BudgetRefusal(info)
    if check is not None:
        check(after)
    ledger.record(server_round, step, after)
    return DPRound(int(server_round), site_round, steps, before, after, settings)
