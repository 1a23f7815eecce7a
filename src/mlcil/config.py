"""Typed run configuration: YAML files and ``key=value`` overrides resolved into dataclasses.

Defaults live in exactly one place, the dataclass fields below. A YAML file may pull in others
with ``include: [a.yaml, b.yaml]`` (paths relative to the including file); mappings merge
recursively, later files win, and a ``method`` mapping that names a *different* method replaces
the whole method section (method hyperparameters never leak from one method to another).
Unknown keys and wrongly typed values are errors that name the file and the key.

Overrides use dotted keys (``train.epochs=2``); a bare key that names a field of exactly one
section is accepted too (``root=datasets/coco2014`` means ``data.root``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mlcil.errors import ConfigError

DEFAULT_ROOTS = {"coco": "datasets/coco2014", "voc": "datasets/voc2007"}
DATASETS = ("coco", "voc", "digits", "manifest")


@dataclasses.dataclass
class DataConfig:
    """Which images and labels, and how they are fed to the model."""

    dataset: str = "digits"
    root: str | None = None  # None: datasets/coco2014 or datasets/voc2007
    train_manifest: str | None = None  # manifest dataset only
    test_manifest: str | None = None
    class_list: str | None = None  # manifest: file with one class name per line, in order
    image_size: int = 224
    overlap: str = "all"  # "all" (published protocol) or "disjoint" (one session per image)
    augment: list[str] = dataclasses.field(default_factory=lambda: ["cutout", "randaugment"])
    num_workers: int = 4
    label_density: float | None = None  # DPL prior; None: dataset's published value or computed

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        _choice("data.overlap", self.overlap, ("all", "disjoint"))
        for name in self.augment:
            _choice("data.augment", name, ("cutout", "randaugment", "hflip"))
        _positive("data.image_size", self.image_size)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.label_density is not None and not 0 < self.label_density <= 1:
            raise ConfigError(f"data.label_density must be in (0, 1], got {self.label_density}")
        if self.dataset == "manifest" and not (self.train_manifest and self.test_manifest):
            raise ConfigError(
                "data.dataset=manifest needs data.train_manifest and data.test_manifest"
            )

    @property
    def resolved_root(self) -> str | None:
        return self.root if self.root is not None else DEFAULT_ROOTS.get(self.dataset)


@dataclasses.dataclass
class ModelConfig:
    """Backbone and classification network."""

    backbone: str = "tresnet_m"  # any timm model with forward_intermediates
    pretrained: str | None = None  # local weights file (timm or ASL/KRT format); None: random
    feature_stage: int | None = None  # timm feature stage to read; None: the last one
    network: str = "ica"  # "ica" (KRT's incremental cross-attention) or "linear"
    embed_dim: int = 384
    num_heads: int = 8
    mlp_ratio: float = 4.0
    # "released": every ICA Linear weight redrawn from N(0, 0.01) as the authors' code does;
    # "pytorch": PyTorch's default initialisation, which trains far faster when the backbone
    # itself starts from random weights (the embedded benchmark).
    ica_init: str = "released"

    def __post_init__(self) -> None:
        _choice("model.network", self.network, ("ica", "linear"))
        _choice("model.ica_init", self.ica_init, ("released", "pytorch"))
        _positive("model.embed_dim", self.embed_dim)
        _positive("model.num_heads", self.num_heads)
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by model.num_heads "
                f"({self.num_heads})"
            )


@dataclasses.dataclass
class LossConfig:
    """Asymmetric loss of every method's classification term (KRT-SPEC section 6)."""

    gamma_neg: float = 4.0
    gamma_pos: float = 0.0
    clip: float = 0.05


