"""Benefit of joining: what the federation buys each site, against that site training alone.

For every site the federated run's final primary metric (AUROC, or Dice for
segmentation) minus the same site's local-only figure (``medfed simulate
--baseline local`` with the same run config): positive = the site gains by
joining. Three comparisons, each only where both runs report it:

* ``validation``: each site's own validation split, scored by the federated
  model (``summary.json`` ``final-per-site``; with FedBN the site's own
  normalisation layers) and by the site's local model;
* ``test``: the server's test set (``test-path``): the one federated figure
  (``final-test``) against each site's local model on the same images
  (``final-test-per-site`` of the local-only run); with FedBN the server's
  global model keeps its initial normalisation layers (the sites keep
  theirs), so its test figure understates what a site gets;
* ``holdout``: the holdout sites pooled (``final-holdout`` against
  ``final-holdout-per-model``).

Each comparison lists the sites (federated, local, benefit) and the min,
median, mean and max benefit over the sites where both figures are defined
(AUROC is undefined at a site whose validation split holds one class), with
how many sites gained and lost. The figures are final-round values of one
seed: the spread over seeds is the study's to show
(``medfed study heterogeneity``).

:func:`benefit_of_joining` is the arithmetic on two ``summary.json`` dicts;
:func:`benefit_from_folders` reads two results folders and refuses runs
that differ in anything but the federation's own settings
(:data:`FEDERATION_ONLY_KEYS` and the strategy keys), so that the
difference is the federation's and nothing else.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.errors import UserError

__all__ = [
    "BASELINE_FIELD",
    "FEDERATION_ONLY_KEYS",
    "BenefitError",
    "benefit_from_folders",
    "benefit_of_joining",
    "comparable_configs",
]

BASELINE_FIELD = "baseline"
"""Top-level field of a baseline run's ``config.json`` (``"local"`` or ``"pooled"``); absent in federated runs."""

FEDERATION_ONLY_KEYS = frozenset({
    "proximal-mu", "run-name", "results-dir", "resume-from", "round-timeout", "site-registry",
    "sim-explain-dir", "sim-explain-samples",
})
"""Run-config keys (besides the ``strategy`` and ``validation`` sections) that may differ between a federated
run and its baseline: they change how the federation aggregates, waits or writes, not what a site trains on."""


class BenefitError(UserError):
    """Two results folders cannot be compared (not a federated run and its local-only baseline)."""


