"""An exact judge for the shapes world: would a perfect reader of the caption pick out the right image?

CLIP scores every distinctiveness number the library reports, and CLIP is also what the policy learns to please.
In the shapes world the scenes are known and the grammar reads every caption it can produce, so distinctiveness can
be measured without a learned judge:

.. math:: \\mathrm{oracle@1}_i = \\frac{\\mathbb{1}[c_i \\models s_i]}{1 + |\\{j \\in D_i : c_i \\models s_j\\}|}

where ``c ⊨ s`` means everything caption ``c`` says is true of scene ``s`` (its attribute precision is 1) and
``D_i`` are the candidates the caption must be told apart from. A caption that is false of its own scene, or that
does not parse, scores 0; one that also fits ``t`` candidates is a tie among ``t + 1`` scenes and scores
``1 / (t + 1)`` (the chance a reader picking at random among the fitting scenes has; ``ties="strict"`` scores it
0). With the same candidates as CLIP's P@1 (:func:`~clip_rl_trl.evaluation.retrieval.distractor_indices`), the
gap between ``p_at_1_100`` and ``oracle_p_at_1_100`` is what CLIP believes and is not true.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clip_rl_trl.evaluation.retrieval import distractor_indices

__all__ = ["oracle_at_1", "oracle_metrics"]


def oracle_at_1(
    captions: Sequence[str],
    scenes: Sequence[Any],
    language: Any,
    candidates: torch.Tensor | None = None,
    ties: str = "expected",
) -> float:
    """Mean oracle@1 (module docstring) of caption ``i`` against scene ``i`` and the scenes ``candidates[i]``
    (an ``(N, K)`` index tensor, ``-1`` for none; ``None``: every other scene). ``language.consistent(caption,
    scenes)`` gives, per scene, whether the caption is true of it (None when the caption does not parse)."""
    if ties not in ("expected", "strict"):
        raise ValueError(f"ties must be 'expected' or 'strict', got {ties!r}")
    n = len(captions)
    if n == 0 or len(scenes) != n:
        raise ValueError(f"oracle@1 needs one scene per caption, got {n} captions and {len(scenes)} scenes")
    total = 0.0
    for i, caption in enumerate(captions):
        if candidates is None:
            others = [j for j in range(n) if j != i]
        else:
            others = [int(j) for j in candidates[i] if int(j) >= 0 and int(j) != i]
        fits = language.consistent(caption, [scenes[i], *(scenes[j] for j in others)])
        if fits is None or not fits[0]:
            continue
        tied = sum(fits[1:])
        total += 1.0 if tied == 0 else (0.0 if ties == "strict" else 1.0 / (tied + 1))
    return total / n


def oracle_metrics(
    captions: Sequence[str],
    scenes: Sequence[Any],
    language: Any,
    p_at_1_candidates: int = 100,
    seed: int = 0,
    groups: torch.Tensor | None = None,
    ties: str = "expected",
) -> dict[str, float]:
    """``oracle_p_at_1_<n>`` (the same distractors as CLIP's ``p_at_1_<n>``), ``oracle_recall_at_1`` (against
    every other scene) and, with similar-image ``groups``, ``oracle_p_at_1_similar`` (against each image's K most
    similar images, the hard case)."""
    drawn = distractor_indices(len(captions), p_at_1_candidates, seed)
    results = {
        f"oracle_p_at_1_{p_at_1_candidates}": oracle_at_1(captions, scenes, language, drawn, ties),
        "oracle_recall_at_1": oracle_at_1(captions, scenes, language, None, ties),
    }
    if groups is not None:
        results["oracle_p_at_1_similar"] = oracle_at_1(captions, scenes, language, groups, ties)
    return results
