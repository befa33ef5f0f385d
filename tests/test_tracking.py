"""Experiment tracking (run config ``tracking``): what is logged, read back through MLflow's and TensorBoard's own APIs.

The unit tests drive the trackers with round records shaped like the
server's; the integration test runs a real simulation with
``tracking='mlflow'`` and reads its per-round metrics back with
``MlflowClient`` from the file store in the results folder.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from shared.results import RunFolder
from shared.tracking import (
    MlflowTracker,
    SafeTracker,
    TensorBoardTracker,
    make_tracker,
    metric_name,
    round_metrics,
    tracked_config,
)

CONFIG = {"task": "pneumonia-cxr", "lr": 0.01, "data-path": "/hospital/secret/cxr", "results-dir": "/srv/results",
          "test-path": "/srv/test.csv", "local-epochs": 2, "run-name": "r1"}
CARD = {"task": "pneumonia-cxr", "model": "small-cnn", "run-config": {"lr": 0.01}, "threshold": 0.42}


def record(k: int) -> dict[str, Any]:
    """A round record as the server writes it to metrics.json (two sites, one holdout site)."""
    return {
        "round": k, "round-s": 2.5, "elapsed-s": 10.0 * k, "train-phase-s": 2.0,
        "train": {"train-loss": 0.7 - 0.1 * k, "num-examples": 96.0, "max-train-seconds": 1.2},
        "evaluate": {"auroc": 0.6 + 0.1 * k, "sensitivity@thr": 0.8, "threshold": 0.4, "dice": math.nan,
                     "histogram": [1, 2, 3]},
        "train-sites": {"site-0": {"train-loss": 0.6, "num-examples": 48}, "hospital a/b": {"train-loss": 0.8}},
        "evaluate-sites": {"site-0": {"auroc": 0.65 + 0.1 * k}},
        "holdout": {"auroc": 0.55}, "holdout-sites": {"site-2": {"auroc": 0.55}},
        "test": {"auroc": 0.58 + 0.1 * k},
        "fairness": {"sites": {"worst": 0.6, "gap": 0.1, "worst-site": "site-1", "sites": []}, "subgroups": {}},
        "dp": {"epsilon": 1.5, "delta": 1e-5, "unit": "example"},
        "train-rejected": [{"site": "x", "reason": "shape"}],
    }


def test_round_metrics_are_the_finite_numbers_with_safe_names() -> None:
    m = round_metrics(record(2))
    assert m["val/auroc"] == pytest.approx(0.8) and m["val/sensitivity-at-thr"] == 0.8
    assert m["train/train-loss"] == pytest.approx(0.5)
    assert m["site/site-0/val/auroc"] == pytest.approx(0.85)
    assert m["site/hospital a_b/train/train-loss"] == 0.8  # '/' in a site id cannot make a new level
    assert m["test/auroc"] == pytest.approx(0.78) and m["holdout/auroc"] == 0.55
    assert m["site/site-2/holdout/auroc"] == 0.55
    assert m["fairness/sites/worst"] == 0.6 and m["fairness/sites/gap"] == 0.1
    assert m["dp/epsilon"] == 1.5 and m["time/round-s"] == 2.5
    assert "val/dice" not in m and not any("histogram" in k or "worst-site" in k or "unit" in k for k in m)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert metric_name("site", "a@b:c") == "site/a-at-b_c"


def test_the_logged_config_holds_no_path() -> None:
    logged = tracked_config(CONFIG)
    assert logged == {"task": "pneumonia-cxr", "lr": 0.01, "local-epochs": 2, "run-name": "r1"}


def test_mlflow_round_trip_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    folder = RunFolder(tmp_path / "run-1")
    folder.path.mkdir()
    tracker = MlflowTracker(folder.mlflow_store, "run-1")
    tracker.start(CONFIG)
    tracker.log_round(record(1))
    tracker.log_round(record(2))
    tracker.finish(CARD)

    client = MlflowClient(tracking_uri=folder.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run-1"
    run_id = runs[0].info.run_id
    history = client.get_metric_history(run_id, "val/auroc")
    assert [(h.step, round(h.value, 6)) for h in history] == [(1, 0.7), (2, 0.8)]
    assert [h.step for h in client.get_metric_history(run_id, "site/site-0/val/auroc")] == [1, 2]
    params = client.get_run(run_id).data.params
    assert params == {"task": "pneumonia-cxr", "lr": "0.01", "local-epochs": "2", "run-name": "r1"}
    card_path = client.download_artifacts(run_id, "model-card.json", str(tmp_path))
    assert json.loads(Path(card_path).read_text()) == CARD
    assert "/hospital/secret" not in json.dumps([str(p) for p in folder.mlflow_store.rglob("*")]) + "".join(
        p.read_text(errors="replace") for p in folder.mlflow_store.rglob("*") if p.is_file())

    resumed = MlflowTracker(folder.mlflow_store, "run-1")  # a resumed run continues its MLflow run
    resumed.start(CONFIG, resumed=True, first_round=3)
    resumed.log_round(record(3))
    resumed.finish(CARD)
    assert resumed.run_id == run_id
    assert [h.step for h in client.get_metric_history(run_id, "val/auroc")] == [1, 2, 3]


def test_tensorboard_event_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker(tmp_path / "tensorboard")
    tracker.start(CONFIG)
    tracker.log_round(record(1))
    tracker.log_round(record(2))
    tracker.finish(CARD)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("val/auroc")] == [(1, 0.7), (2, 0.8)]
    assert "site/site-0/val/auroc" in events.Tags()["scalars"]
    text = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir())
    assert b"/hospital/secret" not in text and b"small-cnn" in text


class Broken:
    def __init__(self) -> None:
        self.calls = 0

    def start(self, config: Any, **kw: Any) -> None:
        self.calls += 1

    def log_round(self, record: Any) -> None:
        self.calls += 1
        raise OSError("disk full")

    def finish(self, card: Any, **kw: Any) -> None:
        self.calls += 1


def test_a_failing_tracker_warns_once_and_never_stops_the_run(caplog: pytest.LogCaptureFixture) -> None:
    inner = Broken()
    tracker = SafeTracker(inner, "mlflow")
    with caplog.at_level(logging.WARNING):
        tracker.start(CONFIG)
        tracker.log_round(record(1))  # raises inside: caught
        tracker.log_round(record(2))  # tracking is off now
        tracker.finish(CARD)
    assert inner.calls == 2
    warnings = [r.getMessage() for r in caplog.records if "tracking (mlflow) failed" in r.getMessage()]
    assert len(warnings) == 1 and "[medfed] warning" in warnings[0] and "OSError: disk full" in warnings[0]
    with pytest.raises(ValueError, match="tracking backend"):
        make_tracker("wandb", mlflow_store=Path("."), tensorboard_dir=Path("."), run_name="x")


def test_the_round_recorder_hands_every_finished_round_to_the_tracker(tmp_path: Path) -> None:
    from server.recorder import RoundRecorder
    from shared.tasks import get_task

    class Recording:
        def __init__(self) -> None:
            self.rounds: list[dict[str, Any]] = []

        def log_round(self, r: dict[str, Any]) -> None:
            self.rounds.append(dict(r))

    seen = Recording()
    folder = RunFolder(tmp_path)
    recorder = RoundRecorder(folder, 2, get_task("pneumonia-cxr"), tracker=seen)  # type: ignore[arg-type]
    for k in (1, 2):
        recorder.begin_round(k)
        recorder.on_test(k, {"auroc": 0.7 + k / 10})
        recorder.finish_round()
    assert [r["round"] for r in seen.rounds] == [1, 2]
    assert seen.rounds == folder.read_rounds()  # exactly what metrics.json holds


@pytest.mark.integration
def test_a_simulation_with_mlflow_tracking_leaves_its_rounds_in_the_results_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulation.runner import simulate

    res = simulate({"num-server-rounds": 2, "image-size": 32, "phantom-count": 100, "tracking": "mlflow",
                    "results-dir": str(tmp_path), "run-name": "tracked"}, sites=2)
    folder = RunFolder(res.run_dir)
    rounds = folder.read_rounds()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=folder.mlflow_uri)
    experiment = client.get_experiment_by_name("medfed")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    history = client.get_metric_history(run.info.run_id, "val/auroc")
    assert [h.step for h in history] == [1, 2]
    assert [h.value for h in history] == pytest.approx([r["evaluate"]["auroc"] for r in rounds])
    for site in ("site-0", "site-1"):
        site_history = client.get_metric_history(run.info.run_id, f"site/{site}/val/auroc")
        assert [h.value for h in site_history] == pytest.approx([r["evaluate-sites"][site]["auroc"] for r in rounds])
    params = client.get_run(run.info.run_id).data.params
    assert params["tracking"] == "mlflow" and params["image-size"] == "32"
    assert not {"results-dir", "data-path", "init-weights", "test-path"} & set(params)
    card = json.loads(Path(client.download_artifacts(run.info.run_id, "model-card.json", str(tmp_path))).read_text())
    assert card == folder.read_model()[1].to_meta()
