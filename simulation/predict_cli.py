"""``medfed predict`` and ``medfed evaluate``: use a trained model.

Only parses arguments and delegates to :mod:`shared.inference`. Errors (bad
model file, missing input, unsupported model kind) are printed as one line
to stderr with exit code 2. :mod:`shared.inference` (torch, the model zoo) is
imported when a command runs, so that other ``medfed`` commands (``data
check``) start fast and small.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from shared.data.sources import DataSourceError
from shared.kinds import SEGMENTATION
from shared.results import write_json

if TYPE_CHECKING:
    from shared.inference import TrainedModel

__all__ = ["add_predict_parser"]


def _user_errors() -> tuple[type[BaseException], ...]:
    from shared.inference import ModelFileError, NotSupportedError

    return (ModelFileError, NotSupportedError, DataSourceError, ValueError)


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``predict`` and ``evaluate`` commands to a CLI's subparsers.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``parser.add_subparsers()`` returned; ``args.func(args)`` then
        runs the chosen command and returns its exit code.
    """
    p = subparsers.add_parser(
        "predict",
        help="predict images with a trained model (CSV; Grad-CAM overlays or segmentation masks)",
        description=(
            "Predict image files with a trained medfed model, through the same reading and "
            "preprocessing as in training. Writes OUT/predictions.csv (input, prob-<class>..., "
            "predicted, error); unreadable files get a row with the reason. With --heatmaps also "
            "OUT/heatmaps/<stem>_gradcam.png: Grad-CAM of the positive class (binary) or of the "
            "predicted class, over the image at its own aspect ratio. Grad-CAM shows where the model "
            "found evidence, which is not necessarily where the disease is. Segmentation models "
            "instead write OUT/masks/<stem>_mask.png (0/255, at each input's own size) and "
            "OUT/predictions.csv (input, foreground-percent, foreground-pixels, mask, overlay, error); "
            "with --overlays also OUT/overlays/<stem>_overlay.png (mask outline over the image)."
        ),
    )
    p.add_argument("--model", "-m", required=True, type=Path, metavar="RUN_DIR_OR_FILE",
                   help="a run's results folder (with model.pt) or a model.pt file")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="image files (PNG, JPEG, DICOM...), folders (searched recursively) or manifest .csv files")
    p.add_argument("--out", "-o", type=Path, default=Path("predictions"),
                   help="output folder (default ./predictions)")
    p.add_argument("--heatmaps", action="store_true", help="classifiers: also write Grad-CAM overlays to OUT/heatmaps/")
    p.add_argument("--overlays", action="store_true",
                   help="segmentation models: also write the mask outline over each image to OUT/overlays/")
    p.add_argument("--threshold", type=float, default=None,
                   help="binary classifiers: probability of the positive class from which it is predicted "
                   "(default: the operating threshold chosen on validation data and saved with the model, else 0.5); "
                   "segmentation models: pixel foreground probability (default 0.5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.set_defaults(func=_cmd_predict)

    e = subparsers.add_parser(
        "evaluate",
        help="score a trained model on a labelled dataset",
        description=(
            "Score a trained medfed model on a labelled dataset (class folders, a folder with "
            "manifest.csv, or a manifest .csv). Class names are matched to the model's "
            "case-insensitively. Segmentation models take image/mask pairs (manifest image,mask"
            "[,spacing_mm], images/ + masks/ folders, or images with a SIIM-ACR run-length CSV) and report "
            "Dice, IoU, HD95 in pixels and, for images with a known pixel spacing, hd95-mm. "
            "Writes the metrics as JSON (no file paths) and prints a table."
        ),
    )
    e.add_argument("--model", "-m", required=True, type=Path, metavar="RUN_DIR_OR_FILE",
                   help="a run's results folder (with model.pt) or a model.pt file")
    e.add_argument("data", type=Path, metavar="DATA", help="class-folder tree, folder with manifest.csv, or a manifest .csv")
    e.add_argument("--out", "-o", type=Path, default=Path("metrics.json"), help="metrics JSON file (default ./metrics.json)")
    e.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    e.set_defaults(func=_cmd_evaluate)


def _fail(command: str, exc: BaseException) -> int:
    print(f"medfed {command}: {exc}", file=sys.stderr)
    return 2


def _cmd_predict(args: argparse.Namespace) -> int:
    from shared.inference import collect_inputs, load_trained, predict_files, write_predictions_csv

    try:
        trained = load_trained(args.model)
        files = collect_inputs(args.inputs)
        if not files:
            raise DataSourceError("no image files found in the given inputs")
        if trained.kind == SEGMENTATION:
            return _predict_masks(trained, files, args)
        if args.overlays:
            raise ValueError("--overlays is for segmentation models; for a classifier use --heatmaps (Grad-CAM)")
        out = Path(args.out)
        heat_dir = out / "heatmaps" if args.heatmaps else None
        rows = predict_files(trained, files, threshold=args.threshold, heatmap_dir=heat_dir, batch_size=args.batch_size)
    except _user_errors() as exc:
        return _fail("predict", exc)
    csv_path = write_predictions_csv(rows, out / "predictions.csv", trained.class_names)
    errors = sum(1 for r in rows if r.get("error"))
    counts: dict[str, int] = {}
    for r in rows:
        if not r.get("error"):
            counts[r["predicted"]] = counts.get(r["predicted"], 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    print(f"medfed predict: {len(rows)} file(s): {summary}; unreadable {errors}. Wrote {csv_path}"
          + (f" and {heat_dir}/" if heat_dir is not None else ""))
    return 0


def _predict_masks(trained: TrainedModel, files: list[Path], args: argparse.Namespace) -> int:
    from shared.inference import SEGMENTATION_COLUMNS, predict_masks, write_rows_csv

    if args.heatmaps:
        raise ValueError("--heatmaps (Grad-CAM) is for classifiers; for a segmentation model use --overlays")
    out = Path(args.out)
    overlay_dir = out / "overlays" if args.overlays else None
    rows = predict_masks(trained, files, out / "masks", threshold=args.threshold, overlay_dir=overlay_dir,
                         batch_size=args.batch_size)
    csv_path = write_rows_csv(rows, out / "predictions.csv", SEGMENTATION_COLUMNS)
    errors = sum(1 for r in rows if r.get("error"))
    print(f"medfed predict: {len(rows)} file(s) segmented, unreadable {errors}. Wrote {csv_path} and {out / 'masks'}/"
          + (f" and {overlay_dir}/" if overlay_dir is not None else ""))
    return 0


def _evaluate_segmentation(trained: TrainedModel, args: argparse.Namespace) -> int:
    from shared.inference import evaluate_segmentation

    try:
        report = evaluate_segmentation(trained, args.data)
    except _user_errors() as exc:
        return _fail("evaluate", exc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    m = report["metrics"]
    print(f"medfed evaluate: {trained.model_name} ({trained.task}) on {report['num-images']} image/mask pairs"
          + (f", skipped {sum(report['skipped'].values())}" if report["skipped"] else ""))
    for key in ("dice", "iou", "hd95", "hd95-mm"):
        print(f"  {key:<12} {_fmt(m.get(key))}")
    print(f"Wrote {out}")
    return 0


def _fmt(v: object) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from shared.inference import evaluate_dataset, load_trained

    try:
        trained = load_trained(args.model)
        if trained.kind == SEGMENTATION:
            return _evaluate_segmentation(trained, args)
        result = evaluate_dataset(trained, args.data, batch_size=args.batch_size)
    except _user_errors() as exc:
        return _fail("evaluate", exc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result.to_dict(trained))
    m = result.metrics
    print(f"medfed evaluate: {trained.model_name} ({trained.task}) on {result.counts.num_examples} images"
          + (f", skipped {sum(result.skipped.values())}" if result.skipped else ""))
    if trained.num_classes > 2:
        print(f"  (argmax decisions; sensitivity ... ece are macro averages of one-vs-rest figures "
              f"over {trained.num_classes} classes)")
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "auprc", "ece"):
        print(f"  {key:<12} {_fmt(m.get(key))}")
    if "threshold" in m:
        print(f"  at the model's operating threshold {_fmt(m.get('threshold'))}: "
              f"sensitivity {_fmt(m.get('sensitivity@thr'))}, specificity {_fmt(m.get('specificity@thr'))}")
    print(f"Wrote {out}")
    return 0
