"""Task recipes: 'fast' reproduces the old defaults, 'accurate' applies, explicit keys win, all the way through
Flower's merged run config, config.json and the model card; and the generalisation benchmark's split logic."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from shared.config import (
    RECIPE_KEYS,
    ConfigError,
    describe_keys,
    explicit_keys,
    flat_defaults,
    parse_overrides,
    parse_recorded_run_config,
    parse_run_config,
    recipe_values,
)
from shared.settings import RECIPE_NAMES
from shared.tasks import TASKS, TaskSpec, get_task

ROOT = Path(__file__).resolve().parents[1]

# What every task trained with before recipes existed (README "Clinical tasks"): the fast recipe must keep it.
OLD_DEFAULTS = {"num-server-rounds": 3, "local-epochs": 1, "batch-size": 32, "lr": 1e-3, "normalize": "fixed",
                "robust-augment": "auto"}  # 'auto': the task's own level (every built-in task: none)
OLD_MODEL = {"pneumonia-cxr": ("small-cnn", 64), "pneumonia-cxr-3class": ("small-cnn", 64),
             "pneumothorax-cxr": ("small-cnn", 64), "lung-seg": ("unet", 64), "pneumothorax-seg": ("unet", 64),
             "nec-axr": ("small-cnn", 64), "nf-photo": ("small-cnn", 64)}


def recipe_part(cfg) -> dict:  # noqa: ANN001
    flat = cfg.to_flat()
    return {k: flat[k] for k in RECIPE_KEYS}


def flower_merge(overrides: dict) -> dict:
    """What Flower hands the ServerApp and every ClientApp: pyproject's defaults updated by --run-config."""
    return {**flat_defaults(), **overrides}


@pytest.mark.parametrize("task", sorted(OLD_MODEL))
def test_no_recipe_reproduces_the_old_defaults(task: str) -> None:
    cfg = parse_run_config({"task": task})
    model, size = OLD_MODEL[task]
    expected = {**OLD_DEFAULTS, "model": model, "image-size": size}
    if task == "pneumothorax-seg":  # README used to say to set it by hand; now part of both recipes
        expected["lr"] = 0.003
    assert cfg.recipe == "fast"
    assert recipe_part(cfg) == expected
    assert parse_run_config({"task": task, "recipe": "fast"}) == cfg
    assert parse_run_config(flower_merge({"task": task})) == cfg  # the same through Flower's merged config


def test_every_task_registers_both_recipes_and_they_parse() -> None:
    assert set(TASKS.names()) == set(OLD_MODEL)
    for task in TASKS.names():
        spec = get_task(task)
        assert set(spec.recipes) == set(RECIPE_NAMES)
        for name in RECIPE_NAMES:
            cfg = parse_run_config({"task": task, "recipe": name})  # model fits task and size, values in range
            assert recipe_part(cfg) == recipe_values(task, name)
        accurate = recipe_values(task, "accurate")
        assert accurate != recipe_values(task, "fast"), f"{task}: 'accurate' changes nothing"
        assert "lr" in spec.recipes["accurate"] and "num-server-rounds" in spec.recipes["accurate"]


@pytest.mark.parametrize("task", ["pneumonia-cxr", "lung-seg"])
def test_accurate_applies_the_tasks_values(task: str) -> None:
    spec = get_task(task)
    cfg = parse_run_config({"task": task, "recipe": "accurate"})
    assert cfg.recipe == "accurate"
    for key, value in spec.recipes["accurate"].items():
        assert cfg.to_flat()[key] == value, key
    # through Flower: pyproject defaults (markers) + the override, as the server and each site see it
    assert parse_run_config(flower_merge({"task": task, "recipe": "accurate"})) == cfg
    # the CLI's text form
    assert parse_run_config(parse_overrides(f"task='{task}' recipe='accurate'")) == cfg


