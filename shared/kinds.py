"""What a network outputs, and so what a task predicts: the two output kinds.

A model registry entry (:mod:`shared.models.registry`) and a task
(:mod:`shared.tasks`) each carry one of these; nothing else in medfed guesses
the kind (e.g. from metric names).
"""

from __future__ import annotations

__all__ = ["CLASSIFICATION", "OUTPUT_KINDS", "SEGMENTATION"]

CLASSIFICATION = "classification"
"""Image-level logits ``(N, num_classes)``."""
SEGMENTATION = "segmentation"
"""Per-pixel logits ``(N, num_classes, H, W)``."""
OUTPUT_KINDS = (CLASSIFICATION, SEGMENTATION)
