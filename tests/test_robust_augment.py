"""Acquisition-robust augmentation (``robust-augment``): off = today's batches, on = every transform acts.

The frozen reference at the top is the batch augmentation as it was before
``robust-augment`` existed (copied verbatim from ``shared/data/preprocess.py``
and ``shared/objectives/segmentation.py``); with the new augmentation off the
objectives' batches and the generator's state after them must equal it bit
for bit, so runs without ``robust-augment`` are unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shared.data.preprocess import AugmentConfig
from shared.objectives import ClassificationObjective, SegmentationObjective

torch.set_num_threads(2)

# ---------------------------------------------------------------------------
# Frozen reference: the augmentation before robust-augment (do not edit)
# ---------------------------------------------------------------------------


def _ref_affine_theta(r: torch.Tensor, cfg: AugmentConfig, h: int, w: int) -> torch.Tensor:
    u = r * 2.0 - 1.0
    ang = u[:, 0] * math.radians(cfg.rotation_deg)
    zoom = 1.0 + u[:, 1] * cfg.scale
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    fx = torch.where((r[:, 4] < 0.5) & cfg.hflip, -1.0, 1.0)
    fy = torch.where((r[:, 5] < 0.5) & cfg.vflip, -1.0, 1.0)
    theta = torch.zeros((r.shape[0], 2, 3), device=r.device, dtype=torch.float32)
    theta[:, 0, 0] = cos * fx
    theta[:, 0, 1] = -sin * (h / w) * fy
    theta[:, 1, 0] = sin * (w / h) * fx
    theta[:, 1, 1] = cos * fy
    theta[:, 0, 2] = u[:, 2] * cfg.translate * 2.0
    theta[:, 1, 2] = u[:, 3] * cfg.translate * 2.0
    return theta


def _ref_color_jitter(x: torch.Tensor, u_sat: torch.Tensor, u_hue: torch.Tensor, amount: float) -> torch.Tensor:
    gray = x.mean(dim=1, keepdim=True)
    x = gray + (x - gray) * (1.0 + u_sat * amount).view(-1, 1, 1, 1)
    ang = u_hue * math.radians(90.0 * amount)
    cos, sin = torch.cos(ang), torch.sin(ang)
    a = (cos + (1.0 - cos) / 3.0).view(-1, 1)
    b_ = ((1.0 - cos) / 3.0 - sin / math.sqrt(3.0)).view(-1, 1)
    c_ = ((1.0 - cos) / 3.0 + sin / math.sqrt(3.0)).view(-1, 1)
    m = torch.stack([torch.cat([a, b_, c_], 1), torch.cat([c_, a, b_], 1), torch.cat([b_, c_, a], 1)], dim=1)
    return torch.einsum("bij,bjhw->bihw", m.to(x.dtype), x)


def _ref_augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    b, c, h, w = x.shape
    r = torch.rand((b, 10), generator=generator, device=generator.device, dtype=torch.float64)
    r = r.to(device=x.device, dtype=torch.float32)
    u = r * 2.0 - 1.0
    out = x
    geometric = bool(cfg.rotation_deg or cfg.scale or cfg.translate or cfg.hflip or cfg.vflip)
    if geometric and b > 0:
        theta = _ref_affine_theta(r, cfg, h, w).to(x.dtype)
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        out = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + lo
    if cfg.contrast or cfg.brightness:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        k = (1.0 + u[:, 7] * cfg.contrast).view(-1, 1, 1, 1)
        off = (u[:, 6] * cfg.brightness).view(-1, 1, 1, 1)
        out = (out - mean) * k + mean + off
    if c == 3 and cfg.color_jitter:
        out = _ref_color_jitter(out, u[:, 8], u[:, 9], cfg.color_jitter)
    if out is x:
        out = x.clone()
    return out.clamp(0.0, 1.0)


def _ref_augment_pair(x: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    import dataclasses

    b, c, h, w = x.shape
    out_x, out_m = x, mask
    geometric = bool(cfg.rotation_deg or cfg.scale or cfg.translate or cfg.hflip or cfg.vflip)
    if geometric and b > 0:
        r = torch.rand((b, 6), generator=generator, device=generator.device, dtype=torch.float64)
        theta = _ref_affine_theta(r.to(device=x.device, dtype=torch.float32), cfg, h, w).to(x.dtype)
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        out_x = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + lo
        m = mask.to(x.dtype).unsqueeze(1)
        out_m = F.grid_sample(m, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        out_m = out_m.squeeze(1).round().to(mask.dtype)
    photometric = dataclasses.replace(cfg, rotation_deg=0.0, hflip=False, vflip=False, scale=0.0, translate=0.0)
    out_x = _ref_augment_batch(out_x, photometric, generator)
    if out_m is mask:
        out_m = mask.clone()
    return out_x, out_m


def _ref_to_float01(batch: torch.Tensor, in_channels: int) -> torch.Tensor:
    x = batch.float().div_(255.0)
    if x.shape[1] != in_channels:
        x = x.expand(-1, in_channels, -1, -1) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
    return x


def _ref_normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


# ---------------------------------------------------------------------------
# Off = today's batches, bit for bit
# ---------------------------------------------------------------------------

_CPU = torch.device("cpu")


def _uint8_images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _task_augment(task: str, **flat: object) -> AugmentConfig | None:
    from shared.config import parse_run_config
    from shared.tasks import get_task

    cfg = parse_run_config({"task": task, **flat})
    return get_task(task).augment_for(cfg)


@pytest.mark.parametrize("task", ["pneumonia-cxr", "nf-photo"])
@pytest.mark.parametrize("flat", [{}, {"robust-augment": "none"}, {"hflip": True}])
def test_classification_batches_unchanged_when_off(task: str, flat: dict[str, object]) -> None:
    aug = _task_augment(task, **flat)
    assert aug is not None
    c = 3 if task == "nf-photo" else 1
    images, labels = _uint8_images(12, c, 48), torch.arange(12) % 2
    obj = ClassificationObjective(2)
    gen, ref_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):  # several batches: the generator must advance exactly as before
        x, y = obj.batch(images, labels, device=_CPU, in_channels=c, augment=aug, generator=gen,
                         normalize="fixed", channels_last=False)
        ref = _ref_normalize(_ref_augment_batch(_ref_to_float01(images, c), aug, ref_gen))
        assert torch.equal(x, ref)
        assert torch.equal(y, labels)
    assert torch.equal(gen.get_state(), ref_gen.get_state())


@pytest.mark.parametrize("flat", [{}, {"robust-augment": "none"}])
def test_segmentation_batches_unchanged_when_off(flat: dict[str, object]) -> None:
    aug = _task_augment("lung-seg", **flat)
    assert aug is not None
    images = _uint8_images(10, 1, 64)
    masks = (torch.rand((10, 64, 64), generator=torch.Generator().manual_seed(1)) < 0.4).to(torch.uint8)
    obj = SegmentationObjective(2)
    gen, ref_gen = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(3):
        x, y = obj.batch(images, masks, device=_CPU, in_channels=1, augment=aug, generator=gen,
                         normalize="fixed", channels_last=False)
        rx, rm = _ref_augment_pair(_ref_to_float01(images, 1), masks.long(), aug, ref_gen)
        assert torch.equal(x, _ref_normalize(rx))
        assert torch.equal(y, rm)
    assert torch.equal(gen.get_state(), ref_gen.get_state())


# ---------------------------------------------------------------------------
# Each transform acts when on, and nothing happens when it is off
# ---------------------------------------------------------------------------

#: Everything of the base augmentation off: what remains is the transform under test.
_BARE = dict(rotation_deg=0.0, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0)
_ONE = {"gamma": 0.4, "hist_shift": 0.4, "noise": 0.05, "blur": 1.5, "resolution_loss": 0.6, "elastic": 0.05}


def _textured(b: int = 8, c: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth structure plus fine detail in (0.1, 0.9): every transform has something to change."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand((b, c, 6, 6), generator=gen), size=(size, size), mode="bicubic",
                           align_corners=False)
    fine = torch.rand((b, c, size, size), generator=gen)
    return (0.1 + 0.8 * (0.7 * coarse.clamp(0, 1) + 0.3 * fine)).clamp(0.1, 0.9)


def test_robust_fields_cover_every_transform() -> None:
    from shared.data.preprocess import ROBUST_FIELDS

    assert set(ROBUST_FIELDS) == set(_ONE)
    assert not AugmentConfig().robust
    assert all(AugmentConfig(**{name: value}).robust for name, value in _ONE.items())


@pytest.mark.parametrize("name", sorted(_ONE))
def test_each_transform_changes_every_image_when_on(name: str) -> None:
    from shared.data.preprocess import augment_batch

    x = _textured()
    cfg = AugmentConfig(**_BARE, **{name: _ONE[name]}, robust_p=1.0)
    y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    changed = (y - x).abs().amax(dim=(1, 2, 3))
    # Magnitudes are uniform from 0 up, so one image may change little; none stays the same.
    assert (changed > 0).all() and float(changed.median()) > 0.02, f"{name}: per-image max change {changed.tolist()}"


@pytest.mark.parametrize("name", sorted(_ONE))
def test_each_transform_never_fires_with_probability_zero(name: str) -> None:
    from shared.data.preprocess import augment_batch

    x = _textured()
    y = augment_batch(x, AugmentConfig(**_BARE, **{name: _ONE[name]}, robust_p=0.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_probability_applies_per_image() -> None:
    from shared.data.preprocess import augment_batch

    x = _textured(b=64)
    y = augment_batch(x, AugmentConfig(**_BARE, gamma=0.4, robust_p=0.5), torch.Generator().manual_seed(0))
    changed = int(((y - x).abs().amax(dim=(1, 2, 3)) > 1e-4).sum())
    assert 16 < changed < 48, changed


def test_strength_zero_or_level_none_is_the_base_augmentation() -> None:
    from shared.data.preprocess import ROBUST_LEVELS, robust_augment

    base = AugmentConfig()
    assert robust_augment(base, "none") is base
    assert robust_augment(base, "strong", 0.0) is base
    strong = robust_augment(base, "strong")
    for name, value in ROBUST_LEVELS["strong"].items():
        assert getattr(strong, name) == pytest.approx(value), name
    half = robust_augment(base, "strong", 0.5)
    assert half.gamma == pytest.approx(0.175) and half.contrast == pytest.approx(0.15 + 0.5 * (0.35 - 0.15))
    assert half.rotation_deg == base.rotation_deg and not half.hflip  # not part of a level
    twice = robust_augment(base, "strong", 2.0)
    assert twice.resolution_loss == 0.8 and twice.hist_shift == 0.45  # capped at the fields' limits
    photo = AugmentConfig(contrast=0.5)  # a base stronger than the level keeps its value
    assert robust_augment(photo, "light").contrast == 0.5
    with pytest.raises(ValueError, match=r"'level'.*Did you mean 'strong'"):
        robust_augment(base, "stong")
    with pytest.raises(ValueError, match=r"'strength'"):
        robust_augment(base, "light", 3.0)


# ---------------------------------------------------------------------------
# Determinism, inputs untouched, per-image independence (DP-SGD)
# ---------------------------------------------------------------------------

_STRONG = AugmentConfig(rotation_deg=7.0, scale=0.15, translate=0.08, brightness=0.15, contrast=0.35, gamma=0.35,
                        hist_shift=0.4, noise=0.04, blur=1.5, resolution_loss=0.6, elastic=0.03, robust_p=0.8)


@pytest.mark.parametrize("c", [1, 3])
def test_deterministic_per_seed_and_input_untouched(c: int) -> None:
    from shared.data.preprocess import augment_batch

    x = _textured(c=c)
    before = x.clone()
    cfg = dataclasses_replace(_STRONG, color_jitter=0.1)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    other = augment_batch(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)
    assert torch.equal(x, before)


def dataclasses_replace(cfg: AugmentConfig, **kw: object) -> AugmentConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_each_image_depends_on_itself_only() -> None:
    """DP-SGD needs each example's loss to depend on that example only: so must its augmentation."""
    from shared.data.preprocess import augment_batch
    from shared.objectives.segmentation import augment_pair

    x = _textured(b=6, size=48)
    x2 = x.clone()
    x2[3:] = _textured(b=3, size=48, seed=7)  # other images in rows 3..5
    a = augment_batch(x, _STRONG, torch.Generator().manual_seed(1))
    b = augment_batch(x2, _STRONG, torch.Generator().manual_seed(1))
    assert torch.equal(a[:3], b[:3]) and not torch.equal(a[3:], b[3:])
    m = (x[:, 0] > 0.5).to(torch.uint8)
    m2 = (x2[:, 0] > 0.5).to(torch.uint8)
    pa = augment_pair(x, m, _STRONG, torch.Generator().manual_seed(1))
    pb = augment_pair(x2, m2, _STRONG, torch.Generator().manual_seed(1))
    assert torch.equal(pa[0][:3], pb[0][:3]) and torch.equal(pa[1][:3], pb[1][:3])


