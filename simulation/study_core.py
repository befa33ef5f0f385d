"""What every ``medfed study`` shares: plan checks, the run loop, outputs that survive an interrupt.

A study is a list of :class:`PlannedRun` (each knows how to execute itself
and returns a :class:`RunReport`). :func:`run_and_write` runs them in turn:

* one progress line per run started and finished (``[study k/n] <tag>:
  started``, ``... done in S s: <figures>``, ``... FAILED after S s:
  <reason>``), with the study's elapsed time;
* a run that raises becomes a failed :class:`RunOutcome` with the first line
  of the error and the study goes on;
* the study's writer is called with the outcomes so far when the study is
  interrupted (Ctrl-C) or a run raises something that is not an
  ``Exception``, then the interrupt goes on; the outputs are marked partial.

Plan helpers (:func:`parse_seeds`, :func:`refuse_study_keys`,
:func:`check_fresh`), the seed spread (:func:`mean_std`), CSV and markdown
writers (:func:`write_csv`, :func:`markdown_table`) and
:func:`write_study_files` (``study.csv``, ``runs.csv``, ``study.md``,
``study.json``) are the common parts of :mod:`simulation.study` (privacy) and
:mod:`simulation.study_hetero` (heterogeneity).

Import-light: ``medfed --help`` imports the study modules for their defaults
(numpy, matplotlib and torch are imported inside the functions that need them).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from shared.config import ConfigError

__all__ = [
    "Log",
    "PlannedRun",
    "RunOutcome",
    "RunReport",
    "agg_max",
    "agg_min",
    "check_fresh",
    "csv_value",
    "first_line",
    "markdown_table",
    "mean_std",
    "num",
    "parse_seeds",
    "refuse_study_keys",
    "run_all",
    "run_and_write",
    "write_csv",
    "write_study_files",
]

DEFAULT_SEEDS = "0,1"
Log = Callable[[str], None]
R = TypeVar("R")


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``.

    Raises
    ------
    ConfigError
        For a value that is not a non-negative integer, or a repeated seed.
    """
    out: list[int] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        if not raw.isdigit():
            raise ConfigError(
                f"--seeds: expected non-negative integers separated by commas (e.g. '0,1,2'), got {raw!r}.")
        if int(raw) in out:
            raise ConfigError(f"--seeds: seed {raw} is listed twice in {text!r}; list each seed once.")
        out.append(int(raw))
    if not out:
        raise ConfigError(f"--seeds: expected at least one seed (e.g. '{DEFAULT_SEEDS}'), got {text!r}.")
    return tuple(out)


def refuse_study_keys(overrides: Iterable[str], study_keys: Mapping[str, str], command: str,
                      where: str = "--run-config") -> None:
    """Refuse run-config keys the study sets for every run itself.

    Parameters
    ----------
    overrides:
        The keys the user gave.
    study_keys:
        Key -> the study option that sets it (e.g. ``"seed": "--seeds"``).
    command:
        The study's command, for the message (``"medfed study privacy"``).
    where:
        Where the user gave the key (``--run-config``, a setting ...).

    Raises
    ------
    ConfigError
        Naming the key and the option to use instead.
    """
    for key in overrides:
        if key in study_keys:
            raise ConfigError(f"{command} sets '{key}' for every run itself; remove it from {where} "
                              f"and use {study_keys[key]} instead.")


def check_fresh(out_dir: Path, runs_dir: Path) -> None:
    """Refuse a study folder that already holds runs (nothing is ever overwritten)."""
    if runs_dir.exists() and any(runs_dir.iterdir()):
        raise ConfigError(f"study folder {out_dir} already holds runs; choose another --out (nothing is overwritten).")


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


