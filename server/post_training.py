"""After the last round: federated calibration and the out-of-distribution reference (Flower glue).

Two phases ask the training sites for aggregates of the final global model's
outputs on their own images, through the same gate as every round (identity,
:mod:`shared.validation`, ``min-sites`` valid replies), and pool them:

* :func:`calibrate` (classification tasks; run config ``calibration``): a
  temperature (and per-class biases) fitted on the pooled validation NLL: the
  first message also brings the uncalibrated counts, the last the counts at the
  fitted calibration (ECE before and after, the re-chosen threshold); see
  :mod:`shared.metrics.calibration`;
* :func:`ood_reference` (run config ``ood-stats``; not under DP): the pooled
  mean and shrunk covariance of the training images' penultimate features
  and their intensity histogram, then the validation images' distance
  distribution, in two messages; see :mod:`shared.ood`.

Each returns the model-card section it produced, or one saying why there is
none (too few sites, a segmentation task, DP); the run itself never fails
here: a model without calibration or OOD reference is still a model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from torch import nn

from server.gate import GateResult
from server.rounds import RoundLoop
from shared import protocol
from shared.config import RunConfig
from shared.console import console_line
from shared.formatting import fmt_metric
from shared.kinds import CLASSIFICATION
from shared.metrics.calibration import (
    BIAS_MAX,
    METHODS,
    T_MAX,
    T_MIN,
    TEMPERATURE,
    TEMPERATURE_BIAS,
    Calibration,
    CalibrationFit,
    NewtonFit,
    first_grid,
    not_fitted,
    pool_nll_sums,
    refine_grid,
)
from shared.metrics.classification import ClassificationCounts
from shared.models.features import FeaturesUnavailable, feature_dims
from shared.ood import (
    DISTANCE_BINS,
    INTENSITY_BINS,
    MAX_DIMS,
    OOD_QUANTILE,
    PROJECTION_SEED,
    FeatureSums,
    OODReference,
    distance_edges,
    histogram_quantile,
    ledoit_wolf,
    precision_matrix,
    total_variation,
)
from shared.tasks import TaskSpec
from shared.validation import FeatureExpectation

logger = logging.getLogger(__name__)

__all__ = ["SMALL_SITE_IMAGES", "calibrate", "card_summary", "ood_reference"]

SMALL_SITE_IMAGES = 20
"""A training site with fewer images still contributes its feature sums; the card names it as small."""


def _log_failures(what: str, result: GateResult) -> None:
    for site, m in result.failed:
        logger.warning(console_line("warning", f"{what}: {site} failed: {m.error.reason}"))


def _metrics(m: Any) -> dict[str, Any]:
    return dict(m.content[protocol.METRICS])


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


class _Refused(Exception):
    """A calibration message left fewer than ``min-sites`` valid replies."""


class _Session:
    """The calibration messages of one run: the sites still taking part and the size each announced first."""

    def __init__(self, loop: RoundLoop, arrays: ArrayRecord, task: TaskSpec, nodes: list[int]) -> None:
        self.loop, self.arrays, self.task = loop, arrays, task
        self.by_site = {loop.gate.directory.site_of(node): node for node in nodes}
        self.nodes = list(nodes)
        self.sizes: dict[str, int] = {}

    def ask(self, config: dict[str, Any], *, temperatures: int | None = None, derivatives: bool = False,
            counts: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """One message to the sites still taking part; returns the accepted replies' metrics (raises _Refused)."""
        screen = self.loop.gate.screen
        classes = self.task.num_classes if derivatives else None

        def check(keys: list[str], replies: list[Any]) -> list[Any]:
            verdicts = screen.calibration(keys, replies, temperatures, classes)
            if counts:
                verdicts = [v if not v.accepted else e
                            for v, e in zip(verdicts, screen.evaluate(keys, replies), strict=True)]
            return _same_size(verdicts, keys, replies, self.sizes) if self.sizes else verdicts

        result = self.loop.ask(protocol.CALIBRATE_MESSAGE, self.nodes, self.arrays, config, check)
        _log_failures("calibration", result)
        if result.refusal:
            raise _Refused(result.refusal)
        accepted = [(s, _metrics(m)) for s, m in result.accepted]
        if not self.sizes:
            self.sizes = {s: int(m[protocol.NUM_EXAMPLES]) for s, m in accepted}
        self.nodes = [self.by_site[s] for s, _ in accepted if s in self.by_site]
        return accepted


def _params(cal: Calibration) -> list[float]:
    return [cal.temperature, *(cal.bias or ())]


