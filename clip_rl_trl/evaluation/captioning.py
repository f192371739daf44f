"""Evaluate a captioner on a dataset: caption every distinct image, then score with the whole suite.

:func:`evaluate_policy` is the one evaluation path of the library: :meth:`CaptionRLTrainer.evaluate` (during
training, checkpoint selection), the pipeline's before/after report and ``clip-rl-trl eval --model`` all call
it, so a number means the same wherever it is printed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_rl_trl import neighbors
from clip_rl_trl.evaluation.evaluate import evaluate_captions
from clip_rl_trl.models.policies import CaptionPolicy, caption_rows

__all__ = ["GEG_K", "evaluate_policy"]

GEG_K = 5  # Zhang et al. 2022: each image against its 5 most similar images of the split


def _distinct_rows(dataset: Any, id_column: str) -> list[Mapping[str, Any]]:
    """The first row of every distinct image id, in dataset order."""
    rows: dict[Any, Mapping[str, Any]] = {}
    for row in dataset:
        rows.setdefault(row[id_column], row)
    return list(rows.values())


def evaluate_policy(
    model: nn.Module,
    policy: CaptionPolicy,
    dataset: Any,
    *,
    tokenizer: Any,
    scorer: Any,
    cache: Any,
    id_column: str = "image_id",
    captions_column: str = "captions",
    batch_size: int = 64,
    generation: Mapping[str, Any] | None = None,
    language: Any = None,
    train_captions: Iterable[str] | None = None,
    similarity: str = "captions",
    coco_metrics: bool = True,
    seed: int = 0,
    groups_memo: dict[tuple, torch.Tensor | None] | None = None,
) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Caption each distinct image of ``dataset`` with ``policy`` and score the captions.

    ``generation`` are ``policy.generate`` keyword arguments (default: beam search, 3 beams). GEG compares each
    image with its :data:`GEG_K` most similar images of the same dataset, found through the references (Zhang et
    al. Eq. 2) or, with ``similarity="image"`` or without references, by image cosine; ``groups_memo`` keeps
    them across calls on the same images. ``language`` (a world's parser, e.g. ``ShapesLanguage()``) adds
    grammar validity and attribute precision / recall from the rows' ``scene`` column. Returns
    ``(metrics, captions, image_ids)``.
    """
    rows = _distinct_rows(dataset, id_column)
    if not rows:
        raise ValueError("the evaluation dataset is empty")
    ids = [row[id_column] for row in rows]
    generation = dict(generation or {"do_sample": False, "num_beams": 3})
    captions = caption_rows(model, policy, rows, tokenizer, batch_size=batch_size, **generation)
    image_emb = cache[ids].float()
    refs = [row[captions_column] for row in rows] if captions_column in rows[0] else None
    world: dict[str, Any] = {}
    if language is not None:
        if "scene" not in rows[0]:
            raise ValueError("evaluating with a language needs a 'scene' column in the evaluation dataset")
        world = {"world": language, "scenes": [row["scene"] for row in rows]}
    kind = similarity if refs is not None else "image"
    key = (tuple(ids), kind)
    memo = groups_memo if groups_memo is not None else {}
    if key not in memo:
        memo[key] = (
            neighbors.groups_within_split(F.normalize(image_emb, dim=-1), GEG_K, similarity=kind, scorer=scorer, refs=refs)
            if len(ids) > GEG_K
            else None
        )
    metrics = evaluate_captions(
        captions, image_emb, scorer, refs=refs, groups=memo[key],
        train_captions=list(train_captions) if train_captions is not None else None,
        coco_metrics=coco_metrics, seed=seed, **world,
    )
    return metrics, captions, ids

