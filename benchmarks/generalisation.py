"""Benchmark: how far each task's recipes generalise to a hospital the federation never saw.

For ``pneumonia-cxr`` and ``lung-seg`` on the real data in ``../shared/data``,
every arm (the ``fast`` and ``accurate`` recipes, plus ``vit-tiny`` /
``fcn`` under the accurate budget when those models are registered) runs
``medfed simulate`` with ``--sites`` simulated sites (default 3),
``site-shift=true`` (every site but site 0 acquires its images through its own
simulated scanner: contrast, gamma, noise, blur, resolution) and
``holdout-sites=1``: the last site, acquisition-shifted, never trains and is
scored on all its images at the threshold chosen on the training sites'
validation counts. Reported per arm and seed: the pooled validation figure,
the unseen site's figure and the gap (validation minus unseen site) of the
task's primary metric (AUROC, Dice), and for pneumonia the figures on a
patient-disjoint **test split**:

* ``pneumonia-cxr``: ``../shared/data/cxr-pneumonia`` (Kermany et al. 2018,
  the official training split: 1349 normal, 3883 pneumonia, with
  ``patient_id``). ``--test-fraction`` of the patients (stratified by label,
  seeded by ``--split-seed``) form the test split; both manifests are written
  to ``benchmarks/out/generalisation/`` (absolute paths into the data folder:
  nothing is copied) and the rest is partitioned across the sites. The test
  split is read like a real site (no acquisition shift) and is scored after
  every round; it played no part in choosing the recipes.
* ``lung-seg``: ``../shared/data/lung-seg`` (Montgomery County, 138 chest
  X-rays with lung masks), all of it partitioned (no test split: too few
  images).

Figures: AUROC with a Hanley-McNeil 95 % interval, sensitivity and
specificity at the operating threshold with Wilson 95 % intervals, Dice as the
mean over images; with several seeds the table shows mean ± sd over seeds.
Training runs in fp32 by default (``--precision``): ``auto`` picks bf16,
which CPUs without native bf16 only emulate, slowly.

    python benchmarks/generalisation.py [--tasks pneumonia-cxr,lung-seg] [--seeds 0] [--sites 3]
    make benchmark-generalisation

Prints a markdown table and writes JSON (default
``benchmarks/out/generalisation.json``); every run's results folder is kept
under ``benchmarks/out/generalisation/runs/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.atomic import write_json  # noqa: E402
from shared.data.splits import train_val_split  # noqa: E402
from shared.formatting import fmt_metric  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out"
TASKS = ("pneumonia-cxr", "lung-seg")
DATASETS = {"pneumonia-cxr": DATA / "cxr-pneumonia" / "manifest.csv", "lung-seg": DATA / "lung-seg" / "manifest.csv"}
WITH_TEST_SPLIT = ("pneumonia-cxr",)
#: Architectures from other branches, run under the accurate recipe's budget once registered (task -> model).
EXTRA_MODELS = {"pneumonia-cxr": "vit-tiny", "lung-seg": "fcn"}


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The rows of a manifest CSV as dicts (header as written)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def patient_test_split(rows: Sequence[dict[str, str]], test_fraction: float, seed: int,
                       ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train rows, test rows)``: a seeded, label-stratified, patient-disjoint split of a manifest.

    The same splitter as a site's train/validation split
    (:func:`shared.data.splits.train_val_split`): patients are shuffled within
    the stratum of their majority label and each stratum gives about
    ``test_fraction`` of its images; no patient is on both sides. Rows
    without a ``patient_id`` are their own patient.
    """
    labels_text = [r.get("label", "") for r in rows]
    names = sorted(set(labels_text))
    labels = np.array([names.index(t) for t in labels_text], dtype=np.int64)
    groups = np.array([r.get("patient_id") or f"row-{i}" for i, r in enumerate(rows)], dtype=object)
    train, test = train_val_split(labels, test_fraction, seed=seed, groups=groups)
    return [rows[int(i)] for i in train], [rows[int(i)] for i in test]


