"""Contract tests for the model registry.

Every registered model is tested automatically (parametrised over
``MODELS.names()``): shapes, finite outputs, one SGD step. Weight loading is
tested on ``small-cnn`` (fast).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from shared.kinds import SEGMENTATION
from shared.models import (
    MODELS,
    ModelWeightsError,
    build_model,
    count_parameters,
    model_kind,
    model_names,
)
from shared.registry import UnknownNameError

torch.set_num_threads(2)

REQUIRED = {"small-cnn", "resnet18", "resnet50", "densenet121", "efficientnet-b0", "vgg16", "vit-tiny",
            "unet", "attention-unet", "fcn"}


def _seeded(name: str, in_channels: int, num_classes: int, seed: int, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, in_channels, num_classes, **kw)  # type: ignore[arg-type]


def _outputs(model: nn.Module, in_channels: int = 1, size: int = 64) -> torch.Tensor:
    torch.manual_seed(123)
    x = torch.randn(2, in_channels, size, size)
    model.eval()
    with torch.no_grad():
        return model(x)


def test_required_models_registered() -> None:
    assert REQUIRED <= set(model_names())
    assert model_names() == MODELS.names()


@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 2), (3, 3)])
@pytest.mark.parametrize("name", MODELS.names())
def test_forward_and_one_train_step(name: str, in_channels: int, num_classes: int) -> None:
    model = _seeded(name, in_channels, num_classes, seed=0, image_size=64)
    assert count_parameters(model) > 0
    x = torch.randn(2, in_channels, 64, 64)
    seg = model_kind(name) == SEGMENTATION  # per-pixel logits (N, C, H, W) and targets (N, H, W)
    y = torch.randint(0, num_classes, (2, 64, 64)) if seg else torch.tensor([0, num_classes - 1])

    out = _outputs(model, in_channels)
    assert out.shape == ((2, num_classes, 64, 64) if seg else (2, num_classes))
    assert torch.isfinite(out).all()

    model.train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"
    opt.step()
    changed = {k for k, p in model.named_parameters() if not torch.equal(before[k], p)}
    # Every top-level block learns something (not all tensors: timm ResNets zero-init
    # the last BN of each residual branch, so its convs only move from step 2 on).
    for child, module in model.named_children():
        names = {f"{child}.{k}" for k, _ in module.named_parameters()}
        assert not names or names & changed, f"no parameter of '{child}' changed"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_registry_metadata_of_the_vit_and_the_fcn() -> None:
    from shared.kinds import CLASSIFICATION

    vit, fcn = MODELS.get("vit-tiny"), MODELS.get("fcn")
    assert (vit.kind, vit.min_input_size, vit.size_multiple, vit.sized) == (CLASSIFICATION, 32, 16, True)
    assert (fcn.kind, fcn.min_input_size, fcn.size_multiple, fcn.sized) == (SEGMENTATION, 32, 1, False)
    assert not any(MODELS.get(n).sized for n in MODELS.names() if n != "vit-tiny")


def test_vit_is_built_for_the_runs_image_size() -> None:
    with pytest.raises(ValueError, match="built for one input size: pass image_size"):
        build_model("vit-tiny", 1, 2)
    with pytest.raises(ValueError, match="multiple of 16, got 72"):
        build_model("vit-tiny", 1, 2, image_size=72)
    with pytest.raises(ValueError, match="at least 32 px"):
        build_model("vit-tiny", 1, 2, image_size=16)
    # 8 px patches below 128 px, 16 px from 128 px: 64-196 tokens over 64-224 px (plus the class token).
    for size, patch, tokens in ((32, 8, 16), (64, 8, 64), (112, 8, 196), (128, 16, 64), (224, 16, 196)):
        model = build_model("vit-tiny", 3, 2, image_size=size)
        assert model.patch_embed.patch_size == (patch, patch), size
        assert model.tokens.pos_embed.shape == (1, tokens + 1, 192), size
    model = build_model("vit-tiny", 1, 2, image_size=64)
    assert 5_000_000 < count_parameters(model) < 6_000_000  # ViT-Tiny
    with pytest.raises(ValueError, match="built for 64 x 64 px inputs"):
        model(torch.zeros(1, 1, 32, 32))


def test_run_config_checks_the_new_models_sizes_and_kinds() -> None:
    from shared.config import ConfigError, parse_run_config
    from shared.tasks import get_task

    with pytest.raises(ConfigError, match="'vit-tiny' needs an image-size that is a multiple of 16, got 72"):
        parse_run_config({"model": "vit-tiny", "image-size": 72})
    with pytest.raises(ConfigError, match="'fcn' is a segmentation model"):
        parse_run_config({"model": "fcn"})
    cfg = parse_run_config({"model": "vit-tiny", "image-size": 96})
    model, _ = get_task("pneumonia-cxr").build_model(cfg)
    assert model.image_size == 96 and model.tokens.pos_embed.shape[1] == 12 * 12 + 1
    seg = parse_run_config({"task": "lung-seg", "model": "fcn", "image-size": 48})
    net, _ = get_task("lung-seg").build_model(seg)
    assert net(torch.zeros(1, 1, 48, 48)).shape == (1, 2, 48, 48)


def test_fcn_takes_any_side_from_32_px() -> None:
    model = _seeded("fcn", 1, 3, seed=0).eval()
    with torch.no_grad():
        for size in (32, 50, 96):
            out = model(torch.randn(1, 1, size, size))
            assert out.shape == (1, 3, size, size) and torch.isfinite(out).all()
        assert model(torch.randn(1, 1, 40, 72)).shape == (1, 3, 40, 72)


def test_small_cnn_small_and_large_inputs() -> None:
    model = _seeded("small-cnn", 1, 2, seed=0)
    for size in (28, 97, 256):
        out = _outputs(model, 1, size)
        assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_small_cnn_is_opacus_friendly() -> None:
    from opacus.validators import ModuleValidator

    from shared.models.small_cnn import SmallCNN

    model = build_model("small-cnn", 1, 2)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    # BatchNorm by default (learns faster); Opacus' fix() makes it DP-valid ...
    assert ModuleValidator.validate(model, strict=False)
    assert ModuleValidator.validate(ModuleValidator.fix(model), strict=False) == []
    # ... and the GroupNorm build is valid as it stands
    gn = SmallCNN(1, 2, norm="group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    assert ModuleValidator.validate(gn, strict=False) == []
    with pytest.raises(ValueError, match="'batch' or 'group'"):
        SmallCNN(1, 2, norm="layer")


def test_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(UnknownNameError) as err:
        build_model("resnet-18", 1, 2)
    msg = str(err.value)
    assert "Did you mean 'resnet18'?" in msg
    for name in MODELS.names():
        assert name in msg


@pytest.mark.parametrize(("in_channels", "num_classes"), [(0, 2), (1, 1), (1, 2.0)])
def test_bad_shapes_raise_value_error(in_channels: int, num_classes: int) -> None:
    with pytest.raises(ValueError, match="must be an integer"):
        build_model("small-cnn", in_channels, num_classes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# init_weights
# ---------------------------------------------------------------------------


def test_init_weights_round_trip(tmp_path: Path) -> None:
    src = _seeded("small-cnn", 1, 2, seed=1)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    fresh = _seeded("small-cnn", 1, 2, seed=2)
    assert not torch.equal(_outputs(src), _outputs(fresh))
    loaded = _seeded("small-cnn", 1, 2, seed=2, init_weights=path)
    assert torch.equal(_outputs(src), _outputs(loaded))
    assert torch.equal(_outputs(src), _outputs(_seeded("small-cnn", 1, 2, 3, init_weights=str(path))))


@pytest.mark.parametrize("wrap", ["module", "_module", "checkpoint", "safetensors"])
def test_init_weights_wrapped_formats(tmp_path: Path, wrap: str) -> None:
    src = _seeded("small-cnn", 1, 2, seed=1)
    sd = src.state_dict()
    path = tmp_path / "w.pth"
    if wrap in ("module", "_module"):
        torch.save({f"{wrap}.{k}": v for k, v in sd.items()}, path)
    elif wrap == "checkpoint":
        torch.save({"epoch": 3, "model": sd, "optimizer": {"lr": 0.1}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = _seeded("small-cnn", 1, 2, seed=2, init_weights=path)
    assert torch.equal(_outputs(src), _outputs(loaded))


def test_init_weights_head_mismatch_loads_all_but_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _seeded("small-cnn", 1, 3, seed=1)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="shared.models"):
        model = _seeded("small-cnn", 1, 2, seed=2, init_weights=path)
    assert "head.weight" in caplog.text and "head.bias" in caplog.text
    random_head = _seeded("small-cnn", 1, 2, seed=2).state_dict()
    for key, value in model.state_dict().items():
        expected = random_head[key] if key.startswith("head.") else src.state_dict()[key]
        assert torch.equal(value, expected), key


def test_init_weights_rgb_stem_into_grayscale_model(tmp_path: Path) -> None:
    src = _seeded("small-cnn", 3, 2, seed=1)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    model = _seeded("small-cnn", 1, 2, seed=2, init_weights=path)
    stem = "features.0.0.weight"
    assert torch.allclose(model.state_dict()[stem], src.state_dict()[stem].sum(1, keepdim=True))
    # A grayscale image repeated to RGB gives the same logits in both models.
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    src.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), src(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_missing_file_raises_helpful_error(tmp_path: Path) -> None:
    with pytest.raises(ModelWeightsError, match="not found") as err:
        build_model("small-cnn", 1, 2, init_weights=tmp_path / "nope.pt")
    assert "small-cnn" in str(err.value) and "init-weights=''" in str(err.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_garbage_file_raises_helpful_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a checkpoint\x00\x01" * 10)
    with pytest.raises(ModelWeightsError, match="cannot read init weights") as err:
        build_model("resnet18", 1, 2, init_weights=path)
    assert "state dict for 'resnet18'" in str(err.value)


def test_file_without_matching_tensors_raises(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.conv.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(2)}, path)
    with pytest.raises(ModelWeightsError, match="no tensor of model 'small-cnn'") as err:
        build_model("small-cnn", 1, 2, init_weights=path)
    msg = str(err.value)
    assert "features.0.0.weight" in msg and "encoder.conv.weight" in msg  # expected vs found


def test_file_without_tensors_raises(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelWeightsError, match="no tensors"):
        build_model("small-cnn", 1, 2, init_weights=path)


def test_other_architecture_raises(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    from shared.models import SmallCNN

    torch.save(SmallCNN(1, 2, widths=(32, 64, 128, 256)).state_dict(), path)
    with pytest.raises(ModelWeightsError, match="another architecture"):
        build_model("small-cnn", 1, 2, init_weights=path)


def test_empty_init_weights_means_random_init() -> None:
    model = build_model("small-cnn", 1, 2, init_weights="")
    assert count_parameters(model) == count_parameters(model, trainable_only=True) > 0