@dataclasses.dataclass
class MemoryConfig:
    """Exemplar replay (KRT-SPEC section 7). ``per_class: 0`` and no ``total`` disable it."""

    per_class: int = 0  # m exemplars per class (growing memory)
    total: int | None = None  # fixed total budget instead; per class = total // seen classes
    labels: str = "strict"  # "strict" (labels known when stored) or "official" (released code)

    def __post_init__(self) -> None:
        _choice("memory.labels", self.labels, ("strict", "official"))
        if self.per_class < 0:
            raise ConfigError(f"memory.per_class must be >= 0, got {self.per_class}")
        if self.total is not None and self.total <= 0:
            raise ConfigError("memory.total must be a positive number of images or null")

    @property
    def enabled(self) -> bool:
        return self.per_class > 0 or self.total is not None


@dataclasses.dataclass
class TrainConfig:
    """Optimisation schedule (KRT-SPEC section 8) and run-time behaviour."""

    epochs: int = 20
    base_epochs: int | None = None  # epochs of the first session; None: same as epochs
    batch_size: int = 64
    lr: float = 4e-5  # first session
    incremental_lr: float = 1e-4  # every later session
    weight_decay: float = 1e-4
    pct_start: float = 0.2
    precision: str = "auto"  # auto: fp16 mixed precision on CUDA, fp32 elsewhere
    device: str = "auto"  # auto: cuda when available, else cpu
    eval_every_epoch: bool = False  # logged only, never used to pick a model
    eval_batch_size: int | None = None  # None: 2 x batch_size
    f1_threshold: float = 0.8  # CF1/OF1 threshold on sigmoid scores (some papers use 0.525)
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _positive("train.epochs", self.epochs)
        if self.base_epochs is not None:
            _positive("train.base_epochs", self.base_epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.lr", self.lr)
        _positive("train.incremental_lr", self.incremental_lr)
        _choice("train.precision", self.precision, ("auto", "fp32", "fp16", "bf16"))
        if not 0 < self.f1_threshold < 1:
            raise ConfigError(f"train.f1_threshold must be in (0, 1), got {self.f1_threshold}")
        if not 0 < self.pct_start < 1:
            raise ConfigError(f"train.pct_start must be in (0, 1), got {self.pct_start}")

    def epochs_for(self, session_index: int) -> int:
        if session_index == 0 and self.base_epochs is not None:
            return self.base_epochs
        return self.epochs

    def lr_for(self, session_index: int) -> float:
        return self.lr if session_index == 0 else self.incremental_lr


@dataclasses.dataclass
class MethodConfig:
    """The method's registry name and its own typed hyperparameters."""

    name: str = "krt"
    params: Any = None  # an instance of the method's Params dataclass

    def to_dict(self) -> dict[str, Any]:
        params = dataclasses.asdict(self.params) if self.params is not None else {}
        return {"name": self.name, **params}


@dataclasses.dataclass
class RunConfig:
    """Everything one run needs; saved resolved as ``config.yaml`` next to its results."""

    name: str | None = None  # run folder name; None: <dataset>_<protocol>_<label>_s<seed>
    label: str | None = None  # name shown in reports (e.g. an ablation); None: the method's name
    output_dir: str = "runs"
    seed: int = 3407
    protocol: str = "B0-C10"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        from mlcil.protocol import parse_protocol

        parse_protocol(self.protocol)  # fail before any work starts

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        protocol = self.protocol.upper().replace(" ", "")
        return f"{self.data.dataset}_{protocol}_{self.display_label}_s{self.seed}"

    @property
    def display_label(self) -> str:
        return self.label or self.method.name

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, MethodConfig):
                result[field.name] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                result[field.name] = dataclasses.asdict(value)
            else:
                result[field.name] = value
        return result

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Loading


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


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
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(content).__name__}")
    includes = content.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for include in includes:
        merged = merge(merged, read_yaml(path.parent / include, (*_stack, resolved)))
    return merge(merged, content, source=str(path))


