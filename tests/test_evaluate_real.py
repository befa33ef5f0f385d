"""``medfed evaluate`` on real chest X-rays: 95 % intervals that hold the estimate and narrow with more images.

A small-cnn is trained in-process (64 px, 4 epochs, about 400 images) on some patients of
../shared/data/cxr-pneumonia, its operating threshold chosen (Youden) on other
patients, and it is evaluated with ``medfed evaluate`` on two sets of yet other
patients (about 100 and 800 images; the small set inside the large one). The
real manifest has no sex or age column, so the large set's manifest copy (in
tmp_path) adds *synthetic* ``sex``/``age`` values to two thirds of its rows
(the rest stay blank: ``unknown``) to exercise the subgroup figures.
Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from headless import parse_sections

from shared.config import PATH_KEYS, TrainConfig, parse_run_config
from shared.data.preprocess import preprocess
from shared.data.reading import make_reader
from shared.models import build_model
from shared.objectives import ClassificationObjective
from shared.results import ModelCard, RunFolder
from shared.tasks import get_task
from shared.training import images_to_tensor, train_local
from simulation.cli import main as cli_main

pytestmark = pytest.mark.realdata

LABELS = {"NORMAL": 0, "PNEUMONIA": 1}


def _patients(src: Path, seed: int = 0) -> list[list[dict[str, str]]]:
    """The manifest's rows grouped by patient, patients shuffled (seeded)."""
    with open(src / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    patients = [by_patient[p] for p in sorted(by_patient)]
    random.Random(seed).shuffle(patients)
    return patients


def _take(patients: list[list[dict[str, str]]], per_class: int) -> tuple[list[dict[str, str]], list]:
    """Whole patients until about ``per_class`` images per class; returns (rows, patients left)."""
    taken, left, count = [], [], {"NORMAL": 0, "PNEUMONIA": 0}
    for p in patients:
        label = p[0]["label"]
        if count[label] < per_class:
            taken.extend(p)
            count[label] += len(p)
        else:
            left.append(p)
    return taken, left


def _write_manifest(rows: list[dict[str, str]], src: Path, dst: Path, synthetic: bool = False) -> Path:
    rng = random.Random(7)
    with open(dst, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id", *(("sex", "age") if synthetic else ())])
        w.writeheader()
        for k, r in enumerate(rows):
            row = {"path": str((src / r["path"]).resolve()), "label": r["label"], "patient_id": r["patient_id"]}
            if synthetic:  # synthetic attributes on two thirds of the rows, the others blank
                labelled = k % 3 != 2
                row.update(sex=rng.choice("FM") if labelled else "", age=str(rng.randint(1, 90)) if labelled else "")
            w.writerow(row)
    return dst


@pytest.fixture(scope="module")
def real_model(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(results folder with model.pt, small evaluation manifest, large evaluation manifest)."""
    src = shared_data / "cxr-pneumonia"
    tmp = tmp_path_factory.mktemp("real-eval")
    patients = _patients(src)
    train_rows, rest = _take(patients, 200)
    thr_rows, rest = _take(rest, 75)
    large_rows, _ = _take(rest, 400)
    small_rows = large_rows[:: 8]  # a subset of the large set's images, both classes
    cfg = parse_run_config({"task": "pneumonia-cxr", "model": "small-cnn", "image-size": 64, "seed": 0})
    task = get_task(cfg.task)
    pcfg = task.preprocess_for(cfg)
    reader = make_reader(cfg)

    def load(rows: list[dict[str, str]]) -> tuple[torch.Tensor, np.ndarray]:
        imgs = np.stack([preprocess(reader(src / r["path"]), pcfg) for r in rows])
        return images_to_tensor(imgs), np.array([LABELS[r["label"]] for r in rows])

    x, y = load(train_rows)
    torch.manual_seed(0)
    model = build_model(cfg.model, task.in_channels, task.num_classes)
    train_local(model, x, torch.as_tensor(y), TrainConfig(local_epochs=4, lr=0.002), ClassificationObjective(2),
                seed=0, augment=None)
    xt, yt = load(thr_rows)
    held_out = ClassificationObjective(2).evaluate(model, xt, torch.as_tensor(yt), batch_size=64, precision="fp32",
                                                   normalize="fixed")
    threshold = held_out.counts.select_threshold("youden")
    meta = {"task": cfg.task, "model": cfg.model, "image-size": 64, "in-channels": 1, "num-classes": 2,
            "class-names": list(task.class_names), "positive-class": 1, "preprocess": pcfg.to_dict(),
            "normalize": "fixed", "threshold": threshold, "threshold-rule": {"method": "youden"},
            "run-config": {k: v for k, v in cfg.to_flat().items() if k not in PATH_KEYS}}
    run = tmp / "run"
    RunFolder(run).write_model(model.state_dict(), ModelCard.from_meta(meta))
    assert not {r["patient_id"] for r in large_rows} & {r["patient_id"] for r in train_rows + thr_rows}
    return (run, _write_manifest(small_rows, src, tmp / "small.csv"),
            _write_manifest(large_rows, src, tmp / "large.csv", synthetic=True))


def _evaluate(run: Path, manifest: Path, out: Path) -> dict:
    assert cli_main(["evaluate", "--model", str(run), str(manifest), "--out", str(out / "metrics.json"),
                     "--bootstrap", "1000", "--seed", "0"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_intervals_hold_the_estimate_and_narrow_as_the_set_grows(real_model: tuple[Path, Path, Path], tmp_path: Path,
                                                                 shared_data: Path) -> None:
    run, small_csv, large_csv = real_model
    small = _evaluate(run, small_csv, tmp_path / "small")
    large = _evaluate(run, large_csv, tmp_path / "large")
    print()
    for name, rep in (("small", small), ("large", large)):
        ci = rep["intervals"]
        print(f"{name}: {rep['num-images']} images; " + "; ".join(
            f"{k} {ci[k]['estimate']:.3f} [{ci[k]['low']:.3f}, {ci[k]['high']:.3f}]" for k in ci))
        for key, c in ci.items():
            assert c["low"] <= c["estimate"] <= c["high"], (name, key, c)
            assert c["valid"] == 1000
        assert ci["auroc"]["estimate"] == pytest.approx(rep["metrics"]["auroc"])
        assert ci["sensitivity@thr"]["estimate"] == pytest.approx(rep["metrics"]["sensitivity@thr"])
    assert 60 <= small["num-images"] <= 140 and large["num-images"] >= 700
    assert large["metrics"]["auroc"] > 0.8, large["metrics"]  # the model learned
    for key in ("auroc", "accuracy", "sensitivity@thr", "specificity@thr"):
        w_small = small["intervals"][key]["high"] - small["intervals"][key]["low"]
        w_large = large["intervals"][key]["high"] - large["intervals"][key]["low"]
        assert w_large < 0.75 * w_small, (key, w_small, w_large)
    # subgroups of the (synthetic) sex and age columns, with n per subgroup
    cols = large["subgroups"]["columns"]
    assert set(cols) == {"sex", "age"}
    for column in ("sex", "age"):
        entries = {e["subgroup"]: e for e in cols[column]["subgroups"]}
        assert sum(e["n"] for e in entries.values()) == large["num-images"]
        assert entries["unknown"]["n"] >= large["num-images"] // 4  # a third of the rows carry no value
        for e in entries.values():
            lo, hi = e["auroc-ci"]
            assert lo is None or lo <= e["auroc"] <= hi
        print(f"by {column}: " + ", ".join(f"{k} n {e['n']} AUROC {e['auroc']:.3f} [{e['auroc-ci'][0]:.3f}, "
                                           f"{e['auroc-ci'][1]:.3f}]" for k, e in entries.items()))
    assert set(cols["sex"]["subgroups"][0]) >= {"n", "sensitivity", "sensitivity-ci"}
    assert not small["subgroups"]["columns"]  # a manifest without sex/age/view columns: no subgroup figures
    # the page a hospital files: its sections, and no path anywhere
    html = (tmp_path / "large" / "evaluate.html").read_text(encoding="utf-8")
    page = parse_sections(html)
    assert list(page.text) == ["validated", "intervals", "curves", "calibration", "confusion", "subgroups", "notes"]
    assert page.images["curves"] == 1 and page.images["subgroups"] == 2
    for text in (html, (tmp_path / "large" / "metrics.json").read_text()):
        assert str(shared_data) not in text and "IM-" not in text and "person" not in text
