"""Reward functions for TRL: ``reward(prompts, completions, completion_ids, **columns) -> list[float]``.

Each class here is a plain callable (not an ``nn.Module``: TRL would treat a module as a sequence classifier)
with a ``__name__`` that TRL uses in its metric names (``rewards/<name>/mean``). They work unchanged as
``reward_funcs`` of a stock ``trl.GRPOTrainer`` and of :class:`~clip_rl_trl.CaptionRLTrainer`.

The dataset's columns arrive as keyword arguments, one value per completion (TRL repeats each row
``num_generations`` times). The CLIP rewards look the images up in an
:class:`~clip_rl_trl.embeddings.ImageEmbeddingCache` by the ``id_column`` and read the completions' text
embeddings from :meth:`ClipScorer.encode_texts_shared`, so all the CLIP rewards of a step share one text pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.embeddings import ImageEmbeddingCache
from clip_rl_trl.rewards import functional as RF
from clip_rl_trl.rewards.cider import CiderD
from clip_rl_trl.rewards.discriminator import Discriminator
from clip_rl_trl.rewards.grammar import GrammarHead, load_text_tower, save_text_tower, train_grammar_head
from clip_rl_trl.rewards.registry import RewardEnv, register_reward

__all__ = [
    "ClipReward",
    "BidirectionalReward",
    "CiderReward",
    "ClipSReward",
    "DiscriminatorReward",
    "GrammarReward",
    "GroupGapReward",
    "RetrievalReward",
    "completion_texts",
]


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """Completions as plain strings: TRL passes strings, or message lists for conversational data."""
    texts = []
    for i, completion in enumerate(completions):
        if isinstance(completion, str):
            texts.append(completion)
        elif isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
            content = completion[-1].get("content", "")
            if isinstance(content, list):  # multimodal message: keep its text parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            texts.append(str(content))
        else:
            raise TypeError(f"completions[{i}] is {type(completion).__name__}: expected a string or a message list")
    return texts


def _column(columns: Mapping[str, Any], name: str, n: int, reward: str) -> list[Any]:
    """The dataset column ``name`` as a list of ``n`` values; a clear error when it is missing or misaligned."""
    if name not in columns:
        available = sorted(k for k in columns if k not in ("trainer_state", "log_extra", "log_metric"))
        raise ValueError(
            f"reward {reward!r} needs the dataset column {name!r}, which the batch does not have; "
            f"columns present: {available}"
        )
    values = list(columns[name])
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return values


def _owners(ids: Sequence[Any]) -> torch.Tensor:
    """Integer owner per row: equal for rows of the same image id (first-seen order)."""
    first: dict[Any, int] = {}
    return torch.tensor([first.setdefault(i, len(first)) for i in ids], dtype=torch.long)


def _references_once(
    ids: Sequence[Any], refs: Sequence[Any], column: str, reward: str
) -> tuple[list[str], list[Any]]:
    """Each distinct image's reference captions once (however many samples it has), with their image ids.

    A row's references must be a list of non-empty strings; anything else is a ``ValueError`` naming the
    reward, the completion (row), the image id and the column."""
    if len(refs) != len(ids):
        raise ValueError(f"reward {reward!r}: {len(refs)} rows of column {column!r} for {len(ids)} image ids")
    texts: list[str] = []
    text_ids: list[Any] = []
    seen: set[Any] = set()
    for row, (image_id, image_refs) in enumerate(zip(ids, refs, strict=True)):
        if image_id in seen:
            continue
        seen.add(image_id)
        where = f"reward {reward!r}, completion {row}"
        if isinstance(image_refs, (str, bytes)) or not isinstance(image_refs, Iterable):
            raise ValueError(
                f"{where}: the references of image {image_id!r} in column {column!r} are a "
                f"{type(image_refs).__name__}, expected a list of strings"
            )
        image_refs = list(image_refs)
        for j, ref in enumerate(image_refs):
            if not isinstance(ref, str) or not ref.strip():
                what = (
                    "empty" if isinstance(ref, str) else "None" if ref is None else f"a {type(ref).__name__}"
                )
                raise ValueError(
                    f"{where}: reference {j} of image {image_id!r} in column {column!r} is {what}, "
                    "expected a non-empty string"
                )
        texts += image_refs
        text_ids += [image_id] * len(image_refs)
    return texts, text_ids


def _finite(values: torch.Tensor | np.ndarray, name: str) -> list[float]:
    """Rewards as floats for TRL; a NaN or inf reward is a bug upstream, never passed on silently."""
    values = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    bad = ~torch.isfinite(values)
    if bad.any():
        raise ValueError(f"reward {name!r} produced a non-finite value at completion {int(bad.nonzero()[0])}")
    return values.tolist()


class ClipReward(ABC):
    """The common base of the rewards that read CLIP embeddings of completions and of their images.

    Subclass it for a CLIP reward of your own: implement :meth:`compute`, which receives the completions' text
    embeddings ``txt (N, D)`` (from the shared text pass of the step), their images' cached embeddings
    ``img (N, D)``, the image ids and the dataset columns, and returns ``(N,)`` rewards. ``__call__`` does the
    rest (the TRL contract, the cache lookup, the check that every reward is finite). Set ``__name__``: TRL
    logs ``rewards/<__name__>``. Register it with ``@register_reward("name")`` to name it in a recipe, where
    :meth:`from_recipe` builds it from the judge and cache of the run.
    """

    __name__ = "clip_reward"
    prompt = ""  # text prepended to each completion before encoding (CLIP-S only)
    #: constructor parameters the pipeline supplies (groups from ``hard_negatives`` / ``k``, the references
    #: column from the run); every other one is a recipe option
    injected: tuple[str, ...] = ("scorer", "cache", "id_column", "groups", "refs_column")

    def __init__(self, scorer: ClipScorer, cache: ImageEmbeddingCache, id_column: str = "image_id") -> None:
        self.scorer = scorer
        self.cache = cache
        self.id_column = id_column

    @classmethod
    def from_recipe(cls, env: RewardEnv, **options: Any) -> ClipReward:
        """Built from a recipe: the run's judge and cache, the options as the constructor takes them."""
        return cls(env.scorer, env.cache, id_column=env.id_column, **options)

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **columns: Any
    ) -> list[float]:
        texts = completion_texts(completions)
        ids = _column(columns, self.id_column, len(texts), self.__name__)
        txt = self.scorer.encode_texts_shared([self.prompt + t for t in texts])
        img = self.cache[ids].to(txt.device)
        return _finite(self.compute(txt, img, ids, columns), self.__name__)

    @abstractmethod
    def compute(
        self, txt: torch.Tensor, img: torch.Tensor, ids: list[Any], columns: Mapping[str, Any]
    ) -> torch.Tensor:
        """Rewards ``(N,)`` from the completions' text embeddings, their images' embeddings and image ids."""

    def _group_emb(self, groups: Mapping[Any, Sequence[Any]] | torch.Tensor, ids: list[Any]) -> torch.Tensor:
        """``(N, K, D)`` embeddings of each image's similar-image group."""
        if isinstance(groups, torch.Tensor):
            neighbour_rows = groups[self.cache.rows(ids)]
            outside = (neighbour_rows < 0).any(dim=1)
            if outside.any():
                raise KeyError(
                    f"image id {ids[int(outside.nonzero()[0])]!r} has no similar-image group (its row of "
                    "groups is -1: the groups were built within a split it is not in)"
                )
            flat = self.cache.embeddings.index_select(0, neighbour_rows.reshape(-1).to(self.cache.device))
            return flat.view(len(ids), groups.shape[1], -1)
        try:
            group_ids = [list(groups[i]) for i in ids]
        except KeyError as err:
            raise KeyError(f"image id {err.args[0]!r} has no similar-image group") from None
        k = {len(g) for g in group_ids}
        if len(k) != 1:
            raise ValueError(f"similar-image groups must all have the same size, got sizes {sorted(k)}")
        return self.cache[[j for g in group_ids for j in g]].view(len(ids), k.pop(), -1)


