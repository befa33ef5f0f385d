"""Phantom subgroups: synthetic sex/age attributes and the planted-disparity switch."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data.phantoms import (
    PHANTOM_AGE_RANGE,
    make_chest_phantoms,
    phantom_attributes,
    phantom_labels,
    render_chest_phantom,
)
from shared.data.phantoms_tasks import make_pneumothorax_phantoms, pneumothorax_labels
from shared.tasks import get_task


def test_attributes_are_deterministic_per_index_and_independent_of_the_label() -> None:
    a = phantom_attributes(np.arange(4000), seed=3)
    assert a["sex"].shape == a["age"].shape == (4000,)
    assert set(a["sex"].tolist()) == {"F", "M"}
    ages = a["age"].astype(int)
    assert ages.min() >= PHANTOM_AGE_RANGE[0] and ages.max() < PHANTOM_AGE_RANGE[1]
    assert 0.47 < float((a["sex"] == "F").mean()) < 0.53
    sub = phantom_attributes([3999, 7, 7, 0], seed=3)  # any subset/order, repeats: the same values
    assert sub["sex"].tolist() == a["sex"][[3999, 7, 7, 0]].tolist()
    assert sub["age"].tolist() == a["age"][[3999, 7, 7, 0]].tolist()
    assert not np.array_equal(phantom_attributes(np.arange(200), seed=4)["sex"], a["sex"][:200])
    y = phantom_labels(4000, seed=3)
    female = a["sex"] == "F"
    assert abs(female[y == 1].mean() - female[y == 0].mean()) < 0.05  # own hash stream: not tied to the label
    assert phantom_attributes([], seed=0)["sex"].shape == (0,)
    with pytest.raises(ValueError, match="non-negative"):
        phantom_attributes([-1])


def test_disparity_changes_only_female_positives_and_makes_them_fainter() -> None:
    n, seed = 40, 2
    base, labels = make_chest_phantoms(n, 64, seed=seed)
    same, _ = make_chest_phantoms(n, 64, seed=seed, disparity=0.0)
    assert base.tobytes() == same.tobytes()  # the default rendering is the no-disparity rendering
    planted, labels2 = make_chest_phantoms(n, 64, seed=seed, disparity=0.7)
    assert np.array_equal(labels, labels2)
    female_pos = (phantom_attributes(np.arange(n), seed)["sex"] == "F") & (labels == 1)
    assert female_pos.sum() >= 5
    changed = (base != planted).any(axis=(1, 2))
    assert np.array_equal(changed, female_pos)  # men and negatives are byte-identical
    for i in np.flatnonzero(female_pos):
        normal = render_chest_phantom(int(i), 0, 64, seed)[0].astype(np.int64)  # the same patient without findings
        full = np.abs(base[i].astype(np.int64) - normal).sum()
        faint = np.abs(planted[i].astype(np.int64) - normal).sum()
        assert faint < 0.6 * full, f"phantom {i}: opacities not fainter ({faint} vs {full})"
    with pytest.raises(ValueError, match="disparity must be in"):
        make_chest_phantoms(4, 64, disparity=1.0)


def test_pneumothorax_disparity_keeps_masks_and_other_images() -> None:
    n, seed = 30, 1
    for conspicuous in (False, True):
        base, labels, masks = make_pneumothorax_phantoms(n, 64, seed=seed, conspicuous=conspicuous)
        planted, labels2, masks2 = make_pneumothorax_phantoms(n, 64, seed=seed, conspicuous=conspicuous, disparity=0.8)
        assert np.array_equal(labels, labels2) and np.array_equal(masks, masks2)
        female_pos = (phantom_attributes(np.arange(n), seed)["sex"] == "F") & (labels == 1)
        assert female_pos.any()
        assert np.array_equal((base != planted).any(axis=(1, 2)), female_pos)
    assert np.array_equal(labels, pneumothorax_labels(n, seed))


def test_tasks_expose_the_disparity_renderer_where_supported() -> None:
    assert get_task("pneumonia-cxr").render_disparity_phantoms is not None
    assert get_task("pneumothorax-seg").render_disparity_phantoms is not None
    assert get_task("nec-axr").render_disparity_phantoms is None
    images, masks = get_task("pneumothorax-seg").render_disparity_phantoms(20, 64, 0, np.arange(5), 0.5)
    assert images.shape == (5, 64, 64) and masks.dtype == np.bool_
