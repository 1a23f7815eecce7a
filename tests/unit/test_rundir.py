"""The run folder's owner: confinement of names, the ``latest`` pointer kept inside the folder,
the exclusive lock, and ``--overwrite``'s set-aside that is deleted or put back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import mlcil.run_overwrite
from mlcil.errors import ConfigError, WeightsError
from mlcil.rundir import RunDir, is_folder_name
from spawn import hold_lock


def tree_hash(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fake_run(folder: Path, sessions: int = 2, seed: int = 0) -> RunDir:
    """A run folder with the files mlcil writes and ``sessions`` finished checkpoints."""
    run = RunDir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run.write_config(f"seed: {seed}\n")
    run.metrics_file.write_text("{}")
    run.log_file.write_text(f"log of seed {seed}\n")
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
    # A link named like a checkpoint but leading to another run is refused by name, by the
    # pointer and by the search for the last finished session alike (never skipped: eval would
    # score an earlier session).
    (run.checkpoints / "session_05").symlink_to(other.checkpoints / "session_02")
    pointer.write_text("session_05\n")
    for session_end in (False, True):
        with pytest.raises(WeightsError, match="session_05 is a symbolic link"):
            run.latest(session_end=session_end)


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


def test_only_the_marker_mlcil_wrote_beside_its_config_makes_a_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    assert run.is_run() and run.marker_problem() is None
    marker = run.marker.read_bytes()
    # An empty marker, or one naming another config.yaml, is no run: --overwrite refuses it.
    run.marker.write_text("")
    assert "not a marker mlcil wrote" in (run.marker_problem() or "")
    run.marker.write_bytes(marker)
    run.config_file.write_text("seed: 5\n")
    assert "does not name its config.yaml" in (run.marker_problem() or "")
    with pytest.raises(ConfigError, match="not an mlcil run .*does not name its config.yaml"):
        run.check_overwritable()
    # Checkpoints alone (any state.json saying mlcil-checkpoint) make no run either.
    run.marker.unlink()
    assert (run.checkpoints / "session_00" / "state.json").is_file()
    assert run.marker_problem() == "no .mlcil-run marker"
    # A marker of version 1 (before the config's hash was recorded) with every field counts.
    legacy = {"format": "mlcil-run", "version": 1, "mlcil_version": "0.1", "created": "2025"}
    run.marker.write_text(json.dumps(legacy))
    assert run.is_run()
    run.marker.write_text(json.dumps({"format": "mlcil-run", "version": 1}))
    assert not run.is_run()
    # A marker that is a link is not read.
    (tmp_path / "elsewhere").write_bytes(marker)
    run.marker.unlink()
    run.marker.symlink_to(tmp_path / "elsewhere")
    assert not run.is_run()


def test_a_link_planted_at_the_lock_or_the_log_is_refused_and_never_written(
    tmp_path: Path,
) -> None:
    from mlcil.engine.observers import LogCallback
    from mlcil.fileio import NotOwnFileError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = fake_run(tmp_path / "run")
    (run.path / ".mlcil-run.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=r"\.mlcil-run\.lock is a symbolic link"):
        run.acquire_lock()
    (run.path / ".mlcil-run.lock").unlink()
    os.mkfifo(run.path / ".mlcil-run.lock")  # would block an open for reading and writing
    with pytest.raises(ConfigError, match="not a regular file"):
        run.acquire_lock()
    run.log_file.unlink()
    run.log_file.symlink_to(victim)
    with pytest.raises(NotOwnFileError, match="train.log is a symbolic link"):
        LogCallback(run.log_file)
    with pytest.raises(ConfigError, match="train.log is a symbolic link"):
        run.check_own_files()
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["checkpoints", "tensorboard", "metrics.json", ".replaced"])
def test_a_link_at_any_name_of_the_layout_is_refused_by_name(tmp_path: Path, name: str) -> None:
    other = fake_run(tmp_path / "other")
    run = fake_run(tmp_path / "run")
    target = run.path / name
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    target.symlink_to(other.path / name if name != ".replaced" else other.checkpoints)
    with pytest.raises(ConfigError, match=f"{name} is a symbolic link"):
        run.check_own_files()
    if name == "checkpoints":  # --resume would write into the other run; eval would read it
        with pytest.raises(WeightsError, match="checkpoints is a symbolic link"):
            run.latest()
        from mlcil.engine.checkpoint import save_checkpoint

        before = tree_hash(other.path)
        with pytest.raises(ConfigError, match="checkpoints is a symbolic link"):
            save_checkpoint(run, 2, torch.nn.Linear(1, 1), {}, {})
        assert tree_hash(other.path) == before


def test_a_linked_or_odd_pointer_is_refused_without_showing_what_it_reads(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    secret = tmp_path / "secret"
    secret.write_text("session_01 password=hunter2\n")
    pointer = run.checkpoints / "latest"
    pointer.unlink()
    pointer.symlink_to(secret)
    with pytest.raises(WeightsError, match="latest is a symbolic link") as caught:
        run.latest()
    assert "hunter2" not in str(caught.value)
    pointer.unlink()
    for content in (b"session_01\x00../../x\n", b"session_01" * 100_000, b"\xff\xfe"):
        pointer.write_bytes(content)
        with pytest.raises(WeightsError) as caught:
            run.latest()
        assert len(str(caught.value)) < 600, str(caught.value)[:200]


def test_set_aside_then_restore_gives_the_folder_back_byte_identical(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    (run.path / "user_notes.txt").write_text("not mlcil's: never moved")
    before = tree_hash(run.path)
    assert run.set_aside()
    assert not run.config_file.exists() and (run.path / "user_notes.txt").exists()
    # The new run writes its own files, then fails before its first checkpoint.
    run.write_config("seed: 1\n")
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


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: files by content hash (the marker by the config it names:
    its creation time differs between runs), folders by name."""

    def entry(path: Path) -> str:
        if not path.is_file():
            return "folder"
        if path.name == ".mlcil-run":
            return str(json.loads(path.read_text())["config_sha256"])
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return {
        str(p.relative_to(folder)): entry(p)
        for p in sorted(folder.rglob("*"))
        if p.name != ".mlcil-run.lock"
    }