def _check_groups(groups: Any, cache: ImageEmbeddingCache) -> None:
    if isinstance(groups, torch.Tensor):
        if groups.ndim != 2 or groups.dtype != torch.long or len(groups) != len(cache):
            raise ValueError(
                f"groups as a tensor must be a LongTensor (len(cache), K) of cache rows (-1 for an image with no "
                "group), as returned by similar_image_groups(cache.embeddings) or written by 'clip-rl-trl "
                f"neighbors'; got {groups.dtype} of shape {tuple(groups.shape)}"
            )
    elif not isinstance(groups, Mapping):
        raise TypeError("groups must be a mapping image id -> neighbour ids, or a LongTensor of cache rows")


@register_reward("clip_s")
class ClipSReward(ClipReward):
    """CLIP-S, ``w * max(cos(c, I), 0)`` (Hessel et al. 2021; the reward of Cho et al. 2022).

    ``prompt`` is prepended to each caption before encoding, as in CLIPScore ("A photo depicts "); it makes a
    text pass of its own. ``prompt=""`` encodes the bare completions and shares the pass with the other rewards.
    """

    __name__ = "clip_s"

    def __init__(
        self,
        scorer: ClipScorer,
        cache: ImageEmbeddingCache,
        id_column: str = "image_id",
        w: float = 2.5,
        prompt: str = "A photo depicts ",
    ) -> None:
        super().__init__(scorer, cache, id_column)
        self.w = w
        self.prompt = prompt or ""

    def compute(self, txt: torch.Tensor, img: torch.Tensor, ids: list[Any], columns: Mapping[str, Any]) -> torch.Tensor:
        return RF.clip_s(img, txt, w=self.w)


