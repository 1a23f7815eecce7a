"""``--overwrite`` of a run folder, survived by a kill at any point (a part of
:class:`mlcil.rundir.RunDir`).

An earlier run is not deleted when a new one starts in its folder: its files are moved into
``.replaced/`` (renames on one file system), and deleted only once the new run's first
checkpoint exists; when the new run fails before that, the earlier run is put back.
``.replaced/phase.json`` is written before the first rename and before each later stage
(``setting-aside``, ``aside``, ``discarding``, ``restoring``) with the names set aside, and
:meth:`ReplaceableRun.recover` (run under the folder's lock by the next ``train`` or
``--resume``) reads it and finishes the stage: the earlier run comes back whole, or, once the new
run has written a checkpoint, the new run stays whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlcil.errors import ConfigError, WeightsError
from mlcil.fileio import parse_json, write_text_atomic
from mlcil.run_layout import ASIDE, OWNED, PHASE, read_small

logger = logging.getLogger("mlcil.rundir")  # what a user reads as the run folder's messages

# Called with a short description before every rename, deletion and phase record of
# --overwrite's set-aside, discard and restore: tests stop the process there (SIGKILL) to check
# that recover() finishes each interrupted stage.
STEP_HOOK: Callable[[str], None] | None = None


class ReplaceableRun:
    """The ``--overwrite`` part of :class:`mlcil.rundir.RunDir` (set aside, discard, restore,
    recover); the folder's layout, marker and checkpoints are the other part's."""

    path: Path

    def latest(self, session_end: bool = False) -> Path | None:  # pragma: no cover - RunDir's
        raise NotImplementedError

    def found_run_files(self) -> list[str]:  # pragma: no cover - RunDir's
        raise NotImplementedError

    def marker_problem(self) -> str | None:  # pragma: no cover - RunDir's
        raise NotImplementedError

    def check_own_files(self) -> None:  # pragma: no cover - RunDir's
        raise NotImplementedError

    @property
    def aside(self) -> Path:
        return self.path / ASIDE

    def check_overwritable(self) -> None:
        """Refuse ``--overwrite`` of a folder with run-like files that is not an mlcil run."""
        self.check_own_files()
        found = self.found_run_files()
        problem = self.marker_problem() if found else None
        if problem is not None:
            raise ConfigError(
                f"--overwrite: {self.path} is not an mlcil run ({problem}) but holds "
                f"{', '.join(found)}: refusing to delete them; choose another --run-dir"
            )

    def set_aside(self) -> bool:
        """Move the current run's files into ``.replaced/`` (same file system: renames only),
        recording the phase first (see the module docstring).

        Returns:
            Whether anything was moved.
        """
        present = [name for name in OWNED if os.path.lexists(self.path / name)]
        if not present:
            return False
        if os.path.lexists(self.aside):
            raise ConfigError(f"{self.aside} exists already: a run set aside earlier is in it")
        _step("create .replaced")
        self.aside.mkdir()
        self._record_phase("setting-aside", present)
        for name in present:
            _move(self.path / name, self.aside / name)
        self._record_phase("aside", present)
        logger.info("the earlier run in %s is set aside until the new one is saved", self.path)
        return True

    def discard_aside(self) -> None:
        """Delete the set-aside run (the new run has written its first checkpoint)."""
        if not os.path.lexists(self.aside):
            return
        phase = self._phase()
        if phase is not None and phase[0] in ("setting-aside", "restoring"):
            raise ConfigError(
                f"{self.aside}: the earlier run is being {phase[0].split('-')[0]}; it is not "
                "deleted before the new run is saved"
            )
        names = phase[1] if phase is not None else []
        self._record_phase("discarding", names)
        for entry in sorted(self.aside.iterdir()):
            if entry.name != PHASE:
                _remove(entry)
        self._finish_aside()
        logger.info("the earlier run in %s is deleted (replaced)", self.path)

    def restore_aside(self) -> None:
        """Delete what the new run wrote and put the set-aside run back as it was.

        Each step can be repeated after a kill: the new run's files whose names the earlier run
        did not use go first, then each name still set aside replaces the new run's file of
        that name; names already back are left alone."""
        if not os.path.lexists(self.aside):
            return
        phase = self._phase()
        if phase is not None and phase[0] == "discarding":  # the new run is saved: keep it
            self.discard_aside()
            return
        names = phase[1] if phase is not None else self._legacy_names()
        self._record_phase("restoring", names)
        for name in OWNED:
            if name not in names and os.path.lexists(self.path / name):
                _remove(self.path / name)
        for name in names:
            if os.path.lexists(self.aside / name):
                if os.path.lexists(self.path / name):
                    _remove(self.path / name)
                _move(self.aside / name, self.path / name)
        self._finish_aside()
        logger.warning("the new run failed before its first checkpoint: %s is as it was", self.path)

    def recover(self) -> None:
        """Finish an ``--overwrite`` that a killed process left half done, by the phase it
        recorded: a set-aside or a restore is undone or finished (the earlier run comes back),
        a deletion is finished; between them, the new run stays if it wrote a checkpoint."""
        if not os.path.lexists(self.aside):
            return
        if self.aside.is_symlink() or not self.aside.is_dir():
            raise ConfigError(
                f"{self.aside} is not the folder --overwrite sets a run aside in; move it away"
            )
        phase = self._phase()
        if phase is None and not any(self.aside.iterdir()):
            self.aside.rmdir()  # created and killed at once, or emptied and killed at once
            return
        stage = phase[0] if phase is not None else "aside"
        if stage == "discarding" or (stage == "aside" and self._new_run_saved()):
            self.discard_aside()
        else:
            self.restore_aside()

    def _new_run_saved(self) -> bool:
        try:
            return self.latest() is not None
        except WeightsError:
            return False

    def _record_phase(self, phase: str, names: list[str]) -> None:
        _step(f"record phase {phase}")
        write_text_atomic(self.aside / PHASE, json.dumps({"phase": phase, "names": names}) + "\n")

    def _phase(self) -> tuple[str, list[str]] | None:
        """The phase recorded in ``.replaced/phase.json``, or None when there is none."""
        data = read_small(self.aside / PHASE)
        if data is None:
            return None
        try:
            content: Any = parse_json(data.decode("utf-8"))
            phase, names = content["phase"], [str(name) for name in content["names"]]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{self.aside / PHASE}: not a phase record: {error}") from None
        return str(phase), [name for name in names if name in OWNED]

    def _legacy_names(self) -> list[str]:
        """The names set aside by an mlcil that recorded no phase: whatever is in the folder."""
        return [name for name in OWNED if os.path.lexists(self.aside / name)]

    def _finish_aside(self) -> None:
        _step("remove phase record")
        with contextlib.suppress(FileNotFoundError):
            (self.aside / PHASE).unlink()
        _step("remove .replaced")
        self.aside.rmdir()


def _step(what: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(what)


def _move(source: Path, target: Path) -> None:
    _step(f"rename {source.parent.name}/{source.name} -> {target.parent.name}/{target.name}")
    os.replace(source, target)


def _remove(path: Path) -> None:
    _step(f"delete {path.parent.name}/{path.name}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