def test_explicit_keys_win_even_when_equal_to_the_fast_value() -> None:
    accurate = recipe_values("lung-seg", "accurate")
    given = {"task": "lung-seg", "recipe": "accurate", "local-epochs": 1, "lr": 0.001, "model": "attention-unet"}
    for flat in (given, flower_merge(given)):
        cfg = parse_run_config(flat)
        assert cfg.train.local_epochs == 1 and cfg.train.lr == 0.001 and cfg.model == "attention-unet"
        # the keys not given still come from the accurate recipe
        assert cfg.data.image_size == accurate["image-size"]
        assert cfg.num_server_rounds == accurate["num-server-rounds"]
        assert cfg.train.batch_size == accurate["batch-size"]


def test_a_marker_value_means_not_given() -> None:
    markers = {"model": "auto", "image-size": 0, "num-server-rounds": 0, "local-epochs": 0, "batch-size": 0, "lr": 0,
               "normalize": "auto", "robust-augment": "auto"}
    assert set(markers) == set(RECIPE_KEYS)
    base = {"task": "pneumonia-cxr", "recipe": "accurate"}
    assert parse_run_config({**base, **markers}) == parse_run_config(base)
    assert explicit_keys({**base, **markers}) == {"task", "recipe"}
    assert explicit_keys({"lr": 0.0, "local-epochs": 2, "model": "resnet18", "seed": 0}) == {"local-epochs", "model",
                                                                                           "seed"}
    # a wrong type is "given" (and then rejected with the usual message), never silently a marker
    assert explicit_keys({"local-epochs": False}) == {"local-epochs"}
    with pytest.raises(ConfigError, match="'local-epochs'"):
        parse_run_config({"local-epochs": False})


def test_recorded_config_and_model_card_keep_the_recipe_and_resolve_the_same() -> None:
    cfg = parse_run_config({"task": "pneumonia-cxr", "recipe": "accurate", "seed": 3})
    flat = cfg.to_flat()
    assert flat["recipe"] == "accurate" and flat["lr"] == cfg.train.lr  # config.json holds resolved values
    assert parse_run_config(flat) == cfg
    card = get_task("pneumonia-cxr").model_card(cfg)
    assert card.run_config["recipe"] == "accurate" and card.model == cfg.model
    assert parse_recorded_run_config(card.run_config) == cfg
    # a config recorded before recipes existed (no 'recipe' key, concrete values) parses as it did
    old = {k: v for k, v in parse_run_config({}).to_flat().items() if k != "recipe"}
    assert parse_recorded_run_config(old).train.lr == 1e-3


def test_unknown_recipe_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="'recipe'.*Did you mean 'accurate'"):
        parse_run_config({"recipe": "acurate"})


def test_task_spec_checks_its_recipes() -> None:
    spec = get_task("nec-axr")
    base = {k: getattr(spec, k) for k in TaskSpec.__dataclass_fields__}
    with pytest.raises(ValueError, match="recipes must be exactly"):
        TaskSpec(**{**base, "recipes": {"fast": {}}})
    with pytest.raises(ValueError, match=r"only .* may be set, got \['optimizer'\]"):
        TaskSpec(**{**base, "recipes": {"fast": {}, "accurate": {"optimizer": "sgd"}}})


def test_list_options_shows_the_markers() -> None:
    rows = {key: (default, allowed) for key, default, allowed, _ in describe_keys()}
    assert rows["recipe"][0] == "'fast'" and "'accurate'" in rows["recipe"][1]
    assert rows["lr"][0] == "0.0" and "(or 0.0 = the recipe's)" in rows["lr"][1]
    assert rows["local-epochs"][0] == "0" and rows["model"][0] == "'auto'"


# ---------------------------------------------------------------------------
# The generalisation benchmark's split and arms (tiny scale; the runs themselves live in benchmarks/)
# ---------------------------------------------------------------------------


