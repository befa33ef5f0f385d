"""The results folder of one run.

::

    <results-dir>/<run-name>/
        config.json     resolved run config (flat keys) and software versions
        metrics.json    per round: pooled and per-site training/evaluation metrics
        rounds.csv      one row per round (pooled metrics)
        sites.csv       one row per site and round
        model.pt        final global weights + what is needed to use them
        summary.json    final pooled metrics, wall time, where things are

Everything is rewritten after each round, so an interrupted run keeps what it
had. Nothing here holds image paths or patient ids: only counts and rates.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is written: commands that only read results stay light
    import torch

METRIC_COLUMNS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "eval-loss")


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def resolve_results_dir(results_dir: str) -> Path:
    """Absolute results folder: relative paths are taken against ``MEDFED_RESULTS_ROOT`` or the cwd."""
    p = Path(results_dir).expanduser()
    if not p.is_absolute():
        p = Path(os.environ.get("MEDFED_RESULTS_ROOT", os.getcwd())) / p
    return p


def new_run_dir(results_dir: str, run_name: str = "", *, tag: str = "") -> Path:
    """Create a fresh run folder; never reuses (and so never overwrites) an existing one."""
    base = resolve_results_dir(results_dir)
    name = run_name or time.strftime("%Y%m%d-%H%M%S") + (f"-{tag}" if tag else "")
    candidate, k = base / name, 1
    while candidate.exists():
        k += 1
        candidate = base / f"{name}-{k}"
    candidate.mkdir(parents=True)
    return candidate


class ResultsWriter:
    """Collects per-round records and keeps the results folder up to date."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self.t0 = time.time()

    def write_config(self, flat_config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        """Write ``config.json``: the resolved run config plus versions."""
        write_json(self.run_dir / "config.json", {"run-config": dict(flat_config), **(extra or {})})

    def add_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record and rewrite metrics.json, rounds.csv, sites.csv."""
        self.rounds.append(dict(record))
        write_json(self.run_dir / "metrics.json", {"rounds": self.rounds})
        self._write_csvs()

    def _write_csvs(self) -> None:
        with open(self.run_dir / "rounds.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["round", "elapsed-s", "round-s", "num-sites", "train-loss", *METRIC_COLUMNS,
                        "dp-epsilon", "dp-delta"])
            for r in self.rounds:
                ev, tr, dp = r.get("evaluate", {}), r.get("train", {}), r.get("dp", {})
                w.writerow([r["round"], _fmt(r.get("elapsed-s")), _fmt(r.get("round-s")), _fmt(ev.get("num-sites")),
                            _fmt(tr.get("train-loss")), *(_fmt(ev.get(c)) for c in METRIC_COLUMNS),
                            _fmt(dp.get("epsilon")), _fmt(dp.get("delta"))])
        with open(self.run_dir / "sites.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["round", "site-id", "num-train", "train-loss", "train-s", "train-img-per-s", "num-val", *METRIC_COLUMNS,
                        "dp-epsilon", "dp-refused"])
            for r in self.rounds:
                sites = sorted(set(r.get("train-sites", {})) | set(r.get("evaluate-sites", {})) | set(r.get("dp-refusals", {})))
                for s in sites:
                    tr = r.get("train-sites", {}).get(s, {})
                    ev = r.get("evaluate-sites", {}).get(s, {})
                    w.writerow([r["round"], s, _fmt(tr.get("num-examples")), _fmt(tr.get("train-loss")),
                                _fmt(tr.get("train-seconds")), _fmt(tr.get("train-images-per-s")),
                                _fmt(ev.get("num-examples")), *(_fmt(ev.get(c)) for c in METRIC_COLUMNS),
                                _fmt(tr.get("dp-epsilon")), "1" if s in r.get("dp-refusals", {}) else ""])

    def write_model(self, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Save the final global model with what is needed to rebuild and use it."""
        import torch

        path = self.run_dir / "model.pt"
        torch.save({"state_dict": dict(state_dict), "meta": dict(meta)}, path)
        return path

    def write_summary(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json: last round's pooled metrics and the wall time."""
        evaluated = [r for r in self.rounds if r.get("evaluate")]
        last = evaluated[-1] if evaluated else {}
        summary = {
            "rounds": len(self.rounds),
            "wall-seconds": time.time() - self.t0,
            "final-round": last.get("round"),
            "final": last.get("evaluate", {}),
            "final-per-site": last.get("evaluate-sites", {}),
            **(extra or {}),
        }
        write_json(self.run_dir / "summary.json", summary)
        return summary


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)
