"""Real chest X-rays (../shared/data/cxr-pneumonia): a federated run must learn.

Two simulated sites x two rounds of small-cnn at 64 px on a patient-disjoint
subset, partitioned by patient. Skips with a message when ../shared/data is
absent; in CI it is present and this runs.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from simulation.runner import simulate

pytestmark = [pytest.mark.integration, pytest.mark.realdata]


def subset_manifest(src: Path, dst: Path, per_class: int, seed: int = 0) -> Path:
    """A manifest of whole patients (never splitting one) with about ``per_class`` images per class."""
    with open(src / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    chosen: list[dict] = []
    count = {"NORMAL": 0, "PNEUMONIA": 0}
    for p in patients:
        label = by_patient[p][0]["label"]
        if count[label] >= per_class:
            continue
        chosen.extend(by_patient[p])
        count[label] += len(by_patient[p])
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"])
        w.writeheader()
        for r in chosen:
            w.writerow({"path": str((src / r["path"]).resolve()), "label": r["label"], "patient_id": r["patient_id"]})
    return dst


def test_two_sites_learn_pneumonia_on_real_images(tmp_path: Path, shared_data: Path) -> None:
    manifest = subset_manifest(shared_data / "cxr-pneumonia", tmp_path / "subset.csv", per_class=350)
    res = simulate(
        {"data-path": str(manifest), "num-server-rounds": 2, "image-size": 64, "model": "small-cnn",
         "local-epochs": 2, "results-dir": str(tmp_path / "results"), "run-name": "real", "seed": 1},
        sites=2, echo=False, timeout=1200,
    )
    summary = json.loads((res.run_dir / "summary.json").read_text())
    final = summary["final"]
    assert final["num-examples"] >= 100
    assert final["auroc"] > 0.75, final
    # per-site metrics are there too
    assert set(summary["final-per-site"]) == {"site-0", "site-1"}
