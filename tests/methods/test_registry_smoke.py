"""Every registered method, driven by the registry, learns 2 sessions on the COCO fixture, and its
own loss terms are wired in (read from the engine's structured step notifications)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mlcil.engine.observers import Observer
from mlcil.experiment import load_config
from mlcil.methods import METHODS
from mlcil.protocol import Session
from mlcil.runs import start_run
from tiny import REPO, TINY_ICA, tiny_overrides

TINY = tiny_overrides(train__tensorboard="false", protocol="B40-C40")


class StepRecorder(Observer):
    """Keeps the loss parts of every step, per session."""

    def __init__(self) -> None:
        self.parts: dict[int, list[dict[str, float]]] = {}

    def step_finished(
        self, session: Session, epoch: int, step: int, parts: dict[str, float], steps: int
    ) -> None:
        self.parts.setdefault(session.index, []).append(dict(parts))


def tiny_config(name: str, root: Path) -> Any:
    files = [REPO / "configs" / "coco_b40_c10.yaml", REPO / "configs" / "methods" / f"{name}.yaml"]
    extra = [
        *TINY,
        f"root={root}",
        "memory.per_class=2" if METHODS[name].needs_memory else "seed=1",
    ]
    config = load_config(files, extra)
    return load_config(files, [*extra, *TINY_ICA]) if config.model.network == "ica" else config


def test_every_method_has_a_yaml() -> None:
    assert {"finetune", "joint", "krt", "lwf", "podnet", "replay"} <= set(METHODS)
    for name in METHODS:
        assert (REPO / "configs" / "methods" / f"{name}.yaml").is_file(), name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_two_sessions(
    name: str, coco_fixture: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = coco_fixture
    config = tiny_config(name, root)
    assert config.method.name == name
    recorder = StepRecorder()
    # Diagnostics join a run as a callback of the layer above the engine, as in the CLI.
    record = start_run(config, tmp_path / name, observers=[recorder]).run()
    assert record is not None
    metrics = record.plain()
    expected_sessions = 1 if METHODS[name].single_session else 2
    assert len(metrics["sessions"]) == expected_sessions
    assert metrics["sessions"][-1]["num_seen"] == 80
    for entry in metrics["sessions"]:
        assert 0.0 <= entry["seen_map"] <= 100.0 and math.isfinite(entry["seen_map"])
    saved = json.loads((tmp_path / name / "metrics.json").read_text())
    assert saved["method"] == name
    assert sorted(recorder.parts) == list(range(expected_sessions))
    for steps in recorder.parts.values():
        assert all(math.isfinite(v) for step in steps for v in step.values())
    if expected_sessions == 2:
        # The first session has no teacher; the second reports every part the method states.
        expected = {"loss", *METHODS[name].loss_parts}
        assert set(recorder.parts[0][0]) <= expected
        assert set(recorder.parts[1][0]) == expected
        if METHODS[name].needs_memory:
            assert metrics["sessions"][1]["memory_images"] > 0
        # Diagnostics: restored labels only where the method restores some; drift for all.
        diagnostics = metrics["sessions"][1]["diagnostics"]
        restore = diagnostics["restore"]
        assert (restore is not None) == (name == "krt")
        if restore is not None:
            assert restore["true_positives"] <= min(
                restore["pseudo_positives"], restore["hidden_positives"]
            )
        probe_images = diagnostics["embedding_drift"]["num_images"]
        assert 0 < probe_images <= 256
        assert diagnostics["logit_drift"]["num_pairs"] == probe_images * 40  # 40 old classes
        assert metrics["sessions"][0]["diagnostics"]["logit_drift"] is None
