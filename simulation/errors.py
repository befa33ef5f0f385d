"""Errors of a simulation run (import-light: the ``medfed`` entry point maps them without importing the runner)."""

from __future__ import annotations

from pathlib import Path

from shared.errors import UserError

__all__ = ["SimulationError", "SimulationPlanError"]


class SimulationError(RuntimeError):
    """The simulation could not be started or did not finish (``medfed`` exit code 1).

    Attributes
    ----------
    log_file:
        Where Flower's full output of the failed run was kept (None when the
        run failed before Flower started).
    """

    def __init__(self, message: str, *, log_file: Path | None = None) -> None:
        super().__init__(message)
        self.log_file = log_file


class SimulationPlanError(SimulationError, UserError):
    """A simulation that cannot run as asked (sites, min-sites, an existing results folder): the user's to fix
    (``medfed`` exit code 2)."""
