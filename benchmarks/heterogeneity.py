"""Benchmark: what federation buys each site under non-IID partitions, on real chest X-rays.

Data: ``../shared/data/cxr-pneumonia`` (Kermany et al. 2018, the official
training split only: 1349 normal and 3883 pneumonia paediatric chest X-rays,
224 px JPEG, ``manifest.csv`` with ``patient_id``). A patient-disjoint test
split (``--test-fraction`` of the patients, seeded by ``--split-seed``) is
written as a manifest under ``benchmarks/out/heterogeneity/`` and passed as
``test-path``; the simulated sites never see those files (a simulation leaves
``test-path``'s files out of ``data-path`` before partitioning), the rest is
partitioned across ``--sites`` sites. The data stays where it is: nothing is
copied, except with ``--images N`` (a quick proof run), which copies a seeded
patient subset of about N images to a temporary folder outside the repository
and deletes it afterwards.

It runs ``medfed study heterogeneity`` (small-cnn, 64 px, ``--rounds``
rounds, local-only and pooled baselines for every setting and seed) over:

* settings ``iid``, ``dirichlet-0.1`` (label skew, alpha 0.1),
  ``pathological-1`` (one class per site), ``quantity`` (size skew) and
  ``shift`` (acquisition shift, ``site-shift=true``);
* strategy ``fedavg`` everywhere, plus ``fedprox``, ``fedbn`` and
  ``qfedavg`` on ``dirichlet-0.1`` and ``shift``,

and reports per (setting, arm) the test AUROC (mean ± std over seeds), the
worst site's validation AUROC, Jain's index across the sites' validation
AUROCs and the benefit-of-joining range (each site's federated minus its
local-only AUROC, on its validation split and on the test set). Prints a
table and writes JSON (default ``benchmarks/out/heterogeneity.json``); the
study's own folder (every run, study.md, plots) is under
``benchmarks/out/heterogeneity/``.

    python benchmarks/heterogeneity.py [--seeds 0] [--rounds 5] [--sites 5] [--images N]
"""

from __future__ import annotations

import argparse
import csv
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

