"""``medfed privacy plan``: what a site will spend, round by round, before a run starts.

It calls exactly the accounting code the sites run (shared/privacy/accounting.py).
"""

from __future__ import annotations

import argparse
import json

from shared.privacy.accounting import ACCOUNTANTS  # import-light: the accountants load when a plan is computed

__all__ = ["register", "run_plan"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``medfed privacy plan`` to the ``medfed`` parser."""
    p = subparsers.add_parser("privacy", help="privacy tools (planner)", description="Differential-privacy tools.")
    psub = p.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")
    psub.required = True
    pl = psub.add_parser(
        "plan",
        help="epsilon a site spends after each planned round (or the noise needed for a target)",
        description=(
            "Print the cumulative epsilon a site with N training images will have spent after each round of "
            "DP-SGD (Poisson sampling, rate B/N), with a given noise multiplier or the one calibrated for a "
            "target epsilon over the whole plan. Same code as the sites' privacy ledger."
        ),
    )
    # Sizes are plain ints: the planner's own messages explain what is wrong with a 0 or a batch > N.
    pl.add_argument("--dataset-size", type=int, required=True, help="training images at the site (N)")
    pl.add_argument("--batch-size", type=int, required=True, help="expected batch size (B)")
    pl.add_argument("--epochs-per-round", type=int, default=1, help="local epochs per round (default 1)")
    pl.add_argument("--rounds", type=int, required=True, help="planned federated rounds")
    pl.add_argument("--delta", type=float, default=None, help="delta (default 1/(10 N), as the sites use)")
    g = pl.add_mutually_exclusive_group(required=True)
    g.add_argument("--noise-multiplier", type=float, help="DP-SGD noise multiplier sigma")
    g.add_argument("--target-epsilon", type=float, help="calibrate sigma so the whole plan spends at most this")
    pl.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp", help="privacy accountant (default rdp)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Run ``medfed privacy plan``; 0 when the plan was printed."""
    from shared.formatting import fmt_metric
    from shared.privacy.accounting import UNIT_NOTE, plan

    p = plan(dataset_size=args.dataset_size, batch_size=args.batch_size, epochs_per_round=args.epochs_per_round,
             rounds=args.rounds, delta=args.delta, noise_multiplier=args.noise_multiplier,
             target_epsilon=args.target_epsilon, accountant=args.accountant)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    print(f"N={p.dataset_size} images, batch {p.batch_size} (sampling rate {p.sample_rate:.5g}), "
          f"{p.epochs_per_round} epoch(s)/round, {p.rounds} rounds, delta {p.delta:.3g}, "
          f"{p.accountant.upper()} accountant")
    how = f"calibrated for epsilon {p.target_epsilon:g} over the whole plan" if p.target_epsilon else "given"
    print(f"noise multiplier {fmt_metric(p.noise_multiplier, 4)} ({how})")
    print(f"{'round':>6} {'steps':>7} {'total steps':>12} {'epsilon':>9}")
    for row in p.rows:
        print(f"{row.round:>6} {row.steps:>7} {row.cumulative_steps:>12} {fmt_metric(row.epsilon):>9}")
    print(f"epsilon is cumulative, {UNIT_NOTE}.")
    return 0
