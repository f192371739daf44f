"""Registries of named classes, and dotted import paths: how a recipe names a reward, a captioner family or a
data source, the library's or your own."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["import_dotted", "lookup_instance", "register_instance"]


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


def register_instance(registry: dict[str, Any], name: str) -> Callable[[type], type]:
    """Class decorator: keep one instance of the class in ``registry`` under ``name`` (also its ``name``)."""

    def add(cls: type) -> type:
        cls.name = name
        registry[name] = cls()
        return cls

    return add


def lookup_instance(registry: dict[str, Any], name: str, base: type, what: str, kinds: str) -> Any:
    """The registered instance ``name``, or an instance of the ``base`` subclass at a dotted import path;
    ``what`` names the field and ``kinds`` the registry in errors."""
    if name in registry:
        return registry[name]
    if "." not in name:
        raise ValueError(f"{what}: {name!r}; registered {kinds}: {sorted(registry)}")
    target = import_dotted(name, what, sorted(registry))
    if not (isinstance(target, type) and issubclass(target, base)):
        raise ValueError(f"{what} {name!r} is not a {base.__name__} subclass")
    return target()
