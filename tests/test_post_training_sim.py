"""A Flower simulation ends with the calibration and out-of-distribution phases (summary.json and model.pt's card)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import pytest
import torch

from shared.data.phantoms import make_chest_phantoms
from simulation.cli import main as cli_main
from simulation.runner import simulate

pytestmark = pytest.mark.integration


def test_a_simulation_ends_with_calibration_and_the_ood_reference(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    res = simulate({"num-server-rounds": 2, "phantom-count": 200, "image-size": 32, "results-dir": str(tmp_path),
                    "run-name": "sim", "min-train-images": 0, "min-val-images": 0}, sites=2, echo=False, timeout=900)
    run = res.run_dir
    summary = json.loads((run / "summary.json").read_text())
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    last = rounds[-1]

    cal = summary["calibration"]
    assert cal["status"] == "fitted", cal
    assert 0.25 <= cal["temperature"] <= 8.0 and set(cal["sites"]) == {"site-0", "site-1"}
    assert cal["num-examples"] == last["evaluate"]["num-examples"]  # the same validation images as the rounds
    assert cal["threshold-uncalibrated"] == last["evaluate"]["threshold"]
    for key in ("ece-before", "ece-after", "nll-before", "nll-after", "threshold"):
        assert isinstance(cal[key], float), key
    assert cal["nll-after"] <= cal["nll-before"] + 1e-9  # T minimises the pooled NLL; T = 1 was a candidate

    ood = summary["ood"]
    assert ood["status"] == "ready", ood
    assert ood["num-train-images"] == last["train"]["num-examples"]
    assert ood["num-val-images"] == last["evaluate"]["num-examples"]
    assert ood["threshold"] > 0 and ood["dims"] == 128 and ood["projection-seed"] is None
    assert "mean" not in ood and "cov" not in ood  # the arrays live in the model card only

    meta = torch.load(run / "model.pt", weights_only=True)["meta"]
    assert meta["calibration"] == cal
    assert len(meta["ood"]["mean"]) == 128 and len(meta["ood"]["cov"]) == 128
    assert meta["ood"]["threshold"] == ood["threshold"]
    log = (run / "flower.log").read_text()
    assert "[medfed] summary: calibration (temperature-bias): temperature" in log
    assert "[medfed] summary: out-of-distribution reference" in log
    card = json.loads((run / "model-card.json").read_text())  # the report's model card carries both summaries
    assert card["calibration"] == summary["calibration"] and card["out-of-distribution-reference"] == ood
    report = (run / "report.html").read_text()
    assert "Calibration and the out-of-distribution reference" in report and f"{ood['dims']}-dim features" in report

    # the saved model predicts with both: calibrated probabilities and a distance per input
    images, _ = make_chest_phantoms(6, size=32, seed=5)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, im in enumerate(images):
        cv2.imwrite(str(inputs / f"p{i}.png"), im)
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(run), str(inputs), "--out", str(tmp_path / "pred")]) == 0
    out = capsys.readouterr().out
    assert f"temperature {cal['temperature']:.3g}" in out and "out-of-distribution:" in out
    with open(tmp_path / "pred" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(r["ood-distance"] and r["ood-flag"] in ("0", "1") for r in rows)
