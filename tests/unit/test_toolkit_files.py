"""Files and folders follow the umask (atomic writes, checkpoints, the weights cache), and the
Python training API checks its arguments before it touches a run folder."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from mlcil import api, fileio, weights_cache
from mlcil.engine.checkpoint import save_checkpoint
from mlcil.errors import ConfigError
from mlcil.experiment import load_config


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask: int) -> None:
    assert fileio.current_umask() == umask
    assert fileio.file_mode() == 0o666 & ~umask and fileio.folder_mode() == 0o777 & ~umask
    assert os.umask(umask) == umask  # still in force


def test_atomic_writes_get_the_mode_open_would_give(tmp_path: Path, umask: int) -> None:
    fileio.write_text_atomic(tmp_path / "a.json", "{}")
    fileio.write_atomic(tmp_path / "b.bin", lambda handle: handle.write(b"x"))
    plain = tmp_path / "plain"
    plain.write_text("")
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.bin") == mode(plain) == 0o666 & ~umask


def test_checkpoints_follow_the_umask(tmp_path: Path, umask: int) -> None:
    folder = save_checkpoint(tmp_path, 0, nn.Linear(2, 2), {"next_session": 1}, {})
    assert mode(folder) == 0o777 & ~umask
    for path in folder.iterdir():  # model.safetensors (written 0600 by safetensors), JSON files
        assert mode(path) == 0o666 & ~umask, path.name
    assert mode(tmp_path / "checkpoints" / "latest") == 0o666 & ~umask


def test_the_weights_cache_follows_the_umask(tmp_path: Path, umask: int) -> None:
    provenance = {field: "x" for field in weights_cache.REQUIRED_FIELDS}
    path = weights_cache.store({"w": torch.zeros(2)}, provenance, cache=tmp_path)
    assert mode(path) == 0o666 & ~umask
    assert [p for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_train_checks_its_arguments_before_touching_the_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="max_sessions must be at least 1"):
        api.train("digits-b0-c2", run_dir=run_dir, max_sessions=0)
    with pytest.raises(ConfigError, match="overrides: give a list of key=value strings or a dict"):
        api.train("digits-b0-c2", overrides="train.epochs=1", run_dir=run_dir)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"not found: digits-b0-c9"):
        api.train("digits-b0-c9", run_dir=run_dir)
    assert not run_dir.exists()


def test_configs_from_python_take_every_form() -> None:
    from_file = api.resolve_config("digits-b0-c2", {"train.epochs": 2, "data.augment": []})
    assert from_file.train.epochs == 2 and from_file.data.augment == []
    strings = api.resolve_config(["digits-b0-c2"], ["train.epochs=2", "data.augment=[]"])
    assert strings.to_dict() == from_file.to_dict()
    again = api.resolve_config(from_file, {"seed": 9, "model.pretrained": None})
    assert again.seed == 9 and again.model.pretrained is None and again.train.epochs == 2
    plain = api.resolve_config(from_file.to_dict())
    assert plain.to_dict() == from_file.to_dict()
    with pytest.raises(
        ConfigError, match="mlcil.train config with overrides: unknown key 'train.epoch'"
    ):
        api.resolve_config(from_file.to_dict(), {"train.epoch": 1})
    assert load_config("digits-b0-c2").train.epochs != 2  # nothing leaked into the file's config


def test_the_image_and_annotation_caches_follow_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlcil.config.schema import DataConfig
    from mlcil.data import build_image_cache
    from mlcil.data.synthetic import write_synthetic_coco

    root = tmp_path / "coco"
    write_synthetic_coco(root, train_images=4, val_images=2, seed=0, image_size=(64, 48))
    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "cache"))  # the annotation cache too
    previous = os.umask(0o027)
    try:
        config = DataConfig(dataset="coco", root=str(root), image_cache=True, image_size=16,
                            num_workers=0)  # fmt: skip
        build_image_cache(config)
    finally:
        os.umask(previous)
    written = list((tmp_path / "cache").rglob("*"))
    assert any(p.suffix == ".npy" for p in written) and any(p.suffix == ".json" for p in written)
    for path in written:
        assert mode(path) == (0o750 if path.is_dir() else 0o640), path


def test_the_digits_and_glyph_caches_follow_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlcil.data.embedded import load_digits
    from mlcil.data.glyphs import load_glyphs

    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "cache"))
    previous = os.umask(0o027)
    try:
        # Sizes no other test uses, so the in-process memo cannot skip the write.
        load_digits("train", train_images=12, test_images=6, seed=5)
        load_glyphs("train", num_images=6, image_size=24, seed=5)
    finally:
        os.umask(previous)
    written = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(written) == 2, written
    for path in written:
        assert mode(path) == 0o640, path
