"""Registries: configs name a component (a method, a network, a dataset); a registry maps the
name to it. Each kind has one registry, filled by its modules when they are imported:
``@register`` on a method or network class, ``DATASETS.add`` for a dataset's entry.

Built-in components are *discovered*: a package of components imports every module in its
folder (:func:`discover`), so a new method, network or dataset is one new file there and
nothing else lists it. A user's own component is registered from a plugin module
(:mod:`mlcil.plugins`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from mlcil.errors import ConfigError

T = TypeVar("T")
V = TypeVar("V")


class Entries(dict[str, V], Generic[V]):
    """``name -> entry`` for one kind of component: an entry is added once under its name."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: V, replace: bool = False) -> V:
        """Make ``entry`` available to configs as ``name``.

        Raises:
            TypeError: for an empty name, or a name taken by another entry (without
                ``replace``).
        """
        if not name:
            raise TypeError(f"a {self.kind} needs a non-empty name")
        if name in self and self[name] is not entry and not replace:
            raise TypeError(f"{self.kind} name {name!r} is registered twice")
        self[name] = entry
        return entry

    def get_entry(self, name: str) -> V:
        """The entry registered as ``name``; an unknown name is an error listing the known ones."""
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self))
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None


class Registry(Entries[type[T]], Generic[T]):
    """``name -> class`` for one kind of component. Every class sets ``name`` and ``Params``."""

    def register(self, cls: Any) -> Any:
        """Class decorator that makes ``cls`` available to configs under ``cls.name``."""
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__qualname__} must set a non-empty 'name'")
        self.add(name, cls)
        return cls

    def get_class(self, name: str) -> type[T]:
        """The class registered as ``name``; an unknown name is an error listing the known ones."""
        return self.get_entry(name)


def discover(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    """Import every module of ``package`` (its ``__path__``), in name order, but ``skip``: the
    modules register what they define as they are imported.

    Returns:
        The names of the modules imported.
    """
    skipped = set(skip)
    names = sorted(module.name for module in pkgutil.iter_modules(list(path)))
    found = [name for name in names if name not in skipped]
    for name in found:
        importlib.import_module(f"{package}.{name}")
    return found
