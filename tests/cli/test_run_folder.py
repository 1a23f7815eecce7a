"""The run folder through the CLI: one trainer at a time, ``--overwrite`` that replaces a run only
once the new one is saved, the checkpoint that ``eval``, ``predict`` and ``mlcil.load`` share, and
a full disk that names its file and costs nothing."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlcil
from mlcil.cli import main
from mlcil.engine.observers import Observer
from mlcil.errors import ConfigError
from mlcil.experiment import load_config
from mlcil.rundir import RunDir
from spawn import hold_lock
from tiny import REPO, TINY_ICA, tiny_overrides, trainer_of

TINY = [
    *tiny_overrides(train__batch_size="64", train__tensorboard="false", memory__per_class="2"),
    *TINY_ICA,
    "protocol=B0-C5",
]
CONFIG = str(REPO / "configs" / "digits_b0_c2.yaml")


def train(run: Path, *extra: str) -> int:
    return main(["-q", "train", "--config", CONFIG, "--run-dir", str(run), *TINY, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("folder") / "run"
    assert train(run) == 0
    return run


def copy_of(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_a_second_trainer_is_refused_naming_the_holder(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(finished, tmp_path)
    before = (run / "metrics.json").read_bytes()
    holder = hold_lock(run)
    try:
        for argv in (
            ["train", "--resume", str(run), "--max-sessions", "1"],
            ["train", "--config", CONFIG, "--run-dir", str(run), *TINY, "--overwrite"],
        ):
            capsys.readouterr()
            assert main(["-q", *argv]) == 2
            assert f"in use by another mlcil process (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert (run / "metrics.json").read_bytes() == before
    # The holder died with its lock (a crash): the stale lock file does not block a resume.
    assert main(["-q", "train", "--resume", str(run)]) == 0


def test_overwrite_replaces_the_run_once_the_new_one_is_saved(
    finished: Path, tmp_path: Path
) -> None:
    run = copy_of(finished, tmp_path)
    (run / "notes.txt").write_text("mine")  # not a run file: left alone
    assert train(run, "seed=1", "--overwrite") == 0
    assert not (run / ".replaced").exists()
    assert (run / ".mlcil-run").is_file() and (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "metrics.json").read_text())["seed"] == 1
    assert "seed: 1" in (run / "config.yaml").read_text()


def test_overwrite_killed_before_the_first_checkpoint_gives_the_run_back(
    finished: Path, tmp_path: Path
) -> None:
    run = copy_of(finished, tmp_path)
    metrics = (run / "metrics.json").read_bytes()
    # As if a process were killed after setting the run aside and starting the new one.
    folder = RunDir(run)
    folder.set_aside()
    folder.mark()
    (run / "config.yaml").write_text("seed: 9\n")
    assert main(["-q", "train", "--resume", str(run)]) == 0  # the earlier run, finished
    assert (run / "metrics.json").read_bytes() == metrics and not (run / ".replaced").exists()


def write_scene(path: Path) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_predict_load_and_eval_use_the_last_finished_session(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(finished, tmp_path)
    checkpoints = run / "checkpoints"
    last = sorted(p.name for p in checkpoints.glob("session_??"))[-1]
    reference = mlcil.load(run)
    assert reference.checkpoint == last
    scene = tmp_path / "scene.png"
    write_scene(scene)
    expected = reference.predict([scene])[0].scores
    # A half-trained session (as left by SIGTERM): damaged weights that must not be used.
    middle = checkpoints / f"session_{int(last[-2:]) + 1:02d}_epoch_001_step_000003"
    shutil.copytree(checkpoints / last, middle)
    (middle / "model.safetensors").write_bytes(b"half-trained")
    (checkpoints / "latest").write_text(middle.name + "\n")
    model = mlcil.load(run)
    assert model.checkpoint == last and model.predict([scene])[0].scores == expected
    assert main(["-q", "eval", "--run", str(run)]) == 0
    assert "reproduced" in capsys.readouterr().out
    assert main(["-q", "predict", "--run", str(run), str(scene)]) == 0
    assert f"checkpoints/{last}" in capsys.readouterr().err


def _file_size_limit(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_names_the_file_and_the_run_resumes_afterwards(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(run, "--max-sessions", "1") == 0
    checkpoint = run / "checkpoints" / "session_00"
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    limit = (checkpoint / "model.safetensors").stat().st_size // 2  # the next one cannot fit
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mlcil.cli", "-q", "train", "--resume", str(run)]
    result = subprocess.run(
        command,
        preexec_fn=lambda: _file_size_limit(limit),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "session_01" in error[0] and "model.safetensors" in error[0], error[0]
    assert "File too large" in error[0] or "too large" in error[0].lower(), error[0]
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert RunDir(run).latest() == checkpoint
    assert main(["-q", "train", "--resume", str(run)]) == 0
    assert (run / "metrics.json").is_file()


class LockProbe(Observer):
    """Records, when a session ends, whether another process could take the run's lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.free: list[bool] = []

    def session_finished(self, result: dict) -> None:
        other = RunDir(self.folder)
        try:
            other.acquire_lock()
        except ConfigError:
            self.free.append(False)
        else:
            other.release_lock()
            self.free.append(True)


def test_a_trainer_holds_the_lock_while_it_runs_and_keeps_its_callers(
    coco_fixture: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = coco_fixture
    overrides = [*tiny_overrides(memory__per_class="2"), *TINY_ICA, f"root={root}"]
    config = load_config(REPO / "configs" / "coco_b40_c10.yaml", [*overrides, "protocol=B40-C20"])
    alone = tmp_path / "alone"
    probe = LockProbe(alone)
    assert trainer_of(config, alone, observers=[probe]).run() is not None
    assert probe.free == [False, False, False]
    RunDir(alone).acquire_lock()  # released when the run ended
    held = RunDir(tmp_path / "held")
    held.acquire_lock()
    assert trainer_of(config, held).run() is not None
    assert held.holds_lock  # the caller's lock outlives the run it wraps


KILL_AT_RENAME = """
import os, signal, sys
import mlcil.run_overwrite
from mlcil.cli import main

renames = [0]


def kill_at(what):
    if what.startswith("rename"):
        renames[0] += 1
        if renames[0] == int(os.environ["KILL_AT_RENAME"]):
            os.kill(os.getpid(), signal.SIGKILL)


mlcil.run_overwrite.STEP_HOOK = kill_at
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("new_run", "rename"),
    [
        # Killed at the 4th of the 7 renames that set the finished run aside.
        (["seed=1"], 4),
        # The new run's loss is NaN at once: killed at the 3rd rename putting the old run back.
        (["train.lr=1e30"], 7 + 3),
    ],
    ids=["set-aside", "restore"],
)
def test_an_overwrite_killed_at_a_rename_then_resume_finds_the_earlier_run_whole(
    finished: Path, tmp_path: Path, new_run: list[str], rename: int
) -> None:
    run = copy_of(finished, tmp_path)
    metrics = (run / "metrics.json").read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_RENAME": str(rename)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    argv = ["-q", "train", "--config", CONFIG, "--run-dir", str(run), *TINY, *new_run]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_RENAME, *argv, "--overwrite"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / ".replaced" / "phase.json").is_file()  # killed half-way
    assert main(["-q", "train", "--resume", str(run)]) == 0
    assert (run / "metrics.json").read_bytes() == metrics and not (run / ".replaced").exists()
    assert "seed: 0" in (run / "config.yaml").read_text() and RunDir(run).is_run()
