"""Benchmark: site ingestion, first pass (decode + preprocess) vs cached passes.

On ``../shared/data/cxr-pneumonia`` (or ``--data``): the images/s of the first
pass, which decodes every file and runs the preprocessing pipeline, and of
later passes, which read the memory-mapped site cache; then, for one site of
a 5-site federation, how long loading takes compared with one local epoch of
``resnet18`` at 128 px (the issue's "loading < 10 % of round time").
Prints a table and writes JSON (default ``benchmarks/out/ingest.json``).

    python benchmarks/ingest.py [--data PATH] [--image-size 128] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import parse_run_config  # noqa: E402
from shared.data.cache import SiteCache, build_or_load  # noqa: E402
from shared.data.labels import class_mapping  # noqa: E402
from shared.data.reading import READER_VERSION, make_reader  # noqa: E402
from shared.data.sources import discover  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.tasks import get_task  # noqa: E402


def train_images_per_s(model_name: str, size: int, batch: int = 32, steps: int = 6) -> float:
    """Forward+backward images/s with the training defaults (bf16 autocast + channels_last)."""
    torch.manual_seed(0)
    model = build_model(model_name, 1, 2).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr-pneumonia")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ingest.json")
    args = ap.parse_args()
    if not args.data.exists():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2

    task = get_task("pneumonia-cxr")
    cfg = parse_run_config({"image-size": args.image_size})
    pcfg = task.preprocess_for(cfg)
    listing = discover(args.data)
    labels = class_mapping(listing.class_names, task.class_names)[listing.labels()]
    n = len(listing.records) if args.limit <= 0 else min(args.limit, len(listing.records))
    files = [r.path for r in listing.records[:n]]
    extra = {"reader": READER_VERSION, "dicom-window-fallback": cfg.data.dicom_window_fallback}
    reader = make_reader(cfg)

    with tempfile.TemporaryDirectory(prefix="medfed-ingest-") as tmp:
        cache = SiteCache(Path(tmp))
        t0 = time.perf_counter()
        first = build_or_load(cache, files, labels[:n], pcfg, reader, extra=extra)
        t_first = time.perf_counter() - t0
        cached_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            again = build_or_load(cache, files, labels[:n], pcfg, reader, extra=extra)
            checksum = int(np.asarray(again.images, dtype=np.uint64).sum())  # touch every pixel
            cached_times.append(time.perf_counter() - t0)
        assert checksum == int(np.asarray(first.images, dtype=np.uint64).sum())
    t_cached = float(np.median(cached_times))
    kept = len(first.kept)

    site_n = kept // args.sites
    ips = train_images_per_s("resnet18", args.image_size)
    epoch_s = site_n / ips
    site_first_s = t_first * site_n / kept
    site_cached_s = t_cached * site_n / kept
    result = {
        "data": str(args.data.name), "images": n, "usable": kept, "image-size": args.image_size,
        "preprocess": pcfg.to_dict(),
        "first-pass-s": t_first, "first-pass-images-per-s": kept / t_first,
        "cached-pass-s-median": t_cached, "cached-pass-images-per-s": kept / t_cached,
        "speedup-cached-vs-first": t_first / t_cached,
        "site": {"sites": args.sites, "images": site_n, "resnet18-train-images-per-s": ips,
                 "one-local-epoch-s": epoch_s, "first-load-s": site_first_s, "cached-load-s": site_cached_s,
                 "first-load-fraction-of-round": site_first_s / (site_first_s + epoch_s),
                 "cached-load-fraction-of-round": site_cached_s / (site_cached_s + epoch_s)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["site"]
    print(f"\n{kept} of {n} images from {args.data.name}, {args.image_size} px, preprocess {pcfg.to_dict()}")
    print(f"{'measure':<58}{'value':>12}")
    print(f"{'first pass (decode + preprocess + cache write), images/s':<58}{kept / t_first:>12.0f}")
    print(f"{'cached pass (memory-mapped read of every pixel), images/s':<58}{kept / t_cached:>12.0f}")
    print(f"{'speed-up cached / first':<58}{t_first / t_cached:>12.1f}x")
    print(f"{'one site of ' + str(args.sites) + ': images':<58}{site_n:>12d}")
    print(f"{'resnet18 local epoch at ' + str(args.image_size) + ' px (s)':<58}{epoch_s:>12.1f}")
    print(f"{'cached load as a fraction of a 1-epoch round':<58}{s['cached-load-fraction-of-round']:>12.2%}")
    print(f"{'first-pass load as a fraction of a 1-epoch round':<58}{s['first-load-fraction-of-round']:>12.2%}")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
