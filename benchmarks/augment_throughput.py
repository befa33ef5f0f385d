"""Benchmark: the training augmentation's share of a training step (batch preparation vs forward/backward).

For small-cnn on 64 px chest phantoms and the U-Net on 64 and 128 px lung
phantoms, a training step is split in two, timed separately on the same
batches, the way :func:`shared.training.train_local` runs them:

* **prep**: the objective's ``batch(...)`` (uint8 -> float, augmentation,
  normalisation; segmentation: image and mask together), with augmentation
  ``off``, the task's default (``base``) and ``robust-augment`` ``light`` and
  ``strong``;
* **step**: forward, loss, backward and the optimizer step (bf16 autocast +
  channels_last, as ``precision="auto"`` trains).

The share ``prep / (prep + step)`` is how much of the loop the augmentation
takes. Two reference tables make the design choices checkable:

* ``monai``: the same photometric transforms done the MONAI way, one image
  per call (``RandAdjustContrast``, ``RandHistogramShift``,
  ``RandGaussianSmooth``, ``RandSimulateLowResolution``,
  ``RandGaussianNoise``; segmentation adds ``Rand2DElasticd`` on image and
  mask), per batch: why :mod:`shared.data.robust_augment` is batched tensor
  code instead;
* ``segmentation models``: one training step of ``unet``, ``fcn`` (FCN-8s on
  ResNet-18) and torchvision's ``fcn_resnet50`` at 64 px: why ``fcn`` is not
  ``fcn_resnet50``.

Each figure is the median over ``--batches`` batches of the best of
``--repeats`` passes (after one warm-up pass). Prints tables and writes JSON
(default ``benchmarks/out/augment_throughput.json``). Run it niced on a shared
machine: ``nice -n 19 python benchmarks/augment_throughput.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import TrainConfig  # noqa: E402
from shared.data.preprocess import AugmentConfig, robust_augment  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.tasks import get_task  # noqa: E402
from shared.training import StandardSteps, images_to_tensor, model_in_channels  # noqa: E402

LEVELS = ("off", "base", "light", "strong")
CASES = (("small-cnn", "pneumonia-cxr", 64), ("unet", "lung-seg", 64), ("unet", "lung-seg", 128))
CPU = torch.device("cpu")


def _augment(task_name: str, level: str) -> AugmentConfig | None:
    base = get_task(task_name).augment
    if level == "off":
        return None
    return base if level == "base" else robust_augment(base, level)


def _data(task_name: str, size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    task = get_task(task_name)
    images, targets = task.render_phantoms(n, size, 0, range(n))
    x = images_to_tensor(images)
    y = torch.from_numpy(targets.astype("uint8" if task.kind == "segmentation" else "int64"))
    return x, y


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_case(model_name: str, task_name: str, size: int, batch: int, batches: int,
                 repeats: int) -> dict[str, dict[str, float]]:
    """Median ms per batch of prep (per level) and of the training step."""
    task = get_task(task_name)
    images, targets = _data(task_name, size, batch * batches)
    objective = task.objective()
    engine = StandardSteps(TrainConfig(batch_size=batch))
    torch.manual_seed(0)
    model = engine.setup(build_model(model_name, task.in_channels, task.num_classes, image_size=size), CPU,
                         objective, tuple(images.shape))
    objective.prepare(images, targets, TrainConfig(batch_size=batch), CPU)
    optimizer = engine.make_optimizer(model, TrainConfig(batch_size=batch), 0.0)
    in_ch = model_in_channels(model)
    model.train()
    slices = [slice(i * batch, (i + 1) * batch) for i in range(batches)]
    augs = {level: _augment(task_name, level) for level in LEVELS}
    prep: dict[str, list[list[float]]] = {level: [] for level in LEVELS}
    step: list[list[float]] = []
    for rep in range(repeats + 1):  # pass 0 warms up oneDNN and the allocator
        gen = torch.Generator().manual_seed(rep)
        times: dict[str, list[float]] = {level: [] for level in LEVELS}
        steps: list[float] = []
        for sl in slices:
            out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for level in LEVELS:
                def prepare(level: str = level, sl: slice = sl, gen: torch.Generator = gen,
                            out: dict[str, tuple[torch.Tensor, torch.Tensor]] = out) -> None:
                    out[level] = objective.batch(images[sl], targets[sl], device=CPU, in_channels=in_ch,
                                                 augment=augs[level], generator=gen, normalize="fixed",
                                                 channels_last=engine.channels_last)
                times[level].append(_time(prepare))
            x, y = out["strong"]

            def train_step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                optimizer.zero_grad(set_to_none=True)
                engine.step(x, y, objective, optimizer)
                optimizer.step()

            steps.append(_time(train_step))
        if rep:
            for level in LEVELS:
                prep[level].append(times[level])
            step.append(steps)

    def best_median(runs: list[list[float]]) -> float:
        return 1000.0 * min(statistics.median(r) for r in runs)

    row = {"prep-ms": {level: best_median(prep[level]) for level in LEVELS}, "step-ms": best_median(step)}
    row["share"] = {level: row["prep-ms"][level] / (row["prep-ms"][level] + row["step-ms"]) for level in LEVELS}
    return row


def measure_monai(task_name: str, size: int, batch: int, batches: int, repeats: int) -> float:
    """Median ms per batch of the strong level's photometric (and, for masks, elastic) transforms, MONAI-style."""
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        RandAdjustContrast,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandHistogramShift,
        RandSimulateLowResolution,
    )

    strong = robust_augment(get_task(task_name).augment, "strong")
    p = strong.robust_p
    photometric = Compose([
        RandSimulateLowResolution(prob=p, zoom_range=(1.0 - strong.resolution_loss, 1.0), upsample_mode="bilinear"),
        RandGaussianSmooth(sigma_x=(0.0, strong.blur), sigma_y=(0.0, strong.blur), prob=p),
        RandAdjustContrast(prob=p, gamma=(float(torch.exp(torch.tensor(-strong.gamma))),
                                          float(torch.exp(torch.tensor(strong.gamma))))),
        RandHistogramShift(num_control_points=6, prob=p),
        RandGaussianNoise(prob=p, std=strong.noise),
    ])
    photometric.set_random_state(0)
    seg = get_task(task_name).kind == "segmentation"
    elastic = Rand2DElasticd(keys=("image", "mask"), spacing=(size // 4, size // 4),
                             magnitude_range=(0.0, strong.elastic * size), prob=p,
                             mode=("bilinear", "nearest"), padding_mode="zeros")
    elastic.set_random_state(0)
    images, targets = _data(task_name, size, batch * batches)
    x = images.float() / 255.0
    runs = []
    for rep in range(repeats + 1):
        per_batch = []
        for i in range(batches):
            xb = x[i * batch:(i + 1) * batch]
            yb = targets[i * batch:(i + 1) * batch]

            def one_batch(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> None:
                for j in range(len(xb)):
                    img = xb[j]
                    if seg:
                        img = elastic({"image": img, "mask": yb[j:j + 1].float()})["image"]
                    photometric(img)
            per_batch.append(_time(one_batch))
        if rep:
            runs.append(per_batch)
    return 1000.0 * min(statistics.median(r) for r in runs)


def measure_seg_models(size: int, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """ms per training step (fp32, plain SGD) and parameters of the segmentation networks at ``size`` px."""
    import torch.nn.functional as F
    from torchvision.models.segmentation import fcn_resnet50

    def tv_fcn50() -> torch.nn.Module:
        net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=False)
        net.backbone.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net

    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "unet": lambda: build_model("unet", 1, 2), "fcn": lambda: build_model("fcn", 1, 2),
        "torchvision fcn_resnet50": tv_fcn50,
    }
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 1, size, size), generator=gen)
    y = (torch.rand((batch, size, size), generator=gen) < 0.4).long()
    out: dict[str, dict[str, float]] = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            logits = model(x)
            logits = logits["out"] if isinstance(logits, dict) else logits
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(logits, y).backward()
            opt.step()

        step()
        times = [_time(step) for _ in range(repeats)]
        out[name] = {"step-ms": 1000.0 * min(times), "parameters": float(sum(p.numel() for p in model.parameters()))}
    return out


