"""The names of a run folder's layout (see :mod:`mlcil.rundir`, the folder's one owner) and
the small readers every part of the owner shares. Only :mod:`mlcil.rundir` and its parts
(:mod:`mlcil.run_overwrite`) spell these names out; everything else asks a ``RunDir``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlcil.errors import ConfigError
from mlcil.fileio import open_own_file

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
POINTER_BYTES = 256  # far more than any checkpoint folder name


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


def mid_session_name(session: int, epoch: int, step: int) -> str:
    """The folder name of a checkpoint written inside session ``session`` (``--resume`` continues
    from it)."""
    return f"{checkpoint_name(session)}_epoch_{epoch:03d}_step_{step:06d}"


def is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def read_small(path: Path, limit: int = 1 << 16) -> bytes | None:
    """A plain file's bytes (at most ``limit``), or None for a link, a missing file or anything
    else (opened with ``O_NOFOLLOW``: a planted link is never read through)."""
    try:
        with os.fdopen(open_own_file(path, os.O_RDONLY), "rb") as handle:
            return handle.read(limit)
    except OSError:
        return None


def linked(path: Path, what: str) -> ConfigError:
    """The error for a symbolic link where the run's layout has a file or folder of its own."""
    return ConfigError(
        f"{path} is a symbolic link: the {what} of a run is mlcil's own and is never followed "
        "(it could lead into another run or any file); delete the link"
    )
