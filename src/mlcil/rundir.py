"""The run folder and its one owner, :class:`RunDir`.

Everything mlcil writes for a run lives in one folder, laid out here and nowhere else::

    .mlcil-run              marker: this folder is an mlcil run (JSON naming the config.yaml it
                            wrote by its SHA-256; --overwrite needs it)
    .mlcil-run.lock         exclusive lock while a process trains into the folder (pid inside)
    config.yaml             the resolved config
    metrics.json / .csv     results, written when the last session is done
    map_per_session.png     the mAP curve
    train.log               the training log
    tensorboard/            TensorBoard events
    tracking/               the csv, wandb and mlflow trackers (``train.trackers``)
    added_sessions.json     sessions added after training (``--add-session``)
    checkpoints/            one folder per finished session, mid-session folders, ``latest``
    .replaced/              an earlier run set aside by ``--overwrite`` until the new run's first
                            checkpoint exists (then deleted; put back if the new run fails), with
                            ``phase.json``: how far the set-aside, deletion or restore got

Every file and folder of that list is mlcil's own: a symbolic link at any of those names (or at
a session folder or ``latest`` inside ``checkpoints/``) is refused by name, never followed, and
the lock and the log are opened with ``O_NOFOLLOW``, so a planted link cannot make a run write,
read or score anything outside its folder. ``latest`` names a checkpoint folder *inside*
``checkpoints/``: a pointer holding a path or ``..`` is refused too.

The lock is an advisory ``flock`` held by the training process: a second ``mlcil train`` into
the same folder is refused naming the holder's pid, and a lock left by a crashed process (the
kernel drops ``flock`` locks with their process) never blocks ``--resume``.

The marker alone does not make a folder a run: it must be the JSON mlcil wrote and name the
SHA-256 of the folder's ``config.yaml`` (a marker of version 1, written before the hash was
recorded, must hold all its fields next to a ``config.yaml``). Only then may ``--overwrite``
move the folder's files.

``--overwrite`` survives a kill at any point: ``.replaced/phase.json`` is written before the
first rename and before each later stage (``setting-aside``, ``aside``, ``discarding``,
``restoring``) with the names set aside, and :meth:`RunDir.recover` (run under the lock by the
next ``train`` or ``--resume``) reads it and finishes the stage: the earlier run comes back
whole, or, once the new run has written a checkpoint, the new run stays whole.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from mlcil.errors import ConfigError, WeightsError, clip, shown
from mlcil.fileio import NotOwnFileError, open_own_file, parse_json, write_text_atomic
from mlcil.version import __version__

logger = logging.getLogger(__name__)

MARKER = ".mlcil-run"
LOCK = ".mlcil-run.lock"
ASIDE = ".replaced"
PHASE = "phase.json"  # inside ASIDE
CONFIG = "config.yaml"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
PLOT = "map_per_session.png"
LOG = "train.log"
TENSORBOARD = "tensorboard"
TRACKING = "tracking"  # the csv, wandb and mlflow trackers' files
ADDED_SESSIONS = "added_sessions.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"

MARKER_FORMAT = "mlcil-run"
MARKER_VERSION = 2

# Everything a run writes (the lock stays: it belongs to whoever holds it now).
OWNED = (MARKER, CONFIG, METRICS_JSON, METRICS_CSV, PLOT, LOG, TENSORBOARD, TRACKING,
         ADDED_SESSIONS, CHECKPOINTS)  # fmt: skip
# What makes a folder hold a run (train.log alone does not: a run that failed before its first
# session leaves only its log).
RUN_FILES = (CONFIG, METRICS_JSON, METRICS_CSV, PLOT, CHECKPOINTS, ADDED_SESSIONS)
# What a run that has not written its first checkpoint holds (besides its marker and log).
BEFORE_FIRST_CHECKPOINT = frozenset({CONFIG, TENSORBOARD, TRACKING, CHECKPOINTS})

SESSION_END = re.compile(r"session_([0-9]+)")
MID_SESSION = re.compile(r"session_([0-9]+)_epoch_[0-9]+_step_[0-9]+")
_POINTER_BYTES = 256  # far more than any checkpoint folder name

# Called with a short description before every rename, deletion and phase record of
# --overwrite's set-aside, discard and restore: tests stop the process there (SIGKILL) to check
# that recover() finishes each interrupted stage.
STEP_HOOK: Callable[[str], None] | None = None


def checkpoint_name(session: int) -> str:
    """The folder name of the checkpoint written when session ``session`` is finished."""
    return f"session_{session:02d}"


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint folder name mlcil writes (``session_03``, or a
    mid-session ``session_03_epoch_002_step_000010``)."""
    return bool(SESSION_END.fullmatch(name) or MID_SESSION.fullmatch(name))


