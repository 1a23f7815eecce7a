"""The pieces of ``--add-session``: sources concatenated by class name, and the run's record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlcil.added_sessions import (
    AddedSession,
    ConcatImageSource,
    read_added_sessions,
    remap_labels,
    write_added_sessions,
)
from mlcil.data.base import ArrayImageSource
from mlcil.errors import ConfigError


def source(names: list[str], labels: list[list[int]], shade: int) -> ArrayImageSource:
    images = np.full((len(labels), 4, 4, 3), shade, dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels))
    return ArrayImageSource(
        dataset="memory",
        split="train",
        class_names=names,
        images=images,
        labels=np.array(labels, dtype=np.uint8),
    )


def test_remap_labels_matches_columns_by_name() -> None:
    original = source(["a", "b", "c"], [[1, 0, 1], [0, 1, 0]], 10)
    # "c" is dropped (not in the new list), "d" is a class the source does not name.
    assert remap_labels(original, ["b", "a", "d"]).tolist() == [[0, 1, 0], [1, 0, 0]]


def test_concat_source_keeps_positions_and_dispatches_images() -> None:
    first = source(["a", "b"], [[1, 0], [0, 1], [1, 1]], 10)
    second = source(["b", "kayak"], [[0, 1], [1, 1]], 200)
    joined = ConcatImageSource([first, second], ["a", "b", "kayak"], "train")
    assert len(joined) == 5
    assert joined.image_refs[:3] == first.image_refs
    assert joined.labels.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]]
    assert np.asarray(joined.load_image(2))[0, 0].tolist() == [2, 10, 10]
    assert np.asarray(joined.load_image(4))[0, 0].tolist() == [1, 200, 200]


def test_added_sessions_round_trip_and_malformed_file(tmp_path: Path) -> None:
    assert read_added_sessions(tmp_path) == []
    added = [AddedSession(3, ("9", "8"), "/data/train.csv", None)]
    write_added_sessions(tmp_path, added)
    assert read_added_sessions(tmp_path) == added
    (tmp_path / "added_sessions.json").write_text('{"format": "mlcil-added-sessions"}')
    with pytest.raises(ConfigError, match="added_sessions.json"):
        read_added_sessions(tmp_path)
