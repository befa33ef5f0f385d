"""After the last round: federated calibration and the out-of-distribution reference (Flower glue).

Two phases ask the training sites for aggregates of the final global model's
outputs on their own images, through the same gate as every round (identity,
:mod:`shared.validation`, ``min-sites`` valid replies), and pool them:

* :func:`calibrate` (classification tasks; run config ``calibrate``): a
  temperature fitted on the pooled validation NLL in three messages (NLL sums
  on a coarse grid plus the counts at ``T = 1``, NLL sums on a fine grid, the
  counts at the chosen ``T``); see :mod:`shared.metrics.calibration`;
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
    T_MAX,
    T_MIN,
    CalibrationFit,
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


def _both(*checks: Any) -> Any:
    """A check giving, per reply, the first rejecting verdict of ``checks`` (or the last accepting one)."""
    def check(keys: list[str], replies: list[Any]) -> list[Any]:
        results = [c(keys, replies) for c in checks]
        return [next((v for v in vs if not v.accepted), vs[-1]) for vs in zip(*results)]
    return check


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def calibrate(loop: RoundLoop, arrays: ArrayRecord, task: TaskSpec, threshold_uncalibrated: float | None
              ) -> dict[str, Any]:
    """Fit the temperature on the training sites' validation images; returns the card's ``calibration`` section."""
    if task.kind != CLASSIFICATION:
        return not_fitted(f"{task.kind} task: temperature scaling applies to classifiers (a segmentation "
                          "model's per-pixel probabilities are used as they are)")
    screen, what = loop.gate.screen, "calibration"
    nodes = loop.training_nodes()
    if len(nodes) < loop.gate.min_sites:
        return _calibration_refused(f"only {len(nodes)} training site(s) connected (min-sites {loop.gate.min_sites})")
    grid1 = first_grid()
    first = loop.ask(protocol.CALIBRATE_MESSAGE, nodes, arrays,
                     {protocol.CALIBRATION_TEMPERATURES: grid1.tolist(), protocol.CALIBRATION_SCORE_AT: 1.0},
                     _both(lambda k, r: screen.calibration(k, r, len(grid1)), screen.evaluate))
    _log_failures(what, first)
    if first.refusal:
        return _calibration_refused(first.refusal)
    sizes = {site: int(_metrics(m)[protocol.NUM_EXAMPLES]) for site, m in first.accepted}
    n, pooled = pool_nll_sums([(sizes[s], _metrics(m)[protocol.NLL_SUMS]) for s, m in first.accepted], len(grid1))
    before = _merged(task, [m for _, m in first.accepted])
    nll_before = float(pooled[int(np.argmin(np.abs(grid1 - 1.0)))] / n)

    grid2 = refine_grid(grid1, pooled)
    by_site = {loop.gate.directory.site_of(node): node for node in nodes}
    nodes2 = [by_site[s] for s in sizes if s in by_site]
    second = loop.ask(protocol.CALIBRATE_MESSAGE, nodes2, arrays, {protocol.CALIBRATION_TEMPERATURES: grid2.tolist()},
                      lambda k, r: _same_size(screen.calibration(k, r, len(grid2)), k, r, sizes))
    _log_failures(what, second)
    if second.refusal:
        return _calibration_refused(second.refusal)
    n2, pooled2 = pool_nll_sums([(sizes[s], _metrics(m)[protocol.NLL_SUMS]) for s, m in second.accepted], len(grid2))
    best = int(np.argmin(pooled2))
    temperature = float(grid2[best])

    nodes3 = [by_site[s] for s, _ in second.accepted]
    third = loop.ask(protocol.CALIBRATE_MESSAGE, nodes3, arrays, {protocol.CALIBRATION_SCORE_AT: temperature},
                     lambda k, r: _same_size(screen.evaluate(k, r), k, r, sizes))
    _log_failures(what, third)
    if third.refusal:
        return _calibration_refused(third.refusal)
    after = _merged(task, [m for _, m in third.accepted])
    n3 = after.num_examples
    nll_after = sum(float(_metrics(m)[protocol.EVAL_LOSS]) * sizes[s] for s, m in third.accepted) / n3
    rule = task.threshold_rule
    threshold = after.operating_threshold(rule)
    positive = rule.positive_class
    fit = CalibrationFit(
        temperature=temperature, nll_before=nll_before, nll_after=nll_after,
        ece_before=float(before.report(None, positive)["ece"]), ece_after=float(after.report(None, positive)["ece"]),
        threshold=None if threshold is None or math.isnan(threshold) else float(threshold),
        threshold_uncalibrated=threshold_uncalibrated, num_examples=n3,
        sites=tuple(s for s, _ in third.accepted),
        grid=(tuple(float(t) for t in grid1), tuple(float(t) for t in grid2)),
        at_edge=temperature <= T_MIN * (1 + 1e-9) or temperature >= T_MAX * (1 - 1e-9),
        extra={"auroc-after": after.report(None, positive).get("auroc"), "num-examples-first": n,
               "num-examples-fine": n2},
    )
    thr = ("" if fit.threshold is None
           else f"; operating threshold {fmt_metric(fit.threshold)} on calibrated probabilities")
    logger.info(console_line("summary", (
        f"calibration: temperature {temperature:.3g} fitted on {n3} validation images of {len(fit.sites)} sites "
        f"(NLL {fmt_metric(nll_before)} -> {fmt_metric(nll_after)}, ECE {fmt_metric(fit.ece_before)} -> "
        f"{fmt_metric(fit.ece_after)}){thr}")))
    if fit.at_edge:
        logger.warning(console_line("warning", f"calibration: the best temperature lies at the end of the search "
                                               f"range [{T_MIN:g}, {T_MAX:g}]; the model is far from calibrated"))
    return fit.to_card()


def _merged(task: TaskSpec, replies: list[Any]) -> ClassificationCounts:
    counts = [task.view.counts_from_flat(_metrics(m)) for m in replies]
    total = counts[0]
    for c in counts[1:]:
        total = total.merge(c)  # type: ignore[arg-type]
    return total  # type: ignore[return-value]


def _same_size(verdicts: list[Any], keys: list[str], replies: list[Any], sizes: dict[str, int]) -> list[Any]:
    """A site's later calibration replies must count as many validation images as its first."""
    from shared.validation import Reason, Verdict

    out = []
    for v, key, reply in zip(verdicts, keys, replies):
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
