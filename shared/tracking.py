"""Experiment tracking of one run: MLflow or TensorBoard, kept inside the results folder.

The run-config key ``tracking`` chooses the backend (``none``, ``mlflow``,
``tensorboard``). The server creates one tracker per run
(:func:`make_tracker`), and calls it in three places only:

* :meth:`Tracker.start` once, with the run config (local paths removed:
  :func:`tracked_config`);
* :meth:`Tracker.log_round` after every finished round, with the round's
  record as it is written to ``metrics.json`` (flattened to numbers by
  :func:`round_metrics`: pooled/per-site training and validation figures,
  the server's test set, holdout sites, the across-site fairness summary,
  DP epsilon and timings; the step is the round number);
* :meth:`Tracker.finish` at the end, with the final model card (the
  path-free ``meta`` of ``model.pt``), logged as ``model-card.json``.

What is logged never holds a local path (``data-path``, ``results-dir``, ...
are left out of the config; ``summary.json`` is not logged) or a patient
id (the round records hold counts-derived figures and site ids only).

Backends
--------
``mlflow``
    MLflow's file store in ``<run>/mlruns`` (experiment ``medfed``, one MLflow
    run per results folder; a resumed run continues its MLflow run). Read it
    back with ``MlflowClient(tracking_uri=RunFolder(run).mlflow_uri)``.
    MLflow 3.x keeps the file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``: the tracker sets that (and
    ``MLFLOW_DISABLE_TELEMETRY=true``) in its own process; set the first for
    any other process that reads the store (``mlflow migrate-filestore``
    copies it to a database).
``tensorboard``
    Event files in ``<run>/tensorboard`` (``torch.utils.tensorboard``): one
    scalar per metric and round, the config and the model card as text.

A tracker never stops a run: :class:`SafeTracker` turns any failure into one
``[medfed] warning`` line and switches tracking off for the rest of the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from shared.console import console_line
from shared.settings import PATH_KEYS, TRACKING_BACKENDS

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "EXPERIMENT",
    "MlflowTracker",
    "NullTracker",
    "SafeTracker",
    "TensorBoardTracker",
    "Tracker",
    "make_tracker",
    "metric_name",
    "round_metrics",
    "tracked_config",
]

BACKENDS = TRACKING_BACKENDS
EXPERIMENT = "medfed"
"""MLflow experiment holding the run (one experiment per results folder's store)."""
MODEL_CARD_ARTIFACT = "model-card.json"
MLFLOW_ENV = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
"""Set (unless already set) before MLflow is imported: the file store is opt-in in MLflow 3.x; no telemetry."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")  # per name part: '/' only joins parts
# round-record sections that hold one flat dict of figures -> metric prefix
_POOLED = {"train": "train", "evaluate": "val", "test": "test", "holdout": "holdout", "dp": "dp"}
# round-record sections that hold site id -> flat dict of figures -> metric group under site/<id>/
_PER_SITE = {"train-sites": "train", "evaluate-sites": "val", "holdout-sites": "holdout"}
_TIMES = ("round-s", "elapsed-s", "train-phase-s", "evaluate-phase-s", "overhead-s")
_FAIRNESS = ("worst", "best", "gap", "mean", "std", "jain-index")


class Tracker(Protocol):
    """What the server calls (see the module docstring)."""

    def start(self, config: Mapping[str, Any], *, resumed: bool = False, first_round: int = 1) -> None:
        """Open (or, for a resumed run, reopen) the tracked run and log its config.

        ``first_round`` is the round the run starts (or resumes) with.
        """

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log one finished round's figures at step ``record["round"]``."""

    def finish(self, card: Mapping[str, Any] | None, *, status: str = "FINISHED") -> None:
        """Log the final model card and close the tracked run (``FINISHED`` or ``FAILED``)."""


# ---------------------------------------------------------------------------
# What is logged
# ---------------------------------------------------------------------------


def metric_name(*parts: str) -> str:
    """Join name parts with ``/`` and keep only characters MLflow and TensorBoard accept.

    ``@`` becomes ``-at-`` (``sensitivity@thr`` -> ``sensitivity-at-thr``);
    any other character outside letters, digits, ``_ - .`` and space becomes
    ``_`` (also ``/`` inside a part: a site id cannot add a level).
    """
    return "/".join(_UNSAFE.sub("_", str(p).replace("@", "-at-")) for p in parts)


def _numbers(values: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            yield key, float(value)


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of one round record (``metrics.json``), by metric name.

    Names: ``train/<k>``, ``val/<k>`` (pooled validation), ``test/<k>``,
    ``holdout/<k>``, ``dp/<k>``, ``site/<site>/{train,val,holdout}/<k>``,
    ``fairness/sites/<k>`` (worst, best, gap, mean, std, jain-index of the
    primary metric across sites) and ``time/<k>``. Lists, strings and
    undefined (NaN) figures are left out.
    """
    out: dict[str, float] = {}
    for section, prefix in _POOLED.items():
        block = record.get(section)
        if isinstance(block, Mapping):
            out.update({metric_name(prefix, k): v for k, v in _numbers(block)})
    for section, group in _PER_SITE.items():
        sites = record.get(section)
        if isinstance(sites, Mapping):
            for site, block in sites.items():
                if isinstance(block, Mapping):
                    out.update({metric_name("site", site, group, k): v for k, v in _numbers(block)})
    fairness = record.get("fairness")
    across = fairness.get("sites") if isinstance(fairness, Mapping) else None
    if isinstance(across, Mapping):
        out.update({metric_name("fairness", "sites", k): v for k, v in _numbers(across) if k in _FAIRNESS})
    out.update({metric_name("time", k): v for k, v in _numbers(record) if k in _TIMES})
    return out


def tracked_config(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The run config without the keys that hold local paths (:data:`shared.config.PATH_KEYS`)."""
    return {k: v for k, v in flat.items() if k not in PATH_KEYS}


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


class NullTracker:
    """``tracking='none'``: does nothing."""

    def start(self, config: Mapping[str, Any], *, resumed: bool = False, first_round: int = 1) -> None:
        """Do nothing."""

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Do nothing."""

    def finish(self, card: Mapping[str, Any] | None, *, status: str = "FINISHED") -> None:
        """Do nothing."""


class MlflowTracker:
    """MLflow file store inside the results folder (one MLflow run per results folder).

    Parameters
    ----------
    store:
        The store's folder (``<run>/mlruns``).
    run_name:
        The MLflow run's name (the results folder's name).
    """

    BATCH = 1000  # MLflow's limit of metrics per log_batch call
    PARAM_BATCH = 100  # and of params

    def __init__(self, store: Path, run_name: str) -> None:
        self.store = Path(store)
        self.run_name = run_name
        self.run_id: str | None = None
        self._client: Any = None

    @property
    def uri(self) -> str:
        """The store's tracking URI (``file:///...``)."""
        return self.store.resolve().as_uri()

    def _mlflow(self) -> Any:
        for key, value in MLFLOW_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient  # lazy: only runs that track import MLflow

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def start(self, config: Mapping[str, Any], *, resumed: bool = False, first_round: int = 1) -> None:
        """Create the experiment and run (or find the run of the stopped run) and log the config as params."""
        from mlflow.entities import Param

        client = self._mlflow()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        exp_id = experiment.experiment_id if experiment is not None else client.create_experiment(EXPERIMENT)
        if resumed:
            runs = client.search_runs([exp_id], filter_string=f"tags.`medfed.run` = '{self.run_name}'", max_results=1)
            if runs:
                self.run_id = runs[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
                return
        run = client.create_run(exp_id, run_name=self.run_name, tags={"medfed.run": self.run_name})
        self.run_id = run.info.run_id
        params = [Param(metric_name(k), str(v)) for k, v in tracked_config(config).items()]
        for i in range(0, len(params), self.PARAM_BATCH):
            client.log_batch(self.run_id, params=params[i:i + self.PARAM_BATCH])

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log the round's figures as MLflow metrics at step = round."""
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        step, now = int(record["round"]), int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in round_metrics(record).items()]
        for i in range(0, len(metrics), self.BATCH):
            self._mlflow().log_batch(self.run_id, metrics=metrics[i:i + self.BATCH])

    def finish(self, card: Mapping[str, Any] | None, *, status: str = "FINISHED") -> None:
        """Log the model card as ``model-card.json`` and end the MLflow run."""
        if self.run_id is None:
            return
        client = self._mlflow()
        if card is not None:
            client.log_dict(self.run_id, dict(card), MODEL_CARD_ARTIFACT)
        client.set_terminated(self.run_id, status=status)


class TensorBoardTracker:
    """TensorBoard event files inside the results folder (``torch.utils.tensorboard``).

    Parameters
    ----------
    log_dir:
        The event files' folder (``<run>/tensorboard``).
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def start(self, config: Mapping[str, Any], *, resumed: bool = False, first_round: int = 1) -> None:
        """Open the event writer (a resumed run drops events of rounds it will redo) and log the config as text."""
        from torch.utils.tensorboard import SummaryWriter  # lazy: needs the tensorboard package

        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=first_round if resumed else None)
        if not resumed:
            rows = "\n".join(f"| {k} | {v!r} |" for k, v in tracked_config(config).items())
            self._writer.add_text("config", f"| key | value |\n|---|---|\n{rows}", 0)
        self._writer.flush()

    def log_round(self, record: Mapping[str, Any]) -> None:
        """One scalar per metric at step = round."""
        if self._writer is None:
            return
        step = int(record["round"])
        for name, value in round_metrics(record).items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def finish(self, card: Mapping[str, Any] | None, *, status: str = "FINISHED") -> None:
        """Log the model card (JSON, as text) and the final status; close the writer."""
        if self._writer is None:
            return
        if card is not None:
            self._writer.add_text(MODEL_CARD_ARTIFACT, "```json\n" + json.dumps(dict(card), indent=1) + "\n```", 0)
        self._writer.add_text("status", status, 0)
        self._writer.close()
        self._writer = None


class SafeTracker:
    """Runs a tracker so that its failures never stop the run: one warning, then tracking is off.

    Parameters
    ----------
    inner:
        The backend.
    backend:
        Its name, for the warning.
    """

    def __init__(self, inner: Tracker, backend: str) -> None:
        self.inner: Tracker | None = inner
        self.backend = backend
        self.error = ""

    def _call(self, what: str, *args: Any, **kwargs: Any) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, what)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking is optional: any failure turns it off, the run goes on
            self.inner = None
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            self.error = f"{type(exc).__name__}: {first}"
            logger.warning(console_line("warning", f"tracking ({self.backend}) failed in {what} and is off for the "
                                                   f"rest of this run; the run goes on ({self.error})"))

    def start(self, config: Mapping[str, Any], *, resumed: bool = False, first_round: int = 1) -> None:
        """:meth:`Tracker.start`, failures caught."""
        self._call("start", config, resumed=resumed, first_round=first_round)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """:meth:`Tracker.log_round`, failures caught."""
        self._call("log_round", record)

    def finish(self, card: Mapping[str, Any] | None, *, status: str = "FINISHED") -> None:
        """:meth:`Tracker.finish`, failures caught."""
        self._call("finish", card, status=status)


def make_tracker(backend: str, *, mlflow_store: Path, tensorboard_dir: Path, run_name: str) -> SafeTracker:
    """The run's tracker for ``tracking=<backend>``, wrapped in :class:`SafeTracker`.

    Parameters
    ----------
    backend:
        One of :data:`BACKENDS`.
    mlflow_store, tensorboard_dir:
        Where each backend writes (inside the results folder; see
        :class:`shared.results.RunFolder`).
    run_name:
        The results folder's name (the MLflow run's name).

    Raises
    ------
    ValueError
        For a backend not in :data:`BACKENDS` (the run config is validated before).
    """
    if backend == "mlflow":
        inner: Tracker = MlflowTracker(mlflow_store, run_name)
    elif backend == "tensorboard":
        inner = TensorBoardTracker(tensorboard_dir)
    elif backend == "none":
        inner = NullTracker()
    else:
        raise ValueError(f"tracking backend must be one of {BACKENDS}, got {backend!r}")
    return SafeTracker(inner, backend)
