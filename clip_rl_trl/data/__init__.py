"""Datasets: the synthetic shapes world (the offline default), Karpathy-split JSON files (COCO, Flickr) and
Hub caption datasets."""

from clip_rl_trl.data.coco import load_hub_captions, load_karpathy
from clip_rl_trl.data.shapes import ShapesLanguage, ShapesWorld, train_shapes_clip

__all__ = ["ShapesLanguage", "ShapesWorld", "load_hub_captions", "load_karpathy", "train_shapes_clip"]
