"""Fairness summaries from counts: across sites and across patient subgroups.

Two views, both computed at the server from what sites already send (counts,
never per-image data):

* **Across sites** (:func:`across_sites`): each site's primary metric (AUROC
  for classification, Dice for segmentation) and size; the worst and best
  site, their gap, the standard deviation, Jain's fairness index and each
  site's gap to the pooled figure.
* **Across subgroups** (:func:`subgroup_report`): the sites' per-subgroup
  counts (:mod:`shared.metrics.subgroups`, with small cells suppressed at the
  site) merged, and per subgroup: n, AUROC, sensitivity (TPR), specificity,
  FPR and positive-prediction rate at the operating threshold (Wilson 95 %
  intervals for the rates), or Dice/IoU/HD95 for segmentation; per column the
  gaps between subgroups.

Gap definitions (between the subgroups of one column; checked against
fairlearn in the tests):

* equal-opportunity difference: max - min TPR (fairlearn
  ``equal_opportunity_difference``);
* equalised-odds difference: max(TPR gap, FPR gap) (fairlearn
  ``equalized_odds_difference``, ``agg="worst_case"``);
* demographic-parity difference: max - min positive-prediction rate (fairlearn
  ``demographic_parity_difference``);
* AUROC gap: max - min AUROC (Dice and IoU gaps for segmentation).

Subgroups ``unknown`` (missing value) and ``other`` (not a categorical token)
are reported but left out of the gaps: they are not patient groups. A gap
needs two subgroups where the rate is defined (e.g. TPR needs positives); it
is ``None`` otherwise. Gaps are descriptive: the max - min over k groups is
biased upwards for small groups, so each gap names the two subgroups with
their sizes, and the per-subgroup intervals show how uncertain the rates are.

Multi-class tasks (argmax decisions, no threshold): every class k is treated
one-vs-rest (decision "predicted k", outcome "label k"); the per-class
TPR/FPR/positive-rate/AUROC gaps are reported and each gap's ``value`` is
their macro average over the classes where it is defined. A single
demographic-parity figure over all classes is not defined otherwise (the
mean positive rate over classes is always 1/C), hence the one-vs-rest macro.

Everything returned is JSON-ready (NaN becomes ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest

from shared.metrics.classification import ClassificationCounts
from shared.metrics.segmentation import SegmentationCounts
from shared.metrics.subgroups import NOT_IN_GAPS, SubgroupCounts

__all__ = [
    "FAIRNESS_CSV_FIELDS",
    "across_sites",
    "across_sites_from_metrics",
    "fairness_csv_rows",
    "fairness_summary",
    "jain_index",
    "subgroup_report",
    "wilson_interval",
]

_NAN = float("nan")

FAIRNESS_CSV_FIELDS: tuple[str, ...] = (
    "column", "subgroup", "n", "n-positive", "n-negative", "sites", "in-gaps",
    "auroc", "sensitivity", "sensitivity-low", "sensitivity-high", "specificity",
    "fpr", "fpr-low", "fpr-high", "positive-rate", "positive-rate-low", "positive-rate-high",
    "accuracy", "dice", "iou", "hd95", "hd95-mm",
)
"""Header of ``fairness.csv`` (one row per column and subgroup; empty = not applicable/undefined)."""


def _num(value: object) -> float | None:
    """A JSON-ready float (NaN / inf -> None)."""
    if value is None:
        return None
    v = float(value)  # type: ignore[arg-type]
    return v if math.isfinite(v) else None


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else _NAN


# ---------------------------------------------------------------------------
# Across sites
# ---------------------------------------------------------------------------


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index ``(sum x)^2 / (k * sum x^2)`` of non-negative values.

    1 when all values are equal, ``1/k`` when one value holds everything;
    NaN for no values or all zeros.

    Raises
    ------
    ValueError
        If a value is negative or not finite.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size and (not np.isfinite(x).all() or (x < 0).any()):
        raise ValueError(f"Jain's index needs finite non-negative values; got {x.tolist()}")
    sq = float(np.sum(x * x))
    if x.size == 0 or sq == 0.0:
        return _NAN
    return float(np.sum(x)) ** 2 / (x.size * sq)


def across_sites(values: Mapping[str, float], sizes: Mapping[str, int], pooled: float, *,
                 metric: str) -> dict[str, Any]:
    """Fairness of one metric across sites.

    Parameters
    ----------
    values : mapping
        Site id -> the site's metric (NaN when undefined at the site, e.g.
        AUROC of a site with one class).
    sizes : mapping
        Site id -> validation images of the site.
    pooled : float
        The metric on all sites' counts pooled.
    metric : str
        Its name (``"auroc"``, ``"dice"``...); higher must be better.

    Returns
    -------
    dict
        ``metric``, ``pooled``, ``sites`` (one row per site, sorted by id:
        ``site``, ``n``, ``value``, ``gap-to-pooled`` = value - pooled),
        ``num-sites``, ``num-sites-defined``, ``worst-site``, ``worst``,
        ``best-site``, ``best``, ``gap`` (best - worst), ``mean`` (unweighted),
        ``std`` (population standard deviation over sites, ddof=0),
        ``jain-index``. Summaries use the sites where the value is defined;
        ties go to the first site id. ``None`` where undefined.
    """
    missing = sorted(set(values) ^ set(sizes))
    if missing:
        raise ValueError(f"values and sizes must name the same sites; mismatched: {missing}")
    rows = []
    for site in sorted(values):
        v = float(values[site])
        rows.append({"site": site, "n": int(sizes[site]), "value": _num(v),
                     "gap-to-pooled": _num(v - float(pooled))})
    defined = [(r["value"], r["site"]) for r in rows if r["value"] is not None]
    out: dict[str, Any] = {"metric": metric, "pooled": _num(pooled), "sites": rows,
                           "num-sites": len(rows), "num-sites-defined": len(defined)}
    if not defined:
        out.update({"worst-site": None, "worst": None, "best-site": None, "best": None, "gap": None,
                    "mean": None, "std": None, "jain-index": None})
        return out
    worst = min(defined, key=lambda t: (t[0], t[1]))
    best = min(defined, key=lambda t: (-t[0], t[1]))
    x = np.array([v for v, _ in defined], dtype=np.float64)
    out.update({
        "worst-site": worst[1], "worst": worst[0], "best-site": best[1], "best": best[0],
        "gap": best[0] - worst[0], "mean": float(x.mean()), "std": float(x.std()),
        "jain-index": _num(jain_index(x.tolist())) if (x >= 0).all() else None,
    })
    return out


def across_sites_from_metrics(pooled: Mapping[str, float], per_site: Mapping[str, Mapping[str, float]],
                              metric: str) -> dict[str, Any]:
    """:func:`across_sites` on the output of ``pool_evaluations`` (``.pooled``, ``.per_site``).

    ``metric`` is the task's primary metric (its view's ``primary``); sizes
    are each site's ``num-examples``.
    """
    name = metric
    values = {s: float(m.get(name, _NAN)) for s, m in per_site.items()}
    sizes = {s: int(m.get("num-examples", 0)) for s, m in per_site.items()}
    return across_sites(values, sizes, float(pooled.get(name, _NAN)), metric=name)


# ---------------------------------------------------------------------------
# Subgroups
# ---------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int) -> tuple[float | None, float | None]:
    """Wilson score 95 % interval of a proportion (``scipy.stats.binomtest``); ``(None, None)`` for no trials."""
    if trials <= 0:
        return None, None
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _binary_rates(tp: int, fp: int, tn: int, fn: int) -> dict[str, Any]:
    n_pos, n_neg, n = tp + fn, fp + tn, tp + fp + tn + fn
    sens_ci, fpr_ci, ppr_ci = wilson_interval(tp, n_pos), wilson_interval(fp, n_neg), wilson_interval(tp + fp, n)
    return {
        "n": n, "n-positive": n_pos, "n-negative": n_neg, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": _num(_ratio(tp, n_pos)), "sensitivity-ci": list(sens_ci),
        "specificity": _num(_ratio(tn, n_neg)),
        "fpr": _num(_ratio(fp, n_neg)), "fpr-ci": list(fpr_ci),
        "positive-rate": _num(_ratio(tp + fp, n)), "positive-rate-ci": list(ppr_ci),
        "accuracy": _num(_ratio(tp + tn, n)),
    }


def _one_vs_rest_argmax(counts: ClassificationCounts, k: int) -> tuple[int, int, int, int]:
    cm = counts.confusion
    tp = int(cm[k, k])
    fn = int(cm[k, :].sum()) - tp
    fp = int(cm[:, k].sum()) - tp
    return tp, fp, int(cm.sum()) - tp - fn - fp, fn


def _binary_entry(counts: ClassificationCounts, threshold: float | None, k: int) -> dict[str, Any]:
    if threshold is not None and not math.isnan(threshold):
        at = counts.metrics_at_threshold(threshold, positive_class=k)
        tp, fp, tn, fn = (int(at[name]) for name in ("tp", "fp", "tn", "fn"))
    else:
        tp, fp, tn, fn = _one_vs_rest_argmax(counts, k)
    entry = _binary_rates(tp, fp, tn, fn)
    entry["auroc"] = _num(counts.metrics(positive_class=k)["auroc"])
    return entry


def _multiclass_entry(counts: ClassificationCounts) -> dict[str, Any]:
    m = counts.metrics()
    per_class = []
    for k in range(counts.num_classes):
        tp, fp, tn, fn = _one_vs_rest_argmax(counts, k)
        rates = _binary_rates(tp, fp, tn, fn)
        rates["auroc"] = _num(m[f"auroc-{k}"])
        per_class.append({"class": k, **{key: rates[key] for key in (
            "n-positive", "sensitivity", "sensitivity-ci", "fpr", "fpr-ci", "positive-rate", "positive-rate-ci",
            "auroc")}})
    return {
        "n": counts.num_examples, "accuracy": _num(m["accuracy"]), "auroc": _num(m["auroc"]),
        "sensitivity": _num(m["sensitivity"]), "specificity": _num(m["specificity"]),
        "fpr": _num(_mean_defined([c["fpr"] for c in per_class])), "per-class": per_class,
    }


def _seg_entry(counts: SegmentationCounts) -> dict[str, Any]:
    m = counts.metrics()
    return {"n": counts.n_images, "dice": _num(m["dice"]), "iou": _num(m["iou"]), "hd95": _num(m["hd95"]),
            "hd95-mm": _num(m["hd95-mm"])}


def _mean_defined(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(sum(v) / len(v)) if v else None


def _extreme(entries: Sequence[dict[str, Any]], rate: str) -> dict[str, Any]:
    """Max - min of ``rate`` over the entries where it is defined, naming both subgroups and their sizes."""
    defined = [e for e in entries if e.get(rate) is not None]
    if len(defined) < 2:
        return {"value": None, "groups": len(defined),
                "reason": "needs two subgroups where it is defined (outside unknown/other)"}
    hi = max(defined, key=lambda e: e[rate])
    lo = min(defined, key=lambda e: e[rate])

    def who(e: dict[str, Any]) -> dict[str, Any]:
        return {"subgroup": e["subgroup"], "value": e[rate], "n": e["n"],
                **({"n-positive": e["n-positive"], "n-negative": e["n-negative"]} if "n-positive" in e else {})}

    return {"value": hi[rate] - lo[rate], "groups": len(defined), "max": who(hi), "min": who(lo)}


def _binary_gaps(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    tpr = _extreme(entries, "sensitivity")
    fpr = _extreme(entries, "fpr")
    both = [g["value"] for g in (tpr, fpr) if g["value"] is not None]
    eq_odds = {"value": max(both) if len(both) == 2 else None,
               "tpr-gap": tpr["value"], "fpr-gap": fpr["value"], "tpr": tpr, "fpr": fpr}
    return {"equal-opportunity": tpr, "equalized-odds": eq_odds,
            "demographic-parity": _extreme(entries, "positive-rate"), "auroc": _extreme(entries, "auroc")}


def _multiclass_gaps(entries: Sequence[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    per_class = []
    for k in range(num_classes):
        flat = [{"subgroup": e["subgroup"], "n": e["n"],
                 **{key: v for key, v in e["per-class"][k].items() if key != "class"}}
                for e in entries]
        for f in flat:
            f["n-negative"] = f["n"] - f["n-positive"]
        per_class.append(_binary_gaps(flat))
    out: dict[str, Any] = {}
    for name in ("equal-opportunity", "equalized-odds", "demographic-parity", "auroc"):
        values = [pc[name]["value"] for pc in per_class]
        out[name] = {"value": _mean_defined(values), "aggregate": "one-vs-rest macro over classes",
                     "per-class": [{"class": k, **pc[name]} for k, pc in enumerate(per_class)]}
    return out


def subgroup_report(counts: SubgroupCounts | None, *, threshold: float | None = None,
                    positive_class: int | None = 1) -> dict[str, Any]:
    """Per-subgroup metrics and per-column gaps from merged subgroup counts.

    Parameters
    ----------
    counts : SubgroupCounts or None
        All sites' subgroup counts merged (see
        :func:`shared.metrics.subgroups.merge_subgroup_reports`).
    threshold : float or None
        Binary classification: the operating threshold on the probability of
        ``positive_class`` (the one chosen on the pooled validation counts,
        ``pooled["threshold"]``); None = argmax decisions. Ignored otherwise.
    positive_class : int or None
        The positive class of a binary task.

    Returns
    -------
    dict
        ``{"version": 1, "kind", "decision", "min-cell", "columns": {column:
        {"subgroups": [...], "gaps": {...}, "suppressed-cells", "withheld-cells",
        "excluded-from-gaps": [...]}}}``; ``columns`` is empty when no site
        sent subgroup counts. Binary subgroups carry ``n``, ``n-positive``,
        ``n-negative``, ``sites``, ``auroc``, ``sensitivity`` (+ ``-ci``),
        ``specificity``, ``fpr`` (+ ``-ci``), ``positive-rate`` (+ ``-ci``),
        ``accuracy`` and the confusion counts; gaps ``equal-opportunity``,
        ``equalized-odds``, ``demographic-parity``, ``auroc``. Segmentation:
        ``dice``, ``iou``, ``hd95``, ``hd95-mm``; gaps ``dice``, ``iou``.
    """
    out: dict[str, Any] = {"version": 1, "kind": None, "decision": None,
                           "min-cell": counts.min_cell if counts is not None else None, "columns": {}}
    if counts is None:
        return out
    k = 1 if positive_class is None else int(positive_class)
    for column in counts.columns:
        cells = counts.cells.get(column, {})
        entries: list[dict[str, Any]] = []
        num_classes = None
        for cell in sorted(cells, key=_cell_order):
            c = cells[cell]
            if isinstance(c, SegmentationCounts):
                entry, kind = _seg_entry(c), "segmentation"
            elif c.num_classes == 2:
                entry, kind = _binary_entry(c, threshold, k), "classification"
            else:
                entry, kind, num_classes = _multiclass_entry(c), "classification", c.num_classes
            out["kind"] = kind
            entries.append({"subgroup": cell, "sites": int(counts.sites.get(column, {}).get(cell, 0)),
                            "in-gaps": cell not in NOT_IN_GAPS, **entry})
        ranked = [e for e in entries if e["in-gaps"]]
        if not entries:
            gaps: dict[str, Any] = {}
        elif out["kind"] == "segmentation":
            gaps = {"dice": _extreme(ranked, "dice"), "iou": _extreme(ranked, "iou")}
        elif num_classes is not None:
            gaps = _multiclass_gaps(ranked, num_classes)
        else:
            gaps = _binary_gaps(ranked)
        out["columns"][column] = {
            "subgroups": entries, "gaps": gaps,
            "suppressed-cells": int(counts.suppressed.get(column, 0)),
            "withheld-cells": int(counts.withheld.get(column, 0)),
            "excluded-from-gaps": [e["subgroup"] for e in entries if not e["in-gaps"]],
        }
    if out["kind"] == "classification":
        multiclass = any("per-class" in e for col in out["columns"].values() for e in col["subgroups"])
        if multiclass:
            out["decision"] = "argmax; one-vs-rest per class, gaps macro-averaged over classes"
        elif threshold is not None and not math.isnan(threshold):
            out["decision"] = f"probability of class {k} >= {threshold:g}"
            out["threshold"] = float(threshold)
        else:
            out["decision"] = "argmax"
    return out


def _cell_order(cell: str) -> tuple[int, float, str]:
    """Known cells first, age bands numerically, unknown/other last."""
    if cell in NOT_IN_GAPS:
        return (2, 0.0, cell)
    head = cell.split("-")[0].rstrip("+")
    try:
        return (0, float(head), cell)
    except ValueError:
        return (1, 0.0, cell)


def fairness_csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of ``fairness.csv`` from :func:`subgroup_report`: one per column and subgroup.

    Keys are :data:`FAIRNESS_CSV_FIELDS`; values not applicable to the task
    (or undefined) are ``None``. Multi-class rows carry the macro figures
    (per-class ones are in the JSON block only).
    """
    rows = []
    for column, col in report.get("columns", {}).items():
        for e in col["subgroups"]:
            sens, fpr, ppr = e.get("sensitivity-ci") or [None, None], e.get("fpr-ci") or [None, None], \
                e.get("positive-rate-ci") or [None, None]
            row = {name: None for name in FAIRNESS_CSV_FIELDS}
            row.update({
                "column": column, "subgroup": e["subgroup"], "n": e["n"], "sites": e["sites"],
                "in-gaps": int(bool(e["in-gaps"])),
                "n-positive": e.get("n-positive"), "n-negative": e.get("n-negative"),
                "auroc": e.get("auroc"), "sensitivity": e.get("sensitivity"),
                "sensitivity-low": sens[0], "sensitivity-high": sens[1], "specificity": e.get("specificity"),
                "fpr": e.get("fpr"), "fpr-low": fpr[0], "fpr-high": fpr[1],
                "positive-rate": e.get("positive-rate"), "positive-rate-low": ppr[0], "positive-rate-high": ppr[1],
                "accuracy": e.get("accuracy"), "dice": e.get("dice"), "iou": e.get("iou"),
                "hd95": e.get("hd95"), "hd95-mm": e.get("hd95-mm"),
            })
            rows.append(row)
    return rows


def fairness_summary(pooled: Mapping[str, float], per_site: Mapping[str, Mapping[str, float]],
                     subgroups: SubgroupCounts | None, *, metric: str,
                     positive_class: int | None = 1) -> dict[str, Any]:
    """The ``fairness`` block of ``summary.json``: across sites and across subgroups.

    Parameters
    ----------
    pooled, per_site : mapping
        ``RoundEvaluation.pooled`` and ``.per_site`` of the round (see
        :func:`shared.metrics.federated.pool_evaluations`); the operating
        threshold is ``pooled["threshold"]`` when present.
    subgroups : SubgroupCounts or None
        The merged subgroup counts of the same round's replies.
    metric : str
        The task's primary metric (``auroc`` or ``dice``: its view's ``primary``).
    positive_class : int or None
        The task's positive class (binary tasks).

    Returns
    -------
    dict
        ``{"sites": across_sites_from_metrics(...), "subgroups": subgroup_report(...)}``.
    """
    thr = pooled.get("threshold")
    return {
        "sites": across_sites_from_metrics(pooled, per_site, metric),
        "subgroups": subgroup_report(subgroups, threshold=None if thr is None else float(thr),
                                     positive_class=positive_class),
    }
