"""CIDErBtw, Self-CIDEr and the unique-caption share against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clip_rl_trl.evaluation import evaluate_captions
from clip_rl_trl.evaluation.distinctiveness import cider_btw, cider_btw_scores, self_cider, self_cider_scores
from clip_rl_trl.evaluation.diversity import unique_share
from clip_rl_trl.rewards.cider import CiderD

# Three images with one reference each. Over these 3 documents: df(red) = df(square) = 2, every other n-gram 1.
REFS = [["red circle"], ["red square"], ["blue square"]]
LOG3, LOG15 = math.log(3), math.log(1.5)  # idf of a df-1 and of a df-2 n-gram


def test_cider_btw_by_hand() -> None:
    # Caption 0 equals its neighbour's only reference: unigram and bigram cosines 1, no 3- or 4-gram (cosine 0),
    # equal lengths (penalty 1): CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Caption 1 "blue circle" against "red circle": unigram tf-idf (blue log3, circle log3) . (red log1.5,
    # circle log3), clipped at min(log3, log3) on "circle"; no shared bigram.
    cos1 = LOG3 * LOG3 / (math.sqrt(2) * LOG3 * math.sqrt(LOG15**2 + LOG3**2))
    # Caption 2 against the pooled references of images 0 and 1: the mean of its CIDEr-D against each.
    # "red" alone (1 word: no bigram, length 0) against "red circle" and "red square" (length 1 each, penalty
    # exp(-1/72)): unigram cosines log1.5^2 / (log1.5 * sqrt(log1.5^2 + log3^2)) and, "square" having df 2 too,
    # log1.5^2 / (log1.5 * sqrt(2) * log1.5) = 1 / sqrt(2).
    cos_red = (LOG15 / math.sqrt(LOG15**2 + LOG3**2) + 1 / math.sqrt(2)) / 2
    expected = [5.0, 10 * cos1 / 4, 10 * cos_red / 4 * math.exp(-1 / 72)]
    scores = cider_btw_scores(["red square", "blue circle", "red"], REFS, [[1], [0], [0, 1]])
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert cider_btw(["red square", "blue circle", "red"], REFS, [[1], [0], [0, 1]]) == pytest.approx(
        sum(expected) / 3
    )


def test_cider_btw_pools_references_which_equals_the_mean_over_similar_images() -> None:
    refs = [["a red circle", "a circle"], ["a blue square", "a square"], ["a red square", "red square"]]
    corpus = CiderD(refs, normalize=True)
    captions = ["a red square", "a red circle", "a blue square"]
    pooled = cider_btw_scores(captions, refs, torch.tensor([[1, 2], [0, 2], [0, 1]]), corpus)
    # Two references per image: the pooled mean is the mean over the two similar images.
    per_image = [
        np.mean([corpus.score([c], [refs[j]])[0] for j in row])
        for c, row in zip(captions, [[1, 2], [0, 2], [0, 1]], strict=True)
    ]
    np.testing.assert_allclose(pooled, per_image, rtol=1e-12)
    # Punctuation and case are normalised with the default corpus, and an empty caption scores 0.
    assert cider_btw_scores(["A RED square.", "", "x"], refs, [[1], [0], [0]])[1] == 0.0
    a = cider_btw_scores(["A RED square.", "x", "x"], refs, [[2], [0], [0]])[0]
    assert a == pytest.approx(cider_btw_scores(["a red square", "x", "x"], refs, [[2], [0], [0]])[0])


def test_cider_btw_rejects_bad_input() -> None:
    captions = ["a", "b", "c"]
    with pytest.raises(ValueError, match="groups has 2 rows but there are 3 captions"):
        cider_btw(captions, REFS, [[1], [0]])
    with pytest.raises(ValueError, match=r"groups\[1\] contains image 1 itself"):
        cider_btw(captions, REFS, [[1], [1], [0]])
    with pytest.raises(ValueError, match=r"groups\[0\] holds 3, not an image index"):
        cider_btw(captions, REFS, [[3], [0], [0]])
    with pytest.raises(TypeError, match="integer image indices, got dtype float"):
        cider_btw(captions, REFS, torch.tensor([[1.0], [float("nan")], [0.0]]))
    with pytest.raises(ValueError, match=r"refs\[1\] is empty"):
        cider_btw(captions, [["a"], [], ["c"]], [[1], [0], [0]])
    with pytest.raises(ValueError, match="got 3 captions but 2 reference lists"):
        cider_btw(captions, REFS[:2], [[1], [0], [0]])
    with pytest.raises(TypeError, match=r"captions\[2\] is NoneType"):
        cider_btw(["a", "b", None], REFS, [[1], [0], [0]])
    with pytest.raises(ValueError, match="at least 2 captions"):
        cider_btw(["a"], [["a"]], [[0]])


def test_self_cider_by_hand() -> None:
    # Every n-gram below is absent from this corpus: all have idf log 2, so cosines are n-gram overlap counts.
    corpus = CiderD([["x y"], ["z"]])
    # "w1 w2 w3 w4" vs "w1 w2 w3 w5": 3 of 4 unigrams, 2 of 3 bigrams, 1 of 2 trigrams, 0 of 1 4-grams shared.
    s = (3 / 4 + 2 / 3 + 1 / 2 + 0) / 4
    # K = 10 [[1, s], [s, 1]]: eigenvalues 10 (1 + s), 10 (1 - s); diversity -log_2 of the largest root's share.
    pair = -math.log(math.sqrt(1 + s) / (math.sqrt(1 + s) + math.sqrt(1 - s))) / math.log(2)
    samples = [
        ["w1 w2 w3 w4", "w1 w2 w3 w5"],
        ["a b c d", "a b c d"],  # the same caption twice: one non-zero eigenvalue, diversity 0
        ["a b c d", "e f g h"],  # nothing shared, equal norms: K = 10 I, diversity 1
    ]
    scores = self_cider_scores(samples, corpus)
    assert scores == pytest.approx([pair, 0.0, 1.0], abs=1e-12)
    assert self_cider(samples, corpus) == pytest.approx((pair + 0 + 1) / 3, abs=1e-12)


def test_self_cider_three_captions_and_undefined_sets() -> None:
    corpus = CiderD([["x y"], ["z"]])
    # Two identical captions and one unrelated: K = 10 [[1,1,0],[1,1,0],[0,0,1]], eigenvalues 20, 10, 0.
    expected = -math.log(math.sqrt(20) / (math.sqrt(20) + math.sqrt(10))) / math.log(3)
    scores = self_cider_scores([["a b c d", "a b c d", "e f g h"], ["", "", ""]], corpus)
    assert scores[0] == pytest.approx(expected, abs=1e-12)
    assert scores[1] is None  # every caption empty: 0 / 0
    assert self_cider([["a b c d", "a b c d", "e f g h"], ["", "", ""]], corpus) == pytest.approx(expected)
    with pytest.raises(ValueError, match="undefined for every image"):
        self_cider([["", ""]], corpus)


def test_self_cider_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 captions per image"):
        self_cider([["a"], ["b"]])
    with pytest.raises(ValueError, match=r"samples\[1\] has 3 captions but samples\[0\] has 2"):
        self_cider([["a", "b"], ["a", "b", "c"]])
    with pytest.raises(TypeError, match=r"samples\[0\]\[1\] is int"):
        self_cider([["a", 1]])
    with pytest.raises(TypeError, match="N lists of m captions"):
        self_cider("a b")
    with pytest.raises(ValueError, match="samples is empty"):
        self_cider([])


def test_unique_share() -> None:
    assert unique_share(["A red circle.", "a red circle", "a blue square", "a circle"]) == 3 / 4
    assert unique_share(["a circle"] * 5) == 1 / 5
    with pytest.raises(ValueError, match="at least one caption"):
        unique_share([])
    with pytest.raises(TypeError, match="single string"):
        unique_share("a circle")


class _Scorer:
    """Encodes text i of a fixed table as the unit vector e_i (enough for the CLIP metrics to run)."""

    def __init__(self, table: dict[str, int]) -> None:
        self.table = table

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 3)
        for i, text in enumerate(texts):
            out[i, self.table.get(text.removeprefix("A photo depicts "), 0) % 3] = 1.0
        return out


def test_evaluate_captions_wires_the_distinctiveness_metrics() -> None:
    captions = ["red square", "blue circle", "red"]
    scorer = _Scorer({c: i for i, c in enumerate(captions)})
    groups = torch.tensor([[1, 2], [2, 0], [0, 1]])
    samples = [["w1 w2 w3 w4", "w1 w2 w3 w5"], ["a b c d", "a b c d"], ["a b c d", "e f g h"]]
    result = evaluate_captions(captions, torch.eye(3), scorer, refs=REFS, groups=groups, coco_metrics=False,
                               samples=samples)
    corpus = CiderD(REFS, normalize=True)
    assert result["cider_btw"] == pytest.approx(cider_btw(captions, REFS, groups, corpus))
    assert result["self_cider"] == pytest.approx(self_cider(samples, corpus))
    assert result["unique_share"] == 1.0 and result["vocab_size"] == 4
    assert "cider_btw" not in result["skipped"] and "self_cider" not in result["skipped"]

    bare = evaluate_captions(captions, torch.eye(3), scorer, coco_metrics=False)
    assert "cider_btw" not in bare and "self_cider" not in bare
    assert bare["skipped"]["cider_btw"] == "no references given (refs=None)"
    assert "several captions per image" in bare["skipped"]["self_cider"]
    no_groups = evaluate_captions(captions, torch.eye(3), scorer, refs=REFS, coco_metrics=False)
    assert no_groups["skipped"]["cider_btw"] == "no similar-image groups given (groups=None)"
    with pytest.raises(ValueError, match="got 3 captions but 2 sample lists"):
        evaluate_captions(captions, torch.eye(3), scorer, coco_metrics=False, samples=samples[:2])
