"""Grad-CAM: every registered classifier gets a layer and finite maps; a trained model localises."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from shared.config import TrainConfig, parse_run_config
from shared.data.phantoms import make_chest_phantoms, render_chest_phantom
from shared.data.preprocess import normalize_batch, preprocess
from shared.explain import RESHAPE_TRANSFORMS, gradcam, overlay, target_layer
from shared.kinds import CLASSIFICATION
from shared.metrics.classification import ClassificationCounts
from shared.models import build_model, model_names
from shared.objectives import ClassificationObjective
from shared.tasks import get_task
from shared.training import images_to_tensor, predict_proba, to_float01, train_local

CLASSIFIERS = model_names(CLASSIFICATION)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_classifier_gives_finite_heatmaps(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=2, image_size=64)
    layer = target_layer(model, name)
    seen: list[torch.Size] = []
    as_map = RESHAPE_TRANSFORMS.get(name, lambda o: o)  # a ViT's tokens, laid on the patch grid
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(as_map(o).shape))
    x = torch.randn(2, 1, 64, 64)
    try:
        maps = gradcam(model, name, x, target_class=1)
    finally:
        handle.remove()
    assert seen and len(seen[0]) == 4 and seen[0][2] * seen[0][3] > 1, f"{name}: layer output {seen}"
    assert maps.shape == (2, 64, 64)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert model.training, "gradcam must restore the model's mode"


def test_gradcam_default_target_and_non_square_input() -> None:
    torch.manual_seed(0)
    model = build_model("small-cnn", in_channels=3, num_classes=3).eval()
    maps = gradcam(model, "small-cnn", torch.randn(3, 3, 48, 80))  # target = predicted class
    assert maps.shape == (3, 48, 80) and np.isfinite(maps).all()
    assert not model.training


def test_overlay_gray_and_colour() -> None:
    heat = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    gray = np.full((40, 30), 100, np.uint8)
    out = overlay(gray, heat)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    rgb = np.zeros((40, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    out_rgb = overlay(rgb, np.zeros((40, 30), np.float32))
    # heat 0 -> JET dark blue (BGR (128, 0, 0)); the red image stays in the R (last, BGR) channel
    assert out_rgb[0, 0, 2] == round(0.6 * 200)
    assert out_rgb[0, 0, 0] == round(0.4 * 128)
    with pytest.raises(ValueError, match="uint8"):
        overlay(gray.astype(np.float32), heat)


def test_gradcam_localises_lesions_of_a_trained_small_cnn() -> None:
    """Honest check: the Grad-CAM peak falls in the (dilated) lesion far more often than chance."""
    torch.manual_seed(0)
    cfg = parse_run_config({"task": "pneumonia-cxr", "model": "small-cnn", "image-size": 64})
    task = get_task("pneumonia-cxr")
    pcfg = task.preprocess_for(cfg)
    n_train, n_test, seed = 400, 240, 1  # ~4 s of training on 2 idle cores
    images, labels = make_chest_phantoms(n_train + n_test, size=64, seed=seed)
    images = np.stack([preprocess(im, pcfg) for im in images])
    model = build_model("small-cnn", 1, 2)
    train_local(
        model, images_to_tensor(images[:n_train]), torch.as_tensor(labels[:n_train]),
        TrainConfig(local_epochs=6, lr=1e-3), ClassificationObjective(2), seed=0, augment=None,
    )
    probs = predict_proba(model, images_to_tensor(images[n_train:]), precision="fp32", device=torch.device("cpu"))
    auroc = ClassificationCounts.from_predictions(probs.numpy().astype(np.float64), labels[n_train:]).metrics()["auroc"]
    assert auroc > 0.7, f"model barely above chance (AUROC {auroc:.3f}): the localisation test would be meaningless"

    test_idx = np.arange(n_train, n_train + n_test)
    positives = test_idx[labels[n_train:] == 1][:60]
    rendered = [render_chest_phantom(int(i), 1, 64, seed) for i in positives]
    x = np.stack([preprocess(img, pcfg) for img, _ in rendered])
    x = normalize_batch(to_float01(images_to_tensor(x), 1, torch.device("cpu"), False), cfg.data.normalize)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11))  # 5 px dilation
    masks = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for _, m in rendered])

    maps = gradcam(model, "small-cnn", x, target_class=1)
    peaks = maps.reshape(len(maps), -1).argmax(axis=1)
    hit_rate = float(masks.reshape(len(masks), -1)[np.arange(len(masks)), peaks].mean())
    chance = float(masks.mean())
    print(f"Grad-CAM localisation: hit-rate {hit_rate:.3f} vs chance {chance:.3f} "
          f"({hit_rate / chance:.1f}x) on {len(masks)} pneumonia phantoms; AUROC {auroc:.3f}")
    assert hit_rate > 2.0 * chance, f"hit-rate {hit_rate:.3f} not > 2x chance {chance:.3f}"
