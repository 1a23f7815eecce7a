"""Checks that run before any file is written, so that bad input never costs earlier work.

- ``check_resume_config``: ``--resume`` accepts only overrides that cannot change the results
  (where and how fast the run computes), else metrics.json would contradict config.yaml.
- argparse types that reject ``--max-sessions 0`` and ``--tolerance nan`` at parse time.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from mlcil.errors import ConfigError

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


def check_resume_config(saved: RunConfig, resumed: RunConfig, where: str | Path) -> None:
    """Refuse ``--resume`` overrides that could change the run's results.

    The run's ``config.yaml`` (``saved``) is compared with the config after the overrides
    (``resumed``), so short keys (``device=cpu``) and overrides that repeat the saved value are
    judged by what they change.
    """
    from mlcil.config import flatten

    before, after = flatten(saved.to_dict()), flatten(resumed.to_dict())
    changed = sorted(
        key for key in before.keys() | after.keys() if before.get(key) != after.get(key)
    )
    for key in changed:
        if key not in RESUME_SAFE_KEYS:
            allowed = ", ".join(sorted(RESUME_SAFE_KEYS))
            raise ConfigError(
                f"--resume: the override of {key!r} ({before.get(key)!r} in {where}, "
                f"{after.get(key)!r} given) would change the run's results; a resumed run keeps "
                f"its config and accepts only {allowed}"
            )


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def finite_non_negative(text: str) -> float:
    """argparse type: a finite number of at least 0 (NaN and inf are refused)."""
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text)
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"{text!r} must be strictly between 0 and 1")
    return value
