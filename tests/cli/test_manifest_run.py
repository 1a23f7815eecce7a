"""A practitioner's run: KRT over their own manifest data, classes in their own order."""

from __future__ import annotations

import json
from pathlib import Path

from mlcil.cli import main
from tiny import REPO, tiny_overrides


def test_krt_on_manifest_data_follows_the_class_file(
    manifest_fixture: tuple[Path, dict], tmp_path: Path
) -> None:
    _, info = manifest_fixture
    files = info["files"]
    code = main(
        [
            "-q",
            "train",
            "--config",
            str(REPO / "configs" / "manifest_example.yaml"),
            "--run-dir",
            str(tmp_path / "run"),
            f"data.train_manifest={files['train']}",
            f"data.test_manifest={files['test']}",
            f"data.class_list={files['classes']}",
            *tiny_overrides(
                model__embed_dim="16",
                model__num_heads="2",
                train__batch_size="2",
                memory__per_class="1",
            ),
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "manifest" and metrics["protocol"] == "B0-C3"
    assert [s["classes"] for s in metrics["sessions"]] == [
        info["class_order"][:3],
        info["class_order"][3:],
    ]
    assert list(metrics["sessions"][-1]["ap"]) == info["class_order"]
    # Session 1 replays exemplars of the first three classes.
    assert metrics["sessions"][1]["memory_images"] >= 1