def is_folder_name(name: str) -> bool:
    """Whether ``name`` is one plain folder name (no separator, not ``.``/``..``, printable)."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
        and name == name.strip()
    )


def _linked(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{path} is a symbolic link: the {what} of a run is mlcil's own and is never followed "
        "(it could lead into another run or any file); delete the link"
    )


class RunDir:
    """One run folder: its layout, its lock, its checkpoint pointer and ``--overwrite``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_handle: IO[str] | None = None

    @classmethod
    def inside(cls, output_dir: str | Path, name: str) -> RunDir:
        """``<output_dir>/<name>``, refused unless ``name`` is one folder name that stays inside
        ``output_dir`` (``../x``, ``/etc`` and links out are errors)."""
        if not is_folder_name(name):
            raise ConfigError(
                f"run name {shown(name)} must be one folder name inside output_dir "
                f"{output_dir!s} (no '/', '\\', '..' or surrounding spaces)"
            )
        root = Path(output_dir)
        folder = root / name
        if folder.is_symlink() or (
            root.exists() and folder.exists() and folder.resolve().parent != root.resolve()
        ):
            raise ConfigError(f"run folder {folder} leads outside output_dir {root}")
        return cls(folder)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- layout --------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_JSON

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def tracking(self) -> Path:
        return self.path / TRACKING

    @property
    def added_sessions_file(self) -> Path:
        return self.path / ADDED_SESSIONS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>`` for a checkpoint folder name written by mlcil."""
        if not is_checkpoint_name(name):
            raise WeightsError(f"{self.checkpoints}: {shown(name)} is not a checkpoint folder name")
        return self.checkpoints / name

    def found_run_files(self) -> list[str]:
        """The names of ``RUN_FILES`` present in the folder."""
        return [name for name in RUN_FILES if os.path.lexists(self.path / name)]

    def check_own_files(self) -> None:
        """Refuse a folder where a name of the run's layout is a symbolic link.

        Raises:
            ConfigError: naming the first link found (``checkpoints``, ``train.log``...).
        """
        for name in (*OWNED, ASIDE):
            if (self.path / name).is_symlink():
                raise _linked(self.path / name, f"{name} entry")
        self.checkpoints_root()

    # --- checkpoints ---------------------------------------------------------------------

    def checkpoints_root(self) -> Path:
        """``checkpoints/``, refused when it is a link (another run's, or anywhere)."""
        if self.checkpoints.is_symlink():
            raise _linked(self.checkpoints, "checkpoints folder")
        return self.checkpoints

    def own_checkpoint(self, folder: Path) -> Path:
        """``folder`` (inside ``checkpoints/``), refused when it is a link."""
        if folder.is_symlink():
            raise _linked(folder, "checkpoint folder")
        return folder

    def latest(self, session_end: bool = False) -> Path | None:
        """The newest complete checkpoint folder, or None when there is none (without a
        ``latest`` pointer: the last finished session's).

        Args:
            session_end: only checkpoints written when a session was finished count (what
                ``eval``, ``predict`` and ``mlcil.load`` use: never half-trained weights).

        Raises:
            WeightsError: when ``checkpoints/latest`` names anything but a checkpoint folder of
                this run (a path, ``..``), or ``checkpoints/``, ``latest`` or a session folder
                is a symbolic link.
        """
        if session_end:
            return self._last_session_end()
        pointer = self._checkpoints_for_reading() / LATEST
        if pointer.is_symlink():
            raise WeightsError(str(_linked(pointer, "checkpoint pointer")))
        if not os.path.lexists(pointer):  # killed between a checkpoint and its pointer
            return self._last_session_end()
        if not pointer.is_file():
            return None
        name = self._read_pointer(pointer)
        if not is_checkpoint_name(name):
            raise WeightsError(
                f"{pointer} names {shown(name)}, which is not a checkpoint folder of this run; "
                "it must hold the name of a folder in checkpoints/ (e.g. session_03)"
            )
        folder = self.checkpoints / name
        if folder.is_symlink():
            raise WeightsError(str(_linked(folder, "checkpoint folder")))
        return folder if _is_plain_file(folder / "state.json") else None

    def _checkpoints_for_reading(self) -> Path:
        try:
            return self.checkpoints_root()
        except ConfigError as error:
            raise WeightsError(str(error)) from None

    @staticmethod
    def _read_pointer(pointer: Path) -> str:
        try:
            descriptor = open_own_file(pointer, os.O_RDONLY)
            with os.fdopen(descriptor, "rb") as handle:
                data = handle.read(_POINTER_BYTES + 1)
            name = data.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise WeightsError(f"cannot read the checkpoint pointer {pointer}: {error}") from error
        if len(data) > _POINTER_BYTES:
            name = name[:40]  # not a folder name mlcil writes: the check below names it
        return name

    def _last_session_end(self) -> Path | None:
        root = self._checkpoints_for_reading()
        ends = []
        for folder in root.iterdir() if root.is_dir() else []:
            match = SESSION_END.fullmatch(folder.name)
            if not match:
                continue
            if folder.is_symlink():
                raise WeightsError(str(_linked(folder, "checkpoint folder")))
            if _is_plain_file(folder / "state.json"):
                ends.append((int(match.group(1)), folder))
        return max(ends)[1] if ends else None

    def has_checkpoint(self) -> bool:
        """Whether any checkpoint folder (complete or being written) is in ``checkpoints/``."""
        root = self.checkpoints
        if root.is_symlink():
            return True  # not the run's own: never taken for an empty one
        if not root.is_dir():
            return False
        return any(
            is_checkpoint_name(entry.name) or entry.name == LATEST for entry in root.iterdir()
        )

    def learned_nothing(self) -> bool:
        """Whether the folder holds an mlcil run that stopped before its first checkpoint (a
        failure or a kill in its first session): its config, perhaps its logs, nothing learned.
        Such a run starts again from its first session, with ``--resume`` or the same command."""
        found = set(self.found_run_files())
        return (
            CONFIG in found
            and found <= BEFORE_FIRST_CHECKPOINT
            and not self.has_checkpoint()
            and self.is_run()
        )

    def check_fresh_start(self, resuming: bool = False) -> None:
        """Refuse to start a run from its first session in a folder that holds a run, unless
        ``resuming`` a run that stopped before its first checkpoint (it starts again).

        Raises:
            ConfigError: naming what the folder holds and what to do instead.
        """
        if resuming:
            if not self.learned_nothing():
                raise ConfigError(f"--resume: no checkpoint found in {self.checkpoints}")
            logger.info("%s has no checkpoint yet: starting from its first session", self.path)
            return
        found = self.found_run_files()
        if found:
            raise ConfigError(
                f"{self.path} already holds a run ({', '.join(found)}): resume it with "
                "--resume, replace it with --overwrite, or choose another --run-dir"
            )

    def describe_kept(self) -> str:
        """What of the run is on disk after a failure, and what continues it (for messages)."""
        try:
            folder = self.latest()
        except WeightsError:
            folder = None
        if folder is not None:
            return (
                f"its newest checkpoint {folder} is kept: `mlcil train --resume {self.path}` "
                "continues from it"
            )
        if self.config_file.is_file() and self.is_run():
            return (
                f"no checkpoint was written yet: `mlcil train --resume {self.path}` (or the same "
                "command) starts the run again from its first session"
            )
        return f"nothing of a run is in {self.path}"

    # --- ownership -----------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether the folder is an mlcil run: its marker is the JSON mlcil wrote and names
        the folder's ``config.yaml`` (see the module docstring)."""
        return self.marker_problem() is None

    def marker_problem(self) -> str | None:
        """Why the folder is not an mlcil run by its marker (None when it is one)."""
        marker = self._read_small(self.marker)
        if marker is None:
            return f"no {MARKER} marker"
        try:
            content = parse_json(marker.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            content = None
        if not isinstance(content, dict) or content.get("format") != MARKER_FORMAT:
            return f"its {MARKER} is not a marker mlcil wrote"
        if not _is_plain_file(self.config_file):
            return f"its {MARKER} marker has no {CONFIG} beside it"
        if content.get("version") == MARKER_VERSION:
            config = self._read_small(self.config_file, limit=1 << 24)
            digest = hashlib.sha256(config).hexdigest() if config is not None else None
            if content.get("config_sha256") != digest:
                return f"its {MARKER} marker does not name its {CONFIG}"
            return None
        legacy = {"version": int, "mlcil_version": str, "created": str}
        if content.get("version") == 1 and all(
            isinstance(content.get(key), kind) for key, kind in legacy.items()
        ):
            return None
        return f"its {MARKER} is not a marker mlcil wrote"

    @staticmethod
    def _read_small(path: Path, limit: int = 1 << 16) -> bytes | None:
        """A plain file's bytes (at most ``limit``), or None for a link, a missing file or
        anything else."""
        try:
            with os.fdopen(open_own_file(path, os.O_RDONLY), "rb") as handle:
                return handle.read(limit)
        except OSError:
            return None

    def write_config(self, config_text: str) -> None:
        """Write the run's ``config.yaml``, its marker first (naming the config by its hash:
        a process killed between the two leaves a marker that names no config, not a config
        without a marker)."""
        self.mark(config_text)
        write_text_atomic(self.config_file, config_text)

    def mark(self, config_text: str | None = None) -> None:
        """Write the marker that makes the folder an mlcil run, naming ``config_text`` (default
        the folder's ``config.yaml`` as it is now) by its SHA-256."""
        if config_text is None:
            data = self._read_small(self.config_file, limit=1 << 24) or b""
        else:
            data = config_text.encode("utf-8")
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        payload = {
            "format": MARKER_FORMAT,
            "version": MARKER_VERSION,
            "mlcil_version": __version__,
            "created": created,
            "config_sha256": hashlib.sha256(data).hexdigest(),
        }
        write_text_atomic(self.marker, json.dumps(payload) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's exclusive lock (creating the folder) for the ``with`` block.

        Raises:
            ConfigError: another live process holds the lock (its pid is named), or the lock
                file is a link or not a regular file.
        """
        self.acquire_lock()
        try:
            yield
        finally:
            self.release_lock()

    @property
    def holds_lock(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock_handle is not None

    def acquire_lock(self) -> None:
        """Take the folder's lock (see :meth:`locked`); a no-op when already held here."""
        if self._lock_handle is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = open_own_file(self.path / LOCK, os.O_RDWR | os.O_CREAT)
        except NotOwnFileError as error:
            raise ConfigError(error.strerror or str(error)) from None
        handle = os.fdopen(descriptor, "r+", encoding="utf-8", errors="replace")
        try:
            _flock(handle)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(32).strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"{self.path} is in use by another mlcil process (pid {clip(holder, 40)}); wait "
                "for it to finish or stop it, or choose another --run-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def release_lock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the file drops the flock
            self._lock_handle = None

    # --- --overwrite ---------------------------------------------------------------------

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
        data = self._read_small(self.aside / PHASE)
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


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


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


def _flock(handle: IO[str]) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory lock available
        logger.debug("no fcntl on this platform: the run folder is not locked")
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
