"""Clinical tasks: what a federation trains for.

A :class:`TaskSpec` says what the input looks like (channels), whether the
task is classification or segmentation, the classes (or mask classes), which
class is "positive" for sensitivity/specificity, the default model and image
size, how the decision threshold is chosen on validation data, and how to make
synthetic phantoms for demos and tests. Selecting a task in the run config
(``task='nec-axr'``) sets ``model='auto'`` and ``image-size=0`` to the task's
defaults; preprocessing and augmentation defaults live in
:mod:`shared.data.preprocess` (``TASK_DEFAULTS``, ``AUGMENT_DEFAULTS``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

import numpy as np

from shared.data import phantoms, phantoms_pneumonia, phantoms_tasks
from shared.registry import Registry

# (n, size, seed, indices) -> (images uint8, labels int64) for classification,
#                             (images uint8, masks bool) for segmentation
PhantomRenderer = Callable[[int, int, int, Sequence[int] | np.ndarray], tuple[np.ndarray, np.ndarray]]
PhantomLabeler = Callable[[int, int], np.ndarray]
# (n, size, seed, indices, disparity) -> as PhantomRenderer, with a planted subgroup disparity (run config
# phantom-disparity; see shared.data.phantoms.make_chest_phantoms)
DisparityRenderer = Callable[[int, int, int, Sequence[int] | np.ndarray, float], tuple[np.ndarray, np.ndarray]]

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"

ARGMAX = "argmax"
"""Threshold method of multi-class tasks: the decision is the most probable class, no threshold."""
THRESHOLD_METHODS = ("youden", "target-sensitivity", ARGMAX)


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one clinical task.

    Attributes
    ----------
    name:
        Registry name, used as the run config's ``task``.
    kind:
        ``"classification"`` or ``"segmentation"``.
    in_channels:
        Image channels the model sees (1 = grayscale radiograph, 3 = photo).
    class_names:
        Class names in label order (segmentation: mask classes, background
        first). Folder names/manifest labels of a real dataset are matched
        to these case-insensitively.
    positive_class:
        Index of the class counted as "positive" (sensitivity, AUROC) of a
        binary task. ``None`` for a task with more than two classes: there
        is no single positive class; decisions are the argmax and metrics
        are one-vs-rest per class with their macro averages.
    default_model, default_image_size:
        Used when the run config says ``model='auto'`` / ``image-size=0``.
    threshold_method, target_sensitivity:
        How the operating threshold is chosen on pooled validation counts:
        ``"youden"`` (max sensitivity + specificity - 1) or
        ``"target-sensitivity"`` (highest threshold reaching the target:
        for tasks where a missed case is worse than a false alarm).
        Multi-class tasks use ``"argmax"`` (no threshold).
    label_column:
        Manifest column that carries this task's label (e.g. ``"subtype"``),
        read instead of ``label`` where present and non-empty; ``None``: the
        ``label`` column / class folder names. See
        :func:`shared.data.labels.task_labels`.
    label_aliases:
        Other spellings of class names (lower case -> class name), e.g.
        ``{"bacteria": "bacterial"}``.
    phantom_labels:
        ``(n, seed) -> labels`` of the task's synthetic phantom set, cheap.
    render_phantoms:
        ``(n, size, seed, indices) -> (images, labels or masks)``.
    foreground_batch_dice:
        Segmentation only: train with the Dice term on the foreground
        classes, computed over the whole batch (see
        :func:`shared.seg_training.seg_loss`). For small structures absent
        from many images (a per-image Dice rewards empty predictions there).
        DP-SGD keeps the per-image loss (each loss term may depend on one image only).
    render_disparity_phantoms:
        ``(n, size, seed, indices, disparity) -> (images, labels or masks)``:
        the phantoms with findings fainter in one subgroup (female), for
        testing subgroup reports (run config ``phantom-disparity``); ``None``
        when the task's phantoms have no planted disparity.
    """

    name: str
    description: str
    kind: str
    in_channels: int
    class_names: tuple[str, ...]
    positive_class: int | None
    default_model: str
    default_image_size: int
    phantom_labels: PhantomLabeler
    render_phantoms: PhantomRenderer
    threshold_method: str = "youden"
    target_sensitivity: float = 0.9
    label_column: str | None = None
    label_aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    foreground_batch_dice: bool = False
    render_disparity_phantoms: DisparityRenderer | None = None

    def __post_init__(self) -> None:
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ValueError(f"task '{self.name}': threshold_method must be one of {THRESHOLD_METHODS}, "
                             f"got {self.threshold_method!r}")
        if self.kind == CLASSIFICATION and len(self.class_names) > 2:
            if self.positive_class is not None or self.threshold_method != ARGMAX:
                raise ValueError(f"task '{self.name}' has {len(self.class_names)} classes: it needs "
                                 f"positive_class=None and threshold_method='{ARGMAX}' (no single positive class)")
        elif self.positive_class is None or not 0 <= self.positive_class < len(self.class_names):
            raise ValueError(f"task '{self.name}': positive_class must index one of {list(self.class_names)}, "
                             f"got {self.positive_class!r}")
        bad = {k: v for k, v in self.label_aliases.items() if k != k.lower() or v not in self.class_names}
        if bad:
            raise ValueError(f"task '{self.name}': label_aliases must map lower-case spellings to class names "
                             f"{list(self.class_names)}, got {bad}")
        object.__setattr__(self, "label_aliases", MappingProxyType(dict(self.label_aliases)))

    @property
    def num_classes(self) -> int:
        """Number of output classes (or mask classes)."""
        return len(self.class_names)

    @property
    def is_segmentation(self) -> bool:
        """True for mask-predicting tasks."""
        return self.kind == SEGMENTATION

    @property
    def is_multiclass(self) -> bool:
        """True for classification with more than two classes (argmax decisions, macro metrics)."""
        return self.kind == CLASSIFICATION and self.num_classes > 2


