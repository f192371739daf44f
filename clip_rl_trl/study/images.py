"""Where a study's images come from (an image folder or a data source), and how they are copied into it.

A study never serves a user's file: ``study create`` reads each image it needs once, re-encodes it with Pillow
(PNG or JPEG, optionally downscaled) and writes it as ``images/<index>.<ext>``, an opaque name. The web server
and the static bundle only ever see those copies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "ImagePool", "folder_images", "dataset_images", "write_image"]

#: the extensions looked for when an image id names a file without one (``<id>.<ext>`` in the folder)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: images at most this many pixels on a side are written as PNG by ``image_format="auto"`` (lossless, tiny)
SMALL_IMAGE_SIDE = 256


@dataclass
class ImagePool:
    """The images a study can use: ``load(image_id) -> PIL RGB image`` for every id of ``ids``.

    ``scenes`` (shapes world: image id -> scene) and ``language`` (its parser, with ``consistent``) let the
    study record what the exact oracle says about each trial; ``None`` for images without known content.
    """

    ids: list[str]
    load: Callable[[str], Image.Image]
    describe: str
    scenes: dict[str, Any] | None = None
    language: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def folder_images(folder: str | os.PathLike, ids: Sequence[str]) -> ImagePool:
    """The images of ``ids`` in ``folder``: the file named by the id itself, or ``<id>.<ext>`` for an image
    extension (``IMAGE_EXTENSIONS``). An id that would leave the folder (``../x``, an absolute path) or that no
    file matches is an error naming it."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--images {folder}: no such folder")
    resolved_root = root.resolve()
    found: dict[str, Path] = {}
    missing = []
    for image_id in ids:
        path = _find(resolved_root, image_id)
        if path is None:
            missing.append(image_id)
        else:
            found[image_id] = path
    if missing:
        raise ValueError(
            f"--images {folder}: no image for {len(missing)} image id(s), e.g. {missing[:3]} (looked for the id "
            f"itself and <id>{{{','.join(IMAGE_EXTENSIONS)}}})"
        )

    def load(image_id: str) -> Image.Image:
        from clip_rl_trl.clip import load_image

        return load_image(found[image_id])

    return ImagePool(list(ids), load, f"folder {folder}")


def _find(root: Path, image_id: str) -> Path | None:
    candidates = [image_id] + [image_id + ext for ext in IMAGE_EXTENSIONS]
    for name in candidates:
        path = (root / name).resolve()
        # Only files inside the folder: an id is data from a captions file, not a path to trust.
        if path.is_relative_to(root) and path.is_file():
            return path
    return None


def dataset_images(
    dataset: str,
    ids: Sequence[str],
    split: str = "test",
    *,
    image_root: str | None = None,
    world_seed: int = 0,
    image_column: str = "image",
    id_column: str = "image_id",
) -> ImagePool:
    """The images of ``ids`` in one split of a data source (``clip_rl_trl.data.sources``): ``shapes`` (the
    scenes the ids name, rendered by the world; their scenes and the world's language come along), a
    ``save_to_disk`` folder, a Hub dataset name or a Karpathy JSON file with ``image_root``."""
    from clip_rl_trl.configs import ConfigError, DataConfig
    from clip_rl_trl.data.sources import data_source, load_split

    try:
        config = DataConfig(dataset_name=dataset, image_root=image_root, world_seed=world_seed,
                            dataset_image_column=image_column, dataset_id_column=id_column)
    except ConfigError as err:
        raise ValueError(f"--dataset {dataset}: {err}") from err
    shapes = dataset == "shapes"
    limit = shapes_size(ids, split) if shapes else None
    rows = load_split(config, split, limit, captions=False)
    position = {str(image_id): row for row, image_id in enumerate(rows["image_id"])}
    missing = [image_id for image_id in ids if image_id not in position]
    if missing:
        raise ValueError(
            f"--dataset {dataset} (split {split}): no image for {len(missing)} image id(s), e.g. {missing[:3]}"
        )
    source = data_source(config)
    language = source.language(config)
    scenes = None
    if language is not None and "scene" in rows.column_names:
        scene_column = rows["scene"]
        scenes = {image_id: scene_column[position[image_id]] for image_id in ids}

    def load(image_id: str) -> Image.Image:
        from clip_rl_trl.clip import load_image

        return load_image(rows[position[image_id]]["image"])

    describe = f"dataset {dataset}, split {split}" + (f", world seed {world_seed}" if shapes else "")
    extra = {"world_seed": world_seed} if shapes else {}
    return ImagePool(list(ids), load, describe, scenes, language, extra)


def shapes_size(ids: Sequence[str], split: str) -> int:
    """How many scenes of the shapes world's ``split`` cover the ids (``"test-000123"``: scene 123)."""
    indices = []
    for image_id in ids:
        prefix, _, number = str(image_id).rpartition("-")
        if prefix != split or not number.isdigit():
            raise ValueError(f"image_id {image_id!r} is not a scene of the shapes world's split {split!r}")
        indices.append(int(number))
    return max(indices) + 1


def write_image(image: Image.Image, folder: Path, index: int, image_format: str = "auto",
                max_side: int | None = 512) -> str:
    """Re-encode ``image`` into ``folder/<index:04d>.png|.jpg`` and return the file name.

    ``image_format``: ``png``, ``jpeg`` or ``auto`` (PNG for sources up to ``SMALL_IMAGE_SIDE`` pixels a side,
    where it is small and lossless; JPEG quality 90 for larger ones). Images larger than ``max_side`` are downscaled (aspect kept).
    """
    if image_format not in ("auto", "png", "jpeg"):
        raise ValueError(f"image_format must be auto, png or jpeg, got {image_format!r}")
    image = image.convert("RGB")
    if image_format == "auto":  # by the source's size: a downscaled photograph is still a photograph
        image_format = "png" if max(image.size) <= SMALL_IMAGE_SIDE else "jpeg"
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    name = f"{index:04d}." + ("png" if image_format == "png" else "jpg")
    options: dict[str, Any] = {"optimize": True} if image_format == "png" else {"quality": 90}
    # A fresh encode drops EXIF and any other metadata of the source file (GPS, camera, user names).
    image.save(folder / name, format=image_format.upper(), **options)
    return name
