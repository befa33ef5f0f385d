"""Standard image classifiers from timm, always randomly initialised.

Nothing is ever downloaded: ``pretrained=False`` always. Pretrained weights,
when wanted, come from a local file via ``build_model(..., init_weights=PATH)``.

Note for DP-SGD: these are the stock timm architectures (BatchNorm, in-place
ReLU, ``x += shortcut``); making them Opacus-compatible is the privacy
layer's job (:func:`shared.models.dp.make_dp_compatible`).
"""

from __future__ import annotations

import timm
from torch import nn

from shared.models.registry import ModelFactory

#: medfed name -> timm name (registered in :mod:`shared.models.catalog` with their input sizes).
TIMM_MODELS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "densenet121": "densenet121",
    "efficientnet-b0": "efficientnet_b0",
    "vgg16": "vgg16",
}


def timm_factory(timm_name: str) -> ModelFactory:
    """Return a factory building ``timm_name`` without pretrained weights.

    Parameters
    ----------
    timm_name:
        A name accepted by :func:`timm.create_model`.
    """

    def factory(in_channels: int, num_classes: int) -> nn.Module:
        return timm.create_model(
            timm_name, pretrained=False, in_chans=in_channels, num_classes=num_classes
        )

    factory.__name__ = f"timm_{timm_name}"
    factory.__doc__ = f"timm ``{timm_name}`` (random init)."
    return factory


resnet18 = timm_factory("resnet18")
resnet50 = timm_factory("resnet50")
densenet121 = timm_factory("densenet121")
efficientnet_b0 = timm_factory("efficientnet_b0")
vgg16 = timm_factory("vgg16")
