"""Local-only and pooled baselines of a simulation, from the same run config, in-process (no Flower).

What does joining the federation buy a hospital? Two reference points, each
built from exactly the data the federated run would give its sites
(:func:`shared.site_data.load_site_data` with the same partition, split,
acquisition shift and ``test-path`` exclusion), the same initial weights
(seeded as the server seeds them) and the same local training loop
(:func:`shared.training.train_local` with the task's objective):

``local``
    Every training site trains alone: ``num-server-rounds`` rounds of
    ``local-epochs`` epochs on its own training split, each round a fresh
    optimiser and the seed the site would use in that round of the
    federation (:func:`shared.training.site_round_seed`), i.e. a federation
    of one. After each round its model is scored on its own validation
    split, with the operating threshold chosen there; the test set
    (``test-path``) and the holdout sites (pooled) are scored by each site's
    model at that site's threshold. The pooled validation figure of a round
    sums the counts of every site's own model on its own patients (what the
    hospitals get if each uses its own model). No model file is written:
    ``summary.json`` carries ``final-per-site``, ``final-test-per-site`` and
    ``final-holdout-per-model``.
``pooled``
    One model trained on the union of the training sites' training splits
    (every image once per epoch), the same number of epochs in total: the
    centralised upper reference a federation is usually compared with.
    After each round it is scored as the server scores the global model:
    every site's validation split, pooled counts choose the threshold,
    per-site figures, fairness across sites and subgroups, the test set and
    the holdout sites at that threshold. ``model.pt`` is written.

The strategy does not apply (no aggregation), nor does FedProx's proximal
term; DP-SGD, central DP and ``resume-from`` are refused (a baseline of a DP
run would need its own privacy accounting). Both write a normal results
folder through :class:`shared.results.RunFolder` (``config.json`` with a
``baseline`` field, ``metrics.json``, ``rounds.csv``, ``sites.csv``,
``summary.json``, ``simulation.json``), and announce progress as
:mod:`shared.console` lines (a site line per site, a round line per round,
a summary), shown by ``medfed simulate --baseline`` like a simulation's;
everything the libraries log during the run goes to ``baseline.log`` in the
results folder. Deterministic for a seed.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import ConfigError, ConfigValue, RunConfig, SiteConfig, parse_node_config
from shared.console import console_line
from shared.formatting import fmt_metric
from shared.metrics.benefit import BASELINE_FIELD

logger = logging.getLogger(__name__)

__all__ = ["BASELINES", "BaselinePlan", "BaselineResult", "plan_baseline", "pooled_training_set", "run_baseline"]

BASELINES = ("local", "pooled")
POOLED_SEED_ID = "pooled"
"""Site id in the per-round seed of the pooled model (:func:`shared.training.site_round_seed`)."""

LineSink = Callable[[str], None]


@dataclass(frozen=True)
class BaselinePlan:
    """A validated baseline run: its kind, config, results folder and number of simulated sites."""

    kind: str
    config: RunConfig
    run_dir: Path
    sites: int


@dataclass(frozen=True)
class BaselineResult:
    """Where a finished baseline wrote its results."""

    run_dir: Path
    seconds: float


def plan_baseline(overrides: Mapping[str, ConfigValue] | None, kind: str, *, sites: int = 3,
                  cwd: Path | None = None) -> BaselinePlan:
    """Validate a baseline exactly as :func:`simulation.runner.plan_simulation` validates a simulation.

    Raises
    ------
    ConfigError
        For an unknown ``kind``, a bad run config, or settings a baseline
        cannot reproduce (DP-SGD, central DP, ``resume-from``).
    SimulationPlanError
        For a plan that cannot run (sites, an existing results folder ...).
    """
    from simulation.runner import plan_simulation

    if kind not in BASELINES:
        raise ConfigError(f"--baseline: expected one of {', '.join(BASELINES)}, got {kind!r}.")
    values = dict(overrides or {})
    if values.get("resume-from"):
        raise ConfigError("--baseline cannot resume a run (a baseline runs in one go): drop --resume/resume-from.")
    plan = plan_simulation(values, sites=sites, cwd=cwd)
    cfg = plan.config
    if cfg.dp.enabled:
        raise ConfigError("--baseline trains without DP-SGD: compare against a federated run with dp.enabled=false, "
                          "or drop dp.enabled.")
    if cfg.central_dp.mode != "none":
        raise ConfigError("--baseline has no aggregation, so central DP does not apply: set central-dp.mode='none'.")
    if cfg.sim_explain_dir:
        raise ConfigError("--baseline writes no Grad-CAM overlays: drop --explain-dir / sim-explain-dir.")
    return BaselinePlan(kind=kind, config=cfg, run_dir=plan.run_dir, sites=plan.sites)


# ---------------------------------------------------------------------------
# Sites and their data
# ---------------------------------------------------------------------------


@dataclass
class _Site:
    """One simulated site's data as tensors, and its role."""

    config: SiteConfig
    holdout: bool
    data: Any  # SiteData
    train_x: Any
    train_t: Any
    val_x: Any
    val_t: Any

    @property
    def id(self) -> str:
        return self.config.site_id


