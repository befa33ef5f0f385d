"""How the ``accurate`` recipes were chosen: candidate run configs scored on an unseen, shifted site.

The selection protocol, kept apart from what the generalisation benchmark
reports (``benchmarks/generalisation.py``): each candidate (a ``--run-config``
string of recipe keys) runs ``medfed simulate`` on the task's real data (or
its phantoms) with ``--sites`` simulated sites (default 3), ``site-shift=true``
and ``holdout-sites=1``, at a *selection seed* (default 1: another partition
and other scanner profiles than the benchmark's seed 0). For pneumonia the
data is the training part of the benchmark's patient-disjoint split: the test
split is never read here. Candidates are ranked by the unseen site's primary
metric (AUROC, Dice), then by validation; the wall time is shown so that a
cheaper candidate within noise can be preferred.

    python benchmarks/recipe_search.py --task lung-seg \\
        --candidate "image-size=128 num-server-rounds=4 local-epochs=4 batch-size=8 lr=0.003" \\
        --candidate "image-size=128 num-server-rounds=8 local-epochs=4 batch-size=8 lr=0.003"

Results accumulate in ``benchmarks/out/recipe-search/<task>.json`` (a
candidate already there for the same seed is not run again); the table of all
of them is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generalisation import DATASETS, OUT, figures, prepare_data  # noqa: E402

from shared.atomic import write_json  # noqa: E402
from shared.config import parse_overrides  # noqa: E402
from shared.formatting import fmt_metric  # noqa: E402


def run_candidate(task: str, candidate: str, *, data_path: str, seed: int, sites: int, precision: str,
                  runs_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """One candidate under the selection protocol; its validation and unseen-site figures."""
    from shared.results import RunFolder
    from shared.tasks import get_task
    from simulation.runner import simulate

    flat: dict[str, Any] = {"task": task, "site-shift": True, "holdout-sites": 1, "min-sites": sites - 1,
                            "seed": seed, "precision": precision, "results-dir": str(runs_dir),
                            "run-name": f"{task}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}", **extra}
    if data_path:
        flat["data-path"] = data_path
    flat.update(parse_overrides(candidate))
    result = simulate(flat, sites=sites)
    folder = RunFolder.open(result.run_dir)
    summary, config = folder.read_summary(), folder.run_config()
    primary = get_task(task).view.primary
    val, unseen = figures(summary.get("final", {}), primary), figures(summary.get("final-holdout", {}), primary)
    per_round = [(r.get("evaluate", {}).get(primary), r.get("holdout", {}).get(primary)) for r in folder.read_rounds()]
    return {"candidate": candidate, "seed": seed, "primary": primary, "validation": val, "unseen-site": unseen,
            "gap": (val[primary] - unseen[primary]) if val[primary] is not None and unseen[primary] is not None
            else None,
            "per-round": per_round, "wall-seconds": result.seconds, "run-dir": str(result.run_dir),
            "config": {k: config.get(k) for k in ("model", "image-size", "num-server-rounds", "local-epochs",
                                                  "batch-size", "lr", "normalize", "phantom-count")}}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of candidates, best unseen-site figure first."""
    head = ["candidate", "seed", "validation", "unseen site", "gap", "unseen sens@thr", "unseen spec@thr", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def key(r: dict[str, Any]) -> tuple[float, float]:
        p = r["primary"]
        return (-(r["unseen-site"].get(p) or 0.0), -(r["validation"].get(p) or 0.0))

    for r in sorted(rows, key=key):
        p = r["primary"]
        lines.append("| " + " | ".join([
            f"`{r['candidate']}`", str(r["seed"]), f"{p} {fmt_metric(r['validation'].get(p))}",
            f"{p} {fmt_metric(r['unseen-site'].get(p))}", fmt_metric(r["gap"], spec="+.3f"),
            fmt_metric(r["unseen-site"].get("sensitivity@thr")), fmt_metric(r["unseen-site"].get("specificity@thr")),
            f"{r['wall-seconds'] / 60:.1f}"]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the candidates not yet in the task's results file, then print the table of all."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--candidate", action="append", default=[], help="run-config string of recipe keys; repeatable")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--run-config", default="", help="further fixed keys for every candidate (e.g. phantom-count)")
    ap.add_argument("--out-dir", type=Path, default=OUT / "recipe-search")
    args = ap.parse_args(argv)
    out = args.out_dir / f"{args.task}.json"
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.exists() else []
    data_path = ""
    if args.task in DATASETS:  # real data (pneumonia: the training part of the benchmark's split only)
        data = prepare_data(args.task, DATASETS[args.task], OUT / "generalisation", test_fraction=0.2, split_seed=0)
        data_path = str(data.data_path)
    elif args.task == "pneumonia-cxr-3class":
        data = prepare_data("pneumonia-cxr", DATASETS["pneumonia-cxr"], OUT / "generalisation", test_fraction=0.2,
                            split_seed=0)
        data_path = str(data.data_path)
    extra = parse_overrides(args.run_config) if args.run_config else {}
    for candidate in args.candidate:
        if any(r["candidate"] == candidate and r["seed"] == args.seed and r.get("extra", {}) == extra for r in rows):
            print(f"already run: {candidate}")
            continue
        print(f"{args.task}: {candidate} (seed {args.seed}) ...", flush=True)
        row = run_candidate(args.task, candidate, data_path=data_path, seed=args.seed, sites=args.sites,
                            precision=args.precision, runs_dir=args.out_dir / "runs", extra=extra)
        row["extra"] = extra
        p = row["primary"]
        print(f"  validation {fmt_metric(row['validation'][p])}, unseen site {fmt_metric(row['unseen-site'][p])} "
              f"({row['wall-seconds'] / 60:.1f} min)", flush=True)
        rows.append(row)
        write_json(out, {"task": args.task, "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
