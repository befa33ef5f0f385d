"""``medfed evaluate``: score a trained model on a labelled dataset.

Only parses arguments and delegates to :mod:`shared.inference` (imported
when the command runs: it needs torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from simulation.commands.common import nonnegative_int, positive_int, probability
from simulation.commands.predict import DEFAULT_WARN_SHARE

__all__ = ["register", "run"]

CLASSIFIER_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "auprc", "ece")
SEGMENTATION_METRICS = ("dice", "iou", "hd95", "hd95-mm")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed evaluate`` to the ``medfed`` parser."""
    e = subparsers.add_parser(
        "evaluate",
        help="score a trained model on a labelled dataset",
        description=(
            "Score a trained medfed model on a labelled dataset (class folders, a folder with "
            "manifest.csv, or a manifest .csv). Class names are matched to the model's "
            "case-insensitively. Segmentation models take image/mask pairs (manifest image,mask"
            "[,spacing_mm], images/ + masks/ folders, or images with a SIIM-ACR run-length CSV) and report "
            "Dice, IoU, HD95 in pixels and, for images with a known pixel spacing, hd95-mm. "
            "Every figure comes with a 95%% interval (percentile bootstrap over images, seeded), and with "
            "manifest columns sex, age or view also per patient subgroup (with n). "
            "A calibrated model is scored with its calibrated probabilities (softmax(logits/T + b)) at the "
            "threshold chosen on calibrated validation data (the JSON also gives the ECE and NLL without the "
            "calibration). "
            "With a training-population reference in the model, reports the share of images beyond its "
            "distance threshold and warns when it exceeds --ood-warn-share. Writes the metrics as "
            "JSON (no file paths), the page a hospital files (evaluate.html beside the JSON: curves, "
            "calibration, confusion matrix, interval and subgroup tables) and prints a table."
        ),
    )
    e.add_argument("--model", "-m", required=True, type=Path, metavar="RUN_DIR_OR_FILE",
                   help="a run's results folder (with model.pt) or a model.pt file")
    e.add_argument("data", type=Path, metavar="DATA",
                   help="class-folder tree, folder with manifest.csv, or a manifest .csv")
    e.add_argument("--out", "-o", type=Path, default=Path("metrics.json"),
                   help="metrics JSON file (default ./metrics.json)")
    e.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    e.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N",
                   help="bootstrap draws per 95%% interval (default 1000)")
    e.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the bootstrap draws (default 0)")
    e.add_argument("--html", type=Path, default=None, metavar="PATH",
                   help="the validation page (default: evaluate.html beside the JSON)")
    e.add_argument("--ood-warn-share", type=probability, default=DEFAULT_WARN_SHARE, metavar="SHARE",
                   help="warn when more than this share of images lie beyond the training population's distance "
                   f"threshold (default {DEFAULT_WARN_SHARE})")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medfed evaluate``; 0 when the metrics and the page were written."""
    from shared.inference import load_trained
    from shared.kinds import SEGMENTATION

    trained = load_trained(args.model)
    if trained.kind == SEGMENTATION:
        return _evaluate_segmentation(trained, args)
    return _evaluate_classifier(trained, args)


def _write(out: Path, data: Any) -> Path:
    from shared.results import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, data)
    return out


def _write_page(args: argparse.Namespace, html: str) -> Path:
    from shared.atomic import atomic_open

    path = Path(args.html) if args.html is not None else Path(args.out).parent / "evaluate.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(html)
    return path


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _info(trained: Any, args: argparse.Namespace, n: int, skipped: dict[str, int]) -> dict[str, Any]:
    """What the page says was validated: the model exactly, the data by counts only."""
    import time

    from simulation.cli import medfed_version

    rc = trained.card.run_config
    data = Path(args.data)
    layout = ("manifest" if data.suffix.lower() == ".csv" or (data / "manifest.csv").is_file() else "folders")
    return {
        "model": f"{trained.model_name} for {trained.task} ({', '.join(trained.class_names)})",
        "model file": f"{trained.path.name}, SHA-256 {_sha256(trained.path)}",
        "trained": (f"federated, {rc.get('strategy')} over {rc.get('num-server-rounds')} round(s) at "
                    f"{trained.preprocess.size} px" + (", DP-SGD" if rc.get("dp.enabled") else "")),
        "operating threshold": (f"{trained.meta.get('threshold')} "
                                f"({(trained.meta.get('threshold-rule') or {}).get('method')}, "
                                "chosen by the federation on its validation data)"
                                if trained.meta.get("threshold") is not None else "none (most probable class)"),
        "data": f"a labelled dataset ({layout}); path not recorded",
        "images scored": n,
        "files not used": (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "software": f"medfed {medfed_version()}",
    }


def _evaluate_classifier(trained: Any, args: argparse.Namespace) -> int:
    from shared.formatting import fmt_metric
    from shared.inference import evaluate_dataset, model_threshold
    from shared.local_eval import classifier_uncertainty
    from shared.report.evaluate_page import classification_page

    result = evaluate_dataset(trained, args.data, batch_size=args.batch_size, warn_share=args.ood_warn_share)
    binary = trained.num_classes == 2
    thr = model_threshold(trained) if binary else None
    unc = classifier_uncertainty(result.probs, result.labels, result.attributes, threshold=thr,
                                 positive_class=trained.positive_class,
                                 age_bands=trained.run_config.fairness.age_bands,
                                 replicates=args.bootstrap, seed=args.seed)
    n = result.counts.num_examples
    report = {**result.to_dict(trained), **unc}
    out = _write(Path(args.out), report)
    info = _info(trained, args, n, result.skipped)
    per_class = result.counts.label_totals()
    info["images per class"] = ", ".join(f"{c} {v}" for c, v in zip(trained.class_names, per_class, strict=True))
    info.update(_calibration_info(result.calibration))
    info["out-of-distribution"] = _ood_text(result.ood)
    page = _write_page(args, classification_page(info, result.counts, result.metrics, unc, trained.class_names,
                                                 trained.positive_class, thr))
    m = result.metrics
    print(f"medfed evaluate: {trained.model_name} ({trained.task}) on {n} images"
          + (f", skipped {sum(result.skipped.values())}" if result.skipped else ""))
    if trained.num_classes > 2:
        print(f"  (argmax decisions; sensitivity ... ece are macro averages of one-vs-rest figures "
              f"over {trained.num_classes} classes)")
    cis = unc["intervals"]
    for key in CLASSIFIER_METRICS:
        ci = cis.get(key)
        extra = f"  95% CI [{fmt_metric(ci['low'])}, {fmt_metric(ci['high'])}]" if ci else ""
        print(f"  {key:<12} {fmt_metric(m.get(key))}{extra}")
    if "threshold" in m:
        sens, spec = cis.get("sensitivity@thr") or {}, cis.get("specificity@thr") or {}
        print(f"  at the model's operating threshold {fmt_metric(m.get('threshold'))}: "
              f"sensitivity {fmt_metric(m.get('sensitivity@thr'))} [{fmt_metric(sens.get('low'))}, "
              f"{fmt_metric(sens.get('high'))}], specificity {fmt_metric(m.get('specificity@thr'))} "
              f"[{fmt_metric(spec.get('low'))}, {fmt_metric(spec.get('high'))}]")
    _print_subgroups(unc["subgroups"], "auroc")
    print(f"  (95% intervals: percentile bootstrap over images, {args.bootstrap} draws, seed {args.seed})")
    for key, text in _calibration_info(result.calibration).items():
        print(f"  {key}: {text}")
    _print_ood(result.ood)
    print(f"Wrote {out} and {page}")
    return 0


def _calibration_info(cal: dict[str, Any]) -> dict[str, str]:
    """One line on the model's calibration (empty for an uncalibrated model)."""
    from shared.formatting import fmt_metric

    if not cal.get("calibrated"):
        return {}
    bias = "" if not cal.get("bias") else f", bias {', '.join(f'{b:+.3g}' for b in cal['bias'])}"
    return {"calibration": f"temperature {cal['temperature']:.3g}{bias}; ECE "
                           f"{fmt_metric(cal.get('ece-uncalibrated'))} without it, {fmt_metric(cal.get('ece'))} "
                           f"with it; NLL {fmt_metric(cal.get('nll-uncalibrated'))} -> {fmt_metric(cal.get('nll'))}"}


