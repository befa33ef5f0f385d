"""What a run's results folder says, read once for the report and the model card.

Everything comes through :class:`shared.results.RunFolder` (config.json,
metrics.json, summary.json, counts.json, model.pt's card): the report never
opens a file of the folder by hand, and never sees a per-image figure, an
image path or a patient id, because the folder holds none.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.metrics.classification import ClassificationCounts
from shared.metrics.presentation import MetricView
from shared.metrics.segmentation import SegmentationCounts
from shared.registry import UnknownNameError
from shared.results import RunFolder, RunFolderError
from shared.tasks import TaskSpec, get_task

__all__ = ["RunData", "load_run"]


@dataclass(frozen=True)
class RunData:
    """One run's records, as the report needs them.

    Attributes
    ----------
    folder:
        The results folder.
    config:
        ``config.json`` (``run-config``, ``versions``, pipeline, classes).
    run_config:
        The flat run config.
    rounds:
        The round records of ``metrics.json``.
    summary:
        ``summary.json`` (``{}`` while the run has not finished).
    counts:
        The merged counts of the last evaluated round by set (``validation``,
        ``holdout``, ``test``), rebuilt as counts objects; ``{}`` for runs
        before ``counts.json`` existed.
    counts_round:
        The round those counts are from.
    meta:
        ``model.pt``'s card (``{}`` without a model file).
    task:
        The registered task.
    simulation:
        ``simulation.json`` (``{}`` for a deployed federation).
    """

    folder: RunFolder
    config: dict[str, Any]
    run_config: dict[str, Any]
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]
    counts: dict[str, ClassificationCounts | SegmentationCounts]
    counts_round: int | None
    meta: dict[str, Any]
    task: TaskSpec
    simulation: dict[str, Any]

    @property
    def view(self) -> MetricView:
        """How the task's results are shown (primary metric, columns)."""
        return self.task.view

    @property
    def class_names(self) -> tuple[str, ...]:
        """The task's classes in output order."""
        return tuple(str(c) for c in self.config.get("class-names") or self.task.class_names)

    @property
    def positive_class(self) -> int | None:
        """The positive class of a binary classification task (None otherwise: argmax or segmentation)."""
        return self.task.positive_class if self.view.name == "binary" else None

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """The rounds with pooled validation figures."""
        return [r for r in self.rounds if r.get("evaluate")]

    @property
    def last(self) -> dict[str, Any]:
        """The last round with pooled validation figures (``{}`` before any)."""
        ev = self.evaluated
        return ev[-1] if ev else {}

    @property
    def threshold(self) -> float | None:
        """The operating threshold saved with the model (chosen on the last round's pooled validation counts)."""
        for source in (self.meta.get("threshold"), self.last.get("evaluate", {}).get("threshold")):
            if isinstance(source, (int, float)) and not isinstance(source, bool) and math.isfinite(source):
                return float(source)
        return None

    @property
    def site_data(self) -> dict[str, dict[str, Any]]:
        """Each site's role and data sizes from the roll call (the latest round that has them).

        Runs recorded before the roll call was kept in the round records fall
        back to what the training and evaluation replies counted.
        """
        for r in reversed(self.rounds):
            if r.get("site-data"):
                return {s: dict(v) for s, v in r["site-data"].items()}
        sites: dict[str, dict[str, Any]] = {}
        for r in self.rounds:
            for s, m in r.get("train-sites", {}).items():
                sites.setdefault(s, {"role": "train"})["train"] = int(m.get("num-examples", 0))
            for s, m in r.get("evaluate-sites", {}).items():
                sites.setdefault(s, {"role": "train"})["validation"] = int(m.get("num-examples", 0))
            for s, m in r.get("holdout-sites", {}).items():
                sites.setdefault(s, {})["role"] = "holdout"
                sites[s]["validation"] = int(m.get("num-examples", 0))
        return sites

    @property
    def phantoms(self) -> bool:
        """Whether every site said (roll call) that its images are synthetic phantoms.

        Runs recorded before sites said so: a simulation without ``data-path``.
        """
        flags = [v.get("phantoms") for v in self.site_data.values()]
        if flags and all(f is not None for f in flags):
            return all(flags)
        return bool(self.simulation) and not self.run_config.get("data-path")

    @property
    def simulated(self) -> bool:
        """Whether the sites were simulated (they said so at the roll call, or ``simulation.json`` says so)."""
        return bool(self.simulation) or any(v.get("simulated") for v in self.site_data.values())

    def model_sha256(self) -> str | None:
        """SHA-256 of ``model.pt`` (identifies exactly which weights a document is about), None without it."""
        path = self.folder.model_path
        if not path.is_file():
            return None
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


def _counts(flat: Mapping[str, Any], task: TaskSpec) -> ClassificationCounts | SegmentationCounts | None:
    try:
        return task.view.counts_from_flat(flat)
    except (ValueError, TypeError, KeyError):
        return None


def load_run(path: Path) -> RunData:
    """Read a results folder for the report.

    Raises
    ------
    RunFolderError
        Not a medfed results folder, or its task is not registered here.
    """
    folder = RunFolder.open(Path(path))
    config = folder.read_config()
    run_config = folder.run_config()
    try:
        task = get_task(str(run_config.get("task", "")))
    except (UnknownNameError, KeyError) as exc:
        raise RunFolderError(f"'{folder.path}': its task {run_config.get('task')!r} is not registered in this "
                             f"medfed version ({exc}); a report needs the task's classes and metrics") from None
    folder.columns, folder.primary = task.view.columns, task.view.primary
    summary = folder.read_summary() if folder.summary_path.is_file() else {}
    raw = folder.read_counts()
    counts = {}
    for name, flat in (raw.get("counts") or {}).items():
        c = _counts(flat, task) if isinstance(flat, Mapping) else None
        if c is not None:
            counts[str(name)] = c
    return RunData(folder=folder, config=config, run_config=run_config, rounds=folder.read_rounds(), summary=summary,
                   counts=counts, counts_round=raw.get("round"), meta=folder.read_model_meta(), task=task,
                   simulation=folder.read_simulation())
