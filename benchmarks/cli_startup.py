"""Benchmark: how long ``medfed`` takes to answer ``--help`` and ``--version``.

Runs ``python -m simulation <args>`` in fresh interpreters (the same entry
point as the ``medfed`` script) for the top-level help, every command's help
and ``--version``, plus a bare ``python -c pass`` for the interpreter's own
start-up; reports the median and max of ``--repeats`` runs in seconds.
Prints a table and writes JSON (default ``benchmarks/out/cli_startup.json``).
The goal: every help answers in well under 2 s (nothing heavy is imported to
build the parser; ``tests/test_cli.py`` checks that part).

    python benchmarks/cli_startup.py [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES: list[tuple[str, list[str]]] = [
    ("python -c pass (interpreter only)", ["-c", "pass"]),
    ("medfed --help", ["-m", "simulation", "--help"]),
    ("medfed --version", ["-m", "simulation", "--version"]),
    ("medfed simulate --help", ["-m", "simulation", "simulate", "--help"]),
    ("medfed data check --help", ["-m", "simulation", "data", "check", "--help"]),
    ("medfed predict --help", ["-m", "simulation", "predict", "--help"]),
    ("medfed evaluate --help", ["-m", "simulation", "evaluate", "--help"]),
    ("medfed privacy plan --help", ["-m", "simulation", "privacy", "plan", "--help"]),
    ("medfed study privacy --help", ["-m", "simulation", "study", "privacy", "--help"]),
    ("medfed audit membership --help", ["-m", "simulation", "audit", "membership", "--help"]),
]


def seconds(args: list[str]) -> float:
    """Wall time of one fresh ``python <args>`` (its output discarded)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    """Time every case and write the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "cli_startup.json")
    args = parser.parse_args()
    rows = []
    for name, argv in CASES:
        seconds(argv)  # warm the file cache
        times = [seconds(argv) for _ in range(args.repeats)]
        rows.append({"case": name, "median-s": statistics.median(times), "max-s": max(times), "runs": len(times)})
    print(f"{'case':<36} {'median s':>9} {'max s':>7}")
    for r in rows:
        print(f"{r['case']:<36} {r['median-s']:>9.2f} {r['max-s']:>7.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(load average {load:.1f} on {os.cpu_count()} CPUs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "load-average-1min": load, "cpus": os.cpu_count(),
                               "python": sys.version.split()[0]}, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
