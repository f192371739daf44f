"""The synthetic shapes world (DESIGN §6): procedural scenes, a caption grammar, and a tiny CLIP trained on it.

A scene holds one or two objects (shape, colour, size, position) on a background colour, rendered with Pillow.
Every caption is a sentence of a small grammar::

    caption    := object [" and " object] [" on a " BACKGROUND " background"]
    object     := "a " [SIZE " "] [COLOUR " "] SHAPE [" " position]
    position   := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"

so fluency (does the caption parse?) and faithfulness (are the attributes it mentions true of the scene?) can be
checked exactly. ``ShapesWorld.train_clip`` trains the frozen judge the rewards use, a tiny open_clip ``CLIP``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.evaluation.retrieval import precision_at_1

if TYPE_CHECKING:
    import datasets

# Bump when scenes, rendering, captions or CLIP training change: it is part of every RNG stream and cache key.
WORLD_VERSION = 1

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 200),
    "pink": (245, 130, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Canonical order of an object's attributes in a caption; "shape" (the noun) is the only mandatory one.
OBJECT_ATTRIBUTES = ("size", "colour", "shape", "position")
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))

_POSITION_WORDS = {tuple(phrase.split()): pos for pos, phrase in POSITION_PHRASES.items()}
_SIZE_RADIUS = {"small": 3.8, "large": 6.5}  # in pixels of a 32x32 image
_SINGLE_CENTRES = {
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
    "center": (16.0, 16.0),
}
_PAIR_CENTRES = {"left": (8.5, 16.0), "right": (23.5, 16.0), "top": (16.0, 8.5), "bottom": (16.0, 23.5)}
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges keep small shapes tellable apart

Scene = dict[str, Any]

DEFAULT_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    # A ResNet tower (open_clip's ModifiedResNet, one block per stage): convolutions learn the objects' shapes
    # within the demo's budget, where ViTs (patch 8 or 4) learned colour but hardly shape (docs/shapes_world.md).
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 24, "width": 64, "heads": 4, "layers": 2},
}


def _default_cache_dir() -> Path:
    return Path(os.environ.get("CLIP_RL_TRL_CACHE") or Path.home() / ".cache" / "clip_rl_trl")


class ShapesWorld:
    """A deterministic world of one- or two-object scenes with grammar captions (DESIGN §6).

    ``ShapesWorld(seed)`` fixes everything: scene ``i`` of split ``s`` is drawn from its own RNG stream keyed by
    ``(WORLD_VERSION, seed, s, i)``, so ``to_dataset(100, s)`` is a prefix of ``to_dataset(1000, s)``, and
    different splits or seeds are independent draws (attribute combinations may recur, the images never do).

    A scene is a plain dict ``{"objects": [{"size", "colour", "shape", "position"}, ...], "background": str}``;
    two objects are listed in reading order (left before right, top before bottom).
    """

    def __init__(self, seed: int = 0, image_size: int = 32) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        self.seed = seed
        self.image_size = image_size

    def __repr__(self) -> str:
        return f"ShapesWorld(seed={self.seed}, image_size={self.image_size})"

    # ------------------------------------------------------------------ scenes and images

    def _rng(self, split: str, index: int) -> random.Random:
        # String seeds are hashed with SHA-512 by `random`: stable across runs, platforms and PYTHONHASHSEED.
        return random.Random(f"shapes-v{WORLD_VERSION}:{self.seed}:{split}:{index}")

    @staticmethod
    def _sample_scene(rng: random.Random) -> Scene:
        positions = (
            [rng.choice(list(_SINGLE_CENTRES))] if rng.random() < 1 / 3 else list(rng.choice(PAIR_LAYOUTS))
        )
        objects = [
            {
                "size": rng.choice(SIZES),
                "colour": rng.choice(list(COLOURS)),
                "shape": rng.choice(SHAPES),
                "position": p,
            }
            for p in positions
        ]
        return {"objects": objects, "background": rng.choice(list(BACKGROUNDS))}

    def render(self, scene: Scene, rng: random.Random | None = None) -> Image.Image:
        """Draw ``scene`` as an RGB image; ``rng`` jitters positions, sizes and colours (``None``: no jitter)."""
        _check_scene(scene)
        scale = self.image_size / 32 * _SUPERSAMPLE
        side = self.image_size * _SUPERSAMPLE
        img = Image.new("RGB", (side, side), BACKGROUNDS[scene["background"]])
        draw = ImageDraw.Draw(img)
        pair = len(scene["objects"]) == 2
        for obj in scene["objects"]:
            cx, cy = (_PAIR_CENTRES if pair else _SINGLE_CENTRES)[obj["position"]]
            r = _SIZE_RADIUS[obj["size"]]
            colour = COLOURS[obj["colour"]]
            if rng is not None:
                along = rng.uniform(-0.5, 0.5) if pair else rng.uniform(-1.5, 1.5)
                across = rng.uniform(-3.0, 3.0) if pair else rng.uniform(-1.5, 1.5)
                horizontal = obj["position"] in ("left", "right")
                cx, cy = (cx + along, cy + across) if horizontal else (cx + across, cy + along)
                r += rng.uniform(-0.3, 0.3)
                colour = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in colour)
            _draw_shape(draw, obj["shape"], cx * scale, cy * scale, r * scale, colour)
        return img.resize((self.image_size, self.image_size), Image.Resampling.BOX)

    def _example(self, split: str, index: int) -> tuple[Scene, Image.Image, list[str]]:
        rng = self._rng(split, index)
        scene = self._sample_scene(rng)
        image = self.render(scene, rng)
        return scene, image, [self._human_caption(scene, rng) for _ in range(5)]

    def scenes(self, n: int, split: str = "train") -> list[Scene]:
        """The first ``n`` scenes of ``split`` (the ``scene`` column of ``to_dataset(n, split)``)."""
        _check_n_split(n, split)
        return [self._sample_scene(self._rng(split, i)) for i in range(n)]

    def to_dataset(self, n: int, split: str = "train") -> datasets.Dataset:
        """``n`` examples of ``split`` as a ``datasets.Dataset``.

        Columns: ``image`` (PIL, ``image_size`` square), ``image_id`` (``"<split>-<index:06d>"``, e.g.
        ``"train-000017"``: stable, unique within one seed), ``captions`` (five human-like captions, mostly naming
        only the salient object, about one in ten as detailed as the full caption), ``full_caption`` (every
        attribute of the scene) and ``scene`` (the structured scene the captions can be checked against).
        """
        import datasets

        _check_n_split(n, split)
        rows: dict[str, list[Any]] = {
            k: [] for k in ("image", "image_id", "captions", "full_caption", "scene")
        }
        for i in range(n):
            scene, image, captions = self._example(split, i)
            rows["image"].append(image)
            rows["image_id"].append(f"{split}-{i:06d}")
            rows["captions"].append(captions)
            rows["full_caption"].append(self.describe(scene))
            rows["scene"].append(scene)
        return datasets.Dataset.from_dict(rows, features=_features())

    # ------------------------------------------------------------------ captions

    @staticmethod
    def salient_object(scene: Scene) -> int:
        """Index of the object a hurried annotator names: the larger one; the first (left/top) on a tie."""
        objects = scene["objects"]
        if len(objects) == 2 and objects[0]["size"] == "small" and objects[1]["size"] == "large":
            return 1
        return 0

    @staticmethod
    def describe(
        scene: Scene,
        attributes: Sequence[str] = OBJECT_ATTRIBUTES,
        objects: Sequence[int] | None = None,
        background: bool = True,
    ) -> str:
        """A grammar sentence naming ``attributes`` of the ``objects`` (indices, in that order) of ``scene``.

        The defaults give the full caption, e.g. "a large red circle on the left and a small blue square on the
        right on a gray background". ``attributes`` must include ``"shape"`` (the noun).
        """
        _check_scene(scene)
        unknown = set(attributes) - set(OBJECT_ATTRIBUTES)
        if unknown:
            raise ValueError(
                f"unknown attributes {sorted(unknown)}; expected a subset of {OBJECT_ATTRIBUTES}"
            )
        if "shape" not in attributes:
            raise ValueError("attributes must include 'shape': every object phrase needs its noun")
        indices = range(len(scene["objects"])) if objects is None else objects
        if not 1 <= len(indices) <= 2 or any(not 0 <= i < len(scene["objects"]) for i in indices):
            raise ValueError(
                f"objects must be 1 or 2 indices into the scene's {len(scene['objects'])} objects"
            )
        phrases = []
        for i in indices:
            obj = scene["objects"][i]
            words = ["a"] + [obj[a] for a in ("size", "colour", "shape") if a in attributes]
            if "position" in attributes:
                words.append(POSITION_PHRASES[obj["position"]])
            phrases.append(" ".join(words))
        caption = " and ".join(phrases)
        return f"{caption} on a {scene['background']} background" if background else caption

    def _human_caption(self, scene: Scene, rng: random.Random) -> str:
        """One annotator: 10% thorough (the full caption); otherwise mostly the salient object's shape/colour."""
        if rng.random() < 0.1:
            return self.describe(scene)
        n_objects = len(scene["objects"])
        objects = [self.salient_object(scene)] if n_objects == 1 or rng.random() < 0.85 else [0, 1]
        adjectives = rng.choices([(), ("colour",), ("size",), ("size", "colour")], weights=[35, 35, 10, 20])[
            0
        ]
        attributes = (*adjectives, "shape") + (("position",) if rng.random() < 0.15 else ())
        return self.describe(scene, attributes, objects, background=rng.random() < 0.1)

    @staticmethod
    def hard_negative(scene: Scene, rng: random.Random) -> Scene:
        """A scene that differs from ``scene`` in one binding of an attribute to an object (NegCLIP's hard
        negatives, Yuksekgonul et al. 2023): in a two-object scene, half the time the two objects exchange their
        colours, shapes or sizes (when those differ); otherwise one object gets another colour, shape or size.
        Its full caption uses the same words as ``scene``'s (a swap) or all but one: a judge that reads a
        caption as a bag of words cannot tell the two apart."""
        _check_scene(scene)
        negative = copy.deepcopy(scene)
        objects = negative["objects"]
        if len(objects) == 2 and rng.random() < 0.5:
            swappable = [a for a in ("colour", "shape", "size") if objects[0][a] != objects[1][a]]
            if swappable:
                attribute = rng.choice(swappable)
                objects[0][attribute], objects[1][attribute] = objects[1][attribute], objects[0][attribute]
                return negative
        obj = rng.choice(objects)
        attribute = rng.choice(("colour", "shape", "size"))
        values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}[attribute]
        obj[attribute] = rng.choice([v for v in values if v != obj[attribute]])
        return negative

    def _training_caption(self, scene: Scene, rng: random.Random) -> str:
        """A uniformly random partial caption, so the CLIP also scores every level of detail sensibly."""
        n_objects = len(scene["objects"])
        if n_objects == 2 and rng.random() < 0.5:
            objects = [0, 1] if rng.random() < 0.5 else [1, 0]
        else:
            objects = [rng.randrange(n_objects)]
        attributes = [a for a in OBJECT_ATTRIBUTES if a == "shape" or rng.random() < 0.5]
        return self.describe(scene, attributes, objects, background=rng.random() < 0.5)

    @staticmethod
    def parse(caption: str) -> dict[str, Any] | None:
        """The attributes ``caption`` mentions, or ``None`` when it is not a sentence of the world's grammar.

        Returns ``{"objects": [{...}, ...]}`` (one or two object dicts holding only the mentioned keys among
        ``size``, ``colour``, ``shape``, ``position``), plus ``"background"`` when one is mentioned. Whitespace
        between words is free; words are case-sensitive (lower case). Repeated adjectives, adjectives out of
        order, a missing noun, a dangling "and", a third object, punctuation or unknown words all give ``None``.
        """
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        words = caption.split()
        n = len(words)
        objects: list[dict[str, str]] = []
        i = 0
        while True:
            if i >= n or words[i] != "a":
                return None
            i += 1
            obj: dict[str, str] = {}
            if i < n and words[i] in _SIZE_SET:
                obj["size"] = words[i]
                i += 1
            if i < n and words[i] in COLOURS:
                obj["colour"] = words[i]
                i += 1
            if i >= n or words[i] not in _SHAPE_SET:
                return None
            obj["shape"] = words[i]
            i += 1
            position = _POSITION_WORDS.get(tuple(words[i : i + 3]))
            if position is not None:
                obj["position"] = position
                i += 3
            objects.append(obj)
            if i < n and words[i] == "and" and len(objects) == 1:
                i += 1
                continue
            break
        result: dict[str, Any] = {"objects": objects}
        if i + 4 <= n and words[i] == "on" and words[i + 1] == "a" and words[i + 3] == "background":
            if words[i + 2] not in BACKGROUNDS:
                return None
            result["background"] = words[i + 2]
            i += 4
        return result if i == n else None

    # ------------------------------------------------------------------ faithfulness

    @classmethod
    def _matched_counts(cls, caption: str, scene: Scene) -> tuple[int, int, int] | None:
        """(correct mentioned attributes, mentioned attributes, scene attributes) under the best matching.

        Mentioned objects are matched one-to-one to scene objects, choosing the assignment with the most correct
        attributes; a mentioned object left without a scene object (two objects named, one in the scene) has
        all its attributes wrong, so "a red circle and a red circle" is not faithful to a single red circle.
        """
        _check_scene(scene)
        parsed = cls.parse(caption)
        if parsed is None:
            return None
        mentioned, actual = parsed["objects"], scene["objects"]
        best = 0
        for perm in itertools.permutations(range(len(actual)), min(len(mentioned), len(actual))):
            best = max(
                best, sum(sum(actual[j][k] == v for k, v in mentioned[i].items()) for i, j in enumerate(perm))
            )
        n_mentioned = sum(len(obj) for obj in mentioned)
        if "background" in parsed:
            n_mentioned += 1
            best += parsed["background"] == scene["background"]
        return best, n_mentioned, len(OBJECT_ATTRIBUTES) * len(actual) + 1

    @classmethod
    def attribute_precision(cls, caption: str, scene: Scene) -> float:
        """Share of the attributes ``caption`` mentions that are true of ``scene``: correct / mentioned.

        Attributes are each mentioned object's size, colour, shape and position, and the background; mentioned
        objects are matched one-to-one to scene objects so as to maximise the correct count. A caption that is
        not a sentence of the grammar (``parse`` gives ``None``) scores 0.0; report grammar validity separately.
        """
        counts = cls._matched_counts(caption, scene)
        return 0.0 if counts is None else counts[0] / counts[1]

    @classmethod
    def attribute_recall(cls, caption: str, scene: Scene) -> float:
        """Share of the scene's attributes that ``caption`` mentions correctly: correct / (4 * objects + 1).

        Same matching as ``attribute_precision``; an ungrammatical caption scores 0.0.
        """
        counts = cls._matched_counts(caption, scene)
        return 0.0 if counts is None else counts[0] / counts[2]

    # ------------------------------------------------------------------ tokenizer for captioners

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word of the grammar, sorted."""
        phrase_words = {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
        return sorted(
            {"a", "and", "on", "background", *SIZES, *COLOURS, *SHAPES, *BACKGROUNDS, *phrase_words}
        )

    @classmethod
    def word_tokenizer(cls) -> Any:
        """A word-level ``transformers.PreTrainedTokenizerFast`` over ``vocabulary()``.

        Special tokens ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3); ``encode`` adds none of them
        (the captioner decides where they go), and ``decode(encode(c)) == c`` for every caption of the grammar.
        """
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
        vocab = {tok: i for i, tok in enumerate(specials + cls.vocabulary())}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            bos_token="<bos>",
            eos_token="<eos>",
            unk_token="<unk>",
            model_max_length=32,
            clean_up_tokenization_spaces=False,
        )

    # ------------------------------------------------------------------ the tiny CLIP judge

    def train_clip(
        self,
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
        """Train (or load from the cache) a tiny open_clip ``CLIP`` on this world and wrap it as a ``ClipScorer``.

        The model is ``open_clip.CLIP(**config)`` with ``config`` = ``DEFAULT_CLIP_CONFIG`` updated by
        ``config_overrides`` (``embed_dim=32`` or ``vision_cfg={"layers": [2, 2, 2, 2]}``: sub-dicts are merged;
        an int ``layers`` with a ``patch_size`` makes the tower a ViT). It is
        trained on ``n_scenes`` scenes of split ``"clip"`` (the captioners' ``"train"``/``"test"`` splits stay
        unseen) with AdamW and a one-cycle schedule peaking at ``lr``. Each step pairs every image with its full
        caption (symmetric InfoNCE, Radford et al. 2021) and with a random partial caption (text-to-image
        InfoNCE, weighted ``partial_weight``), so shorter captions retrieve the images they fit. With
        ``hard_negatives`` the image-to-text direction also sees, for every image, the full caption of its
        :meth:`hard_negative` scene (NegCLIP, Yuksekgonul et al. 2023): the judge must bind each colour, shape and
        size to its object instead of reading captions as bags of words.

        Weights are cached as safetensors under ``cache_dir`` (default ``$CLIP_RL_TRL_CACHE``, else
        ``~/.cache/clip_rl_trl``) in a folder keyed by a hash of the world, model config and training settings,
        and loaded from there on the next call; ``force=True`` retrains and overwrites. ``device`` is where the
        model trains and the returned scorer runs (default CPU); it is not part of the cache key.
        """
        import open_clip
        from open_clip.transform import image_transform
        from safetensors.torch import load_file, save_file

        config = _merge_config(DEFAULT_CLIP_CONFIG, config_overrides)
        _check_positive(n_scenes=n_scenes, epochs=epochs, batch_size=batch_size, lr=lr)
        if partial_weight < 0:
            raise ValueError(f"partial_weight must be >= 0, got {partial_weight}")
        settings = {
            "world_version": WORLD_VERSION,
            "world_seed": self.seed,
            "world_image_size": self.image_size,
            "model": config,
            "train": {
                "n_scenes": n_scenes,
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "partial_weight": partial_weight,
                "seed": seed,
                # Only when on, so judges trained without them keep the cache key they had before the option.
                **({"hard_negatives": True} if hard_negatives else {}),
            },
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        folder = folder / "shapes_clip" / key
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
            self._fit_clip(model, tokenizer, preprocess, settings["train"], progress)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"model.safetensors.tmp{os.getpid()}"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
            os.replace(tmp, weights)  # atomic: a concurrent reader never sees half a file
            (folder / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        return ClipScorer(model, tokenizer, preprocess, device=device)

    def _fit_clip(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        preprocess: Any,
        train: Mapping[str, Any],
        progress: bool,
    ) -> None:
        from tqdm.auto import tqdm

        n, batch_size = train["n_scenes"], train["batch_size"]
        longest = max(len(tokenizer.encode(self.describe(s))) for s in _longest_scenes()) + 2
        if longest > tokenizer.context_length:
            raise ValueError(
                f"text context_length {tokenizer.context_length} is shorter than the world's "
                f"longest caption ({longest} tokens with start/end markers)"
            )
        # Render and preprocess once: the training loop only indexes tensors.
        scenes, images = [], []
        for i in range(n):
            rng = self._rng("clip", i)
            scene = self._sample_scene(rng)
            scenes.append(scene)
            images.append(preprocess(self.render(scene, rng)))
        device = model.logit_scale.device
        pixels = torch.stack(images).to(device)
        full_tokens = tokenizer([self.describe(s) for s in scenes]).to(device)

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
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=train["lr"], total_steps=total, pct_start=0.15
        )
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
                    negatives = [self.describe(self.hard_negative(scenes[i], negative_rng)) for i in idx.tolist()]
                    neg = F.normalize(model.encode_text(tokenizer(negatives).to(device)), dim=-1)
                    image_logits = torch.cat([image_logits, scale * img @ neg.T], dim=1)
                loss = (F.cross_entropy(logits, target) + F.cross_entropy(image_logits, target)) / 2
                if train["partial_weight"] > 0:
                    captions = [self._training_caption(scenes[i], caption_rng) for i in idx.tolist()]
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

    # ------------------------------------------------------------------ quick retrieval check

    def evaluate_clip(
        self, scorer: ClipScorer, n: int = 1000, split: str = "test", seed: int = 0
    ) -> dict[str, float]:
        """P@1 among 100 of ``scorer`` on ``n`` scenes of ``split``, per caption level.

        Levels: ``full`` (full captions), ``human`` (the five human-like captions: the mean over the five
        one-caption-per-image sets), and partial captions of the salient object: ``size colour shape on a
        background``, ``colour shape``, ``shape``. Scored by
        :func:`clip_rl_trl.evaluation.retrieval.precision_at_1` with Dessì et al.'s strict rule (a tie is a miss)
        and distractors drawn with ``seed``.
        """
        def p_at_1(texts: Sequence[str]) -> float:
            return precision_at_1(scorer.encode_texts(texts), image_emb, seed=seed, ties="strict")

        _check_n_split(n, split)
        examples = [self._example(split, i) for i in range(n)]
        image_emb = scorer.encode_images([image for _, image, _ in examples])
        levels: dict[str, tuple[Sequence[str], bool]] = {
            "size colour shape on a background": (("size", "colour", "shape"), True),
            "colour shape": (("colour", "shape"), False),
            "shape": (("shape",), False),
        }
        result = {"full": p_at_1([self.describe(s) for s, _, _ in examples])}
        result["human"] = sum(p_at_1([caps[k] for _, _, caps in examples]) for k in range(5)) / 5
        for name, (attributes, background) in levels.items():
            result[name] = p_at_1(
                [self.describe(s, attributes, [self.salient_object(s)], background) for s, _, _ in examples]
            )
        return result


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        h = r * 0.88  # slightly smaller than the circle's radius so the areas are comparable
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:  # cross
        w = r * 0.38
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)


_SIZE_SET = frozenset(SIZES)
_SHAPE_SET = frozenset(SHAPES)


def _features() -> datasets.Features:
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": text,
            "captions": datasets.List(text),
            "full_caption": text,
            "scene": {"objects": datasets.List(dict.fromkeys(OBJECT_ATTRIBUTES, text)), "background": text},
        }
    )


def _longest_scenes() -> list[Scene]:
    """Scenes whose full captions are the longest the grammar produces (for the context-length check)."""
    longest_colour = max(COLOURS, key=len)
    objects = [
        {"size": max(SIZES, key=len), "colour": longest_colour, "shape": s, "position": p}
        for s in SHAPES
        for p in ("left", "bottom")
    ]
    return [{"objects": [o, o], "background": b} for o in objects for b in BACKGROUNDS]


def _check_scene(scene: Any) -> None:
    if not isinstance(scene, Mapping) or "objects" not in scene or "background" not in scene:
        raise ValueError(f"scene must be a dict with 'objects' and 'background', got {scene!r}")
    objects = scene["objects"]
    if not isinstance(objects, Sequence) or not 1 <= len(objects) <= 2:
        raise ValueError(f"scene must hold 1 or 2 objects, got {objects!r}")
    if scene["background"] not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene['background']!r}; expected one of {list(BACKGROUNDS)}")
    allowed = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(POSITION_PHRASES)}
    for obj in objects:
        for attr, values in allowed.items():
            if not isinstance(obj, Mapping) or obj.get(attr) not in values:
                raise ValueError(f"scene object {obj!r} needs {attr!r} in {list(values)}")


def _check_n_split(n: int, split: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty str, got {split!r}")


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
                "or a training argument of train_clip"
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
