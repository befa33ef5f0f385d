"""Heterogeneity study: partition settings x strategies x seeds, with local-only and pooled baselines.

``medfed study heterogeneity`` runs, for every setting (a named set of
run-config overrides: a partition, acquisition shift, ...) and seed:

* the local-only baseline (every site trains alone) and the pooled baseline
  (one model on all sites' training images), in-process
  (:mod:`simulation.baselines`);
* one federated simulation per strategy (:func:`simulation.runner.simulate`),

each from the same run config, so that the sites, their splits, the initial
weights and the local training are the same and only the federation
differs. Every finished federated run is compared with the local-only
baseline of its setting and seed (:func:`shared.metrics.benefit.benefit_from_folders`:
each site's federated primary metric minus its local-only one, on its own
validation split and on the test set). The study writes into its folder::

    <out>/
        runs/<setting>-seed-<S>-<arm>/   each run's results folder (arm: local, pooled or a strategy)
        study.csv, study.json            one row per (setting, arm): mean/std over seeds, benefit ranges
        runs.csv                         one row per run (failed runs included, with the reason)
        study.md                         the markdown table also printed to stdout
        utility_vs_heterogeneity.png     primary metric per setting and arm (mean +- std over seeds)
        worst_site_vs_pooled.png         worst site's against the pooled validation primary metric
        fairness_vs_utility.png          Jain's index across sites against the primary metric
        benefit_of_joining.png           each site's benefit of joining, per setting and strategy

Settings syntax (``--settings``): entries separated by ``;``, each
``NAME[@STRATEGY,...][=OVERRIDES]``. ``OVERRIDES`` are run-config overrides
in ``--run-config`` syntax; without them ``NAME`` must be a built-in preset
(:data:`PRESETS`: ``iid``, ``dirichlet-<alpha>``, ``pathological-<k>``,
``quantity``, ``shift``). ``@fedavg,fedprox`` runs only those strategies in
that setting (they must be among ``--strategies``). Strategies
(``--strategies``): comma-separated ``NAME[(OVERRIDES)]``, e.g.
``fedavg,fedprox(proximal-mu=0.1),qfedavg``; ``fedprox`` gets
``proximal-mu=0.01`` unless something sets it (:data:`STRATEGY_DEFAULTS`). A key may be set in
one place only (``--run-config``, a setting, or a strategy's options); the
study sets ``strategy``, ``seed``, ``run-name`` and ``results-dir`` itself.
The whole plan (every run's config) is validated before the first run.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import ConfigError, ConfigValue, parse_overrides
from shared.errors import UserError
from shared.formatting import NA, fmt_metric
from simulation import study_core as core
from simulation.study_core import RunOutcome, parse_seeds

__all__ = [
    "BASELINE_ARMS",
    "DEFAULT_SETTINGS",
    "DEFAULT_STRATEGIES",
    "HeteroPlan",
    "HeteroResult",
    "PRESETS",
    "Setting",
    "StrategySpec",
    "markdown",
    "parse_baselines",
    "parse_seeds",
    "parse_settings",
    "parse_strategies",
    "plot_all",
    "read_run_metrics",
    "run_heterogeneity",
    "run_overrides",
    "summarize",
    "validate_plan",
]

DEFAULT_SETTINGS = "iid;dirichlet-0.1;shift"
DEFAULT_STRATEGIES = "fedavg,fedprox,fedbn,qfedavg"
DEFAULT_SEEDS = "0,1"
BASELINE_ARMS = ("local", "pooled")
ARM_LABELS = {"local": "local-only", "pooled": "pooled"}
PRESETS = {
    "iid": "partition='iid'",
    "dirichlet-<alpha>": "partition='dirichlet' dirichlet-alpha=<alpha>",
    "pathological-<k>": "partition='pathological' classes-per-site=<k>",
    "quantity": "partition='quantity'",
    "shift": "site-shift=true",
}
"""Built-in settings: a bare name in ``--settings`` expands to these overrides."""
STRATEGY_DEFAULTS: dict[str, dict[str, ConfigValue]] = {"fedprox": {"proximal-mu": 0.01}}
"""Options a strategy gets when its entry gives none of them (fedprox cannot run without a proximal term)."""
STUDY_KEYS = {
    "strategy": "--strategies",
    "seed": "--seeds",
    "run-name": "(set per run by the study)",
    "results-dir": "--out",
    "resume-from": "(a study starts new runs)",
}
COMMAND = "medfed study heterogeneity"
RUNS_FOLDER = "runs"
PLOTS = {"utility": "utility_vs_heterogeneity.png", "worst-site": "worst_site_vs_pooled.png",
         "fairness": "fairness_vs_utility.png", "benefit": "benefit_of_joining.png"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A named heterogeneity setting: run-config overrides, optionally restricted to some strategies."""

    name: str
    overrides: Mapping[str, ConfigValue]
    strategies: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StrategySpec:
    """A strategy of the study: its name, its options, and defaults for keys set nowhere else.

    ``defaults`` (:data:`STRATEGY_DEFAULTS`) apply only when neither
    ``--run-config``, the setting nor ``options`` sets the key.
    """

    name: str
    options: Mapping[str, ConfigValue] = field(default_factory=dict)
    defaults: Mapping[str, ConfigValue] = field(default_factory=dict)


