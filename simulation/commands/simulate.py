"""``medfed simulate``: a federated simulation on one machine, quiet by default.

It prints a header from the validated run config before Flower starts, then
only the lines the server and sites mark for a person (one per round, as a
progress bar on a terminal; site lines, warnings, the summary), and at the
end the results folder. Flower's and Ray's own output goes to ``flower.log``
in the results folder; ``--verbose`` shows it live instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from simulation.commands.common import add_simulation_options, run_config_overrides

__all__ = ["header_lines", "register", "run", "summary_lines"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed simulate`` to the ``medfed`` parser."""
    p = subparsers.add_parser(
        "simulate",
        help="run a federated simulation on one machine",
        description=(
            "Run a federated simulation: N simulated hospital sites train together with Flower. "
            "Without data-path the sites share the task's synthetic phantoms; with "
            "data-path='/folder_or_manifest.csv' a real dataset is partitioned across them. "
            "Shows a header, one line per round and a summary; Flower's own output goes to "
            "flower.log in the run's results folder (--verbose shows it live)."
        ),
        epilog="Run options (--run-config keys): 'medfed simulate --list-options'.",
    )
    add_simulation_options(p, run_config_help=(
        "run-config overrides in Flower's syntax, e.g. \"model='resnet18' lr=0.01\"; repeatable"))
    p.add_argument("--results-dir", default=None, help="parent folder of the run's results folder (default ./results)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a stopped run from its last checkpoint, in its own folder and with its own settings "
                        "(give the same --sites; --rounds may raise the number of rounds)")
    p.add_argument("--explain-dir", default=None, metavar="DIR",
                   help="each simulated site writes Grad-CAM overlays of a fixed validation sample to "
                        "DIR/<site-id>/round-<NNN>/ every round (sets sim-explain-dir; classifier tasks)")
    p.add_argument("--explain-samples", type=int, default=None, metavar="N",
                   help="validation images explained per site and round (sets sim-explain-samples; default 8)")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("--verbose", "-v", action="store_true",
                      help="show Flower's and Ray's full output live (it always goes to flower.log)")
    loud.add_argument("--quiet", "-q", action="store_true",
                      help="no effect: quiet is the default (kept so that older scripts keep working)")
    p.add_argument("--list-options", action="store_true", help="list every run-config key with its default and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medfed simulate``; 0 when the run finished (errors are raised, see :mod:`simulation.cli`)."""
    if args.list_options:
        return _list_options()
    from shared.results import RunFolder
    from simulation.display import RunDisplay
    from simulation.runner import plan_simulation, run_simulation

    plan = plan_simulation(run_config_overrides(args), sites=args.sites, cpus_per_site=args.cpus_per_site)
    for line in header_lines(plan.config, plan.sites, plan.run_dir, verbose=args.verbose):
        print(line, flush=True)
    if args.verbose:
        result = run_simulation(plan, echo=True)
        shown_summary = False
    else:
        with RunDisplay(num_rounds=plan.config.num_server_rounds) as display:
            result = run_simulation(plan, on_line=display.feed)
        shown_summary = display.saw_summary
    summary = RunFolder(result.run_dir).read_summary()
    for line in summary_lines(summary, sites=plan.sites, seconds=result.seconds, run_dir=result.run_dir,
                              with_metrics=not shown_summary):
        print(line)
    return 0


def _list_options() -> int:
    from shared.config import describe_keys  # imports the model and task registries

    rows = describe_keys()
    width = max(len(r[0]) for r in rows)
    for key, default, allowed, help_text in rows:
        print(f"{key:<{width}}  default {default:<16} {allowed}: {help_text}")
    return 0


def header_lines(cfg: Any, sites: int, run_dir: Path, *, verbose: bool = False) -> list[str]:
    """What the run will do, from its validated config (printed before Flower starts).

    Parameters
    ----------
    cfg:
        The parsed :class:`shared.config.RunConfig` (the task's recipe applied).
    sites:
        Number of simulated sites.
    run_dir:
        The results folder the run will write.
    verbose:
        Whether Flower's output is shown live (changes the last line).
    """
    rounds = cfg.num_server_rounds
    data = (f"{cfg.data.phantom_count} synthetic phantoms" if not cfg.data.data_path
            else "the dataset in data-path")
    if cfg.dp.enabled:
        dp = (f"DP-SGD at target epsilon {cfg.dp.target_epsilon:g} per site" if cfg.dp.noise_multiplier == 0
              else f"DP-SGD with noise multiplier {cfg.dp.noise_multiplier:g}")
    else:
        dp = "no DP"
    where = "shown below" if verbose else "flower.log in the results folder (--verbose shows it live)"
    return [
        f"medfed simulate: {cfg.task} with {cfg.model} at {cfg.data.image_size} px, {cfg.strategy.name}, "
        f"{sites} sites x {rounds} round{'s' if rounds != 1 else ''}",
        f"  data: {data}, {cfg.partition.kind} partition; {cfg.train.local_epochs} local "
        f"epoch{'s' if cfg.train.local_epochs != 1 else ''} per round (batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr:g}; recipe '{cfg.recipe}'); {dp}",
        f"  results: {run_dir}",
        f"  Flower's own output: {where}",
    ]


def summary_lines(summary: dict[str, Any], *, sites: int, seconds: float, run_dir: Path,
                  with_metrics: bool = True) -> list[str]:
    """The lines printed after a finished run, from its ``summary.json``.

    Parameters
    ----------
    summary:
        The run's ``summary.json``.
    sites, seconds:
        Simulated sites and the run's wall time.
    run_dir:
        The results folder.
    with_metrics:
        Include the final pooled metrics (False when the server's tagged
        ``summary`` line already showed them).
    """
    from shared.formatting import fmt_metric

    lines = []
    if with_metrics:
        rounds = summary["rounds"]
        headline = str(summary.get("headline") or "no evaluation finished")  # worded by the task (server side)
        lines.append(f"medfed simulate: {rounds} round{'s' if rounds != 1 else ''} x {sites} sites in {seconds:.0f} s. "
                     f"{headline[:1].upper()}{headline[1:]}.")
    lines.append(f"Results: {run_dir}")
    privacy = summary.get("privacy") or {}
    if privacy.get("epsilon") is not None:
        lines.append(f"Privacy: epsilon <= {fmt_metric(privacy['epsilon'])} at delta "
                     f"{fmt_metric(privacy.get('delta'), spec='.2g')} ({privacy.get('accountant')}), "
                     f"per {privacy.get('unit')}, max over sites; "
                     f"{len(privacy.get('budget-refusals', {}))} site(s) hit their budget.")
    if summary.get("stopped-early"):
        lines.append(f"Stopped early: {summary['stopped-early']}")
    return lines
