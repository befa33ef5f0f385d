"""Benchmark: federated lung segmentation on the real Montgomery set, per-site Dice/IoU/HD95.

Runs ``medfed simulate`` with ``task='lung-seg'`` on ``../shared/data/lung-seg``
at a larger budget than the test suite (default 3 sites, 6 rounds, 128 px,
``unet``), then prints the pooled and per-site validation metrics of the last
round and writes them as JSON (default ``benchmarks/out/lung_seg.json``).

    python benchmarks/lung_seg.py [--sites 3] [--rounds 6] [--image-size 128] [--model unet]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulation.runner import simulate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "lung-seg" / "manifest.csv")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--model", default="unet")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "lung_seg.json")
    args = ap.parse_args()
    if not args.data.exists():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="medfed-lungseg-") as tmp:
        res = simulate(
            {"task": "lung-seg", "model": args.model, "data-path": str(args.data), "image-size": args.image_size,
             "num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": 8, "lr": 0.003,
             "results-dir": tmp, "run-name": "lung-seg", "min-partition-size": 10},
            sites=args.sites, echo=False,
        )
        summary = json.loads((res.run_dir / "summary.json").read_text())
        rounds = json.loads((res.run_dir / "metrics.json").read_text())["rounds"]
    result = {"model": args.model, "image-size": args.image_size, "sites": args.sites, "rounds": args.rounds,
              "local-epochs": args.local_epochs, "wall-seconds": res.seconds,
              "pooled": summary["final"], "per-site": summary["final-per-site"],
              "dice-per-round": [r["evaluate"]["dice"] for r in rounds]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nlung-seg, {args.model} {args.image_size}px, {args.sites} sites x {args.rounds} rounds, "
          f"{res.seconds:.0f} s")
    print(f"{'site':<10}{'images':>8}{'Dice':>8}{'IoU':>8}{'HD95 px':>9}")
    for name, m in [*sorted(summary["final-per-site"].items()), ("pooled", summary["final"])]:
        print(f"{name:<10}{int(m['num-examples']):>8}{m['dice']:>8.3f}{m['iou']:>8.3f}{m['hd95']:>9.2f}")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
