"""Tests of shared.data.phantoms: shapes, determinism, labels, lesion masks, learnability."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from shared.data.phantoms import CHEST_CLASSES, make_chest_phantoms, phantom_labels, render_chest_phantom


@pytest.fixture(scope="module")
def pairs64() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(normal image, pneumonia image, lesion mask) of the same 40 patients at 64 px."""
    out = []
    for i in range(40):
        normal, empty = render_chest_phantom(i, 0, 64, seed=3)
        assert not empty.any()
        sick, mask = render_chest_phantom(i, 1, 64, seed=3)
        out.append((normal, sick, mask))
    return out


# ---------------------------------------------------------------------------
# Shapes, dtypes, validation
# ---------------------------------------------------------------------------


def test_classes() -> None:
    assert CHEST_CLASSES == ("normal", "pneumonia")


@pytest.mark.parametrize("size", [16, 33, 64, 100])
def test_shapes_and_dtypes(size: int) -> None:
    images, labels = make_chest_phantoms(6, size=size, seed=1)
    assert images.shape == (6, size, size) and images.dtype == np.uint8
    assert labels.shape == (6,) and labels.dtype == np.int64
    assert set(labels.tolist()) <= {0, 1}
    image, mask = render_chest_phantom(2, 1, size=size, seed=1)
    assert image.shape == (size, size) and image.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.bool_
    assert mask.any()


def test_empty_indices_give_empty_arrays() -> None:
    images, labels = make_chest_phantoms(10, size=32, indices=np.array([], dtype=np.int64))
    assert images.shape == (0, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (0,) and labels.dtype == np.int64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 4, "size": 15}, r"size must be 16\.\.1024, got 15"),
        ({"n": 4, "size": 1025}, r"size must be 16\.\.1024, got 1025"),
        ({"n": 0}, r"n must be >= 1, got 0"),
        ({"n": 4, "prevalence": 0.0}, r"prevalence must lie strictly between 0 and 1, got 0\.0"),
        ({"n": 4, "prevalence": 1.0}, r"prevalence must lie strictly between 0 and 1, got 1\.0"),
        ({"n": 4, "prevalence": "half"}, r"prevalence must be a number in \(0, 1\), got 'half'"),
        ({"n": 4, "indices": [0, 4]}, r"indices must lie in \[0, n\) = \[0, 4\), got 4"),
        ({"n": 4, "indices": [-1, 2]}, r"indices must lie in \[0, n\) = \[0, 4\), got -1"),
        ({"n": 4, "indices": [0.5]}, r"indices must be a 1-D sequence of integers, got dtype float64"),
        ({"n": 4, "indices": [[0, 1]]}, r"indices must be a 1-D sequence of integers.*shape \(1, 2\)"),
        ({"n": 4, "seed": -1}, r"seed must be 0\.\.\d+, got -1"),
        ({"n": 2.5}, r"n must be an integer, got 2\.5"),
    ],
)
def test_make_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_chest_phantoms(**kwargs)  # type: ignore[arg-type]


def test_render_and_labels_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"label must be 0\.\.1, got 2"):
        render_chest_phantom(0, 2)
    with pytest.raises(ValueError, match=r"index must be >= 0, got -3"):
        render_chest_phantom(-3, 0)
    with pytest.raises(ValueError, match=r"size must be 16\.\.1024, got 8"):
        render_chest_phantom(0, 0, size=8)
    with pytest.raises(ValueError, match=r"n must be >= 1, got -5"):
        phantom_labels(-5)
    with pytest.raises(ValueError, match=r"prevalence must lie strictly between 0 and 1, got 1\.5"):
        phantom_labels(10, prevalence=1.5)


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


def test_same_arguments_give_identical_bytes() -> None:
    a_img, a_lab = make_chest_phantoms(12, size=48, seed=5)
    b_img, b_lab = make_chest_phantoms(12, size=48, seed=5)
    assert a_img.tobytes() == b_img.tobytes()
    assert np.array_equal(a_lab, b_lab)
    m1 = render_chest_phantom(7, 1, 48, seed=5)[1]
    m2 = render_chest_phantom(7, 1, 48, seed=5)[1]
    assert np.array_equal(m1, m2)


def test_subset_and_order_do_not_change_pixels() -> None:
    full_img, full_lab = make_chest_phantoms(20, size=32, seed=2)
    subset = np.array([17, 3, 3, 11, 0])  # unsorted, with a repeat
    sub_img, sub_lab = make_chest_phantoms(20, size=32, seed=2, indices=subset)
    assert np.array_equal(sub_img, full_img[subset])
    assert np.array_equal(sub_lab, full_lab[subset])
    # A list works as well as an array; the set size only matters for bounds.
    list_img, _ = make_chest_phantoms(500, size=32, seed=2, indices=[3, 11])
    assert np.array_equal(list_img, full_img[[3, 11]])


def test_single_render_matches_batch() -> None:
    images, labels = make_chest_phantoms(6, size=40, seed=9)
    for i in range(6):
        assert np.array_equal(render_chest_phantom(i, int(labels[i]), 40, seed=9)[0], images[i])


def test_different_seeds_and_indices_differ() -> None:
    a, _ = make_chest_phantoms(4, size=32, seed=0)
    b, _ = make_chest_phantoms(4, size=32, seed=1)
    assert not np.array_equal(a, b)
    assert all(not np.array_equal(a[0], a[k]) for k in range(1, 4))
    assert not np.array_equal(phantom_labels(200, seed=0), phantom_labels(200, seed=1))


