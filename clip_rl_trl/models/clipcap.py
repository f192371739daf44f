"""ClipCap (Mokady et al. 2021): a CLIP image embedding mapped to a GPT-2 prefix, as a ``PreTrainedModel``.

The captioner is ``CLIP image embedding -> mapper -> prefix_length prefix embeddings -> GPT-2``. It reads the
L2-normalised embeddings of ``ImageEmbeddingCache`` (the cache the rewards read) or pixel values through a
frozen open_clip image tower. Logit convention (all of ``forward``, ``token_logprobs`` and the MLE loss):
``logits[:, t]`` is the distribution of ``input_ids[:, t]`` given the image and ``input_ids[:, :t]``; position 0 is
predicted from the last prefix position, so captions need no BOS token and labels are not shifted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

logger = logging.getLogger(__name__)

MAPPER_TYPES = ("mlp", "transformer")
# Used when neither max_new_tokens nor max_length is given to `generate`: longer than any COCO caption in words.
DEFAULT_MAX_NEW_TOKENS = 40
# Regex over module names of a ClipCapModel: the four Conv1D projections of every GPT-2 block and nothing else
# (the open_clip image tower also has `c_fc` / `c_proj` modules, plain nn.Linear, which must stay frozen).
GPT2_LORA_TARGETS = r"gpt\.transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"


class ClipCapConfig(PreTrainedConfig):
    r"""Configuration of a ``ClipCapModel``.

    Args:
        prefix_dim: dimension of the CLIP image embedding fed to the mapper (``embed_dim`` of the CLIP model).
        prefix_length: number of prefix embeddings the mapper produces (10 in the ClipCap paper).
        mapper_type: ``"mlp"`` (Linear -> Tanh -> Linear, the paper's MLP mapper) or ``"transformer"``.
        clip_length: number of tokens the CLIP embedding is projected to before the transformer mapper.
        mapper_num_layers: transformer mapper depth (8 in the paper).
        mapper_num_heads: transformer mapper attention heads; must divide GPT-2's ``n_embd``.
        gpt2_config: the GPT-2 decoder, a ``GPT2Config`` or its dict (defaults to GPT-2 small).
        normalize_prefix: L2-normalise ``image_embeds`` before the mapper. Off by default because the
            embedding cache and the pixel path already give L2-normalised embeddings; turn it on to feed raw
            (unnormalised) CLIP features, as the reference code's ``--normalize_prefix`` option does.
        clip_model_name: open_clip architecture of the image tower for the pixel path, e.g. ``"ViT-B-32"``.
        clip_pretrained: open_clip pretrained tag loaded into that tower by ``ClipCapModel.from_gpt2`` or
            ``load_clip_tower`` (the checkpoint then stores the tower's weights).
        clip_model_config: alternatively an ``open_clip.CLIP`` constructor dict (``embed_dim``, ``vision_cfg``,
            ``text_cfg``) describing a tower built from a config, e.g. the tiny CLIP of the shapes world.
    """

    model_type = "clipcap"
    sub_configs_defaults = {"gpt2_config": GPT2Config}

    prefix_dim: int = 512
    prefix_length: int = 10
    mapper_type: str = "mlp"
    clip_length: int = 10
    mapper_num_layers: int = 8
    mapper_num_heads: int = 8
    gpt2_config: dict | PreTrainedConfig | None = None
    normalize_prefix: bool = False
    clip_model_name: str | None = None
    clip_pretrained: str | None = None
    clip_model_config: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        for name in ("prefix_dim", "prefix_length", "clip_length", "mapper_num_layers", "mapper_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ClipCapConfig.{name} must be a positive integer, got {value!r}")
        if self.mapper_type not in MAPPER_TYPES:
            raise ValueError(
                f"ClipCapConfig.mapper_type must be one of {MAPPER_TYPES}, got {self.mapper_type!r}"
            )
        if not isinstance(self.gpt2_config, GPT2Config):
            raise ValueError(
                f"ClipCapConfig.gpt2_config must be a GPT2Config or its dict, got {self.gpt2_config!r}"
            )
        n_embd, n_positions = self.gpt2_config.n_embd, self.gpt2_config.n_positions
        if self.mapper_type == "transformer" and n_embd % self.mapper_num_heads:
            raise ValueError(
                f"ClipCapConfig.mapper_num_heads ({self.mapper_num_heads}) must divide GPT-2's n_embd ({n_embd})"
            )
        if self.prefix_length >= n_positions:
            raise ValueError(
                f"ClipCapConfig.prefix_length ({self.prefix_length}) leaves no room for a caption in GPT-2's "
                f"n_positions ({n_positions})"
            )
        if self.clip_model_name is not None and self.clip_model_config is not None:
            raise ValueError(
                "ClipCapConfig: give clip_model_name or clip_model_config for the image tower, not both"
            )
        if self.clip_pretrained is not None and self.clip_model_name is None:
            raise ValueError(
                "ClipCapConfig.clip_pretrained needs clip_model_name (the architecture it belongs to)"
            )
        if self.clip_model_config is not None and not isinstance(self.clip_model_config, dict):
            raise ValueError(
                f"ClipCapConfig.clip_model_config must be an open_clip.CLIP kwargs dict, got {self.clip_model_config!r}"
            )

    @property
    def has_clip_tower(self) -> bool:
        return self.clip_model_name is not None or self.clip_model_config is not None


class ClipCapMLPMapper(nn.Module):
    """The paper's MLP mapper: ``Linear(d_clip, d_gpt*k/2) -> Tanh -> Linear(d_gpt*k/2, d_gpt*k)``, reshaped to
    ``(B, k, d_gpt)`` with ``k = prefix_length`` (Mokady et al. 2021, Sec. 3.3)."""

    def __init__(self, prefix_dim: int, gpt_dim: int, prefix_length: int) -> None:
        super().__init__()
        hidden = (gpt_dim * prefix_length) // 2
        self.prefix_length, self.gpt_dim = prefix_length, gpt_dim
        self.net = nn.Sequential(
            nn.Linear(prefix_dim, hidden), nn.Tanh(), nn.Linear(hidden, gpt_dim * prefix_length)
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.net(image_embeds).view(-1, self.prefix_length, self.gpt_dim)


class ClipCapTransformerMapper(nn.Module):
    """The paper's transformer mapper (Mokady et al. 2021, Sec. 3.3): the CLIP embedding is projected to
    ``clip_length`` tokens, concatenated with ``prefix_length`` learned constants, passed through a pre-norm
    transformer encoder, and the outputs at the constants' positions are the prefix."""

    def __init__(
        self,
        prefix_dim: int,
        gpt_dim: int,
        prefix_length: int,
        clip_length: int,
        num_layers: int,
        num_heads: int,
    ) -> None:
        super().__init__()
        self.clip_length, self.gpt_dim = clip_length, gpt_dim
        self.linear = nn.Linear(prefix_dim, clip_length * gpt_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, gpt_dim))
        # ReLU MLP of width 2 * d, no dropout, pre-norm: the reference transformer's block.
        layer = nn.TransformerEncoderLayer(
            gpt_dim,
            num_heads,
            dim_feedforward=2 * gpt_dim,
            dropout=0.0,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.linear(image_embeds).view(-1, self.clip_length, self.gpt_dim)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat([x, const], dim=1))[:, self.clip_length :]


def _build_open_clip(config: ClipCapConfig, pretrained: str | None = None) -> nn.Module:
    import open_clip

    if config.clip_model_config is not None:
        return open_clip.CLIP(**config.clip_model_config)
    try:
        # `from_pretrained` builds the model under a meta-device context; open_clip moves its model to `device`
        # at the end, which must then be that same default device.
        return open_clip.create_model(
            config.clip_model_name, pretrained=pretrained, device=torch.get_default_device()
        )
    except RuntimeError as err:  # open_clip reports unknown names and missing weights as RuntimeError
        raise ValueError(
            f"cannot build open_clip model {config.clip_model_name!r} (pretrained={pretrained!r}): {err}"
        ) from err


class ClipCapPreTrainedModel(PreTrainedModel):
    config_class = ClipCapConfig
    config: ClipCapConfig
    base_model_prefix = "clipcap"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only the mapper reaches here: GPT-2 dispatches to its own `_init_weights` and the CLIP tower is marked
        # initialised at construction. PyTorch's default init, as the reference ClipCap mapper uses.
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.reset_parameters()
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif isinstance(module, ClipCapTransformerMapper):
            init.normal_(module.prefix_const, mean=0.0, std=1.0)


class ClipCapModel(ClipCapPreTrainedModel):
    """ClipCap captioner: ``mapper`` (CLIP embedding -> GPT-2 prefix) and ``gpt`` (a ``GPT2LMHeadModel``).

    ``ClipCapModel(ClipCapConfig(prefix_dim=64, gpt2_config=GPT2Config(...)))`` builds everything from configs;
    ``ClipCapModel.from_gpt2("openai-community/gpt2", prefix_dim=512)`` loads pretrained GPT-2 weights. With a
    ``clip_model_name`` or ``clip_model_config`` in the config the model also owns ``clip_visual``, a frozen
    open_clip image tower for the ``pixel_values`` path.
    """

    def __init__(self, config: ClipCapConfig) -> None:
        super().__init__(config)
        gpt_dim = config.gpt2_config.n_embd
        if config.mapper_type == "mlp":
            self.mapper = ClipCapMLPMapper(config.prefix_dim, gpt_dim, config.prefix_length)
        else:
            self.mapper = ClipCapTransformerMapper(
                config.prefix_dim,
                gpt_dim,
                config.prefix_length,
                config.clip_length,
                config.mapper_num_layers,
                config.mapper_num_heads,
            )
        self.gpt = GPT2LMHeadModel(config.gpt2_config)
        self.clip_visual: nn.Module | None = None
        if config.has_clip_tower:
            self.clip_visual = _build_open_clip(config).visual.eval().requires_grad_(False)
            tower_dim = getattr(self.clip_visual, "output_dim", config.prefix_dim)
            if tower_dim != config.prefix_dim:
                raise ValueError(
                    f"the image tower embeds to {tower_dim} dimensions but ClipCapConfig.prefix_dim is "
                    f"{config.prefix_dim}"
                )
            # open_clip initialised the tower itself; keep HF's init pass off it.
            for module in self.clip_visual.modules():
                module._is_hf_initialized = True
        self.post_init()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_gpt2(
        cls,
        name_or_path: str,
        prefix_dim: int,
        *,
        gpt2_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> ClipCapModel:
        """A ClipCap with pretrained GPT-2 weights from ``name_or_path`` (a Hub name or a local directory).

        ``gpt2_kwargs`` go to ``GPT2LMHeadModel.from_pretrained``; ``config_kwargs`` are ``ClipCapConfig`` fields.
        If ``clip_pretrained`` is given the image tower's open_clip weights are loaded too.
        """
        gpt = GPT2LMHeadModel.from_pretrained(name_or_path, **(gpt2_kwargs or {}))
        if "gpt2_config" in config_kwargs:
            raise ValueError("from_gpt2 takes the GPT-2 config from the checkpoint; do not pass gpt2_config")
        config = ClipCapConfig(prefix_dim=prefix_dim, gpt2_config=gpt.config, **config_kwargs)
        model = cls(config)
        model.gpt = gpt
        if config.clip_pretrained is not None:
            model.load_clip_tower()
        return model

    def load_clip_tower(self, clip_model: nn.Module | None = None) -> None:
        """Copy image-tower weights into ``clip_visual``: from ``clip_model`` (an open_clip model of the configured
        architecture, e.g. ``ClipScorer.model``) or, by default, from open_clip's ``clip_pretrained`` weights."""
        if self.clip_visual is None:
            raise ValueError(
                "this ClipCapConfig has no image tower (set clip_model_name or clip_model_config)"
            )
        if clip_model is None:
            if self.config.clip_pretrained is None:
                raise ValueError("load_clip_tower() without a model needs ClipCapConfig.clip_pretrained")
            clip_model = _build_open_clip(self.config, pretrained=self.config.clip_pretrained)
        self.clip_visual.load_state_dict(clip_model.visual.state_dict())

    # ------------------------------------------------------------------ prefix

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``(B, prefix_dim)`` of preprocessed images ``(B, 3, H, W)``, through
        the frozen tower without gradients (the same embedding ``ClipScorer.encode_images`` gives)."""
        if self.clip_visual is None:
            raise ValueError(
                "pixel_values need an image tower: set clip_model_name or clip_model_config in ClipCapConfig"
            )
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        with torch.no_grad():
            dtype = next(self.clip_visual.parameters()).dtype
            return F.normalize(self.clip_visual(pixel_values.to(dtype)).float(), dim=-1)

    def prefix_embeds(
        self, image_embeds: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The GPT-2 prefix ``(B, prefix_length, n_embd)`` for CLIP embeddings ``(B, prefix_dim)`` or pixels."""
        if (image_embeds is None) == (pixel_values is None):
            raise ValueError("give exactly one of image_embeds and pixel_values")
        if pixel_values is not None:
            image_embeds = self.encode_pixels(pixel_values)
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.prefix_dim:
            raise ValueError(
                f"image_embeds must be (B, {self.config.prefix_dim}), got shape {tuple(image_embeds.shape)}"
            )
        image_embeds = image_embeds.to(device=self.device, dtype=next(self.mapper.parameters()).dtype)
        if self.config.normalize_prefix:
            image_embeds = F.normalize(image_embeds, dim=-1)
        return self.mapper(image_embeds).to(self.gpt.transformer.wte.weight.dtype)

    # ------------------------------------------------------------------ scoring

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions:
        """Teacher-forced pass over right-padded captions ``input_ids`` ``(B, T)`` after the image prefix.

        Returns ``logits`` ``(B, T, V)`` where ``logits[:, t]`` predicts ``input_ids[:, t]`` (no shift, no BOS). With
        ``labels`` ``(B, T)`` (usually ``input_ids``), ``loss`` is the mean cross-entropy over positions whose label
        is not -100 and whose ``attention_mask`` is 1, so padding never counts even when pad and EOS share an id.
        Extra keyword arguments go to the GPT-2 body (e.g. ``output_hidden_states``).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        prefix = self.prefix_embeds(image_embeds, pixel_values)
        batch, length = input_ids.shape
        if prefix.shape[0] != batch:
            raise ValueError(f"{prefix.shape[0]} images for {batch} captions; they must match")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        limit = self.config.gpt2_config.n_positions - self.config.prefix_length
        if length > limit:
            raise ValueError(
                f"captions of {length} tokens exceed the {limit} positions left after the prefix"
            )
        input_ids = input_ids.to(self.device)
        embeds = torch.cat([prefix, self.gpt.transformer.wte(input_ids)], dim=1)
        full_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            prefix_mask = attention_mask.new_ones(batch, self.config.prefix_length)
            full_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        kwargs.setdefault("use_cache", False)
        out = self.gpt.transformer(inputs_embeds=embeds, attention_mask=full_mask, **kwargs)
        # Hidden state at position p predicts the token at p + 1: the last prefix position predicts token 0.
        start = self.config.prefix_length - 1
        logits = self.gpt.lm_head(out.last_hidden_state[:, start : start + length])
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            labels = labels.to(self.device)
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )

    def token_logprobs(
        self,
        image_embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """``(B, T)`` log-probabilities ``log p(input_ids[:, t] | image, input_ids[:, :t])`` in one forward pass,
        with gradients; 0 where ``attention_mask`` is 0. ``temperature`` divides the logits first (match the
        sampling temperature for importance ratios)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = self(input_ids, attention_mask, image_embeds=image_embeds, pixel_values=pixel_values).logits
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        ids = input_ids.to(logits.device)
        # gather - logsumexp avoids materialising a second (B, T, V) log-softmax tensor.
        logprobs = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        if attention_mask is not None:
            logprobs = logprobs.masked_fill(attention_mask.to(logprobs.device) == 0, 0.0)
        return logprobs

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        image_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **generation_kwargs: Any,
    ) -> torch.LongTensor:
        """Caption token ids ``(B * num_return_sequences, T)``, without the prefix, padded after EOS with the pad id.

        Keyword arguments are ``GPT2LMHeadModel.generate``'s: ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``num_beams``, ``num_return_sequences``, ``max_new_tokens`` (default ``DEFAULT_MAX_NEW_TOKENS``), ...
        ``eos_token_id`` / ``pad_token_id`` default to a ``tokenizer=`` argument's, then to the GPT-2 config's
        (pad falls back to EOS). Sequences of one image are consecutive rows.
        """
        prefix = self.prefix_embeds(image_embeds, pixel_values)
        tokenizer = generation_kwargs.get("tokenizer")
        gpt_config = self.config.gpt2_config
        eos = generation_kwargs.pop("eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id if tokenizer is not None else gpt_config.eos_token_id
        pad = generation_kwargs.pop("pad_token_id", None)
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer is not None else gpt_config.pad_token_id
        if pad is None:
            pad = eos if isinstance(eos, int) else eos[0]
        if "max_new_tokens" not in generation_kwargs and "max_length" not in generation_kwargs:
            generation_kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        out = self.gpt.generate(
            inputs_embeds=prefix, attention_mask=mask, eos_token_id=eos, pad_token_id=pad, **generation_kwargs
        )
        sequences = out.sequences if hasattr(out, "sequences") else out
        return sequences


def clipcap_lora_config(
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    train_mapper: bool = True,
    **kwargs: Any,
) -> Any:
    """A ``peft.LoraConfig`` for ``get_peft_model(clipcap, config)``: LoRA on every GPT-2 block's ``c_attn``,
    ``c_proj`` and ``c_fc`` (``Conv1D``, so ``fan_in_fan_out=True``), never on the CLIP tower; with
    ``train_mapper`` the mapper is trained in full alongside (``modules_to_save=["mapper"]``)."""
    from peft import LoraConfig

    if "target_modules" in kwargs or "fan_in_fan_out" in kwargs:
        raise ValueError(
            "clipcap_lora_config sets target_modules and fan_in_fan_out; build a LoraConfig instead"
        )
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=GPT2_LORA_TARGETS,
        fan_in_fan_out=True,
        modules_to_save=["mapper"] if train_mapper else None,
        **kwargs,
    )


def tokenize_captions(
    captions: Sequence[str], tokenizer: Any, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of ``captions`` each followed by EOS, no BOS (the prefix plays
    its part). A caption longer than ``max_length`` tokens (EOS included) raises an error naming it."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; captions must end with EOS")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    for i, seq in enumerate(ids):
        if max_length is not None and len(seq) > max_length:
            raise ValueError(
                f"caption {i} ({captions[i]!r}) has {len(seq)} tokens with EOS, over {max_length}"
            )
    width = max((len(s) for s in ids), default=0)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return input_ids, attention_mask


def train_clipcap_mle(
    model: ClipCapModel,
    image_embeds: torch.Tensor,
    captions: Sequence[str] | Sequence[Sequence[str]],
    tokenizer: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> list[float]:
    """MLE (teacher-forced cross-entropy) training of a ClipCap on image embeddings and their captions.

    Minimises ``-sum_t log p(w_t | prefix(e_I), w_<t)`` averaged over caption tokens (EOS included), the ClipCap
    training objective (Mokady et al. 2021, Sec. 3.1, Eq. 3), with AdamW over the parameters that require grad (freeze
    ``model.gpt`` first to train the mapper alone, the paper's frozen-GPT-2 variant). ``captions`` holds one
    caption per embedding row, or a list of captions per row. Returns the loss of every step.
    """
    # Written by hand rather than with transformers.Trainer, for a measured reason: benchmarks/mle_loop.py trains
    # the demo's captioner both ways and finds the same speed (Trainer / ours 1.01x) and the same loss (val 1.067
    # vs 1.054, within the spread between seeds), so a switch buys nothing measurable, while every recorded result
    # (the demo, the 44-run long-training study) starts from this loop's captioner, which a Trainer run cannot
    # reproduce bit for bit (its sampler and dataloader draw from other RNG streams). The Trainer would also need
    # care: it strips the caption column, clips gradients at 1.0 by default, and passes num_items_in_batch.
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of captions, not a single string")
    if len(captions) != len(image_embeds):
        raise ValueError(f"{len(captions)} caption entries for {len(image_embeds)} image embeddings")
    rows, texts = [], []
    for row, entry in enumerate(captions):
        entry_list = [entry] if isinstance(entry, str) else list(entry)
        for caption in entry_list:
            if not isinstance(caption, str):
                raise TypeError(f"captions[{row}] holds a {type(caption).__name__}, expected str")
            rows.append(row)
            texts.append(caption)
    if not texts:
        raise ValueError("no captions to train on")
    limit = model.config.gpt2_config.n_positions - model.config.prefix_length
    input_ids, attention_mask = tokenize_captions(texts, tokenizer, max_length=limit)
    rows_t = torch.tensor(rows)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    losses: list[float] = []
    was_training = model.training
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="ClipCap MLE")
    try:
        # Dropout draws from the global RNG: seed it too so a run is reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(epochs):
                order = torch.randperm(len(texts), generator=generator)
                for start in range(0, len(texts), batch_size):
                    idx = order[start : start + batch_size]
                    mask = attention_mask[idx]
                    width = int(mask.sum(1).max())  # trim the batch to its longest caption
                    ids, mask = input_ids[idx, :width], mask[:, :width]
                    loss = model(ids, mask, image_embeds=image_embeds[rows_t[idx]], labels=ids).loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return losses
