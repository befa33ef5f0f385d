"""Model registry: networks built by name, each entry carrying its output kind.

>>> model = build_model("small-cnn", in_channels=1, num_classes=2)
>>> model_names("segmentation")  # doctest: +SKIP
['attention-unet', 'unet']
"""

from __future__ import annotations

# Importing the modules registers their models.
from shared.models import classifiers as _classifiers  # noqa: F401
from shared.models import segmentation as _segmentation  # noqa: F401
from shared.models import small_cnn as _small_cnn  # noqa: F401
from shared.models.registry import (
    MODELS,
    ModelEntry,
    ModelFactory,
    ModelWeightsError,
    WeightsLoadReport,
    build_model,
    count_parameters,
    load_init_weights,
    model_kind,
    model_names,
    register_model,
)
from shared.models.run import build_network
from shared.models.small_cnn import SmallCNN

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