class HardNegativesFromRecipe(ClipReward):
    """For rewards whose constructor takes similar-image ``groups`` as extra negatives (retrieval,
    bidirectional): a recipe names them by ``hard_negatives``."""

    @classmethod
    def from_recipe(
        cls,
        env: RewardEnv,
        *,
        hard_negatives: int | Sequence[int] | None = None,
        similarity: str = "image",
        exclude_above: float | None = None,
        **options: Any,
    ) -> ClipReward:
        """``hard_negatives``: ``K`` nearest training images, or their 0-based ranks (``[3, 4]``), by
        ``similarity`` (``image`` cosine, or ``captions``: Zhang et al. Eq. 2); the rest as the constructor's."""
        groups = env.hard_negatives(hard_negatives, similarity, exclude_above)
        return cls(env.scorer, env.cache, id_column=env.id_column, groups=groups, **options)


@register_reward("retrieval")
class RetrievalReward(HardNegativesFromRecipe):
    """DiscriTune: log-probability that CLIP retrieves the caption's image among the batch's images.

    ``logit_scale=None`` uses the scorer's own (100 for the released CLIP models). ``groups`` (optional) adds
    each image's similar images as hard negatives. Captions of the same image never compete with each other.
    """

    __name__ = "retrieval"

    def __init__(
        self,
        scorer: ClipScorer,
        cache: ImageEmbeddingCache,
        id_column: str = "image_id",
        logit_scale: float | None = None,
        groups: Mapping[Any, Sequence[Any]] | torch.Tensor | None = None,
    ) -> None:
        super().__init__(scorer, cache, id_column)
        self.logit_scale = scorer.logit_scale if logit_scale is None else logit_scale
        if groups is not None:
            _check_groups(groups, cache)
        self.groups = groups

    def compute(self, txt: torch.Tensor, img: torch.Tensor, ids: list[Any], columns: Mapping[str, Any]) -> torch.Tensor:
        hard = None if self.groups is None else self._group_emb(self.groups, ids).to(txt.device)
        return RF.retrieval_logprob(txt, img, _owners(ids).to(txt.device), self.logit_scale, hard_neg_emb=hard)