def _preset(name: str) -> dict[str, ConfigValue] | None:
    """The overrides of a built-in setting name, or None."""
    fixed = {"iid": {"partition": "iid"}, "quantity": {"partition": "quantity"}, "shift": {"site-shift": True}}
    if name in fixed:
        return dict(fixed[name])
    m = re.fullmatch(r"dirichlet-([0-9]*\.?[0-9]+)", name)
    if m:
        return {"partition": "dirichlet", "dirichlet-alpha": float(m.group(1))}
    m = re.fullmatch(r"pathological-([0-9]+)", name)
    if m:
        return {"partition": "pathological", "classes-per-site": int(m.group(1))}
    return None


def parse_settings(text: str) -> tuple[Setting, ...]:
    """``"iid;dirichlet-0.1=partition='dirichlet' dirichlet-alpha=0.1;shift@fedavg"`` -> settings.

    Raises
    ------
    ConfigError
        For an empty list, a bad or repeated name, a bare name that is no
        built-in preset, overrides that are not ``key=value`` pairs, or a key
        the study sets itself.
    """
    example = "\"iid;dirichlet-0.1;shift=site-shift=true\""
    out: list[Setting] = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        head, has_body, body = entry.partition("=")
        name, at, only = head.strip().partition("@")
        name = name.strip()
        if not _NAME.match(name):
            raise ConfigError(f"--settings: setting name {name!r} in {entry!r}: expected letters, digits, '.', '_' "
                              f"or '-' (at most 40, e.g. 'dirichlet-0.1'); entries are NAME[@STRATEGIES][=OVERRIDES] "
                              f"separated by ';', e.g. {example}.")
        if any(s.name == name for s in out):
            raise ConfigError(f"--settings: setting '{name}' is listed twice; give each setting a distinct name.")
        strategies = tuple(s.strip() for s in only.split(",") if s.strip()) if at else None
        if at and not strategies:
            raise ConfigError(f"--settings: '{head.strip()}': expected strategy names after '@' (e.g. 'iid@fedavg').")
        if has_body:
            if not body.strip():
                raise ConfigError(f"--settings: setting '{name}' has '=' but no overrides; write e.g. "
                                  f"\"{name}=partition='dirichlet' dirichlet-alpha=0.1\" or just a preset name.")
            overrides = parse_overrides(body)
        else:
            preset = _preset(name)
            if preset is None:
                raise ConfigError(f"--settings: '{name}' is not a built-in setting ({', '.join(PRESETS)}); give its "
                                  f"overrides, e.g. \"{name}=partition='dirichlet' dirichlet-alpha=0.3\".")
            overrides = preset
        core.refuse_study_keys(overrides, STUDY_KEYS, COMMAND, where=f"setting '{name}'")
        out.append(Setting(name, overrides, strategies))
    if not out:
        raise ConfigError(f"--settings: expected at least one setting, e.g. {example}; got {text!r}.")
    return tuple(out)


def parse_strategies(text: str) -> tuple[StrategySpec, ...]:
    """``"fedavg,fedprox(proximal-mu=0.1)"`` -> strategy specs (names checked by the run config later).

    Raises
    ------
    ConfigError
        For an empty list, a malformed entry, a repeated strategy, or an
        option the study sets itself.
    """
    from shared.config import STRATEGY_NAMES
    from shared.registry import did_you_mean

    entries = re.findall(r"[^,()]+(?:\([^)]*\))?", text)
    if re.sub(r"[^,()]+(?:\([^)]*\))?", "", text).replace(",", "").strip():
        raise ConfigError(f"--strategies: cannot read {text!r}: expected NAME or NAME(key=value ...) separated by "
                          "commas, e.g. 'fedavg,fedprox(proximal-mu=0.1),qfedavg'.")
    out: list[StrategySpec] = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_-]+)\s*(?:\((.*)\))?", entry)
        if m is None:
            raise ConfigError(f"--strategies: cannot read {entry!r}: expected NAME or NAME(key=value ...).")
        name, options = m.group(1), parse_overrides(m.group(2) or "")
        if name not in STRATEGY_NAMES:
            raise ConfigError(f"--strategies: unknown strategy {name!r}.{did_you_mean(name, list(STRATEGY_NAMES))} "
                              f"Valid: {', '.join(STRATEGY_NAMES)}.")
        if any(s.name == name for s in out):
            raise ConfigError(f"--strategies: '{name}' is listed twice; list each strategy once.")
        core.refuse_study_keys(options, STUDY_KEYS, COMMAND, where=f"the options of '{name}'")
        out.append(StrategySpec(name, options, dict(STRATEGY_DEFAULTS.get(name, {}))))
    if not out:
        raise ConfigError(f"--strategies: expected at least one strategy (e.g. '{DEFAULT_STRATEGIES}'), got {text!r}.")
    return tuple(out)


