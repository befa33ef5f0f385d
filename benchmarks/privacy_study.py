"""Privacy/accuracy study on real chest X-rays: PneumoniaMNIST (28 px) from ../shared/data.

Exports ``pneumoniamnist_trainval.npz`` once to PNG files plus a manifest under
``benchmarks/out/pneumoniamnist-png/`` (outside the repository's tracked files;
the data itself stays in ../shared/data), then runs ``medfed study privacy``
over epsilons x seeds and leaves the study's table, JSON and plot in
``benchmarks/out/privacy-study/``.

    python benchmarks/privacy_study.py [--epsilons inf,8,3,1] [--seeds 0,1] [--sites 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulation.cli import main as medfed  # noqa: E402

NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
OUT = ROOT / "benchmarks" / "out"
CLASSES = ("normal", "pneumonia")  # MedMNIST label 0 = normal, 1 = pneumonia


def export_pngs(npz: Path, dest: Path) -> Path:
    """Write every train+val image as PNG with a manifest (path,label,patient_id); reuse if present."""
    manifest = dest / "manifest.csv"
    if manifest.is_file():
        return manifest
    if not npz.is_file():
        raise SystemExit(f"PneumoniaMNIST not found at {npz} (it sits in ../shared/data beside the checkout)")
    data = np.load(npz, allow_pickle=False)  # plain arrays only: never unpickle a data file
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("train", "val"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            name = f"{split}-{i:05d}.png"
            cv2.imwrite(str(dest / name), img)
            # no patient ids in MedMNIST: each image is its own group
            rows.append((name, CLASSES[int(lab)], f"{split}-{i:05d}"))
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        w.writerows(rows)
    tmp.replace(manifest)
    return manifest


def main() -> int:
    """Export the data, run the study, print where the table is."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", default="inf,8,3,1")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--run-config", default="local-epochs=2 batch-size=64 lr=0.002")
    ap.add_argument("--out", default=str(OUT / f"privacy-study-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = ap.parse_args()
    manifest = export_pngs(NPZ, OUT / "pneumoniamnist-png")
    run_config = f"data-path='{manifest}' image-size=28 equalize='none' denoise='none' {args.run_config}"
    return medfed(["study", "privacy", "--epsilons", args.epsilons, "--seeds", args.seeds, "--sites", str(args.sites),
                   "--rounds", str(args.rounds), "--run-config", run_config, "--out", args.out])


if __name__ == "__main__":
    raise SystemExit(main())
