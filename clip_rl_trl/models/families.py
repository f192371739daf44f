"""The registry of captioner families: how each kind of captioner is loaded, adapted, LoRA'd and fed.

A family is one registered :class:`CaptionerFamily` subclass: it recognises its models (:meth:`matches`, which
:func:`policy_for` reads), loads a model and its processing class from a :class:`~clip_rl_trl.CaptionerConfig`,
builds the :class:`~clip_rl_trl.models.policies.CaptionPolicy` adapter, names its default LoRA targets, and says
which dataset columns the trainer's rows keep. Adding a family is one class here (or in your code) decorated
with ``@register_family("name")``; a recipe then names it as ``captioner_family: name``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_rl_trl.embeddings import ImageEmbeddingCache
from clip_rl_trl.importing import lookup_instance, register_instance
from clip_rl_trl.models.clipcap import GPT2_LORA_TARGETS
from clip_rl_trl.models.policies import (
    BlipPolicy,
    CaptionPolicy,
    ClipCapPolicy,
    unwrap_peft,
)
from clip_rl_trl.models.vlm import CausalVLMPolicy

__all__ = ["FAMILIES", "BlipFamily", "CaptionerFamily", "ClipCapFamily", "VLMFamily", "family", "policy_for",
           "register_family"]

FAMILIES: dict[str, CaptionerFamily] = {}


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`CaptionerFamily` subclass under ``name`` (one instance is kept)."""
    return register_instance(FAMILIES, name)


def family(name: str) -> CaptionerFamily:
    """The registered family ``name``, or the :class:`CaptionerFamily` subclass at a dotted import path."""
    return lookup_instance(FAMILIES, name, CaptionerFamily, "captioner_family", "families")


def _pretrained_kwargs(config: Any) -> dict[str, Any]:
    """``from_pretrained`` settings of ``trl.ModelConfig``: revision and dtype (``auto`` or a torch dtype)."""
    kwargs: dict[str, Any] = {"revision": config.model_revision}
    if config.dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, config.dtype)
    elif config.dtype == "auto":
        kwargs["dtype"] = "auto"
    return kwargs


