"""Grad-CAM saliency maps for the registered classifiers.

:func:`target_layer` picks the layer whose activations Grad-CAM weighs: the
last feature map before global pooling. It is found generically by one dry
forward pass (see :func:`find_last_feature_layer`), with a few per-model
overrides where a finer map localises better. A vision transformer has no
feature map: Grad-CAM reads the patch tokens at its last block's first norm
and lays them back on the patch grid (:data:`RESHAPE_TRANSFORMS`, the usual
ViT recipe of ``pytorch_grad_cam``). :func:`gradcam` runs
``pytorch_grad_cam.GradCAM`` in fp32 and eval mode and returns one heatmap in
``[0, 1]`` per image; :func:`overlay` blends a heatmap onto an image for
display.

A Grad-CAM map shows where the *model* found evidence for a class, not where
the disease is: a model that learned a shortcut (a side marker, a tube, the
hospital's detector) highlights the shortcut. Read the maps that way.

This module imports neither Flower nor (at import time) ``pytorch_grad_cam``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["RESHAPE_TRANSFORMS", "TARGET_LAYER_OVERRIDES", "find_last_feature_layer", "gradcam", "overlay",
           "target_layer", "tokens_to_map"]

#: model name -> dotted module name of its Grad-CAM layer, where the generic
#: rule (last feature map before global pooling) is not the best choice.
#: small-cnn: the ReLU before the last 2x2 max-pool gives an 8x8 map at 64 px
#: instead of the 4x4 map after the pool; same features, finer localisation.
#: vit-tiny: the last block's first LayerNorm (the class token attends to the patch tokens there).
TARGET_LAYER_OVERRIDES: dict[str, str] = {
    "small-cnn": "features.3.2",
    "vit-tiny": "blocks.11.norm1",
}


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens ``(B, 1 + N, D)`` (class token first) -> patch map ``(B, D, sqrt(N), sqrt(N))``.

    Raises
    ------
    ValueError
        When ``N`` is not a square (non-square inputs have no square grid).
    """
    patches = tokens[:, 1:, :]
    n = patches.shape[1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"cannot lay {n} patch tokens on a square grid")
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


#: model name -> how its target layer's output becomes a ``(B, C, h, w)`` map (default: it is one).
RESHAPE_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "vit-tiny": tokens_to_map,
}

#: Side of the dry-run input used to find the last feature map generically.
_PROBE_SIZE = 64
_PROBE_CACHE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

_POOL_TYPES = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)


def _first_in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    raise ValueError("model has no Conv2d layer: Grad-CAM needs a convolutional feature map")


def find_last_feature_layer(model: nn.Module, probe_size: int = _PROBE_SIZE) -> str:
    """Dotted name of the last module producing a spatial feature map before global pooling.

    One forward pass of a ``probe_size`` square of zeros (eval mode, no grad;
    the model's mode is restored) records every module's output in the order
    modules finish. Global pooling is the first module whose output is a
    vector, or a ``1 x 1`` map computed from a larger one (``AdaptiveAvgPool``,
    timm's ``SelectAdaptivePool2d``, VGG's 7x7 "fc6" convolution). The answer
    is the last module before that with a 4-D output larger than ``1 x 1``;
    a container (``layer4``) finishes after its children and so wins over its
    last child, which keeps in-place activations inside it.

    Raises
    ------
    ValueError
        The model has no convolution or no spatial feature map before pooling.
    """
    in_ch = _first_in_channels(model)
    events: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...] | None]] = []
    handles = []

    def hook(name: str):  # noqa: ANN202
        def fn(module: nn.Module, inputs: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor):
                x_in = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
                events.append((name, module, tuple(output.shape), tuple(x_in.shape) if x_in is not None else None))
        return fn

    for name, module in model.named_modules():
        if name:  # not the model itself
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, in_ch, probe_size, probe_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    best: str | None = None
    for name, module, out_shape, in_shape in events:
        spatial_out = out_shape[2] * out_shape[3] if len(out_shape) == 4 else 0
        spatial_in = in_shape[2] * in_shape[3] if in_shape is not None and len(in_shape) == 4 else 0
        if len(out_shape) != 4 or (spatial_out == 1 and spatial_in > 1):
            if best is not None:
                break  # global pooling reached
            continue
        if spatial_out > 1 and not isinstance(module, _POOL_TYPES):
            best = name
    if best is None:
        raise ValueError(
            "found no spatial feature map (4-D output larger than 1x1) before global pooling "
            f"at a {probe_size} px input: Grad-CAM needs a convolutional classifier"
        )
    return best


