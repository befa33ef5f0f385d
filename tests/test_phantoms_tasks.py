"""Tests of shared.data.phantoms_tasks: pneumothorax, lung segmentation, NEC, NF phantoms; acquisition profiles."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from shared.data.phantoms import phantom_labels
from shared.data.phantoms_tasks import (
    NEC_CLASSES,
    NF_CLASSES,
    PNEUMOTHORAX_CLASSES,
    AcquisitionProfile,
    apply_profile,
    lung_seg_labels,
    make_lung_seg_phantoms,
    make_nec_phantoms,
    make_nf_phantoms,
    make_pneumothorax_phantoms,
    nec_labels,
    nf_labels,
    pneumothorax_labels,
    render_pneumothorax_phantom,
    site_profile,
)

# name -> (make, labels, default prevalence, channels)
CLASSIFICATION: dict[str, tuple[Callable[..., tuple], Callable[..., np.ndarray], float, int]] = {
    "pneumothorax": (make_pneumothorax_phantoms, pneumothorax_labels, 0.5, 1),
    "nec": (make_nec_phantoms, nec_labels, 0.4, 1),
    "nf": (make_nf_phantoms, nf_labels, 0.4, 3),
}


def _images(name: str, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
    out = CLASSIFICATION[name][0](*args, **kwargs)
    return out[0], out[1]


# ---------------------------------------------------------------------------
# Shapes, dtypes, validation
# ---------------------------------------------------------------------------


def test_class_names() -> None:
    assert PNEUMOTHORAX_CLASSES == ("absent", "present")
    assert NEC_CLASSES == ("no-surgery", "surgery")
    assert NF_CLASSES == ("other-infection", "necrotizing-fasciitis")


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
@pytest.mark.parametrize("size", [16, 33, 64, 96])
def test_classification_shapes_and_dtypes(name: str, size: int) -> None:
    channels = CLASSIFICATION[name][3]
    out = CLASSIFICATION[name][0](6, size=size, seed=1)
    images, labels = out[0], out[1]
    shape = (6, size, size) if channels == 1 else (6, size, size, 3)
    assert images.shape == shape and images.dtype == np.uint8
    assert labels.shape == (6,) and labels.dtype == np.int64 and set(labels.tolist()) <= {0, 1}
    if name == "pneumothorax":
        masks = out[2]
        assert masks.shape == (6, size, size) and masks.dtype == np.bool_


@pytest.mark.parametrize("size", [16, 64, 80])
def test_lung_seg_shapes_and_labels(size: int) -> None:
    images, masks = make_lung_seg_phantoms(5, size=size, seed=2)
    assert images.shape == (5, size, size) and images.dtype == np.uint8
    assert masks.shape == (5, size, size) and masks.dtype == np.bool_
    labels = lung_seg_labels(7, seed=3)
    assert labels.dtype == np.int64 and labels.shape == (7,) and not labels.any()


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_empty_indices(name: str) -> None:
    images, labels = _images(name, 10, size=32, indices=np.array([], dtype=np.int64))
    assert images.shape[0] == 0 and labels.shape == (0,)


@pytest.mark.parametrize("make", [make_pneumothorax_phantoms, make_nec_phantoms, make_nf_phantoms])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 4, "size": 15}, r"size must be 16\.\.1024, got 15"),
        ({"n": 0}, r"n must be >= 1, got 0"),
        ({"n": 4, "prevalence": 1.0}, r"prevalence must lie strictly between 0 and 1"),
        ({"n": 4, "indices": [0, 4]}, r"indices must lie in \[0, n\) = \[0, 4\), got 4"),
        ({"n": 4, "seed": -1}, r"seed must be 0\.\.\d+, got -1"),
    ],
)
def test_make_rejects_bad_input(make: Callable[..., tuple], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_other_entry_points_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"indices must be a 1-D sequence of integers"):
        make_lung_seg_phantoms(4, indices=[0.5])
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        lung_seg_labels(0)
    with pytest.raises(ValueError, match=r"label must be 0\.\.1, got 2"):
        render_pneumothorax_phantom(0, 2)
    for labels in (pneumothorax_labels, nec_labels, nf_labels):
        with pytest.raises(ValueError, match=r"prevalence must lie strictly between 0 and 1, got 0\.0"):
            labels(10, prevalence=0.0)


# ---------------------------------------------------------------------------
# Determinism and labels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_determinism_and_subsets(name: str) -> None:
    make = CLASSIFICATION[name][0]
    a, b = make(16, size=40, seed=5), make(16, size=40, seed=5)
    for x, y in zip(a, b, strict=True):
        assert x.tobytes() == y.tobytes()
    subset = np.array([13, 2, 2, 9, 0])
    sub = make(16, size=40, seed=5, indices=subset)
    for full, part in zip(a, sub, strict=True):
        assert np.array_equal(part, full[subset])
    other = make(16, size=40, seed=6)
    assert not np.array_equal(a[0], other[0])


def test_lung_seg_determinism_and_subsets() -> None:
    images, masks = make_lung_seg_phantoms(12, size=40, seed=4)
    again = make_lung_seg_phantoms(12, size=40, seed=4)
    assert images.tobytes() == again[0].tobytes() and masks.tobytes() == again[1].tobytes()
    sub_img, sub_mask = make_lung_seg_phantoms(100, size=40, seed=4, indices=[11, 3])
    assert np.array_equal(sub_img, images[[11, 3]]) and np.array_equal(sub_mask, masks[[11, 3]])


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_labels_follow_prevalence(name: str) -> None:
    labels_fn, p = CLASSIFICATION[name][1], CLASSIFICATION[name][2]
    labels = labels_fn(2000, seed=0)
    assert labels.dtype == np.int64 and labels.shape == (2000,)
    assert abs(labels.mean() - p) < 0.05
    assert abs(labels_fn(2000, seed=0, prevalence=0.2).mean() - 0.2) < 0.04
    assert np.array_equal(labels_fn(50, seed=3), labels_fn(500, seed=3)[:50])
    idx = np.array([7, 1, 19])
    _, made = _images(name, 20, size=16, seed=3, indices=idx, prevalence=0.3)
    assert np.array_equal(made, labels_fn(20, seed=3, prevalence=0.3)[idx])


def test_tasks_have_independent_labels() -> None:
    sets = [phantom_labels(500, seed=1), pneumothorax_labels(500, seed=1), nec_labels(500, seed=1, prevalence=0.5),
            nf_labels(500, seed=1, prevalence=0.5)]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not np.array_equal(sets[i], sets[j])


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def test_pneumothorax_masks_exactly_for_positives() -> None:
    for size in (16, 64):
        _, labels, masks = make_pneumothorax_phantoms(40, size=size, seed=6)
        assert np.array_equal(masks.any(axis=(1, 2)), labels.astype(bool))


def test_conspicuous_pneumothorax_only_darkens_the_pleural_space() -> None:
    images, labels, masks = make_pneumothorax_phantoms(40, size=64, seed=6)
    images_c, labels_c, masks_c = make_pneumothorax_phantoms(40, size=64, seed=6, conspicuous=True)
    assert np.array_equal(labels, labels_c) and np.array_equal(masks, masks_c)
    neg = labels == 0
    assert np.array_equal(images[neg], images_c[neg])  # same patients, absent cases untouched
    diff = images.astype(np.int16) - images_c.astype(np.int16)
    pos = labels == 1
    assert diff[pos][masks[pos]].mean() > 15  # clearly darker inside the pneumothorax (0..255 scale)
    assert np.abs(diff[pos][~masks[pos]]).mean() < 0.25 * diff[pos][masks[pos]].mean()


def test_pneumothorax_lies_in_the_lung_field_and_is_lucent_without_markings() -> None:
    darker = 0
    areas = []
    for i in range(30):
        absent, no_mask, lungs = render_pneumothorax_phantom(i, 0, 64, seed=8)
        present, mask, lungs1 = render_pneumothorax_phantom(i, 1, 64, seed=8)
        assert not no_mask.any() and mask.any() and np.array_equal(lungs, lungs1)
        grown = cv2.dilate(lungs.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (mask & grown).sum() >= 0.9 * mask.sum(), f"phantom {i}: pneumothorax outside the lung field"
        cols = np.flatnonzero(mask.any(0))
        assert cols.max() < 32 or cols.min() >= 32, f"phantom {i}: pneumothorax in both lungs"
        darker += present[mask].mean() < absent[mask].mean()
        areas.append(mask.sum() / lungs.sum())
    assert darker >= 27  # the pleural space is more lucent than the lung it replaced
    assert max(areas) > 4 * min(areas)  # small apical rims to large collapses


def test_every_lung_seg_image_has_two_lungs_in_the_body() -> None:
    images, masks = make_lung_seg_phantoms(200, size=64, seed=9)
    assert masks.any(axis=(1, 2)).all()
    area = masks.mean(axis=(1, 2))
    assert 0.12 < area.min() and area.max() < 0.5
    assert not masks[:, :5, :5].any() and not masks[:, -5:, -5:].any()
    # The mean mask has two lobes separated by the mediastinum.
    profile = masks.mean(0)[20:40].mean(0)
    left, middle, right = profile[:28].max(), profile[30:34].mean(), profile[36:].max()
    assert left > 0.6 and right > 0.6 and middle < 0.2, (left, middle, right)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_thresholding_does_not_segment_the_lungs() -> None:
    images, masks = make_lung_seg_phantoms(40, size=64, seed=10)
    best = [max(_dice(img < t, m) for t in range(8, 256, 8)) for img, m in zip(images, masks, strict=True)]
    assert float(np.mean(best)) < 0.9, f"an oracle global threshold reaches Dice {np.mean(best):.3f}"


# ---------------------------------------------------------------------------
# Learnability: real, but not trivial
# ---------------------------------------------------------------------------


def _pixel_features(images: np.ndarray, side: int) -> np.ndarray:
    small = np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA) for im in images])
    x = small.reshape(len(images), -1).astype(np.float64)
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_linear_model_on_pixels_learns_but_not_perfectly(name: str) -> None:
    images, labels = _images(name, 900, size=64, seed=21)
    x = _pixel_features(images, 12 if images.ndim == 4 else 24)
    model = LogisticRegression(C=0.1, max_iter=3000).fit(x[:600], labels[:600])
    auroc = roc_auc_score(labels[600:], model.predict_proba(x[600:])[:, 1])
    assert auroc > 0.65, f"{name}: held-out AUROC {auroc:.3f}: findings carry too little signal"
    assert auroc < 0.995, f"{name}: held-out AUROC {auroc:.3f}: a linear model on pixels should not solve it"


# ---------------------------------------------------------------------------
# Acquisition profiles
# ---------------------------------------------------------------------------


def test_site_zero_is_identity_and_others_are_deterministic() -> None:
    assert site_profile(0, seed=3) == AcquisitionProfile()
    assert site_profile(0).is_identity
    assert site_profile(2, seed=1) == site_profile(2, seed=1)
    profiles = {site_profile(s, seed=1) for s in range(1, 9)}
    assert len(profiles) == 8 and not any(p.is_identity for p in profiles)
    assert site_profile(2, seed=1) != site_profile(2, seed=2)


def test_apply_profile_identity_and_shapes() -> None:
    gray, _ = make_nec_phantoms(4, size=32, seed=1)
    rgb, _ = make_nf_phantoms(3, size=32, seed=1)
    for images in (gray, rgb, gray[0]):
        out = apply_profile(images, site_profile(0))
        assert out.dtype == np.uint8 and np.array_equal(out, images) and out is not images
        changed = apply_profile(images, site_profile(3, seed=0), seed=0)
        assert changed.shape == images.shape and changed.dtype == np.uint8
        assert not np.array_equal(changed, images)


def test_apply_profile_is_deterministic_per_image() -> None:
    images, _ = make_pneumothorax_phantoms(6, size=32, seed=2)[:2]
    profile = AcquisitionProfile(contrast=1.2, gamma=0.9, noise=0.03, blur=0.8, resolution=0.5, brightness=0.05)
    a = apply_profile(images, profile, seed=4)
    assert a.tobytes() == apply_profile(images, profile, seed=4).tobytes()
    assert np.array_equal(apply_profile(images[[5, 1]], profile, seed=4), a[[5, 1]])
    assert not np.array_equal(apply_profile(images, profile, seed=5), a)  # the seed drives the noise


def test_profile_effects() -> None:
    images, _ = make_nf_phantoms(4, size=48, seed=3)
    red = apply_profile(images, AcquisitionProfile(color_cast=(1.2, 1.0, 0.8)))
    assert red[..., 0].mean() > images[..., 0].mean() and red[..., 2].mean() < images[..., 2].mean()
    gray = images[..., 1].copy()
    assert np.array_equal(apply_profile(gray, AcquisitionProfile(color_cast=(1.2, 1.0, 0.8))), gray)
    soft = apply_profile(gray, AcquisitionProfile(resolution=0.25))
    lap = [np.abs(cv2.Laplacian(x.astype(np.float32), cv2.CV_32F)).mean() for x in (gray, soft)]
    assert lap[1] < lap[0]
    flat = apply_profile(gray, AcquisitionProfile(contrast=0.5))
    assert flat.std() < gray.std()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"contrast": 0.0}, r"contrast must be > 0, got 0\.0"),
        ({"gamma": -1.0}, r"gamma must be > 0"),
        ({"noise": -0.1}, r"noise must be >= 0"),
        ({"resolution": 1.5}, r"resolution must be in \(0, 1\]"),
        ({"brightness": 0.9}, r"brightness must be in \[-0\.5, 0\.5\]"),
        ({"blur": float("nan")}, r"blur must be a finite number"),
        ({"color_cast": (1.0, 1.0)}, r"color_cast must be three positive numbers"),
    ],
)
def test_profile_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AcquisitionProfile(**kwargs)  # type: ignore[arg-type]


def test_apply_profile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"images must be uint8, got dtype float64"):
        apply_profile(np.zeros((2, 8, 8)), AcquisitionProfile())
    with pytest.raises(ValueError, match=r"images must have shape .*got \(2, 8, 8, 4\)"):
        apply_profile(np.zeros((2, 8, 8, 4), np.uint8), AcquisitionProfile())
    with pytest.raises(ValueError, match=r"profile must be an AcquisitionProfile"):
        apply_profile(np.zeros((2, 8, 8), np.uint8), {"contrast": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"site must be >= 0, got -1"):
        site_profile(-1)
