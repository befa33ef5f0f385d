"""Use a trained medfed model: load ``model.pt``, predict files, score a labelled set.

A run's ``model.pt`` (written by :meth:`shared.results.RunFolder.write_model`)
holds ``{"state_dict", "meta"}``; ``meta`` is its :class:`~shared.results.ModelCard`: the task, the model, the
classes and the exact input pipeline of training (``preprocess``,
``normalize``, the path-free ``run-config``). :func:`load_trained` rebuilds the
network from it, and :func:`predict_files` feeds new images through *the same*
pipeline: reader (DICOM windowing, colour order) -> :func:`preprocess` ->
``[0, 1]`` -> :func:`normalize_batch` -> softmax.

When the model card carries a fitted calibration (``calibration``, see
:mod:`shared.metrics.calibration`) the probabilities are ``softmax(logits /
T + b)`` and the operating threshold is the one chosen on those calibrated
probabilities; without one, the raw softmax and the card's threshold. When it
carries an out-of-distribution reference (``ood``, :mod:`shared.ood`), every
readable input gets its distance to the training population and a flag
(beyond the distance 99 % of held-out training-population images stay
under), and :class:`OODTracker` sums a batch up (share flagged, intensity
shift) for the warning of ``medfed predict``/``evaluate``.

Files that cannot be read become rows with an ``error`` reason; they never
stop a batch. Every file is screened before decoding like a site's files: an
image whose header states more than the default pixel cap
(:data:`shared.limits.DEFAULT_MAX_PIXELS`) is refused as ``too-large``
undecoded. Logging is counts only, never a file name.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from shared.config import ConfigError, RunConfig, parse_recorded_run_config
from shared.data.attributes import manifest_attributes
from shared.data.labels import task_labels
from shared.data.preprocess import PreprocessConfig, content_box, model_spacing, normalize_batch, preprocess
from shared.data.reading import make_reader
from shared.data.sources import DataSourceError, discover, registered_suffixes
from shared.errors import UserError
from shared.kinds import CLASSIFICATION, SEGMENTATION
from shared.metrics.calibration import Calibration, card_calibration
from shared.metrics.classification import ClassificationCounts
from shared.metrics.presentation import MetricView, view_for
from shared.models import build_network, model_kind
from shared.ood import DEFAULT_WARN_SHARE, OODReference, OODSummary, intensity_counts, summarize
from shared.registry import UnknownNameError
from shared.results import MODEL_FILE, ModelCard, ModelFileError, model_file_path, read_checkpoint
from shared.tasks import TaskSpec, get_task
from shared.training import images_to_tensor, to_float01

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE",
    "EvaluationResult",
    "SegmentationEvaluation",
    "ModelFileError",
    "NotSupportedError",
    "OOD_COLUMNS",
    "OODTracker",
    "TrainedModel",
    "collect_inputs",
    "collect_named_inputs",
    "output_stem",
    "evaluate_dataset",
    "evaluate_segmentation",
    "model_threshold",
    "load_trained",
    "mask_at_input_size",
    "predict_files",
    "predict_masks",
    "score_segmentation",
    "SEGMENTATION_COLUMNS",
    "write_predictions_csv",
    "write_rows_csv",
]

#: Long side (px) of written heatmap overlays; larger inputs are shrunk, aspect kept.
HEATMAP_MAX_SIDE = 1024


class NotSupportedError(UserError):
    """The model's kind is not supported by this operation (e.g. a classifier entry point for a segmentation model)."""


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A rebuilt model (eval mode, CPU, fp32) and the ``meta`` (model card) it was saved with."""

    model: nn.Module
    meta: Mapping[str, Any]
    path: Path
    run_config: RunConfig
    preprocess: PreprocessConfig

    @property
    def card(self) -> ModelCard:
        """The typed model card of :attr:`meta`."""
        return ModelCard.from_meta(self.meta, self.path.name)

    @property
    def model_name(self) -> str:
        """Registered model name."""
        return str(self.meta["model"])

    @property
    def task(self) -> str:
        """Task name."""
        return str(self.meta["task"])

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in output order."""
        return tuple(str(c) for c in self.meta["class-names"])

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return int(self.meta["num-classes"])

    @property
    def in_channels(self) -> int:
        """Input channels of the network."""
        return int(self.meta["in-channels"])

    @property
    def normalize(self) -> str:
        """Batch intensity normalisation used in training."""
        return str(self.meta.get("normalize") or "fixed")

    @property
    def kind(self) -> str:
        """What the network outputs, from its model registry entry (classification or segmentation)."""
        return model_kind(self.model_name)

    @property
    def view(self) -> MetricView:
        """How this model's results are shown (primary metric, report keys)."""
        return view_for(self.kind, self.num_classes)

    @property
    def positive_class(self) -> int | None:
        """Positive class of a binary task: ``meta['positive-class']``, the task's, or 1.

        ``None`` for a model with more than two classes (argmax decisions, macro metrics).
        """
        if self.num_classes > 2:
            return None
        if self.meta.get("positive-class") is not None:
            return int(self.meta["positive-class"])
        spec = self.task_spec()
        return int(spec.positive_class) if spec is not None and spec.positive_class is not None else 1

    @property
    def calibration(self) -> Calibration | None:
        """The fitted calibration of the card (None: the model is used uncalibrated)."""
        found = card_calibration(self.meta.get("calibration"), self.num_classes)
        return found[0] if found is not None else None

    @property
    def temperature(self) -> float:
        """The temperature the logits are divided by (1.0 = uncalibrated)."""
        cal = self.calibration
        return cal.temperature if cal is not None else 1.0

    @cached_property
    def ood_reference(self) -> OODReference | None:
        """The training population the card describes (None: no out-of-distribution warning possible)."""
        ref = OODReference.from_card(self.meta.get("ood"))
        if ref is None and isinstance(self.meta.get("ood"), Mapping) and self.meta["ood"].get("status") == "ready":
            logger.warning("the model card's out-of-distribution section is damaged: inputs are not scored")
        return ref

    def task_spec(self) -> TaskSpec | None:
        """The registered task of this model when its classes match the model's, else ``None``."""
        try:
            spec = get_task(self.task)
        except (UnknownNameError, KeyError):
            return None
        same = [c.lower() for c in spec.class_names] == [c.lower() for c in self.class_names]
        return spec if same else None


