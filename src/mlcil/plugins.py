"""Importing code by name: the user's plugin modules, and the optional dependencies.

Plugins: a method, a network or a dataset from the user's own module, without editing the
installed package. The module registers what it defines when it is imported
(``@METHODS.register``, ``@NETWORKS.register``, ``register_dataset``); ``mlcil --plugin my_module``
(repeatable) and ``MLCIL_PLUGINS=mod1,mod2`` import such modules before any config is read, so
configs can name what they register. A plugin is a module name (searched on ``sys.path`` and in
the current folder) or the path of a ``.py`` file.

Optional dependencies (``pip install 'mlcil[coco]'``): :func:`require` imports one where it is
needed and turns its absence into an error naming the extra that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from mlcil.errors import ConfigError, MlcilError

logger = logging.getLogger(__name__)

ENVIRONMENT = "MLCIL_PLUGINS"
"""Environment variable: plugin modules to import, separated by commas."""

_loaded: list[str] = []  # in import order; passed on to worker processes (mlcil compare --jobs)


class MissingDependencyError(MlcilError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or fail naming the extra that installs it.

    Args:
        module: the module to import (``pycocotools.coco``).
        extra: mlcil's extra that installs it (``coco``).
        purpose: what needs it, for the message (``data.dataset: coco``).

    Raises:
        MissingDependencyError: ``<purpose> needs <package>: pip install 'mlcil[<extra>]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is None or module.split(".")[0] != error.name.split(".")[0]:
            raise  # the package is there but broken: its own error says more
        raise MissingDependencyError(
            f"{purpose} needs the {module.split('.')[0]!r} package, which is not installed: "
            f"pip install 'mlcil[{extra}]'"
        ) from error


def plugin_names(given: Iterable[str] = (), environ: dict[str, str] | None = None) -> list[str]:
    """The plugins to import: those of ``MLCIL_PLUGINS`` first, then ``given`` (``--plugin``),
    each once, in order."""
    environ = dict(os.environ) if environ is None else environ
    names = [part.strip() for part in environ.get(ENVIRONMENT, "").split(",")]
    names += [name.strip() for name in given]
    unique: list[str] = []
    for name in names:
        if name and name not in unique:
            unique.append(name)
    return unique


def load_plugins(names: Iterable[str]) -> list[ModuleType]:
    """Import plugin modules (module names or ``.py`` files), each at most once per process.

    Raises:
        ConfigError: naming the plugin (and ``MLCIL_PLUGINS``/``--plugin``) when it cannot be
            found; an error raised while the plugin runs propagates with its own traceback.
    """
    return [_load(name) for name in names]


def loaded_plugins() -> list[str]:
    """The plugins this process has imported, in order (what worker processes must import)."""
    return list(_loaded)


def _load(name: str) -> ModuleType:
    try:
        module = _load_file(Path(name)) if name.endswith(".py") else _load_module(name)
    except MlcilError:
        raise
    except Exception as error:  # the plugin's own code failed: say which plugin (--debug: why)
        raise ConfigError(
            f"plugin {name!r} failed while being imported: {type(error).__name__}: {error}"
        ) from error
    if name not in _loaded:
        _loaded.append(name)
        logger.info("plugin %s imported (%s)", name, getattr(module, "__file__", "built-in"))
    return module


def _load_module(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    # The console script does not put the current folder on sys.path (python -m does): a
    # plugin next to the user's configs is found either way. Appended, so installed modules win.
    here = os.getcwd()
    if here not in sys.path:
        sys.path.append(here)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as error:
        spec, reason = None, f": {error}"
    else:
        reason = ""
    if spec is None:
        raise ConfigError(
            f"plugin {name!r} (from --plugin or {ENVIRONMENT}) is not an importable "
            f"module{reason}; give a module on the Python path or in the current folder, or a "
            ".py file"
        )
    return importlib.import_module(name)


def _load_file(path: Path) -> ModuleType:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"plugin file {path} (from --plugin or {ENVIRONMENT}) does not exist")
    module_name = f"mlcil_plugin_{path.stem}"
    existing = sys.modules.get(module_name)
    if existing is not None and getattr(existing, "__file__", None) == str(path):
        return existing
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugin file {path}: Python cannot import it")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
