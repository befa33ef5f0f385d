"""Build a registered model and load local initial weights into it (torch).

Nothing is ever downloaded: weights, when wanted, come from a local file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shared.errors import UserError
from shared.models.registry import MODELS

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_module.", "model.")
#: Keys of checkpoint dicts that hold the state dict itself.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")
_MAX_LISTED = 8


class ModelWeightsError(UserError):
    """An ``init_weights`` file is missing, unreadable or does not fit the model."""


@dataclass(frozen=True)
class WeightsLoadReport:
    """What :func:`load_init_weights` did, tensor name by tensor name."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``.

    Parameters
    ----------
    model:
        Any module.
    trainable_only:
        Count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    init_weights: str | Path | None = None,
    *,
    image_size: int | None = None,
) -> nn.Module:
    """Build a registered model, optionally initialised from a local file.

    Parameters
    ----------
    name:
        Registered name (see :func:`model_names`).
    in_channels:
        Image channels (1 = grayscale, 3 = RGB).
    num_classes:
        Output logits, at least 2.
    init_weights:
        Optional local ``.pt``/``.pth``/``.safetensors`` file with a state
        dict (``None`` or ``""`` = random init). Nothing is ever downloaded.
    image_size:
        Side of the square inputs the model will see. Required by models
        built for one size (``sized`` registry entries, e.g. ``vit-tiny``);
        for the others it is only checked against the entry's input-size
        limits.

    Returns
    -------
    torch.nn.Module
        The model on the CPU, in training mode.

    Raises
    ------
    UnknownNameError
        ``name`` is not registered (the message lists the valid names).
    ValueError
        ``in_channels < 1`` or ``num_classes < 2``; ``image_size`` missing
        for a sized model or outside the model's input-size limits.
    ModelWeightsError
        ``init_weights`` is missing, unreadable or fits no tensor of the model.
    """
    entry = MODELS.get(name)
    factory = entry.resolve()
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(
            f"in_channels for model '{name}' must be an integer >= 1 "
            f"(1 = grayscale, 3 = RGB), got {in_channels!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes for model '{name}' must be an integer >= 2 "
            f"(binary tasks use 2 logits), got {num_classes!r}"
        )
    if image_size is not None:
        problem = entry.check_input_size(name, image_size)
        if problem is not None:
            raise ValueError(problem)
    if entry.sized:
        if image_size is None:
            raise ValueError(
                f"model '{name}' is built for one input size: pass image_size (the run's image-size, e.g. 64)"
            )
        model = factory(in_channels, num_classes, image_size=image_size)
    else:
        model = factory(in_channels, num_classes)
    if init_weights is not None and str(init_weights) != "":
        load_init_weights(model, init_weights, model_name=name)
    return model


# ---------------------------------------------------------------------------
# Initial weights
# ---------------------------------------------------------------------------


