"""2-D segmentation networks (MONAI U-Net and Attention U-Net).

Both are registered in :mod:`shared.models.catalog` with
``kind="segmentation"`` and built like every other model, ``build_model(name, in_channels, num_classes)``; they
return per-pixel logits ``(N, num_classes, H, W)`` (binary segmentation uses
``num_classes=2``: background, foreground). Input sides must be multiples of
16 and at least 32 (four stride-2 levels; instance norm needs more than one
pixel at the bottleneck).

Opacus (DP-SGD) compatibility
-----------------------------
* No BatchNorm: ``unet`` uses MONAI's instance norm (no affine parameters, no
  running statistics); MONAI's ``AttentionUnet`` hard-codes ``BatchNorm``, so
  every ``BatchNorm2d`` is swapped for a ``GroupNorm`` after construction
  (:func:`_batchnorm_to_groupnorm`).
* No in-place ops on layer outputs: MONAI builds ``nn.ReLU()``/``nn.PReLU``
  and ``nn.Dropout(inplace=False)``; residual sums (``cx + res``), skips
  (``torch.cat``) and attention gating (``x * psi``) are out of place. The
  activation is ``LeakyReLU`` (parameter-free, not in-place) instead of MONAI's
  default ``PReLU`` whose slope parameter has no Opacus grad sampler.
"""

from __future__ import annotations

from monai.networks.nets import AttentionUnet, UNet
from torch import nn


__all__ = ["MIN_INPUT_SIZE", "SIZE_MULTIPLE"]

CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)
STRIDES: tuple[int, ...] = (2, 2, 2, 2)
SIZE_MULTIPLE = 16
"""Input sides must be multiples of this (2 ** number of stride-2 levels)."""
MIN_INPUT_SIZE = 32
"""Smallest supported input side."""
_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": False})
_GROUPS = 8

def _batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm`` (recursively, in place) by an affine ``GroupNorm``.

    ``C`` channels get ``gcd(C, 8)`` groups (1 group for the attention gate's
    single-channel map, which then is an affine instance norm).
    """
    import math

    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            setattr(module, name, nn.GroupNorm(math.gcd(c, _GROUPS), c, eps=child.eps, affine=True))
        else:
            _batchnorm_to_groupnorm(child)
    return module


def unet(in_channels: int, num_classes: int) -> nn.Module:
    """MONAI 2-D residual U-Net, channels 16-256, 2 residual units, instance norm."""
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=CHANNELS,
        strides=STRIDES,
        num_res_units=2,
        act=_ACT,
        norm="instance",
    )


def attention_unet(in_channels: int, num_classes: int) -> nn.Module:
    """MONAI 2-D Attention U-Net, channels 16-256, GroupNorm instead of BatchNorm."""
    model = AttentionUnet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=CHANNELS,
        strides=STRIDES,
    )
    return _batchnorm_to_groupnorm(model)
