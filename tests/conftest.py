"""Shared test set-up: offline Hub, and the tiny random open_clip CLIP most tests judge with."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import open_clip
import pytest
import torch
from open_clip.transform import image_transform

from clip_rl_trl import ClipScorer


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
