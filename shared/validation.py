"""Check every reply a site sends before the server uses it.

A site's reply is untrusted input: a broken site, a bug or an attacker can send
NaN weights, weights scaled by 1e30, tensors of the wrong shape or dtype, an
absurd ``num-examples`` (it is FedAvg's weight), or evaluation counts that do
not add up (they decide the pooled AUROC and the saved operating threshold).
Any of these reaches the global model or the results unless it is stopped
before aggregation. This module decides, for each reply of a round, whether
it may be used, with numpy only (no Flower): the server glue hands it plain
mappings (a Flower ``ArrayRecord``/``MetricRecord`` is one) and gets back one
:class:`Verdict` per reply.

Training replies (:func:`screen_train_round`)
    * exactly one ``arrays`` and one ``metrics`` record (Flower's strategies
      raise on anything else, ending the run);
    * exactly the global model's keys, in the model's order (Bulyan,
      Multi-Krum, FedAvgM and q-FedAvg pair tensors by position), and per key
      its shape and dtype (taken from the model the server built,
      :func:`model_spec`); every value finite;
    * ``num-examples`` an integer in ``[1, max-examples]``; the other training
      metrics the server computes with (``shared.protocol.REQUIRED_TRAIN_FIELDS``) finite numbers
      (``train-loss`` may be NaN: DP-SGD sites withhold it), every metric a
      number or a list of numbers;
    * the update norm ``||w_site - w_global||`` (floating-point tensors only;
      integer buffers such as BatchNorm's ``num_batches_tracked`` are checked
      for key, shape and dtype but are not part of the update) at most
      ``max-update-ratio`` times the global model's norm: a bound no honest
      round comes near, which holds even with one or two sites;
    * the update norm not a robust outlier among the round's replies
      (:func:`norm_outliers`): the modified z-score ``0.6745 (x - median) /
      MAD`` of ``x = log(norm)`` above ``norm-z`` (Iglewicz and Hoaglin's 3.5
      by default), one-sided; on the log scale because honest sites of
      different sizes differ in update norm by a factor, not an offset.
      Only with at least 3 structurally valid replies: with 2, both replies
      are equally far from their median (each z is 0.6745 whatever they
      send), and with 1 there is nothing to compare with, so no majority
      defines what "normal" is; the ratio bound above is the guard then.
    * replies whose metric keys differ from the other replies' are rejected
      (``metric-keys-mismatch``): Flower refuses to aggregate a round whose
      replies carry different metric keys.

Evaluation replies (:func:`screen_evaluate_round`)
    * ``num-examples`` an integer in ``[0, max-examples]`` and at most the
      validation size the site announced in its training reply
      (``num-val-examples``), when the server knows it;
    * ``eval-loss`` a finite number >= 0;
    * classification counts (:meth:`ClassificationCounts.to_flat`): the task's
      number of classes and the sites' number of bins (checked before any
      array is allocated, so a reply cannot make the server allocate
      ``classes^2 x bins`` counters of its choosing), non-negative integers
      only, and consistent: the confusion matrix totals ``num-examples`` and,
      for every class score ``k`` and true label ``l``, the score histogram
      holds exactly the confusion row of ``l`` (so at every threshold
      tp + fn = positives and fp + tn = negatives);
    * segmentation sums (:meth:`SegmentationCounts.to_flat`): finite and
      non-negative, ``n-images = num-examples``, ``dice-sum <= n-images``,
      ``iou-sum <= dice-sum`` (IoU <= Dice image by image), ``hd95-mm-n <=
      hd95-n <= n-images`` and, when the image size is known, HD95 in pixels
      no longer than the image diagonal.

Post-training replies (:func:`check_nll_reply`, :func:`check_feature_reply`,
:func:`check_distance_reply`; after the last round, :mod:`server.post_training`)
    * calibration: ``num-examples`` an integer in ``[1, announced validation
      size]``; one NLL sum per proposed temperature, each finite and >= 0; at a
      proposed calibration, a finite NLL sum >= 0, its gradient (each bias
      component at most ``n`` in magnitude) and a symmetric positive
      semi-definite Hessian whose bias diagonal is at most ``n / 4`` (a sum of
      ``n`` covariances of probabilities); the evaluation counts at the fitted
      calibration are an ordinary evaluation reply, checked as above;
    * feature sums: ``num-examples`` in ``[1, announced training size]`` and
      equal to the feature count; the feature width the server's own model
      has; every value finite; ``||x||^4`` sums >= 0, ``(sum ||x||^2)^2 <= n sum
      ||x||^4`` (Cauchy-Schwarz) and a centred scatter matrix that is positive
      semi-definite (the sums of *some* set of vectors); an intensity histogram
      of non-negative integers whose every channel totals ``n x`` pixels per
      image;
    * distance counts: non-negative integers in the fixed number of bins,
      totalling ``num-examples`` (at most the announced validation size) and
      the training count the site sent with its feature sums.

A rejected reply is excluded exactly like a failed one; :func:`filter_round`
keeps the accepted replies and says whether the round may proceed (at least
``min-sites`` accepted replies, otherwise it is refused and the global model
stays as it was). :class:`ReplyScreen` holds what a run needs across rounds
(the model spec, the policy, each site's announced validation size). Use::

    screen = ReplyScreen(model_spec(initial_arrays), ValidationPolicy.for_run(cfg))
    # per batch of successful replies, keyed by a trusted node id:
    replies = [SiteReply.from_records(label, array_records, metric_records) for ...]
    verdicts = screen.train(node_ids, replies, global_arrays)  # or screen.evaluate(node_ids, replies)
    decision = filter_round(messages, verdicts, screen.policy.min_sites)
    # aggregate decision.accepted; when not decision.proceed it is empty and the model stays

No function here raises on malformed site input: anything odd is a rejection
with a reason (only the server's own inputs, the model spec and the global
model, raise when inconsistent). The human ``detail`` of a verdict names
tensor and metric keys, shapes, dtypes and the server's own limits, never a
value the site sent.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from shared import protocol
from shared.kinds import SEGMENTATION
from shared.metrics.classification import DEFAULT_BINS, ClassificationCounts
from shared.metrics.segmentation import SegmentationCounts

if TYPE_CHECKING:
    from shared.settings import RunConfig

__all__ = [
    "ARRAYS_KEY",
    "METRICS_KEY",
    "VAL_EXAMPLES_KEY",
    "Reason",
    "FeatureExpectation",
    "ReplyScreen",
    "RoundDecision",
    "SiteReply",
    "TensorSpec",
    "ValidationPolicy",
    "Verdict",
    "check_distance_reply",
    "check_feature_reply",
    "check_calibration_reply",
    "claimed_val_examples",
    "filter_round",
    "model_spec",
    "modified_z_scores",
    "norm_outliers",
    "screen_evaluate_round",
    "screen_train_round",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
VAL_EXAMPLES_KEY = protocol.SITE_VAL_IMAGES
"""Training-reply metric: the site's validation size, the bound on its evaluation ``num-examples``."""

