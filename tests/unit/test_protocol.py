"""Class orders (mlcil.data.classes) and B{b}-C{c} sessions (docs/method.md, sessions)."""

from __future__ import annotations

import pytest

from mlcil.data.classes import COCO_CATEGORIES, class_names
from mlcil.errors import DataError, ProtocolError
from mlcil.protocol import Session, parse_protocol, protocol_sessions, sessions


def test_coco_order_is_code_point_sorted_names() -> None:
    names = class_names("coco")
    assert len(names) == 80 and len(set(names)) == 80
    assert names[:6] == [
        "airplane",
        "apple",
        "backpack",
        "banana",
        "baseball bat",
        "baseball glove",
    ]
    assert names.index("person") == 49
    assert names.index("zebra") == 79
    # A space sorts before letters: "baseball bat" < "baseball glove" < "bear".
    assert names.index("baseball glove") < names.index("bear")
    assert names == sorted(name for _, name, _ in COCO_CATEGORIES)


def test_coco_categories_keep_the_official_ids_with_gaps() -> None:
    ids = [category_id for category_id, _, _ in COCO_CATEGORIES]
    assert ids[0] == 1 and ids[-1] == 90 and len(ids) == 80
    assert 12 not in ids and 26 not in ids and 83 not in ids
    assert dict((name, i) for i, name, _ in COCO_CATEGORIES)["zebra"] == 24


def test_voc_and_digit_orders() -> None:
    voc = class_names("voc")
    assert voc[0] == "aeroplane" and voc[-1] == "tvmonitor" and len(voc) == 20
    assert voc.index("person") == 14 and voc.index("diningtable") == 10
    assert class_names("digits") == [str(d) for d in range(10)]


def test_unknown_dataset_is_an_error_naming_it() -> None:
    with pytest.raises(DataError, match="imagenet"):
        class_names("imagenet")


@pytest.mark.parametrize(
    ("classes", "text", "count"),
    [(80, "B0-C10", 8), (80, "B40-C10", 5), (80, "B0-C5", 16), (80, "B20-C4", 16),
     (20, "B0-C4", 5), (20, "B10-C2", 6), (20, "B4-C2", 9), (20, "B5-C3", 6), (10, "B0-C2", 5)],
)  # fmt: skip
def test_published_protocols_tile_their_classes(classes: int, text: str, count: int) -> None:
    result = protocol_sessions(text, classes)
    assert len(result) == count
    assert [s.index for s in result] == list(range(count))
    covered = [c for s in result for c in s.new_classes]
    assert covered == list(range(classes))
    assert result[-1].seen_classes == list(range(classes))


def test_b0_first_session_has_increment_classes_and_b_first_has_base() -> None:
    assert sessions(10, 0, 2)[0].new_classes == [0, 1]
    b40 = sessions(80, 40, 10)
    assert b40[0].new_classes == list(range(40))
    assert b40[1] == Session(1, list(range(40, 50)), list(range(50)))
    assert b40[1].old_classes == list(range(40)) and b40[1].num_old == 40


@pytest.mark.parametrize(
    ("num", "base", "increment", "fragment"),
    [
        (10, 11, 2, "larger than"),
        (10, 0, 0, "increment must be > 0"),
        (10, 2, -1, "increment must be > 0"),
        (10, 4, 4, "2 left over"),
        (10, 0, 3, "1 left over"),
        (10, 0, 11, "only 10"),
        (10, -1, 2, "base must be >= 0"),
        (0, 0, 1, "at least one class"),
    ],
)
def test_protocols_that_do_not_tile_are_errors(
    num: int, base: int, increment: int, fragment: str
) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        sessions(num, base, increment)


def test_parse_protocol_accepts_the_usual_spellings_and_rejects_others() -> None:
    assert parse_protocol("B0-C10") == (0, 10)
    assert parse_protocol(" b40-c10 ") == (40, 10)
    for bad in ("B0C10", "C10-B0", "B-C", "B0-C10-X", ""):
        with pytest.raises(ProtocolError, match="B<base>-C<increment>"):
            parse_protocol(bad)


def test_non_integer_protocol_numbers_are_errors() -> None:
    with pytest.raises(ProtocolError, match="integer"):
        sessions(10, 0, 2.5)  # type: ignore[arg-type]
