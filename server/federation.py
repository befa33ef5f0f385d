"""The server side of one federated run (called by the ServerApp)."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from server.central_dp import central_dp_summary
from server.checkpoint import restore_rng, restore_strategy, rng_state, strategy_state
from server.gate import ReplyGate, SiteDirectory
from server.post_training import calibrate, card_summary, ood_reference
from server.recorder import FederationStopped, RoundRecorder
from server.rounds import RoundLoop
from server.strategies import build_strategy
from shared import protocol
from shared.config import ConfigError, RunConfig
from shared.console import console_line
from shared.metrics.federated import RoundEvaluation, SiteEvaluation, pool_evaluations, pool_training
from shared.privacy.report import privacy_statement
from shared.results import RunFolder, RunFolderError
from shared.tasks import TaskSpec, get_task
from shared.tracking import make_tracker
from shared.validation import ReplyScreen, ValidationPolicy, model_spec

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


def _to_numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy()) for k, v in rec.items()}


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in arrays.items()})


def _medfed_version() -> str:
    """medfed's installed version (``unknown`` when run from a checkout that was never installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("medfed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _open_folder(cfg: RunConfig, task: TaskSpec) -> tuple[RunFolder, bool]:
    """A new results folder, or the one ``resume-from`` names (then True)."""
    if cfg.resume_from:
        try:
            folder = RunFolder.open(Path(cfg.resume_from))
        except RunFolderError as exc:
            raise ConfigError(f"run config 'resume-from': {exc}") from None
        folder.columns, folder.primary = task.view.columns, task.view.primary
        recorded, now = folder.run_config(), cfg.to_flat()
        allowed = ("num-server-rounds", "round-timeout", "resume-from", "results-dir", "run-name")
        changed = sorted(k for k in now if k not in allowed and k in recorded and recorded[k] != now[k])
        if changed:
            raise ConfigError(f"run config 'resume-from': a resumed run keeps its own settings; only "
                              f"num-server-rounds and round-timeout may change, got other values for "
                              f"{', '.join(changed)}")
        return folder, True
    folder = RunFolder.create(cfg.results_dir, cfg.run_name, tag=f"{cfg.task}-{cfg.model}-{cfg.strategy.name}",
                              columns=task.view.columns, primary=task.view.primary)
    return folder, False


def _test_fn(cfg: RunConfig, task: TaskSpec):  # noqa: ANN202
    """The server's evaluation of the global model on ``test-path`` (None without it)."""
    if not cfg.test_path:
        return None
    from shared.site_data import load_test_data

    test = load_test_data(cfg, task)
    logger.info(console_line("header", f"test set: {test.size} images from test-path (never partitioned, never "
                                       "trained on), scored each round at the threshold chosen on validation"))
    objective = task.objective()

    def evaluate(server_round: int, arrays: ArrayRecord, threshold: float | None) -> RoundEvaluation:
        model, _ = task.build_model(cfg)
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        res = objective.evaluate(model, test.images, test.targets,
                                 batch_size=objective.eval_batch_size(cfg.train.batch_size),
                                 precision=cfg.train.precision, normalize=cfg.data.normalize, spacings=test.spacings)
        report = SiteEvaluation("test", res.counts, res.loss)
        return pool_evaluations([report], task.threshold_rule, threshold=threshold)

    return evaluate


def _post_training(loop: RoundLoop, final: ArrayRecord, cfg: RunConfig, task: TaskSpec, model: torch.nn.Module,
                   threshold: float | None) -> dict[str, dict[str, Any]]:
    """The calibration and out-of-distribution sections of the model card (:mod:`server.post_training`)."""
    def guarded(name: str, phase: Any) -> dict[str, Any]:
        # never lose the trained model to a failure here: the model is saved without this section
        try:
            return phase()
        except Exception as exc:  # noqa: BLE001 - logged in full, recorded by type
            logger.exception("post-training phase %s failed", name)
            logger.warning(console_line("warning", f"{name} failed ({type(exc).__name__}); the model is saved "
                                                   "without it (details in the server log)"))
            return {"status": "failed", "reason": type(exc).__name__}

    def ood() -> dict[str, Any]:
        model.load_state_dict(final.to_torch_state_dict(), strict=True)
        return ood_reference(loop, final, cfg, task, model)

    off = {"status": "off", "reason": "turned off in the run config"}
    return {
        "calibration": guarded("calibration", lambda: calibrate(loop, final, task, threshold, cfg.calibration))
        if cfg.calibration != "none" else dict(off),
        "ood": guarded("out-of-distribution statistics", ood) if cfg.ood_stats else dict(off),
    }