def parse_baselines(text: str) -> tuple[str, ...]:
    """``"local,pooled"`` -> baselines to run (``"none"`` = none).

    Raises
    ------
    ConfigError
        For a name that is not a baseline, or one listed twice.
    """
    if text.strip() == "none":
        return ()
    out: list[str] = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name not in BASELINE_ARMS:
            raise ConfigError(f"--baselines: expected 'local', 'pooled' (comma-separated) or 'none', got {name!r}.")
        if name in out:
            raise ConfigError(f"--baselines: '{name}' is listed twice.")
        out.append(name)
    return tuple(out)


@dataclass(frozen=True)
class HeteroPlan:
    """What a heterogeneity study runs."""

    out_dir: Path
    settings: tuple[Setting, ...]
    strategies: tuple[StrategySpec, ...]
    seeds: tuple[int, ...] = (0, 1)
    sites: int = 3
    overrides: Mapping[str, ConfigValue] = field(default_factory=dict)
    baselines: tuple[str, ...] = BASELINE_ARMS
    cpus_per_site: int = 1
    run_timeout: float | None = None
    echo: bool = False

    @property
    def runs_dir(self) -> Path:
        """Parent folder of the runs' results folders."""
        return self.out_dir / RUNS_FOLDER

    def strategies_for(self, setting: Setting) -> tuple[StrategySpec, ...]:
        """The strategies run in ``setting`` (all, or those it names after '@')."""
        if setting.strategies is None:
            return self.strategies
        by_name = {s.name: s for s in self.strategies}
        return tuple(by_name[n] for n in setting.strategies if n in by_name)

    def arms(self, setting: Setting) -> list[str]:
        """Baselines first, then the setting's strategies."""
        return [*self.baselines, *(s.name for s in self.strategies_for(setting))]

    def runs(self) -> list[tuple[Setting, int, str]]:
        """Every (setting, seed, arm) in run order: setting-major, then seed, baselines before strategies."""
        return [(st, seed, arm) for st in self.settings for seed in self.seeds for arm in self.arms(st)]


def run_name(setting: Setting, seed: int, arm: str) -> str:
    """Results-folder name of one run of the study."""
    return f"{setting.name}-seed-{seed}-{arm}"


def run_overrides(plan: HeteroPlan, setting: Setting, seed: int, arm: str) -> dict[str, ConfigValue]:
    """The run-config overrides of one run: the user's, the setting's, the strategy's, seed and where results go."""
    values: dict[str, ConfigValue] = {**plan.overrides, **setting.overrides}
    if arm not in BASELINE_ARMS:
        spec = next(s for s in plan.strategies if s.name == arm)
        for key, value in spec.defaults.items():
            values.setdefault(key, value)
        values.update({**spec.options, "strategy": spec.name})
    values.update({"seed": seed, "results-dir": str(plan.runs_dir), "run-name": run_name(setting, seed, arm)})
    return values


def _check_overlaps(plan: HeteroPlan) -> None:
    """A key may be set in one place only: --run-config, a setting, or a strategy's options."""
    given = {k: "--run-config" for k in plan.overrides}
    for st in plan.settings:
        for k in st.overrides:
            if k in given:
                raise ConfigError(f"{COMMAND}: '{k}' is set both in {given[k]} and in setting '{st.name}'; "
                                  "set it in one place (a setting's value applies to that setting only).")
    setting_keys = {k: f"setting '{st.name}'" for st in plan.settings for k in st.overrides}
    for sp in plan.strategies:
        for k in sp.options:
            where = given.get(k) or setting_keys.get(k)
            if where:
                raise ConfigError(f"{COMMAND}: '{k}' is set both in {where} and in the options of strategy "
                                  f"'{sp.name}'; set it in one place.")