@register_reward("group_gap")
class GroupGapReward(ClipReward):
    """Group Embedding Gap (Zhang et al. 2022, Eq. 3/4) against each image's similar-image group.

    ``groups``: a mapping image id -> the ids of its K similar images, or a ``(len(cache), K)`` LongTensor of
    cache rows: what :func:`~clip_rl_trl.similar_image_groups` returns for ``cache.embeddings``, or what
    ``clip-rl-trl neighbors --dataset ... --split train`` writes (groups within that split, rows ``-1`` for the
    cache's other images, which then have no group). Zhang et al. build the groups within each split.
    """

    __name__ = "group_gap"

    def __init__(
        self,
        scorer: ClipScorer,
        cache: ImageEmbeddingCache,
        groups: Mapping[Any, Sequence[Any]] | torch.Tensor,
        id_column: str = "image_id",
        reduce: str = "avg",
    ) -> None:
        super().__init__(scorer, cache, id_column)
        _check_groups(groups, cache)
        if reduce not in ("avg", "min"):
            raise ValueError(f"reduce must be 'avg' or 'min', got {reduce!r}")
        self.groups = groups
        self.reduce = reduce

    @classmethod
    def from_recipe(
        cls,
        env: RewardEnv,
        *,
        k: int = 5,
        similarity: str = "image",
        exclude_above: float | None = None,
        **options: Any,
    ) -> GroupGapReward:
        """Each training image against its ``k`` most similar training images (Zhang et al.: K = 5), found by
        ``similarity`` (``image`` cosine, or ``captions``: their Eq. 2)."""
        return cls(env.scorer, env.cache, env.groups(k, similarity, exclude_above), id_column=env.id_column,
                   **options)

    def compute(self, txt: torch.Tensor, img: torch.Tensor, ids: list[Any], columns: Mapping[str, Any]) -> torch.Tensor:
        group = self._group_emb(self.groups, ids).to(txt.device)
        return RF.group_embedding_gap(txt, img, group, reduce=self.reduce)


@register_reward("bidirectional")
class BidirectionalReward(HardNegativesFromRecipe):
    """Chaffin et al. 2024: decoupled contrastive reward in both directions, ``temperature`` 0.01.

    ``refs_column`` (optional) adds the batch images' reference captions to the image-to-text denominators
    (a reference of the caption's own image is never a negative); ``groups`` (optional) adds similar images
    to the text-to-image denominators, as the released code did with the 4th and 5th nearest neighbours.
    """

    __name__ = "bidirectional"

    def __init__(
        self,
        scorer: ClipScorer,
        cache: ImageEmbeddingCache,
        id_column: str = "image_id",
        temperature: float = 0.01,
        directions: str = "both",
        refs_column: str | None = None,
        groups: Mapping[Any, Sequence[Any]] | torch.Tensor | None = None,
    ) -> None:
        super().__init__(scorer, cache, id_column)
        self.temperature = temperature
        self.directions = directions
        self.refs_column = refs_column
        if groups is not None:
            _check_groups(groups, cache)
        self.groups = groups

    @classmethod
    def from_recipe(cls, env: RewardEnv, *, ref_negatives: bool = False, **options: Any) -> BidirectionalReward:
        """``ref_negatives``: the batch's references join the image-to-text denominators (``refs_column``); the
        hard negatives as :meth:`HardNegativesFromRecipe.from_recipe`'s."""
        return super().from_recipe(env, refs_column=env.captions_column if ref_negatives else None, **options)

    def compute(self, txt: torch.Tensor, img: torch.Tensor, ids: list[Any], columns: Mapping[str, Any]) -> torch.Tensor:
        owner = _owners(ids)
        extra_txt = extra_owner = extra_img = None
        if self.refs_column is not None:
            refs = _column(columns, self.refs_column, len(ids), self.__name__)
            ref_texts, ref_ids = _references_once(ids, refs, self.refs_column, self.__name__)
            owner_of = dict(zip(ids, owner.tolist(), strict=True))
            extra_txt = self.scorer.encode_texts_shared(ref_texts)
            extra_owner = torch.tensor([owner_of[i] for i in ref_ids], dtype=torch.long, device=txt.device)
        if self.groups is not None:
            extra_img = self._group_emb(self.groups, ids).to(txt.device)
        return RF.bidirectional_contrastive(
            txt,
            img,
            owner.to(txt.device),
            temperature=self.temperature,
            directions=self.directions,
            extra_txt_emb=extra_txt,
            extra_img_emb=extra_img,
            extra_txt_owner=extra_owner,
        )


