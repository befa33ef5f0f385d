"""The run report's parts: curves from binned counts, bootstrap intervals, and report.html from a results folder.

Fast unit tests: the curves are checked against scikit-learn on the same
binned scores, the intervals against the reported metrics, and the report is
built from a results folder written with :class:`shared.results.RunFolder`
(records as the server's recorder writes them, no Flower). The headless
browser test of real runs' reports is ``tests/test_report_browser.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from headless import parse_sections, remote_references
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from shared.metrics.bootstrap import bootstrap_interval, classification_intervals, mean_intervals
from shared.metrics.classification import ClassificationCounts
from shared.metrics.curves import operating_point, pr_points, reliability_bins, roc_points
from shared.metrics.fairness import fairness_summary
from shared.metrics.federated import SiteEvaluation, ThresholdRule, pool_evaluations
from shared.metrics.subgroups import SubgroupSpec, classification_subgroup_counts
from shared.report import SECTION_IDS, build_run_report, write_run_report
from shared.results import RunFolder
from simulation.cli import main as cli_main

BINS = 1000


def _scores(n: int, seed: int, separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Binary probabilities (n, 2) and labels with a given class separation."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logit = rng.normal(size=n) + separation * (2 * y - 1)
    p1 = 1.0 / (1.0 + np.exp(-logit))
    return np.stack([1 - p1, p1], axis=1), y


def _binned(p1: np.ndarray) -> np.ndarray:
    """Scores rounded down to their bin's lower edge: what the histograms know."""
    return np.clip(np.floor(p1 * BINS), 0, BINS - 1) / BINS


# ---------------------------------------------------------------------------
# Curves from histograms
# ---------------------------------------------------------------------------


def test_roc_and_pr_curves_equal_sklearns_on_the_binned_scores() -> None:
    probs, y = _scores(400, seed=1)
    counts = ClassificationCounts.from_predictions(probs, y)
    pos, neg = counts.score_histograms(1)
    fpr, tpr, thr = roc_points(pos, neg)
    s = _binned(probs[:, 1])
    ref_fpr, ref_tpr, ref_thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thr[1:], ref_thr[1:])
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(counts.metrics()["auroc"], abs=1e-12)
    assert area == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    recall, precision, _ = pr_points(pos, neg)
    ap = float(np.sum(np.diff(np.concatenate(([0.0], recall))) * precision))
    assert ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert ap == pytest.approx(counts.metrics()["auprc"], abs=1e-12)


def test_operating_point_is_the_reported_one_and_reliability_gives_the_ece() -> None:
    probs, y = _scores(300, seed=2)
    counts = ClassificationCounts.from_predictions(probs, y)
    thr = counts.select_threshold("youden")
    pos, neg = counts.score_histograms(1)
    op = operating_point(pos, neg, thr)
    at = counts.metrics_at_threshold(thr)
    assert op["tpr"] == pytest.approx(at["sensitivity"]) and 1 - op["fpr"] == pytest.approx(at["specificity"])
    assert op["precision"] == pytest.approx(at["precision"])
    rb = reliability_bins(pos, neg)
    ok = rb["n"] > 0
    ece = float(np.sum(rb["n"][ok] * np.abs(rb["observed"][ok] - rb["confidence"][ok])) / rb["n"].sum())
    assert ece == pytest.approx(counts.metrics()["ece"], abs=1e-12)
    assert rb["n"].sum() == 300
    empty = roc_points(np.zeros(5), np.ones(5))
    assert all(a.size == 0 for a in empty)  # undefined without positives


# ---------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------


def test_interval_estimates_are_the_reported_metrics_and_contain_them() -> None:
    probs, y = _scores(250, seed=3)
    counts = ClassificationCounts.from_predictions(probs, y)
    thr = counts.select_threshold("youden")
    m = counts.metrics(positive_class=1, threshold=thr)
    ci = classification_intervals(probs, y, threshold=thr, positive_class=1, replicates=300, seed=0)
    for key in ("auroc", "accuracy", "sensitivity@thr", "specificity@thr", "accuracy@thr"):
        assert ci[key]["estimate"] == pytest.approx(m[key], abs=1e-12), key
        assert ci[key]["low"] <= ci[key]["estimate"] <= ci[key]["high"], key
        assert ci[key]["valid"] == 300
    again = classification_intervals(probs, y, threshold=thr, positive_class=1, replicates=300, seed=0)
    assert again == ci  # seeded
    other = classification_intervals(probs, y, threshold=thr, positive_class=1, replicates=300, seed=1)
    assert other["auroc"]["low"] != ci["auroc"]["low"]


