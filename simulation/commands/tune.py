"""``medfed tune``: hyper-parameter search with Optuna, one ``medfed simulate`` run per trial.

Argument parsing and printing only; the study is :mod:`simulation.tune`, the
search space :mod:`simulation.tune_space`. Import-light: Optuna, Flower and
torch are imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulation.commands.common import (
    add_ray_option,
    add_simulation_options,
    nonnegative_int,
    positive_float,
    positive_int,
    run_config_overrides,
)

__all__ = ["register", "run"]

DEFAULT_OUT = "results/tune"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed tune`` to the ``medfed`` parser."""
    p = subparsers.add_parser(
        "tune",
        help="hyper-parameter search (Optuna): one simulation per trial, median pruning per round",
        description=(
            "Search run-config values with Optuna's TPE sampler: every trial is a 'medfed simulate' run of the base "
            "config (--run-config, --sites, --rounds) with the trial's values of the searched keys; each round's "
            "figure is reported to the trial and median pruning stops poor trials early. The study is kept in "
            "OUT/study.db: running the same command again continues it. Writes trials.csv, best.txt (the best "
            "config as a --run-config line), tune.json and Optuna's optimisation-history and parameter-importance "
            "plots into OUT."
        ),
        epilog=(
            "Distributions: uniform(lo,hi), loguniform(lo,hi), int(lo,hi[,step]), logint(lo,hi), "
            "categorical(a,b,...). Example: medfed tune --sites 2 --rounds 3 --trials 20 "
            "--param \"lr=loguniform(1e-4,1e-2)\" --param \"local-epochs=int(1,5)\" "
            "--param \"model=categorical(small-cnn,resnet18)\""
        ),
    )
    p.add_argument("--param", "-p", action="append", default=[], metavar="'KEY=DIST(...)'",
                   help="one searched run-config key, e.g. \"lr=loguniform(1e-4,1e-2)\"; repeatable")
    p.add_argument("--space", default=None, metavar="FILE.toml",
                   help="searched keys from a TOML file: KEY = \"DIST(...)\", an array (categorical) or a table "
                        "{type=..., low=..., high=...}")
    p.add_argument("--objective", default="val", choices=("val", "worst-site", "test"),
                   help="what is maximised: val = pooled validation primary metric (AUROC / Dice, default), "
                        "worst-site = the lowest site's value of it, test = the server's test-set figure (test-path)")
    p.add_argument("--trials", type=positive_int, default=20,
                   help="trials the study should have, resumed ones included (default 20)")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="start no trial after this many seconds (the running one finishes)")
    add_simulation_options(p, run_config_help="base run config of every trial, as for 'medfed simulate'; repeatable")
    add_ray_option(p)
    p.add_argument("--out", default=None,
                   help=f"the study's folder (default {DEFAULT_OUT}); an existing study there is continued")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the TPE sampler (default 0)")
    p.add_argument("--random-trials", type=nonnegative_int, default=5,
                   help="trials sampled at random before TPE models the results (default 5)")
    p.add_argument("--prune-after", type=nonnegative_int, default=3,
                   help="finished trials before median pruning starts (default 3)")
    p.add_argument("--no-prune", action="store_true", help="never stop a trial early")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not run the base config itself as the first trial")
    p.add_argument("--trial-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="stop a trial that runs longer (it fails; default none)")
    p.add_argument("--verbose", "-v", action="store_true", help="also show each trial's round lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medfed tune``; 0 when the study ran (its trials may have failed: see trials.csv)."""
    from shared.formatting import fmt_metric
    from shared.results import resolve_results_dir
    from simulation.runner import check_ray_address, resolve_paths
    from simulation.tune import TunePlan, run_tune
    from simulation.tune_space import parse_space

    out = Path(args.out).expanduser().resolve() if args.out else resolve_results_dir(DEFAULT_OUT)
    space = parse_space(args.param, Path(args.space) if args.space else None)
    base = resolve_paths(run_config_overrides(args), Path.cwd())
    plan = TunePlan(
        out_dir=out, space=tuple(space), base=base, objective=args.objective, trials=args.trials,
        timeout=args.timeout, sites=args.sites, cpus_per_site=args.cpus_per_site,
        ray_address=check_ray_address(args.ray_address) if args.ray_address else "",
        trial_timeout=args.trial_timeout, seed=args.seed, random_trials=args.random_trials,
        prune=not args.no_prune, prune_after=args.prune_after, baseline=not args.no_baseline,
        show_rounds=args.verbose,
    )
    print(f"medfed tune: up to {plan.trials} trials, {plan.sites} sites each; study in {out}", flush=True)
    print(f"  space: {' '.join(s.describe() for s in space)}", flush=True)
    pruning = f"median pruning per round after {plan.prune_after} trials" if plan.prune else "no pruning"
    print(f"  objective: {plan.objective} (maximised); TPE sampler, seed {plan.seed}; {pruning}", flush=True)
    result = run_tune(plan, log=lambda line: print(line, flush=True))
    counts = ", ".join(f"{result.count(s)} {s}" for s in ("complete", "pruned", "failed") if result.count(s))
    print(f"medfed tune: {len(result.outcomes)} trials ({counts or 'none'}).")
    if result.best is not None:
        base_txt = (f"; baseline (trial {result.baseline.number}) {fmt_metric(result.baseline.value)}"
                    if result.baseline is not None else "")
        print(f"Best {result.label}: {fmt_metric(result.best.value)} (trial {result.best.number}){base_txt}.")
        print(f"Best config: medfed simulate --sites {plan.sites} {result.files['best'].read_text().strip()}")
    else:
        print("No trial finished: see trials.csv for the reasons.")
    for note in result.notes:
        print(f"note: {note}")
    for name in ("csv", "best", "json", "history", "importance"):
        if name in result.files:
            print(f"{name:>10}: {result.files[name]}")
    return 0