@register_reward("discriminator")
class DiscriminatorReward(ClipReward):
    """Chaffin et al. 2024: ``P(human-written | image, caption)`` from an online :class:`Discriminator`.

    The reward is computed with the discriminator as it is *before* this step's update. With ``update=True``
    the call then trains it one step: the references in ``refs_column`` (label 1) against the completions
    (label 0). :class:`~clip_rl_trl.CaptionRLTrainer` sets ``update=False`` and updates it itself, once per
    step, so that extra scoring passes (greedy captions, ground truth) do not train it again.
    """

    __name__ = "discriminator"

    def __init__(
        self,
        discriminator: Discriminator,
        scorer: ClipScorer,
        cache: ImageEmbeddingCache,
        id_column: str = "image_id",
        refs_column: str = "captions",
        update: bool = True,
    ) -> None:
        super().__init__(scorer, cache, id_column)
        self.discriminator = discriminator
        self.refs_column = refs_column
        self.update = update
        self.last_stats: dict[str, float] = {}

    injected = ("scorer", "cache", "id_column", "refs_column", "embed_dim")
    option_sources = (Discriminator.__init__,)

    @classmethod
    def from_recipe(cls, env: RewardEnv, *, weights: str | None = None, **options: Any) -> DiscriminatorReward:
        """A fresh :class:`Discriminator` (its constructor's options: ``lr``, ``hidden_dims``, ``seed``, ...),
        or one loaded from a ``weights`` safetensors file; trained online by the trainer."""
        discriminator = Discriminator(env.scorer.embed_dim, **options)
        if weights is not None:
            from safetensors.torch import load_file

            discriminator.load_state_dict(load_file(weights))
        return cls(discriminator, env.scorer, env.cache, id_column=env.id_column, refs_column=env.captions_column,
                   update=False)

    def compute(self, txt: torch.Tensor, img: torch.Tensor, ids: list[Any], columns: Mapping[str, Any]) -> torch.Tensor:
        rewards = self.discriminator.reward(img, txt)  # before this step's update
        if self.update:
            refs = _column(columns, self.refs_column, len(ids), self.__name__)
            self.last_stats = self.update_from_batch(img, txt, ids, refs)
            log_metric = columns.get("log_metric")
            if log_metric is not None:
                for key, value in self.last_stats.items():
                    log_metric(f"discriminator/{key}", value)
        return rewards

    def update_from_batch(
        self, img: torch.Tensor, txt: torch.Tensor, ids: Sequence[Any], refs: Sequence[Sequence[str]]
    ) -> dict[str, float]:
        """One discriminator step: each distinct image's references (human) against the generated captions."""
        ref_texts, ref_ids = _references_once(ids, refs, self.refs_column, self.__name__)
        if not ref_texts:
            raise ValueError(f"reward {self.__name__!r}: the batch has no reference captions to train on")
        gt_txt = self.scorer.encode_texts_shared(ref_texts)
        gt_img = self.cache[ref_ids].to(gt_txt.device)
        return self.discriminator.update((gt_img, gt_txt), (img, txt))


