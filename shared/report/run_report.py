"""``report.html``: one self-contained page per run, for the people who decide from it.

Sections (each an HTML ``<section id=...>``, see :data:`SECTION_IDS`):

``run``              run settings, data per site (train/validation, per class, quarantined)
``learning-curves``  the primary metric per round: pooled validation, each site, holdout sites,
                     test set; training and validation loss
``classification``   ROC and precision-recall curves with the operating point, reliability diagram
                     and ECE, confusion matrix at the threshold (classification tasks)
``segmentation``     Dice / IoU / HD95 per site and over rounds (segmentation tasks)
``fairness``         across sites and across patient subgroups, with a plot
``privacy``          epsilon per site over rounds (DP-SGD), central DP, or "none"
``gradcam``          Grad-CAM thumbnails of a simulation's ``--explain-dir`` (when given)
``model-card``       the model card (also ``model-card.json``)

Everything is drawn from the results folder: the figures of the last
evaluated round come from the merged counts in ``counts.json`` (score
histograms and confusion counts summed over sites), the rest from the round
records. Labels say which data a figure is from ("validation" = the training
sites' own validation splits, "holdout sites", "test set").
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.formatting import fmt_metric
from shared.metrics.classification import ClassificationCounts
from shared.metrics.curves import operating_point, pr_points, reliability_bins, roc_points
from shared.report import figures
from shared.report.html import Section, esc, figure, kv_table, note, num, page, para, table
from shared.report.model_card import build_model_card
from shared.report.run import RunData, load_run

logger = logging.getLogger(__name__)

__all__ = ["SECTION_IDS", "build_run_report", "write_run_report"]

SECTION_IDS = ("run", "learning-curves", "classification", "segmentation", "fairness", "privacy", "gradcam",
               "model-card")
"""Every section id a report may have (``classification`` and ``segmentation`` by the task's kind)."""

MAX_THUMBNAILS = 24
THUMB_SIDE = 160

SET_LABELS = {"validation": "validation (pooled over training sites)", "holdout": "holdout sites",
              "test": "test set"}


# ---------------------------------------------------------------------------
# Run and data
# ---------------------------------------------------------------------------


def _run_section(data: RunData) -> Section:
    rc, task = data.run_config, data.task
    dp = ("off" if not rc.get("dp.enabled") else
          f"DP-SGD at every site (noise multiplier {rc.get('dp.noise-multiplier')}, target epsilon "
          f"{rc.get('dp.target-epsilon')}, max grad norm {rc.get('dp.max-grad-norm')})")
    central = rc.get("central-dp.mode", "none")
    sites = data.site_data
    holdout = sorted(s for s, v in sites.items() if v.get("role") == "holdout")
    if data.phantoms:
        source = f"synthetic phantoms ({rc.get('phantom-count')} images, seed {rc.get('seed')}), no patient data"
    elif data.simulated:
        source = "a real dataset split across simulated sites (its path is in config.json, not in this report)"
    else:
        source = "each hospital's own images (the server never sees them; counts below come from the sites)"
    pairs = [
        ("task", f"{task.name}: {task.description}"),
        ("model", f"{rc.get('model')} at {rc.get('image-size')} px, {task.in_channels} channel(s)"),
        ("classes", ", ".join(data.class_names) + (f" (positive: {data.class_names[data.positive_class]})"
                                                   if data.positive_class is not None else "")),
        ("strategy", f"{rc.get('strategy')}" + (f", proximal mu {rc.get('proximal-mu')}"
                                                 if rc.get("strategy") == "fedprox" else "")),
        ("rounds", f"{len(data.rounds)} of {rc.get('num-server-rounds')} planned; {rc.get('local-epochs')} local "
                   f"epoch(s), batch {rc.get('batch-size')}, {rc.get('optimizer')} lr {rc.get('lr')}"),
        ("sites", f"{len(sites) - len(holdout)} training site(s)" + (f", {len(holdout)} holdout site(s) "
                                                                   f"({', '.join(holdout)})" if holdout else "")),
        ("data", source),
        ("partition", f"{rc.get('partition')}, validation fraction {rc.get('val-fraction')}"
                      if data.simulated else "each site's own data, its own train/validation split"),
        ("test set", "yes (server-side test-path, scored each round)" if data.last.get("test") else "none"),
        ("differential privacy", dp + ("" if central == "none" else f"; central DP: {central}")),
        ("seed", rc.get("seed")),
        ("wall time", f"{fmt_metric(data.summary.get('wall-seconds'), 0)} s" if data.summary else "run not finished"),
    ]
    headline = str(data.summary.get("headline") or "no round has been evaluated yet")
    body = [para(headline[:1].upper() + headline[1:] + "."),
            kv_table(pairs, caption="Run settings")]
    names = data.class_names
    per_class = data.view.name != "segmentation"
    headers = ["site", "role", "training images", "validation images"]
    if per_class:
        headers += [f"training per class ({', '.join(names)})", f"validation per class ({', '.join(names)})"]
    headers.append("quarantined files")
    rows = []
    totals = {"train": 0, "validation": 0, "quarantined": 0}
    for site, info in sorted(sites.items()):
        role = info.get("role", "train")
        row = [site, "holdout (never trains)" if role == "holdout" else "train",
               num(info.get("train")), num(info.get("validation"))]
        if per_class:
            row += [" / ".join(str(v) for v in info["train-classes"]) if info.get("train-classes") else "n/a",
                    " / ".join(str(v) for v in info["validation-classes"]) if info.get("validation-classes") else "n/a"]
        row.append(num(info.get("quarantined")))
        rows.append(row)
        for k in totals:
            totals[k] += int(info.get(k) or 0)
    rows.append(["all sites", "", str(totals["train"]), str(totals["validation"]),
                 *(["", ""] if per_class else []), str(totals["quarantined"])])
    body.append(table(headers, rows, caption="Data per site (from each site's roll call: counts only)",
                      numeric=[False, False, True, True, *([False, False] if per_class else []), True]))
    if per_class and not any(v.get("train-classes") for v in sites.values()):
        body.append(note("Per-class counts are not known: the sites did not report them (older medfed sites)."))
    body.append(note("A holdout site's images are all used for testing; its 'training' and 'validation' counts are "
                     "its own split sizes, not images trained on." if holdout else
                     "Validation images are each training site's own held-back split: never trained on, but from "
                     "the same site as its training images."))
    return Section("run", "Run and data", "".join(body))


# ---------------------------------------------------------------------------
# Learning curves
# ---------------------------------------------------------------------------


def _series(rounds: Sequence[Mapping[str, Any]], get: Any) -> list[float]:
    out = []
    for r in rounds:
        v = get(r)
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return out


def _curves_section(data: RunData) -> Section:
    rounds = data.rounds
    if not rounds:
        return Section("learning-curves", "Learning curves", note("No round finished.", warn=True))
    view, p = data.view, data.view.primary
    x = [r["round"] for r in rounds]
    label = view.primary_label
    metric = [figures.Series(x, _series(rounds, lambda r: r.get("evaluate", {}).get(p)),
                             "validation, pooled", bold=True)]
    site_names = sorted({s for r in rounds for s in r.get("evaluate-sites", {})})
    for s in site_names:
        metric.append(figures.Series(x, _series(rounds, lambda r, s=s: r.get("evaluate-sites", {}).get(s, {}).get(p)),
                                     f"validation, {s}"))
    if any(r.get("holdout") for r in rounds):
        metric.append(figures.Series(x, _series(rounds, lambda r: r.get("holdout", {}).get(p)), "holdout sites",
                                     bold=True, dashed=True))
    if any(r.get("test") for r in rounds):
        metric.append(figures.Series(x, _series(rounds, lambda r: r.get("test", {}).get(p)), "test set",
                                     bold=True, dashed=True))
    loss = [figures.Series(x, _series(rounds, lambda r: r.get("train", {}).get("train-loss")),
                           "training loss (pooled)", bold=True),
            figures.Series(x, _series(rounds, lambda r: r.get("evaluate", {}).get("eval-loss")),
                           "validation loss (pooled)", dashed=True)]
    ylim = (0.0, 1.0) if p in ("auroc", "dice") else None
    png = figures.line_panels([figures.Panel(f"{label} per round", "round", label, metric, ylim),
                               figures.Panel("loss per round", "round", "loss", loss)])
    body = [figure(png, f"{label} and loss per round",
                   f"Left: {label} of the global model after each round on the training sites' validation splits "
                   "(pooled and per site), holdout sites and the test set where present. Right: example-weighted "
                   "training loss and validation loss.")]
    if data.run_config.get("dp.enabled"):
        body.append(note("With DP-SGD the sites keep their training loss to themselves (it is not a DP statistic): "
                         "the training-loss curve is empty."))
    headers = ["round", "training loss", f"validation {label}"]
    thr = view.name == "binary"
    if thr:
        headers += ["threshold", "sensitivity@thr", "specificity@thr"]
    headers += ["holdout " + label, "test " + label, "rejected replies", "round s"]
    rows = []
    for r in rounds:
        ev = r.get("evaluate", {})
        row = [r["round"], num(r.get("train", {}).get("train-loss")), num(ev.get(p))]
        if thr:
            row += [num(ev.get("threshold")), num(ev.get("sensitivity@thr")), num(ev.get("specificity@thr"))]
        row += [num(r.get("holdout", {}).get(p)), num(r.get("test", {}).get(p)),
                len(r.get("train-rejected", [])) + len(r.get("evaluate-rejected", [])), num(r.get("round-s"), 1)]
        rows.append(row)
    body.append(table(headers, rows, caption="Rounds", numeric=[True] * len(headers)))
    return Section("learning-curves", "Learning curves", "".join(body))


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


def _binary_curve(name: str, counts: ClassificationCounts, k: int, threshold: float | None) -> figures.Curve:
    pos, neg = counts.score_histograms(k)
    fpr, tpr, _ = roc_points(pos, neg)
    rec, prec, _ = pr_points(pos, neg)
    m = counts.metrics(positive_class=k)
    n_pos, n = float(pos.sum()), float(pos.sum() + neg.sum())
    op = operating_point(pos, neg, threshold) if threshold is not None else None
    half = operating_point(pos, neg, 0.5)
    return figures.Curve(SET_LABELS.get(name, name), fpr.tolist(), tpr.tolist(), rec.tolist(), prec.tolist(),
                         auroc=_finite(m.get("auroc")), auprc=_finite(m.get("auprc")), operating=op,
                         prevalence=n_pos / n if n else None,
                         extra_points=([{"fpr": half["fpr"], "tpr": half["tpr"], "label": "threshold 0.5"}]
                                       if threshold is not None and math.isfinite(half["fpr"]) else []))


def _finite(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def _confusion_at(counts: ClassificationCounts, k: int, threshold: float | None) -> list[list[int]]:
    """2x2 confusion matrix in class order at ``threshold`` on the probability of class ``k`` (argmax if None)."""
    if threshold is None:
        return counts.confusion_matrix()
    at = counts.metrics_at_threshold(threshold, positive_class=k)
    tp, fp, tn, fn = (int(at[x]) for x in ("tp", "fp", "tn", "fn"))
    m = [[0, 0], [0, 0]]
    neg = 1 - k
    m[k][k], m[k][neg], m[neg][k], m[neg][neg] = tp, fn, fp, tn
    return m


def _classification_section(data: RunData) -> Section:
    counts = {k: v for k, v in data.counts.items() if isinstance(v, ClassificationCounts)}
    val = counts.get("validation")
    if val is None:
        return Section("classification", "Classification: ROC, precision-recall, calibration, confusion", note(
            "No merged validation counts in this results folder (counts.json is written from medfed 0.1 on, after "
            "each evaluated round): the curves cannot be drawn. The per-round figures are in the learning curves.",
            warn=True))
    names, thr, k = data.class_names, data.threshold, data.positive_class
    body = [para(f"From the merged counts of round {data.counts_round}: every site's score histograms (1000 bins) "
                 "and confusion counts summed, so these are the curves of all validation images pooled, up to the "
                 "binning of scores. No per-image score ever left a site.")]
    if k is not None:
        curves = [_binary_curve(n, c, k, thr) for n, c in counts.items()]
        body.append(figure(figures.roc_pr(curves), "ROC and precision-recall curves",
                           f"Scores: probability of '{names[k]}'. Star: the operating threshold "
                           f"{fmt_metric(thr)} chosen on the pooled validation counts ({data.task.threshold_method}); "
                           "open circle: threshold 0.5. Holdout sites and the test set are scored at the validation "
                           "threshold."))
        rows = []
        for name, c in counts.items():
            m = c.metrics(positive_class=k, threshold=thr)
            rows.append([SET_LABELS.get(name, name), int(c.num_examples), num(m.get("auroc")), num(m.get("auprc")),
                         num(m.get("ece")), num(thr), num(m.get("sensitivity@thr")), num(m.get("specificity@thr")),
                         num(m.get("precision@thr")), num(m.get("accuracy@thr")), num(m.get("sensitivity")),
                         num(m.get("specificity"))])
        body.append(table(["evaluated on", "images", "AUROC", "AUPRC", "ECE", "threshold", "sensitivity@thr",
                           "specificity@thr", "precision@thr", "accuracy@thr", "sensitivity@0.5", "specificity@0.5"],
                          rows, caption="Figures from the merged counts", numeric=[False] + [True] * 11))
        pos, neg = val.score_histograms(k)
        body.append(figure(figures.reliability_diagram(reliability_bins(pos, neg), _finite(val.metrics(k)["ece"]),
                                                       f"reliability of P({names[k]}), validation"),
                           "reliability diagram",
                           "Mean predicted probability against the observed share of positives in 15 probability "
                           "bins (red: each bin's gap; ECE = the image-weighted mean gap). Points above the "
                           "diagonal: the model under-estimates the risk there."))
        for name, c in counts.items():
            title = f"{SET_LABELS.get(name, name)}: threshold {fmt_metric(thr)}" if thr is not None else \
                f"{SET_LABELS.get(name, name)}: argmax"
            body.append(figure(figures.confusion_matrix(_confusion_at(c, k, thr), names, title),
                               f"confusion matrix, {name}", f"Confusion matrix of the {SET_LABELS.get(name, name)} "
                               f"at the operating threshold (rows: true class)."))
        body.append(note("The threshold was chosen on the same validation counts these curves come from: the "
                         "validation figures at the threshold are optimistic. Holdout-site and test-set figures are "
                         "not (they are scored at the validation threshold).", warn=True))
    else:
        curves = []
        for j, cname in enumerate(names):
            pos, neg = val.score_histograms(j)
            fpr, tpr, _ = roc_points(pos, neg)
            rec, prec, _ = pr_points(pos, neg)
            m = val.metrics()
            curves.append(figures.Curve(f"{cname} vs rest", fpr.tolist(), tpr.tolist(), rec.tolist(), prec.tolist(),
                                        auroc=_finite(m.get(f"auroc-{j}")), auprc=_finite(m.get(f"auprc-{j}")),
                                        prevalence=float(pos.sum()) / max(1.0, float(pos.sum() + neg.sum()))))
        body.append(figure(figures.roc_pr(curves), "one-vs-rest ROC and precision-recall curves",
                           "One-vs-rest curves per class on the pooled validation counts (decisions are the most "
                           "probable class: no threshold)."))
        for j, cname in enumerate(names):
            pos, neg = val.score_histograms(j)
            body.append(figure(figures.reliability_diagram(reliability_bins(pos, neg),
                                                           _finite(val.metrics().get(f"ece-{j}")),
                                                           f"reliability of P({cname}), validation"),
                               f"reliability diagram, {cname}", f"Calibration of the probability of '{cname}'."))
        for name, c in counts.items():
            body.append(figure(figures.confusion_matrix(c.confusion_matrix(), names,
                                                        f"{SET_LABELS.get(name, name)}: argmax"),
                               f"confusion matrix, {name}", "Rows: true class; columns: most probable class."))
    return Section("classification", "Classification: ROC, precision-recall, calibration, confusion", "".join(body))


# ---------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------


def _segmentation_section(data: RunData) -> Section:
    last, rounds = data.last, data.rounds
    body = [note("Sites send sums of per-image Dice, IoU and HD95, so the server knows each site's mean over its "
                 "images and the pooled mean over all images, but no per-image distribution: no spread or interval "
                 "can be shown here. 'medfed evaluate' at a hospital gives per-image bootstrap intervals.")]
    if not last:
        return Section("segmentation", "Segmentation: Dice, IoU, HD95", "".join(body))
    rows = []
    for site, m in sorted(last.get("evaluate-sites", {}).items()):
        rows.append([site, "validation", num(m.get("num-examples"), 0), num(m.get("dice")), num(m.get("iou")),
                     num(m.get("hd95"), 2), num(m.get("hd95-mm"), 2)])
    ev = last.get("evaluate", {})
    rows.append(["all training sites", "validation, pooled", num(ev.get("num-examples"), 0), num(ev.get("dice")),
                 num(ev.get("iou")), num(ev.get("hd95"), 2), num(ev.get("hd95-mm"), 2)])
    for site, m in sorted(last.get("holdout-sites", {}).items()):
        rows.append([site, "holdout site", num(m.get("num-examples"), 0), num(m.get("dice")), num(m.get("iou")),
                     num(m.get("hd95"), 2), num(m.get("hd95-mm"), 2)])
    if last.get("test"):
        t = last["test"]
        rows.append(["server", "test set", num(t.get("num-examples"), 0), num(t.get("dice")), num(t.get("iou")),
                     num(t.get("hd95"), 2), num(t.get("hd95-mm"), 2)])
    body.append(table(["site", "evaluated on", "images", "mean Dice", "mean IoU", "mean HD95 (px)", "mean HD95 (mm)"],
                      rows, caption=f"Round {last.get('round')}: per-site means", numeric=[False, False] + [True] * 5))
    x = [r["round"] for r in rounds]
    sites = sorted({s for r in rounds for s in r.get("evaluate-sites", {})})
    panels = []
    for key, label, ylim in (("dice", "Dice", (0.0, 1.0)), ("hd95", "HD95 (px)", None)):
        series = [figures.Series(x, _series(rounds, lambda r, key=key: r.get("evaluate", {}).get(key)),
                                 "validation, pooled", bold=True)]
        series += [figures.Series(x, _series(rounds, lambda r, s=s, key=key:
                                             r.get("evaluate-sites", {}).get(s, {}).get(key)), f"validation, {s}")
                   for s in sites]
        if any(r.get("holdout") for r in rounds):
            series.append(figures.Series(x, _series(rounds, lambda r, key=key: r.get("holdout", {}).get(key)),
                                         "holdout sites", dashed=True, bold=True))
        if any(r.get("test") for r in rounds):
            series.append(figures.Series(x, _series(rounds, lambda r, key=key: r.get("test", {}).get(key)),
                                         "test set", dashed=True, bold=True))
        panels.append(figures.Panel(f"mean {label} per round", "round", label, series, ylim))
    body.append(figure(figures.line_panels(panels), "Dice and HD95 per round",
                       "Means over each site's validation images after each round (HD95 leaves out images where "
                       "either mask is empty)."))
    names = [s for s, _ in sorted(last.get("evaluate-sites", {}).items())]
    body.append(figure(figures.bar_chart(names, [last["evaluate-sites"][s].get("dice") for s in names],
                                         ylabel="mean Dice", title=f"mean Dice per site, round {last.get('round')}",
                                         reference=_finite(ev.get("dice")), reference_label="pooled"),
                       "mean Dice per site", "Per-site means from the sites' sums; the line is the pooled mean."))
    return Section("segmentation", "Segmentation: Dice, IoU, HD95", "".join(body))


# ---------------------------------------------------------------------------
# Fairness
# ---------------------------------------------------------------------------


def _ci(entry: Mapping[str, Any], key: str) -> str:
    lo, hi = (entry.get(f"{key}-ci") or [None, None])[:2]
    if entry.get(key) is None:
        return "n/a"
    return f"{fmt_metric(entry.get(key))} [{fmt_metric(lo)}, {fmt_metric(hi)}]"


def _gap_text(g: Mapping[str, Any]) -> str:
    """Which subgroups a gap is between (or why it is undefined)."""
    if g.get("max") and g.get("min"):
        return f"{g['max']['subgroup']} (n {g['max']['n']}) vs {g['min']['subgroup']} (n {g['min']['n']})"
    if "tpr-gap" in g:  # equalised odds: the larger of the TPR and FPR gaps
        return (f"larger of the TPR gap ({fmt_metric(g.get('tpr-gap'))}) and the FPR gap "
                f"({fmt_metric(g.get('fpr-gap'))})")
    if g.get("aggregate"):
        return str(g["aggregate"])
    return str(g.get("reason") or "")


def _fairness_section(data: RunData) -> Section:
    block = data.last.get("fairness") or {}
    view = data.view
    label = view.primary_label
    body: list[str] = []
    sites = block.get("sites") or {}
    if sites.get("sites"):
        rows = [[e["site"], e["n"], num(e.get("value")), num(e.get("gap-to-pooled"))] for e in sites["sites"]]
        rows.append(["pooled", sum(int(e["n"]) for e in sites["sites"]), num(sites.get("pooled")), ""])
        body.append(table(["site", "validation images", label, "gap to pooled"], rows,
                          caption=f"Across sites (round {data.last.get('round')})", numeric=[False, True, True, True]))
        body.append(kv_table([("worst site", f"{sites.get('worst-site')} ({fmt_metric(sites.get('worst'))})"),
                              ("best site", f"{sites.get('best-site')} ({fmt_metric(sites.get('best'))})"),
                              ("gap best - worst", fmt_metric(sites.get("gap"))),
                              ("standard deviation over sites", fmt_metric(sites.get("std"))),
                              ("Jain's fairness index (1 = equal)", fmt_metric(sites.get("jain-index")))]))
        names = [e["site"] for e in sites["sites"]]
        body.append(figure(figures.bar_chart(names, [e.get("value") for e in sites["sites"]], ylabel=label,
                                             title=f"{label} per site (validation)",
                                             reference=_finite(sites.get("pooled"))),
                           f"{label} per site", "Each site's own validation figure; the line is the pooled figure."))
    else:
        body.append(note("No per-site figures (no evaluated round)."))
    sub = block.get("subgroups") or {}
    columns = sub.get("columns") or {}
    if not columns:
        body.append(note("No subgroup counts: the sites' data carry no sex/age/view columns, or the run declared "
                         "no subgroup-columns."))
    seg = sub.get("kind") == "segmentation"
    for column, col in columns.items():
        entries = col.get("subgroups") or []
        caption = (f"Subgroups by {column} (decision: {sub.get('decision') or 'n/a'}; cells under "
                   f"{sub.get('min-cell')} images suppressed at the sites: {col.get('suppressed-cells', 0)} "
                   f"suppressed, {col.get('withheld-cells', 0)} withheld)")
        if not entries:
            body.append(para(f"Subgroups by {column}: no cell reached the minimum of {sub.get('min-cell')} images at "
                             f"any site ({col.get('suppressed-cells', 0)} cell(s) suppressed, "
                             f"{col.get('withheld-cells', 0)} withheld)."))
            continue
        if seg:
            rows = [[e["subgroup"], e["n"], e.get("sites"), num(e.get("dice")), num(e.get("iou")),
                     num(e.get("hd95"), 2)] for e in entries]
            body.append(table(["subgroup", "images", "sites", "mean Dice", "mean IoU", "mean HD95 (px)"], rows,
                              caption=caption, numeric=[False, True, True, True, True, True]))
        else:
            rows = [[e["subgroup"], e["n"], e.get("n-positive", ""), e.get("sites"), num(e.get("auroc")),
                     _ci(e, "sensitivity"), num(e.get("specificity")), _ci(e, "fpr"), _ci(e, "positive-rate")]
                    for e in entries]
            body.append(table(["subgroup", "images", "positives", "sites", "AUROC", "sensitivity [95% CI]",
                               "specificity", "false-positive rate [95% CI]", "positive rate [95% CI]"], rows,
                              caption=caption, numeric=[False, True, True, True, True, False, True, False, False]))
        gaps = col.get("gaps") or {}
        grows = [[name, num(g.get("value")), _gap_text(g)] for name, g in gaps.items() if isinstance(g, Mapping)]
        if grows:
            body.append(table(["gap", "value", "between"], grows, caption=f"Gaps between {column} subgroups",
                              numeric=[False, True, False]))
        labels = [str(e["subgroup"]) for e in entries]
        if seg:
            png = figures.bar_chart(labels, [e.get("dice") for e in entries], ylabel="mean Dice",
                                    title=f"mean Dice by {column}")
        elif entries[0].get("sensitivity-ci") is not None:
            png = figures.bar_chart(labels, [e.get("sensitivity") for e in entries], ylabel="sensitivity",
                                    title=f"sensitivity by {column} at the operating threshold",
                                    low=[(e.get("sensitivity-ci") or [None, None])[0] for e in entries],
                                    high=[(e.get("sensitivity-ci") or [None, None])[1] for e in entries])
        else:
            png = figures.bar_chart(labels, [e.get("auroc") for e in entries], ylabel="AUROC",
                                    title=f"AUROC by {column}")
        body.append(figure(png, f"{column} subgroups", "Whiskers: Wilson 95% intervals (binary tasks)." if not seg
                           else "Means over the subgroup's images."))
    body.append(note("Gaps are descriptive: the max - min over a few small groups is biased upwards. 'unknown' and "
                     "'other' cells are reported but left out of the gaps."))
    return Section("fairness", "Fairness across sites and patient subgroups", "".join(body))


# ---------------------------------------------------------------------------
# Privacy
# ---------------------------------------------------------------------------


def _privacy_section(data: RunData) -> Section:
    rc, rounds, summary = data.run_config, data.rounds, data.summary
    body: list[str] = []
    dp_rounds = [r for r in rounds if r.get("dp")]
    if rc.get("dp.enabled"):
        sites = sorted({s for r in dp_rounds for s in r["dp"].get("per-site-epsilon", {})})
        x = [r["round"] for r in dp_rounds]
        series = [figures.Series(x, [r["dp"].get("per-site-epsilon", {}).get(s, math.nan) for r in dp_rounds], s)
                  for s in sites]
        series.append(figures.Series(x, [r["dp"].get("epsilon") for r in dp_rounds], "federation (max over sites)",
                                     bold=True, dashed=True))
        if x:
            body.append(figure(figures.line_panels([figures.Panel("cumulative epsilon per site", "round", "epsilon",
                                                                  series)], width=7.0),
                               "epsilon per site over rounds",
                               f"Cumulative epsilon each site has spent on this run (delta "
                               f"{fmt_metric(dp_rounds[-1]['dp'].get('delta'), spec='.1e')}, per "
                               f"{dp_rounds[-1]['dp'].get('unit', 'image')})."))
        p = summary.get("privacy") or {}
        if p:
            body.append(kv_table([("guarantee", f"epsilon <= {fmt_metric(p.get('epsilon'))} at delta "
                                                f"{fmt_metric(p.get('delta'), spec='.1e')} per {p.get('unit')}"),
                                  ("mechanism", p.get("mechanism")), ("accountant", p.get("accountant")),
                                  ("meaning", p.get("meaning")),
                                  ("sites that hit their budget", ", ".join(p.get("budget-refusals") or {}) or "none")],
                                 caption="Privacy statement (summary.json)"))
    else:
        body.append(para("Differential privacy: none. DP-SGD was off, so there is no epsilon to report. Images never "
                         "left the sites (only model weights and counts did), but that is not a formal guarantee: "
                         "'medfed audit membership' measures what the model leaks."))
    if summary.get("central-dp"):
        c = summary["central-dp"]
        body.append(kv_table([(k, c[k]) for k in sorted(c) if not isinstance(c[k], (dict, list))],
                             caption="Central (site-level) DP account"))
    return Section("privacy", "Privacy", "".join(body))


# ---------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------


def _thumbnail(path: Path) -> bytes | None:
    import cv2  # lazy: only when a gallery is asked for

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    elif scale > 1.0:  # small maps (32 px phantoms) are enlarged to be seen, without smoothing
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", img)
    return bytes(buf) if ok else None


def _last_round_folders(explain_dir: Path) -> list[tuple[str, Path]]:
    """``(site, folder)`` of the latest round: a simulation's ``DIR/<site>/round-NNN``, a site's ``DIR/round-NNN``."""
    out = []
    own = sorted(explain_dir.glob("round-*"))
    if own:
        out.append(("this site", own[-1]))
    for site in sorted(p for p in explain_dir.iterdir() if p.is_dir() and not p.name.startswith("round-")):
        rounds = sorted(site.glob("round-*"))
        if rounds:
            out.append((site.name, rounds[-1]))
    return out


def _gradcam_section(data: RunData, explain_dir: Path | None) -> Section:
    title = "Grad-CAM gallery"
    if explain_dir is None:
        return Section("gradcam", title, para(
            "No Grad-CAM maps in this report. They stay where they were made (a site's explain-dir); for a "
            "simulation run with --explain-dir DIR, 'medfed report RUN --explain-dir DIR' adds thumbnails of the "
            "last round here." + (" Segmentation tasks write no Grad-CAM maps." if data.view.name == "segmentation"
                                  else "")))
    explain_dir = Path(explain_dir).expanduser()
    if not explain_dir.is_dir():
        return Section("gradcam", title, note("The explain folder given does not exist: no gallery.", warn=True))
    cells, shown = [], 0
    for site, folder in _last_round_folders(explain_dir):
        index = folder / "index.csv"
        rows: list[dict[str, str]] = []
        if index.is_file():
            with open(index, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        for row in rows or [{"file": p.name} for p in sorted(folder.glob("*.png"))]:
            if shown >= MAX_THUMBNAILS:
                break
            name = Path(str(row.get("file", ""))).name  # a bare file name inside the round folder, nothing else
            png = _thumbnail(folder / name) if name.endswith(".png") else None
            if png is None:
                continue
            caption = (f"{site}, {folder.name}: label {row.get('label_name', row.get('label', '?'))}, predicted "
                       f"{row.get('predicted_name', row.get('predicted', '?'))} "
                       f"(p {fmt_metric(_float(row.get('probability')))})" if row.get("predicted") is not None
                       else f"{site}, {folder.name}")
            cells.append(figure(png, f"Grad-CAM {name}", caption))
            shown += 1
    if not cells:
        return Section("gradcam", title, note("The explain folder holds no Grad-CAM maps (classifier tasks write "
                                              "them at every evaluation round).", warn=True))
    body = (para("Grad-CAM maps of a fixed sample of validation images, from the last round in the explain folder. "
                 "They show where the model found evidence for the predicted class, shortcuts (markers, borders) "
                 "included; that is not necessarily where the disease is.")
            + f'<div class="gallery">{"".join(cells)}</div>')
    return Section("gradcam", title, body)


def _float(v: object) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------


def _post_training_rows(card: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What the federation fitted after the last round: the calibration and the OOD reference (summaries only)."""
    cal = card.get("calibration") or {}
    if cal.get("status") == "fitted":
        bias = cal.get("bias")
        cal_text = (f"{cal.get('method')}: temperature {fmt_metric(cal.get('temperature'))}"
                    + (f", bias {', '.join(fmt_metric(b) for b in bias)}" if bias else "")
                    + f"; pooled validation ECE {fmt_metric(cal.get('ece-before'))} -> "
                      f"{fmt_metric(cal.get('ece-after'))}"
                    + f", NLL {fmt_metric(cal.get('nll-before'))} -> {fmt_metric(cal.get('nll-after'))} "
                    "(on the validation images it was fitted on); predict and evaluate apply it")
    else:
        cal_text = f"{cal.get('status') or 'not recorded'}" + (f": {cal['reason']}" if cal.get("reason") else "")
    ood = card.get("out-of-distribution-reference") or {}
    if ood.get("status") == "ready":
        ood_text = (f"{ood.get('dims')}-dim features of {ood.get('num-train-images')} training images; inputs beyond "
                    f"distance {fmt_metric(ood.get('threshold'))} (99% of {ood.get('num-val-images')} validation "
                    "images stay below) are flagged by predict and evaluate")
    else:
        ood_text = f"{ood.get('status') or 'not recorded'}" + (f": {ood['reason']}" if ood.get("reason") else "")
    return [("calibration", cal_text), ("out-of-distribution reference", ood_text)]


def _card_section(card: Mapping[str, Any]) -> Section:
    m, tr = card["model"], card["training"]
    body = [kv_table([
        ("model", f"{m['name']} ({m['kind']}), {m['image-size']} px, {m['in-channels']} channel(s)"),
        ("task", f"{m['task']}: {m['description']}"),
        ("classes", ", ".join(m["classes"])
         + (f"; positive: {m['positive-class']}" if m.get("positive-class") else "")),
        ("operating threshold", f"{fmt_metric(m.get('operating-threshold'))} ({m['threshold-rule']})"
         if m.get("operating-threshold") is not None else m["threshold-rule"]),
        ("model file", f"{m['model-file']}, SHA-256 {m.get('model-file-sha256') or 'n/a (no model file)'}"),
        ("intended use", card["intended-use"]),
    ], caption="Model")]
    fed = tr["federation"]
    body.append(kv_table([
        ("data", tr["data-source"]),
        ("federation", f"recipe {fed.get('recipe') or 'n/a'}: {fed['strategy']}, {fed['rounds']} round(s), "
                       f"{fed['local-epochs']} local epoch(s), "
                       f"batch {fed['batch-size']}, {fed['optimizer']} lr {fed['lr']}, seed {fed['seed']}"),
        ("training images", f"{tr['total-training-images']} at {sum(1 for s in tr['sites'] if s['role'] != 'holdout')} "
                            "training site(s)"),
        ("validation images", tr["total-validation-images"]),
        ("data-file hashes", tr["data-file-hashes"]),
    ], caption="Training data (counts per site: see 'Run and data')"))
    pre = card["preprocessing"]
    body.append(kv_table([(k, v) for k, v in sorted((pre.get("preprocess") or {}).items())] +
                         [("augmentation (training only)", pre.get("augment") or "none"),
                          ("batch normalisation", pre.get("normalize")), ("note", pre.get("note"))],
                         caption="Preprocessing"))
    ev = card["evaluation"]
    rows = []
    for key, block in ev.items():
        if not isinstance(block, Mapping) or "metrics" not in block:
            continue
        mm = block["metrics"]
        rows.append([key, block["what"], num(mm.get("num-examples"), 0),
                     ", ".join(f"{k} {fmt_metric(mm.get(k))}" for k in ("auroc", "accuracy", "sensitivity@thr",
                                                                          "specificity@thr", "dice", "iou", "hd95")
                               if k in mm)])
    body.append(table(["set", "what", "images", "figures"], rows, caption=f"Evaluation (round {ev.get('round')})"))
    body.append(kv_table(_post_training_rows(card), caption="Calibration and the out-of-distribution reference"))
    priv = card["privacy"]
    statement = (priv.get("dp-sgd") or {}).get("statement") or priv.get("statement") or ""
    if priv.get("central-dp"):
        statement += "; central DP: see the privacy section"
    body.append(kv_table([("privacy guarantee", statement)], caption="Privacy"))
    body.append("<h3>Known limitations</h3><ul class=\"tight\">" + "".join(f"<li>{esc(x)}</li>"
                                                                            for x in card["limitations"]) + "</ul>")
    body.append(kv_table([(k, v if v is not None else "n/a") for k, v in card["software"].items()],
                         caption="Software"))
    body.append(para("The same card is in model-card.json beside this report."))
    return Section("model-card", "Model card", "".join(body))


# ---------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------


def build_run_report(path: Path, *, explain_dir: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The report page and the model card of a results folder.

    Parameters
    ----------
    path:
        The run's results folder.
    explain_dir:
        A simulation's ``--explain-dir`` (or a site's explain folder): adds a
        Grad-CAM gallery of its last round.

    Returns
    -------
    tuple
        ``(html, card)``: the self-contained page and the model card dict.

    Raises
    ------
    RunFolderError
        Not a (readable) medfed results folder.
    """
    return _build(load_run(Path(path)), explain_dir)


def _build(data: RunData, explain_dir: Path | None) -> tuple[str, dict[str, Any]]:
    card = build_model_card(data)
    sections = [_run_section(data), _curves_section(data)]
    sections.append(_segmentation_section(data) if data.view.name == "segmentation" else _classification_section(data))
    sections += [_fairness_section(data), _privacy_section(data), _gradcam_section(data, explain_dir),
                 _card_section(card)]
    subtitle = (f"{data.task.name} with {data.run_config.get('model')}, {data.run_config.get('strategy')}, "
                f"{len(data.site_data)} site(s), {len(data.rounds)} round(s): results folder {data.folder.path.name}")
    footer = (f"Generated {card['generated']} by medfed {card['software'].get('medfed') or ''} from the results "
              "folder alone (counts, no images, no per-image scores).")
    return page(f"medfed run report: {data.task.name}", subtitle, sections, footer), card


def write_run_report(path: Path, *, explain_dir: Path | None = None) -> Path:
    """Write ``report.html`` and ``model-card.json`` into a results folder; return the report's path.

    Raises
    ------
    RunFolderError
        Not a (readable) medfed results folder.
    """
    t0 = time.perf_counter()
    data = load_run(Path(path))
    html, card = _build(data, explain_dir)
    data.folder.write_model_card(card)
    out = data.folder.write_report(html)
    logger.info("run report written (%d KB) in %.1f s", len(html) // 1024, time.perf_counter() - t0)
    return out
