"""``small-cnn``: a compact CNN for CPU demos, tests and DP-SGD.

Four blocks of ``conv3x3 -> norm -> ReLU -> max-pool`` (32-64-128-128
channels), global average pooling, dropout and one linear layer; about 0.24 M
parameters. It trains at roughly 450 images/s (64 px, batch 32, fp32, 2 CPU
threads; ~750 with bf16) and accepts any input of at least 16 px.

Normalisation: BatchNorm by default, because on the chest phantoms it learns
about twice as fast as GroupNorm (held-out AUROC 0.82 vs 0.67 after 4 epochs
on 600 images, measured 2026-11-23). DP-SGD needs GroupNorm: build with
``norm="group"`` or let Opacus' ``ModuleValidator.fix`` swap it. ReLU is never
in-place (in-place ops break Opacus' backward hooks with torch >= 2.14).
"""

from __future__ import annotations

import torch
from torch import nn

#: Smallest input side the four 2x2 max-pools can reduce to 1 x 1.
MIN_INPUT_SIZE = 16


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ValueError(f"small-cnn norm must be 'batch' or 'group', got {kind!r}")


def _block(in_channels: int, out_channels: int, groups: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        _norm(norm, out_channels, groups),
        nn.ReLU(inplace=False),  # in-place ops break Opacus' backward hooks (torch >= 2.14)
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Compact CNN classifier (BatchNorm or GroupNorm).

    Parameters
    ----------
    in_channels:
        Input channels (1 = grayscale, 3 = RGB).
    num_classes:
        Number of output logits.
    widths:
        Output channels of the conv blocks; each block halves the resolution.
    dropout:
        Dropout probability before the linear head.
    groups:
        GroupNorm groups per block (capped at the block's channel count).
    norm:
        ``"batch"`` (default) or ``"group"`` (DP-SGD compatible as built).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 128, 128),
        dropout: float = 0.2,
        groups: int = 8,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        blocks = []
        prev = in_channels
        for width in widths:
            blocks.append(_block(prev, width, groups, norm))
            prev = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(prev, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(batch, num_classes)``."""
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.dropout(x))


def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """Build :class:`SmallCNN` with its default widths."""
    return SmallCNN(in_channels, num_classes)
