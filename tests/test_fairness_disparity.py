"""The subgroup report finds a planted disparity, and none when nothing is planted.

A small CNN is trained in-process (no Flower) on pneumonia phantoms twice:
once as rendered, once with ``disparity=0.8`` (opacities of female phantoms
fainter and smaller, in training and held-out images alike). Held-out
phantoms are scored by two "sites" whose subgroup counts go through the flat
key scheme, are merged and reported exactly as in a federation; the
equal-opportunity difference (sensitivity gap) between the sex subgroups must
exceed 0.1 when planted and stay below 0.05 otherwise.

Figures (seed 1, 1200 training and 2400 held-out phantoms at 64 px, 8
epochs at lr 1e-3, fp32, pooled Youden threshold, 1 thread) on a 2-core AMD
EPYC (AVX2): without disparity AUROC 0.854 (F 0.849, M 0.859), gap 0.029;
planted: AUROC 0.709 (F 0.586, M 0.826), gap 0.434. At lr 2e-3 (used until
2026-12-02) the AVX-512 Xeon gave 0.867 / 0.021 and 0.711 / 0.448, but the
EPYC's float rounding left both models weak (AUROC 0.737 and 0.618, planted
M 0.668): the weak-model guard failed there, so the rate was lowered.
With ~600 positives per group the sampling SD of a sensitivity difference
is about 0.025, which is why the held-out set is this large (the un-planted
bound is not loosened); 600 training phantoms were too few: in fp32 one of
the two models stayed near chance (AUROC 0.59), which the weak-model guard
below reports.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.config import TrainConfig, parse_run_config
from shared.data.phantoms import make_chest_phantoms, phantom_attributes
from shared.data.preprocess import preprocess
from shared.metrics.classification import ClassificationCounts
from shared.metrics.fairness import subgroup_report
from shared.metrics.subgroups import SubgroupSpec, classification_subgroup_counts, merge_subgroup_reports
from shared.models import build_model
from shared.objectives import ClassificationObjective
from shared.tasks import get_task
from shared.training import images_to_tensor, predict_proba, train_local

SEED, N_TRAIN, N_EVAL, DISPARITY = 1, 1200, 2400, 0.8


def _train_and_predict(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray) -> np.ndarray:
    """Train a fresh small-cnn on uint8 images and return held-out probabilities (N, 2).

    The one place that calls the training loop: adapt here if its API changes.
    """
    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 2)
    train_local(model, images_to_tensor(train_x), torch.as_tensor(train_y),
                TrainConfig(local_epochs=8, lr=1e-3), ClassificationObjective(2), seed=0, augment=None)
    probs = predict_proba(model, images_to_tensor(eval_x), precision="fp32", device=torch.device("cpu"))
    return probs.numpy().astype(np.float64)


def _sex_gap(probs: np.ndarray, y: np.ndarray, sex: np.ndarray) -> tuple[dict, float]:
    """Equal-opportunity difference between the sexes at the pooled Youden threshold, via two sites' counts."""
    halves = (slice(0, len(y) // 2), slice(len(y) // 2, len(y)))
    spec = SubgroupSpec(columns=("sex",))
    flats = [classification_subgroup_counts(probs[h], y[h], {"sex": sex[h]}, spec).to_flat() for h in halves]
    pooled = ClassificationCounts.from_predictions(probs[halves[0]], y[halves[0]]).merge(
        ClassificationCounts.from_predictions(probs[halves[1]], y[halves[1]]))
    thr = pooled.select_threshold("youden")
    report = subgroup_report(merge_subgroup_reports(flats), threshold=thr)
    return report["columns"]["sex"], pooled.metrics()["auroc"]


@pytest.mark.timeout(1800)  # about a minute on 2 idle cores; 15 min were measured on a heavily shared machine
def test_planted_disparity_is_found_and_no_gap_without_it() -> None:
    cfg = parse_run_config({"task": "pneumonia-cxr", "image-size": 64})
    pcfg = get_task("pneumonia-cxr").preprocess_for(cfg)
    n = N_TRAIN + N_EVAL
    base, labels = make_chest_phantoms(n, 64, seed=SEED)
    sex = phantom_attributes(np.arange(n), SEED)["sex"]
    planted = base.copy()  # only female positives differ: re-render just those
    female_pos = np.flatnonzero((sex == "F") & (labels == 1))
    planted[female_pos] = make_chest_phantoms(n, 64, seed=SEED, indices=female_pos, disparity=DISPARITY)[0]

    gaps = {}
    for name, images in (("none", base), ("planted", planted)):
        x = np.stack([preprocess(im, pcfg) for im in images])
        probs = _train_and_predict(x[:N_TRAIN], labels[:N_TRAIN], x[N_TRAIN:])
        col, auroc = _sex_gap(probs, labels[N_TRAIN:], sex[N_TRAIN:])
        eod = col["gaps"]["equal-opportunity"]
        by = {e["subgroup"]: e for e in col["subgroups"]}
        print(f"{name}: AUROC {auroc:.3f} (F {by['F']['auroc']:.3f}, M {by['M']['auroc']:.3f}); sensitivity "
              f"F {by['F']['sensitivity']:.3f} ({by['F']['n-positive']} positives) vs M {by['M']['sensitivity']:.3f} "
              f"({by['M']['n-positive']}); equal-opportunity difference {eod['value']:.4f}")
        assert col["suppressed-cells"] == 0 and sorted(by) == ["F", "M"]
        # the model must have learnt the unaffected subgroup, else "no gap" would mean nothing
        assert by["M"]["auroc"] > 0.7, f"{name}: model too weak for the check to mean anything ({by['M']['auroc']:.3f})"
        gaps[name] = eod
    assert gaps["planted"]["value"] > 0.1 and gaps["planted"]["min"]["subgroup"] == "F"
    assert gaps["none"]["value"] < 0.05
