"""Benchmark: DP-SGD (Opacus) vs non-private local training throughput, per grad-sample engine.

Measured side by side in one run (these machines vary +-30 % run to run),
on the same model, chest phantoms, image size and batch size:

1. **non-private**: :func:`shared.training.train_local`, once with the best
   CPU settings (``precision="auto"``: bf16 autocast + channels_last) and
   once in fp32 (DP-SGD runs in fp32, so this isolates the cost of
   per-sample gradients);
2. **DP-SGD**: the same loop with :class:`shared.privacy.dpsgd.DPSGDSteps`, with each
   grad-sample engine (hooks, ew, functorch, ghost), Poisson sampling with
   ``q = batch / N`` and ``N / batch`` steps (one expected epoch).

Each configuration gets one untimed warm-up and ``--repeats`` timed runs
(interleaved); the best run counts. Images/s of DP-SGD counts the images
actually sampled. Prints a table and writes JSON (default
``benchmarks/out/dp_throughput.json``).

    python benchmarks/dp_throughput.py [--models small-cnn resnet18] [--image-size 64] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import TrainConfig  # noqa: E402
from shared.data.phantoms import make_chest_phantoms  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.models.dp import make_dp_compatible  # noqa: E402
from shared.objectives import ClassificationObjective  # noqa: E402
from shared.privacy.dpsgd import GRAD_SAMPLE_MODES, DPSGDSpec, DPSGDSteps  # noqa: E402
from shared.training import images_to_tensor, train_local  # noqa: E402


def _runner(model_name: str, label: str, images: torch.Tensor, labels: torch.Tensor, batch: int,
            steps: int) -> Callable[[int], float]:
    """A function ``steps -> images/s`` for one configuration (fresh model each call)."""
    n = len(images)

    def run(n_steps: int) -> float:
        torch.manual_seed(0)
        model = build_model(model_name, 1, 2)
        if label.startswith("non-private"):
            precision = "fp32" if label.endswith("fp32") else "auto"
            cfg = TrainConfig(batch_size=batch, precision=precision, local_epochs=1)
            take = min(n, n_steps * batch)
            result = train_local(model, images[:take], labels[:take], cfg, ClassificationObjective(2), seed=0,
                                 device=torch.device("cpu"))
        else:
            mode = label.removeprefix("dp-")
            model, _ = make_dp_compatible(model)
            spec = DPSGDSpec(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=batch / n, steps=n_steps,
                             grad_sample_mode=mode)
            result = train_local(model, images, labels, TrainConfig(), ClassificationObjective(2), seed=0,
                                 device=torch.device("cpu"), engine=DPSGDSteps(spec, dp_seed=0))
        return result.images_per_second

    return run


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["small-cnn", "resnet18"])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=256, help="site training images N (steps = N / batch)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(GRAD_SAMPLE_MODES), choices=GRAD_SAMPLE_MODES)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "dp_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    imgs, labels = make_chest_phantoms(args.images, size=args.image_size, seed=0)
    images, y = images_to_tensor(imgs), torch.from_numpy(labels).long()
    steps = max(1, args.images // args.batch_size)
    labels_order = ["non-private", "non-private-fp32", *[f"dp-{m}" for m in args.modes]]
    rows: dict[str, dict[str, float]] = {}
    for model_name in args.models:
        runners = {lab: _runner(model_name, lab, images, y, args.batch_size, steps) for lab in labels_order}
        best: dict[str, float] = {}
        for run in runners.values():
            run(2)  # warm-up: oneDNN kernel selection, Opacus hook set-up
        for _ in range(args.repeats):
            for lab, run in runners.items():
                best[lab] = max(best.get(lab, 0.0), run(steps))
                print(f"  {model_name:<10} {lab:<18} {best[lab]:8.1f} img/s", flush=True)
        rows[model_name] = best

    result = {
        "image-size": args.image_size, "batch-size": args.batch_size, "images": args.images,
        "steps": steps, "threads": args.threads, "repeats": args.repeats,
        "noise-multiplier": 1.0, "max-grad-norm": 1.0,
        "images-per-second": rows,
        "ratio-dp-vs-non-private-best": {m: {lab: v / r["non-private"] for lab, v in r.items() if lab.startswith("dp-")}
                                         for m, r in rows.items()},
        "ratio-dp-vs-non-private-fp32": {m: {lab: v / r["non-private-fp32"] for lab, v in r.items()
                                             if lab.startswith("dp-")} for m, r in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{args.image_size}px, batch {args.batch_size} (Poisson q = {args.batch_size}/{args.images}), "
          f"{steps} steps, {args.threads} threads, best of {args.repeats}")
    print(f"{'model':<12}{'configuration':<20}{'images/s':>10}{'x best':>9}{'x fp32':>9}")
    for model_name, r in rows.items():
        for lab in labels_order:
            print(f"{model_name:<12}{lab:<20}{r[lab]:>10.1f}{r[lab] / r['non-private']:>9.2f}"
                  f"{r[lab] / r['non-private-fp32']:>9.2f}")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
