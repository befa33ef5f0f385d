"""The model card of a federated run (``model-card.json`` and the report's last section).

A card says what the model is for, what it was trained and checked on (counts
by site, never a path, a file name or a patient id), how images must be
prepared, what privacy it guarantees, what it cannot be trusted for, and
which software made it. It is built from the results folder only
(:class:`~shared.report.run.RunData`), so everything in it is what the server
knew: where the server cannot know something (the sites' data files), the
card says so instead of guessing.
"""

from __future__ import annotations

import math
import time
from typing import Any

from shared.formatting import fmt_metric
from shared.report.run import RunData

__all__ = ["CARD_SCHEMA", "build_model_card", "limitations"]

CARD_SCHEMA = "medfed-model-card/1"

NOT_AT_SERVER = ("not available at the server: sites send counts only, never file names, paths or content hashes "
                 "of their images")


def _round_metrics(m: dict[str, Any] | None) -> dict[str, Any]:
    """A metrics block without the per-class clutter, JSON-ready (NaN -> None)."""
    out: dict[str, Any] = {}
    for k, v in (m or {}).items():
        if isinstance(v, float):
            out[k] = v if math.isfinite(v) else None
        elif isinstance(v, (int, str)) or v is None:
            out[k] = v
    return out


def limitations(data: RunData) -> list[str]:
    """What the reader of this model's figures must keep in mind, from the run's own records."""
    rc, out = data.run_config, []
    if data.phantoms:
        out.append("Trained and validated on synthetic phantoms: the figures say nothing about performance on "
                   "real patients' images.")
    if data.positive_class is not None and data.threshold is not None:
        out.append(f"The operating threshold {data.threshold:.3f} was chosen ({data.task.threshold_method}) on the "
                   "same pooled validation counts it is reported on, so the validation figures at that threshold "
                   "are optimistic; holdout-site and test-set figures (when present) are scored at it without "
                   "re-tuning. Validate it locally with 'medfed evaluate' before use.")
    if rc.get("strategy") == "fedbn":
        out.append("FedBN: each site kept its own normalisation layers; the saved global model carries the "
                   "server's never-trained normalisation tensors. A new site must fine-tune or recompute its "
                   "normalisation statistics before using it.")
    if not rc.get("dp.enabled"):
        out.append("No differential privacy (DP-SGD off): images never left the sites, but the model and the "
                   "counts carry no formal guarantee against membership inference.")
    last = data.last
    n_val = int(last.get("evaluate", {}).get("num-examples", 0) or 0)
    if n_val and n_val < 200:
        out.append(f"Only {n_val} validation images in the last round: every validation figure is uncertain by "
                   "several points (see the subgroup intervals; the server has no per-image scores for bootstrap "
                   "intervals).")
    if not last.get("holdout") and not last.get("test"):
        out.append("No holdout site and no test set: every figure comes from the validation splits of the training "
                   "sites, which share those sites' acquisition and population.")
    if data.view.name == "segmentation":
        out.append("Segmentation figures are means over images computed from per-site sums; no per-image "
                   "distribution reaches the server. HD95 is in pixels of the model's input size unless hd95-mm "
                   "(images with a known pixel spacing) is given.")
    else:
        out.append("AUROC, AUPRC, ECE and the curves come from 1000-bin score histograms summed over sites "
                   "(within about 1e-3 of the exact values).")
    fairness = (last.get("fairness") or {}).get("subgroups") or {}
    suppressed = sum(int(c.get("suppressed-cells", 0)) + int(c.get("withheld-cells", 0))
                     for c in (fairness.get("columns") or {}).values())
    if suppressed:
        out.append(f"{suppressed} subgroup cell(s) were suppressed or withheld at the sites (fewer than "
                   f"{fairness.get('min-cell')} images, or to protect such cells): subgroup figures cover part "
                   "of the validation images only.")
    if data.summary.get("stopped-early"):
        out.append(f"The run stopped early: {data.summary['stopped-early']}.")
    rejected = sum(len(r.get("train-rejected", [])) + len(r.get("evaluate-rejected", [])) for r in data.rounds)
    if rejected:
        out.append(f"{rejected} site repl(y/ies) were rejected by the server's checks during the run (see the "
                   "rounds table).")
    return out


def _privacy(data: RunData) -> dict[str, Any]:
    rc, summary = data.run_config, data.summary
    out: dict[str, Any] = {}
    if rc.get("dp.enabled"):
        p = summary.get("privacy") or {}
        out["dp-sgd"] = {
            "statement": (f"(epsilon {fmt_metric(p.get('epsilon'))}, delta {fmt_metric(p.get('delta'), spec='.1e')}) "
                          f"per {p.get('unit', 'image')}, maximum over sites "
                          f"({p.get('accountant', rc.get('dp.accountant'))} "
                          "accountant)") if p else "DP-SGD was on, but no round finished training",
            **{k: v for k, v in p.items() if k in ("epsilon", "delta", "unit", "accountant", "meaning",
                                                   "per-site-epsilon", "budget-refusals")},
        }
    if summary.get("central-dp"):
        out["central-dp"] = summary["central-dp"]
    if not out:
        out["statement"] = "none: no differential privacy (images never leave the sites; only weights and counts do)"
    return out


