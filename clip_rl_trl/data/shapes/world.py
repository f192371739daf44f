"""The shapes world (DESIGN §6): procedural one- or two-object scenes, their images and their captions.

A scene holds one or two objects (shape, colour, size, position) on a background colour, rendered with Pillow.
Every caption is a sentence of a small grammar::

    caption    := object [" and " object] [" on a " BACKGROUND " background"]
    object     := "a " [SIZE " "] [COLOUR " "] SHAPE [" " position]
    position   := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"

``ShapesLanguage`` (``language.py``) parses and checks those captions; ``train_shapes_clip`` (``judge.py``)
trains the tiny CLIP judge on the world.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

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


def default_cache_dir() -> Path:
    """Where trained judges and captioners are cached: ``$CLIP_RL_TRL_CACHE``, else ``~/.cache/clip_rl_trl``."""
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
        check_scene(scene)
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

    def example(self, index: int, split: str = "train") -> tuple[Scene, Image.Image, list[str]]:
        """Example ``index`` of ``split``: its scene, its image and its five human-like captions.

        The same scene, image and captions as row ``index`` of ``to_dataset(n, split)``, without building a
        dataset (the image is not round-tripped through PNG).
        """
        _check_n_split(index, split)
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
            scene, image, captions = self.example(i, split)
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
        check_scene(scene)
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
        check_scene(scene)
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

    def training_caption(self, scene: Scene, rng: random.Random) -> str:
        """A uniformly random partial caption of ``scene``: the judge's training text beside the full caption,
        so it also scores every level of detail sensibly (``train_shapes_clip``)."""
        n_objects = len(scene["objects"])
        if n_objects == 2 and rng.random() < 0.5:
            objects = [0, 1] if rng.random() < 0.5 else [1, 0]
        else:
            objects = [rng.randrange(n_objects)]
        attributes = [a for a in OBJECT_ATTRIBUTES if a == "shape" or rng.random() < 0.5]
        return self.describe(scene, attributes, objects, background=rng.random() < 0.5)


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


def check_scene(scene: Any) -> None:
    """Raise ``ValueError`` unless ``scene`` is a well-formed scene of the world (1 or 2 known objects)."""
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

