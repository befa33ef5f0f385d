"""``medfed study privacy`` and ``medfed audit membership``: argument parsing only.

The study logic is in :mod:`simulation.study`, the audit in
:mod:`shared.privacy.audit`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shared.config import ConfigValue, parse_overrides
from shared.results import resolve_results_dir, write_json

__all__ = ["add_audit_parser", "add_study_parser"]


def add_study_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed study privacy`` to a CLI's subparsers."""
    from simulation.study import DEFAULT_EPSILONS, DEFAULT_SEEDS

    study = subparsers.add_parser("study", help="run a study: the same simulation under several settings",
                                  description="Studies: the same federated simulation repeated under several settings.")
    study_sub = study.add_subparsers(dest="study_command", metavar="SUBCOMMAND")
    study_sub.required = True
    p = study_sub.add_parser(
        "privacy",
        help="utility and membership-inference risk at several DP epsilons x seeds",
        description=(
            "Run the same simulation at several DP-SGD target epsilons ('inf' = no DP) and seeds, audit each "
            "final model with a loss-threshold membership-inference attack, and write study.csv, study.json, "
            "runs.csv, study.md and utility_vs_epsilon.png into --out (each run's results under --out/runs). "
            "Exit code: 0 all runs and audits finished, 1 some failed (they are rows of the table), "
            "2 bad configuration."
        ),
    )
    p.add_argument("--epsilons", default=DEFAULT_EPSILONS,
                   help=f"target epsilons per site for the whole run, comma-separated; 'inf' = no DP (default {DEFAULT_EPSILONS})")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"seeds repeated at each epsilon (default {DEFAULT_SEEDS})")
    p.add_argument("--sites", type=int, default=3, help="number of simulated sites (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (sets num-server-rounds)")
    p.add_argument("--run-config", "-c", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="run-config overrides passed to every run, as for 'medfed simulate'; repeatable")
    p.add_argument("--out", default=None,
                   help="output folder (default results/study-privacy-<timestamp>); must not hold runs already")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPUs reserved per simulated site (default 1)")
    p.add_argument("--no-audit", action="store_true", help="skip the membership-inference audit of each run")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds before one run is abandoned (default none)")
    p.add_argument("--verbose", action="store_true", help="echo Flower's output of every run")
    p.set_defaults(func=_cmd_study_privacy)


def _cmd_study_privacy(args: argparse.Namespace) -> int:
    from simulation.study import StudyPlan, parse_epsilons, parse_seeds, run_study

    overrides: dict[str, ConfigValue] = {}
    for text in args.run_config:
        overrides.update(parse_overrides(text))
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    out = Path(args.out).expanduser().resolve() if args.out else resolve_results_dir(
        "results/study-privacy-" + time.strftime("%Y%m%d-%H%M%S"))
    plan = StudyPlan(
        out_dir=out, epsilons=parse_epsilons(args.epsilons), seeds=parse_seeds(args.seeds), sites=args.sites,
        overrides=overrides, cpus_per_site=args.cpus_per_site, audit=not args.no_audit,
        run_timeout=args.run_timeout, echo=args.verbose,
    )
    runs = len(plan.epsilons) * len(plan.seeds)
    print(f"medfed study privacy: {runs} runs ({len(plan.epsilons)} epsilons x {len(plan.seeds)} seeds), "
          f"{plan.sites} sites each; output {out}", flush=True)
    result = run_study(plan, log=lambda line: print(line, flush=True))
    print("\n" + result.table + "\n")
    for name, path in result.files.items():
        print(f"{name:>9}: {path}")
    if result.failed:
        print(f"medfed study privacy: {result.failed} of {runs} runs failed or could not be audited (see runs.csv)",
              file=sys.stderr)
        return 1
    return 0


def add_audit_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed audit membership`` to a CLI's subparsers."""
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
    p.add_argument("--sites", type=int, default=None,
                   help="number of simulated sites (default: from simulation.json or the site ids in metrics.json)")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the reported TPR (default 0.01)")
    p.add_argument("--out", default=None, help="also write the report as JSON to this file")
    p.set_defaults(func=_cmd_audit_membership)


def _cmd_audit_membership(args: argparse.Namespace) -> int:
    from shared.privacy.audit import AuditError, audit_run

    try:
        audit = audit_run(Path(args.run_dir), sites=args.sites, fpr=args.fpr)
    except (AuditError, ValueError) as exc:
        print(f"medfed audit membership: {exc}", file=sys.stderr)
        return 2
    report = audit.to_dict()
    tpr_key = f"tpr@{args.fpr:g}fpr"
    p = report["pooled"]
    print(f"membership inference (loss threshold), {audit.sites} sites, {p['n-members']} members vs "
          f"{p['n-nonmembers']} non-members: attack AUC {p['auc']:.3f}, TPR at {args.fpr:.0%} FPR {p[tpr_key]:.3f}")
    for sid, s in report["per-site"].items():
        print(f"  {sid}: AUC {s['auc']:.3f}, TPR@{args.fpr:.0%}FPR {s[tpr_key]:.3f} "
              f"({s['n-members']} members, {s['n-nonmembers']} non-members)")
    print("(an empirical audit of one attack, not a privacy proof; AUC 0.5 = chance)")
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
        print(f"report: {out}")
    return 0
