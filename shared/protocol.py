"""The message contract between the server and the sites (framework-free).

Every record name, config key and reply field that crosses the wire is
named here once; ``client/``, ``server/`` and the central-DP mod use these
constants (Flower's strategies take them as constructor parameters). A
message from the server holds::

    ARRAYS  the global model (ArrayRecord)
    CONFIG  round settings (ConfigRecord): SERVER_ROUND, PROXIMAL_MU (FedProx),
            the central-DP clipping norm (client-side clipping)

Before round 1 (and for any site that connects later) the server sends a
QUERY message (the *roll call*); the site answers with SITE (its id and
role) and METRICS (its data sizes), or refuses the run under its own policy
(error code :data:`SITE_POLICY_ERROR_CODE`).

A site's reply holds::

    ARRAYS   the trained weights (train only; same keys, shapes and dtypes)
    METRICS  counts and scalars (MetricRecord): NUM_EXAMPLES always; the
             TRAIN_FIELDS of a training reply or EVAL_LOSS plus the task's
             counts (``ClassificationCounts``/``SegmentationCounts.to_flat()``)
             of an evaluation reply
    SITE     the site's self-declared id (ConfigRecord) — informational only:
             identity comes from the authenticated node

After the last round two post-training phases (:mod:`server.post_training`)
send EVALUATE messages with an action (Flower message type
``evaluate.<action>``) to the training sites, with the final model in ARRAYS:

* :data:`CALIBRATE_MESSAGE` (classification): CONFIG holds any of
  :data:`CALIBRATION_TEMPERATURES` (temperatures: the site answers
  :data:`NLL_SUMS`, the summed NLL of its validation images at each),
  :data:`CALIBRATION_DERIVATIVES_AT` (one calibration ``[T, b_0 .. b_{C-1}]``:
  the site answers the NLL sum and the sums of its gradient and Hessian there,
  :data:`NLL_SUM`, :data:`NLL_GRADIENT`, :data:`NLL_HESSIAN`) and
  :data:`CALIBRATION_SCORE_AT` (one calibration: the site answers an ordinary
  evaluation reply of the calibrated probabilities);
* :data:`OOD_MESSAGE`: CONFIG :data:`OOD_PHASE` = :data:`OOD_FEATURES` (the
  site answers sums of its training images' penultimate features,
  :data:`FEATURE_FIELDS`, and their intensity histogram) or
  :data:`OOD_DISTANCES` (the message also holds the ArrayRecord
  :data:`OOD_REFERENCE` with the pooled mean and precision; the site answers
  counts of its training and validation images' distances in fixed bins).

Nothing here may ever carry an image path, a patient id or a DICOM header
value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ARRAYS",
    "CALIBRATE_ACTION",
    "CALIBRATE_MESSAGE",
    "CALIBRATION_DERIVATIVES_AT",
    "CALIBRATION_SCORE_AT",
    "CALIBRATION_TEMPERATURES",
    "FEATURE_FIELDS",
    "INTENSITY_CHANNELS",
    "INTENSITY_HIST",
    "NLL_GRADIENT",
    "NLL_HESSIAN",
    "NLL_SUM",
    "NLL_SUMS",
    "OOD_ACTION",
    "OOD_DISTANCES",
    "OOD_FEATURES",
    "OOD_MESSAGE",
    "OOD_PHASE",
    "OOD_REFERENCE",
    "RAW_FEATURE_DIMS",
    "TRAIN_DISTANCE_COUNTS",
    "TRAIN_DISTANCE_TOTAL",
    "VAL_DISTANCE_COUNTS",
    "CONFIG",
    "DATA_FIELDS",
    "DP_BUDGET_ERROR_CODE",
    "SITE_POLICY_ERROR_CODE",
    "EVAL_LOSS",
    "LOAD_SECONDS",
    "METRICS",
    "NUM_EXAMPLES",
    "PROXIMAL_MU",
    "SERVER_ROUND",
    "SITE",
    "RUN_KEY",
    "SITE_ID",
    "SITE_ROLE",
    "SUBGROUPS",
    "SITE_QUARANTINED",
    "SITE_TRAIN_CLASSES",
    "SITE_VAL_CLASSES",
    "SITE_SIMULATED",
    "SITE_PHANTOMS",
    "SITE_TRAIN_IMAGES",
    "SITE_VAL_IMAGES",
    "TORCH_THREADS",
    "REQUIRED_TRAIN_FIELDS",
    "TRAIN_FIELDS",
    "TRAIN_IMAGES_PER_S",
    "TRAIN_LOSS",
    "TRAIN_SECONDS",
    "site_data_fields",
    "structured_reason",
    "train_metrics",
]

# Records of a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

# ConfigRecord keys from the server (SERVER_ROUND and PROXIMAL_MU are Flower's own names).
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
RUN_KEY = "run-key"
"""The run's stable name (its results folder's name): a resumed run keeps it, so a site's privacy ledger
continues instead of starting again."""

# ConfigRecord keys of a site.
SITE_ID = "site-id"
SITE_ROLE = "role"
"""``train`` or ``holdout`` (roll call)."""
SUBGROUPS = "subgroups"
"""ConfigRecord of an evaluation reply holding the site's patient-subgroup counts (small cells suppressed).
A separate record: its keys differ from site to site, which Flower refuses within a MetricRecord."""

# MetricRecord fields of a site's replies.
NUM_EXAMPLES = "num-examples"
"""Images used: training images (train) or validation images (evaluate). Flower's strategies weight by it."""
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TRAIN_IMAGES_PER_S = "train-images-per-s"
LOAD_SECONDS = "load-seconds"
TORCH_THREADS = "torch-threads"
EVAL_LOSS = "eval-loss"
SITE_TRAIN_IMAGES = "num-train-examples"
"""Size of the site's training split (roll call)."""
SITE_VAL_IMAGES = "num-val-examples"
"""Size of the site's validation split (roll call and every training reply: it bounds what the site's
evaluation replies may count, :mod:`shared.validation`)."""
SITE_QUARANTINED = "quarantined-files"
"""Files the site could not use (roll call; counted, never named)."""
SITE_TRAIN_CLASSES = "train-class-counts"
"""Training images per class, in the task's class order (roll call, classification tasks; a list of ints)."""
SITE_VAL_CLASSES = "val-class-counts"
"""Validation images per class, in the task's class order (roll call, classification tasks; a list of ints)."""
SITE_SIMULATED = "simulated-site"
"""1 when the site is a simulated one (a share of a simulation's dataset or phantoms), else 0 (roll call)."""
SITE_PHANTOMS = "synthetic-phantoms"
"""1 when the site's images are generated phantoms (no patient data), else 0 (roll call)."""