def _targets(t: Any) -> Any:
    import torch

    return torch.from_numpy(t).long() if t.ndim == 1 else torch.from_numpy(t)


def _load_sites(cfg: RunConfig, n: int, task: Any) -> list[_Site]:
    from shared.site_data import load_site_data
    from shared.site_policy import policy_for
    from shared.training import images_to_tensor

    out = []
    for p in range(n):
        site = parse_node_config({"partition-id": p, "num-partitions": n})
        data = load_site_data(cfg, site, task)
        out.append(_Site(site, policy_for(site, cfg).holdout, data,
                         images_to_tensor(data.train_images), _targets(data.train_targets),
                         images_to_tensor(data.val_images), _targets(data.val_targets)))
    return out


def pooled_training_set(sites: list[Any]) -> tuple[Any, Any]:
    """The union of the training sites' training splits (each image once, site order), holdout sites left out."""
    import torch

    train = [s for s in sites if not s.holdout]
    return torch.cat([s.train_x for s in train]), torch.cat([s.train_t for s in train])


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


class _Run:
    """Shared state of one baseline run: config, task, data, results folder, progress lines."""

    def __init__(self, plan: BaselinePlan, on_line: LineSink | None) -> None:
        from shared.results import RunFolder
        from shared.tasks import get_task

        self.plan, self.cfg, self.on_line = plan, plan.config, on_line
        self.task = get_task(self.cfg.task)
        self.view, self.rule = self.task.view, self.task.threshold_rule
        self.primary = self.view.primary
        self.objective = self.task.objective()
        self.t0 = time.time()
        cfg = self.cfg
        self.folder = RunFolder.create(cfg.results_dir, cfg.run_name, columns=self.view.columns, primary=self.primary)
        self.log_handler = logging.FileHandler(self.folder.path / RunFolder.BASELINE_LOG, encoding="utf-8")
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self.log_handler)

    def load(self) -> None:
        """Write config.json, load every site's data and the test set, build the initial model."""
        import torch

        from shared.site_data import load_test_data, tiny_site_message

        cfg, plan = self.cfg, self.plan
        self.folder.write_config(cfg.to_flat(), {
            BASELINE_FIELD: plan.kind,
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "class-names": list(self.task.class_names), "positive-class": self.task.positive_class,
            **self.task.pipeline(cfg)})
        self.sites = _load_sites(cfg, plan.sites, self.task)
        for s in self.sites:
            what = (f"holdout site, {len(s.train_x) + len(s.val_x)} images to test on (never trains)" if s.holdout
                    else f"{len(s.train_x)} training and {len(s.val_x)} validation images")
            self.say("site", f"{s.id}: {what}")
            tiny = None if s.holdout else tiny_site_message(s.id, len(s.train_x), len(s.val_x), cfg)
            if tiny is not None:
                self.say("warning", tiny)
        if not any(not s.holdout for s in self.sites):
            raise ConfigError(f"holdout-sites={cfg.holdout_sites} leaves no training site among {plan.sites}.")
        self.test = load_test_data(cfg, self.task) if cfg.test_path else None
        if self.test is not None:
            self.say("header", f"test set: {self.test.size} images from test-path (never trained on), scored each "
                               "round at the threshold chosen on validation")
        torch.manual_seed(cfg.seed)  # the server's initial global model, exactly
        model, _ = self.task.build_model(cfg, cfg.init_weights or None)
        self.initial = copy.deepcopy(model.state_dict())

    @property
    def training_sites(self) -> list[_Site]:
        return [s for s in self.sites if not s.holdout]

    @property
    def holdout_sites(self) -> list[_Site]:
        return [s for s in self.sites if s.holdout]

    def say(self, kind: str, text: str, **round_info: int) -> None:
        line = console_line(kind, text, **round_info)
        logger.info("%s", line)
        if self.on_line is not None:
            self.on_line(line + "\n")

    def new_model(self, state: Mapping[str, Any]) -> Any:
        model, _ = self.task.build_model(self.cfg)
        model.load_state_dict(state, strict=True)
        return model

    def train(self, state: Mapping[str, Any], x: Any, y: Any, seed: int) -> tuple[dict[str, Any], dict[str, float]]:
        """One round of ``local-epochs`` epochs from ``state`` (a fresh model and optimiser, as a site does)."""
        import torch

        from shared import protocol

        model = self.new_model(state)
        cfg = self.cfg
        res = _train_local()(model, x, y, cfg.train, self.objective, seed=seed, augment=self.task.augment_for(cfg),
                             normalize=cfg.data.normalize, proximal_mu=0.0)
        model = model.to("cpu").to(memory_format=torch.contiguous_format)
        metrics = protocol.train_metrics(num_examples=res.num_examples, loss=res.loss, seconds=res.seconds,
                                         images_per_second=res.images_per_second, load_seconds=0.0,
                                         torch_threads=torch.get_num_threads())
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, metrics

    def evaluate(self, model: Any, images: Any, targets: Any, spacings: Any = None, keep: bool = False) -> Any:
        cfg, objective = self.cfg, self.objective
        return objective.evaluate(model, images, targets, batch_size=objective.eval_batch_size(cfg.train.batch_size),
                                  precision=cfg.train.precision, normalize=cfg.data.normalize, spacings=spacings,
                                  keep_predictions=keep)

    def subgroup_flat(self, site: _Site, predictions: Any) -> dict[str, Any]:
        """A site's subgroup counts of its validation split, as the site computes them (small cells suppressed)."""
        from shared.metrics.subgroups import SubgroupSpec

        spec = SubgroupSpec.for_site(self.cfg.fairness, site.config.min_cell_floor)
        if not spec.columns or site.data.val_attributes is None or predictions is None:
            return {}
        sub = self.objective.subgroup_counts(predictions, site.val_t.numpy(), site.data.val_attributes, spec,
                                             spacings=site.data.val_spacings)
        return sub.to_flat()

    def holdout_reports(self, model: Any) -> list[Any]:
        """Every holdout site's evaluation of ``model`` (all its images, as a holdout site scores them)."""
        import torch

        from shared.metrics.federated import SiteEvaluation

        out = []
        for s in self.holdout_sites:
            res = self.evaluate(model, torch.cat([s.train_x, s.val_x]), torch.cat([s.train_t, s.val_t]))
            out.append(SiteEvaluation(s.id, res.counts, res.loss))
        return out

    def test_metrics(self, model: Any, threshold: float | None) -> dict[str, Any] | None:
        """``model`` on the test set at ``threshold`` (None without ``test-path``)."""
        from shared.metrics.federated import SiteEvaluation, pool_evaluations

        if self.test is None:
            return None
        res = self.evaluate(model, self.test.images, self.test.targets, self.test.spacings)
        return pool_evaluations([SiteEvaluation("test", res.counts, res.loss)], self.rule, threshold=threshold).pooled

    def finish(self, record: dict[str, Any], num_rounds: int, line: str) -> None:
        record["elapsed-s"] = time.time() - self.t0
        self.folder.add_round(record)
        self.say("round", f"{line} | round {record['round-s']:.1f} s, elapsed {record['elapsed-s']:.1f} s",
                 round=record["round"], num_rounds=num_rounds)

    def summary(self, extra: dict[str, Any], headline: str) -> dict[str, Any]:
        summary = self.folder.write_summary({
            "results-dir": str(self.folder.path), "task": self.task.name, "view": self.view.name,
            "primary-metric": self.primary, BASELINE_FIELD: self.plan.kind, **extra, "headline": headline})
        self.folder.write_simulation(self.plan.sites, 1)
        self.say("summary", f"finished {summary['rounds']} rounds in {summary['wall-seconds']:.0f} s; {headline}")
        return summary


