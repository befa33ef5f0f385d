"""``medfed study privacy``: plan checks, reading runs back, summaries (fake runs), and one real tiny study."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shared.config import ConfigError
from shared.results import write_json
from simulation.cli import main as cli_main
from simulation.runner import SimulationError
from simulation.study import (
    StudyPlan,
    parse_epsilons,
    parse_seeds,
    read_run_metrics,
    run_overrides,
    run_study,
    validate_plan,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------


def test_parse_epsilons_and_seeds() -> None:
    assert parse_epsilons("inf, 8,3,1") == (math.inf, 8.0, 3.0, 1.0)
    assert parse_seeds("0,1,2") == (0, 1, 2)
    for bad in ("0", "-1", "abc", "nan", "8,8", ""):
        with pytest.raises(ConfigError, match="--epsilons"):
            parse_epsilons(bad)
    for bad in ("a", "-1", "1,1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_run_overrides_set_dp_per_epsilon_and_keep_user_keys(tmp_path: Path) -> None:
    plan = StudyPlan(out_dir=tmp_path, overrides={"lr": 0.01, "dp.max-grad-norm": 0.5})
    nodp = run_overrides(plan, math.inf, 1)
    assert nodp["dp.enabled"] is False and "dp.target-epsilon" not in nodp
    dp = run_overrides(plan, 3.0, 2)
    assert dp["dp.enabled"] is True and dp["dp.target-epsilon"] == 3.0 and dp["dp.noise-multiplier"] == 0.0
    for o, seed in ((nodp, 1), (dp, 2)):
        assert o["lr"] == 0.01 and o["dp.max-grad-norm"] == 0.5 and o["seed"] == seed
        assert o["results-dir"] == str(tmp_path / "runs")
    assert nodp["run-name"] != dp["run-name"]


def test_validate_plan_refuses_study_keys_and_bad_overrides(tmp_path: Path) -> None:
    assert validate_plan(StudyPlan(out_dir=tmp_path)) == "auroc"
    assert validate_plan(StudyPlan(out_dir=tmp_path, overrides={"task": "lung-seg"})) == "dice"
    with pytest.raises(ConfigError, match="--epsilons"):
        validate_plan(StudyPlan(out_dir=tmp_path, overrides={"dp.target-epsilon": 2.0}))
    with pytest.raises(ConfigError, match="--seeds"):
        validate_plan(StudyPlan(out_dir=tmp_path, overrides={"seed": 4}))
    with pytest.raises(ConfigError, match="unknown run config key 'lrr'"):
        validate_plan(StudyPlan(out_dir=tmp_path, overrides={"lrr": 0.1}))
    with pytest.raises(ConfigError, match="dp.max-epsilon"):  # a budget below a target epsilon fails before any run
        validate_plan(StudyPlan(out_dir=tmp_path, epsilons=(math.inf, 8.0), overrides={"dp.max-epsilon": 4.0}))
    with pytest.raises(ConfigError, match="--sites 3"):
        validate_plan(StudyPlan(out_dir=tmp_path, sites=2, overrides={"min-sites": 3}))
    (tmp_path / "runs" / "old").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds runs"):
        validate_plan(StudyPlan(out_dir=tmp_path))


# ---------------------------------------------------------------------------
# Fake runs: what the merged DP-SGD sites will report
# ---------------------------------------------------------------------------


def _write_fake_run(run_dir: Path, auroc: float, site_aurocs: list[float],
                    eps_by_round: list[list[float]] | None) -> None:
    run_dir.mkdir(parents=True)
    rounds = []
    for r, eps in enumerate(eps_by_round or [[]], 1):
        sites: dict[str, dict[str, Any]] = {}
        for i in range(len(site_aurocs)):
            sites[f"site-{i}"] = {"num-examples": 40}
            if eps_by_round is not None:
                sites[f"site-{i}"].update({"dp-epsilon": eps[i], "dp-delta": 1e-3 * (i + 1),
                                           "dp-noise-multiplier": 1.0 + i})
        rounds.append({"round": r, "train-sites": sites})
    write_json(run_dir / "metrics.json", {"rounds": rounds})
    write_json(run_dir / "summary.json", {
        "rounds": len(rounds), "final": {"auroc": auroc, "accuracy": auroc - 0.1},
        "final-per-site": {f"site-{i}": {"auroc": a} for i, a in enumerate(site_aurocs)},
    })


def test_read_run_metrics_takes_worst_case_dp_figures(tmp_path: Path) -> None:
    _write_fake_run(tmp_path / "dp", 0.8, [0.7, 0.9], [[1.0, 1.5], [2.0, 2.9]])
    m = read_run_metrics(tmp_path / "dp", "auroc")
    assert m["achieved-epsilon"] == 2.9 and m["delta"] == 2e-3 and m["noise-multiplier"] == 1.0
    assert m["rounds"] == 2 and m["auroc"] == 0.8 and m["accuracy"] == pytest.approx(0.7)
    assert m["worst-site-auroc"] == 0.7
    _write_fake_run(tmp_path / "nodp", 0.8, [0.7, 0.9], None)
    m = read_run_metrics(tmp_path / "nodp", "auroc")
    assert all(math.isnan(m[k]) for k in ("achieved-epsilon", "delta", "noise-multiplier"))


def test_study_with_fake_runs_aggregates_and_records_failures(tmp_path: Path) -> None:
    auroc = {(math.inf, 0): 0.90, (math.inf, 1): 0.86, (4.0, 0): 0.70, (4.0, 1): 0.74}
    calls: list[dict[str, Any]] = []

    def fake_simulate(overrides: dict[str, Any], *, sites: int, **_: Any) -> SimpleNamespace:
        calls.append(overrides)
        eps = overrides["dp.target-epsilon"] if overrides["dp.enabled"] else math.inf
        if eps == 1.0:
            raise SimulationError("the simulation did not finish (flwr exit code 1)")
        run_dir = Path(overrides["results-dir"]) / overrides["run-name"]
        a = auroc[(eps, overrides["seed"])]
        _write_fake_run(run_dir, a, [a - 0.05, a + 0.01], None if math.isinf(eps) else [[eps * 0.9, eps * 0.95]])
        return SimpleNamespace(run_dir=run_dir)

    lines: list[str] = []
    plan = StudyPlan(out_dir=tmp_path / "study", epsilons=(math.inf, 4.0, 1.0), seeds=(0, 1), sites=2, audit=False,
                     overrides={"lr": 0.005})
    result = run_study(plan, simulate_fn=fake_simulate, log=lines.append)

    assert len(calls) == 6 and all(c["lr"] == 0.005 for c in calls)
    assert sum("started" in s for s in lines) == 6 and sum("FAILED" in s for s in lines) == 2
    assert result.failed == 2
    rows = {r["epsilon-target"]: r for r in result.rows}
    assert list(rows) == ["inf", "4", "1"]
    assert rows["inf"]["auroc-mean"] == pytest.approx(0.88)
    assert rows["inf"]["auroc-std"] == pytest.approx(math.sqrt(2 * 0.02**2))  # sample std of 0.90, 0.86
    assert math.isnan(rows["inf"]["achieved-epsilon"])
    assert rows["4"]["achieved-epsilon"] == pytest.approx(3.8) and rows["4"]["worst-site-auroc"] == pytest.approx(0.65)
    assert rows["1"]["seeds-failed"] == 2 and math.isnan(rows["1"]["auroc-mean"])
    assert "2 FAILED" in result.table and "n/a" in result.table

    with open(result.files["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["epsilon-target"] for r in csv_rows] == ["inf", "4", "1"]
    assert float(csv_rows[1]["auroc-mean"]) == pytest.approx(0.72)
    with open(result.files["runs"]) as f:
        runs = list(csv.DictReader(f))
    assert [r["status"] for r in runs].count("failed") == 2
    assert "exit code 1" in next(r["error"] for r in runs if r["status"] == "failed")
    saved = json.loads(result.files["json"].read_text())
    assert saved["plan"]["epsilons"] == ["inf", "4", "1"] and len(saved["runs"]) == 6
    assert result.files["plot"].read_bytes()[:8] == PNG_MAGIC


def test_interrupted_privacy_study_writes_partial_outputs(tmp_path: Path) -> None:
    calls: list[str] = []

    def fake_simulate(overrides: dict[str, Any], *, sites: int, **_: Any) -> SimpleNamespace:
        calls.append(overrides["run-name"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        run_dir = Path(overrides["results-dir"]) / overrides["run-name"]
        _write_fake_run(run_dir, 0.8, [0.7, 0.9], None)
        return SimpleNamespace(run_dir=run_dir)

    plan = StudyPlan(out_dir=tmp_path / "study", epsilons=(math.inf, 4.0), seeds=(0,), sites=2, audit=False)
    with pytest.raises(KeyboardInterrupt):
        run_study(plan, simulate_fn=fake_simulate, log=lambda _: None)
    with open(tmp_path / "study" / "runs.csv") as f:
        assert [r["epsilon-target"] for r in csv.DictReader(f)] == ["inf"]
    saved = json.loads((tmp_path / "study" / "study.json").read_text())
    assert saved["complete"] is False and saved["rows"][0]["auroc-mean"] == pytest.approx(0.8)
    assert "PARTIAL" in (tmp_path / "study" / "study.md").read_text()


# ---------------------------------------------------------------------------
# A real tiny study (Flower simulation)
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_tiny_privacy_study_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    code = cli_main([
        "study", "privacy", "--epsilons", "inf,8", "--seeds", "0", "--sites", "2", "--rounds", "1",
        "--run-config", "phantom-count=100 image-size=28 model='small-cnn' batch-size=16",
        "--out", str(out), "--run-timeout", "300",
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| target eps |" in printed and printed.count("started") == 2

    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epsilon-target"] for r in rows] == ["inf", "8"]
    for r in rows:
        assert r["seeds-ok"] == "1" and r["seeds-failed"] == "0" and r["rounds"] == "1"
        assert 0.0 <= float(r["auroc-mean"]) <= 1.0 and 0.0 <= float(r["accuracy-mean"]) <= 1.0
        assert 0.0 <= float(r["worst-site-auroc"]) <= 1.0
        assert 0.0 <= float(r["mia-auc"]) <= 1.0 and 0.0 <= float(r["mia-tpr@1%fpr"]) <= 1.0
    nodp, dp = rows
    # no DP figures without DP; with DP-SGD the sites' ledgers report the spend, calibrated for the 1-round plan
    assert all(nodp[k] == "" for k in ("achieved-epsilon", "delta", "noise-multiplier"))
    assert 7.5 < float(dp["achieved-epsilon"]) <= 8.0
    assert 0.0 < float(dp["delta"]) < 0.1 and float(dp["noise-multiplier"]) > 0.0
    study = json.loads((out / "study.json").read_text())
    assert study["primary-metric"] == "auroc" and len(study["runs"]) == 2
    for run in study["runs"]:
        run_dir = Path(run["run-dir"])
        assert run["status"] == "ok" and run_dir.parent == out / "runs"
        assert (run_dir / "summary.json").is_file() and (run_dir / "model.pt").is_file()
        audit = json.loads((run_dir / "membership-audit.json").read_text())
        assert audit["sites"] == 2 and set(audit["per-site"]) == {"site-0", "site-1"}
        assert audit["pooled"]["n-members"] + audit["pooled"]["n-nonmembers"] == 100
        assert audit["pooled"]["auc"] == pytest.approx(run["mia-auc"])
    nodp_cfg = json.loads((out / "runs" / "eps-inf-seed-0" / "config.json").read_text())["run-config"]
    dp_cfg = json.loads((out / "runs" / "eps-8-seed-0" / "config.json").read_text())["run-config"]
    assert nodp_cfg["dp.enabled"] is False and dp_cfg["dp.enabled"] is True and dp_cfg["dp.target-epsilon"] == 8.0

    from PIL import Image

    with Image.open(out / "utility_vs_epsilon.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
