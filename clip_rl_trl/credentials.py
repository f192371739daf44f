"""Credentials never leave the machine: find anything that looks like an access token in files about to be shared.

``clip-rl-trl push`` refuses a folder in which :func:`find_credentials` finds one, naming the file. The trainer's
own files never hold one (``CaptionRLConfig`` drops ``*_token`` fields when pickled into ``training_args.bin``;
reports leave ``hub_token`` out); this scan is the last line, for what a user or another tool wrote there.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TOKEN_PATTERNS", "find_credentials", "redact"]

# Token formats as their issuers document them (prefix + length), specific enough not to match hashes or weights.
TOKEN_PATTERNS: dict[str, re.Pattern[bytes]] = {
    "Hugging Face token": re.compile(rb"hf_[A-Za-z0-9]{34,}"),
    "GitHub token": re.compile(rb"gh[pousr]_[A-Za-z0-9]{36,}"),
    "OpenAI key": re.compile(rb"sk-(?:proj-)?[A-Za-z0-9_-]{32,}"),
    "Weights & Biases key": re.compile(rb"WANDB_API_KEY\W{1,4}[0-9a-f]{40}"),  # bare, it is any SHA-1
}
_CHUNK = 16 << 20
_OVERLAP = 256  # longer than any token: one cut at a chunk boundary is still seen whole in the next read


def _matches(path: Path) -> list[str]:
    found: list[str] = []
    with open(path, "rb") as f:
        tail = b""
        while chunk := f.read(_CHUNK):
            window = tail + chunk
            found += [kind for kind, pattern in TOKEN_PATTERNS.items() if kind not in found and pattern.search(window)]
            tail = window[-_OVERLAP:]
    return found


def find_credentials(folder: str | os.PathLike, ignore_patterns: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(relative path, kind)`` for every file of ``folder`` (less ``ignore_patterns``, fnmatch on the relative
    path) that contains something shaped like an access token."""
    root = Path(folder)
    hits: list[tuple[str, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(rel, pattern) for pattern in ignore_patterns):
            continue
        hits += [(rel, kind) for kind in _matches(path)]
    return hits


def redact(value: Any) -> Any:
    """``value`` with every credential-shaped substring of its strings (in lists, tuples and dicts too) replaced
    by ``<redacted>``: what a report or a pickled config may hold of a field the user put a token into."""
    if isinstance(value, str):
        data = value.encode()
        for pattern in TOKEN_PATTERNS.values():
            data = pattern.sub(b"<redacted>", data)
        return data.decode()
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