from shared.atomic import write_json  # noqa: E402
from shared.formatting import fmt_metric  # noqa: E402
from simulation.cli import main as medfed  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cxr-pneumonia"
OUT = ROOT / "benchmarks" / "out"
SETTINGS = "iid@fedavg;dirichlet-0.1;pathological-1@fedavg;quantity@fedavg;shift"
STRATEGIES = "fedavg,fedprox,fedbn,qfedavg"
RUN_CONFIG = "model='small-cnn' image-size=64 local-epochs=1 batch-size=32"


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The rows of a manifest (path, label, patient_id, ...)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def split_patients(rows: list[dict[str, str]], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(test patients, the other patients): a seeded ``fraction`` of the distinct patient ids."""
    patients = sorted({r["patient_id"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = round(fraction * len(patients))
    test = {patients[i] for i in order[:n_test]}
    return test, set(patients) - test


def write_manifest(path: Path, rows: list[dict[str, str]], base: Path) -> Path:
    """A manifest of ``rows`` with absolute file paths (``base`` / row path), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for r in rows:
            w.writerow([str((base / r["path"]).resolve()), r["label"], r["patient_id"]])
    os.replace(tmp, path)
    return path


def subset_copy(rows: list[dict[str, str]], patients: set[str], n_images: int, seed: int,
                dest: Path) -> list[dict[str, str]]:
    """Copy the images of a seeded subset of ``patients`` (about ``n_images``, whole patients) to ``dest``."""
    chosen, total = [], 0
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        if r["patient_id"] in patients:
            by_patient.setdefault(r["patient_id"], []).append(r)
    names = sorted(by_patient)
    for i in np.random.default_rng(seed + 1).permutation(len(names)):
        if total >= n_images:
            break
        chosen += by_patient[names[i]]
        total += len(by_patient[names[i]])
    for r in chosen:
        (dest / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DATA / r["path"], dest / r["path"])
    return chosen


def table(study: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The benchmark's table (markdown) and rows from the study's ``study.json``."""

    def pm(r: dict[str, Any], key: str) -> str:
        mean, std = r.get(f"{key}-mean"), r.get(f"{key}-std")
        return fmt_metric(mean) + ("" if std is None or fmt_metric(std) == "n/a" else f" ± {fmt_metric(std)}")

    def span(r: dict[str, Any], prefix: str) -> str:
        lo, hi = r.get(f"{prefix}-min"), r.get(f"{prefix}-max")
        if lo is None:
            return "n/a"
        return f"{fmt_metric(lo, spec='+.3f')} to {fmt_metric(hi, spec='+.3f')}"

    head = ["setting", "arm", "test AUROC", "site-mean val AUROC", "worst-site val AUROC", "Jain's index (val AUROC)",
            "benefit of joining, val", "benefit of joining, test", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    rows = []
    for r in study["rows"]:
        runs = f"{r['seeds-ok']} ok" + (f", {r['seeds-failed']} FAILED" if r["seeds-failed"] else "")
        if not r["seeds-ok"] and not r["seeds-failed"]:
            runs = "not run (interrupted)"
        cells = [r["setting"], r["arm"], pm(r, "test-auroc"), pm(r, "site-mean-auroc"), pm(r, "worst-site-auroc"),
                 pm(r, "jain-index"),
                 span(r, "benefit"), span(r, "test-benefit"), runs]
        lines.append("| " + " | ".join(cells) + " |")
        rows.append({k: r.get(k) for k in (
            "setting", "arm", "kind", "seeds-ok", "seeds-failed", "test-auroc-mean", "test-auroc-std", "auroc-mean",
            "site-mean-auroc-mean", "site-mean-auroc-std",
            "worst-site-auroc-mean", "worst-site-auroc-std", "jain-index-mean", "jain-index-std", "benefit-min",
            "benefit-median", "benefit-max", "test-benefit-min", "test-benefit-median", "test-benefit-max")})
    return "\n".join(lines), rows


def main() -> int:
    """Split, run the study, print the table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--images", type=int, default=0,
                    help="quick proof: use a seeded patient subset of about N images (0 = all)")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--settings", default=SETTINGS)
    ap.add_argument("--strategies", default=STRATEGIES)
    ap.add_argument("--baselines", default="local,pooled", help="baselines of every setting ('local' alone: faster)")
    ap.add_argument("--run-config", default=RUN_CONFIG)
    ap.add_argument("--out", type=Path, default=OUT / "heterogeneity.json")
    args = ap.parse_args()
    if not (DATA / "manifest.csv").is_file():
        raise SystemExit(f"cxr-pneumonia not found at {DATA} (it sits in ../shared/data beside the checkout)")
    os.environ.setdefault("MEDFED_CACHE_DIR", str(Path(tempfile.gettempdir()) / "medfed-bench-cache"))

    rows = read_manifest(DATA / "manifest.csv")
    test_patients, train_patients = split_patients(rows, args.test_fraction, args.split_seed)
    work = OUT / "heterogeneity"
    tmp: Path | None = None
    try:
        if args.images:
            tmp = Path(tempfile.mkdtemp(prefix="medfed-hetero-subset-"))
            n_test = max(40, round(args.images * args.test_fraction))
            kept = subset_copy(rows, train_patients, args.images, args.split_seed, tmp)
            kept += subset_copy(rows, test_patients, n_test, args.split_seed, tmp)
            with open(tmp / "manifest.csv", "w", newline="") as fh:  # one manifest over both subsets
                w = csv.writer(fh)
                w.writerow(["path", "label", "patient_id"])
                w.writerows([r["path"], r["label"], r["patient_id"]] for r in kept)
            rows, data_dir = kept, tmp
        else:
            data_dir = DATA
        test_rows = [r for r in rows if r["patient_id"] in test_patients]
        name = f"test-split-seed{args.split_seed}" + (f"-subset{args.images}" if args.images else "")
        test_manifest = write_manifest(work / f"{name}.csv", test_rows, data_dir)
        train_rows = [r for r in rows if r["patient_id"] not in test_patients]
        split = {"test-images": len(test_rows), "test-patients": len({r["patient_id"] for r in test_rows}),
                 "train-images": len(train_rows), "train-patients": len({r["patient_id"] for r in train_rows}),
                 "test-pneumonia": sum(r["label"].upper() == "PNEUMONIA" for r in test_rows),
                 "train-pneumonia": sum(r["label"].upper() == "PNEUMONIA" for r in train_rows)}
        print(f"cxr-pneumonia: {split['train-images']} images ({split['train-patients']} patients) to partition "
              f"across {args.sites} sites, {split['test-images']} test images ({split['test-patients']} patients) "
              f"in {test_manifest}", flush=True)
        study_dir = work / f"study-{time.strftime('%Y%m%d-%H%M%S')}"
        run_config = (f"data-path='{data_dir / 'manifest.csv'}' test-path='{test_manifest}' {args.run_config}")
        command = ["study", "heterogeneity", "--settings", args.settings, "--strategies", args.strategies,
                   "--seeds", args.seeds, "--sites", str(args.sites), "--rounds", str(args.rounds),
                   "--baselines", args.baselines, "--run-config", run_config, "--out", str(study_dir)]
        t0 = time.time()
        code = 1
        try:
            code = medfed(command)
        finally:  # an interrupted study leaves partial outputs: tabulate what finished
            seconds = time.time() - t0
            study_json = study_dir / "study.json"
            if study_json.is_file():
                study = json.loads(study_json.read_text())
                md, result_rows = table(study)
                print(f"\n{'PARTIAL (interrupted) ' if not study.get('complete') else ''}benchmark table "
                      f"({len(study['runs'])} runs, {seconds / 60:.1f} min):\n\n{md}\n")
                write_json(args.out, {
                    "benchmark": "heterogeneity", "complete": bool(study.get("complete")) and code == 0,
                    "exit-code": code, "wall-seconds": seconds, "date": time.strftime("%Y-%m-%d"),
                    "command": "python benchmarks/heterogeneity.py " + " ".join(sys.argv[1:]),
                    "data": "cxr-pneumonia (Kermany 2018, official training split)" + (
                        f", patient subset of ~{args.images} images" if args.images else ""),
                    "split": {**split, "test-fraction": args.test_fraction, "split-seed": args.split_seed,
                              "test-manifest": str(test_manifest)},
                    "sites": args.sites, "rounds": args.rounds, "seeds": args.seeds, "settings": args.settings,
                    "strategies": args.strategies, "run-config": args.run_config, "study-dir": str(study_dir),
                    "table": md, "rows": result_rows,
                })
                print(f"JSON: {args.out}\nstudy: {study_dir}")
        return code
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

