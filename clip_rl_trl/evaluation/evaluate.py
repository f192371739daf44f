"""``evaluate_captions``: every metric of the evaluation suite for one caption per image, as one flat dict."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.evaluation.distinctiveness import check_samples, cider_btw, self_cider_scores
from clip_rl_trl.evaluation.diversity import distinct_n, novelty, self_bleu, unique_share, vocab_size
from clip_rl_trl.evaluation.nlg import NLG_KEYS, check_refs, coco_caption_metrics
from clip_rl_trl.evaluation.oracle import oracle_metrics
from clip_rl_trl.evaluation.retrieval import check_embeddings, precision_at_1, recall_at_k
from clip_rl_trl.rewards.cider import CiderD
from clip_rl_trl.rewards.functional import clip_s, group_embedding_gap, refclip_s

__all__ = ["evaluate_captions"]

logger = logging.getLogger(__name__)

# Each distinct skip reason is logged once per process: evaluation runs every few hundred training steps.
_logged: set[str] = set()


class CaptionWorld(Protocol):
    """What the shapes-world metrics need from a world's language: a parser and two faithfulness scores.

    ``clip_rl_trl.data.shapes.ShapesLanguage()`` is one (the shapes world's grammar); the parameter that takes it
    is still called ``world=``.
    """

    def parse(self, caption: str) -> Any: ...

    def attribute_precision(self, caption: str, scene: Any) -> float | None: ...

    def attribute_recall(self, caption: str, scene: Any) -> float | None: ...


def _skip(skipped: dict[str, str], keys: Iterable[str], reason: str, warn: bool = False) -> None:
    """Record why ``keys`` are absent; environment problems are warned about, the caller's choices are info."""
    keys = list(keys)
    for key in keys:
        skipped[key] = reason
    if reason not in _logged:
        _logged.add(reason)
        logger.log(logging.WARNING if warn else logging.INFO, "%s skipped: %s", ", ".join(keys), reason)


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{i}] is {type(caption).__name__}, expected str")
    if len(captions) < 2:
        raise ValueError(
            f"evaluate_captions needs at least 2 captions (retrieval compares images), got {len(captions)}"
        )
    return list(captions)


def _check_groups(groups: object, n: int) -> Tensor:
    if not isinstance(groups, Tensor):
        raise TypeError(f"groups must be a LongTensor (N, K) of image indices, got {type(groups).__name__}")
    if groups.ndim != 2 or groups.shape[0] != n or groups.shape[1] < 1:
        raise ValueError(f"groups must have shape (N={n}, K>=1), got {tuple(groups.shape)}")
    if groups.is_floating_point() or groups.dtype == torch.bool or groups.is_complex():
        raise TypeError(f"groups must be an integer tensor, got {groups.dtype}")
    groups = groups.long()
    bad = ((groups < 0) | (groups >= n)).nonzero()
    if len(bad):
        i, k = (int(x) for x in bad[0])
        raise ValueError(f"groups[{i}, {k}] = {int(groups[i, k])} is not an image index in [0, {n})")
    own = (groups == torch.arange(n, device=groups.device).unsqueeze(1)).any(1).nonzero().flatten()
    if len(own):
        raise ValueError(
            f"groups row {int(own[0])} contains its own image; a similar-image group holds other images"
        )
    return groups


def _encode(
    scorer: ClipScorer, texts: list[str], prefix: str, device: torch.device, *more: list[str]
) -> list[Tensor]:
    """Embeddings of ``texts`` and of each list in ``more``, ``prefix`` prepended, float32 on ``device``.

    One ``encode_texts`` call over the distinct texts of all the lists: identical texts get bit-identical
    embeddings (exact ties for the retrieval metrics), and a caption equal to a reference is encoded once.
    """
    lists = [texts, *more]
    unique = list(dict.fromkeys(t for texts_ in lists for t in texts_))
    index = {text: i for i, text in enumerate(unique)}
    emb = scorer.encode_texts([prefix + text for text in unique]).float().to(device)
    return [
        emb[torch.tensor([index[t] for t in texts_], dtype=torch.long, device=device)] for texts_ in lists
    ]


def _mean_defined(values: Iterable[float | None], name: str) -> float | None:
    """Mean of the values that are not None (a caption with nothing to score); None when none are defined."""
    defined = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(
                f"world.{name} returned {type(v).__name__} for caption {i}, expected a number or None"
            )
        defined.append(float(v))
    return sum(defined) / len(defined) if defined else None


