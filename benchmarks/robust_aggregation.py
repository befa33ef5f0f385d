"""Benchmark: one poisoning site among five, under FedAvg and the robust strategies.

Runs ``medfed simulate`` (Flower's simulation engine, the real server loop,
gate and sites) on synthetic chest X-ray phantoms (``pneumonia-cxr``,
``small-cnn`` at 64 px), once per row below. In the attacked rows the last
simulated site (``site-4`` of 5) trains honestly and then sends
``global - 10 * (w - global)`` every round (``sim-attack='sign-flip'``,
:mod:`shared.attacks`). The norm screen (``validation.norm-z``, on by
default) is switched off (``validation.norm-z=0 validation.max-update-ratio=0``)
in every row but ``fedavg + screen``, so each robust strategy is measured
on its own.

For each run's final global model (``model.pt``) the script reports, with
the task's own evaluation code (:meth:`Objective.evaluate` and
:func:`shared.metrics.federated.pool_evaluations`, i.e. counts pooled as the
server pools them):

* ``val AUROC (honest)``: pooled over the honest sites' validation splits
  only (the attacker's own split left out, also in the no-attack reference,
  so every row scores the same images);
* ``test AUROC``: on a held-out phantom test set rendered with another seed
  (never partitioned, never trained on), with a 95 % bootstrap interval
  over test images (1000 stratified resamples, exact AUROC);
* ``val AUROC (server)``: the run's own final pooled validation AUROC over
  every site that evaluated (what ``medfed simulate`` printed);
* the attacker's training replies the gate rejected, over all rounds.

Bulyan tolerates ``f`` malicious sites only with ``4f + 3`` sites per round
(``shared/config.py`` enforces it, as Flower's ``Bulyan`` does): with ``f = 1``
it needs 7 sites, so its row (and a FedAvg row for comparison) simulates 7
sites with the same single attacker. Krum and Multi-Krum need ``2f + 3 = 5``
(``min-sites=5``, ``krum.num-malicious=1``; Multi-Krum averages
``min-sites - f = 4`` updates).

Prints a table and writes JSON (default ``benchmarks/out/robust_aggregation.json``);
each run's results folder is kept under ``benchmarks/out/robust-runs/`` and a
finished one is reused on the next invocation (``--fresh`` reruns everything).

    nice -n 19 python benchmarks/robust_aggregation.py [--rounds 4] [--local-epochs 2] [--only fedavg-screen,krum]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "out"
ATTACK = {"sim-attack": "sign-flip", "sim-attack-sites": 1, "sim-attack-scale": 10.0}
SCREEN_OFF = {"validation.norm-z": 0.0, "validation.max-update-ratio": 0.0}
KRUM = {"krum.num-malicious": 1}


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark run."""

    name: str
    sites: int
    overrides: dict[str, Any]
    attacked: bool = True

    @property
    def screen(self) -> bool:
        return self.overrides.get("validation.norm-z", 3.5) != 0.0


ROWS = (
    Row("fedavg, no attack", 5, {"strategy": "fedavg", "min-sites": 3}, attacked=False),
    Row("fedavg", 5, {"strategy": "fedavg", "min-sites": 3, **ATTACK, **SCREEN_OFF}),
    Row("fedavg + screen", 5, {"strategy": "fedavg", "min-sites": 3, **ATTACK}),
    Row("fedmedian", 5, {"strategy": "fedmedian", "min-sites": 3, **ATTACK, **SCREEN_OFF}),
    Row("fedtrimmedavg", 5, {"strategy": "fedtrimmedavg", "trimmed-avg.beta": 0.2, "min-sites": 3,
                             **ATTACK, **SCREEN_OFF}),
    Row("krum", 5, {"strategy": "krum", "min-sites": 5, **KRUM, **ATTACK, **SCREEN_OFF}),
    Row("multikrum", 5, {"strategy": "multikrum", "min-sites": 5, **KRUM, **ATTACK, **SCREEN_OFF}),
    Row("fedavg (7 sites)", 7, {"strategy": "fedavg", "min-sites": 3, **ATTACK, **SCREEN_OFF}),
    Row("bulyan (7 sites)", 7, {"strategy": "bulyan", "min-sites": 7, **KRUM, **ATTACK, **SCREEN_OFF}),
)


