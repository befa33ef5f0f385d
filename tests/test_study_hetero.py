"""``medfed study heterogeneity``: settings syntax, plan checks, summaries and plots (fake runs), a real tiny study."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shared.config import ConfigError
from shared.metrics.fairness import across_sites_from_metrics
from shared.results import RunFolder
from simulation.cli import main as cli_main
from simulation.runner import SimulationError
from simulation.study_hetero import (
    HeteroPlan,
    Setting,
    parse_baselines,
    parse_settings,
    parse_strategies,
    run_heterogeneity,
    run_overrides,
    validate_plan,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"phantom-count": 90, "image-size": 32, "num-server-rounds": 1}


# ---------------------------------------------------------------------------
# Syntax
# ---------------------------------------------------------------------------


def test_parse_settings_presets_overrides_and_strategy_limits() -> None:
    got = parse_settings("iid; dirichlet-0.1=partition='dirichlet' dirichlet-alpha=0.1 ;shift=site-shift=true;"
                         "pathological-1;quantity@fedavg,fedbn;d2@fedprox=partition='dirichlet'")
    assert [s.name for s in got] == ["iid", "dirichlet-0.1", "shift", "pathological-1", "quantity", "d2"]
    assert got[0].overrides == {"partition": "iid"} and got[0].strategies is None
    assert got[1].overrides == {"partition": "dirichlet", "dirichlet-alpha": 0.1}
    assert got[2].overrides == {"site-shift": True}
    assert got[3].overrides == {"partition": "pathological", "classes-per-site": 1}
    assert got[4].overrides == {"partition": "quantity"} and got[4].strategies == ("fedavg", "fedbn")
    assert got[5].strategies == ("fedprox",) and got[5].overrides == {"partition": "dirichlet"}
    assert parse_settings("dirichlet-0.3")[0].overrides == {"partition": "dirichlet", "dirichlet-alpha": 0.3}


@pytest.mark.parametrize(("text", "message"), [
    ("", "at least one setting"),
    (" ; ", "at least one setting"),
    ("skewed", "not a built-in setting"),
    ("a b=partition='iid'", "setting name 'a b'"),
    ("iid;iid", "listed twice"),
    ("x=", "has '=' but no overrides"),
    ("x=seed=3", "sets 'seed' for every run itself; remove it from setting 'x' and use --seeds"),
    ("x=strategy='fedprox'", "use --strategies"),
    ("iid@", "expected strategy names after '@'"),
    ("x=partition", "expected key=value"),
])
def test_parse_settings_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_settings(text)


def test_parse_strategies_options_and_defaults() -> None:
    got = parse_strategies("fedavg, fedprox , qfedavg(qfedavg.q=0.5 lr=0.01),fedbn")
    assert [s.name for s in got] == ["fedavg", "fedprox", "qfedavg", "fedbn"]
    assert got[1].defaults == {"proximal-mu": 0.01} and got[1].options == {}
    assert got[2].options == {"qfedavg.q": 0.5, "lr": 0.01}
    assert parse_strategies("fedprox(proximal-mu=0.2)")[0].options == {"proximal-mu": 0.2}
    for text, message in (("fedavgg", "Did you mean 'fedavg'"), ("fedavg,fedavg", "listed twice"), ("", "at least one"),
                          ("fedavg(seed=1)", "use --seeds"), ("fed avg", "cannot read"), ("fedavg)", "cannot read")):
        with pytest.raises(ConfigError, match=message):
            parse_strategies(text)
    assert parse_baselines("local,pooled") == ("local", "pooled") and parse_baselines("none") == ()
    with pytest.raises(ConfigError, match="--baselines"):
        parse_baselines("central")


def _plan(tmp: Path, **kw: Any) -> HeteroPlan:
    values: dict[str, Any] = {"out_dir": tmp / "study", "settings": parse_settings("iid;shift"),
                              "strategies": parse_strategies("fedavg,fedprox"), "seeds": (0,), "sites": 3,
                              "overrides": dict(TINY)}
    values.update(kw)
    return HeteroPlan(**values)


def test_run_overrides_merge_user_setting_and_strategy(tmp_path: Path) -> None:
    plan = _plan(tmp_path, seeds=(0, 4))
    shift = plan.settings[1]
    fedprox = run_overrides(plan, shift, 4, "fedprox")
    assert fedprox["site-shift"] is True and fedprox["strategy"] == "fedprox" and fedprox["proximal-mu"] == 0.01
    assert fedprox["seed"] == 4 and fedprox["phantom-count"] == 90
    assert fedprox["results-dir"] == str(tmp_path / "study" / "runs") and fedprox["run-name"] == "shift-seed-4-fedprox"
    local = run_overrides(plan, shift, 4, "local")
    assert "strategy" not in local and "proximal-mu" not in local and local["site-shift"] is True
    user_mu = _plan(tmp_path, overrides={**TINY, "proximal-mu": 0.3})  # a default never overrides the user
    assert run_overrides(user_mu, shift, 0, "fedprox")["proximal-mu"] == 0.3
    assert [r[2] for r in plan.runs()[:3]] == ["local", "pooled", "fedavg"]  # baselines first: benefit needs them
    assert len(plan.runs()) == 2 * 2 * 4


def test_validate_plan_checks_every_run_before_any_starts(tmp_path: Path) -> None:
    assert validate_plan(_plan(tmp_path)) == "auroc"
    with pytest.raises(ConfigError, match="use --seeds"):
        validate_plan(_plan(tmp_path, overrides={**TINY, "seed": 1}))
    with pytest.raises(ConfigError, match="'partition' is set both in --run-config and in setting 'iid'"):
        validate_plan(_plan(tmp_path, overrides={**TINY, "partition": "quantity"}))
    with pytest.raises(ConfigError, match="'site-shift' is set both in setting 'shift' and in the options of strategy"):
        validate_plan(_plan(tmp_path, strategies=parse_strategies("fedavg(site-shift=false)")))
    with pytest.raises(ConfigError, match="names fedbn after '@'"):
        validate_plan(_plan(tmp_path, settings=parse_settings("iid@fedbn")))
    with pytest.raises(ConfigError, match="setting 'bad', local-only: .*classes-per-site"):
        validate_plan(_plan(tmp_path, settings=parse_settings("iid;bad=partition='pathological' classes-per-site=5")))
    with pytest.raises(ConfigError, match="setting 'iid', fedprox: .*proximal-mu"):
        validate_plan(_plan(tmp_path, strategies=parse_strategies("fedprox(proximal-mu=0)")))
    with pytest.raises(ConfigError, match="setting 'iid', local-only: --baseline trains without DP-SGD"):
        validate_plan(_plan(tmp_path, overrides={**TINY, "dp.enabled": True, "dp.target-epsilon": 8.0}))
    with pytest.raises(ConfigError, match="--sites 3"):
        validate_plan(_plan(tmp_path, sites=2, overrides={**TINY, "min-sites": 3}))
    with pytest.raises(ConfigError, match="different tasks"):
        validate_plan(_plan(tmp_path, settings=(Setting("a", {"task": "nec-axr"}), Setting("b", {}))))
    with pytest.raises(ConfigError, match="data-path"):
        validate_plan(_plan(tmp_path, overrides={**TINY, "data-path": str(tmp_path / "missing")}))
    (tmp_path / "study" / "runs" / "old").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds runs"):
        validate_plan(_plan(tmp_path))


def test_cli_plan_errors_exit_2_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["study", "heterogeneity", "--settings", "iid;nonsense", "--out", str(tmp_path / "s")])
    assert code == 2 and "not a built-in setting" in capsys.readouterr().err
    code = cli_main(["study", "heterogeneity", "--strategies", "fedavg,krumm", "--out", str(tmp_path / "s")])
    assert code == 2 and "Did you mean 'krum'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------
# Fake runs
# ---------------------------------------------------------------------------

# (setting, arm) -> validation AUROC per site; test AUROC (one figure, or per site for local)
FAKE: dict[tuple[str, str], dict[str, Any]] = {
    ("iid", "local"): {"sites": [0.70, 0.72, 0.68], "test": [0.70, 0.71, 0.69]},
    ("iid", "pooled"): {"sites": [0.90, 0.91, 0.89], "test": 0.90},
    ("iid", "fedavg"): {"sites": [0.88, 0.87, 0.86], "test": 0.88},
    ("iid", "fedprox"): {"sites": [0.85, 0.86, 0.84], "test": 0.86},
    ("shift", "local"): {"sites": [0.80, 0.60, 0.50], "test": [0.75, 0.60, 0.55]},
    ("shift", "pooled"): {"sites": [0.85, 0.80, 0.70], "test": 0.82},
    ("shift", "fedavg"): {"sites": [0.82, 0.70, 0.65], "test": 0.78},
}


def _fake_folder(overrides: dict[str, Any], arm: str, sites: int, seed_shift: float) -> Path:
    from shared.config import parse_run_config

    run_dir = Path(overrides["results-dir"]) / overrides["run-name"]
    setting = overrides["run-name"].split("-seed-")[0]
    fig = FAKE[(setting, arm)]
    per_site = {f"site-{i}": {"auroc": v + seed_shift, "num-examples": 10} for i, v in enumerate(fig["sites"])}
    pooled = {"auroc": sum(fig["sites"]) / 3 + seed_shift, "accuracy": 0.7}
    folder = RunFolder(run_dir)
    run_dir.mkdir(parents=True)
    folder.write_config(parse_run_config(overrides).to_flat(), {"baseline": arm} if arm in ("local", "pooled") else {})
    summary: dict[str, Any] = {"rounds": 1, "primary-metric": "auroc", "final": pooled, "final-per-site": per_site,
                               "fairness": {"sites": across_sites_from_metrics(pooled, per_site, "auroc")}}
    if arm == "local":
        summary["final-test-per-site"] = {f"site-{i}": {"auroc": v + seed_shift} for i, v in enumerate(fig["test"])}
    else:
        summary["final-test"] = {"auroc": fig["test"] + seed_shift}
    folder.write_summary(summary)
    folder.write_simulation(sites, 1)
    return run_dir


def _fakes(fail: set[tuple[str, str]] | None = None, interrupt_at: int | None = None) -> tuple[Any, Any, list[str]]:
    calls: list[str] = []

    def maybe_fail(overrides: dict[str, Any], arm: str) -> None:
        calls.append(overrides["run-name"])
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        if (overrides["run-name"].split("-seed-")[0], arm) in (fail or set()):
            raise SimulationError("the simulation did not finish (flwr exit code 1)")

    def simulate(overrides: dict[str, Any], *, sites: int, **_: Any) -> SimpleNamespace:
        maybe_fail(overrides, overrides["strategy"])
        return SimpleNamespace(run_dir=_fake_folder(overrides, overrides["strategy"], sites, overrides["seed"] * 0.01))

    def baseline(overrides: dict[str, Any], kind: str, *, sites: int, **_: Any) -> SimpleNamespace:
        maybe_fail(overrides, kind)
        return SimpleNamespace(run_dir=_fake_folder(overrides, kind, sites, overrides["seed"] * 0.01))

    return simulate, baseline, calls


def test_study_with_fake_runs_summarizes_compares_and_plots(tmp_path: Path) -> None:
    simulate, baseline, calls = _fakes(fail={("iid", "fedprox")})
    plan = _plan(tmp_path, settings=parse_settings("iid;shift@fedavg"), seeds=(0, 1))
    lines: list[str] = []
    result = run_heterogeneity(plan, simulate_fn=simulate, baseline_fn=baseline, log=lines.append)

    assert len(calls) == 2 * 4 + 2 * 3  # iid: 2 baselines + 2 strategies; shift: 2 baselines + fedavg; x 2 seeds
    assert sum("started" in s for s in lines) == 14 and sum("FAILED" in s for s in lines) == 2
    assert result.failed == 2
    rows = {(r["setting"], r["arm"]): r for r in result.rows}
    assert list(rows) == [("iid", "local-only"), ("iid", "pooled"), ("iid", "fedavg"), ("iid", "fedprox"),
                          ("shift", "local-only"), ("shift", "pooled"), ("shift", "fedavg")]
    fedavg = rows[("shift", "fedavg")]
    assert fedavg["auroc-mean"] == pytest.approx((0.82 + 0.70 + 0.65) / 3 + 0.005)  # seeds shift by 0 and 0.01
    assert fedavg["auroc-std"] == pytest.approx(math.sqrt(2 * 0.005**2))
    assert fedavg["worst-site-auroc-mean"] == pytest.approx(0.655) and fedavg["test-auroc-mean"] == pytest.approx(0.785)
    assert fedavg["site-mean-auroc-mean"] == pytest.approx((0.82 + 0.70 + 0.65) / 3 + 0.005)
    # benefit = federated - local-only per site (same seed): 0.02, 0.10, 0.15 for both seeds
    assert fedavg["benefit-min"] == pytest.approx(0.02) and fedavg["benefit-max"] == pytest.approx(0.15)
    assert fedavg["benefit-median"] == pytest.approx(0.10) and fedavg["benefit-gained"] == 1.0
    # test: 0.78 - (0.75, 0.60, 0.55)
    assert fedavg["test-benefit-min"] == pytest.approx(0.03) and fedavg["test-benefit-max"] == pytest.approx(0.23)
    local = rows[("shift", "local-only")]
    assert local["test-auroc-mean"] == pytest.approx((0.75 + 0.60 + 0.55) / 3 + 0.005)  # mean over own models
    assert math.isnan(local["benefit-median"])
    assert math.isnan(local["auroc-mean"])  # no single model: no pooled validation figure
    assert local["site-mean-auroc-mean"] == pytest.approx((0.80 + 0.60 + 0.50) / 3 + 0.005)
    assert rows[("iid", "fedprox")]["seeds-failed"] == 2 and math.isnan(rows[("iid", "fedprox")]["auroc-mean"])
    assert 0.99 < rows[("iid", "fedavg")]["jain-index-mean"] <= 1.0
    assert "2 FAILED" in result.table and "+0.020 / +0.100 / +0.150" in result.table

    with open(result.files["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["setting"], r["arm"]) for r in csv_rows] == list(rows)
    with open(result.files["runs"]) as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 14 and [r["status"] for r in runs].count("failed") == 2
    assert "exit code 1" in next(r["error"] for r in runs if r["status"] == "failed")
    saved = json.loads(result.files["json"].read_text())
    assert saved["complete"] is True and saved["study"] == "heterogeneity"
    assert saved["plan"]["settings"][1] == {"name": "shift", "overrides": {"site-shift": True},
                                            "strategies": ["fedavg"]}
    per_site = [b for b in saved["benefit-per-site"] if b["setting"] == "shift" and b["seed"] == 1]
    assert per_site[0]["validation"]["site-2"] == pytest.approx(0.15)
    assert (Path(runs[2]["run-dir"]) / RunFolder.BENEFIT).is_file()  # iid seed 0 fedavg: its comparison is kept
    for key in ("plot-utility", "plot-worst-site", "plot-fairness", "plot-benefit"):
        assert result.files[key].read_bytes()[:8] == PNG_MAGIC


def test_failed_local_baseline_leaves_no_benefit_but_runs_go_on(tmp_path: Path) -> None:
    simulate, baseline, _ = _fakes(fail={("iid", "local")})
    plan = _plan(tmp_path, settings=parse_settings("iid"), strategies=parse_strategies("fedavg"))
    result = run_heterogeneity(plan, simulate_fn=simulate, baseline_fn=baseline, log=lambda _: None)
    rows = {r["arm"]: r for r in result.rows}
    assert rows["local-only"]["seeds-failed"] == 1 and rows["fedavg"]["seeds-ok"] == 1
    assert math.isnan(rows["fedavg"]["benefit-median"]) and result.failed == 1


def test_benefit_error_is_a_soft_failure(tmp_path: Path) -> None:
    simulate, baseline, _ = _fakes()

    def other_lr(overrides: dict[str, Any], kind: str, **kw: Any) -> Any:  # a baseline with other settings
        return baseline({**overrides, "lr": 0.5}, kind, **kw)

    plan = _plan(tmp_path, settings=parse_settings("iid"), strategies=parse_strategies("fedavg"))
    result = run_heterogeneity(plan, simulate_fn=simulate, baseline_fn=other_lr, log=lambda _: None)
    fed = next(o for o in result.outcomes if o.key[2] == "fedavg")
    assert fed.ok and "lr" in fed.notes["benefit-error"] and result.failed == 1


def test_interrupted_study_writes_partial_outputs(tmp_path: Path) -> None:
    simulate, baseline, calls = _fakes(interrupt_at=4)
    plan = _plan(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_heterogeneity(plan, simulate_fn=simulate, baseline_fn=baseline, log=lambda _: None)
    out = tmp_path / "study"
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(calls) == 4 and [r["arm"] for r in runs] == ["local-only", "pooled", "fedavg"]
    saved = json.loads((out / "study.json").read_text())
    assert saved["complete"] is False and len(saved["runs"]) == 3
    assert "PARTIAL: the study was interrupted after 3 of 8 runs" in (out / "study.md").read_text()
    with open(out / "study.csv") as f:
        fedavg = next(r for r in csv.DictReader(f) if r["setting"] == "iid" and r["arm"] == "fedavg")
    assert fedavg["seeds-ok"] == "1" and float(fedavg["benefit-max"]) == pytest.approx(0.18)
    assert (out / "utility_vs_heterogeneity.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------
# A real tiny study: 2 settings x 1 strategy (FedBN: the one with site-local state) x 1 seed + both baselines
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_tiny_heterogeneity_study_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    code = cli_main([
        "study", "heterogeneity", "--settings", "iid;shift=site-shift=true", "--strategies", "fedbn",
        "--seeds", "0", "--sites", "3", "--rounds", "1",
        "--run-config", "phantom-count=120 image-size=32 model='small-cnn' batch-size=16 min-train-images=0 "
                        "min-val-images=0",
        "--out", str(out), "--run-timeout", "300",
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.count("started") == 6 and "| setting | arm |" in printed
    assert "[round 1/1] local-only" in printed and "[round 1/1] pooled" in printed

    study = json.loads((out / "study.json").read_text())
    assert study["complete"] is True and all(r["status"] == "ok" for r in study["runs"])
    runs = {(r["setting"], r["arm"]): Path(r["run-dir"]) for r in study["runs"]}
    assert set(runs) == {(s, a) for s in ("iid", "shift") for a in ("local-only", "pooled", "fedbn")}
    for (setting, arm), run_dir in runs.items():
        folder = RunFolder(run_dir)
        cfg = folder.run_config()
        assert cfg["site-shift"] is (setting == "shift") and cfg["seed"] == 0
        assert folder.read_config().get("baseline") == {"local-only": "local", "pooled": "pooled"}.get(arm)
        assert folder.model_path.is_file() is (arm != "local-only")
        assert set(folder.read_summary()["final-per-site"]) == {"site-0", "site-1", "site-2"}
    for setting in ("iid", "shift"):  # benefit = the federated run's per-site AUROC minus the local-only one's
        local = RunFolder(runs[(setting, "local-only")]).read_summary()["final-per-site"]
        for arm in ("fedbn",):
            fed = RunFolder(runs[(setting, arm)]).read_summary()["final-per-site"]
            saved = RunFolder(runs[(setting, arm)]).read_benefit()["validation"]["sites"]
            for site in fed:
                if fed[site]["auroc"] is not None and local[site]["auroc"] is not None:
                    assert saved[site]["benefit"] == pytest.approx(fed[site]["auroc"] - local[site]["auroc"])
    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for r in rows:
        assert r["seeds-ok"] == "1" and 0.0 <= float(r["site-mean-auroc-mean"]) <= 1.0
        assert (r["auroc-mean"] == "") is (r["arm"] == "local-only")  # no single local model: no pooled figure
        assert 0.0 < float(r["jain-index-mean"]) <= 1.0
        if r["kind"] == "federated":
            assert float(r["benefit-min"]) <= float(r["benefit-median"]) <= float(r["benefit-max"])

    from PIL import Image

    for name in ("utility_vs_heterogeneity", "worst_site_vs_pooled", "fairness_vs_utility", "benefit_of_joining"):
        with Image.open(out / f"{name}.png") as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
