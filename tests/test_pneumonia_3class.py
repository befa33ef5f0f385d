"""The 3-class pneumonia task (normal / bacterial / viral): phantoms, subtype labels, metrics, learning, inference."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from server.recorder import progress_line
from shared.config import PATH_KEYS, SiteConfig, TrainConfig, parse_run_config
from shared.data.labels import task_labels
from shared.data.phantoms import make_chest_phantoms, render_chest_phantom
from shared.data.phantoms_pneumonia import (
    PNEUMONIA_SUBTYPE_CLASSES,
    make_pneumonia_subtype_phantoms,
    pneumonia_subtype_labels,
    render_pneumonia_subtype_phantom,
)
from shared.data.phantoms_tasks import apply_profile, site_profile
from shared.data.sources import DataSourceError, discover
from shared.data_check import check_dataset
from shared.inference import evaluate_dataset, load_trained, predict_files
from shared.metrics.classification import ClassificationCounts
from shared.metrics.federated import SiteEvaluation, ThresholdRule, pool_evaluations
from shared.metrics.presentation import MULTICLASS
from shared.models import build_model
from shared.objectives import ClassificationObjective
from shared.objectives.classification import evaluate_model
from shared.results import ModelCard, RunFolder
from shared.site_data import load_site_data
from shared.tasks import ARGMAX, CLASSIFICATION, TaskSpec, get_task
from shared.training import images_to_tensor, train_local

TASK = get_task("pneumonia-cxr-3class")
CPU = torch.device("cpu")


def _lookup(spec: TaskSpec, listing_path: Path) -> np.ndarray:
    listing = discover(listing_path)
    return task_labels(listing, spec.class_names, spec.label_column, spec.label_aliases)


def _write_images(root: Path, n: int) -> list[str]:
    images, _ = make_chest_phantoms(n, size=32, seed=2)
    names = []
    for i, img in enumerate(images):
        names.append(f"img{i:02d}.png")
        cv2.imwrite(str(root / names[-1]), img)
    return names


def _manifest(root: Path, header: str, rows: list[str]) -> Path:
    (root / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "manifest.csv"


# ---------------------------------------------------------------------------
# Task registration
# ---------------------------------------------------------------------------


def test_task_is_registered_with_three_classes_and_no_positive_class() -> None:
    assert TASK.class_names == ("normal", "bacterial", "viral") == PNEUMONIA_SUBTYPE_CLASSES
    assert (TASK.in_channels, TASK.default_model, TASK.default_image_size) == (1, "small-cnn", 64)
    assert TASK.view is MULTICLASS and TASK.positive_class is None and TASK.threshold_method == ARGMAX
    assert get_task("pneumonia-cxr").view is not MULTICLASS


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"positive_class": 1}, "positive_class=None and threshold_method='argmax'"),
        ({"threshold_method": "youden"}, "positive_class=None and threshold_method='argmax'"),
        ({"threshold_method": "best"}, "threshold_method must be one of"),
        ({"label_aliases": {"Bacteria": "bacterial"}}, "label_aliases must map lower-case"),
        ({"label_aliases": {"virus": "viral-pneumonia"}}, "label_aliases must map lower-case"),
    ],
)
def test_task_spec_rejects_inconsistent_multiclass_settings(changes: dict[str, object], message: str) -> None:
    base = {k: getattr(TASK, k) for k in TaskSpec.__dataclass_fields__}
    with pytest.raises(ValueError, match=message):
        TaskSpec(**{**base, **changes})


def test_binary_task_needs_a_positive_class() -> None:
    base = {k: getattr(get_task("pneumonia-cxr"), k) for k in TaskSpec.__dataclass_fields__}
    with pytest.raises(ValueError, match="positive_class must index one of"):
        TaskSpec(**{**base, "positive_class": None, "kind": CLASSIFICATION})


# ---------------------------------------------------------------------------
# Phantoms
# ---------------------------------------------------------------------------


def test_labels_are_balanced_follow_probs_and_do_not_depend_on_set_size() -> None:
    labels = pneumonia_subtype_labels(6000, seed=3)
    freq = np.bincount(labels, minlength=3) / labels.size
    assert np.all(np.abs(freq - 1 / 3) < 0.025), freq
    skewed = np.bincount(pneumonia_subtype_labels(6000, seed=3, probs=(0.25, 0.5, 0.25)), minlength=3) / 6000
    assert np.all(np.abs(skewed - [0.25, 0.5, 0.25]) < 0.025), skewed
    assert np.array_equal(pneumonia_subtype_labels(50, seed=3), labels[:50])
    assert not np.array_equal(pneumonia_subtype_labels(200, seed=4), labels[:200])


def test_phantoms_are_deterministic_and_subsets_render_identically() -> None:
    a, ya, ma = make_pneumonia_subtype_phantoms(30, size=32, seed=7)
    b, yb, mb = make_pneumonia_subtype_phantoms(30, size=32, seed=7)
    assert a.tobytes() == b.tobytes() and np.array_equal(ya, yb) and np.array_equal(ma, mb)
    idx = [17, 3, 29, 3]
    c, yc, _ = make_pneumonia_subtype_phantoms(30, size=32, seed=7, indices=idx)
    assert c.tobytes() == a[idx].tobytes() and np.array_equal(yc, ya[idx])
    assert np.array_equal(ya, pneumonia_subtype_labels(30, seed=7))
    assert a.shape == (30, 32, 32) and a.dtype == np.uint8 and ya.dtype == np.int64
    d, _, _ = make_pneumonia_subtype_phantoms(30, size=32, seed=8)
    assert a.tobytes() != d.tobytes()


def test_three_labels_of_an_index_are_one_patient_and_normal_is_the_binary_normal() -> None:
    normal, empty = render_pneumonia_subtype_phantom(5, 0, size=64, seed=1)
    assert not empty.any()
    assert np.array_equal(normal, render_chest_phantom(5, 0, size=64, seed=1)[0])  # binary phantoms untouched
    for label in (1, 2):
        sick, mask = render_pneumonia_subtype_phantom(5, label, size=64, seed=1)
        assert mask.any()
        diff = np.abs(sick.astype(int) - normal.astype(int))
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert diff[grown].mean() > 3 * max(diff[~grown].mean(), 0.2)  # the change is where the finding is


def test_bacterial_is_focal_and_dense_viral_is_bilateral_and_diffuse() -> None:
    """Over a set: bacterial masks mostly cover one side, viral ones both; bacterial adds more per pixel."""
    bact_sided, viral_both, bact_gain, viral_gain = [], [], [], []
    for i in range(24):
        normal, _ = render_pneumonia_subtype_phantom(i, 0, size=64, seed=2)
        for label in (1, 2):
            img, mask = render_pneumonia_subtype_phantom(i, label, size=64, seed=2)
            left, right = mask[:, :32].sum(), mask[:, 32:].sum()
            gain = (img.astype(float) - normal)[mask].mean()
            if label == 1:
                bact_sided.append(max(left, right) / (left + right))
                bact_gain.append(gain)
            else:
                viral_both.append(min(left, right) > 0)
                viral_gain.append(gain)
    assert np.median(bact_sided) > 0.95
    assert np.mean(viral_both) > 0.9
    assert np.median(bact_gain) > 1.5 * np.median(viral_gain)


def test_site_profiles_apply_to_the_phantom_partitions() -> None:
    plain = parse_run_config({"task": TASK.name, "phantom-count": 120, "image-size": 32, "min-partition-size": 5})
    shifted = parse_run_config({"task": TASK.name, "phantom-count": 120, "image-size": 32, "min-partition-size": 5,
                                "site-shift": True})
    site = SiteConfig(site_id="s1", partition_id=1, num_partitions=3)
    a, b = load_site_data(plain, site, TASK), load_site_data(shifted, site, TASK)
    assert a.class_names == b.class_names == TASK.class_names
    assert set(np.unique(np.concatenate([a.train_labels, a.val_labels]))) == {0, 1, 2}
    assert np.array_equal(a.train_labels, b.train_labels)
    assert not np.array_equal(a.train_images, b.train_images)  # site 1 is not the identity profile
    assert not site_profile(1, plain.seed).is_identity
    img, _, _ = make_pneumonia_subtype_phantoms(4, size=32, seed=0)
    assert apply_profile(img, site_profile(2, 0), 0).shape == img.shape


# ---------------------------------------------------------------------------
# Labels from a manifest's subtype column
# ---------------------------------------------------------------------------


def test_subtype_column_maps_kermany_spellings_case_insensitively(tmp_path: Path) -> None:
    names = _write_images(tmp_path, 6)
    rows = [f"{names[0]},NORMAL,P0,normal", f"{names[1]},PNEUMONIA,P1,bacteria", f"{names[2]},PNEUMONIA,P2,VIRUS",
            f"{names[3]},pneumonia,P3,Bacterial", f"{names[4]},Normal,P4,", f"{names[5]},PNEUMONIA,P5,viral"]
    manifest = _manifest(tmp_path, "path,label,patient_id,Subtype", rows)
    assert _lookup(TASK, manifest).tolist() == [0, 1, 2, 1, 0, 2]
    # The binary task reads the same manifest through its 'label' column.
    assert _lookup(get_task("pneumonia-cxr"), manifest).tolist() == [0, 1, 1, 1, 0, 1]


def test_three_level_labels_need_no_subtype_column(tmp_path: Path) -> None:
    names = _write_images(tmp_path, 3)
    manifest = _manifest(tmp_path, "path,label", [f"{names[0]},Normal", f"{names[1]},BACTERIAL", f"{names[2]},virus"])
    assert _lookup(TASK, manifest).tolist() == [0, 1, 2]
    folders = tmp_path / "folders"
    for k, cls in enumerate(("NORMAL", "Bacterial", "viral")):
        (folders / cls).mkdir(parents=True)
        cv2.imwrite(str(folders / cls / f"{k}.png"), np.full((8, 8), 40 * k, np.uint8))
    listing = discover(folders)
    labels = task_labels(listing, TASK.class_names, TASK.label_column, TASK.label_aliases)
    assert sorted(labels.tolist()) == [0, 1, 2]


def test_binary_labels_without_subtype_column_are_a_clear_error(tmp_path: Path) -> None:
    names = _write_images(tmp_path, 4)
    rows = [f"{n},{'PNEUMONIA' if i % 2 else 'NORMAL'},P{i}" for i, n in enumerate(names)]
    manifest = _manifest(tmp_path, "path,label,patient_id", rows)
    with pytest.raises(DataSourceError) as exc:
        _lookup(TASK, manifest)
    msg = str(exc.value)
    assert "no 'subtype' column" in msg and "Add a 'subtype' column" in msg
    assert "'NORMAL', 'PNEUMONIA'" in msg and "bacterial" in msg and "P1" not in msg and names[0] not in msg
    # The same data through a site load and through the class-folder layout fail the same way.
    cfg = parse_run_config({"task": TASK.name, "data-path": str(manifest), "image-size": 32, "min-partition-size": 1})
    with pytest.raises(DataSourceError, match="no 'subtype' column"):
        load_site_data(cfg, SiteConfig(site_id="s0", partition_id=0, num_partitions=1), TASK)
    # The pre-flight check reports it as "not ready" instead of raising; the binary task is fine.
    report = check_dataset(manifest, task=TASK.name)
    assert report.verdict == "not ready" and any("no 'subtype' column" in e for e in report.errors)
    assert check_dataset(manifest, task="pneumonia-cxr").verdict != "not ready"


def test_missing_or_conflicting_subtype_values_are_errors(tmp_path: Path) -> None:
    names = _write_images(tmp_path, 3)
    gap = _manifest(tmp_path, "path,label,subtype",
                    [f"{names[0]},NORMAL,", f"{names[1]},PNEUMONIA,", f"{names[2]},PNEUMONIA,fungal"])
    with pytest.raises(DataSourceError,
                       match=r"2 row\(s\) have no usable 'subtype' value.*'PNEUMONIA': 1.*'fungal': 1"):
        _lookup(TASK, gap)
    clash = _manifest(tmp_path, "path,label,subtype", [f"{names[0]},NORMAL,bacteria", f"{names[1]},PNEUMONIA,virus"])
    with pytest.raises(DataSourceError, match="label 'NORMAL' with subtype 'bacteria': 1"):
        _lookup(TASK, clash)


# ---------------------------------------------------------------------------
# Metrics and the round progress line
# ---------------------------------------------------------------------------


def _site(site_id: str, seed: int, n: int = 60) -> SiteEvaluation:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3), n) * 0.5
    probs[np.arange(n), labels] += 0.5
    return SiteEvaluation(site_id, ClassificationCounts.from_predictions(probs, labels), loss=0.8)


def test_pooled_three_class_metrics_are_macro_without_threshold_or_nan() -> None:
    rule = ThresholdRule(TASK.threshold_method, TASK.target_sensitivity, TASK.positive_class)
    ev = pool_evaluations([_site("a", 0), _site("b", 1)], rule)
    for key in ("auroc", "accuracy", "sensitivity", "specificity", "f1", "auprc", "ece", "auroc-2", "eval-loss"):
        assert math.isfinite(ev.pooled[key]), key
    assert "threshold" not in ev.pooled and all("threshold" not in m for m in ev.per_site.values())
    assert ev.pooled["auroc"] == pytest.approx(np.mean([ev.pooled[f"auroc-{k}"] for k in range(3)]))
    line = progress_line({"round": 2, "round-s": 1.0, "elapsed-s": 3.0, "evaluate": ev.pooled,
                          "train": {"train-loss": 0.5}}, TASK)
    assert f"macro AUROC {ev.pooled['auroc']:.3f}" in line and "acc " in line and "n/a" not in line
    assert "@thr" not in line
    # A site that lacks a class reports NaN for that class only; the macro figures stay defined.
    only_two = ClassificationCounts.from_predictions(np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]]), np.array([0, 1]))
    single = pool_evaluations([SiteEvaluation("c", only_two, 0.5)], rule).pooled
    assert math.isnan(single["auroc-2"]) and math.isfinite(single["auroc"])


# ---------------------------------------------------------------------------
# Learning, then using the model (predict / evaluate)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """small-cnn trained on one site's 400 phantoms at 32 px; returns (results dir, held-out macro AUROC)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two on a shared machine
    try:
        return _train_run(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _train_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    torch.manual_seed(0)
    images, labels, _ = make_pneumonia_subtype_phantoms(600, size=32, seed=0)
    x, y = images_to_tensor(images), torch.as_tensor(labels)
    model = build_model("small-cnn", 1, 3)
    cfg = TrainConfig(local_epochs=6, batch_size=32, lr=3e-3, precision="fp32")
    train_local(model, x[:400], y[:400], cfg, ClassificationObjective(3), seed=0, device=CPU)
    res = evaluate_model(model, x[400:], y[400:], num_classes=3, precision="fp32", device=CPU)
    auroc = res.counts.metrics()["auroc"]
    print(f"\n3-class phantoms, single site, small-cnn 32 px: held-out macro AUROC {auroc:.3f}")
    run_cfg = parse_run_config({"task": TASK.name, "model": "small-cnn", "image-size": 32,
                                "equalize": "none", "denoise": "none"})
    pcfg = TASK.preprocess_for(run_cfg)
    meta = {"task": TASK.name, "model": "small-cnn", "image-size": 32, "in-channels": 1, "num-classes": 3,
            "class-names": list(TASK.class_names), "preprocess": pcfg.to_dict(), "normalize": "fixed",
            "run-config": {k: v for k, v in run_cfg.to_flat().items() if k not in PATH_KEYS},
            "kind": "classification", "threshold": None}
    out = tmp_path_factory.mktemp("run3")
    RunFolder(out).write_model(model.state_dict(), ModelCard.from_meta(meta))
    return out, auroc


def test_small_model_learns_three_class_phantoms_above_chance(trained_run: tuple[Path, float]) -> None:
    assert trained_run[1] > 0.7


def test_predict_and_evaluate_three_class_model_with_subtype_manifest(
    trained_run: tuple[Path, float], tmp_path: Path
) -> None:
    images, labels, _ = make_pneumonia_subtype_phantoms(60, size=32, seed=21)
    spelled = {0: ("NORMAL", "normal"), 1: ("PNEUMONIA", "bacteria"), 2: ("PNEUMONIA", "virus")}
    rows = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        cv2.imwrite(str(tmp_path / f"x{i:02d}.png"), img)
        rows.append(f"x{i:02d}.png,{spelled[int(y)][0]},P{i},{spelled[int(y)][1]}")
    manifest = _manifest(tmp_path, "path,label,patient_id,subtype", rows)
    trained = load_trained(trained_run[0])
    assert trained.positive_class is None and trained.task_spec() is TASK
    result = evaluate_dataset(trained, manifest)
    assert result.counts.num_examples == 60 and result.positive_class is None
    assert np.bincount(labels, minlength=3).tolist() == np.asarray(result.counts.confusion).sum(axis=1).tolist()
    assert result.metrics["auroc"] > 0.6 and "threshold" not in result.metrics
    assert result.to_dict(trained)["positive-class"] is None
    preds = predict_files(trained, sorted(tmp_path.glob("x*.png"))[:5])
    assert all(r["predicted"] in TASK.class_names and r["error"] == "" for r in preds)
    assert all(abs(sum(r[f"prob-{c}"] for c in TASK.class_names) - 1.0) < 1e-5 for r in preds)
    with pytest.raises(ValueError, match="binary models only"):
        predict_files(trained, sorted(tmp_path.glob("x*.png"))[:1], threshold=0.5)

