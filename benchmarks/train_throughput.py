"""Benchmark: local training throughput inside a federated round vs a bare PyTorch loop.

Measured side by side in one run (these machines vary +-30 % run to run):

1. **bare loop**: the same model, data (one site's phantom partition), batch
   size and epochs in a minimal PyTorch loop with the best CPU settings
   (bf16 autocast + channels_last), no Flower, no medfed training code;
2. **inside a round**: ``medfed simulate`` with ``--sites`` sites; each site
   reports the images/s of its local training step. With
   ``--cpus-per-site 2`` sites train one at a time on both cores, exactly like
   the bare loop, so the two figures compare like with like;
3. **per-round overhead** for the federation: train-phase wall time minus the
   slowest site's training time (Flower messaging, serialisation, scheduling,
   model building), from the same simulation.

Augmentation is off on both sides so that only the framework differs.
Prints a table and writes JSON (default ``benchmarks/out/train_throughput.json``).

    python benchmarks/train_throughput.py [--model small-cnn] [--image-size 64] [--sites 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.data.partition import partition_indices  # noqa: E402
from shared.data.splits import train_val_split  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.tasks import get_task  # noqa: E402
from simulation.runner import simulate  # noqa: E402


def bare_loop(model_name: str, images: np.ndarray, labels: np.ndarray, batch: int, epochs: int, threads: int) -> float:
    """Images/s of a minimal training loop (bf16 autocast + channels_last, Adam)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, 1, 2).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = torch.from_numpy(images).unsqueeze(1)
    y_all = torch.from_numpy(labels).long()
    model.train()

    def epoch() -> int:
        seen = 0
        perm = torch.randperm(len(x_all))
        for s in range(0, len(perm), batch):
            idx = perm[s : s + batch]
            x = ((x_all[idx].float() / 255.0 - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = F.cross_entropy(out.float(), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
        return seen

    epoch()  # warm-up (oneDNN kernel selection), not timed
    t0 = time.perf_counter()
    seen = sum(epoch() for _ in range(epochs))
    return seen / (time.perf_counter() - t0)


def site_partition(task_name: str, n: int, size: int, sites: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Site 0's training images exactly as the simulation builds them."""
    task = get_task(task_name)
    labels = task.phantom_labels(n, seed)
    parts = partition_indices(labels, sites, "iid", seed=seed, min_partition_size=10)
    images, lab = task.render_phantoms(n, size, seed, parts[0])
    tr, _ = train_val_split(lab, 0.2, seed=seed + 1)
    return images[tr], lab[tr]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images-per-site", type=int, default=400)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train_throughput.json")
    args = ap.parse_args()
    n = args.images_per_site * args.sites
    seed = 0

    images, labels = site_partition("pneumonia-cxr", n, args.image_size, args.sites, seed)
    overrides = {
        "model": args.model, "image-size": args.image_size, "phantom-count": n, "augment": False,
        "local-epochs": args.local_epochs, "batch-size": args.batch_size, "num-server-rounds": args.rounds,
        "seed": seed, "min-sites": args.sites,
    }
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        bare_before = bare_loop(args.model, images, labels, args.batch_size, args.local_epochs, threads=2)
        seq = simulate({**overrides, "results-dir": tmp, "run-name": "sequential"}, sites=args.sites,
                       cpus_per_site=2, echo=False)
        par = simulate({**overrides, "results-dir": tmp, "run-name": "parallel"}, sites=args.sites,
                       cpus_per_site=1, echo=False)
        bare_after = bare_loop(args.model, images, labels, args.batch_size, args.local_epochs, threads=2)
        seq_rounds = json.loads((seq.run_dir / "metrics.json").read_text())["rounds"]
        par_rounds = json.loads((par.run_dir / "metrics.json").read_text())["rounds"]

    def site_rates(rounds: list[dict]) -> list[float]:
        # round 1 includes worker start-up and first-touch costs: report rounds >= 2
        use = rounds[1:] if len(rounds) > 1 else rounds
        return [s["train-images-per-s"] for r in use for s in r["train-sites"].values()]

    bare = statistics.mean([bare_before, bare_after])
    inside = statistics.median(site_rates(seq_rounds))
    threads = sorted({s.get("torch-threads") for r in seq_rounds for s in r["train-sites"].values()})

    def overheads(rounds: list[dict]) -> list[dict]:
        return [{"round": r["round"], "train-phase-s": r["train-phase-s"],
                 "slowest-site-train-s": r["train"]["max-train-seconds"], "overhead-s": r["overhead-s"],
                 "sum-site-train-s": sum(s["train-seconds"] for s in r["train-sites"].values())} for r in rounds]

    result = {
        "model": args.model, "image-size": args.image_size, "batch-size": args.batch_size,
        "local-epochs": args.local_epochs, "sites": args.sites, "images-per-site-train": int(len(images)),
        "bare-loop-images-per-s": {"before": bare_before, "after": bare_after, "mean": bare},
        "inside-round-images-per-s-median": inside,
        "inside-round-torch-threads": threads,
        "ratio-inside-vs-bare": inside / bare,
        "sequential-sites-rounds (cpus-per-site=2)": overheads(seq_rounds),
        "parallel-sites-rounds (cpus-per-site=1)": overheads(par_rounds),
        "parallel-inside-round-images-per-s-median": statistics.median(site_rates(par_rounds)),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nmodel {args.model} {args.image_size}px, batch {args.batch_size}, {len(images)} train images/site, "
          f"{args.local_epochs} local epochs, {args.sites} sites, {args.rounds} rounds")
    print(f"{'measure':<52}{'value':>12}")
    print(f"{'bare PyTorch loop, images/s (2 threads)':<52}{bare:>12.1f}")
    print(f"{'inside a round, images/s (median, 1 site at a time)':<52}{inside:>12.1f}")
    print(f"{'ratio inside / bare':<52}{inside / bare:>12.2f}")
    print(f"{'inside a round, 2 sites at once (1 CPU each)':<52}"
          f"{result['parallel-inside-round-images-per-s-median']:>12.1f}")
    for label, rows in (("sequential", result["sequential-sites-rounds (cpus-per-site=2)"]),
                        ("parallel", result["parallel-sites-rounds (cpus-per-site=1)"])):
        for r in rows:
            print(f"{label + ' round ' + str(r['round']) + ': wall - slowest site (s)':<52}"
                  f"{r['overhead-s']:>12.2f}   (wall {r['train-phase-s']:.2f} s, "
                  f"slowest {r['slowest-site-train-s']:.2f} s,"
                  f" sum {r['sum-site-train-s']:.2f} s)")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