def run_federation(grid: Any, cfg: RunConfig) -> RunFolder:
    """Run (or resume) ``cfg.num_server_rounds`` rounds and write the results folder."""
    import flwr

    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    model, dp_changes = task.build_model(cfg, cfg.init_weights or None)
    initial = ArrayRecord(model.state_dict())
    folder, resuming = _open_folder(cfg, task)
    if not resuming:
        folder.write_config(
            cfg.to_flat(),
            {"versions": {"medfed": _medfed_version(), "torch": torch.__version__, "flwr": flwr.__version__,
                          "python": platform.python_version()},
             "class-names": list(task.class_names), "positive-class": task.positive_class, **task.pipeline(cfg)},
        )
    # for the server's log; medfed simulate prints its own header from the same config
    logger.info("medfed: %s with %s at %d px, %s, %d rounds; results -> %s", cfg.task, cfg.model,
                cfg.data.image_size, cfg.strategy.name, cfg.num_server_rounds, folder.path)
    if cfg.dp.enabled:
        logger.info(console_line("header", f"DP-SGD at every site ({cfg.dp.accountant} accountant); model made "
                                           f"Opacus-compatible: {'; '.join(dp_changes) or 'no changes needed'}"))

    tracker = make_tracker(cfg.tracking, mlflow_store=folder.mlflow_store, tensorboard_dir=folder.tensorboard_dir,
                           run_name=folder.path.name)
    recorder = RoundRecorder(folder, cfg.num_server_rounds, task, min_sites=cfg.strategy.min_sites, cfg=cfg,
                             tracker=tracker)
    strategy = build_strategy(
        cfg.strategy, cfg.train,
        train_metrics_aggr_fn=aggregate_train_metrics,
        evaluate_metrics_aggr_fn=make_evaluate_aggregator(task),
        central_dp=cfg.central_dp, on_round=recorder.note,
    )
    spec = model_spec(_to_numpy(initial))
    if cfg.strategy.name == "fedbn":
        from shared.fedbn import norm_state_keys

        norm = norm_state_keys(model)
        spec = {k: v for k, v in spec.items() if k not in norm}  # FedBN sites never send normalisation layers
    gate = ReplyGate(SiteDirectory(cfg.site_registry), ReplyScreen(spec, ValidationPolicy.for_run(cfg)),
                     cfg.strategy.min_sites)

    arrays, start = initial, 1
    if resuming:
        done, saved, tensors, state = folder.read_checkpoint()
        arrays = _to_record(saved)
        restore_strategy(strategy, tensors, state.get("strategy", {}))
        restore_rng(state.get("rng", {}))
        recorder.restore(state.get("recorder", {}), folder.read_rounds()[:done])
        start = done + 1
        logger.info(console_line("header", f"resuming after round {done} of {cfg.num_server_rounds} "
                                           f"(checkpoint in {folder.path})"))

    def checkpoint(server_round: int, current: ArrayRecord) -> None:
        tensors, plain = strategy_state(strategy)
        folder.write_checkpoint(server_round, _to_numpy(current), tensors,
                                {"strategy": plain, "rng": rng_state(), "recorder": recorder.state()})

    loop = RoundLoop(grid, strategy, gate, recorder, cfg.num_server_rounds, cfg.round_timeout,
                     run_key=folder.path.name, checkpoint=checkpoint, test_fn=_test_fn(cfg, task))
    tracker.start(cfg.to_flat(), resumed=resuming, first_round=start)
    stopped = ""
    try:
        final = loop.run(arrays, start)
    except FederationStopped as exc:  # e.g. privacy budgets spent: keep the last global model
        stopped = str(exc)
        logger.warning(console_line("warning", f"run stopped early: {stopped}"))
        final = _to_record(folder.read_checkpoint()[1]) if (folder.path / RunFolder.CHECKPOINT).is_file() else arrays
    except BaseException:
        tracker.finish(None, status="FAILED")
        raise
    card_extra = _post_training(loop, final, cfg, task, model, recorder.last_threshold())
    card = task.model_card(cfg, threshold=recorder.last_threshold(), extra=card_extra)
    folder.write_model(final.to_torch_state_dict(), card)
    tracker.finish(card.to_meta())
    extra: dict = {"results-dir": str(folder.path), "task": task.name, "view": task.view.name,
                   "primary-metric": task.view.primary, **central_dp_summary(strategy),
                   **{k: card_summary(v) for k, v in card_extra.items()}}
    if cfg.dp.enabled:
        extra["privacy"] = privacy_statement(recorder.privacy, recorder.refusals, cfg.dp.accountant)
    if recorder.policy_refusals:
        extra["policy-refusals"] = recorder.policy_refusals
    if recorder.fairness:
        extra["fairness"] = recorder.fairness
    last = folder.rounds[-1] if folder.rounds else {}
    for key in ("holdout", "holdout-sites", "test"):
        if last.get(key):
            extra[f"final-{key}"] = last[key]
    if stopped:
        extra["stopped-early"] = stopped
    headline = task.view.headline(folder.final_evaluation())
    if last.get("test"):
        headline += f"; test {task.view.headline(last['test'])}"
    if last.get("holdout"):
        headline += f"; holdout sites {task.view.headline(last['holdout'])}"
    summary = folder.write_summary({**extra, "headline": f"final pooled validation {headline}"})
    _write_report(folder)
    rounds = summary["rounds"]
    logger.info(console_line("summary", f"finished {rounds} round{'' if rounds == 1 else 's'} in "
                                        f"{summary['wall-seconds']:.0f} s; final pooled validation {headline}"))
    return folder


def _write_report(folder: RunFolder) -> None:
    """``report.html`` and ``model-card.json`` of the finished run; a failure here never fails the run."""
    try:
        from shared.report import write_run_report

        write_run_report(folder.path)
    except Exception as exc:  # noqa: BLE001 - the results are written; the report is a reading aid
        logger.warning(console_line("warning", f"the run report could not be written ({type(exc).__name__}: "
                                               f"{str(exc)[:200]}); 'medfed report {folder.path}' tries again"))
