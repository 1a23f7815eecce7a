"""Checks that run before any file is written, so that bad input never costs earlier work.

- ``check_resume_config``: ``--resume`` accepts only overrides that cannot change the results
  (where and how fast the run computes), else metrics.json would contradict config.yaml.
- argparse types that reject ``--max-sessions 0`` and ``--tolerance nan`` at parse time.
- Checks of the bounds of every size a user gives (``mlcil.limits``), before anything is
  allocated: a typo such as ``data.image_size=100000`` or ``--train 1000000000`` is an error
  naming the bound instead of an attempt to allocate hundreds of gigabytes.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlcil.errors import ConfigError, shown
from mlcil.limits import (
    MAX_BATCH_SIZE,
    MAX_IMAGE_SIZE,
    MAX_JOBS,
    MAX_MAP_TOLERANCE,
    MAX_SEED,
    MAX_SYNTHETIC_IMAGES,
)

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_IMAGE_SIZE",
    "MAX_JOBS",
    "MAX_MAP_TOLERANCE",
    "MAX_SEED",
    "MAX_SYNTHETIC_IMAGES",
    "RESUME_SAFE_KEYS",
    "bounded_int",
    "check_bounded",
    "check_resume_config",
    "finite_non_negative",
    "finite_positive",
    "map_tolerance",
    "positive_int",
    "result_changes",
    "unit_interval",
]

if TYPE_CHECKING:
    from mlcil.config import RunConfig

# Overrides that change where or how fast a run computes, never what it computes.
RESUME_SAFE_KEYS = frozenset(
    {
        "train.device",
        "train.progress",
        "train.tensorboard",
        "train.trackers",  # where the logs go, not what is learned
        "train.eval_batch_size",
        "data.num_workers",
        # Where the same images live: a moved dataset must not strand its runs (the exemplar
        # memory is checked against the images found there on restore).
        "data.root",
        # Caches give the same tensors and labels as the files they were made from.
        "data.image_cache",
        "data.image_cache_dir",
        "data.annotation_cache",
    }
)


def result_changes(saved: RunConfig, other: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, other value)`` of every setting in which ``other`` differs from
    ``saved`` and that could change a run's results (``RESUME_SAFE_KEYS`` apart), sorted."""
    from mlcil.config import flatten

    before, after = flatten(saved.to_dict()), flatten(other.to_dict())
    return [
        (key, before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and key not in RESUME_SAFE_KEYS
    ]


def check_resume_config(saved: RunConfig, resumed: RunConfig, where: str | Path) -> None:
    """Refuse ``--resume`` overrides that could change the run's results.

    The run's ``config.yaml`` (``saved``) is compared with the config after the overrides
    (``resumed``), so short keys (``device=cpu``) and overrides that repeat the saved value are
    judged by what they change.
    """
    changes = result_changes(saved, resumed)
    if changes:
        key, before, after = changes[0]
        allowed = ", ".join(sorted(RESUME_SAFE_KEYS))
        raise ConfigError(
            f"--resume: the override of {key!r} ({shown(before)} in {where}, {shown(after)} "
            f"given) would change the run's results; a resumed run keeps its config and accepts "
            f"only {allowed}"
        )


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer") from None


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{shown(text)} must be at least 1")
    return value


def bounded_int(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """argparse type: an integer from ``low`` to ``high`` (the bound is named when exceeded)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            limit = f" ({what})" if what else ""
            raise argparse.ArgumentTypeError(
                f"{shown(text, 40)} must be from {low:,} to {high:,}{limit}"
            )
        return value

    return parse


def check_bounded(value: object, low: int, high: int, what: str) -> int:
    """``value`` if it is an integer from ``low`` to ``high``, else a ConfigError naming
    ``what`` and the bound (for sizes given to a Python function)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{what} must be an integer from {low:,} to {high:,}, got {shown(value)}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None


def finite_non_negative(text: str) -> float:
    """argparse type: a finite number of at least 0 (NaN and inf are refused)."""
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{shown(text)} must be a finite number >= 0")
    return value


def finite_positive(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{shown(text)} must be a finite number > 0")
    return value


def map_tolerance(text: str) -> float:
    """argparse type: an mAP difference from 0 to ``MAX_MAP_TOLERANCE`` points."""
    value = _number(text)
    if not (math.isfinite(value) and 0 <= value <= MAX_MAP_TOLERANCE):
        raise argparse.ArgumentTypeError(
            f"{shown(text)} must be from 0 to {MAX_MAP_TOLERANCE:g} mAP points (a larger "
            "difference is no reproduction)"
        )
    return value


def unit_interval(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text)
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"{shown(text)} must be strictly between 0 and 1")
    return value
