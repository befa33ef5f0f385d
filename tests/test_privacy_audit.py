"""Membership-inference audit: attack math on hand-made losses, per-example losses, a hand-made run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.config import SiteConfig, TrainConfig, parse_run_config
from shared.data.preprocess import normalize_batch
from shared.models import build_model
from shared.objectives import ClassificationObjective
from shared.objectives.segmentation import SegmentationObjective, evaluate_seg
from shared.privacy.audit import (
    AuditError,
    attack_metrics,
    audit_run,
    per_example_losses,
    run_site_count,
    tpr_at_fpr,
)
from shared.results import write_json
from shared.site_data import load_site_data
from shared.tasks import get_task
from shared.training import images_to_tensor, to_float01, train_local

torch.set_num_threads(2)


# ---------------------------------------------------------------------------
# Attack math
# ---------------------------------------------------------------------------


def test_perfectly_separable_losses_give_auc_one_and_full_tpr() -> None:
    members = [0.01, 0.02, 0.05, 0.1]
    nonmembers = [0.5, 0.7, 1.0, 2.0, 3.0]
    m = attack_metrics(members, nonmembers)
    assert m.auc == 1.0
    assert m.tpr_at_fpr == 1.0
    assert (m.n_members, m.n_nonmembers) == (4, 5)
    assert m.mean_member_loss == pytest.approx(np.mean(members))


def test_reversed_losses_give_auc_zero() -> None:
    m = attack_metrics([1.0, 2.0], [0.1, 0.2, 0.3])
    assert m.auc == 0.0 and m.tpr_at_fpr == 0.0


def test_identical_distributions_give_auc_near_half() -> None:
    rng = np.random.default_rng(0)
    m = attack_metrics(rng.exponential(1.0, 5000), rng.exponential(1.0, 5000))
    assert abs(m.auc - 0.5) < 0.03
    assert m.tpr_at_fpr < 0.05


def test_auc_hand_example() -> None:
    # pairs (member, non-member) where the member has the lower loss: (0.1,0.2) (0.1,0.3) (0.25,0.3) -> 3 of 4
    assert attack_metrics([0.1, 0.25], [0.2, 0.3]).auc == pytest.approx(0.75)


def test_tpr_at_one_percent_fpr_hand_example() -> None:
    # 200 non-members with losses 1..200: at most 2 may be flagged (1% FPR), so the threshold
    # may flag every loss < 3 (non-member losses 1 and 2). Members below 3: 0.1 0.5 1.5 1.9 2.5 -> 5 of 10.
    # The member at loss 3.0 ties with a non-member: flagging it flags a third non-member (1.5% FPR).
    nonmembers = np.arange(1, 201, dtype=float)
    members = np.array([0.1, 0.5, 1.5, 1.9, 2.5, 3.0, 10, 50, 100, 150])
    assert attack_metrics(members, nonmembers).tpr_at_fpr == pytest.approx(0.5)
    assert tpr_at_fpr(-members, -nonmembers, fpr=0.015) == pytest.approx(0.6)
    assert tpr_at_fpr(-members, -nonmembers, fpr=0.0) == pytest.approx(0.2)  # below every non-member: 0.1, 0.5


def test_all_ties_give_no_tpr_at_low_fpr() -> None:
    m = attack_metrics([1.0] * 10, [1.0] * 100)
    assert m.auc == 0.5 and m.tpr_at_fpr == 0.0


@pytest.mark.parametrize("bad", [[], [0.1, math.nan], [math.inf]])
def test_bad_losses_are_refused(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="member losses"):
        attack_metrics(bad, [0.1])
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(np.array([1.0]), np.array([0.0]), fpr=1.5)


# ---------------------------------------------------------------------------
# Per-example losses
# ---------------------------------------------------------------------------


def test_classification_losses_are_per_example_cross_entropy() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(10, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 2, size=10)
    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 2).eval()
    losses = per_example_losses(model, images, labels, objective=ClassificationObjective(2),
                                normalize="fixed", batch_size=4)
    with torch.no_grad():
        x = normalize_batch(to_float01(images_to_tensor(images), 1, torch.device("cpu"), False), "fixed")
        expected = F.cross_entropy(model(x), torch.as_tensor(labels), reduction="none").numpy()
    assert losses.shape == (10,)
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-5)


def test_segmentation_losses_average_to_evaluate_seg_loss() -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 32, 32), dtype=np.uint8)
    masks = np.zeros((6, 32, 32), dtype=np.uint8)
    for i in range(6):
        masks[i, 4 + i : 20 + i, 6:22] = 1
    torch.manual_seed(0)
    model = build_model("unet", 1, 2).eval()
    losses = per_example_losses(model, images, masks, objective=SegmentationObjective(2), batch_size=4)
    _, mean_loss = evaluate_seg(model, images_to_tensor(images), torch.from_numpy(masks), batch_size=3,
                                precision="fp32")
    assert losses.shape == (6,) and len(set(np.round(losses, 6))) > 1
    assert losses.mean() == pytest.approx(mean_loss, rel=1e-4)


def test_mismatched_targets_are_refused() -> None:
    model = build_model("small-cnn", 1, 2)
    with pytest.raises(ValueError, match="one target per image"):
        per_example_losses(model, np.zeros((3, 32, 32), np.uint8), np.zeros(2), objective=ClassificationObjective(2))


# ---------------------------------------------------------------------------
# A hand-made run folder (no Flower): the audit rebuilds the sites' data and finds memorisation
# ---------------------------------------------------------------------------


def _make_run(run_dir: Path, flat: dict, model: torch.nn.Module, sizes: dict[str, tuple[int, int]] | None) -> None:
    cfg = parse_run_config(flat)
    task = get_task(cfg.task)
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", {"run-config": cfg.to_flat()})
    meta = {"task": cfg.task, "model": cfg.model, "in-channels": task.in_channels, "num-classes": task.num_classes,
            "class-names": list(task.class_names), "preprocess": task.preprocess_for(cfg).to_dict(),
            "normalize": cfg.data.normalize, "run-config": cfg.to_flat()}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, run_dir / "model.pt")
    if sizes is not None:
        rnd = {"round": 1, "train-sites": {s: {"num-examples": n} for s, (n, _) in sizes.items()},
               "evaluate-sites": {s: {"num-examples": v} for s, (_, v) in sizes.items()}}
        write_json(run_dir / "metrics.json", {"rounds": [rnd]})


FLAT = {"phantom-count": 100, "image-size": 28, "model": "small-cnn", "seed": 3, "augment": False, "min-sites": 1}


def test_audit_detects_a_model_that_memorised_its_training_images(tmp_path: Path) -> None:
    cfg = parse_run_config(FLAT)
    task = get_task(cfg.task)
    sites = [SiteConfig(site_id=f"site-{i}", partition_id=i, num_partitions=2) for i in range(2)]
    data = [load_site_data(cfg, s, task) for s in sites]
    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 2)
    # overfit on both sites' training images (no augmentation): members get much lower loss
    x = images_to_tensor(np.concatenate([d.train_images for d in data]))
    y = torch.from_numpy(np.concatenate([d.train_labels for d in data])).long()
    train_local(model, x, y, TrainConfig(local_epochs=10, batch_size=16, lr=3e-3), ClassificationObjective(2),
                seed=0, augment=None)
    sizes = {s.site_id: (len(d.train_images), len(d.val_images)) for s, d in zip(sites, data, strict=True)}
    _make_run(tmp_path / "run", FLAT, model, sizes)

    assert run_site_count(tmp_path / "run") == 2
    audit = audit_run(tmp_path / "run")
    assert audit.sites == 2 and set(audit.per_site) == {"site-0", "site-1"}
    assert audit.pooled.n_members == sum(n for n, _ in sizes.values())
    assert audit.pooled.n_nonmembers == sum(v for _, v in sizes.values())
    assert audit.pooled.mean_member_loss < audit.pooled.mean_nonmember_loss
    assert audit.pooled.auc > 0.65, audit.to_dict()
    report = json.loads(json.dumps(audit.to_dict()))
    assert report["pooled"]["auc"] == pytest.approx(audit.pooled.auc)
    assert "not a privacy proof" in report["note"]

    with pytest.raises(AuditError, match="rebuilt data"):  # wrong number of sites: the partitions differ
        audit_run(tmp_path / "run", sites=3)


def test_site_count_needs_a_source(tmp_path: Path) -> None:
    _make_run(tmp_path / "run", FLAT, build_model("small-cnn", 1, 2), sizes=None)
    with pytest.raises(AuditError, match="--sites"):
        run_site_count(tmp_path / "run")
    write_json(tmp_path / "run" / "simulation.json", {"sites": 4})
    assert run_site_count(tmp_path / "run") == 4
    with pytest.raises(AuditError, match="config.json"):
        audit_run(tmp_path / "missing", sites=1)


def test_audit_membership_cli_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulation.cli import main as cli_main

    cfg = parse_run_config(FLAT)
    task = get_task(cfg.task)
    sizes = {}
    for i in range(2):
        d = load_site_data(cfg, SiteConfig(site_id=f"site-{i}", partition_id=i, num_partitions=2), task)
        sizes[f"site-{i}"] = (len(d.train_images), len(d.val_images))
    torch.manual_seed(0)
    _make_run(tmp_path / "run", FLAT, build_model("small-cnn", 1, 2), sizes)
    out = tmp_path / "reports" / "audit.json"
    assert cli_main(["audit", "membership", str(tmp_path / "run"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attack AUC" in printed and "site-1" in printed and "not a privacy proof" in printed
    report = json.loads(out.read_text())
    assert report["sites"] == 2 and report["pooled"]["n-members"] == sum(n for n, _ in sizes.values())
    assert 0.0 <= report["pooled"]["auc"] <= 1.0

    assert cli_main(["audit", "membership", str(tmp_path / "nothing-here")]) == 2
    assert "config.json" in capsys.readouterr().err
