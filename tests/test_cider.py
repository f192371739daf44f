"""CiderD: hand-computed values, agreement with pycocoevalcap to 1e-6, caching, batching, input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from clip_rl_trl.rewards.cider import CiderD

VOCAB = [f"w{i}" for i in range(25)]


def random_captions(rng: np.random.Generator, count: int, min_len: int, max_len: int) -> list[str]:
    """Sentences over a 25-word vocabulary with skewed frequencies, so that n-grams of every order recur."""
    p = 1.0 / np.arange(1, len(VOCAB) + 1)
    p /= p.sum()
    lengths = rng.integers(min_len, max_len + 1, size=count)
    return [" ".join(rng.choice(VOCAB, size=n, p=p)) for n in lengths]


def random_ref_lists(rng: np.random.Generator, count: int) -> list[list[str]]:
    """1-5 references per image, 1-14 words each."""
    return [random_captions(rng, int(rng.integers(1, 6)), 1, 14) for _ in range(count)]


def coco_scores(candidates: list[str], refs: list[list[str]], sigma: float = 6.0) -> np.ndarray:
    """pycocoevalcap's per-caption CIDEr-D, document frequencies from ``refs``."""
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(candidates)}
    return Cider(sigma=sigma).compute_score(gts, res)[1]


# Hand-computed cases. Corpus of N = 2 images: every n-gram of one image only has idf log 2 = L, an n-gram
# absent from the corpus has df 0, clipped to 1, so idf log 2 as well; an n-gram in both images has idf 0.


def test_identical_caption_scores_half_of_ten():
    # Unigram and bigram cosines are 1, there are no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4.
    cider = CiderD([["a b"], ["c d"]])
    assert cider.score(["a b"], [["a b"]]) == pytest.approx([5.0], abs=1e-12)


def test_clipping_and_length_penalty_by_hand():
    # Candidate "a b a b": unigrams a:2L, b:2L vs reference a:L, b:L -> clipped dot 2L^2 over
    # (sqrt(8) L)(sqrt(2) L) = 1/2. Bigrams "a b":2L, "b a":L (unseen in corpus) vs "a b":L -> L^2 over
    # (sqrt(5) L)(L) = 1/sqrt(5). No reference trigrams. Lengths (bigram counts) 3 vs 1: penalty exp(-4/72).
    cider = CiderD([["a b"], ["c d"]])
    expected = 10 * (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72)
    assert cider.score(["a b a b"], [["a b"]]) == pytest.approx([expected], abs=1e-12)


def test_ngram_in_every_image_has_zero_weight():
    # "a" is in both images: idf 0. Candidate "a" then has a zero vector and scores 0; for "a b" only "b"
    # carries the unigram cosine, which stays 1.
    cider = CiderD([["a b"], ["a c"]])
    assert cider.score(["a", "a b"], [["a b"], ["a b"]]) == pytest.approx([0.0, 5.0], abs=1e-12)


def test_mean_over_references():
    # Against "a b" the caption scores 5, against "c d" 0: the mean over the two references is 2.5.
    cider = CiderD([["a b"], ["c d"]])
    assert cider.score(["a b"], [["a b", "c d"]]) == pytest.approx([2.5], abs=1e-12)


def test_empty_and_unknown_candidates_score_zero():
    cider = CiderD([["a b"], ["c d"]])
    scores = cider.score(["", "x y z", "   "], [["a b"], ["a b"], ["c d"]])
    np.testing.assert_array_equal(scores, [0.0, 0.0, 0.0])
    assert cider.score([], []).shape == (0,)


def test_matches_pycocoevalcap_on_random_captions():
    rng = np.random.default_rng(0)
    refs = random_ref_lists(rng, 300)
    candidates = random_captions(rng, 300, 0, 16)
    # Words absent from the corpus, alone, inside known n-grams and repeated (tf 2 of an unseen unigram).
    candidates[:4] = ["", "zz", "w0 zz w1 w0 zz", "yy yy w2"]
    refs[5] = ["", candidates[5]]  # an empty reference string counts in the mean and contributes 0
    expected = coco_scores(candidates, refs)
    scores = CiderD(refs).score(candidates, refs)
    assert expected.max() > 1.0  # the data exercise real overlaps, not only zeros
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)


def test_matches_pycocoevalcap_with_other_sigma():
    rng = np.random.default_rng(1)
    refs = random_ref_lists(rng, 100)
    candidates = random_captions(rng, 100, 1, 20)
    expected = coco_scores(candidates, refs, sigma=2.0)
    np.testing.assert_allclose(CiderD(refs, sigma=2.0).score(candidates, refs), expected, rtol=0, atol=1e-6)


def test_references_outside_the_corpus_match_pycocoevalcap_with_corpus_df():
    # pycocoevalcap takes df from the references it scores and N from their count. Give its scorer the df of
    # a separate corpus of the same size instead: references with n-grams (and words) unseen in the corpus
    # then have df 0 on both sides.
    rng = np.random.default_rng(2)
    corpus = random_ref_lists(rng, 200)
    refs = random_ref_lists(rng, 200)
    refs[:3] = [["qq w0 w1", "w1 w2"], ["w3 qq qq"], ["rr ss tt uu"]]
    candidates = random_captions(rng, 200, 0, 14)
    candidates[:3] = ["qq w0 w1 qq", "qq qq", "rr ss tt uu vv"]

    df_scorer = CiderScorer()
    for corpus_refs in corpus:
        df_scorer += (None, corpus_refs)
    df_scorer.compute_doc_freq()
    scorer = CiderScorer()
    for cand, cand_refs in zip(candidates, refs, strict=True):
        scorer += (cand, cand_refs)
    scorer.document_frequency = df_scorer.document_frequency
    expected = np.array(scorer.compute_cider())

    scores = CiderD(corpus).score(candidates, refs)
    assert scores[2] > 0  # a match made only of n-grams that are unseen in the corpus
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)


def test_batch_equals_one_by_one_and_cache_is_reused():
    rng = np.random.default_rng(3)
    corpus = random_ref_lists(rng, 50)
    cider = CiderD(corpus)
    assert cider.cache_size == 50  # the corpus lists are cached at construction
    refs = corpus[:20] + random_ref_lists(rng, 10)
    # Shared candidate-only words across the batch must not link different captions.
    candidates = [c + " zz" for c in random_captions(rng, 30, 1, 12)]
    batch = cider.score(candidates, refs)
    assert cider.cache_size == 60
    one_by_one = np.concatenate([cider.score([c], [r]) for c, r in zip(candidates, refs, strict=True)])
    np.testing.assert_allclose(batch, one_by_one, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(cider.score(candidates, refs), batch)
    assert cider.cache_size == 60


def test_candidates_do_not_grow_the_vocabulary():
    cider = CiderD([["a b"], ["c d"]])
    words = len(cider._words)
    tables = [len(t) for t in cider._tables]
    cider.score(["new words every step", "a b novel"], [["a b"], ["c d"]])
    assert len(cider._words) == words
    assert [len(t) for t in cider._tables] == tables


def test_normalize_lowercases_and_strips_punctuation():
    corpus = [["a dog runs"], ["a cat sits"]]
    plain = CiderD(corpus).score(["a dog runs"], [["a dog sits"]])
    normalized = CiderD([["A dog, runs."], ["a CAT sits"]], normalize=True).score(
        ["A Dog runs!"], [["a dog sits."]]
    )
    np.testing.assert_allclose(normalized, plain, rtol=0, atol=1e-12)
    assert plain[0] > 0


def test_numpy_string_arrays_are_accepted():
    cider = CiderD([["a b"], ["c d"]])
    assert cider.score(np.array(["a b"]), [np.array(["a b"])]) == pytest.approx([5.0], abs=1e-12)


@pytest.mark.parametrize(
    ("candidates", "refs", "message"),
    [
        (["a", "b"], [["a"]], "differ in length: 2 candidates, 1 reference lists"),
        (["a", "b"], [["a"], []], r"refs\[1\] is an empty reference list"),
        (["a", 3], [["a"], ["b"]], r"candidates\[1\] must be a string, got int"),
        (["a"], [["a", None]], r"refs\[0\]\[1\] must be a string, got NoneType"),
        (["a"], ["a b"], r"refs\[0\] must be a list of reference strings, got str"),
        ("a b", [["a b"]], "candidates must be a list of strings, got str"),
    ],
)
def test_bad_score_input_raises(candidates, refs, message):
    with pytest.raises(ValueError, match=message):
        CiderD([["a b"], ["c d"]]).score(candidates, refs)


@pytest.mark.parametrize(
    ("corpus", "kwargs", "message"),
    [
        ([], {}, "corpus_refs is empty"),
        ([["a"], []], {}, r"corpus_refs\[1\] is an empty reference list"),
        ([["a", b"b"]], {}, r"corpus_refs\[0\]\[1\] must be a string, got bytes"),
        ([["a"]], {"sigma": 0.0}, "sigma must be > 0"),
    ],
)
def test_bad_corpus_raises(corpus, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CiderD(corpus, **kwargs)


def test_chunked_processing_gives_the_same_values(monkeypatch):
    # Inputs over _CHUNK sentences are processed in pieces (construction, reference caching and scoring);
    # shrink the chunk to exercise those paths on small data.
    rng = np.random.default_rng(4)
    refs = random_ref_lists(rng, 40)
    candidates = random_captions(rng, 40, 0, 12)
    other = random_ref_lists(rng, 40)
    expected = coco_scores(candidates, refs)
    expected_other = CiderD(refs).score(candidates, other)
    # 3 sentences: most chunks hold one or two lists, and lists of 4-5 references exceed the chunk alone.
    monkeypatch.setattr("clip_rl_trl.rewards.cider._CHUNK", 3)
    cider = CiderD(refs)
    assert cider.cache_size == 40
    np.testing.assert_allclose(cider.score(candidates, refs), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cider.score(candidates, other), expected_other, rtol=0, atol=1e-12)
