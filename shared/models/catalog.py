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

# ``features``: where the out-of-distribution warning reads the penultimate features
# (shared.models.features). Classifiers: the input of the final linear layer (timm's
# ``get_classifier()``); U-Nets: the bottleneck (the deepest level, 256 channels), average-pooled;
# FCN: its ResNet-18 encoder's last stage (512 channels), average-pooled.
_BOTTLENECK = "output:model.1.submodule.1.submodule.1.submodule.1.submodule"

register_model("small-cnn", "shared.models.small_cnn:small_cnn", min_input_size=16, features="input:head")
register_model("resnet18", "shared.models.classifiers:resnet18", min_input_size=28, features="input:fc")
register_model("resnet50", "shared.models.classifiers:resnet50", min_input_size=28, features="input:fc")
register_model("densenet121", "shared.models.classifiers:densenet121", min_input_size=32, features="input:classifier")
register_model("efficientnet-b0", "shared.models.classifiers:efficientnet_b0", min_input_size=28,
               features="input:classifier")
register_model("vgg16", "shared.models.classifiers:vgg16", min_input_size=32, features="input:head.fc")
register_model("vit-tiny", "shared.models.vit:vit_tiny", min_input_size=32, size_multiple=16, sized=True,
               features="input:head")
register_model("unet", "shared.models.segmentation:unet", kind=SEGMENTATION, min_input_size=32, size_multiple=16,
               features=_BOTTLENECK)
register_model("attention-unet", "shared.models.segmentation:attention_unet", kind=SEGMENTATION, min_input_size=32,
               size_multiple=16, features=_BOTTLENECK)
register_model("fcn", "shared.models.segmentation:fcn", kind=SEGMENTATION, min_input_size=32,
               features="output:layer4")
