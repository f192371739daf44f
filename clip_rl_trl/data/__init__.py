"""Datasets: the synthetic shapes world (the offline default) and, later, COCO-style Karpathy splits."""

from clip_rl_trl.data.shapes import ShapesWorld, precision_at_1

__all__ = ["ShapesWorld", "precision_at_1"]
