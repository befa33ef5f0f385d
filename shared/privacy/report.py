"""The federation's privacy statement, from what the sites report each round (no Flower)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from shared.privacy.accounting import PRIVACY_UNIT, UNIT_NOTE


def round_privacy(train_sites: Mapping[str, Mapping[str, Any]],
                  previous: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Per-site cumulative epsilon after a round and the federation's guarantee.

    ``previous`` holds each site's epsilon from earlier rounds: a site that did
    not train this round keeps what it had spent. The guarantee of the
    federation is the maximum over sites (each site protects its own images),
    stated at the largest delta any site used.
    """
    eps: dict[str, float] = dict(previous or {})
    deltas: list[float] = []
    noise: dict[str, float] = {}
    for site, m in train_sites.items():
        if "dp-epsilon" in m:
            eps[site] = float(m["dp-epsilon"])
            deltas.append(float(m["dp-delta"]))
            noise[site] = float(m["dp-noise-multiplier"])
    if not eps:
        return {}
    return {
        "epsilon": max(eps.values()),
        "delta": max(deltas) if deltas else math.nan,
        "unit": PRIVACY_UNIT,
        "per-site-epsilon": eps,
        "noise-multiplier": noise,
    }


def privacy_statement(last: Mapping[str, Any], refusals: Mapping[str, Any], accountant: str) -> dict[str, Any]:
    """The summary.json block: epsilon (max over sites), delta, unit and what it means."""
    if not last:
        return {}
    return {
        "mechanism": "DP-SGD at each site (Opacus), Poisson sampling",
        "accountant": accountant,
        "epsilon": last["epsilon"],
        "delta": last["delta"],
        "unit": last["unit"],
        "meaning": f"each site's training images are protected with (epsilon, delta) at most these values, {UNIT_NOTE}",
        "per-site-epsilon": last["per-site-epsilon"],
        "budget-refusals": dict(refusals),
    }
