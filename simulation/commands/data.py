"""``medfed data check``: the pre-flight check a hospital runs on its data.

Only parses arguments and delegates to :func:`shared.data_check.check_dataset`.
The report goes to stdout (text, or JSON with ``--json``), progress to stderr;
the exit code is the report's (0 ready, 1 ready with warnings, 2 not ready).
"""

from __future__ import annotations

import argparse
import json
import sys

from shared.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_LIMIT
from simulation.commands.common import nonnegative_int, open_unit_interval

__all__ = ["register", "run_check"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed data check`` to the ``medfed`` parser."""
    data = subparsers.add_parser(
        "data",
        help="inspect a site's data",
        description="Inspect a hospital site's data before it joins a federation.",
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True
    check = data_sub.add_parser(
        "check",
        help="pre-flight check of a site's images (counts only, no paths or ids)",
        description=(
            "Decode every image once and report counts per class (segmentation tasks: image/mask pairs, "
            "masks with and without foreground), patients, sizes, bit depths, duplicates and quarantined "
            "files, with a verdict. Reads every layout training reads (class folders, manifests; for "
            "segmentation tasks image,mask manifests, images/ + masks/ folders, run-length CSVs). "
            "Duplicates are named by manifest row or by path relative to the data folder so you can find "
            "them; --shareable leaves those names out, and what remains (no paths, file names or patient "
            "ids) can be shared with the federation's coordinator. Exit code: 0 ready, 1 ready with "
            "warnings, 2 not ready (or bad arguments)."
        ),
    )
    check.add_argument("path", help="class-folder tree, folder with manifest.csv, or a manifest .csv")
    check.add_argument("--task", default="pneumonia-cxr",
                       help="task to check against (default pneumonia-cxr; "
                            "'medfed simulate --list-options' lists the tasks under 'task')")
    check.add_argument("--val-fraction", type=open_unit_interval, default=0.2,
                       help="validation share of the site's own split (default 0.2)")
    check.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the site's split (default 0)")
    check.add_argument("--max-pixels", type=_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help=f"largest width x height (x frames) an image header may state; larger files are "
                            f"quarantined as too-large without being decoded (default {DEFAULT_MAX_PIXELS}; "
                            "use the site's node-config max-image-pixels)")
    check.add_argument("--allow-outside-root", action="store_true",
                       help="read manifest rows and symlinks that lead outside the data folder (default: "
                            "quarantined as outside-data-root; as node-config allow-outside-data-root=true)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--shareable", action="store_true",
                       help="leave out the duplicate files' names (counts only: fit to send to the coordinator)")
    check.set_defaults(func=run_check)


def _pixels(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PIXELS_LIMIT:
        raise argparse.ArgumentTypeError(
            f"expected an integer number of pixels in [1, {MAX_PIXELS_LIMIT}], got {text!r} "
            f"(e.g. {DEFAULT_MAX_PIXELS} for 50 megapixels)"
        )
    return value


def _progress(done: int, total: int) -> None:
    pct = 100 * done // total if total else 100
    end = "\n" if done >= total else ""
    prefix = "\r" if sys.stderr.isatty() else ""
    if not prefix:
        end = "\n"
    print(f"{prefix}checking images: {done}/{total} ({pct}%)", end=end, file=sys.stderr, flush=True)


def run_check(args: argparse.Namespace) -> int:
    """Run ``medfed data check``; returns the report's exit code."""
    from shared.data_check import check_dataset, format_report

    report = check_dataset(args.path, args.task, val_fraction=args.val_fraction, seed=args.seed, progress=_progress,
                           max_pixels=args.max_pixels, allow_outside_root=args.allow_outside_root)
    if args.json:
        print(json.dumps(report.to_dict(shareable=args.shareable), indent=2))
    else:
        print(format_report(report, shareable=args.shareable), end="")
    return report.exit_code()
