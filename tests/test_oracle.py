"""The exact judge of the shapes world: oracle@1 against hand-counted cases, on CLIP's P@1 trials."""

import pytest
import torch
from conftest import make_tiny_scorer

from clip_rl_trl import ImageEmbeddingCache, ShapesLanguage, ShapesWorld, evaluate_captions
from clip_rl_trl.evaluation.oracle import oracle_at_1, oracle_metrics
from clip_rl_trl.evaluation.retrieval import distractor_indices


def obj(size, colour, shape, position):
    return {"size": size, "colour": colour, "shape": shape, "position": position}


SCENES = [
    {"objects": [obj("large", "red", "circle", "left")], "background": "white"},
    {"objects": [obj("small", "red", "circle", "right")], "background": "white"},
    {"objects": [obj("large", "blue", "square", "top")], "background": "black"},
    {"objects": [obj("large", "red", "triangle", "left"), obj("small", "red", "circle", "right")],
     "background": "gray"},
]


def test_consistency_is_attribute_precision_one() -> None:
    assert ShapesLanguage.consistent("a red circle", SCENES) == [True, True, False, True]
    assert ShapesLanguage.consistent("a large red circle", SCENES) == [True, False, False, False]
    assert ShapesLanguage.consistent("a circle on a black background", SCENES) == [False, False, False, False]
    assert ShapesLanguage.consistent("red red circle the", SCENES) is None


def test_oracle_counts_ties_and_failures_by_hand() -> None:
    captions = [
        "a red circle",  # true of scenes 0, 1, 3: a tie among 3 -> 1/3
        "a small red circle on the right",  # true of scenes 1 and 3 -> 1/2
        "a large blue square at the top on a black background",  # only scene 2 -> 1
        "a green circle",  # false of its own scene -> 0
    ]
    assert oracle_at_1(captions, SCENES, ShapesLanguage()) == pytest.approx((1 / 3 + 1 / 2 + 1 + 0) / 4)
    assert oracle_at_1(captions, SCENES, ShapesLanguage(), ties="strict") == pytest.approx(1 / 4)
    # candidates: caption 0 against scene 2 only (not true of it) -> 1; -1 pads a row
    candidates = torch.tensor([[2, -1], [3, -1], [0, 1], [0, 1]])
    assert oracle_at_1(captions, SCENES, ShapesLanguage(), candidates) == pytest.approx((1 + 1 / 2 + 1 + 0) / 4)
    assert oracle_at_1(["a red circle", "not a sentence of it", "a square", "a circle"], SCENES,
                       ShapesLanguage()) == pytest.approx((1 / 3 + 0 + 1 + 1 / 3) / 4)
    with pytest.raises(ValueError, match="one scene per caption"):
        oracle_at_1(captions, SCENES[:2], ShapesLanguage())


def test_oracle_p_at_1_uses_clips_distractors_and_full_captions_are_found() -> None:
    world = ShapesWorld(seed=0)
    scenes = world.scenes(150, "test")
    full = [ShapesWorld.describe(s) for s in scenes]
    metrics = oracle_metrics(full, scenes, ShapesLanguage(), 100, seed=3)
    # a full caption names its scene; only scenes drawn twice (same attributes) tie
    assert metrics["oracle_recall_at_1"] == oracle_at_1(full, scenes, ShapesLanguage()) > 0.9
    assert metrics["oracle_p_at_1_100"] >= metrics["oracle_recall_at_1"]  # 99 candidates, not 149
    drawn = distractor_indices(150, 100, seed=3)
    generic = ["a circle"] * 150
    expected = oracle_at_1(generic, scenes, ShapesLanguage(), drawn)
    assert oracle_metrics(generic, scenes, ShapesLanguage(), 100, seed=3)["oracle_p_at_1_100"] == expected
    assert 0 < expected < 0.2  # many scenes hold a circle: a reader can rarely tell which


def test_evaluate_captions_reports_the_oracle_beside_clip() -> None:
    data = ShapesWorld(seed=0).to_dataset(12, "test")
    scorer = make_tiny_scorer()
    cache = ImageEmbeddingCache.build(data, scorer, progress=False)
    captions = [ShapesWorld.describe(s) for s in data["scene"]]
    metrics = evaluate_captions(captions, cache[data["image_id"]].float(), scorer, world=ShapesLanguage(),
                                scenes=data["scene"], coco_metrics=False, groups=torch.tensor(
                                    [[(i + 1) % 12, (i + 2) % 12] for i in range(12)]))
    assert metrics["oracle_recall_at_1"] == oracle_at_1(captions, data["scene"], ShapesLanguage()) > 0.8
    assert {"oracle_p_at_1_100", "oracle_p_at_1_similar"} <= set(metrics)
    assert "p_at_1_100" in metrics  # CLIP's, on the same trials