def validate_plan(plan: HeteroPlan) -> str:
    """Check the whole plan before any run starts; return the task's primary metric name.

    Every run's config is validated as ``medfed simulate`` validates it
    (keys, values, combinations, input paths, min-sites), baselines as
    ``--baseline`` does.

    Raises
    ------
    ConfigError
        Naming the setting and arm whose config is invalid, or what else is
        wrong (study keys, overlaps, unknown strategies after '@', different
        tasks across settings, a study folder holding runs).
    """
    from shared.tasks import get_task
    from simulation.baselines import plan_baseline
    from simulation.runner import plan_simulation

    core.refuse_study_keys(plan.overrides, STUDY_KEYS, COMMAND)
    core.check_fresh(plan.out_dir, plan.runs_dir)
    if plan.sites < 1:
        raise ConfigError(f"--sites: expected an integer >= 1, got {plan.sites}.")
    _check_overlaps(plan)
    names = {s.name for s in plan.strategies}
    for st in plan.settings:
        unknown = [n for n in (st.strategies or ()) if n not in names]
        if unknown:
            raise ConfigError(f"--settings: setting '{st.name}' names {', '.join(unknown)} after '@', which "
                              f"--strategies does not list ({', '.join(sorted(names))}); add it there.")
        if not plan.arms(st):
            raise ConfigError(f"setting '{st.name}' has nothing to run (no strategy and no baseline).")
    tasks = set()
    for st in plan.settings:
        for arm in plan.arms(st):
            values = run_overrides(plan, st, plan.seeds[0], arm)
            try:
                if arm in BASELINE_ARMS:
                    cfg = plan_baseline(values, arm, sites=plan.sites).config
                else:
                    cfg = plan_simulation(values, sites=plan.sites).config
            except UserError as exc:  # ConfigError, or a plan that cannot run (sites, input paths)
                raise ConfigError(f"setting '{st.name}', {ARM_LABELS.get(arm, arm)}: {exc}") from None
            tasks.add(cfg.task)
    if len(tasks) > 1:
        raise ConfigError(f"the settings train different tasks ({', '.join(sorted(tasks))}); a study compares one "
                          "task: set 'task' in --run-config only.")
    return get_task(tasks.pop()).view.primary


# ---------------------------------------------------------------------------
# Reading one run back
# ---------------------------------------------------------------------------


def read_run_metrics(run_dir: Path, primary: str) -> dict[str, float]:
    """Final figures of a finished run (federated or baseline) from its ``summary.json``.

    ``<primary>`` and ``accuracy`` (pooled validation; NaN for the local-only
    baseline, which has no single model: its ``final`` pools the counts of
    different models),
    ``site-mean-<p>`` (unweighted mean of the sites' validation figures, the
    comparison across arms), ``worst-site-<p>``, ``best-site-<p>``,
    ``site-gap``, ``site-std`` and ``jain-index`` across
    the sites' validation figures (the run's ``fairness`` block), ``test-<p>``
    (the test set; for the local-only baseline the mean over the sites' own
    models) and ``holdout-<p>`` (likewise); NaN where the run has none.
    """
    from shared.results import RunFolder

    folder = RunFolder(run_dir)
    summary = folder.read_summary()
    # the local-only baseline has no single model: its pooled counts mix the sites' own models (left out here)
    final = {} if folder.read_config().get("baseline") == "local" else summary.get("final", {})
    fair = (summary.get("fairness") or {}).get("sites") or {}
    per_site = [core.num(s.get(primary)) for s in (summary.get("final-per-site") or {}).values()]

    def mean_of(block: Mapping[str, Any] | None) -> float:
        vals = [core.num(m.get(primary)) for m in (block or {}).values()]
        vals = [v for v in vals if not math.isnan(v)]
        return statistics.fmean(vals) if vals else math.nan

    test = core.num((summary.get("final-test") or {}).get(primary))
    if math.isnan(test):
        test = mean_of(summary.get("final-test-per-site"))
    holdout = core.num((summary.get("final-holdout") or {}).get(primary))
    if math.isnan(holdout):
        holdout = mean_of(summary.get("final-holdout-per-model"))
    worst = core.num(fair.get("worst"))
    return {
        "rounds": core.num(summary.get("rounds")),
        primary: core.num(final.get(primary)),
        "accuracy": core.num(final.get("accuracy")),
        f"worst-site-{primary}": worst if not math.isnan(worst) else core.agg_min(per_site),
        f"best-site-{primary}": core.num(fair.get("best")) if fair else core.agg_max(per_site),
        f"site-mean-{primary}": core.num(fair.get("mean")) if fair else mean_of(summary.get("final-per-site")),
        "site-gap": core.num(fair.get("gap")),
        "site-std": core.num(fair.get("std")),
        "jain-index": core.num(fair.get("jain-index")),
        f"test-{primary}": test,
        f"holdout-{primary}": holdout,
    }


