"""Exact resume of what the method surface adds: a CPU run of BiC (a second, bias-correction
phase per session) or DER++ (logits stored with every exemplar), killed inside a session and
resumed, writes the same ``metrics.json`` as an uninterrupted run.

The pattern of tests/cli/test_kill_resume.py: ``python -m mlcil.cli train`` in a subprocess
(single-threaded) on a small manifest dataset, ``train.checkpoint_every_epochs=1``, SIGKILL once
a chosen mid-session checkpoint is the newest. Four one-class sessions leave work after the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from mlcil.results import run_finished
from tiny import REPO, tiny_overrides, write_manifest_dataset

_TIMEOUT_S = 300.0


def command(method: str, run_dir: Path, data: list[str]) -> list[str]:
    overrides = tiny_overrides(
        train__batch_size="4",
        train__epochs="2",
        train__checkpoint_every_epochs="1",
        train__tensorboard="false",
        memory__per_class="3",
        loss__reference_images="4",
        data__augment="[cutout]",  # random draws: the resumed epoch must restore them exactly
        protocol="B0-C1",
    )
    configs = [REPO / "configs" / "manifest_example.yaml", REPO / "configs" / "methods" / method]
    files = [arg for config in configs for arg in ("--config", str(config))]
    return [sys.executable, "-m", "mlcil.cli", "-q", "train", *files,
            "--run-dir", str(run_dir), *data, *overrides]  # fmt: skip


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def run(args: list[str]) -> None:
    result = subprocess.run(
        args, env=environment(), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def kill_at(args: list[str], run_dir: Path, prefix: str) -> None:
    """Start a run and SIGKILL it once a checkpoint named ``prefix...`` is complete."""
    process = subprocess.Popen(
        args, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.is_file() and pointer.read_text().startswith(prefix):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait(timeout=_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL, "the run ended before the checkpoint"


def comparable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything except timing fields."""
    metrics = {k: v for k, v in metrics.items() if k != "wall_time_s"}
    metrics["sessions"] = [
        {k: v for k, v in session.items() if k != "train_time_s"} for session in metrics["sessions"]
    ]
    return metrics


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_manifest_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, dataset: list[str]) -> dict[str, Path]:
    """One uninterrupted run per method, shared by the killed runs."""
    folders = {}
    for method in ("bic.yaml", "derpp.yaml"):
        folder = tmp_path_factory.mktemp("straight") / method
        run(command(method, folder, dataset))
        folders[method] = folder
    return folders


@pytest.mark.parametrize(
    ("method", "prefix"),
    [
        # Session 1's main fit has 2 epochs; its last checkpoint (epoch 2, step 0) starts the
        # bias phase (epochs 2 and 3) afresh.
        ("bic.yaml", "session_01_epoch_002_"),
        # Inside the bias phase: its optimiser and alpha, beta come back from the checkpoint.
        ("bic.yaml", "session_01_epoch_003_"),
        # In session 2: exemplars of sessions 0 and 1 carry logits over 1 and 2 classes.
        ("derpp.yaml", "session_02_epoch_001_"),
    ],
    ids=["bic-phase-start", "bic-inside-phase", "derpp"],
)
def test_a_run_killed_mid_session_resumes_to_the_same_metrics(
    tmp_path: Path, dataset: list[str], straight: dict[str, Path], method: str, prefix: str
) -> None:
    killed = tmp_path / "killed"
    kill_at(command(method, killed, dataset), killed, prefix)
    assert not run_finished(killed)  # metrics.json is written after every session, unfinished
    latest = (killed / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith(prefix), latest
    if method == "derpp.yaml":  # the exemplars' stored logits are in the checkpoint
        rows = load_file(str(killed / "checkpoints" / latest / "memory.safetensors"))
        assert {len(row) for row in rows.values()} == {1, 2}
    else:
        state = json.loads((killed / "checkpoints" / latest / "state.json").read_text())
        assert state["method_state"]["bias"] is not None

    run([sys.executable, "-m", "mlcil.cli", "-q", "train", "--resume", str(killed)])
    expected = json.loads((straight[method] / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert comparable(resumed) == comparable(expected)
    if method == "bic.yaml":  # each incremental session learned its correction and kept it
        state = resumed["sessions"][-1]["method_state"]  # recorded before the session ended
        assert len(state["corrections"]) == 2 and state["bias"] != [1.0, 0.0]
        assert all(pair != [1.0, 0.0] for pair in state["corrections"])
