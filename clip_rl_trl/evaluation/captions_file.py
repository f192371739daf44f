"""Caption files: what ``clip-rl-trl eval --captions`` scores and what a run's report writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_captions"]


def read_captions(path: str, column: str) -> dict[str, tuple[Any, str]]:
    """``str(image_id) -> (image_id, caption)`` from JSON lines, a JSON list or an ``{id: caption}`` map.

    The files ``clip-rl-trl eval`` and the report write (``captions.jsonl``: one record per image, a caption per
    system, picked by ``column``). Errors name the file and the line or record at fault.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"captions file {path}: no such file")
    try:
        text = file.read_text("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"captions file {path}: not UTF-8 text ({err})") from None
    if file.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"captions file {path} line {n}: not valid JSON ({err.msg})") from None
    elif file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"captions file {path}: not valid JSON ({err})") from None
        if isinstance(data, dict):
            data = [{"image_id": k, column: v} for k, v in data.items()]
        if not isinstance(data, list):
            raise ValueError(
                f"captions file {path}: expected a list of {{image_id, {column}}} records or an id: caption map"
            )
        records = [(f"record {n}", r) for n, r in enumerate(data)]
    else:
        raise ValueError(f"captions file {path}: expected a .jsonl or .json file")
    captions: dict[str, tuple[Any, str]] = {}
    for where, record in records:
        if not isinstance(record, dict) or "image_id" not in record or column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"captions file {path} {where}: needs 'image_id' and '{column}' (column), has {keys}"
            )
        if not isinstance(record[column], str):
            raise ValueError(f"captions file {path} {where}: '{column}' is not a string")
        key = str(record["image_id"])
        if key in captions:
            raise ValueError(f"captions file {path} {where}: image_id {record['image_id']!r} appears twice")
        captions[key] = (record["image_id"], record[column])
    if not captions:
        raise ValueError(f"captions file {path}: no captions")
    return captions
