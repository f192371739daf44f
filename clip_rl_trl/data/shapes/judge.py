"""The shapes world's judge: a tiny open_clip ``CLIP`` trained on the world's scenes, cached on disk.

``train_shapes_clip(world)`` trains it (or loads it from the cache) and wraps it as a ``ClipScorer``, the frozen
judge the rewards and the evaluation use. The cache folder is keyed by a hash of the world, the model config and
the training settings; the key and the folder layout are part of every recorded result, so they must not change
for settings that already existed (see ``_cache_settings``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.data.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    WORLD_VERSION,
    Scene,
    ShapesWorld,
    default_cache_dir,
)

__all__ = ["DEFAULT_CLIP_CONFIG", "train_shapes_clip"]

DEFAULT_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    # A ResNet tower (open_clip's ModifiedResNet, one block per stage): convolutions learn the objects' shapes
    # within the demo's budget, where ViTs (patch 8 or 4) learned colour but hardly shape (docs/shapes_world.md).
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 24, "width": 64, "heads": 4, "layers": 2},
}


def train_shapes_clip(
    world: ShapesWorld,
    *,
    n_scenes: int = 8000,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 2e-3,
    partial_weight: float = 0.5,
    hard_negatives: bool = True,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    **config_overrides: Any,
) -> ClipScorer:
    """Train (or load from the cache) a tiny open_clip ``CLIP`` on ``world`` and wrap it as a ``ClipScorer``.

    The model is ``open_clip.CLIP(**config)`` with ``config`` = ``DEFAULT_CLIP_CONFIG`` updated by
    ``config_overrides`` (``embed_dim=32`` or ``vision_cfg={"layers": [2, 2, 2, 2]}``: sub-dicts are merged;
    an int ``layers`` with a ``patch_size`` makes the tower a ViT). It is
    trained on ``n_scenes`` scenes of split ``"clip"`` (the captioners' ``"train"``/``"test"`` splits stay
    unseen) with AdamW and a one-cycle schedule peaking at ``lr``. Each step pairs every image with its full
    caption (symmetric InfoNCE, Radford et al. 2021) and with a random partial caption (text-to-image
    InfoNCE, weighted ``partial_weight``), so shorter captions retrieve the images they fit. With
    ``hard_negatives`` the image-to-text direction also sees, for every image, the full caption of its
    :meth:`ShapesWorld.hard_negative` scene (NegCLIP, Yuksekgonul et al. 2023): the judge must bind each
    colour, shape and size to its object instead of reading captions as bags of words.

    Weights are cached as safetensors under ``cache_dir`` (default ``$CLIP_RL_TRL_CACHE``, else
    ``~/.cache/clip_rl_trl``) in ``shapes_clip/<key>/`` (``model.safetensors`` and ``config.json``), ``<key>``
    a hash of the world, model config and training settings, and loaded from there on the next call;
    ``force=True`` retrains and overwrites. ``device`` is where the model trains and the returned scorer runs
    (default CPU); it is not part of the cache key.
    """
    import open_clip
    from open_clip.transform import image_transform
    from safetensors.torch import load_file, save_file

    if not isinstance(world, ShapesWorld):
        raise TypeError(f"world must be a ShapesWorld, got {type(world).__name__}")
    config = _merge_config(DEFAULT_CLIP_CONFIG, config_overrides)
    _check_positive(n_scenes=n_scenes, epochs=epochs, batch_size=batch_size, lr=lr)
    if partial_weight < 0:
        raise ValueError(f"partial_weight must be >= 0, got {partial_weight}")
    settings = _cache_settings(
        world,
        config,
        {
            "n_scenes": n_scenes,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "partial_weight": partial_weight,
            "seed": seed,
            # Only when on, so judges trained without them keep the cache key they had before the option.
            **({"hard_negatives": True} if hard_negatives else {}),
        },
    )
    folder = _cache_folder(settings, cache_dir)
    weights = folder / "model.safetensors"

    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(config))
    context_length = config["text_cfg"]["context_length"]
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    preprocess = image_transform(config["vision_cfg"]["image_size"], is_train=False)
    model.to(device)
    if weights.exists() and not force:
        model.load_state_dict(load_file(weights, device=str(model.logit_scale.device)))
    else:
        _fit_clip(world, model, tokenizer, preprocess, settings["train"], progress)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"model.safetensors.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, weights)  # atomic: a concurrent reader never sees half a file
        (folder / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    return ClipScorer(model, tokenizer, preprocess, device=device)


def _cache_settings(world: ShapesWorld, config: Mapping[str, Any], train: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the judge's weights depend on; hashed into the cache key and written as ``config.json``.

    Keep this dict, its keys and its values exactly as they are for existing settings: any change moves every
    cached judge to a new key (retraining it) and breaks the link to the results recorded with it.
    """
    return {
        "world_version": WORLD_VERSION,
        "world_seed": world.seed,
        "world_image_size": world.image_size,
        "model": dict(config),
        "train": dict(train),
    }