def overwrite(run: RunDir, outcome: str) -> None:
    """What ``--overwrite`` does to a run folder: set the earlier run aside, write the new run's
    first files, then put the earlier run back (the new run failed) or, once the new run has a
    checkpoint, delete it."""
    run.set_aside()
    run.write_config("seed: 1\n")
    run.log_file.write_text("log of the new run\n")
    (run.path / "tensorboard").mkdir()
    (run.path / "tensorboard" / "events").write_text("new events")
    (run.checkpoints / ".session_00.staging").mkdir(parents=True)  # a checkpoint being written
    if outcome == "failed":
        run.restore_aside()
        return
    shutil.rmtree(run.checkpoints / ".session_00.staging")
    (run.checkpoints / "session_00").mkdir()
    (run.checkpoints / "session_00" / "state.json").write_text('{"new": 1}')
    (run.checkpoints / "latest").write_text("session_00\n")
    run.discard_aside()


def steps_of(outcome: str, folder: Path) -> list[str]:
    """The renames, deletions and phase records of an uninterrupted ``overwrite``."""
    steps: list[str] = []
    mlcil.run_overwrite.STEP_HOOK = steps.append
    try:
        overwrite(fake_run(folder), outcome)
    finally:
        mlcil.run_overwrite.STEP_HOOK = None
    return steps


