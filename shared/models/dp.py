"""Make registered models trainable with Opacus DP-SGD (per-sample gradients).

:func:`make_dp_compatible` turns a freshly built model into one Opacus can
train and reports every change it made. Besides ``ModuleValidator.fix``
(BatchNorm -> GroupNorm) it handles what Opacus' validator misses
(measured with torch 2.14 and Opacus 1.6):

* In-place operations on a hooked layer's output crash Opacus with torch
  2.14 (``Output 0 of BackwardHookFunction is a view and is being modified
  inplace``): every ``inplace=True`` flag (ReLU, SiLU, Dropout, timm
  activations) is switched off, and the ``x += shortcut`` of timm and
  torchvision ResNet blocks is made out-of-place by swapping the block's
  class for a subclass whose ``forward`` differs only in that line.
* timm's ``BatchNormAct2d`` (DenseNet, EfficientNet) subclasses
  ``BatchNorm2d`` but ``fix()`` only matches exact types: it is rebuilt as
  timm's ``GroupNormAct`` keeping the activation, and a per-sample gradient
  sampler for ``GroupNormAct`` is registered with Opacus (the built-in
  GroupNorm sampler would be wrong: the layer's output is *after* the
  activation).

* The vision transformer (``vit-tiny``) needs no change: its linear layers,
  ``nn.LayerNorm`` and patch convolution have Opacus samplers, attention is
  functional (no parameters of its own), and the class token and position
  embedding live in :class:`shared.models.vit.TokenEmbed`, for which an
  exact per-sample gradient sampler is registered here.

The transformation is deterministic: the server and every site apply it to
a freshly built model and get the same state-dict keys and shapes. The
parameter names of the norm layers are kept (``*.weight``/``*.bias``), only
BatchNorm's running statistics disappear.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.validators import ModuleValidator
from timm.layers.norm_act import BatchNormAct2d, GroupNormAct
from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models import resnet as tv_resnet

from shared.errors import UserError
from shared.models.vit import TokenEmbed

__all__ = ["DPCompatibilityError", "make_dp_compatible", "dp_state_keys"]

#: GroupNorm groups used for replaced BatchNorms: ``gcd(C, 32)`` like Opacus' fixer.
MAX_GROUPS = 32


class DPCompatibilityError(UserError):
    """A model still holds layers Opacus cannot train after :func:`make_dp_compatible`."""


# ---------------------------------------------------------------------------
# Residual blocks with an out-of-place skip connection
# ---------------------------------------------------------------------------


class _TimmBasicBlockDP(timm_resnet.BasicBlock):
    """timm ``BasicBlock`` whose residual sum is out of place (same weights, same output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - mirrors timm 1.0
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = x + shortcut
        return self.act2(x)


class _TimmBottleneckDP(timm_resnet.Bottleneck):
    """timm ``Bottleneck`` whose residual sum is out of place (same weights, same output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - mirrors timm 1.0
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = x + shortcut
        return self.act3(x)


class _TvBasicBlockDP(tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` whose residual sum is out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - mirrors torchvision
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class _TvBottleneckDP(tv_resnet.Bottleneck):
    """torchvision ``Bottleneck`` whose residual sum is out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - mirrors torchvision
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


#: Exact block class -> subclass with an out-of-place residual add.
_RESIDUAL_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    timm_resnet.BasicBlock: _TimmBasicBlockDP,
    timm_resnet.Bottleneck: _TimmBottleneckDP,
    tv_resnet.BasicBlock: _TvBasicBlockDP,
    tv_resnet.Bottleneck: _TvBottleneckDP,
}


# ---------------------------------------------------------------------------
# GroupNormAct: replacement for timm's BatchNormAct2d, with an Opacus sampler
# ---------------------------------------------------------------------------


