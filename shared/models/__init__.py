"""Model registry: networks built by name, each entry carrying its output kind and input sizes.

>>> model = build_model("small-cnn", in_channels=1, num_classes=2)
>>> model_names("segmentation")
['attention-unet', 'unet']

Importing this package (and reading the registry) imports no torch; the
torch-side names (``build_model``, ``build_network``, ``load_init_weights``,
``SmallCNN``, ...) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from shared.models import catalog as _catalog  # noqa: F401  (registers the built-in networks: metadata only)
from shared.models.registry import MODELS, ModelEntry, ModelFactory, model_kind, model_names, register_model

__all__ = [
    "MODELS",
    "ModelEntry",
    "ModelFactory",
    "ModelWeightsError",
    "SmallCNN",
    "WeightsLoadReport",
    "build_model",
    "build_network",
    "count_parameters",
    "load_init_weights",
    "model_kind",
    "model_names",
    "register_model",
]

_LAZY = {
    "ModelWeightsError": "shared.models.weights",
    "WeightsLoadReport": "shared.models.weights",
    "build_model": "shared.models.weights",
    "count_parameters": "shared.models.weights",
    "load_init_weights": "shared.models.weights",
    "build_network": "shared.models.run",
    "SmallCNN": "shared.models.small_cnn",
}


def __getattr__(name: str) -> Any:
    """Import the torch-side names on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shared.models' has no attribute {name!r}")