def merge(base: Mapping[str, Any], update: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """Recursive merge where ``update`` wins; a method switch drops the old method's params."""
    result = dict(base)
    for key, value in update.items():
        old = result.get(key)
        if (
            key == "method"
            and isinstance(old, Mapping)
            and isinstance(value, Mapping)
            and "name" in value
            and value["name"] != old.get("name")
        ):
            result[key] = dict(value)
        elif isinstance(old, Mapping) and isinstance(value, Mapping):
            result[key] = merge(old, value, source)
        else:
            result[key] = value
    return result


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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "memory": MemoryConfig,
    "train": TrainConfig,
}


def _resolve_override_key(key: str, method_params: type | None) -> list[str]:
    parts = key.split(".")
    top = {f.name for f in dataclasses.fields(RunConfig)}
    if len(parts) > 1 or parts[0] in top:
        return parts
    matches = [
        section
        for section, cls in _SECTIONS.items()
        if parts[0] in {f.name for f in dataclasses.fields(cls)}
    ]
    if method_params is not None and parts[0] in {
        f.name for f in dataclasses.fields(method_params)
    }:
        matches.append("method")
    if len(matches) == 1:
        return [matches[0], parts[0]]
    if not matches:
        raise ConfigError(f"override {key!r}: unknown key (use section.key, e.g. train.epochs)")
    raise ConfigError(
        f"override {key!r} is ambiguous: it could be " + " or ".join(f"{m}.{key}" for m in matches)
    )


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings to a raw config mapping (validated later)."""
    from mlcil.methods import method_params_class

    result = dict(raw)
    for text in overrides:
        key, value = parse_override(text)
        method_name = (result.get("method") or {}).get("name", MethodConfig.name)
        try:
            params_cls = method_params_class(method_name)
        except ConfigError:
            params_cls = None
        path = _resolve_override_key(key, params_cls)
        update: Any = value
        for part in reversed(path):
            update = {part: update}
        result = merge(result, update, source="command line")
    return result


def load_config(
    paths: str | Path | Sequence[str | Path] | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Read one or more YAML files (later ones win), apply overrides, validate every key."""
    if paths is None:
        paths = []
    elif isinstance(paths, str | Path):
        paths = [paths]
    raw: dict[str, Any] = {}
    sources = []
    for path in paths:
        raw = merge(raw, read_yaml(path), source=str(path))
        sources.append(str(path))
    raw = apply_overrides(raw, overrides)
    where = " + ".join(sources) if sources else "defaults"
    if overrides:
        where += " with overrides"
    return build_config(raw, where)


def build_config(raw: Mapping[str, Any], where: str = "config") -> RunConfig:
    """Validate a raw mapping into a ``RunConfig`` (unknown keys and bad types are errors)."""
    from mlcil.methods import method_params_class

    raw = dict(raw)
    method_raw = dict(raw.pop("method", None) or {})
    if not isinstance(method_raw, dict):
        raise ConfigError(f"{where}: 'method' must be a mapping")
    method_name = method_raw.pop("name", MethodConfig.name)
    params_cls = method_params_class(method_name)
    params = _build_dataclass(params_cls, method_raw, f"{where}: method ({method_name})")
    config = _build_dataclass(RunConfig, raw, where, exclude=("method",))
    config.method = MethodConfig(name=method_name, params=params)
    return config


def _build_dataclass(
    cls: type, raw: Mapping[str, Any], where: str, prefix: str = "", exclude: Sequence[str] = ()
) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or cls.__name__}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"{where}: unknown key {prefix + unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; known keys here: {known}"
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build_dataclass(hint, value or {}, where, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, hint, key, where)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise type(error)(f"{where}: {error}") from error


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check ``value`` against a type hint, converting only where it is lossless."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: {key}: bad value {value!r}")
    if origin in (list, Sequence):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(item, inner, f"{key}[{i}]", where) for i, item in enumerate(value)]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    raise ConfigError(f"{where}: {key}: unsupported type {hint!r}")  # pragma: no cover
