"""``medfed report``: the readable report of a run (``report.html``) and its model card.

Only parses arguments and delegates to :func:`shared.report.write_run_report`
(imported when the command runs: it needs matplotlib).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed report`` to the ``medfed`` parser."""
    p = subparsers.add_parser(
        "report",
        help="write a run's report.html (figures, tables, model card) and model-card.json",
        description=(
            "Write RUN_DIR/report.html, one self-contained page (figures embedded, no network access "
            "needed to open it): run settings and data per site, learning curves, ROC / precision-recall / "
            "calibration / confusion matrix (classification) or Dice / IoU / HD95 per site (segmentation), "
            "fairness across sites and subgroups, privacy spend, optional Grad-CAM thumbnails and the model "
            "card, also written as RUN_DIR/model-card.json. Every run writes both when it ends; this command "
            "rewrites them (e.g. to add a simulation's Grad-CAM maps)."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's results folder")
    p.add_argument("--explain-dir", type=Path, default=None, metavar="DIR",
                   help="a simulation's --explain-dir (or a site's explain-dir): add Grad-CAM thumbnails of "
                        "its last round")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medfed report``; 0 when the report was written."""
    from shared.report import write_run_report

    out = write_run_report(Path(args.run_dir), explain_dir=args.explain_dir)
    print(f"medfed report: wrote {out} and {out.with_name('model-card.json').name}")
    return 0