# ---------------------------------------------------------------------------
# Masks stay aligned, labels unchanged
# ---------------------------------------------------------------------------


def _disk_masks(b: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros((b, size, size), dtype=torch.uint8)
    for i in range(b):
        for _ in range(2):
            cy, cx = (torch.rand(2, generator=gen) * 0.5 + 0.25) * size
            r = float(torch.rand(1, generator=gen)) * size * 0.15 + size * 0.1
            masks[i] |= (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).to(torch.uint8)
    return masks


def _band(m: torch.Tensor) -> torch.Tensor:
    """Pixels within one pixel of a mask boundary (where bilinear and nearest resampling may disagree)."""
    f = m.float().unsqueeze(1)
    grown = F.max_pool2d(f, 3, 1, 1)
    shrunk = -F.max_pool2d(-f, 3, 1, 1)
    return (grown != shrunk).squeeze(1)


def test_elastic_and_zoom_move_image_and_mask_together() -> None:
    """An image whose intensity IS its mask, deformed: thresholded image == mask except on the boundary band."""
    from shared.objectives.segmentation import augment_pair

    size = 64
    mask = _disk_masks(12, size)
    x = mask.float().unsqueeze(1)
    geometry = AugmentConfig(rotation_deg=15.0, scale=0.15, translate=0.08, brightness=0.0, contrast=0.0,
                             elastic=0.05, robust_p=1.0)
    xa, ma = augment_pair(x, mask, geometry, torch.Generator().manual_seed(0))
    assert ma.dtype == torch.uint8 and set(ma.unique().tolist()) <= {0, 1}
    moved = 0
    for i in range(len(mask)):
        disagree = (xa[i, 0] > 0.5) != ma[i].bool()
        assert not (disagree & ~_band(ma[i : i + 1])[0]).any(), f"image {i}: misaligned off the boundary"
        assert int(disagree.sum()) <= 0.1 * int(_band(ma[i : i + 1]).sum()) + 2
        moved += int(not torch.equal(ma[i], mask[i]))
    assert moved == len(mask)
    # Control: the elastic part alone moves pixels (against the same draw without it).
    rigid = dataclasses_replace(geometry, elastic=0.0)
    _, mr = augment_pair(x, mask, rigid, torch.Generator().manual_seed(0))
    assert not torch.equal(mr, ma)


def test_strong_augmentation_keeps_masks_aligned_and_photometry_off_masks() -> None:
    from shared.objectives.segmentation import augment_pair

    size = 64
    mask = _disk_masks(12, size, seed=1)
    x = 0.15 + 0.6 * mask.float().unsqueeze(1)
    xa, ma = augment_pair(x, mask, _STRONG, torch.Generator().manual_seed(2))
    assert set(ma.unique().tolist()) <= {0, 1}
    for i in range(len(mask)):
        img = xa[i, 0]
        bright = img > (img[ma[i].bool()].mean() + img[~ma[i].bool()].mean()) / 2
        iou = float((bright & ma[i].bool()).sum()) / float((bright | ma[i].bool()).sum())
        assert iou > 0.85, (i, iou)
    # Photometric transforms alone never touch the masks.
    photometric = AugmentConfig(**_BARE, gamma=0.4, hist_shift=0.4, noise=0.05, blur=1.5, resolution_loss=0.6,
                                robust_p=1.0)
    xp, mp = augment_pair(x, mask, photometric, torch.Generator().manual_seed(2))
    assert torch.equal(mp, mask) and not torch.equal(xp, x)


def test_objectives_leave_labels_and_mask_values_alone() -> None:
    images = (_textured(b=10, size=32) * 255).to(torch.uint8)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 1])
    gen = torch.Generator().manual_seed(0)
    x, y = ClassificationObjective(3).batch(images, labels, device=_CPU, in_channels=1, augment=_STRONG,
                                             generator=gen, normalize="fixed", channels_last=False)
    assert torch.equal(y, labels) and torch.isfinite(x).all()
    masks = (images[:, 0] > 128).to(torch.uint8) * 2  # class index 2
    _, ym = SegmentationObjective(3).batch(images, masks, device=_CPU, in_channels=1, augment=_STRONG,
                                           generator=gen, normalize="fixed", channels_last=False)
    assert set(ym.unique().tolist()) <= {0, 2} and ym.dtype == torch.long