TRAIN_FIELDS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, TRAIN_IMAGES_PER_S, LOAD_SECONDS, TORCH_THREADS)
REQUIRED_TRAIN_FIELDS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, TRAIN_IMAGES_PER_S, LOAD_SECONDS)
"""The training-reply fields the server computes with (they must be present and finite)."""
DATA_FIELDS = (SITE_TRAIN_IMAGES, SITE_VAL_IMAGES, SITE_QUARANTINED)

# Post-training phases (after the last round; see the module docstring).
CALIBRATE_ACTION = "calibrate"
OOD_ACTION = "ood"
CALIBRATE_MESSAGE = f"evaluate.{CALIBRATE_ACTION}"
OOD_MESSAGE = f"evaluate.{OOD_ACTION}"
CALIBRATION_TEMPERATURES = "calibration-temperatures"
"""ConfigRecord: temperatures (list of floats > 0) at which the site sums its validation NLL."""
CALIBRATION_DERIVATIVES_AT = "calibration-derivatives-at"
"""ConfigRecord: ``[T, b_0, ..., b_{C-1}]``; the site sends the NLL of ``softmax(logits / T + b)`` and its
derivatives w.r.t. ``(1/T, b_1 .. b_{C-1})``, summed over its validation images."""
CALIBRATION_SCORE_AT = "calibration-score-at"
"""ConfigRecord: ``[T]`` or ``[T, b_0, ..., b_{C-1}]``; the site sends its evaluation counts of
``softmax(logits / T + b)``."""
NLL_SUMS = "nll-sums"
"""Reply: per proposed temperature, the summed NLL of the site's validation images (list of floats >= 0)."""
NLL_SUM = "nll-sum"
NLL_GRADIENT = "nll-gradient"
NLL_HESSIAN = "nll-hessian"
"""Reply at CALIBRATION_DERIVATIVES_AT: the NLL sum, its gradient sum (C floats) and Hessian sum (C x C,
row-major)."""
OOD_PHASE = "ood-phase"
OOD_FEATURES = "features"
OOD_DISTANCES = "distances"
OOD_REFERENCE = "ood-reference"
"""ArrayRecord of a distances message: ``mean`` (d,) and ``precision`` (d, d) of the pooled training features."""
FEATURE_COUNT = "feature-count"
FEATURE_DIMS = "feature-dims"
FEATURE_SUM = "feature-sum"
FEATURE_OUTER = "feature-outer"
FEATURE_NORM2_X = "feature-norm2-x"
FEATURE_NORM4 = "feature-norm4"
FEATURE_FIELDS = (FEATURE_COUNT, FEATURE_DIMS, FEATURE_SUM, FEATURE_OUTER, FEATURE_NORM2_X, FEATURE_NORM4)
"""Reply of a features message (:class:`shared.ood.FeatureSums`): the training images' count, the (projected)
feature width, sum of features, upper triangle of the sum of outer products, sum of ``||x||^2 x``, sum of
``||x||^4``."""
RAW_FEATURE_DIMS = "feature-dims-raw"
"""Reply: the width of the model's features before projection."""
INTENSITY_CHANNELS = "intensity-channels"
INTENSITY_HIST = "intensity-hist"
"""Reply: per channel, counts of the training images' preprocessed pixel values in 32 bins (row-major)."""
TRAIN_DISTANCE_COUNTS = "train-distance-counts"
VAL_DISTANCE_COUNTS = "val-distance-counts"
TRAIN_DISTANCE_TOTAL = "train-distance-total"
"""Reply of a distances message: counts of the training / validation images' distances per bin, and the
number of training images counted (``num-examples`` is the validation images)."""