def write_manifest(path: Path, rows: Sequence[dict[str, str]], base: Path) -> Path:
    """Write ``rows`` as a manifest at ``path`` with absolute file paths (``base`` / each path column), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    path_columns = [c for c in ("path", "image", "mask") if c in fields]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{c: str((base / r[c]).resolve()) for c in path_columns}})
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class TaskData:
    """What one task's runs read: the manifest to partition and the test split (None: no test split)."""

    data_path: Path
    test_path: Path | None
    train_images: int
    test_images: int


def prepare_data(task: str, source: Path, out: Path, *, test_fraction: float, split_seed: int) -> TaskData:
    """The task's data manifests: for a task with a test split, the patient-disjoint train and test manifests."""
    rows = read_manifest(source)
    if task not in WITH_TEST_SPLIT:
        return TaskData(source, None, len(rows), 0)
    train, test = patient_test_split(rows, test_fraction, split_seed)
    stem = f"{task}-split{split_seed}"
    return TaskData(write_manifest(out / f"{stem}-train.csv", train, source.parent),
                    write_manifest(out / f"{stem}-test.csv", test, source.parent), len(train), len(test))


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One row of the table: a recipe, optionally with another model under its budget."""

    task: str
    recipe: str
    model: str = ""

    @property
    def name(self) -> str:
        """``fast``, ``accurate`` or ``accurate + vit-tiny``."""
        return self.recipe + (f" + {self.model}" if self.model else "")


def arms_for(task: str, recipes: Sequence[str], registered: Callable[[str], bool]) -> tuple[list[Arm], list[str]]:
    """The arms to run for ``task`` and notes on those skipped (an extra model not registered yet)."""
    arms = [Arm(task, r) for r in recipes]
    notes = []
    extra = EXTRA_MODELS.get(task)
    if extra and "accurate" in recipes:
        if registered(extra):
            arms.append(Arm(task, "accurate", extra))
        else:
            notes.append(f"{task}: no '{extra}' row: that model is not registered in this version (not merged yet)")
    return arms, notes


def run_overrides(arm: Arm, data: TaskData, *, seed: int, sites: int, precision: str, results_dir: Path,
                  run_name: str) -> dict[str, Any]:
    """The run config of one arm: the recipe (and model), the shifted held-out site and the data."""
    flat: dict[str, Any] = {
        "task": arm.task, "recipe": arm.recipe, "data-path": str(data.data_path), "site-shift": True,
        "holdout-sites": 1, "min-sites": sites - 1, "seed": seed, "precision": precision,
        "results-dir": str(results_dir), "run-name": run_name,
    }
    if arm.model:
        flat["model"] = arm.model
    if data.test_path is not None:
        flat["test-path"] = str(data.test_path)
    return flat


def hanley_mcneil(auroc: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """95 % interval of an AUROC from Hanley & McNeil (1982)'s standard error (clipped to [0, 1])."""
    if not (n_pos and n_neg) or not math.isfinite(auroc):
        return float("nan"), float("nan")
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, a - 1.96 * se), min(1.0, a + 1.96 * se)


def figures(metrics: dict[str, Any], primary: str) -> dict[str, Any]:
    """The figures of one evaluation (validation, unseen site or test) that the table reports."""
    from shared.metrics.fairness import wilson_interval

    out: dict[str, Any] = {primary: metrics.get(primary), "num-examples": metrics.get("num-examples")}
    if primary == "auroc":
        tp, fn = int(metrics.get("tp", 0)), int(metrics.get("fn", 0))
        tn, fp = int(metrics.get("tn", 0)), int(metrics.get("fp", 0))
        out["auroc-ci"] = hanley_mcneil(float(metrics.get("auroc", float("nan"))), tp + fn, tn + fp)
        out["specificity@0.5"] = metrics.get("specificity")
        out["threshold"] = metrics.get("threshold")
        for name, hit, miss in (("sensitivity", "tp@thr", "fn@thr"), ("specificity", "tn@thr", "fp@thr")):
            if hit in metrics:
                h, m = int(metrics[hit]), int(metrics[miss])
                out[f"{name}@thr"] = metrics.get(f"{name}@thr")
                out[f"{name}@thr-ci"] = wilson_interval(h, h + m)
        if out.get("sensitivity@thr") is not None and out.get("specificity@thr") is not None:
            out["balanced-accuracy@thr"] = (out["sensitivity@thr"] + out["specificity@thr"]) / 2
    return out


