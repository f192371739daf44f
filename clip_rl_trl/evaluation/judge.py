"""``evaluate_shapes_clip``: how well a judge retrieves the shapes world's images from captions of each level."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.evaluation.retrieval import precision_at_1

if TYPE_CHECKING:
    from clip_rl_trl.data.shapes import ShapesWorld

__all__ = ["evaluate_shapes_clip"]

# Partial captions of the salient object: (attributes named, background named).
_LEVELS: dict[str, tuple[tuple[str, ...], bool]] = {
    "size colour shape on a background": (("size", "colour", "shape"), True),
    "colour shape": (("colour", "shape"), False),
    "shape": (("shape",), False),
}


def evaluate_shapes_clip(
    world: ShapesWorld, scorer: ClipScorer, n: int = 1000, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """P@1 among 100 of ``scorer`` on the first ``n`` scenes of ``world``'s ``split``, per caption level.

    Levels: ``full`` (full captions), ``human`` (the five human-like captions: the mean over the five
    one-caption-per-image sets), and partial captions of the salient object: ``size colour shape on a
    background``, ``colour shape``, ``shape``. Scored by
    :func:`clip_rl_trl.evaluation.retrieval.precision_at_1` with Dessì et al.'s strict rule (a tie is a miss)
    and distractors drawn with ``seed``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty str, got {split!r}")

    def p_at_1(texts: Sequence[str]) -> float:
        return precision_at_1(scorer.encode_texts(texts), image_emb, seed=seed, ties="strict")

    examples = [world.example(i, split) for i in range(n)]
    image_emb = scorer.encode_images([image for _, image, _ in examples])
    result = {"full": p_at_1([world.describe(s) for s, _, _ in examples])}
    result["human"] = sum(p_at_1([caps[k] for _, _, caps in examples]) for k in range(5)) / 5
    for name, (attributes, background) in _LEVELS.items():
        result[name] = p_at_1(
            [world.describe(s, attributes, [world.salient_object(s)], background) for s, _, _ in examples]
        )
    return result