def _value(metrics: Mapping[str, Any] | None, metric: str) -> float:
    v = (metrics or {}).get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _stats(rows: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Per-site rows and min/median/mean/max of the benefits that are defined."""
    benefits = [r["benefit"] for r in rows.values() if not math.isnan(r["benefit"])]
    out: dict[str, Any] = {
        "sites": {s: {k: (None if math.isnan(v) else v) for k, v in r.items()} for s, r in sorted(rows.items())},
        "num-sites": len(rows),
        "num-sites-defined": len(benefits),
        "gained": sum(1 for b in benefits if b > 0),
        "lost": sum(1 for b in benefits if b < 0),
    }
    if benefits:
        out.update({"min": min(benefits), "median": statistics.median(benefits),
                    "mean": statistics.fmean(benefits), "max": max(benefits)})
    else:
        out.update({"min": None, "median": None, "mean": None, "max": None})
    return out


def benefit_of_joining(federated: Mapping[str, Any], local: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """Each site's federated ``metric`` minus its local-only ``metric``, from two ``summary.json`` dicts.

    Parameters
    ----------
    federated : mapping
        ``summary.json`` of the federated run (``final-per-site``, and
        ``final-test`` / ``final-holdout`` when it had a test set / holdout sites).
    local : mapping
        ``summary.json`` of its local-only baseline (``final-per-site``,
        ``final-test-per-site``, ``final-holdout-per-model``).
    metric : str
        The task's primary metric (higher is better).

    Returns
    -------
    dict
        ``metric``; ``validation`` (always), ``test`` and ``holdout`` (None
        when either run lacks them): each ``{"sites": {site: {"federated",
        "local", "benefit"}}, "num-sites", "num-sites-defined", "gained",
        "lost", "min", "median", "mean", "max"}`` (None where undefined);
        ``sites-only-federated`` and ``sites-only-local``: sites one run
        evaluated and the other did not (left out of the comparison).
    """
    fed_sites = dict(federated.get("final-per-site") or {})
    loc_sites = dict(local.get("final-per-site") or {})
    common = sorted(set(fed_sites) & set(loc_sites))

    def compare(fed_of: Any, loc_of: Mapping[str, Any]) -> dict[str, Any]:
        rows = {}
        for site in common:
            f, lo = fed_of(site), _value(loc_of.get(site), metric)
            rows[site] = {"federated": f, "local": lo, "benefit": f - lo}
        return _stats(rows)

    out: dict[str, Any] = {
        "metric": metric,
        "validation": compare(lambda s: _value(fed_sites[s], metric), loc_sites),
        "test": None,
        "holdout": None,
        "sites-only-federated": sorted(set(fed_sites) - set(loc_sites)),
        "sites-only-local": sorted(set(loc_sites) - set(fed_sites)),
    }
    test_local = local.get("final-test-per-site") or {}
    if federated.get("final-test") and test_local:
        fed_test = _value(federated["final-test"], metric)
        out["test"] = compare(lambda s: fed_test, test_local)
    hold_local = local.get("final-holdout-per-model") or {}
    if federated.get("final-holdout") and hold_local:
        fed_hold = _value(federated["final-holdout"], metric)
        out["holdout"] = compare(lambda s: fed_hold, hold_local)
    return out


def comparable_configs(federated: Mapping[str, Any], local: Mapping[str, Any]) -> list[str]:
    """Run-config keys whose values differ between the two runs and matter (sorted); ``[]`` = comparable.

    Keys of the ``strategy`` and ``validation`` sections and
    :data:`FEDERATION_ONLY_KEYS` are ignored: they are the federation's own.
    A key only one run records (another medfed version) is ignored too.
    """
    from shared.settings import RUN_KEYS  # lazy: keep this module's import tiny

    ignored = set(FEDERATION_ONLY_KEYS) | {k for k, s in RUN_KEYS.items() if s.section in ("strategy", "validation")}
    return sorted(k for k in set(federated) & set(local) if k not in ignored and federated[k] != local[k])


def benefit_from_folders(federated_dir: Path, local_dir: Path) -> dict[str, Any]:
    """:func:`benefit_of_joining` of a federated run's results folder and its local-only baseline's.

    Raises
    ------
    BenefitError
        When ``local_dir`` is not a local-only baseline, ``federated_dir`` is
        one, either run did not finish, they simulated different numbers of
        sites, or their run configs differ in a key that changes what the
        sites train on (the message names the keys and values).
    """
    from shared.results import RunFolder, RunFolderError

    try:
        fed, loc = RunFolder.open(Path(federated_dir)), RunFolder.open(Path(local_dir))
        fed_summary, loc_summary = fed.read_summary(), loc.read_summary()
    except RunFolderError as exc:
        raise BenefitError(f"cannot compare: {exc}") from None
    if loc.read_config().get(BASELINE_FIELD) != "local":
        raise BenefitError(f"'{loc.path}' is not a local-only baseline (its config.json has no baseline='local'); "
                           "make one with 'medfed simulate --baseline local' and the federated run's settings.")
    if fed.read_config().get(BASELINE_FIELD) == "local":
        raise BenefitError(f"'{fed.path}' is itself a local-only baseline: give the federated run's folder.")
    fed_cfg, loc_cfg = fed.run_config(), loc.run_config()
    differ = comparable_configs(fed_cfg, loc_cfg)
    if differ:
        shown = ", ".join(f"{k} ({fed_cfg[k]!r} vs {loc_cfg[k]!r})" for k in differ[:6])
        raise BenefitError(f"the federated run and the local-only baseline differ in {shown}: run the baseline with "
                           "the federated run's settings (only strategy options may differ).")
    fed_n, loc_n = fed.read_simulation().get("sites"), loc.read_simulation().get("sites")
    if isinstance(fed_n, int) and isinstance(loc_n, int) and fed_n != loc_n:
        raise BenefitError(f"the federated run simulated {fed_n} sites and the baseline {loc_n}: use --sites {fed_n}.")
    metric = str(fed_summary.get("primary-metric") or loc_summary.get("primary-metric") or "auroc")
    report = benefit_of_joining(fed_summary, loc_summary, metric)
    report.update({"federated-run": str(fed.path), "local-run": str(loc.path)})
    return report
