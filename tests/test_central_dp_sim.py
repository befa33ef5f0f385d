"""Central DP end to end: Flower simulation on tiny phantoms, epsilon recorded per round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.privacy.central import UNIT
from simulation.runner import simulate

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("mode", "sites"), [("server-fixed", 3), ("client-fixed", 2)])
def test_central_dp_run_records_growing_site_level_epsilon(tmp_path: Path, mode: str, sites: int) -> None:
    res = simulate(
        {"num-server-rounds": 2, "phantom-count": 120, "image-size": 28, "results-dir": str(tmp_path),
         "run-name": mode, "min-sites": sites, "central-dp.mode": mode, "central-dp.noise-multiplier": 1.0,
         "central-dp.clipping-norm": 0.5},
        sites=sites, echo=False, timeout=600,
    )
    rounds = json.loads((res.run_dir / "metrics.json").read_text())["rounds"]
    dp = [r["central-dp"] for r in rounds]
    assert [d["released"] for d in dp] == [True, True]
    assert all(d["calibrated-sites"] == sites and d["replies"] == sites for d in dp)
    assert 0 < dp[0]["epsilon"] < dp[1]["epsilon"]
    summary = json.loads((res.run_dir / "summary.json").read_text())["central-dp"]
    assert summary["mode"] == mode and summary["unit"] == UNIT and summary["delta"] == 1e-5
    assert summary["releases"] == 2 and summary["epsilon"] == pytest.approx(dp[1]["epsilon"])
    assert summary["sample-rate"] == 1.0 and summary["refused-rounds"] == []
