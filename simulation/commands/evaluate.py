"""``medfed evaluate``: score a trained model on a labelled dataset.

Only parses arguments and delegates to :mod:`shared.inference` (imported
when the command runs: it needs torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from simulation.commands.common import positive_int, probability
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
            "A calibrated model is scored with its calibrated probabilities (softmax(logits/T + b)) at the "
            "threshold chosen on calibrated validation data (the JSON also gives the ECE and NLL without the "
            "calibration). "
            "With a training-population reference in the model, reports the share of images beyond its "
            "distance threshold and warns when it exceeds --ood-warn-share. "
            "Writes the metrics as JSON (no file paths) and prints a table."
        ),
    )
    e.add_argument("--model", "-m", required=True, type=Path, metavar="RUN_DIR_OR_FILE",
                   help="a run's results folder (with model.pt) or a model.pt file")
    e.add_argument("data", type=Path, metavar="DATA", help="class-folder tree, folder with manifest.csv, or a manifest .csv")
    e.add_argument("--out", "-o", type=Path, default=Path("metrics.json"), help="metrics JSON file (default ./metrics.json)")
    e.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    e.add_argument("--ood-warn-share", type=probability, default=DEFAULT_WARN_SHARE, metavar="SHARE",
                   help="warn when more than this share of images lie beyond the training population's distance "
                   f"threshold (default {DEFAULT_WARN_SHARE})")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medfed evaluate``; 0 when the metrics were written."""
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


def _evaluate_classifier(trained: Any, args: argparse.Namespace) -> int:
    from shared.formatting import fmt_metric
    from shared.inference import evaluate_dataset

    result = evaluate_dataset(trained, args.data, batch_size=args.batch_size, warn_share=args.ood_warn_share)
    out = _write(Path(args.out), result.to_dict(trained))
    m = result.metrics
    print(f"medfed evaluate: {trained.model_name} ({trained.task}) on {result.counts.num_examples} images"
          + (f", skipped {sum(result.skipped.values())}" if result.skipped else ""))
    if trained.num_classes > 2:
        print(f"  (argmax decisions; sensitivity ... ece are macro averages of one-vs-rest figures "
              f"over {trained.num_classes} classes)")
    for key in CLASSIFIER_METRICS:
        print(f"  {key:<12} {fmt_metric(m.get(key))}")
    if "threshold" in m:
        print(f"  at the model's operating threshold {fmt_metric(m.get('threshold'))}: "
              f"sensitivity {fmt_metric(m.get('sensitivity@thr'))}, specificity {fmt_metric(m.get('specificity@thr'))}")
    cal = result.calibration
    if cal.get("calibrated"):
        bias = "" if not cal.get("bias") else f", bias {', '.join(f'{b:+.3g}' for b in cal['bias'])}"
        print(f"  calibration: temperature {cal['temperature']:.3g}{bias}; ECE "
              f"{fmt_metric(cal.get('ece-uncalibrated'))} without it, {fmt_metric(cal.get('ece'))} with it; NLL "
              f"{fmt_metric(cal.get('nll-uncalibrated'))} -> {fmt_metric(cal.get('nll'))}")
    _print_ood(result.ood)
    print(f"Wrote {out}")
    return 0


def _print_ood(summary: Any) -> None:
    import sys

    if summary is None:
        print("  out-of-distribution: the model card has no training-population reference (images not scored)")
    else:
        print(f"  out-of-distribution: {summary.message()}", file=sys.stderr if summary.warn else sys.stdout)


def _evaluate_segmentation(trained: Any, args: argparse.Namespace) -> int:
    from shared.formatting import fmt_metric
    from shared.inference import evaluate_segmentation

    report = evaluate_segmentation(trained, args.data, warn_share=args.ood_warn_share)
    out = _write(Path(args.out), report)
    m = report["metrics"]
    print(f"medfed evaluate: {trained.model_name} ({trained.task}) on {report['num-images']} image/mask pairs"
          + (f", skipped {sum(report['skipped'].values())}" if report["skipped"] else ""))
    for key in SEGMENTATION_METRICS:
        print(f"  {key:<12} {fmt_metric(m.get(key))}")
    ood = report.get("ood", {})
    if "share-flagged" in ood:
        print(f"  out-of-distribution: {ood['flagged']} of {ood['scored']} images beyond the training population's "
              f"threshold ({fmt_metric(100 * ood['share-flagged'], 1)}%)" + (" - WARNING: unlike the training data"
                                                                              if ood["warning"] else ""))
    print(f"Wrote {out}")
    return 0