def load_trained(path: Path) -> TrainedModel:
    """Load a trained medfed model.

    Parameters
    ----------
    path : Path
        A run's results folder (containing ``model.pt``) or a ``model.pt`` file.

    Returns
    -------
    TrainedModel
        The network rebuilt with :func:`shared.models.build_network` (the same
        constructor as server and sites: Opacus-compatible layers for a
        DP-trained model), weights loaded (strict), in eval mode on the CPU,
        with its card.

    Raises
    ------
    ModelFileError
        (a ``UserError``) when the path is missing, not a torch file, not a
        medfed model (no ``state_dict``/``meta``), names an unknown model, or
        its weights do not fit the rebuilt network. The message says what
        was expected.
    """
    file = model_file_path(Path(path))
    state, meta = read_checkpoint(file)
    card = ModelCard.from_meta(meta, file.name)
    try:
        pcfg = PreprocessConfig.from_dict(card.preprocess)
    except (ConfigError, TypeError) as exc:
        raise ModelFileError(f"'{file.name}': meta 'preprocess' is not valid: {exc}") from None
    try:
        cfg = parse_recorded_run_config({**card.run_config, "task": card.task, "model": card.model},
                                        drop_paths=True)
    except ConfigError as exc:
        raise ModelFileError(
            f"'{file.name}': its recorded run-config is not valid for this medfed version: {exc}") from None
    try:
        model, _ = build_network(card.model, card.in_channels, card.num_classes, dp=cfg.dp.enabled,
                                 image_size=card.image_size or None)
    except (UnknownNameError, ValueError, TypeError) as exc:
        raise ModelFileError(f"'{file.name}': cannot rebuild model {card.model!r}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelFileError(
            f"'{file.name}': its weights do not fit a '{card.model}' with {card.in_channels} input channels "
            f"and {card.num_classes} classes ({first[:300]}). The file is damaged or its meta does not match."
        ) from None
    model.float().eval()
    logger.info("loaded model %s for task %s (%d classes)", card.model, card.task, card.num_classes)
    return TrainedModel(model=model, meta=meta, path=file, run_config=cfg, preprocess=pcfg)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _manifest_paths(manifest: Path) -> list[tuple[Path, str]]:
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None) or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataSourceError(f"cannot read manifest '{manifest.name}': {exc}. Expected a UTF-8 CSV file.") from None
    lower = [h.strip().lower() for h in header]
    if "path" not in lower:
        raise DataSourceError(
            f"manifest '{manifest.name}' has no 'path' column (found {[h.strip() for h in header]}): expected a CSV "
            "with a 'path' column of image files relative to the manifest's folder."
        )
    i = lower.index("path")
    out = []
    for row in rows:
        if len(row) > i and row[i].strip():
            written = row[i].strip().replace("\\", "/")
            path = (manifest.parent / written).absolute()
            out.append((path, _relative_name(path, manifest.parent)))
    return out


