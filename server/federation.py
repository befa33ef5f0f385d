"""The server side of one federated run (called by the ServerApp)."""

from __future__ import annotations

import logging
import platform

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.central_dp import central_dp_summary
from server.recorder import FederationStopped, RecordingGrid, RoundRecorder
from server.strategies import build_strategy
from shared import protocol
from shared.config import RunConfig
from shared.console import console_line
from shared.metrics.federated import SiteEvaluation, pool_evaluations, pool_training
from shared.privacy.report import privacy_statement
from shared.results import RunFolder
from shared.tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)


def _metric_dicts(records: list[RecordDict]) -> list[dict]:
    return [dict(r.metric_records[protocol.METRICS]) for r in records]


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted training loss and totals (Flower ``train_metrics_aggr_fn``)."""
    sites = {str(i): m for i, m in enumerate(_metric_dicts(records))}
    return MetricRecord(pool_training(sites))


def make_evaluate_aggregator(task: TaskSpec):  # noqa: ANN201
    """An ``evaluate_metrics_aggr_fn`` that sums the sites' counts (never averages ratios)."""

    def aggregate(records: list[RecordDict], weight_key: str) -> MetricRecord:
        reports = [SiteEvaluation.from_flat(str(i), m, task.view.counts_from_flat)
                   for i, m in enumerate(_metric_dicts(records))]
        return MetricRecord(pool_evaluations(reports, task.threshold_rule).pooled)

    return aggregate


def run_federation(grid: Grid, cfg: RunConfig) -> RunFolder:
    """Run ``cfg.num_server_rounds`` rounds and write the results folder."""
    import flwr

    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    model, dp_changes = task.build_model(cfg, cfg.init_weights or None)
    folder = RunFolder.create(cfg.results_dir, cfg.run_name, tag=f"{cfg.task}-{cfg.model}-{cfg.strategy.name}",
                              columns=task.view.columns)
    folder.write_config(
        cfg.to_flat(),
        {"versions": {"torch": torch.__version__, "flwr": flwr.__version__, "python": platform.python_version()},
         "class-names": list(task.class_names), "positive-class": task.positive_class, **task.pipeline(cfg)},
    )
    logger.info(console_line("header", f"{cfg.task} with {cfg.model} at {cfg.data.image_size} px, "
                                       f"{cfg.strategy.name}, {cfg.num_server_rounds} rounds; results -> {folder.path}"))
    if cfg.dp.enabled:
        logger.info(console_line("header", f"DP-SGD at every site ({cfg.dp.accountant} accountant); model made "
                                           f"Opacus-compatible: {'; '.join(dp_changes) or 'no changes needed'}"))

    recorder = RoundRecorder(folder, cfg.num_server_rounds, task, min_sites=cfg.strategy.min_sites, cfg=cfg)
    strategy = build_strategy(
        cfg.strategy, cfg.train,
        train_metrics_aggr_fn=aggregate_train_metrics,
        evaluate_metrics_aggr_fn=make_evaluate_aggregator(task),
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
        logger.warning(console_line("warning", f"run stopped early: {stopped}"))
        final = recording.last_train_arrays or ArrayRecord(model.state_dict())
    folder.write_model(final.to_torch_state_dict(), task.model_card(cfg, threshold=recorder.last_threshold()))
    extra: dict = {"results-dir": str(folder.path), "task": task.name, "view": task.view.name,
                   "primary-metric": task.view.primary, **central_dp_summary(strategy)}
    if cfg.dp.enabled:
        extra["privacy"] = privacy_statement(recorder.privacy, recorder.refusals, cfg.dp.accountant)
    if stopped:
        extra["stopped-early"] = stopped
    headline = task.view.headline(folder.final_evaluation())
    summary = folder.write_summary({**extra, "headline": f"final pooled validation {headline}"})
    logger.info(console_line("summary", f"finished {summary['rounds']} rounds in {summary['wall-seconds']:.0f} s; "
                                        f"final pooled validation {headline}"))
    return folder
