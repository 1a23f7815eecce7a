"""Registries: configs name a component (a method, a network); a registry maps the name to its
class. Methods and networks each have one, filled by their modules' ``@register`` decorators."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from mlcil.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, type[T]], Generic[T]):
    """``name -> class`` for one kind of component. Every class sets ``name`` and ``Params``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, cls: Any) -> Any:
        """Class decorator that makes ``cls`` available to configs under ``cls.name``."""
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__qualname__} must set a non-empty 'name'")
        if name in self and self[name] is not cls:
            raise TypeError(f"{self.kind} name {name!r} is registered twice")
        self[name] = cls
        return cls

    def get_class(self, name: str) -> type[T]:
        """The class registered as ``name``; an unknown name is an error listing the known ones."""
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self))
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None