# ---------------------------------------------------------------------------
# The deterministic parts against MONAI / NumPy / OpenCV
# ---------------------------------------------------------------------------


def test_gaussian_blur_matches_monai_inside_the_image() -> None:
    from monai.transforms import GaussianSmooth

    from shared.data.robust_augment import gaussian_blur

    x = _textured(b=3, size=40)
    sigma = torch.tensor([0.0, 0.7, 1.5])
    y = gaussian_blur(x, sigma)
    assert torch.equal(y[0], x[0])  # sigma 0: unchanged
    for i in (1, 2):
        ref = torch.as_tensor(GaussianSmooth(sigma=float(sigma[i]), approx="sampled")(x[i]))
        r = int(4 * float(sigma[i]) + 0.5)  # MONAI pads zeros, here the edge repeats: compare the interior
        torch.testing.assert_close(y[i][:, r:-r, r:-r], ref[:, r:-r, r:-r], rtol=0, atol=2e-4)


def test_gamma_matches_monai_adjust_contrast() -> None:
    from monai.transforms import AdjustContrast

    from shared.data.preprocess import augment_batch
    from shared.data.robust_augment import draw_robust

    x = _textured(b=4)
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0  # full range: MONAI's min-max rescale is then the identity
    cfg = AugmentConfig(**_BARE, gamma=0.5, robust_p=1.0)
    y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    torch.rand((4, 10), generator=gen, dtype=torch.float64)  # augment_batch's own draws come first
    draws = draw_robust(4, gen, _CPU)
    gammas = torch.exp((draws.params[:, 1] * 2 - 1) * 0.5)
    for i in range(4):
        ref = torch.as_tensor(AdjustContrast(gamma=float(gammas[i]))(x[i]))
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-5)


