"""Policy adapters: what :class:`~clip_rl_trl.CaptionRLTrainer` needs from a captioner family.

An adapter turns dataset rows into the captioner's image inputs, samples or decodes captions, and gives the
logits of given captions (teacher-forced) so the trainer can compute per-token log-probabilities. The trainer
calls ``logits`` on the model it trains (possibly wrapped by DDP or PEFT) so gradients flow; ``generate`` on the
unwrapped model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from clip_rl_trl.embeddings import ImageEmbeddingCache


def completion_mask(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(B, T)`` long mask of each caption's tokens up to and including its first EOS (all, if none)."""
    is_eos = ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    return (positions <= first.unsqueeze(1)).long()


class CaptionPolicy(ABC):
    """A captioner family: image inputs, generation and teacher-forced logits."""

    #: names of the per-row tensors ``image_inputs`` returns (they travel with the batch to the loss)
    input_keys: tuple[str, ...] = ()

    @abstractmethod
    def image_inputs(
        self, rows: Sequence[Mapping[str, Any]], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Per-row image tensors for ``rows`` (one row per caption to generate or score)."""

    @abstractmethod
    def generate(
        self, model: nn.Module, image_inputs: Mapping[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        """Caption token ids ``(B, T)``, one per row, padded after EOS."""

    @abstractmethod
    def logits(
        self,
        model: nn.Module,
        image_inputs: Mapping[str, torch.Tensor],
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, T, V)`` logits where ``[:, t]`` predicts ``ids[:, t]`` given the image and ``ids[:, :t]``."""


class ClipCapPolicy(CaptionPolicy):
    """:class:`~clip_rl_trl.ClipCapModel`: images are cached CLIP embeddings, looked up by image id."""

    input_keys = ("image_embeds",)

    def __init__(
        self, cache: ImageEmbeddingCache, id_column: str = "image_id", tokenizer: Any = None
    ) -> None:
        self.cache = cache
        self.id_column = id_column
        self.tokenizer = tokenizer

    def image_inputs(
        self, rows: Sequence[Mapping[str, Any]], device: torch.device
    ) -> dict[str, torch.Tensor]:
        ids = [row[self.id_column] for row in rows]
        return {"image_embeds": self.cache[ids].to(device=device, dtype=torch.float32)}

    def generate(
        self, model: nn.Module, image_inputs: Mapping[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        return model.generate(image_embeds=image_inputs["image_embeds"], tokenizer=self.tokenizer, **kwargs)

    def logits(
        self,
        model: nn.Module,
        image_inputs: Mapping[str, torch.Tensor],
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, image_embeds=image_inputs["image_embeds"]).logits


def policy_for(
    model: nn.Module, cache: ImageEmbeddingCache | None, id_column: str, tokenizer: Any
) -> CaptionPolicy:
    """The adapter for ``model`` (a ``ClipCapModel``, possibly inside a PEFT wrapper)."""
    from clip_rl_trl.models.clipcap import ClipCapModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, ClipCapModel):
        if cache is None:
            raise ValueError("a ClipCap policy reads cached CLIP image embeddings: pass image_cache=")
        return ClipCapPolicy(cache, id_column, tokenizer)
    raise TypeError(
        f"CaptionRLTrainer has no policy adapter for {type(base).__name__}; supported: ClipCapModel "
        "(pass policy= with a CaptionPolicy subclass for another captioner)"
    )
