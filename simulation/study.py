"""Privacy/accuracy study: the same simulation at several epsilons x seeds.

``medfed study privacy`` runs :func:`simulation.runner.simulate` once per
(target epsilon, seed): ``inf`` means no DP (``dp.enabled=false``), a finite
epsilon sets ``dp.enabled=true dp.target-epsilon=EPS`` (the sites calibrate
the DP-SGD noise for the whole planned run). Every other run-config override
is passed through unchanged. Each finished run is read back from its results
folder (``summary.json``, ``metrics.json``), audited with the loss-threshold
membership-inference attack (:mod:`shared.privacy.audit`), and the study
writes into its output folder::

    <out>/
        runs/eps-<E>-seed-<S>/      each run's own results folder (+ membership-audit.json)
        study.csv, study.json       one row per target epsilon: mean/std over seeds
        runs.csv                    one row per run (failed runs included, with the reason)
        study.md                    the markdown table also printed to stdout
        utility_vs_epsilon.png      utility (mean +- std over seeds) against epsilon

Achieved epsilon, delta and noise multiplier come from the per-site training
metrics ``dp-epsilon`` (cumulative), ``dp-delta`` and ``dp-noise-multiplier``
that DP-SGD sites report each round; when a run has none (DP not active at
the sites) they are NaN and shown as ``n/a``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import ConfigError, ConfigValue, parse_run_config
from shared.formatting import NA, fmt_metric
from shared.results import RunFolder
from simulation import study_core as core
from simulation.study_core import RunOutcome, parse_seeds

__all__ = [
    "RunOutcome",
    "StudyPlan",
    "StudyResult",
    "epsilon_label",
    "markdown_table",
    "parse_epsilons",
    "parse_seeds",
    "plot_utility",
    "read_run_metrics",
    "run_overrides",
    "run_study",
    "summarize",
    "validate_plan",
    "write_outputs",
]

DEFAULT_EPSILONS = "inf,8,3,1"
DEFAULT_SEEDS = "0,1"
#: Keys the study sets itself for every run; the user chooses them with study options instead.
STUDY_KEYS = {
    "dp.enabled": "--epsilons",
    "dp.target-epsilon": "--epsilons",
    "dp.noise-multiplier": "--epsilons",
    "seed": "--seeds",
    "run-name": "(set per run by the study)",
    "results-dir": "--out",
}
RUNS_FOLDER = "runs"
AUDIT_FILE = "membership-audit.json"
PLOT_FILE = "utility_vs_epsilon.png"

Log = core.Log


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"inf,8,3,1"`` -> ``(inf, 8.0, 3.0, 1.0)`` (order kept, duplicates refused).

    Raises
    ------
    ConfigError
        For a value that is not a positive number or ``inf``.
    """
    out: list[float] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        try:
            eps = float(raw)
        except ValueError:
            eps = math.nan
        if math.isnan(eps) or eps <= 0:
            raise ConfigError(
                f"--epsilons: expected positive numbers or 'inf' separated by commas (e.g. '{DEFAULT_EPSILONS}'), "
                f"got {raw!r} in {text!r}."
            )
        if eps in out:
            raise ConfigError(f"--epsilons: {raw!r} is listed twice in {text!r}; list each epsilon once.")
        out.append(eps)
    if not out:
        raise ConfigError(f"--epsilons: expected at least one epsilon (e.g. '{DEFAULT_EPSILONS}'), got {text!r}.")
    return tuple(out)


def epsilon_label(eps: float) -> str:
    """``inf`` -> ``"inf"``, ``8.0`` -> ``"8"``, ``0.5`` -> ``"0.5"``."""
    return "inf" if math.isinf(eps) else f"{eps:g}"


@dataclass(frozen=True)
class StudyPlan:
    """What a privacy study runs."""

    out_dir: Path
    epsilons: tuple[float, ...] = (math.inf, 8.0, 3.0, 1.0)
    seeds: tuple[int, ...] = (0, 1)
    sites: int = 3
    overrides: Mapping[str, ConfigValue] = field(default_factory=dict)
    cpus_per_site: int = 1
    audit: bool = True
    run_timeout: float | None = None
    echo: bool = False

    @property
    def runs_dir(self) -> Path:
        """Parent folder of the runs' results folders."""
        return self.out_dir / RUNS_FOLDER

    def runs(self) -> list[tuple[float, int]]:
        """Every (epsilon, seed) in run order: epsilon-major, as listed."""
        return [(eps, seed) for eps in self.epsilons for seed in self.seeds]


def run_name(eps: float, seed: int) -> str:
    """Results-folder name of one run of the study."""
    return f"eps-{epsilon_label(eps)}-seed-{seed}"


