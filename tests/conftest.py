"""Shared test set-up: offline Hub, and the tiny random models most tests build: the open_clip CLIP they judge
with, a GPT-2 decoder over a test vocabulary, a ClipCap on top of it, and CaptionRLTrainer arguments that train
two steps on the CPU."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import open_clip
import pytest
import torch
from open_clip.transform import image_transform

from clip_rl_trl import ClipScorer

if TYPE_CHECKING:
    from transformers import GPT2Config

    from clip_rl_trl import CaptionRLConfig, ClipCapModel


def make_tiny_scorer(seed: int = 0, batch_size: int = 256) -> ClipScorer:
    """A random CLIP of the shapes world's size: ViT image 32 / patch 4 / width 96, text context 24, dim 64."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, patch_size=4, width=96, layers=3, head_width=32),
        text_cfg=dict(context_length=24, width=64, heads=4, layers=2),
    )
    return ClipScorer(
        model, open_clip.SimpleTokenizer(context_length=24), image_transform(32, is_train=False), batch_size=batch_size
    )


def tiny_shapes_setup(world: Any) -> tuple[Any, ClipScorer, Any]:
    """16 training rows of ``world`` with their images, :func:`make_tiny_scorer`'s judge and its embedding cache."""
    from clip_rl_trl import ImageEmbeddingCache

    data = world.to_dataset(16, "train")
    scorer = make_tiny_scorer()
    return data, scorer, ImageEmbeddingCache.build(data, scorer, progress=False)


def tiny_gpt2_config(tokenizer: Any, **overrides: Any) -> GPT2Config:
    """A 2-layer, width-32 GPT-2 over ``tokenizer``'s vocabulary, with its BOS / EOS / PAD ids; context 48."""
    from transformers import GPT2Config

    shape = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 48, **overrides}
    return GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )


def make_tiny_clipcap(
    tokenizer: Any, seed: int | None = 0, *, gpt: dict[str, Any] | None = None, **config: Any
) -> ClipCapModel:
    """A random ClipCap (prefix dim 64, prefix length 4) on ``tiny_gpt2_config(tokenizer, **gpt)``.

    ``seed`` seeds torch's global RNG first (``None``: the caller's RNG as it stands); ``config`` goes to
    ``ClipCapConfig``.
    """
    from clip_rl_trl import ClipCapConfig, ClipCapModel

    if seed is not None:
        torch.manual_seed(seed)
    config = {"prefix_dim": 64, "prefix_length": 4, **config}
    return ClipCapModel(ClipCapConfig(gpt2_config=tiny_gpt2_config(tokenizer, **(gpt or {})).to_dict(), **config))


def tiny_rl_args(output_dir: Any, **overrides: Any) -> CaptionRLConfig:
    """``CaptionRLConfig`` for two CPU steps of 8 completions (4 per prompt), seed 0, no saving, no reporting."""
    from clip_rl_trl import CaptionRLConfig

    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, seed=0, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return CaptionRLConfig(**kwargs)


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    """A fresh tiny scorer per test module (a scorer keeps counters and its shared-text memory)."""
    return make_tiny_scorer()


@pytest.fixture
def groups_spy(monkeypatch) -> list[dict]:
    """Record every call of ``neighbors.groups_within_split`` (arguments and the groups it returned)."""
    import clip_rl_trl.neighbors

    calls: list[dict] = []
    real = clip_rl_trl.neighbors.groups_within_split

    def spy(img_emb, k, **kwargs):
        calls.append({"img_emb": img_emb, "k": k, **kwargs, "groups": real(img_emb, k, **kwargs)})
        return calls[-1]["groups"]

    monkeypatch.setattr(clip_rl_trl.neighbors, "groups_within_split", spy)
    return calls
