"""DP contract of every registered model: make_dp_compatible + real Opacus DP-SGD steps.

Each registered model (classification and segmentation) is made
DP-compatible and takes two DP-SGD steps with per-sample gradients
(``GradSampleModule`` + ``DPOptimizer``): every trainable parameter must get
a per-sample gradient, the weights must change and the state-dict keys must
be the plain keys the server computes from a fresh build. Images are 32 px
(the smallest the U-Nets accept) and batches tiny so that the whole file
stays within about a minute on 2 cores.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from timm.layers.norm_act import GroupNormAct
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from shared.kinds import SEGMENTATION
from shared.models import build_model, model_kind, model_names
from shared.models.dp import (
    _RESIDUAL_SWAPS,
    DPCompatibilityError,
    _disable_inplace,
    _swap_residual_blocks,
    dp_state_keys,
    make_dp_compatible,
)
from shared.objectives.segmentation import per_sample_seg_loss

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

SIZE = 32
#: VGG-16's 7x7 conv head holds ~100 M weights: one per-sample copy each
#: costs 400 MB, so it runs with 2 images instead of 4.
BATCH = {"vgg16": 2}


def _per_sample_loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if model_kind(name) == SEGMENTATION:
        return per_sample_seg_loss(out.float(), y)
    return F.cross_entropy(out.float(), y, reduction="none")


@pytest.mark.parametrize("name", model_names())
def test_dp_contract(name: str) -> None:
    """make_dp_compatible + two DP-SGD steps with per-sample gradients, for every model."""
    torch.manual_seed(0)
    original = build_model(name, 1, 2, image_size=SIZE)
    original_keys = dp_state_keys(original)
    model, changes = make_dp_compatible(original)
    assert dp_state_keys(original) == original_keys, "make_dp_compatible modified its input"
    assert all(isinstance(c, str) and c for c in changes)

    # Deterministic: a fresh build gives the same keys and shapes; applying it again changes nothing.
    assert dp_state_keys(make_dp_compatible(build_model(name, 1, 2, image_size=SIZE))[0]) == dp_state_keys(model)
    again, changes_again = make_dp_compatible(model)
    assert dp_state_keys(again) == dp_state_keys(model)
    assert changes_again == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    b = BATCH.get(name, 4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((b, 1, SIZE, SIZE), generator=gen)
    if model_kind(name) == SEGMENTATION:
        y = (torch.rand((b, SIZE, SIZE), generator=gen) < 0.3).long()
    else:
        y = torch.tensor([0, 1] * (b // 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gsm = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        noise_multiplier=0.5, max_grad_norm=1.0, expected_batch_size=b,
    )
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        _per_sample_loss(name, gsm(x), y).sum().backward()
        for pname, p in model.named_parameters():
            if p.requires_grad:
                gs = getattr(p, "grad_sample", None)
                assert gs is not None, f"{name}: no per-sample gradient for {pname}"
                assert tuple(gs.shape) == (b, *p.shape), f"{name}: {pname} grad_sample {tuple(gs.shape)}"
        optimizer.step()
    plain = gsm.to_standard_module()
    assert plain is model
    assert not any(k.startswith("_module.") for k in model.state_dict())
    assert dp_state_keys(model) == dp_state_keys(make_dp_compatible(build_model(name, 1, 2, image_size=SIZE))[0])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(trainable) <= set(changed), f"{name}: parameters not updated: {set(trainable) - set(changed)}"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("which", ["timm-resnet18", "timm-resnet50", "torchvision-resnet18"])
def test_out_of_place_residual_blocks_compute_the_same_function(which: str) -> None:
    """The swapped block classes must not change what the network computes (guards timm/torchvision drift)."""
    torch.manual_seed(0)
    if which == "torchvision-resnet18":
        net = tv_resnet18(num_classes=3)
    else:
        net = timm.create_model(which.removeprefix("timm-"), pretrained=False, num_classes=3)
    net.eval()
    patched = copy.deepcopy(net)
    changes = _swap_residual_blocks(patched) + _disable_inplace(patched)
    assert any("residual add made out-of-place" in c for c in changes)
    assert not any(type(m) in _RESIDUAL_SWAPS for m in patched.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, nn.Identity])
def test_group_norm_act_per_sample_gradients_are_exact(act: type[nn.Module]) -> None:
    """The registered GroupNormAct sampler equals gradients computed one image at a time."""
    torch.manual_seed(0)
    norm = GroupNormAct(8, num_groups=4, apply_act=False, inplace=False)
    norm.act = act()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), norm, nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 1, 0, 1])
    expected = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append((norm.weight.grad.clone(), norm.bias.grad.clone()))
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    for i, (gw, gb) in enumerate(expected):
        torch.testing.assert_close(norm.weight.grad_sample[i], gw, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(norm.bias.grad_sample[i], gb, rtol=1e-4, atol=1e-6)


def test_vit_token_embedding_per_sample_gradients_are_exact() -> None:
    """The registered TokenEmbed sampler (class token, position embedding) equals one-image-at-a-time gradients."""
    from shared.models.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(1, 2, 16, patch_size=8, dim=16, depth=2, heads=2)
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 1])
    params = [model.tokens.cls_token, model.tokens.pos_embed]
    expected = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append([p.grad.clone() for p in params])
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    for i, grads in enumerate(expected):
        for p, g in zip(params, grads, strict=True):
            assert p.grad_sample.shape == (3, *p.shape)
            torch.testing.assert_close(p.grad_sample[i], g, rtol=1e-4, atol=1e-7)
    assert float(model.tokens.pos_embed.grad_sample.abs().sum()) > 0


def test_vit_needs_no_changes_for_dp() -> None:
    """Nothing to swap: same modules and keys, and Opacus' validator finds nothing."""
    from opacus.validators import ModuleValidator

    model = build_model("vit-tiny", 1, 2, image_size=SIZE)
    dp_model, changes = make_dp_compatible(model)
    assert changes == [] and dp_state_keys(dp_model) == dp_state_keys(model)
    assert ModuleValidator.validate(dp_model, strict=True) == []


class _OwnBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass: Opacus' fixer and validator (exact-type lookups) both miss it."""


def test_remaining_batchnorm_subclass_is_reported() -> None:
    """A layer no rule fixes gives a DPCompatibilityError naming the layer and its type."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _OwnBatchNorm(4))
    with pytest.raises(DPCompatibilityError, match=r"1: _OwnBatchNorm is a BatchNorm subclass"):
        make_dp_compatible(model)