def test_tone_curve_is_numpy_interp_and_monotone() -> None:
    import numpy as np

    from shared.data.preprocess import augment_batch
    from shared.data.robust_augment import HIST_POINTS, tone_curve

    x = torch.rand((3, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    xp = np.linspace(0, 1, HIST_POINTS)
    points = torch.tensor(np.stack([xp, xp ** 1.5, np.sqrt(xp)]), dtype=torch.float32)
    y = tone_curve(x, points)
    for i in range(3):
        ref = np.interp(x[i].numpy().ravel(), xp, points[i].numpy()).reshape(x[i].shape)
        np.testing.assert_allclose(y[i].numpy(), ref, rtol=0, atol=1e-6)
    # The random curve keeps the order of intensities (a monotone map: no inverted contrast).
    ramp = torch.linspace(0, 1, 256).view(1, 1, 16, 16).repeat(16, 1, 1, 1)
    out = augment_batch(ramp, AugmentConfig(**_BARE, hist_shift=0.45, robust_p=1.0), torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    assert (flat[:, 1:] >= flat[:, :-1] - 1e-6).all()
    assert float(flat[:, 0].abs().max()) < 1e-6 and float((flat[:, -1] - 1).abs().max()) < 1e-6  # ends fixed
    assert not torch.allclose(out, ramp, atol=1e-3)


def test_resolution_loss_matches_opencv_area_then_linear() -> None:
    """Half resolution: OpenCV's INTER_AREA down, INTER_LINEAR up (as the site-shift profiles do)."""
    import cv2
    import numpy as np

    from shared.data.robust_augment import resample_lower

    x = _textured(b=2, size=32)
    y = resample_lower(x, torch.tensor([0.5, 1.0]))
    img = x[0, 0].numpy()
    ref = cv2.resize(cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA), (32, 32), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(y[0, 0].numpy(), ref, rtol=0, atol=1e-5)
    assert torch.equal(y[1], x[1])  # factor 1: untouched
    # Fine detail is what goes: a 1-px checkerboard becomes flat grey.
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32)) % 2).float().view(1, 1, 32, 32)
    flat = resample_lower(checker, torch.tensor([0.5]))
    assert float(flat.std()) < 0.05 * float(checker.std())


