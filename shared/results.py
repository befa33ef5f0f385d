"""The results folder of one run and the model file format: one owner for both.

::

    <results-dir>/<run-name>/
        config.json      resolved run config (flat keys), software versions, pipeline
        metrics.json     per round: pooled and per-site training/evaluation metrics
        rounds.csv       one row per round (pooled metrics; columns from the task's view)
        sites.csv        one row per site and round
        model.pt         final global weights + their ModelCard (``meta``)
        summary.json     final pooled metrics, headline, wall time, where things are
        flower.log       Flower's full output (simulations)
        simulation.json  number of simulated sites (``medfed simulate``)
        mlruns/          MLflow file store (run config ``tracking='mlflow'``)
        tensorboard/     TensorBoard event files (``tracking='tensorboard'``)
        counts.json      the last evaluated round's merged counts (validation, holdout, test)
        report.html      the run report (``medfed report``; written at the end of every run)
        model-card.json  the model card of the report, as JSON
        benefit-of-joining.json  a local-only baseline compared with a federated run (``--compare``)
        baseline.log     the full log of an in-process baseline (``medfed simulate --baseline``)

:class:`RunFolder` holds every path, writer and reader of these files; the
server, inference, the audit, studies and the CLI go through it. Every file
is written atomically (temporary file + fsync + rename, :mod:`shared.atomic`),
so a killed run never leaves half a JSON, and rewritten after each round, so
an interrupted run keeps what it had. Nothing here holds image paths or
patient ids: only counts and rates.

:class:`ModelCard` is the typed ``meta`` of ``model.pt``: what is needed to
rebuild the network and feed it exactly as in training.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic import atomic_open, json_safe, write_json
from shared.errors import UserError
from shared.kinds import OUTPUT_KINDS

__all__ = [
    "CARD_VERSION",
    "MODEL_FILE",
    "ModelCard",
    "ModelFileError",
    "RunFolder",
    "RunFolderError",
    "json_safe",
    "model_file_path",
    "read_checkpoint",
    "read_model_file",
    "resolve_results_dir",
    "write_json",
]

MODEL_FILE = "model.pt"
CARD_VERSION = 1
DEFAULT_COLUMNS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "eval-loss")
_EXPECTED_MODEL = (
    f"expected a run's results folder containing '{MODEL_FILE}', or a '{MODEL_FILE}' written by medfed "
    "(torch.save of a dict {'state_dict': ..., 'meta': {'task', 'model', 'in-channels', 'num-classes', "
    "'class-names', 'preprocess', 'normalize', 'run-config', ...}})"
)


class RunFolderError(UserError):
    """A path is not a (finished) medfed results folder; the message says what was expected."""


class ModelFileError(UserError):
    """A path is not a usable medfed model file; the message says what was expected."""


# ---------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """What ``model.pt`` says about its weights (its ``meta``).

    Attributes
    ----------
    task, model, kind:
        Task name, registered model name, output kind (classification/segmentation).
    image_size, in_channels, num_classes, class_names, positive_class:
        Input size and channels; classes in output order; the positive class
        of a binary task (``None`` otherwise).
    preprocess, augment, normalize:
        The exact image pipeline of training (``PreprocessConfig.to_dict()``,
        ``AugmentConfig.to_dict()`` or None, batch normalisation mode).
    run_config:
        The run config without local paths (a model file travels beyond the server).
    dp:
        Built with Opacus-compatible layers (DP-SGD): the network must be rebuilt the same way.
    threshold, threshold_rule:
        Operating threshold chosen on pooled validation counts, and the rule.
    extra:
        Further card sections (kept as given; later versions add model-card fields here).
    """

    task: str
    model: str
    kind: str
    image_size: int
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]
    preprocess: Mapping[str, Any]
    normalize: str = "fixed"
    augment: Mapping[str, Any] | None = None
    positive_class: int | None = None
    run_config: Mapping[str, Any] = field(default_factory=dict)
    dp: bool = False
    threshold: float | None = None
    threshold_rule: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    REQUIRED = ("task", "model", "in-channels", "num-classes", "class-names", "preprocess", "normalize")

    def to_meta(self) -> dict[str, Any]:
        """The ``meta`` dict saved in ``model.pt`` (plain types only: loadable with ``weights_only=True``)."""
        return json_safe({
            "card-version": CARD_VERSION,
            "task": self.task, "model": self.model, "kind": self.kind,
            "image-size": self.image_size, "in-channels": self.in_channels, "num-classes": self.num_classes,
            "class-names": list(self.class_names), "positive-class": self.positive_class,
            "preprocess": dict(self.preprocess), "augment": dict(self.augment) if self.augment is not None else None,
            "normalize": self.normalize, "run-config": dict(self.run_config), "dp": self.dp,
            "threshold": self.threshold, "threshold-rule": dict(self.threshold_rule) if self.threshold_rule else None,
            **dict(self.extra),
        })

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], name: str = MODEL_FILE) -> ModelCard:
        """Read a ``meta`` dict (older files without ``kind``/``dp``/``card-version`` are accepted).

        Raises
        ------
        ModelFileError
            A required key is missing or of the wrong type.
        """
        missing = [k for k in cls.REQUIRED if k not in meta]
        if missing:
            raise ModelFileError(f"'{name}': meta lacks {missing} (found {sorted(map(str, meta))}): {_EXPECTED_MODEL}.")
        classes = meta["class-names"]
        if not isinstance(classes, (list, tuple)) or len(classes) != _int(meta, "num-classes", name):
            raise ModelFileError(f"'{name}': meta 'class-names' {classes!r} does not list "
                                 f"{meta['num-classes']} classes.")
        run_config = meta.get("run-config") or {}
        kind = meta.get("kind")
        if kind is None:  # files before card version 1: the registry entry says what the model outputs
            from shared.models import model_kind  # lazy: torch

            try:
                kind = model_kind(str(meta["model"]))
            except KeyError as exc:
                raise ModelFileError(f"'{name}': unknown model {meta['model']!r}: {exc}") from None
        if kind not in OUTPUT_KINDS:
            raise ModelFileError(f"'{name}': meta 'kind' must be one of {OUTPUT_KINDS}, got {kind!r}.")
        known = {"card-version", "task", "model", "kind", "image-size", "in-channels", "num-classes", "class-names",
                 "positive-class", "preprocess", "augment", "normalize", "run-config", "dp", "threshold",
                 "threshold-rule"}
        pc = meta.get("positive-class")
        thr = meta.get("threshold")
        return cls(
            task=str(meta["task"]), model=str(meta["model"]), kind=str(kind),
            image_size=int(meta.get("image-size") or (meta["preprocess"] or {}).get("size") or 0),
            in_channels=_int(meta, "in-channels", name), num_classes=_int(meta, "num-classes", name),
            class_names=tuple(str(c) for c in classes),
            preprocess=dict(meta["preprocess"] or {}), normalize=str(meta.get("normalize") or "fixed"),
            augment=meta.get("augment"), positive_class=int(pc) if isinstance(pc, (int, float)) else None,
            run_config=dict(run_config), dp=bool(meta.get("dp", run_config.get("dp.enabled", False))),
            threshold=float(thr) if isinstance(thr, (int, float)) and not isinstance(thr, bool) else None,
            threshold_rule=meta.get("threshold-rule"),
            extra={k: v for k, v in meta.items() if k not in known},
        )


def _int(meta: Mapping[str, Any], key: str, name: str) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ModelFileError(f"'{name}': meta '{key}' must be an integer, got {v!r}.")
    return int(v)


# ---------------------------------------------------------------------------
# Results folder
# ---------------------------------------------------------------------------


def resolve_results_dir(results_dir: str) -> Path:
    """Absolute results folder: relative paths are taken against ``MEDFED_RESULTS_ROOT`` or the cwd."""
    p = Path(results_dir).expanduser()
    if not p.is_absolute():
        p = Path(os.environ.get("MEDFED_RESULTS_ROOT", os.getcwd())) / p
    return p


class RunFolder:
    """One run's results folder: paths, writers and readers of every file in it.

    Parameters
    ----------
    path:
        The folder (it need not exist for :meth:`create`; readers need it).
    columns:
        Metric columns of rounds.csv and sites.csv (the task's
        :attr:`~shared.metrics.presentation.MetricView.columns`).
    """

    CONFIG = "config.json"
    METRICS = "metrics.json"
    ROUNDS_CSV = "rounds.csv"
    SITES_CSV = "sites.csv"
    MODEL = MODEL_FILE
    SUMMARY = "summary.json"
    FLOWER_LOG = "flower.log"
    SIMULATION = "simulation.json"
    FAIRNESS_CSV = "fairness.csv"
    CHECKPOINT = "checkpoint.json"
    BENEFIT = "benefit-of-joining.json"
    BASELINE_LOG = "baseline.log"
    CHECKPOINT_DIR = "checkpoints"
    MLFLOW_DIR = "mlruns"
    TENSORBOARD_DIR = "tensorboard"
    COUNTS = "counts.json"
    REPORT = "report.html"
    MODEL_CARD = "model-card.json"

    def __init__(self, path: Path, columns: Sequence[str] = DEFAULT_COLUMNS, primary: str = "auroc") -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.primary = primary
        self.rounds: list[dict[str, Any]] = []
        self.t0 = time.time()

    # -- creating and opening ------------------------------------------------
    @classmethod
    def create(cls, results_dir: str, run_name: str = "", *, tag: str = "",
               columns: Sequence[str] = DEFAULT_COLUMNS, primary: str = "auroc") -> RunFolder:
        """A fresh run folder; never reuses (and so never overwrites) an existing one."""
        base = resolve_results_dir(results_dir)
        name = run_name or time.strftime("%Y%m%d-%H%M%S") + (f"-{tag}" if tag else "")
        candidate, k = base / name, 1
        while candidate.exists():
            k += 1
            candidate = base / f"{name}-{k}"
        candidate.mkdir(parents=True)
        return cls(candidate, columns, primary)

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """An existing run folder (it must hold ``config.json``).

        Raises
        ------
        RunFolderError
            The folder does not exist or is not a medfed results folder.
        """
        folder = cls(Path(path).expanduser())
        if not folder.path.is_dir():
            raise RunFolderError(f"results folder '{folder.path}' does not exist: expected a medfed run's folder")
        if not folder.config_path.is_file():
            raise RunFolderError(f"'{folder.path}' has no {cls.CONFIG}: expected a medfed run's results folder")
        return folder

    # -- paths ------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        """``config.json``."""
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        """``metrics.json``."""
        return self.path / self.METRICS

    @property
    def model_path(self) -> Path:
        """``model.pt``."""
        return self.path / self.MODEL

    @property
    def summary_path(self) -> Path:
        """``summary.json``."""
        return self.path / self.SUMMARY

    @property
    def flower_log(self) -> Path:
        """``flower.log``."""
        return self.path / self.FLOWER_LOG

    @property
    def simulation_path(self) -> Path:
        """``simulation.json``."""
        return self.path / self.SIMULATION

    @property
    def mlflow_store(self) -> Path:
        """``mlruns/``: the MLflow file store of ``tracking='mlflow'`` (written by MLflow itself)."""
        return self.path / self.MLFLOW_DIR

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking URI of :attr:`mlflow_store` (``file:///.../mlruns``)."""
        return self.mlflow_store.resolve().as_uri()

    @property
    def tensorboard_dir(self) -> Path:
        """``tensorboard/``: the event files of ``tracking='tensorboard'`` (written by TensorBoard's writer)."""
        return self.path / self.TENSORBOARD_DIR

    @property
    def counts_path(self) -> Path:
        """``counts.json``."""
        return self.path / self.COUNTS

    @property
    def report_path(self) -> Path:
        """``report.html``."""
        return self.path / self.REPORT

    @property
    def model_card_path(self) -> Path:
        """``model-card.json``."""
        return self.path / self.MODEL_CARD

    # -- writers ----------------------------------------------------------------
    def write_config(self, flat_config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        """Write ``config.json``: the resolved run config plus versions and pipeline."""
        write_json(self.config_path, {"run-config": dict(flat_config), **(extra or {})})

    def add_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record and rewrite metrics.json, rounds.csv, sites.csv."""
        self.rounds.append(dict(record))
        write_json(self.metrics_path, {"rounds": self.rounds})
        self._write_csv(self.ROUNDS_CSV, self._round_rows())
        self._write_csv(self.SITES_CSV, self._site_rows())

    def write_model(self, state_dict: Mapping[str, Any], card: ModelCard) -> Path:
        """Save weights and their card as ``model.pt`` (atomically)."""
        import torch  # lazy: readers of JSON files need no torch

        with atomic_open(self.model_path, "wb") as fh:
            torch.save({"state_dict": dict(state_dict), "meta": card.to_meta()}, fh)
        return self.model_path

    def _last_evaluated(self) -> dict[str, Any]:
        evaluated = [r for r in self.rounds if r.get("evaluate")]
        return evaluated[-1] if evaluated else {}

    def final_evaluation(self) -> dict[str, Any]:
        """Pooled validation metrics of the last evaluated round (``{}`` before any)."""
        return dict(self._last_evaluated().get("evaluate", {}))

    def write_summary(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json: the last evaluated round's pooled and per-site metrics and the wall time."""
        last = self._last_evaluated()
        summary = {
            "rounds": len(self.rounds),
            "wall-seconds": time.time() - self.t0,
            "final-round": last.get("round"),
            "final": last.get("evaluate", {}),
            "final-per-site": last.get("evaluate-sites", {}),
            **(extra or {}),
        }
        write_json(self.summary_path, summary)
        return summary

    def write_fairness(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``fairness.csv``: one row per subgroup column and subgroup (its header from the first row)."""
        if not rows:
            return
        fields = list(rows[0])
        self._write_csv(self.FAIRNESS_CSV, [fields, *([_fmt(r.get(f)) for f in fields] for r in rows)])

    def write_counts(self, server_round: int, counts: Mapping[str, Mapping[str, Any]]) -> None:
        """Write ``counts.json``: a round's merged counts by name (``validation``, ``holdout``, ``test``).

        ``counts`` maps each name to the flat encoding of the summed counts
        (``ClassificationCounts.to_flat()`` / ``SegmentationCounts.to_flat()``):
        aggregate sums the server already holds, no per-image data. Rewritten
        after every evaluated round, so it holds the latest one.
        """
        write_json(self.counts_path, {"round": server_round, "counts": {k: dict(v) for k, v in counts.items()}})

    def read_counts(self) -> dict[str, Any]:
        """``counts.json`` as ``{"round": r, "counts": {name: flat counts}}`` (``{}`` when absent)."""
        return _read_json(self.counts_path)

    def write_report(self, html: str) -> Path:
        """Write ``report.html`` (atomically)."""
        with atomic_open(self.report_path, "w", encoding="utf-8") as fh:
            fh.write(html)
        return self.report_path

    def write_model_card(self, card: Mapping[str, Any]) -> Path:
        """Write ``model-card.json``: the report's model card (counts, settings, versions; no paths)."""
        write_json(self.model_card_path, dict(card))
        return self.model_card_path

    def read_model_card(self) -> dict[str, Any]:
        """``model-card.json`` (``{}`` when absent)."""
        return _read_json(self.model_card_path)

    def read_model_meta(self) -> dict[str, Any]:
        """The ``meta`` (model card) of ``model.pt`` (``{}`` when there is no model file yet).

        Raises
        ------
        ModelFileError
            The file exists but is not a medfed model.
        """
        if not self.model_path.is_file():
            return {}
        return read_checkpoint(self.model_path)[1]

    def write_simulation(self, sites: int, cpus_per_site: int) -> None:
        """Write ``simulation.json``: what the folder cannot tell by itself (the number of simulated sites)."""
        write_json(self.simulation_path, {"sites": sites, "cpus-per-site": cpus_per_site})

    def write_benefit(self, report: Mapping[str, Any]) -> Path:
        """Write ``benefit-of-joining.json`` (:func:`shared.metrics.benefit.benefit_of_joining`'s report)."""
        write_json(self.path / self.BENEFIT, dict(report))
        return self.path / self.BENEFIT

    def read_benefit(self) -> dict[str, Any]:
        """``benefit-of-joining.json`` (``{}`` when the baseline was not compared with a federated run)."""
        return _read_json(self.path / self.BENEFIT)

    def write_checkpoint(self, server_round: int, arrays: Mapping[str, Any],
                         tensors: Mapping[str, Mapping[str, Any]], state: Mapping[str, Any]) -> Path:
        """Save everything needed to continue after ``server_round``; atomic as a whole.

        ``arrays`` is the global model (name -> numpy array), ``tensors`` named
        groups of further arrays (e.g. a server optimiser's moments), ``state``
        JSON-ready state (round history, RNG states, counters). The files go to
        ``checkpoints/round-<NNNN>/`` and ``checkpoint.json`` is replaced last to
        point at them, so a crash at any moment leaves the previous checkpoint
        intact and readable. Arrays are stored as ``.npz`` without pickles.
        """
        import numpy as np

        folder = self.path / self.CHECKPOINT_DIR / f"round-{server_round:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        groups = {"global": dict(arrays), **{k: dict(v) for k, v in tensors.items()}}
        files = {}
        for name, group in groups.items():
            file = folder / f"{name}.npz"
            with atomic_open(file, "wb") as fh:
                np.savez(fh, **{f"a{i}": np.asarray(v) for i, v in enumerate(group.values())})
            files[name] = {"file": file.name, "keys": list(group)}
        write_json(folder / "state.json", {"round": server_round, "state": dict(state), "tensors": files})
        write_json(self.path / self.CHECKPOINT, {"round": server_round, "folder": str(folder.relative_to(self.path))})
        for old in sorted((self.path / self.CHECKPOINT_DIR).glob("round-*")):  # keep the latest one only
            if old != folder:
                for f in old.iterdir():
                    f.unlink(missing_ok=True)
                old.rmdir()
        return folder

    def read_checkpoint(self) -> tuple[int, dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
        """``(round, global arrays, tensor groups, state)`` of the latest checkpoint.

        Raises
        ------
        RunFolderError
            No checkpoint, or one that cannot be read (the message says which file).
        """
        import numpy as np

        pointer = _read_json(self.path / self.CHECKPOINT)
        if not pointer:
            raise RunFolderError(f"'{self.path}' has no {self.CHECKPOINT}: the run never finished a round, "
                                 "so there is nothing to resume (start it again)")
        folder = self.path / str(pointer.get("folder", ""))
        meta = _read_json(folder / "state.json")
        if not meta or meta.get("round") != pointer.get("round"):
            raise RunFolderError(f"checkpoint in '{folder}' is incomplete or does not match {self.CHECKPOINT}")
        groups: dict[str, dict[str, Any]] = {}
        for name, info in meta.get("tensors", {}).items():
            try:
                with np.load(folder / info["file"], allow_pickle=False) as npz:
                    groups[name] = {k: npz[f"a{i}"] for i, k in enumerate(info["keys"])}
            except (OSError, ValueError, KeyError) as exc:
                raise RunFolderError(f"cannot read checkpoint file {info.get('file')} in '{folder}': {exc}") from None
        arrays = groups.pop("global", {})
        return int(meta["round"]), arrays, groups, dict(meta.get("state", {}))

    # -- readers ----------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """``config.json`` as a dict (``{}`` when absent)."""
        return _read_json(self.config_path)

    def run_config(self) -> dict[str, Any]:
        """The flat run config recorded in ``config.json``."""
        return dict(self.read_config().get("run-config") or {})

    def read_rounds(self) -> list[dict[str, Any]]:
        """The per-round records of ``metrics.json`` (``[]`` when absent)."""
        return list(_read_json(self.metrics_path).get("rounds", []))

    def read_summary(self) -> dict[str, Any]:
        """``summary.json``.

        Raises
        ------
        RunFolderError
            The run did not finish (no summary).
        """
        if not self.summary_path.is_file():
            raise RunFolderError(f"'{self.path}' has no {self.SUMMARY}: the run did not finish")
        return _read_json(self.summary_path)

    def read_simulation(self) -> dict[str, Any]:
        """``simulation.json`` (``{}`` for a run that was not a ``medfed simulate``)."""
        return _read_json(self.simulation_path)

    def read_model(self) -> tuple[dict[str, Any], ModelCard]:
        """Weights and card of ``model.pt`` (read with ``weights_only=True``: never unpickles code).

        Raises
        ------
        ModelFileError
            No model file, not a torch file, or not a medfed model.
        """
        return read_model_file(self.model_path)

    # -- CSV -------------------------------------------------------------------
    def _write_csv(self, name: str, rows: list[list[str]]) -> None:
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        with atomic_open(self.path / name, "w", newline="") as fh:
            fh.write(buf.getvalue())

    def _round_rows(self) -> list[list[str]]:
        p = self.primary
        rows = [["round", "elapsed-s", "round-s", "num-sites", "train-loss", *self.columns, f"holdout-{p}", f"test-{p}",
                 "rejected-replies", "dp-epsilon", "dp-delta"]]
        for r in self.rounds:
            ev, tr, dp = r.get("evaluate", {}), r.get("train", {}), r.get("dp", {})
            rejected = len(r.get("train-rejected", [])) + len(r.get("evaluate-rejected", []))
            rows.append([r["round"], _fmt(r.get("elapsed-s")), _fmt(r.get("round-s")), _fmt(ev.get("num-sites")),
                         _fmt(tr.get("train-loss")), *(_fmt(ev.get(c)) for c in self.columns),
                         _fmt(r.get("holdout", {}).get(p)), _fmt(r.get("test", {}).get(p)), str(rejected),
                         _fmt(dp.get("epsilon")), _fmt(dp.get("delta"))])
        return rows

    def _site_rows(self) -> list[list[str]]:
        rows = [["round", "site-id", "role", "num-train", "train-loss", "train-s", "train-img-per-s", "num-val",
                 *self.columns, "gap-to-pooled", "dp-epsilon", "dp-refused", "rejected"]]
        for r in self.rounds:
            holdout = r.get("holdout-sites", {})
            gaps = {e["site"]: e.get("gap-to-pooled")
                    for e in (r.get("fairness") or {}).get("sites", {}).get("sites", [])}
            rejected = {x["site"]: x["reason"] for x in r.get("train-rejected", []) + r.get("evaluate-rejected", [])}
            sites = sorted(set(r.get("train-sites", {})) | set(r.get("evaluate-sites", {})) | set(holdout)
                           | set(r.get("dp-refusals", {})) | set(rejected))
            for s in sites:
                tr = r.get("train-sites", {}).get(s, {})
                ev = r.get("evaluate-sites", {}).get(s) or holdout.get(s, {})
                rows.append([r["round"], s, "holdout" if s in holdout else "train", _fmt(tr.get("num-examples")),
                             _fmt(tr.get("train-loss")), _fmt(tr.get("train-seconds")),
                             _fmt(tr.get("train-images-per-s")), _fmt(ev.get("num-examples")),
                             *(_fmt(ev.get(c)) for c in self.columns), _fmt(gaps.get(s)),
                             _fmt(tr.get("dp-epsilon")), "1" if s in r.get("dp-refusals", {}) else "",
                             rejected.get(s, "")])
        return rows


def model_file_path(path: Path) -> Path:
    """``path`` itself when it is a file, else ``path/model.pt``.

    Raises
    ------
    ModelFileError
        Neither exists.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.is_file():
            raise ModelFileError(f"folder '{path}' has no '{MODEL_FILE}': {_EXPECTED_MODEL}.")
        return candidate
    if not path.is_file():
        raise ModelFileError(f"model path '{path}' does not exist: {_EXPECTED_MODEL}.")
    return path


def read_model_file(path: Path) -> tuple[dict[str, Any], ModelCard]:
    """Weights and card of a ``model.pt`` (``weights_only=True``).

    Raises
    ------
    ModelFileError
        Missing, unreadable, or not a medfed model (the message says what was expected).
    """
    path = model_file_path(path)
    state, meta = read_checkpoint(path)
    return state, ModelCard.from_meta(meta, path.name)


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw ``state_dict`` and ``meta`` of a ``model.pt`` (``weights_only=True``: never unpickles code).

    Raises
    ------
    ModelFileError
        Missing, unreadable, or not ``{"state_dict": ..., "meta": ...}``.
    """
    import torch  # lazy

    path = model_file_path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a model file"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelFileError(f"cannot read '{path.name}' as a torch file ({type(exc).__name__}: {first[:200]}): "
                             f"{_EXPECTED_MODEL}.") from None
    if not isinstance(obj, Mapping) or "state_dict" not in obj or "meta" not in obj:
        found = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping)
                 else f"a {type(obj).__name__}")
        hint = (
            " It looks like a bare state dict (initial weights?): pass it as run config 'init-weights' instead."
            if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
            else ""
        )
        raise ModelFileError(f"'{path.name}' holds {found}, not a medfed model: {_EXPECTED_MODEL}.{hint}")
    state, meta = obj["state_dict"], obj["meta"]
    if not isinstance(state, Mapping) or not isinstance(meta, Mapping):
        raise ModelFileError(f"'{path.name}': 'state_dict' and 'meta' must both be dicts: {_EXPECTED_MODEL}.")
    return dict(state), dict(meta)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"cannot read '{path}': {exc}") from None
    return data if isinstance(data, dict) else {}


def _fmt(v: Any) -> str:
    """A CSV cell: empty for None/NaN/inf, 6 significant digits for floats."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)