def _benchmark():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("generalisation_bench", ROOT / "benchmarks" / "generalisation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_manifest(tmp_path: Path) -> Path:
    rows = []
    for p in range(40):  # 40 patients, 1-3 images each, a quarter normal
        label = "NORMAL" if p % 4 == 0 else "PNEUMONIA"
        for k in range(1 + p % 3):
            rows.append({"path": f"{label}/p{p}-{k}.jpeg", "label": label, "patient_id": f"p{p}", "subtype": ""})
    path = tmp_path / "data" / "manifest.csv"
    path.parent.mkdir()
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_benchmark_test_split_is_patient_disjoint_stratified_and_reproducible(tmp_path: Path) -> None:
    g = _benchmark()
    source = _tiny_manifest(tmp_path)
    data = g.prepare_data("pneumonia-cxr", source, tmp_path / "out", test_fraction=0.25, split_seed=0)
    train, test = g.read_manifest(data.data_path), g.read_manifest(data.test_path)
    assert len(train) + len(test) == len(g.read_manifest(source)) == data.train_images + data.test_images
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in test}
    assert {r["label"] for r in test} == {"NORMAL", "PNEUMONIA"}
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.35
    assert all(Path(r["path"]).is_absolute() and r["path"].startswith(str(source.parent.resolve())) for r in test)
    again = g.prepare_data("pneumonia-cxr", source, tmp_path / "again", test_fraction=0.25, split_seed=0)
    assert g.read_manifest(again.test_path) == test
    other = g.prepare_data("pneumonia-cxr", source, tmp_path / "other", test_fraction=0.25, split_seed=1)
    assert g.read_manifest(other.test_path) != test
    # lung-seg: no test split, the dataset is partitioned as it is
    seg = g.prepare_data("lung-seg", source, tmp_path / "seg", test_fraction=0.25, split_seed=0)
    assert seg.data_path == source and seg.test_path is None


def test_benchmark_arms_and_run_config(tmp_path: Path) -> None:
    g = _benchmark()
    arms, notes = g.arms_for("lung-seg", ["fast", "accurate"], registered=lambda name: False)
    assert [a.name for a in arms] == ["fast", "accurate"] and "'fcn'" in notes[0]
    arms, notes = g.arms_for("pneumonia-cxr", ["fast", "accurate"], registered=lambda name: name == "vit-tiny")
    assert [a.name for a in arms] == ["fast", "accurate", "accurate + vit-tiny"] and not notes
    data = g.TaskData(tmp_path / "train.csv", tmp_path / "test.csv", 10, 5)
    flat = g.run_overrides(arms[2], data, seed=0, sites=3, precision="fp32", results_dir=tmp_path, run_name="r")
    assert flat["recipe"] == "accurate" and flat["model"] == "vit-tiny" and flat["test-path"].endswith("test.csv")
    assert flat["holdout-sites"] == 1 and flat["site-shift"] is True and flat["min-sites"] == 2
    cfg = parse_run_config({k: v for k, v in g.run_overrides(arms[1], data, seed=0, sites=3, precision="fp32",
                                                             results_dir=tmp_path, run_name="r").items()})
    assert recipe_part(cfg) == recipe_values("pneumonia-cxr", "accurate")  # the benchmark runs the recipe as is