def test_elastic_displacement_is_bounded_and_smooth() -> None:
    from shared.data.robust_augment import draw_robust, elastic_offsets

    cfg = AugmentConfig(elastic=0.04, robust_p=1.0)
    draws = draw_robust(16, torch.Generator().manual_seed(0), _CPU)
    off = elastic_offsets(draws, cfg, 64, 64)
    assert off.shape == (16, 64, 64, 2)
    top = float(off.abs().max())
    assert 0.0 < top <= 2 * 0.04 * 1.3  # grid units: 2 = the side; bicubic may overshoot the control points a little
    assert float((off[:, 1:] - off[:, :-1]).abs().max()) < top / 4  # smooth: no jump between neighbours
    none = elastic_offsets(draws, AugmentConfig(elastic=0.04, robust_p=0.0), 64, 64)
    assert torch.equal(none, torch.zeros_like(none))


# ---------------------------------------------------------------------------
# Run config and tasks
# ---------------------------------------------------------------------------


def test_run_config_levels_reach_the_task_augmentation() -> None:
    from shared.data.preprocess import ROBUST_LEVELS

    assert _task_augment("pneumonia-cxr") == _task_augment("pneumonia-cxr", **{"robust-augment": "none"})
    light = _task_augment("lung-seg", **{"robust-augment": "light"})
    strong = _task_augment("lung-seg", **{"robust-augment": "strong"})
    assert light is not None and strong is not None
    assert light.gamma == ROBUST_LEVELS["light"]["gamma"] and strong.elastic == ROBUST_LEVELS["strong"]["elastic"]
    half = _task_augment("lung-seg", **{"robust-augment": "strong", "robust-augment-strength": 0.5})
    assert half is not None and half.noise == pytest.approx(0.02)
    photo = _task_augment("nf-photo", **{"robust-augment": "light"})
    assert photo is not None and photo.hflip and photo.color_jitter > 0  # the task's own recipe stays


