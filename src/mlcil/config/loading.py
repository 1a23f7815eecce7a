"""Reading configs: YAML files (with ``include``), merging, ``key=value`` overrides, validation.

A config is a file path or the short name of a shipped config (``digits-pretrained-b0-c2``, see
:mod:`mlcil.config.packaged`); a file that exists wins. A YAML file may pull in others with
``include: [a.yaml, b.yaml]`` (paths relative to the including file, or shipped configs' short
names); mappings merge recursively and later files win. A registered section that names a
*different* registered component replaces the earlier component's parameters: stacking
``methods/lwf.yaml`` over a KRT config never carries KRT's ``token_loss_weight`` into LwF, and
``model: {network: linear}`` over an ICA config drops ``embed_dim``.

Overrides use dotted keys (``train.epochs=2``); a bare key that names a field of exactly one
section is accepted too (``root=...`` means ``data.root``). Which parameters a method or network
takes is answered by a ``ParamsLookup`` the caller passes in, so this module imports no method.

YAML is read by PyYAML's safe loader with these changes, in files and override values alike:

* Integers are read as Python writes them: ``10``, ``-3``, ``1_000`` (1000), ``0x10`` (16),
  ``0o10`` (8), ``0b101`` (5). A decimal with a leading zero such as ``010`` is an error naming
  the key and value (YAML 1.1 reads it as octal 8, YAML 1.2 and people as 10; quote it for text),
  and so are misplaced underscores (``1__0``, ``1_``).
* Sexagesimal numbers (``1:00``, which YAML 1.1 reads as 60) stay strings, so a numeric field
  reports them as "not a valid integer" naming the key.
* Floats may be written with an exponent and no dot (``1e-4``), which YAML 1.1 reads as a string.
* A key written twice in one mapping is an error naming it and both lines (PyYAML keeps the
  last silently). Keys brought in by a merge (``<<: *defaults``) may be overridden, as YAML says.
* Aliases may expand to at most ``MAX_ALIAS_NODES`` nodes and ``MAX_ALIAS_CHARACTERS``
  characters of scalar text in all, and an alias may not refer to a collection that contains it:
  a "billion laughs" document of a few hundred bytes, or one that repeats a long string through
  thousands of aliases, is refused at once instead of expanding to gigabytes. Nesting is limited
  to ``MAX_DEPTH`` levels.

Error messages show at most a few hundred characters of any value (``mlcil.errors.shown``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mlcil.config.packaged import find_packaged, resolve_config
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
from mlcil.errors import ConfigError, MlcilError, clip, shown

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


MAX_ALIAS_NODES = 100_000
"""Nodes that aliases may add to one YAML document (an alias adds the size of what it names)."""

MAX_ALIAS_CHARACTERS = 1_000_000
"""Characters of scalar text that aliases may add to one YAML document (an alias adds the text
of what it names): what the node bound cannot see, one long string repeated by many aliases."""

MAX_DEPTH = 100
"""Deepest nesting of mappings and lists in a YAML document."""

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"
_STANDARD_TAG = "tag:yaml.org,2002:"

# Everything YAML 1.1 takes for an integer except sexagesimal ("1:00"), plus Python's 0o prefix.
# Which candidates are valid is decided by Python's int(text, 0), so "010" and "1__0" are errors.
_INT_CANDIDATE = re.compile(r"^[-+]?(?:0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*)$")
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9_]*[1-9]")
# Python's float syntax (an exponent needs no dot, unlike in YAML 1.1) and YAML's inf and nan;
# no sexagesimal form.
_FLOAT_FORM = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the changes the module docstring lists.

    Composition (text -> node graph) is where aliases are still cheap, so the checks happen there:
    every node counts once, an alias counts the size its anchor had when composed.
    """

    def __init__(self, text: str, source: str, show_lines: bool) -> None:
        super().__init__(text)
        self.name = source  # PyYAML's own error messages name it
        self._source = source
        self._show_lines = show_lines
        self._path: list[tuple[yaml.Node | None, Any]] = []
        self._open_anchors: set[str] = set()
        self._composed = 0
        self._from_aliases = 0
        self._sizes: dict[str, int] = {}
        self._characters = 0  # of scalar text, alias expansions included
        self._characters_from_aliases = 0
        self._texts: dict[str, int] = {}  # anchor -> characters of scalar text it names

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            return self._compose_alias(event, parent, index)
        if len(self._path) >= MAX_DEPTH:
            raise self._error(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
        anchor = event.anchor
        if anchor is not None:
            self._open_anchors.add(anchor)
        start, text_start = self._composed, self._characters
        self._composed += 1
        self._path.append((parent, index))
        try:
            node = super().compose_node(parent, index)
            self._check_node(node)
        finally:
            self._path.pop()
        if isinstance(node, yaml.ScalarNode):
            self._characters += len(node.value)
        if anchor is not None:
            self._open_anchors.discard(anchor)
            self._sizes[anchor] = self._composed - start
            self._texts[anchor] = self._characters - text_start
        return node

    def _compose_alias(self, event: Any, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if event.anchor in self._open_anchors:
            raise self._error(
                event.start_mark,
                f"alias *{event.anchor} refers to a collection that contains it; recursive "
                "structures are not allowed in a config",
            )
        node = super().compose_node(parent, index)  # refuses an undefined alias
        size = self._sizes.get(event.anchor, 1)
        self._composed += size
        self._from_aliases += size
        text = self._texts.get(event.anchor, 0)
        self._characters += text
        self._characters_from_aliases += text
        if self._characters_from_aliases > MAX_ALIAS_CHARACTERS:
            raise self._error(
                event.start_mark,
                f"aliases expand to more than {MAX_ALIAS_CHARACTERS:,} characters of text (alias "
                f"*{clip(event.anchor, 40)} alone stands for {text:,}); a config never needs "
                "that much: write the value once",
            )
        if self._from_aliases > MAX_ALIAS_NODES:
            # The expanded value is never built or shown: only its size is known here.
            raise self._error(
                event.start_mark,
                f"aliases expand to more than {MAX_ALIAS_NODES} values (alias *{event.anchor} "
                f"alone stands for {size}); nested aliases like this are refused (a 'billion "
                "laughs' document?)",
            )
        return node

    def _check_node(self, node: yaml.Node | None) -> None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT:
            problem = _int_problem(node.value)
            if problem is not None:
                raise self._error(node.start_mark, f"{self._describe(self._key_path())}{problem}")
        elif isinstance(node, yaml.MappingNode):
            self._check_unique_keys(node)

    def _check_unique_keys(self, node: yaml.MappingNode) -> None:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            # Keys from a merge ("<<") may be overridden; that is what merging means.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue
            if not key_node.tag.startswith(_STANDARD_TAG):
                continue
            key = self.construct_object(key_node)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if earlier is not key_node:
                path = self._key_path()
                name = f"{path}.{key}" if path else str(key)
                lines = (
                    f", on lines {earlier.start_mark.line + 1} and {key_node.start_mark.line + 1}"
                    if self._show_lines
                    else ""
                )
                raise self._error(
                    key_node.start_mark,
                    f"key {shown(name)} is written twice in one mapping{lines}; YAML readers "
                    "silently keep the last one, so remove one of them",
                )

    def _key_path(self) -> str:
        """Where the node being composed sits, as ``train.epochs`` or ``data.class_order[2]``."""
        path = ""
        for _, index in self._path:
            if isinstance(index, yaml.ScalarNode):
                path += f".{index.value}" if path else str(index.value)
            elif isinstance(index, int):
                path += f"[{index}]"
        return path

    @staticmethod
    def _describe(path: str) -> str:
        return f"key {shown(path)}: " if path else ""

    def _error(self, mark: Any, message: str) -> ConfigError:
        where = f"{self._source}, line {mark.line + 1}" if self._show_lines else self._source
        return ConfigError(f"{where}: {message}")


def _int_problem(text: str) -> str | None:
    """Why ``text`` (an integer candidate) is refused, or None when Python reads it."""
    try:
        int(text, 0)
    except ValueError:
        pass
    else:
        return None
    if len(text) > 64:
        return f"{clip(text, 64)} is not an integer mlcil can use (far too long)"
    if _LEADING_ZERO.match(text):
        sign = text[0] if text[0] in "+-" else ""
        digits = text.lstrip("+-").replace("_", "").lstrip("0")
        octal = f", {sign}0o{digits} for octal" if set(digits) <= set("01234567") else ""
        return (
            f"{text} is ambiguous: YAML 1.1 reads a leading zero as octal, YAML 1.2 as decimal; "
            f"write {sign}{digits} for the decimal number{octal}, or quote it ('{text}') for text"
        )
    return (
        f"{text} is not a valid integer (underscores go only between digits, as in 1_000); "
        f"fix it, or quote it ('{text}') for text"
    )


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    # Every candidate int() refuses was refused while composing, so this cannot fail.
    return int(str(loader.construct_scalar(node)), 0)


# Rebuild the implicit-type table without YAML 1.1's int and float forms, then add ours.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_FORM, list("-+0123456789."))
_Loader.add_implicit_resolver(_INT, _INT_CANDIDATE, list("-+0123456789"))
_Loader.add_constructor(_INT, _construct_int)


def parse_yaml(text: str, source: str = "<string>", show_lines: bool = True) -> Any:
    """Read one YAML document with the module's rules.

    Args:
        text: the YAML text.
        source: what errors name (a file path, or an override as written).
        show_lines: whether errors add the line number (not useful for a one-line override).

    Raises:
        ConfigError: for an ambiguous integer, a duplicate key, an alias bomb or a recursive
            alias, naming ``source``.
        yaml.YAMLError: for text that is not YAML (the caller names the file).
    """
    loader = _Loader(text, source, show_lines)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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
        content = parse_yaml(path.read_text(encoding="utf-8"), str(path))
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
    if not isinstance(includes, list):
        raise ConfigError(f"{path}: include must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for include in includes:
        merged = merge(merged, read_yaml(_included(path, include), (*_stack, resolved)))
    return merge(merged, content)


def _included(including: Path, include: Any) -> Path:
    """The file an ``include`` entry names: a path relative to the including file, else (when
    no such file exists) a shipped config's short name, so a user's own config can build on
    ``include: [digits-pretrained-b0-c2]`` wherever mlcil is installed."""
    if not isinstance(include, str) or not include.strip():
        raise ConfigError(f"{including}: include entries must be file names, got {shown(include)}")
    relative = including.parent / include
    if relative.exists():
        return relative
    packaged = find_packaged(include)
    if packaged is None:
        raise ConfigError(
            f"{including}: included config file not found: {relative} (nor a packaged config "
            f"named {include!r}: `mlcil configs` lists them)"
        )
    return packaged


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
        raise ConfigError(f"override {shown(text)} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {shown(text)} has an empty key")
    try:
        value = parse_yaml(raw, f"override {shown(text)}", show_lines=False) if raw.strip() else ""
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
        raise ConfigError(
            f"override {shown(key)}: unknown key (use section.key, e.g. train.epochs)"
        )
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
    # A path that exists is read as given; otherwise a shipped config's short name.
    paths = [resolve_config(path) for path in paths]
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
            raise ConfigError(f"{where}: {key!r} must be a mapping, got {shown(section)}")
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
        raise ConfigError(f"{where}: {key}.{name_key} must be a string, got {shown(name)}")
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
            f"{where}: unknown key {shown(key)}{owner}{more}; known keys here: {listed or 'none'}"
        )
    message = first["msg"].removeprefix("Value error, ")
    return ConfigError(f"{where}: {clip(key)}: {message}, got {shown(first['input'])}{more}")


def _known_keys(loc: tuple[Any, ...]) -> set[str]:
    if len(loc) < 2:
        return set(RunConfig.model_fields)
    section = _SECTIONS.get(str(loc[0]))
    return set(section.model_fields) - {"params"} if section is not None else set()
