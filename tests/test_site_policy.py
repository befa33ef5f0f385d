"""A site's own policy (node config): the server cannot switch it off; refusals are structured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import client.site as site_mod
from client.site import evaluate_site, roll_call, site_runtime, train_site
from shared.config import ConfigError, parse_node_config, parse_run_config
from shared.site_policy import PolicyRefusal, check_budget, epsilon_spent_elsewhere
from shared.tasks import get_task

SMALL = {"phantom-count": 60, "image-size": 32, "local-epochs": 1, "batch-size": 16, "min-partition-size": 5}
DP = {"dp.enabled": True, "dp.noise-multiplier": 1.0}


def _node(tmp_path: Path, **policy: object) -> dict[str, object]:
    return {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "state"), **policy}


def _initial(run: dict) -> dict[str, torch.Tensor]:
    cfg = parse_run_config(run)
    torch.manual_seed(0)
    return get_task(cfg.task).build_model(cfg)[0].state_dict()


@pytest.fixture(autouse=True)
def _fresh_runtimes() -> None:
    site_mod._RUNTIMES.clear()


def _refusal(exc: pytest.ExceptionInfo[PolicyRefusal]) -> dict:
    info = json.loads(str(exc.value))
    assert info["kind"] == "site-policy"
    return info


def test_require_dp_refuses_a_non_dp_run_at_the_roll_call_and_at_training(tmp_path: Path) -> None:
    rt = site_runtime(SMALL, _node(tmp_path, **{"require-dp": True}))
    with pytest.raises(PolicyRefusal) as exc:
        roll_call(rt)
    assert _refusal(exc)["rule"] == "require-dp" and "dp.enabled=false" in _refusal(exc)["detail"]
    with pytest.raises(PolicyRefusal):
        train_site(rt, _initial(SMALL), 1, None, run_key="r")
    dp_rt = site_runtime({**SMALL, **DP}, _node(tmp_path, **{"require-dp": True}))
    site, sizes = roll_call(dp_rt)  # the same site joins a DP run
    assert site["role"] == "train" and sizes["num-train-examples"] == len(dp_rt.train_x)
    _, metrics = train_site(dp_rt, _initial({**SMALL, **DP}), 1, None, run_key="r")
    assert metrics["dp-epsilon"] > 0


def test_allowed_tasks_and_min_sites_per_round(tmp_path: Path) -> None:
    rt = site_runtime(SMALL, _node(tmp_path, **{"allowed-tasks": "nec-axr,nf-photo"}))
    with pytest.raises(PolicyRefusal) as exc:
        roll_call(rt)
    assert _refusal(exc)["rule"] == "allowed-tasks"
    rt = site_runtime(SMALL, _node(tmp_path, **{"min-sites-per-round": 3}))
    with pytest.raises(PolicyRefusal) as exc:
        roll_call(rt)
    assert _refusal(exc)["rule"] == "min-sites-per-round" and "min-sites is 2" in _refusal(exc)["detail"]
    assert roll_call(site_runtime({**SMALL, "min-sites": 3}, _node(tmp_path, **{"min-sites-per-round": 3})))


def test_node_config_policy_values_are_checked() -> None:
    for key, bad in (("require-dp", "yes"), ("max-epsilon", -1), ("min-sites-per-round", 0), ("role", "observer")):
        with pytest.raises(ConfigError, match=f"node config '{key}'"):
            parse_node_config({"data-path": "/data", key: bad})
    with pytest.raises(ConfigError, match="unknown task.*Did you mean 'nec-axr'"):
        parse_node_config({"data-path": "/data", "allowed-tasks": "nec-ax"})


def test_site_budget_across_runs_refuses_before_anything_is_recorded(tmp_path: Path) -> None:
    """The site's own max-epsilon counts the epsilon it spent in its earlier runs (kept in its state folder)."""
    run = {**SMALL, **DP}
    node = _node(tmp_path)
    rt = site_runtime(run, node)
    state = _initial(run)
    for r in (1, 2):
        state, metrics = train_site(rt, state, r, None, run_key="first-run")
    first = metrics["dp-epsilon"]
    ledgers = tmp_path / "state" / "privacy-ledger" / rt.site.site_id
    assert epsilon_spent_elsewhere(ledgers, "second-run") == pytest.approx(first)
    one_round = json.loads((ledgers / "run-first-run.json").read_text())["entries"][0]["epsilon"]
    # a budget that allows the second run's first round but not its second
    site_mod._RUNTIMES.clear()
    rt2 = site_runtime(run, _node(tmp_path, **{"max-epsilon": first + 1.05 * one_round}))
    with pytest.raises(PolicyRefusal) as exc:
        for r in (1, 2, 3):
            train_site(rt2, _initial(run), r, None, run_key="second-run")
    info = _refusal(exc)
    assert info["rule"] == "max-epsilon" and "over all its runs" in info["detail"]
    second = json.loads((ledgers / "run-second-run.json").read_text())["entries"]
    assert len(second) == 1  # the refused round was never recorded (nor trained)
    with pytest.raises(PolicyRefusal, match="max-epsilon"):
        check_budget(rt2.policy, "s", 2.0, 10.0)


def test_holdout_site_never_trains_and_evaluates_all_its_images(tmp_path: Path) -> None:
    rt = site_runtime({**SMALL, "holdout-sites": 1}, {"partition-id": 1, "num-partitions": 2})
    site, _ = roll_call(rt)
    assert site["role"] == "holdout"
    with pytest.raises(PolicyRefusal, match="holdout"):
        train_site(rt, _initial(SMALL), 1, None)
    metrics, subgroups = evaluate_site(rt, _initial(SMALL), 1)
    assert metrics["num-examples"] == len(rt.train_x) + len(rt.val_x) and subgroups == {}
    assert roll_call(site_runtime({**SMALL, "holdout-sites": 1}, {"partition-id": 0, "num-partitions": 2}))[0]["role"] \
        == "train"
