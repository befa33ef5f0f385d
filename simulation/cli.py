"""The ``medfed`` command line: one tool, one subcommand per job.

Each subcommand only parses its arguments and delegates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from shared.config import ConfigError, describe_keys, parse_overrides
from simulation.data_cli import add_data_parser
from simulation.predict_cli import add_predict_parser
from simulation.privacy_cli import add_privacy_parser
from simulation.study_cli import add_audit_parser, add_study_parser


def _add_simulate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate",
        help="run a federated simulation on one machine",
        description=(
            "Run a federated simulation: N simulated hospital sites train together with Flower. "
            "Without data-path the sites share the task's synthetic phantoms; with "
            "data-path='/folder_or_manifest.csv' a real dataset is partitioned across them."
        ),
        epilog="Run options (--run-config keys): 'medfed simulate --list-options'.",
    )
    p.add_argument("--sites", type=int, default=3, help="number of simulated sites (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (sets num-server-rounds)")
    p.add_argument("--run-config", "-c", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="run-config overrides in Flower's syntax, e.g. \"model='resnet18' lr=0.01\"; repeatable")
    p.add_argument("--results-dir", default=None, help="parent folder of the run's results folder (default ./results)")
    p.add_argument("--explain-dir", default=None, metavar="DIR",
                   help="each simulated site writes Grad-CAM overlays of a fixed validation sample to "
                        "DIR/<site-id>/round-<NNN>/ every round (sets sim-explain-dir; classifier tasks)")
    p.add_argument("--explain-samples", type=int, default=None, metavar="N",
                   help="validation images explained per site and round (sets sim-explain-samples; default 8)")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPUs reserved per simulated site (default 1)")
    p.add_argument("--quiet", action="store_true", help="do not echo Flower's output")
    p.add_argument("--list-options", action="store_true", help="list every run-config key with its default and exit")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.list_options:
        rows = describe_keys()
        width = max(len(r[0]) for r in rows)
        for key, default, allowed, help_text in rows:
            print(f"{key:<{width}}  default {default:<16} {allowed}: {help_text}")
        return 0
    from simulation.runner import SimulationError, simulate

    overrides: dict = {}
    for text in args.run_config:
        overrides.update(parse_overrides(text))
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.results_dir:
        overrides["results-dir"] = args.results_dir
    if args.explain_dir:
        overrides["sim-explain-dir"] = args.explain_dir
    if args.explain_samples is not None:
        overrides["sim-explain-samples"] = args.explain_samples
    try:
        result = simulate(overrides, sites=args.sites, cpus_per_site=args.cpus_per_site, echo=not args.quiet)
    except SimulationError as exc:
        print(f"medfed simulate: {exc}", file=sys.stderr)
        return 1
    summary = json.loads((result.run_dir / "summary.json").read_text())
    final = summary.get("final", {})

    def fmt(k: str) -> str:
        v = final.get(k)
        return "n/a" if v is None else f"{v:.3f}"

    print(
        f"\nmedfed simulate: {summary['rounds']} rounds x {args.sites} sites in {result.seconds:.0f} s. "
        f"Final pooled validation {'macro ' if 'auroc-0' in final else ''}AUROC {fmt('auroc')}, "
        f"accuracy {fmt('accuracy')}, "
        f"sensitivity {fmt('sensitivity')}, specificity {fmt('specificity')}.\n"
        f"Results: {result.run_dir}"
    )
    privacy = summary.get("privacy") or {}
    if privacy.get("epsilon") is not None:
        print(f"Privacy: epsilon <= {privacy['epsilon']:.3f} at delta {privacy['delta']:.2g} ({privacy['accountant']}), "
              f"per {privacy['unit']}, max over sites; {len(privacy.get('budget-refusals', {}))} site(s) hit their budget.")
    if summary.get("stopped-early"):
        print(f"Stopped early: {summary['stopped-early']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``medfed`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="medfed", description="medfed: federated learning for hospital imaging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_simulate(sub)
    add_data_parser(sub)
    add_predict_parser(sub)
    add_privacy_parser(sub)
    add_study_parser(sub)
    add_audit_parser(sub)
    __import__("simulation.deploy_cli").deploy_cli.add_deploy_parser(sub)  # medfed deploy (one line: cli.py is being restructured)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"medfed: configuration error: {exc}", file=sys.stderr)
        return 2
