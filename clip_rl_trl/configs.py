"""The typed configuration of a run, parsed the TRL way: ``--config recipe.yaml`` plus command-line overrides.

A recipe is a flat YAML file whose keys are fields of five dataclasses, as in TRL's own scripts
(``trl/scripts/grpo.py`` parses ``ScriptArguments``, ``GRPOConfig`` and ``ModelConfig`` the same way):

- :class:`DataConfig`: the data source and its splits (``dataset_name``, ``dataset_*_split``, ...);
- :class:`JudgeConfig`: the frozen CLIP judge and its image-embedding cache (``clip_model``, ...);
- :class:`CaptionerConfig`: the captioner and its LoRA settings, on ``trl.ModelConfig``;
- :class:`RewardConfig`: the rewards by registry name or dotted import path and their options; their weights
  are ``GRPOConfig``'s ``reward_weights``;
- :class:`~clip_rl_trl.trainer.config.CaptionRLConfig`: training (every ``GRPOConfig`` field).

:class:`RecipeParser` reads them (``RecipeParser().parse_recipe(argv)``); every field is a command-line flag
(``--learning_rate 1e-5``), the file sets their defaults. A ``toy:`` mapping in the file holds the overrides that
``--toy`` applies, on the shapes world, offline. Each dataclass validates itself in ``__post_init__``; names that
only a registry knows (``captioner_family``, ``reward_funcs``) are checked when the pipeline looks them up, before
any heavy work. This module sits at the bottom of the package: it imports no registry and no pipeline.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from trl import ModelConfig, TrlParser

from clip_rl_trl.trainer.config import CaptionRLConfig

__all__ = [
    "CaptionerConfig",
    "ConfigError",
    "DataConfig",
    "JudgeConfig",
    "Recipe",
    "RecipeParser",
    "RewardConfig",
    "packaged_recipe",
    "parse_recipe",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the field (or file) at fault."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; a recipe means the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer{' or null' if allow_none else ''}, got {value!r}")


@dataclass
class DataConfig:
    """Where the images and reference captions come from (:mod:`clip_rl_trl.data.sources` loads them).

    ``dataset_name`` is a Karpathy-split JSON file (``dataset_coco.json``, with ``image_root``), a folder written by
    ``datasets.Dataset.save_to_disk``, a Hub dataset name, or ``shapes`` (the synthetic shapes world); the source
    is told from it unless ``dataset_source`` names one. Trainer evaluations and checkpoint selection use the
    evaluation split; the before/after report uses the test split, never seen during selection.
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "Karpathy JSON file, save_to_disk folder, Hub dataset name, or 'shapes'"}
    )
    dataset_source: str | None = field(
        default=None, metadata={"help": "a registered source: karpathy | hub | shapes, or a dotted import path "
                                "(default: told from dataset_name)"}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    image_root: str | None = field(default=None, metadata={"help": "image folder of a Karpathy JSON file"})
    include_restval: bool | None = field(
        default=None, metadata={"help": "Karpathy train split with restval (default: yes for COCO)"}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "split the policy trains on"})
    dataset_eval_split: str = field(default="val", metadata={"help": "split for evaluations during training"})
    dataset_test_split: str | None = field(
        default="test", metadata={"help": "split of the before/after report (null: the evaluation split)"}
    )
    max_train_images: int | None = field(default=None, metadata={"help": "first N training images (null: all)"})
    max_eval_images: int | None = field(default=None, metadata={"help": "first N evaluation images (null: all)"})
    max_test_images: int | None = field(default=None, metadata={"help": "first N test images (null: all)"})
    dataset_image_column: str | None = field(default="image", metadata={"help": "image column of a Hub / disk dataset"})
    dataset_captions_column: str = field(default="captions", metadata={"help": "its reference captions column"})
    dataset_id_column: str | None = field(default="image_id", metadata={"help": "its image id column"})
    world_seed: int = field(default=0, metadata={"help": "seed of the shapes world (scenes, judge, captioner)"})
    toy: bool = field(
        default=False, metadata={"help": "run the recipe's toy: overrides on the shapes world (offline, CPU)"}
    )

    def __post_init__(self) -> None:
        if not self.dataset_name:
            raise ConfigError("dataset_name: required (a Karpathy JSON file, a dataset folder or name, or 'shapes')")
        for name in ("max_train_images", "max_eval_images", "max_test_images"):
            _positive(name, getattr(self, name))
        for name in ("dataset_train_split", "dataset_eval_split"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: must name a split")

    @property
    def test_split(self) -> str:
        return self.dataset_test_split or self.dataset_eval_split


@dataclass
class JudgeConfig:
    """The frozen CLIP that scores captions, and the cache of its image embeddings."""

    clip_model: str | None = field(
        default=None,
        metadata={"help": "open_clip architecture, e.g. ViT-B-32-quickgelu (null on the shapes world: its tiny CLIP)"},
    )
    clip_pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag, e.g. openai"})
    embedding_cache: str | None = field(
        default=None,
        metadata={"help": "image-embedding cache file: loaded when present, else built and saved there "
                  "(default: <output_dir>/image_embeddings.safetensors)"},
    )
    clip_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the cached embeddings: float16 | float32 (null: the judge's own)"}
    )
    clip_batch_size: int | None = field(default=None, metadata={"help": "images / texts per CLIP forward pass"})
    clip_hard_negatives: bool = field(
        default=True, metadata={"help": "shapes world: train its CLIP with NegCLIP's swapped-attribute negatives"}
    )

    def __post_init__(self) -> None:
        if self.clip_dtype not in (None, "float16", "float32"):
            raise ConfigError(f"clip_dtype: {self.clip_dtype!r}; one of ['float16', 'float32', null]")
        _positive("clip_batch_size", self.clip_batch_size)


@dataclass
class CaptionerConfig(ModelConfig):
    """The captioner: TRL's ``ModelConfig`` (``model_name_or_path``, ``use_peft``, ``lora_*``) plus its family.

    ``captioner_family`` names a registered family (:mod:`clip_rl_trl.models.families`: ``clipcap``, ``blip``,
    ``vlm``); ``lora_target_modules`` defaults to the family's. Without ``model_name_or_path`` (the shapes world
    only) a tiny ClipCap is MLE-trained from scratch on the training captions with the ``mle_*`` settings, and
    cached.
    """

    captioner_family: str = field(default="clipcap", metadata={"help": "a registered family: clipcap | blip | vlm"})
    caption_prompt: str | None = field(
        default=None, metadata={"help": "text the caption continues (BLIP, VLM instruction; not ClipCap)"}
    )
    mle_layers: int = field(default=3, metadata={"help": "from-scratch ClipCap: GPT-2 layers"})
    mle_width: int = field(default=128, metadata={"help": "from-scratch ClipCap: GPT-2 width"})
    mle_heads: int = field(default=4, metadata={"help": "from-scratch ClipCap: attention heads"})
    mle_prefix_length: int = field(default=4, metadata={"help": "from-scratch ClipCap: prefix tokens"})
    mle_epochs: int = field(default=8, metadata={"help": "from-scratch ClipCap: MLE epochs"})
    mle_batch_size: int = field(default=128, metadata={"help": "from-scratch ClipCap: MLE batch size"})
    mle_learning_rate: float = field(default=2e-3, metadata={"help": "from-scratch ClipCap: MLE learning rate"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.captioner_family or not isinstance(self.captioner_family, str):
            raise ConfigError("captioner_family: required (clipcap | blip | vlm, or a registered family)")
        for name in ("lora_r", "mle_layers", "mle_width", "mle_heads", "mle_prefix_length", "mle_epochs",
                     "mle_batch_size"):
            _positive(name, getattr(self, name), allow_none=False)


@dataclass
class RewardConfig:
    """The rewards: registry names (``clip_s``, ``bidirectional``, ...) or dotted import paths of your own.

    ``reward_kwargs`` maps a reward's name to its options (``{bidirectional: {temperature: 0.01}}``); every
    option and its default is the reward's constructor's (:func:`clip_rl_trl.rewards.registry.reward_options`).
    Their weights are ``reward_weights`` (a ``GRPOConfig`` field), in the same order.
    """

    reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "reward names or dotted import paths (my_pkg.rewards.MyReward)"}
    )
    reward_kwargs: dict | str | None = field(
        default=None, metadata={"help": "options per reward, a mapping (JSON on the command line)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not self.reward_funcs:
            raise ConfigError("reward_funcs: a non-empty list of reward names, e.g. [bidirectional, discriminator]")
        duplicated = sorted({n for n in self.reward_funcs if self.reward_funcs.count(n) > 1})
        if duplicated:
            raise ConfigError(f"reward_funcs: {duplicated} appear more than once (TRL logs rewards by name)")
        if isinstance(self.reward_kwargs, str):
            try:
                self.reward_kwargs = _yaml(self.reward_kwargs)
            except yaml.YAMLError as err:
                raise ConfigError(f"reward_kwargs: not a JSON / YAML mapping ({err})") from None
        kwargs = self.reward_kwargs or {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(v, Mapping) for v in kwargs.values()):
            raise ConfigError(
                f"reward_kwargs: a mapping of reward name to its options, e.g. "
                f"{{bidirectional: {{temperature: 0.01}}}}, got {self.reward_kwargs!r}"
            )
        unknown = sorted(set(kwargs) - set(self.reward_funcs))
        if unknown:
            raise ConfigError(f"reward_kwargs: options for {unknown}, which are not in reward_funcs {self.reward_funcs}")
        self.reward_kwargs = {name: dict(options) for name, options in kwargs.items()}

    def options(self, name: str) -> dict[str, Any]:
        return dict((self.reward_kwargs or {}).get(name, {}))


@dataclass
class Recipe:
    """The five parsed parts of a run."""

    data: DataConfig
    judge: JudgeConfig
    captioner: CaptionerConfig
    rewards: RewardConfig
    training: CaptionRLConfig
    config_path: str | None = None


RECIPE_TYPES = (DataConfig, JudgeConfig, CaptionerConfig, RewardConfig, CaptionRLConfig)

# Keys of the sectioned recipes before 0.3 -> their fields now (CHANGELOG: "Recipes are flat TrlParser configs").
OLD_KEYS: dict[str, str] = {
    "data.source": "dataset_source (or let dataset_name tell it)",
    "data.karpathy_json": "dataset_name",
    "data.dataset": "dataset_name",
    "data.name": "dataset_config",
    "data.train_split": "dataset_train_split",
    "data.eval_split": "dataset_eval_split (and dataset_test_split for the report)",
    "data.image_column": "dataset_image_column",
    "data.captions_column": "dataset_captions_column",
    "data.id_column": "dataset_id_column",
    "data.seed": "world_seed",
    "data.n_train": "max_train_images",
    "data.n_val": "max_eval_images",
    "data.n_test": "max_test_images",
    "data.max_tokens": "max_completion_length",
    "data.clip_hard_negatives": "clip_hard_negatives",
    "data.gpt_layers": "mle_layers",
    "data.gpt_width": "mle_width",
    "data.gpt_heads": "mle_heads",
    "data.prefix_length": "mle_prefix_length",
    "data.mle_lr": "mle_learning_rate",
    "clip.model": "clip_model",
    "clip.pretrained": "clip_pretrained",
    "clip.cache": "embedding_cache",
    "clip.dtype": "clip_dtype",
    "clip.batch_size": "clip_batch_size",
    "captioner.family": "captioner_family",
    "captioner.name_or_path": "model_name_or_path",
    "captioner.prompt": "caption_prompt",
    "captioner.lora": "use_peft",
    "rewards": "reward_funcs + reward_weights + reward_kwargs",
    "training": "the CaptionRLConfig fields themselves, at the top level",
}
_SECTIONS = ("data", "clip", "captioner", "rewards", "training")
# What --toy changes besides the recipe's own `toy:` overrides: the shapes world replaces data, judge and weights.
TOY_BASE: dict[str, Any] = {
    "dataset_name": "shapes",
    "dataset_source": None,
    "clip_model": None,
    "clip_pretrained": None,
    "embedding_cache": None,
    "model_name_or_path": None,
    "dataset_eval_split": "val",
    "dataset_test_split": "test",
    "max_train_images": None,
    "max_eval_images": None,
    "max_test_images": None,
}


def packaged_recipe(name: str) -> Path:
    """The recipe ``name`` shipped with the library (``clip_rl_trl/recipes/<name>.yaml``), e.g. ``shapes_demo``."""
    path = Path(str(resources.files("clip_rl_trl") / "recipes" / f"{name}.yaml"))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"--config {name}: no such file, nor a packaged recipe ({shipped})")
    return path


def _old_format_error(config: Mapping[str, Any], path: str) -> ConfigError | None:
    sections = [s for s in _SECTIONS if isinstance(config.get(s), (dict, list))]
    if not sections:
        return None
    moved = []
    for section in sections:
        value = config[section]
        keys = [f"{section}.{k}" for k in value] if isinstance(value, dict) and section != "training" else [section]
        moved += [f"{k} -> {OLD_KEYS[k]}" for k in keys if k in OLD_KEYS]
    return ConfigError(
        f"recipe {path} has the old sectioned format ({', '.join(sections)}); recipes are now flat TrlParser "
        f"configs (CHANGELOG 0.3.0): {'; '.join(moved) or 'see CHANGELOG'}"
    )


class RecipeParser(TrlParser):
    """``TrlParser`` over the five recipe dataclasses, with the ``toy:`` section and clear errors."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(RECIPE_TYPES, **kwargs)

    def error(self, message: str) -> None:
        # argparse would print the usage of every field (hundreds of lines) before the one line that matters.
        self.exit(2, f"{self.prog}: error: {message} (`--config FILE --help` lists every field)\n")

    def parse_recipe(self, args: Sequence[str] | None = None) -> Recipe:
        """Parse ``--config FILE`` (a path, or a packaged recipe's name) and the command-line overrides.

        Written out rather than calling ``TrlParser.parse_args_and_config`` because that reads YAML with
        ``safe_load`` (``1e-5`` becomes a string, which reaches reward options unconverted) and cannot apply
        the ``toy:`` section; the defaults still go through ``TrlParser.set_defaults_with_config``.
        """
        args = list(sys.argv[1:] if args is None else args)
        import torch

        if not torch.cuda.is_available():
            # GRPOConfig defaults to bf16, which a CPU-only machine refuses: a recipe runs unchanged on either.
            self.set_defaults_with_config(use_cpu=True, bf16=False)
        config_path = None
        if "--config" in args:
            at = args.index("--config")
            if at + 1 >= len(args):
                raise ConfigError("--config: expected a recipe file")
            config_path = args[at + 1]
            del args[at : at + 2]
            self.set_defaults_with_config(**self._read(config_path, toy="--toy" in args))
        try:
            with warnings.catch_warnings():
                # GRPOConfig's own default (gradient_checkpointing=True) triggers transformers' rename warning on
                # every parse; the user did not write it and cannot act on it.
                warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
                parts = self.parse_args_into_dataclasses(args=args)
        except ConfigError:
            raise
        except ValueError as err:  # CaptionRLConfig / GRPOConfig / ModelConfig checks
            raise ConfigError(str(err)) from None
        return Recipe(*parts, config_path=config_path)

    def _read(self, path: str, toy: bool) -> dict[str, Any]:
        file = Path(path)
        if not file.is_file():
            file = packaged_recipe(path) if os.sep not in path and "." not in path else file
        if not file.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            config = _yaml(file.read_text("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"recipe {path} must be a mapping of fields, e.g. learning_rate: 1.0e-6")
        old = _old_format_error(config, path)
        if old is not None:
            raise old
        for key, value in (config.pop("env", None) or {}).items():
            os.environ[key] = str(value)
        overrides = config.pop("toy", None) or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"recipe {path}: toy must be a mapping of fields that --toy overrides")
        known = {f.name for t in RECIPE_TYPES for f in fields(t)}
        for where, mapping in (("", config), ("toy.", overrides)):
            unknown = sorted(set(mapping) - known)
            if unknown:
                raise ConfigError(
                    f"recipe {path}: unknown field{'s' if len(unknown) > 1 else ''} "
                    f"{[where + k for k in unknown]} (fields of DataConfig, JudgeConfig, CaptionerConfig, "
                    "RewardConfig and CaptionRLConfig; `clip-rl-trl train --config FILE --help` lists them)"
                )
        if toy:
            config = {**config, **TOY_BASE, **overrides}
        config.setdefault("output_dir", os.path.join("outputs", file.stem + ("-toy" if toy else "")))
        return config


def parse_recipe(args: Sequence[str] | None = None, prog: str | None = None) -> Recipe:
    """``RecipeParser().parse_recipe(args)``: the command line of ``clip-rl-trl train`` and of the examples."""
    return RecipeParser(prog=prog).parse_recipe(args)
