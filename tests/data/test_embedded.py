"""The embedded digits benchmark."""

from __future__ import annotations

import numpy as np

from mlcil.data.base import training_label_density
from mlcil.data.embedded import (
    CANVAS_SIZE,
    MAX_DIGITS_PER_IMAGE,
    TEST_IMAGES,
    TRAIN_IMAGES,
    compose_scenes,
    load_digits,
    source_digit_indices,
)


def test_splits_have_the_documented_shapes_and_labels() -> None:
    train, test = load_digits("train"), load_digits("test")
    assert len(train) == TRAIN_IMAGES and len(test) == TEST_IMAGES
    assert train.class_names == [str(d) for d in range(10)]
    counts = train.labels.sum(axis=1)
    assert counts.min() == 1 and counts.max() == MAX_DIGITS_PER_IMAGE
    assert 2.3 < counts.mean() < 2.7  # uniform 1..4 distinct digits
    assert (train.labels.sum(axis=0) > 300).all()  # every class is well represented
    image = train.load_image(0)
    assert image.size == (CANVAS_SIZE, CANVAS_SIZE) and image.mode == "RGB"
    assert 0.2 < training_label_density(train.labels) < 0.3


def test_train_and_test_draw_on_disjoint_real_digits() -> None:
    train_digits = set(source_digit_indices("train").tolist())
    test_digits = set(source_digit_indices("test").tolist())
    assert len(train_digits) == 4000 and len(test_digits) == 1000
    assert not train_digits & test_digits


def test_generation_is_deterministic() -> None:
    first = load_digits("test")
    digits = np.zeros((10, 22, 22), dtype=np.uint8)
    a = compose_scenes(digits + 255, np.arange(10), 20, np.random.default_rng(3))
    b = compose_scenes(digits + 255, np.arange(10), 20, np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(load_digits("test").labels, first.labels)


def test_every_labelled_digit_is_drawn() -> None:
    # White square "digits": each label must correspond to bright pixels in a distinct cell.
    digits = np.full((10, 22, 22), 255, dtype=np.uint8)
    images, labels = compose_scenes(digits, np.arange(10), 50, np.random.default_rng(0))
    bright_cells = [
        sum(
            int((images[i, r : r + 24, c : c + 24].min(axis=2) > 100).sum() > 300)
            for r in (0, 24)
            for c in (0, 24)
        )
        for i in range(50)
    ]
    assert bright_cells == labels.sum(axis=1).tolist()
