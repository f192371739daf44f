"""CIDEr-D (Vedantam et al. 2015) with document frequencies fixed on a corpus, vectorised with numpy.

The values are those of pycocoevalcap's ``Cider`` (the CIDEr-D variant used by the COCO caption evaluation
and by SCST): n-grams n = 1..4, tf-idf vectors, candidate weights clipped by the reference weights, a Gaussian
length penalty with sigma = 6, mean over n, mean over references, times 10. pycocoevalcap recomputes
document frequencies from the references it is scoring; :class:`CiderD` takes them once from a fixed corpus,
so ``CiderD(refs).score(candidates, refs)`` equals ``Cider().compute_score(gts, res)`` on the same data.

Speed comes from three things: n-grams are integer codes built with numpy (no Python tuple per n-gram); the
tf-idf vectors of each reference list are computed once and cached under the tuple of its strings; the
clipped dot products of a whole batch are one ``searchsorted`` plus one ``bincount``.
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

# An order-k n-gram is the integer ``(id of its first k-1 words) << _WORD_BITS | id of its last word``, looked up
# in a sorted per-order table that gives it a compact id: exact (no hashing) and stable across calls.
_WORD_BITS = 24
_MAX_WORDS = 1 << _WORD_BITS
# Within a batch an n-gram occurrence is keyed ``sentence << _KEY_BITS | id << _ORDER_BITS | (k - 1)``.
_ORDER_BITS = 3
_KEY_BITS = 40
_KEY_MASK = (1 << _KEY_BITS) - 1
_ORDER_MASK = (1 << _ORDER_BITS) - 1
# Sentence indices of one batch must fit in the 23 bits left above the key; larger inputs are chunked.
_CHUNK = 1 << 20

# CIDEr-D sums n-grams of orders 1..4 (pycocoevalcap's ``Cider`` only works with this value).
_N = 4

_PUNCTUATION = str.maketrans("", "", string.punctuation)


class _RefVectors(NamedTuple):
    """The cached tf-idf vectors of one reference list (all n-gram orders together)."""

    ngrams: np.ndarray  # (E,) int32 (int64 for huge tables), ``id << _ORDER_BITS | (k - 1)``
    weights: np.ndarray  # (E,) float64, tf * idf
    ref_index: np.ndarray  # (E,) uint8 (int32 past 255 references), which reference of the list
    norms: np.ndarray  # (R, n) float64, L2 norm of each reference's order-k vector
    lengths: np.ndarray  # (R,) int64, the length used by the penalty (see ``_penalty_lengths``)


class _Bag(NamedTuple):
    """Term frequencies of a batch of sentences, sorted by (sentence, n-gram)."""

    keys: np.ndarray  # (E,) int64, ``sentence << _KEY_BITS | ngram``
    weights: np.ndarray  # (E,) float64, tf * idf
    norms: np.ndarray  # (S, n) float64
    lengths: np.ndarray  # (S,) int64


class CiderD:
    """CIDEr-D with document frequencies computed once from ``corpus_refs``.

    ``corpus_refs`` is a list with one entry per image, each a non-empty list of reference captions. Document
    frequencies count, for each n-gram, the images whose references contain it; ``N = len(corpus_refs)``.
    N-grams absent from the corpus have document frequency 0, clipped to 1 as in pycocoevalcap (idf
    ``log N``). ``score(candidates, refs)`` gives one CIDEr-D value per candidate, against its own references;
    the references need not come from the corpus.

    Tokenisation: each string is split on whitespace, nothing else, exactly as pycocoevalcap does after its PTB
    tokenizer, so pass captions already tokenised and lowercased the way your corpus is.
    ``normalize=True`` lowercases and deletes ASCII punctuation before splitting (a convenience for raw text;
    it is not the PTB tokenizer, so values then differ from pycocoevalcap on punctuated text).

    Reference vectors are cached per reference list (keyed by the tuple of its strings, about 3 KB per list of
    five COCO-length captions), so the trainer's repeated calls on the same images only pay for the candidates.
    """

    def __init__(
        self, corpus_refs: Sequence[Sequence[str]], sigma: float = 6.0, normalize: bool = False
    ) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        _check_ref_lists(corpus_refs, "corpus_refs")
        if len(corpus_refs) == 0:
            raise ValueError("corpus_refs is empty: document frequencies need at least one image")
        self.sigma = float(sigma)
        self.normalize = normalize
        self.num_images = len(corpus_refs)
        # pycocoevalcap's ``ref_len``: log of the number of images in the document-frequency corpus.
        self._log_n = math.log(float(self.num_images))
        self._words: dict[str, int] = {}
        self._tables: list[np.ndarray] = [np.empty(0, np.int64) for _ in range(_N)]
        self._table_ids: list[np.ndarray] = [np.empty(0, np.int64) for _ in range(_N)]
        self._idf: list[np.ndarray] = [np.empty(0, np.float64) for _ in range(_N)]
        self._cache: dict[tuple[str, ...], _RefVectors] = {}

        lists = [tuple(refs) for refs in corpus_refs]
        sentences = [s for refs in lists for s in refs]
        image_of = np.repeat(np.arange(self.num_images, dtype=np.int64), [len(refs) for refs in lists])
        per_order = self._encode(sentences, extend=True)
        for k, (sent, ids) in enumerate(per_order):
            size = len(self._idf[k])
            # df(g) = number of distinct images with g in at least one of their references.
            df = np.bincount(_unique(image_of[sent] * size + ids) % size, minlength=size)
            self._idf[k] = self._idf_from_df(df)
        # The trainer scores against these very lists: cache their vectors now, from the same encoding.
        for start, stop in _chunks(lists):
            if (start, stop) == (0, len(lists)):
                self._store(lists, self._bag(per_order, len(sentences)))
            else:
                self._cache_lists(lists[start:stop])

    def _idf_from_df(self, df: np.ndarray) -> np.ndarray:
        """idf(g) = log N - log max(1, df(g)) (pycocoevalcap ``counts2vec``; Vedantam et al. 2015, Eq. 1)."""
        return self._log_n - np.log(np.maximum(df, 1).astype(np.float64))

    @property
    def cache_size(self) -> int:
        """Number of reference lists whose vectors are cached."""
        return len(self._cache)

    def score(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its references, as a float64 array of ``len(candidates)``.

        With ``g^k(s)`` the tf-idf vector of the order-k n-grams of sentence ``s`` (tf times
        ``log N - log max(1, df)``), ``l(s)`` the length of ``s`` and ``m`` references ``s_1..s_m``
        (Vedantam et al. 2015: Eq. 1-3 define CIDEr, the CIDEr-D variant adds the clipping, the penalty and the
        factor 10; this is pycocoevalcap's ``Cider``)::

            CIDEr-D_k(c, S) = 10/m * sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                              * <min(g^k(c), g^k(s_j)), g^k(s_j)> / (||g^k(c)|| ||g^k(s_j)||)
            CIDEr-D(c, S)  = 1/n * sum_{k=1..n} CIDEr-D_k(c, S)

        with n = 4 and sigma = 6 by default. A cosine whose norm product is 0 stays 0. As in pycocoevalcap,
        ``l`` is the number of bigrams, ``max(words - 1, 0)``; it differs from the word count only for empty
        sentences, whose cosines are 0 anyway. Empty candidates score 0.
        """
        if not _is_list_like(candidates):
            raise ValueError(f"candidates must be a list of strings, got {type(candidates).__name__}")
        if not _is_list_like(refs):
            raise ValueError(f"refs must be a list of reference lists, got {type(refs).__name__}")
        if len(candidates) != len(refs):
            raise ValueError(
                f"candidates and refs differ in length: {len(candidates)} candidates, {len(refs)} reference lists"
            )
        for i, cand in enumerate(candidates):
            if not isinstance(cand, str):
                raise ValueError(f"candidates[{i}] must be a string, got {type(cand).__name__}")
        _check_ref_lists(refs, "refs")
        if len(candidates) == 0:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate(
            [
                self._score_chunk(candidates[a : a + _CHUNK], refs[a : a + _CHUNK])
                for a in range(0, len(candidates), _CHUNK)
            ]
        )

    def _score_chunk(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        keys = [tuple(r) for r in refs]
        # References first: their unseen n-grams join the permanent tables, so that any candidate n-gram
        # still unknown afterwards cannot occur in these references and only counts towards the norm.
        self._cache_refs(keys)
        entries = [self._cache[key] for key in keys]
        cand = self._bag(self._encode(candidates, extend=False), len(candidates))

        num = len(candidates)
        refs_per_item = np.fromiter((len(e.lengths) for e in entries), np.int64, count=num)
        pair_start = np.cumsum(refs_per_item) - refs_per_item
        item_of_pair = np.repeat(np.arange(num, dtype=np.int64), refs_per_item)
        entries_per_item = np.fromiter((len(e.ngrams) for e in entries), np.int64, count=num)
        item = np.repeat(np.arange(num, dtype=np.int64), entries_per_item)
        ref_ngrams = np.concatenate([e.ngrams for e in entries])
        ref_weights = np.concatenate([e.weights for e in entries])
        pair = pair_start[item] + np.concatenate([e.ref_index for e in entries])
        ref_norms = np.concatenate([e.norms for e in entries])
        ref_lengths = np.concatenate([e.lengths for e in entries])

        # Numerators: for every reference n-gram, the candidate entry with the same (caption, n-gram) key.
        num_pairs = len(item_of_pair)
        dots = np.zeros(num_pairs * _N, dtype=np.float64)
        if len(cand.keys):
            ref_keys = (item << _KEY_BITS) | ref_ngrams
            pos = np.minimum(np.searchsorted(cand.keys, ref_keys), len(cand.keys) - 1)
            hit = cand.keys[pos] == ref_keys
            r = ref_weights[hit]
            clipped = np.minimum(cand.weights[pos[hit]], r) * r
            order = ref_ngrams[hit] & _ORDER_MASK
            dots = np.bincount(pair[hit] * _N + order, weights=clipped, minlength=num_pairs * _N)
        dots = dots.reshape(num_pairs, _N)
        denom = cand.norms[item_of_pair] * ref_norms
        # A zero norm means a zero vector, so a zero dot product: the cosine stays 0 (as in pycocoevalcap).
        cosine = np.divide(dots, denom, out=np.zeros_like(denom), where=denom != 0)
        delta = (cand.lengths[item_of_pair] - ref_lengths).astype(np.float64)
        penalty = np.exp(-(delta**2) / (2.0 * self.sigma**2))
        per_pair = cosine.mean(axis=1) * penalty
        return 10.0 * np.bincount(item_of_pair, weights=per_pair, minlength=num) / refs_per_item

    def _cache_refs(self, keys: list[tuple[str, ...]]) -> None:
        """Compute and cache the vectors of the reference lists in ``keys`` not cached yet."""
        missing = list(dict.fromkeys(key for key in keys if key not in self._cache))
        for start, stop in _chunks(missing):
            self._cache_lists(missing[start:stop])

    def _cache_lists(self, lists: list[tuple[str, ...]]) -> None:
        sentences = [s for refs in lists for s in refs]
        self._store(lists, self._bag(self._encode(sentences, extend=True), len(sentences)))

    def _store(self, lists: list[tuple[str, ...]], bag: _Bag) -> None:
        """Cache one ``_RefVectors`` per list (views of shared arrays) from the bag of their sentences."""
        counts = np.array([len(refs) for refs in lists], dtype=np.int64)
        first_sentence = np.cumsum(counts) - counts
        sent = bag.keys >> _KEY_BITS
        list_of = np.repeat(np.arange(len(lists), dtype=np.int64), counts)[sent]
        # Within a list, entries sorted by n-gram: the batch's lookup keys then arrive almost sorted, which
        # makes ``searchsorted`` in ``_score_chunk`` several times faster.
        by_ngram = np.argsort((list_of << _KEY_BITS) | (bag.keys & _KEY_MASK))
        sent = sent[by_ngram]
        ngrams = bag.keys[by_ngram] & _KEY_MASK
        weights = bag.weights[by_ngram]
        local = sent - first_sentence[list_of[by_ngram]]
        # The cache is most of CiderD's memory: store n-grams and reference indices in the smallest dtype.
        # (No uint64: mixed with int64 it would promote to float.)
        ngrams = ngrams.astype(np.int32 if ngrams.max(initial=0) < 2**31 else np.int64)
        local = local.astype(np.uint8 if counts.max() < 2**8 else np.int32)
        bounds = np.searchsorted(list_of[by_ngram], np.arange(len(lists) + 1)).tolist()
        first = first_sentence.tolist()
        for i, refs in enumerate(lists):
            lo, hi, s0 = bounds[i], bounds[i + 1], first[i]
            self._cache[refs] = _RefVectors(
                ngrams[lo:hi],
                weights[lo:hi],
                local[lo:hi],
                bag.norms[s0 : s0 + len(refs)],
                bag.lengths[s0 : s0 + len(refs)],
            )

    def unit_tfidf(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tf-idf vectors CIDEr compares, per n-gram order normalised to unit length, of ``sentences``
        (with this corpus's document frequencies; an n-gram unseen in it gets idf log N), as sparse entries
        ``(sentence index, feature, value)`` sorted by sentence. A feature is one (n-gram, order) pair, so
        ``10 / 4 * <v_a, v_b>`` is Vedantam et al.'s CIDEr of two sentences (no clipping, no length penalty)."""
        bag = self._bag(self._encode(list(sentences), extend=False), len(sentences))
        sentence = bag.keys >> _KEY_BITS
        feature = bag.keys & _KEY_MASK
        norm = bag.norms[sentence, feature & _ORDER_MASK]
        unit = np.divide(bag.weights, norm, out=np.zeros_like(bag.weights), where=norm != 0)
        return sentence, feature, unit

    def _bag(self, per_order: list[tuple[np.ndarray, np.ndarray]], num_sentences: int) -> _Bag:
        """Term frequencies, tf-idf weights, per-order norms and penalty lengths of encoded sentences."""
        keys = np.concatenate(
            [(sent << _KEY_BITS) | (ids << _ORDER_BITS) | k for k, (sent, ids) in enumerate(per_order)]
        )
        keys, tf = np.unique(keys, return_counts=True)
        sent = keys >> _KEY_BITS
        order = keys & _ORDER_MASK
        ids = (keys & _KEY_MASK) >> _ORDER_BITS
        weights = np.empty(len(keys), dtype=np.float64)
        for k in range(_N):
            at = order == k
            g = ids[at]
            known = g < len(self._idf[k])
            # Ids past the table are this call's candidate-only n-grams: df 0, idf log N.
            idf = np.full(len(g), self._log_n)
            idf[known] = self._idf[k][g[known]]
            weights[at] = tf[at] * idf
        norms = np.sqrt(
            np.bincount(sent * _N + order, weights=weights**2, minlength=num_sentences * _N)
        ).reshape(num_sentences, _N)
        # pycocoevalcap's length: the number of bigram occurrences.
        lengths = np.bincount(per_order[1][0], minlength=num_sentences)
        return _Bag(keys, weights, norms, lengths)

    def _encode(self, sentences: Sequence[str], extend: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each order k, the (sentence index, n-gram id) of every n-gram occurrence in ``sentences``.

        With ``extend`` (references), unseen words and n-grams join the permanent tables with df 0. Without it
        (candidates), they get ids past the tables, valid for this call only, so candidates never grow them.
        """
        if self.normalize:
            sentences = [s.translate(_PUNCTUATION).lower() for s in sentences]
        tokens = list(map(str.split, sentences))
        words = self._word_ids(list(itertools.chain.from_iterable(tokens)), extend)
        lengths = np.fromiter(map(len, tokens), np.int64, count=len(tokens))
        sentence_of = np.repeat(np.arange(len(tokens), dtype=np.int64), lengths)

        out = []
        prefix = np.zeros(len(words), dtype=np.int64)  # id of the (k-1)-gram starting at each position
        for k in range(_N):
            starts = max(len(words) - k, 0)
            valid = sentence_of[:starts] == sentence_of[k : k + starts]
            codes = ((prefix[:starts] << _WORD_BITS) | words[k : k + starts])[valid]
            ids = self._ngram_ids(k, codes, extend)
            prefix = np.zeros(starts, dtype=np.int64)
            prefix[valid] = ids
            out.append((sentence_of[:starts][valid], ids))
        return out

    def _word_ids(self, tokens: list[str], extend: bool) -> np.ndarray:
        vocab = self._words
        ids = np.fromiter(map(vocab.get, tokens, itertools.repeat(-1)), np.int64, count=len(tokens))
        unknown = np.flatnonzero(ids < 0)
        if len(unknown):
            # Unseen words join the vocabulary (references) or get ids past it for this call (candidates).
            missing = [tokens[i] for i in unknown.tolist()]
            new_words = dict.fromkeys(missing)
            start = len(vocab)
            table = vocab if extend else {}
            table.update(zip(new_words, range(start, start + len(new_words)), strict=True))
            if start + len(new_words) > _MAX_WORDS:
                raise ValueError(
                    f"more than {_MAX_WORDS} distinct words: CiderD's n-gram codes cannot hold them"
                )
            ids[unknown] = np.fromiter(map(table.__getitem__, missing), np.int64, count=len(missing))
        return ids

    def _ngram_ids(self, k: int, codes: np.ndarray, extend: bool) -> np.ndarray:
        """Compact ids of order-(k+1) n-gram codes; unseen codes get ids past the table (kept if ``extend``)."""
        table, table_ids = self._tables[k], self._table_ids[k]
        ids = np.empty(len(codes), dtype=np.int64)
        if len(table):
            pos = np.minimum(np.searchsorted(table, codes), len(table) - 1)
            found = table[pos] == codes
            ids[found] = table_ids[pos[found]]
        else:
            found = np.zeros(len(codes), dtype=bool)
        missing = ~found
        if missing.any():
            new, inverse = np.unique(codes[missing], return_inverse=True)
            base = len(self._idf[k])
            ids[missing] = base + inverse.reshape(-1)
            if extend:
                at = np.searchsorted(table, new)
                self._tables[k] = np.insert(table, at, new)
                self._table_ids[k] = np.insert(table_ids, at, base + np.arange(len(new), dtype=np.int64))
                self._idf[k] = np.concatenate([self._idf[k], np.full(len(new), self._log_n)])
        return ids


def _check_ref_lists(ref_lists: Sequence[Sequence[str]], name: str) -> None:
    """Raise ``ValueError`` naming the first entry that is not a non-empty list of strings."""
    if not _is_list_like(ref_lists):
        raise ValueError(f"{name} must be a list of reference lists, got {type(ref_lists).__name__}")
    for i, refs in enumerate(ref_lists):
        if not _is_list_like(refs):
            raise ValueError(f"{name}[{i}] must be a list of reference strings, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(
                f"{name}[{i}] is an empty reference list: each caption needs at least one reference"
            )
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"{name}[{i}][{j}] must be a string, got {type(ref).__name__}")


def _is_list_like(obj: object) -> bool:
    """A list, tuple, numpy array or other indexable sized container, but not a bare string."""
    return not isinstance(obj, (str, bytes)) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__")


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (numpy 2's hash-based ``np.unique`` is many times slower on int64 keys)."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def _chunks(lists: Sequence[tuple[str, ...]]) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of at most ``_CHUNK`` sentences (or one longer list), to keep indices in the key bits."""
    start = 0
    while start < len(lists):
        stop, num_sentences = start, 0
        while stop < len(lists) and (stop == start or num_sentences + len(lists[stop]) <= _CHUNK):
            num_sentences += len(lists[stop])
            stop += 1
        yield start, stop
        start = stop
