"""Reading configs: YAML files (with ``include``), merging, ``key=value`` overrides, validation.

A YAML file may pull in others with ``include: [a.yaml, b.yaml]`` (paths relative to the including
file); mappings merge recursively and later files win. A registered section that names a
*different* registered component replaces the earlier component's parameters: stacking
``methods/lwf.yaml`` over a KRT config never carries KRT's ``token_loss_weight`` into LwF, and
``model: {network: linear}`` over an ICA config drops ``embed_dim``.

Overrides use dotted keys (``train.epochs=2``); a bare key that names a field of exactly one
section is accepted too (``root=...`` means ``data.root``). Which parameters a method or network
takes is answered by a ``ParamsLookup`` the caller passes in, so this module imports no method.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mlcil.config.schema import (
    DataConfig,
    LossConfig,
    MemoryConfig,
    MethodConfig,
    ModelConfig,
    Params,
    RunConfig,
    TrainConfig,
)
from mlcil.errors import ConfigError, MlcilError

# (section kind, component name) -> the component's Params class; raises ConfigError if unknown.
ParamsLookup = Callable[[str, str], type[Params]]

# Top-level key -> (the key holding the component's name, the registry kind, the section's own
# fields that survive a switch of component).
REGISTERED = {
    "method": ("name", "method", frozenset({"name"})),
    "model": ("network", "network", frozenset(set(ModelConfig.model_fields) - {"params"})),
}

_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "memory": MemoryConfig,
    "train": TrainConfig,
}


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads ``1e-4`` as a string; accept it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|"
        r"^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*$|^[-+]?\.[0-9_]+$|^[-+]?\.(?:inf|Inf|INF)$|"
        r"^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file with its ``include`` list resolved (not yet validated)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, resolved))
        raise ConfigError(f"config include cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        content = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file ({error.reason})") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    if content is None:
        raise ConfigError(f"{path}: the config file is empty (write at least one setting)")
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(content).__name__}")
    includes = content.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for include in includes:
        merged = merge(merged, read_yaml(path.parent / include, (*_stack, resolved)))
    return merge(merged, content)


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge where ``update`` wins; switching a registered component drops the old
    component's parameters."""
    result = dict(base)
    for key, value in update.items():
        old = result.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            if key in REGISTERED:
                old = _keep_on_switch(key, old, value)
            result[key] = merge(old, value)
        else:
            result[key] = value
    return result


def _keep_on_switch(key: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> Mapping[str, Any]:
    name_key, _, own_fields = REGISTERED[key]
    if name_key in new and new[name_key] != old.get(name_key):
        return {k: v for k, v in old.items() if k in own_fields}
    return old


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for comparing and printing configs)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is read as YAML (``true``, ``3``, ``[a, b]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _default_name(key: str) -> str:
    """The component a registered section names when its config does not say."""
    return MethodConfig().name if key == "method" else ModelConfig().network


def _component_params(raw: Mapping[str, Any], key: str, lookup: ParamsLookup) -> set[str]:
    """Parameter names of the component the raw config currently names in section ``key``."""
    name_key, kind, _ = REGISTERED[key]
    section = raw.get(key)
    default = _default_name(key)
    name = section.get(name_key, default) if isinstance(section, Mapping) else default
    try:
        return set(lookup(kind, str(name)).model_fields)
    except ConfigError:
        return set()


def _resolve_override_key(key: str, raw: Mapping[str, Any], lookup: ParamsLookup) -> list[str]:
    parts = key.split(".")
    if len(parts) > 1 or parts[0] in RunConfig.model_fields:
        return parts
    matches = [
        section
        for section, cls in _SECTIONS.items()
        if parts[0] in set(cls.model_fields) - {"params"}
    ]
    for section in REGISTERED:
        if parts[0] in _component_params(raw, section, lookup) and section not in matches:
            matches.append(section)
    if len(matches) == 1:
        return [matches[0], parts[0]]
    if not matches:
        raise ConfigError(f"override {key!r}: unknown key (use section.key, e.g. train.epochs)")
    raise ConfigError(
        f"override {key!r} is ambiguous: it could be " + " or ".join(f"{m}.{key}" for m in matches)
    )


def apply_overrides(
    raw: dict[str, Any], overrides: Sequence[str], lookup: ParamsLookup
) -> dict[str, Any]:
    """Apply ``key=value`` strings to a raw config mapping (validated later)."""
    result = dict(raw)
    for text in overrides:
        key, value = parse_override(text)
        update: Any = value
        for part in reversed(_resolve_override_key(key, result, lookup)):
            update = {part: update}
        result = merge(result, update)
    return result


def load_config(
    paths: str | Path | Sequence[str | Path] | None,
    overrides: Sequence[str],
    lookup: ParamsLookup,
) -> RunConfig:
    """Read one or more YAML files (later ones win), apply overrides, validate every key."""
    if paths is None:
        paths = []
    elif isinstance(paths, str | Path):
        paths = [paths]
    raw: dict[str, Any] = {}
    for path in paths:
        raw = merge(raw, read_yaml(path))
    raw = apply_overrides(raw, overrides, lookup)
    where = " + ".join(str(p) for p in paths) if paths else "defaults"
    if overrides:
        where += " with overrides"
    return build_config(raw, where, lookup)


def build_config(raw: Mapping[str, Any], where: str, lookup: ParamsLookup) -> RunConfig:
    """Validate a raw mapping into a ``RunConfig`` (unknown keys and bad values are errors)."""
    raw = dict(raw)
    for key in REGISTERED:
        section = raw.get(key, {})
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: {key!r} must be a mapping, got {section!r}")
        raw[key] = _split_component(key, section, where, lookup)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise _config_error(error, where) from None


def _split_component(
    key: str, section: Mapping[str, Any], where: str, lookup: ParamsLookup
) -> dict[str, Any]:
    """Validate a registered section's component parameters into the component's Params."""
    name_key, kind, own_fields = REGISTERED[key]
    default = _default_name(key)
    name = section.get(name_key, default)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: {key}.{name_key} must be a string, got {name!r}")
    try:
        params_class = lookup(kind, name)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    own = {k: v for k, v in section.items() if k in own_fields}
    rest = {k: v for k, v in section.items() if k not in own_fields}
    try:
        params = params_class.model_validate(rest)
    except ValidationError as error:
        known = set(params_class.model_fields) | own_fields
        component = f"{kind} {name!r}"
        raise _config_error(
            error, where, prefix=f"{key}.", component=component, known=known
        ) from None
    return {**own, "params": params}


def _config_error(
    error: ValidationError,
    where: str,
    prefix: str = "",
    component: str = "",
    known: set[str] | None = None,
) -> MlcilError:
    """The first problem of a validation error as one line naming the file, key and value."""
    first = error.errors()[0]
    key = (prefix + ".".join(str(part) for part in first["loc"])).rstrip(".") or "config"
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, MlcilError):  # our own validators' errors keep their type and text
        return type(cause)(f"{where}: {key}: {cause}")
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        listed = ", ".join(sorted(known if known is not None else _known_keys(first["loc"])))
        owner = f" of {component}" if component else ""
        return ConfigError(
            f"{where}: unknown key {key!r}{owner}{more}; known keys here: {listed or 'none'}"
        )
    message = first["msg"].removeprefix("Value error, ")
    return ConfigError(f"{where}: {key}: {message}, got {first['input']!r}{more}")


def _known_keys(loc: tuple[Any, ...]) -> set[str]:
    if len(loc) < 2:
        return set(RunConfig.model_fields)
    section = _SECTIONS.get(str(loc[0]))
    return set(section.model_fields) - {"params"} if section is not None else set()
