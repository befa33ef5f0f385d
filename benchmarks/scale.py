"""Benchmark: 100 simulated phantom sites on one machine: peak memory and per-round overhead.

Runs one ``medfed simulate`` (the real thing: SuperLink, Flower's simulation
runtime with its ServerApp, Ray and its worker processes) with many tiny
sites: small phantoms, few images per site, one local epoch, 2 rounds. While
it runs, a sampler thread sums the memory of the whole process tree every
half second: this process's descendants plus any process carrying this run's
marker variable in its environment (Ray may re-parent its workers). It
reports:

* peak RSS of the tree (the goal: below 8 GiB) and, sampled less often,
  peak PSS (shared pages split between processes: RSS counts the torch
  libraries once per process), and the RSS per component at the peak
  (SuperLink, ``flwr-simulation`` = ServerApp + Ray driver, Ray's own
  daemons, Ray workers = the sites' actors, ``flwr run``);
* per round, from the run's ``metrics.json``: wall time of the round
  (training + evaluation phases), the slowest site's training time, and the
  overhead = round wall time - slowest site's training time (what
  federation costs beyond the slowest site: message passing, queueing of
  sites behind the ``2 / cpus-per-site`` Ray actors, evaluation, aggregation,
  checkpoints), next to the sum of all sites' training times divided by the
  number of actors (the floor that queueing alone imposes).

Prints a markdown table and writes JSON (default ``benchmarks/out/scale.json``).

    python benchmarks/scale.py [--sites 100] [--rounds 2] [--images-per-site 20] [--cpus-per-site 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.results import RunFolder  # noqa: E402
from simulation.runner import simulate  # noqa: E402

MARKER = "MEDFED_SCALE_BENCH"
GIB = 1024**3
GOAL_GIB = 8.0
COMPONENTS = (  # first match of the command line wins
    ("superlink", ("flower-superlink",)),
    ("superexec", ("flower-superexec", "flwr-superexec")),
    ("serverapp (flwr-simulation)", ("flwr-simulation",)),
    ("flwr run", ("bin/flwr run", "flwr run")),
    ("ray workers (sites)", ("ray::", "default_worker.py", "setup_worker.py")),
    ("ray daemons", ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray/")),
)


def component(cmdline: list[str]) -> str:
    """Which part of the run a process is, from its command line."""
    text = " ".join(cmdline)
    for name, needles in COMPONENTS:
        if any(n in text for n in needles):
            return name
    return "other (this benchmark, ...)"


class TreeSampler(threading.Thread):
    """Samples the run's process tree: RSS every ``interval`` s, PSS every ``pss_every`` samples."""

    def __init__(self, marker: str, interval: float = 0.5, pss_every: int = 6) -> None:
        super().__init__(daemon=True)
        self.marker, self.interval, self.pss_every = marker, interval, pss_every
        self.me = psutil.Process()
        self.stop = threading.Event()
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_processes = 0
        self.max_processes = 0
        self.samples = 0

    def processes(self) -> list[psutil.Process]:
        found = {p.pid: p for p in self.me.children(recursive=True)}
        found[self.me.pid] = self.me
        for p in psutil.process_iter(["pid"]):
            if p.pid in found:
                continue
            try:
                if p.environ().get(MARKER) == self.marker:
                    found[p.pid] = p
            except (psutil.Error, OSError):
                continue
        return list(found.values())

    def run(self) -> None:
        while not self.stop.is_set():
            procs = self.processes()
            rss, pss, breakdown = 0, 0, {}
            with_pss = self.samples % self.pss_every == 0
            for p in procs:
                try:
                    if with_pss:
                        info = p.memory_full_info()
                        pss += int(getattr(info, "pss", info.rss))
                    else:
                        info = p.memory_info()
                    name = component(p.cmdline())
                except (psutil.Error, OSError):
                    continue
                rss += int(info.rss)
                breakdown[name] = breakdown.get(name, 0) + int(info.rss)
            if rss > self.peak_rss:
                self.peak_rss, self.peak_breakdown, self.peak_processes = rss, breakdown, len(procs)
            self.peak_pss = max(self.peak_pss, pss)
            self.max_processes = max(self.max_processes, len(procs))
            self.samples += 1
            self.stop.wait(self.interval)