TASKS: Registry[TaskSpec] = Registry("task")


def _first_two(fn: Callable[..., tuple[np.ndarray, ...]]) -> PhantomRenderer:
    """Adapt a phantom maker returning (images, labels, ...) to a renderer."""

    def render(n: int, size: int, seed: int, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = fn(n, size=size, seed=seed, indices=indices)
        return out[0], out[1]

    return render


def _with_disparity(fn: Callable[..., tuple[np.ndarray, ...]], *, masks: bool = False) -> DisparityRenderer:
    """Adapt a phantom maker with a ``disparity`` argument: (images, labels) or, with ``masks``, (images, masks)."""

    def render(n: int, size: int, seed: int, indices: Sequence[int] | np.ndarray,
               disparity: float) -> tuple[np.ndarray, np.ndarray]:
        out = fn(n, size=size, seed=seed, indices=indices, disparity=disparity)
        return out[0], out[2 if masks else 1]

    return render


TASKS.add(
    "pneumonia-cxr",
    TaskSpec(
        name="pneumonia-cxr",
        description="Chest X-ray: normal vs pneumonia (binary classification)",
        kind=CLASSIFICATION,
        in_channels=1,
        class_names=phantoms.CHEST_CLASSES,
        positive_class=1,
        default_model="small-cnn",
        default_image_size=64,
        phantom_labels=lambda n, seed: phantoms.phantom_labels(n, seed=seed),
        render_phantoms=_first_two(phantoms.make_chest_phantoms),
        render_disparity_phantoms=_with_disparity(phantoms.make_chest_phantoms),
    ),
)

TASKS.add(
    "pneumonia-cxr-3class",
    TaskSpec(
        name="pneumonia-cxr-3class",
        description="Chest X-ray: normal vs bacterial vs viral pneumonia (3 classes; manifest 'subtype' column)",
        kind=CLASSIFICATION,
        in_channels=1,
        class_names=phantoms_pneumonia.PNEUMONIA_SUBTYPE_CLASSES,
        positive_class=None,
        default_model="small-cnn",
        default_image_size=64,
        phantom_labels=lambda n, seed: phantoms_pneumonia.pneumonia_subtype_labels(n, seed=seed),
        render_phantoms=_first_two(phantoms_pneumonia.make_pneumonia_subtype_phantoms),
        threshold_method=ARGMAX,
        label_column="subtype",
        label_aliases={"bacteria": "bacterial", "virus": "viral"},  # Kermany's spellings
    ),
)

TASKS.add(
    "pneumothorax-cxr",
    TaskSpec(
        name="pneumothorax-cxr",
        description="Chest X-ray: pneumothorax present vs absent (binary classification)",
        kind=CLASSIFICATION,
        in_channels=1,
        class_names=phantoms_tasks.PNEUMOTHORAX_CLASSES,
        positive_class=1,
        default_model="small-cnn",
        default_image_size=64,
        phantom_labels=lambda n, seed: phantoms_tasks.pneumothorax_labels(n, seed=seed),
        render_phantoms=_first_two(phantoms_tasks.make_pneumothorax_phantoms),
        render_disparity_phantoms=_with_disparity(phantoms_tasks.make_pneumothorax_phantoms),
        threshold_method="target-sensitivity",
        target_sensitivity=0.9,
    ),
)

TASKS.add(
    "lung-seg",
    TaskSpec(
        name="lung-seg",
        description="Chest X-ray: lung-field segmentation (background, lung)",
        kind=SEGMENTATION,
        in_channels=1,
        class_names=("background", "lung"),
        positive_class=1,
        default_model="unet",
        default_image_size=64,
        phantom_labels=lambda n, seed: phantoms_tasks.lung_seg_labels(n, seed=seed),
        render_phantoms=_first_two(phantoms_tasks.make_lung_seg_phantoms),
    ),
)

def _images_and_masks(fn: Callable[..., tuple[np.ndarray, ...]]) -> PhantomRenderer:
    """Adapt a phantom maker returning (images, labels, masks) to a segmentation renderer."""

    def render(n: int, size: int, seed: int, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = fn(n, size=size, seed=seed, indices=indices)
        return out[0], out[2]

    return render


TASKS.add(
    "pneumothorax-seg",
    TaskSpec(
        name="pneumothorax-seg",
        description="Chest X-ray: pneumothorax region segmentation (background, pneumothorax); "
        "masks as image files or SIIM-ACR run-length CSV",
        kind=SEGMENTATION,
        in_channels=1,
        class_names=("background", "pneumothorax"),
        positive_class=1,
        default_model="unet",
        default_image_size=64,
        # presence labels: partitions spread positive (non-empty mask) images evenly over sites
        phantom_labels=lambda n, seed: phantoms_tasks.pneumothorax_labels(n, seed=seed),
        # a clearly darker pleural space than the classification phantoms: the region must be delineable at 64 px
        render_phantoms=_images_and_masks(partial(phantoms_tasks.make_pneumothorax_phantoms, conspicuous=True)),
        render_disparity_phantoms=_with_disparity(partial(phantoms_tasks.make_pneumothorax_phantoms, conspicuous=True),
                                                  masks=True),
        foreground_batch_dice=True,  # ~5 % of the image, empty in half the images
    ),
)

TASKS.add(
    "nec-axr",
    TaskSpec(
        name="nec-axr",
        description="Neonatal abdominal X-ray, necrotizing enterocolitis: surgery needed vs not (binary)",
        kind=CLASSIFICATION,
        in_channels=1,
        class_names=phantoms_tasks.NEC_CLASSES,
        positive_class=1,
        default_model="small-cnn",
        default_image_size=64,
        phantom_labels=lambda n, seed: phantoms_tasks.nec_labels(n, seed=seed),
        render_phantoms=_first_two(phantoms_tasks.make_nec_phantoms),
        threshold_method="target-sensitivity",  # a missed surgical NEC is worse than a false alarm
        target_sensitivity=0.9,
    ),
)

TASKS.add(
    "nf-photo",
    TaskSpec(
        name="nf-photo",
        description="Skin photograph: necrotizing fasciitis vs other soft-tissue infection (binary, RGB)",
        kind=CLASSIFICATION,
        in_channels=3,
        class_names=phantoms_tasks.NF_CLASSES,
        positive_class=1,
        default_model="small-cnn",
        default_image_size=64,
        phantom_labels=lambda n, seed: phantoms_tasks.nf_labels(n, seed=seed),
        render_phantoms=_first_two(phantoms_tasks.make_nf_phantoms),
        threshold_method="target-sensitivity",  # missing NF is worse than a false alarm
        target_sensitivity=0.95,
    ),
)


def get_task(name: str) -> TaskSpec:
    """Return the registered task ``name`` (raises with valid names otherwise)."""
    return TASKS.get(name)