def main() -> None:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=6, help="batches per pass")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes (the best median counts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-monai", action="store_true", help="skip the MONAI per-image reference")
    ap.add_argument("--skip-models", action="store_true", help="skip the segmentation-model table")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "augment_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    rows = []
    for model_name, task_name, size in CASES:
        row = measure_case(model_name, task_name, size, args.batch_size, args.batches, args.repeats)
        if not args.skip_monai:
            row["monai-per-image-ms"] = measure_monai(task_name, size, args.batch_size, args.batches, args.repeats)
        rows.append({"model": model_name, "task": task_name, "image-size": size, **row})
        print(f"  {model_name} {size}px: step {row['step-ms']:.1f} ms, strong prep {row['prep-ms']['strong']:.1f} ms",
              flush=True)
    models = None if args.skip_models else measure_seg_models(64, 8, max(args.repeats, 2))

    result = {"batch-size": args.batch_size, "batches": args.batches, "repeats": args.repeats,
              "threads": args.threads,
              "levels": {lv: (dataclasses.asdict(a) if (a := _augment("lung-seg", lv)) else None) for lv in LEVELS},
              "cases": rows, "segmentation-models-64px-batch-8": models}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)

    print(f"\nbatch {args.batch_size}, {args.threads} threads, median of {args.batches} batches, best of "
          f"{args.repeats}; prep = objective.batch (augmentation included), step = forward+backward+optimizer (bf16)")
    head = f"{'model':<10}{'px':>5}{'step ms':>9}" + "".join(f"{'prep ' + lv:>12}" for lv in LEVELS)
    head += f"{'share strong':>14}" + ("" if args.skip_monai else f"{'MONAI loop':>14}")
    print(head)
    for r in rows:
        line = f"{r['model']:<10}{r['image-size']:>5}{r['step-ms']:>9.1f}"
        line += "".join(f"{r['prep-ms'][lv]:>12.2f}" for lv in LEVELS)
        line += f"{100 * r['share']['strong']:>13.1f}%"
        if not args.skip_monai:
            line += f"{r['monai-per-image-ms']:>14.1f}"
        print(line)
    if models:
        print("\nsegmentation networks, 64 px, batch 8, fp32 training step:")
        for name, m in models.items():
            print(f"  {name:<26}{m['step-ms']:>9.1f} ms {m['parameters'] / 1e6:>7.1f} M parameters")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
