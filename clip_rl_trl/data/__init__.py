"""Datasets: the synthetic shapes world (the offline default) and, later, COCO-style Karpathy splits."""

from clip_rl_trl.data.shapes import ShapesWorld

__all__ = ["ShapesWorld"]
