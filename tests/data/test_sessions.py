"""Session training and test sets (docs/method.md, sessions) on hand-made matrices and fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlcil.data.coco import load_coco
from mlcil.data.sessions import (
    restrict,
    session_test_set,
    session_train_indices,
    session_train_set,
    test_indices,
)
from mlcil.data.transforms import build_transform
from mlcil.data.voc import load_voc
from mlcil.protocol import protocol_sessions, sessions

# Six images, four classes, protocol B0-C2: session 0 = {0, 1}, session 1 = {2, 3}.
LABELS = np.array(
    [
        [1, 0, 0, 0],  # 0: session 0 only
        [0, 1, 1, 0],  # 1: both sessions
        [0, 0, 0, 1],  # 2: session 1 only
        [0, 0, 0, 0],  # 3: no label at all: never used
        [1, 1, 0, 1],  # 4: both sessions
        [0, 0, 1, 1],  # 5: session 1 only
    ],
    dtype=np.uint8,
)
PROTOCOL = sessions(4, 0, 2)


def test_train_set_is_every_image_with_a_new_class() -> None:
    assert session_train_indices(LABELS, PROTOCOL[0], PROTOCOL).tolist() == [0, 1, 4]
    assert session_train_indices(LABELS, PROTOCOL[1], PROTOCOL).tolist() == [1, 2, 4, 5]


def test_disjoint_overlap_keeps_each_image_in_its_first_session_only() -> None:
    first = session_train_indices(LABELS, PROTOCOL[0], PROTOCOL, "disjoint").tolist()
    second = session_train_indices(LABELS, PROTOCOL[1], PROTOCOL, "disjoint").tolist()
    assert first == [0, 1, 4] and second == [2, 5]
    assert not set(first) & set(second)
    with pytest.raises(ValueError, match="overlap"):
        session_train_indices(LABELS, PROTOCOL[0], PROTOCOL, "partial")


def test_test_set_is_every_image_with_a_seen_class() -> None:
    assert test_indices(LABELS, PROTOCOL[0].seen_classes).tolist() == [0, 1, 4]
    assert test_indices(LABELS, PROTOCOL[1].seen_classes).tolist() == [0, 1, 2, 4, 5]


def test_targets_keep_only_the_session_classes() -> None:
    targets = restrict(LABELS[[1, 4]], PROTOCOL[1].new_classes)
    np.testing.assert_array_equal(targets, [[0, 0, 1, 0], [0, 0, 0, 1]])
    assert targets.dtype == np.float32


def _ref_index(source: Any) -> dict[str, int]:
    return {ref: i for i, ref in enumerate(source.image_refs)}


def test_coco_fixture_sessions(coco_fixture: tuple[Path, dict[str, Any]]) -> None:
    root, info = coco_fixture
    train, test = load_coco(root, "train"), load_coco(root, "test")
    protocol = protocol_sessions("B40-C20", 80)
    transform = build_transform(32, train=False)
    positions = _ref_index(train)
    used = set()
    for session in protocol:
        data = session_train_set(train, session, protocol, transform)
        new = set(session.new_classes)
        for position, target in zip(data.indices, data.targets, strict=True):
            # Every image carries a labelled object of this session; targets hold nothing else.
            assert new & set(np.flatnonzero(train.labels[position]))
            assert set(np.flatnonzero(target)) == new & set(np.flatnonzero(train.labels[position]))
        used |= set(data.indices.tolist())
        image, target = data[0]
        assert image.shape == (3, 32, 32) and target.shape == (80,)
        evaluation = session_test_set(test, session.seen_classes, transform)
        assert len(evaluation) > 0
        assert (evaluation.targets[:, session.num_seen :] == 0).all()
    for name in ("crowd_only", "unannotated"):
        assert positions[info["special"][name]] not in used


def test_voc_difficult_only_image_is_in_no_training_or_test_set(
    voc_fixture: tuple[Path, dict[str, Any]],
) -> None:
    root, info = voc_fixture
    protocol = protocol_sessions("B10-C5", 20)
    for split, key in (("train", "difficult_only_train"), ("test", "difficult_only_test")):
        source = load_voc(root, split)
        position = _ref_index(source)[info["special"][key]]
        for session in protocol:
            if split == "train":
                indices = session_train_indices(source.labels, session, protocol)
            else:
                indices = test_indices(source.labels, session.seen_classes)
            assert position not in indices
        # ... whereas the image with a difficult and a normal object is used.
    train = load_voc(root, "train")
    mixed = _ref_index(train)[info["special"]["difficult_with_normal"]]
    assert any(mixed in session_train_indices(train.labels, s, protocol) for s in protocol)


def test_session_split_of_a_coco_sized_matrix() -> None:
    # 82,783 x 80 labels (full COCO train2014's shape); its speed is in benchmarks/speed.py.
    rng = np.random.default_rng(0)
    labels = (rng.random((82_783, 80)) < 2.9 / 80).astype(np.uint8)
    protocol = protocol_sessions("B0-C10", 80)
    sizes = [len(session_train_indices(labels, s, protocol)) for s in protocol]
    expected = [int(labels[:, s.new_classes].any(axis=1).sum()) for s in protocol]
    assert sizes == expected


def test_targeted_images_return_tensors(coco_fixture: tuple[Path, dict[str, Any]]) -> None:
    root, _ = coco_fixture
    train = load_coco(root, "train")
    protocol = protocol_sessions("B40-C20", 80)
    data = session_train_set(
        train,
        protocol[1],
        protocol,
        build_transform(24, train=True),
        extra_indices=np.array([0]),
        extra_targets=np.eye(80, dtype=np.float32)[[3]],
    )
    image, target = data[len(data) - 1]  # the appended exemplar row
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert target.argmax().item() == 3 and target.sum().item() == 1