def calibrate(loop: RoundLoop, arrays: ArrayRecord, task: TaskSpec, threshold_uncalibrated: float | None,
              method: str = TEMPERATURE_BIAS) -> dict[str, Any]:
    """Fit the calibration on the training sites' validation images; returns the card's ``calibration`` section.

    ``method`` is :data:`~shared.metrics.calibration.TEMPERATURE_BIAS` (the
    default) or :data:`~shared.metrics.calibration.TEMPERATURE`. A bias cannot
    be fitted for a class without validation images: the fit then falls back
    to the temperature alone (and says so).
    """
    if task.kind != CLASSIFICATION:
        return not_fitted(f"{task.kind} task: calibration applies to classifiers (a segmentation model's per-pixel "
                          "probabilities are used as they are)")
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    nodes = loop.training_nodes()
    if len(nodes) < loop.gate.min_sites:
        return _calibration_refused(f"only {len(nodes)} training site(s) connected (min-sites {loop.gate.min_sites})")
    session = _Session(loop, arrays, task, nodes)
    note = ""
    try:
        # first message: the uncalibrated counts (ECE before), and the first step of the fit
        first_config: dict[str, Any] = {protocol.CALIBRATION_SCORE_AT: [1.0]}
        grid1 = first_grid()
        if method == TEMPERATURE:
            first_config[protocol.CALIBRATION_TEMPERATURES] = grid1.tolist()
        else:
            first_config[protocol.CALIBRATION_DERIVATIVES_AT] = _params(Calibration(1.0, (0.0,) * task.num_classes))
        first = session.ask(first_config, temperatures=len(grid1) if method == TEMPERATURE else None,
                            derivatives=method == TEMPERATURE_BIAS, counts=True)
        n = sum(session.sizes[s] for s, _ in first)
        before = _merged(task, [m for _, m in first])
        nll_before = sum(float(m[protocol.EVAL_LOSS]) * session.sizes[s] for s, m in first) / n
        missing = [task.class_names[k] for k, total in enumerate(before.confusion.sum(axis=1)) if total == 0]
        if method == TEMPERATURE_BIAS and missing:
            note = (f"no validation images of class(es) {', '.join(missing)}: a bias cannot be fitted for them, "
                    "so only the temperature was")
            method = TEMPERATURE
            first = session.ask({protocol.CALIBRATION_TEMPERATURES: grid1.tolist()}, temperatures=len(grid1))
        if method == TEMPERATURE:
            cal, messages, at_edge = _fit_temperature(session, first, grid1)
        else:
            cal, messages, at_edge = _fit_temperature_bias(session, first)
        last = session.ask({protocol.CALIBRATION_SCORE_AT: _params(cal)}, counts=True)
    except _Refused as exc:
        return _calibration_refused(str(exc))
    after = _merged(task, [m for _, m in last])
    n_after = after.num_examples
    nll_after = sum(float(m[protocol.EVAL_LOSS]) * session.sizes[s] for s, m in last) / n_after
    rule = task.threshold_rule
    threshold = after.operating_threshold(rule)
    positive = rule.positive_class
    fit = CalibrationFit(
        method=method, calibration=cal, nll_before=nll_before, nll_after=nll_after,
        ece_before=float(before.report(None, positive)["ece"]), ece_after=float(after.report(None, positive)["ece"]),
        threshold=None if threshold is None or math.isnan(threshold) else float(threshold),
        threshold_uncalibrated=threshold_uncalibrated, num_examples=n_after, sites=tuple(s for s, _ in last),
        messages=messages + 1, at_edge=at_edge,
        extra={"auroc-after": after.report(None, positive).get("auroc"), **({"note": note} if note else {})},
    )
    thr = ("" if fit.threshold is None
           else f"; operating threshold {fmt_metric(fit.threshold)} on calibrated probabilities")
    bias = "" if cal.bias is None else f", bias {', '.join(f'{b:+.3g}' for b in cal.bias)}"
    logger.info(console_line("summary", (
        f"calibration ({method}): temperature {cal.temperature:.3g}{bias} fitted on {n_after} validation images of "
        f"{len(fit.sites)} sites in {fit.messages} messages (NLL {fmt_metric(nll_before)} -> {fmt_metric(nll_after)}, "
        f"ECE {fmt_metric(fit.ece_before)} -> {fmt_metric(fit.ece_after)}){thr}")))
    if note:
        logger.warning(console_line("warning", f"calibration: {note}"))
    if fit.at_edge:
        logger.warning(console_line("warning", f"calibration: a fitted parameter lies at the end of its search range "
                                               f"(temperature in [{T_MIN:g}, {T_MAX:g}], bias within "
                                               f"+-{BIAS_MAX:g}); the model is far from calibrated"))
    return fit.to_card()


