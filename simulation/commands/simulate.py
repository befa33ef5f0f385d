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

from simulation.commands.common import add_ray_option, add_simulation_options, run_config_overrides

__all__ = ["baseline_header_lines", "benefit_lines", "header_lines", "register", "run", "summary_lines"]


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
    add_ray_option(p)
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
    p.add_argument("--baseline", choices=("local", "pooled"), default=None,
                   help="instead of the federation, train from the same run config without Flower: 'local' = every "
                        "site alone (same rounds x local epochs, scored on its own validation split, the test set "
                        "and holdout sites), 'pooled' = one model on all sites' training images")
    p.add_argument("--compare", default=None, metavar="RUN_DIR",
                   help="with --baseline local: print each site's benefit of joining (the federated run RUN_DIR's "
                        "primary metric minus the site's local-only one); RUN_DIR must have the same settings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medfed simulate``; 0 when the run finished (errors are raised, see :mod:`simulation.cli`)."""
    if args.list_options:
        return _list_options()
    if args.compare and args.baseline != "local":
        from shared.config import ConfigError

        raise ConfigError("--compare RUN_DIR needs --baseline local (it compares a federated run with every site "
                          "training alone).")
    if args.baseline:
        return _run_baseline(args)
    from shared.results import RunFolder
    from simulation.display import RunDisplay
    from simulation.runner import plan_simulation, run_simulation

    plan = plan_simulation(run_config_overrides(args), sites=args.sites, cpus_per_site=args.cpus_per_site,
                           ray_address=args.ray_address)
    for line in header_lines(plan.config, plan.sites, plan.run_dir, verbose=args.verbose,
                             ray_address=plan.ray_address):
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
    if args.explain_dir:  # the server wrote the report without the sites' maps: add them here, locally
        from shared.report import write_run_report

        try:
            write_run_report(result.run_dir, explain_dir=Path(args.explain_dir))
        except Exception as exc:  # noqa: BLE001 - the run finished; only the gallery is missing
            print(f"warning: could not add the Grad-CAM gallery to the report ({type(exc).__name__}: {exc})")
    report = RunFolder(result.run_dir).report_path
    if report.is_file():
        print(f"Report: {report}")
    return 0


def _run_baseline(args: argparse.Namespace) -> int:
    """``medfed simulate --baseline local|pooled``: in-process, no Flower (see :mod:`simulation.baselines`)."""
    from shared.config import ConfigError
    from shared.metrics.benefit import BenefitError, benefit_from_folders, comparable_configs
    from shared.results import RunFolder, RunFolderError
    from simulation.baselines import plan_baseline, run_baseline
    from simulation.display import RunDisplay, library_logs_hidden

    if args.resume or args.explain_dir:
        raise ConfigError("--baseline runs in one go and writes no Grad-CAMs: drop --resume / --explain-dir.")
    plan = plan_baseline(run_config_overrides(args), args.baseline, sites=args.sites)
    if args.compare:  # before training: a comparison that cannot work fails now, not after the run
        try:
            folder = RunFolder.open(Path(args.compare))
            folder.read_summary()
        except RunFolderError as exc:
            raise BenefitError(f"--compare: {exc}") from None
        differ = comparable_configs(folder.run_config(), plan.config.to_flat())
        if differ:
            recorded = folder.run_config()
            shown = ", ".join(f"{k}={recorded[k]!r}" for k in differ[:6])
            raise BenefitError(f"--compare: the federated run {folder.path} was run with {shown}; give the baseline "
                               "the same settings (only strategy options may differ).")
    for line in baseline_header_lines(plan.config, plan.kind, plan.sites, plan.run_dir):
        print(line, flush=True)
    with RunDisplay(num_rounds=plan.config.num_server_rounds) as display, library_logs_hidden():
        result = run_baseline(plan, on_line=display.feed)  # the libraries' own log: baseline.log in the folder
    print(f"Results: {result.run_dir}")
    if args.compare:
        report = benefit_from_folders(Path(args.compare), result.run_dir)
        RunFolder(result.run_dir).write_benefit(report)
        for line in benefit_lines(report):
            print(line)
    return 0


def baseline_header_lines(cfg: Any, kind: str, sites: int, run_dir: Path) -> list[str]:
    """What a baseline will do, from its validated config (printed before it starts)."""
    rounds, epochs = cfg.num_server_rounds, cfg.train.local_epochs
    what = ("every site trains alone" if kind == "local"
            else "one model on all sites' training images pooled")
    data = (f"{cfg.data.phantom_count} synthetic phantoms" if not cfg.data.data_path
            else "the dataset in data-path")
    return [
        f"medfed simulate --baseline {kind}: {cfg.task} with {cfg.model} at {cfg.data.image_size} px, {what}; "
        f"{sites} sites, {rounds} round{'s' if rounds != 1 else ''} x {epochs} local epoch{'s' if epochs != 1 else ''}",
        f"  data: {data}, {cfg.partition.kind} partition{', acquisition shift' if cfg.data.site_shift else ''}; "
        "in this process (no Flower)",
        f"  results: {run_dir}",
    ]


def benefit_lines(report: dict[str, Any]) -> list[str]:
    """A benefit-of-joining report (:func:`shared.metrics.benefit.benefit_of_joining`) as lines for a person."""
    from shared.formatting import fmt_metric

    metric = str(report.get("metric", "auroc"))
    name = metric.upper() if metric == "auroc" else metric.capitalize()

    def signed(v: Any) -> str:
        return fmt_metric(v, spec="+.3f")

    lines = [f"Benefit of joining: federated {name} minus local-only {name}, per site (final round):"]
    parts = [(k, report.get(k)) for k in ("validation", "test", "holdout")]
    parts = [(k, p) for k, p in parts if p]
    sites = sorted(report["validation"]["sites"])
    short = {"validation": "val", "test": "test", "holdout": "holdout"}
    head = f"  {'site':<12}" + "".join(f"{short[k] + ' fed':>13}{short[k] + ' local':>15}{'benefit':>10}"
                                       for k, _ in parts)
    lines.append(head)
    for site in sites:
        row = f"  {site:<12}"
        for _, p in parts:
            r = p["sites"].get(site, {})
            row += f"{fmt_metric(r.get('federated')):>13}{fmt_metric(r.get('local')):>15}{signed(r.get('benefit')):>10}"
        lines.append(row)
    for k, p in parts:
        lines.append(f"  {k}: min {signed(p['min'])}, median {signed(p['median'])}, max {signed(p['max'])}; "
                     f"{p['gained']} of {p['num-sites-defined']} sites gained, {p['lost']} lost")
    return lines


def _list_options() -> int:
    from shared.config import describe_keys  # imports the model and task registries

    rows = describe_keys()
    width = max(len(r[0]) for r in rows)
    for key, default, allowed, help_text in rows:
        print(f"{key:<{width}}  default {default:<16} {allowed}: {help_text}")
    return 0


def header_lines(cfg: Any, sites: int, run_dir: Path, *, verbose: bool = False, ray_address: str = "") -> list[str]:
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
    ray_address:
        The Ray cluster the sites run on (``''`` = a private local Ray instance: no line).
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
    ray = [f"  sites run on the Ray cluster at {ray_address}"] if ray_address else []
    tracking = ([f"  tracking: {cfg.tracking} ({'mlruns' if cfg.tracking == 'mlflow' else 'tensorboard'}/ in the "
                 "results folder)"] if cfg.tracking != "none" else [])
    attack = []
    if cfg.sim_attack != "none" and cfg.sim_attack_sites > 0:
        last = sites - cfg.holdout_sites
        names = ", ".join(f"site-{p}" for p in range(max(0, last - cfg.sim_attack_sites), last))
        attack = [f"  simulated attack: {names} send{'s' if cfg.sim_attack_sites == 1 else ''} "
                  f"{cfg.sim_attack} updates (scale {cfg.sim_attack_scale:g}) every round"]
    return [
        f"medfed simulate: {cfg.task} with {cfg.model} at {cfg.data.image_size} px, {cfg.strategy.name}, "
        f"{sites} sites x {rounds} round{'s' if rounds != 1 else ''}",
        f"  data: {data}, {cfg.partition.kind} partition; {cfg.train.local_epochs} local "
        f"epoch{'s' if cfg.train.local_epochs != 1 else ''} per round (batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr:g}; recipe '{cfg.recipe}'); {dp}",
        *attack,
        *ray,
        f"  results: {run_dir}",
        *tracking,
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
