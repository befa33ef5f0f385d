"""A hospital's own rules for joining a run, from its node config: the server cannot override them.

Node-config keys (all optional):

``require-dp``
    ``true``: train only with DP-SGD (``dp.enabled``); a run without it is refused.
``max-epsilon``
    The site's own privacy budget across *all* runs (its state folder keeps
    every run's ledger): a round is refused when the epsilon this site has
    already spent in its other runs plus this run's epsilon after the round
    would exceed it. Runs compose by adding their epsilons (basic
    composition: conservative), each at its own delta. A budget implies DP:
    a non-private run spends an unbounded epsilon and is refused.
``min-sites-per-round``
    The fewest sites the run must aggregate per round (the run's
    ``min-sites``; the server refuses rounds with fewer valid replies), so
    that this hospital's update is never released nearly alone.
``allowed-tasks``
    Comma-separated task names this site joins (empty = any).
``role``
    ``train`` (default) or ``holdout``: a holdout site never trains; it only
    evaluates the global model on all its images (a hospital that tests the
    federation's model without contributing to it).

A refusal is a structured reply (Flower error code
:data:`shared.protocol.SITE_POLICY_ERROR_CODE`, a JSON reason naming the
rule), sent at the roll call before round 1 and again at any message that
breaks a rule. Framework-free.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import protocol
from shared.settings import RunConfig, SiteConfig

__all__ = [
    "HOLDOUT",
    "POLICY_REFUSAL_KIND",
    "ROLES",
    "TRAIN",
    "PolicyRefusal",
    "SitePolicy",
    "check_budget",
    "check_run",
    "epsilon_spent_elsewhere",
    "parse_policy_refusal",
    "policy_for",
]

logger = logging.getLogger(__name__)

TRAIN = "train"
HOLDOUT = "holdout"
ROLES = (TRAIN, HOLDOUT)
POLICY_REFUSAL_KIND = "site-policy"


@dataclass(frozen=True)
class SitePolicy:
    """A site's own rules (see the module docstring)."""

    require_dp: bool = False
    max_epsilon: float = 0.0
    min_sites_per_round: int = 0
    allowed_tasks: tuple[str, ...] = ()
    role: str = TRAIN

    @property
    def holdout(self) -> bool:
        """True when this site only evaluates."""
        return self.role == HOLDOUT

    def to_dict(self) -> dict[str, Any]:
        """What the site tells the server about its rules at the roll call (no paths)."""
        return {"require-dp": self.require_dp, "max-epsilon": self.max_epsilon,
                "min-sites-per-round": self.min_sites_per_round, "allowed-tasks": ",".join(self.allowed_tasks),
                "role": self.role}


def policy_for(site: SiteConfig, cfg: RunConfig) -> SitePolicy:
    """A site's policy from its node config; a simulated site is a holdout when it is one of the run's last
    ``holdout-sites`` partitions."""
    role = site.role
    if site.simulated and cfg.holdout_sites and site.partition_id is not None and site.num_partitions is not None:
        role = HOLDOUT if site.partition_id >= site.num_partitions - cfg.holdout_sites else TRAIN
    return SitePolicy(require_dp=site.require_dp, max_epsilon=site.max_epsilon,
                      min_sites_per_round=site.min_sites_per_round, allowed_tasks=site.allowed_tasks, role=role)


class PolicyRefusal(RuntimeError):
    """The site refuses (part of) a run under its own policy; ``str(exc)`` is the JSON reason sent to the server."""

    def __init__(self, site_id: str, rule: str, detail: str) -> None:
        self.info = {"kind": POLICY_REFUSAL_KIND, "site-id": site_id, "rule": rule, "detail": detail}
        super().__init__(json.dumps(self.info, sort_keys=True))


def parse_policy_refusal(reason: str | None) -> dict[str, Any] | None:
    """The refusal info in a Flower error reason, or None when it is not a policy refusal."""
    return protocol.structured_reason(reason, POLICY_REFUSAL_KIND)


def check_run(policy: SitePolicy, cfg: RunConfig, site_id: str) -> None:
    """Refuse a run whose settings break the site's static rules.

    Raises
    ------
    PolicyRefusal
        Naming the rule and what the run would have to change.
    """
    if policy.allowed_tasks and cfg.task not in policy.allowed_tasks:
        raise PolicyRefusal(site_id, "allowed-tasks",
                            f"this site joins only {', '.join(policy.allowed_tasks)}; the run's task is {cfg.task}")
    if (policy.require_dp or policy.max_epsilon > 0) and not cfg.dp.enabled and policy.role == TRAIN:
        rule = "require-dp" if policy.require_dp else "max-epsilon"
        raise PolicyRefusal(site_id, rule, "this site trains only with DP-SGD; the run has dp.enabled=false")
    if policy.min_sites_per_round and cfg.strategy.min_sites < policy.min_sites_per_round:
        raise PolicyRefusal(site_id, "min-sites-per-round",
                            f"this site needs every round aggregated over at least {policy.min_sites_per_round} "
                            f"sites; the run's min-sites is {cfg.strategy.min_sites}")


def epsilon_spent_elsewhere(ledger_dir: Path, run_key: str) -> float:
    """The sum of the final epsilons of this site's other runs (its ledgers under ``ledger_dir``).

    A ledger that cannot be read counts as an error, never as zero.
    """
    from shared.privacy.ledger import LedgerError, ledger_path

    own = ledger_path(Path("/"), "x", run_key).name  # the file name this run's ledger has
    total = 0.0
    if not ledger_dir.is_dir():
        return 0.0
    for path in sorted(ledger_dir.glob("run-*.json")):
        if path.name == own:
            continue
        try:
            entries = json.loads(path.read_text()).get("entries") or []
        except (OSError, ValueError) as exc:
            raise LedgerError(f"privacy ledger {path.name} of an earlier run cannot be read ({type(exc).__name__}); "
                              "the site's cross-run budget cannot be checked: restore the file") from None
        if entries:
            total += float(entries[-1]["epsilon"])
    return total


def check_budget(policy: SitePolicy, site_id: str, spent_elsewhere: float, epsilon_after: float) -> None:
    """Refuse a round that would take the site's spend over its own cross-run budget.

    Raises
    ------
    PolicyRefusal
        When ``spent_elsewhere + epsilon_after > policy.max_epsilon`` (with a budget set).
    """
    if policy.max_epsilon and spent_elsewhere + epsilon_after > policy.max_epsilon:
        raise PolicyRefusal(
            site_id, "max-epsilon",
            f"this round would bring the site's epsilon over all its runs to {spent_elsewhere + epsilon_after:.3f} "
            f"({spent_elsewhere:.3f} in earlier runs + {epsilon_after:.3f} in this one), over its own budget of "
            f"{policy.max_epsilon:g}")
