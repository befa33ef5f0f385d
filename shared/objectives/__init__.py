"""What each task kind trains and counts: the objectives of :func:`shared.training.train_local`.

An objective checks a site's inputs, turns uint8 batches into network input
and loss target (augmentation included), supplies the training loss and a
per-example loss (DP-SGD, membership audits), and evaluates a model into the
additive counts a site sends. :meth:`shared.tasks.TaskSpec.objective` builds
the task's one; nothing else chooses by task kind.
"""

from __future__ import annotations

from shared.kinds import CLASSIFICATION, OUTPUT_KINDS, SEGMENTATION
from shared.objectives.classification import ClassificationObjective
from shared.objectives.segmentation import SegmentationObjective
from shared.training import Objective

__all__ = ["ClassificationObjective", "Objective", "SegmentationObjective", "make_objective"]


def make_objective(kind: str, num_classes: int, *, foreground_batch_dice: bool = False) -> Objective:
    """The objective of a task of output ``kind`` with ``num_classes`` classes (or mask classes)."""
    if kind == CLASSIFICATION:
        return ClassificationObjective(num_classes)
    if kind == SEGMENTATION:
        return SegmentationObjective(num_classes, foreground_batch_dice=foreground_batch_dice)
    raise ValueError(f"task kind must be one of {OUTPUT_KINDS}, got {kind!r}")
