"""The built-in networks: one line each, metadata beside the factory's import path.

Importing this module imports no torch: each factory's module is imported
when a model of it is first built (:meth:`shared.models.registry.ModelEntry.resolve`).
Input sizes are what each network runs at: small-cnn's four 2x2 poolings need
16 px; the timm ResNets and EfficientNet run from 28 px, DenseNet's and VGG's
five poolings need 32; the U-Nets' four stride-2 levels need multiples of 16
from 32 px. ``vit-tiny`` is built for the run's image size (``sized``: its
position embeddings), with 8 px patches below 128 px and 16 px from 128 px,
so sides must be multiples of 16 from 32 px; ``fcn`` (FCN-8s on ResNet-18)
takes any side from 32 px (stride 32).
"""

from __future__ import annotations

from shared.kinds import SEGMENTATION
from shared.models.registry import register_model

register_model("small-cnn", "shared.models.small_cnn:small_cnn", min_input_size=16)
register_model("resnet18", "shared.models.classifiers:resnet18", min_input_size=28)
register_model("resnet50", "shared.models.classifiers:resnet50", min_input_size=28)
register_model("densenet121", "shared.models.classifiers:densenet121", min_input_size=32)
register_model("efficientnet-b0", "shared.models.classifiers:efficientnet_b0", min_input_size=28)
register_model("vgg16", "shared.models.classifiers:vgg16", min_input_size=32)
register_model("vit-tiny", "shared.models.vit:vit_tiny", min_input_size=32, size_multiple=16, sized=True)
register_model("unet", "shared.models.segmentation:unet", kind=SEGMENTATION, min_input_size=32, size_multiple=16)
register_model("attention-unet", "shared.models.segmentation:attention_unet", kind=SEGMENTATION, min_input_size=32,
               size_multiple=16)
register_model("fcn", "shared.models.segmentation:fcn", kind=SEGMENTATION, min_input_size=32)
