"""DP-SGD at a site, end to end: real training rounds, restarts, budgets, and a federated DP run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import client.site as site_mod
from client.site import site_runtime, train_site
from shared.config import parse_run_config
from shared.privacy.accounting import epsilon
from shared.privacy.site_dp import BudgetRefusal
from shared.tasks import get_task

RUN = {"phantom-count": 120, "image-size": 32, "batch-size": 16, "local-epochs": 1, "num-server-rounds": 4,
       "dp.enabled": True, "dp.noise-multiplier": 1.1, "cache": False}
NODE = {"partition-id": 0, "num-partitions": 2}


def _global_state(run: dict) -> dict[str, torch.Tensor]:
    cfg = parse_run_config(run)
    task = get_task(cfg.task)
    torch.manual_seed(0)
    model, changes = task.build_model(cfg)
    assert changes, "small-cnn has BatchNorm: make_dp_compatible must report what it changed"
    return model.state_dict()


def _rounds(run: dict, state_dir: Path, rounds: range, state: dict,
            restart_each: bool = False) -> tuple[list[float], dict]:
    eps = []
    for r in rounds:
        if restart_each:
            site_mod._RUNTIMES.clear()  # a new ClientApp process: no in-memory state survives
        rt = site_runtime(run, {**NODE, "state-dir": str(state_dir)})
        state, metrics = train_site(rt, state, r, None, run_key="run-7")
        assert set(state) == set(_global_state(run)), "no '_module.' prefix may reach the server"
        eps.append(metrics["dp-epsilon"])
    return eps, state


def test_restart_mid_run_gives_the_uninterrupted_epsilon(tmp_path: Path) -> None:
    init = _global_state(RUN)
    straight, _ = _rounds(RUN, tmp_path / "a", range(1, 5), init)
    first, mid = _rounds(RUN, tmp_path / "b", range(1, 3), init)
    second, _ = _rounds(RUN, tmp_path / "b", range(3, 5), mid, restart_each=True)
    assert first + second == pytest.approx(straight, rel=1e-12)
    assert straight == sorted(straight) and straight[-1] > straight[0]
    # the reported epsilon is the composition of every recorded round, not the last round's
    ledger = json.loads(next((tmp_path / "b").rglob("run-run-7.json")).read_text())
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["entries"]]
    assert second[-1] == pytest.approx(epsilon(history, ledger["header"]["delta"]), rel=1e-9)


def test_budget_stops_the_site_before_it_trains(tmp_path: Path) -> None:
    init = _global_state(RUN)
    run = {**RUN, "dp.max-epsilon": 4.0}
    trained = []
    with pytest.raises(BudgetRefusal) as refusal:
        for r in range(1, 5):
            _, m = _rounds(run, tmp_path, range(r, r + 1), init)
            trained.append(m)
    info = refusal.value.info
    assert info["server-round"] == len(trained) + 1
    assert len(trained) == 2 and info["epsilon-if-trained"] > 4.0 >= info["epsilon-spent"]


@pytest.mark.integration
def test_federated_dp_run_records_epsilon_and_budget_stop(tmp_path: Path) -> None:
    from simulation.runner import simulate

    res = simulate(
        {"num-server-rounds": 4, "phantom-count": 160, "image-size": 32, "batch-size": 16, "results-dir": str(tmp_path),
         "run-name": "dp", "dp.enabled": True, "dp.noise-multiplier": 1.0, "dp.max-epsilon": 4.5},
        sites=2, echo=False, timeout=600,
    )
    summary = json.loads((res.run_dir / "summary.json").read_text())
    rounds = json.loads((res.run_dir / "metrics.json").read_text())["rounds"]
    eps = [r["dp"]["epsilon"] for r in rounds if "dp" in r]
    assert len(eps) >= 1 and eps == sorted(eps)
    assert summary["privacy"]["unit"] == "image" and summary["privacy"]["epsilon"] <= 4.5
    assert summary["privacy"]["epsilon"] == pytest.approx(eps[-1])
    # both sites hit the budget in the same round: recorded, and the run stopped early with a model
    assert "stopped-early" in summary and summary["privacy"]["budget-refusals"]
    assert rounds[-1].get("dp-refusals")
    with open(res.run_dir / "sites.csv") as f:
        assert any(row["dp-refused"] == "1" for row in csv.DictReader(f))
    from shared.inference import load_trained

    trained = load_trained(res.run_dir)  # predict/evaluate rebuild the GroupNorm model the sites trained
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trained.model.modules())