def test_intervals_narrow_as_the_set_grows() -> None:
    probs, y = _scores(2000, seed=4)
    small = classification_intervals(probs[:100], y[:100], threshold=0.5, positive_class=1, replicates=400)
    large = classification_intervals(probs, y, threshold=0.5, positive_class=1, replicates=400)
    for key in ("auroc", "sensitivity@thr", "accuracy"):
        w_small = small[key]["high"] - small[key]["low"]
        w_large = large[key]["high"] - large[key]["low"]
        assert w_large < 0.6 * w_small, (key, w_small, w_large)  # ~1/sqrt(20) in theory


def test_multiclass_and_mean_intervals() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 2.0 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    counts = ClassificationCounts.from_predictions(probs, y)
    m = counts.metrics()
    ci = classification_intervals(probs, y, threshold=None, positive_class=None, replicates=200)
    for key in ("auroc", "sensitivity", "specificity", "accuracy"):
        assert ci[key]["estimate"] == pytest.approx(m[key], abs=1e-12), key
        assert ci[key]["low"] <= ci[key]["estimate"] <= ci[key]["high"]
    dice = rng.uniform(0.6, 0.95, 80)
    mi = mean_intervals({"dice": dice}, replicates=300)["dice"]
    assert mi["estimate"] == pytest.approx(dice.mean()) and mi["low"] < dice.mean() < mi["high"]
    one_class = bootstrap_interval(lambda idx: float("nan"), 10, replicates=20)
    assert one_class["valid"] == 0 and one_class["low"] is None
    with pytest.raises(ValueError):
        bootstrap_interval(lambda idx: 0.0, 10, replicates=0)


# ---------------------------------------------------------------------------
# report.html from a results folder
# ---------------------------------------------------------------------------