@pytest.mark.parametrize(("flat", "words"), [
    ({"robust-augment": "strong", "augment": False}, ["augment=false", "augment=true"]),
    ({"robust-augment-strength": 0.5}, ["robust-augment-strength=0.5", "'none'", "'light'"]),
    ({"robust-augment": "none", "robust-augment-strength": 2.0}, ["robust-augment-strength=2.0"]),
    ({"robust-augment": "stong"}, ["robust-augment", "Did you mean 'strong'"]),
    ({"robust-augment": "light", "robust-augment-strength": 2.5}, ["robust-augment-strength", "[0, 2]"]),
])
def test_run_config_rejects_contradictions(flat: dict[str, object], words: list[str]) -> None:
    from shared.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError) as err:
        parse_run_config(flat)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_recorded_pipeline_names_the_robust_ranges() -> None:
    from shared.config import parse_run_config
    from shared.tasks import get_task

    cfg = parse_run_config({"task": "lung-seg", "robust-augment": "light"})
    recorded = get_task("lung-seg").pipeline(cfg)["augment"]
    assert isinstance(recorded, dict) and recorded["gamma"] == 0.15 and recorded["robust-p"] == 0.5
    assert AugmentConfig.from_dict(recorded) == get_task("lung-seg").augment_for(cfg)


