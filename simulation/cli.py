"""The ``medfed`` command line: one tool, one module per command.

This module only assembles the commands listed in :data:`COMMANDS` (see
:mod:`simulation.commands` for how to add one) and maps errors to exit codes
in one place (:func:`main`):

* a :class:`shared.errors.UserError` (bad configuration, data, model file,
  ...) or a command-line usage error: one line ``medfed <command>: <message>``
  on stderr, exit code 2;
* a :class:`simulation.runner.SimulationError` (a run failed): its message
  (the tail of Flower's output and where the full log is), exit code 1;
* an interrupt (Ctrl-C): exit code 130;
* anything else is a bug and shows its traceback.

Commands return their own documented exit codes otherwise (``data check``:
0/1/2 verdicts; ``study privacy``: 0/1).

Building the parser imports no heavy library (torch, Flower, MONAI, ...):
``medfed --help`` answers at once; commands import what they need when run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from shared.errors import UserError
from simulation.errors import SimulationError

__all__ = ["COMMANDS", "UsageError", "build_parser", "main", "version_text"]

COMMANDS: tuple[str, ...] = (
    "simulation.commands.simulate:register",
    "simulation.commands.data:register",
    "simulation.commands.predict:register",
    "simulation.commands.evaluate:register",
    "simulation.commands.report:register",
    "simulation.commands.privacy:register",
    "simulation.commands.study:register",
    "simulation.commands.tune:register",
    "simulation.commands.audit:register",
    "simulation.deploy_cli:add_deploy_parser",
)
"""Every command as ``"module:function"``, in ``medfed --help`` order; the
function is called with the subparsers object and adds the command's parser
(see :mod:`simulation.commands`). One line per command."""

COMMAND_ATTR = "medfed_command"
"""Namespace attribute holding the chosen command's name, e.g. ``"data check"``."""


class UsageError(UserError):
    """A command line argparse refused (unknown option, bad value, missing argument).

    Attributes
    ----------
    prog:
        The (sub)command whose arguments were wrong, e.g. ``"medfed simulate"``.
    """

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class MedfedParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises :class:`UsageError` instead of printing usage and exiting,
    and records the chosen (sub)command's name in the parsed namespace."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` (argparse would print the usage and exit)."""
        raise UsageError(self.prog, message)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse as argparse does; the innermost parser that ran names the command."""
        ns, extras = super().parse_known_args(args, namespace)
        if getattr(ns, COMMAND_ATTR, None) is None:
            setattr(ns, COMMAND_ATTR, self.prog.partition(" ")[2] or "")
        return ns, extras

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """Parse; leftover arguments are an error of the command they were given to."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(ns, COMMAND_ATTR, "")
            raise UsageError(f"{self.prog} {command}".strip(), f"unrecognized arguments: {' '.join(extras)}")
        return ns


def version_text() -> str:
    """``medfed <version> (Flower <v>, torch <v>, Python <v>)``, from package metadata (nothing imported)."""
    import importlib.metadata

    parts = []
    for label, dist in (("Flower", "flwr"), ("torch", "torch")):
        try:
            parts.append(f"{label} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{label} not installed")
    parts.append(f"Python {sys.version.split()[0]}")
    return f"medfed {medfed_version()} ({', '.join(parts)})"


def medfed_version() -> str:
    """medfed's version: the installed package's metadata, else ``pyproject.toml`` of this checkout."""
    import importlib.metadata
    import tomllib

    try:
        return importlib.metadata.version("medfed")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` and exit 0 (the versions are read only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS,
                         help="print medfed's version (with Flower's and torch's) and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_text())
        parser.exit(0)


def _registration(spec: str) -> Callable[[Any], None]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def build_parser() -> argparse.ArgumentParser:
    """The ``medfed`` argument parser with every command of :data:`COMMANDS`."""
    parser = MedfedParser(prog="medfed", description="medfed: federated learning for hospital imaging",
                          epilog="'medfed COMMAND --help' describes a command.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for spec in COMMANDS:
        _registration(spec)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: parse, run the command, map errors to exit codes (see the module doc)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{exc.prog}: {exc} (see '{exc.prog} --help')", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prog = f"medfed {getattr(args, COMMAND_ATTR, '')}".strip()
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SimulationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (a KeyError-based UserError would otherwise be quoted)."""
    text = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    return " ".join(text.split())

