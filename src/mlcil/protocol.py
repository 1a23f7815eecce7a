"""Class orders and incremental sessions (KRT-SPEC section 2).

Class order is lexicographic by category name (Python's code-point order, so ``"baseball bat"``
sorts before ``"baseball glove"`` and before ``"bear"``). Sessions follow the "B{b}-C{c}" naming:
the first session holds classes ``[0, b)`` (or ``[0, c)`` when ``b == 0``) and every later session
adds the next ``c`` classes.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from mlcil.errors import ProtocolError

# COCO 2014 categories as (id, name, supercategory), in the order the official annotation files
# list them. Ids run 1..90 with gaps; class indices never use them (see coco_class_index).
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (21, "cow", "animal"),
    (22, "elephant", "animal"),
    (23, "bear", "animal"),
    (24, "zebra", "animal"),
    (25, "giraffe", "animal"),
    (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"),
    (32, "tie", "accessory"),
    (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"),
    (35, "skis", "sports"),
    (36, "snowboard", "sports"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"),
    (41, "skateboard", "sports"),
    (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"),
    (48, "fork", "kitchen"),
    (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"),
    (52, "banana", "food"),
    (53, "apple", "food"),
    (54, "sandwich", "food"),
    (55, "orange", "food"),
    (56, "broccoli", "food"),
    (57, "carrot", "food"),
    (58, "hot dog", "food"),
    (59, "pizza", "food"),
    (60, "donut", "food"),
    (61, "cake", "food"),
    (62, "chair", "furniture"),
    (63, "couch", "furniture"),
    (64, "potted plant", "furniture"),
    (65, "bed", "furniture"),
    (67, "dining table", "furniture"),
    (70, "toilet", "furniture"),
    (72, "tv", "electronic"),
    (73, "laptop", "electronic"),
    (74, "mouse", "electronic"),
    (75, "remote", "electronic"),
    (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"),
    (79, "oven", "appliance"),
    (80, "toaster", "appliance"),
    (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"),
    (84, "book", "indoor"),
    (85, "clock", "indoor"),
    (86, "vase", "indoor"),
    (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

DIGIT_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))

# Published settings per dataset (KRT-SPEC section 2) plus the embedded benchmark's.
PUBLISHED_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "coco": ("B0-C10", "B40-C10", "B0-C5", "B20-C4"),
    "voc": ("B0-C4", "B10-C2", "B4-C2", "B5-C3"),
    "digits": ("B0-C2", "B4-C2"),
}


def class_names(dataset: str) -> list[str]:
    """Return the class names of a built-in dataset in class-index order.

    Args:
        dataset: ``"coco"``, ``"voc"`` or ``"digits"`` (the embedded benchmark).

    Returns:
        The names sorted by code point; position ``i`` holds the name of class ``i``.
    """
    key = dataset.lower()
    if key == "coco":
        return sorted(name for _, name, _ in COCO_CATEGORIES)
    if key == "voc":
        return sorted(VOC_CLASSES)
    if key == "digits":
        return sorted(DIGIT_CLASSES)
    raise ProtocolError(
        f"unknown dataset {dataset!r} for class_names: expected one of 'coco', 'voc', 'digits' "
        "(a manifest dataset takes its class list from its own file)"
    )


@dataclass(frozen=True)
class Session:
    """One incremental session.

    Attributes:
        index: 0 for the base session, then 1, 2, ...
        new_classes: class indices introduced by this session (contiguous, ascending).
        seen_classes: every class index introduced so far, this session's included.
    """

    index: int
    new_classes: list[int] = field(default_factory=list)
    seen_classes: list[int] = field(default_factory=list)

    @property
    def old_classes(self) -> list[int]:
        """Classes introduced by earlier sessions."""
        return self.seen_classes[: len(self.seen_classes) - len(self.new_classes)]

    @property
    def num_seen(self) -> int:
        return len(self.seen_classes)

    @property
    def num_old(self) -> int:
        return len(self.seen_classes) - len(self.new_classes)


def sessions(num_classes: int, base: int, increment: int) -> list[Session]:
    """Split ``num_classes`` classes into B{base}-C{increment} sessions.

    Raises:
        ProtocolError: when the numbers do not tile the class list exactly (a base larger than
            the class count, a non-positive increment, or a remainder).
    """
    label = f"B{base}-C{increment}"
    for name, value in (("num_classes", num_classes), ("base", base), ("increment", increment)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"protocol {label}: {name} must be an integer, got {value!r}")
    if num_classes <= 0:
        raise ProtocolError(
            f"protocol {label}: there must be at least one class, got {num_classes}"
        )
    if base < 0:
        raise ProtocolError(f"protocol {label}: base must be >= 0, got {base}")
    if increment <= 0:
        raise ProtocolError(f"protocol {label}: increment must be > 0, got {increment}")
    if base > num_classes:
        raise ProtocolError(
            f"protocol {label}: base {base} is larger than the {num_classes} classes"
        )
    first = base if base > 0 else increment
    if first > num_classes:
        raise ProtocolError(
            f"protocol {label}: the first session needs {first} classes but there are "
            f"only {num_classes}"
        )
    remainder = (num_classes - first) % increment
    if remainder:
        raise ProtocolError(
            f"protocol {label}: after the first session's {first} classes, the remaining "
            f"{num_classes - first} classes do not split into sessions of {increment} "
            f"({remainder} left over)"
        )
    bounds = [0, first, *range(first + increment, num_classes + 1, increment)]
    return [
        Session(index=i, new_classes=list(range(lo, hi)), seen_classes=list(range(hi)))
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
    ]


_PROTOCOL_PATTERN = re.compile(r"^\s*[Bb](\d+)\s*-\s*[Cc](\d+)\s*$")


def parse_protocol(text: str) -> tuple[int, int]:
    """Parse ``"B0-C10"`` into ``(0, 10)``.

    Raises:
        ProtocolError: naming the text when it is not of the form B{b}-C{c}.
    """
    match = _PROTOCOL_PATTERN.match(str(text))
    if match is None:
        raise ProtocolError(
            f"protocol {text!r} is not of the form 'B<base>-C<increment>', e.g. 'B0-C10'"
        )
    return int(match.group(1)), int(match.group(2))


def protocol_sessions(text: str, num_classes: int) -> list[Session]:
    """Sessions of a protocol given as text, e.g. ``protocol_sessions("B40-C10", 80)``."""
    base, increment = parse_protocol(text)
    return sessions(num_classes, base, increment)