@dataclass
class RunReport:
    """What a finished run returns: its results folder, figures, soft failures and the done line's text."""

    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    text: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study.

    Attributes
    ----------
    key:
        What the study groups by (e.g. ``(epsilon, seed)``).
    labels:
        The run's identifying columns, first in ``runs.csv`` (e.g.
        ``{"epsilon-target": "inf", "seed": 0}``).
    tag:
        How progress lines name it (``"eps=inf seed=0"``).
    run_dir:
        Where its results folder will be (reported for a failed run).
    execute:
        Runs it; returns a :class:`RunReport` or raises.
    notes:
        Columns a failed run still carries (e.g. ``{"audit-error": ""}``).
    """

    key: tuple[Any, ...]
    labels: Mapping[str, Any]
    tag: str
    run_dir: Path
    execute: Callable[[], RunReport]
    notes: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RunOutcome:
    """One run of a study: its figures, or why it failed.

    ``notes`` are soft failures of a finished run (e.g. ``audit-error``):
    non-empty ones count as failed in :attr:`failed`. ``details`` holds
    structured results that are no table column (kept out of :meth:`to_dict`).
    """

    key: tuple[Any, ...]
    labels: dict[str, Any]
    status: str  # "ok" or "failed"
    seconds: float
    run_dir: str = ""
    error: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The run finished (its notes may still report a soft failure)."""
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        """The run failed, or a step after it did (a non-empty note)."""
        return not self.ok or any(self.notes.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: labels, status, seconds, run-dir, error, notes, then the figures."""
        return {**self.labels, "status": self.status, "seconds": self.seconds, "run-dir": self.run_dir,
                "error": self.error, **self.notes, **self.metrics}


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (at most 300 characters): the reason a failed run shows."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def run_all(runs: Sequence[PlannedRun], outcomes: list[RunOutcome], log: Log) -> None:
    """Run each planned run in turn, appending to ``outcomes``; failures are recorded, not raised.

    Only ``Exception`` is caught: an interrupt (``KeyboardInterrupt``) ends
    the loop with the outcomes so far.
    """
    t_study = time.time()
    for k, run in enumerate(runs, 1):
        tag = f"[study {k}/{len(runs)}] {run.tag}"
        log(f"{tag}: started (study elapsed {time.time() - t_study:.0f} s)")
        t0 = time.time()
        try:
            report = run.execute()
        except Exception as exc:  # noqa: BLE001 - a failed run is a row of the table, not the end of the study
            outcome = RunOutcome(run.key, dict(run.labels), "failed", time.time() - t0, str(run.run_dir),
                                 error=first_line(exc), notes=dict(run.notes))
            outcomes.append(outcome)
            log(f"{tag}: FAILED after {outcome.seconds:.0f} s: {outcome.error} "
                f"(study elapsed {time.time() - t_study:.0f} s)")
            continue
        outcome = RunOutcome(run.key, dict(run.labels), "ok", time.time() - t0, str(report.run_dir),
                             notes={**run.notes, **report.notes}, metrics=dict(report.metrics),
                             details=dict(report.details))
        outcomes.append(outcome)
        log(f"{tag}: done in {outcome.seconds:.0f} s: {report.text} (study elapsed {time.time() - t_study:.0f} s)")


def run_and_write(runs: Sequence[PlannedRun], log: Log,
                  write: Callable[[list[RunOutcome], bool], R]) -> tuple[list[RunOutcome], R]:
    """:func:`run_all`, then ``write(outcomes, complete)``; on an interrupt ``write(outcomes_so_far, False)`` first.

    Returns
    -------
    tuple
        The outcomes and what ``write`` returned (when not interrupted).
    """
    outcomes: list[RunOutcome] = []
    try:
        run_all(runs, outcomes, log)
    except BaseException:  # an interrupted study still writes the table of the runs it finished
        write(outcomes, False)
        raise
    return outcomes, write(outcomes, True)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def num(v: Any) -> float:
    """A real number, or NaN for anything else (None, bools, strings)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of the finite values; NaN std with one value, NaN both with none."""
    import numpy as np  # not at module level: ``medfed --help`` imports this module for its defaults

    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else math.nan)


def agg_max(values: Sequence[float]) -> float:
    """Largest non-NaN value (NaN when none)."""
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def agg_min(values: Sequence[float]) -> float:
    """Smallest non-NaN value (NaN when none)."""
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def csv_value(v: Any) -> str:
    """A CSV cell: 6 significant digits for floats, empty for NaN."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows of dicts as CSV; the header is the union of their keys in first-seen order (atomic)."""
    from shared.atomic import atomic_open

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([csv_value(r.get(k, "")) for k in keys])


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_study_files(out: Path, rows: Sequence[Mapping[str, Any]], outcomes: Sequence[RunOutcome], table: str,
                      payload: Mapping[str, Any], *, complete: bool = True,
                      planned: int | None = None) -> dict[str, Path]:
    """Write ``study.csv`` (rows), ``runs.csv`` (one row per run), ``study.md`` and ``study.json`` into ``out``.

    ``study.json`` is ``payload`` plus ``rows``, ``runs`` and ``complete``
    (False when the study was interrupted; ``study.md`` then says how many of
    the ``planned`` runs it holds).
    """
    from shared.atomic import atomic_open, write_json

    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "study.csv", "json": out / "study.json", "runs": out / "runs.csv",
             "markdown": out / "study.md"}
    write_csv(files["csv"], rows)
    write_csv(files["runs"], [o.to_dict() for o in outcomes])
    note = "" if complete else (f"\n\nPARTIAL: the study was interrupted after {len(outcomes)}"
                                f"{'' if planned is None else f' of {planned}'} runs.")
    with atomic_open(files["markdown"], "w") as fh:
        fh.write(table + note + "\n")
    write_json(files["json"], {**payload, "complete": complete, "rows": list(rows),
                               "runs": [o.to_dict() for o in outcomes]})
    return files