def run_arm(arm: Arm, data: TaskData, *, seed: int, sites: int, precision: str, runs_dir: Path) -> dict[str, Any]:
    """Run one arm and seed; its validation, unseen-site and test figures and the wall time."""
    from shared.results import RunFolder
    from shared.tasks import get_task
    from simulation.runner import simulate

    name = f"{arm.task}-{arm.name.replace(' + ', '-')}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    flat = run_overrides(arm, data, seed=seed, sites=sites, precision=precision, results_dir=runs_dir, run_name=name)
    result = simulate(flat, sites=sites)
    folder = RunFolder.open(result.run_dir)
    summary, config = folder.read_summary(), folder.run_config()
    primary = get_task(arm.task).view.primary
    row: dict[str, Any] = {
        "task": arm.task, "arm": arm.name, "seed": seed, "wall-seconds": result.seconds,
        "run-dir": str(result.run_dir),
        "config": {k: config.get(k) for k in ("recipe", "model", "image-size", "num-server-rounds", "local-epochs",
                                              "batch-size", "lr", "normalize", "robust-augment")},
        "primary": primary,
        "validation": figures(summary.get("final", {}), primary),
        "unseen-site": figures(summary.get("final-holdout", {}), primary),
    }
    if summary.get("final-test"):
        row["test"] = figures(summary["final-test"], primary)
    cal = summary.get("calibration") or {}
    if data.test_path is not None and cal.get("status") == "fitted":
        # the saved model as a hospital uses it (medfed evaluate): calibrated vs raw probabilities on the test split
        from shared.inference import evaluate_dataset, load_trained

        scored = evaluate_dataset(load_trained(result.run_dir), data.test_path)
        row["test-calibration"] = {k: scored.calibration.get(k) for k in ("ece-uncalibrated", "ece",
                                                                          "nll-uncalibrated", "nll")}
    if cal.get("status") == "fitted":  # federated calibration on the training sites' validation data
        row["calibration"] = {k: cal.get(k) for k in ("method", "temperature", "ece-before", "ece-after",
                                                      "nll-before", "nll-after")}
    val, unseen = row["validation"][primary], row["unseen-site"][primary]
    row["gap"] = val - unseen if val is not None and unseen is not None else None
    return row


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------


def _mean_sd(values: Sequence[float | None]) -> str:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt_metric(vals[0])
    return f"{fmt_metric(float(np.mean(vals)))} ± {fmt_metric(float(np.std(vals, ddof=1)))}"


