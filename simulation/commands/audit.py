"""``medfed audit membership``: a membership-inference audit of a finished simulation.

The audit itself is :mod:`shared.privacy.audit` (imported when the command
runs: it needs torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulation.commands.common import positive_int, probability

__all__ = ["register", "run_membership"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed audit membership`` to the ``medfed`` parser."""
    audit = subparsers.add_parser("audit", help="privacy audits of a finished run",
                                  description="Empirical privacy audits of a finished simulation run.")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    audit_sub.required = True
    p = audit_sub.add_parser(
        "membership",
        help="loss-threshold membership-inference attack on a simulation's final model",
        description=(
            "Rebuild each simulated site's data as the run did, score its training images (members) and "
            "validation images (non-members) by the final model's loss, and report the attack AUC and the "
            "TPR at 1%% FPR, pooled and per site. An empirical audit of one attack, not a privacy proof."
        ),
    )
    p.add_argument("run_dir", help="a simulation's results folder (config.json, model.pt)")
    p.add_argument("--sites", type=positive_int, default=None,
                   help="number of simulated sites (default: from simulation.json or the site ids in metrics.json)")
    p.add_argument("--fpr", type=probability, default=0.01,
                   help="false-positive rate of the reported TPR (default 0.01)")
    p.add_argument("--out", default=None, help="also write the report as JSON to this file")
    p.set_defaults(func=run_membership)


def run_membership(args: argparse.Namespace) -> int:
    """Run ``medfed audit membership``; 0 when the report was printed (and written)."""
    from shared.formatting import fmt_metric
    from shared.privacy.audit import audit_run
    from shared.results import write_json

    audit = audit_run(Path(args.run_dir), sites=args.sites, fpr=args.fpr)
    report = audit.to_dict()
    tpr_key = f"tpr@{args.fpr:g}fpr"
    p = report["pooled"]
    print(f"membership inference (loss threshold), {audit.sites} sites, {p['n-members']} members vs "
          f"{p['n-nonmembers']} non-members: attack AUC {fmt_metric(p['auc'])}, "
          f"TPR at {args.fpr:.0%} FPR {fmt_metric(p[tpr_key])}")
    for sid, s in report["per-site"].items():
        print(f"  {sid}: AUC {fmt_metric(s['auc'])}, TPR@{args.fpr:.0%}FPR {fmt_metric(s[tpr_key])} "
              f"({s['n-members']} members, {s['n-nonmembers']} non-members)")
    print("(an empirical audit of one attack, not a privacy proof; AUC 0.5 = chance)")
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
        print(f"report: {out}")
    return 0
