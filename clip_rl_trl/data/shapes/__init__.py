"""The synthetic shapes world (DESIGN §6), in three parts.

- ``world``: ``ShapesWorld``, the procedural one- or two-object scenes, their images and their human-like
  captions (``to_dataset``, ``describe``, ``salient_object``, ``hard_negative``).
- ``language``: ``ShapesLanguage``, the caption grammar: ``parse`` (fluency), ``attribute_precision`` and
  ``attribute_recall`` (faithfulness to a scene), ``vocabulary`` and ``word_tokenizer``.
- ``judge``: ``train_shapes_clip(world)``, the tiny open_clip CLIP judge the rewards use, trained once and cached
  under ``default_cache_dir()``.

Its retrieval check, ``evaluate_shapes_clip``, lives with the evaluation suite
(``clip_rl_trl.evaluation.judge``).
"""

from clip_rl_trl.data.shapes.judge import train_shapes_clip
from clip_rl_trl.data.shapes.language import ShapesLanguage
from clip_rl_trl.data.shapes.world import WORLD_VERSION, Scene, ShapesWorld, default_cache_dir

__all__ = ["WORLD_VERSION", "Scene", "ShapesLanguage", "ShapesWorld", "default_cache_dir", "train_shapes_clip"]
