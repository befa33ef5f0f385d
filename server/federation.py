"""The server side of one federated run (called by the ServerApp)."""

from __future__ import annotations

import logging
import platform

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.central_dp import central_dp_summary
from server.recorder import METRICS_RECORD, FederationStopped, RecordingGrid, RoundRecorder
from server.strategies import build_strategy
from shared.config import PATH_KEYS, RunConfig
from shared.site_data import resolve_augment, resolve_preprocess
from shared.metrics.federated import SiteEvaluation, ThresholdRule, pool_evaluations, pool_training
from shared.models.run import build_for_run
from shared.privacy.report import privacy_statement
from shared.results import ResultsWriter, new_run_dir
from shared.tasks import get_task

logger = logging.getLogger(__name__)


def _metric_dicts(records: list[RecordDict]) -> list[dict]:
    return [dict(r.metric_records[METRICS_RECORD]) for r in records]


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted training loss and totals (Flower ``train_metrics_aggr_fn``)."""
    sites = {str(i): m for i, m in enumerate(_metric_dicts(records))}
    return MetricRecord(pool_training(sites))


def make_evaluate_aggregator(rule: ThresholdRule):  # noqa: ANN201
    """An ``evaluate_metrics_aggr_fn`` that sums the sites' counts (never averages ratios)."""

    def aggregate(records: list[RecordDict], weight_key: str) -> MetricRecord:
        reports = [SiteEvaluation.from_flat(str(i), m) for i, m in enumerate(_metric_dicts(records))]
        return MetricRecord(pool_evaluations(reports, rule).pooled)

    return aggregate


def run_federation(grid: Grid, cfg: RunConfig) -> ResultsWriter:
    """Run ``cfg.num_server_rounds`` rounds and write the results folder."""
    import flwr

    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    model, dp_changes = build_for_run(cfg, task.in_channels, task.num_classes, cfg.init_weights or None)
    if cfg.dp.enabled:
        logger.info("medfed: DP-SGD on at every site (%s accountant); model made Opacus-compatible: %s",
                    cfg.dp.accountant, "; ".join(dp_changes) or "no changes needed")
    run_dir = new_run_dir(cfg.results_dir, cfg.run_name, tag=f"{cfg.task}-{cfg.model}-{cfg.strategy.name}")
    writer = ResultsWriter(run_dir)
    pipeline = {
        "preprocess": resolve_preprocess(cfg, task).to_dict(),
        "augment": (aug.to_dict() if (aug := resolve_augment(cfg, task)) is not None else None),
        "normalize": cfg.data.normalize,
    }
    writer.write_config(
        cfg.to_flat(),
        {"versions": {"torch": torch.__version__, "flwr": flwr.__version__, "python": platform.python_version()},
         "class-names": list(task.class_names), "positive-class": task.positive_class, **pipeline},
    )
    logger.info("medfed: %s with %s, %s, %d rounds; results -> %s",
                cfg.task, cfg.model, cfg.strategy.name, cfg.num_server_rounds, run_dir)

    rule = ThresholdRule(task.threshold_method, task.target_sensitivity, task.positive_class)
    recorder = RoundRecorder(writer, cfg.num_server_rounds, rule, min_sites=cfg.strategy.min_sites)
    strategy = build_strategy(
        cfg.strategy, cfg.train,
        train_metrics_aggr_fn=aggregate_train_metrics,
        evaluate_metrics_aggr_fn=make_evaluate_aggregator(rule),
        central_dp=cfg.central_dp, on_round=recorder.note,
    )
    recording = RecordingGrid(grid, recorder)
    stopped = ""
    try:
        result = strategy.start(
            grid=recording,  # type: ignore[arg-type]
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
        )
        final = result.arrays if len(result.arrays) else ArrayRecord(model.state_dict())
    except FederationStopped as exc:  # e.g. privacy budgets spent: keep the last global model
        stopped = str(exc)
        logger.warning("medfed: run stopped early: %s", stopped)
        final = recording.last_train_arrays or ArrayRecord(model.state_dict())
    writer.write_model(
        final.to_torch_state_dict(),
        {"task": cfg.task, "model": cfg.model, "image-size": cfg.data.image_size,
         "in-channels": task.in_channels, "num-classes": task.num_classes,
         "class-names": list(task.class_names), "run-config": _without_paths(cfg.to_flat()), **pipeline,
         "kind": task.kind, "threshold": recorder.last_threshold(),
         "threshold-rule": {"method": rule.method, "target-sensitivity": rule.target_sensitivity}},
    )
    extra: dict = {"results-dir": str(run_dir), **central_dp_summary(strategy)}
    if cfg.dp.enabled:
        extra["privacy"] = privacy_statement(recorder.privacy, recorder.refusals, cfg.dp.accountant)
    if stopped:
        extra["stopped-early"] = stopped
    summary = writer.write_summary(extra)
    fin = summary.get("final", {})
    headline = (f"Dice {_fmt(fin.get('dice'))}, IoU {_fmt(fin.get('iou'))}" if "dice" in fin
                else f"{'macro ' if 'auroc-0' in fin else ''}AUROC {_fmt(fin.get('auroc'))}, "
                     f"accuracy {_fmt(fin.get('accuracy'))}")
    logger.info("medfed: finished %d rounds in %.1f s; final pooled validation %s; results in %s",
                summary["rounds"], summary["wall-seconds"], headline, run_dir)
    return writer


def _without_paths(flat: dict) -> dict:
    """The run config minus local paths: a model file is shared beyond this server."""
    return {k: v for k, v in flat.items() if k not in PATH_KEYS}


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) and v == v else "n/a"
