"""A small vision transformer (``vit-tiny``): ViT-Tiny's shape from timm's layers, built for one input size.

Width 192, 12 pre-norm blocks with 3 attention heads and 4x MLPs, a class
token and learned position embeddings: timm's ``vit_tiny_patch16_224`` (5.5 M
parameters), randomly initialised the timm way, nothing downloaded. What
differs:

* **Patch size follows the image size** (:func:`patch_size_for`): 8 px below
  128 px, 16 px from 128 px. Sixteen-pixel patches leave a 64 px chest X-ray
  4 x 4 tokens; with 8 px it gets 8 x 8, and 64-224 px inputs get 64-196
  tokens (224 px / 16 = 196, ViT-Tiny's own count). Input sides must be
  multiples of 16 (both patch sizes divide them), at least 32.
* **Built for one size** (registry ``sized=True``): the position embedding
  has one entry per patch of the run's ``image-size``; other sizes are
  refused with a clear error rather than interpolated.
* **The class token and the position embedding live in their own module**
  (:class:`TokenEmbed`) instead of on the model itself, so Opacus (DP-SGD)
  can compute their per-sample gradients with a two-line sampler
  (registered in :mod:`shared.models.dp`) instead of running the whole
  network through functorch; state-dict keys are the same with and without
  DP. The norms are torch's own ``nn.LayerNorm`` (Opacus matches layer types
  exactly; timm's ``LayerNorm`` subclass would miss its sampler).

Grad-CAM reads the last block's first norm and maps the patch tokens back to
the patch grid (:mod:`shared.explain`).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

__all__ = ["MIN_INPUT_SIZE", "SIZE_MULTIPLE", "TokenEmbed", "VisionTransformer", "patch_size_for", "vit_tiny"]

EMBED_DIM, DEPTH, HEADS, MLP_RATIO = 192, 12, 3, 4.0
SIZE_MULTIPLE = 16
"""Input sides must be multiples of this (both patch sizes divide it)."""
MIN_INPUT_SIZE = 32
"""Smallest supported input side (4 x 4 patches of 8 px)."""


def patch_size_for(image_size: int) -> int:
    """Patch side for ``image_size`` px inputs: 8 below 128 px, else 16 (64-196 tokens from 64 to 224 px)."""
    return 8 if image_size < 128 else 16


class TokenEmbed(nn.Module):
    """Prepend the class token and add the learned position embedding: ``(B, N, D) -> (B, N + 1, D)``.

    Both parameters live here (not on the model) so DP-SGD can take their
    per-sample gradients from this module's output gradient.
    """

    def __init__(self, num_patches: int, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class token first, then the patch tokens, each plus its position embedding."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed


class VisionTransformer(nn.Module):
    """Pre-norm ViT classifier on square ``image_size`` inputs; logits from the class token.

    Parameters
    ----------
    in_channels, num_classes:
        Image channels (1 or 3) and output logits.
    image_size:
        The one input side the model accepts (a multiple of the patch size).
    patch_size:
        Default :func:`patch_size_for` ``(image_size)``.
    dim, depth, heads, mlp_ratio:
        Width, blocks, attention heads, MLP expansion (ViT-Tiny by default).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, patch_size: int | None = None,
                 dim: int = EMBED_DIM, depth: int = DEPTH, heads: int = HEADS, mlp_ratio: float = MLP_RATIO) -> None:
        super().__init__()
        patch = patch_size or patch_size_for(image_size)
        if image_size < patch or image_size % patch:
            raise ValueError(f"a ViT with {patch} px patches needs an image size that is a multiple of {patch}, "
                             f"got {image_size}")
        self.image_size = image_size
        self.patch_embed = PatchEmbed(img_size=image_size, patch_size=patch, in_chans=in_channels, embed_dim=dim)
        self.tokens = TokenEmbed(self.patch_embed.num_patches, dim)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        ])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if m is not self:
                init_weights_vit_timm(m, needs_reset=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of ``(B, C, image_size, image_size)`` images."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"this ViT was built for {self.image_size} x {self.image_size} px inputs (its position "
                             f"embeddings), got {tuple(x.shape[-2:])}; build it with the run's image-size")
        x = self.tokens(self.patch_embed(x))
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(in_channels: int, num_classes: int, *, image_size: int) -> nn.Module:
    """ViT-Tiny (width 192, 12 blocks, 3 heads) for ``image_size`` px inputs, random init."""
    return VisionTransformer(in_channels, num_classes, image_size)
