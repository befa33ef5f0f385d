"""Clinical tasks: what a federation trains for.

A :class:`TaskSpec` says what the input looks like (channels), what the
classes are, which class is "positive" for sensitivity/specificity, and how to
make synthetic phantoms for demos and tests. Later tasks (pneumothorax, NEC,
necrotizing fasciitis, segmentation) register here the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shared.data import phantoms
from shared.registry import Registry

PhantomRenderer = Callable[[int, int, int, Sequence[int] | np.ndarray], tuple[np.ndarray, np.ndarray]]
PhantomLabeler = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one clinical task.

    Attributes
    ----------
    name:
        Registry name, used as the run config's ``task``.
    in_channels:
        Image channels the model sees (1 = grayscale radiograph).
    class_names:
        Class names in label order; folder names/manifest labels of a real
        dataset are mapped onto these when they match (case-insensitive).
    positive_class:
        Index of the class counted as "positive" (sensitivity, AUROC).
    phantom_labels:
        ``(n, seed) -> labels`` of the task's synthetic phantom set, cheap.
    render_phantoms:
        ``(n, size, seed, indices) -> (images uint8 (k,H,W), labels)``.
    """

    name: str
    description: str
    in_channels: int
    class_names: tuple[str, ...]
    positive_class: int
    phantom_labels: PhantomLabeler
    render_phantoms: PhantomRenderer
    default_model: str = "small-cnn"
    default_image_size: int = 64

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.class_names)


TASKS: Registry[TaskSpec] = Registry("task")


def _chest_render(n: int, size: int, seed: int, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return phantoms.make_chest_phantoms(n, size=size, seed=seed, indices=indices)


def _chest_labels(n: int, seed: int) -> np.ndarray:
    return phantoms.phantom_labels(n, seed=seed)


TASKS.add(
    "pneumonia-cxr",
    TaskSpec(
        name="pneumonia-cxr",
        description="Chest X-ray: normal vs pneumonia (binary classification)",
        in_channels=1,
        class_names=phantoms.CHEST_CLASSES,
        positive_class=1,
        phantom_labels=_chest_labels,
        render_phantoms=_chest_render,
    ),
)


def get_task(name: str) -> TaskSpec:
    """Return the registered task ``name`` (raises with valid names otherwise)."""
    return TASKS.get(name)
