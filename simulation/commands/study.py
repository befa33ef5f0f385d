"""``medfed study privacy`` and ``medfed study heterogeneity``.

Argument parsing and progress output only; the studies are
:mod:`simulation.study` (privacy: DP epsilons x seeds) and
:mod:`simulation.study_hetero` (settings x strategies x seeds with local-only
and pooled baselines), both on :mod:`simulation.study_core`. Each run is
shown like a quiet ``medfed simulate`` (its round lines, indented);
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
from simulation.study_hetero import DEFAULT_SETTINGS, DEFAULT_STRATEGIES, PRESETS

__all__ = ["register", "run_heterogeneity", "run_privacy"]


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
                   help=f"target epsilons per site for the whole run, comma-separated; 'inf' = no DP "
                        f"(default {DEFAULT_EPSILONS})")
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
    _register_heterogeneity(study_sub)


def _register_heterogeneity(study_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    presets = ", ".join(PRESETS)
    p = study_sub.add_parser(
        "heterogeneity",
        help="non-IID settings x strategies x seeds, with local-only and pooled baselines",
        description=(
            "Run every setting (a named set of run-config overrides) x strategy x seed as a federated simulation, "
            "plus, per setting and seed, the local-only baseline (every site alone) and the pooled baseline (one "
            "model on all sites' data), all from the same run config; compare each federated run with its local-only "
            "baseline (each site's benefit of joining); write study.csv, study.json, runs.csv, study.md and four "
            "plots into --out (each run's results under --out/runs). Exit code: 0 all runs finished, 1 some failed "
            "(they are rows of the table), 2 bad configuration."
        ),
        epilog=(
            "--settings: entries separated by ';', each NAME[@STRATEGY,...][=OVERRIDES]; OVERRIDES in --run-config "
            f"syntax; a bare NAME must be a built-in ({presets}); '@fedavg,fedprox' limits that setting to those "
            "strategies. Example: --settings \"iid;dirichlet-0.1=partition='dirichlet' dirichlet-alpha=0.1;"
            "shift=site-shift=true\". --strategies: NAME or NAME(key=value ...), comma-separated, e.g. "
            "'fedavg,fedprox(proximal-mu=0.1),fedbn,qfedavg' (fedprox gets proximal-mu=0.01 unless set). A key is "
            "set in one place only: --run-config, a setting, or a strategy's options."
        ),
    )
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"the settings (default '{DEFAULT_SETTINGS}')")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help=f"the strategies (default '{DEFAULT_STRATEGIES}')")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"seeds of every setting and arm (default {DEFAULT_SEEDS})")
    p.add_argument("--baselines", default="local,pooled",
                   help="baselines per setting and seed: 'local', 'pooled', both (default) or 'none' "
                        "(the benefit of joining needs 'local')")
    add_simulation_options(p, run_config_help=(
        "run-config overrides passed to every run, as for 'medfed simulate'; repeatable"))
    p.add_argument("--out", default=None,
                   help="output folder (default results/study-heterogeneity-<timestamp>); must not hold runs already")
    p.add_argument("--run-timeout", type=positive_float, default=None,
                   help="seconds before one federated run is abandoned (default none)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show Flower's full output of every run (it always goes to each run's flower.log)")
    p.set_defaults(func=run_heterogeneity)


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


def run_heterogeneity(args: argparse.Namespace) -> int:
    """Run ``medfed study heterogeneity``; 0 all runs finished, 1 some failed."""
    from shared.results import resolve_results_dir
    from simulation.study_hetero import (
        HeteroPlan,
        parse_baselines,
        parse_seeds,
        parse_settings,
        parse_strategies,
        run_heterogeneity,
        run_overrides,
    )

    out = Path(args.out).expanduser().resolve() if args.out else resolve_results_dir(
        "results/study-heterogeneity-" + time.strftime("%Y%m%d-%H%M%S"))
    plan = HeteroPlan(
        out_dir=out, settings=parse_settings(args.settings), strategies=parse_strategies(args.strategies),
        seeds=parse_seeds(args.seeds), sites=args.sites, overrides=run_config_overrides(args),
        baselines=parse_baselines(args.baselines), cpus_per_site=args.cpus_per_site,
        run_timeout=args.run_timeout, echo=args.verbose,
    )
    runs = len(plan.runs())
    print(f"medfed study heterogeneity: {runs} runs ({len(plan.settings)} settings x {len(plan.seeds)} seeds; "
          f"baselines {', '.join(plan.baselines) or 'none'}), {plan.sites} sites each; output {out}", flush=True)
    for st in plan.settings:
        shown = " ".join(f"{k}={v!r}" for k, v in st.overrides.items())
        print(f"  setting {st.name}: {shown}; strategies {', '.join(s.name for s in plan.strategies_for(st))}")
    for sp in plan.strategies:
        extra = {k: v for k, v in run_overrides(plan, plan.settings[0], plan.seeds[0], sp.name).items()
                 if k in {**sp.options, **sp.defaults}}
        if extra:
            print(f"  strategy {sp.name}: " + " ".join(f"{k}={v!r}" for k, v in extra.items()))
    quiet = not args.verbose
    result = run_heterogeneity(plan, simulate_fn=_quiet_simulate if quiet else None,
                               baseline_fn=_quiet_baseline if quiet else _echo_baseline,
                               log=lambda line: print(line, flush=True))
    print("\n" + result.table + "\n")
    for name, path in result.files.items():
        print(f"{name:>15}: {path}")
    if result.failed:
        print(f"medfed study heterogeneity: {result.failed} of {runs} runs failed or could not be compared "
              "(see runs.csv)", file=sys.stderr)
        return 1
    return 0


def _quiet_baseline(overrides: Any, kind: str, *, sites: int, echo: bool = False) -> Any:
    """One baseline of the study, showing its tagged lines indented under the study's own lines."""
    from simulation.baselines import plan_baseline, run_baseline
    from simulation.display import RunDisplay, library_logs_hidden

    with RunDisplay(indent="    ") as display, library_logs_hidden():
        return run_baseline(plan_baseline(overrides, kind, sites=sites), on_line=display.feed)


def _echo_baseline(overrides: Any, kind: str, *, sites: int, echo: bool = False) -> Any:
    """One baseline of the study with every line it prints shown as it is (``--verbose``)."""
    from simulation.baselines import plan_baseline, run_baseline

    return run_baseline(plan_baseline(overrides, kind, sites=sites),
                        on_line=lambda line: (sys.stdout.write(line), sys.stdout.flush()))
