"""Fairness from counts: across sites, across patient subgroups (site side and server side)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fairlearn.metrics import (
    demographic_parity_difference,
    equal_opportunity_difference,
    equalized_odds_difference,
)
from sklearn.metrics import roc_auc_score

from shared.metrics.classification import ClassificationCounts
from shared.metrics.fairness import (
    FAIRNESS_CSV_FIELDS,
    across_sites,
    across_sites_from_metrics,
    fairness_csv_rows,
    fairness_summary,
    jain_index,
    subgroup_report,
)
from shared.metrics.federated import SiteEvaluation, pool_evaluations
from shared.metrics.segmentation import SegmentationCounts
from shared.metrics.subgroups import (
    KEY_PREFIX,
    SubgroupCounts,
    SubgroupError,
    SubgroupSpec,
    age_band_labels,
    classification_subgroup_counts,
    effective_min_cell,
    merge_subgroup_reports,
    parse_age_bands,
    parse_age_years,
    parse_subgroup_columns,
    segmentation_subgroup_counts,
    subgroup_cells,
)

# ---------------------------------------------------------------------------
# Across sites: golden values computed by hand
# ---------------------------------------------------------------------------


def test_jain_index_golden_values() -> None:
    assert jain_index([0.7, 0.7, 0.7]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0]) == pytest.approx(0.5)  # one holds everything: 1/k
    assert jain_index([0.5, 0.5, 1.0]) == pytest.approx(8 / 9)  # (2)^2 / (3 * 1.5)
    assert jain_index([0.9, 0.8, 0.6]) == pytest.approx(5.29 / 5.43)  # 2.3^2 / (3 * 1.81)
    assert math.isnan(jain_index([])) and math.isnan(jain_index([0.0, 0.0]))
    with pytest.raises(ValueError, match="non-negative"):
        jain_index([0.5, -0.1])


def test_site_table_golden_values() -> None:
    values = {"hosp-c": 0.6, "hosp-a": 0.9, "hosp-b": 0.8}
    sizes = {"hosp-a": 100, "hosp-b": 50, "hosp-c": 30}
    out = across_sites(values, sizes, 0.82, metric="auroc")
    assert [r["site"] for r in out["sites"]] == ["hosp-a", "hosp-b", "hosp-c"]
    assert [r["n"] for r in out["sites"]] == [100, 50, 30]
    assert [r["gap-to-pooled"] for r in out["sites"]] == pytest.approx([0.08, -0.02, -0.22])
    assert (out["worst-site"], out["worst"], out["best-site"], out["best"]) == ("hosp-c", 0.6, "hosp-a", 0.9)
    assert out["gap"] == pytest.approx(0.3)
    assert out["mean"] == pytest.approx(2.3 / 3)
    # population SD: squared deviations 0.0177.., 0.0011.., 0.0277.. sum to 0.04666..; / 3; sqrt
    assert out["std"] == pytest.approx(math.sqrt(0.14 / 9))
    assert out["jain-index"] == pytest.approx(5.29 / 5.43)
    assert out["num-sites"] == 3 and out["num-sites-defined"] == 3
    json.dumps(out, allow_nan=False)


def test_site_table_skips_undefined_sites_and_breaks_ties_by_id() -> None:
    values = {"b": 0.7, "a": 0.7, "c": float("nan")}
    out = across_sites(values, {"a": 10, "b": 10, "c": 5}, 0.7, metric="auroc")
    assert out["sites"][2] == {"site": "c", "n": 5, "value": None, "gap-to-pooled": None}
    assert out["num-sites-defined"] == 2 and out["worst-site"] == "a" and out["best-site"] == "a"
    assert out["gap"] == 0.0 and out["std"] == 0.0 and out["jain-index"] == pytest.approx(1.0)
    empty = across_sites({"a": float("nan")}, {"a": 3}, float("nan"), metric="dice")
    assert empty["worst"] is None and empty["jain-index"] is None and empty["pooled"] is None
    json.dumps(empty, allow_nan=False)
    with pytest.raises(ValueError, match="same sites"):
        across_sites({"a": 0.5}, {"b": 3}, 0.5, metric="auroc")


def test_site_table_from_pooled_evaluations_uses_auroc_or_dice() -> None:
    rng = np.random.default_rng(0)
    reports = []
    for s, sep in enumerate((3.0, 1.0)):
        y = rng.integers(0, 2, 200)
        logit = rng.normal(sep * y, 1.0)
        p1 = 1 / (1 + np.exp(-logit))
        reports.append(SiteEvaluation(f"s{s}", ClassificationCounts.from_predictions(np.stack([1 - p1, p1], 1), y),
                                      0.5))
    ev = pool_evaluations(reports)
    out = across_sites_from_metrics(ev.pooled, ev.per_site, "auroc")
    assert out["metric"] == "auroc" and out["worst-site"] == "s1" and out["best-site"] == "s0"
    assert out["sites"][0]["value"] == pytest.approx(ev.per_site["s0"]["auroc"])
    assert out["pooled"] == pytest.approx(ev.pooled["auroc"])
    seg = SegmentationCounts(n_images=4, dice_sum=3.0, iou_sum=2.0)
    seg2 = SegmentationCounts(n_images=2, dice_sum=1.0, iou_sum=0.5)
    ev2 = pool_evaluations([SiteEvaluation("x", seg, 0.1), SiteEvaluation("y", seg2, 0.2)])
    out2 = across_sites_from_metrics(ev2.pooled, ev2.per_site, "dice")
    assert out2["metric"] == "dice" and out2["worst"] == 0.5 and out2["best"] == 0.75
    assert out2["pooled"] == pytest.approx(4 / 6) and [r["n"] for r in out2["sites"]] == [4, 2]


# ---------------------------------------------------------------------------
# Settings and cells
# ---------------------------------------------------------------------------


def test_settings_parse_and_reject_with_clear_messages() -> None:
    assert parse_subgroup_columns(" Sex, age ,view,sex") == ("sex", "age", "view")
    assert parse_subgroup_columns("") == ()
    with pytest.raises(SubgroupError, match="Did you mean 'view'"):
        parse_subgroup_columns("sex,veiw")
    with pytest.raises(SubgroupError, match="not supported"):
        parse_subgroup_columns("patient_name")
    assert parse_age_bands("0,18,40,65") == (0, 18, 40, 65)
    for bad in ("", "18,10", "0,18.5", "-1,5", "a,b"):
        with pytest.raises(SubgroupError, match="increasing whole years"):
            parse_age_bands(bad)
    assert age_band_labels((0, 18, 40, 65)) == ("0-17", "18-39", "40-64", "65+")
    assert SubgroupSpec.from_strings("age", 5, "0,18").age_bands == (0, 18)
    with pytest.raises(SubgroupError, match="min_cell"):
        SubgroupSpec(min_cell=0)
    assert effective_min_cell(3, None) == 3 and effective_min_cell(3, 10) == 10 and effective_min_cell(20, 10) == 20


def test_ages_are_parsed_and_binned_with_an_unknown_band() -> None:
    assert parse_age_years("45") == 45.0 and parse_age_years(" 045Y ") == 45.0
    assert parse_age_years("006M") == 0.5 and parse_age_years("10d") == pytest.approx(10 / 365.25)
    assert parse_age_years("") is None and parse_age_years("forty") is None and parse_age_years("-3") is None
    ages = np.array(["0", "17.9", "18", "39.5", "040Y", "64", "65", "101", "", "n/a", "006M"], dtype=object)
    cells = subgroup_cells({"age": ages}, SubgroupSpec(columns=("age",), age_bands=(0, 18, 40, 65)), len(ages))
    assert cells["age"].tolist() == ["0-17", "0-17", "18-39", "18-39", "40-64", "40-64", "65+", "65+",
                                     "unknown", "unknown", "0-17"]
    adults = subgroup_cells({"age": np.array(["5", "30"])}, SubgroupSpec(columns=("age",), age_bands=(18, 65)), 2)
    assert adults["age"].tolist() == ["unknown", "18-64"]  # below the first edge: unknown


def test_sex_and_view_values_are_normalised_to_safe_tokens() -> None:
    attrs = {
        "sex": np.array(["F", "female", " M ", "Male", "O", "", "x", "Woman"], dtype=object),
        "view": np.array(["PA", "ap", "AP supine", "", "Unknown", "a/b", "x" * 30, "ll"], dtype=object),
        "comment": np.array(["free text"] * 8, dtype=object),  # not a declared column: never used
    }
    cells = subgroup_cells(attrs, SubgroupSpec(), 8)
    assert list(cells) == ["sex", "view"]  # declared order; 'age' absent at this site is skipped
    assert cells["sex"].tolist() == ["F", "F", "M", "M", "O", "unknown", "unknown", "F"]
    assert cells["view"].tolist() == ["PA", "AP", "AP-SUPINE", "unknown", "unknown", "other", "other", "LL"]
    assert subgroup_cells(None, SubgroupSpec(), 3) == {}
    with pytest.raises(ValueError, match="values for 3 images"):
        subgroup_cells({"sex": np.array(["F"])}, SubgroupSpec(), 3)


# ---------------------------------------------------------------------------
# Site side: suppression and the flat key scheme
# ---------------------------------------------------------------------------


def _probs(rng: np.random.Generator, y: np.ndarray, sep: float) -> np.ndarray:
    p1 = 1.0 / (1.0 + np.exp(-rng.normal(sep * (2 * y - 1), 1.0)))
    return np.stack([1.0 - p1, p1], axis=1)


def test_a_site_with_six_images_of_a_subgroup_sends_no_cell_for_it() -> None:
    rng = np.random.default_rng(1)
    sex = np.array(["F"] * 6 + ["M"] * 40 + ["X-unparseable"] * 0, dtype=object)
    view = np.array(["PA"] * 23 + ["AP"] * 23, dtype=object)
    y = rng.integers(0, 2, 46)
    counts = classification_subgroup_counts(_probs(rng, y, 1.0), y, {"sex": sex, "view": view}, SubgroupSpec())
    flat = counts.to_flat()
    # nothing about the 6 women is sent
    assert not [k for k in flat if k.startswith(f"{KEY_PREFIX}/sex/F/")]
    assert flat[f"{KEY_PREFIX}/sex/suppressed"] == 1
    # ... and the 40 men are withheld too, else total - men = the 6 women (complementary suppression)
    assert not [k for k in flat if k.startswith(f"{KEY_PREFIX}/sex/M/")]
    assert flat[f"{KEY_PREFIX}/sex/withheld"] == 1
    # view: both cells are large, both sent in full
    assert flat[f"{KEY_PREFIX}/view/suppressed"] == 0 and flat[f"{KEY_PREFIX}/view/withheld"] == 0
    assert flat[f"{KEY_PREFIX}/view/PA/confusion"] and flat[f"{KEY_PREFIX}/view/AP/num-classes"] == 2
    assert flat[f"{KEY_PREFIX}/min-cell"] == 10


def test_complementary_suppression_leaves_no_small_remainder() -> None:
    rng = np.random.default_rng(2)
    # age bands: 0-17: 3, 18-39: 30, 40-59: 12, 60-79: 25, 80+: 4 -> small 3 + 4 = 7 < 10: withhold 40-59 (12)
    ages = np.array(["10"] * 3 + ["30"] * 30 + ["50"] * 12 + ["70"] * 25 + ["85"] * 4, dtype=object)
    y = rng.integers(0, 2, len(ages))
    counts = classification_subgroup_counts(_probs(rng, y, 1.0), y, {"age": ages}, SubgroupSpec(columns=("age",)))
    assert sorted(counts.cells["age"]) == ["18-39", "60-79"]
    assert (counts.suppressed["age"], counts.withheld["age"]) == (2, 1)
    sent = sum(c.num_examples for c in counts.cells["age"].values())
    assert len(ages) - sent >= 10  # the site's total minus what was sent singles out no small group
    # small cells summing to >= min_cell need no complement
    ages2 = np.array(["10"] * 6 + ["85"] * 5 + ["30"] * 30, dtype=object)
    c2 = classification_subgroup_counts(_probs(rng, np.zeros(41, int), 1.0), np.zeros(41, int), {"age": ages2},
                                        SubgroupSpec(columns=("age",)))
    assert sorted(c2.cells["age"]) == ["18-39"] and (c2.suppressed["age"], c2.withheld["age"]) == (2, 0)
    # min-cell 1: nothing suppressed
    c3 = classification_subgroup_counts(_probs(rng, y, 1.0), y, {"age": ages},
                                        SubgroupSpec(columns=("age",), min_cell=1))
    assert len(c3.cells["age"]) == 5 and (c3.suppressed["age"], c3.withheld["age"]) == (0, 0)


def test_flat_scheme_round_trips_and_holds_only_plain_numbers() -> None:
    rng = np.random.default_rng(3)
    n = 60
    y = rng.integers(0, 2, n)
    attrs = {"sex": np.array(["F", "M"] * 30, dtype=object), "age": np.array(["30", "70", "n/a"] * 20, dtype=object)}
    counts = classification_subgroup_counts(_probs(rng, y, 1.0), y, attrs, SubgroupSpec())
    flat = counts.to_flat()
    for key, value in flat.items():
        assert key.startswith(f"{KEY_PREFIX}/") and len(key.split("/")) in (2, 3, 4)
        assert isinstance(value, (int, float)) or (isinstance(value, list) and all(type(v) is int for v in value))
    back = SubgroupCounts.from_flat({**flat, "num-examples": n, "confusion": [1, 2, 3, 4]})  # other keys ignored
    assert back is not None and back.columns == ["sex", "age"]
    for column in ("sex", "age"):
        for cell, c in counts.cells[column].items():
            assert np.array_equal(back.cells[column][cell].confusion, c.confusion)
            assert np.array_equal(back.cells[column][cell].histogram, c.histogram)
    assert sorted(back.cells["age"]) == ["18-39", "60-79", "unknown"]
    assert SubgroupCounts.from_flat({"num-examples": 3}) is None
    for bad in ({f"{KEY_PREFIX}/name/x/bins": 3}, {f"{KEY_PREFIX}/sex/a b/bins": 3},
                {f"{KEY_PREFIX}/sex/suppressed": -1},
                {f"{KEY_PREFIX}/sex/F": 1}):
        with pytest.raises(ValueError, match="subgroup key"):
            SubgroupCounts.from_flat(bad)


# ---------------------------------------------------------------------------
# Server side: pooled subgroup metrics equal those of pooled predictions; fairlearn as the oracle
# ---------------------------------------------------------------------------


def _federation(seed: int) -> list[dict[str, np.ndarray]]:
    """Three sites with subgroup-dependent model quality (a real gap), every cell large."""
    rng = np.random.default_rng(seed)
    sites = []
    for size in (300, 200, 250):
        sex = rng.choice(np.array(["F", "M"], dtype=object), size)
        age = rng.choice(np.array(["25", "50", "75"], dtype=object), size)
        y = rng.integers(0, 2, size)
        sep = np.where(sex == "F", 0.6, 1.4) + np.where(age == "75", -0.3, 0.0)
        logit = rng.normal(sep * (2 * y - 1) + np.where(sex == "F", -0.4, 0.0), 1.0)
        p1 = 1.0 / (1.0 + np.exp(-logit))
        sites.append({"probs": np.stack([1 - p1, p1], 1), "y": y, "sex": sex, "age": age})
    return sites


def test_pooled_subgroup_metrics_equal_pooled_predictions_and_fairlearn() -> None:
    sites = _federation(4)
    spec = SubgroupSpec(columns=("sex", "age"))
    flats, reports = [], []
    for i, s in enumerate(sites):
        sub = classification_subgroup_counts(s["probs"], s["y"], {"sex": s["sex"], "age": s["age"]}, spec)
        overall = ClassificationCounts.from_predictions(s["probs"], s["y"])
        flat = {"eval-loss": 0.5, "num-examples": len(s["y"]), **overall.to_flat(), **sub.to_flat()}
        flats.append(flat)
        reports.append(SiteEvaluation.from_flat(f"site-{i}", flat, ClassificationCounts.from_flat))
    ev = pool_evaluations(reports)
    thr = ev.pooled["threshold"]
    merged = merge_subgroup_reports(flats)
    assert merged is not None
    report = subgroup_report(merged, threshold=thr, positive_class=1)
    json.dumps(report, allow_nan=False)

    probs = np.concatenate([s["probs"] for s in sites])
    y = np.concatenate([s["y"] for s in sites])
    y_pred = (probs[:, 1] >= thr).astype(int)
    for column in ("sex", "age"):
        group = np.concatenate([s[column] for s in sites])
        col = report["columns"][column]
        assert col["suppressed-cells"] == 0 and col["withheld-cells"] == 0
        for e in col["subgroups"]:
            cell = {"age": {"18-39": "25", "40-59": "50", "60-79": "75"}}.get(column, {}).get(
                e["subgroup"], e["subgroup"])
            m = group == cell
            tp = int(((y_pred == 1) & (y == 1) & m).sum())
            fp = int(((y_pred == 1) & (y == 0) & m).sum())
            tn = int(((y_pred == 0) & (y == 0) & m).sum())
            fn = int(((y_pred == 0) & (y == 1) & m).sum())
            assert (e["tp"], e["fp"], e["tn"], e["fn"], e["n"]) == (tp, fp, tn, fn, int(m.sum()))  # exact
            assert e["sites"] == 3
            assert e["sensitivity"] == tp / (tp + fn) and e["fpr"] == fp / (fp + tn)
            assert e["positive-rate"] == (tp + fp) / m.sum() and e["specificity"] == tn / (tn + fp)
            assert abs(e["auroc"] - roc_auc_score(y[m], probs[m, 1])) < 1e-3
            lo, hi = e["sensitivity-ci"]
            assert lo < e["sensitivity"] < hi
        gaps = col["gaps"]
        sf = group
        assert gaps["equal-opportunity"]["value"] == pytest.approx(
            equal_opportunity_difference(y, y_pred, sensitive_features=sf), abs=1e-12)
        assert gaps["equalized-odds"]["value"] == pytest.approx(
            equalized_odds_difference(y, y_pred, sensitive_features=sf), abs=1e-12)
        assert gaps["demographic-parity"]["value"] == pytest.approx(
            demographic_parity_difference(y, y_pred, sensitive_features=sf), abs=1e-12)
        aurocs = [roc_auc_score(y[sf == g], probs[sf == g, 1]) for g in np.unique(sf)]
        assert abs(gaps["auroc"]["value"] - (max(aurocs) - min(aurocs))) < 2e-3
    sex_gap = report["columns"]["sex"]["gaps"]["equal-opportunity"]
    assert sex_gap["value"] > 0.1 and sex_gap["min"]["subgroup"] == "F"  # the built-in gap is found
    assert sex_gap["min"]["n"] == int((np.concatenate([s["sex"] for s in sites]) == "F").sum())
    assert report["decision"].startswith("probability of class 1 >=")

    rows = fairness_csv_rows(report)
    assert len(rows) == 2 + 3 and all(set(r) == set(FAIRNESS_CSV_FIELDS) for r in rows)
    assert [(r["column"], r["subgroup"]) for r in rows] == [
        ("sex", "F"), ("sex", "M"), ("age", "18-39"), ("age", "40-59"), ("age", "60-79")]


def test_unknown_is_reported_but_not_ranked_and_suppressed_cells_add_up() -> None:
    rng = np.random.default_rng(5)
    flats = []
    for sizes in ((30, 30, 12), (40, 5, 20)):  # site 2: only 5 men -> suppressed, and its smallest other cell withheld
        sex = np.array(["F"] * sizes[0] + ["M"] * sizes[1] + [""] * sizes[2], dtype=object)
        y = rng.integers(0, 2, len(sex))
        flats.append(classification_subgroup_counts(_probs(rng, y, 1.0), y, {"sex": sex}, SubgroupSpec()).to_flat())
    merged = merge_subgroup_reports(flats)
    report = subgroup_report(merged, threshold=0.5)
    col = report["columns"]["sex"]
    assert [e["subgroup"] for e in col["subgroups"]] == ["F", "M", "unknown"]
    assert [e["sites"] for e in col["subgroups"]] == [2, 1, 1]
    assert [e["n"] for e in col["subgroups"]] == [70, 30, 12]
    assert col["suppressed-cells"] == 1 and col["withheld-cells"] == 1
    assert col["excluded-from-gaps"] == ["unknown"]
    assert {col["gaps"]["equal-opportunity"]["max"]["subgroup"], col["gaps"]["equal-opportunity"]["min"]["subgroup"]} \
        <= {"F", "M"}
    one = subgroup_report(merge_subgroup_reports([flats[1]]), threshold=0.5)["columns"]["sex"]
    assert one["gaps"]["equal-opportunity"]["value"] is None and one["gaps"]["equal-opportunity"]["groups"] == 1
    assert subgroup_report(None)["columns"] == {} and merge_subgroup_reports([{"eval-loss": 1.0}]) is None


def test_multiclass_gaps_are_one_vs_rest_macro_and_match_fairlearn_per_class() -> None:
    rng = np.random.default_rng(6)
    n = 900
    sex = rng.choice(np.array(["F", "M"], dtype=object), n)
    y = rng.integers(0, 3, n)
    logits = rng.normal(0.0, 1.0, (n, 3))
    logits[np.arange(n), y] += np.where(sex == "F", 0.8, 2.0)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    halves = [slice(0, 400), slice(400, n)]
    flats = [classification_subgroup_counts(probs[h], y[h], {"sex": sex[h]}, SubgroupSpec()).to_flat() for h in halves]
    report = subgroup_report(merge_subgroup_reports(flats), threshold=0.3)  # threshold ignored: argmax
    assert report["decision"].startswith("argmax")
    gaps = report["columns"]["sex"]["gaps"]
    pred = probs.argmax(1)
    eod = [equal_opportunity_difference(y == k, pred == k, sensitive_features=sex) for k in range(3)]
    eqo = [equalized_odds_difference(y == k, pred == k, sensitive_features=sex) for k in range(3)]
    dpd = [demographic_parity_difference(y == k, pred == k, sensitive_features=sex) for k in range(3)]
    for name, want in (("equal-opportunity", eod), ("equalized-odds", eqo), ("demographic-parity", dpd)):
        assert [pc["value"] for pc in gaps[name]["per-class"]] == pytest.approx(want, abs=1e-12)
        assert gaps[name]["value"] == pytest.approx(np.mean(want), abs=1e-12)
    f = next(e for e in report["columns"]["sex"]["subgroups"] if e["subgroup"] == "F")
    assert f["n"] == int((sex == "F").sum())
    assert f["accuracy"] == pytest.approx(((pred == y) & (sex == "F")).sum() / f["n"])
    json.dumps(report, allow_nan=False)


def test_segmentation_subgroups_pool_exactly_and_report_dice_gaps() -> None:
    rng = np.random.default_rng(7)
    n = 40
    target = np.zeros((n, 16, 16), bool)
    target[:, 4:12, 4:12] = True
    pred = target.copy()
    sex = np.array(["F", "M"] * (n // 2), dtype=object)
    for i in range(n):  # women: worse masks
        shift = int(rng.integers(2, 4)) if sex[i] == "F" else int(rng.integers(0, 2))
        pred[i] = np.roll(target[i], shift, axis=1)
    halves = [slice(0, 24), slice(24, n)]
    flats = [segmentation_subgroup_counts(pred[h], target[h], {"sex": sex[h]}, SubgroupSpec(min_cell=5)).to_flat()
             for h in halves]
    report = subgroup_report(merge_subgroup_reports(flats))
    assert report["kind"] == "segmentation"
    by = {e["subgroup"]: e for e in report["columns"]["sex"]["subgroups"]}
    for g in ("F", "M"):
        m = sex == g
        whole = SegmentationCounts.empty()
        whole.update(pred[m], target[m])
        assert by[g]["n"] == int(m.sum()) and by[g]["dice"] == whole.metrics()["dice"]  # bit-exact after merging
    gap = report["columns"]["sex"]["gaps"]["dice"]
    assert gap["min"]["subgroup"] == "F" and gap["value"] == pytest.approx(by["M"]["dice"] - by["F"]["dice"])
    rows = fairness_csv_rows(report)
    assert rows[0]["dice"] == by["F"]["dice"] and rows[0]["auroc"] is None


def test_fairness_summary_bundles_sites_and_subgroups() -> None:
    sites = _federation(8)
    flats, reports = [], []
    for i, s in enumerate(sites):
        sub = classification_subgroup_counts(s["probs"], s["y"], {"sex": s["sex"]}, SubgroupSpec())
        flat = {"eval-loss": 0.4, **ClassificationCounts.from_predictions(s["probs"], s["y"]).to_flat(),
                **sub.to_flat()}
        flats.append(flat)
        reports.append(SiteEvaluation.from_flat(f"site-{i}", flat, ClassificationCounts.from_flat))
    ev = pool_evaluations(reports)
    out = fairness_summary(ev.pooled, ev.per_site, merge_subgroup_reports(flats), metric="auroc")
    assert out["sites"]["metric"] == "auroc" and out["sites"]["num-sites"] == 3
    assert out["subgroups"]["threshold"] == ev.pooled["threshold"]
    json.dumps(out, allow_nan=False)
