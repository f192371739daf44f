"""The evaluation suite: hand-computed retrieval, diversity and COCO metrics, skip messages, evaluate_captions."""

import logging
import os
import random
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocoevalcap.bleu.bleu_scorer import BleuScorer

from clip_rl_trl import ClipScorer
from clip_rl_trl.evaluation import (
    coco_caption_metrics,
    distinct_n,
    evaluate_captions,
    nlg,
    novelty,
    precision_at_1,
    recall_at_k,
    self_bleu,
    vocab_size,
)
from clip_rl_trl.evaluation import evaluate as evaluate_module
from clip_rl_trl.evaluation.diversity import words
from clip_rl_trl.evaluation.nlg import NLG_KEYS

SHAPES_KEYS = ("grammar_valid", "attribute_precision", "attribute_recall")


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


class FakeScorer:
    """A scorer whose text embeddings are given by hand; records every list of texts it encodes."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return _unit(*[self.table[t] for t in texts])


class FakeWorld:
    """parse / attribute_precision / attribute_recall read from tables, with the scene as a key."""

    def parse(self, caption: str) -> dict | None:
        return None if "and and" in caption else {"objects": []}

    def attribute_precision(self, caption: str, scene: str) -> float | None:
        return {"s0": 1.0, "s1": 0.5, "s2": None, "s3": 0.0}[scene]

    def attribute_recall(self, caption: str, scene: str) -> float | None:
        return {"s0": 0.25, "s1": 0.5, "s2": 1.0, "s3": 0.0}[scene]


@pytest.fixture(autouse=True)
def _fresh_skip_log():
    """Each test sees every skip reason logged afresh (they are logged once per process)."""
    evaluate_module._logged.clear()


# ----------------------------------------------------------------------------------------------- retrieval

# Four images on the axes of R^4. Caption 0 is its image; caption 1 leans to image 0 (rank 1); caption 2 is
# orthogonal to its own image and to images 0 and 1 but on image 3 (1 above, 2 tied); caption 3 is its image.
IMAGES = torch.eye(4)
CAPTIONS = _unit([1, 0, 0, 0], [1, 0.5, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1])


def test_recall_at_k_text_to_image_by_hand() -> None:
    # Expected tie policy: caption 2 has g = 1 above and t = 2 tied, so P(rank < K) = (K - 1) / 3.
    got = recall_at_k(CAPTIONS, IMAGES, k=(1, 2, 3, 4))
    expected = {1: (1 + 0 + 0 + 1) / 4, 2: (1 + 1 + 1 / 3 + 1) / 4, 3: (1 + 1 + 2 / 3 + 1) / 4, 4: 1.0}
    assert got == pytest.approx(expected, abs=1e-12)
    # Strict: caption 2 is found only when all 3 images above or tied fit in the top K.
    strict = recall_at_k(CAPTIONS, IMAGES, k=(1, 2, 3, 4), ties="strict")
    assert strict == pytest.approx({1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0}, abs=1e-12)
    assert recall_at_k(CAPTIONS, IMAGES, k=2) == pytest.approx({2: expected[2]})


def test_recall_at_k_image_to_text_by_hand() -> None:
    # Image 2 ties with all 4 captions (cos 0): 1/4; image 3 ties captions 2 and 3 (cos 1): 1/2.
    got = recall_at_k(IMAGES, CAPTIONS, k=1)
    assert got[1] == pytest.approx((1 + 1 + 1 / 4 + 1 / 2) / 4, abs=1e-12)
    assert recall_at_k(IMAGES, CAPTIONS, k=1, ties="strict")[1] == pytest.approx(0.5, abs=1e-12)


def test_one_caption_for_every_image_gets_chance_level_image_to_text_recall() -> None:
    images = torch.eye(8)
    same = _unit(*[[1.0] * 8 for _ in range(8)])
    assert recall_at_k(images, same, k=(1, 4)) == pytest.approx({1: 1 / 8, 4: 4 / 8}, abs=1e-12)
    assert recall_at_k(images, same, k=1, ties="strict")[1] == 0.0


def test_perfect_captions_and_tie_tolerance() -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(50, 16), dim=-1)
    assert recall_at_k(img, img, k=(1, 5)) == {1: 1.0, 5: 1.0}
    # Two copies of one image differing by float noise are tied: each found with probability 1/2 at K=1.
    dup = torch.cat([img[:1], img])
    dup[0] = F.normalize(dup[0] + 1e-8, dim=0)
    assert recall_at_k(dup, dup, k=1)[1] == pytest.approx((49 + 0.5 + 0.5) / 51, abs=1e-9)


def test_precision_at_1_small_set_uses_every_other_image() -> None:
    # N = 4 < 100 candidates: every other image is a distractor, so P@1 is text-to-image R@1.
    assert precision_at_1(CAPTIONS, IMAGES) == pytest.approx(0.5, abs=1e-12)
    assert precision_at_1(CAPTIONS, IMAGES, n_candidates=2, seed=3) == precision_at_1(
        CAPTIONS, IMAGES, n_candidates=2, seed=3
    )


def test_precision_at_1_draws_distractors_from_the_other_images_with_a_fixed_seed() -> None:
    n = 21
    img = torch.eye(n)
    # Own image never drawn as its own distractor: with "strict", a self-tie would score 0.
    assert precision_at_1(img, img, n_candidates=11, ties="strict") == 1.0
    # Caption 0 prefers image 5: it is right exactly when image 5 is not among its 10 of 20 distractors.
    txt = img.clone()
    txt[0] = F.normalize(0.5 * img[0] + img[5], dim=0)
    values = [precision_at_1(txt, img, n_candidates=11, seed=s) for s in range(200)]
    assert set(values) == {(n - 1) / n, 1.0}
    share_right = sum(v == 1.0 for v in values) / len(values)
    assert share_right == pytest.approx(1 - 10 / 20, abs=0.12)  # binomial sd 0.035
    assert values[7] == precision_at_1(txt, img, n_candidates=11, seed=7)


def test_retrieval_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="L2-normalised.*row 1"):
        recall_at_k(CAPTIONS, torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]))
    with pytest.raises(ValueError, match="key_emb has 3 rows"):
        recall_at_k(CAPTIONS, IMAGES[:3])
    with pytest.raises(ValueError, match="ties must be one of"):
        precision_at_1(CAPTIONS, IMAGES, ties="optimistic")
    with pytest.raises(ValueError, match="n_candidates"):
        precision_at_1(CAPTIONS, IMAGES, n_candidates=1)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(CAPTIONS, IMAGES, k=0)


# ----------------------------------------------------------------------------------------------- diversity


def test_diversity_by_hand() -> None:
    captions = ["a red circle", "a red square", "A red circle."]
    assert words("A red circle.") == ["a", "red", "circle"]
    assert vocab_size(captions) == 4  # a, red, circle, square
    assert distinct_n(captions, 1) == pytest.approx(4 / 9)
    # bigrams: "a red" x3, "red circle" x2, "red square": 3 distinct of 6
    assert distinct_n(captions, 2) == pytest.approx(3 / 6)
    assert distinct_n(["a", "b"], 2) == 0.0
    assert novelty(captions, ["a red circle", "a blue circle"]) == pytest.approx(1 / 3)
    assert novelty(captions, []) == 1.0


def test_self_bleu_by_hand() -> None:
    # Captions 0 and 1 are each other's exact reference (BLEU-4 = 1); caption 2 shares no bigram (BLEU-4 ~ 0).
    captions = ["a big red circle on the left", "a big red circle on the left", "a small blue square"]
    assert self_bleu(captions) == pytest.approx(2 / 3, abs=1e-6)
    assert self_bleu(["a red circle", "a blue square"], n=1) == pytest.approx(1 / 3, abs=1e-9)


def test_self_bleu_is_pycocoevalcap_sentence_bleu_against_the_others() -> None:
    rng = random.Random(0)
    vocab = "a red blue circle square on the left right big small".split()
    for _ in range(25):
        captions = [" ".join(rng.choices(vocab, k=rng.randint(0, 7))) for _ in range(rng.randint(2, 9))]
        per_caption = []
        for i, caption in enumerate(captions):
            scorer = BleuScorer(n=4)
            scorer += (caption, [c for j, c in enumerate(captions) if j != i])
            per_caption.append(scorer.compute_score(option="closest")[1][3][0])
        assert self_bleu(captions) == pytest.approx(sum(per_caption) / len(per_caption), abs=1e-12)


def test_self_bleu_is_fast_for_5000_captions() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    captions = [" ".join(rng.choices(vocab, k=rng.randint(3, 14))) for _ in range(5000)]
    start = time.perf_counter()
    self_bleu(captions)
    assert time.perf_counter() - start < 10  # about 0.4 s on 2 shared CPU cores


def test_diversity_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="single string"):
        vocab_size("a red circle")
    with pytest.raises(TypeError, match=r"captions\[1\] is int"):
        distinct_n(["a", 3], 1)
    with pytest.raises(ValueError, match="at least 2 captions"):
        self_bleu(["a red circle"])


# ----------------------------------------------------------------------------------------------- COCO metrics


def test_rouge_l_scores_an_empty_caption_zero() -> None:
    # pycocoevalcap's Rouge divides by the caption length; the suite scores an empty caption 0 instead.
    gts = {0: ["a red circle"], 1: ["a blue square"]}
    assert nlg._rouge_l(gts, {0: ["a red circle"], 1: [""]}) == pytest.approx(0.5)


def test_missing_java_gives_a_message_not_a_traceback(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    assert not nlg.java_available()
    scores, skipped = coco_caption_metrics(["a red circle"], [["a red circle"]])
    assert scores == {} and set(skipped) == set(NLG_KEYS) | {"spice"}
    img = torch.eye(2)
    fake = FakeScorer({"a": [1, 0], "b": [0, 1], "A photo depicts a": [1, 0], "A photo depicts b": [0, 1]})
    with caplog.at_level(logging.WARNING, logger="clip_rl_trl.evaluation.evaluate"):
        result = evaluate_captions(["a", "b"], img, fake, refs=[["a"], ["b"]])
    assert not set(NLG_KEYS) & set(result)
    assert "Java was not found on PATH" in result["skipped"]["bleu_4"]
    assert result["skipped"]["meteor"] == result["skipped"]["spice"] == nlg.JAVA_MISSING
    java_logs = [r for r in caplog.records if "Java was not found" in r.getMessage()]
    assert len(java_logs) == 1 and java_logs[0].levelno == logging.WARNING


def test_spice_jar_detection(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(nlg, "_spice_lib", lambda: tmp_path)
    assert [p.name for p in nlg.missing_spice_jars()] == [
        "stanford-corenlp-3.6.0.jar",
        "stanford-corenlp-3.6.0-models.jar",
    ]
    message = nlg._spice_missing_message(nlg.missing_spice_jars())
    assert "Stanford CoreNLP 3.6.0 jars not found" in message and str(tmp_path) in message
    for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / name).write_bytes(b"")
    assert nlg.missing_spice_jars() == []


def test_refs_are_checked() -> None:
    with pytest.raises(TypeError, match=r"refs\[0\] must be a list of reference strings"):
        coco_caption_metrics(["a red circle"], ["a red circle"])
    with pytest.raises(ValueError, match=r"refs\[1\] is empty"):
        coco_caption_metrics(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="2 captions but 1 reference lists"):
        coco_caption_metrics(["a", "b"], [["a"]])


# ----------------------------------------------------------------------------------------------- evaluate_captions


def _java_children() -> list[int]:
    """Pids of this process's children whose command is java, zombies included (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if comm == "java" and int(rest[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