def evaluate_captions(
    captions: Sequence[str],
    image_emb: Tensor,
    scorer: ClipScorer,
    refs: Sequence[Sequence[str]] | None = None,
    groups: Tensor | None = None,
    *,
    train_captions: Iterable[str] | None = None,
    world: CaptionWorld | None = None,
    scenes: Sequence[Any] | None = None,
    p_at_1_candidates: int = 100,
    seed: int = 0,
    prompt: str | None = "A photo depicts ",
    recall_ks: Sequence[int] = (1, 5, 10),
    ties: str = "expected",
    clip_s_weight: float = 2.5,
    coco_metrics: bool = True,
    spice: bool = True,
    samples: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Evaluate N generated captions, one per image, with every metric of the suite.

    Args:
        captions: the N generated captions; caption i describes image i.
        image_emb: ``(N, D)`` L2-normalised CLIP embeddings of those N images (e.g. from the
            ``ImageEmbeddingCache``), by the same CLIP as ``scorer``.
        scorer: the ``ClipScorer`` that encodes the captions (each distinct caption once).
        refs: N lists of reference captions: enables RefCLIP-S and the pycocoevalcap metrics.
        groups: ``(N, K)`` integer indices into the N images, the similar-image group of each image: enables
            GEG-Avg / GEG-Min. Zhang et al.'s are built within the evaluated split by Eq. 2 over the references:
            ``groups_within_split(image_emb, 5, similarity="captions", scorer=scorer, refs=refs)``.
        train_captions: the training captions: enables ``novelty``.
        world, scenes: a world's language with ``parse`` / ``attribute_precision`` / ``attribute_recall``
            (``ShapesLanguage()``) and the N scenes of the images: enables ``grammar_valid``, ``attribute_precision``,
            ``attribute_recall``.
        p_at_1_candidates, seed: P@1 among this many images (the target and ``p_at_1_candidates - 1`` random
            distractors drawn with ``seed``); the key is ``p_at_1_<p_at_1_candidates>``.
        prompt: prepended to the captions *and* the references for CLIP-S and RefCLIP-S, as the official
            CLIPScore code does ("A photo depicts "); ``None`` or ``""`` scores the raw captions. The retrieval
            metrics and GEG always use the raw captions, as the retrieval rewards do.
        recall_ks: the K of ``recall_at_<K>`` (text-to-image) and ``i2t_recall_at_<K>`` (image-to-text).
        ties: tie policy of the retrieval metrics, ``"expected"`` or ``"strict"`` (see ``retrieval``).
        clip_s_weight: CLIPScore's ``w`` (2.5).
        coco_metrics: ``False`` skips BLEU / METEOR / ROUGE-L / CIDEr / SPICE (METEOR starts a JVM: seconds).
        spice: ``False`` skips SPICE.
        samples: N lists of m >= 2 captions per image (e.g. m sampled captions each): enables ``self_cider``.

    Returns:
        A flat dict of floats (``vocab_size`` is an int), with the keys ``recall_at_K``, ``i2t_recall_at_K``,
        ``p_at_1_<n>``, ``geg_avg``, ``geg_min``, ``cider_btw``, ``clip_s``, ``refclip_s``, ``bleu_1``..``bleu_4``,
        ``meteor``, ``rouge_l``, ``cider``, ``spice``, ``vocab_size``, ``unique_share``, ``distinct_1``,
        ``distinct_2``, ``novelty``, ``self_bleu``, ``self_cider``, ``grammar_valid``, ``attribute_precision``,
        ``attribute_recall``, the exact oracle's ``oracle_p_at_1_<n>``, ``oracle_recall_at_1`` and
        ``oracle_p_at_1_similar`` (a world with ``consistent``), and ``skipped``: a dict from each metric that is
        absent to the reason (also logged, once per reason).
    """
    captions = _check_captions(captions)
    n = len(captions)
    if not isinstance(scorer, ClipScorer) and not callable(getattr(scorer, "encode_texts", None)):
        raise TypeError(f"scorer must be a ClipScorer, got {type(scorer).__name__}")
    img = check_embeddings("image_emb", image_emb, rows=n)
    if refs is not None:
        refs = check_refs(refs, n)
    if groups is not None:
        groups = _check_groups(groups, n).to(img.device)
    if (world is None) != (scenes is None):
        raise ValueError(
            "world and scenes go together: pass both (ShapesLanguage() and the N scenes) or neither"
        )
    if scenes is not None and len(scenes) != n:
        raise ValueError(f"got {n} captions but {len(scenes)} scenes")
    if samples is not None:
        samples = check_samples(samples)
        if len(samples) != n:
            raise ValueError(f"got {n} captions but {len(samples)} sample lists: samples[i] are image i's captions")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    prompt = prompt or ""

    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    # Retrieval and GEG read the raw captions; CLIP-S and RefCLIP-S the prompted captions and references.
    flat_refs = [r for rs in refs for r in rs] if refs is not None else []
    if prompt:
        (txt,) = _encode(scorer, captions, "", img.device)
        txt_s, flat_emb = _encode(scorer, captions, prompt, img.device, flat_refs)
    else:
        txt, flat_emb = _encode(scorer, captions, "", img.device, flat_refs)
        txt_s = txt
    if txt.shape[1] != img.shape[1]:
        raise ValueError(
            f"the scorer embeds texts in {txt.shape[1]} dimensions but image_emb has {img.shape[1]}: "
            "embed the images with the same CLIP as the scorer"
        )

    # Retrieval (Zhang et al. 2022 R@K-CLIP, both directions; Dessì et al. 2023 P@1 among 100).
    for k, r in recall_at_k(txt, img, recall_ks, ties=ties).items():
        results[f"recall_at_{k}"] = r
    for k, r in recall_at_k(img, txt, recall_ks, ties=ties).items():
        results[f"i2t_recall_at_{k}"] = r
    results[f"p_at_1_{p_at_1_candidates}"] = precision_at_1(txt, img, p_at_1_candidates, seed=seed, ties=ties)

    # Group Embedding Gap (Zhang et al. 2022, Eqs. 3-4), over each image's similar-image group.
    if groups is None:
        _skip(skipped, ("geg_avg", "geg_min"), "no similar-image groups given (groups=None)")
    else:
        group_emb = img[groups]
        results["geg_avg"] = float(group_embedding_gap(txt, img, group_emb, reduce="avg").mean())
        results["geg_min"] = float(group_embedding_gap(txt, img, group_emb, reduce="min").mean())

    # CIDErBtw (Wang et al. 2020): CIDEr-D against the references of the same similar-image groups; lower is more
    # distinctive. Document frequencies from the references given (evaluation/distinctiveness.py).
    needs_corpus = refs is not None and (groups is not None or samples is not None)
    corpus = CiderD(refs, normalize=True) if needs_corpus else None
    if refs is None:
        _skip(skipped, ("cider_btw",), "no references given (refs=None)")
    elif groups is None:
        _skip(skipped, ("cider_btw",), "no similar-image groups given (groups=None)")
    else:
        results["cider_btw"] = cider_btw(captions, refs, groups, corpus)

    # CLIP-S / RefCLIP-S (Hessel et al. 2021), with CLIPScore's prompt on captions and references.
    results["clip_s"] = float(clip_s(img, txt_s, w=clip_s_weight).mean())
    if refs is None:
        _skip(skipped, ("refclip_s",), "no references given (refs=None)")
    else:
        width = max(len(rs) for rs in refs)
        ref_emb = flat_emb.new_zeros(n, width, flat_emb.shape[1])
        ref_mask = torch.zeros(n, width, dtype=torch.bool, device=img.device)
        start = 0
        for i, rs in enumerate(refs):
            ref_emb[i, : len(rs)] = flat_emb[start : start + len(rs)]
            ref_mask[i, : len(rs)] = True
            start += len(rs)
        results["refclip_s"] = float(refclip_s(img, txt_s, ref_emb, ref_mask, w=clip_s_weight).mean())

    # BLEU, METEOR, ROUGE-L, CIDEr, SPICE through pycocoevalcap.
    nlg_keys = NLG_KEYS + (("spice",) if spice else ())
    if refs is None:
        _skip(skipped, nlg_keys, "no references given (refs=None)")
    elif not coco_metrics:
        _skip(skipped, nlg_keys, "coco_metrics=False")
    else:
        scores, failed = coco_caption_metrics(captions, refs, spice=spice)
        results.update(scores)
        by_reason: dict[str, list[str]] = {}
        for key, reason in failed.items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            _skip(skipped, keys, reason, warn=True)

    # Diversity of the caption set.
    results["vocab_size"] = vocab_size(captions)
    results["unique_share"] = unique_share(captions)
    results["distinct_1"] = distinct_n(captions, 1)
    results["distinct_2"] = distinct_n(captions, 2)
    if train_captions is None:
        _skip(skipped, ("novelty",), "no training captions given (train_captions=None)")
    else:
        results["novelty"] = novelty(captions, train_captions)
    results["self_bleu"] = self_bleu(captions)
    # Self-CIDEr (Wang and Chan 2019): diversity of the m captions of each image, averaged over the images.
    if samples is None:
        _skip(skipped, ("self_cider",), "needs several captions per image: pass samples= (N lists of m >= 2 "
              "captions)")
    else:
        per_image = self_cider_scores(samples, corpus if corpus is not None else CiderD(samples, normalize=True))
        defined = [v for v in per_image if v is not None]
        if defined:
            results["self_cider"] = sum(defined) / len(defined)
        else:
            _skip(skipped, ("self_cider",), "Self-CIDEr is undefined for every image: all sampled captions have "
                  "all-zero tf-idf vectors (empty, or only n-grams found in every document)", warn=True)

    # Shapes world: fluency (does the caption parse?) and faithfulness against the scene.
    shapes_keys = ("grammar_valid", "attribute_precision", "attribute_recall")
    if world is None:
        _skip(skipped, shapes_keys, "no world and scenes given (shapes world only)")
    else:
        results["grammar_valid"] = sum(world.parse(c) is not None for c in captions) / n
        for key in shapes_keys[1:]:
            method = getattr(world, key)
            value = _mean_defined((method(c, s) for c, s in zip(captions, scenes, strict=True)), key)
            if value is None:
                _skip(skipped, (key,), f"world.{key} is undefined (None) for every caption")
            else:
                results[key] = value
        # An exact judge: would a perfect reader of the grammar pick out the image? (evaluation/oracle.py)
        if hasattr(world, "consistent"):
            results.update(oracle_metrics(captions, scenes, world, p_at_1_candidates, seed=seed, groups=groups,
                                          ties=ties))

    results["skipped"] = skipped
    return results