def build_model_card(data: RunData, *, generated: str | None = None) -> dict[str, Any]:
    """The model card of a run as a JSON-ready dict (schema :data:`CARD_SCHEMA`).

    Parameters
    ----------
    data:
        The run (:func:`shared.report.run.load_run`).
    generated:
        Timestamp to record (default: now, UTC, ISO 8601).
    """
    rc, cfg, task = data.run_config, data.config, data.task
    last = data.last
    sites = data.site_data
    names = list(data.class_names)
    per_site = []
    for site, info in sorted(sites.items()):
        row: dict[str, Any] = {"site": site, "role": info.get("role", "train"),
                               "training-images": info.get("train"), "validation-images": info.get("validation"),
                               "quarantined-files": info.get("quarantined")}
        for key, field in (("train-classes", "training-images-per-class"),
                           ("validation-classes", "validation-images-per-class")):
            if info.get(key) is not None and data.view.name != "segmentation":
                row[field] = dict(zip(names, info[key], strict=False))
        per_site.append(row)
    train_sites = [s for s in per_site if s["role"] != "holdout"]
    if data.phantoms:
        source = (f"synthetic phantoms generated from seed {rc.get('seed')} (phantom-count {rc.get('phantom-count')}), "
                  "partitioned across simulated sites: no patient data")
        hashes: Any = "not applicable: synthetic phantoms are generated, not read from files"
    elif data.simulated:
        source = ("a real dataset partitioned across simulated sites (data-path of the simulation; path not "
                  "recorded here)")
        hashes = NOT_AT_SERVER
    else:
        source = "each hospital site's own images (never seen by the server)"
        hashes = NOT_AT_SERVER
    evaluation: dict[str, Any] = {
        "round": last.get("round"),
        "validation": {"what": "pooled validation splits of the training sites (summed counts)",
                       "metrics": _round_metrics(last.get("evaluate"))},
    }
    if last.get("holdout"):
        evaluation["holdout-sites"] = {"what": "sites that never trained, scored at the validation threshold",
                                       "metrics": _round_metrics(last["holdout"])}
    if last.get("test"):
        evaluation["test-set"] = {"what": "the server's test set (test-path), never trained on, scored at the "
                                          "validation threshold", "metrics": _round_metrics(last["test"])}
    fairness = last.get("fairness") or {}
    versions = dict(cfg.get("versions") or {})
    return {
        "schema": CARD_SCHEMA,
        "generated": generated or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": data.folder.path.name,
        "model": {
            "name": rc.get("model"), "task": task.name, "description": task.description, "kind": task.kind,
            "classes": names, "positive-class": names[data.positive_class] if data.positive_class is not None else None,
            "image-size": rc.get("image-size"), "in-channels": task.in_channels,
            "operating-threshold": data.threshold,
            "threshold-rule": (task.threshold_method if data.positive_class is not None else
                               "per-pixel most probable class (no threshold)" if data.view.name == "segmentation"
                               else "most probable class (no threshold)"),
            "model-file": "model.pt", "model-file-sha256": data.model_sha256(),
        },
        "intended-use": (f"Research and method development: {task.description}. Not a medical device and not "
                         "validated for clinical decisions; a hospital must validate it on its own images "
                         "('medfed evaluate') before any use."),
        "training": {
            "federation": {"recipe": rc.get("recipe"), "strategy": rc.get("strategy"), "rounds": len(data.rounds),
                           "rounds-planned": rc.get("num-server-rounds"), "local-epochs": rc.get("local-epochs"),
                           "batch-size": rc.get("batch-size"), "optimizer": rc.get("optimizer"), "lr": rc.get("lr"),
                           "seed": rc.get("seed"),
                           "simulated-sites": (data.simulation.get("sites") or len(data.site_data))
                           if data.simulated else None},
            "data-source": source,
            "sites": per_site,
            "total-training-images": sum(int(s.get("training-images") or 0) for s in train_sites),
            "total-validation-images": sum(int(s.get("validation-images") or 0) for s in train_sites),
            "data-file-hashes": hashes,
        },
        "preprocessing": {"preprocess": cfg.get("preprocess") or data.meta.get("preprocess"),
                          "augment": cfg.get("augment", data.meta.get("augment")),
                          "normalize": cfg.get("normalize") or data.meta.get("normalize"),
                          "note": "medfed predict and evaluate apply exactly this pipeline (it is stored in model.pt)"},
        "evaluation": evaluation,
        "calibration": data.summary.get("calibration") or {"status": "not recorded"},
        "out-of-distribution-reference": data.summary.get("ood") or {"status": "not recorded"},
        "fairness": {"across-sites": fairness.get("sites"), "subgroups": fairness.get("subgroups")},
        "privacy": _privacy(data),
        "limitations": limitations(data),
        "software": {"medfed": versions.pop("medfed", None), **versions},
    }