def _interval(fig: dict[str, Any], key: str) -> str:
    value, ci = fig.get(key), fig.get(f"{key}-ci")
    if value is None:
        return "n/a"
    if not ci or ci[0] is None or not math.isfinite(float(ci[0])):
        return fmt_metric(value)
    return f"{fmt_metric(value)} ({fmt_metric(ci[0])}-{fmt_metric(ci[1])})"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one line per (task, arm): seeds pooled as mean ± sd, intervals shown for a single seed."""
    head = ["task", "arm", "model / px / rounds x epochs", "validation", "unseen site", "gap", "test AUROC",
            "test sens@thr", "test spec@thr", "test spec@0.5", "val ECE before -> after calibration",
            "test ECE raw -> calibrated", "seeds", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["arm"]), []).append(r)
    for (task, arm), rs in groups.items():
        c, p = rs[0]["config"], rs[0]["primary"]
        budget = f"{c['model']} / {c['image-size']} / {c['num-server-rounds']} x {c['local-epochs']}"
        one = len(rs) == 1
        tests = [r["test"] for r in rs if "test" in r]

        def cell(key: str, tests: list[dict[str, Any]] = tests, one: bool = one) -> str:
            if not tests:
                return "n/a"
            return _interval(tests[0], key) if one else _mean_sd([t.get(key) for t in tests])

        val = _interval(rs[0]["validation"], p) if one else _mean_sd([r["validation"][p] for r in rs])
        unseen = _interval(rs[0]["unseen-site"], p) if one else _mean_sd([r["unseen-site"][p] for r in rs])
        cells = [task, arm, budget, f"{p} {val}", f"{p} {unseen}", _mean_sd([r["gap"] for r in rs]),
                 cell("auroc"), cell("sensitivity@thr"), cell("specificity@thr"),
                 _mean_sd([t.get("specificity@0.5") for t in tests]) if tests else "n/a",
                 _ece_cell(rs), _test_ece_cell(rs),
                 ",".join(str(r["seed"]) for r in rs), f"{sum(r['wall-seconds'] for r in rs) / 60:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ece_cell(rows: Sequence[dict[str, Any]]) -> str:
    """Pooled validation ECE before -> after the federated calibration (mean over seeds); n/a when none was fitted."""
    cals = [r["calibration"] for r in rows if r.get("calibration")]
    if not cals:
        return "n/a"
    return f"{_mean_sd([c['ece-before'] for c in cals])} -> {_mean_sd([c['ece-after'] for c in cals])}"


def _test_ece_cell(rows: Sequence[dict[str, Any]]) -> str:
    """Test-split ECE of the saved model's raw -> calibrated probabilities (``medfed evaluate``'s figures)."""
    cals = [r["test-calibration"] for r in rows if r.get("test-calibration")]
    if not cals:
        return "n/a"
    return f"{_mean_sd([c['ece-uncalibrated'] for c in cals])} -> {_mean_sd([c['ece'] for c in cals])}"


def gap_changes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per task: how much the accurate recipe narrows (or widens) the unseen-site gap, seeds averaged.

    The gap is validation minus unseen site; it is negative when the unseen site is the easier one. "Narrows"
    compares its size |gap| (how far the held-out hospital's figure lies from the validation figure, either way),
    averaged over seeds (a mean of signed gaps would let opposite seeds cancel); the mean signed gaps and the
    unseen-site figures are printed too so that a reader can judge the direction.
    """
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        primary = next(r["primary"] for r in rows if r["task"] == task)
        mine = {arm: [r for r in rows if r["task"] == task and r["arm"] == arm and r.get("gap") is not None]
                for arm in ("fast", "accurate")}
        if mine["fast"] and mine["accurate"]:
            gap = {arm: float(np.mean([r["gap"] for r in rs])) for arm, rs in mine.items()}
            size = {arm: float(np.mean([abs(r["gap"]) for r in rs])) for arm, rs in mine.items()}
            unseen = {arm: float(np.mean([r["unseen-site"][primary] for r in rs])) for arm, rs in mine.items()}
            fast, acc = gap["fast"], gap["accurate"]
            verb = "narrows" if size["accurate"] < size["fast"] else "does not narrow"
            out.append(f"{task}: accurate {verb} the unseen-site gap: |gap| {size['fast']:.3f} (fast, {fast:+.3f}) -> "
                       f"{size['accurate']:.3f} (accurate, {acc:+.3f}), change {size['accurate'] - size['fast']:+.3f}; "
                       f"unseen-site {primary} {unseen['fast']:.3f} -> {unseen['accurate']:.3f}")
    return out


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _model_registered(name: str) -> bool:
    from shared.models import model_names

    return name in model_names()