def run_overrides(plan: StudyPlan, eps: float, seed: int) -> dict[str, ConfigValue]:
    """The run config overrides of one run: the user's, plus DP, seed and where results go."""
    values: dict[str, ConfigValue] = dict(plan.overrides)
    if math.isinf(eps):
        values["dp.enabled"] = False
    else:
        values.update({"dp.enabled": True, "dp.target-epsilon": float(eps), "dp.noise-multiplier": 0.0})
    values.update({"seed": seed, "results-dir": str(plan.runs_dir), "run-name": run_name(eps, seed)})
    return values


def validate_plan(plan: StudyPlan) -> str:
    """Check the whole plan before any run starts; return the task's primary metric name.

    Raises
    ------
    ConfigError
        When the user sets a key the study controls, an override is invalid
        for some epsilon, or the plan cannot run (sites, existing folder).
    """
    from shared.tasks import get_task

    core.refuse_study_keys(plan.overrides, STUDY_KEYS, "medfed study privacy")
    if plan.sites < 1:
        raise ConfigError(f"--sites: expected an integer >= 1, got {plan.sites}.")
    cfg = None
    for eps in plan.epsilons:
        cfg = parse_run_config(run_overrides(plan, eps, plan.seeds[0]))
        if cfg.strategy.min_sites > plan.sites:
            raise ConfigError(
                f"min-sites is {cfg.strategy.min_sites} but the study simulates {plan.sites} sites: "
                f"use --sites {cfg.strategy.min_sites} or --run-config \"min-sites={plan.sites}\"."
            )
    core.check_fresh(plan.out_dir, plan.runs_dir)
    assert cfg is not None
    return get_task(cfg.task).view.primary


# ---------------------------------------------------------------------------
# Reading one run back
# ---------------------------------------------------------------------------


