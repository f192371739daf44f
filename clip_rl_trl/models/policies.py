"""Policy adapters: what :class:`~clip_rl_trl.CaptionRLTrainer` needs from a captioner family.

An adapter turns dataset rows into the captioner's image inputs, samples or decodes captions, and gives the
logits of given captions (teacher-forced) so the trainer can compute per-token log-probabilities. The trainer
calls ``logits`` on the model it trains (possibly wrapped by DDP or PEFT) so gradients flow; ``generate`` on the
unwrapped model.

Families: :class:`ClipCapPolicy` (cached CLIP embeddings), :class:`BlipPolicy` (``BlipForConditionalGeneration``,
pixels through its own vision tower), :class:`CausalLMPolicy` (a text-only decoder continuing a fixed prompt,
blind to the image: for comparisons with stock TRL), and, in :mod:`clip_rl_trl.models.vlm`, ``CausalVLMPolicy``
(decoder-only VLMs: a processor expands an image placeholder in the prompt, captions continue it). Caption ids are
always "caption tokens + EOS", no BOS and no prompt: each adapter adds what its model needs in front, internally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from clip_rl_trl.embeddings import ImageEmbeddingCache

#: What ``image_inputs`` returns and ``generate`` / ``logits`` read: named per-row tensors.
ImageInputs = Mapping[str, torch.Tensor]
#: Dataset rows, one per caption to generate or score.
Rows = Sequence[Mapping[str, Any]]

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
    def image_inputs(self, rows: Rows, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-row image tensors for ``rows`` (one row per caption to generate or score)."""

    @abstractmethod
    def generate(self, model: nn.Module, image_inputs: ImageInputs, **kwargs: Any) -> torch.Tensor:
        """Caption token ids ``(B, T)``, one per row, padded after EOS."""

    @abstractmethod
    def logits(
        self, model: nn.Module, image_inputs: ImageInputs, ids: torch.Tensor, mask: torch.Tensor
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

    def image_inputs(self, rows: Rows, device: torch.device) -> dict[str, torch.Tensor]:
        ids = [row[self.id_column] for row in rows]
        return {"image_embeds": self.cache[ids].to(device=device, dtype=torch.float32)}

    def generate(self, model: nn.Module, image_inputs: ImageInputs, **kwargs: Any) -> torch.Tensor:
        return model.generate(image_embeds=image_inputs["image_embeds"], tokenizer=self.tokenizer, **kwargs)

    def logits(
        self, model: nn.Module, image_inputs: ImageInputs, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, image_embeds=image_inputs["image_embeds"]).logits


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (its LoRA layers are injected in place, so its sub-modules are live)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def caption_rows(
    model: nn.Module,
    policy: CaptionPolicy,
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    batch_size: int,
    device: torch.device | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """One caption per row of ``rows``, decoded up to its first EOS: the one captioning loop of the library.

    ``generate_kwargs`` go to ``policy.generate`` (``do_sample=False, num_beams=3`` for evaluation captions); the
    model is put in eval mode for the loop and restored after.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    captions: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            ids = policy.generate(model, policy.image_inputs(rows[start : start + batch_size], device), **generate_kwargs)
            captions += decode_captions(ids, completion_mask(ids, tokenizer.eos_token_id), tokenizer)
    finally:
        model.train(was_training)
    return captions


def load_images(rows: Rows, column: str) -> tuple[list[Any], torch.Tensor]:
    """The distinct RGB PIL images of ``rows[column]`` and, for each row, the position of its image.

    Rows with the same ``image_id`` share one image, decoded and preprocessed once (a step's ``num_generations``
    samples of an image are rows of their own: preprocessing each would repeat the work that many times). Values
    may be PIL images, file paths or undecoded ``datasets.Image`` values; an unreadable one raises an error naming
    its row, its ``image_id`` when the row has one, and the column.
    """
    from clip_rl_trl.clip import load_image

    images: list[Any] = []
    positions: dict[Any, int] = {}
    index = []
    for i, row in enumerate(rows):
        if column not in row:
            raise KeyError(f"row {i} has no image column {column!r}; its columns are {sorted(row)}")
        key = ("id", row["image_id"]) if "image_id" in row else ("row", i)
        if key not in positions:
            try:
                images.append(load_image(row[column]))
            except (TypeError, ValueError) as err:
                image_id = f" (image id {row['image_id']!r})" if "image_id" in row else ""
                raise type(err)(f"row {i}{image_id}, column {column!r}: {err}") from err
            positions[key] = len(images) - 1
        index.append(positions[key])
    return images, torch.tensor(index, dtype=torch.long)


def decode_captions(ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any) -> list[str]:
    """Each row of ``ids`` up to its mask's length (first EOS included), decoded without special tokens: one
    host copy of the ids and one batched decode (not a device round-trip and a ``decode`` per row)."""
    lengths = mask.sum(dim=1).tolist()
    rows = [row[:n] for row, n in zip(ids.tolist(), lengths, strict=True)]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


class BlipPolicy(CaptionPolicy):
    """``BlipForConditionalGeneration``: pixels in, captions from its text decoder over the image patches.

    The decoder reads ``[BOS] + prompt + caption + [SEP]``: captions end with ``[SEP]`` (BLIP's end of text),
    so the tokenizer's ``eos_token`` must be its ``sep_token`` (``tokenizer.eos_token = tokenizer.sep_token``).
    ``generate`` calls the text decoder itself rather than ``BlipForConditionalGeneration.generate``, which
    drops the last prompt token (it expects the processor's trailing ``[SEP]``) and whose ``eos_token_id``
    handling varies across transformers versions; the BOS and prompt are stripped from the returned ids.

    Args:
        tokenizer: the BLIP tokenizer (the trainer's ``processing_class``).
        config: the model's ``BlipConfig`` (token ids and image size).
        image_processor: turns PIL images into ``pixel_values``; defaults to a ``BlipImageProcessor`` at the
            vision tower's image size (BLIP's released preprocessing: bicubic resize, CLIP mean and std).
        image_column: the dataset column with the images (PIL or paths).
        prompt: optional text every caption continues (e.g. ``"a picture of"``); not part of the returned ids.
    """

    input_keys = ("pixel_values",)

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        image_processor: Any = None,
        image_column: str = "image",
        prompt: str | None = None,
    ) -> None:
        text = config.text_config
        if tokenizer.eos_token_id is None or tokenizer.eos_token_id != text.sep_token_id:
            raise ValueError(
                f"BLIP captions end with the decoder's sep token (id {text.sep_token_id}) but the tokenizer's "
                f"eos_token_id is {tokenizer.eos_token_id}: set tokenizer.eos_token = tokenizer.sep_token"
            )
        if len(tokenizer) > text.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, over the decoder's {text.vocab_size}")
        if image_processor is None:
            from transformers import BlipImageProcessor

            size = config.vision_config.image_size
            image_processor = BlipImageProcessor(size={"height": size, "width": size})
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if prompt and not prompt_ids:
            raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_column = image_column
        self.prompt = prompt
        self.prefix = torch.tensor([text.bos_token_id, *prompt_ids], dtype=torch.long)
        self.eos_token_id = text.sep_token_id
        self.pad_token_id = text.pad_token_id

    def image_inputs(self, rows: Rows, device: torch.device) -> dict[str, torch.Tensor]:
        images, index = load_images(rows, self.image_column)
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels[index].to(device)}

    def _prefix(self, batch: int, device: torch.device) -> torch.Tensor:
        return self.prefix.to(device).unsqueeze(0).expand(batch, -1)

    def generate(self, model: nn.Module, image_inputs: ImageInputs, **kwargs: Any) -> torch.Tensor:
        base = unwrap_peft(model)
        pixels = image_inputs["pixel_values"]
        patches = base.vision_model(pixel_values=pixels.to(base.dtype)).last_hidden_state
        prefix = self._prefix(pixels.shape[0], pixels.device)
        out = base.text_decoder.generate(
            input_ids=prefix,
            attention_mask=torch.ones_like(prefix),
            encoder_hidden_states=patches,
            encoder_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            **kwargs,
        )
        return out[:, prefix.shape[1] :]

    def logits(
        self, model: nn.Module, image_inputs: ImageInputs, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        prefix = self._prefix(ids.shape[0], ids.device)
        input_ids = torch.cat([prefix, ids], dim=1)
        attention_mask = torch.cat([torch.ones_like(prefix), mask.to(prefix.dtype)], dim=1)
        pixels = image_inputs["pixel_values"]
        # Position P-1 (the last prefix token) predicts the first caption token; only T + 1 positions are projected.
        out = model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask,
                    logits_to_keep=ids.shape[1] + 1)
        return out.logits[:, :-1]


class PromptContinuationPolicy(CaptionPolicy):
    """A decoder-only model whose captions continue a (left-padded) text prompt: the shared half of
    :class:`CausalLMPolicy` and :class:`~clip_rl_trl.models.vlm.CausalVLMPolicy`.

    ``image_inputs`` returns the prompt's ids and mask under ``prompt_keys`` (beside whatever image tensors the
    model reads, :meth:`model_inputs`); ``generate`` continues the prompt and cuts it from the ids, and
    ``logits`` is one forward over prompt + caption in which the prompt's last position predicts the caption's
    first token (only ``T + 1`` positions projected: the model must read ``logits_to_keep`` as transformers'
    causal LMs do). Captions end with ``tokenizer.eos_token``; padding is its ``pad_token``, else EOS.
    """

    #: the names ``image_inputs`` gives the prompt's ids and attention mask
    prompt_keys: tuple[str, str]

    def __init__(self, tokenizer: Any, prompt: str, no_eos: str) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{no_eos} has no eos_token; captions must end with one")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def model_inputs(self, image_inputs: ImageInputs, model: nn.Module, caption_length: int = 0
                     ) -> dict[str, torch.Tensor]:
        """What ``model`` reads beside the prompt (none for a text-only model): in ``generate``, and in ``logits``
        where ``caption_length`` caption tokens follow the prompt."""
        return {}

    def generate_kwargs(self) -> dict[str, Any]:
        """Extra ``model.generate`` arguments of this family."""
        return {}

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The policy's logits from the model's: tokens a family never samples are removed here (none by default)."""
        return logits

    def generate(self, model: nn.Module, image_inputs: ImageInputs, **kwargs: Any) -> torch.Tensor:
        prompt_ids, prompt_mask = (image_inputs[key] for key in self.prompt_keys)
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad_token_id,
            **self.generate_kwargs(),
            **self.model_inputs(image_inputs, model),
            **kwargs,
        )
        return out[:, prompt_ids.shape[1] :]

    def logits(
        self, model: nn.Module, image_inputs: ImageInputs, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        prompt_ids, prompt_mask = (image_inputs[key] for key in self.prompt_keys)
        out = model(
            input_ids=torch.cat([prompt_ids, ids], dim=1),
            attention_mask=torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1),
            logits_to_keep=ids.shape[1] + 1,
            **self.model_inputs(image_inputs, model, ids.shape[1]),
        )
        return self.mask_logits(out.logits[:, :-1])


class CausalLMPolicy(PromptContinuationPolicy):
    """A text-only decoder (``GPT2LMHeadModel`` and kin) that continues one fixed text prompt: it sees no image.

    Its captions cannot depend on the image; it exists so that ``CaptionRLTrainer`` can drive exactly the model
    a stock ``trl.GRPOTrainer`` drives (``benchmarks/trainer_step.py`` compares the two trainers' step times),
    and as an image-blind control. The prompt is tokenized as TRL tokenizes a plain-text prompt (the
    tokenizer's special tokens included); the model must read ``logits_to_keep`` as transformers' causal LMs do.

    Args:
        tokenizer: the model's tokenizer (the trainer's ``processing_class``); its ``eos_token`` ends captions.
        prompt: the text in front of every caption (at least one token: a decoder needs a first position).
    """

    input_keys = ("lm_prompt_ids", "lm_prompt_mask")
    prompt_keys = ("lm_prompt_ids", "lm_prompt_mask")

    def __init__(self, tokenizer: Any, prompt: str) -> None:
        super().__init__(tokenizer, prompt, no_eos="the tokenizer")
        prompt_ids = tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise ValueError(f"prompt {prompt!r} tokenizes to nothing; the caption needs a position to start from")
        self.prompt_ids = torch.tensor(prompt_ids, dtype=torch.long)

    def image_inputs(self, rows: Rows, device: torch.device) -> dict[str, torch.Tensor]:
        ids = self.prompt_ids.to(device).repeat(len(rows), 1)
        return {"lm_prompt_ids": ids, "lm_prompt_mask": torch.ones_like(ids)}
