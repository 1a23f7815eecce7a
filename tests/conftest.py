"""Shared pytest fixtures.

The dataset-format fixtures write their tiny trees once per session; each returns
``(root, info)`` where ``info`` describes the tree (see ``tests/fixtures_formats.py``). Tests must
not modify these trees or dicts: copy the tree into ``tmp_path`` before mutating it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# Make helper modules in tests/ (e.g. fixtures_formats) importable whatever pytest's import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(scope="session")
def coco_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from fixtures_formats import write_coco_fixture

    root = tmp_path_factory.mktemp("coco")
    return root, write_coco_fixture(root)


@pytest.fixture(scope="session")
def voc_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from fixtures_formats import write_voc_fixture

    root = tmp_path_factory.mktemp("voc2007")
    return root, write_voc_fixture(root)


@pytest.fixture(scope="session")
def manifest_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from fixtures_formats import write_manifest_fixture

    root = tmp_path_factory.mktemp("manifest")
    return root, write_manifest_fixture(root)