def _fake_setup() -> tuple[list[str], torch.Tensor, FakeScorer]:
    # Three images on the axes of R^3; captions point at (their image + a bit of the next one).
    captions = ["c0", "c1", "c2"]
    table = {"c0": [1, 0.5, 0], "c1": [0, 1, 0.5], "c2": [0.5, 0, 1]}
    # The prompted captions and references get their own embeddings, to see which pass each metric reads.
    table |= {
        "A photo depicts c0": [1, 0, 0],
        "A photo depicts c1": [0, 1, 0],
        "A photo depicts c2": [0, -1, 0],
    }
    table |= {
        "A photo depicts r0": [1, 0, 0],
        "A photo depicts r1": [1, 1, 0],
        "A photo depicts r2": [0, 1, 0],
    }
    return captions, torch.eye(3), FakeScorer(table)


def test_evaluate_captions_by_hand() -> None:
    captions, img, fake = _fake_setup()
    groups = torch.tensor([[1, 2], [2, 0], [0, 1]])
    refs = [["r0"], ["r1", "r2"], ["r2"]]
    result = evaluate_captions(
        captions, img, fake, refs=refs, groups=groups, train_captions=["c1"], coco_metrics=False
    )
    # Raw caption i: cos to its image 2/sqrt(5), to the next 1/sqrt(5), to the other 0: always rank 0.
    assert result["recall_at_1"] == result["i2t_recall_at_1"] == result["p_at_1_100"] == 1.0
    a, b = 2 / 5**0.5, 1 / 5**0.5
    assert result["geg_avg"] == pytest.approx(a - (b + 0) / 2)
    assert result["geg_min"] == pytest.approx(a - b)
    # CLIP-S reads the prompted captions: cos to their images 1, 1, 0.
    assert result["clip_s"] == pytest.approx(2.5 * (1 + 1 + 0) / 3)
    # RefCLIP-S: A = 2.5, 2.5, 0; B = max cos to the prompted refs: 1, max(1/sqrt2, 1) = 1, -1.
    # Harmonic mean 2AB/(A+B): 2*2.5/3.5 twice, and A + B = -1 < 0 scores 0.
    assert result["refclip_s"] == pytest.approx((2 * 2 * 2.5 / 3.5 + 0) / 3)
    assert result["novelty"] == pytest.approx(2 / 3)
    assert result["vocab_size"] == 3 and result["distinct_1"] == 1.0 and result["distinct_2"] == 0.0
    assert result["unique_share"] == 1.0
    # CIDErBtw: no caption shares a word with its group's references ("c0" against "r1", "r2", "r2").
    assert result["cider_btw"] == 0.0
    assert set(result["skipped"]) == set(NLG_KEYS) | {"spice", "self_cider"} | set(SHAPES_KEYS)
    assert result["skipped"]["bleu_1"] == "coco_metrics=False"
    # One pass for the raw captions, one for the distinct prompted captions and references.
    assert fake.calls == [
        ["c0", "c1", "c2"],
        [f"A photo depicts {t}" for t in ("c0", "c1", "c2", "r0", "r1", "r2")],
    ]