MAD_CONSISTENCY = 0.6745
"""Iglewicz-Hoaglin constant: ``0.6745 * (x - median) / MAD`` is a z-score for normal data."""
LOG_MAD_FLOOR = 0.1
"""Smallest MAD of the log update norms (see :func:`norm_outliers`)."""
_TINY_NORM = 1e-300
MIN_SITES_FOR_NORM_SCREEN = 3
_NAN_ALLOWED = frozenset({"train-loss"})  # DP-SGD sites send NaN: the loss is not a DP statistic
_DICE_TOLERANCE = 1e-9  # relative slack on sums of quantised per-image scores (float summation)


class Reason(StrEnum):
    """Machine-readable reason of a :class:`Verdict`."""

    OK = "ok"
    MISSING_RECORD = "missing-record"
    UNEXPECTED_RECORD = "unexpected-record"
    MISSING_KEY = "missing-key"
    EXTRA_KEY = "extra-key"
    KEY_ORDER = "key-order"
    UNDECODABLE = "undecodable"
    SHAPE_MISMATCH = "shape-mismatch"
    DTYPE_MISMATCH = "dtype-mismatch"
    NON_FINITE = "non-finite"
    BAD_NUM_EXAMPLES = "bad-num-examples"
    BAD_METRIC = "bad-metric"
    METRIC_KEYS_MISMATCH = "metric-keys-mismatch"
    UPDATE_TOO_LARGE = "update-too-large"
    NORM_OUTLIER = "norm-outlier"
    TASK_MISMATCH = "task-mismatch"
    BAD_COUNTS = "bad-counts"
    INCONSISTENT_COUNTS = "inconsistent-counts"
    BAD_STATISTICS = "bad-statistics"


@dataclass(frozen=True)
class Verdict:
    """Whether one reply may be used, and why not.

    ``detail`` is for people: it names keys, shapes, dtypes and the server's
    limits, never a value the site sent.
    """

    site_id: str
    accepted: bool
    reason: Reason
    detail: str = ""

    def to_dict(self) -> dict[str, str | bool]:
        """JSON form for a round record."""
        return {"site": self.site_id, "accepted": self.accepted, "reason": str(self.reason), "detail": self.detail}


def _ok(site: str) -> Verdict:
    return Verdict(site, True, Reason.OK)


def _no(site: str, reason: Reason, detail: str) -> Verdict:
    return Verdict(site, False, reason, detail)


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor of the global model."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def is_float(self) -> bool:
        """Whether this tensor is part of the update (floating point) or a buffer (integer, bool)."""
        return bool(np.issubdtype(self.dtype, np.floating))


def model_spec(arrays: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Keys, shapes and dtypes of the model the server built (trusted input).

    Take it from the initial model, not from an aggregate: FedAvg turns integer
    buffers into float64 when it averages them, while every site keeps sending
    them with the model's own dtype.

    Parameters
    ----------
    arrays:
        ``name -> ndarray`` or objects with ``.numpy()`` (a Flower ``ArrayRecord``).
    """
    out: dict[str, TensorSpec] = {}
    for k, v in arrays.items():
        a = _decode(v)
        if a is None:
            raise ValueError(f"the server's own model tensor {k!r} cannot be read as an array")
        out[k] = TensorSpec(tuple(int(d) for d in a.shape), a.dtype)
    return out


@dataclass(frozen=True)
class ValidationPolicy:
    """The limits a reply is checked against (run-config keys ``validation.*``).

    Attributes
    ----------
    max_examples:
        Upper bound of any ``num-examples`` (it weighs the site's update).
    norm_z:
        Modified z-score above which an update norm is an outlier; 0 = off.
    max_update_ratio:
        Largest ``||update|| / max(||w_global||, 1)``; 0 = off.
    min_sites:
        Accepted replies a round needs to proceed.
    require_train_loss:
        ``train-loss`` must be finite (q-FedAvg weighs updates by it).
    num_classes:
        Classes of the task (None = segmentation).
    bins:
        Probability-histogram bins every site uses.
    image_size:
        Square image size in pixels (bounds HD95 in pixels); None = unknown.
    """

    max_examples: int = 10_000_000
    norm_z: float = 3.5
    max_update_ratio: float = 1000.0
    min_sites: int = 1
    require_train_loss: bool = False
    num_classes: int | None = 2
    bins: int = DEFAULT_BINS
    image_size: int | None = None

    @classmethod
    def for_run(cls, cfg: RunConfig) -> ValidationPolicy:
        """The policy of a parsed run config.

        Under central DP (``central-dp.mode`` not 'none') the norm screen is
        off: clipping already bounds each site's influence, and a screen that
        compares sites would make one site's inclusion depend on the other
        sites' data, which the site-level privacy account does not cover.
        """
        from shared.tasks import get_task  # lazy: the task table imports the phantom generators

        task = get_task(cfg.task)
        v = cfg.validation
        return cls(
            max_examples=v.max_examples,
            norm_z=0.0 if cfg.central_dp.mode != "none" else v.norm_z,
            max_update_ratio=v.max_update_ratio,
            min_sites=cfg.strategy.min_sites,
            require_train_loss=cfg.strategy.name in LOSS_WEIGHTED_STRATEGIES,
            num_classes=None if task.kind == SEGMENTATION else task.num_classes,  # None: segmentation sums
            bins=DEFAULT_BINS,
            image_size=cfg.data.image_size or None,
        )


LOSS_WEIGHTED_STRATEGIES = ("qfedavg",)
"""Strategies that weigh a site's update by its reported training loss."""


@dataclass(frozen=True)
class SiteReply:
    """What one site sent, as plain mappings (no Flower types needed).

    ``arrays`` and ``metrics`` map names to numpy arrays (or objects with a
    ``.numpy()`` method, such as Flower's ``Array``) and to numbers or lists
    of numbers. ``unexpected_records`` names any further array or metric
    records the reply carried.
    """

    site_id: str
    arrays: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    unexpected_records: tuple[str, ...] = ()

    @classmethod
    def from_records(cls, site_id: str, array_records: Mapping[str, Any] | None,
                     metric_records: Mapping[str, Any] | None) -> SiteReply:
        """Build from a reply's record dicts (``msg.content.array_records`` / ``.metric_records``).

        Never raises: a record that cannot be read is treated as absent.
        """
        try:
            arrays_recs = dict(array_records or {})
            metric_recs = dict(metric_records or {})
        except Exception:  # noqa: BLE001 - untrusted input: odd means absent
            return cls(site_id)
        extra = tuple(_safe_name(k) for k in arrays_recs if k != ARRAYS_KEY) + tuple(
            _safe_name(k) for k in metric_recs if k != METRICS_KEY)
        return cls(site_id, arrays_recs.get(ARRAYS_KEY), metric_recs.get(METRICS_KEY), extra)


# ---------------------------------------------------------------------------
# Small helpers (never raise)
# ---------------------------------------------------------------------------


def _safe_name(key: object, limit: int = 48) -> str:
    """A key name fit for a log line: repr-escaped and truncated."""
    text = repr(key) if isinstance(key, str) else f"<{type(key).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "...'"


def _names(keys: Sequence[object], limit: int = 3) -> str:
    shown = ", ".join(_safe_name(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _decode(value: Any) -> np.ndarray | None:
    """The array a value holds, or None when it cannot be read (never raises)."""
    try:
        if isinstance(value, np.ndarray):
            return value
        if isinstance(value, np.generic):  # a numpy scalar: a 0-d array
            return np.asarray(value)
        if hasattr(value, "numpy"):
            a = value.numpy()
            return a if isinstance(a, np.ndarray) else None
    except Exception:  # noqa: BLE001 - malformed bytes, unknown serialisation, ...
        return None
    return None


def _declared_mismatch(value: Any, a: np.ndarray) -> str | None:
    """When an object declares its shape/dtype (Flower's ``Array``), whether the declaration fits the data."""
    try:
        shape = getattr(value, "shape", None)
        if shape is not None and not isinstance(value, np.ndarray) and tuple(int(d) for d in shape) != a.shape:
            return "shape"
        dtype = getattr(value, "dtype", None)
        if dtype is not None and not isinstance(value, np.ndarray) and np.dtype(dtype) != a.dtype:
            return "dtype"
    except Exception:  # noqa: BLE001 - an unreadable declaration is a mismatch
        return "shape"
    return None


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _metric_value_ok(v: object) -> bool:
    """A MetricRecord value: a number or a list of numbers."""
    if _is_number(v):
        return True
    if isinstance(v, list):
        return all(_is_number(x) for x in v)
    return False


def _finite(v: object) -> bool:
    return _is_number(v) and math.isfinite(float(v))  # type: ignore[arg-type]


def _metric_keys(metrics: Mapping[str, Any] | None) -> frozenset[str] | None:
    try:
        return frozenset(str(k) for k in metrics) if metrics is not None else None
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------
# Training replies
# ---------------------------------------------------------------------------


def _check_records(reply: SiteReply, need_arrays: bool) -> Verdict | None:
    site = reply.site_id
    if reply.unexpected_records:
        return _no(site, Reason.UNEXPECTED_RECORD,
                   f"reply carries records other than '{ARRAYS_KEY}'/'{METRICS_KEY}': "
                   f"{_names(reply.unexpected_records)}")
    if need_arrays and reply.arrays is None:
        return _no(site, Reason.MISSING_RECORD, f"reply has no '{ARRAYS_KEY}' record")
    if reply.metrics is None:
        return _no(site, Reason.MISSING_RECORD, f"reply has no '{METRICS_KEY}' record")
    try:
        items = list(reply.metrics.items())
    except Exception:  # noqa: BLE001
        return _no(site, Reason.BAD_METRIC, f"the '{METRICS_KEY}' record cannot be read")
    bad = [k for k, v in items if not isinstance(k, str) or not _metric_value_ok(v)]
    if bad:
        return _no(site, Reason.BAD_METRIC, f"metric(s) {_names(bad)} are not a number or a list of numbers")
    return None


def _check_num_examples(site: str, metrics: Mapping[str, Any], low: int, high: int, what: str) -> Verdict | None:
    n = metrics.get("num-examples")
    if not _is_int(n) or not low <= int(n) <= high:  # type: ignore[arg-type]
        return _no(site, Reason.BAD_NUM_EXAMPLES, f"'num-examples' must be an integer in [{low}, {high}] ({what})")
    return None


def _check_train_metrics(reply: SiteReply, policy: ValidationPolicy) -> Verdict | None:
    site, m = reply.site_id, reply.metrics
    assert m is not None  # _check_records ran first
    bad = _check_num_examples(site, m, 1, policy.max_examples, "validation.max-examples")
    if bad:
        return bad
    missing = [k for k in protocol.REQUIRED_TRAIN_FIELDS if k not in m]
    if missing:
        return _no(site, Reason.BAD_METRIC, f"training metrics lack {_names(missing)}")
    for k in protocol.REQUIRED_TRAIN_FIELDS:
        v = m[k]
        nan_ok = k in _NAN_ALLOWED and not policy.require_train_loss
        if not _is_number(v) or not (math.isfinite(float(v)) or (nan_ok and math.isnan(float(v)))):
            return _no(site, Reason.BAD_METRIC, f"training metric {k!r} must be a finite number"
                       + (" (or NaN when withheld)" if nan_ok else ""))
    if not (m["train-loss"] >= 0 or math.isnan(float(m["train-loss"]))):
        return _no(site, Reason.BAD_METRIC, "training metric 'train-loss' must be >= 0")
    if VAL_EXAMPLES_KEY in m:
        v = m[VAL_EXAMPLES_KEY]
        if not _is_int(v) or not 0 <= int(v) <= policy.max_examples:
            return _no(site, Reason.BAD_METRIC,
                       f"{VAL_EXAMPLES_KEY!r} must be an integer in [0, {policy.max_examples}]")
    return None


def _check_arrays(reply: SiteReply, spec: Mapping[str, TensorSpec],
                  ref: Mapping[str, np.ndarray]) -> tuple[Verdict | None, float]:
    """Keys, shapes, dtypes, finiteness; returns the update's squared norm when valid."""
    site = reply.site_id
    try:
        keys = list(reply.arrays.keys())  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001
        return _no(site, Reason.UNDECODABLE, f"the '{ARRAYS_KEY}' record cannot be read"), math.nan
    missing = [k for k in spec if k not in keys]
    if missing:
        return _no(site, Reason.MISSING_KEY, f"missing tensor(s) {_names(missing)}"), math.nan
    extra = [k for k in keys if k not in spec]
    if extra:
        return _no(site, Reason.EXTRA_KEY, f"unexpected tensor(s) {_names(extra)}"), math.nan
    if keys != list(spec):  # Bulyan, Multi-Krum, FedAvgM and q-FedAvg pair tensors by position, not by name
        first = next(i for i, (a, b) in enumerate(zip(keys, spec, strict=True)) if a != b)
        return _no(site, Reason.KEY_ORDER,
                   f"tensors are not in the model's order (position {first} holds {_safe_name(keys[first])})"), math.nan
    sq = 0.0
    for k, s in spec.items():
        try:
            value = reply.arrays[k]  # type: ignore[index]
        except Exception:  # noqa: BLE001
            value = None
        a = _decode(value)
        if a is None:
            return _no(site, Reason.UNDECODABLE, f"tensor {_safe_name(k)} cannot be read as a numpy array"), math.nan
        declared = _declared_mismatch(value, a)
        if declared == "shape":
            return _no(site, Reason.SHAPE_MISMATCH,
                       f"tensor {_safe_name(k)} declares a shape other than its data's {a.shape}"), math.nan
        if declared == "dtype":
            return _no(site, Reason.DTYPE_MISMATCH,
                       f"tensor {_safe_name(k)} declares a dtype other than its data's {a.dtype}"), math.nan
        if a.shape != s.shape:
            return _no(site, Reason.SHAPE_MISMATCH,
                       f"tensor {_safe_name(k)} has shape {a.shape}, the model's is {s.shape}"), math.nan
        if a.dtype != s.dtype:
            return _no(site, Reason.DTYPE_MISMATCH,
                       f"tensor {_safe_name(k)} has dtype {a.dtype}, the model's is {s.dtype}"), math.nan
        if np.issubdtype(a.dtype, np.inexact) and not bool(np.isfinite(a).all()):
            return _no(site, Reason.NON_FINITE, f"tensor {_safe_name(k)} holds NaN or infinite values"), math.nan
        if s.is_float:
            with np.errstate(over="ignore", invalid="ignore"):
                d = a.astype(np.float64) - ref[k]
                sq += float(np.dot(d.ravel(), d.ravel()))
    return None, sq


def _float_reference(global_arrays: Mapping[str, Any], spec: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    """The global model's floating-point tensors as float64 (trusted: raises if unreadable)."""
    ref: dict[str, np.ndarray] = {}
    for k, s in spec.items():
        if not s.is_float:
            continue
        a = _decode(global_arrays[k]) if k in global_arrays else None
        if a is None or a.size != math.prod(s.shape):
            raise ValueError(f"the global model sent this round does not match the model spec at {k!r}")
        ref[k] = a.astype(np.float64).reshape(s.shape)  # e.g. a 0-d tensor an aggregator stored as (1,)
    return ref


def modified_z_scores(values: Sequence[float], mad_floor: float = 0.0) -> np.ndarray:
    """Iglewicz-Hoaglin modified z-scores ``0.6745 (x - median) / max(MAD, mad_floor)``.

    When the scale is 0 (all values but the outliers equal, no floor), a value
    above the median scores +inf and one below -inf.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    med = float(np.median(x))
    scale = max(float(np.median(np.abs(x - med))), mad_floor)
    if scale > 0:
        return MAD_CONSISTENCY * (x - med) / scale
    return np.where(x > med, np.inf, np.where(x < med, -np.inf, 0.0))


def norm_outliers(norms: Sequence[float], threshold: float, log_mad_floor: float = LOG_MAD_FLOOR) -> list[bool]:
    """Which update norms are robust outliers on the high side.

    The score is the modified z-score of ``log(norm)``: sites differ in size,
    an honest site's update grows with its number of local steps, and norms
    spread multiplicatively. Measured on 5-site phantom federations
    (``benchmarks/norm_screen.py``): with Dirichlet(0.1) label skew (site
    sizes 12..238) the largest honest update was 3.4-4.4x the median; the
    z-score of the raw norm reached 4.6 (an honest site rejected at 3.5), that
    of the log norm 1.5. The MAD of the log norms is taken as at least
    ``log_mad_floor`` (0.1): when honest norms are nearly equal (IID sites of
    one size) a raw MAD close to 0 would flag a reply 1 % above the rest; with
    the floor a norm is an outlier at the default 3.5 only above
    ``exp(3.5 * 0.1 / 0.6745) ~= 1.68`` times the median, however tight the
    others are. Non-finite norms are always outliers; a norm of 0 counts as
    a tiny positive norm (so when the median site did not move, any site
    that did is an outlier).

    Off (all False) when ``threshold`` is 0 or fewer than 3 norms are given:
    with two replies both lie equally far from their median, with one there is
    no majority to say what a normal update looks like. Only large norms are
    flagged: a small update cannot blow up the aggregate, and a site with
    little data legitimately moves less.
    """
    if threshold <= 0 or len(norms) < MIN_SITES_FOR_NORM_SCREEN:
        return [False] * len(norms)
    x = np.asarray(norms, dtype=np.float64)
    finite = np.isfinite(x)
    flags = ~finite
    if finite.sum() >= MIN_SITES_FOR_NORM_SCREEN:
        logs = np.log(np.maximum(x[finite], _TINY_NORM))
        flags[finite] = modified_z_scores(logs, log_mad_floor) > threshold
    return [bool(f) for f in flags]


def _metric_key_outliers(keysets: Sequence[frozenset[str] | None]) -> list[bool]:
    """Replies whose metric key set is not the round's unique most common one (Flower needs them equal)."""
    counts = Counter(k for k in keysets if k is not None)
    if len(counts) <= 1:
        return [False] * len(keysets)
    (top, n_top), (_, n_next) = counts.most_common(2)
    return [k is not None and (k != top or n_top == n_next) for k in keysets]


def screen_train_round(replies: Sequence[SiteReply], spec: Mapping[str, TensorSpec], global_arrays: Mapping[str, Any],
                       policy: ValidationPolicy) -> list[Verdict]:
    """One verdict per training reply, in order.

    Parameters
    ----------
    replies:
        The round's successful training replies (failed ones carry no content).
    spec:
        :func:`model_spec` of the model the server built.
    global_arrays:
        The global model this round's sites started from (``name -> array``;
        a Flower ``ArrayRecord`` works), the reference of the update norms.
    policy:
        The limits (:meth:`ValidationPolicy.for_run`).

    Returns
    -------
    list of Verdict
        ``reason`` is :attr:`Reason.OK` for accepted replies.
    """
    ref = _float_reference(global_arrays, spec)
    ref_norm = math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in ref.values()))
    verdicts: list[Verdict | None] = []
    norms: list[float] = []
    for reply in replies:
        try:
            v = _check_records(reply, need_arrays=True) or _check_train_metrics(reply, policy)
            sq = math.nan
            if v is None:
                v, sq = _check_arrays(reply, spec, ref)
        except Exception:  # noqa: BLE001 - never raise on a site's input; but say it happened
            logger.exception("reply check failed unexpectedly for site %s; rejecting the reply", reply.site_id)
            v, sq = _no(reply.site_id, Reason.UNDECODABLE, "the reply could not be checked"), math.nan
        norm = math.sqrt(sq) if v is None and math.isfinite(sq) else math.inf
        if v is None and policy.max_update_ratio > 0 and norm > policy.max_update_ratio * max(ref_norm, 1.0):
            v = _no(reply.site_id, Reason.UPDATE_TOO_LARGE,
                    f"update norm exceeds validation.max-update-ratio={policy.max_update_ratio:g} times the "
                    "global model's norm")
        verdicts.append(v)
        norms.append(norm)
    _screen_metric_keys(replies, verdicts)
    valid = [i for i, v in enumerate(verdicts) if v is None]
    flags = norm_outliers([norms[i] for i in valid], policy.norm_z)
    for i, flagged in zip(valid, flags, strict=True):
        if flagged:
            verdicts[i] = _no(replies[i].site_id, Reason.NORM_OUTLIER,
                              f"update norm is a robust outlier among the round's {len(valid)} valid replies "
                              f"(modified z-score of its log norm above validation.norm-z={policy.norm_z:g})")
    return [v or _ok(r.site_id) for v, r in zip(verdicts, replies, strict=True)]


def _screen_metric_keys(replies: Sequence[SiteReply], verdicts: list[Verdict | None]) -> None:
    valid = [i for i, v in enumerate(verdicts) if v is None]
    odd = _metric_key_outliers([_metric_keys(replies[i].metrics) for i in valid])
    for i, flagged in zip(valid, odd, strict=True):
        if flagged:
            verdicts[i] = _no(replies[i].site_id, Reason.METRIC_KEYS_MISMATCH,
                              "metric keys differ from those of the round's other replies")


def claimed_val_examples(metrics: Mapping[str, Any] | None) -> int | None:
    """The validation size a (checked) training reply announced, or None."""
    try:
        v = metrics.get(VAL_EXAMPLES_KEY) if metrics is not None else None
    except Exception:  # noqa: BLE001
        return None
    return int(v) if _is_int(v) and int(v) >= 0 else None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Evaluation replies
# ---------------------------------------------------------------------------

_SEG_INT_KEYS = ("n-images", "hd95-n", "hd95-mm-n")
_SEG_FLOAT_KEYS = ("dice-sum", "iou-sum", "hd95-sum", "hd95-mm-sum")


def _check_classification(site: str, m: Mapping[str, Any], n: int, policy: ValidationPolicy) -> Verdict | None:
    c, b = m.get("num-classes"), m.get("bins")
    if not _is_int(c) or int(c) != policy.num_classes:  # type: ignore[arg-type]
        return _no(site, Reason.TASK_MISMATCH, f"'num-classes' must be the task's {policy.num_classes}")
    if not _is_int(b) or int(b) != policy.bins:  # type: ignore[arg-type]
        return _no(site, Reason.TASK_MISMATCH, f"'bins' must be {policy.bins}, as every site uses")
    for key in ("confusion", "histogram-index", "histogram-count", "histogram"):
        if key in m:
            v = m[key]
            if not isinstance(v, list) or not all(_is_int(x) for x in v):
                return _no(site, Reason.BAD_COUNTS, f"{key!r} must be a list of integers")
            if key != "histogram-index" and any(int(x) < 0 for x in v):
                return _no(site, Reason.BAD_COUNTS, f"{key!r} holds negative counts")
    try:
        counts = ClassificationCounts.from_flat(m)
    except (ValueError, TypeError, OverflowError):
        return _no(site, Reason.BAD_COUNTS, "the classification counts cannot be decoded (sizes or indices invalid)")
    label_totals = counts.confusion.sum(axis=1)  # (C,) examples per true label
    if int(label_totals.sum()) != n:
        return _no(site, Reason.INCONSISTENT_COUNTS, "the confusion matrix does not total 'num-examples'")
    if not np.array_equal(counts.histogram.sum(axis=2), np.broadcast_to(label_totals, (counts.num_classes,) * 2)):
        return _no(site, Reason.INCONSISTENT_COUNTS,
                   "a score histogram does not hold exactly the examples of its true label "
                   "(tp + fn != positives or fp + tn != negatives at some threshold)")
    return None


def _check_segmentation(site: str, m: Mapping[str, Any], n: int, policy: ValidationPolicy) -> Verdict | None:
    missing = [k for k in (*_SEG_INT_KEYS, *_SEG_FLOAT_KEYS) if k not in m]
    if missing:
        return _no(site, Reason.BAD_COUNTS, f"segmentation sums lack {_names(missing)}")
    if not all(_is_int(m[k]) and int(m[k]) >= 0 for k in _SEG_INT_KEYS):
        return _no(site, Reason.BAD_COUNTS, f"{', '.join(map(repr, _SEG_INT_KEYS))} must be integers >= 0")
    if not all(_finite(m[k]) and float(m[k]) >= 0 for k in _SEG_FLOAT_KEYS):
        return _no(site, Reason.BAD_COUNTS, f"{', '.join(map(repr, _SEG_FLOAT_KEYS))} must be finite numbers >= 0")
    s = SegmentationCounts.from_flat(m)
    slack = _DICE_TOLERANCE * max(s.n_images, 1)
    if s.n_images != n:
        return _no(site, Reason.INCONSISTENT_COUNTS, "'n-images' differs from 'num-examples'")
    if s.dice_sum > s.n_images + slack:
        return _no(site, Reason.INCONSISTENT_COUNTS, "'dice-sum' exceeds 'n-images' (Dice is at most 1 per image)")
    if s.iou_sum > s.dice_sum + slack:
        return _no(site, Reason.INCONSISTENT_COUNTS, "'iou-sum' exceeds 'dice-sum' (IoU <= Dice on every image)")
    if not s.hd95_mm_n <= s.hd95_n <= s.n_images:
        return _no(site, Reason.INCONSISTENT_COUNTS, "expected hd95-mm-n <= hd95-n <= n-images")
    if (s.hd95_n == 0 and s.hd95_sum > 0) or (s.hd95_mm_n == 0 and s.hd95_mm_sum > 0):
        return _no(site, Reason.INCONSISTENT_COUNTS, "an HD95 sum is positive over zero images")
    if policy.image_size and s.hd95_sum > s.hd95_n * policy.image_size * math.sqrt(2) * (1 + 1e-6):
        return _no(site, Reason.INCONSISTENT_COUNTS,
                   f"mean HD95 exceeds the diagonal of a {policy.image_size}-pixel image")
    return None


def check_evaluate_reply(reply: SiteReply, policy: ValidationPolicy, val_examples: int | None = None) -> Verdict:
    """The verdict on one evaluation reply (the round-level key check is in :func:`screen_evaluate_round`).

    ``val_examples`` is the validation size the site announced in its training
    reply (None = unknown: only ``max_examples`` bounds ``num-examples``).
    """
    site = reply.site_id
    try:
        bad = _check_records(reply, need_arrays=False)
        if bad:
            return bad
        m = reply.metrics
        assert m is not None
        high = policy.max_examples if val_examples is None else min(policy.max_examples, val_examples)
        what = ("validation.max-examples" if val_examples is None
                else f"at most the {VAL_EXAMPLES_KEY!r} this site announced when training")
        bad = _check_num_examples(site, m, 0, high, what)
        if bad:
            return bad
        loss = m.get("eval-loss")
        if not _finite(loss) or float(loss) < 0:  # type: ignore[arg-type]
            return _no(site, Reason.BAD_METRIC, "'eval-loss' must be a finite number >= 0")
        n = int(m["num-examples"])
        if policy.num_classes is None:
            if "num-classes" in m:
                return _no(site, Reason.TASK_MISMATCH, "classification counts sent for a segmentation task")
            bad = _check_segmentation(site, m, n, policy)
        else:
            if "num-classes" not in m:
                return _no(site, Reason.TASK_MISMATCH, "no classification counts ('num-classes' missing)")
            bad = _check_classification(site, m, n, policy)
        return bad or _ok(site)
    except Exception:  # noqa: BLE001 - never raise on a site's input; but say it happened
        logger.exception("evaluation reply check failed unexpectedly for site %s; rejecting the reply", site)
        return _no(site, Reason.BAD_COUNTS, "the reply could not be checked")


def screen_evaluate_round(replies: Sequence[SiteReply], policy: ValidationPolicy,
                          val_examples: Sequence[int | None] | None = None) -> list[Verdict]:
    """One verdict per evaluation reply, in order.

    Parameters
    ----------
    replies:
        The round's successful evaluation replies.
    policy:
        The limits; ``num_classes``/``bins``/``image_size`` describe the task.
    val_examples:
        Per reply (same order), the validation size that site announced in
        its training reply (:func:`claimed_val_examples`), or None if unknown.
    """
    sizes = list(val_examples) if val_examples is not None else [None] * len(replies)
    if len(sizes) != len(replies):
        raise ValueError(f"val_examples has {len(sizes)} entries for {len(replies)} replies")
    verdicts: list[Verdict | None] = []
    for reply, size in zip(replies, sizes, strict=True):
        v = check_evaluate_reply(reply, policy, size)
        verdicts.append(None if v.accepted else v)
    _screen_metric_keys(replies, verdicts)
    return [v or _ok(r.site_id) for v, r in zip(verdicts, replies, strict=True)]


# ---------------------------------------------------------------------------
# Post-training replies: calibration sums, feature sums, distance counts
# ---------------------------------------------------------------------------

_PSD_TOLERANCE = 1e-6  # relative to the scatter's trace: float rounding of honest sums stays far below


def _bound(policy: ValidationPolicy, announced: int | None, what: str) -> tuple[int, str]:
    if announced is None:
        return policy.max_examples, "validation.max-examples"
    return min(policy.max_examples, announced), f"at most the {what} size this site announced at the roll call"


def _floats(m: Mapping[str, Any], key: str, length: int) -> np.ndarray | None:
    """``m[key]`` as a finite float64 array of ``length`` values, or None."""
    v = m.get(key)
    if not isinstance(v, list) or len(v) != length or not all(_is_number(x) for x in v):
        return None
    a = np.asarray(v, dtype=np.float64)
    return a if np.isfinite(a).all() else None


def _counts_list(m: Mapping[str, Any], key: str, length: int) -> np.ndarray | None:
    """``m[key]`` as ``length`` non-negative integers, or None."""
    v = m.get(key)
    if not isinstance(v, list) or len(v) != length or not all(_is_int(x) and int(x) >= 0 for x in v):
        return None
    return np.asarray([int(x) for x in v], dtype=np.int64)


def _guarded(check: Any) -> Any:
    """Never raise on a site's input: an unexpected failure is a rejection (and logged)."""
    def wrapper(reply: SiteReply, *args: Any) -> Verdict:
        try:
            return check(reply, *args) or _ok(reply.site_id)
        except Exception:  # noqa: BLE001
            logger.exception("post-training reply check failed unexpectedly for site %s; rejecting it", reply.site_id)
            return _no(reply.site_id, Reason.BAD_STATISTICS, "the reply could not be checked")
    wrapper.__doc__ = check.__doc__
    wrapper.__name__ = check.__name__.lstrip("_")
    return wrapper


@_guarded
def check_calibration_reply(reply: SiteReply, policy: ValidationPolicy, temperatures: int | None = None,
                            classes: int | None = None, val_examples: int | None = None) -> Verdict | None:
    """One calibration reply: its size, NLL sums per temperature and/or NLL derivatives at one calibration.

    ``temperatures``: how many NLL sums the reply must hold (None: none
    asked); ``classes``: the task's classes when the NLL's gradient and
    Hessian were asked for.
    """
    bad = _check_records(reply, need_arrays=False)
    if bad:
        return bad
    m, site = reply.metrics, reply.site_id
    assert m is not None
    high, what = _bound(policy, val_examples, "validation")
    bad = _check_num_examples(site, m, 1, high, what)
    if bad:
        return bad
    n = int(m[protocol.NUM_EXAMPLES])
    if temperatures is not None:
        sums = _floats(m, protocol.NLL_SUMS, temperatures)
        if sums is None or (sums < 0).any():
            return _no(site, Reason.BAD_STATISTICS,
                       f"{protocol.NLL_SUMS!r} must hold {temperatures} finite numbers >= 0 (one per temperature)")
    if classes is not None:
        f = m.get(protocol.NLL_SUM)
        g = _floats(m, protocol.NLL_GRADIENT, classes)
        h = _floats(m, protocol.NLL_HESSIAN, classes * classes)
        if not _finite(f) or float(f) < 0 or g is None or h is None:  # type: ignore[arg-type]
            return _no(site, Reason.BAD_STATISTICS, f"the NLL sum must be a finite number >= 0 with {classes} "
                       f"gradient and {classes}x{classes} Hessian values, all finite")
        h = h.reshape(classes, classes)
        scale = max(float(np.abs(h).max()), 1.0)
        if (np.abs(g[1:]) > n * (1 + 1e-9)).any() or (np.diag(h)[1:] > n / 4 * (1 + 1e-9)).any():
            return _no(site, Reason.INCONSISTENT_COUNTS, "the bias derivatives exceed what num-examples images allow")
        if np.abs(h - h.T).max() > 1e-9 * scale or float(np.linalg.eigvalsh(h).min()) < -1e-9 * scale:
            return _no(site, Reason.INCONSISTENT_COUNTS, "the NLL Hessian is not symmetric positive semi-definite "
                       "(the NLL of a calibration is convex)")
    return None


@dataclass(frozen=True)
class FeatureExpectation:
    """What the server's own model says a feature-sum reply must look like."""

    dims: int
    raw_dims: int
    channels: int
    pixels_per_image: int
    bins: int


@_guarded
def check_feature_reply(reply: SiteReply, policy: ValidationPolicy, expected: FeatureExpectation,
                        train_examples: int | None = None) -> Verdict | None:
    """One feature-sum reply: sizes, finiteness, and sums some real set of vectors could have."""
    bad = _check_records(reply, need_arrays=False)
    if bad:
        return bad
    m, site = reply.metrics, reply.site_id
    assert m is not None
    high, what = _bound(policy, train_examples, "training")
    bad = _check_num_examples(site, m, 1, high, what)
    if bad:
        return bad
    n, d = int(m[protocol.NUM_EXAMPLES]), expected.dims
    if m.get(protocol.FEATURE_COUNT) != n or not _is_int(m.get(protocol.FEATURE_COUNT)):
        return _no(site, Reason.INCONSISTENT_COUNTS, f"{protocol.FEATURE_COUNT!r} differs from 'num-examples'")
    if m.get(protocol.FEATURE_DIMS) != d or m.get(protocol.RAW_FEATURE_DIMS) != expected.raw_dims:
        return _no(site, Reason.TASK_MISMATCH, f"feature widths must be the model's ({expected.raw_dims}, sent as {d})")
    s1 = _floats(m, protocol.FEATURE_SUM, d)
    up = _floats(m, protocol.FEATURE_OUTER, d * (d + 1) // 2)
    s3 = _floats(m, protocol.FEATURE_NORM2_X, d)
    s4 = m.get(protocol.FEATURE_NORM4)
    if s1 is None or up is None or s3 is None or not _finite(s4):
        return _no(site, Reason.BAD_STATISTICS, "feature sums must be finite numbers of the model's feature width")
    rows, cols = np.triu_indices(d)
    s2 = np.zeros((d, d))
    s2[rows, cols] = up
    s2[cols, rows] = up
    trace = float(np.trace(s2))
    if (np.diag(s2) < 0).any() or float(s4) < 0:  # type: ignore[arg-type]
        return _no(site, Reason.BAD_STATISTICS, "sums of squares must be >= 0")
    if trace * trace > n * float(s4) * (1 + 1e-9) + 1e-12:  # type: ignore[arg-type]
        return _no(site, Reason.INCONSISTENT_COUNTS, "the sums of ||x||^2 and ||x||^4 are not those of any "
                   f"{n} vectors (Cauchy-Schwarz)")
    scatter = s2 - np.outer(s1, s1) / n
    if float(np.linalg.eigvalsh((scatter + scatter.T) / 2).min()) < -_PSD_TOLERANCE * max(trace, 1e-12):
        return _no(site, Reason.INCONSISTENT_COUNTS, "the feature sums are not those of any set of vectors "
                   "(their centred scatter matrix is not positive semi-definite)")
    if m.get(protocol.INTENSITY_CHANNELS) != expected.channels:
        return _no(site, Reason.TASK_MISMATCH, f"{protocol.INTENSITY_CHANNELS!r} must be the model's "
                   f"{expected.channels} channel(s)")
    hist = _counts_list(m, protocol.INTENSITY_HIST, expected.channels * expected.bins)
    if hist is None:
        return _no(site, Reason.BAD_COUNTS, f"{protocol.INTENSITY_HIST!r} must hold {expected.channels} x "
                   f"{expected.bins} non-negative integers")
    if not (hist.reshape(expected.channels, expected.bins).sum(axis=1) == n * expected.pixels_per_image).all():
        return _no(site, Reason.INCONSISTENT_COUNTS, f"each channel of {protocol.INTENSITY_HIST!r} must total "
                   f"num-examples x {expected.pixels_per_image} pixels")
    return None


@_guarded
def check_distance_reply(reply: SiteReply, policy: ValidationPolicy, bins: int, val_examples: int | None = None,
                         train_count: int | None = None) -> Verdict | None:
    """One distance-count reply: non-negative counts totalling the validation and training images."""
    bad = _check_records(reply, need_arrays=False)
    if bad:
        return bad
    m, site = reply.metrics, reply.site_id
    assert m is not None
    high, what = _bound(policy, val_examples, "validation")
    bad = _check_num_examples(site, m, 0, high, what)
    if bad:
        return bad
    val = _counts_list(m, protocol.VAL_DISTANCE_COUNTS, bins)
    train = _counts_list(m, protocol.TRAIN_DISTANCE_COUNTS, bins)
    if val is None or train is None:
        return _no(site, Reason.BAD_COUNTS, f"distance counts must be {bins} non-negative integers each")
    if int(val.sum()) != int(m[protocol.NUM_EXAMPLES]):
        return _no(site, Reason.INCONSISTENT_COUNTS, "the validation distance counts do not total 'num-examples'")
    total = m.get(protocol.TRAIN_DISTANCE_TOTAL)
    if not _is_int(total) or int(train.sum()) != int(total) or (train_count is not None and int(total) != train_count):
        return _no(site, Reason.INCONSISTENT_COUNTS, "the training distance counts do not total the training images "
                   "of this site's feature sums")
    return None


# ---------------------------------------------------------------------------
# The run and the round
# ---------------------------------------------------------------------------


class ReplyScreen:
    """The checks of one run: the model spec, the policy, and each site's announced validation size.

    Parameters
    ----------
    spec:
        :func:`model_spec` of the model the server built.
    policy:
        The limits (:meth:`ValidationPolicy.for_run`).

    Notes
    -----
    Sites are identified by a key the caller trusts (Flower's node id, which
    the SuperLink assigns), not by the site id a reply declares about itself.
    The first validation size a site announces in an accepted training reply
    is its bound for the rest of the run: a site cannot raise it later.
    """

    def __init__(self, spec: Mapping[str, TensorSpec], policy: ValidationPolicy) -> None:
        self.spec = dict(spec)
        self.policy = policy
        self.val_examples: dict[Hashable, int] = {}
        self.train_examples: dict[Hashable, int] = {}

    def train(self, keys: Sequence[Hashable], replies: Sequence[SiteReply],
              global_arrays: Mapping[str, Any]) -> list[Verdict]:
        """Verdicts on a training round (:func:`screen_train_round`); remembers announced validation sizes."""
        if len(keys) != len(replies):
            raise ValueError(f"{len(keys)} keys for {len(replies)} replies")
        verdicts = screen_train_round(replies, self.spec, global_arrays, self.policy)
        for key, reply, verdict in zip(keys, replies, verdicts, strict=True):
            size = claimed_val_examples(reply.metrics) if verdict.accepted else None
            if size is not None:
                self.val_examples.setdefault(key, size)
        return verdicts

    def announce(self, key: Hashable, val_examples: int, train_examples: int | None = None) -> None:
        """Record the sizes a site announced at the roll call: its bounds for the run (it cannot raise them later).

        ``val_examples`` bounds its evaluation and calibration replies,
        ``train_examples`` its training-image statistics (post-training phases).
        """
        if isinstance(val_examples, int) and not isinstance(val_examples, bool) and val_examples >= 0:
            self.val_examples.setdefault(key, val_examples)
        if isinstance(train_examples, int) and not isinstance(train_examples, bool) and train_examples >= 0:
            self.train_examples.setdefault(key, train_examples)

    def _bounded(self, keys: Sequence[Hashable], replies: Sequence[SiteReply], check: Any) -> list[Verdict]:
        if len(keys) != len(replies):
            raise ValueError(f"{len(keys)} keys for {len(replies)} replies")
        return [check(reply, key) for key, reply in zip(keys, replies, strict=True)]

    def calibration(self, keys: Sequence[Hashable], replies: Sequence[SiteReply], temperatures: int | None = None,
                    classes: int | None = None) -> list[Verdict]:
        """Verdicts on calibration replies (:func:`check_calibration_reply`).

        Bounded by the announced validation sizes.
        """
        return self._bounded(keys, replies, lambda r, k: check_calibration_reply(
            r, self.policy, temperatures, classes, self.val_examples.get(k)))

    def features(self, keys: Sequence[Hashable], replies: Sequence[SiteReply], expected: FeatureExpectation
                 ) -> list[Verdict]:
        """Verdicts on feature-sum replies (:func:`check_feature_reply`), bounded by the announced training sizes."""
        return self._bounded(keys, replies, lambda r, k: check_feature_reply(
            r, self.policy, expected, self.train_examples.get(k)))

    def distances(self, keys: Sequence[Hashable], replies: Sequence[SiteReply], bins: int,
                  train_counts: Mapping[Hashable, int]) -> list[Verdict]:
        """Verdicts on distance-count replies (:func:`check_distance_reply`)."""
        return self._bounded(keys, replies, lambda r, k: check_distance_reply(
            r, self.policy, bins, self.val_examples.get(k), train_counts.get(k)))

    def evaluate(self, keys: Sequence[Hashable], replies: Sequence[SiteReply]) -> list[Verdict]:
        """Verdicts on an evaluation round (:func:`screen_evaluate_round`), bounded by the announced sizes."""
        if len(keys) != len(replies):
            raise ValueError(f"{len(keys)} keys for {len(replies)} replies")
        return screen_evaluate_round(replies, self.policy, [self.val_examples.get(k) for k in keys])



@dataclass(frozen=True)
class RoundDecision(Generic[T]):
    """The replies a round may use, and whether it may proceed at all."""

    accepted: list[T]
    rejected: list[Verdict]
    proceed: bool
    refusal: str | None = None

    def record(self) -> dict[str, Any]:
        """JSON form for the round record: rejections (site, reason, detail) and any refusal."""
        out: dict[str, Any] = {"accepted": len(self.accepted),
                               "rejected": [v.to_dict() for v in self.rejected]}
        if self.refusal:
            out["refused"] = self.refusal
        return out


def filter_round(items: Sequence[T], verdicts: Sequence[Verdict], min_sites: int) -> RoundDecision[T]:
    """Keep the items whose verdict accepts them; refuse the round below ``min_sites``.

    Parameters
    ----------
    items:
        The round's replies in any form (e.g. Flower ``Message`` objects), in
        the order the verdicts were made.
    verdicts:
        One verdict per item.
    min_sites:
        Accepted replies the round needs; with fewer, ``proceed`` is False and
        the caller must aggregate nothing (the global model stays as it was).
    """
    if len(items) != len(verdicts):
        raise ValueError(f"{len(verdicts)} verdicts for {len(items)} replies")
    accepted = [x for x, v in zip(items, verdicts, strict=True) if v.accepted]
    rejected = [v for v in verdicts if not v.accepted]
    if len(accepted) < min_sites:
        refusal = (f"only {len(accepted)} of {len(items)} replies passed validation, min-sites is {min_sites}"
                   + (f" (rejected: {', '.join(f'{v.site_id}: {v.reason}' for v in rejected)})" if rejected else ""))
        return RoundDecision([], rejected, False, refusal)
    return RoundDecision(accepted, rejected, True)
