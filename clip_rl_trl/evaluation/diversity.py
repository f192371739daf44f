"""Diversity of a set of generated captions: vocabulary, unique captions, distinct-n, novelty, self-BLEU (pure
Python, no Java).

Every function splits captions into lowercased words with :func:`words` (runs of letters and digits, inner
apostrophes kept), so "A red circle." and "a red circle" are the same caption here.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["distinct_n", "novelty", "self_bleu", "unique_share", "vocab_size", "words"]

_WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    """Lowercased word tokens of ``text``; punctuation is dropped."""
    if not isinstance(text, str):
        raise TypeError(f"expected a caption string, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def _tokenized(captions: Sequence[str], name: str = "captions") -> list[list[str]]:
    if isinstance(captions, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string")
    out = []
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"{name}[{i}] is {type(caption).__name__}, expected str")
        out.append(words(caption))
    return out


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def vocab_size(captions: Sequence[str]) -> int:
    """Number of distinct words over all captions."""
    return len({w for tokens in _tokenized(captions) for w in tokens})


def unique_share(captions: Sequence[str]) -> float:
    r"""Share of the captions that are distinct: distinct captions / number of captions.

    .. math:: \text{unique share} = \frac{|\{\mathrm{words}(c_i)\}_{i=1}^N|}{N}

    Captions are compared as word sequences (:func:`words`), so "A red circle." and "a red circle" are one caption.
    1.0 when every image gets its own caption; 1/N when a captioner writes the same caption for every image (the
    collapse "a circle" for every scene). Captioning papers report this share of distinct captions beside the
    vocabulary size (:func:`vocab_size`); no single paper's definition is followed here, and comparing word
    sequences rather than raw strings is this library's choice.

    Raises:
        ValueError: no captions.
    """
    tokenized = _tokenized(captions)
    if not tokenized:
        raise ValueError("unique_share needs at least one caption, got none")
    return len({tuple(tokens) for tokens in tokenized}) / len(tokenized)


def distinct_n(captions: Sequence[str], n: int) -> float:
    r"""Distinct-n over the whole set: unique n-grams divided by all n-gram occurrences.

    .. math:: \text{distinct-}n = \frac{|\{\text{n-grams of all captions}\}|}{\sum_c \#\text{n-grams}(c)}

    Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models" (NAACL), in
    the per-n-gram form used for captions (Li et al. divide by the number of words; the two agree for n = 1).
    Captions shorter than n contribute no n-gram; a set with no n-gram at all gives 0.0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    grams = [g for tokens in _tokenized(captions) for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def novelty(captions: Sequence[str], train_captions: Iterable[str]) -> float:
    """Share of generated captions that do not occur in ``train_captions`` (compared as word sequences)."""
    seen = {" ".join(tokens) for tokens in _tokenized(list(train_captions), "train_captions")}
    tokenized = _tokenized(captions)
    if not tokenized:
        raise ValueError("novelty needs at least one caption")
    return sum(" ".join(tokens) not in seen for tokens in tokenized) / len(tokenized)


def self_bleu(captions: Sequence[str], n: int = 4) -> float:
    r"""Self-BLEU: mean sentence BLEU-n of each caption with every *other* generated caption as reference.

    .. math:: \text{Self-BLEU} = \frac{1}{N} \sum_{i=1}^{N} \mathrm{BLEU}_n(c_i; \{c_j\}_{j \ne i})

    Zhu et al. 2018, "Texygen: A Benchmarking Platform for Text Generation Models" (SIGIR; lower is more
    diverse). Sentence BLEU is exactly pycocoevalcap's per-caption BLEU (``BleuScorer``, "closest" reference
    length, its 1e-15 / 1e-9 smoothing), computed for all N captions in one pass: the clipped count of an
    n-gram against the other captions is its largest count in any other caption, read from the largest and
    second-largest count over the whole set. Linear in the number of n-grams, so N = 5000 takes well under a
    second, with no sampling.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    tokenized = _tokenized(captions)
    if len(tokenized) < 2:
        raise ValueError(f"self-BLEU needs at least 2 captions, got {len(tokenized)}")
    counts = [Counter(g for k in range(1, n + 1) for g in _ngrams(tokens, k)) for tokens in tokenized]
    # Per n-gram: [largest count, how many captions reach it, largest count below it].
    top: dict[tuple[str, ...], list[int]] = {}
    for count in counts:
        for gram, c in count.items():
            entry = top.get(gram)
            if entry is None:
                top[gram] = [c, 1, 0]
            elif c > entry[0]:
                entry[:] = [c, 1, entry[0]]
            elif c == entry[0]:
                entry[1] += 1
            elif c > entry[2]:
                entry[2] = c
    lengths = Counter(len(tokens) for tokens in tokenized)
    reflen_cache: dict[int, int] = {}
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's smoothing constants
    total = 0.0
    for tokens, count in zip(tokenized, counts, strict=True):
        testlen = len(tokens)
        correct = [0] * n
        for gram, c in count.items():
            best, ties, second = top[gram]
            other_max = best if c < best or ties > 1 else second
            correct[len(gram) - 1] += min(c, other_max)
        if testlen not in reflen_cache:
            # pycocoevalcap's "closest" reference length: min over the others of (|len - testlen|, len).
            others = [size for size, m in lengths.items() if size != testlen or m > 1]
            reflen_cache[testlen] = min(others, key=lambda size: (abs(size - testlen), size))
        reflen = reflen_cache[testlen]
        bleu = 1.0
        for k in range(n):
            bleu *= (correct[k] + tiny) / (max(0, testlen - k) + small)
        bleu **= 1.0 / n
        ratio = (testlen + tiny) / (reflen + small)
        if ratio < 1:
            bleu *= math.exp(1 - 1 / ratio)
        total += bleu
    return total / len(tokenized)
