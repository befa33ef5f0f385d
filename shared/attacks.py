"""Simulated poisoning sites: a research option to test robust aggregation (simulation only).

With the run-config keys

``sim-attack``
    ``none`` (default), ``sign-flip``, ``scale``, ``noise`` or ``nan``;
``sim-attack-sites``
    how many simulated sites attack: the last K *training* partitions (those
    just before any ``holdout-sites``, which never train);
``sim-attack-scale``
    the attack's factor ``s`` (default 10),

a malicious simulated site trains honestly, then replaces what it sends.
With ``g`` the global model it received, ``w`` its honestly trained weights
and ``d = w - g`` its honest update (floating-point tensors; integer buffers
such as BatchNorm's ``num_batches_tracked`` are sent as trained):

* ``sign-flip``: ``g - s * d`` (the update reversed and amplified);
* ``scale``: ``g + s * d`` (the update amplified: model replacement);
* ``noise``: ``g + s * ||d|| * u``, ``u`` a random direction of unit norm
  over all floating-point tensors (seeded per site and round);
* ``nan``: every floating-point value NaN.

Its metrics (``num-examples``, loss, ...) stay honest: only the weights
lie. A real site (one whose node config sets ``data-path``) never attacks:
:func:`shared.config.for_site` resets these keys for it, whatever the run
config says, so the option cannot be turned on in a deployment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shared.config import SIM_ATTACKS, RunConfig, SiteConfig

__all__ = ["ATTACKS", "Attack", "attack_for", "poison"]

ATTACKS = SIM_ATTACKS


@dataclass(frozen=True)
class Attack:
    """What one malicious site does to its update."""

    kind: str
    scale: float


def attack_for(cfg: RunConfig, site: SiteConfig) -> Attack | None:
    """The attack this site runs, or None (an honest site, a real site, or no attack configured).

    The attackers are the simulated partitions ``[n - holdout - K, n - holdout)``
    with ``n`` partitions, ``holdout`` = ``holdout-sites`` and ``K`` =
    ``sim-attack-sites``.
    """
    if cfg.sim_attack == "none" or cfg.sim_attack_sites < 1 or not site.simulated:
        return None
    if site.partition_id is None or site.num_partitions is None:
        return None
    last_train = site.num_partitions - cfg.holdout_sites  # partitions >= this are holdout sites
    if last_train - cfg.sim_attack_sites <= site.partition_id < last_train:
        return Attack(cfg.sim_attack, cfg.sim_attack_scale)
    return None


def poison(attack: Attack, global_state: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
           seed: int) -> dict[str, torch.Tensor]:
    """The weights a malicious site sends instead of ``trained``.

    Parameters
    ----------
    attack:
        From :func:`attack_for`.
    global_state:
        The global model the site received this round.
    trained:
        Its honestly trained weights (same keys, shapes and dtypes).
    seed:
        Seeds the ``noise`` direction (the site's round seed).

    Returns
    -------
    dict
        Same keys, shapes and dtypes as ``trained``.
    """
    floats = [k for k, v in trained.items() if v.is_floating_point()]
    out = {k: v.clone() for k, v in trained.items()}
    if attack.kind == "nan":
        for k in floats:
            out[k] = torch.full_like(trained[k], math.nan)
        return out
    delta = {k: trained[k].double() - global_state[k].to(trained[k].device).double() for k in floats}
    if attack.kind == "sign-flip":
        new = {k: -attack.scale * d for k, d in delta.items()}
    elif attack.kind == "scale":
        new = {k: attack.scale * d for k, d in delta.items()}
    elif attack.kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        z = {k: torch.randn(d.shape, generator=gen, dtype=torch.float64) for k, d in delta.items()}
        z_norm = math.sqrt(sum(float((v**2).sum()) for v in z.values())) or 1.0
        d_norm = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
        new = {k: attack.scale * d_norm / z_norm * v for k, v in z.items()}
    else:
        raise ValueError(f"unknown attack {attack.kind!r}; expected one of {', '.join(ATTACKS)}")
    for k in floats:
        out[k] = (global_state[k].to(trained[k].device).double() + new[k]).to(trained[k].dtype)
    return out