# Flower error code of a site's structured "over budget" refusal (Flower's own codes are < 100).
DP_BUDGET_ERROR_CODE = 4201
SITE_POLICY_ERROR_CODE = 4202
"""A site refuses the run (or a round) under its own node-config policy (:mod:`shared.site_policy`)."""


def train_metrics(*, num_examples: int, loss: float, seconds: float, images_per_second: float,
                  load_seconds: float, torch_threads: int) -> dict[str, float | int]:
    """The scalar fields of a training reply."""
    return {
        NUM_EXAMPLES: int(num_examples),
        TRAIN_LOSS: float(loss),
        TRAIN_SECONDS: float(seconds),
        TRAIN_IMAGES_PER_S: float(images_per_second),
        LOAD_SECONDS: float(load_seconds),
        TORCH_THREADS: int(torch_threads),
    }


def site_data_fields(*, train_images: int, val_images: int, quarantined: int,
                     train_classes: list[int] | None = None, val_classes: list[int] | None = None,
                     simulated: bool = False, phantoms: bool = False) -> dict[str, int | list[int]]:
    """The site's data sizes for the roll call (counts only); images per class when the task has classes;
    whether the site is simulated and its images synthetic phantoms (what the run report may call them)."""
    out: dict[str, int | list[int]] = {SITE_TRAIN_IMAGES: int(train_images), SITE_VAL_IMAGES: int(val_images),
                                       SITE_QUARANTINED: int(quarantined), SITE_SIMULATED: int(bool(simulated)),
                                       SITE_PHANTOMS: int(bool(phantoms))}
    if train_classes is not None and val_classes is not None:
        out[SITE_TRAIN_CLASSES] = [int(v) for v in train_classes]
        out[SITE_VAL_CLASSES] = [int(v) for v in val_classes]
    return out


def structured_reason(reason: str | None, kind: str) -> dict[str, Any] | None:
    """The JSON object of a site's structured refusal of ``kind`` in a Flower error reason, or None.

    Sites refuse with a JSON reason (``{"kind": ..., "site-id": ..., ...}``): a
    DP budget refusal (:data:`DP_BUDGET_ERROR_CODE`) or a policy refusal
    (:data:`SITE_POLICY_ERROR_CODE`).
    """
    if not reason:
        return None
    try:
        info = json.loads(reason)
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("kind") == kind else None


def data_sizes(metrics: Mapping[str, object]) -> tuple[int, int, int] | None:
    """``(train, validation, quarantined)`` from a training reply's metrics, or None when absent."""
    try:
        return tuple(int(metrics[k]) for k in DATA_FIELDS)  # type: ignore[return-value,call-overload]
    except (KeyError, TypeError, ValueError):
        return None
