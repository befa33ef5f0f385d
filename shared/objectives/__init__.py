"""What each task kind trains and counts: the objectives of :func:`shared.training.train_local`.

An objective checks a site's inputs, turns uint8 batches into network input
and loss target (augmentation included), supplies the training loss and a
per-example loss (DP-SGD, membership audits), and evaluates a model into the
additive counts a site sends. :meth:`shared.tasks.TaskSpec.objective` builds
the task's one; nothing else chooses by task kind.

The segmentation objective is imported on first use: it needs MONAI, whose
``import`` loads every MONAI submodule (about 5 s per process), and a
classification site never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.kinds import CLASSIFICATION, OUTPUT_KINDS, SEGMENTATION
from shared.objectives.classification import ClassificationObjective
from shared.training import Objective

if TYPE_CHECKING:
    from shared.objectives.segmentation import SegmentationObjective

__all__ = ["ClassificationObjective", "Objective", "SegmentationObjective", "make_objective"]


def make_objective(kind: str, num_classes: int, *, foreground_batch_dice: bool = False) -> Objective:
    """The objective of a task of output ``kind`` with ``num_classes`` classes (or mask classes)."""
    if kind == CLASSIFICATION:
        return ClassificationObjective(num_classes)
    if kind == SEGMENTATION:
        from shared.objectives.segmentation import SegmentationObjective  # MONAI: only for segmentation tasks

        return SegmentationObjective(num_classes, foreground_batch_dice=foreground_batch_dice)
    raise ValueError(f"task kind must be one of {OUTPUT_KINDS}, got {kind!r}")


def __getattr__(name: str) -> Any:
    """``SegmentationObjective`` on first access (see the module docstring)."""
    if name == "SegmentationObjective":
        from shared.objectives.segmentation import SegmentationObjective

        return SegmentationObjective
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
