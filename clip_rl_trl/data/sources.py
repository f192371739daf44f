"""The registry of data sources: one loader per source, used by the pipeline, the CLI and the examples.

A source turns a :class:`~clip_rl_trl.DataConfig` and a split into a ``datasets.Dataset`` with the library's
columns: ``image`` (PIL image or path), ``captions`` (a list of reference strings; absent for images without
references), ``image_id`` (unique). :func:`load_split` picks the source named by ``dataset_source`` or the first
whose :meth:`DataSource.claims` accepts ``dataset_name``. A new source is one class with
``@register_source("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets

from clip_rl_trl.configs import DataConfig
from clip_rl_trl.importing import lookup_instance, register_instance

__all__ = ["SOURCES", "DataSource", "data_source", "load_split", "register_source"]

SOURCES: dict[str, DataSource] = {}


def register_source(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`DataSource` subclass under ``name``; later ones are asked first."""
    return register_instance(SOURCES, name)


class DataSource:
    """One kind of dataset: which names it claims and how it loads a split."""

    name: str = ""
    #: rows per split when the recipe gives no ``max_*_images`` (None: the whole split)
    default_sizes: dict[str, int] = {}
    #: save the image embeddings to a file by default (reused on resume); False: cheap to embed, kept in memory
    persist_embeddings: bool = True

    def claims(self, config: DataConfig) -> bool:
        """Whether ``config.dataset_name`` is this source's (asked when ``dataset_source`` is not given)."""
        raise NotImplementedError

    def load(self, config: DataConfig, split: str, limit: int | None, captions: bool = True) -> datasets.Dataset:
        """The first ``limit`` rows of ``split``; ``captions=False``: only the images are needed (no references
        are checked or renamed)."""
        raise NotImplementedError

    def language(self, config: DataConfig) -> Any:
        """A parser of the source's captions for ``grammar_valid`` and the attribute metrics, if it has one."""
        return None

    def tokenizer(self, config: DataConfig) -> Any:
        """A tokenizer for a captioner trained from scratch on this source, if it has one."""
        return None

    def judge(self, config: DataConfig, clip_hard_negatives: bool, progress: bool) -> Any:
        """The source's own CLIP judge when the recipe names none (``clip_model: null``), if it has one."""
        return None

    def cache_settings(self, config: DataConfig) -> dict[str, Any]:
        """What identifies the source's data in the key of a captioner trained from scratch on it."""
        return {}


def _first_rows(dataset: datasets.Dataset, n: int | None) -> datasets.Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


@register_source("hub")
class HubSource(DataSource):
    """A Hub dataset name, a ``save_to_disk`` folder, or one local parquet / json / csv / arrow file
    (:func:`~clip_rl_trl.data.coco.load_hub_captions`); columns renamed by ``dataset_*_column``."""

    def claims(self, config: DataConfig) -> bool:
        return True

    def load(self, config: DataConfig, split: str, limit: int | None, captions: bool = True) -> datasets.Dataset:
        from clip_rl_trl.data.coco import load_hub_captions

        extra = {"name": config.dataset_config} if config.dataset_config else {}
        return _first_rows(
            load_hub_captions(config.dataset_name, split, image_column=config.dataset_image_column,
                              captions_column=config.dataset_captions_column if captions else None,
                              id_column=config.dataset_id_column, **extra),
            limit,
        )


@register_source("karpathy")
class KarpathySource(DataSource):
    """A Karpathy-split JSON file (``dataset_coco.json``, Flickr8k/30k) and its ``image_root``."""

    def claims(self, config: DataConfig) -> bool:
        # A .json file with an image folder: one JSON caption file without images is the hub source's.
        return str(config.dataset_name).endswith(".json") and config.image_root is not None

    def load(self, config: DataConfig, split: str, limit: int | None, captions: bool = True) -> datasets.Dataset:
        from clip_rl_trl.data.coco import load_karpathy

        if not config.image_root:
            raise ValueError(f"dataset_name {config.dataset_name}: a Karpathy-split JSON file needs image_root")
        restval = {"include_restval": config.include_restval} if split == "train" else {}
        return load_karpathy(config.dataset_name, config.image_root, split, max_images=limit, **restval)


@register_source("shapes")
class ShapesSource(DataSource):
    """The synthetic shapes world (docs/shapes_world.md): any number of scenes per split, generated from
    ``world_seed``; its language parses every caption it can say."""

    default_sizes = {"train": 2000, "val": 200, "test": 200}
    # A few seconds to embed, and a file would outlive a change of world_seed (same ids, other scenes).
    persist_embeddings = False

    def claims(self, config: DataConfig) -> bool:
        return config.dataset_name == "shapes"

    def load(self, config: DataConfig, split: str, limit: int | None, captions: bool = True) -> datasets.Dataset:
        from clip_rl_trl.data.shapes import ShapesWorld

        n = limit if limit is not None else self.default_sizes.get(split)
        if n is None:
            raise ValueError(f"the shapes world needs a number of scenes for split {split!r} (max_*_images)")
        return ShapesWorld(seed=config.world_seed).to_dataset(n, split)

    def language(self, config: DataConfig) -> Any:
        from clip_rl_trl.data.shapes import ShapesLanguage

        return ShapesLanguage()

    def tokenizer(self, config: DataConfig) -> Any:
        from clip_rl_trl.data.shapes import ShapesLanguage

        return ShapesLanguage.word_tokenizer()

    def judge(self, config: DataConfig, clip_hard_negatives: bool, progress: bool) -> Any:
        from clip_rl_trl.data.shapes import ShapesWorld, train_shapes_clip

        return train_shapes_clip(ShapesWorld(seed=config.world_seed), hard_negatives=clip_hard_negatives,
                                 progress=progress)

    def cache_settings(self, config: DataConfig) -> dict[str, Any]:
        from clip_rl_trl.data.shapes import WORLD_VERSION

        return {"world_version": WORLD_VERSION, "world_seed": config.world_seed}


def data_source(config: DataConfig) -> DataSource:
    """The source named by ``config.dataset_source``, or the first that claims ``config.dataset_name``."""
    if config.dataset_source is not None:
        return lookup_instance(SOURCES, config.dataset_source, DataSource, "dataset_source", "sources")
    return next(s for s in reversed(SOURCES.values()) if s.claims(config))


def load_split(config: DataConfig, split: str, limit: int | None = None, captions: bool = True) -> datasets.Dataset:
    """One split of the configured dataset (see the module docstring); errors name the dataset and split."""
    source = data_source(config)
    try:
        return source.load(config, split, limit, captions=captions)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"dataset_name {config.dataset_name} ({source.name}), split {split!r}: {err}") from err
