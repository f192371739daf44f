"""Recipes: one YAML file -> a fine-tuned captioner, its before/after evaluation, its model card.

A recipe has five sections (and an optional sixth, ``toy``)::

    data:        # source: karpathy | hub | shapes
      source: karpathy
      karpathy_json: /data/coco/dataset_coco.json
      image_root: /data/coco/images
      train_split: train
      eval_split: val
      max_train_images: null
      max_eval_images: 5000
    clip:        # the frozen judge (open_clip); data.source shapes uses the world's tiny CLIP instead
      model: ViT-B-32-quickgelu
      pretrained: openai
      cache: outputs/coco_vitb32.safetensors   # built and saved when missing, else loaded
    captioner:   # family: clipcap | blip | vlm
      family: clipcap
      name_or_path: path/to/mle-clipcap
      lora: false
    rewards:     # weight -> reward_weights; the other keys configure the reward
      - {name: bidirectional, weight: 0.94, temperature: 0.01}
      - {name: discriminator, weight: 0.06, lr: 7.0e-5}
    training:    # any CaptionRLConfig field (TRL's GRPOConfig fields included)
      baseline: loo
      learning_rate: 1.0e-6
    toy:         # with --toy: deep-merged over the sections above, on the shapes world
      training: {max_steps: 20}

:func:`load_recipe` reads, merges and validates a recipe (every section, key, reward and file is checked
before any heavy work); :func:`build` turns it into a :class:`~clip_rl_trl.CaptionRLTrainer`; :func:`run`
trains, evaluates before and after on the evaluation split, and writes the model, its ``README.md`` model
card, ``report.json`` (``{"before": metrics, "after": metrics, ...}``), ``report.md``, ``captions.jsonl``
(one line per evaluation image: ``image_id``, ``before``, ``after``) and a training plot into the output
folder.

With ``--toy`` (``toy=True``) the data becomes the shapes world (``data: {source: shapes, ...toy.data}``), the
judge its tiny CLIP and the captioner a copy of the demo's MLE-trained ClipCap (:mod:`clip_rl_trl.demo`); the
rewards, baseline and trainer are the recipe's own, so the toy run exercises the same code path offline.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from clip_rl_trl.neighbors import SIMILARITIES

__all__ = [
    "FAMILIES",
    "REWARD_KEYS",
    "SOURCES",
    "RecipeContext",
    "RecipeError",
    "build",
    "build_rewards",
    "default_output_dir",
    "evaluate",
    "example_main",
    "load_context",
    "load_recipe",
    "run",
    "validate_recipe",
]

SECTIONS = ("data", "clip", "captioner", "rewards", "training", "toy")
SOURCES = ("karpathy", "hub", "shapes")
FAMILIES = ("clipcap", "blip", "vlm")

# The shapes world's data keys are the DemoConfig fields that shape the world and its MLE captioner.
SHAPES_DATA_KEYS = (
    "seed",
    "clip_hard_negatives",
    "n_train",
    "n_val",
    "n_test",
    "max_tokens",
    "gpt_layers",
    "gpt_width",
    "gpt_heads",
    "prefix_length",
    "mle_epochs",
    "mle_batch_size",
    "mle_lr",
)
_SPLIT_KEYS = ("train_split", "eval_split", "max_train_images", "max_eval_images")
DATA_KEYS: dict[str, tuple[str, ...]] = {
    "karpathy": ("source", "karpathy_json", "image_root", "include_restval", *_SPLIT_KEYS),
    "hub": ("source", "dataset", "name", "image_column", "captions_column", "id_column", *_SPLIT_KEYS),
    "shapes": ("source", *SHAPES_DATA_KEYS),
}
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "karpathy": {
        "train_split": "train",
        "eval_split": "val",
        "max_train_images": None,
        "max_eval_images": 5000,
    },
    "hub": {
        "train_split": "train",
        "eval_split": "test",
        "max_train_images": None,
        "max_eval_images": 5000,
        "image_column": "image",
        "captions_column": "captions",
        "id_column": "image_id",
    },
    "shapes": {},
}
CLIP_KEYS = ("model", "pretrained", "cache", "dtype", "batch_size")
CAPTIONER_KEYS = (
    "family",
    "name_or_path",
    "prompt",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)
CAPTIONER_DEFAULTS = {"lora": False, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
# LoRA targets when lora_target_modules is not given: the text decoder's attention projections.
_LORA_TARGETS = {"blip": r".*text_decoder.*\.(query|value)", "vlm": ["q_proj", "v_proj"]}

_GROUP_KEYS = ("exclude_above", "similarity")
REWARD_KEYS: dict[str, tuple[str, ...]] = {
    "clip_s": ("w", "prompt"),
    "retrieval": ("logit_scale", "hard_negatives", *_GROUP_KEYS),
    "group_gap": ("k", "reduce", *_GROUP_KEYS),
    "bidirectional": ("temperature", "directions", "ref_negatives", "hard_negatives", *_GROUP_KEYS),
    "discriminator": ("lr", "hidden_dims", "seed", "weights"),
    "cider": ("sigma", "normalize"),
    "grammar": (
        "path",
        "epochs",
        "batch_size",
        "lr",
        "head_lr",
        "grammar_weight",
        "num_negatives",
        "prompt",
        "seed",
    ),
}
# Fields the recipe sets itself: the output folder comes from the command line, the weights from `rewards`.
_MANAGED_TRAINING = {"output_dir": "pass --output-dir", "reward_weights": "give each reward a weight"}


class RecipeError(ValueError):
    """A recipe problem: the message names the section, key, reward or file at fault."""


# ---------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; a recipe means the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _deep_merge(base: Any, update: Any) -> Any:
    """``update`` over ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    if isinstance(base, Mapping) and isinstance(update, Mapping):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = _deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(update)