def _benefit_figures(report: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Scalar columns (``benefit-min`` ...) and per-site values of a benefit report."""
    metrics: dict[str, float] = {}
    per_site: dict[str, Any] = {}
    for part, prefix in (("validation", "benefit"), ("test", "test-benefit")):
        block = report.get(part)
        if not block:
            continue
        for stat in ("min", "median", "max"):
            metrics[f"{prefix}-{stat}"] = core.num(block.get(stat))
        metrics[f"{prefix}-sites-gained"] = float(block.get("gained", 0))
        per_site[part] = {s: r.get("benefit") for s, r in block.get("sites", {}).items()}
    return metrics, per_site


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


@dataclass
class HeteroResult:
    """A finished (or interrupted) study: rows per (setting, arm), every run, where the outputs are."""

    plan: HeteroPlan
    primary: str
    rows: list[dict[str, Any]]
    outcomes: list[RunOutcome]
    table: str
    files: dict[str, Path]

    @property
    def failed(self) -> int:
        """Runs that failed, plus finished runs whose comparison with the local-only baseline failed."""
        return sum(1 for o in self.outcomes if o.failed)


def _default_baseline(overrides: Mapping[str, ConfigValue], kind: str, *, sites: int, echo: bool = False) -> Any:
    from simulation.baselines import plan_baseline, run_baseline

    return run_baseline(plan_baseline(overrides, kind, sites=sites))


def run_heterogeneity(plan: HeteroPlan, *, simulate_fn: Callable[..., Any] | None = None,
                      baseline_fn: Callable[..., Any] | None = None, log: core.Log = print) -> HeteroResult:
    """Run every (setting, seed, arm) of ``plan`` and write the study outputs.

    Parameters
    ----------
    plan:
        What to run and where to write.
    simulate_fn:
        Runs one federated simulation (default :func:`simulation.runner.simulate`),
        called as ``simulate_fn(overrides, sites=, cpus_per_site=, echo=, timeout=)``;
        returns an object with ``run_dir``.
    baseline_fn:
        Runs one baseline (default: :func:`simulation.baselines.run_baseline`
        of :func:`~simulation.baselines.plan_baseline`), called as
        ``baseline_fn(overrides, kind, sites=, echo=)``; returns an object with ``run_dir``.
    log:
        Receives one progress line per run started and finished.

    Raises
    ------
    ConfigError
        When the plan is invalid (checked before the first run).
    """
    primary = validate_plan(plan)
    if simulate_fn is None:
        from simulation.runner import simulate as simulate_fn
    baseline_fn = baseline_fn or _default_baseline
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    runs = [_planned(plan, primary, st, seed, arm, simulate_fn, baseline_fn) for st, seed, arm in plan.runs()]

    def write(outcomes: list[RunOutcome], complete: bool) -> tuple[list[dict[str, Any]], str, dict[str, Path]]:
        rows = summarize(plan, outcomes, primary)
        table = markdown(rows, primary)
        return rows, table, write_outputs(plan, primary, rows, outcomes, table, complete=complete)

    outcomes, (rows, table, files) = core.run_and_write(runs, log, write)
    return HeteroResult(plan, primary, rows, outcomes, table, files)


def _planned(plan: HeteroPlan, primary: str, setting: Setting, seed: int, arm: str,
             simulate_fn: Callable[..., Any], baseline_fn: Callable[..., Any]) -> core.PlannedRun:
    """One run: a baseline or a federated simulation, read back, compared with its local-only baseline."""
    overrides = run_overrides(plan, setting, seed, arm)
    local_dir = plan.runs_dir / run_name(setting, seed, "local")

    def execute() -> core.RunReport:
        from shared.results import RunFolder

        if arm in BASELINE_ARMS:
            res = baseline_fn(overrides, arm, sites=plan.sites, echo=plan.echo)
        else:
            res = simulate_fn(overrides, sites=plan.sites, cpus_per_site=plan.cpus_per_site, echo=plan.echo,
                              timeout=plan.run_timeout)
        run_dir = Path(res.run_dir)
        metrics: dict[str, Any] = read_run_metrics(run_dir, primary)
        pooled = "" if arm == "local" else f"{primary} {fmt_metric(metrics[primary])}, "
        text = (f"{pooled}site mean {fmt_metric(metrics[f'site-mean-{primary}'])}, "
                f"worst site {fmt_metric(metrics[f'worst-site-{primary}'])}, Jain {fmt_metric(metrics['jain-index'])}")
        if not math.isnan(metrics[f"test-{primary}"]):
            text += f", test {fmt_metric(metrics[f'test-{primary}'])}"
        notes, details = {}, {}
        if arm not in BASELINE_ARMS and (local_dir / RunFolder.SUMMARY).is_file():
            from shared.metrics.benefit import benefit_from_folders

            try:
                report = benefit_from_folders(run_dir, local_dir)
            except Exception as exc:  # noqa: BLE001 - recorded, the study goes on
                notes["benefit-error"] = core.first_line(exc)
            else:
                RunFolder(run_dir).write_benefit(report)
                figures, details["benefit"] = _benefit_figures(report)
                metrics.update(figures)
                ranges = [f"{part} {fmt_metric(figures.get(f'{prefix}-min'), spec='+.3f')} to "
                          f"{fmt_metric(figures.get(f'{prefix}-max'), spec='+.3f')}"
                          for part, prefix in (("val", "benefit"), ("test", "test-benefit"))
                          if f"{prefix}-min" in figures]
                text += ", benefit of joining " + ", ".join(ranges)
        return core.RunReport(run_dir, metrics, notes, text, details)

    labels = {"setting": setting.name, "seed": seed, "arm": ARM_LABELS.get(arm, arm),
              "kind": "baseline" if arm in BASELINE_ARMS else "federated"}
    return core.PlannedRun(key=(setting.name, seed, arm), labels=labels,
                           tag=f"{setting.name} seed={seed} {ARM_LABELS.get(arm, arm)}",
                           run_dir=plan.runs_dir / run_name(setting, seed, arm), execute=execute)


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def _benefit_values(outcomes: Sequence[RunOutcome], part: str) -> list[float]:
    vals = []
    for o in outcomes:
        for v in ((o.details.get("benefit") or {}).get(part) or {}).values():
            if v is not None and not math.isnan(float(v)):
                vals.append(float(v))
    return vals


def summarize(plan: HeteroPlan, outcomes: Sequence[RunOutcome], primary: str) -> list[dict[str, Any]]:
    """One row per (setting, arm) in plan order: means and sample std over the seeds that finished.

    Benefit of joining (federated arms): ``benefit-min``/``-median``/``-max``
    over every site and seed (validation), ``test-benefit-*`` likewise on the
    test set; ``sites-gained`` = share of (site, seed) pairs with a positive benefit.
    """
    p = primary
    rows: list[dict[str, Any]] = []
    for st in plan.settings:
        for arm in plan.arms(st):
            mine = [o for o in outcomes if o.key[0] == st.name and o.key[2] == arm]
            ok = [o for o in mine if o.ok]

            def col(key: str, ok: list[RunOutcome] = ok) -> list[float]:
                return [core.num(o.metrics.get(key)) for o in ok]

            row: dict[str, Any] = {"setting": st.name, "arm": ARM_LABELS.get(arm, arm),
                                   "kind": "baseline" if arm in BASELINE_ARMS else "federated",
                                   "seeds-ok": len(ok), "seeds-failed": len(mine) - len(ok),
                                   "rounds": core.mean_std(col("rounds"))[0]}
            for key in (p, "accuracy", f"site-mean-{p}", f"test-{p}", f"worst-site-{p}", "jain-index", "site-gap",
                        f"holdout-{p}"):
                row[f"{key}-mean"], row[f"{key}-std"] = core.mean_std(col(key))
            for part, prefix in (("validation", "benefit"), ("test", "test-benefit")):
                vals = _benefit_values(ok, part)
                row[f"{prefix}-min"] = min(vals) if vals else math.nan
                row[f"{prefix}-median"] = statistics.median(vals) if vals else math.nan
                row[f"{prefix}-max"] = max(vals) if vals else math.nan
                row[f"{prefix}-gained"] = (sum(v > 0 for v in vals) / len(vals)) if vals else math.nan
            rows.append(row)
    return rows


def markdown(rows: Sequence[Mapping[str, Any]], primary: str) -> str:
    """The study rows as a markdown table (``n/a`` for missing figures, ``FAILED`` counts)."""
    name = primary.upper() if primary == "auroc" else primary.capitalize()

    def pm(r: Mapping[str, Any], k: str) -> str:
        std = fmt_metric(r[f"{k}-std"])
        return fmt_metric(r[f"{k}-mean"]) + ("" if std == NA else f" ± {std}")

    def span(r: Mapping[str, Any], prefix: str) -> str:
        if math.isnan(r[f"{prefix}-median"]):
            return NA
        return " / ".join(fmt_metric(r[f"{prefix}-{s}"], spec="+.3f") for s in ("min", "median", "max"))

    head = ["setting", "arm", f"pooled val {name}", f"site-mean val {name}", f"test {name}", f"worst-site {name}",
            "Jain's index", "benefit val (min / median / max)", "benefit test (min / median / max)", "runs"]
    body = []
    for r in rows:
        runs = f"{r['seeds-ok']} ok" + (f", {r['seeds-failed']} FAILED" if r["seeds-failed"] else "")
        if not r["seeds-ok"] and not r["seeds-failed"]:
            runs = "not run"  # an interrupted study
        body.append([r["setting"], r["arm"], pm(r, primary), pm(r, f"site-mean-{primary}"), pm(r, f"test-{primary}"),
                     pm(r, f"worst-site-{primary}"), pm(r, "jain-index"), span(r, "benefit"), span(r, "test-benefit"),
                     runs])
    return core.markdown_table(head, body)


def write_outputs(plan: HeteroPlan, primary: str, rows: Sequence[Mapping[str, Any]], outcomes: Sequence[RunOutcome],
                  table: str, *, complete: bool = True) -> dict[str, Path]:
    """Write study.csv, study.json, runs.csv, study.md and the plots into ``plan.out_dir``."""
    payload = {
        "study": "heterogeneity",
        "primary-metric": primary,
        "plan": {
            "settings": [{"name": s.name, "overrides": dict(s.overrides),
                          "strategies": list(s.strategies) if s.strategies else None} for s in plan.settings],
            "strategies": [{"name": s.name, "options": dict(s.options), "defaults": dict(s.defaults)}
                           for s in plan.strategies],
            "baselines": list(plan.baselines), "seeds": list(plan.seeds), "sites": plan.sites,
            "overrides": dict(plan.overrides),
        },
        "benefit-per-site": [{"setting": o.key[0], "seed": o.key[1], "arm": o.key[2], **o.details["benefit"]}
                             for o in outcomes if o.details.get("benefit")],
        "notes": ("mean/std over seeds (sample std, NaN with one seed); site-mean, worst-site and Jain's index "
                  "across the sites' validation figures of the final round; no pooled val for the local-only baseline "
                  "(no single model); test = test-path (local-only: mean over the sites' "
                  "own models); benefit = a site's federated minus its local-only primary metric, min/median/max "
                  "over sites and seeds."),
    }
    files = core.write_study_files(plan.out_dir, rows, outcomes, table, payload, complete=complete,
                                   planned=len(plan.runs()))
    files.update(plot_all(plan, rows, outcomes, primary, plan.out_dir))
    return files


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _arms(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["arm"] not in seen:
            seen.append(r["arm"])
    return seen


def _style(arm: str, arms: Sequence[str]) -> dict[str, Any]:
    if arm == ARM_LABELS["local"]:
        return {"color": "tab:gray", "linestyle": "--", "marker": "s"}
    if arm == ARM_LABELS["pooled"]:
        return {"color": "black", "linestyle": ":", "marker": "D"}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    fed = [a for a in arms if a not in ARM_LABELS.values()]
    return {"color": palette[fed.index(arm) % len(palette)], "linestyle": "-", "marker": "o"}


def plot_all(plan: HeteroPlan, rows: Sequence[Mapping[str, Any]], outcomes: Sequence[RunOutcome], primary: str,
             out: Path) -> dict[str, Path]:
    """The four study plots (see the module docstring); returns name -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = primary.upper() if primary == "auroc" else primary.capitalize()
    settings = [s.name for s in plan.settings]
    arms = _arms(rows)
    has_test = any(not math.isnan(r[f"test-{primary}-mean"]) for r in rows)
    key = f"test-{primary}" if has_test else primary
    where = "test set" if has_test else "pooled validation"
    files: dict[str, Path] = {}
    markers = ["o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">"]

    # 1. utility against heterogeneity
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    width = 0.6 / max(len(arms), 1)
    for j, arm in enumerate(arms):
        rs = [(settings.index(r["setting"]), r) for r in rows if r["arm"] == arm]
        xs = [i - 0.3 + width * (j + 0.5) for i, _ in rs]
        ys = [r[f"{key}-mean"] for _, r in rs]
        err = [0.0 if math.isnan(r[f"{key}-std"]) else r[f"{key}-std"] for _, r in rs]
        ax.errorbar(xs, ys, yerr=err, capsize=3, label=arm, **_style(arm, arms))
    ax.set_xticks(range(len(settings)), settings)
    ax.set_xlabel("setting (in the order given)")
    ax.set_ylabel(f"{where} {name} (mean ± std over seeds)")
    ax.set_title(f"Utility across heterogeneity settings ({len(plan.seeds)} seed{'s' if len(plan.seeds) > 1 else ''})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    files["plot-utility"] = out / PLOTS["utility"]
    fig.savefig(files["plot-utility"])
    plt.close(fig)

    # 2. worst site against pooled (validation)
    fig, ax = plt.subplots(figsize=(6.0, 5.2), dpi=110)
    for r in rows:
        st = _style(r["arm"], arms)
        ax.errorbar(r[f"{primary}-mean"], r[f"worst-site-{primary}-mean"],
                    xerr=0.0 if math.isnan(r[f"{primary}-std"]) else r[f"{primary}-std"],
                    yerr=0.0 if math.isnan(r[f"worst-site-{primary}-std"]) else r[f"worst-site-{primary}-std"],
                    color=st["color"], marker=markers[settings.index(r["setting"]) % len(markers)], capsize=2,
                    linestyle="none")
    _diagonal(ax)
    ax.set_xlabel(f"pooled validation {name}")
    ax.set_ylabel(f"worst site's validation {name}")
    ax.set_title("Worst site vs pooled (below the diagonal = the gap)")
    _legends(ax, arms, settings, markers)
    fig.tight_layout()
    files["plot-worst-site"] = out / PLOTS["worst-site"]
    fig.savefig(files["plot-worst-site"])
    plt.close(fig)

    # 3. fairness against utility
    fig, ax = plt.subplots(figsize=(6.0, 5.2), dpi=110)
    for r in rows:
        st = _style(r["arm"], arms)
        ax.errorbar(r[f"{key}-mean"], r["jain-index-mean"],
                    xerr=0.0 if math.isnan(r[f"{key}-std"]) else r[f"{key}-std"],
                    yerr=0.0 if math.isnan(r["jain-index-std"]) else r["jain-index-std"],
                    color=st["color"], marker=markers[settings.index(r["setting"]) % len(markers)], capsize=2,
                    linestyle="none")
    ax.set_xlabel(f"{where} {name}")
    ax.set_ylabel(f"Jain's index of the sites' validation {name} (1 = equal)")
    ax.set_title("Fairness across sites vs utility")
    ax.grid(True, alpha=0.3)
    _legends(ax, arms, settings, markers)
    fig.tight_layout()
    files["plot-fairness"] = out / PLOTS["fairness"]
    fig.savefig(files["plot-fairness"])
    plt.close(fig)

    # 4. benefit of joining per site
    groups = [(st.name, sp.name) for st in plan.settings for sp in plan.strategies_for(st)]
    parts = [p for p in ("validation", "test") if any((o.details.get("benefit") or {}).get(p) for o in outcomes)]
    fig, axes = plt.subplots(1, max(len(parts), 1), figsize=(max(6.0, 0.8 * len(groups) + 2) * max(len(parts), 1) / 1.3,
                                                             4.6), dpi=110, squeeze=False)
    for ax, part in zip(axes[0], parts or ["validation"], strict=True):
        for g, (st, arm) in enumerate(groups):
            vals = []
            for o in outcomes:
                if o.key[0] == st and ARM_LABELS.get(o.key[2], o.key[2]) == arm:
                    vals += [v for v in ((o.details.get("benefit") or {}).get(part) or {}).values() if v is not None]
            if vals:
                jitter = [g + 0.25 * ((k % 5) / 4 - 0.5) for k in range(len(vals))]
                ax.plot(jitter, vals, linestyle="none", marker="o", alpha=0.7, color=_style(arm, arms)["color"])
                ax.plot([g - 0.3, g + 0.3], [statistics.median(vals)] * 2, color="black", linewidth=1.5)
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(groups)), [f"{st}\n{arm}" for st, arm in groups], fontsize=7)
        ax.set_ylabel(f"federated − local-only {name} ({part})")
        ax.set_title(f"Benefit of joining per site ({part}; bar = median)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    files["plot-benefit"] = out / PLOTS["benefit"]
    fig.savefig(files["plot-benefit"])
    plt.close(fig)
    return files


def _diagonal(ax: Any) -> None:
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.grid(True, alpha=0.3)


def _legends(ax: Any, arms: Sequence[str], settings: Sequence[str], markers: Sequence[str]) -> None:
    from matplotlib.lines import Line2D

    colour = [Line2D([], [], color=_style(a, arms)["color"], marker="o", linestyle="none", label=a) for a in arms]
    shape = [Line2D([], [], color="black", marker=markers[i % len(markers)], linestyle="none", label=s)
             for i, s in enumerate(settings)]
    first = ax.legend(handles=colour, fontsize=7, loc="lower right", title="arm", title_fontsize=7)
    ax.add_artist(first)
    ax.legend(handles=shape, fontsize=7, loc="upper left", title="setting", title_fontsize=7)