def test_task_robust_default_is_validated() -> None:
    import dataclasses

    from shared.tasks import get_task

    task = get_task("lung-seg")
    assert all(get_task(n).robust_augment == "none" for n in ("pneumonia-cxr", "lung-seg", "nf-photo"))
    with pytest.raises(ValueError, match="robust_augment must be one of"):
        dataclasses.replace(task, robust_augment="medium")
    auto_light = dataclasses.replace(task, robust_augment="light")
    from shared.config import parse_run_config

    assert auto_light.augment_for(parse_run_config({"task": "lung-seg"})).gamma == 0.15


# ---------------------------------------------------------------------------
# Training with it: deterministic, and through DP-SGD
# ---------------------------------------------------------------------------


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_local_with_strong_augmentation_is_reproducible() -> None:
    from shared.config import TrainConfig
    from shared.models import build_model
    from shared.training import train_local

    images = (_textured(b=24, size=32) * 255).to(torch.uint8)
    labels = torch.arange(24) % 2
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("small-cnn", 1, 2)
        result = train_local(model, images, labels, TrainConfig(batch_size=8, precision="fp32"),
                             ClassificationObjective(2), seed=4, augment=_STRONG, device=_CPU)
        assert math.isfinite(result.loss)
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_dp_sgd_trains_with_strong_augmentation(kind: str) -> None:
    """Per-image augmentation before the per-sample loss: DP-SGD steps run, reproducibly for fixed seeds."""
    from shared.config import TrainConfig
    from shared.models import build_model
    from shared.models.dp import make_dp_compatible
    from shared.privacy.dpsgd import DPSGDSpec, DPSGDSteps
    from shared.training import train_local

    images = (_textured(b=16, size=32) * 255).to(torch.uint8)
    if kind == "classification":
        targets, objective, name = torch.arange(16) % 2, ClassificationObjective(2), "small-cnn"
    else:
        targets, objective, name = (images[:, 0] > 128).to(torch.uint8), SegmentationObjective(2), "unet"
    finals = []
    for _ in range(2):
        torch.manual_seed(0)
        model = make_dp_compatible(build_model(name, 1, 2))[0]
        before = _flat(model)
        result = train_local(model, images, targets, TrainConfig(lr=1e-2), objective, seed=0, augment=_STRONG,
                             device=_CPU, engine=DPSGDSteps(DPSGDSpec(1.0, 1.0, 0.25, steps=3), dp_seed=1))
        assert result.steps == 3 and math.isfinite(result.loss)
        assert not torch.equal(_flat(model), before)
        finals.append(_flat(model))
    assert torch.equal(finals[0], finals[1])
