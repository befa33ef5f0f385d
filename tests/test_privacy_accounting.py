"""Privacy accounting against an independent implementation (Google's dp-accounting) and published reference figures."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest

from shared.privacy import accounting as A
from simulation.cli import main

N, B, SIGMA, DELTA, ROUNDS = 10_000, 256, 1.0, 1e-5, 50
Q = B / N


def _independent(steps: int, sigma: float = SIGMA, q: float = Q, pld: bool = False) -> float:
    acc = dp_accounting.pld.PLDAccountant() if pld else dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(DELTA)


def test_steps_per_round_sum_to_the_single_shot_plan() -> None:
    steps = [A.steps_in_round(r, N, B, 1) for r in range(1, ROUNDS + 1)]
    assert sum(steps) == 1953 == A.total_steps(ROUNDS, N, B, 1)
    assert set(steps) == {39, 40}  # N/B = 39.06: one round in ~16 takes an extra step


def test_rdp_reference_values_and_independent_implementation() -> None:
    eps = A.epsilon([(SIGMA, Q, 1953)], DELTA, "rdp")
    assert eps == pytest.approx(8.03, rel=0.01)
    assert eps == pytest.approx(_independent(1953), rel=0.01)
    one = A.epsilon([(SIGMA, Q, 39)], DELTA, "rdp")
    assert one == pytest.approx(1.80, rel=0.01)
    assert one == pytest.approx(_independent(39), rel=0.01)


def test_prv_reference_value_and_pld() -> None:
    eps = A.epsilon([(SIGMA, Q, 1953)], DELTA, "prv")
    assert eps == pytest.approx(7.36, rel=0.01)
    assert eps == pytest.approx(_independent(1953, pld=True), rel=0.01)
    assert eps < A.epsilon([(SIGMA, Q, 1953)], DELTA, "rdp")  # PRV is the tighter bound


def test_ledger_of_fifty_rounds_equals_single_shot_not_one_round() -> None:
    history = [(SIGMA, Q, A.steps_in_round(r, N, B, 1)) for r in range(1, ROUNDS + 1)]
    composed = A.epsilon(history, DELTA, "rdp")
    assert composed == pytest.approx(A.epsilon([(SIGMA, Q, 1953)], DELTA, "rdp"), rel=1e-9)
    assert composed > 4 * A.epsilon([history[0]], DELTA, "rdp")


def test_plan_rows_are_cumulative_and_increasing() -> None:
    p = A.plan(dataset_size=N, batch_size=B, epochs_per_round=1, rounds=ROUNDS, delta=DELTA, noise_multiplier=SIGMA)
    eps = [r.epsilon for r in p.rows]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert p.rows[0].epsilon == pytest.approx(1.80, rel=0.01)
    assert p.final_epsilon == pytest.approx(8.03, rel=0.01)
    assert p.rows[-1].cumulative_steps == 1953


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_calibration_over_the_whole_plan(accountant: str) -> None:
    p = A.plan(dataset_size=N, batch_size=B, epochs_per_round=1, rounds=ROUNDS, delta=DELTA, target_epsilon=8.0,
               accountant=accountant)
    assert 7.5 < p.final_epsilon <= 8.0
    # calibrated for 50 rounds, not one: one round alone spends far less than 8
    assert p.rows[0].epsilon < 3.0


def test_default_delta_is_stricter_than_one_over_n() -> None:
    assert A.default_delta(1000) == pytest.approx(1e-4)
    assert A.default_delta(1000) < 1 / 1000


def test_empty_history_and_bad_inputs() -> None:
    assert A.epsilon([], DELTA) == 0.0
    assert math.isinf(A.epsilon([(0.0, Q, 10)], DELTA))
    with pytest.raises(A.PrivacyPlanError, match="delta"):
        A.epsilon([(1.0, Q, 10)], 0.0)
    with pytest.raises(A.PrivacyPlanError, match="accountant"):
        A.epsilon([(1.0, Q, 10)], DELTA, "gdp-typo")
    with pytest.raises(A.PrivacyPlanError, match="exactly one"):
        A.plan(dataset_size=N, batch_size=B, epochs_per_round=1, rounds=2, noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(A.PrivacyPlanError, match="dataset size"):
        A.sample_rate(0, 32)


def test_planner_cli_json_uses_the_same_code(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["privacy", "plan", "--dataset-size", str(N), "--batch-size", str(B), "--rounds", "50",
               "--delta", "1e-5", "--noise-multiplier", "1.0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 50
    assert out["final_epsilon"] == pytest.approx(8.03, rel=0.01)
    assert out["rows"][0]["epsilon"] == pytest.approx(1.80, rel=0.01)
    assert out["unit"] == "image"


def test_planner_cli_table_and_target(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["privacy", "plan", "--dataset-size", "2000", "--batch-size", "64", "--rounds", "5",
               "--epochs-per-round", "2", "--target-epsilon", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "calibrated for epsilon 3" in out and "delta 5e-05" in out
    last = [line for line in out.splitlines() if line.strip().startswith("5 ")][0]
    assert 2.9 < float(last.split()[-1]) <= 3.0


def test_planner_cli_rejects_impossible_input(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["privacy", "plan", "--dataset-size", "0", "--batch-size", "64", "--rounds", "5",
               "--noise-multiplier", "1"])
    assert rc == 2
    assert "dataset size" in capsys.readouterr().err
