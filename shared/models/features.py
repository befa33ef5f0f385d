"""The penultimate features of every registered model: one definition, used by sites, server and predict.

The out-of-distribution warning (:mod:`shared.ood`) compares an input's
features with the training population's. Which features is a property of
the network, declared in its registry entry (``features=`` of
:func:`shared.models.registry.register_model`, see
:mod:`shared.models.catalog`):

* ``"input:<module>"``: the input of that module, for a classifier its final
  linear layer (small-cnn's ``head``; timm's ``get_classifier()``: ``fc``,
  ``classifier``, ``head.fc``). That is the globally pooled representation
  the class logits are a linear function of (dropout is off in eval mode);
* ``"output:<module>"``: that module's output, global-average-pooled over
  its spatial dimensions when it is a feature map: for the U-Nets the
  bottleneck (the deepest level, 256 channels).

The features are read with a forward hook during the one forward pass that
also gives the outputs, so prediction costs nothing extra. DP-SGD's layer
swaps (:mod:`shared.models.dp`) keep module names, so the same point holds
for a DP-trained model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from shared.errors import UserError
from shared.models.registry import MODELS

__all__ = ["FeaturesUnavailable", "capture_features", "feature_dims", "feature_point", "forward_with_features"]


class FeaturesUnavailable(UserError):
    """The model's registry entry declares no feature point, or it names no module of the network."""


def feature_point(model_name: str) -> tuple[str, str]:
    """``("input" | "output", dotted module name)`` of a registered model.

    Raises
    ------
    FeaturesUnavailable
        The entry declares none (a model registered without ``features=``).
    """
    spec = MODELS.get(model_name).features
    if not spec:
        raise FeaturesUnavailable(
            f"model '{model_name}' declares no feature point, so no out-of-distribution statistics can be "
            "computed for it: register it with features='input:<final linear layer>' (classifiers) or "
            "features='output:<bottleneck module>'")
    where, _, module = spec.partition(":")
    return where, module


@contextmanager
def capture_features(model: nn.Module, model_name: str) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward pass of ``model`` appends its ``(B, d)`` float32 features to the yielded list."""
    where, name = feature_point(model_name)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise FeaturesUnavailable(f"model '{model_name}' has no module '{name}' (its declared feature point)") from None
    out: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> None:
        t = t.detach().float()
        if t.ndim == 4:
            t = t.mean(dim=(2, 3))
        out.append(t.reshape(t.shape[0], -1))

    if where == "input":
        handle = module.register_forward_pre_hook(lambda _m, inputs: keep(inputs[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _i, output: keep(output))
    try:
        yield out
    finally:
        handle.remove()


def forward_with_features(model: nn.Module, model_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model(x), features (B, d))`` from one forward pass (caller sets eval mode and no_grad)."""
    with capture_features(model, model_name) as feats:
        y = model(x)
    if len(feats) != 1:
        raise FeaturesUnavailable(f"model '{model_name}': its feature point ran {len(feats)} times in one forward pass")
    return y, feats[0]


@torch.no_grad()
def feature_dims(model: nn.Module, model_name: str, in_channels: int, size: int) -> int:
    """Width of the model's features, from one forward pass of zeros (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        _, f = forward_with_features(model, model_name, torch.zeros(1, in_channels, size, size, device=device))
    finally:
        model.train(was)
    return int(f.shape[1])
