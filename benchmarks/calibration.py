"""Benchmark: federated calibration and the out-of-distribution warning on real chest X-rays.

1. Splits ``../shared/data/cxr-pneumonia`` (Kermany paediatric CXRs, official
   training split) by patient: a seeded, label-stratified 20 % of the
   patients become a test set no site ever sees; manifests of both parts
   are written under ``benchmarks/out/calibration-data/`` (absolute paths: the
   images stay in ../shared/data).
2. Runs ``medfed simulate`` on the other 80 % (default 3 sites x 5 rounds,
   small-cnn at 64 px, 2 local epochs); the run ends with the federated
   temperature fit and the out-of-distribution reference.
3. Scores the saved model with ``medfed evaluate``'s code on the test
   patients: AUROC, sensitivity and specificity at the operating threshold
   (chosen on calibrated validation probabilities), ECE and NLL without and
   with the temperature, the share of test images flagged out of
   distribution; and with ``medfed predict``'s code the share flagged among
   adult chest X-rays from another source (``lung-seg``: Montgomery County,
   NLM) and among test images re-rendered through a strong acquisition
   profile (contrast, gamma, noise, blur).

Prints a table and writes ``benchmarks/out/calibration.json``. Runs at
``nice 19`` (it lowers its own priority).

    python benchmarks/calibration.py [--sites 3] [--rounds 5] [--local-epochs 2] [--image-size 64]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.data.phantoms_tasks import AcquisitionProfile, apply_profile  # noqa: E402
from shared.data.splits import train_val_split  # noqa: E402
from shared.inference import OODTracker, evaluate_dataset, load_trained, predict_files  # noqa: E402
from simulation.runner import simulate  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out"
STRONG = AcquisitionProfile(contrast=1.6, gamma=0.6, noise=0.08, blur=1.5, brightness=0.1)


def split_by_patient(manifest: Path, dest: Path, test_fraction: float, seed: int) -> tuple[Path, Path, dict]:
    """Write ``train.csv`` and ``test.csv`` (absolute paths) with no patient on both sides."""
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = np.array([r["label"].strip().upper() == "PNEUMONIA" for r in rows], dtype=np.int64)
    groups = np.array([r["patient_id"] for r in rows])
    train_idx, test_idx = train_val_split(labels, test_fraction, seed=seed, groups=groups)
    assert not set(groups[train_idx]) & set(groups[test_idx])
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, idx in (("train.csv", train_idx), ("test.csv", test_idx)):
        path = dest / name
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            for i in sorted(idx.tolist()):
                w.writerow({**rows[i], "path": str((manifest.parent / rows[i]["path"]).resolve())})
        tmp.replace(path)
        paths.append(path)
    info = {"images-train": int(len(train_idx)), "images-test": int(len(test_idx)),
            "patients-train": int(len(set(groups[train_idx]))), "patients-test": int(len(set(groups[test_idx]))),
            "pneumonia-share-test": float(labels[test_idx].mean())}
    return paths[0], paths[1], info


def shifted_copies(test_manifest: Path, dest: Path, n: int, seed: int) -> list[Path]:
    """``n`` test images re-rendered through :data:`STRONG` (another scanner, simulated) as PNG files."""
    dest.mkdir(parents=True, exist_ok=True)
    with test_manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    pick = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    out = []
    for k, i in enumerate(sorted(pick.tolist())):
        img = cv2.imread(rows[i]["path"], cv2.IMREAD_GRAYSCALE)
        path = dest / f"shifted-{k:04d}.png"
        cv2.imwrite(str(path), apply_profile(img, STRONG, seed))
        out.append(path)
    return out


def share_flagged(trained, files: list[Path]) -> dict:  # noqa: ANN001
    tracker = OODTracker(trained)
    rows = predict_files(trained, files, ood=tracker)
    s = tracker.summary()
    assert s is not None
    return {**s.to_dict(), "unreadable": sum(1 for r in rows if r["error"])}


def main() -> int:
    """Split, simulate, score; print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "calibration.json")
    args = ap.parse_args()
    os.nice(19)
    manifest = DATA / "cxr-pneumonia" / "manifest.csv"
    if not manifest.is_file():
        print(f"data not found: {manifest}", file=sys.stderr)
        return 2
    t0 = time.time()
    train_csv, test_csv, split = split_by_patient(manifest, OUT / "calibration-data", args.test_fraction, args.seed)
    res = simulate({"data-path": str(train_csv), "model": "small-cnn", "image-size": args.image_size,
                    "num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "seed": args.seed,
                    "results-dir": str(OUT / "calibration-runs"), "run-name": time.strftime("%Y%m%d-%H%M%S")},
                   sites=args.sites, echo=False)
    summary = json.loads((res.run_dir / "summary.json").read_text())
    cal = summary["calibration"]
    trained = load_trained(res.run_dir)
    test = evaluate_dataset(trained, test_csv)
    m, c = test.metrics, test.calibration
    lung_images = sorted((DATA / "lung-seg" / "images").glob("*.png"))
    ood = {"test (held-out patients)": test.ood.to_dict() if test.ood else None,
           "lung-seg adult CXRs (Montgomery)": share_flagged(trained, lung_images),
           "test re-rendered, strong acquisition shift": share_flagged(
               trained, shifted_copies(test_csv, OUT / "calibration-data" / "shifted", 300, args.seed))}
    result = {
        "data": "cxr-pneumonia (Kermany, official training split), patient-disjoint test split", "split": split,
        "sites": args.sites, "rounds": args.rounds, "local-epochs": args.local_epochs, "model": "small-cnn",
        "image-size": args.image_size, "seed": args.seed, "run": str(res.run_dir), "simulate-seconds": res.seconds,
        "wall-seconds": time.time() - t0,
        "validation": {"auroc": summary["final"].get("auroc"), "calibration": cal},
        "test": {"images": test.counts.num_examples, "auroc": m.get("auroc"), "threshold": m.get("threshold"),
                 "sensitivity@thr": m.get("sensitivity@thr"), "specificity@thr": m.get("specificity@thr"),
                 "ece-uncalibrated": c.get("ece-uncalibrated"), "ece-calibrated": c.get("ece"),
                 "nll-uncalibrated": c.get("nll-uncalibrated"), "nll-calibrated": c.get("nll"),
                 "temperature": c.get("temperature")},
        "ood": ood, "ood-reference": {k: v for k, v in summary.get("ood", {}).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and
                                   not math.isfinite(v) else str(v)) + "\n")

    def f(v: object, digits: int = 3) -> str:
        return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(float(v)) else "n/a"

    t = result["test"]
    print(f"\ncxr-pneumonia, small-cnn {args.image_size} px, {args.sites} sites x {args.rounds} rounds "
          f"({args.local_epochs} local epochs); train {split['images-train']} images / {split['patients-train']} "
          f"patients, test {split['images-test']} / {split['patients-test']}; {result['wall-seconds']:.0f} s")
    print(f"{'measure':<44}{'value':>10}")
    for name, value in [
        ("validation AUROC (pooled, last round)", f(summary["final"].get("auroc"))),
        ("temperature T (federated fit)", f(cal.get("temperature"))),
        ("validation ECE before -> after", f"{f(cal.get('ece-before'))} -> {f(cal.get('ece-after'))}"),
        ("test AUROC", f(t["auroc"])),
        ("test operating threshold (calibrated)", f(t["threshold"])),
        ("test sensitivity at threshold", f(t["sensitivity@thr"])),
        ("test specificity at threshold", f(t["specificity@thr"])),
        ("test ECE uncalibrated -> calibrated", f"{f(t['ece-uncalibrated'])} -> {f(t['ece-calibrated'])}"),
        ("test NLL uncalibrated -> calibrated", f"{f(t['nll-uncalibrated'])} -> {f(t['nll-calibrated'])}"),
    ]:
        print(f"{name:<44}{value:>10}")
    print(f"\n{'inputs':<46}{'images':>8}{'flagged':>9}{'share':>8}{'TV':>7}")
    for name, o in ood.items():
        if o:
            print(f"{name:<46}{o['scored']:>8}{o['flagged']:>9}{f(o['share-flagged']):>8}{f(o['intensity-tv'], 2):>7}")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
