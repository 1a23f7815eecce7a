"""Typed run configuration: the schema (pydantic models) and its loading from YAML files and
``key=value`` overrides. Defaults live in exactly one place, the schema's fields."""

from __future__ import annotations

from mlcil.config.loading import (
    ParamsLookup,
    apply_overrides,
    build_config,
    flatten,
    merge,
    parse_override,
    read_yaml,
)
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

__all__ = [
    "DataConfig",
    "LossConfig",
    "MemoryConfig",
    "MethodConfig",
    "ModelConfig",
    "Params",
    "ParamsLookup",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "flatten",
    "merge",
    "parse_override",
    "read_yaml",
]