def test_evaluate_captions_without_prompt_reuses_the_raw_pass() -> None:
    captions, img, fake = _fake_setup()
    result = evaluate_captions(captions, img, fake, prompt=None)
    assert fake.calls == [["c0", "c1", "c2"]]
    assert result["clip_s"] == pytest.approx(2.5 * 2 / 5**0.5)
    assert set(result["skipped"]) == {
        "geg_avg",
        "geg_min",
        "refclip_s",
        "novelty",
        "cider_btw",
        "self_cider",
        *NLG_KEYS,
        "spice",
        *SHAPES_KEYS,
    }


def test_evaluate_captions_encodes_each_distinct_caption_once() -> None:
    _, img, fake = _fake_setup()
    result = evaluate_captions(["c0", "c0", "c1"], img, fake, prompt=None, p_at_1_candidates=2)
    assert fake.calls == [["c0", "c1"]]
    # Captions 0 and 1 are identical: image 0 and image 1 tie on them for image-to-text.
    assert "p_at_1_2" in result and result["i2t_recall_at_1"] < 1.0


def test_shapes_world_extras_with_a_fake_world() -> None:
    _, _, fake = _fake_setup()
    fake.table |= {
        "a circle": [1, 0, 0],
        "a circle and and": [0, 1, 0],
        "a square": [0, 0, 1],
        "x": [1, 1, 1],
    }
    captions = ["a circle", "a circle and and", "a square", "x"]
    img = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1])
    result = evaluate_captions(
        captions, img, fake, world=FakeWorld(), scenes=["s0", "s1", "s2", "s3"], prompt=None
    )
    assert result["grammar_valid"] == pytest.approx(3 / 4)
    assert result["attribute_precision"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # None (s2) left out
    assert result["attribute_recall"] == pytest.approx((0.25 + 0.5 + 1.0 + 0.0) / 4)
    assert not set(SHAPES_KEYS) & set(result["skipped"])


def test_evaluate_captions_rejects_bad_input() -> None:
    captions, img, fake = _fake_setup()
    with pytest.raises(ValueError, match="image_emb has 2 rows, expected 3"):
        evaluate_captions(captions, img[:2], fake)
    with pytest.raises(ValueError, match="image_emb must hold L2-normalised rows"):
        evaluate_captions(captions, 2 * img, fake)
    with pytest.raises(ValueError, match="groups row 1 contains its own image"):
        evaluate_captions(captions, img, fake, groups=torch.tensor([[1], [1], [0]]))
    with pytest.raises(ValueError, match=r"groups\[2, 0\] = 3 is not an image index"):
        evaluate_captions(captions, img, fake, groups=torch.tensor([[1], [2], [3]]))
    with pytest.raises(ValueError, match="world and scenes go together"):
        evaluate_captions(captions, img, fake, world=FakeWorld())
    with pytest.raises(TypeError, match=r"captions\[2\] is NoneType"):
        evaluate_captions(["c0", "c1", None], img, fake)
    with pytest.raises(ValueError, match="the scorer embeds texts in 3 dimensions but image_emb has 4"):
        evaluate_captions(captions, torch.eye(4)[:3], fake)


def test_evaluate_captions_end_to_end_with_tiny_clip(scorer: ClipScorer, monkeypatch) -> None:
    """The one JVM-backed call of this module: tokenizer + METEOR on 12 captions, SPICE skipped offline."""
    import pycocoevalcap.spice.spice as spice_module

    def no_download() -> None:
        raise AssertionError("SPICE must never trigger the CoreNLP download")

    monkeypatch.setattr(spice_module, "get_stanford_models", no_download)
    colours = [
        "red",
        "green",
        "blue",
        "yellow",
        "cyan",
        "magenta",
        "gray",
        "black",
        "white",
        "brown",
        "pink",
        "navy",
    ]
    rgb = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    rgb += [(128, 128, 128), (0, 0, 0), (255, 255, 255), (128, 64, 0), (255, 128, 128), (0, 0, 128)]
    img = scorer.encode_images([Image.new("RGB", (32, 32), c) for c in rgb])
    refs = [[f"a large {c} square on a plain background"] for c in colours]
    # Captions equal to a reference once PTB-tokenised (case and punctuation do not count).
    captions = [f"A large {c} square, on a plain background." for c in colours]
    groups = torch.tensor([[(i + 1) % 12, (i + 2) % 12, (i + 3) % 12] for i in range(12)])
    result = evaluate_captions(captions, img, scorer, refs=refs, groups=groups, train_captions=[captions[0]])
    for k in range(1, 5):
        assert result[f"bleu_{k}"] == pytest.approx(1.0, abs=1e-6)
    assert result["meteor"] == pytest.approx(1.0) and result["rouge_l"] == pytest.approx(1.0)
    # CIDEr-D of a caption equal to its one reference, with a rare n-gram at every order: 10 * cos = 10.
    assert result["cider"] == pytest.approx(10.0, abs=1e-6)
    assert "spice" not in result and "Stanford CoreNLP" in result["skipped"]["spice"]
    # Retrieval and CLIP metrics against a direct computation on the same CLIP.
    txt = scorer.encode_texts(captions)
    assert result["recall_at_1"] == recall_at_k(txt, img, k=1)[1]
    assert result["i2t_recall_at_10"] == recall_at_k(img, txt, k=10)[10]
    assert result["p_at_1_100"] == result["recall_at_1"]  # 12 < 100 images: every other image is a distractor
    prompted = scorer.encode_texts(["A photo depicts " + c for c in captions])
    assert result["clip_s"] == pytest.approx(
        float((2.5 * (prompted * img).sum(-1).clamp(min=0)).mean()), abs=1e-6
    )
    gap = (txt * img).sum(-1) - torch.einsum("nd,nkd->nk", txt, img[groups]).mean(1)
    assert result["geg_avg"] == pytest.approx(float(gap.mean()), abs=1e-6)
    assert 0 < result["refclip_s"] <= 2.5
    assert result["novelty"] == pytest.approx(11 / 12)
    assert result["vocab_size"] == 6 + 12 and result["self_bleu"] > 0.5
    assert set(result["skipped"]) == {"spice", "self_cider", *SHAPES_KEYS}
    if Path("/proc").is_dir():
        assert _java_children() == []  # the tokenizer and METEOR JVMs are gone, not zombies


def test_shapes_world_extras_with_the_real_world(scorer: ClipScorer) -> None:
    from clip_rl_trl.data.shapes import ShapesLanguage, ShapesWorld

    world = ShapesWorld(seed=0)
    scenes = world.scenes(3, "test")
    captions = [
        world.describe(scenes[0]),  # the full caption: every attribute, all true
        world.describe(scenes[1], ("shape",), [0], background=False),  # "a <shape>": 1 attribute, true
        "a a circle",  # not a sentence of the grammar: scores 0
    ]
    img = scorer.encode_images([world.render(s) for s in scenes])
    result = evaluate_captions(captions, img, scorer, world=ShapesLanguage(), scenes=scenes, coco_metrics=False)
    assert result["grammar_valid"] == pytest.approx(2 / 3)
    assert result["attribute_precision"] == pytest.approx((1 + 1 + 0) / 3)
    n_attributes = 4 * len(scenes[1]["objects"]) + 1  # size, colour, shape, position per object + background
    assert result["attribute_recall"] == pytest.approx((1 + 1 / n_attributes + 0) / 3)
