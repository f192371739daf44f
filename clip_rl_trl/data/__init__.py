"""Datasets: the synthetic shapes world (the offline default), Karpathy-split JSON files (COCO, Flickr) and
Hub caption datasets."""

from clip_rl_trl.data.coco import load_hub_captions, load_karpathy
from clip_rl_trl.data.shapes import ShapesWorld

__all__ = ["ShapesWorld", "load_hub_captions", "load_karpathy"]