def read_run_metrics(run_dir: Path, primary: str) -> dict[str, float]:
    """Final utility and DP figures of a finished run, from its results folder.

    Returns ``rounds``, ``<primary>``, ``accuracy``, ``worst-site-<primary>``
    (lowest final per-site value), ``achieved-epsilon`` (max of the sites'
    cumulative ``dp-epsilon`` over all rounds), ``delta`` (max ``dp-delta``)
    and ``noise-multiplier`` (min ``dp-noise-multiplier``, the least noise any
    site used); each NaN when the run did not report it.
    """
    folder = RunFolder(run_dir)
    summary = folder.read_summary()
    final = summary.get("final", {})
    per_site = [core.num(s.get(primary)) for s in summary.get("final-per-site", {}).values()]
    per_site = [v for v in per_site if not math.isnan(v)]
    eps, delta, noise = [], [], []
    for r in folder.read_rounds():
        for s in r.get("train-sites", {}).values():
            eps.append(core.num(s.get("dp-epsilon")))
            delta.append(core.num(s.get("dp-delta")))
            noise.append(core.num(s.get("dp-noise-multiplier")))

    def agg(values: list[float], fn: Callable[[list[float]], float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return fn(finite) if finite else math.nan

    return {
        "rounds": float(summary.get("rounds", math.nan)),
        primary: core.num(final.get(primary)),
        "accuracy": core.num(final.get("accuracy")),
        f"worst-site-{primary}": min(per_site) if per_site else math.nan,
        "achieved-epsilon": agg(eps, max),
        "delta": agg(delta, max),
        "noise-multiplier": agg(noise, min),
    }


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


@dataclass
class StudyResult:
    """A finished study: rows per epsilon, every run, where the outputs are."""

    plan: StudyPlan
    primary: str
    rows: list[dict[str, Any]]
    outcomes: list[RunOutcome]
    table: str
    files: dict[str, Path]

    @property
    def failed(self) -> int:
        """Runs that failed, plus finished runs whose audit failed."""
        return sum(1 for o in self.outcomes if o.failed)


def _audit(run_dir: Path, sites: int) -> tuple[dict[str, float], str]:
    from shared.privacy.audit import audit_run, audit_summary
    from shared.results import write_json

    try:
        audit = audit_run(run_dir, sites=sites)
    except Exception as exc:  # noqa: BLE001 - an audit failure is recorded, the study goes on
        return dict(audit_summary(None)), core.first_line(exc)
    write_json(run_dir / AUDIT_FILE, audit.to_dict())
    return dict(audit_summary(audit)), ""


def run_study(plan: StudyPlan, *, simulate_fn: Callable[..., Any] | None = None, log: Log = print) -> StudyResult:
    """Run every (epsilon, seed) of ``plan`` and write the study outputs.

    Parameters
    ----------
    plan:
        What to run and where to write.
    simulate_fn:
        Runs one simulation (default :func:`simulation.runner.simulate`);
        called as ``simulate_fn(overrides, sites=, cpus_per_site=, echo=, timeout=)``
        and must return an object with ``run_dir``.
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
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    runs = [_planned(plan, primary, eps, seed, simulate_fn) for eps, seed in plan.runs()]

    def write(outcomes: list[RunOutcome], complete: bool) -> tuple[list[dict[str, Any]], str, dict[str, Path]]:
        rows = summarize(outcomes, plan.epsilons, primary, audit=plan.audit)
        table = markdown_table(rows, primary, audit=plan.audit)
        return rows, table, write_outputs(plan, primary, rows, outcomes, table, complete=complete)

    outcomes, (rows, table, files) = core.run_and_write(runs, log, write)
    return StudyResult(plan, primary, rows, outcomes, table, files)


def _planned(plan: StudyPlan, primary: str, eps: float, seed: int, simulate_fn: Callable[..., Any]) -> core.PlannedRun:
    """One (epsilon, seed) run: simulate, read the figures back, audit."""

    def execute() -> core.RunReport:
        res = simulate_fn(run_overrides(plan, eps, seed), sites=plan.sites, cpus_per_site=plan.cpus_per_site,
                          echo=plan.echo, timeout=plan.run_timeout)
        run_dir = Path(res.run_dir)
        metrics = read_run_metrics(run_dir, primary)
        audit_error = ""
        if plan.audit:
            audit_metrics, audit_error = _audit(run_dir, plan.sites)
            metrics.update(audit_metrics)
        extra = f", audit failed: {audit_error}" if audit_error else (
            f", MIA AUC {fmt_metric(metrics.get('mia-auc', math.nan))}" if plan.audit else "")
        text = (f"{primary} {fmt_metric(metrics[primary])}, achieved eps {fmt_metric(metrics['achieved-epsilon'], 2)}"
                f"{extra}")
        return core.RunReport(run_dir, metrics, {"audit-error": audit_error}, text)

    return core.PlannedRun(key=(eps, seed), labels={"epsilon-target": epsilon_label(eps), "seed": seed},
                           tag=f"eps={epsilon_label(eps)} seed={seed}", run_dir=plan.runs_dir / run_name(eps, seed),
                           execute=execute, notes={"audit-error": ""})


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def summarize(outcomes: Sequence[RunOutcome], epsilons: Sequence[float], primary: str, *,
              audit: bool = True) -> list[dict[str, Any]]:
    """One row per target epsilon (in ``epsilons`` order): means and sample std over the seeds that finished.

    ``achieved-epsilon``, ``delta`` are the max over seeds (and sites);
    ``noise-multiplier`` and ``rounds`` the mean; ``worst-site-<primary>``
    is the lowest final per-site value over all sites and seeds.
    """
    rows: list[dict[str, Any]] = []
    for eps in epsilons:
        mine = [o for o in outcomes if o.key[0] == eps]
        ok = [o.metrics for o in mine if o.ok]

        def col(key: str, ok: list[dict[str, float]] = ok) -> list[float]:
            return [m.get(key, math.nan) for m in ok]

        p_mean, p_std = core.mean_std(col(primary))
        a_mean, a_std = core.mean_std(col("accuracy"))
        worst = [v for v in col(f"worst-site-{primary}") if not math.isnan(v)]
        row: dict[str, Any] = {
            "epsilon-target": epsilon_label(eps),
            "achieved-epsilon": core.agg_max(col("achieved-epsilon")),
            "delta": core.agg_max(col("delta")),
            "noise-multiplier": core.mean_std(col("noise-multiplier"))[0],
            "rounds": core.mean_std(col("rounds"))[0],
            "seeds-ok": len(ok),
            "seeds-failed": len(mine) - len(ok),
            f"{primary}-mean": p_mean,
            f"{primary}-std": p_std,
            "accuracy-mean": a_mean,
            "accuracy-std": a_std,
            f"worst-site-{primary}": min(worst) if worst else math.nan,
        }
        if audit:
            row["mia-auc"] = core.mean_std(col("mia-auc"))[0]
            row["mia-tpr@1%fpr"] = core.mean_std(col("mia-tpr@1%fpr"))[0]
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], primary: str, *, audit: bool = True) -> str:
    """The study rows as a GitHub markdown table (``n/a`` for missing figures, ``FAILED`` for failed runs)."""
    name = primary.upper() if primary == "auroc" else primary.capitalize()
    head = ["target eps", "achieved eps", "delta", "noise mult.", "rounds", f"{name} mean ± std",
            "accuracy mean ± std", f"worst-site {name}"]
    if audit:
        head += ["MIA AUC", "MIA TPR@1%FPR"]
    head.append("runs")
    body = []
    for r in rows:
        def pm(k: str, r: Mapping[str, Any] = r) -> str:
            std = fmt_metric(r[f"{k}-std"])
            return fmt_metric(r[f"{k}-mean"]) + ("" if std == NA else f" ± {std}")
        delta = fmt_metric(r["delta"], spec=".1e")
        rounds = fmt_metric(r["rounds"], spec="g")
        cells = [r["epsilon-target"], fmt_metric(r["achieved-epsilon"], 2), delta,
                 fmt_metric(r["noise-multiplier"]), rounds,
                 pm(primary), pm("accuracy"), fmt_metric(r[f"worst-site-{primary}"])]
        if audit:
            cells += [fmt_metric(r["mia-auc"]), fmt_metric(r["mia-tpr@1%fpr"])]
        runs = f"{r['seeds-ok']} ok" + (f", {r['seeds-failed']} FAILED" if r["seeds-failed"] else "")
        cells.append(runs)
        body.append(cells)
    return core.markdown_table(head, body)


def _epsilon_axis(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, std_key: str | None, label: str,
                  color: str, worst_key: str | None = None) -> None:
    """Draw ``key`` (± ``std_key``) against target epsilon on a log axis, ``inf`` as a separate square at the right."""
    finite = sorted((float(r["epsilon-target"]), r) for r in rows if r["epsilon-target"] != "inf")
    nodp = [r for r in rows if r["epsilon-target"] == "inf"]
    inf_x = (finite[-1][0] * 4.0) if finite else 1.0

    def err(rs: Sequence[Mapping[str, Any]]) -> list[float] | None:
        if std_key is None:
            return None
        return [0.0 if math.isnan(r[std_key]) else r[std_key] for r in rs]

    if finite:
        xs, rs = [x for x, _ in finite], [r for _, r in finite]
        ax.errorbar(xs, [r[key] for r in rs], yerr=err(rs), marker="o", capsize=4, color=color,
                    label=f"{label}, DP-SGD")
        if worst_key:
            ax.plot(xs, [r[worst_key] for r in rs], linestyle="--", marker="v", color=color, alpha=0.5,
                    label="worst site")
    if nodp:
        ax.errorbar([inf_x], [nodp[0][key]], yerr=err(nodp), marker="s", markersize=8, capsize=4, color="tab:red",
                    linestyle="none", label=f"{label}, no DP")
        if worst_key:
            ax.plot([inf_x], [nodp[0][worst_key]], marker="v", color="tab:red", alpha=0.5, linestyle="none")
    ax.set_xscale("log")
    ticks = [x for x, _ in finite] + ([inf_x] if nodp else [])
    ax.set_xticks(ticks, [f"{x:g}" for x, _ in finite] + (["∞\n(no DP)"] if nodp else []))
    ax.minorticks_off()
    ax.margins(x=0.15)
    ax.set_xlabel("target ε (per site, whole run)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)


def plot_utility(rows: Sequence[Mapping[str, Any]], primary: str, path: Path) -> Path:
    """Plot utility (mean ± std over seeds) against target epsilon, ``inf`` (no DP) as a separate marker at the right.

    When the rows carry membership-inference results, a second panel shows
    the attack AUC against epsilon.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = primary.upper() if primary == "auroc" else primary.capitalize()
    mia = any(not math.isnan(r.get("mia-auc", math.nan)) for r in rows)
    fig, axes = plt.subplots(1, 2 if mia else 1, figsize=(10.5 if mia else 6.0, 4.4), dpi=110, squeeze=False)
    ax = axes[0][0]
    _epsilon_axis(ax, rows, f"{primary}-mean", f"{primary}-std", name, "tab:blue", f"worst-site-{primary}")
    ax.set_ylabel(f"pooled validation {name}")
    ax.set_title("Utility vs privacy")
    if mia:
        ax2 = axes[0][1]
        _epsilon_axis(ax2, rows, "mia-auc", None, "attack AUC", "tab:purple")
        ax2.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax2.set_ylabel("membership-inference AUC (0.5 = chance)")
        ax2.set_title("Loss-threshold membership inference")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(plan: StudyPlan, primary: str, rows: Sequence[Mapping[str, Any]], outcomes: Sequence[RunOutcome],
                  table: str, *, complete: bool = True) -> dict[str, Path]:
    """Write study.csv, study.json, runs.csv, study.md and the plot into ``plan.out_dir``."""
    payload = {
        "study": "privacy",
        "primary-metric": primary,
        "plan": {"epsilons": [epsilon_label(e) for e in plan.epsilons], "seeds": list(plan.seeds),
                 "sites": plan.sites, "overrides": dict(plan.overrides), "audit": plan.audit},
        "notes": ("achieved-epsilon = max over sites and seeds of the cumulative 'dp-epsilon' the sites report "
                  "(NaN when no site reported it: DP not active); std = sample std over seeds (NaN with one seed); "
                  "mia-* = loss-threshold membership inference (empirical audit, not a proof)."),
    }
    files = core.write_study_files(plan.out_dir, rows, outcomes, table, payload, complete=complete,
                                   planned=len(plan.runs()))
    files["plot"] = plot_utility(rows, primary, plan.out_dir / PLOT_FILE)
    return files