def round_rows(rounds: list[dict[str, Any]], actors: int) -> list[dict[str, Any]]:
    """Per round: wall time, slowest site's training, overhead, the queueing floor."""
    out = []
    for r in rounds:
        site_train = [float(s["train-seconds"]) for s in (r.get("train-sites") or {}).values() if "train-seconds" in s]
        slowest = max(site_train) if site_train else float("nan")
        wall = float(r.get("round-s", float("nan")))
        out.append({
            "round": r["round"], "sites-trained": len(site_train),
            "sites-evaluated": int((r.get("evaluate") or {}).get("num-sites", 0)),
            "round-s": wall, "train-phase-s": float(r.get("train-phase-s", float("nan"))),
            "evaluate-phase-s": float(r.get("evaluate-phase-s", float("nan"))),
            "slowest-site-train-s": slowest, "overhead-s": wall - slowest,
            "sum-site-train-s": sum(site_train), "queue-floor-s": sum(site_train) / max(actors, 1),
            "median-site-train-s": statistics.median(site_train) if site_train else float("nan"),
            "val-auroc": (r.get("evaluate") or {}).get("auroc"),
        })
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images-per-site", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--cpus-per-site", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "scale.json"))
    ap.add_argument("--keep", action="store_true", help="keep the run's results folder (default: removed at the end)")
    args = ap.parse_args()

    cpus = os.cpu_count() or 1
    actors = max(1, cpus // args.cpus_per_site)
    marker = uuid.uuid4().hex
    os.environ[MARKER] = marker  # inherited by every process of the run (the runner copies the environment)
    scratch = Path(tempfile.mkdtemp(prefix="medfed-scale-"))
    os.environ.setdefault("MEDFED_CACHE_DIR", str(scratch / "cache"))
    overrides = {
        "num-server-rounds": args.rounds, "image-size": args.image_size,
        "phantom-count": args.sites * args.images_per_site, "local-epochs": 1,
        "min-sites": args.sites, "min-partition-size": min(10, args.images_per_site),
        "min-train-images": 0, "min-val-images": 0, "round-timeout": 3600.0,
        "results-dir": str(scratch / "results"), "run-name": "scale",
    }
    sampler = TreeSampler(marker)
    sampler.start()
    t0 = time.time()
    try:
        result = simulate(overrides, sites=args.sites, cpus_per_site=args.cpus_per_site)
    finally:
        sampler.stop.set()
        sampler.join()
    wall = time.time() - t0
    folder = RunFolder(result.run_dir)
    rows = round_rows(folder.read_rounds(), actors)
    summary = folder.read_summary()

    report = {
        "benchmark": "scale", "sites": args.sites, "rounds": args.rounds, "images-per-site": args.images_per_site,
        "image-size": args.image_size, "cpus": cpus, "cpus-per-site": args.cpus_per_site, "ray-actors": actors,
        "wall-s": wall, "peak-rss-gib": sampler.peak_rss / GIB, "peak-pss-gib": sampler.peak_pss / GIB,
        "goal-gib": GOAL_GIB, "within-goal": sampler.peak_rss / GIB < GOAL_GIB,
        "peak-rss-by-component-gib": {k: v / GIB for k, v in sorted(sampler.peak_breakdown.items())},
        "processes-at-peak": sampler.peak_processes, "max-processes": sampler.max_processes,
        "samples": sampler.samples, "rounds-detail": rows,
        "final-val-auroc": summary.get("final", {}).get("auroc"),
        "load-average": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"## {args.sites} simulated sites, {args.rounds} rounds, {args.images_per_site} phantoms/site at "
          f"{args.image_size} px, 1 local epoch; {cpus} CPUs, cpus-per-site {args.cpus_per_site} = {actors} Ray actors")
    print(f"\nwall {wall:.0f} s; peak RSS of the process tree {report['peak-rss-gib']:.2f} GiB "
          f"(goal < {GOAL_GIB:g} GiB: {'met' if report['within-goal'] else 'NOT met'}), peak PSS "
          f"{report['peak-pss-gib']:.2f} GiB; {sampler.max_processes} processes at most; load average "
          f"{report['load-average'][0]:.1f}\n")
    print("| component | RSS at peak (GiB) |\n|---|---|")
    for k, v in report["peak-rss-by-component-gib"].items():
        print(f"| {k} | {v:.2f} |")
    print("\n| round | sites trained / evaluated | round wall (s) | train phase (s) | evaluate phase (s) "
          "| slowest site train (s) | overhead (s) | sum of site train / actors (s) | val AUROC |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        auroc = f"{r['val-auroc']:.3f}" if isinstance(r["val-auroc"], float) else "n/a"
        print(f"| {r['round']} | {r['sites-trained']} / {r['sites-evaluated']} | {r['round-s']:.1f} | "
              f"{r['train-phase-s']:.1f} | {r['evaluate-phase-s']:.1f} | {r['slowest-site-train-s']:.2f} | "
              f"{r['overhead-s']:.1f} | {r['queue-floor-s']:.1f} | {auroc} |")
    print(f"\nJSON: {out}")
    if args.keep:
        print(f"results folder: {folder.path}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