def _set_path(tree: dict[str, Any], dotted: str, value: Any, flag: str) -> None:
    """``tree[a][b][c] = value`` for ``dotted = "a.b.c"``; an integer part indexes a list."""
    parts = dotted.split(".")
    if not all(parts):
        raise RecipeError(f"{flag}: {dotted!r} is not a dotted key like training.learning_rate")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(
                    f"{flag}: {where!r}: the list has {len(node)} entries, index them 0..{len(node) - 1}"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"{flag}: {'.'.join(parts[:depth])!r} is a value, not a section")


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), toy: bool = False) -> dict[str, Any]:
    """Read the recipe ``path``, apply ``--toy`` and the ``KEY=VALUE`` ``overrides``, validate, fill defaults.

    Overrides are dotted keys with YAML-typed values (``training.learning_rate=1e-5``,
    ``rewards.0.weight=0.5``, ``training.report_to=[wandb]``); they apply after the toy merge, except
    ``toy.*`` ones, which change the toy section before it is merged. Returns the resolved recipe (without
    ``toy``); raises :class:`RecipeError`.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {os.fspath(path)!r}: no such file")
    try:
        raw = yaml.load(path.read_text("utf-8"), Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {os.fspath(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {os.fspath(path)!r} must be a mapping of sections {list(SECTIONS)}")
    _check_keys("the recipe", raw, SECTIONS, what="section")

    parsed: list[tuple[str, Any, str]] = []
    for item in overrides:
        flag = f"--set {item}"
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"{flag}: expected KEY=VALUE, e.g. training.learning_rate=1e-5")
        parsed.append((key.strip(), _parse_value(text), flag))
    toy_section = raw.pop("toy", None) or {}
    for key, value, flag in parsed:
        if key.split(".")[0] == "toy":
            _set_path({"toy": toy_section}, key, value, flag)
    if not isinstance(toy_section, dict):
        raise RecipeError("toy: must be a mapping of sections to override")
    _check_keys("toy", toy_section, [s for s in SECTIONS if s != "toy"], what="section")

    recipe = copy.deepcopy(raw)
    if toy:
        recipe = _deep_merge({k: v for k, v in recipe.items() if k != "data"}, toy_section)
        # The shapes world replaces the data, the judge and the captioner's weights; rewards, training stay.
        recipe["data"] = {"source": "shapes", **(toy_section.get("data") or {})}
        recipe.pop("clip", None)
        captioner = dict(raw.get("captioner") or {})
        captioner.pop("name_or_path", None)
        recipe["captioner"] = _deep_merge(captioner, toy_section.get("captioner") or {})
    for key, value, flag in parsed:
        if key.split(".")[0] == "toy":
            continue
        if key.split(".")[0] not in SECTIONS:
            raise RecipeError(f"{flag}: unknown section {key.split('.')[0]!r}; sections are {list(SECTIONS)}")
        _set_path(recipe, key, value, flag)
    return validate_recipe(recipe, base_dir=path.parent)


def _check_keys(where: str, mapping: Mapping[str, Any], valid: Sequence[str], what: str = "key") -> None:
    unknown = [k for k in mapping if k not in valid]
    if unknown:
        raise RecipeError(
            f"{where}: unknown {what}{'s' if len(unknown) > 1 else ''} {unknown}; valid: {list(valid)}"
        )


def _section(recipe: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = recipe.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{name}: must be a mapping, got {type(value).__name__}")
    return dict(value)


def _looks_local(name: str) -> bool:
    """A path rather than a Hub name: it exists, is absolute or explicitly relative, or has 2+ slashes."""
    return (
        Path(name).exists()
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )


def _resolve(value: str, base_dir: Path | None) -> str:
    """A relative path: from the working directory when it exists there, else from the recipe's folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None or not (base_dir / path).exists():
        return os.fspath(path)
    return os.fspath(base_dir / path)


