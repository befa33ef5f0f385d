"""Real chest X-rays (../shared/data/cxr-pneumonia): normal / bacterial / viral must be learnable.

One process, no Flower: a patient-disjoint subset is read through its
manifest's ``subtype`` column (Kermany's ``bacteria``/``virus`` spellings),
split by patient, and small-cnn is trained at 64 px for a short budget.
Skips with a message when ../shared/data is absent.
"""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import SiteConfig, TrainConfig, parse_run_config
from shared.models import build_model
from shared.objectives import ClassificationObjective
from shared.objectives.classification import evaluate_model
from shared.site_data import load_site_data
from shared.tasks import get_task
from shared.training import images_to_tensor, train_local

pytestmark = pytest.mark.realdata

TASK = get_task("pneumonia-cxr-3class")


def subtype_subset(src: Path, dst: Path, per_class: int, seed: int = 0) -> Path:
    """A manifest of whole patients with about ``per_class`` images of each subtype (absolute paths)."""
    with open(src / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    count: dict[str, int] = {}
    chosen: list[dict[str, str]] = []
    for p in patients:
        kinds = {r["subtype"] for r in by_patient[p]}
        if len(kinds) != 1 or count.get(next(iter(kinds)), 0) >= per_class:
            continue
        kind = next(iter(kinds))
        chosen.extend(by_patient[p])
        count[kind] = count.get(kind, 0) + len(by_patient[p])
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "patient_id", "subtype"])
        w.writeheader()
        for r in chosen:
            w.writerow({**r, "path": str((src / r["path"]).resolve())})
    return dst


def test_three_class_pneumonia_learns_on_real_images(tmp_path: Path, shared_data: Path) -> None:
    manifest = subtype_subset(shared_data / "cxr-pneumonia", tmp_path / "subset.csv", per_class=200)
    cfg = parse_run_config({"task": TASK.name, "image-size": 64, "val-fraction": 0.25, "seed": 0})
    # the subset manifest lists absolute paths into the real data folder, outside its own folder
    site = SiteConfig(site_id="real", data_path=str(manifest), cache_dir=str(tmp_path / "cache"),
                      allow_outside_data_root=True)
    t0 = time.perf_counter()
    data = load_site_data(cfg, site, TASK)
    load_s = time.perf_counter() - t0
    assert data.class_names == ("normal", "bacterial", "viral")
    assert np.bincount(data.val_labels, minlength=3).min() >= 20  # every class is in the validation split

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(TASK.default_model, TASK.in_channels, TASK.num_classes)
        train_cfg = TrainConfig(local_epochs=6, batch_size=32, lr=2e-3, precision="fp32")
        t0 = time.perf_counter()
        train_local(model, images_to_tensor(data.train_images), torch.as_tensor(data.train_labels), train_cfg,
                    ClassificationObjective(3), seed=0, augment=TASK.augment_for(cfg), device=torch.device("cpu"))
        res = evaluate_model(model, images_to_tensor(data.val_images), torch.as_tensor(data.val_labels),
                             num_classes=3, precision="fp32", device=torch.device("cpu"))
        train_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    m = res.counts.metrics()
    print(f"\nreal 3-class ({data.summary()}): load {load_s:.1f} s, train+eval {train_s:.1f} s; macro AUROC "
          f"{m['auroc']:.3f} (normal {m['auroc-0']:.3f}, bacterial {m['auroc-1']:.3f}, viral {m['auroc-2']:.3f}), "
          f"accuracy {m['accuracy']:.3f}")
    assert m["auroc"] > 0.75, m
    assert min(m["auroc-0"], m["auroc-1"], m["auroc-2"]) > 0.6, m