def run_name(row: Row) -> str:
    return row.name.replace(" + ", "-").replace(", ", "-").replace(" (", "-").replace(")", "").replace(" ", "-")


def simulate_row(row: Row, common: dict[str, Any], runs: Path, fresh: bool) -> tuple[Path, float | None]:
    """Run (or reuse) one row's simulation; returns its results folder and wall seconds (None when reused)."""
    from simulation.runner import simulate

    name = run_name(row)
    run_dir = runs / name
    if run_dir.is_dir() and (run_dir / "summary.json").is_file() and not fresh:
        return run_dir, None
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.time()
    simulate({**common, **row.overrides, "results-dir": str(runs), "run-name": name}, sites=row.sites)
    return run_dir, time.time() - t0


def bootstrap_auroc(probs: np.ndarray, labels: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Exact AUROC of the positive class and its 95 % stratified bootstrap interval."""
    from sklearn.metrics import roc_auc_score

    score = probs[:, 1]
    auc = float(roc_auc_score(labels, score))
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    boots = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        boots.append(roc_auc_score(labels[idx], score[idx]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return auc, float(lo), float(hi)


def evaluate_run(run_dir: Path, row: Row, test_count: int, test_seed: int) -> dict[str, Any]:
    """Honest-site pooled validation and held-out test AUROC of the run's final model."""
    import torch

    from shared.config import parse_node_config, parse_recorded_run_config
    from shared.metrics.federated import SiteEvaluation, pool_evaluations
    from shared.results import RunFolder
    from shared.site_data import load_site_data
    from shared.tasks import get_task
    from shared.training import images_to_tensor

    folder = RunFolder.open(run_dir)
    cfg = parse_recorded_run_config(folder.run_config())
    task = get_task(cfg.task)
    state, _card = folder.read_model()
    model, _ = task.build_model(cfg)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    objective = task.objective()
    # the attacking site's split is left out in every row (also the reference), so all rows score the same sites
    attackers = set(range(row.sites - cfg.sim_attack_sites, row.sites))

    def score(images: np.ndarray, targets: np.ndarray, keep: bool = False) -> Any:
        return objective.evaluate(model, images_to_tensor(images), torch.from_numpy(targets).long(),
                                  batch_size=128, precision=cfg.train.precision, normalize=cfg.data.normalize,
                                  keep_predictions=keep)

    nonfinite = not all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())
    test_cfg = dataclasses.replace(cfg, seed=test_seed, data=dataclasses.replace(cfg.data, phantom_count=test_count))
    test = load_site_data(test_cfg, parse_node_config({"partition-id": 0, "num-partitions": 1}), task)
    images = np.concatenate([test.train_images, test.val_images])
    targets = np.concatenate([test.train_targets, test.val_targets])
    try:
        reports = []
        for p in range(row.sites):
            if p in attackers:
                continue
            data = load_site_data(cfg, parse_node_config({"partition-id": p, "num-partitions": row.sites}), task)
            res = score(data.val_images, data.val_targets)
            reports.append(SiteEvaluation(f"site-{p}", res.counts, res.loss))
        honest: float | None = float(pool_evaluations(reports, task.threshold_rule).pooled["auroc"])
        res = score(images, targets, keep=True)
        auc, lo, hi = bootstrap_auroc(res.predictions, targets)
        broken = ""
    except ValueError as exc:  # the evaluation refuses NaN/inf probabilities: the model is broken
        honest, auc, lo, hi, reports = None, None, None, None, []
        broken = str(exc)

    rounds = folder.read_rounds()
    rejected = [r for rd in rounds for r in rd.get("train-rejected", [])]
    return {
        "broken-model": broken,  # why the final model could not be scored ('' = it could)
        "nonfinite-weights": nonfinite,
        "val-auroc-honest": honest,
        "val-sites-honest": len(reports),
        "test-auroc": auc, "test-auroc-ci95": [lo, hi], "test-images": int(len(targets)),
        "val-auroc-server": rounds[-1].get("evaluate", {}).get("auroc"),
        "val-auroc-server-per-round": [rd.get("evaluate", {}).get("auroc") for rd in rounds],
        "evaluate-refused-rounds": sum(1 for rd in rounds if rd.get("evaluate-refused")),
        "evaluate-failures-last-round": int(rounds[-1].get("evaluate-failures", 0)),
        "rejected-train-replies": len(rejected),
        "rejected-sites": sorted({str(r["site"]) for r in rejected}),
        "rejection-reasons": sorted({str(r["reason"]) for r in rejected}),
        "refused-rounds": sum(1 for rd in rounds if rd.get("train-refused")),
        "rounds": len(rounds),
    }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the rows (``NaN model``: the final model's outputs are not finite, nothing to score)."""
    lines = ["| run | sites | attack | norm screen | val AUROC (honest sites) | test AUROC [95% CI] "
             "| val AUROC (server) | attacker's replies rejected |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        e = r["eval"]
        att = "sign-flip x10" if r["attacked"] else "none"
        rej = f"{e['rejected-train-replies']}/{e['rounds']}" if r["attacked"] else "-"
        if e["broken-model"]:
            test, val = "NaN model", "NaN model"
        else:
            lo, hi = e["test-auroc-ci95"]
            test, val = f"{_fmt(e['test-auroc'])} [{_fmt(lo)}, {_fmt(hi)}]", _fmt(e["val-auroc-honest"])
        server = (_fmt(e["val-auroc-server"]) if e["val-auroc-server"] is not None
                  else f"none ({e['evaluate-failures-last-round']} sites failed)")
        lines.append(f"| {r['name']} | {r['sites']} | {att} | {'on' if r['screen'] else 'off'} | {val} | {test} "
                     f"| {server} | {rej} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--phantoms", type=int, default=1200)
    ap.add_argument("--test-phantoms", type=int, default=600)
    ap.add_argument("--test-seed", type=int, default=9001)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated run ids (default: all): "
                    + ", ".join(run_name(r) for r in ROWS))
    ap.add_argument("--fresh", action="store_true", help="rerun finished runs instead of reusing them")
    ap.add_argument("--runs", type=Path, default=OUT / "robust-runs")
    ap.add_argument("--out", type=Path, default=OUT / "robust_aggregation.json")
    args = ap.parse_args()
    os.environ.setdefault("MEDFED_CACHE_DIR", tempfile.mkdtemp(prefix="medfed-bench-cache-"))
    common = {"task": "pneumonia-cxr", "model": "small-cnn", "image-size": 64, "phantom-count": args.phantoms,
              "num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "seed": args.seed}
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = wanted - {run_name(r) for r in ROWS}
    if unknown:
        ap.error(f"--only: unknown run id(s) {sorted(unknown)}; expected any of {[run_name(r) for r in ROWS]}")
    rows = [r for r in ROWS if not wanted or run_name(r) in wanted]
    args.runs.mkdir(parents=True, exist_ok=True)
    results = []
    for row in rows:
        print(f"{row.name}: simulating {row.sites} sites x {args.rounds} rounds ...", flush=True)
        run_dir, seconds = simulate_row(row, common, args.runs, args.fresh)
        ev = evaluate_run(run_dir, row, args.test_phantoms, args.test_seed)
        results.append({"name": row.name, "sites": row.sites, "attacked": row.attacked, "screen": row.screen,
                        "overrides": row.overrides, "run-dir": str(run_dir), "seconds": seconds, "eval": ev})
        print(f"  val AUROC honest {_fmt(ev['val-auroc-honest'])}, test {_fmt(ev['test-auroc'])}, "
              f"rejected {ev['rejected-train-replies']}" + (f", {ev['broken-model']}" if ev["broken-model"] else "")
              + (f" ({seconds:.0f} s)" if seconds is not None else " (reused)"), flush=True)
    text = table(results)
    print()
    print(f"pneumonia-cxr phantoms ({args.phantoms}), small-cnn 64 px, {args.rounds} rounds x {args.local_epochs} "
          f"local epochs, seed {args.seed}; attack: last site sends global - 10 x update every round")
    print(text)
    payload = {"command": " ".join(["python", "benchmarks/robust_aggregation.py", *sys.argv[1:]]),
               "settings": {**common, "test-phantoms": args.test_phantoms, "test-seed": args.test_seed},
               "rows": results, "table": text}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
