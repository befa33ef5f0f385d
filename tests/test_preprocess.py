"""Tests for shared.data.preprocess: per-image preprocessing, normalisation, augmentation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.data.preprocess import (
    NORMALIZE_MODES,
    AugmentConfig,
    PreprocessConfig,
    UnusableImageError,
    augment_batch,
    normalize_batch,
    preprocess,
)
from shared.data.sources import ImageReadError

ROOT = Path(__file__).resolve().parents[1]


def _bbox(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box of a boolean mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# ---------------------------------------------------------------------------
# Resize
# ---------------------------------------------------------------------------


def test_letterbox_keeps_aspect_squash_does_not() -> None:
    wide = np.zeros((60, 240), np.uint8)
    wide[8:-8, 8:-8] = 200  # a bright rectangle (about 5:1) with a dark frame
    lb = preprocess(wide, PreprocessConfig(size=64, resize="letterbox"))
    sq = preprocess(wide, PreprocessConfig(size=64, resize="squash"))
    h, w = _bbox(lb > 100)
    assert w / h == pytest.approx(224 / 44, rel=0.15)
    assert (lb[:20] == 0).all() and (lb[-20:] == 0).all()  # padding above and below
    h, w = _bbox(sq > 100)
    assert w / h == pytest.approx((224 / 240) / (44 / 60), rel=0.1)  # stretched to the square: ~1.3, not ~5


def test_letterbox_tall_image_pads_left_right_with_border_median() -> None:
    tall = np.full((200, 50), 37, np.uint8)
    tall[10:-10, 5:-5] = 220
    out = preprocess(tall, PreprocessConfig(size=40, resize="letterbox"))
    assert out.shape == (40, 40)
    h, w = _bbox(out > 128)
    assert h / w == pytest.approx(4.0, rel=0.25)
    assert (out[:, :10] == 37).all() and (out[:, -10:] == 37).all()


def test_growing_and_square_inputs() -> None:
    small = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    assert preprocess(small, PreprocessConfig(size=64)).shape == (64, 64)
    same = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(same, PreprocessConfig(size=32)), same)


# ---------------------------------------------------------------------------
# Equalization
# ---------------------------------------------------------------------------


@pytest.fixture
def low_contrast() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.tile(np.linspace(100, 140, 64), (64, 1)) + rng.normal(0, 2, (64, 64))
    return img.clip(0, 255).astype(np.uint8)


def test_hist_equalization_flattens_histogram(low_contrast: np.ndarray) -> None:
    out = preprocess(low_contrast, PreprocessConfig(size=64, equalize="hist"))
    assert out.min() <= 5 and out.max() >= 250
    quarters = np.histogram(out, bins=4, range=(0, 256))[0]
    np.testing.assert_allclose(quarters, out.size / 4, rtol=0.2)


def test_clahe_raises_contrast_but_less_than_hist(low_contrast: np.ndarray) -> None:
    none = preprocess(low_contrast, PreprocessConfig(size=64, equalize="none"))
    clahe = preprocess(low_contrast, PreprocessConfig(size=64, equalize="clahe", clahe_clip=2.0, clahe_tiles=8))
    hist = preprocess(low_contrast, PreprocessConfig(size=64, equalize="hist"))
    assert none.std() * 1.2 < clahe.std() < hist.std()
    # the left-to-right gradient survives
    cols = clahe.astype(float).mean(axis=0)
    assert cols[-8:].mean() > cols[:8].mean() + 20
    stronger = preprocess(low_contrast, PreprocessConfig(size=64, equalize="clahe", clahe_clip=8.0))
    assert stronger.std() > clahe.std()


def test_clahe_look_does_not_depend_on_output_size() -> None:
    rng = np.random.default_rng(0)
    img = (np.tile(np.linspace(60, 180, 512), (512, 1)) + rng.normal(0, 8, (512, 512))).clip(0, 255).astype(np.uint8)
    img[:, :40] = 0  # black collimation border
    stats = []
    for size in (64, 128, 256):
        out = preprocess(img, PreprocessConfig(size=size, equalize="clahe")).astype(float)
        stats.append((out.std(), np.median(out)))
    np.testing.assert_allclose(stats, [stats[-1]] * 3, rtol=0.05)


def test_equalization_ignores_letterbox_padding() -> None:
    wide = np.tile(np.linspace(100, 140, 120), (30, 1)).astype(np.uint8)
    out = preprocess(wide, PreprocessConfig(size=64, equalize="hist"))
    content = out[24:40]  # 64 * 30/120 = 16 content rows in the middle
    assert content.min() <= 10 and content.max() >= 245  # the content itself spans the range
    quarters = np.histogram(content, bins=4, range=(0, 256))[0]
    np.testing.assert_allclose(quarters, content.size / 4, rtol=0.2)  # flat over the content, no padding spike


# ---------------------------------------------------------------------------
# Dtypes, shapes, channels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8),
        np.random.default_rng(1).integers(0, 4096, (40, 50), dtype=np.uint16),
        np.random.default_rng(2).random((40, 50, 3)),
        np.random.default_rng(3).integers(0, 256, (40, 50, 4), dtype=np.uint8),
        np.random.default_rng(4).integers(0, 256, (40, 50, 1), dtype=np.uint8),
    ],
    ids=["u8-gray", "u16-gray", "float-rgb", "u8-rgba", "u8-hw1"],
)
@pytest.mark.parametrize("equalize", ["none", "clahe"])
def test_output_dtype_and_shape(image: np.ndarray, channels: int, equalize: str) -> None:
    cfg = PreprocessConfig(size=24, channels=channels, equalize=equalize, denoise="gaussian")
    out = preprocess(image, cfg)
    assert out.dtype == np.uint8
    assert out.shape == ((24, 24) if channels == 1 else (24, 24, 3))
    assert out.flags.c_contiguous


def test_gray_to_three_channels_repeats_and_rgb_to_gray_uses_luma() -> None:
    gray = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    out = preprocess(gray, PreprocessConfig(size=32, channels=3))
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 2], gray)
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    assert preprocess(red, PreprocessConfig(size=32, channels=1))[0, 0] == pytest.approx(76, abs=1)  # 0.299 * 255
    assert (preprocess(red, PreprocessConfig(size=32, channels=3))[0, 0] == [255, 0, 0]).all()


def test_twelve_bit_data_in_uint16_uses_full_8_bit_range() -> None:
    img = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)
    out = preprocess(img, PreprocessConfig(size=64))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200


def test_float_input_in_unit_range_is_not_rescaled() -> None:
    img = np.full((16, 16), 0.5)
    img[0, 0] = 0.25
    out = preprocess(img, PreprocessConfig(size=16))
    assert out[5, 5] == 128 and out[0, 0] == 64


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.full((10, 10), 700, np.uint16), "constant-image"),
        (np.full((10, 10), np.nan), "no-finite-pixels"),
        (np.zeros((4, 4, 2), np.uint8), "unsupported-shape"),
        (np.zeros((2, 3, 4, 5), np.uint8), "unsupported-shape"),
    ],
)
def test_unusable_images_raise_with_reason(image: np.ndarray, reason: str) -> None:
    with pytest.raises(UnusableImageError) as info:
        preprocess(image, PreprocessConfig(size=8))
    assert info.value.reason == reason
    assert isinstance(info.value, ImageReadError)


def test_constant_uint8_image_is_kept() -> None:
    assert (preprocess(np.full((10, 10), 9, np.uint8), PreprocessConfig(size=8)) == 9).all()


@pytest.mark.parametrize("denoise", ["gaussian", "bilateral"])
def test_denoise_reduces_noise(denoise: str) -> None:
    noisy = (128 + np.random.default_rng(0).normal(0, 20, (64, 64))).clip(0, 255).astype(np.uint8)
    out = preprocess(noisy, PreprocessConfig(size=64, denoise=denoise))
    assert out.std() < noisy.std() * 0.8


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    cfg = PreprocessConfig(size=128, equalize="clahe", clahe_clip=3.0, denoise="bilateral", channels=3)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["clahe-clip"] == 3.0
    assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig.from_dict({"clahe_clip": 3}) == PreprocessConfig(clahe_clip=3.0)  # snake_case, int -> float
    aug = AugmentConfig(hflip=True, color_jitter=0.2)
    assert AugmentConfig.from_dict(json.loads(json.dumps(aug.to_dict()))) == aug


def test_from_dict_rejects_unknown_key_with_did_you_mean() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'clahe-clp'.*clahe-tiles.*Did you mean 'clahe-clip'"):
        PreprocessConfig.from_dict({"clahe-clp": 2.0})
    with pytest.raises(ValueError, match=r"Did you mean 'rotation-deg'"):
        AugmentConfig.from_dict({"rotation": 5.0})


@pytest.mark.parametrize(
    ("d", "pattern"),
    [
        ({"equalize": "clahee"}, r"'equalize': got 'clahee'; allowed values: none, hist, clahe\. Did you mean 'clahe'"),
        ({"resize": "crop"}, r"'resize': got 'crop'; allowed values: letterbox, squash"),
        ({"denoise": "median"}, r"'denoise'.*gaussian, bilateral"),
        ({"size": 0}, r"'size': got 0; allowed values: an integer in \[8, 4096\]"),
        ({"size": 64.0}, r"'size': got 64\.0 \(float\)"),
        ({"size": True}, r"'size': got True"),
        ({"clahe-clip": 0}, r"'clahe-clip': got 0\.0; allowed values: a number in \(0, 40\]"),
        ({"clahe-tiles": "8"}, r"'clahe-tiles': got '8' \(str\)"),
        ({"channels": 2}, r"'channels': got 2; allowed values: 1, 3"),
    ],
)
def test_from_dict_rejects_bad_values(d: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        PreprocessConfig.from_dict(d)


def test_augment_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"'hflip'.*true, false"):
        AugmentConfig.from_dict({"hflip": "yes"})
    with pytest.raises(ValueError, match=r"'scale'"):
        AugmentConfig(scale=1.5)


def test_task_defaults() -> None:
    # Each task owns its preprocessing and augmentation (TaskSpec fields), so both cover every task.
    from shared.tasks import TASKS, get_task

    assert {"pneumonia-cxr", "pneumothorax-cxr", "lung-seg", "nec-axr", "nf-photo"} <= set(TASKS.names())
    TASK_DEFAULTS = {n: get_task(n).preprocess for n in TASKS.names()}
    AUGMENT_DEFAULTS = {n: get_task(n).augment for n in TASKS.names()}
    assert set(TASK_DEFAULTS) == set(AUGMENT_DEFAULTS)
    cxr = TASK_DEFAULTS["pneumonia-cxr"]
    assert (cxr.resize, cxr.equalize, cxr.clahe_clip, cxr.clahe_tiles,
            cxr.channels) == ("letterbox", "clahe", 2.0, 8, 1)
    photo = TASK_DEFAULTS["nf-photo"]
    assert photo.channels == 3 and photo.equalize == "none"
    for name in ("pneumonia-cxr", "pneumothorax-cxr", "lung-seg", "nec-axr"):
        assert TASK_DEFAULTS[name].channels == 1
        assert not AUGMENT_DEFAULTS[name].hflip and not AUGMENT_DEFAULTS[name].vflip
    assert AUGMENT_DEFAULTS["nf-photo"].hflip and AUGMENT_DEFAULTS["nf-photo"].color_jitter > 0


def test_module_is_light() -> None:
    code = "import sys, shared.data.preprocess; print('torch' in sys.modules, 'flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------


def test_normalize_fixed() -> None:
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(normalize_batch(x), torch.tensor([-2.0, 0.0, 2.0]).view(1, 1, 1, 3))
    torch.testing.assert_close(normalize_batch(x, "fixed", mean=0.25, std=0.5),
                               torch.tensor([-0.5, 0.5, 1.5]).view(1, 1, 1, 3))


def test_normalize_minmax_per_image() -> None:
    x = torch.tensor([[0.2, 0.4, 0.6], [0.0, 0.1, 0.1]]).view(2, 1, 1, 3)
    y = normalize_batch(x, "minmax")
    torch.testing.assert_close(y[0].flatten(), torch.tensor([-2.0, 0.0, 2.0]))
    torch.testing.assert_close(y[1].flatten(), torch.tensor([-2.0, 2.0, 2.0]))
    assert torch.isfinite(normalize_batch(torch.full((1, 1, 2, 2), 0.3), "minmax")).all()


def test_normalize_zscore_per_image() -> None:
    x = torch.rand(3, 2, 8, 8) * torch.tensor([0.1, 0.5, 1.0]).view(3, 1, 1, 1)
    y = normalize_batch(x, "zscore")
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(1, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    const = normalize_batch(torch.full((1, 1, 4, 4), 0.7), "zscore")
    assert torch.isfinite(const).all() and const.abs().max() < 1e-3


def test_normalize_rejects_bad_mode() -> None:
    assert NORMALIZE_MODES == ("fixed", "minmax", "zscore")
    with pytest.raises(ValueError, match=r"Did you mean 'zscore'"):
        normalize_batch(torch.zeros(1, 1, 2, 2), "z-score")


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


def _left_heavy(b: int = 16, size: int = 32) -> torch.Tensor:
    x = torch.full((b, 1, size, size), 0.1)
    x[:, :, 6:26, 3:12] = 0.9  # bright block on the image's left
    return x


def _lr_diff(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x[..., :half].sum(dim=(1, 2, 3)) - x[..., half:].sum(dim=(1, 2, 3))


def test_augment_is_deterministic_per_seed_and_does_not_modify_input() -> None:
    x = torch.rand(8, 1, 24, 24)
    before = x.clone()
    a = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(3))
    b = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(3))
    c = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    assert a.shape == x.shape and a.dtype == x.dtype and 0.0 <= a.min() and a.max() <= 1.0


def test_no_flips_by_default_preserves_laterality() -> None:
    x = _left_heavy()
    for seed in range(5):
        y = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(seed))
        assert (_lr_diff(y) > 0).all()


def test_hflip_when_enabled_mirrors_exactly() -> None:
    x = _left_heavy(b=32)
    cfg = AugmentConfig(rotation_deg=0, hflip=True, scale=0, translate=0, brightness=0, contrast=0)
    y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    flipped = _lr_diff(y) < 0
    assert 4 < int(flipped.sum()) < 28
    torch.testing.assert_close(y[flipped], torch.flip(x[flipped], dims=[-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[~flipped], x[~flipped], atol=1e-5, rtol=0)


def test_vflip_when_enabled() -> None:
    x = _left_heavy(b=32).transpose(-1, -2).contiguous()  # now top-heavy
    cfg = AugmentConfig(rotation_deg=0, vflip=True, scale=0, translate=0, brightness=0, contrast=0)
    y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    top_minus_bottom = y[..., :16, :].sum(dim=(1, 2, 3)) - y[..., 16:, :].sum(dim=(1, 2, 3))
    assert 4 < int((top_minus_bottom < 0).sum()) < 28


def test_geometric_fill_uses_each_images_minimum() -> None:
    x = torch.rand(4, 1, 32, 32) * 0.5 + torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1, 1, 1)
    cfg = AugmentConfig(rotation_deg=45, scale=0, translate=0, brightness=0, contrast=0)
    y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    lo = x.amin(dim=(1, 2, 3))
    corners = y[:, 0, 0, 0]
    # corners come from outside the image unless the angle is tiny; check those that moved
    moved = (corners - x[:, 0, 0, 0]).abs() > 1e-4
    assert moved.any()
    torch.testing.assert_close(corners[moved], lo[moved], atol=1e-5, rtol=0)


def test_identity_config_returns_a_copy() -> None:
    x = torch.rand(2, 3, 8, 8)
    cfg = AugmentConfig(rotation_deg=0, scale=0, translate=0, brightness=0, contrast=0)
    y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert y.data_ptr() != x.data_ptr()


def test_color_jitter_only_for_rgb_and_keeps_gray_gray() -> None:
    g = torch.rand(4, 1, 16, 16)
    a = augment_batch(g, AugmentConfig(color_jitter=0.5), torch.Generator().manual_seed(1))
    b = augment_batch(g, AugmentConfig(color_jitter=0.0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    gray_rgb = torch.rand(4, 1, 16, 16).expand(4, 3, 16, 16) * 0.8 + 0.1
    cfg = AugmentConfig(rotation_deg=0, scale=0, translate=0, brightness=0, contrast=0, color_jitter=0.5)
    y = augment_batch(gray_rgb, cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(y[:, 0], y[:, 1], atol=1e-5, rtol=0)
    rgb = torch.rand(4, 3, 16, 16)
    assert not torch.allclose(augment_batch(rgb, cfg, torch.Generator().manual_seed(1)), rgb)
