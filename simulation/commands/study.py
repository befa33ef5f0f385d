"""``medfed study privacy``: the same simulation at several DP epsilons x seeds.

Argument parsing and progress output only; the study is :mod:`simulation.study`.
Each run is shown like a quiet ``medfed simulate`` (its round lines, indented);
``--verbose`` shows Flower's full output of every run instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from simulation.commands.common import add_simulation_options, positive_float, run_config_overrides
from simulation.study import DEFAULT_EPSILONS, DEFAULT_SEEDS

__all__ = ["register", "run_privacy"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed study privacy`` to the ``medfed`` parser."""
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
    add_simulation_options(p, run_config_help=(
        "run-config overrides passed to every run, as for 'medfed simulate'; repeatable"))
    p.add_argument("--out", default=None,
                   help="output folder (default results/study-privacy-<timestamp>); must not hold runs already")
    p.add_argument("--no-audit", action="store_true", help="skip the membership-inference audit of each run")
    p.add_argument("--run-timeout", type=positive_float, default=None,
                   help="seconds before one run is abandoned (default none)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show Flower's full output of every run (it always goes to each run's flower.log)")
    p.set_defaults(func=run_privacy)


def run_privacy(args: argparse.Namespace) -> int:
    """Run ``medfed study privacy``; 0 all runs and audits finished, 1 some failed."""
    from shared.results import resolve_results_dir
    from simulation.study import StudyPlan, parse_epsilons, parse_seeds, run_study

    out = Path(args.out).expanduser().resolve() if args.out else resolve_results_dir(
        "results/study-privacy-" + time.strftime("%Y%m%d-%H%M%S"))
    plan = StudyPlan(
        out_dir=out, epsilons=parse_epsilons(args.epsilons), seeds=parse_seeds(args.seeds), sites=args.sites,
        overrides=run_config_overrides(args), cpus_per_site=args.cpus_per_site, audit=not args.no_audit,
        run_timeout=args.run_timeout, echo=args.verbose,
    )
    runs = len(plan.epsilons) * len(plan.seeds)
    print(f"medfed study privacy: {runs} runs ({len(plan.epsilons)} epsilons x {len(plan.seeds)} seeds), "
          f"{plan.sites} sites each; output {out}", flush=True)
    result = run_study(plan, simulate_fn=None if args.verbose else _quiet_simulate,
                       log=lambda line: print(line, flush=True))
    print("\n" + result.table + "\n")
    for name, path in result.files.items():
        print(f"{name:>9}: {path}")
    if result.failed:
        print(f"medfed study privacy: {result.failed} of {runs} runs failed or could not be audited (see runs.csv)",
              file=sys.stderr)
        return 1
    return 0


def _quiet_simulate(overrides: Any, **kwargs: Any) -> Any:
    """One run of the study, showing only its tagged lines (indented under the study's own lines)."""
    from simulation.display import RunDisplay
    from simulation.runner import simulate

    with RunDisplay(indent="    ") as display:
        return simulate(overrides, on_line=display.feed, **kwargs)
