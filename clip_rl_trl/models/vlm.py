"""Decoder-only vision-language models as captioners: Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, LLaVA and kin.

The processor writes the prompt (the caption instruction through its chat template, the image placeholder
expanded to the image's tokens) and the image tensors; the caption continues the prompt, as in TRL's own VLM
path. Three things differ from a text model, and :class:`CausalVLMPolicy` handles each so that users never list
processor outputs by hand:

* **Image tensors that are not one row per caption.** Qwen2-VL's ``pixel_values`` are the flattened patches of
  all images, ``prod(image_grid_thw[i])`` rows for image ``i``. The trainer splits, shuffles and gathers every
  image input by rows, so such a tensor is stored padded to ``(rows, max patches, ...)`` and flattened again,
  without the padding, right before the model reads it.
* **Prompt-aligned tensors.** ``mm_token_type_ids`` (Qwen's marker of image tokens, from which the model
  builds its M-RoPE positions) has one entry per prompt token; the teacher-forced forward over prompt + caption
  extends it with zeros over the caption.
* **Tokens a caption must never hold.** A sampled image placeholder has no image features behind it, and a
  sampled chat token (``<|im_start|>``, ``<fake_token_around_image>``) is not caption text. Every special token
  of the tokenizer but EOS is suppressed in ``generate`` and removed from the policy's distribution in
  ``logits`` (its logit set to the dtype's minimum), so the log-probabilities the loss uses are those of the
  distribution the captions were sampled from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from clip_rl_trl.models.policies import ImageInputs, PromptContinuationPolicy, Rows, load_images, unwrap_peft

__all__ = ["DEFAULT_INSTRUCTION", "CausalVLMPolicy", "vlm_prompt"]

#: the instruction of the caption prompt when a recipe gives none (``caption_prompt``)
DEFAULT_INSTRUCTION = "Describe this image in one sentence."
# Processor outputs that are the prompt's text; mm_token_type_ids is text-aligned but read by the model.
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
_ALIGNED_KEYS = ("mm_token_type_ids",)
# Per-image grids that give how many rows of a flattened tensor belong to each image (Qwen2-VL's patches).
_GRID_KEYS = {"pixel_values": "image_grid_thw"}


def vlm_prompt(processor: Any, prompt: str | None = None) -> str:
    """The text in front of every caption.

    A ``prompt`` holding the processor's image token is used as written. Otherwise ``prompt`` (default
    :data:`DEFAULT_INSTRUCTION`) is the instruction of one user turn ``[image, instruction]``, rendered by the
    processor's chat template with the generation prompt (the assistant's turn opened), as the model was
    instruction-tuned to read it.
    """
    image_token = getattr(processor, "image_token", None)
    if image_token is None:
        raise ValueError(f"{type(processor).__name__} has no image_token; CausalVLMPolicy needs a VLM processor")
    if prompt is not None and image_token in prompt:
        if prompt.count(image_token) != 1:
            raise ValueError(f"prompt {prompt!r} holds the image token {image_token!r} more than once")
        return prompt
    instruction = DEFAULT_INSTRUCTION if prompt is None else prompt
    if not instruction.strip():
        raise ValueError("caption_prompt is empty: give the instruction, or a prompt with the image token")
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            f"{type(processor).__name__} has no chat template to write the instruction {instruction!r} into: "
            f"give the whole prompt with the image token {image_token!r} (e.g. '{image_token}{instruction}')"
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token: the named ones and every added token flagged special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


class CausalVLMPolicy(PromptContinuationPolicy):
    """A decoder-only vision-language model: ``processor(images, prompt)`` -> prompt ids with the image
    placeholder expanded + image tensors; captions continue the prompt (see the module docstring).

    Args:
        processor: the model's processor (``Qwen2VLProcessor``, ``Idefics3Processor``, ``LlavaProcessor``, ...);
            its tokenizer's ``eos_token`` ends captions (the Instruct models' end-of-turn token).
        prompt: the caption instruction, written through the processor's chat template (default
            :data:`DEFAULT_INSTRUCTION`), or a whole prompt holding the image token, used as written
            (:func:`vlm_prompt`).
        image_column: the dataset column with the images (PIL or paths).
        image_keys: the processor outputs the model reads beside the prompt; by default every one the processor
            returns, found by processing one blank image here.
    """

    # Prompt tensors get their own names: the trainer's batch already has (empty) prompt_ids / prompt_mask.
    prompt_keys = ("vlm_prompt_ids", "vlm_prompt_mask")

    def __init__(
        self,
        processor: Any,
        prompt: str | None = None,
        image_column: str = "image",
        image_keys: Sequence[str] | None = None,
    ) -> None:
        tokenizer = processor.tokenizer
        super().__init__(tokenizer, vlm_prompt(processor, prompt), no_eos="the processor's tokenizer")
        self.processor = processor
        self.image_column = image_column
        self.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        #: token ids never sampled and of probability zero under the policy: every special token but EOS
        self.suppressed = sorted(_special_ids(tokenizer) - {tokenizer.eos_token_id})
        probe = self._encode([Image.new("RGB", (64, 64))])
        if image_keys is None:
            image_keys = sorted(set(probe) - _TEXT_KEYS - set(_ALIGNED_KEYS))
        missing = [key for key in image_keys if key not in probe]
        if missing:
            raise ValueError(f"image_keys: the processor returns no {missing}; it returns {sorted(probe)}")
        self.image_keys = tuple(image_keys)
        self.aligned_keys = tuple(key for key in _ALIGNED_KEYS if key in probe)
        #: image tensors flattened over all images (Qwen2-VL's patches), with the grid that splits them per image
        self.flat_keys = {key: grid for key, grid in _GRID_KEYS.items() if {key, grid} <= set(self.image_keys)}
        self.input_keys = (*self.prompt_keys, *self.aligned_keys, *self.image_keys)

    def _encode(self, images: list[Any]) -> Any:
        # Left padding keeps every prompt's last token at the same position, where the caption starts.
        return self.processor(
            images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True, padding_side="left"
        )

    def image_inputs(self, rows: Rows, device: torch.device) -> dict[str, torch.Tensor]:
        images, index = load_images(rows, self.image_column)
        enc = self._encode(images)  # each distinct image once; its rows take copies below
        n = len(images)
        out = {"vlm_prompt_ids": enc["input_ids"], "vlm_prompt_mask": enc["attention_mask"]}
        out.update({key: enc[key] for key in self.aligned_keys})
        for key in self.image_keys:
            value = enc[key]
            if key in self.flat_keys:
                value = _pad_by_grid(value, enc[self.flat_keys[key]])
            if value.shape[0] != n:
                raise ValueError(
                    f"image input {key!r} has first dimension {value.shape[0]} for {n} images and no per-image "
                    "grid says how to split it; the trainer splits every image input by rows"
                )
            out[key] = value
        return {key: value[index].to(device) for key, value in out.items()}

    def model_inputs(self, image_inputs: ImageInputs, model: nn.Module, caption_length: int = 0
                     ) -> dict[str, torch.Tensor]:
        dtype = unwrap_peft(getattr(model, "module", model)).dtype  # under DDP, then PEFT
        out = {}
        for key in self.aligned_keys:  # zero (text) over the caption's positions
            value = image_inputs[key]
            out[key] = torch.cat([value, value.new_zeros(value.shape[0], caption_length)], dim=1)
        for key in self.image_keys:
            value = image_inputs[key]
            if key in self.flat_keys:
                value = _unpad_by_grid(value, image_inputs[self.flat_keys[key]])
            out[key] = value.to(dtype) if value.is_floating_point() else value
        return out

    def generate_kwargs(self) -> dict[str, Any]:
        return {"suppress_tokens": self.suppressed} if self.suppressed else {}

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.suppressed:
            return logits
        # The dtype's minimum, not -inf: exp() is exactly 0 and the entropy's 0 * log(0) stays finite.
        return logits.index_fill(-1, torch.tensor(self.suppressed, device=logits.device), torch.finfo(logits.dtype).min)


def _pad_by_grid(flat: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``(sum_i prod(grid_i), ...)`` rows stacked image after image -> ``(images, max_i prod(grid_i), ...)``."""
    lengths = grid.prod(-1).tolist()
    if sum(lengths) != flat.shape[0]:
        raise ValueError(f"image input has {flat.shape[0]} rows but its grid gives {sum(lengths)}, one run per image")
    padded = flat.new_zeros(len(lengths), max(lengths), *flat.shape[1:])
    for i, part in enumerate(torch.split(flat, lengths)):
        padded[i, : len(part)] = part
    return padded


def _unpad_by_grid(padded: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_pad_by_grid` for the rows at hand (split, shuffled or gathered)."""
    return torch.cat([padded[i, :n] for i, n in enumerate(grid.prod(-1).tolist())])
