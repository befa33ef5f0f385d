"""Model registry: classifiers built by name, with optional local initial weights.

>>> model = build_model("small-cnn", in_channels=1, num_classes=2)
>>> model_names()  # doctest: +SKIP
['densenet121', 'efficientnet-b0', 'resnet18', 'resnet50', 'small-cnn', 'vgg16']
"""

from __future__ import annotations

# Importing the modules registers their models.
from shared.models import classifiers as _classifiers  # noqa: F401
from shared.models import small_cnn as _small_cnn  # noqa: F401
from shared.models.segmentation import SEGMENTATION_MODELS, is_segmentation_model
from shared.models.registry import (
    MODELS,
    ModelFactory,
    ModelWeightsError,
    WeightsLoadReport,
    build_model,
    count_parameters,
    load_init_weights,
    model_names,
)
from shared.models.small_cnn import SmallCNN

__all__ = [
    "MODELS",
    "ModelFactory",
    "ModelWeightsError",
    "SEGMENTATION_MODELS",
    "SmallCNN",
    "WeightsLoadReport",
    "build_model",
    "count_parameters",
    "is_segmentation_model",
    "load_init_weights",
    "model_names",
]