def _train_local() -> Callable[..., Any]:
    """:func:`shared.training.train_local` (looked up at call time: tests wrap it to watch what it is given)."""
    from shared import training

    return training.train_local


def _range(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    return f"{fmt_metric(min(finite))}-{fmt_metric(max(finite))}" if finite else fmt_metric(None)


def _run_local(run: _Run) -> None:
    from shared.metrics.fairness import fairness_summary
    from shared.metrics.federated import SiteEvaluation, pool_evaluations, pool_training
    from shared.training import site_round_seed

    cfg, label = run.cfg, run.view.primary_label
    rounds = cfg.num_server_rounds
    states = {s.id: run.initial for s in run.training_sites}
    last: dict[str, Any] = {}
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        record: dict[str, Any] = {"round": rnd, "train-sites": {}, "evaluate-sites": {}}
        reports, tests, holdouts = [], {}, {}
        for s in run.training_sites:
            states[s.id], metrics = run.train(states[s.id], s.train_x, s.train_t, site_round_seed(cfg.seed, rnd, s.id))
            record["train-sites"][s.id] = metrics
            model = run.new_model(states[s.id])
            res = run.evaluate(model, s.val_x, s.val_t, s.data.val_spacings)
            report = SiteEvaluation(s.id, res.counts, res.loss)
            reports.append(report)
            own = pool_evaluations([report], run.rule).pooled  # the site's own threshold, chosen on its validation
            own.pop("num-sites", None)
            record["evaluate-sites"][s.id] = own
            threshold = own.get("threshold")
            test = run.test_metrics(model, threshold)
            if test is not None:
                tests[s.id] = test
            if run.holdout_sites:
                holdouts[s.id] = pool_evaluations(run.holdout_reports(model), run.rule, threshold=threshold).pooled
        record["train"] = pool_training(record["train-sites"])
        record["evaluate"] = pool_evaluations(reports, run.rule).pooled
        record["fairness"] = fairness_summary(record["evaluate"], record["evaluate-sites"], None,
                                              metric=run.primary, positive_class=run.rule.positive_class)
        if tests:
            record["test-sites"] = tests
        if holdouts:
            record["holdout-per-model"] = holdouts
        record["round-s"] = time.perf_counter() - t0
        own_values = [float(m.get(run.primary, float("nan"))) for m in record["evaluate-sites"].values()]
        line = f"local-only: each site's own model: {label} {_range(own_values)}"
        if tests:
            line += f" | test {label} {_range([float(t.get(run.primary, float('nan'))) for t in tests.values()])}"
        if holdouts:
            line += f" | holdout {label} {_range([float(h.get(run.primary, float('nan'))) for h in holdouts.values()])}"
        run.finish(record, rounds, line + f" | train loss {fmt_metric(record['train'].get('train-loss'))}")
        last = record
    extra: dict[str, Any] = {"fairness": last.get("fairness", {})}
    if last.get("test-sites"):
        extra["final-test-per-site"] = last["test-sites"]
    if last.get("holdout-per-model"):
        extra["final-holdout-per-model"] = last["holdout-per-model"]
    own_values = [float(m.get(run.primary, float("nan"))) for m in last.get("evaluate-sites", {}).values()]
    headline = (f"local-only baseline: each site's own model on its own validation {label} {_range(own_values)}; "
                f"pooled over sites {run.view.headline(last.get('evaluate', {}))}")
    if last.get("test-sites"):
        tests = [float(t.get(run.primary, float("nan"))) for t in last["test-sites"].values()]
        headline += f"; test {label} {_range(tests)}"
    run.summary(extra, headline)


def _run_pooled(run: _Run) -> None:
    from shared.metrics.fairness import fairness_csv_rows, fairness_summary
    from shared.metrics.federated import SiteEvaluation, pool_evaluations, pool_training
    from shared.metrics.subgroups import merge_subgroup_reports
    from shared.training import site_round_seed

    cfg, label = run.cfg, run.view.primary_label
    rounds = cfg.num_server_rounds
    x, y = pooled_training_set(run.sites)
    state = run.initial
    last: dict[str, Any] = {}
    threshold = None
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        state, metrics = run.train(state, x, y, site_round_seed(cfg.seed, rnd, POOLED_SEED_ID))
        model = run.new_model(state)
        reports, flats = [], []
        for s in run.training_sites:
            res = run.evaluate(model, s.val_x, s.val_t, s.data.val_spacings, keep=True)
            reports.append(SiteEvaluation(s.id, res.counts, res.loss))
            flats.append(run.subgroup_flat(s, res.predictions))
        ev = pool_evaluations(reports, run.rule)  # threshold chosen on the pooled validation counts, as the server does
        threshold = ev.pooled.get("threshold")
        record: dict[str, Any] = {"round": rnd, "train": pool_training({POOLED_SEED_ID: metrics}),
                                  "evaluate": ev.pooled, "evaluate-sites": ev.per_site}
        record["fairness"] = fairness_summary(ev.pooled, ev.per_site, merge_subgroup_reports(flats),
                                              metric=run.primary, positive_class=run.rule.positive_class)
        if run.holdout_sites:
            hold = pool_evaluations(run.holdout_reports(model), run.rule, threshold=threshold)
            record["holdout"], record["holdout-sites"] = hold.pooled, hold.per_site
        test = run.test_metrics(model, threshold)
        if test is not None:
            record["test"] = test
        record["round-s"] = time.perf_counter() - t0
        worst = (record["fairness"].get("sites") or {}).get("worst")
        line = (f"pooled: train loss {fmt_metric(record['train'].get('train-loss'))} | "
                f"{run.view.round_scores(ev.pooled)} | worst site {label} {fmt_metric(worst)}")
        if test is not None:
            line += f" | test {label} {fmt_metric(test.get(run.primary))}"
        if run.holdout_sites:
            line += f" | holdout {label} {fmt_metric(record['holdout'].get(run.primary))}"
        run.finish(record, rounds, line)
        if record["fairness"].get("subgroups", {}).get("columns"):
            run.folder.write_fairness(fairness_csv_rows(record["fairness"]["subgroups"]))
        last = record
    run.folder.write_model(state, run.task.model_card(cfg, threshold=threshold, extra={BASELINE_FIELD: "pooled"}))
    extra: dict[str, Any] = {"fairness": last.get("fairness", {})}
    for key in ("holdout", "holdout-sites", "test"):
        if last.get(key):
            extra[f"final-{key}"] = last[key]
    headline = f"pooled baseline: pooled validation {run.view.headline(last.get('evaluate', {}))}"
    if last.get("test"):
        headline += f"; test {run.view.headline(last['test'])}"
    if last.get("holdout"):
        headline += f"; holdout sites {run.view.headline(last['holdout'])}"
    run.summary(extra, headline)


def run_baseline(plan: BaselinePlan, *, on_line: LineSink | None = None) -> BaselineResult:
    """Run a planned baseline in this process and write its results folder.

    Parameters
    ----------
    plan:
        From :func:`plan_baseline`.
    on_line:
        Receives every progress line (:mod:`shared.console` format, newline
        included), e.g. :meth:`simulation.display.RunDisplay.feed`.

    Raises
    ------
    ConfigError, DataSourceError
        When the data cannot be built as the run config says (as a simulated
        site would fail).
    """
    t0 = time.time()
    run = _Run(plan, on_line)
    try:
        run.load()
        (_run_local if plan.kind == "local" else _run_pooled)(run)
    except Exception:
        logger.exception("the %s baseline failed", plan.kind)
        raise
    finally:
        logging.getLogger().removeHandler(run.log_handler)
        run.log_handler.close()
    return BaselineResult(run_dir=run.folder.path, seconds=time.time() - t0)
