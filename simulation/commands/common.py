"""What several ``medfed`` commands share: option types and the run-config overrides.

Import-light on purpose (``medfed --help`` imports it): only the standard
library and :mod:`shared.config`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence

from shared.config import ConfigError, ConfigValue, parse_overrides

__all__ = [
    "add_ray_option",
    "add_simulation_options",
    "collect_overrides",
    "nonnegative_int",
    "open_unit_interval",
    "positive_float",
    "positive_int",
    "probability",
    "run_config_overrides",
]

#: Command-line options that set a run-config key: attribute of the parsed
#: arguments -> (run-config key, option as typed).
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "rounds": ("num-server-rounds", "--rounds"),
    "results_dir": ("results-dir", "--results-dir"),
    "explain_dir": ("sim-explain-dir", "--explain-dir"),
    "explain_samples": ("sim-explain-samples", "--explain-samples"),
    "resume": ("resume-from", "--resume"),
}


# ---------------------------------------------------------------------------
# Option types: argparse turns their ValueError into "argument --x: <message>"
# ---------------------------------------------------------------------------


def _number(kind: Callable[[str], float], what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    convert.__name__ = what  # argparse names the type in some messages
    return convert


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
nonnegative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a number > 0", lambda v: v > 0)
probability = _number(float, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
open_unit_interval = _number(float, "a number strictly between 0 and 1", lambda v: 0.0 < v < 1.0)


# ---------------------------------------------------------------------------
# Run options of commands that run simulations (simulate, study)
# ---------------------------------------------------------------------------


def add_simulation_options(parser: argparse.ArgumentParser, *, run_config_help: str) -> None:
    """Add ``--sites``, ``--rounds``, ``--run-config/-c`` and ``--cpus-per-site``.

    Parameters
    ----------
    parser:
        The command's parser.
    run_config_help:
        Help text of ``--run-config`` (what the overrides apply to).
    """
    parser.add_argument("--sites", type=positive_int, default=3, help="number of simulated sites (default 3)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="federated rounds (sets num-server-rounds)")
    parser.add_argument("--run-config", "-c", action="append", default=[], metavar="'KEY=VALUE ...'",
                        help=run_config_help)
    parser.add_argument("--cpus-per-site", type=positive_int, default=1,
                        help="CPUs reserved per simulated site (default 1)")


def add_ray_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray-address``: run the simulated sites on an existing Ray cluster (checked when the command runs)."""
    parser.add_argument(
        "--ray-address", default=None, metavar="ADDR",
        help="run the simulated sites on an existing Ray cluster: its head's address as 'ray start --head' prints "
             "it (e.g. 10.0.0.5:6379; run medfed on a node of that cluster), 'ray://HOST:10001' (Ray Client) or "
             "'auto'; every node needs this Python environment with medfed installed. Default: a private local "
             "Ray instance per run (RAY_ADDRESS in the environment is not used)")


def collect_overrides(run_config: Sequence[str], flags: Mapping[str, ConfigValue | None] | None = None,
                      ) -> dict[str, ConfigValue]:
    """Merge ``--run-config`` texts and the options that set run-config keys into one overrides dict.

    Parameters
    ----------
    run_config:
        The ``--run-config`` texts in the order given (later ones win), in
        Flower's syntax: ``"model='resnet18' lr=0.01"``.
    flags:
        Run-config key -> value of a dedicated option (``--rounds`` sets
        ``num-server-rounds``); ``None`` or ``""`` = option not given.

    Returns
    -------
    dict
        Kebab-case key -> value, validated later by ``parse_run_config``.

    Raises
    ------
    ConfigError
        For text that is not ``key=value`` pairs, or an option that
        contradicts a ``--run-config`` value for the same key.
    """
    overrides: dict[str, ConfigValue] = {}
    for text in run_config:
        overrides.update(parse_overrides(text))
    options = {key: option for key, option in FLAG_KEYS.values()}
    for key, value in (flags or {}).items():
        if value is None or value == "":
            continue
        if key in overrides and overrides[key] != value:
            option = options.get(key, key)
            raise ConfigError(
                f"{option} {value} and --run-config {key}={overrides[key]!r} disagree: give {key} once, "
                f"either as {option} or in --run-config."
            )
        overrides[key] = value
    return overrides


def run_config_overrides(args: argparse.Namespace) -> dict[str, ConfigValue]:
    """:func:`collect_overrides` of a parsed command line (``--run-config``, ``--rounds``, ``--results-dir`` ...).

    Options the command does not have are skipped.
    """
    flags = {key: getattr(args, attr) for attr, (key, _) in FLAG_KEYS.items() if hasattr(args, attr)}
    return collect_overrides(getattr(args, "run_config", []) or [], flags)
