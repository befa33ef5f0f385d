"""The model registry: each network's factory with its metadata beside it (the timm pattern).

An entry says what the network outputs (classification or segmentation
logits) and what input sizes it accepts. Its factory ``(in_channels,
num_classes) -> nn.Module`` is given as a callable or as an import path
``"module:function"`` resolved on first build, so reading the registry (the
run-config check, ``--help``, listing options) imports no torch. The built-in
entries are in :mod:`shared.models.catalog`; a new network is one line there,
or a decorator anywhere::

    @register_model("my-net", kind=CLASSIFICATION, min_input_size=16)
    def my_net(in_channels: int, num_classes: int) -> nn.Module: ...

``tests/test_models.py`` parametrises over ``MODELS.names()``, so a new entry
is contract-tested (shapes, finite outputs, one train step) for free, and
``tests/test_dp_models.py`` checks that DP-SGD can train it.
Building and initial-weights loading: :mod:`shared.models.weights`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.kinds import CLASSIFICATION, OUTPUT_KINDS
from shared.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

ModelFactory = Callable[..., "nn.Module"]
"""``(in_channels, num_classes) -> nn.Module`` returning logits ``(N, num_classes)``
(classification) or ``(N, num_classes, H, W)`` (segmentation); the factory of a
``sized`` entry also takes ``image_size=`` (keyword)."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered network: its factory and what it is.

    Attributes
    ----------
    factory:
        ``(in_channels, num_classes) -> nn.Module``, or its import path
        ``"package.module:function"`` (imported on first use).
    kind:
        :data:`shared.kinds.CLASSIFICATION` or :data:`shared.kinds.SEGMENTATION`
        (what the network outputs).
    min_input_size:
        Smallest square input side (pixels) it accepts.
    size_multiple:
        Input sides must be multiples of this (1 = any).
    features:
        Where its penultimate features are read (the out-of-distribution
        warning, :mod:`shared.models.features`): ``"input:<module>"`` = the
        input of that module (a classifier's final linear layer),
        ``"output:<module>"`` = that module's output, global-average-pooled
        (a U-Net's bottleneck); ``""`` = not declared (no OOD statistics).
    sized:
        The network is built for one input side (a vision transformer's
        position embeddings): its factory takes ``image_size=`` and the
        model accepts that size only.
    """

    factory: ModelFactory | str
    kind: str = CLASSIFICATION
    min_input_size: int = 1
    size_multiple: int = 1
    features: str = ""
    sized: bool = False

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"model kind must be one of {OUTPUT_KINDS}, got {self.kind!r}")
        where, _, module = self.features.partition(":")
        if self.features and (where not in ("input", "output") or not module):
            raise ValueError(f"model features must be 'input:<module>' or 'output:<module>', got {self.features!r}")

    def resolve(self) -> ModelFactory:
        """The factory callable (imports its module when given as a path)."""
        if callable(self.factory):
            return self.factory
        module, _, attr = self.factory.partition(":")
        factory: Any = getattr(importlib.import_module(module), attr)
        return factory

    def check_input_size(self, name: str, size: int) -> str | None:
        """Why ``size`` px does not suit this model (``None`` when it does)."""
        if size < self.min_input_size:
            return f"model '{name}' needs inputs of at least {self.min_input_size} px, got image-size {size}"
        if size % self.size_multiple:
            return f"model '{name}' needs an image-size that is a multiple of {self.size_multiple}, got {size}"
        return None


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str, factory: str | None = None, *, kind: str = CLASSIFICATION, min_input_size: int = 1,
    size_multiple: int = 1, features: str = "", sized: bool = False,
) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model with its metadata (see :class:`ModelEntry`).

    With ``factory`` (an import path ``"module:function"``) the entry is
    registered at once; without it, this is a decorator for the factory.
    """

    def deco(fn: ModelFactory) -> ModelFactory:
        MODELS.add(name, ModelEntry(fn, kind, min_input_size, size_multiple, features, sized))
        return fn

    if factory is not None:
        MODELS.add(name, ModelEntry(factory, kind, min_input_size, size_multiple, features, sized))
        return lambda fn: fn
    return deco


def model_kind(name: str) -> str:
    """What the registered model ``name`` outputs: ``"classification"`` or ``"segmentation"``."""
    return MODELS.get(name).kind


def model_names(kind: str | None = None) -> list[str]:
    """Registered model names, sorted; only those of one output ``kind`` when given."""
    return [n for n in MODELS.names() if kind is None or MODELS.get(n).kind == kind]

#: Wrapper prefixes stripped from checkpoint keys: DataParallel/DDP, Opacus'
#: GradSampleModule, Lightning-style ``model.``.
