"""The site's privacy ledger: cumulative across rounds and restarts, budgets, calibration (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config import parse_run_config
from shared.privacy import accounting as A
from shared.privacy.ledger import LedgerError, PrivacyLedger, ledger_path
from shared.privacy.site_dp import BudgetRefusal, begin_round, open_ledger, parse_refusal

N = 10_000


def _cfg(**extra: object):  # noqa: ANN202
    base = {"dp.enabled": True, "batch-size": 256, "num-server-rounds": 50, "dp.target-delta": 1e-5}
    if "dp.target-epsilon" not in extra:
        base["dp.noise-multiplier"] = 1.0
    return parse_run_config({**base, **extra})


def _run(cfg, state: Path, rounds: range, run_key: str = "run-1") -> list[float]:  # noqa: ANN001
    eps = []
    for r in rounds:
        ledger, settings = open_ledger(cfg, "site-a", str(state), run_key, N)  # a fresh process each round
        eps.append(begin_round(ledger, settings, r, "site-a").epsilon_after)
    return eps


def test_fifty_rounds_compose_to_the_single_shot_value(tmp_path: Path) -> None:
    eps = _run(_cfg(), tmp_path, range(1, 51))
    assert eps[0] == pytest.approx(1.80, rel=0.01)
    assert eps[-1] == pytest.approx(A.epsilon([(1.0, 0.0256, 1953)], 1e-5), rel=1e-9)
    assert eps[-1] == pytest.approx(8.03, rel=0.01)


def test_restart_mid_run_continues_from_the_saved_ledger(tmp_path: Path) -> None:
    uninterrupted = _run(_cfg(), tmp_path / "a", range(1, 11))
    first = _run(_cfg(), tmp_path / "b", range(1, 5))
    # all in-memory state is gone; only the file under the site's state folder remains
    second = _run(_cfg(), tmp_path / "b", range(5, 11))
    assert first + second == pytest.approx(uninterrupted, rel=1e-12)
    ledger = json.loads(ledger_path(tmp_path / "b", "site-a", "run-1").read_text())
    assert [e["server_round"] for e in ledger["entries"]] == list(range(1, 11))


def test_target_epsilon_is_calibrated_once_for_the_whole_run(tmp_path: Path) -> None:
    eps = _run(_cfg(**{"dp.target-epsilon": 8.0}), tmp_path, range(1, 51))
    assert 7.5 < eps[-1] <= 8.0
    assert eps[0] < 3.0


def test_budget_refusal_at_the_right_round_with_a_structured_reason(tmp_path: Path) -> None:
    cfg = _cfg(**{"dp.max-epsilon": 3.0})
    plan = A.plan(dataset_size=N, batch_size=256, epochs_per_round=1, rounds=50, delta=1e-5, noise_multiplier=1.0)
    expected_last = max(r.round for r in plan.rows if r.epsilon <= 3.0)
    spent = []
    refused_at = None
    for r in range(1, 51):
        ledger, settings = open_ledger(cfg, "site-a", str(tmp_path), "run-1", N)
        try:
            spent.append(begin_round(ledger, settings, r, "site-a").epsilon_after)
        except BudgetRefusal as exc:
            refused_at = r
            info = parse_refusal(str(exc))
            break
    assert refused_at == expected_last + 1
    assert info is not None and info["kind"] == "dp-budget" and info["site-id"] == "site-a"
    assert info["server-round"] == refused_at and info["epsilon-spent"] == pytest.approx(spent[-1], rel=1e-6)
    assert info["epsilon-if-trained"] > 3.0 >= info["epsilon-spent"]
    # the refused round is not in the ledger, and the next attempt is refused again
    ledger, settings = open_ledger(cfg, "site-a", str(tmp_path), "run-1", N)
    assert ledger.rounds_trained == expected_last
    with pytest.raises(BudgetRefusal):
        begin_round(ledger, settings, refused_at + 1, "site-a")


def test_unreadable_ledger_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    _run(_cfg(), tmp_path, range(1, 3))
    path = ledger_path(tmp_path, "site-a", "run-1")
    path.write_text(path.read_text()[:40])  # truncated
    with pytest.raises(LedgerError, match="refusing to train"):
        open_ledger(_cfg(), "site-a", str(tmp_path), "run-1", N)
    assert len(path.read_text()) == 40  # left for the operator to restore


def test_changed_settings_mid_run_are_refused(tmp_path: Path) -> None:
    _run(_cfg(), tmp_path, range(1, 3))
    with pytest.raises(LedgerError, match="noise-multiplier"):
        open_ledger(_cfg(**{"dp.noise-multiplier": 2.0}), "site-a", str(tmp_path), "run-1", N)


def test_ledger_is_per_run_and_per_site(tmp_path: Path) -> None:
    _run(_cfg(), tmp_path, range(1, 4), run_key="run-1")
    fresh = _run(_cfg(), tmp_path, range(1, 2), run_key="run-2")
    assert fresh[0] == pytest.approx(1.80, rel=0.01)
    assert ledger_path(tmp_path, "../evil/site", "r").parent.parent == tmp_path / "privacy-ledger"


def test_ledger_file_holds_no_paths(tmp_path: Path) -> None:
    _run(_cfg(), tmp_path, range(1, 3))
    text = ledger_path(tmp_path, "site-a", "run-1").read_text()
    assert str(tmp_path) not in text
    assert set(json.loads(text)) == {"version", "header", "entries"}


def test_config_rejects_dp_without_noise_or_target() -> None:
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="dp.target-epsilon"):
        parse_run_config({"dp.enabled": True})
    with pytest.raises(ConfigError, match="not both"):
        parse_run_config({"dp.enabled": True, "dp.noise-multiplier": 1.0, "dp.target-epsilon": 3.0})
    with pytest.raises(ConfigError, match="exceeds the budget"):
        parse_run_config({"dp.enabled": True, "dp.target-epsilon": 8.0, "dp.max-epsilon": 3.0})


def test_privacy_ledger_roundtrip(tmp_path: Path) -> None:
    led = PrivacyLedger.open(tmp_path / "l.json", {"accountant": "rdp"})
    led.record(1, (1.0, 0.1, 10), 0.5)
    again = PrivacyLedger.open(tmp_path / "l.json", {"accountant": "rdp"})
    assert again.history == [(1.0, 0.1, 10)] and again.last_epsilon == 0.5


def test_a_resumed_run_may_plan_more_rounds_only_with_a_fixed_noise_multiplier(tmp_path: Path) -> None:
    base = {"accountant": "rdp", "delta": 1e-5, "noise-multiplier": 1.0, "sample-rate": 0.1, "dataset-size": 100,
            "batch-size": 10, "epochs-per-round": 1, "planned-rounds": 2, "max-grad-norm": 1.0, "unit": "image"}
    fixed = tmp_path / "fixed.json"
    PrivacyLedger.open(fixed, {**base, "target-epsilon": 0.0}).save()
    longer = PrivacyLedger.open(fixed, {**base, "target-epsilon": 0.0, "planned-rounds": 3})  # resume-from, 3 rounds
    assert longer.header["planned-rounds"] == 3
    target = tmp_path / "target.json"
    PrivacyLedger.open(target, {**base, "target-epsilon": 4.0}).save()
    with pytest.raises(LedgerError, match="planned-rounds: saved 2, now 3"):  # the noise was calibrated to 2 rounds
        PrivacyLedger.open(target, {**base, "target-epsilon": 4.0, "planned-rounds": 3})
