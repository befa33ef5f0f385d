"""Honest test figures in a simulation: a held-out site that never trains, and a test set the server scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import pytest

from shared.data.phantoms import make_chest_phantoms
from simulation.runner import simulate

pytestmark = pytest.mark.integration


def _test_folder(root: Path, n: int = 60) -> Path:
    images, labels = make_chest_phantoms(n, size=64, seed=99)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("PNEUMONIA" if y else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"t{i:03d}.png"), img)
    return root


def test_holdout_site_never_trains_and_test_set_is_scored_every_round(tmp_path: Path) -> None:
    test_dir = _test_folder(tmp_path / "test-set")
    run = simulate({"phantom-count": 240, "image-size": 32, "local-epochs": 2, "num-server-rounds": 2,
                    "holdout-sites": 1, "test-path": str(test_dir), "results-dir": str(tmp_path / "results"),
                    "run-name": "r"}, sites=3, timeout=900).run_dir
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    for r in rounds:
        assert set(r["train-sites"]) == {"site-0", "site-1"}  # site-2 is the held-out hospital: it never trains
        assert set(r["evaluate-sites"]) == {"site-0", "site-1"}
        assert set(r["holdout-sites"]) == {"site-2"}
        assert r["holdout"]["num-examples"] == 80  # all of its images, scored at the validation threshold
        assert r["holdout"]["threshold"] == r["evaluate"]["threshold"] == r["test"]["threshold"]
        assert r["test"]["num-examples"] == 60 and 0.0 <= r["test"]["auroc"] <= 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final-test"]["auroc"] == rounds[-1]["test"]["auroc"]
    assert set(summary["final-holdout-sites"]) == {"site-2"}
    assert "; test AUROC" in summary["headline"] and "; holdout sites AUROC" in summary["headline"]
    with open(run / "rounds.csv") as fh:
        row = list(csv.DictReader(fh))[-1]
    assert float(row["test-auroc"]) == pytest.approx(rounds[-1]["test"]["auroc"], abs=1e-5)
    assert float(row["holdout-auroc"]) == pytest.approx(rounds[-1]["holdout"]["auroc"], abs=1e-5)
