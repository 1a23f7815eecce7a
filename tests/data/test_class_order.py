"""data.class_order: classes arrive in any order the user gives, label columns follow."""

from __future__ import annotations

import numpy as np
import pytest

from mlcil.data.base import ArrayImageSource
from mlcil.errors import ConfigError, DataError
from mlcil.experiment import load_config


def source() -> ArrayImageSource:
    labels = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=np.uint8)
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    return ArrayImageSource(
        dataset="t", split="train", class_names=["a", "b", "c"], images=images, labels=labels
    )


def test_reordering_moves_the_label_columns_with_the_names() -> None:
    data = source()
    data.reorder_classes(["c", "a", "b"])
    assert data.class_names == ["c", "a", "b"]
    np.testing.assert_array_equal(data.labels, [[0, 1, 0], [1, 0, 1], [0, 1, 1]])


@pytest.mark.parametrize(
    ("order", "fragment"),
    [
        (["a", "b"], r"missing \['c'\]"),
        (["a", "b", "z"], r"unknown \['z'\]"),
        (["a", "a", "b"], "1 repeated"),
    ],
)
def test_an_order_that_is_not_a_permutation_is_an_error(order: list[str], fragment: str) -> None:
    with pytest.raises(DataError, match=fragment):
        source().reorder_classes(order)


def test_configs_accept_unquoted_digit_names_and_tag_the_run_name() -> None:
    config = load_config(None, ["data.dataset=digits", "protocol=B0-C2", "data.class_order=[3, 8]"])
    assert config.data.class_order == ["3", "8"]
    default = load_config(None, ["data.dataset=digits", "protocol=B0-C2"])
    assert config.run_name != default.run_name and "-order" in config.run_name
    with pytest.raises(ConfigError, match="data.class_order"):
        load_config(None, ["data.class_order=3"])
