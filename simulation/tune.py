"""``medfed tune``: hyper-parameter search over run-config keys with Optuna.

Every trial is one ``medfed simulate`` run (:func:`simulation.runner.simulate`)
of the study's base config (``--run-config``, ``--rounds``, ``--sites``)
with the trial's values of the searched keys (:mod:`simulation.tune_space`).

* **Objective** (maximised): ``val`` = the pooled validation primary metric
  (the task's ``view.primary``: AUROC for classification, Dice for
  segmentation), ``worst-site`` = the lowest per-site value of that metric
  (the round's fairness block), or ``test`` = the server's test-set figure
  (needs ``test-path``). A trial's value is its last round's.
* **Sampler**: TPE, seeded (``--seed``; a resumed study re-seeds with
  ``seed + trials so far`` so it does not repeat its random start), random
  for the first ``--random-trials`` trials.
* **Pruning**: median pruning per round. Each round's figure is read from
  the trial's ``metrics.json`` as soon as the server's tagged round line
  arrives through the runner's ``on_line`` callback, and reported to the
  trial at step = round; when Optuna says prune, the callback raises and the
  runner stops that simulation (its processes and Ray included). The last
  round is never pruned (the run is complete).
* **Baseline**: a new study first runs the base config itself (trial 0,
  marked ``baseline``) when its values of the searched keys lie in the
  space, so the best trial can be compared with it.
* **Storage**: SQLite in the output folder (``study.db``). Re-running the
  same command continues the study: ``--trials N`` is the number of trials
  the study should have (finished, pruned or failed; an interrupted trial
  does not count and its values run again first). A study is only resumed
  by the command that started it (same space, objective, base config and
  sites; ``--trials``, ``--timeout`` and the sampler settings may change).
* **Timeout**: no trial starts after ``--timeout`` seconds; the running one finishes.

Output folder::

    <out>/
        study.db                      the Optuna study (SQLite)
        trials/trial-NNN/             each trial's results folder
        trials.csv                    one row per trial: state, value, params, time
        best.txt                      the best config as one --run-config "..." line
        tune.json                     plan, best and baseline trials, counts
        optimization_history.png      Optuna's plots (matplotlib backend)
        param_importances.png

Optuna is imported only when a study runs (``medfed --help`` stays light).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic import atomic_open, write_json
from shared.config import ConfigValue, parse_run_config
from shared.errors import UserError
from shared.formatting import fmt_metric
from shared.results import RunFolder
from simulation.errors import SimulationError
from simulation.tune_space import TUNER_KEYS, ParamSpec, validate_space

__all__ = [
    "OBJECTIVES",
    "TrialOutcome",
    "TuneError",
    "TunePlan",
    "TuneResult",
    "objective_value",
    "run_config_line",
    "run_tune",
    "validate_plan",
]

OBJECTIVES = {
    "val": "pooled validation {metric}",
    "worst-site": "worst-site validation {metric}",
    "test": "test-set {metric}",
}
"""Objective name -> what it is (``{metric}`` = the task's primary metric)."""
STUDY_DB = "study.db"
TRIALS_DIR = "trials"
TRIALS_CSV = "trials.csv"
BEST_TXT = "best.txt"
SUMMARY_JSON = "tune.json"
HISTORY_PNG = "optimization_history.png"
IMPORTANCE_PNG = "param_importances.png"
LOCK_FILE = "tune.lock"
SIGNATURE_ATTR = "medfed-study"

Log = Callable[[str], None]


class TuneError(UserError):
    """A study cannot run as asked (bad objective, another study in the folder, a busy study)."""


class _Pruned(Exception):
    """Raised from the line callback to stop a trial Optuna prunes."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"pruned at round {step}")
        self.step, self.value = step, value


@dataclass(frozen=True)
class TunePlan:
    """What ``medfed tune`` runs.

    Attributes
    ----------
    out_dir:
        The study's folder (SQLite storage, trials, outputs).
    space:
        The searched keys (:func:`simulation.tune_space.parse_space`).
    base:
        Run-config overrides of every trial (paths absolute; includes
        ``num-server-rounds`` when ``--rounds`` was given).
    objective:
        One of :data:`OBJECTIVES`.
    trials:
        Trials the study should have (resumes count the earlier ones).
    timeout:
        Seconds after which no new trial starts (None = no limit).
    sites, cpus_per_site, ray_address, trial_timeout:
        Passed to every simulation (``trial_timeout`` stops a run that takes longer).
    seed:
        Seed of the TPE sampler.
    random_trials:
        Trials sampled at random before TPE models the results.
    prune, prune_after:
        Median pruning, from when this many trials have finished.
    baseline:
        Run the base config first (new studies; only when it lies in the space).
    show_rounds:
        Show each trial's round lines (indented) as they come.
    """

    out_dir: Path
    space: tuple[ParamSpec, ...]
    base: Mapping[str, ConfigValue] = field(default_factory=dict)
    objective: str = "val"
    trials: int = 20
    timeout: float | None = None
    sites: int = 3
    cpus_per_site: int = 1
    ray_address: str = ""
    trial_timeout: float | None = None
    seed: int = 0
    random_trials: int = 5
    prune: bool = True
    prune_after: int = 3
    baseline: bool = True
    show_rounds: bool = False
    study_name: str = "medfed-tune"

    @property
    def trials_dir(self) -> Path:
        """Parent folder of the trials' results folders."""
        return self.out_dir / TRIALS_DIR

    @property
    def storage_url(self) -> str:
        """The SQLite URL of the study."""
        return f"sqlite:///{(self.out_dir / STUDY_DB).resolve()}"

    def signature(self) -> dict[str, Any]:
        """What a resumed study must share with the one stored (see the module docstring)."""
        return json.loads(json.dumps({"space": [s.to_dict() for s in self.space], "objective": self.objective,
                                      "base": dict(self.base), "sites": self.sites}))


@dataclass
class TrialOutcome:
    """One trial as ``trials.csv`` shows it."""

    number: int
    state: str
    value: float | None
    params: dict[str, ConfigValue]
    seconds: float | None
    rounds: int
    pruned_at: int | None = None
    baseline: bool = False
    error: str = ""
    run_dir: str = ""


@dataclass
class TuneResult:
    """A finished (or stopped) study."""

    plan: TunePlan
    label: str
    outcomes: list[TrialOutcome]
    best: TrialOutcome | None
    baseline: TrialOutcome | None
    files: dict[str, Path]
    notes: list[str] = field(default_factory=list)

    def count(self, state: str) -> int:
        """Trials in ``state`` (``complete``, ``pruned``, ``failed``, ``running``)."""
        return sum(1 for o in self.outcomes if o.state == state)


# ---------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return None
    return float(v)


def objective_value(record: Mapping[str, Any], objective: str, primary: str) -> float | None:
    """The objective's figure in one round record of ``metrics.json`` (None when the round has none).

    Parameters
    ----------
    record:
        One element of ``metrics.json``'s ``rounds``.
    objective:
        ``val`` (``record["evaluate"][primary]``), ``worst-site``
        (``record["fairness"]["sites"]["worst"]``) or ``test``
        (``record["test"][primary]``).
    primary:
        The task's primary metric.
    """
    if objective == "val":
        return _finite((record.get("evaluate") or {}).get(primary))
    if objective == "worst-site":
        return _finite(((record.get("fairness") or {}).get("sites") or {}).get("worst"))
    if objective == "test":
        return _finite((record.get("test") or {}).get(primary))
    raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")


def validate_plan(plan: TunePlan) -> tuple[str, str]:
    """Check the plan before anything runs; return the task's primary metric and the objective's label.

    Raises
    ------
    TuneSpaceError, ConfigError, TuneError
        For a bad space, base config or objective.
    """
    from shared.tasks import get_task

    if plan.objective not in OBJECTIVES:
        raise TuneError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {plan.objective!r}")
    for key in plan.base:
        if key in TUNER_KEYS and key != "num-server-rounds":
            raise TuneError(f"--run-config {key}: medfed tune sets it for every trial ({TUNER_KEYS[key]}); remove it.")
    if plan.trials < 1:
        raise TuneError(f"--trials: expected an integer >= 1, got {plan.trials}")
    cfg = parse_run_config(dict(plan.base))
    if cfg.strategy.min_sites > plan.sites:
        raise TuneError(f"min-sites is {cfg.strategy.min_sites} but every trial simulates {plan.sites} sites: use "
                        f"--sites {cfg.strategy.min_sites} or --run-config \"min-sites={plan.sites}\"")
    if plan.objective == "test" and not cfg.test_path:
        raise TuneError("--objective test scores the server's test set, but test-path is not set: add "
                        "--run-config \"test-path='/data/test_manifest.csv'\", or use --objective val")
    validate_space(plan.space, plan.base)
    view = get_task(cfg.task).view
    return view.primary, OBJECTIVES[plan.objective].format(metric=view.primary_label)


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def _short(v: ConfigValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _toml(v: ConfigValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return "'" + str(v).replace("'", "") + "'"


def run_config_line(values: Mapping[str, ConfigValue]) -> str:
    """``--run-config "lr=0.0123 model='resnet18'"``: ready to paste after ``medfed simulate``."""
    return '--run-config "' + " ".join(f"{k}={_toml(v)}" for k, v in values.items()) + '"'


def _params_text(params: Mapping[str, ConfigValue]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in params.items())


# ---------------------------------------------------------------------------
# Study storage
# ---------------------------------------------------------------------------


class _Lock:
    """``tune.lock``: one ``medfed tune`` per study at a time."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE

    def __enter__(self) -> _Lock:
        if self.path.is_file():
            try:
                pid = int(self.path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise TuneError(f"another medfed tune (pid {pid}) is running this study in {self.path.parent}; "
                                "wait for it or use another --out")
        with atomic_open(self.path, "w") as fh:
            fh.write(str(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signature_problems(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    names = {"space": "search space", "objective": "objective", "base": "base run config", "sites": "--sites"}
    return [f"{names[k]} was {stored.get(k)!r}, now {now[k]!r}" for k in names if stored.get(k) != now[k]]


def _open_study(plan: TunePlan, log: Log) -> tuple[Any, bool]:
    """Create or load the study; mark trials a crash left running as failed and queue them again."""
    import optuna
    from optuna.trial import TrialState

    existing = set()
    if (plan.out_dir / STUDY_DB).is_file():
        existing = set(optuna.study.get_all_study_names(storage=plan.storage_url))
    resumed = plan.study_name in existing
    if not resumed and plan.trials_dir.is_dir() and any(plan.trials_dir.iterdir()):
        raise TuneError(f"{plan.out_dir} holds trials but no study '{plan.study_name}' in {STUDY_DB}: choose another "
                        "--out (nothing is overwritten)")
    n_before = 0
    if resumed:
        n_before = len(optuna.load_study(study_name=plan.study_name, storage=plan.storage_url).trials)
    sampler = optuna.samplers.TPESampler(seed=plan.seed + n_before, n_startup_trials=plan.random_trials)
    pruner: Any = (optuna.pruners.MedianPruner(n_startup_trials=plan.prune_after, n_warmup_steps=0)
                   if plan.prune else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=plan.study_name, storage=plan.storage_url, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    if resumed:
        stored = study.user_attrs.get(SIGNATURE_ATTR, {})
        problems = _signature_problems(stored, plan.signature())
        if problems:
            raise TuneError(f"the study in {plan.out_dir} was started by another command ({'; '.join(problems)}): "
                            "re-run it with the same settings to continue it, or choose another --out")
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # noqa: SLF001 - RUNNING: updatable
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(dict(t.params), user_attrs={"retry-of": t.number, **_carry(t.user_attrs)})
            log(f"trial {t.number} was interrupted: it runs again first")
    else:
        study.set_user_attr(SIGNATURE_ATTR, plan.signature())
    return study, resumed


def _carry(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {"baseline": True} if attrs.get("baseline") else {}


def _counted(study: Any) -> int:
    """Trials that count towards ``--trials``: finished, pruned, or failed other than by an interrupt."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"):
            n += 1
    return n


def _enqueue_baseline(study: Any, plan: TunePlan, log: Log) -> None:
    """Queue the base config as the first trial when its values of the searched keys lie in the space."""
    flat = parse_run_config(dict(plan.base)).to_flat()
    values = {s.key: flat[s.key] for s in plan.space}
    outside = [f"{s.key}={_short(values[s.key])}" for s in plan.space if not s.contains(values[s.key])]
    if outside:
        log(f"no baseline trial: the base config's {', '.join(outside)} lies outside the search space")
        return
    study.enqueue_trial(values, user_attrs={"baseline": True})


# ---------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------


class _RoundWatcher:
    """The runner's ``on_line`` callback of one trial: report each round's figure; prune when told to."""

    def __init__(self, trial: Any, run_dir: Path, objective: str, primary: str, num_rounds: int, prune: bool,
                 display: Any = None) -> None:
        self.trial, self.run_dir = trial, run_dir
        self.objective, self.primary = objective, primary
        self.num_rounds, self.prune = num_rounds, prune
        self.display = display
        self.reported: dict[int, float] = {}

    def feed(self, raw: str) -> None:
        from simulation.flower_output import read_console_line

        if self.display is not None:
            self.display.feed(raw)
        line = read_console_line(raw)
        if line is None or line.kind != "round" or line.round is None:
            return
        self.report_rounds()
        value = self.reported.get(line.round)
        if (value is not None and self.prune and line.round < self.num_rounds
                and self.trial.should_prune()):
            raise _Pruned(line.round, value)

    def report_rounds(self) -> list[dict[str, Any]]:
        """Report every round of ``metrics.json`` not reported yet; return the rounds."""
        rounds = RunFolder(self.run_dir).read_rounds() if (self.run_dir / RunFolder.METRICS).is_file() else []
        for record in rounds:
            step = int(record.get("round", 0))
            value = objective_value(record, self.objective, self.primary)
            if value is not None and step not in self.reported:
                self.trial.report(value, step)
                self.reported[step] = value
        return rounds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _run_trial(study: Any, plan: TunePlan, primary: str, num_rounds: int, simulate_fn: Callable[..., Any]) -> int:
    """Ask Optuna for a trial, run its simulation, tell Optuna how it went; return the trial's number."""
    from optuna.trial import TrialState

    trial = study.ask()
    params = {spec.key: spec.suggest(trial) for spec in plan.space}
    run_name = f"trial-{trial.number:03d}"
    run_dir = plan.trials_dir / run_name
    trial.set_user_attr("run-dir", str(Path(TRIALS_DIR) / run_name))
    display = None
    if plan.show_rounds:
        from simulation.display import RunDisplay

        display = RunDisplay(live=False, indent="    ", num_rounds=num_rounds)
    watcher = _RoundWatcher(trial, run_dir, plan.objective, primary, num_rounds, plan.prune, display)
    overrides = {**plan.base, **params, "run-name": run_name, "results-dir": str(plan.trials_dir)}
    t0 = time.time()
    try:
        simulate_fn(overrides, sites=plan.sites, cpus_per_site=plan.cpus_per_site, on_line=watcher.feed,
                    timeout=plan.trial_timeout, ray_address=plan.ray_address or None)
    except _Pruned as exc:
        trial.set_user_attr("seconds", time.time() - t0)
        trial.set_user_attr("pruned-at", exc.step)
        study.tell(trial, state=TrialState.PRUNED)
        return int(trial.number)
    except (UserError, SimulationError) as exc:  # a trial that cannot run is a row of the table, not the end
        trial.set_user_attr("seconds", time.time() - t0)
        trial.set_user_attr("error", _first_line(exc))
        study.tell(trial, state=TrialState.FAIL)
        return int(trial.number)
    except BaseException:  # an interrupt (or a bug): the trial runs again when the study is resumed
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(params, user_attrs={"retry-of": trial.number, **_carry(trial.user_attrs)})
        raise
    trial.set_user_attr("seconds", time.time() - t0)
    rounds = watcher.report_rounds()
    values = [(int(r.get("round", 0)), objective_value(r, plan.objective, primary)) for r in rounds]
    defined = [(step, v) for step, v in values if v is not None]
    if not defined:
        trial.set_user_attr("error", "the run finished without a figure for the objective (no round had one)")
        study.tell(trial, state=TrialState.FAIL)
        return int(trial.number)
    trial.set_user_attr("final-round", defined[-1][0])
    study.tell(trial, defined[-1][1])
    return int(trial.number)


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def _outcomes(study: Any) -> list[TrialOutcome]:
    out = []
    for t in study.get_trials(deepcopy=False):
        state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
                 "WAITING": "waiting"}.get(t.state.name, t.state.name.lower())
        if state == "waiting":
            continue
        value = t.value if state == "complete" else (t.intermediate_values.get(t.user_attrs.get("pruned-at"))
                                                     if state == "pruned" else None)
        error = str(t.user_attrs.get("error", "interrupted" if t.user_attrs.get("interrupted") else ""))
        out.append(TrialOutcome(number=t.number, state=state, value=value, params=dict(t.params),
                                seconds=t.user_attrs.get("seconds"), rounds=len(t.intermediate_values),
                                pruned_at=t.user_attrs.get("pruned-at"), baseline=bool(t.user_attrs.get("baseline")),
                                error=error, run_dir=str(t.user_attrs.get("run-dir", ""))))
    return out


def _write_csv(path: Path, outcomes: Sequence[TrialOutcome], space: Sequence[ParamSpec], label: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = [s.key for s in space]
    w.writerow(["number", "state", "value", "objective", "baseline", "rounds-reported", "pruned-at-round", "seconds",
                *keys, "run-dir", "error"])
    for o in outcomes:
        w.writerow([o.number, o.state, "" if o.value is None else f"{o.value:.6g}", label, "yes" if o.baseline else "",
                    o.rounds, o.pruned_at or "", "" if o.seconds is None else f"{o.seconds:.1f}",
                    *(o.params.get(k, "") for k in keys), o.run_dir, o.error])
    with atomic_open(path, "w", newline="") as fh:
        fh.write(buf.getvalue())


def _save_figure(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _plots(study: Any, out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Optuna's optimisation-history and parameter-importance plots (matplotlib backend), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    files: dict[str, Path] = {}
    notes: list[str] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, fn, path, need in (("history", ovm.plot_optimization_history, out_dir / HISTORY_PNG, 1),
                                     ("importance", ovm.plot_param_importances, out_dir / IMPORTANCE_PNG, 2)):
            if len(complete) < need:
                notes.append(f"{path.name} not drawn: it needs {need} finished trial(s), the study has {len(complete)}")
                continue
            try:
                ax = fn(study)
                _save_figure(ax.figure, path)
                plt.close(ax.figure)
                files[name] = path
            except (ValueError, RuntimeError) as exc:  # e.g. importances of a space whose values never varied
                notes.append(f"{path.name} not drawn: {_first_line(exc)}")
    return files, notes


def _write_outputs(study: Any, plan: TunePlan, label: str, primary: str, *, plots: bool) -> TuneResult:
    outcomes = _outcomes(study)
    complete = [o for o in outcomes if o.state == "complete" and o.value is not None]
    best = max(complete, key=lambda o: (o.value, -o.number)) if complete else None
    baseline = next((o for o in outcomes if o.baseline and o.state == "complete"), None)
    files = {"csv": plan.out_dir / TRIALS_CSV, "json": plan.out_dir / SUMMARY_JSON}
    _write_csv(files["csv"], outcomes, plan.space, label)
    notes: list[str] = []
    if best is not None:
        files["best"] = plan.out_dir / BEST_TXT
        with atomic_open(files["best"], "w") as fh:
            fh.write(run_config_line({**plan.base, **best.params}) + "\n")
    if plots:
        drawn, notes = _plots(study, plan.out_dir)
        files.update(drawn)

    def brief(o: TrialOutcome | None) -> dict[str, Any] | None:
        return None if o is None else {"number": o.number, "value": o.value, "params": o.params, "run-dir": o.run_dir}

    write_json(files["json"], {
        "study": plan.study_name, "storage": STUDY_DB, "objective": plan.objective, "objective-label": label,
        "primary-metric": primary, "direction": "maximize",
        "plan": {"space": [s.describe() for s in plan.space], "base": dict(plan.base), "sites": plan.sites,
                 "trials": plan.trials, "timeout": plan.timeout, "seed": plan.seed,
                 "random-trials": plan.random_trials, "prune": plan.prune, "prune-after": plan.prune_after},
        "best": brief(best), "best-run-config": run_config_line({**plan.base, **best.params}) if best else None,
        "baseline": brief(baseline),
        "counts": {s: sum(1 for o in outcomes if o.state == s) for s in ("complete", "pruned", "failed", "running")},
        "notes": notes,
    })
    return TuneResult(plan, label, outcomes, best, baseline, files, notes)


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------


def _trial_line(o: TrialOutcome, done: int, total: int, label_short: str, best: TrialOutcome | None,
                elapsed: float) -> str:
    if o.state == "complete":
        result = f"{label_short} {fmt_metric(o.value)}"
    elif o.state == "pruned":
        result = f"pruned at round {o.pruned_at} ({label_short} {fmt_metric(o.value)})"
    else:
        result = f"FAILED: {o.error}"
    best_txt = f" | best {fmt_metric(best.value)} (trial {best.number})" if best is not None else ""
    tag = " [baseline]" if o.baseline else ""
    secs = f" | {o.seconds:.0f} s" if o.seconds is not None else " |"
    return (f"[trial {o.number}, {done}/{total}]{tag} {_params_text(o.params)} -> {result}{best_txt}{secs}, "
            f"elapsed {elapsed / 60:.1f} min")


def run_tune(plan: TunePlan, *, simulate_fn: Callable[..., Any] | None = None, log: Log = print) -> TuneResult:
    """Run (or continue) the study of ``plan`` and write its outputs.

    Parameters
    ----------
    plan:
        What to search and where.
    simulate_fn:
        Runs one trial (default :func:`simulation.runner.simulate`); called
        as ``simulate_fn(overrides, sites=, cpus_per_site=, on_line=,
        timeout=, ray_address=)``. ``on_line`` must receive the run's output
        lines; it raises to stop a pruned trial.
    log:
        Receives the progress lines (one per trial, plus notes).

    Raises
    ------
    TuneSpaceError, ConfigError, TuneError
        Before any trial, for a plan that cannot run.
    KeyboardInterrupt
        After writing the outputs of the trials so far (the study resumes
        where it stopped).
    """
    import optuna

    primary, label = validate_plan(plan)
    label_short = label.split(" ")[-1] if plan.objective == "val" else label
    if simulate_fn is None:
        from simulation.runner import simulate as simulate_fn
    num_rounds = parse_run_config(dict(plan.base)).num_server_rounds
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(plan.out_dir):
        study, resumed = _open_study(plan, log)
        if not resumed and plan.baseline:
            _enqueue_baseline(study, plan, log)
        done = _counted(study)
        if resumed:
            log(f"resuming the study in {plan.out_dir}: {done} of {plan.trials} trials done")
        t_start = time.time()
        try:
            while done < plan.trials:
                if plan.timeout is not None and time.time() - t_start >= plan.timeout:
                    log(f"--timeout {plan.timeout:g} s reached: no further trial starts ({done} of {plan.trials} done)")
                    break
                number = _run_trial(study, plan, primary, num_rounds, simulate_fn)
                done = _counted(study)
                result = _write_outputs(study, plan, label, primary, plots=False)
                last = next(o for o in result.outcomes if o.number == number)
                log(_trial_line(last, done, plan.trials, label_short, result.best, time.time() - t_start))
        finally:  # an interrupted study still writes what it has
            result = _write_outputs(study, plan, label, primary, plots=True)
    return result

