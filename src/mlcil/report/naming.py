"""Names the report makes from what runs recorded (dataset, protocol, class names): file names
and page anchors that are never a path, whatever the text."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_LENGTH = 80


def slug(text: str, max_length: int = MAX_LENGTH) -> str:
    """``text`` as one safe file name part: letters, digits, ``.``, ``_`` and ``-`` only (any
    other run of characters, ``/`` and ``\\`` included, becomes ``_``), never starting with a
    dot, at most ``max_length`` characters. When the text had to change, 8 characters of its
    SHA-256 are appended, so that two texts never share a slug (``a/b`` and ``a_b``).
    """
    cleaned = _UNSAFE.sub("_", text).lstrip("._") or "_"
    if cleaned == text and len(text) <= max_length:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[: max_length - 9].rstrip('._') or '_'}-{digest}"
