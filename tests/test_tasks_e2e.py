"""Every clinical task federates on its phantoms: 3 sites x 3 rounds must beat chance.

Classification tasks need pooled validation AUROC > 0.7 (macro over classes for the
3-class pneumonia task), segmentation Dice > 0.6.
The figures of each run are printed (``-s``) for the closing notes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.kinds import SEGMENTATION
from shared.metrics.presentation import MULTICLASS
from shared.tasks import TASKS, get_task
from simulation.runner import simulate

pytestmark = pytest.mark.integration

# Local epochs per round: pneumothorax phantoms (a thin pleural line and missing
# lung markings at 64 px) need more local training than the others to clear the bar.
LOCAL_EPOCHS = {"pneumothorax-cxr": 8}
# Per-task run-config overrides: the 3-class phantoms learn on fewer images at a higher rate
# (keeps the run well under the 90 s budget of an integration test); pneumothorax-seg (region ~5 %
# of the image, absent in half) needs the higher rate too: at lr 0.001 it still predicts empty masks.
# Lung-seg and pneumonia-cxr clear their bars by far on 600 phantoms (Dice 0.946, AUROC 0.837 with
# these settings, seed 0); the other tasks need the 1200 (at 600: nf-photo AUROC 0.58, pneumothorax-cxr
# 0.60, pneumothorax-seg Dice 0.48, nec-axr 0.72).
OVERRIDES = {"pneumonia-cxr-3class": {"phantom-count": 900, "lr": 0.003}, "pneumothorax-seg": {"lr": 0.003},
             "lung-seg": {"phantom-count": 600}, "pneumonia-cxr": {"phantom-count": 600}}
# Tasks that do not clear the bar in this budget yet.
NOT_YET: set[str] = set()


@pytest.mark.parametrize("task", [t for t in TASKS.names() if t not in NOT_YET])
def test_task_learns_on_phantoms(task: str, tmp_path: Path) -> None:
    spec = get_task(task)
    res = simulate(
        {"task": task, "num-server-rounds": 3, "local-epochs": LOCAL_EPOCHS.get(task, 5), "phantom-count": 1200,
         "results-dir": str(tmp_path), "run-name": task, "seed": 0, **OVERRIDES.get(task, {})},
        sites=3, echo=False, timeout=1800,  # pneumothorax-seg: 4 min alone, 7 min in the suite on a slow 2-core box
    )
    summary = json.loads((res.run_dir / "summary.json").read_text())
    final = summary["final"]
    print(f"\n{task}: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items() if isinstance(v, float)))
    assert set(summary["final-per-site"]) == {"site-0", "site-1", "site-2"}
    if spec.kind == SEGMENTATION:
        assert final["dice"] > 0.6, final
    elif spec.view is MULTICLASS:  # macro one-vs-rest AUROC, argmax decisions: no operating threshold
        assert final["auroc"] > 0.7, final
        assert all(f"auroc-{k}" in final for k in range(spec.num_classes)) and "threshold" not in final
        model = torch.load(res.run_dir / "model.pt", weights_only=True)
        assert model["meta"]["threshold"] is None and model["meta"]["num-classes"] == spec.num_classes
    else:
        assert final["auroc"] > 0.7, final
        assert 0.0 <= final["threshold"] <= 1.0
        assert "sensitivity@thr" in final and "ece" in final and "auprc" in final
    config = json.loads((res.run_dir / "config.json").read_text())
    assert config["run-config"]["model"] == spec.default_model
