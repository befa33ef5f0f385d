"""Segmentation: metrics vs MONAI, count merging, joint augmentation, U-Net training.

Empty masks vs MONAI: our Dice/IoU of two empty masks are 1.0, which is
MONAI's ``ignore_empty=False`` (its default ``ignore_empty=True`` gives NaN
for an empty target). HD95 is NaN when either mask is empty, as in MONAI
1.6.1 (which also warns). HD95 is compared with a relative
tolerance of 1e-6 because MONAI returns float32 distances (ours are float64).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance
from scipy import ndimage

from shared.config import TrainConfig
from shared.data.preprocess import AugmentConfig
from shared.kinds import CLASSIFICATION, SEGMENTATION
from shared.metrics.segmentation import SegmentationCounts, dice_iou, hd95
from shared.models import build_model, model_kind, model_names
from shared.objectives.segmentation import SegmentationObjective, augment_pair, evaluate_seg, seg_loss
from shared.training import snapshot_params, train_local, weight_drift

torch.set_num_threads(2)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _blobs(rng: np.random.Generator, shape: tuple[int, int], kind: str) -> np.ndarray:
    if kind == "empty":
        return np.zeros(shape, bool)
    if kind == "full":
        return np.ones(shape, bool)
    if kind == "pixel":
        m = np.zeros(shape, bool)
        m[rng.integers(shape[0]), rng.integers(shape[1])] = True
        return m
    if kind == "sparse":
        return rng.random(shape) < 0.05
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(1.0, min(shape) / 8))
    return smooth > np.quantile(smooth, rng.uniform(0.4, 0.9))


SHAPES = [(8, 8), (16, 24), (33, 17), (64, 64)]
KINDS = ["empty", "full", "pixel", "sparse", "blob", "blob"]


def _pairs(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for shape in SHAPES:
        for kp in KINDS:
            for kt in KINDS:
                out.append((_blobs(rng, shape, kp), _blobs(rng, shape, kt)))
    return out


def _t(m: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(m.astype(np.float32))[None, None]


def _disks(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.empty((n, 1, size, size), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(size / 4, 3 * size / 4, 2)
        r = rng.uniform(size / 10, size / 4.5)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        imgs[i, 0] = np.clip(40 + rng.normal(0, 12, (size, size)) + 150 * m, 0, 255)
        masks[i] = m
    return torch.from_numpy(imgs), torch.from_numpy(masks)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def test_dice_iou_golden() -> None:
    p = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    t = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], bool)
    assert dice_iou(p, t) == pytest.approx((2 * 2 / 6, 2 / 4))
    assert dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)
    assert dice_iou(np.zeros((3, 3)), t) == (0.0, 0.0)


def test_dice_iou_match_monai() -> None:
    dm = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    im = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    for p, t in _pairs():
        d, j = dice_iou(p, t)
        assert d == pytest.approx(float(dm(_t(p), _t(t))[0, 0]), abs=1e-6)
        assert j == pytest.approx(float(im(_t(p), _t(t))[0, 0]), abs=1e-6)


@pytest.mark.parametrize("spacing", [None, (0.7, 0.7), (0.5, 1.3)])
def test_hd95_matches_monai(spacing: tuple[float, float] | None) -> None:
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p, t in _pairs(seed=1):
            ours = hd95(p, t, spacing)
            ref = float(compute_hausdorff_distance(_t(p), _t(t), include_background=True, percentile=95,
                                                   spacing=spacing)[0, 0])
            if not p.any() or not t.any():
                assert math.isnan(ours) and math.isnan(ref)
                continue
            assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)
            checked += 1
    assert checked > 50


def test_hd95_golden_and_full_mask() -> None:
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    b = np.roll(a, 3, axis=1)  # shifted by 3 columns
    assert hd95(a, a) == 0.0
    assert hd95(a, b) == pytest.approx(3.0)
    # Full mask: its boundary is the image border (MONAI: zero padding outside the image).
    full = np.ones((20, 20), bool)
    assert hd95(full, full) == 0.0 and hd95(full, a) > 0


def test_hd95_mm_is_pixels_times_isotropic_spacing() -> None:
    rng = np.random.default_rng(3)
    c_px = SegmentationCounts.empty()
    for _ in range(10):
        p, t = _blobs(rng, (40, 40), "blob"), _blobs(rng, (40, 40), "blob")
        assert hd95(p, t, (0.8, 0.8)) == pytest.approx(0.8 * hd95(p, t), rel=1e-12)
        c_px.update(p[None], t[None], spacings=(0.8, 0.8))
    m = c_px.metrics()
    assert m["hd95-mm"] == pytest.approx(0.8 * m["hd95"], abs=1e-6)


def test_counts_merged_equal_pooled_exactly() -> None:
    rng = np.random.default_rng(7)
    preds = np.stack([_blobs(rng, (32, 32), k) for k in KINDS * 5])
    targets = np.stack([_blobs(rng, (32, 32), k) for k in KINDS[::-1] * 5])
    spacings = [None if i % 4 == 0 else (0.5 + 0.01 * i, 0.6) for i in range(len(preds))]
    pooled = SegmentationCounts.empty()
    pooled.update(preds, targets, spacings)
    cuts = [0, 3, 4, 17, len(preds)]  # sites of 3, 1, 13 and 13 images
    sites = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        c = SegmentationCounts.empty()
        c.update(preds[lo:hi], targets[lo:hi], spacings[lo:hi])
        sites.append(c)
    merged = SegmentationCounts.empty()
    for c in sites:
        merged = merged.merge(c)
    assert merged == pooled  # exact, field by field
    reverse = SegmentationCounts.empty()
    for c in reversed(sites):
        reverse = reverse.merge(c)
    assert reverse == pooled
    m = merged.metrics()
    assert m["num-examples"] == len(preds)
    per_image = [dice_iou(p, t)[0] for p, t in zip(preds, targets, strict=True)]
    assert m["dice"] == pytest.approx(np.mean(per_image), abs=1e-9)  # mean over ALL images
    site_means = np.mean([c.metrics()["dice"] for c in sites])
    assert abs(m["dice"] - site_means) > 1e-6  # not the mean of site means


def test_counts_flat_round_trip_and_errors() -> None:
    rng = np.random.default_rng(5)
    c = SegmentationCounts.empty()
    c.update(np.stack([_blobs(rng, (24, 24), "blob") for _ in range(4)]),
             np.stack([_blobs(rng, (24, 24), "blob") for _ in range(4)]), (1.0, 2.0))
    flat = c.to_flat()
    assert set(flat) == {"n-images", "dice-sum", "iou-sum", "hd95-sum", "hd95-n", "hd95-mm-sum", "hd95-mm-n"}
    assert all(type(v) in (int, float) for v in flat.values())
    assert SegmentationCounts.from_flat(flat) == c
    assert SegmentationCounts.from_flat({**flat, "other": 1}) == c
    with pytest.raises(ValueError, match="lack the key 'dice-sum'"):
        SegmentationCounts.from_flat({k: v for k, v in flat.items() if k != "dice-sum"})
    with pytest.raises(ValueError, match="must be >= 0"):
        SegmentationCounts.from_flat({**flat, "n-images": -1})
    empty = SegmentationCounts.empty().metrics()
    assert math.isnan(empty["dice"]) and empty["num-examples"] == 0


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


#: Segmentation networks that are Opacus-ready as built (no BatchNorm, nothing in place); the others
#: (fcn: torchvision's ResNet-18 and FCNHead) are made so by make_dp_compatible, as the classifiers are.
DP_READY_AS_BUILT = {"unet", "attention-unet"}


@pytest.mark.parametrize("name", model_names(SEGMENTATION))
def test_segmentation_models_shapes_and_opacus(name: str) -> None:
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    from shared.models.dp import make_dp_compatible

    assert model_kind(name) == SEGMENTATION and model_kind("resnet18") == CLASSIFICATION
    torch.manual_seed(0)
    model = build_model(name, 1, 2)
    model.eval()
    with torch.no_grad():
        for size in (32, 48, 96):
            assert model(torch.randn(1, 1, size, size)).shape == (1, 2, size, size)
    model, changes = make_dp_compatible(model.train())
    assert (changes == []) == (name in DP_READY_AS_BUILT), changes[:3]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert ModuleValidator.validate(model.train(), strict=False) == []
    gsm = GradSampleModule(model.train())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm(torch.randn(3, 1, 32, 32)).sum().backward()
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 3 for p in model.parameters())


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


def test_augment_pair_keeps_image_and_mask_aligned() -> None:
    b, size = 16, 64
    x = torch.full((b, 1, size, size), 0.1)
    mask = torch.zeros((b, size, size), dtype=torch.uint8)
    x[:, :, 18:42, 22:46] = 0.9
    mask[:, 18:42, 22:46] = 1
    cfg = AugmentConfig(rotation_deg=30.0, hflip=True, vflip=True, scale=0.2, translate=0.1,
                        brightness=0.1, contrast=0.2)
    xa, ma = augment_pair(x, mask, cfg, torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and ma.shape == mask.shape and ma.dtype == torch.uint8
    assert set(ma.unique().tolist()) <= {0, 1}
    assert torch.equal(x[:, :, 18:42, 22:46], torch.full((b, 1, 24, 24), 0.9))  # inputs untouched
    moved = 0
    for i in range(b):
        img, m = xa[i, 0], ma[i].bool()
        bright = img > (img.min() + img.max()) / 2
        inter = (bright & m).sum().item()
        iou = inter / (bright | m).sum().item()
        assert iou > 0.9, (i, iou)
        moved += int(not torch.equal(m, mask[i].bool()))
    assert moved >= b - 1  # the geometry really changed
    # Misaligned control: the same images against masks of another draw do not match.
    _, other = augment_pair(x, mask, cfg, torch.Generator().manual_seed(1))
    bright = xa[:, 0] > 0.5
    assert ((bright & other.bool()).sum() / (bright | other.bool()).sum()).item() < 0.8
    # Deterministic per generator state.
    xb, mb = augment_pair(x, mask, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(xa, xb) and torch.equal(ma, mb)


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


def test_unet_learns_disks() -> None:
    images, masks = _disks(32, seed=0)
    val_images, val_masks = _disks(16, seed=1)
    torch.manual_seed(0)
    model = build_model("unet", 1, 2)
    cfg = TrainConfig(local_epochs=4, batch_size=8, lr=1e-2)
    aug = AugmentConfig(rotation_deg=10.0, scale=0.05, translate=0.05)
    result = train_local(model, images, masks, cfg, SegmentationObjective(2), seed=0, augment=aug)
    assert result.num_examples == 32 and result.steps == 16 and math.isfinite(result.loss)
    counts, loss = evaluate_seg(model, val_images, val_masks, spacings=(0.5, 0.5))
    m = counts.metrics()
    assert m["num-examples"] == 16 and math.isfinite(loss)
    assert m["dice"] > 0.8, m
    assert m["hd95-mm"] == pytest.approx(0.5 * m["hd95"], abs=1e-6)


def test_fedprox_reduces_drift() -> None:
    images, masks = _disks(16, size=32, seed=2)
    torch.manual_seed(0)
    init = build_model("unet", 1, 2)
    drifts = {}
    for mu in (0.0, 1.0):
        model = build_model("unet", 1, 2)
        model.load_state_dict(init.state_dict())
        start = snapshot_params(model)
        cfg = TrainConfig(local_epochs=2, batch_size=8, lr=1e-2, optimizer="sgd", momentum=0.9)
        train_local(model, images, masks, cfg, SegmentationObjective(2), seed=0, proximal_mu=mu)
        drifts[mu] = weight_drift(model, start)
    assert 0 < drifts[1.0] < drifts[0.0]


def test_foreground_batch_dice_does_not_punish_a_stray_pixel_on_an_empty_image() -> None:
    y = torch.zeros((2, 1, 16, 16), dtype=torch.long)
    y[0, 0, 4:12, 4:12] = 1  # image 0: a 64-pixel structure; image 1: none
    pred = y.clone()
    pred[1, 0, 0, 0] = 1  # one false-positive pixel on the empty image
    logits = torch.cat([(pred == 0).float(), (pred == 1).float()], dim=1) * 20.0 - 10.0
    per_image = float(seg_loss()(logits, y))  # the empty image's foreground Dice is ~0: a whole-image miss
    batch_fg = float(seg_loss(foreground_batch_dice=True)(logits, y))  # Dice 128/129 over the batch
    assert batch_fg < 0.05 < 0.2 < per_image, (batch_fg, per_image)


def test_bad_masks_raise() -> None:
    images, masks = _disks(4, size=32)
    model = build_model("unet", 1, 2)
    with pytest.raises(ValueError, match="divided by 255"):
        evaluate_seg(model, images, masks * 255)
    with pytest.raises(ValueError, match="masks must be"):
        train_local(model, images, masks[:, :16], TrainConfig(), SegmentationObjective(2), seed=0)
    cfg = dataclasses.replace(TrainConfig(), local_epochs=1)
    assert train_local(model, images, masks.bool(), cfg, SegmentationObjective(2), seed=0).num_examples == 4
