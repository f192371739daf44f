"""Dotted import paths: how a recipe names a reward, a captioner family or a data source of your own."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_dotted"]


def import_dotted(name: str, what: str, known: list[str]) -> Any:
    """The object at ``name`` (``my_pkg.module.Attribute``); errors say what was looked for and what is known."""
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"{what} {name!r}: not a registered one ({known}) nor a dotted import path like "
                         "my_pkg.module.Name")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ValueError(f"{what} {name!r}: cannot import module {module!r} ({err})") from None
    except AttributeError:
        raise ValueError(f"{what} {name!r}: module {module!r} has no attribute {attr!r}") from None
