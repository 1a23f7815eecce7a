"""``mlcil compare --jobs 2`` stopped by Ctrl-C (SIGINT to the terminal's process group), by
SIGTERM, or by the death of the comparison process itself (SIGKILL): every worker stops with it
(no process is left), and the same command afterwards finishes the grid (interrupted runs resume
or start again, finished ones are reused).

Each comparison is ``python -m mlcil.cli compare`` in its own session (process group), on the
small manifest dataset of the kill-and-resume tests, with a checkpoint every epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlcil.results import run_finished
from tiny import REPO, tiny_overrides, write_manifest_dataset

_TIMEOUT_S = 300.0


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def grid(output: Path, data: list[str]) -> list[str]:
    overrides = tiny_overrides(
        train__batch_size="4",
        train__epochs="3",
        train__checkpoint_every_epochs="1",
        train__tensorboard="false",
        protocol="B0-C2",
    )
    methods = REPO / "configs" / "methods"
    return [sys.executable, "-m", "mlcil.cli", "-q", "compare", str(methods / "finetune.yaml"),
            str(methods / "lwf.yaml"), "--base", str(REPO / "configs" / "manifest_example.yaml"),
            "--jobs", "2", "--output", str(output), "--set", *data, *overrides]  # fmt: skip


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + _TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "parent-killed"])
def test_a_stopped_grid_leaves_no_process_and_the_same_command_finishes_it(
    tmp_path: Path, stop: str
) -> None:
    data = write_manifest_dataset(tmp_path / "data")
    output = tmp_path / "cmp"
    command = grid(output, data)
    process = subprocess.Popen(
        command,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # A shell's background job (`pytest ... &`) inherits SIGINT ignored, and Python then
        # never turns it into KeyboardInterrupt: the grid starts as a foreground job would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    runs = [output / "runs" / f"manifest_B0-C2_{name}_s0" for name in ("finetune", "lwf")]
    try:
        # Both runs are training (each has written a checkpoint) when the grid is stopped.
        wait_until(lambda: all((r / "checkpoints" / "latest").is_file() for r in runs), "runs")
        workers = descendants(process.pid)
        assert len(workers) >= 2, workers
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM if stop == "sigterm" else signal.SIGKILL)
        _, err = process.communicate(timeout=_TIMEOUT_S)
        # No worker outlives the grid, whatever stopped it.
        wait_until(lambda: not any(alive(pid) for pid in workers), "the workers to end")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if stop == "parent-killed":
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, err
        assert "interrupted: " in err and "the same command resumes" in err, err
        assert "Traceback" not in err, err
    # metrics.json is written after every session: none may say its run is finished.
    assert not any(run_finished(run) for run in runs), "finished before the stop"

    # The same command resumes both runs from their checkpoints and writes the report.
    result = subprocess.run(
        command, env=environment(), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert len(metrics["sessions"]) == 2
        assert "resumed" in (run / "train.log").read_text()
    assert (output / "report.md").is_file()
