"""Importing code by name: the user's plugin modules, and the optional dependencies.

Plugins: a method, a network or a dataset from the user's own module, without editing the
installed package. The module registers what it defines when it is imported
(``@METHODS.register``, ``@NETWORKS.register``, ``register_dataset``); ``mlcil --plugin my_module``
(repeatable) and ``MLCIL_PLUGINS=mod1,mod2`` import such modules before any config is read, so
configs can name what they register. A plugin is a module name (searched on ``sys.path`` and in
the current folder) or the path of a ``.py`` file.

A run records the plugins it was made with (``plugins`` in its ``config.yaml``: those imported
with ``--plugin``/``MLCIL_PLUGINS``, file plugins by absolute path, and any importable module
outside mlcil that defines its method, network or dataset), so ``--resume``, ``eval``,
``predict`` and ``mlcil.load`` import them again (:func:`import_recorded`), and a config that
records plugins brings them along when it is given to ``--config``.

Optional dependencies (``pip install 'mlcil[coco]'``): :func:`require` imports one where it is
needed and turns its absence into an error naming the extra that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterable, Sequence
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
    # A file plugin is remembered by its absolute path: a run resumed from another folder, or
    # a worker process, finds it again.
    canonical = str(Path(name).expanduser().resolve()) if name.endswith(".py") else name
    if canonical not in _loaded:
        _loaded.append(canonical)
        logger.info("plugin %s imported (%s)", name, getattr(module, "__file__", "built-in"))
    return module


def component_modules(components: Iterable[object]) -> list[str]:
    """The modules defining ``components`` (classes or functions) that a later process can
    import by name: outside mlcil, not a script (``__main__``) and not a file plugin (recorded
    by its path)."""
    names: list[str] = []
    for component in components:
        module = getattr(component, "__module__", None) or ""
        if not module or module == "__main__" or module.split(".")[0] == "mlcil":
            continue
        if module.startswith("mlcil_plugin_") or module in names:
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            names.append(module)
    return names


def plugins_to_record(recorded: Sequence[str] = (), components: Iterable[object] = ()) -> list[str]:
    """What a run records as its plugins: those recorded already (a config that records them),
    those this process imported, then the modules of ``components``; each once, in order."""
    names: list[str] = []
    for name in (*recorded, *loaded_plugins(), *component_modules(components)):
        if name not in names:
            names.append(name)
    return names


def recorded_plugins(config: dict) -> list[str]:
    """The ``plugins`` list of a raw config mapping (empty when it has none).

    Raises:
        ConfigError: when ``plugins`` is not a list of names.
    """
    value = config.get("plugins") or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"plugins: expected a list of module names or .py files, got {value!r}")
    return list(value)


def _is_imported(name: str) -> bool:
    if name in _loaded:
        return True
    if name.endswith(".py"):
        module = sys.modules.get(f"mlcil_plugin_{Path(name).stem}")
        return module is not None and getattr(module, "__file__", None) == name
    return name in sys.modules


def import_recorded(names: Sequence[str], where: str) -> None:
    """Import the plugins a run or config recorded (those not imported yet).

    Raises:
        ConfigError: naming ``where``, the plugin and how to make it importable.
    """
    for name in names:
        if _is_imported(name):
            continue
        try:
            _load(name)
        except ConfigError as error:
            raise ConfigError(
                f"{where} was made with the plugin {name!r}, which cannot be imported here: "
                f"{error}. Make it importable (current folder or PYTHONPATH) or give its file "
                "with --plugin FILE.py"
            ) from error


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
