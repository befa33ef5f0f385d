"""2-D segmentation networks (MONAI U-Net and Attention U-Net, an FCN-8s on ResNet-18).

All are registered in :mod:`shared.models.catalog` with
``kind="segmentation"`` and built like every other model, ``build_model(name, in_channels, num_classes)``; they
return per-pixel logits ``(N, num_classes, H, W)`` (binary segmentation uses
``num_classes=2``: background, foreground). The U-Nets' input sides must be
multiples of 16 and at least 32 (four stride-2 levels; instance norm needs
more than one pixel at the bottleneck); the FCN takes any side from 32 px.

``fcn`` is a light fully convolutional network (:class:`FCN8s`: Long et al.
2015's FCN-8s skips on a torchvision ResNet-18 encoder, torchvision's
``FCNHead``), not torchvision's ``fcn_resnet50``: that one is a dilated
ResNet-50 (33 M parameters, output stride 8) whose training step at 64 px
costs several times a U-Net's on CPU (``benchmarks/augment_throughput.py``
prints both), and its single 8x upsampling of a stride-8 map needs no skips
only because of the dilation that makes it slow. FCN-8s gets its detail
from the stride-8 and stride-16 skips instead (11.8 M parameters, BatchNorm:
FedBN keeps it site-local; :func:`shared.models.dp.make_dp_compatible`
turns it into GroupNorm for DP-SGD).

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

import torch
import torch.nn.functional as F
from monai.networks.nets import AttentionUnet, UNet
from torch import nn
from torchvision.models import resnet18
from torchvision.models.segmentation.fcn import FCNHead

__all__ = ["FCN8s", "MIN_INPUT_SIZE", "SIZE_MULTIPLE", "attention_unet", "fcn", "unet"]

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


class FCN8s(nn.Module):
    """FCN-8s on a ResNet-18 encoder: class scores at stride 32, refined by stride-16 and stride-8 skips.

    The encoder is torchvision's ``resnet18`` (random init, its first
    convolution rebuilt for ``in_channels``); torchvision's ``FCNHead`` (3x3
    conv to 128 channels, BatchNorm, ReLU, dropout 0.1, 1x1 conv) scores the
    stride-32 features, 1x1 convolutions score ``layer3`` (stride 16) and
    ``layer2`` (stride 8); each coarser score map is upsampled bilinearly to
    the next one's size and added, and the sum to the input size. Sizes need
    not divide 32: every upsampling goes to the exact size of the map it is
    added to.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        trunk = resnet18(weights=None)
        if in_channels != 3:
            trunk.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.head = FCNHead(512, num_classes)
        self.score16 = nn.Conv2d(256, num_classes, kernel_size=1)
        self.score8 = nn.Conv2d(128, num_classes, kernel_size=1)
        self.out_channels = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits ``(B, num_classes, H, W)``."""
        size = x.shape[-2:]
        s8 = self.layer2(self.layer1(self.stem(x)))
        s16 = self.layer3(s8)
        score = self.head(self.layer4(s16))
        score = F.interpolate(score, size=s16.shape[-2:], mode="bilinear", align_corners=False) + self.score16(s16)
        score = F.interpolate(score, size=s8.shape[-2:], mode="bilinear", align_corners=False) + self.score8(s8)
        return F.interpolate(score, size=size, mode="bilinear", align_corners=False)


def fcn(in_channels: int, num_classes: int) -> nn.Module:
    """FCN-8s with a ResNet-18 encoder (:class:`FCN8s`), random init."""
    return FCN8s(in_channels, num_classes)
