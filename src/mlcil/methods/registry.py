"""Method registry: configs name a method; the registry maps the name to its class."""

from __future__ import annotations

from typing import TypeVar

from mlcil.errors import ConfigError
from mlcil.methods.base import Method

METHODS: dict[str, type[Method]] = {}

MethodType = TypeVar("MethodType", bound=type[Method])


def register_method(cls: MethodType) -> MethodType:
    """Class decorator that makes a method available to configs under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty 'name'")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(f"method.name: unknown method {name!r}; known methods: {known}") from None


def method_params_class(name: str) -> type:
    """The ``Params`` dataclass of a registered method (used to validate config keys)."""
    return get_method(name).Params
