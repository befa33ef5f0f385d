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

from shared.models.registry import ModelFactory, register_model

#: medfed name -> (timm name, smallest input side in px that runs: DenseNet's and VGG's
#: five 2x2 poolings need 32, the others run from 28).
TIMM_MODELS: dict[str, tuple[str, int]] = {
    "resnet18": ("resnet18", 28),
    "resnet50": ("resnet50", 28),
    "densenet121": ("densenet121", 32),
    "efficientnet-b0": ("efficientnet_b0", 28),
    "vgg16": ("vgg16", 32),
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


for _name, (_timm_name, _min_size) in TIMM_MODELS.items():
    register_model(_name, min_input_size=_min_size)(timm_factory(_timm_name))