def target_layer(model: nn.Module, model_name: str) -> nn.Module:
    """The layer Grad-CAM reads for ``model`` (the last conv feature map before pooling).

    Parameters
    ----------
    model : nn.Module
        A classifier built by :func:`shared.models.build_model`.
    model_name : str
        Its registered name; :data:`TARGET_LAYER_OVERRIDES` is consulted first.

    Returns
    -------
    nn.Module
        For the registered classifiers (at the generic rule): ``resnet18`` /
        ``resnet50`` -> ``layer4``, ``densenet121`` -> ``features`` (ends with
        ``norm5`` + ReLU), ``efficientnet-b0`` -> ``bn2`` (BatchNorm + SiLU
        after ``conv_head``), ``vgg16`` -> ``features`` (before the 7x7
        "fc6" conv of ``pre_logits``); ``small-cnn`` -> ``features.3.2``,
        ``vit-tiny`` -> ``blocks.11.norm1`` (overrides; the ViT's tokens are
        laid on the patch grid by :data:`RESHAPE_TRANSFORMS`).

    Raises
    ------
    ValueError
        When no suitable layer exists (e.g. a model without convolutions).
    """
    override = TARGET_LAYER_OVERRIDES.get(model_name)
    if override is not None:
        try:
            return model.get_submodule(override)
        except AttributeError:
            logger.warning("Grad-CAM layer override %r not found in %s; using the generic rule", override, model_name)
    name = _PROBE_CACHE.get(model)
    if name is None:
        name = find_last_feature_layer(model)
        _PROBE_CACHE[model] = name
    return model.get_submodule(name)


def gradcam(
    model: nn.Module,
    model_name: str,
    x: torch.Tensor,
    target_class: int | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps for a batch of normalised inputs.

    Parameters
    ----------
    model : nn.Module
        The classifier (any mode; it runs in eval mode here and its mode is restored).
    model_name : str
        Registered name (selects the layer, see :func:`target_layer`).
    x : torch.Tensor
        ``(B, C, H, W)`` input exactly as the model sees it (after
        :func:`shared.data.preprocess.normalize_batch`).
    target_class : int, optional
        Class whose evidence is shown; ``None`` = each image's predicted class.

    Returns
    -------
    np.ndarray
        ``float32`` ``(B, H, W)`` in ``[0, 1]``, each map scaled to its own
        maximum (all zeros when the model found no positive evidence).
    """
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:  # pragma: no cover - dependency missing
        raise ImportError(
            "Grad-CAM needs the 'grad-cam' package (import name pytorch_grad_cam): pip install grad-cam"
        ) from exc
    if x.ndim != 4:
        raise ValueError(f"gradcam expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return np.zeros((0, x.shape[2], x.shape[3]), np.float32)
    layer = target_layer(model, model_name)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    if dtype != torch.float32:
        raise ValueError(f"gradcam needs an fp32 model, got parameters of dtype {dtype}")
    x = x.detach().to(device=device, dtype=torch.float32).contiguous().requires_grad_(True)
    if target_class is not None:
        targets = [ClassifierOutputTarget(int(target_class)) for _ in range(x.shape[0])]
    else:
        targets = None
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False), GradCAM(
                model=model, target_layers=[layer], reshape_transform=RESHAPE_TRANSFORMS.get(model_name)) as cam:
            maps = cam(input_tensor=x, targets=targets)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(maps, 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, *, rgb: bool = True) -> np.ndarray:
    """Blend a heatmap (JET colour map) onto an image for display.

    Parameters
    ----------
    image : np.ndarray
        ``uint8`` ``(H, W)`` gray or ``(H, W, 3)`` colour.
    heatmap : np.ndarray
        Float map in ``[0, 1]`` of any size (resized to the image, bilinear).
    alpha : float
        Weight of the heatmap (0.4: anatomy stays readable).
    rgb : bool
        Whether a colour ``image`` is RGB (the pipeline's order; default) or already BGR.

    Returns
    -------
    np.ndarray
        ``uint8`` ``(H, W, 3)`` in **BGR** order, ready for ``cv2.imwrite``.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"overlay expects a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        base = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.ndim == 3 and img.shape[2] == 3:
        base = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if rgb else img
    else:
        raise ValueError(f"overlay expects an (H, W) or (H, W, 3) image, got shape {img.shape}")
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    if heat.ndim != 2:
        raise ValueError(f"overlay expects a 2-D heatmap, got shape {heat.shape}")
    h, w = base.shape[:2]
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    heat_u8 = np.clip(np.rint(heat * 255.0), 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET)
    return cv2.addWeighted(colour, float(alpha), base, 1.0 - float(alpha), 0.0)
