"""Incremental sessions (docs/method.md, sessions).

Sessions follow the "B{b}-C{c}" naming: the first session holds classes ``[0, b)`` (or ``[0, c)``
when ``b == 0``) and every later session adds the next ``c`` classes. This module knows nothing
about datasets: class tables and class orders live in :mod:`mlcil.data.classes`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from mlcil.errors import ProtocolError


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