def load_init_weights(
    model: nn.Module, path: str | Path, model_name: str = "model"
) -> WeightsLoadReport:
    """Copy the tensors of a local weights file into ``model``.

    Accepts a torch state dict (``.pt``/``.pth``, read with
    ``weights_only=True``), a checkpoint dict holding it under
    ``"state_dict"``/``"model"``, or a ``.safetensors`` file. Wrapper prefixes
    (``module.``, ``_module.``) are stripped. A classifier head of another
    shape (different ``num_classes``) is skipped with a warning; a first conv
    with other input channels is adapted like timm does for pretrained
    weights (summed to 1 channel, or repeated and rescaled).

    Raises
    ------
    ModelWeightsError
        File missing or unreadable, no tensor matches, or tensors outside the
        stem/head have shapes of another architecture.
    """
    path = Path(path)
    state = _strip_prefixes(_read_state_dict(path, model_name), model.state_dict().keys())
    target = model.state_dict()
    stem_weight, head_prefixes = _stem_and_head(model)

    new_state: dict[str, torch.Tensor] = {}
    loaded: list[str] = []
    adapted: list[str] = []
    skipped: list[str] = []
    wrong: list[str] = []
    missing: list[str] = []
    for key, want in target.items():
        have = state.get(key)
        if have is None:
            missing.append(key)
        elif have.shape == want.shape:
            new_state[key] = have.to(dtype=want.dtype)
            loaded.append(key)
        elif key == stem_weight and _adaptable_stem(have, want):
            new_state[key] = _adapt_input_conv(have, want.shape[1]).to(dtype=want.dtype)
            adapted.append(key)
        elif any(key.startswith(p) for p in head_prefixes):
            skipped.append(key)
        else:
            wrong.append(f"{key}: file {tuple(have.shape)} vs model {tuple(want.shape)}")
    unexpected = [k for k in state if k not in target]

    if wrong:
        raise ModelWeightsError(
            f"init weights {path} do not fit model '{model_name}': {len(wrong)} tensor(s) "
            f"outside the first conv and classifier head have other shapes "
            f"({_listing(wrong)}). The file was probably saved from another architecture; "
            f"pass weights saved from '{model_name}' or set a matching 'model'."
        )
    if not loaded and not adapted:
        raise ModelWeightsError(
            f"init weights {path} contain no tensor of model '{model_name}': expected a state "
            f"dict with keys like {_listing(list(target))}, found {_listing(list(state))}. "
            f"Save the weights with torch.save(model.state_dict(), path) from a "
            f"'{model_name}' built by medfed (or timm), or set init-weights='' for random init."
        )
    if adapted:
        logger.warning(
            "init weights: adapted first conv %s from %d to %d input channels",
            adapted, state[adapted[0]].shape[1], target[adapted[0]].shape[1],
        )
    if skipped:
        logger.warning(
            "init weights: skipped classifier head tensors of another shape "
            "(different num_classes), they keep their random init: %s", skipped,
        )
    if missing:
        logger.warning(
            "init weights: %d model tensor(s) not in the file keep their random init: %s",
            len(missing), _listing(missing),
        )
    if unexpected:
        logger.warning(
            "init weights: ignored %d tensor(s) the model does not have: %s",
            len(unexpected), _listing(unexpected),
        )
    model.load_state_dict(new_state, strict=False)
    logger.info(
        "init weights: loaded %d/%d tensors into '%s'", len(loaded) + len(adapted),
        len(target), model_name,
    )
    return WeightsLoadReport(loaded, adapted, skipped, missing, unexpected)


def _listing(items: list[str]) -> str:
    shown = ", ".join(f"'{s}'" for s in items[:_MAX_LISTED])
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return (shown + more) if items else "nothing"


def _read_state_dict(path: Path, model_name: str) -> dict[str, torch.Tensor]:
    hint = (
        f"Expected a local .pt/.pth file with a state dict for '{model_name}' "
        f"(torch.save(model.state_dict(), path)), a checkpoint dict with a 'state_dict' "
        f"or 'model' entry, or a .safetensors file; set init-weights='' for random init."
    )
    if not path.is_file():
        raise ModelWeightsError(f"init weights file not found: {path}. {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise ModelWeightsError(
            f"cannot read init weights {path} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). {hint}"
        ) from exc

    for _ in range(3):  # unwrap {"state_dict": {...}} / {"model": {...}} nesting
        if isinstance(obj, Mapping):
            nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
            if nested is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = nested
                continue
        break
    if not isinstance(obj, Mapping):
        raise ModelWeightsError(
            f"init weights {path} hold a {type(obj).__name__}, not a state dict. {hint}"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelWeightsError(
            f"init weights {path} contain no tensors (top-level keys: "
            f"{_listing([str(k) for k in obj])}). {hint}"
        )
    return tensors


def _strip_prefixes(
    state: dict[str, torch.Tensor], model_keys: object
) -> dict[str, torch.Tensor]:
    keys = list(model_keys)  # type: ignore[call-overload]
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(
                k.startswith(prefix) for k in keys
            ):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _stem_and_head(model: nn.Module) -> tuple[str | None, tuple[str, ...]]:
    """Key of the first conv's weight and key prefixes of the classifier head."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first_conv = cfg.get("first_conv")
    classifier = cfg.get("classifier")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0] if first_conv else None
    stem = first_conv or (convs[0] if convs else None)
    heads: list[str] = []
    if isinstance(classifier, str):
        heads.append(classifier)
    elif isinstance(classifier, (list, tuple)):
        heads.extend(classifier)
    if linears:
        heads.append(linears[-1])
    return (f"{stem}.weight" if stem else None), tuple(f"{h}." for h in heads)


def _adaptable_stem(have: torch.Tensor, want: torch.Tensor) -> bool:
    return (
        have.dim() == 4
        and want.dim() == 4
        and have.shape[0] == want.shape[0]
        and have.shape[2:] == want.shape[2:]
    )


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a conv weight to ``in_channels`` inputs (timm's ``adapt_input_conv``)."""
    weight = weight.float()
    src = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_channels / src)
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (src / in_channels)
