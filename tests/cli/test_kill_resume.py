"""Exact resume inside a session: a CPU run killed mid-session (SIGKILL, or pre-empted with
SIGTERM) and resumed writes the same ``metrics.json`` as an uninterrupted run.

Each run is ``python -m mlcil.cli train`` in a subprocess (single-threaded, as the comparison
needs the same thread count) on a small manifest dataset written here, with
``train.checkpoint_every_epochs=1``.
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

from tiny import REPO, tiny_overrides, write_manifest_dataset

_TIMEOUT_S = 240.0


def command(run_dir: Path, data: list[str]) -> list[str]:
    overrides = tiny_overrides(
        model__embed_dim="16",
        model__num_heads="2",
        train__batch_size="4",
        train__epochs="3",
        train__checkpoint_every_epochs="1",
        train__tensorboard="false",
        memory__per_class="2",
        loss__reference_images="4",
        data__augment="[cutout]",  # random draws: the resumed epoch must restore them exactly
        protocol="B0-C2",
    )
    config = str(REPO / "configs" / "manifest_example.yaml")
    return [sys.executable, "-m", "mlcil.cli", "-q", "train", "--config", config,
            "--run-dir", str(run_dir), *data, *overrides]  # fmt: skip


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, env=environment(), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def interrupt(args: list[str], run_dir: Path, sig: int, prefix: str) -> subprocess.Popen[str]:
    """Start a run and send ``sig`` once a mid-session checkpoint named ``prefix...`` is
    complete."""
    process = subprocess.Popen(
        args, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pointer = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.is_file() and pointer.read_text().startswith(prefix):
            process.send_signal(sig)
            break
        time.sleep(0.01)
    process.wait(timeout=_TIMEOUT_S)
    return process


def comparable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything except timing fields."""
    metrics = {k: v for k, v in metrics.items() if k != "wall_time_s"}
    metrics["sessions"] = [
        {k: v for k, v in session.items() if k != "train_time_s"} for session in metrics["sessions"]
    ]
    return metrics


@pytest.mark.parametrize(
    ("sig", "prefix"),
    [
        # In session 1: the resumed run needs the teacher, the DPL threshold and the memory.
        (signal.SIGKILL, "session_01_epoch_"),
        # SIGTERM lands inside an epoch: the step position and random states are restored.
        (signal.SIGTERM, "session_00_epoch_"),
    ],
    ids=["sigkill", "sigterm"],
)
def test_a_run_killed_mid_session_resumes_to_the_same_metrics(
    tmp_path: Path, sig: signal.Signals, prefix: str
) -> None:
    data = write_manifest_dataset(tmp_path / "data")
    straight = tmp_path / "straight"
    run(command(straight, data))

    killed = tmp_path / "killed"
    process = interrupt(command(killed, data), killed, sig, prefix)
    output = process.stdout.read() if process.stdout else ""
    # Written after each session, marked unfinished until the last.
    finished = (killed / "metrics.json").exists() and json.loads(
        (killed / "metrics.json").read_text()
    )["finished"]
    assert not finished, "the run finished before the signal"
    latest = (killed / "checkpoints" / "latest").read_text().strip()
    assert "_epoch_" in latest, latest  # a mid-session checkpoint is the newest
    if sig == signal.SIGTERM:
        assert process.returncode == 0, output
        assert f"mlcil train --resume {killed}" in output
    else:
        assert process.returncode == -signal.SIGKILL

    run([sys.executable, "-m", "mlcil.cli", "-q", "train", "--resume", str(killed)])
    expected = json.loads((straight / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert comparable(resumed) == comparable(expected)