@register_reward("grammar")
class GrammarReward:
    """Cho et al. 2022: ``P(grammatical)`` from a :class:`GrammarHead` on the caption's CLIP text embedding.

    ``scorer`` must be the scorer whose text tower was fine-tuned together with the head
    (:func:`~clip_rl_trl.rewards.grammar.train_grammar_head` returns both); use that scorer for the other CLIP
    rewards too, as Cho et al. do. Each completion is encoded after the prompt the head was trained with
    (``head.prompt``; the released code: "A photo depicts "), so the head scores text as it saw it in
    training; a CLIP-S reward with the same prompt shares the text pass. ``prompt``, when given, must equal
    ``head.prompt``: a head trained on other text is refused. No image is needed.
    """

    __name__ = "grammar"

    def __init__(self, scorer: ClipScorer, head: GrammarHead, prompt: str | None = None) -> None:
        if prompt is not None and prompt != head.prompt:
            raise ValueError(
                f"grammar prompt {prompt!r} differs from {head.prompt!r}, the prompt the grammar head was "
                "trained with: score with the training prompt (leave prompt unset) or train the head with "
                f"prompt={prompt!r}"
            )
        self.scorer = scorer
        self.head = head
        self.prompt = head.prompt

    provides_scorer = True  # the other CLIP rewards of the recipe read the tuned text tower (Cho et al.)
    injected = ("scorer", "image_emb", "captions", "progress", "callback", "negatives")
    option_sources = (train_grammar_head,)

    @classmethod
    def from_recipe(cls, env: RewardEnv, *, path: str | None = None, **options: Any) -> GrammarReward:
        """The grammar head and tuned text tower saved in ``path`` (default ``<output_dir>/grammar``), or, when
        absent, trained on the training captions (:func:`train_grammar_head`'s options) and saved there. A
        saved head trained with another ``prompt`` is refused."""
        folder = env.path(path, "grammar")
        tower = folder / "text_tower.safetensors"
        with env.main_process_first():
            if (folder / "grammar_head.safetensors").is_file() and tower.is_file():
                head = GrammarHead.from_pretrained(folder)
                tuned = load_text_tower(env.scorer, tower)
            else:
                tuned, head = train_grammar_head(
                    env.scorer, env.train_image_embeddings(), env.train[env.captions_column],
                    progress=env.progress, **options,
                )
                if env.is_main_process:
                    head.save_pretrained(folder)
                    save_text_tower(tuned, tower)
        try:
            return cls(tuned, head, prompt=options.get("prompt"))
        except ValueError as err:
            raise ValueError(f"path {str(folder)!r}: {err} (delete the folder to train it again)") from None

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **columns: Any
    ) -> list[float]:
        texts = completion_texts(completions)
        txt = self.scorer.encode_texts_shared([self.prompt + t for t in texts])
        return _finite(self.head.reward(txt), self.__name__)


@register_reward("cider")
class CiderReward:
    """CIDEr-D of each completion against its image's references (Vedantam et al. 2015), for SCST and GEG.

    ``cider`` holds the corpus document frequencies (:class:`~clip_rl_trl.rewards.cider.CiderD`); the
    references come from the dataset column ``refs_column``.
    """

    __name__ = "cider"

    def __init__(self, cider: CiderD, refs_column: str = "captions") -> None:
        self.cider = cider
        self.refs_column = refs_column

    injected = ("corpus_refs",)
    option_sources = (CiderD.__init__,)

    @classmethod
    def from_recipe(cls, env: RewardEnv, **options: Any) -> CiderReward:
        """Document frequencies of the training references; :class:`CiderD`'s options (``sigma``, ``normalize``)."""
        return cls(CiderD(env.train[env.captions_column], **options), refs_column=env.captions_column)

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **columns: Any
    ) -> list[float]:
        texts = completion_texts(completions)
        refs = _column(columns, self.refs_column, len(texts), self.__name__)
        return _finite(self.cider.score(texts, refs), self.__name__)