def _relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators; the file name alone when it lies elsewhere."""
    try:
        rel = os.path.relpath(path, root.absolute())
    except ValueError:  # another drive (Windows)
        return path.name
    return path.name if rel.startswith("..") else Path(rel).as_posix()


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """The image files of :func:`collect_named_inputs`, without their names."""
    return [path for path, _ in collect_named_inputs(inputs)]


def collect_named_inputs(inputs: Sequence[Path]) -> list[tuple[Path, str]]:
    """Expand inputs into image files, in order, without duplicates, each with the name its rows carry.

    A file's name is its path relative to the input it was found through,
    with ``/`` separators: ``NORMAL/x.jpeg`` for a folder input, the row's
    path for a manifest (relative to the manifest's folder; the file name
    when it lies outside), the file name for a file given directly. So two
    ``x.jpeg`` in different folders are told apart. When two inputs yield
    the same name, the later one is prefixed with its input's own name
    (``batch2/NORMAL/x.jpeg``), then numbered (``#2``) if that still clashes.

    Parameters
    ----------
    inputs : sequence of Path
        Image files (kept whatever their suffix: an unreadable one becomes an
        error row later), folders (searched recursively for files with a
        registered suffix, hidden files skipped, sorted), or manifest ``.csv``
        files (their ``path`` column, relative to the manifest's folder;
        missing files are kept and reported as error rows).

    Raises
    ------
    DataSourceError
        An input does not exist, or a manifest has no ``path`` column.
    """
    suffixes = set(registered_suffixes())
    out: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    names: set[str] = set()

    def add(p: Path, name: str, root_name: str) -> None:
        key = p.absolute()
        if key in seen:
            return
        seen.add(key)
        if name in names and root_name:
            name = f"{root_name}/{name}"
        base, k = name, 1
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.add(name)
        out.append((p, name))

    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in suffixes and not _is_hidden(f, p):
                    add(f, f.relative_to(p).as_posix(), p.absolute().name)
        elif p.is_file() and p.suffix.lower() == ".csv":
            for f, name in _manifest_paths(p):
                add(f, name, p.stem)
        elif p.is_file():
            add(p, p.name, "")
        else:
            raise DataSourceError(f"input '{p}' does not exist: expected image files, folders or manifest .csv files.")
    return out


# ---------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------


@dataclass
class _Decoded:
    """One input after reading: the model input, or why there is none."""

    path: Path
    image: np.ndarray | None = None  # preprocessed uint8 square
    shape: tuple[int, int] | None = None  # decoded (H, W)
    error: str = ""  # message (names the file, never its folder)
    reason: str = ""  # short count label, safe to log


def _error_text(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{reason}: {msg}" if reason and not msg.startswith(str(reason)) else msg


def _decode(path: Path, reader: Callable[[Path], np.ndarray],
            pcfg: PreprocessConfig) -> tuple[_Decoded, np.ndarray | None]:
    try:
        raw = reader(path)
        img = preprocess(raw, pcfg)
    except Exception as exc:  # noqa: BLE001 - any failure of one file is that file's row, never a crash
        reason = str(getattr(exc, "reason", "") or type(exc).__name__)
        return _Decoded(path, error=_error_text(exc) or "unreadable", reason=reason), None
    return _Decoded(path, image=img, shape=(int(raw.shape[0]), int(raw.shape[1]))), raw


def _model_input(trained: TrainedModel, images: np.ndarray) -> torch.Tensor:
    x = to_float01(images_to_tensor(images), trained.in_channels, torch.device("cpu"), channels_last=False)
    return normalize_batch(x, trained.normalize)


@torch.no_grad()
def _forward(trained: TrainedModel, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """``(outputs, OOD distances or None)`` of one batch: raw network outputs (float64), each input's distance."""
    trained.model.eval()
    ref = trained.ood_reference
    if ref is None:
        return trained.model(x).float().numpy().astype(np.float64), None
    from shared.models.features import forward_with_features

    y, f = forward_with_features(trained.model, trained.model_name, x)
    return y.float().numpy().astype(np.float64), ref.distances(f.numpy())


def _probabilities(trained: TrainedModel, logits: np.ndarray) -> np.ndarray:
    """``softmax(logits / T + b)`` with the card's calibration (the plain softmax when the model has none)."""
    return (trained.calibration or Calibration()).probabilities(logits)


def model_threshold(trained: TrainedModel) -> float:
    """The operating threshold that goes with the probabilities this module outputs, else 0.5.

    A calibrated model's threshold was re-chosen on calibrated validation
    probabilities (card ``calibration.threshold``); otherwise the one chosen on
    the uncalibrated pooled validation counts (card ``threshold``).
    """
    cal = card_calibration(trained.meta.get("calibration"))
    # a fitted calibration without its own threshold: the uncalibrated one does not apply to its probabilities
    thr = trained.meta.get("threshold") if cal is None else cal[1]
    if isinstance(thr, (int, float)) and not isinstance(thr, bool) and math.isfinite(thr) and 0.0 <= thr <= 1.0:
        return float(thr)
    return 0.5


#: Columns every ``predictions.csv`` ends with: the input's distance to the training population and its flag
#: (empty when the model carries no out-of-distribution reference or the file was unreadable).
OOD_COLUMNS = ("ood-distance", "ood-flag")


class OODTracker:
    """Sums up the inputs of one ``predict``/``evaluate`` call for the out-of-distribution warning."""

    def __init__(self, trained: TrainedModel, warn_share: float = DEFAULT_WARN_SHARE) -> None:
        self.reference = trained.ood_reference
        self.warn_share = warn_share
        self.distances: list[float] = []
        self.intensity: np.ndarray | None = None

    def add(self, distances: np.ndarray | None, images: np.ndarray) -> None:
        """Record a batch: the inputs' distances and their preprocessed uint8 images ``(N, H, W[, C])``."""
        if self.reference is None or distances is None:
            return
        self.distances.extend(float(d) for d in distances)
        counts = intensity_counts(images_to_tensor(images).numpy())
        self.intensity = counts if self.intensity is None else self.intensity + counts

    def summary(self) -> OODSummary | None:
        """The batch's share flagged and intensity shift (None when the model carries no reference)."""
        if self.reference is None:
            return None
        return summarize(self.reference, self.distances, self.intensity, self.warn_share)

    def row(self, distance: float | None) -> dict[str, Any]:
        """The OOD columns of one readable input."""
        if self.reference is None or distance is None:
            return {"ood-distance": None, "ood-flag": ""}
        return {"ood-distance": float(distance), "ood-flag": int(distance > self.reference.threshold)}


def _check_classifier(trained: TrainedModel, what: str, instead: str) -> None:
    if trained.kind != CLASSIFICATION:
        raise NotSupportedError(
            f"{what} works for classifiers only, and '{trained.model_name}' is a segmentation model: "
            f"use {instead} instead."
        )


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_files(
    trained: TrainedModel,
    files: list[Path],
    *,
    threshold: float | None = None,
    heatmap_dir: Path | None = None,
    batch_size: int = 32,
    names: Sequence[str] | None = None,
    ood: OODTracker | None = None,
) -> list[dict[str, Any]]:
    """Predict each file with the model's own training pipeline.

    Parameters
    ----------
    trained : TrainedModel
        From :func:`load_trained`.
    files : list of Path
        Image files (see :func:`collect_inputs`).
    threshold : float, optional
        Binary models: ``predicted`` is the positive class when its
        probability is ``>= threshold`` (default: the operating threshold the
        federation chose on validation data, stored in ``model.pt``; 0.5 when
        the file has none). Multi-class models:
        must be ``None`` (argmax).
    heatmap_dir : Path, optional
        Write a Grad-CAM overlay per readable file here, named after the
        file's row (:func:`output_stem`: ``NORMAL/x.jpeg`` ->
        ``NORMAL__x_gradcam.png``; ``-2`` ... on clashes): the decoded image
        at its own aspect ratio (long side at most :data:`HEATMAP_MAX_SIDE`)
        with the heatmap of the positive class (binary) or of the predicted
        class (multi-class).
    batch_size : int
        Images per forward pass.
    names : sequence of str, optional
        The name of each file's row (:func:`collect_named_inputs`); default
        the file name.
    ood : OODTracker, optional
        Collects the batch's distances for the out-of-distribution summary.

    Returns
    -------
    list of dict
        One row per file, in order: ``input`` (its name), ``prob-<class>``
        per class (calibrated when the model carries a calibration),
        ``predicted`` (class name), ``threshold`` (the probability of the
        positive class from which it is predicted; None for multi-class
        models, which take the most probable class), ``ood-distance`` and
        ``ood-flag`` (1 beyond the training population's threshold; empty
        without a reference), ``error`` (empty, or why the file could not be
        used; its probabilities and prediction are then empty), and
        ``heatmap`` (file name or empty).

    Raises
    ------
    NotSupportedError
        For a segmentation model.
    ValueError
        For a bad ``threshold`` or ``batch_size``.
    """
    _check_classifier(trained, "predict_files", "predict_masks")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    binary = trained.num_classes == 2
    if threshold is not None:
        if not binary:
            raise ValueError(f"threshold applies to binary models only; this model has {trained.num_classes} classes "
                             "(argmax is used)")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    thr = model_threshold(trained) if threshold is None else float(threshold)
    pos = trained.positive_class
    classes = trained.class_names
    files = list(files)
    row_names = list(names) if names is not None else [Path(f).name for f in files]
    if len(row_names) != len(files):
        raise ValueError(f"names must give one name per file: {len(row_names)} names for {len(files)} files")
    name_of = dict(zip(range(len(files)), row_names, strict=True))
    reader = make_reader(trained.run_config)
    if heatmap_dir is not None:
        heatmap_dir = Path(heatmap_dir)
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    used_names: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    errors = 0
    position = 0
    ood = ood if ood is not None else OODTracker(trained)
    for chunk in _chunks(files, batch_size):
        decoded: list[_Decoded] = []
        raws: list[np.ndarray | None] = []
        chunk_names = [name_of[position + i] for i in range(len(chunk))]
        position += len(chunk)
        for path in chunk:
            d, raw = _decode(Path(path), reader, trained.preprocess)
            decoded.append(d)
            raws.append(raw if heatmap_dir is not None else None)
        ok = [i for i, d in enumerate(decoded) if d.image is not None]
        probs = np.zeros((0, trained.num_classes))
        maps: np.ndarray | None = None
        dist: np.ndarray | None = None
        if ok:
            batch = np.stack([decoded[i].image for i in ok])  # type: ignore[misc]
            x = _model_input(trained, batch)
            logits, dist = _forward(trained, x)
            probs = _probabilities(trained, logits)
            ood.add(dist, batch)
            if heatmap_dir is not None:
                from shared.explain import gradcam

                target = pos if binary else None
                maps = gradcam(trained.model, trained.model_name, x, target_class=target)
        k_of = {i: k for k, i in enumerate(ok)}
        for i, d in enumerate(decoded):
            row: dict[str, Any] = {"input": chunk_names[i]}
            if i not in k_of:
                errors += 1
                row.update({f"prob-{c}": None for c in classes})
                row.update(predicted="", threshold=thr if binary else None, **ood.row(None), error=d.error,
                           heatmap="")
                rows.append(row)
                continue
            p = probs[k_of[i]]
            row.update({f"prob-{c}": float(p[j]) for j, c in enumerate(classes)})
            if binary:
                predicted = classes[pos] if p[pos] >= thr else classes[1 - pos]
            else:
                predicted = classes[int(np.argmax(p))]
            row.update(predicted=predicted, threshold=thr if binary else None,
                       **ood.row(None if dist is None else dist[k_of[i]]), error="", heatmap="")
            if maps is not None and heatmap_dir is not None:
                row["heatmap"] = _write_heatmap(heatmap_dir, d, raws[i], maps[k_of[i]], trained.preprocess, used_names,
                                                output_stem(chunk_names[i]))
            rows.append(row)
    logger.info("predicted %d file(s), %d unreadable", len(rows) - errors, errors)
    return rows


# ---------------------------------------------------------------------------
# Heatmap overlays at the input's aspect ratio
# ---------------------------------------------------------------------------


def _display_uint8(raw: np.ndarray) -> np.ndarray:
    """A decoded image as uint8 for display: (H, W) gray or (H, W, 3) RGB."""
    img = np.asarray(raw)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    data = img.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(img.shape, np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if img.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    scaled = (np.where(finite, data, lo) - lo) / max(hi - lo, 1e-12)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _unique_stem(stem: str, used: Counter[str]) -> str:
    """``stem`` the first time, then ``stem-2``, ``stem-3``... (inputs from different folders may share a name)."""
    used[stem] += 1
    n = used[stem]
    return stem if n == 1 else f"{stem}-{n}"


def output_stem(name: str) -> str:
    """The stem of the files written for a row named ``name``: the relative path without its suffix, ``/`` as ``__``.

    ``NORMAL/x.jpeg`` -> ``NORMAL__x``; ``x.png`` -> ``x``. Heatmaps and masks
    are ``<stem>_gradcam.png`` / ``<stem>_mask.png``, so a file can be found
    from its row (the row also names it).
    """
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        return "image"
    parts[-1] = Path(parts[-1]).stem or parts[-1]
    return "__".join(parts)


def _unique_name(stem: str, used: Counter[str]) -> str:
    return f"{_unique_stem(stem, used)}_gradcam.png"


def _write_heatmap(
    out_dir: Path, d: _Decoded, raw: np.ndarray | None, heat: np.ndarray, pcfg: PreprocessConfig, used: Counter[str],
    stem: str,
) -> str:
    from shared.explain import overlay

    if raw is None or d.shape is None:
        return ""
    h, w = d.shape
    top, left, th, tw = content_box(h, w, pcfg)
    heat = heat[top : top + th, left : left + tw]  # drop the letterbox padding
    base = _display_uint8(raw)
    scale = min(1.0, HEATMAP_MAX_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        base = cv2.resize(base, size, interpolation=cv2.INTER_AREA)
    name = _unique_name(stem, used)
    image = overlay(base, heat, rgb=True)
    if not cv2.imwrite(str(out_dir / name), image):
        logger.warning("could not write a heatmap overlay")
        return ""
    return name


# ---------------------------------------------------------------------------
# Segmentation: masks at the input's own resolution
# ---------------------------------------------------------------------------

#: Columns of a segmentation model's ``predictions.csv``.
SEGMENTATION_COLUMNS = ("input", "foreground-percent", "foreground-pixels", "threshold", "mask", "overlay",
                        *OOD_COLUMNS, "error")
#: BGR colour of the mask contour in overlays (yellow: visible on gray radiographs and on skin).
CONTOUR_BGR = (0, 255, 255)


def _foreground_probability(logits: np.ndarray) -> np.ndarray:
    """``(B, S, S)`` probability that a pixel is not background (class 0), from ``(B, K, S, S)`` logits."""
    probs = torch.softmax(torch.from_numpy(logits), dim=1)
    return (1.0 - probs[:, 0]).numpy().astype(np.float32)


def mask_at_input_size(prob: np.ndarray, shape: tuple[int, int], pcfg: PreprocessConfig,
                       threshold: float = 0.5) -> np.ndarray:
    """Undo :func:`preprocess`'s geometry for a model-resolution probability map.

    Parameters
    ----------
    prob : np.ndarray
        ``(S, S)`` foreground probability in the preprocessed square.
    shape : tuple of int
        ``(height, width)`` of the decoded input image.
    pcfg : PreprocessConfig
        The model's preprocessing (letterbox padding is cropped off, a
        squash is stretched back).
    threshold : float
        Foreground where the bilinearly resized probability is ``>= threshold``.

    Returns
    -------
    np.ndarray
        ``bool`` mask of shape ``shape``.
    """
    h, w = int(shape[0]), int(shape[1])
    top, left, th, tw = content_box(h, w, pcfg)
    crop = np.ascontiguousarray(prob[top : top + th, left : left + tw], dtype=np.float32)
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR) >= threshold


def _contour_overlay(raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BGR image (long side at most :data:`HEATMAP_MAX_SIDE`) with the mask's outline drawn on it."""
    base = _display_uint8(raw)
    bgr = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR) if base.ndim == 2 else cv2.cvtColor(base, cv2.COLOR_RGB2BGR)
    m = mask.astype(np.uint8)
    h, w = m.shape
    scale = min(1.0, HEATMAP_MAX_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        m = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(max(bgr.shape[:2]) / 256))
    return cv2.drawContours(np.ascontiguousarray(bgr), contours, -1, CONTOUR_BGR, thickness)


def predict_masks(
    trained: TrainedModel,
    files: list[Path],
    mask_dir: Path,
    *,
    threshold: float | None = None,
    overlay_dir: Path | None = None,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
    ood: OODTracker | None = None,
) -> list[dict[str, Any]]:
    """Segment each file with the model's own training pipeline and write its mask.

    Parameters
    ----------
    trained : TrainedModel
        A segmentation model from :func:`load_trained`.
    files : list of Path
        Image files (see :func:`collect_inputs`).
    mask_dir : Path
        Where ``<stem>_mask.png`` is written per readable file, ``<stem>``
        named after its row (:func:`output_stem`; ``-2`` ... on clashes):
        0/255 at the input's own height and width
        (letterbox padding cropped off, squash undone), foreground where the
        probability of "not background" is ``>= threshold``.
    threshold : float, optional
        Pixel probability threshold in ``[0, 1]``; default 0.5.
    overlay_dir : Path, optional
        Also write ``<stem>_overlay.png`` here: the image with the mask's
        outline in yellow (long side at most :data:`HEATMAP_MAX_SIDE`).
    batch_size : int
        Images per forward pass.
    names : sequence of str, optional
        The name of each file's row (:func:`collect_named_inputs`); default
        the file name.
    ood : OODTracker, optional
        Collects the batch's distances for the out-of-distribution summary.

    Returns
    -------
    list of dict
        One row per file, in order, with the keys of
        :data:`SEGMENTATION_COLUMNS`: ``input`` (its name),
        ``foreground-percent`` (mask area in % of the image),
        ``foreground-pixels``, ``threshold`` (the pixel probability
        threshold used), ``mask`` and ``overlay`` (file names or empty),
        ``ood-distance`` and ``ood-flag`` (bottleneck features; empty
        without a reference), ``error`` (empty, or why the file could not be used).

    Raises
    ------
    NotSupportedError
        For a classifier.
    ValueError
        For a bad ``threshold`` or ``batch_size``.
    """
    if trained.kind != SEGMENTATION:
        raise NotSupportedError(f"'{trained.model_name}' is a classifier: use predict_files")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if threshold is not None and not (
            isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    thr = 0.5 if threshold is None else float(threshold)
    files = list(files)
    row_names = list(names) if names is not None else [Path(f).name for f in files]
    if len(row_names) != len(files):
        raise ValueError(f"names must give one name per file: {len(row_names)} names for {len(files)} files")
    reader = make_reader(trained.run_config)
    mask_dir = Path(mask_dir)
    mask_dir.mkdir(parents=True, exist_ok=True)
    if overlay_dir is not None:
        overlay_dir = Path(overlay_dir)
        overlay_dir.mkdir(parents=True, exist_ok=True)
    used: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    errors = 0
    position = 0
    ood = ood if ood is not None else OODTracker(trained)
    for chunk in _chunks(files, batch_size):
        chunk_names = row_names[position : position + len(chunk)]
        position += len(chunk)
        decoded = [_decode(Path(path), reader, trained.preprocess) for path in chunk]
        ok = [i for i, (d, _) in enumerate(decoded) if d.image is not None]
        probs = np.zeros((0, 1, 1), np.float32)
        dist: np.ndarray | None = None
        if ok:
            batch = np.stack([decoded[i][0].image for i in ok])  # type: ignore[misc]
            logits, dist = _forward(trained, _model_input(trained, batch))
            probs = _foreground_probability(logits)
            ood.add(dist, batch)
        k_of = {i: k for k, i in enumerate(ok)}
        for i, (d, raw) in enumerate(decoded):
            row: dict[str, Any] = {"input": chunk_names[i], "foreground-percent": None, "foreground-pixels": None,
                                   "threshold": thr, "mask": "", "overlay": "", **ood.row(None), "error": d.error}
            rows.append(row)
            if i not in k_of or d.shape is None or raw is None:
                errors += 1
                continue
            row.update(ood.row(None if dist is None else dist[k_of[i]]))
            mask = mask_at_input_size(probs[k_of[i]], d.shape, trained.preprocess, thr)
            pixels = int(np.count_nonzero(mask))
            stem = _unique_stem(output_stem(chunk_names[i]), used)
            row.update({"foreground-percent": 100.0 * pixels / mask.size, "foreground-pixels": pixels})
            if cv2.imwrite(str(mask_dir / f"{stem}_mask.png"), mask.astype(np.uint8) * 255):
                row["mask"] = f"{stem}_mask.png"
            else:
                row["error"] = "could not write the mask file"
            if overlay_dir is not None and cv2.imwrite(str(overlay_dir / f"{stem}_overlay.png"),
                                                       _contour_overlay(raw, mask)):
                row["overlay"] = f"{stem}_overlay.png"
    logger.info("segmented %d file(s), %d unreadable", len(rows) - errors, errors)
    return rows


def write_predictions_csv(rows: Sequence[Mapping[str, Any]], path: Path, class_names: Sequence[str], *,
                          heatmaps: bool = False) -> Path:
    """Write a classifier's ``predictions.csv``.

    Columns ``input, prob-<class>..., predicted, threshold, ood-distance,
    ood-flag[, heatmap], error``: ``threshold`` is the one each row was
    predicted with (empty for multi-class models: the most probable class);
    ``heatmap`` names the row's Grad-CAM file (with ``heatmaps``).
    """
    cols = ["input", *(f"prob-{c}" for c in class_names), "predicted", "threshold", *OOD_COLUMNS,
            *(["heatmap"] if heatmaps else []), "error"]
    return write_rows_csv(rows, path, cols)


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: Path, cols: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with columns ``cols`` (floats with 6 decimals, ``None`` as empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else (f"{r[c]:.6f}" if isinstance(r.get(c), float) else r.get(c, ""))
                        for c in cols])
    return path


# ---------------------------------------------------------------------------
# Evaluation on a labelled dataset
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationResult:
    """Metrics of a model on a labelled dataset (counts-derived).

    ``probs``, ``labels`` and ``attributes`` are the per-image probabilities,
    labels and manifest attributes (``sex``, ``age``, ``view``) of the images
    scored, in the same order: they stay on the machine that evaluates (for
    bootstrap intervals and subgroup figures, :mod:`shared.local_eval`) and
    are never part of :meth:`to_dict`.
    """

    metrics: dict[str, float]
    counts: ClassificationCounts
    class_names: tuple[str, ...]
    positive_class: int | None
    skipped: dict[str, int] = field(default_factory=dict)
    probs: np.ndarray | None = field(default=None, repr=False, compare=False)
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    attributes: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)
    calibration: dict[str, Any] = field(default_factory=dict)
    ood: OODSummary | None = None

    def to_dict(self, trained: TrainedModel | None = None) -> dict[str, Any]:
        """JSON-ready: metrics, per-class counts, calibration, out-of-distribution share, what was skipped."""
        out: dict[str, Any] = {}
        if trained is not None:
            out.update(task=trained.task, model=trained.model_name)
        out.update(
            {
                "class-names": list(self.class_names),
                "positive-class": self.positive_class,
                "num-images": self.counts.num_examples,
                "metrics": self.metrics,
                "confusion": self.counts.confusion.tolist(),
                "calibration": dict(self.calibration),
                "ood": self.ood.to_dict() if self.ood is not None else {"status": "no reference in the model card"},
                "skipped": dict(self.skipped),
            }
        )
        return out


def evaluate_dataset(trained: TrainedModel, data: Path, *, batch_size: int = 32,
                     warn_share: float = DEFAULT_WARN_SHARE) -> EvaluationResult:
    """Score ``trained`` on a labelled dataset (class folders, folder with manifest.csv, or a manifest).

    Labels are mapped onto the model's classes by name (case-insensitive,
    with the task's label column and aliases, e.g. the 3-class pneumonia
    task's ``subtype``: :func:`shared.data.labels.task_labels`). Unreadable
    images are counted in ``skipped`` by reason and left out. Metrics come
    from :class:`ClassificationCounts` (argmax predictions; AUROC from the
    positive-class probability; for more than two classes one-vs-rest per
    class and macro averages). The probabilities are the model's calibrated
    ones when its card carries a calibration, scored at the threshold chosen
    on calibrated validation probabilities; ``calibration`` also reports the
    ECE and mean NLL of the uncalibrated probabilities on the same images.
    With an out-of-distribution reference in the card, ``ood`` says which
    share of the images lies beyond the training population's threshold.

    Raises
    ------
    NotSupportedError
        For a segmentation model.
    DataSourceError
        The dataset cannot be listed, its classes do not match the model's,
        or no image could be read.
    """
    _check_classifier(trained, "evaluate_dataset", "evaluate_segmentation")
    # The operator names this dataset on their own command line and nothing leaves the machine, so files
    # listed outside its folder (evaluation subsets) are read; the pixel cap still applies to every file.
    listing = discover(Path(data), allow_outside_root=True)
    spec = trained.task_spec()
    labels_all = task_labels(listing, trained.class_names, spec.label_column if spec else None,
                             spec.label_aliases if spec else None)
    reader = make_reader(trained.run_config)
    skipped: Counter[str] = Counter(listing.skipped)
    counts = ClassificationCounts.empty(trained.num_classes)
    raw_counts = ClassificationCounts.empty(trained.num_classes)
    nll = np.zeros(2)  # summed NLL at T = 1 and at the model's T
    ood = OODTracker(trained, warn_share)
    records = listing.records
    kept: list[int] = []
    all_probs: list[np.ndarray] = []
    for start in range(0, len(records), batch_size):
        imgs, labs = [], []
        for j in range(start, min(start + batch_size, len(records))):
            d, _ = _decode(records[j].path, reader, trained.preprocess)
            if d.image is None:
                skipped[d.reason or "unreadable"] += 1
                continue
            imgs.append(d.image)
            labs.append(int(labels_all[j]))
            kept.append(j)
        if imgs:
            batch, y = np.stack(imgs), np.asarray(labs, dtype=np.int64)
            logits, dist = _forward(trained, _model_input(trained, batch))
            probs = _probabilities(trained, logits)
            counts.update(probs, y)
            all_probs.append(probs)
            raw_counts.update(Calibration().probabilities(logits), y)
            nll += [Calibration().nll_sum(logits, y), (trained.calibration or Calibration()).nll_sum(logits, y)]
            ood.add(dist, batch)
    if counts.num_examples == 0:
        raise DataSourceError(f"none of the {len(records)} images could be read (skipped: {dict(skipped)})")
    pos = trained.positive_class
    if trained.num_classes == 2:
        # at 0.5 and at the federation's operating threshold (an unbiased check of it on new data)
        metrics = counts.metrics(positive_class=pos, threshold=model_threshold(trained))
    else:
        metrics = counts.metrics()
    n = counts.num_examples
    raw = raw_counts.metrics(positive_class=pos) if pos is not None else raw_counts.metrics()
    cal = trained.calibration
    calibration = {
        "temperature": trained.temperature, "bias": list(cal.bias) if cal is not None and cal.bias else None,
        "method": (trained.meta.get("calibration") or {}).get("method") if cal is not None else None,
        "calibrated": cal is not None,
        "ece": metrics.get("ece"), "nll": float(nll[1] / n),
        "ece-uncalibrated": raw.get("ece"), "nll-uncalibrated": float(nll[0] / n),
    }
    logger.info("evaluated %d images (%d skipped)", n, sum(skipped.values()))
    attributes = manifest_attributes([records[j].extra for j in kept], (r.patient_id for r in records))
    return EvaluationResult(metrics, counts, trained.class_names, pos, dict(skipped),
                            probs=np.concatenate(all_probs), labels=np.asarray(labels_all)[kept].astype(np.int64),
                            attributes=attributes, calibration=calibration, ood=ood.summary())


@dataclass(frozen=True)
class SegmentationEvaluation:
    """A segmentation model scored on image/mask pairs.

    ``per_image`` holds one :class:`~shared.metrics.segmentation.SegmentationCounts`
    per scored pair (their merge is ``counts``) and ``attributes`` the pairs'
    manifest attributes: local only (bootstrap intervals and subgroups,
    :mod:`shared.local_eval`), never in :meth:`to_dict`. ``ood`` is the
    out-of-distribution summary (None without a reference in the card).
    """

    task: str
    model: str
    counts: Any
    per_image: list[Any]
    skipped: dict[str, int]
    attributes: dict[str, np.ndarray] | None = None
    ood: OODSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: means over images, the image count, the out-of-distribution share, what was skipped."""
        return {"task": self.task, "model": self.model, "num-images": self.counts.n_images,
                "metrics": self.counts.metrics(),
                "ood": self.ood.to_dict() if self.ood is not None else {"status": "no reference in the model card"},
                "skipped": dict(self.skipped)}


def evaluate_segmentation(trained: TrainedModel, data: Path, *, batch_size: int = 8,
                          warn_share: float = DEFAULT_WARN_SHARE) -> dict[str, Any]:
    """Score a segmentation model on image/mask pairs (see :func:`shared.data.seg_sources.discover_segmentation`).

    Images get the model's own preprocessing; masks the same geometry (no
    intensity steps), thresholded at half range. Pairs that cannot be read, or
    whose mask size differs from the image, are counted in ``skipped``.
    Returns a JSON-ready dict: Dice, IoU and HD95 (pixels of the model's input
    size) as means over all images, ``hd95-mm`` as the mean over the images
    with a known pixel spacing (manifest ``spacing_mm`` or DICOM header,
    converted to the model's pixel size; NaN when none), the image count,
    what was skipped and (with a reference in the card) the
    out-of-distribution share ``ood``. No calibration applies to segmentation.

    Raises
    ------
    DataSourceError
        The dataset cannot be listed or no pair could be read.
    """
    return score_segmentation(trained, data, batch_size=batch_size, warn_share=warn_share).to_dict()


def score_segmentation(trained: TrainedModel, data: Path, *, batch_size: int = 8,
                       warn_share: float = DEFAULT_WARN_SHARE) -> SegmentationEvaluation:
    """:func:`evaluate_segmentation` keeping the per-image counts and attributes (local use only).

    Raises
    ------
    DataSourceError
        The dataset cannot be listed or no pair could be read.
    """
    from shared.data.seg_sources import discover_segmentation, read_record_mask, record_spacing
    from shared.metrics.segmentation import SegmentationCounts
    from shared.metrics.subgroups import per_image_segmentation_counts

    if trained.kind != SEGMENTATION:
        raise NotSupportedError(f"'{trained.model_name}' is a classifier: use evaluate_dataset")
    listing = discover_segmentation(Path(data), allow_outside_root=True)  # as in evaluate_dataset
    reader = make_reader(trained.run_config)
    mcfg = dataclasses.replace(trained.preprocess, equalize="none", denoise="none", channels=1)
    skipped: Counter[str] = Counter(listing.skipped)
    counts = SegmentationCounts.empty()
    ood = OODTracker(trained, warn_share)
    recs = listing.records
    per_image: list[SegmentationCounts] = []
    kept: list[int] = []
    for start in range(0, len(recs), batch_size):
        imgs, masks, spacings = [], [], []
        for k, r in enumerate(recs[start : start + batch_size], start=start):
            try:
                raw = reader(r.image)
                img = preprocess(raw, trained.preprocess)
                mask = preprocess(read_record_mask(r), mcfg) > 127
            except Exception as exc:  # noqa: BLE001 - one bad pair is counted, never a crash
                skipped[str(getattr(exc, "reason", "") or "unreadable")] += 1
                continue
            sp = record_spacing(r)
            kept.append(k)
            imgs.append(img)
            masks.append(mask)
            spacings.append(None if sp is None else model_spacing(sp, raw.shape[:2], trained.preprocess))
        if imgs:
            batch = np.stack(imgs)
            logits, dist = _forward(trained, _model_input(trained, batch))
            ood.add(dist, batch)
            for c in per_image_segmentation_counts(logits.argmax(axis=1) > 0, np.stack(masks), spacings):
                per_image.append(c)
                counts = counts.merge(c)
    if counts.n_images == 0:
        raise DataSourceError(f"none of the {len(recs)} image/mask pairs could be read (skipped: {dict(skipped)})")
    logger.info("evaluated %d image/mask pairs (%d skipped)", counts.n_images, sum(skipped.values()))
    attributes = manifest_attributes([recs[k].extra for k in kept], (r.patient_id for r in recs))
    return SegmentationEvaluation(trained.task, trained.model_name, counts, per_image, dict(skipped), attributes,
                                  ood.summary())
