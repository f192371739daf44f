"""Caption datasets in the library's column convention: Karpathy-split JSON files and Hub caption datasets.

Every dataset returned here has the columns that the trainer (``CaptionRLConfig.image_column``,
``captions_column``, ``image_id_column``) and :meth:`~clip_rl_trl.embeddings.ImageEmbeddingCache.build`
read by default:

- ``image``: the image, as a file path (str) or a decoded ``datasets.Image()`` feature;
- ``image_id``: a unique id per image;
- ``captions``: the reference captions of the image, a non-empty list of non-empty strings.

The Karpathy splits (Karpathy & Fei-Fei 2015, "Deep Visual-Semantic Alignments for Generating Image
Descriptions") are the train / val / test partition every paper this library implements evaluates on: COCO
with 5,000 val and 5,000 test images, Flickr30k and Flickr8k with 1,000 each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets

KARPATHY_SPLITS = ("train", "restval", "val", "test")
# Extensions `datasets.load_dataset` reads with a packaged builder, for a caption dataset given as one file.
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}


def load_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str = "train",
    *,
    include_restval: bool | None = None,
    max_images: int | None = None,
    decode_images: bool = False,
    check_images: bool = True,
) -> datasets.Dataset:
    """One split of a Karpathy-split JSON file (``dataset_coco.json``, ``dataset_flickr30k.json``,
    ``dataset_flickr8k.json``) as a ``datasets.Dataset``, one row per image, in the file's order.

    Args:
        json_path: the Karpathy JSON file: ``{"images": [{"filename", "split", "sentences": [{"raw"}, ...],
            ...}, ...]}``; COCO entries also have ``filepath`` (``"train2014"`` / ``"val2014"``) and
            ``cocoid``, Flickr entries have ``imgid``.
        image_root: the folder the images are under: an image's path is ``image_root/filepath/filename``
            (COCO: the folder holding ``train2014/`` and ``val2014/``), or ``image_root/filename`` for entries
            without ``filepath`` (Flickr: the folder of the ``.jpg`` files).
        split: ``"train"``, ``"restval"``, ``"val"`` or ``"test"``.
        include_restval: add the ``"restval"`` images to ``"train"``. ``None`` (default) means ``True`` for
            ``split="train"``: the Karpathy convention, which gives COCO's 113,287 training images (82,783
            train + 30,504 restval); Flickr files have no restval images, so it changes nothing there. Only
            valid with ``split="train"``.
        max_images: keep only the first ``max_images`` images of the split (file order), e.g. for a quick run.
        decode_images: make ``image`` a ``datasets.Image()`` feature, decoded to PIL on access (lazily:
            nothing is read while loading). Default: the path as a string, which the trainer, the policy
            adapters and ``ImageEmbeddingCache.build`` open themselves.
        check_images: check that every image file of the split exists before returning (one ``stat`` per
            image), so a missing folder fails now rather than hours into training.

    Returns:
        A ``datasets.Dataset`` with columns ``image`` (the absolute path, or the decoded image), ``image_id``
        (``int``: the entry's ``cocoid`` when the file has one, else its ``imgid``; COCO's ``cocoid`` is the
        id the official annotation files and the evaluation server use), ``captions`` (the ``raw`` sentences,
        stripped of surrounding whitespace) and ``file_name`` (the image's path relative to ``image_root``).

    Raises:
        FileNotFoundError: the JSON file is missing, or (with ``check_images``) image files are missing.
        ValueError: the JSON has no ``"images"`` list, ``split`` is unknown or empty in this file, an entry
            lacks a needed field, an image has no captions or an empty caption.
    """
    json_path = Path(json_path)
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown split {split!r}; the Karpathy splits are {list(KARPATHY_SPLITS)}")
    if include_restval and split != "train":
        raise ValueError(f"include_restval=True only applies to split='train', not split={split!r}")
    if max_images is not None and (
        isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1
    ):
        raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
    if not json_path.is_file():
        raise FileNotFoundError(
            f"Karpathy split file {str(json_path)!r} not found (see docs/coco.md for where to get it)"
        )
    with open(json_path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_path} is not valid JSON: {err}") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(
            f"{json_path} has no 'images' list: not a Karpathy split file (dataset_coco.json, "
            "dataset_flickr30k.json or dataset_flickr8k.json)"
        )

    wanted = {split, "restval"} if split == "train" and include_restval is not False else {split}
    selected = [e for e in entries if isinstance(e, dict) and e.get("split") in wanted]
    if not selected:
        present = sorted({e.get("split") for e in entries if isinstance(e, dict)}, key=str)
        raise ValueError(f"{json_path} has no images in split {split!r}; its splits are {present}")
    if max_images is not None:
        selected = selected[:max_images]

    # COCO files carry `cocoid` on every entry; Flickr files have only `imgid`. Pick one key for the whole
    # file, so the ids are all of one kind.
    id_key = "cocoid" if "cocoid" in selected[0] else "imgid"
    # Absolute paths keep working when the dataset is saved and read from another working directory.
    root = os.path.abspath(image_root)
    rows: dict[str, list[Any]] = {"image": [], "image_id": [], "captions": [], "file_name": []}
    for position, entry in enumerate(selected):
        where = f"{json_path}: image {entry.get('filename', f'#{position} of split {split!r}')!r}"
        for key in ("filename", id_key, "sentences"):
            if key not in entry:
                raise ValueError(f"{where} has no {key!r} field")
        image_id = entry[id_key]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ValueError(f"{where}: {id_key} is {image_id!r}, expected an int")
        sentences = entry["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{where} ({id_key} {image_id}) has no captions")
        captions = []
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise ValueError(f"{where} ({id_key} {image_id}): sentences[{j}] has no 'raw' string")
            if not raw.strip():
                raise ValueError(f"{where} ({id_key} {image_id}): caption sentences[{j}] is empty")
            captions.append(raw.strip())
        file_name = os.path.join(entry.get("filepath", ""), entry["filename"])
        rows["image"].append(os.path.join(root, file_name))
        rows["image_id"].append(image_id)
        rows["captions"].append(captions)
        rows["file_name"].append(file_name)

    if check_images:
        missing = [path for path in rows["image"] if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(rows['image'])} images of split {split!r} are missing under "
                f"image_root {root!r}; the first is {missing[0]!r} (pass check_images=False "
                "to skip this check)"
            )
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "image": datasets.Image() if decode_images else text,
            "image_id": datasets.Value("int64"),
            "captions": datasets.List(text),
            "file_name": text,
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def load_hub_captions(
    name_or_path: str | os.PathLike,
    split: str,
    *,
    image_column: str | None = "image",
    captions_column: str | None = "captions",
    id_column: str | None = "image_id",
    **load_kwargs: Any,
) -> datasets.Dataset:
    """A caption dataset from the Hub or a local file or folder, columns renamed to the library's convention.

    Args:
        name_or_path: a Hub dataset name (``"user/dataset"``), a local data folder, a single local
            ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` / ``.arrow`` file (read as split ``split``), or a
            folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
            ``datasets.load_from_disk``; a saved single ``Dataset`` has no splits and is returned whole).
        split: the split to load, e.g. ``"test"``; slices such as ``"train[:1000]"`` work except for
            ``save_to_disk`` folders.
        image_column: the dataset's image column (a ``datasets.Image()`` feature or paths), renamed ``image``;
            ``None`` when only ids and references are needed (``clip-rl-trl neighbors``).
        captions_column: the dataset's reference captions, renamed ``captions``: a list of strings per row, or
            one string per row (wrapped into a one-caption list, which rewrites the dataset once); ``None``
            for images without references (``clip-rl-trl embed``).
        id_column: the dataset's unique image ids, renamed ``image_id``; ``None`` numbers the rows
            ``0, 1, ...`` within the loaded split instead (so ids change if the split or slice does).
        **load_kwargs: passed to ``datasets.load_dataset`` (``name``, ``revision``, ``cache_dir``, ...).

    With ``HF_HUB_OFFLINE=1`` a Hub name loads only from the local ``datasets`` cache. Other columns are kept.

    Raises:
        ValueError: a named column is missing (the message lists the available ones), or the captions column
            is not strings / lists of strings, or a row has no captions or an empty caption.
        TypeError: ``load_kwargs`` made ``load_dataset`` return something other than a ``datasets.Dataset``
            (e.g. ``streaming=True``).
    """
    dataset = _load(name_or_path, split, load_kwargs)
    columns = list(dataset.column_names)
    wanted = {"image_column": image_column} if image_column is not None else {}
    if captions_column is not None:
        wanted["captions_column"] = captions_column
    if id_column is not None:
        wanted["id_column"] = id_column
    if len(set(wanted.values())) < len(wanted):
        raise ValueError(f"the column flags must name different columns, got {wanted}")
    for flag, column in wanted.items():
        if column not in columns:
            raise ValueError(
                f"{os.fspath(name_or_path)!r} split {split!r} has no column {column!r} ({flag}); its columns "
                f"are {columns}"
            )
    if id_column is None and "image_id" in columns:
        raise ValueError(
            "id_column=None would number the rows into 'image_id', but the dataset already has an "
            "'image_id' column: pass id_column='image_id'"
        )
    renames = {image_column: "image"} if image_column is not None else {}
    if captions_column is not None:
        renames[captions_column] = "captions"
    if id_column is not None:
        renames[id_column] = "image_id"
    for old, new in renames.items():
        if new in columns and new not in renames:
            raise ValueError(
                f"cannot rename column {old!r} to {new!r}: the dataset already has a column {new!r} "
                f"(pass {new!r} as the column to use, or drop it first)"
            )
    dataset = dataset.rename_columns({old: new for old, new in renames.items() if old != new})
    if captions_column is not None:
        dataset = _check_captions(dataset, name_or_path, captions_column)
    if id_column is not None:
        ids = dataset["image_id"]
        seen: set[Any] = set()
        for i, image_id in enumerate(ids):
            if image_id in seen:
                raise ValueError(
                    f"id column {id_column!r} of {os.fspath(name_or_path)!r} repeats the id {image_id!r} "
                    f"(row {i}): ids must be unique per image (pass id_column=None to number the rows)"
                )
            seen.add(image_id)
    else:
        dataset = dataset.add_column("image_id", list(range(len(dataset))))
    return dataset



def _check_captions(dataset: datasets.Dataset, name_or_path: Any, captions_column: str) -> datasets.Dataset:
    """The ``captions`` column as lists of non-empty strings (a string per row is wrapped into a list)."""
    feature = dataset.features["captions"]
    if feature == datasets.Value("string") or feature == datasets.Value("large_string"):
        dataset = dataset.map(
            lambda batch: {"captions": [[c] for c in batch]},
            input_columns="captions",
            batched=True,
            features=datasets.Features(
                {**dataset.features, "captions": datasets.List(datasets.Value("string"))}
            ),
            desc="Wrapping single captions into lists",
        )
    elif not (
        isinstance(feature, (datasets.List, datasets.LargeList))
        and feature.feature in (datasets.Value("string"), datasets.Value("large_string"))
    ):
        raise ValueError(
            f"captions column {captions_column!r} holds {feature}, expected a list of strings or a string "
            "per row"
        )
    for i, captions in enumerate(dataset["captions"]):
        if not captions:
            raise ValueError(f"row {i} of {os.fspath(name_or_path)!r} has no captions in {captions_column!r}")
        for j, caption in enumerate(captions):
            if caption is None or not caption.strip():
                raise ValueError(
                    f"row {i} of {os.fspath(name_or_path)!r}: caption {j} of {captions_column!r} is empty"
                )
    return dataset


def _load(name_or_path: str | os.PathLike, split: str, load_kwargs: dict[str, Any]) -> datasets.Dataset:
    """Read with ``load_from_disk`` (saved datasets), a packaged builder (one file) or ``load_dataset``."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if split not in saved:
            raise ValueError(f"{str(path)!r} has no split {split!r}; its splits are {list(saved)}")
        return saved[split]
    if path.is_dir() and (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"cannot read {str(path)!r}: a single caption file must end in one of "
                f"{sorted(_FILE_BUILDERS)}"
            )
        base_split = split.split("[", 1)[0]
        loaded = datasets.load_dataset(
            builder, data_files={base_split: str(path)}, split=split, **load_kwargs
        )
    else:
        loaded = datasets.load_dataset(os.fspath(name_or_path), split=split, **load_kwargs)
    if not isinstance(loaded, datasets.Dataset):
        raise TypeError(
            f"load_dataset returned a {type(loaded).__name__}, not a datasets.Dataset (streaming is not "
            "supported)"
        )
    return loaded
