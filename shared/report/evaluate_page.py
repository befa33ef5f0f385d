"""``evaluate.html``: the page a hospital files when it validates a federated model on its own images.

Written by ``medfed evaluate`` beside its JSON, with the same conventions as
the run report (:mod:`shared.report.html`: self-contained, no network). It
names the model exactly (its file's SHA-256), the data only by counts (never
a path, a file name or a patient id), and shows every figure with its 95 %
bootstrap interval, the curves, the calibration, the confusion matrix at the
model's own threshold and the figures per patient subgroup.

Sections (HTML ids): ``validated`` (what was validated, by whom's settings),
``intervals`` (figures with 95 % intervals), ``curves`` (ROC and
precision-recall), ``calibration``, ``confusion``, ``distribution``
(segmentation: per-image Dice), ``subgroups``, ``notes``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from shared.formatting import fmt_metric
from shared.metrics.classification import ClassificationCounts
from shared.metrics.curves import operating_point, pr_points, reliability_bins, roc_points
from shared.report import figures
from shared.report.html import Section, esc, figure, kv_table, note, num, page, para, table

__all__ = ["classification_page", "segmentation_page"]

INTERVAL_LABELS = {
    "auroc": "AUROC", "accuracy": "accuracy (most probable class)", "sensitivity@thr": "sensitivity at the threshold",
    "specificity@thr": "specificity at the threshold", "accuracy@thr": "accuracy at the threshold",
    "sensitivity": "sensitivity (macro, one-vs-rest)", "specificity": "specificity (macro, one-vs-rest)",
    "dice": "mean Dice", "iou": "mean IoU",
}


def _validated(info: Mapping[str, Any]) -> Section:
    pairs = [(k, v) for k, v in info.items() if v is not None]
    return Section("validated", "What was validated", kv_table(pairs) + note(
        "The dataset is described by counts only: this page holds no file path, file name or patient id."))


def _interval_table(intervals: Mapping[str, Mapping[str, Any]], bootstrap: Mapping[str, Any]) -> Section:
    rows = []
    for key, ci in intervals.items():
        rows.append([INTERVAL_LABELS.get(key, key), num(ci.get("estimate")),
                     f"[{fmt_metric(ci.get('low'))}, {fmt_metric(ci.get('high'))}]",
                     f"{ci.get('valid')} of {ci.get('replicates')}"])
    body = table(["figure", "estimate", "95% interval", "bootstrap draws used"], rows,
                 caption="Figures on these images with 95% intervals", numeric=[False, True, False, True])
    body += para(f"Intervals: {bootstrap.get('method')}; {bootstrap.get('replicates')} draws, seed "
                 f"{bootstrap.get('seed')} (the same seed gives the same intervals). A draw where a figure is "
                 "undefined (e.g. no positive image drawn) is left out.")
    return Section("intervals", "Figures with 95% intervals", body)


def _subgroup_section(report: Mapping[str, Any], *, segmentation: bool) -> Section:
    columns = report.get("columns") or {}
    if not columns:
        return Section("subgroups", "Patient subgroups", para(
            "No subgroup columns: the dataset has no sex, age or view column (a manifest with columns such as "
            "'sex', 'age' and 'view' gives figures per subgroup)."))
    body = []
    for column, col in columns.items():
        entries = col.get("subgroups") or []
        if segmentation:
            rows = [[e["subgroup"], e["n"], num(e.get("dice")),
                     f"[{fmt_metric((e.get('dice-ci') or [None, None])[0])}, "
                     f"{fmt_metric((e.get('dice-ci') or [None, None])[1])}]", num(e.get("iou")), num(e.get("hd95"), 2)]
                    for e in entries]
            body.append(table(["subgroup", "images (n)", "mean Dice", "95% interval", "mean IoU", "mean HD95 (px)"],
                              rows, caption=f"By {column}", numeric=[False, True, True, False, True, True]))
            png = figures.bar_chart([str(e["subgroup"]) for e in entries], [e.get("dice") for e in entries],
                                    ylabel="mean Dice", title=f"mean Dice by {column}",
                                    low=[(e.get("dice-ci") or [None, None])[0] for e in entries],
                                    high=[(e.get("dice-ci") or [None, None])[1] for e in entries])
        else:
            rows = []
            for e in entries:
                auc_ci = e.get("auroc-ci") or [None, None]
                sens = e.get("sensitivity-ci") or [None, None]
                rows.append([e["subgroup"], e["n"], e.get("n-positive", ""),
                             f"{fmt_metric(e.get('auroc'))} [{fmt_metric(auc_ci[0])}, {fmt_metric(auc_ci[1])}]",
                             f"{fmt_metric(e.get('sensitivity'))} [{fmt_metric(sens[0])}, {fmt_metric(sens[1])}]",
                             num(e.get("specificity")), num(e.get("accuracy"))])
            body.append(table(["subgroup", "images (n)", "positives", "AUROC [95% bootstrap]",
                               "sensitivity [95% Wilson]", "specificity", "accuracy"], rows,
                              caption=f"By {column} (decision: {report.get('decision') or 'n/a'})",
                              numeric=[False, True, True, False, False, True, True]))
            png = figures.bar_chart([str(e["subgroup"]) for e in entries], [e.get("auroc") for e in entries],
                                    ylabel="AUROC", title=f"AUROC by {column}",
                                    low=[(e.get("auroc-ci") or [None, None])[0] for e in entries],
                                    high=[(e.get("auroc-ci") or [None, None])[1] for e in entries])
        body.append(figure(png, f"by {column}", "Whiskers: 95% bootstrap intervals."))
    body.append(note("Subgroups are shown at any size here (nothing leaves this machine): read small subgroups with "
                     "their n and intervals. 'unknown' = no or unreadable value in the manifest."))
    return Section("subgroups", "Patient subgroups", "".join(body))


def _finite(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def _bullets(items: Sequence[str]) -> str:
    return "<ul class=\"tight\">" + "".join(f"<li>{esc(x)}</li>" for x in items) + "</ul>"


def _footer() -> str:
    return f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by medfed evaluate."


def classification_page(info: Mapping[str, Any], counts: ClassificationCounts, metrics: Mapping[str, Any],
                        uncertainty: Mapping[str, Any], class_names: Sequence[str], positive_class: int | None,
                        threshold: float | None) -> str:
    """``evaluate.html`` of a classifier.

    Parameters
    ----------
    info:
        What was validated (model, its file hash, dataset counts, date...), shown as given.
    counts:
        The counts of all scored images.
    metrics:
        ``counts.metrics(...)`` as ``medfed evaluate`` reports them.
    uncertainty:
        :func:`shared.local_eval.classifier_uncertainty`.
    class_names, positive_class, threshold:
        The model's classes, positive class and operating threshold (binary).
    """
    sections = [_validated(info), _interval_table(uncertainty["intervals"], uncertainty["bootstrap"])]
    names = list(class_names)
    if positive_class is not None:
        k = positive_class
        pos, neg = counts.score_histograms(k)
        fpr, tpr, _ = roc_points(pos, neg)
        rec, prec, _ = pr_points(pos, neg)
        op = operating_point(pos, neg, threshold) if threshold is not None else None
        curve = figures.Curve("these images", fpr.tolist(), tpr.tolist(), rec.tolist(), prec.tolist(),
                              auroc=_finite(metrics.get("auroc")), auprc=_finite(metrics.get("auprc")), operating=op,
                              prevalence=float(pos.sum()) / max(1.0, float(pos.sum() + neg.sum())))
        sections.append(Section("curves", "ROC and precision-recall", figure(
            figures.roc_pr([curve]), "ROC and precision-recall curves",
            f"Scores: probability of '{names[k]}'. Star: the model's operating threshold {fmt_metric(threshold)}, "
            "chosen by the federation on its own validation data (not on these images).")))
        sections.append(Section("calibration", "Calibration", figure(
            figures.reliability_diagram(reliability_bins(pos, neg), _finite(metrics.get("ece")),
                                        f"reliability of P({names[k]})"),
            "reliability diagram", "Mean predicted probability against the observed share per bin; ECE = the "
                                   "image-weighted mean gap.")))
        if threshold is not None:
            at = counts.metrics_at_threshold(threshold, positive_class=k)
            tp, fp, tn, fn = (int(at[x]) for x in ("tp", "fp", "tn", "fn"))
            m = [[0, 0], [0, 0]]
            m[k][k], m[k][1 - k], m[1 - k][k], m[1 - k][1 - k] = tp, fn, fp, tn
            title = f"threshold {fmt_metric(threshold)}"
        else:
            m, title = counts.confusion_matrix(), "most probable class"
    else:
        curves = []
        for j, cname in enumerate(names):
            pos, neg = counts.score_histograms(j)
            fpr, tpr, _ = roc_points(pos, neg)
            rec, prec, _ = pr_points(pos, neg)
            curves.append(figures.Curve(f"{cname} vs rest", fpr.tolist(), tpr.tolist(), rec.tolist(), prec.tolist(),
                                        auroc=_finite(metrics.get(f"auroc-{j}")),
                                        auprc=_finite(metrics.get(f"auprc-{j}"))))
        sections.append(Section("curves", "ROC and precision-recall (one-vs-rest)", figure(
            figures.roc_pr(curves), "one-vs-rest curves", "One curve per class against the others.")))
        cal = []
        for j, cname in enumerate(names):
            pos, neg = counts.score_histograms(j)
            cal.append(figure(figures.reliability_diagram(reliability_bins(pos, neg), _finite(metrics.get(f"ece-{j}")),
                                                          f"reliability of P({cname})"), f"reliability, {cname}"))
        sections.append(Section("calibration", "Calibration", "".join(cal)))
        m, title = counts.confusion_matrix(), "most probable class"
    sections.append(Section("confusion", "Confusion matrix", figure(
        figures.confusion_matrix(m, names, title), "confusion matrix", "Rows: true class; columns: decision.")))
    sections.append(_subgroup_section(uncertainty["subgroups"], segmentation=False))
    sections.append(Section("notes", "How to read this", _bullets((
        "The operating threshold comes with the model: the federation chose it on its sites' validation data. "
        "Scored here on images the model never saw, the figures at that threshold are an unbiased check of it "
        "for this hospital's population.",
        "AUROC, the curves and the calibration come from the predicted probabilities binned to 1000 bins, "
        "exactly as the federation computes them (within about 1e-3 of the unbinned values).",
        "Intervals treat images as independent; with several images per patient they are somewhat too narrow.",
    ))))
    return page("medfed local validation", f"{info.get('model', '')} on {info.get('images scored', '')} images",
                sections, _footer())


def segmentation_page(info: Mapping[str, Any], metrics: Mapping[str, Any], uncertainty: Mapping[str, Any],
                      per_image_dice: Sequence[float]) -> str:
    """``evaluate.html`` of a segmentation model (see :func:`classification_page`)."""
    sections = [_validated(info), _interval_table(uncertainty["intervals"], uncertainty["bootstrap"])]
    sections.append(Section("distribution", "Dice per image", figure(
        figures.histogram(per_image_dice, xlabel="Dice", title="Dice of each image"), "Dice per image",
        f"Distribution of per-image Dice (mean IoU {fmt_metric(metrics.get('iou'))}, mean HD95 "
        f"{fmt_metric(metrics.get('hd95'), 2)} px, {fmt_metric(metrics.get('hd95-mm'), 2)} mm where the pixel "
        "spacing is known).")))
    sections.append(_subgroup_section(uncertainty["subgroups"], segmentation=True))
    sections.append(Section("notes", "How to read this", _bullets((
        "Dice and IoU of an image where both masks are empty count as 1; HD95 leaves such images out.",
        "HD95 is in pixels of the model's input size; hd95-mm only for images with a known pixel spacing.",
        "Intervals treat images as independent; with several images per patient they are somewhat too narrow.",
    ))))
    what = f"{info.get('model', '')} on {info.get('images scored', '')} image/mask pairs"
    return page("medfed local validation", what, sections, _footer())