def test_same_patient_at_every_size() -> None:
    """Anatomy is drawn in normalised units: 128 px reduced to 64 px looks like the 64 px render."""
    for i in range(4):
        small = render_chest_phantom(i, 0, 64, seed=4)[0].astype(np.float64)
        big = render_chest_phantom(i, 0, 128, seed=4)[0]
        reduced = cv2.resize(big, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64)
        assert np.corrcoef(small.ravel(), reduced.ravel())[0, 1] > 0.9


# ---------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------


def test_labels_are_balanced_and_follow_prevalence() -> None:
    labels = phantom_labels(2000, seed=0)
    assert labels.dtype == np.int64 and labels.shape == (2000,)
    assert 0.45 <= labels.mean() <= 0.55
    assert 0.15 <= phantom_labels(2000, seed=0, prevalence=0.2).mean() <= 0.25


def test_labels_do_not_depend_on_set_size() -> None:
    assert np.array_equal(phantom_labels(50, seed=3), phantom_labels(500, seed=3)[:50])


def test_make_labels_agree_with_phantom_labels() -> None:
    idx = np.array([5, 0, 29, 14])
    _, labels = make_chest_phantoms(30, size=16, seed=8, indices=idx, prevalence=0.3)
    assert np.array_equal(labels, phantom_labels(30, seed=8, prevalence=0.3)[idx])


# ---------------------------------------------------------------------------
# Lesion masks and anatomy
# ---------------------------------------------------------------------------


def test_masks_nonempty_for_pneumonia_and_empty_for_normals() -> None:
    labels = phantom_labels(40, seed=6)
    for i, y in enumerate(labels.tolist()):
        _, mask = render_chest_phantom(i, y, 32, seed=6)
        assert mask.any() == bool(y), f"phantom {i} (label {y})"


def test_lesions_lie_in_the_lungs(pairs64: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    size = 64
    rows, cols = np.mgrid[0:size, 0:size]
    corner = ((rows < 0.12 * size) | (rows > 0.88 * size)) & ((cols < 0.12 * size) | (cols > 0.88 * size))
    for i, (normal, _, mask) in enumerate(pairs64):
        assert mask.any()
        assert not (mask & corner).any(), f"phantom {i}: lesion in a background corner"
        r, c = rows[mask].mean(), cols[mask].mean()
        assert 0.1 * size < r < 0.85 * size and 0.1 * size < c < 0.9 * size, f"phantom {i}: centroid {r, c}"
        # Without the lesion, the region is lung: darker than the mediastinum column of the same image.
        mediastinum = normal[int(0.25 * size):int(0.6 * size), int(0.45 * size):int(0.55 * size)]
        assert normal[mask].mean() < mediastinum.mean(), f"phantom {i}: lesion not over a dark lung field"


def test_pneumonia_differs_from_its_normal_twin_only_around_the_lesion(
    pairs64: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    kernel = np.ones((9, 9), np.uint8)
    for i, (normal, sick, mask) in enumerate(pairs64):
        diff = np.abs(sick.astype(np.int16) - normal.astype(np.int16))
        near = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
        assert diff[mask].mean() > 0, f"phantom {i}: lesion invisible"
        assert diff[near].sum() >= 0.9 * diff.sum(), f"phantom {i}: changes far from the lesion mask"


def test_lesions_vary_in_size_and_density(pairs64: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    areas = np.array([m.mean() for _, _, m in pairs64])
    contrast = np.array([(s.astype(float) - n)[m].mean() for n, s, m in pairs64])
    assert areas.max() > 5 * areas.min()  # small foci to lobar patches
    assert np.mean(contrast < 15) >= 0.1  # some are faint (gray levels above the normal twin)
    assert np.mean(contrast > 40) >= 0.3  # many are obvious


def test_pixel_statistics_are_sane() -> None:
    images, _ = make_chest_phantoms(24, size=64, seed=11)
    for i, img in enumerate(images):
        lo, hi = np.percentile(img, [1, 99])
        assert img.std() > 15, f"phantom {i} nearly constant"
        assert hi - lo > 90, f"phantom {i}: dynamic range {lo}..{hi}"
        assert (img == 255).mean() < 0.05 and (img == 0).mean() < 0.2, f"phantom {i} saturated"
        # Background corners are darker than the centre of the body (mediastinum/spine).
        assert img[:6, :6].mean() < img[24:40, 28:36].mean()
    assert len({float(img.mean()) for img in images}) > 12  # exposure varies


# ---------------------------------------------------------------------------
# Learnability: a real, but not trivial, problem
# ---------------------------------------------------------------------------


def _pixel_features(images: np.ndarray, side: int = 32) -> np.ndarray:
    small = np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA) for im in images])
    x = small.reshape(len(images), -1).astype(np.float64)
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)  # undo exposure


def test_linear_model_on_pixels_learns_but_not_perfectly() -> None:
    images, labels = make_chest_phantoms(800, size=64, seed=21)
    x = _pixel_features(images)
    model = LogisticRegression(C=0.1, max_iter=2000).fit(x[:500], labels[:500])
    auroc = roc_auc_score(labels[500:], model.predict_proba(x[500:])[:, 1])
    assert auroc > 0.6, f"held-out AUROC {auroc:.3f}: lesions carry too little signal"
    assert auroc < 0.99, f"held-out AUROC {auroc:.3f}: a linear model on pixels should not solve it"
