"""The run folder's owner: confinement of names, the ``latest`` pointer kept inside the folder,
the exclusive lock, and ``--overwrite``'s set-aside that is deleted or put back."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mlcil.errors import ConfigError, WeightsError
from mlcil.rundir import RunDir, is_folder_name
from spawn import hold_lock


def tree_hash(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fake_run(folder: Path, sessions: int = 2) -> RunDir:
    """A run folder with the files mlcil writes and ``sessions`` finished checkpoints."""
    run = RunDir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run.mark()
    run.config_file.write_text("seed: 0\n")
    run.metrics_file.write_text("{}")
    for index in range(sessions):
        checkpoint = run.checkpoints / f"session_{index:02d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.json").write_text(json.dumps({"format": "mlcil-checkpoint"}))
    (run.checkpoints / "latest").write_text(f"session_{sessions - 1:02d}\n")
    return run


@pytest.mark.parametrize(
    ("name", "ok"),
    [("krt_s0", True), ("..", False), ("../escaped", False), ("/etc", False), ("a\\b", False),
     (" pad", False), ("", False), (".", False), ("tab\there", False)],
)  # fmt: skip
def test_run_names_are_one_folder_name(name: str, ok: bool, tmp_path: Path) -> None:
    assert is_folder_name(name) is ok
    if ok:
        assert RunDir.inside(tmp_path, name).path == tmp_path / name
    else:
        with pytest.raises(ConfigError, match="one folder name"):
            RunDir.inside(tmp_path, name)


def test_a_run_folder_that_is_a_link_out_of_output_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside output_dir"):
        RunDir.inside(tmp_path / "runs", "r")


def test_config_refuses_names_and_labels_that_leave_output_dir() -> None:
    from mlcil.experiment import load_config

    for override in ("name=../../escaped", "name=/etc", "label=a/b"):
        with pytest.raises(ConfigError, match="one folder name"):
            load_config(None, [override])


def test_latest_is_followed_only_inside_the_checkpoints_folder(tmp_path: Path) -> None:
    other = fake_run(tmp_path / "other", sessions=3)
    run = fake_run(tmp_path / "run", sessions=2)
    assert run.latest() == run.checkpoints / "session_01"
    pointer = run.checkpoints / "latest"
    for escape in ("../../other/checkpoints/session_02", "/abs/session_01", "..", "session_x"):
        pointer.write_text(escape + "\n")
        with pytest.raises(WeightsError, match="not a checkpoint folder of this run"):
            run.latest()
    # A link named like a checkpoint but leading to another run is refused too.
    (run.checkpoints / "session_05").symlink_to(other.checkpoints / "session_02")
    pointer.write_text("session_05\n")
    with pytest.raises(WeightsError, match="session_05"):
        run.latest()
    # The last finished session never follows links or the pointer.
    assert run.latest(session_end=True) == run.checkpoints / "session_01"


def test_the_last_finished_session_ignores_mid_session_checkpoints(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", sessions=2)
    middle = run.checkpoints / "session_02_epoch_001_step_000010"
    middle.mkdir()
    (middle / "state.json").write_text("{}")
    (run.checkpoints / "latest").write_text(middle.name + "\n")
    assert run.latest() == middle
    assert run.latest(session_end=True) == run.checkpoints / "session_01"


def test_a_second_holder_of_the_lock_is_refused_naming_the_first(tmp_path: Path) -> None:
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    with (
        first.locked(),
        pytest.raises(ConfigError, match=f"in use by another mlcil process \\(pid {os.getpid()}"),
    ):
        second.acquire_lock()
    with second.locked():  # released with the first holder
        pass


def test_a_lock_held_by_another_process_is_refused_and_a_dead_holder_never_blocks(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    process = hold_lock(folder)
    try:
        with pytest.raises(ConfigError, match=f"pid {process.pid}"):
            RunDir(folder).acquire_lock()
    finally:
        process.kill()  # dies holding the lock: the kernel drops it
        process.wait()
    assert (folder / ".mlcil-run.lock").read_text().strip() == str(process.pid)  # stale file
    run = RunDir(folder)
    run.acquire_lock()
    assert (folder / ".mlcil-run.lock").read_text().strip() == str(os.getpid())
    run.release_lock()


def test_overwrite_refuses_a_folder_that_is_not_an_mlcil_run(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "notes.txt").write_text("my own")
    (mine / "metrics.csv").write_text("a,b\n")
    before = tree_hash(mine)
    with pytest.raises(ConfigError, match="not an mlcil run"):
        RunDir(mine).check_overwritable()
    assert tree_hash(mine) == before
    RunDir(tmp_path / "empty").check_overwritable()  # nothing to lose: fine
    fake_run(tmp_path / "run")
    RunDir(tmp_path / "run").check_overwritable()


def test_a_run_made_before_the_marker_is_recognised_by_its_checkpoints(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "old")
    run.marker.unlink()
    assert run.is_run()
    (run.checkpoints / "session_00" / "state.json").write_text("{}")
    (run.checkpoints / "session_01" / "state.json").write_text("{}")
    assert not run.is_run()


def test_set_aside_then_restore_gives_the_folder_back_byte_identical(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    (run.path / "user_notes.txt").write_text("not mlcil's: never moved")
    before = tree_hash(run.path)
    assert run.set_aside()
    assert not run.config_file.exists() and (run.path / "user_notes.txt").exists()
    # The new run writes its own files, then fails before its first checkpoint.
    run.mark()
    run.config_file.write_text("seed: 1\n")
    (run.checkpoints).mkdir()
    run.restore_aside()
    assert tree_hash(run.path) == before


def test_the_set_aside_run_is_deleted_once_discarded(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    run.set_aside()
    run.config_file.write_text("seed: 1\n")
    run.discard_aside()
    assert not run.aside.exists() and run.config_file.read_text() == "seed: 1\n"
    run.restore_aside()  # nothing set aside any more: a no-op
    assert run.config_file.read_text() == "seed: 1\n"


def test_recover_finishes_an_overwrite_killed_half_way(tmp_path: Path) -> None:
    # Killed before the new run's first checkpoint: the earlier run comes back.
    run = fake_run(tmp_path / "a")
    before = tree_hash(run.path)
    run.set_aside()
    run.config_file.write_text("seed: 1\n")
    run.recover()
    assert tree_hash(run.path) == before
    # Killed after it: the new run stays and the earlier one is deleted.
    run = fake_run(tmp_path / "b", sessions=1)
    run.set_aside()
    fake_run(run.path, sessions=1)
    (run.checkpoints / "session_00" / "state.json").write_text('{"new": 1}')
    run.recover()
    assert not run.aside.exists()
    assert (run.checkpoints / "session_00" / "state.json").read_text() == '{"new": 1}'