class CaptionerFamily:
    """One kind of captioner. Override what differs; the defaults suit a pixel-reading Hugging Face model."""

    name: str = ""
    #: LoRA target modules when the recipe gives none (``lora_target_modules``)
    lora_targets: str | list[str] | None = None
    #: the captioner reads the image column (else it reads cached CLIP embeddings by image id)
    reads_pixels: bool = True
    #: can build and MLE-train a captioner from scratch when no ``model_name_or_path`` is given
    from_scratch: bool = False

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` (unwrapped from PEFT) belongs to this family."""
        raise NotImplementedError

    def load(self, config: Any, **context: Any) -> tuple[nn.Module, Any]:
        """The captioner of ``config.model_name_or_path`` and its processing class (tokenizer or processor)."""
        raise NotImplementedError

    def policy(self, model: nn.Module, processing_class: Any, *, cache: ImageEmbeddingCache | None,
               id_column: str, image_column: str, prompt: str | None = None) -> CaptionPolicy:
        raise NotImplementedError

    def peft_config(self, config: Any) -> Any:
        """LoRA from TRL's ``get_peft_config``, on the family's default targets unless the recipe names some.

        No ``task_type``: a captioner is not a plain causal LM, and PEFT's task wrappers would reshape its
        forward's arguments."""
        if not config.use_peft:
            return None
        from trl import get_peft_config

        targets = config.lora_target_modules or self.lora_targets
        return get_peft_config(dataclasses.replace(config, lora_target_modules=targets, lora_task_type=None))

    def dataset_columns(self, column_names: list[str], args: Any) -> list[str]:
        """The columns of the trainer's rows: ids and references, plus the image for pixel readers."""
        keep = [args.image_id_column, args.captions_column, "scene"]
        if self.reads_pixels:
            keep.append(args.image_column)
        return [c for c in column_names if c in keep]

    def check_judge(self, model: nn.Module, scorer: Any) -> None:
        """Refuse a captioner that cannot read this judge's embeddings (ClipCap's prefix)."""


@register_family("clipcap")
class ClipCapFamily(CaptionerFamily):
    """:class:`~clip_rl_trl.ClipCapModel` (Mokady et al. 2021): a GPT-2 over a CLIP image prefix, read from the
    image-embedding cache. LoRA on every GPT-2 block, the mapper trained in full."""

    reads_pixels = False
    from_scratch = True
    lora_targets = GPT2_LORA_TARGETS  # every GPT-2 block's attention and MLP projections

    def matches(self, model: nn.Module) -> bool:
        from clip_rl_trl.models.clipcap import ClipCapModel

        return isinstance(model, ClipCapModel)

    def load(self, config: Any, **context: Any) -> tuple[nn.Module, Any]:
        from transformers import AutoTokenizer

        from clip_rl_trl.models.clipcap import ClipCapModel

        if config.model_name_or_path is None:
            return mle_clipcap(config, **context)
        model = ClipCapModel.from_pretrained(config.model_name_or_path, **_pretrained_kwargs(config))
        tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, revision=config.model_revision)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    def policy(self, model, processing_class, *, cache, id_column, image_column, prompt=None) -> CaptionPolicy:
        if cache is None:
            raise ValueError("a ClipCap policy reads cached CLIP image embeddings: pass image_cache=")
        if prompt is not None:
            raise ValueError("caption_prompt: ClipCap captions have no text prompt (BLIP and VLM only)")
        return ClipCapPolicy(cache, id_column, processing_class)

    def peft_config(self, config: Any) -> Any:
        if not config.use_peft:
            return None
        # The mapper is trained in full alongside the adapters; GPT-2's projections are Conv1D (fan_in_fan_out).
        peft = super().peft_config(dataclasses.replace(
            config, lora_modules_to_save=config.lora_modules_to_save or ["mapper"]))
        peft.fan_in_fan_out = True
        return peft

    def check_judge(self, model: nn.Module, scorer: Any) -> None:
        dim = unwrap_peft(model).config.prefix_dim
        if dim != scorer.embed_dim:
            raise ValueError(
                f"model_name_or_path: the ClipCap reads {dim}-dimensional CLIP embeddings but the judge embeds in "
                f"{scorer.embed_dim}: use the CLIP it was trained with"
            )


@register_family("blip")
class BlipFamily(CaptionerFamily):
    """``BlipForConditionalGeneration``: pixels through its own vision tower; LoRA on the text decoder's
    query and value projections."""

    lora_targets = r".*text_decoder.*\.(query|value)"

    def matches(self, model: nn.Module) -> bool:
        from transformers import BlipForConditionalGeneration

        return isinstance(model, BlipForConditionalGeneration)

    def load(self, config: Any, **context: Any) -> tuple[nn.Module, Any]:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        model = BlipForConditionalGeneration.from_pretrained(config.model_name_or_path, **_pretrained_kwargs(config))
        processor = AutoProcessor.from_pretrained(config.model_name_or_path, revision=config.model_revision)
        processor.tokenizer.eos_token = processor.tokenizer.sep_token  # BLIP captions end with [SEP]
        return model, processor

    def policy(self, model, processing_class, *, cache, id_column, image_column, prompt=None) -> CaptionPolicy:
        config = unwrap_peft(model).config
        if hasattr(processing_class, "image_processor"):
            return BlipPolicy(processing_class.tokenizer, config, processing_class.image_processor, image_column,
                              prompt=prompt)
        return BlipPolicy(processing_class, config, image_column=image_column, prompt=prompt)


@register_family("vlm")
class VLMFamily(CaptionerFamily):
    """Decoder-only vision-language models (``AutoModelForImageTextToText``: Qwen2-VL / Qwen2.5-VL, Idefics3 /
    SmolVLM, LLaVA and kin): the processor writes the caption instruction through its chat template and expands
    the image placeholder, the caption continues the prompt (:class:`~clip_rl_trl.models.vlm.CausalVLMPolicy`).
    LoRA on the language model's attention projections only (the vision tower's, which share the names, stay
    frozen). ``model_name_or_path: toy:<kind>`` builds a tiny random one offline
    (:func:`~clip_rl_trl.models.toy_vlm.build_shapes_toy_vlm`)."""

    lora_targets = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj)"

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return (
            hasattr(config, "vision_config")
            and hasattr(config, "text_config")
            and not getattr(config, "is_encoder_decoder", False)
            and hasattr(model, "generate")
        )

    def load(self, config: Any, **context: Any) -> tuple[nn.Module, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from clip_rl_trl.models.toy_vlm import build_shapes_toy_vlm, toy_kind

        kind = toy_kind(config.model_name_or_path)
        if kind is not None:
            return build_shapes_toy_vlm(kind, seed=context.get("seed", 0))
        kwargs = _pretrained_kwargs(config)
        if config.attn_implementation is not None:
            kwargs["attn_implementation"] = config.attn_implementation
        return (AutoModelForImageTextToText.from_pretrained(config.model_name_or_path, **kwargs),
                AutoProcessor.from_pretrained(config.model_name_or_path, revision=config.model_revision))

    def policy(self, model, processing_class, *, cache, id_column, image_column, prompt=None) -> CaptionPolicy:
        if not (hasattr(processing_class, "image_processor") and hasattr(processing_class, "tokenizer")):
            raise ValueError(
                f"{type(unwrap_peft(model)).__name__} needs its processor to place image tokens in the prompt: pass "
                "the processor as processing_class (or policy=CausalVLMPolicy(processor, prompt=...))"
            )
        return CausalVLMPolicy(processing_class, prompt=prompt, image_column=image_column)


def policy_for(model: nn.Module, cache: ImageEmbeddingCache | None, id_column: str, processing_class: Any,
               image_column: str = "image") -> CaptionPolicy:
    """The adapter of the registered family ``model`` (possibly inside a PEFT wrapper) belongs to.

    ``processing_class`` is the trainer's: a tokenizer, or for pixel-reading captioners a processor.
    """
    base = unwrap_peft(model)
    for fam in FAMILIES.values():
        if fam.matches(base):
            return fam.policy(model, processing_class, cache=cache, id_column=id_column, image_column=image_column)
    raise TypeError(
        f"CaptionRLTrainer has no policy adapter for {type(base).__name__}; registered families: {sorted(FAMILIES)} "
        "(ClipCapModel, BlipForConditionalGeneration, decoder-only VLMs); a text-only decoder, which cannot see "
        "the image, only explicitly: policy=CausalLMPolicy(tokenizer, prompt); for another captioner pass "
        "policy= with a CaptionPolicy subclass or register a CaptionerFamily"
    )


# ---------------------------------------------------------------------- a ClipCap trained from scratch


def mle_clipcap(config: Any, *, tokenizer: Any, train: Any, cache: ImageEmbeddingCache, scorer: Any,
                max_tokens: int, seed: int, cache_dir: Path, settings: dict[str, Any] | None = None,
                progress: bool = True, **_: Any) -> tuple[nn.Module, Any]:
    """A tiny ClipCap (GPT-2 from ``config.mle_*``) MLE-trained on ``train``'s references, cached in
    ``cache_dir/demo_clipcap/<key>`` under a key of every setting and of the judge's weights (``settings`` adds
    the data source's own, e.g. the shapes world's version and seed)."""
    from transformers import GPT2Config

    from clip_rl_trl.models.clipcap import ClipCapConfig, ClipCapModel, train_clipcap_mle

    digest = hashlib.sha256(b"".join(v.float().numpy().tobytes() for v in scorer.model.state_dict().values()))
    key_settings = {
        **(settings or {}),
        "clip": digest.hexdigest()[:16],
        "seed": seed,
        "n_train": len(train),
        "max_tokens": max_tokens,
        "gpt_layers": config.mle_layers,
        "gpt_width": config.mle_width,
        "gpt_heads": config.mle_heads,
        "prefix_length": config.mle_prefix_length,
        "mle_epochs": config.mle_epochs,
        "mle_batch_size": config.mle_batch_size,
        "mle_lr": config.mle_learning_rate,
    }
    key = hashlib.sha256(json.dumps(key_settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "demo_clipcap" / key
    if (folder / "config.json").exists():
        return ClipCapModel.from_pretrained(folder), tokenizer
    gpt = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.mle_prefix_length + max_tokens + 8, n_embd=config.mle_width,
        n_layer=config.mle_layers, n_head=config.mle_heads, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClipCapModel(ClipCapConfig(prefix_dim=scorer.embed_dim, prefix_length=config.mle_prefix_length,
                                           gpt2_config=gpt.to_dict()))
    train_clipcap_mle(
        model, cache[train["image_id"]].float(), train["captions"], tokenizer, epochs=config.mle_epochs,
        batch_size=config.mle_batch_size, lr=config.mle_learning_rate, seed=seed, progress=progress,
    )
    tmp = folder.with_name(f"{key}.tmp{time.time_ns()}")
    model.save_pretrained(tmp)
    (tmp / "demo_settings.json").write_text(json.dumps(key_settings, indent=2, sort_keys=True))
    try:
        tmp.replace(folder)
    except OSError:  # a concurrent run wrote the same settings first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer
