"""Real lung segmentation (../shared/data/lung-seg, Montgomery County): federated U-Net must reach Dice > 0.80.

Two simulated sites share the 138 image/mask pairs (each site splits its own
share into train and validation); 128 px; a few rounds. Skips with a message
when ../shared/data is absent; in CI it is present and this runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulation.runner import simulate

pytestmark = [pytest.mark.integration, pytest.mark.realdata]


def test_federated_unet_segments_lungs(tmp_path: Path, shared_data: Path) -> None:
    res = simulate(
        {"task": "lung-seg", "model": "unet", "data-path": str(shared_data / "lung-seg" / "manifest.csv"),
         "image-size": 128, "num-server-rounds": 4, "local-epochs": 4, "batch-size": 8, "lr": 0.003,
         "results-dir": str(tmp_path), "run-name": "lungs", "min-partition-size": 20},
        sites=2, echo=False, timeout=1500,
    )
    summary = json.loads((res.run_dir / "summary.json").read_text())
    final = summary["final"]
    assert final["num-examples"] >= 20
    assert final["dice"] > 0.80, final
    assert set(summary["final-per-site"]) == {"site-0", "site-1"}
    for site in summary["final-per-site"].values():
        assert site["dice"] > 0.7 and site["hd95"] == site["hd95"]  # finite HD95 per site