def previous_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier (possibly interrupted) run of this benchmark at ``path``; none when absent or unreadable."""
    try:
        rows = json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in rows if isinstance(r, dict) and {"task", "arm", "seed"} <= r.keys()]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); 0 when every run finished."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, of " + ", ".join(TASKS))
    ap.add_argument("--recipes", default="fast,accurate")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (partition, site profiles, training): "
                    "each seed draws another partition and another acquisition-shifted held-out site")
    ap.add_argument("--extra-seeds", default="0",
                    help="the seeds (of --seeds) at which the vit-tiny / fcn rows run (they take the longest)")
    ap.add_argument("--sites", type=int, default=3, help="simulated sites; the last one is the held-out site")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="share of pneumonia patients in the test split")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "auto", "bf16"))
    ap.add_argument("--no-extra-models", action="store_true", help="skip the vit-tiny / fcn rows")
    ap.add_argument("--out", type=Path, default=OUT / "generalisation.json")
    ap.add_argument("--rerun", action="store_true",
                    help="run every arm again (default: an arm and seed already in --out is reused, not rerun)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    extra_seeds = {int(s) for s in args.extra_seeds.split(",") if s.strip()}
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        ap.error(f"--tasks: unknown {unknown}; expected some of {', '.join(TASKS)}")
    work = args.out.parent / args.out.stem
    runs_dir = work / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [] if args.rerun else previous_rows(args.out)
    done = {(r["task"], r["arm"], r["seed"]) for r in rows}
    if rows:
        print(f"reusing {len(rows)} finished run(s) from {args.out} (--rerun runs them again)")
    notes: list[str] = []
    data_info: dict[str, Any] = {}
    t0 = time.time()
    for task in tasks:
        source = DATASETS[task]
        if not source.exists():
            print(f"{task}: data not found at {source}: skipped", file=sys.stderr)
            notes.append(f"{task}: data not found: skipped")
            continue
        data = prepare_data(task, source, work, test_fraction=args.test_fraction, split_seed=args.split_seed)
        data_info[task] = {"data-path": str(data.data_path), "test-path": str(data.test_path or ""),
                           "images-partitioned": data.train_images, "test-images": data.test_images}
        registered = (lambda _name: False) if args.no_extra_models else _model_registered
        arms, skipped = arms_for(task, recipes, registered)
        for note in skipped:
            print(note)
        notes += skipped
        for arm in arms:
            for seed in seeds:
                if (task, arm.name, seed) in done or (arm.model and seed not in extra_seeds):
                    continue
                print(f"{task} / {arm.name} / seed {seed} ...", flush=True)
                row = run_arm(arm, data, seed=seed, sites=args.sites, precision=args.precision, runs_dir=runs_dir)
                p = row["primary"]
                print(f"  validation {p} {fmt_metric(row['validation'][p])}, unseen site "
                      f"{fmt_metric(row['unseen-site'][p])}, gap {fmt_metric(row['gap'], spec='+.3f')}"
                      + (f", test AUROC {fmt_metric(row['test']['auroc'])}" if "test" in row else "")
                      + f" ({row['wall-seconds'] / 60:.1f} min)", flush=True)
                rows.append(row)
                write_json(args.out, {"rows": rows, "notes": notes, "data": data_info, "partial": True})
    text = table(rows)
    changes = gap_changes(rows)
    write_json(args.out, {
        "rows": rows, "notes": notes, "data": data_info, "table": text, "gap-changes": changes,
        "settings": {"sites": args.sites, "seeds": seeds, "extra-seeds": sorted(extra_seeds),
                     "test-fraction": args.test_fraction, "split-seed": args.split_seed,
                     "precision": args.precision, "site-shift": True, "holdout-sites": 1},
        "wall-seconds": time.time() - t0,
    })
    print()
    print(text)
    for line in changes + notes:
        print(line)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