def _cache_folder(settings: Mapping[str, Any], cache_dir: str | os.PathLike | None) -> Path:
    """``<cache_dir>/shapes_clip/<first 16 hex digits of the SHA-256 of the sorted-keys JSON of settings>``."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "shapes_clip" / key


def _fit_clip(
    world: ShapesWorld,
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    train: Mapping[str, Any],
    progress: bool,
) -> None:
    """Train ``model`` in place on ``train["n_scenes"]`` scenes of ``world``'s ``"clip"`` split."""
    from tqdm.auto import tqdm

    n, batch_size = train["n_scenes"], train["batch_size"]
    longest = max(len(tokenizer.encode(world.describe(s))) for s in _longest_scenes()) + 2
    if longest > tokenizer.context_length:
        raise ValueError(
            f"text context_length {tokenizer.context_length} is shorter than the world's "
            f"longest caption ({longest} tokens with start/end markers)"
        )
    # Render and preprocess once: the training loop only indexes tensors.
    scenes, images = [], []
    for i in range(n):
        scene, image, _ = world.example(i, "clip")
        scenes.append(scene)
        images.append(preprocess(image))
    device = model.logit_scale.device
    pixels = torch.stack(images).to(device)
    full_tokens = tokenizer([world.describe(s) for s in scenes]).to(device)

    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * train["epochs"]
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train["lr"],
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train["lr"], total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(train["seed"])
    caption_rng = random.Random(f"shapes-clip-captions:{train['seed']}")
    negative_rng = random.Random(f"shapes-clip-negatives:{train['seed']}")
    model.train()
    bar = tqdm(total=total, desc="training shapes CLIP", disable=not progress)
    for _ in range(train["epochs"]):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
            txt = F.normalize(model.encode_text(full_tokens[idx]), dim=-1)
            scale = model.logit_scale.exp()
            logits = scale * txt @ img.T
            target = torch.arange(len(idx), device=device)
            image_logits = logits.T
            if train.get("hard_negatives"):
                negatives = [world.describe(world.hard_negative(scenes[i], negative_rng)) for i in idx.tolist()]
                neg = F.normalize(model.encode_text(tokenizer(negatives).to(device)), dim=-1)
                image_logits = torch.cat([image_logits, scale * img @ neg.T], dim=1)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(image_logits, target)) / 2
            if train["partial_weight"] > 0:
                captions = [world.training_caption(scenes[i], caption_rng) for i in idx.tolist()]
                partial = tokenizer(captions).to(device)
                part = F.normalize(model.encode_text(partial), dim=-1)
                # Text-to-image only: many images fit "a circle", but each caption has one image to find.
                loss = loss + train["partial_weight"] * F.cross_entropy(scale * part @ img.T, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the inverse temperature
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def _longest_scenes() -> list[Scene]:
    """Scenes whose full captions are the longest the grammar produces (for the context-length check)."""
    longest_colour = max(COLOURS, key=len)
    objects = [
        {"size": max(SIZES, key=len), "colour": longest_colour, "shape": s, "position": p}
        for s in SHAPES
        for p in ("left", "bottom")
    ]
    return [{"objects": [o, o], "background": b} for o in objects for b in BACKGROUNDS]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides`` (sub-dicts merged); unknown keys raise, naming the key."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    allowed = {
        "vision_cfg": {f.name for f in dataclasses.fields(CLIPVisionCfg)},
        "text_cfg": {f.name for f in dataclasses.fields(CLIPTextCfg)},
    }
    top_level = {"embed_dim", "quick_gelu", "init_logit_scale", "vision_cfg", "text_cfg"}
    config = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if key not in top_level:
            raise ValueError(
                f"unknown CLIP config key {key!r}; expected one of {sorted(top_level)} "
                "or a training argument of train_shapes_clip"
            )
        if key in allowed:
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must be a dict, got {type(value).__name__}")
            bad = set(value) - allowed[key]
            if bad:
                raise ValueError(f"unknown {key} keys {sorted(bad)}")
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config
