"""The one registry of components and its discovery: a method, a network or a dataset is one
file in its package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlcil.errors import ConfigError
from mlcil.registry import Entries, Registry, discover


def test_an_entry_is_added_once_under_its_name() -> None:
    entries: Entries[str] = Entries("thing")
    assert entries.add("a", "first") == "first"
    entries.add("a", "first")  # the same entry again (a re-imported module): fine
    with pytest.raises(TypeError, match="thing name 'a' is registered twice"):
        entries.add("a", "second")
    assert entries.add("a", "second", replace=True) == "second"
    with pytest.raises(TypeError, match="needs a non-empty name"):
        entries.add("", "x")
    with pytest.raises(ConfigError, match="unknown thing 'b'; known: a"):
        entries.get_entry("b")


def test_a_class_registry_registers_by_the_class_name_attribute() -> None:
    classes: Registry[object] = Registry("widget")

    @classes.register
    class Knob:
        name = "knob"

    assert classes.get_class("knob") is Knob
    with pytest.raises(TypeError, match="must set a non-empty 'name'"):
        classes.register(type("Nameless", (), {}))


def test_discover_imports_every_module_of_a_package_in_name_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "toy_components"
    package.mkdir()
    (package / "__init__.py").write_text("ORDER = []\n")
    for name in ("zeta", "alpha", "_private_helper"):
        (package / f"{name}.py").write_text(
            f"from toy_components import ORDER\nORDER.append({name!r})\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import toy_components

        found = discover("toy_components", toy_components.__path__, skip=("_private_helper",))
        assert found == ["alpha", "zeta"]
        assert toy_components.ORDER == ["alpha", "zeta"]
    finally:
        for module in [m for m in sys.modules if m.startswith("toy_components")]:
            del sys.modules[module]


def test_each_built_in_dataset_is_one_file_of_the_datasets_package() -> None:
    from mlcil.data.catalog import BUILT_IN, DATASETS

    assert {"coco", "voc", "digits", "glyphs", "manifest"} == BUILT_IN
    for name in BUILT_IN:
        assert DATASETS[name].load.__module__ == f"mlcil.data.datasets.{name}", name


def test_networks_are_discovered_from_their_own_files() -> None:
    import mlcil.models
    from mlcil.models import NETWORKS

    package = Path(mlcil.models.__file__).parent
    assert {"linear", "gcn", "cigcn", "ica"} <= set(NETWORKS)
    for network in NETWORKS.values():
        module = network.__module__
        if module.startswith("mlcil."):  # not a plugin's
            assert module.startswith("mlcil.models.")
            assert (package / f"{module.rsplit('.', 1)[1]}.py").is_file()