def _ood_text(summary: Any) -> str:
    if summary is None:
        return "the model card has no training-population reference (images not scored)"
    return summary.message()


def _print_ood(summary: Any) -> None:
    import sys

    warn = summary is not None and summary.warn
    print(f"  out-of-distribution: {_ood_text(summary)}", file=sys.stderr if warn else sys.stdout)


def _print_subgroups(report: dict[str, Any], metric: str) -> None:
    from shared.formatting import fmt_metric

    for column, col in (report.get("columns") or {}).items():
        cells = ", ".join(f"{e['subgroup']} {fmt_metric(e.get(metric))} (n {e['n']})" for e in col["subgroups"])
        print(f"  by {column}: {metric} {cells}")


def _evaluate_segmentation(trained: Any, args: argparse.Namespace) -> int:
    from shared.formatting import fmt_metric
    from shared.inference import score_segmentation
    from shared.local_eval import segmentation_uncertainty
    from shared.report.evaluate_page import segmentation_page

    scored = score_segmentation(trained, args.data, warn_share=args.ood_warn_share)
    unc = segmentation_uncertainty(scored.per_image, scored.attributes,
                                   age_bands=trained.run_config.fairness.age_bands,
                                   replicates=args.bootstrap, seed=args.seed)
    report = {**scored.to_dict(), **unc}
    out = _write(Path(args.out), report)
    m = report["metrics"]
    page = _write_page(args, segmentation_page(_info(trained, args, report["num-images"], scored.skipped), m, unc,
                                               [c.dice_sum for c in scored.per_image]))
    print(f"medfed evaluate: {trained.model_name} ({trained.task}) on {report['num-images']} image/mask pairs"
          + (f", skipped {sum(report['skipped'].values())}" if report["skipped"] else ""))
    for key in SEGMENTATION_METRICS:
        ci = unc["intervals"].get(key)
        extra = f"  95% CI [{fmt_metric(ci['low'])}, {fmt_metric(ci['high'])}]" if ci else ""
        print(f"  {key:<12} {fmt_metric(m.get(key))}{extra}")
    _print_subgroups(unc["subgroups"], "dice")
    print(f"  (95% intervals: percentile bootstrap over images, {args.bootstrap} draws, seed {args.seed})")
    _print_ood(scored.ood)
    print(f"Wrote {out} and {page}")
    return 0
