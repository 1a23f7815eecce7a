"""ExemplarMemory: herded picks per class, stored once, strict/official labels, JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlcil.errors import DataError
from mlcil.memory import ExemplarMemory, herding
from mlcil.protocol import sessions

PROTOCOL = sessions(4, 0, 2)
# Positions 0..7 of a training source with 4 classes.
LABELS = np.array(
    [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 1, 0],
        [1, 0, 0, 1],
        [0, 0, 1, 0],
        [0, 0, 1, 1],
        [0, 1, 0, 0],
        [0, 0, 0, 1],
    ],
    dtype=np.uint8,
)
REFS = [f"img{i}.jpg" for i in range(8)]


def features_for(positions: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(7)
    table = rng.normal(size=(8, 5))
    return table[positions]


def first_session_memory(per_class: int = 2, **kwargs: object) -> tuple[ExemplarMemory, np.ndarray]:
    memory = ExemplarMemory(per_class=per_class, **kwargs)  # type: ignore[arg-type]
    own = np.flatnonzero(LABELS[:, :2].any(axis=1))  # session 0 images: 0, 1, 2, 3, 6
    memory.update(PROTOCOL[0], own, features_for(own), LABELS, REFS)
    return memory, own


def test_each_class_gets_its_herding_picks_and_images_are_stored_once() -> None:
    memory, own = first_session_memory()
    for class_index in (0, 1):
        rows = np.flatnonzero(LABELS[own, class_index])
        expected = [int(own[rows[i]]) for i in herding(features_for(own)[rows], 2)]
        assert memory.selections[class_index] == expected
    picked = memory.selections[0] + memory.selections[1]
    assert sorted(set(picked)) == memory.indices().tolist()
    assert len(memory) == len(set(picked)) <= 4


def test_strict_labels_are_those_known_when_stored() -> None:
    memory, _ = first_session_memory(per_class=3)
    positions, targets = memory.targets(LABELS, PROTOCOL[1], PROTOCOL)
    for position, row in zip(positions, targets, strict=True):
        # Only session-0 classes, even for image 2 or 3 which also show class 2 or 3.
        np.testing.assert_array_equal(row[2:], [0, 0])
        np.testing.assert_array_equal(row[:2], LABELS[position, :2])


def test_official_labels_reread_ground_truth_up_to_the_current_session() -> None:
    memory, _ = first_session_memory(per_class=3, label_mode="official")
    positions, targets = memory.targets(LABELS, PROTOCOL[1], PROTOCOL)
    np.testing.assert_array_equal(targets, LABELS[positions].astype(np.float32))
    assert targets[:, 2:].sum() > 0  # the leak the strict default avoids


def test_fixed_total_budget_trims_old_classes() -> None:
    memory, _ = first_session_memory(per_class=0, total=4)
    assert memory.quota(2) == 2 and all(len(p) == 2 for p in memory.selections.values())
    own = np.flatnonzero(LABELS[:, 2:].any(axis=1))
    memory.update(PROTOCOL[1], own, features_for(own), LABELS, REFS)
    assert memory.quota(4) == 1
    assert all(len(picks) == 1 for picks in memory.selections.values())
    kept = {p for picks in memory.selections.values() for p in picks}
    assert set(memory.indices().tolist()) == kept and len(memory) <= 4


def test_disabled_memory_stays_empty() -> None:
    memory = ExemplarMemory()
    memory.update(PROTOCOL[0], np.arange(8), features_for(np.arange(8)), LABELS, REFS)
    assert not memory.enabled and len(memory) == 0


def test_json_round_trip_is_plain_data(tmp_path: Path) -> None:
    memory, _ = first_session_memory()
    path = tmp_path / "memory.json"
    memory.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "mlcil-exemplar-memory"
    assert {entry["image"] for entry in data["exemplars"]} <= set(REFS)
    again = ExemplarMemory.load(path)
    assert again == memory
    again.check_against(REFS)


def test_memory_of_another_dataset_is_refused(tmp_path: Path) -> None:
    memory, _ = first_session_memory()
    changed = [f"other{i}.jpg" for i in range(8)]
    with pytest.raises(DataError, match="dataset changed"):
        memory.check_against(changed)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not an mlcil exemplar memory"):
        ExemplarMemory.load(tmp_path / "bad.json")