def killed_at(run: RunDir, outcome: str, step: int) -> None:
    """Run ``overwrite`` in a forked child that SIGKILLs itself before its step ``step``."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        done = [0]

        def kill(what: str) -> None:
            if done[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            done[0] += 1

        mlcil.run_overwrite.STEP_HOOK = kill
        try:
            overwrite(run, outcome)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.parametrize("outcome", ["failed", "saved"])
def test_an_overwrite_killed_at_any_rename_leaves_the_old_run_or_the_new_one_whole(
    tmp_path: Path, outcome: str
) -> None:
    steps = steps_of(outcome, tmp_path / "dry")
    # Five entries set aside (marker, config, metrics, log, checkpoints), and put back.
    renames = [s for s in steps if s.startswith("rename")]
    assert len(renames) == (10 if outcome == "failed" else 5), steps
    old = tree(fake_run(tmp_path / "old").path)
    new = tree(tmp_path / "dry")  # the folder after the uninterrupted overwrite
    assert (new == old) is (outcome == "failed")
    results = []
    for step, what in enumerate(steps):
        run = fake_run(tmp_path / f"killed_{step}")
        killed_at(run, outcome, step)
        run.recover()  # what the next `mlcil train` or `--resume` does first, under the lock
        after = tree(run.path)
        assert after in (old, new), (what, sorted(set(after.items()) ^ set(old.items())))
        if outcome == "failed":
            assert after == old, what  # the new run never had a checkpoint
        results.append(after == new)
    if outcome == "saved":  # killed once the new run's checkpoint exists: the new run stays
        first_discard = next(i for i, s in enumerate(steps) if "discarding" in s)
        assert results == [i >= first_discard for i in range(len(steps))]


def test_recover_after_an_older_mlcil_s_set_aside_without_a_phase_record(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    before = tree(run.path)
    run.set_aside()
    (run.aside / "phase.json").unlink()  # as an mlcil before phase records left it
    run.write_config("seed: 1\n")
    run.recover()
    assert tree(run.path) == before
    empty = fake_run(tmp_path / "empty")
    empty.aside.mkdir()  # killed right after creating .replaced
    empty.recover()
    assert not empty.aside.exists()


def test_a_run_stopped_before_its_first_checkpoint_learned_nothing(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config("seed: 0\n")
    run.log_file.write_text("failed in session 0\n")
    (run.checkpoints / ".session_00.abc").mkdir(parents=True)  # a checkpoint never finished
    assert run.learned_nothing()
    assert "no checkpoint was written yet" in run.describe_kept()
    assert "--resume" in run.describe_kept()
    (run.checkpoints / "session_00").mkdir()
    assert not run.learned_nothing()
    shutil.rmtree(run.checkpoints / "session_00")
    run.marker.unlink()  # a config.yaml without mlcil's marker is somebody else's
    assert not run.learned_nothing()
    finished = fake_run(tmp_path / "finished")
    assert not finished.learned_nothing()
    assert "session_01 is kept" in finished.describe_kept()


def test_without_a_pointer_the_newest_finished_session_is_the_latest(tmp_path: Path) -> None:
    # A process killed between renaming a checkpoint into place and writing `latest`.
    run = fake_run(tmp_path / "run", sessions=2)
    (run.checkpoints / "latest").unlink()
    assert run.latest() == run.checkpoints / "session_01"
    (run.checkpoints / "latest").write_text("session_07\n")  # a pointer to nothing: no fallback
    assert run.latest() is None


def test_one_fresh_folder_check_for_every_way_a_run_starts(tmp_path: Path) -> None:
    empty = RunDir(tmp_path / "empty")
    assert empty.check_fresh() is False  # nothing there: a fresh start
    with pytest.raises(ConfigError, match="--resume: no checkpoint found"):
        empty.check_fresh(resuming=True)
    stopped = RunDir(tmp_path / "stopped")
    stopped.write_config("seed: 0\n")  # config and marker, no checkpoint: learned nothing
    seen: list[Path] = []
    assert stopped.check_fresh(same_settings=seen.append) is True  # starts again
    assert seen == [stopped.config_file]
    assert stopped.check_fresh(resuming=True) is True

    def differs(config_file: Path) -> None:
        raise ConfigError(f"{config_file}: other settings")

    with pytest.raises(ConfigError, match="other settings"):
        stopped.check_fresh(same_settings=differs)
    with pytest.raises(ConfigError, match="already holds a run \\(config.yaml\\)"):
        stopped.check_fresh()  # no settings check: a run is there, refused
    done = RunDir(tmp_path / "done")
    done.write_config("seed: 0\n")
    (done.checkpoints / "session_00").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        done.check_fresh(same_settings=seen.append)  # it learned something: never restarted