def test_benchmark_figures_intervals_and_gap_summary() -> None:
    g = _benchmark()
    lo, hi = g.hanley_mcneil(0.9, 100, 100)
    assert lo < 0.9 < hi and 0.03 < (hi - lo) / 2 < 0.06  # Hanley-McNeil SE at AUC 0.9, 100/100 is ~0.021
    assert all(v != v for v in g.hanley_mcneil(0.9, 0, 100))  # NaN without positives
    metrics = {"auroc": 0.95, "tp": 80, "fn": 20, "tn": 60, "fp": 40, "specificity": 0.6, "threshold": 0.7,
               "tp@thr": 70, "fn@thr": 30, "tn@thr": 90, "fp@thr": 10, "sensitivity@thr": 0.7,
               "specificity@thr": 0.9, "num-examples": 200}
    fig = g.figures(metrics, "auroc")
    assert fig["specificity@thr"] == 0.9 and fig["specificity@0.5"] == 0.6
    assert fig["specificity@thr-ci"][0] < 0.9 < fig["specificity@thr-ci"][1]
    rows = [{"task": "lung-seg", "arm": "fast", "gap": 0.10, "primary": "dice", "unseen-site": {"dice": 0.6}},
            {"task": "lung-seg", "arm": "accurate", "gap": 0.02, "primary": "dice", "unseen-site": {"dice": 0.9}},
            {"task": "pneumonia-cxr", "arm": "fast", "gap": -0.006, "primary": "auroc", "unseen-site": {"auroc": .99}},
            {"task": "pneumonia-cxr", "arm": "accurate", "gap": 0.008, "primary": "auroc",
             "unseen-site": {"auroc": 0.98}}]
    assert g.gap_changes(rows) == [
        "lung-seg: accurate narrows the unseen-site gap: |gap| 0.100 (fast, +0.100) -> 0.020 (accurate, +0.020), "
        "change -0.080; unseen-site dice 0.600 -> 0.900",
        # the size of the gap counts, whichever site is the easier one
        "pneumonia-cxr: accurate does not narrow the unseen-site gap: |gap| 0.006 (fast, -0.006) -> 0.008 "
        "(accurate, +0.008), change +0.002; unseen-site auroc 0.990 -> 0.980"]
    # over seeds the size is the mean |gap|: gaps of opposite sign must not cancel into "no gap"
    seeds = [{"task": "lung-seg", "arm": arm, "gap": gap, "primary": "dice", "unseen-site": {"dice": 0.9}}
             for arm, gap in (("fast", 0.02), ("fast", 0.02), ("accurate", 0.05), ("accurate", -0.05))]
    assert g.gap_changes(seeds) == [
        "lung-seg: accurate does not narrow the unseen-site gap: |gap| 0.020 (fast, +0.020) -> 0.050 (accurate, "
        "+0.000), change +0.030; unseen-site dice 0.900 -> 0.900"]


def test_benchmark_reuses_finished_runs(tmp_path: Path) -> None:
    g = _benchmark()
    out = tmp_path / "generalisation.json"
    assert g.previous_rows(out) == []  # nothing yet
    out.write_text("{not json")
    assert g.previous_rows(out) == []  # unreadable: start afresh
    out.write_text(json.dumps({"rows": [{"task": "lung-seg", "arm": "fast", "seed": 0, "gap": 0.1}, {"junk": 1}]}))
    assert g.previous_rows(out) == [{"task": "lung-seg", "arm": "fast", "seed": 0, "gap": 0.1}]


def test_benchmark_runs_the_extra_models_only_at_their_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _benchmark()
    ran: list[tuple[str, int]] = []

    def fake_run(arm, data, *, seed, **_):  # noqa: ANN001, ANN202
        ran.append((arm.name, seed))
        return {"task": arm.task, "arm": arm.name, "seed": seed, "primary": "dice", "gap": 0.0,
                "validation": {"dice": 0.9}, "unseen-site": {"dice": 0.9}, "wall-seconds": 1.0,
                "config": {"model": "unet", "image-size": 64, "num-server-rounds": 1, "local-epochs": 1}}

    source = tmp_path / "manifest.csv"
    source.write_text("path,label\n")
    monkeypatch.setattr(g, "DATASETS", {"lung-seg": source})
    monkeypatch.setattr(g, "run_arm", fake_run)
    monkeypatch.setattr(g, "_model_registered", lambda name: True)
    assert g.main(["--tasks", "lung-seg", "--seeds", "0,1,2", "--extra-seeds", "0",
                   "--out", str(tmp_path / "out.json")]) == 0
    assert sorted(ran) == sorted([("fast", 0), ("fast", 1), ("fast", 2), ("accurate", 0), ("accurate", 1),
                                  ("accurate", 2), ("accurate + fcn", 0)])
    assert json.loads((tmp_path / "out.json").read_text())["settings"]["extra-seeds"] == [0]
