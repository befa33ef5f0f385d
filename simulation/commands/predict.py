"""``medfed predict``: predict images with a trained model.

Only parses arguments and delegates to :mod:`shared.inference` (imported
when the command runs: it needs torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from shared.errors import UserError
from simulation.commands.common import positive_int, probability

DEFAULT_WARN_SHARE = 0.10  # shared.ood.DEFAULT_WARN_SHARE (not imported at parse time: the parser stays light)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed predict`` to the ``medfed`` parser."""
    p = subparsers.add_parser(
        "predict",
        help="predict images with a trained model (CSV; Grad-CAM overlays or segmentation masks)",
        description=(
            "Predict image files with a trained medfed model, through the same reading and "
            "preprocessing as in training. Writes OUT/predictions.csv (input, prob-<class>..., "
            "predicted, threshold, ood-distance, ood-flag, error); 'input' is each file's path relative "
            "to the folder or manifest it was found through (the file name for a file given directly), and "
            "unreadable files get a row with the reason. "
            "A calibrated model's probabilities are softmax(logits/T + b) and its predicted class uses the "
            "threshold chosen on calibrated validation probabilities. ood-distance is each input's distance "
            "to the training population (the model's features), ood-flag 1 beyond the distance 99%% of "
            "held-out training-population images stay under; a warning is printed when more than "
            "--ood-warn-share of the inputs are flagged. With --heatmaps also OUT/heatmaps/<stem>_gradcam.png "
            "(named in the row's 'heatmap' column; <stem> is the input with '/' as '__' and no "
            "suffix): Grad-CAM of the positive class (binary) or of the predicted class, over the image "
            "at its own aspect ratio. Grad-CAM shows where the model found evidence, which is not "
            "necessarily where the disease is. Segmentation models instead write OUT/masks/<stem>_mask.png "
            "(0/255, at each input's own size) and OUT/predictions.csv (input, foreground-percent, "
            "foreground-pixels, threshold, mask, overlay, ood-distance, ood-flag, error); with --overlays also "
            "OUT/overlays/<stem>_overlay.png (mask outline over the image)."
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
    p.add_argument("--threshold", type=probability, default=None,
                   help="binary classifiers: probability of the positive class from which it is predicted "
                   "(default: the operating threshold chosen on validation data and saved with the model, else 0.5); "
                   "segmentation models: pixel foreground probability (default 0.5)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--ood-warn-share", type=probability, default=DEFAULT_WARN_SHARE, metavar="SHARE",
                   help="warn when more than this share of inputs lie beyond the training population's distance "
                   f"threshold (default {DEFAULT_WARN_SHARE}; about 0.01 is expected for images like the "
                   "training data)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medfed predict``; 0 when every input was handled (unreadable files are rows, not errors)."""
    from shared.data.sources import DataSourceError
    from shared.inference import collect_named_inputs, load_trained
    from shared.kinds import SEGMENTATION

    trained = load_trained(args.model)
    named = collect_named_inputs(args.inputs)
    if not named:
        raise DataSourceError("no image files found in the given inputs")
    files, names = [p for p, _ in named], [n for _, n in named]
    if trained.kind == SEGMENTATION:
        return _predict_masks(trained, files, names, args)
    return _predict_classes(trained, files, names, args)


def _predict_classes(trained: Any, files: list[Path], names: list[str], args: argparse.Namespace) -> int:
    from shared.inference import OODTracker, model_threshold, predict_files, write_predictions_csv

    if args.overlays:
        raise UserError("--overlays is for segmentation models; for a classifier use --heatmaps (Grad-CAM)")
    if args.threshold is not None and trained.num_classes != 2:
        raise UserError(f"--threshold applies to binary classifiers; this model has {trained.num_classes} classes "
                        "and predicts the most probable one: drop --threshold")
    out = Path(args.out)
    heat_dir = out / "heatmaps" if args.heatmaps else None
    ood = OODTracker(trained, args.ood_warn_share)
    rows = predict_files(trained, files, threshold=args.threshold, heatmap_dir=heat_dir, batch_size=args.batch_size,
                         names=names, ood=ood)
    csv_path = write_predictions_csv(rows, out / "predictions.csv", trained.class_names, heatmaps=heat_dir is not None)
    errors = sum(1 for r in rows if r.get("error"))
    counts: dict[str, int] = {}
    for r in rows:
        if not r.get("error"):
            counts[r["predicted"]] = counts.get(r["predicted"], 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    print(f"medfed predict: {len(rows)} file(s): {summary}; unreadable {errors}. Wrote {csv_path}"
          + (f" and {heat_dir}/" if heat_dir is not None else ""))
    cal = trained.calibration
    if cal is not None:
        bias = "" if not cal.bias else f", bias {', '.join(f'{b:+.3g}' for b in cal.bias)}"
        print(f"  probabilities calibrated with temperature {cal.temperature:.3g}{bias}"
              + ("" if args.threshold is not None or trained.num_classes != 2
                 else f"; operating threshold {model_threshold(trained):.3f} (chosen on calibrated validation data)"))
    _print_ood(ood)
    return 0


def _print_ood(ood: Any) -> None:
    """The out-of-distribution line (stderr when it is a warning)."""
    summary = ood.summary()
    if summary is None:
        print("  out-of-distribution: the model card has no training-population reference (inputs not scored)")
    elif summary.scored:
        print(f"  out-of-distribution: {summary.message()}", file=sys.stderr if summary.warn else sys.stdout)


def _predict_masks(trained: Any, files: list[Path], names: list[str], args: argparse.Namespace) -> int:
    from shared.inference import SEGMENTATION_COLUMNS, OODTracker, predict_masks, write_rows_csv

    if args.heatmaps:
        raise UserError("--heatmaps (Grad-CAM) is for classifiers; for a segmentation model use --overlays")
    out = Path(args.out)
    overlay_dir = out / "overlays" if args.overlays else None
    ood = OODTracker(trained, args.ood_warn_share)
    rows = predict_masks(trained, files, out / "masks", threshold=args.threshold, overlay_dir=overlay_dir,
                         batch_size=args.batch_size, names=names, ood=ood)
    csv_path = write_rows_csv(rows, out / "predictions.csv", SEGMENTATION_COLUMNS)
    errors = sum(1 for r in rows if r.get("error"))
    print(f"medfed predict: {len(rows)} file(s) segmented, unreadable {errors}. Wrote {csv_path} and {out / 'masks'}/"
          + (f" and {overlay_dir}/" if overlay_dir is not None else ""))
    _print_ood(ood)
    return 0
