"""Every registered method, driven by the registry, learns 2 sessions on the COCO fixture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mlcil.config import load_config
from mlcil.engine.loop import Trainer
from mlcil.methods import METHODS
from tiny import REPO, tiny_overrides

TINY = tiny_overrides(train__tensorboard="false", protocol="B40-C40")
# Loss parts each method must log in its second session (proof that its own term ran).
SECOND_SESSION_PARTS = {
    "finetune": ["asl"],
    "replay": ["asl"],
    "lwf": ["asl", "kd"],
    "podnet": ["asl", "pod_spatial", "pod_flat"],
    "krt": ["asl", "pseudo_pos", "token"],
}


def test_every_method_has_a_yaml_and_a_smoke_expectation() -> None:
    for name in METHODS:
        assert (REPO / "configs" / "methods" / f"{name}.yaml").is_file(), name
    assert set(SECOND_SESSION_PARTS) | {"joint"} == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_two_sessions(
    name: str, coco_fixture: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = coco_fixture
    config = load_config(
        [REPO / "configs" / "coco_b40_c10.yaml", REPO / "configs" / "methods" / f"{name}.yaml"],
        [*TINY, f"root={root}", "memory.per_class=2" if METHODS[name].needs_memory else "seed=1"],
    )
    assert config.method.name == name
    metrics = Trainer(config, run_dir=tmp_path / name).run()
    assert metrics is not None
    expected_sessions = 1 if METHODS[name].single_session else 2
    assert len(metrics["sessions"]) == expected_sessions
    assert metrics["sessions"][-1]["num_seen"] == 80
    for entry in metrics["sessions"]:
        assert 0.0 <= entry["seen_map"] <= 100.0 and math.isfinite(entry["seen_map"])
    saved = json.loads((tmp_path / name / "metrics.json").read_text())
    assert saved["method"] == name
    if expected_sessions == 2:
        log = (tmp_path / name / "train.log").read_text()
        line = next(row for row in log.splitlines() if "session 1 epoch 1/1:" in row)
        for part in SECOND_SESSION_PARTS[name]:
            assert f" {part} " in line, (name, part, line)
        if METHODS[name].needs_memory:
            assert metrics["sessions"][1]["memory_images"] > 0
