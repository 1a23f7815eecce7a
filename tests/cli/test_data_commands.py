"""``mlcil data synth-coco | synth-voc | cache``: published-layout trees the real loaders read,
and the image cache built once and then reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlcil.cli import main
from mlcil.data.coco import load_coco
from mlcil.data.voc import load_voc
from tiny import REPO


def printed_json(out: str) -> dict:
    return json.loads(out[: out.rindex("}") + 1])


def test_synthetic_trees_from_the_cli_load_and_a_non_empty_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coco, voc = tmp_path / "coco", tmp_path / "voc"
    size = ["--image-size", "96", "72"]
    assert main(["-q", "data", "synth-coco", "--output", str(coco), "--train", "150",
                 "--test", "60", *size]) == 0  # fmt: skip
    summary = printed_json(capsys.readouterr().out)
    assert summary["splits"]["train"]["images"] == 150
    train = load_coco(coco, "train")
    assert len(train) == 150 and train.class_names[0] == "airplane" and len(train.class_names) == 80
    assert main(["-q", "data", "synth-voc", "--output", str(voc), "--train", "80",
                 "--test", "40", *size]) == 0  # fmt: skip
    capsys.readouterr()
    assert len(load_voc(voc, "test")) == 40
    assert main(["-q", "data", "synth-voc", "--output", str(voc), "--train", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(voc) in err


def test_the_image_cache_is_built_once_then_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "coco"
    assert main(["-q", "data", "synth-coco", "--output", str(root), "--train", "60",
                 "--test", "30", "--image-size", "96", "72"]) == 0  # fmt: skip
    capsys.readouterr()
    config = str(REPO / "configs" / "coco_b0_c10.yaml")
    cache = f"data.image_cache_dir={tmp_path / 'cache'}"
    argv = ["-q", "data", "cache", "--config", config, f"root={root}", "data.image_size=32", cache]
    assert main(argv) == 0
    first = printed_json(capsys.readouterr().out)
    assert first["images"] == 90 and first["splits"]["train"]["built"] is True
    assert main(argv) == 0
    again = printed_json(capsys.readouterr().out)
    assert again["splits"]["train"]["built"] is False and again["path"] == first["path"]