@register_grad_sampler(GroupNormAct)
def _group_norm_act_grad_sample(
    layer: GroupNormAct, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``GroupNormAct`` (group norm, affine, then activation).

    ``backprops`` is the gradient w.r.t. the layer's output, i.e. *after* the
    activation; the activation is re-applied to the affine output to carry
    it back to the pre-activation before the usual GroupNorm formulas.
    Requires ``layer.drop`` to be the identity (checked by make_dp_compatible).
    """
    x = activations[0]
    normed = F.group_norm(x, layer.num_groups, eps=layer.eps)
    if isinstance(layer.act, nn.Identity):
        grad_pre = backprops
    else:
        with torch.enable_grad():
            pre = (normed * layer.weight.detach().view(1, -1, *([1] * (x.dim() - 2)))
                   + layer.bias.detach().view(1, -1, *([1] * (x.dim() - 2)))).requires_grad_(True)
            (grad_pre,) = torch.autograd.grad(layer.act(pre), pre, backprops)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.einsum("ni...->ni", normed * grad_pre)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("ni...->ni", grad_pre)
    return ret


@register_grad_sampler(TokenEmbed)
def _token_embed_grad_sample(
    layer: TokenEmbed, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the class token and position embedding.

    The layer's output is ``cat([cls, x]) + pos_embed``: each image's
    gradient of ``pos_embed`` is its output gradient ``(N + 1, D)``, that of
    ``cls_token`` the gradient at position 0.
    """
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.pos_embed.requires_grad:
        ret[layer.pos_embed] = backprops.unsqueeze(1)
    if layer.cls_token.requires_grad:
        ret[layer.cls_token] = backprops[:, :1].unsqueeze(1)
    return ret


def _groups(channels: int) -> int:
    return math.gcd(MAX_GROUPS, channels)


def _norm_act_to_group_norm(bn: BatchNormAct2d, where: str) -> GroupNormAct:
    if not isinstance(bn.drop, nn.Identity):
        raise DPCompatibilityError(
            f"{where}: BatchNormAct2d with a drop layer ({type(bn.drop).__name__}) is not supported "
            f"under DP-SGD; build the model without norm-layer dropout"
        )
    if not bn.affine:
        raise DPCompatibilityError(f"{where}: BatchNormAct2d without affine parameters is not supported under DP-SGD")
    c = bn.num_features
    gn = GroupNormAct(c, num_groups=_groups(c), eps=bn.eps, affine=True, apply_act=False, inplace=False)
    gn.act = copy.deepcopy(bn.act)
    with torch.no_grad():
        gn.weight.copy_(bn.weight)
        gn.bias.copy_(bn.bias)
    return gn


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _replace_children(module: nn.Module, prefix: str, changes: list[str]) -> None:
    """Recursively rebuild ``BatchNormAct2d`` children (in place)."""
    for name, child in module.named_children():
        where = f"{prefix}{name}"
        if isinstance(child, BatchNormAct2d) and type(child) is BatchNormAct2d:
            new = _norm_act_to_group_norm(child, where)
            setattr(module, name, new)
            changes.append(
                f"{where}: BatchNormAct2d({child.num_features}, act={type(child.act).__name__}) -> "
                f"GroupNormAct({new.num_groups} groups, {child.num_features} channels, same act)"
            )
        else:
            _replace_children(child, f"{where}.", changes)


def _describe_bn_swaps(before: nn.Module, after: nn.Module) -> list[str]:
    old = dict(before.named_modules())
    out = []
    for name, m in after.named_modules():
        prev = old.get(name)
        if isinstance(prev, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.modules.batchnorm._BatchNorm):
            detail = (
                f"GroupNorm({m.num_groups} groups, {m.num_channels} channels)"
                if isinstance(m, nn.GroupNorm) else type(m).__name__
            )
            out.append(f"{name}: {type(prev).__name__}({prev.num_features}) -> {detail}")
    return out


def _disable_inplace(model: nn.Module) -> list[str]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            label = type(m).__name__
            counts[label] = counts.get(label, 0) + 1
    return [f"{n} {label}(inplace=True) -> inplace=False" for label, n in sorted(counts.items())]


def _swap_residual_blocks(model: nn.Module) -> list[str]:
    changes = []
    for name, m in model.named_modules():
        new_cls = _RESIDUAL_SWAPS.get(type(m))
        if new_cls is not None:
            m.__class__ = new_cls
            changes.append(f"{name}: residual add made out-of-place ({type(m).__mro__[1].__name__})")
    return changes


def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return a copy of ``model`` that Opacus can train, and what was changed.

    Parameters
    ----------
    model:
        A model as built by :func:`shared.models.build_model` (not modified).

    Returns
    -------
    tuple
        ``(dp_model, changes)``: the compatible copy (trained weights of
        layers that were kept are preserved; replaced norm layers keep their
        affine weight and bias) and one human-readable line per change,
        e.g. ``"layer1.0.bn1: BatchNorm2d(64) -> GroupNorm(32 groups, 64 channels)"``.

    Raises
    ------
    DPCompatibilityError
        A layer Opacus cannot train remains (the message lists them).
    """
    work = copy.deepcopy(model)
    changes: list[str] = []
    _replace_children(work, "", changes)
    fixed = ModuleValidator.fix(work)
    changes.extend(_describe_bn_swaps(work, fixed))
    changes.extend(_disable_inplace(fixed))
    changes.extend(_swap_residual_blocks(fixed))
    errors = [str(e) for e in ModuleValidator.validate(fixed, strict=False)]
    # Opacus' validators match exact types: a BatchNorm subclass slips through.
    errors += [
        f"{name}: {type(m).__name__} is a BatchNorm subclass (batch statistics mix images)"
        for name, m in fixed.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if errors:
        listed = "; ".join(errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise DPCompatibilityError(
            f"model {type(model).__name__} is still not DP-SGD compatible after make_dp_compatible: "
            f"{listed}{more}. Replace these layers in the model definition (shared/models) or "
            f"extend shared/models/dp.py"
        )
    return fixed, changes


def dp_state_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape, the contract the server and sites must agree on."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}

