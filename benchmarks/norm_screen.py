"""Benchmark: how far apart are honest sites' update norms, and what does the norm screen make of them?

Trains simulated phantom sites with medfed's own site code (``load_site_data``,
``train_local``) for a few FedAvg rounds, in one process (no Flower), and
records each site's update norm ``||w_site - w_global||`` per round under
several partitions (IID, Dirichlet label skew 0.5 and 0.1, which also skews
site sizes, and site-specific acquisition shift). For every round it reports:

* the spread (largest norm / median) and the largest update relative to the
  global model's norm (the ``validation.max-update-ratio`` bound is 1000);
* the largest honest modified z-score of the raw norm (plain MAD, no floor)
  and of the log norm (MAD floor 0.1, what the screen uses; an honest site is
  rejected above ``validation.norm-z`` = 3.5);
* whether a sign-flipped x10 copy of the median site's and of the largest
  site's update, added as a 6th reply, is flagged.

Prints a table and writes JSON (default ``benchmarks/out/norm_screen.json``).

    python benchmarks/norm_screen.py [--sites 5] [--rounds 3] [--phantoms 600]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import parse_node_config, parse_run_config  # noqa: E402
from shared.models.run import build_for_run  # noqa: E402
from shared.site_data import load_site_data, resolve_augment  # noqa: E402
from shared.tasks import get_task  # noqa: E402
from shared.training import images_to_tensor, train_local  # noqa: E402
from shared.validation import modified_z_scores, norm_outliers  # noqa: E402

SETTINGS = {
    "iid": {},
    "dirichlet-0.5": {"partition": "dirichlet", "dirichlet-alpha": 0.5},
    "dirichlet-0.1": {"partition": "dirichlet", "dirichlet-alpha": 0.1},
    "site-shift": {"site-shift": True},
}
THRESHOLD = 3.5


def _norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor] | None = None) -> float:
    keys = [k for k in a if a[k].is_floating_point()]
    return math.sqrt(sum(float(((a[k].double() - (b[k].double() if b else 0)) ** 2).sum()) for k in keys))


def run_setting(extra: dict, sites: int, rounds: int, phantoms: int) -> list[dict]:
    """Per round: site sizes, update norms, global norm."""
    cfg = parse_run_config({"phantom-count": phantoms, **extra})
    task = get_task(cfg.task)
    data = []
    for p in range(sites):
        d = load_site_data(cfg, parse_node_config({"partition-id": p, "num-partitions": sites}), task)
        data.append((images_to_tensor(d.train_images), torch.from_numpy(d.train_labels).long()))
    torch.manual_seed(cfg.seed)
    model, _ = build_for_run(cfg, task.in_channels, task.num_classes)
    g = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    for r in range(1, rounds + 1):
        states, sizes, norms = [], [], []
        for p, (x, y) in enumerate(data):
            m, _ = build_for_run(cfg, task.in_channels, task.num_classes)
            m.load_state_dict(g)
            res = train_local(m, x, y, cfg.train, num_classes=task.num_classes, seed=r * 1000 + p,
                              augment=resolve_augment(cfg, task))
            st = {k: v.detach().cpu() for k, v in m.state_dict().items()}
            states.append(st)
            sizes.append(res.num_examples)
            norms.append(_norm(st, g))
        out.append({"round": r, "num-examples": sizes, "norms": norms, "global-norm": _norm(g)})
        total = sum(sizes)
        g = {k: sum(s[k].double() * n / total for s, n in zip(states, sizes, strict=True)).to(g[k].dtype) for k in g}
        print(f"  round {r}: sizes {sizes} norms {[round(v, 3) for v in norms]}", flush=True)
    return out


def analyse(r: dict) -> dict:
    norms = np.asarray(r["norms"])
    med, big = float(np.median(norms)), float(norms.max())
    return {
        "spread": big / med,
        "max-update-ratio": big / r["global-norm"],
        "max-z-raw": float(modified_z_scores(norms).max()),
        "max-z-log": float(modified_z_scores(np.log(norms), 0.1).max()),
        "honest-rejected": int(sum(norm_outliers(list(norms), THRESHOLD))),
        "flip-x10-median-caught": norm_outliers([*norms, 10 * med], THRESHOLD)[-1],
        "flip-x10-largest-caught": norm_outliers([*norms, 10 * big], THRESHOLD)[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phantoms", type=int, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "norm_screen.json")
    args = ap.parse_args()
    os.environ.setdefault("MEDFED_CACHE_DIR", tempfile.mkdtemp(prefix="medfed-bench-cache-"))
    result: dict = {"sites": args.sites, "rounds": args.rounds, "phantoms": args.phantoms, "threshold": THRESHOLD,
                    "settings": {}}
    for name, extra in SETTINGS.items():
        print(f"{name}:", flush=True)
        rounds = run_setting(extra, args.sites, args.rounds, args.phantoms)
        result["settings"][name] = [{**r, **analyse(r)} for r in rounds]

    print(f"\n{args.sites} sites, small-cnn, {args.phantoms} phantoms, norm-z {THRESHOLD}")
    head = (f"{'setting':<15}{'rnd':>4}{'spread':>8}{'upd/glob':>10}{'z raw':>8}{'z log':>8}"
            f"{'honest rej':>11}{'x10 med':>9}{'x10 max':>9}")
    print(head)
    for name, rounds in result["settings"].items():
        for r in rounds:
            print(f"{name:<15}{r['round']:>4}{r['spread']:>8.2f}{r['max-update-ratio']:>10.2f}{r['max-z-raw']:>8.2f}"
                  f"{r['max-z-log']:>8.2f}{r['honest-rejected']:>11}{str(r['flip-x10-median-caught']):>9}"
                  f"{str(r['flip-x10-largest-caught']):>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
