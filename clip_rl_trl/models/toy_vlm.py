"""Tiny random decoder-only vision-language models and their real processors, built offline.

``build_toy_vlm(kind)`` returns ``(model, processor)``: a randomly initialised model of the family's own
transformers class (hidden width 32, two layers, two heads: 45-70k parameters, built in ~20 ms once transformers is imported) and the
family's own processor class around a real ``PreTrainedTokenizerFast`` (a word-level ``tokenizers`` model over
the shapes world's words, the caption instruction's words, the chat template's role words and the family's
special tokens), the family's image processor at small settings, and a chat template shaped like the released
one. Nothing touches the Hugging Face Hub. The pair behaves as a released checkpoint does for what
``CausalVLMPolicy`` needs: ``processor(images=..., text=[prompt] * n, padding=True, padding_side="left",
return_tensors="pt")`` expands the image placeholder to exactly as many image tokens as the vision tower gives
features, ``model(**enc)`` and ``model.generate(**enc)`` run, and ``save_pretrained`` of both reloads through
``AutoModelForImageTextToText`` / ``AutoProcessor`` (what ``VLMFamily.load`` uses).

Kinds (``TOY_VLM_KINDS``), what they imitate, and what the processor returns for a batch of 2 images and
2 prompts at the default ``image_size=32`` (``T`` is the padded prompt length):

``qwen2_vl`` (Qwen2-VL-Instruct: ``Qwen2VLForConditionalGeneration``, ``Qwen2VLProcessor``,
``Qwen2VLImageProcessor``; M-RoPE)
    ``input_ids`` (2, T), ``attention_mask`` (2, T), ``mm_token_type_ids`` (2, T) (1 on image tokens; the
    model refuses ``image_grid_thw`` without it), ``pixel_values`` (sum of prod(image_grid_thw), 96): flattened
    patches of *all* images stacked (3 channels x temporal patch 2 x 4 x 4), *not* one row per image;
    ``image_grid_thw`` (2, 3) = (1, h/4, w/4). Dynamic resolution, patch 4, merge 2: a 32x32 image is
    resized to 32x32 (grid (1, 8, 8), 64 patch rows, 16 ``<|image_pad|>`` tokens); a 48x32 (w x h) one to
    32x24 (grid (1, 6, 8), 12 tokens); ``max_pixels = image_size ** 2``, ``min_pixels = 8 * 8``.
``qwen2_5_vl`` (Qwen2.5-VL-Instruct) -- as ``qwen2_vl`` (same keys and shapes), with Qwen2.5-VL's windowed
    vision tower (window 16 px, full attention in the last block).
``idefics3`` (SmolVLM-256M-Instruct, whose hub config is ``model_type: idefics3`` with ``Idefics3Processor``;
``Idefics3ForConditionalGeneration``, ``Idefics3ImageProcessor``)
    ``input_ids`` (2, T), ``attention_mask`` (2, T), ``pixel_values`` (2, 1, 3, 32, 32) (batch, images per
    prompt, C, H, W: every image squared to ``image_size``, no splitting), ``pixel_attention_mask`` (2, 1,
    32, 32). Each image becomes ``<fake_token_around_image><global-img>`` + 16 ``<image>`` +
    ``<fake_token_around_image>`` (``image_seq_len = (32 / 4) ** 2 / 2 ** 2``).
``llava`` (llava-1.5-hf: ``LlavaForConditionalGeneration``, ``LlavaProcessor``, ``CLIPImageProcessor``)
    ``input_ids`` (2, T), ``attention_mask`` (2, T), ``pixel_values`` (2, 3, 32, 32) (resized, centre-cropped).
    Each ``<image>`` becomes 64 ``<image>`` tokens: (32 / 4) ** 2 patches, the CLS feature dropped
    (``vision_feature_select_strategy="default"``).

Tokens (``tokenizer.eos_token`` / ``pad_token`` / ``bos_token``, as the released Instruct tokenizers set them):
Qwen ``<|im_end|>`` / ``<|endoftext|>`` / none (generation config: EOS ``[<|im_end|>, <|endoftext|>]``);
Idefics3 ``<end_of_utterance>`` / ``<|im_end|>`` / ``<|im_start|>`` (never added by the tokenizer: the chat
template writes it); LLaVA ``</s>`` / ``<pad>`` / ``<s>`` (the tokenizer prepends ``<s>``, as Llama's does).
Every vocabulary also holds ``"\\n"`` (a plain added token, as the chat templates write newlines) and an
unknown-word token (``<unk>``; Idefics3's is ``<|endoftext|>``). The image placeholder tokens (and Qwen's
``<|video_pad|>``) must never be sampled: a caption holding one breaks the next forward with pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from clip_rl_trl.models.vlm import DEFAULT_INSTRUCTION

__all__ = ["TOY_PREFIX", "TOY_VLM_KINDS", "build_shapes_toy_vlm", "build_toy_vlm", "toy_kind", "toy_tokenizer",
           "toy_words"]

#: ``model_name_or_path`` prefix naming a toy VLM, e.g. ``toy:qwen2_vl`` (see :func:`toy_kind`)
TOY_PREFIX = "toy:"

_WIDTH = 32  # hidden width of every tower and decoder
_PATCH = 4  # vision patch size (pixels)

# ---------------------------------------------------------------------- chat templates (shaped like the released)

_QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
_IDEFICS3_SPECIALS = (
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)


# ---------------------------------------------------------------------- vocabulary and tokenizer


def toy_words(words: Sequence[str] | None = None, instruction: str = DEFAULT_INSTRUCTION) -> list[str]:
    """The plain words of a toy vocabulary: ``words`` (default: the shapes world's caption vocabulary), the
    words and punctuation of ``instruction``, and the chat templates' role words; sorted, without duplicates."""
    import re

    if words is None:
        from clip_rl_trl.data.shapes import ShapesLanguage

        words = ShapesLanguage.vocabulary()
    roles = ["system", "user", "assistant", "System", "User", "Assistant", "SYSTEM", "USER", "ASSISTANT", "You",
             "are", "a", "helpful", "Picture", "Video", ".", ":"]
    found = re.findall(r"\w+|[^\w\s]", instruction)
    return sorted({*words, *found, *roles})


def toy_tokenizer(
    words: Sequence[str],
    *,
    head: Sequence[str] = (),
    tail: Sequence[str] = (),
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str = "<unk>",
    add_bos: bool = False,
) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: ids ``head`` specials, then ``"\\n"`` and ``words``, then
    ``tail`` specials (all specials split out of text before words are).

    Text is split on whitespace and punctuation; decoding joins words with spaces and glues punctuation back
    (``"sentence ."`` -> ``"sentence."``), so ``decode(encode(c), skip_special_tokens=True) == c`` for any
    caption of single-spaced vocabulary words. ``add_bos`` prepends ``bos`` to every encoding (Llama's habit).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*head, *tail, unk]))
    body = ["\n", *(w for w in words if w not in specials and w != "\n")]
    ordered = list(dict.fromkeys([*head, *([unk] if unk not in tail else []), *body, *tail]))
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(ordered)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    if add_bos:
        if bos is None:
            raise ValueError("add_bos needs a bos token")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ordered.index(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos, unk_token=unk,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------- the families


def _text_sizes() -> dict[str, Any]:
    return {"hidden_size": _WIDTH, "intermediate_size": 2 * _WIDTH, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024}


def _token_ids(tokenizer: Any) -> dict[str, int | None]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _qwen(kind: str, image_size: int, words: list[str]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Qwen2-VL / Qwen2.5-VL: dynamic resolution at patch 4, merge 2 (8 px per image token)."""
    import transformers as tf

    tokenizer = toy_tokenizer(words, tail=_QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    pixels = {"patch_size": _PATCH, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 8 * 8,
              "max_pixels": image_size * image_size}
    processor_class = tf.Qwen2VLProcessor if kind == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    processor = processor_class(
        image_processor=tf.Qwen2VLImageProcessor(**pixels),
        video_processor=tf.Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=_QWEN_TEMPLATE,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
           for name in ("image_pad", "video_pad", "vision_start", "vision_end")}
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = {**_text_sizes(), "vocab_size": len(tokenizer), "rope_parameters": rope, **_token_ids(tokenizer)}
    vision: dict[str, Any] = {"depth": 2, "hidden_size": _WIDTH, "num_heads": 2, "patch_size": _PATCH,
                              "spatial_merge_size": 2, "temporal_patch_size": 2}
    if kind == "qwen2_vl":
        vision.update(embed_dim=_WIDTH, mlp_ratio=2)
        config_class, model_class = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
    else:
        vision.update(intermediate_size=2 * _WIDTH, out_hidden_size=_WIDTH, window_size=4 * _PATCH,
                      fullatt_block_indexes=[1])
        config_class, model_class = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # the released generation config stops at both
    return config, model_class, processor, {"eos_token_id": eos}


def _idefics3(
    image_size: int, words: list[str], sizes: Mapping[str, Any] | None = None
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Idefics3 as SmolVLM-256M-Instruct configures it, at one square, unsplit image of ``image_size``; ``sizes``
    overrides the toy widths (see :func:`build_toy_vlm`)."""
    import transformers as tf

    sizes = dict(sizes or {})
    unknown = set(sizes) - {"text", "vision", "scale_factor"}
    if unknown:
        raise ValueError(f"sizes: unknown keys {sorted(unknown)}; known: text, vision, scale_factor")
    patch, scale = sizes.get("vision", {}).get("patch_size", _PATCH), sizes.get("scale_factor", 2)
    _check_divisible(image_size, scale * patch, "idefics3")
    tokenizer = toy_tokenizer(
        words, head=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), tail=_IDEFICS3_SPECIALS,
        eos="<end_of_utterance>", pad="<|im_end|>", bos="<|im_start|>", unk="<|endoftext|>",
    )
    vocab = sizes.get("text", {}).get("vocab_size", len(tokenizer))
    if vocab != len(tokenizer):
        raise ValueError(f"sizes: text vocab_size {vocab} but the tokenizer has {len(tokenizer)} tokens; give "
                         "as many words as the vocabulary needs")
    image_seq_len = (image_size // patch) ** 2 // scale**2
    image_processor = tf.Idefics3ImageProcessor(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                     image_seq_len=image_seq_len, chat_template=_IDEFICS3_TEMPLATE)
    config = tf.Idefics3Config(
        text_config={"model_type": "llama", **_text_sizes(), "vocab_size": len(tokenizer), **_token_ids(tokenizer),
                     **sizes.get("text", {})},
        vision_config={"hidden_size": _WIDTH, "intermediate_size": 2 * _WIDTH, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": _PATCH,
                       **sizes.get("vision", {})},
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return config, tf.Idefics3ForConditionalGeneration, processor, {}


def _llava(image_size: int, words: list[str]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """LLaVA-1.5 (CLIP ViT tower, penultimate layer without CLS, Llama decoder)."""
    import transformers as tf

    _check_divisible(image_size, _PATCH, "llava")
    tokenizer = toy_tokenizer(words, head=("<unk>", "<s>", "</s>"), tail=("<image>", "<pad>"), eos="</s>",
                              pad="<pad>", bos="<s>", add_bos=True)
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=_PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=_LLAVA_TEMPLATE)
    config = tf.LlavaConfig(
        text_config={"model_type": "llama", **_text_sizes(), "vocab_size": len(tokenizer), **_token_ids(tokenizer)},
        vision_config={"model_type": "clip_vision_model", "hidden_size": _WIDTH, "intermediate_size": 2 * _WIDTH,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size,
                       "patch_size": _PATCH, "projection_dim": _WIDTH},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // _PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return config, tf.LlavaForConditionalGeneration, processor, {}


def _check_divisible(image_size: int, step: int, kind: str) -> None:
    if image_size % step:
        raise ValueError(f"{kind}: image_size must be a multiple of {step}, got {image_size}")


_BUILDERS: dict[str, Callable[..., tuple[Any, Any, Any, dict[str, Any]]]] = {
    "qwen2_vl": lambda size, words: _qwen("qwen2_vl", size, words),
    "qwen2_5_vl": lambda size, words: _qwen("qwen2_5_vl", size, words),
    "idefics3": _idefics3,
    "llava": _llava,
}

#: the families :func:`build_toy_vlm` builds
TOY_VLM_KINDS: tuple[str, ...] = tuple(_BUILDERS)


def build_toy_vlm(
    kind: str,
    *,
    image_size: int = 32,
    seed: int = 0,
    words: Sequence[str] | None = None,
    sizes: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """A tiny random VLM of family ``kind`` (one of :data:`TOY_VLM_KINDS`) and its real processor, offline.

    Args:
        kind: ``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"idefics3"`` (SmolVLM-256M-Instruct's classes) or ``"llava"``.
        image_size: the side the vision tower reads (Idefics3, LLaVA: every image is resized to it; Qwen:
            at most ``image_size ** 2`` pixels, aspect ratio kept). A multiple of 8 (Idefics3) or 4 (LLaVA).
        seed: seeds the random weights (under ``torch.random.fork_rng``: the caller's RNG is untouched);
            the same seed gives the same ``state_dict``.
        words: the caption words of the vocabulary (default: the shapes world's, ``ShapesLanguage.vocabulary``);
            the instruction's and chat template's words and the family's special tokens are always added.
        sizes: ``idefics3`` only: widths other than the toy's, ``{"text": {...}, "vision": {...},
            "scale_factor": n}`` (``Idefics3Config``'s ``text_config`` / ``vision_config`` entries, e.g.
            SmolVLM-256M's in ``benchmarks/rl_step_throughput.py``). ``image_size`` must be a multiple of
            ``scale_factor * patch_size``; a ``vocab_size`` must equal the tokenizer's size (pass enough
            ``words``). The processor's image tokens follow: ``(image_size / patch_size) ** 2 / scale_factor ** 2``.

    Returns:
        ``(model, processor)``: the model in eval mode, fp32 on the CPU, with ``config`` and
        ``generation_config`` holding the tokenizer's BOS / EOS / PAD ids; the processor with the family's
        image processor, tokenizer (``processor.tokenizer``) and chat template. See the module docstring for
        what the processor returns.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown toy VLM kind {kind!r}; known: {list(TOY_VLM_KINDS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    from transformers import GenerationConfig

    if sizes is not None and kind != "idefics3":
        raise ValueError(f"sizes overrides only the idefics3 toy's widths, not {kind!r}'s")
    builder = _BUILDERS[kind]
    extra = (sizes,) if sizes is not None else ()
    config, model_class, processor, generation = builder(image_size, toy_words(words), *extra)
    tokenizer = processor.tokenizer
    ids = _token_ids(tokenizer)
    for key, value in ids.items():
        setattr(config.text_config, key, value)
        if not isinstance(getattr(type(config), key, None), property):  # Idefics3Config forwards (deprecated)
            setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(**{**ids, **generation})
    return model.eval(), processor


def build_shapes_toy_vlm(kind: str, *, world: Any = None, seed: int = 0) -> tuple[Any, Any]:
    """:func:`build_toy_vlm` at the shapes world's image size (``world.image_size``; default ``ShapesWorld()``'s,
    32 px, the toy recipe's), over the shapes world's vocabulary."""
    if world is None:
        from clip_rl_trl.data.shapes import ShapesWorld

        world = ShapesWorld()
    return build_toy_vlm(kind, image_size=world.image_size, seed=seed)


def toy_kind(model_name_or_path: str | None) -> str | None:
    """The toy kind a ``model_name_or_path`` of the form ``toy:<kind>`` names, else ``None``; an unknown kind
    after ``toy:`` raises ``ValueError``."""
    if not isinstance(model_name_or_path, str) or not model_name_or_path.startswith(TOY_PREFIX):
        return None
    kind = model_name_or_path[len(TOY_PREFIX):]
    if kind not in _BUILDERS:
        raise ValueError(f"{model_name_or_path!r}: unknown toy VLM kind {kind!r}; known: {list(TOY_VLM_KINDS)}")
    return kind