def _fit_temperature(session: _Session, first: list[tuple[str, dict[str, Any]]], grid1: np.ndarray
                     ) -> tuple[Calibration, int, bool]:
    """The temperature grid: coarse sums from the first message, then a finer grid around the best."""
    _, pooled = pool_nll_sums([(session.sizes[s], m[protocol.NLL_SUMS]) for s, m in first], len(grid1))
    grid2 = refine_grid(grid1, pooled)
    second = session.ask({protocol.CALIBRATION_TEMPERATURES: grid2.tolist()}, temperatures=len(grid2))
    _, pooled2 = pool_nll_sums([(session.sizes[s], m[protocol.NLL_SUMS]) for s, m in second], len(grid2))
    t = float(grid2[int(np.argmin(pooled2))])
    return Calibration(t), 2, t <= T_MIN * (1 + 1e-9) or t >= T_MAX * (1 - 1e-9)


def _fit_temperature_bias(session: _Session, first: list[tuple[str, dict[str, Any]]]
                          ) -> tuple[Calibration, int, bool]:
    """Newton's method on the pooled NLL's sums (the first message evaluated the identity)."""
    c = session.task.num_classes
    fit = NewtonFit(c)
    replies = first
    while True:
        n = sum(session.sizes[s] for s, _ in replies)
        f = sum(float(m[protocol.NLL_SUM]) for _, m in replies)
        g = sum(np.asarray(m[protocol.NLL_GRADIENT], dtype=np.float64) for _, m in replies)
        h = sum(np.asarray(m[protocol.NLL_HESSIAN], dtype=np.float64).reshape(c, c) for _, m in replies)
        fit.observe(n, f, g, h)
        cal = fit.proposal()
        if cal is None:
            break
        replies = session.ask({protocol.CALIBRATION_DERIVATIVES_AT: _params(cal)}, derivatives=True)
    if not fit.converged:
        logger.warning(console_line("warning", f"calibration: the fit did not converge in {fit.messages} messages; "
                                               "the best parameters found are used"))
    return fit.best, fit.messages, fit.at_edge


def _merged(task: TaskSpec, replies: list[dict[str, Any]]) -> ClassificationCounts:
    """The sum of the sites' evaluation counts (each reply's metric fields)."""
    counts = [task.view.counts_from_flat(m) for m in replies]
    total = counts[0]
    for c in counts[1:]:
        total = total.merge(c)  # type: ignore[arg-type]
    return total  # type: ignore[return-value]


def _same_size(verdicts: list[Any], keys: list[str], replies: list[Any], sizes: dict[str, int]) -> list[Any]:
    """A site's later calibration replies must count as many validation images as its first."""
    from shared.validation import Reason, Verdict

    out = []
    for v, key, reply in zip(verdicts, keys, replies, strict=True):
        n = (reply.metrics or {}).get(protocol.NUM_EXAMPLES)
        if v.accepted and n != sizes.get(key):
            v = Verdict(v.site_id, False, Reason.INCONSISTENT_COUNTS,
                        "'num-examples' differs from this site's first calibration reply")
        out.append(v)
    return out


def _calibration_refused(reason: str) -> dict[str, Any]:
    logger.warning(console_line("warning", f"calibration not fitted: {reason}; the model is used uncalibrated"))
    return not_fitted(reason)


# ---------------------------------------------------------------------------
# Out-of-distribution reference
# ---------------------------------------------------------------------------


def _not_computed(reason: str, warn: bool = True) -> dict[str, Any]:
    if warn:
        logger.warning(console_line("warning", f"out-of-distribution reference not computed: {reason}"))
    return {"status": "not-computed", "reason": reason}


def ood_reference(loop: RoundLoop, arrays: ArrayRecord, cfg: RunConfig, task: TaskSpec, model: nn.Module
                  ) -> dict[str, Any]:
    """Collect the training population's statistics; returns the card's ``ood`` section."""
    if cfg.dp.enabled or cfg.central_dp.mode != "none":
        return _not_computed("the run trains under differential privacy, whose guarantee does not cover statistics "
                             "of the training images, so sites do not send them", warn=False)
    try:
        raw = feature_dims(model, cfg.model, task.in_channels, cfg.data.image_size)
    except FeaturesUnavailable as exc:
        return _not_computed(str(exc))
    dims = min(raw, MAX_DIMS)
    size = cfg.data.image_size
    expected = FeatureExpectation(dims=dims, raw_dims=raw, channels=task.in_channels, pixels_per_image=size * size,
                                  bins=INTENSITY_BINS)
    screen, what = loop.gate.screen, "out-of-distribution statistics"
    nodes = loop.training_nodes()
    if len(nodes) < loop.gate.min_sites:
        return _not_computed(f"only {len(nodes)} training site(s) connected (min-sites {loop.gate.min_sites})")
    first = loop.ask(protocol.OOD_MESSAGE, nodes, arrays, {protocol.OOD_PHASE: protocol.OOD_FEATURES},
                     lambda k, r: screen.features(k, r, expected))
    _log_failures(what, first)
    if first.refusal:
        return _not_computed(first.refusal)
    site_sums = {s: FeatureSums.from_flat(_metrics(m)) for s, m in first.accepted}
    hists = {s: np.asarray(_metrics(m)[protocol.INTENSITY_HIST], dtype=np.int64).reshape(task.in_channels, -1)
             for s, m in first.accepted}
    pooled = FeatureSums.empty(dims)
    for s in sorted(site_sums):
        pooled = pooled.merge(site_sums[s])
    mean, cov, shrinkage = ledoit_wolf(pooled)
    precision = precision_matrix(cov)
    intensity = sum(hists.values())
    site_tv = max(total_variation(h, intensity) for h in hists.values())

    by_site = {loop.gate.directory.site_of(node): node for node in nodes}
    reference = ArrayRecord({"mean": Array(np.ascontiguousarray(mean)),
                             "precision": Array(np.ascontiguousarray(precision))})
    second = loop.ask(protocol.OOD_MESSAGE, [by_site[s] for s in site_sums if s in by_site], arrays,
                      {protocol.OOD_PHASE: protocol.OOD_DISTANCES},
                      lambda k, r: screen.distances(k, r, DISTANCE_BINS, {s: v.n for s, v in site_sums.items()}),
                      extra={protocol.OOD_REFERENCE: reference})
    _log_failures(what, second)
    if second.refusal:
        return _not_computed(second.refusal)
    edges = distance_edges(dims)
    val = sum(np.asarray(_metrics(m)[protocol.VAL_DISTANCE_COUNTS], dtype=np.int64) for _, m in second.accepted)
    train = sum(np.asarray(_metrics(m)[protocol.TRAIN_DISTANCE_COUNTS], dtype=np.int64) for _, m in second.accepted)
    n_val = int(val.sum())
    if n_val == 0:
        return _not_computed("the sites hold no validation images to set the distance threshold on")
    threshold = histogram_quantile(val, edges, OOD_QUANTILE)
    small = sorted(s for s, v in site_sums.items() if v.n < SMALL_SITE_IMAGES)
    ref = OODReference(
        feature_dims=raw, dims=dims, projection_seed=PROJECTION_SEED if raw > dims else None, mean=mean, cov=cov,
        shrinkage=shrinkage, threshold=threshold, train_quantile=histogram_quantile(train, edges, OOD_QUANTILE),
        num_train=pooled.n, num_val=n_val, intensity=intensity, intensity_site_tv=site_tv,
        sites=tuple(sorted(site_sums)),
        extra={"small-sites": small, "distance-sites": sorted(s for s, _ in second.accepted)},
    )
    proj = f" (projected from {raw})" if raw > dims else ""
    logger.info(console_line("summary", (
        f"out-of-distribution reference: {dims}-dim features{proj} of {pooled.n} training images from "
        f"{len(site_sums)} sites (Ledoit-Wolf shrinkage {shrinkage:.2f}); inputs beyond distance {threshold:.3g}, "
        f"the {OOD_QUANTILE:.0%} quantile of {n_val} validation images, will be flagged")))
    if small:
        logger.warning(console_line("warning", f"out-of-distribution reference: site(s) {', '.join(small)} have fewer "
                                               f"than {SMALL_SITE_IMAGES} training images; their sums are pooled, but "
                                               "a covariance from few images is unstable"))
    if n_val < 100:
        logger.warning(console_line("warning", f"out-of-distribution threshold set on only {n_val} validation images: "
                                               f"its {OOD_QUANTILE:.0%} quantile is imprecise"))
    return ref.to_card()


def card_summary(section: dict[str, Any]) -> dict[str, Any]:
    """A card section without its bulky arrays (for summary.json)."""
    return {k: v for k, v in section.items() if k not in ("mean", "cov", "intensity-histogram")}
