"""Benefit of joining: the arithmetic on hand-made results folders, and the checks that two runs are comparable."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from shared.config import parse_run_config
from shared.metrics.benefit import BenefitError, benefit_from_folders, benefit_of_joining, comparable_configs
from shared.results import RunFolder
from simulation.commands.simulate import benefit_lines

BASE = parse_run_config({"phantom-count": 90, "image-size": 32}).to_flat()


def _folder(path: Path, *, per_site: dict[str, float | None], baseline: str | None = None,
            config: dict[str, Any] | None = None, sites: int | None = 3, **summary: Any) -> Path:
    """A finished results folder written through RunFolder, with the given final figures."""
    folder = RunFolder(path)
    path.mkdir(parents=True)
    folder.write_config({**BASE, **(config or {})}, {"baseline": baseline} if baseline else {})
    folder.write_summary({"primary-metric": "auroc",
                          "final-per-site": {s: {"auroc": v, "num-examples": 10} for s, v in per_site.items()},
                          **summary})
    if sites is not None:
        folder.write_simulation(sites, 1)
    return path


def test_benefit_arithmetic_per_site_and_summaries() -> None:
    fed = {"final-per-site": {"site-0": {"auroc": 0.80}, "site-1": {"auroc": 0.60}, "site-2": {"auroc": 0.90},
                              "site-9": {"auroc": 0.5}},
           "final-test": {"auroc": 0.85}}
    local = {"final-per-site": {"site-0": {"auroc": 0.70}, "site-1": {"auroc": 0.65}, "site-2": {"auroc": None}},
             "final-test-per-site": {"site-0": {"auroc": 0.80}, "site-1": {"auroc": 0.90}, "site-2": {"auroc": 0.70}}}
    report = benefit_of_joining(fed, local, "auroc")

    val = report["validation"]
    assert val["sites"]["site-0"] == {"federated": 0.80, "local": 0.70, "benefit": pytest.approx(0.10)}
    assert val["sites"]["site-1"]["benefit"] == pytest.approx(-0.05)
    assert val["sites"]["site-2"]["benefit"] is None  # undefined locally (e.g. one class in its validation split)
    assert val["num-sites"] == 3 and val["num-sites-defined"] == 2 and val["gained"] == 1 and val["lost"] == 1
    assert val["min"] == pytest.approx(-0.05) and val["max"] == pytest.approx(0.10)
    assert val["median"] == pytest.approx(0.025) and val["mean"] == pytest.approx(0.025)

    test = report["test"]  # one federated figure against each site's own model on the same test set
    assert [test["sites"][s]["benefit"] for s in ("site-0", "site-1", "site-2")] == \
        [pytest.approx(0.05), pytest.approx(-0.05), pytest.approx(0.15)]
    assert test["min"] == pytest.approx(-0.05) and test["median"] == pytest.approx(0.05)
    assert test["max"] == pytest.approx(0.15) and test["gained"] == 2
    assert report["holdout"] is None  # neither run had holdout sites
    assert report["sites-only-federated"] == ["site-9"] and report["sites-only-local"] == []


def test_no_defined_benefit_gives_none_not_zero() -> None:
    report = benefit_of_joining({"final-per-site": {"a": {"auroc": math.nan}}},
                                {"final-per-site": {"a": {"auroc": 0.7}}}, "auroc")
    assert report["validation"]["num-sites-defined"] == 0
    assert all(report["validation"][k] is None for k in ("min", "median", "mean", "max"))


def test_holdout_benefit() -> None:
    report = benefit_of_joining(
        {"final-per-site": {"a": {"auroc": 0.8}}, "final-holdout": {"auroc": 0.75}},
        {"final-per-site": {"a": {"auroc": 0.7}}, "final-holdout-per-model": {"a": {"auroc": 0.55}}}, "auroc")
    assert report["holdout"]["sites"]["a"]["benefit"] == pytest.approx(0.20)


def test_benefit_from_folders_checks_what_is_compared(tmp_path: Path) -> None:
    fed = _folder(tmp_path / "fed", per_site={"site-0": 0.8, "site-1": 0.7, "site-2": 0.9},
                  config={"strategy": "fedprox", "proximal-mu": 0.1, "run-name": "fed"})
    local = _folder(tmp_path / "local", per_site={"site-0": 0.75, "site-1": 0.72, "site-2": 0.6}, baseline="local",
                    config={"run-name": "local"})
    report = benefit_from_folders(fed, local)  # strategy settings may differ: they are the federation's own
    assert report["metric"] == "auroc"
    assert report["validation"]["min"] == pytest.approx(-0.02) and report["validation"]["max"] == pytest.approx(0.30)
    assert report["federated-run"] == str(fed) and report["local-run"] == str(local)

    with pytest.raises(BenefitError, match="not a local-only baseline"):
        benefit_from_folders(fed, fed)
    with pytest.raises(BenefitError, match="itself a local-only baseline"):
        benefit_from_folders(local, local)
    other = _folder(tmp_path / "other", per_site={"site-0": 0.7}, baseline="local",
                    config={"partition": "dirichlet", "dirichlet-alpha": 0.1})
    with pytest.raises(BenefitError, match=r"dirichlet-alpha \(0\.5 vs 0\.1\), partition \('iid' vs 'dirichlet'\)"):
        benefit_from_folders(fed, other)
    four = _folder(tmp_path / "four", per_site={"site-0": 0.7}, baseline="local", sites=4)
    with pytest.raises(BenefitError, match="--sites 3"):
        benefit_from_folders(fed, four)
    (tmp_path / "unfinished").mkdir()
    RunFolder(tmp_path / "unfinished").write_config(BASE, {"baseline": "local"})
    with pytest.raises(BenefitError, match="did not finish"):
        benefit_from_folders(fed, tmp_path / "unfinished")


def test_comparable_configs_ignores_only_the_federations_own_keys() -> None:
    fed = {**BASE, "strategy": "qfedavg", "qfedavg.q": 0.5, "min-sites": 3, "validation.norm-z": 0.0,
           "round-timeout": 10.0, "results-dir": "/a", "run-name": "x"}
    assert comparable_configs(fed, BASE) == []
    assert comparable_configs({**BASE, "lr": 0.01, "seed": 2}, BASE) == ["lr", "seed"]
    assert comparable_configs({**BASE, "site-shift": True}, BASE) == ["site-shift"]


def test_benefit_lines_show_every_site_and_the_range() -> None:
    report = benefit_of_joining(
        {"final-per-site": {"site-0": {"auroc": 0.8}, "site-1": {"auroc": 0.6}}, "final-test": {"auroc": 0.7}},
        {"final-per-site": {"site-0": {"auroc": 0.7}, "site-1": {"auroc": 0.65}},
         "final-test-per-site": {"site-0": {"auroc": 0.6}, "site-1": {"auroc": 0.75}}}, "auroc")
    text = "\n".join(benefit_lines(report))
    assert "federated AUROC minus local-only AUROC" in text
    assert "site-0" in text and "+0.100" in text and "-0.050" in text
    assert "validation: min -0.050, median +0.025, max +0.100; 1 of 2 sites gained, 1 lost" in text
    assert "test: min -0.050, median +0.025, max +0.100" in text