def _fake_run(tmp_path: Path, *, dp: bool = False) -> Path:
    """A results folder as a 2-site + 1 holdout-site classification run writes it (3 rounds)."""
    folder = RunFolder.create(str(tmp_path), "run")
    rc = {"task": "pneumonia-cxr", "model": "small-cnn", "image-size": 64, "strategy": "fedavg",
          "num-server-rounds": 3, "local-epochs": 2, "batch-size": 32, "optimizer": "adam", "lr": 0.001, "seed": 0,
          "phantom-count": 600, "partition": "iid", "val-fraction": 0.2, "dp.enabled": dp, "dp.accountant": "rdp",
          "data-path": "", "central-dp.mode": "none"}
    folder.write_config(rc, {"versions": {"medfed": "0.1.0", "torch": "2", "flwr": "1.41", "python": "3.11"},
                             "class-names": ["normal", "pneumonia"], "positive-class": 1,
                             "preprocess": {"size": 64, "resize": "letterbox"}, "augment": None, "normalize": "fixed"})
    folder.write_simulation(2, 1)
    rule = ThresholdRule()
    site_data = {"site-0": {"role": "train", "train": 200, "validation": 50, "quarantined": 0,
                            "train-classes": [100, 100], "validation-classes": [25, 25]},
                 "site-1": {"role": "train", "train": 160, "validation": 40, "quarantined": 2,
                            "train-classes": [90, 70], "validation-classes": [22, 18]},
                 "site-2": {"role": "holdout", "train": 48, "validation": 12, "quarantined": 0}}
    for rnd in (1, 2, 3):
        reports, subgroup_parts = [], []
        for k, (site, n) in enumerate((("site-0", 50), ("site-1", 40))):
            probs, y = _scores(n, seed=10 * rnd + k, separation=0.4 * rnd)
            reports.append(SiteEvaluation(site, ClassificationCounts.from_predictions(probs, y), 0.7 - 0.1 * rnd))
            attrs = {"sex": np.array(["F", "M"] * (n // 2), dtype=object)}
            subgroup_parts.append(classification_subgroup_counts(probs, y, attrs, SubgroupSpec(("sex",), 10)))
        ev = pool_evaluations(reports, rule)
        hp, hy = _scores(60, seed=100 + rnd, separation=0.3 * rnd)
        hold = pool_evaluations([SiteEvaluation("site-2", ClassificationCounts.from_predictions(hp, hy), 0.6)], rule,
                                threshold=ev.pooled["threshold"])
        merged = subgroup_parts[0].merge(subgroup_parts[1])
        record = {
            "round": rnd, "train": {"train-loss": 0.8 - 0.1 * rnd, "num-examples": 360.0},
            "train-sites": {"site-0": {"num-examples": 200, "train-loss": 0.7,
                                       **({"dp-epsilon": 0.5 * rnd} if dp else {})},
                            "site-1": {"num-examples": 160, "train-loss": 0.72,
                                       **({"dp-epsilon": 0.6 * rnd} if dp else {})}},
            "evaluate": ev.pooled, "evaluate-sites": ev.per_site,
            "holdout": hold.pooled, "holdout-sites": hold.per_site,
            "fairness": fairness_summary(ev.pooled, ev.per_site, merged, metric="auroc"),
            "site-data": site_data, "round-s": 2.0,
        }
        if dp:
            record["dp"] = {"epsilon": 0.6 * rnd, "delta": 1e-5, "unit": "image",
                            "per-site-epsilon": {"site-0": 0.5 * rnd, "site-1": 0.6 * rnd}}
        folder.add_round(record)
        folder.write_counts(rnd, {"validation": ev.counts.to_flat(), "holdout": hold.counts.to_flat()})
    summary = {"headline": "final pooled validation AUROC 0.8", "task": "pneumonia-cxr"}
    if dp:
        summary["privacy"] = {"mechanism": "DP-SGD", "accountant": "rdp", "epsilon": 1.8, "delta": 1e-5,
                              "unit": "image", "meaning": "per image",
                              "per-site-epsilon": {"site-0": 1.5, "site-1": 1.8},
                              "budget-refusals": {}}
    folder.write_summary(summary)
    return folder.path


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake run's folder after ``medfed report`` (report.html and model-card.json written)."""
    run = _fake_run(tmp_path_factory.mktemp("results"))
    assert cli_main(["report", str(run)]) == 0
    return run


def test_report_of_a_results_folder_has_every_section_and_no_remote_reference(reported: Path) -> None:
    run = reported
    html = (run / "report.html").read_text(encoding="utf-8")
    card = RunFolder(run).read_model_card()
    page = parse_sections(html)
    expected = [s for s in SECTION_IDS if s != "segmentation"]
    assert [s for s in page.text] == expected
    for sid in expected:
        assert len(page.text[sid].strip()) > 80, sid
    for sid in ("learning-curves", "classification", "fairness"):
        assert page.images[sid] >= 1, sid
    assert page.images["classification"] >= 4  # ROC/PR, reliability, a confusion matrix per set
    assert remote_references(html) == []
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in page.links)
    text = page.text
    assert "holdout sites" in text["classification"]
    assert "validation (pooled over training sites)" in text["classification"]
    assert "100 / 100" in text["run"] and "holdout (never trains)" in text["run"]
    assert "Differential privacy: none" in text["privacy"]
    assert "F" in text["fairness"] and "sensitivity [95% CI]" in text["fairness"]
    assert str(run.parent) not in html  # the report names the folder, never its path
    assert card["schema"] == "medfed-model-card/1" and card["run"] == "run"
    # the card
    assert card["training"]["total-training-images"] == 360 and card["training"]["sites"][0][
        "training-images-per-class"] == {"normal": 100, "pneumonia": 100}
    assert card["privacy"]["statement"].startswith("none")
    assert "synthetic phantoms" in card["training"]["data-source"]
    assert card["training"]["data-file-hashes"].startswith("not applicable")
    assert any("optimistic" in x for x in card["limitations"])
    assert card["model"]["operating-threshold"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["rounds"][-1]["evaluate"]["threshold"])


def test_dp_run_report_plots_epsilon_per_site(tmp_path: Path) -> None:
    html, card = build_run_report(_fake_run(tmp_path, dp=True))
    page = parse_sections(html)
    assert page.images["privacy"] == 1 and "epsilon <= 1.800" in page.text["privacy"]
    assert card["privacy"]["dp-sgd"]["epsilon"] == 1.8


def test_three_class_report_draws_one_vs_rest_curves(tmp_path: Path) -> None:
    folder = RunFolder.create(str(tmp_path), "mc")
    folder.write_config({"task": "pneumonia-cxr-3class", "model": "small-cnn", "strategy": "fedavg",
                         "dp.enabled": False}, {"class-names": ["normal", "bacterial", "viral"]})
    rng = np.random.default_rng(0)
    reports = []
    for site in ("site-0", "site-1"):
        y = rng.integers(0, 3, 60)
        logits = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[y]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        reports.append(SiteEvaluation(site, ClassificationCounts.from_predictions(probs, y), 0.9))
    ev = pool_evaluations(reports, ThresholdRule("argmax", positive_class=None))
    folder.add_round({"round": 1, "evaluate": ev.pooled, "evaluate-sites": ev.per_site,
                      "fairness": fairness_summary(ev.pooled, ev.per_site, None, metric="auroc", positive_class=None),
                      "train": {"train-loss": 1.0}})
    folder.write_counts(1, {"validation": ev.counts.to_flat()})
    html, card = build_run_report(folder.path)
    page = parse_sections(html)
    assert "classification" in page.text and page.images["classification"] == 5  # curves, 3 reliability, confusion
    assert "bacterial vs rest" not in page.text["classification"]  # (legend text is inside the figure)
    assert card["model"]["threshold-rule"] == "most probable class (no threshold)"
    assert card["model"]["positive-class"] is None and remote_references(html) == []


def test_medfed_report_refuses_what_is_not_a_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_report_failure_never_fails_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from server.federation import _write_report

    folder = RunFolder(tmp_path / "broken")  # no config.json: the report cannot be built
    with caplog.at_level("WARNING"):
        _write_report(folder)
    assert any("run report could not be written" in r.getMessage() for r in caplog.records)
    assert write_run_report  # the function the server calls