def _positive_int(where: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(
            f"{where}: must be a positive integer{' or null' if allow_none else ''}, got {value!r}"
        )


def validate_recipe(recipe: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check every section, key, reward name and input file of ``recipe``; return it with defaults filled in.

    ``base_dir`` (the recipe's folder) resolves relative file paths that do not exist from the working
    directory. Raises :class:`RecipeError` naming the section and key at fault.
    """
    from clip_rl_trl.trainer.config import CaptionRLConfig

    base = Path(base_dir) if base_dir is not None else None
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"a recipe is a mapping of sections {list(SECTIONS)}, got {type(recipe).__name__}")
    _check_keys("the recipe", recipe, [s for s in SECTIONS if s != "toy"], what="section")
    out: dict[str, Any] = {}

    # data
    data = _section(recipe, "data")
    source = data.get("source")
    if source not in SOURCES:
        raise RecipeError(f"data.source: {source!r}; one of {list(SOURCES)}")
    _check_keys(f"data (source {source})", data, DATA_KEYS[source])
    data = {**DATA_DEFAULTS[source], **data}
    if source == "karpathy":
        for key in ("karpathy_json", "image_root"):
            if not data.get(key):
                raise RecipeError(f"data.{key}: required for source karpathy")
            data[key] = _resolve(str(data[key]), base)
        if not Path(data["karpathy_json"]).is_file():
            raise RecipeError(f"data.karpathy_json: {data['karpathy_json']!r}: no such file")
        if not Path(data["image_root"]).is_dir():
            raise RecipeError(f"data.image_root: {data['image_root']!r}: no such folder")
    elif source == "hub":
        if not data.get("dataset"):
            raise RecipeError("data.dataset: required for source hub (a Hub dataset name or a local path)")
        name = str(data["dataset"])
        if _looks_local(name):
            data["dataset"] = _resolve(name, base)
            if not Path(data["dataset"]).exists():
                raise RecipeError(f"data.dataset: {data['dataset']!r}: no such file or folder")
    if source != "shapes":
        for key in ("max_train_images", "max_eval_images"):
            _positive_int(f"data.{key}", data.get(key), allow_none=True)
    else:
        from clip_rl_trl.demo import DemoConfig

        try:
            DemoConfig(**{k: v for k, v in data.items() if k != "source"})
        except (TypeError, ValueError) as err:
            raise RecipeError(f"data (source shapes): {err}") from None
    out["data"] = data

    # clip
    clip = _section(recipe, "clip")
    if source == "shapes":
        if clip:
            raise RecipeError(
                "clip: data.source shapes judges with the shapes world's tiny CLIP; remove the clip section"
            )
    else:
        _check_keys("clip", clip, CLIP_KEYS)
        if not clip.get("model"):
            raise RecipeError("clip.model: required (an open_clip architecture, e.g. ViT-B-32-quickgelu)")
        clip.setdefault("pretrained", None)
        clip.setdefault("cache", None)
        clip.setdefault("dtype", "float16")
        if clip["dtype"] not in ("float16", "float32"):
            raise RecipeError(f"clip.dtype: {clip['dtype']!r}; one of ['float16', 'float32']")
        if clip.get("batch_size") is not None:
            _positive_int("clip.batch_size", clip["batch_size"])
        if clip["cache"] is not None:
            clip["cache"] = _resolve(str(clip["cache"]), base)
        out["clip"] = clip

    # captioner
    captioner = {**CAPTIONER_DEFAULTS, **_section(recipe, "captioner")}
    _check_keys("captioner", captioner, CAPTIONER_KEYS)
    family = captioner.get("family")
    if family not in FAMILIES:
        raise RecipeError(f"captioner.family: {family!r}; one of {list(FAMILIES)}")
    if source == "shapes" and family != "clipcap":
        raise RecipeError(
            f"captioner.family {family}: the shapes world (data.source shapes, --toy) has a ClipCap "
            "captioner only; BLIP and VLM recipes need real images (data.source karpathy or hub)"
        )
    name = captioner.get("name_or_path")
    if name is None and source != "shapes":
        raise RecipeError("captioner.name_or_path: required (a saved model folder or a Hub model name)")
    if name is not None:
        name = str(name)
        if _looks_local(name):
            name = _resolve(name, base)
            if not Path(name).is_dir():
                raise RecipeError(f"captioner.name_or_path: {name!r}: no such folder")
        captioner["name_or_path"] = name
    if not isinstance(captioner["lora"], bool):
        raise RecipeError(f"captioner.lora: must be true or false, got {captioner['lora']!r}")
    _positive_int("captioner.lora_r", captioner["lora_r"])
    if captioner.get("prompt") is not None and family == "clipcap":
        raise RecipeError("captioner.prompt: ClipCap captions have no text prompt (BLIP and VLM only)")
    out["captioner"] = captioner

    # rewards
    rewards = recipe.get("rewards")
    if not isinstance(rewards, list) or not rewards:
        raise RecipeError(
            "rewards: a non-empty list of rewards, each {name: ..., weight: ...}; "
            f"names: {list(REWARD_KEYS)}"
        )
    out["rewards"] = []
    seen: set[str] = set()
    for i, spec in enumerate(rewards):
        where = f"rewards[{i}]"
        if not isinstance(spec, dict):
            raise RecipeError(f"{where}: must be a mapping like {{name: clip_s, weight: 1.0}}")
        name = spec.get("name")
        if name not in REWARD_KEYS:
            raise RecipeError(f"{where}.name: {name!r}; one of {list(REWARD_KEYS)}")
        if name in seen:
            raise RecipeError(f"{where}: reward {name!r} appears twice (TRL logs rewards by name)")
        seen.add(name)
        _check_keys(f"{where} ({name})", spec, ("name", "weight", *REWARD_KEYS[name]))
        spec = {"weight": 1.0, **spec}
        if isinstance(spec["weight"], bool) or not isinstance(spec["weight"], (int, float)):
            raise RecipeError(f"{where}.weight: must be a number, got {spec['weight']!r}")
        if spec.get("similarity", "image") not in SIMILARITIES:
            raise RecipeError(f"{where}.similarity: {spec['similarity']!r}; one of {list(SIMILARITIES)}")
        if "k" in spec:
            _positive_int(f"{where}.k", spec["k"])
        if spec.get("hard_negatives") is not None:
            _hard_negative_ranks(spec["hard_negatives"], f"{where}.hard_negatives")
        for key in ("weights", "path"):
            if spec.get(key) is not None:
                spec[key] = _resolve(str(spec[key]), base)
        if spec.get("weights") is not None and not Path(spec["weights"]).is_file():
            raise RecipeError(f"{where}.weights: {spec['weights']!r}: no such file")
        out["rewards"].append(spec)

    # training
    training = _section(recipe, "training")
    fields = {f.name for f in dataclasses.fields(CaptionRLConfig)}
    for key, hint in _MANAGED_TRAINING.items():
        if key in training:
            raise RecipeError(f"training.{key}: set by the recipe ({hint})")
    unknown = sorted(set(training) - fields)
    if unknown:
        raise RecipeError(
            f"training: unknown CaptionRLConfig field{'s' if len(unknown) > 1 else ''} {unknown} "
            "(see docs/trainer.md; every GRPOConfig / TrainingArguments field is valid)"
        )
    resume = training.get("resume_from_checkpoint")
    if isinstance(resume, str):
        training["resume_from_checkpoint"] = _resolve(resume, base)
        if not Path(training["resume_from_checkpoint"]).is_dir():
            raise RecipeError(f"training.resume_from_checkpoint: {resume!r}: no such checkpoint folder")
    out["training"] = training
    return out


def _hard_negative_ranks(value: Any, where: str) -> list[int]:
    """``K`` (the K nearest neighbours) or a list of 0-based neighbour ranks (``[3, 4]``: the 4th and 5th)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return list(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in value)
    ):
        return sorted(set(value))
    raise RecipeError(
        f"{where}: a count K >= 0 or a list of 0-based neighbour ranks like [3, 4], got {value!r}"
    )


def default_output_dir(config: str | os.PathLike, toy: bool = False) -> str:
    """``outputs/<recipe name>`` (``outputs/<recipe name>-toy`` with ``--toy``)."""
    return os.path.join("outputs", Path(config).stem + ("-toy" if toy else ""))


# ---------------------------------------------------------------------- data, judge and cache


@dataclass
class RecipeContext:
    """What a recipe loads besides the trainer: data, judge, cache, captioner pieces, evaluation settings."""

    recipe: dict[str, Any]
    scorer: Any  # the frozen ClipScorer that judges the evaluation (rewards may use a grammar-tuned copy)
    cache: Any  # ImageEmbeddingCache over the training and evaluation images
    train: Any  # datasets.Dataset: image_id, captions (+ image for captioners that read pixels)
    eval: Any  # datasets.Dataset of the evaluation images
    dataset_name: str
    prepared: Any = None  # demo.Prepared (shapes world only)
    demo_config: Any = None  # demo.DemoConfig (shapes world only)
    processing_class: Any = None  # the captioner's tokenizer or processor
    policy: Any = None  # the CaptionPolicy that generates evaluation captions
    args: Any = None  # the CaptionRLConfig


def _device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def _main_first():
    from accelerate import PartialState

    return PartialState().main_process_first()


def _first_rows(dataset: Any, n: int | None) -> Any:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def _load_split(data: Mapping[str, Any], split: str, limit: int | None) -> Any:
    from clip_rl_trl.data.coco import load_hub_captions, load_karpathy

    try:
        if data["source"] == "karpathy":
            kwargs = (
                {"include_restval": data["include_restval"]}
                if "include_restval" in data and split == "train"
                else {}
            )
            return load_karpathy(data["karpathy_json"], data["image_root"], split, max_images=limit, **kwargs)
        extra = {"name": data["name"]} if data.get("name") else {}
        dataset = load_hub_captions(
            data["dataset"],
            split,
            image_column=data["image_column"],
            captions_column=data["captions_column"],
            id_column=data["id_column"],
            **extra,
        )
        return _first_rows(dataset, limit)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise RecipeError(f"data ({data['source']}, split {split!r}): {err}") from err


def _unique_images(*datasets_: Any) -> Any:
    """The image and image_id columns of the datasets, each image id once."""
    import datasets

    joined = datasets.concatenate_datasets([d.select_columns(["image", "image_id"]) for d in datasets_])
    first: dict[Any, int] = {}
    for row, image_id in enumerate(joined["image_id"]):
        first.setdefault(image_id, row)
    return joined if len(first) == len(joined) else joined.select(sorted(first.values()))


def _image_cache(
    clip: Mapping[str, Any], scorer: Any, train: Any, eval_: Any, output_dir: Path, progress: bool
) -> Any:
    """Load ``clip.cache`` (checking it covers the data) or build it once and save it there."""
    from clip_rl_trl.embeddings import ImageEmbeddingCache

    path = Path(clip["cache"]) if clip["cache"] else output_dir / "image_embeddings.safetensors"
    with _main_first():
        if path.is_file():
            try:
                cache = ImageEmbeddingCache.load(path)
            except (ValueError, OSError) as err:
                raise RecipeError(f"clip.cache {os.fspath(path)!r}: {err}") from err
        else:
            dtype = {"float16": torch.float16, "float32": torch.float32}[clip["dtype"]]
            cache = ImageEmbeddingCache.build(
                _unique_images(train, eval_), scorer, dtype=dtype, progress=progress
            )
            from accelerate import PartialState

            if PartialState().is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                cache.save(path)
    missing = [i for i in dict.fromkeys([*train["image_id"], *eval_["image_id"]]) if i not in cache]
    if missing:
        raise RecipeError(
            f"clip.cache {os.fspath(path)!r}: {len(missing)} image id(s) of the recipe's data are not in it, "
            "e.g. "
            f"{missing[:3]}; it was built for other data: delete it to rebuild, or point clip.cache elsewhere"
        )
    if cache.dim != scorer.embed_dim:
        raise RecipeError(
            f"clip.cache {os.fspath(path)!r}: embeddings of dimension {cache.dim}, but clip.model "
            f"{clip['model']} embeds in {scorer.embed_dim}"
        )
    return cache


def load_context(
    recipe: Mapping[str, Any], output_dir: str | os.PathLike, progress: bool = True
) -> RecipeContext:
    """The data, the judge and the image-embedding cache of a validated recipe (no captioner, no rewards)."""
    data = recipe["data"]
    output_dir = Path(output_dir)
    if data["source"] == "shapes":
        from clip_rl_trl.demo import DemoConfig, prepare

        demo_config = DemoConfig(**{k: v for k, v in data.items() if k != "source"})
        eval_beams = recipe["training"].get("eval_num_beams")
        if eval_beams is not None:
            demo_config = demo_config.replace(eval_num_beams=eval_beams)
        with _main_first():
            prepared = prepare(demo_config, progress=progress)
        return RecipeContext(
            recipe=dict(recipe),
            scorer=prepared.scorer,
            cache=prepared.cache,
            train=prepared.train,
            eval=prepared.test,
            dataset_name="shapes-world",
            prepared=prepared,
            demo_config=demo_config,
        )
    from clip_rl_trl.clip import ClipScorer

    train = _load_split(data, data["train_split"], data["max_train_images"])
    eval_ = _load_split(data, data["eval_split"], data["max_eval_images"])
    clip = recipe["clip"]
    try:
        scorer = ClipScorer.from_open_clip(clip["model"], pretrained=clip["pretrained"], device=_device())
    except RuntimeError as err:
        raise RecipeError(
            f"clip.model {clip['model']} / clip.pretrained {clip['pretrained']}: {err}"
        ) from err
    if clip.get("batch_size"):
        scorer.batch_size = clip["batch_size"]
    cache = _image_cache(clip, scorer, train, eval_, output_dir, progress)
    name = "coco-karpathy" if data["source"] == "karpathy" else str(data["dataset"])
    return RecipeContext(
        recipe=dict(recipe), scorer=scorer, cache=cache, train=train, eval=eval_, dataset_name=name
    )


# ---------------------------------------------------------------------- rewards


def _neighbour_groups(
    scorer: Any,
    cache: Any,
    train: Any,
    k: int,
    similarity: str,
    exclude_above: float | None,
    captions_column: str = "captions",
) -> dict[Any, list[Any]]:
    """Each training image's ``k`` most similar other training images (Zhang et al. 2022, §3.2).

    ``similarity="captions"`` is the paper's Eq. 2 (best cosine between the image and the other image's
    ground-truth captions); ``"image"`` is plain image-image cosine.
    """
    import torch.nn.functional as F

    from clip_rl_trl.neighbors import groups_within_split

    ids = list(train["image_id"])
    refs = train[captions_column] if similarity == "captions" else None
    groups = groups_within_split(
        F.normalize(cache[ids].float(), dim=-1),
        k,
        similarity=similarity,
        scorer=scorer,
        refs=refs,
        exclude_above=exclude_above,
    )
    return {ids[i]: [ids[j] for j in row] for i, row in enumerate(groups.tolist())}


def _grammar_reward(
    spec: Mapping[str, Any],
    scorer: Any,
    cache: Any,
    train: Any,
    captions_column: str,
    output_dir: Path,
    progress: bool,
) -> tuple[Any, Any]:
    """Cho et al. 2022's grammar head: loaded from ``spec["path"]`` if saved there, else trained and saved.

    ``spec["prompt"]`` is one setting: the head is trained after it, records it, and the reward scores after it;
    a saved head trained with another prompt is refused.
    """
    from clip_rl_trl.rewards.callables import GrammarReward
    from clip_rl_trl.rewards.grammar import (
        GrammarHead,
        load_text_tower,
        save_text_tower,
        train_grammar_head,
    )

    folder = Path(spec.get("path") or output_dir / "grammar")
    tower = folder / "text_tower.safetensors"
    # Every grammar key but "path" is a train_grammar_head argument.
    options = {k: spec[k] for k in REWARD_KEYS["grammar"] if k != "path" and k in spec}
    with _main_first():
        if (folder / "grammar_head.safetensors").is_file() and tower.is_file():
            try:
                head = GrammarHead.from_pretrained(folder)
            except ValueError as err:
                raise RecipeError(f"grammar reward, path {os.fspath(folder)!r}: {err}") from err
            tuned = load_text_tower(scorer, tower)
        else:
            ids = list(train["image_id"])
            tuned, head = train_grammar_head(
                scorer, cache[ids].float(), train[captions_column], progress=progress, **options
            )
            from accelerate import PartialState

            if PartialState().is_main_process:
                head.save_pretrained(folder)
                save_text_tower(tuned, tower)
    try:
        return GrammarReward(tuned, head, prompt=spec.get("prompt")), tuned
    except ValueError as err:
        raise RecipeError(
            f"grammar reward, path {os.fspath(folder)!r}: {err} (delete the folder to train it again)"
        ) from err


def build_rewards(
    specs: Sequence[Mapping[str, Any]],
    scorer: Any,
    cache: Any,
    train: Any,
    *,
    id_column: str = "image_id",
    captions_column: str = "captions",
    output_dir: str | os.PathLike = ".",
    progress: bool = True,
) -> tuple[list[Any], list[float]]:
    """The reward callables and weights of the validated ``rewards`` section.

    ``train`` (rows with ``id_column`` and ``captions_column``) supplies CIDEr-D's document frequencies, the
    grammar head's captions and the similar-image groups (computed over the training images only). With a
    ``grammar`` reward every CLIP reward reads the grammar-tuned text tower, as in Cho et al. 2022.
    """
    from clip_rl_trl.rewards.callables import (
        BidirectionalReward,
        CiderReward,
        ClipSReward,
        DiscriminatorReward,
        GroupGapReward,
        RetrievalReward,
    )
    from clip_rl_trl.rewards.cider import CiderD
    from clip_rl_trl.rewards.discriminator import Discriminator

    output_dir = Path(output_dir)
    by_name = {spec["name"]: spec for spec in specs}
    built: dict[str, Any] = {}
    clip_scorer = scorer
    if "grammar" in by_name:
        built["grammar"], clip_scorer = _grammar_reward(
            by_name["grammar"], scorer, cache, train, captions_column, output_dir, progress
        )
    memo: dict[tuple, dict[Any, list[Any]]] = {}

    def groups(spec: Mapping[str, Any], k: int) -> dict[Any, list[Any]]:
        key = (k, spec.get("similarity", "image"), spec.get("exclude_above"))
        if key not in memo:
            memo[key] = _neighbour_groups(clip_scorer, cache, train, *key, captions_column=captions_column)
        return memo[key]

    def hard_negatives(spec: Mapping[str, Any], where: str) -> dict[Any, list[Any]] | None:
        ranks = _hard_negative_ranks(spec.get("hard_negatives") or 0, where)
        if not ranks:
            return None
        return {i: [g[r] for r in ranks] for i, g in groups(spec, max(ranks) + 1).items()}

    common = {"id_column": id_column}
    for i, spec in enumerate(specs):
        name, where = spec["name"], f"rewards[{i}] ({spec['name']})"
        try:
            if name == "clip_s":
                kwargs = {k: spec[k] for k in ("w", "prompt") if k in spec}
                built[name] = ClipSReward(clip_scorer, cache, **common, **kwargs)
            elif name == "retrieval":
                built[name] = RetrievalReward(
                    clip_scorer,
                    cache,
                    **common,
                    logit_scale=spec.get("logit_scale"),
                    groups=hard_negatives(spec, where),
                )
            elif name == "group_gap":
                built[name] = GroupGapReward(
                    clip_scorer,
                    cache,
                    groups(spec, spec.get("k", 5)),
                    **common,
                    reduce=spec.get("reduce", "avg"),
                )
            elif name == "bidirectional":
                kwargs = {k: spec[k] for k in ("temperature", "directions") if k in spec}
                built[name] = BidirectionalReward(
                    clip_scorer,
                    cache,
                    **common,
                    **kwargs,
                    groups=hard_negatives(spec, where),
                    refs_column=captions_column if spec.get("ref_negatives") else None,
                )
            elif name == "discriminator":
                disc = Discriminator(
                    clip_scorer.embed_dim,
                    hidden_dims=spec.get("hidden_dims", (512, 256)),
                    lr=spec.get("lr", 7e-5),
                    seed=spec.get("seed", 0),
                )
                if spec.get("weights"):
                    from safetensors.torch import load_file

                    disc.load_state_dict(load_file(spec["weights"]))
                built[name] = DiscriminatorReward(
                    disc, clip_scorer, cache, **common, refs_column=captions_column, update=False
                )
            elif name == "cider":
                cider = CiderD(
                    train[captions_column],
                    sigma=spec.get("sigma", 6.0),
                    normalize=spec.get("normalize", True),
                )
                built[name] = CiderReward(cider, refs_column=captions_column)
        except (TypeError, ValueError, KeyError) as err:
            raise RecipeError(f"{where}: {err}") from err
    return [built[spec["name"]] for spec in specs], [float(spec["weight"]) for spec in specs]


# ---------------------------------------------------------------------- captioner and trainer


def _training_config(
    recipe: Mapping[str, Any], output_dir: Path, weights: list[float], progress: bool
) -> Any:
    from clip_rl_trl.trainer.config import CaptionRLConfig

    training = {k: v for k, v in recipe["training"].items() if k != "resume_from_checkpoint"}
    shapes = recipe["data"]["source"] == "shapes"
    if not torch.cuda.is_available():
        training.setdefault("use_cpu", True)
        training.setdefault("bf16", False)
    if shapes:
        training.setdefault("max_completion_length", recipe["data"].get("max_tokens", 24))
        training.setdefault("logging_steps", 1)
        training.setdefault("save_strategy", "no")
    training.setdefault("disable_tqdm", not progress)
    if recipe["captioner"]["family"] == "blip" and recipe["captioner"]["lora"]:
        # With PEFT, gradient checkpointing makes the input embeddings a leaf that requires grad, and BLIP's
        # vision embeddings add their position embeddings in place: the backward pass fails.
        training.setdefault("gradient_checkpointing", False)
    try:
        return CaptionRLConfig(output_dir=os.fspath(output_dir), reward_weights=weights, **training)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"training: {err}") from err


def _load_captioner(
    spec: Mapping[str, Any], context: RecipeContext, adapter: str | None = None
) -> tuple[Any, Any]:
    """The captioner and its tokenizer / processor; ``adapter``: a saved PEFT adapter to load over it."""
    family, name = spec["family"], spec.get("name_or_path")
    try:
        if family == "clipcap":
            from clip_rl_trl.models.clipcap import ClipCapModel

            if context.prepared is not None:
                model = (
                    copy.deepcopy(context.prepared.captioner)
                    if name is None
                    else ClipCapModel.from_pretrained(name)
                )
                tokenizer = context.prepared.tokenizer
            else:
                from transformers import AutoTokenizer

                model = ClipCapModel.from_pretrained(name)
                tokenizer = AutoTokenizer.from_pretrained(name)
                if tokenizer.pad_token is None:
                    tokenizer.pad_token = tokenizer.eos_token
            if model.config.prefix_dim != context.scorer.embed_dim:
                raise RecipeError(
                    f"captioner.name_or_path {name!r}: the ClipCap reads "
                    f"{model.config.prefix_dim}-dimensional CLIP embeddings but the judge embeds in "
                    f"{context.scorer.embed_dim}: use the CLIP it was trained with"
                )
            processing = tokenizer
        elif family == "blip":
            from transformers import AutoProcessor, BlipForConditionalGeneration

            model = BlipForConditionalGeneration.from_pretrained(name)
            processing = AutoProcessor.from_pretrained(name)
            processing.tokenizer.eos_token = processing.tokenizer.sep_token  # BLIP captions end with [SEP]
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            model = AutoModelForImageTextToText.from_pretrained(name)
            processing = AutoProcessor.from_pretrained(name)
    except OSError as err:
        raise RecipeError(
            f"captioner.name_or_path {name!r}: cannot load a {family} captioner ({err})"
        ) from err
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, processing


def _policy(spec: Mapping[str, Any], context: RecipeContext, model: Any, processing: Any, args: Any) -> Any:
    from clip_rl_trl.models.policies import BlipPolicy, CausalVLMPolicy, ClipCapPolicy

    if spec["family"] == "clipcap":
        return ClipCapPolicy(context.cache, args.image_id_column, processing)
    if spec["family"] == "blip":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return BlipPolicy(
            processing.tokenizer,
            base.config,
            processing.image_processor,
            args.image_column,
            prompt=spec.get("prompt"),
        )
    return CausalVLMPolicy(processing, prompt=spec.get("prompt"), image_column=args.image_column)


def _lora_config(spec: Mapping[str, Any]) -> Any:
    if not spec["lora"]:
        return None
    options = {"r": spec["lora_r"], "lora_alpha": spec["lora_alpha"], "lora_dropout": spec["lora_dropout"]}
    if spec["family"] == "clipcap" and not spec.get("lora_target_modules"):
        from clip_rl_trl.models.clipcap import clipcap_lora_config

        return clipcap_lora_config(**options)
    from peft import LoraConfig

    targets = spec.get("lora_target_modules") or _LORA_TARGETS[spec["family"]]
    return LoraConfig(target_modules=targets, **options)


def _trainer_datasets(context: RecipeContext, family: str, args: Any) -> tuple[Any, Any]:
    """ClipCap reads cached embeddings: its rows carry no image (an ``image`` column would switch on TRL's VLM
    path); BLIP and VLMs read the image column. In the shapes world the trainer's evaluations (checkpoint
    selection) see the validation scenes, with their scenes for grammar validity; the report sees the test
    scenes."""
    train, eval_ = context.train, context.eval
    if context.prepared is not None:
        eval_ = context.prepared.val
    if family == "clipcap":
        train = train.select_columns(
            [c for c in (args.image_id_column, args.captions_column) if c in train.column_names]
        )
        eval_ = eval_.select_columns(
            [c for c in (args.image_id_column, args.captions_column, "scene") if c in eval_.column_names]
        )
    return train, eval_


def build(
    recipe: Mapping[str, Any], output_dir: str | os.PathLike, progress: bool = True
) -> tuple[Any, RecipeContext]:
    """The :class:`~clip_rl_trl.CaptionRLTrainer` of a validated recipe, and its :class:`RecipeContext`."""
    from clip_rl_trl.trainer.trainer import CaptionRLTrainer

    output_dir = Path(output_dir)
    weights = [float(spec["weight"]) for spec in recipe["rewards"]]
    args = _training_config(recipe, output_dir, weights, progress)  # config errors before any data is loaded
    context = load_context(recipe, output_dir, progress)
    spec = recipe["captioner"]
    model, processing = _load_captioner(spec, context)
    rewards, _ = build_rewards(
        recipe["rewards"],
        context.scorer,
        context.cache,
        context.train,
        id_column=args.image_id_column,
        captions_column=args.captions_column,
        output_dir=output_dir,
        progress=progress,
    )
    policy = _policy(spec, context, model, processing, args)
    train, eval_ = _trainer_datasets(context, spec["family"], args)
    # BLIP's policy holds the image processor; the trainer gets the tokenizer, because GRPOTrainer reads
    # `config.image_token_id` for any processor and BLIP's config has none. `run` saves the whole processor.
    trainer_processing = processing.tokenizer if spec["family"] == "blip" else processing
    try:
        trainer = CaptionRLTrainer(
            model=model,
            reward_funcs=rewards,
            args=args,
            train_dataset=train,
            eval_dataset=eval_,
            processing_class=trainer_processing,
            image_cache=context.cache,
            scorer=context.scorer,
            policy=policy,
            peft_config=_lora_config(spec),
            world=context.prepared.world if context.prepared is not None else None,
        )
    except (TypeError, ValueError) as err:
        raise RecipeError(f"cannot build the trainer: {err}") from err
    context.processing_class, context.policy, context.args = processing, policy, args
    return trainer, context


# ---------------------------------------------------------------------- evaluation


def _unwrap(model: Any) -> Any:
    """The captioner itself: PEFT's base model keeps its injected LoRA layers active."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def _generate(context: RecipeContext, model: Any, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Deterministic evaluation captions (``eval_num_beams``, ``max_completion_length``) from the policy."""
    from clip_rl_trl.models.policies import completion_mask

    args, policy = context.args, context.policy
    tokenizer = getattr(context.processing_class, "tokenizer", context.processing_class)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    captions: list[str] = []
    try:
        for start in range(0, len(rows), args.per_device_eval_batch_size):
            chunk = rows[start : start + args.per_device_eval_batch_size]
            ids = policy.generate(
                model,
                policy.image_inputs(chunk, device),
                do_sample=False,
                num_beams=args.eval_num_beams,
                max_new_tokens=args.max_completion_length,
            )
            mask = completion_mask(ids, tokenizer.eos_token_id)
            captions += [
                tokenizer.decode(row[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
                for row, m in zip(ids, mask, strict=True)
            ]
    finally:
        model.train(was_training)
    return captions


def _eval_groups(
    scorer: Any, image_emb: torch.Tensor, refs: Sequence[Sequence[str]], similarity: str, k: int = 5
) -> torch.Tensor | None:
    """Each evaluation image's K = 5 most similar other evaluation images, for GEG-Avg / GEG-Min (Zhang et al.
    2022: within the split, through the references by Eq. 2 unless ``similarity="image"``)."""
    import torch.nn.functional as F

    from clip_rl_trl.neighbors import groups_within_split

    if len(image_emb) <= k:
        return None
    emb = F.normalize(image_emb.float(), dim=-1)
    return groups_within_split(emb, k, similarity=similarity, scorer=scorer, refs=refs)


def evaluate(
    context: RecipeContext, model: Any, similarity: str = "captions"
) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Caption every evaluation image (beam search) and score the captions with every metric of the suite.

    Returns ``(metrics, captions, image_ids)``. The shapes world adds grammar validity and attribute
    precision / recall (:func:`clip_rl_trl.demo.evaluate_test`); GEG compares each image with its 5 most
    similar other evaluation images, found through their reference captions (Zhang et al. Eq. 2, encoded
    by the judge without a prompt) or, with ``similarity="image"``, by image cosine; novelty is measured
    against the training captions.
    """
    from clip_rl_trl.evaluation.evaluate import evaluate_captions
    from clip_rl_trl.rewards.functional import group_embedding_gap

    args = context.args
    base = _unwrap(model)
    if context.prepared is not None:
        from clip_rl_trl.demo import evaluate_test

        metrics, captions = evaluate_test(context.prepared, base, context.demo_config, full=True)
        ids = list(context.eval["image_id"])
        image_emb = context.cache[ids].float()
        groups = _eval_groups(context.scorer, image_emb, context.eval["captions"], similarity)
        if groups is not None:
            txt = context.scorer.encode_texts(captions).float().to(image_emb.device)
            group_emb = image_emb[groups]
            metrics["geg_avg"] = float(group_embedding_gap(txt, image_emb, group_emb, reduce="avg").mean())
            metrics["geg_min"] = float(group_embedding_gap(txt, image_emb, group_emb, reduce="min").mean())
            metrics.get("skipped", {}).pop("geg_avg", None)
            metrics.get("skipped", {}).pop("geg_min", None)
        return metrics, captions, ids
    rows = list({row[args.image_id_column]: row for row in context.eval}.values())
    ids = [row[args.image_id_column] for row in rows]
    captions = _generate(context, base, rows)
    image_emb = context.cache[ids].float()
    refs = [row[args.captions_column] for row in rows]
    metrics = evaluate_captions(
        captions,
        image_emb,
        context.scorer,
        refs=refs,
        groups=_eval_groups(context.scorer, image_emb, refs, similarity),
        train_captions=[c for caps in context.train[args.captions_column] for c in caps],
        coco_metrics=args.eval_coco_metrics,
        seed=args.seed,
    )
    return metrics, captions, ids


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _grid_images(context: RecipeContext, n: int = 16) -> list[Any] | None:
    from clip_rl_trl.clip import load_image

    if "image" not in context.eval.column_names:
        return None
    first = list(dict.fromkeys(context.eval["image_id"]))[:n]
    seen: dict[Any, Any] = {}
    for row in context.eval.select(range(min(len(context.eval), 4 * n))):
        if row["image_id"] in first and row["image_id"] not in seen:
            seen[row["image_id"]] = load_image(row["image"]).convert("RGB")
    return [seen[i] for i in first if i in seen] if len(seen) == len(first) else None


def run(recipe: Mapping[str, Any], output_dir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Train a validated recipe and write everything into ``output_dir``.

    Evaluates the captioner before and after training on the evaluation split, saves the fine-tuned model
    (or its LoRA adapter) with its tokenizer / processor and a ``README.md`` model card, and writes
    ``report.json``, ``report.md``, ``captions.jsonl``, ``training.png`` (and ``captions.png`` when the images
    are at hand). ``training.resume_from_checkpoint`` (a checkpoint folder, or ``true`` for the latest one in
    ``output_dir``) resumes training; "before" is then still the starting captioner. Returns ``{"before",
    "after", "files", "seconds", "output_dir"}`` (``files`` empty on processes other than the main one).
    """
    from accelerate import PartialState

    from clip_rl_trl.evaluation.report import TRAINING_KEYS, format_table, write_report

    start = time.perf_counter()
    output_dir = Path(output_dir)
    trainer, context = build(recipe, output_dir, progress)
    state = PartialState()
    main = state.is_main_process
    before = before_captions = None
    if main:
        before, before_captions, ids = evaluate(context, trainer.model)
    trainer.train(resume_from_checkpoint=recipe["training"].get("resume_from_checkpoint"))
    state.wait_for_everyone()
    trainer.save_model(os.fspath(output_dir))
    files: dict[str, Path] = {}
    after = None
    if main:
        context.processing_class.save_pretrained(output_dir)  # BLIP: the processor, not only its tokenizer
        after, after_captions, ids = evaluate(context, trainer.model)
        trainer.last_eval_metrics = _numeric(after)
        # The card's `datasets:` metadata takes Hub dataset ids only.
        hub_name = context.dataset_name if recipe["data"]["source"] == "hub" else None
        trainer.create_model_card(dataset_name=hub_name)
        history = trainer.state.log_history
        records = [
            {"image_id": i, "before": b, "after": a}
            for i, b, a in zip(ids, before_captions, after_captions, strict=True)
        ]
        seconds = time.perf_counter() - start
        files = write_report(
            output_dir,
            before=before,
            after=after,
            captions=records,
            history=history if any(k in e for e in history for k in TRAINING_KEYS) else None,
            images=_grid_images(context),
            title=f"clip-rl-trl: {', '.join(s['name'] for s in recipe['rewards'])} on {context.dataset_name}",
            extra={
                "recipe": json.loads(json.dumps(recipe, default=str)),
                "seconds": round(seconds, 1),
                "steps": trainer.state.global_step,
            },
        )
        if progress:
            keys = [
                k
                for k in (
                    "p_at_1_100",
                    "recall_at_1",
                    "clip_s",
                    "cider",
                    "grammar_valid",
                    "attribute_precision",
                    "distinct_2",
                )
                if k in after
            ]
            print(format_table({"before": before, "after": after}, keys, style="plain"))
            print(f"model, model card and report written to {output_dir}")
    state.wait_for_everyone()
    return {
        "before": before,
        "after": after,
        "files": files,
        "seconds": time.perf_counter() - start,
        "output_dir": output_dir,
    }


def evaluate_saved(
    recipe: Mapping[str, Any],
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    progress: bool = True,
    similarity: str = "captions",
) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Evaluate a saved captioner (a full model folder, or a LoRA adapter over the recipe's captioner) on the
    recipe's evaluation split, without building rewards or a trainer; ``similarity`` as in :func:`evaluate`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RecipeError(f"model folder {os.fspath(model_dir)!r}: no such folder")
    adapter = (model_dir / "adapter_config.json").is_file()
    spec = dict(recipe["captioner"])
    if not adapter:
        spec["name_or_path"] = os.fspath(model_dir)
    args = _training_config(
        recipe, Path(output_dir), [float(s["weight"]) for s in recipe["rewards"]], progress
    )
    context = load_context(recipe, output_dir, progress)
    model, processing = _load_captioner(spec, context, adapter=os.fspath(model_dir) if adapter else None)
    model.to(_device())
    context.processing_class, context.args = processing, args
    context.policy = _policy(spec, context, model, processing, args)
    return evaluate(context, model, similarity)


# ---------------------------------------------------------------------- the examples' command line


def example_arguments(doc: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--config FILE [--toy] [--output-dir DIR] [--set KEY=VALUE ...]``: every example's command line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe (examples/configs/*.yaml)")
    parser.add_argument(
        "--toy", action="store_true", help="run the recipe offline on the shapes world, in minutes"
    )
    parser.add_argument("--output-dir", default=None, help="default: outputs/<recipe name>[-toy]")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set training.learning_rate=1e-5 (repeatable)",
    )
    return parser.parse_args(argv)


def example_main(doc: str | None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse an example's command line, load its recipe, :func:`run` it; recipe errors exit with status 2."""
    import sys

    args = example_arguments(doc, argv)
    try:
        recipe = load_recipe(args.config, args.set, toy=args.toy)
        return run(recipe, args.output_dir or default_output_dir(args.config, args.toy))
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
